import itertools

import pytest
import torch
import torch.nn.functional as F

from mmbook.alm import (
    QUESTION_KINDS,
    TRANSCRIBE_PROMPT,
    ALMRecipe,
    AudioLanguageModel,
    RecognizerEncoder,
    alm_vocab,
    digit_string_turns,
    encode_audio,
    pool_frames,
    pretrained_digit_alm,
    respond,
    rule_answer,
    train_alm,
    train_alm_stages,
)
from mmbook.asr import CTCRecognizer
from mmbook.data import DIGIT_WORDS, WordVocab
from mmbook.vlm import encode_examples, masked_lm_loss


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def small():
    vocab = alm_vocab()
    torch.manual_seed(0)
    model = AudioLanguageModel(len(vocab), d_audio=6, num_audio_tokens=3, d_model=16, n_layer=1, n_head=2,
                               block_size=24).eval()
    strings = [[1, 2, 3], [7], [4, 4], [0, 9, 5]]
    turns = [digit_string_turns(d, seed=i) for i, d in enumerate(strings)]
    audio = torch.randn(len(strings), 3, 6, generator=torch.Generator().manual_seed(1))
    return vocab, model, strings, turns, audio


# ----------------------------------------------------------------------------- encoder and pooling
def test_recognizer_encoder_reads_the_states_under_the_head():
    torch.manual_seed(0)
    rec = CTCRecognizer(num_symbols=11, n_mels=8, channels=8, hidden=5).eval()
    enc = RecognizerEncoder(rec)
    x, lengths = torch.randn(3, 8, 30), torch.tensor([30, 21, 9])
    hidden, out_len = enc(x, lengths)
    log_probs, rec_len = rec(x, lengths)
    assert hidden.shape == (3, log_probs.shape[1], 10) and enc.d_audio == 10
    assert torch.equal(out_len, rec_len)
    torch.testing.assert_close(rec.head(hidden).log_softmax(-1), log_probs, rtol=0, atol=0)
    assert not any(p.requires_grad for p in enc.parameters())
    assert not rec.head._forward_hooks  # the hook is removed again


def test_recognizer_encoder_rejects_bad_input():
    with pytest.raises(TypeError, match="recognizer must be a CTCRecognizer"):
        RecognizerEncoder(torch.nn.Linear(2, 2))
    enc = RecognizerEncoder(CTCRecognizer(n_mels=8, channels=4, hidden=3))
    with pytest.raises(ValueError, match="8 mel bands"):
        enc(torch.randn(1, 5, 20), torch.tensor([20]))
    assert not enc.recognizer.head._forward_hooks  # removed after the error too


def test_pool_frames_equals_adaptive_avg_pool_on_valid_frames():
    frames = torch.randn(4, 13, 5, dtype=torch.float64)
    lengths = torch.tensor([13, 7, 3, 1])
    for n in (1, 4, 5, 8):
        out = pool_frames(frames, lengths, n)
        assert out.shape == (4, n, 5)
        for i, length in enumerate(lengths.tolist()):
            ref = F.adaptive_avg_pool1d(frames[i, :length].T[None], n)[0].T
            torch.testing.assert_close(out[i], ref)


def test_pool_frames_ignores_padding_and_is_a_mean_for_multiples():
    frames = torch.randn(1, 8, 3)
    padded = torch.cat([frames, torch.full((1, 4, 3), 1e6)], dim=1)
    torch.testing.assert_close(pool_frames(padded, torch.tensor([8]), 4), frames.view(1, 4, 2, 3).mean(2))


def test_pool_frames_rejects_bad_input():
    frames = torch.randn(2, 5, 3)
    with pytest.raises(ValueError, match="lengths must lie in"):
        pool_frames(frames, torch.tensor([0, 5]), 2)
    with pytest.raises(ValueError, match="lengths must lie in"):
        pool_frames(frames, torch.tensor([6, 5]), 2)
    with pytest.raises(ValueError, match=r"lengths must have shape \(2,\)"):
        pool_frames(frames, torch.tensor([5]), 2)
    with pytest.raises(ValueError, match="num_tokens must be a positive int"):
        pool_frames(frames, torch.tensor([5, 5]), 0)
    with pytest.raises(TypeError, match="frames must be"):
        pool_frames(frames.long(), torch.tensor([5, 5]), 2)
    with pytest.raises(TypeError, match="lengths must be"):
        pool_frames(frames, torch.tensor([5.0, 5.0]), 2)


# ----------------------------------------------------------------------------- the model
def test_embed_splices_audio_at_audio_positions(small):
    vocab, model, _, turns, audio = small
    ex = encode_examples(vocab, [[(p, a)] for _, p, a in turns[0]], model.audio_token_id, 3, [0] * 6)
    x = model.embed(ex.ids, audio[[0] * 6])
    tokens = model.projector(audio[0])
    for b in range(ex.ids.shape[0]):
        k = 0
        for t, i in enumerate(ex.ids[b].tolist()):
            ref = tokens[k] if i == model.audio_token_id else model.lm.wte.weight[i]
            k += i == model.audio_token_id
            torch.testing.assert_close(x[b, t], ref, rtol=0, atol=1e-6)
    torch.testing.assert_close(model.embed(ex.ids), model.lm.wte(ex.ids))  # blind: placeholders stay


def test_embed_and_forward_reject_bad_input(small):
    vocab, model, _, turns, audio = small
    ex = encode_examples(vocab, [[turns[0][0][1:]]], model.audio_token_id, 3)
    with pytest.raises(ValueError, match="exactly 3 <audio> tokens"):
        model.embed(ex.ids[:, 1:], audio[:1])
    with pytest.raises(ValueError, match=r"audio must have shape \(batch, 3, 6\)"):
        model.embed(ex.ids, torch.randn(1, 4, 6))
    with pytest.raises(ValueError, match="audio must hold 1 utterances"):
        model.embed(ex.ids, audio[:2])
    with pytest.raises(ValueError, match="ids must lie in"):
        model.embed(ex.ids + 100, audio[:1])
    with pytest.raises(TypeError, match="audio must be"):
        model(ex.ids, audio[:1].long())


def test_constructor_rejects_bad_sizes():
    with pytest.raises(ValueError, match="block_size"):
        AudioLanguageModel(10, d_audio=4, num_audio_tokens=8, block_size=8)
    with pytest.raises(ValueError, match="d_audio must be a positive int"):
        AudioLanguageModel(10, d_audio=0)
    with pytest.raises(TypeError, match="vocab_size must be an int"):
        AudioLanguageModel(10.0, d_audio=4)


def test_generate_cache_equals_no_cache_and_full_forward(small):
    vocab, model, _, _, audio = small
    prompt = torch.tensor([vocab.encode(TRANSCRIBE_PROMPT)] * 4)
    a = model.generate(audio, prompt, 5, use_cache=True)
    b = model.generate(audio, prompt, 5, use_cache=False)
    assert torch.equal(a, b) and a.shape == (4, 5)
    logits = model(torch.cat([model.prompt_ids(prompt), a], 1), audio).logits
    start = 3 + prompt.shape[1] - 1
    scores = logits[:, start:start + 5].clone()
    scores[..., [0, 1, 2, model.audio_token_id]] = float("-inf")
    first_eos = [(row.tolist() + [3]).index(3) for row in a]
    for r, n in enumerate(first_eos):
        assert torch.equal(scores[r, : n + 1].argmax(-1), a[r, : n + 1])
        assert (a[r, n + 1:] == WordVocab.PAD).all()


def test_generate_rejects_bad_input(small):
    vocab, model, _, _, audio = small
    prompt = torch.tensor([vocab.encode(TRANSCRIBE_PROMPT)] * 4)
    with pytest.raises(ValueError, match="exceed block_size"):
        model.generate(audio, prompt, 20)
    with pytest.raises(ValueError, match="max_new_tokens must be a positive int"):
        model.generate(audio, prompt, 0)
    with pytest.raises(ValueError, match="prompt_ids must lie in"):
        model.generate(audio, prompt * 0 + model.audio_token_id, 2)
    with pytest.raises(TypeError, match="use_cache must be True or False"):
        model.generate(audio, prompt, 2, use_cache=1)
    with pytest.raises(ValueError, match="audio must hold 4 utterances"):
        model.generate(audio[:2], prompt, 2)


# ----------------------------------------------------------------------------- data
def test_digit_string_turns_answers():
    turns = digit_string_turns([3, 0, 7], seed=0)
    assert [k for k, _, _ in turns] == list(QUESTION_KINDS)
    answers = {k: a for k, _, a in turns}
    assert answers["transcribe"] == "three zero seven"
    assert answers["count"] == "three" and answers["first"] == "three" and answers["last"] == "seven"
    assert answers["larger"] == "the last"
    assert digit_string_turns([5], seed=0)[-1][2] == "neither"
    assert digit_string_turns([9, 2], seed=0)[-1][2] == "the first"
    probe = turns[4][1].split()[3].rstrip("?")
    assert answers["contains"] == ("yes" if DIGIT_WORDS.index(probe) in [3, 0, 7] else "no")


def test_contains_is_balanced_and_seeded():
    answers = [digit_string_turns([1, 2, 3], seed=s)[4][2] for s in range(400)]
    assert 0.4 < answers.count("yes") / 400 < 0.6
    assert digit_string_turns([1, 2, 3], seed=7) == digit_string_turns([1, 2, 3], seed=7)
    all_digits = digit_string_turns(list(range(9)), seed=3)  # nothing absent but 9
    assert all_digits[4][2] in ("yes", "no")


def test_digit_string_turns_rejects_bad_input():
    with pytest.raises(TypeError, match="digits must be a list of ints"):
        digit_string_turns("123")
    with pytest.raises(TypeError, match="digits must be a list of ints"):
        digit_string_turns([1, 10])
    with pytest.raises(ValueError, match="1 to 9 digits"):
        digit_string_turns([])
    with pytest.raises(ValueError, match="seed must be an int >= 0"):
        digit_string_turns([1], seed=-1)


def test_vocab_covers_every_turn():
    vocab = alm_vocab()
    for digits in itertools.product(range(10), repeat=2):
        for _, prompt, answer in digit_string_turns(list(digits), seed=sum(digits)):
            assert WordVocab.UNK not in vocab.encode(prompt) + vocab.encode(answer)


def test_rule_answer_reproduces_the_labels():
    for n, digits in enumerate(itertools.product(range(10), repeat=3)):
        if n % 7:
            continue
        for _, prompt, answer in digit_string_turns(list(digits), seed=n):
            assert rule_answer(prompt, list(digits)) == answer
    assert rule_answer(TRANSCRIBE_PROMPT, []) == ""


def test_rule_answer_rejects_bad_input():
    with pytest.raises(ValueError, match="one of the templates"):
        rule_answer("what is the weather?", [1])
    with pytest.raises(ValueError, match="one of the templates"):
        rule_answer("was there a banana?", [1])
    with pytest.raises(TypeError, match="question must be a str"):
        rule_answer(3, [1])
    with pytest.raises(TypeError, match="heard must be a list of ints"):
        rule_answer(TRANSCRIBE_PROMPT, [1, "2"])


# ----------------------------------------------------------------------------- training and responding
def test_train_alm_trains_only_the_chosen_part(small):
    vocab, _, _, turns, audio = small
    torch.manual_seed(1)
    model = AudioLanguageModel(len(vocab), d_audio=6, num_audio_tokens=3, d_model=16, n_layer=1, n_head=2,
                               block_size=24)
    ex = encode_examples(vocab, [[(p, a)] for ts in turns for _, p, a in ts], model.audio_token_id, 3,
                         [i for i, ts in enumerate(turns) for _ in ts])
    lm_before = {k: v.clone() for k, v in model.lm.state_dict().items()}
    losses = train_alm(model, audio, ex, trainable=("projector",), epochs=3, batch_size=8, lr=1e-2)
    assert len(losses) == 3 and losses[-1] < losses[0]
    assert all(torch.equal(v, model.lm.state_dict()[k]) for k, v in lm_before.items())
    assert all(p.requires_grad for p in model.parameters()) and not model.training


def test_train_alm_loss_is_the_masked_loss(small):
    vocab, model, _, turns, audio = small
    ex = encode_examples(vocab, [[(p, a)] for _, p, a in turns[1]], model.audio_token_id, 3, [1] * 6)
    with torch.no_grad():
        loss = masked_lm_loss(model(ex.ids, audio[ex.image_index]).logits, ex.targets, ex.loss_mask)
    copy = AudioLanguageModel(len(vocab), d_audio=6, num_audio_tokens=3, d_model=16, n_layer=1, n_head=2,
                              block_size=24)
    copy.load_state_dict(model.state_dict())
    first = train_alm(copy, audio, ex, trainable=("lm",), epochs=1, batch_size=6, lr=1e-9)[0]
    assert first == pytest.approx(float(loss), rel=1e-5)  # one batch, a negligible step: the initial loss


def test_train_alm_rejects_bad_input(small):
    vocab, model, _, turns, audio = small
    ex = encode_examples(vocab, [[turns[0][0][1:]]], model.audio_token_id, 3, [5])
    with pytest.raises(ValueError, match="trainable must be a non-empty subset"):
        train_alm(model, audio, ex, trainable=("encoder",))
    with pytest.raises(ValueError, match=r"examples.image_index must lie in \[0, 4\)"):
        train_alm(model, audio, ex)
    with pytest.raises(TypeError, match="examples must be VLMExamples"):
        train_alm(model, audio, ex.ids)
    with pytest.raises(ValueError, match="lr must be"):
        train_alm(model, None, ex, lr=0.0)
    with pytest.raises(TypeError, match="model must be an AudioLanguageModel"):
        train_alm(torch.nn.Linear(2, 2), None, ex)


def test_train_alm_stages_and_respond(small):
    vocab, _, strings, turns, audio = small
    recipe = ALMRecipe(num_audio_tokens=3, d_model=16, n_layer=1, n_head=2, block_size=24, lm_epochs=1,
                       align_epochs=1, full_epochs=2, batch_size=8)
    torch.manual_seed(2)
    model = recipe.build(vocab, 6)
    record = train_alm_stages(model, vocab, audio, turns, recipe, seed=0)
    assert set(record["history"]) == {"lm", "align", "full"}
    assert [len(v) for v in record["history"].values()] == [1, 1, 2]
    assert set(record["lm_state"]) == set(model.state_dict())
    prompts = [ts[2][1] for ts in turns]
    out = respond(model, vocab, audio, prompts)
    assert len(out) == 4 and all(isinstance(o, str) for o in out)
    assert respond(model, vocab, None, prompts[:2]) == respond(model, vocab, None, prompts[:2])
    skip = ALMRecipe(num_audio_tokens=3, d_model=16, n_layer=1, n_head=2, block_size=24, align_epochs=0,
                     full_epochs=1)
    assert train_alm_stages(skip.build(vocab, 6), vocab, audio, turns, skip)["history"]["align"] == []


def test_train_alm_stages_and_respond_reject_bad_input(small):
    vocab, model, _, turns, audio = small
    with pytest.raises(ValueError, match="one list of turns per utterance"):
        train_alm_stages(model, vocab, audio, turns[:2])
    with pytest.raises(ValueError, match="vocab must be the model's"):
        train_alm_stages(model, WordVocab(["a b"]), audio, turns)
    with pytest.raises(TypeError, match="recipe must be an ALMRecipe"):
        train_alm_stages(model, vocab, audio, turns, recipe={})
    with pytest.raises(TypeError, match="prompts must be a sequence of strings"):
        respond(model, vocab, audio, "what was said?")
    with pytest.raises(ValueError, match="audio must hold 1 utterances"):
        respond(model, vocab, audio, ["what was said?"])


def test_recipe_checks_and_key():
    assert ALMRecipe().as_key()["num_audio_tokens"] == 8
    with pytest.raises(ValueError, match="full_epochs must be a positive int"):
        ALMRecipe(full_epochs=0)
    with pytest.raises(ValueError, match="align_epochs must be an int >= 0"):
        ALMRecipe(align_epochs=-1)
    with pytest.raises(ValueError, match="lr must be"):
        ALMRecipe(lr=float("nan"))
    with pytest.raises(TypeError, match="vocab must be a WordVocab"):
        ALMRecipe().build(["a"], 4)


# ----------------------------------------------------------------------------- the chapter's trained model
def test_encode_audio_is_the_encoder_then_pool_frames():
    torch.manual_seed(0)
    encoder = RecognizerEncoder(CTCRecognizer(num_symbols=11, n_mels=8, channels=6, hidden=5).eval())
    features, lengths = torch.randn(3, 8, 40), torch.tensor([40, 25, 17])
    states, state_lengths = encoder(features, lengths)
    torch.testing.assert_close(encode_audio(encoder, features, lengths, 4), pool_frames(states, state_lengths, 4),
                               rtol=0, atol=0)
    with pytest.raises(TypeError, match="encoder"):
        encode_audio(encoder.recognizer, features, lengths, 4)
    with pytest.raises(ValueError, match="num_tokens"):
        encode_audio(encoder, features, lengths, 0)


def test_pretrained_digit_alm_rejects_bad_input():
    # the checks run before anything is trained or loaded
    with pytest.raises(TypeError, match="device"):
        pretrained_digit_alm(1.5)
    with pytest.raises(TypeError, match="recipe"):
        pretrained_digit_alm("cpu", {"full_epochs": 25})
    with pytest.raises(ValueError, match="seed"):
        pretrained_digit_alm("cpu", seed=-1)
