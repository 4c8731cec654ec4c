import math

import pytest
import torch
import torch.nn.functional as F

from mmbook.data import WordVocab, shapes_scenes
from mmbook.vlm import (
    CAPTION_PROMPT,
    CHAPTER14_RECIPE,
    ShapesVLMRecipe,
    VisionLanguageModel,
    VLMExamples,
    answer_questions,
    caption_images,
    caption_references,
    decode_responses,
    encode_examples,
    greedy_decode,
    lm_optimizer,
    masked_lm_loss,
    mentioned_objects,
    pretrain_patch_encoder,
    pretrained_shapes_vlm,
    shapes_vlm_examples,
    shapes_vlm_history,
    shapes_vocab,
    train_shapes_vlm,
    train_vlm,
)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: threads only add overhead
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def setup(one_thread):
    data = shapes_scenes(24, seed=5)
    vocab = shapes_vocab(data)
    torch.manual_seed(0)
    model = VisionLanguageModel(len(vocab), d_model=16, n_layer=1, n_head=2, block_size=48, d_vision=16).eval()
    images = data.images.float() / 255.0
    return data, vocab, model, images


def test_embed_puts_projected_patches_at_image_positions(setup):
    data, vocab, model, images = setup
    ex = shapes_vlm_examples(data, vocab, model.image_token_id, model.num_image_tokens, ("qa",), packed=False)
    ids, imgs = ex.ids[:5], images[ex.image_index[:5]]
    x = model.embed(ids, imgs)
    tokens = model.projector(model.encoder(imgs))
    for b in range(5):  # an explicit loop over positions as the reference
        k = 0
        for t in range(ids.shape[1]):
            if ids[b, t] == model.image_token_id:
                torch.testing.assert_close(x[b, t], tokens[b, k], rtol=0, atol=0)
                k += 1
            else:
                torch.testing.assert_close(x[b, t], model.lm.wte.weight[ids[b, t]], rtol=0, atol=0)
        assert k == model.num_image_tokens
    blind = model.embed(ids)  # without images the placeholders keep the <image> embedding
    torch.testing.assert_close(blind[:, 0], model.lm.wte.weight[model.image_token_id].expand(5, -1))


def test_encode_examples_layout(setup):
    _, vocab, model, _ = setup
    ex = encode_examples(vocab, [[("what colour is the circle?", "red")], [(CAPTION_PROMPT, "a red circle"),
                                                                            ("how many shapes are there?", "one")]],
                         model.image_token_id, 2, image_index=[3, 4])
    assert ex.ids.shape == ex.targets.shape == ex.loss_mask.shape and ex.image_index.tolist() == [3, 4]
    words = [vocab.itos[i] if i < len(vocab) else "<image>" for i in ex.ids[0].tolist()]
    assert words[:10] == ["<image>", "<image>", "what", "colour", "is", "the", "circle", "?", "red", "<eos>"]
    torch.testing.assert_close(ex.targets[:, :-1], ex.ids[:, 1:])
    learned = [[vocab.itos[t] for t in ex.targets[b][ex.loss_mask[b]].tolist()] for b in range(2)]
    assert learned == [["red", "<eos>"], ["a", "red", "circle", "<eos>", "one", "<eos>"]]


def test_masked_lm_loss_ignores_masked_positions():
    torch.manual_seed(1)
    logits = torch.randn(3, 7, 11, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 11, (3, 7))
    mask = torch.rand(3, 7) < 0.5
    mask[0, 0] = True
    loss = masked_lm_loss(logits, targets, mask)
    ref = F.cross_entropy(logits.reshape(21, 11), targets.masked_fill(~mask, -100).reshape(21), ignore_index=-100)
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=1e-12)
    loss.backward()
    assert torch.all(logits.grad[~mask] == 0) and torch.all(logits.grad[mask].abs().sum(-1) > 0)
    other = torch.where(mask, targets, (targets + 3) % 11)
    assert masked_lm_loss(logits, other, mask).item() == loss.item()


def test_cached_generation_equals_uncached_and_beam_one_is_greedy(setup):
    data, vocab, model, images = setup
    prompt = torch.tensor([vocab.encode(CAPTION_PROMPT)] * 6)
    cached = model.generate(images[:6], prompt, 12)
    uncached = model.generate(images[:6], prompt, 12, use_cache=False)
    assert torch.equal(cached, uncached)
    beam, _ = model.beam_search(images[:6], prompt, 1, 12)
    assert torch.equal(beam, cached)


def test_beam_search_with_full_beam_finds_the_best_two_token_sequence(setup):
    data, vocab, model, images = setup
    prompt = torch.tensor([vocab.encode("what colour is the circle?")] * 2)
    v = model.vocab_size + 1
    tokens, score = model.beam_search(images[:2], prompt, v, 2)
    ids = model._prompt_ids(prompt, "test")
    banned = [WordVocab.PAD, WordVocab.UNK, WordVocab.BOS, model.image_token_id]

    def log_probs(seq, image):  # the decoder never emits the banned ids: renormalise over the others
        logits = model(seq, features=model.encoder(image)).logits[0, -1].double()
        logits[banned] = -float("inf")
        return torch.log_softmax(logits, -1)

    with torch.no_grad():
        for b in range(2):
            first = log_probs(ids[b: b + 1], images[b: b + 1])
            best = first[WordVocab.EOS].item()  # <eos> first: a finished hypothesis keeps its score
            for t1 in range(v):
                if t1 in banned or t1 == WordVocab.EOS:
                    continue
                second = log_probs(torch.cat([ids[b: b + 1], torch.tensor([[t1]])], dim=1), images[b: b + 1])
                best = max(best, first[t1].item() + second.max().item())
            assert score[b].item() == pytest.approx(best, abs=1e-5)


def test_train_vlm_freezes_other_parts_and_learns(setup):
    data, vocab, _, images = setup
    torch.manual_seed(0)
    model = VisionLanguageModel(len(vocab), d_model=16, n_layer=1, n_head=2, block_size=96, d_vision=16)
    ex = shapes_vlm_examples(data, vocab, model.image_token_id, model.num_image_tokens)
    encoder_before = [p.clone() for p in model.encoder.parameters()]
    lm_before = [p.clone() for p in model.lm.parameters()]
    history = train_vlm(model, images, ex, trainable=("projector",), epochs=2, batch_size=8, lr=1e-2)
    assert all(torch.equal(a, b) for a, b in zip(encoder_before, model.encoder.parameters(), strict=True))
    assert all(torch.equal(a, b) for a, b in zip(lm_before, model.lm.parameters(), strict=True))
    assert all(p.requires_grad for p in model.parameters())
    history = train_vlm(model, images, ex, trainable=("projector", "lm"), epochs=3, batch_size=8, lr=1e-2)
    assert history[-1] < history[0]
    assert len(pretrain_patch_encoder(model.encoder, data, epochs=1, batch_size=12)) == 1


def test_answer_and_caption_strings(setup):
    data, vocab, model, images = setup
    questions = [q for q, _, _ in data.questions[0]] + ["how many shapes are there?"]
    answers = answer_questions(model, vocab, images[[0] * len(questions)], questions)
    assert len(answers) == len(questions) and all(isinstance(a, str) for a in answers)
    assert answer_questions(model, vocab, images[[0] * len(questions)], questions, beam_size=2)
    captions = caption_images(model, vocab, images[:3], beam_size=3, max_new_tokens=10)
    assert len(captions) == 3 and all(len(c.split()) <= 10 for c in captions)


def test_caption_references_and_mentioned_objects():
    data = shapes_scenes(60, seed=3)
    for scene, caption in zip(data.scenes, data.captions, strict=True):
        refs = caption_references(scene)
        assert caption in refs
        assert sorted(mentioned_objects(caption)) == sorted((o.colour, o.shape) for o in scene.objects)
    assert mentioned_objects("a red circle above a blue square and a green") == [("red", "circle"),
                                                                                  ("blue", "square")]


def test_bad_inputs(setup):
    data, vocab, model, images = setup
    with pytest.raises(ValueError, match="mask"):
        masked_lm_loss(torch.zeros(1, 2, 3), torch.zeros(1, 2, dtype=torch.long), torch.zeros(1, 2))
    with pytest.raises(ValueError, match="selects no position"):
        masked_lm_loss(torch.zeros(1, 2, 3), torch.zeros(1, 2, dtype=torch.long), torch.zeros(1, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="exactly 9 <image> tokens"):
        model.embed(torch.zeros(1, 4, dtype=torch.long), images[:1])
    with pytest.raises(TypeError, match="ids must be an int64"):
        model.embed(torch.zeros(1, 4), images[:1])
    with pytest.raises(ValueError, match="exceed block_size"):
        model.generate(images[:1], torch.tensor([vocab.encode(CAPTION_PROMPT)]), 40)
    with pytest.raises(ValueError, match="beam_size must be (a )?positive"):
        model.beam_search(images[:1], torch.tensor([vocab.encode(CAPTION_PROMPT)]), 0, 4)
    with pytest.raises(ValueError, match="image_token_id"):
        encode_examples(vocab, [[("a", "b")]], 3, 9)
    with pytest.raises(ValueError, match="conversation 0"):
        encode_examples(vocab, [["what?"]], model.image_token_id, 9)
    with pytest.raises(ValueError, match="tasks"):
        shapes_vlm_examples(data, vocab, model.image_token_id, 9, ("captions",))
    with pytest.raises(ValueError, match="trainable"):
        train_vlm(model, images, VLMExamples(*encode_examples(vocab, [[("a", "b")]], model.image_token_id, 9)),
                  trainable=("decoder",))
    with pytest.raises(TypeError, match="examples"):
        train_vlm(model, images, (1, 2), trainable=("lm",))
    with pytest.raises(ValueError, match="images must hold 2 images"):
        answer_questions(model, vocab, images[:1], ["what?", "why?"])
    with pytest.raises(TypeError, match="questions"):
        answer_questions(model, vocab, images[:1], "what?")
    with pytest.raises(ValueError, match="vocab"):
        caption_images(model, WordVocab(["a b"]), images[:1])
    with pytest.raises(TypeError, match="images"):
        caption_images(model, vocab, images[:1].to(torch.uint8))
    with pytest.raises(TypeError, match="scene"):
        caption_references("a red circle")
    with pytest.raises(TypeError, match="caption"):
        mentioned_objects(3)
    with pytest.raises(ValueError, match="stage"):
        pretrained_shapes_vlm(0, "cpu", stage="final")
    with pytest.raises(ValueError, match="seed"):
        pretrained_shapes_vlm(-1, "cpu")
    with pytest.raises(ValueError, match="d_vision"):
        VisionLanguageModel(10, d_vision=0)
    assert ShapesVLMRecipe().packed and ShapesVLMRecipe().full_packed and ShapesVLMRecipe().full_batch_size is None


def test_train_shapes_vlm_stage_2_packed_or_one_turn_per_example():
    # Stage 2 trains on the packed conversations (the default) or on one turn per example; both layouts train
    # (a tiny recipe: a few seconds). At their defaults the two stage-2 settings leave the cache key as it was.
    from mmbook.vlm import _cache_key

    cpu = torch.device("cpu")
    assert "full_packed" not in _cache_key(0, ShapesVLMRecipe(), cpu)["recipe"]
    assert _cache_key(0, ShapesVLMRecipe(full_packed=False), cpu)["recipe"]["full_packed"] is False
    assert _cache_key(0, ShapesVLMRecipe(full_batch_size=64), cpu) != _cache_key(0, ShapesVLMRecipe(), cpu)
    for full_packed in (True, False):
        recipe = ShapesVLMRecipe(train_scenes=24, d_model=16, n_layer=1, n_head=2, d_vision=16, encoder_epochs=1,
                                 lm_epochs=1, align_epochs=1, full_epochs=2, batch_size=8, full_batch_size=12,
                                 full_packed=full_packed)
        model, vocab, log = train_shapes_vlm(0, "cpu", recipe)
        assert set(log["history"]) == {"encoder", "lm", "align", "full"} and len(log["history"]["full"]) == 2
        assert all(math.isfinite(x) for x in log["history"]["full"]) and not model.training


def test_chapter14_recipe_is_the_one_chapter_14_trains():
    # Chapter 15 loads CHAPTER14_RECIPE and says it is chapter 14's model (the same cache entry): the recipe
    # chapter 14's notebook builds, read from its source (a ShapesVLMRecipe(...) call or the constant itself).
    import ast
    import json
    from pathlib import Path

    notebook = Path(__file__).resolve().parents[1] / "chapters" / "14_vision_language_model.ipynb"
    found = []
    for cell in json.loads(notebook.read_text(encoding="utf-8"))["cells"]:
        if cell["cell_type"] != "code":
            continue
        for node in ast.walk(ast.parse("".join(cell["source"]))):
            if isinstance(node, ast.Assign) and [getattr(t, "id", None) for t in node.targets] == ["recipe"]:
                value = node.value
                if isinstance(value, ast.Name) and value.id == "CHAPTER14_RECIPE":
                    found.append(CHAPTER14_RECIPE)
                elif isinstance(value, ast.Call) and getattr(value.func, "id", None) == "ShapesVLMRecipe":
                    assert not value.args, "chapter 14's recipe: keyword arguments only"
                    found.append(ShapesVLMRecipe(**{k.arg: ast.literal_eval(k.value) for k in value.keywords}))
    assert found == [CHAPTER14_RECIPE]
    assert CHAPTER14_RECIPE != ShapesVLMRecipe()  # not the package default: its own cache entry


def test_recipe_rejects_bad_settings_and_align_epochs_0_skips_stage_1(tmp_path, monkeypatch):
    for kwargs, error, match in [({"align_epochs": -1}, ValueError, "align_epochs must be an int >= 0"),
                                 ({"full_epochs": 0}, ValueError, "full_epochs must be a positive int"),
                                 ({"full_lr": float("nan")}, ValueError, "ShapesVLMRecipe: full_lr must be a positive"),
                                 ({"full_batch_size": 0}, ValueError, "ShapesVLMRecipe: full_batch_size must be a pos"),
                                 ({"full_packed": 1}, TypeError, "ShapesVLMRecipe: full_packed must be True or False")]:
        with pytest.raises(error, match=match):
            ShapesVLMRecipe(**kwargs)
    with pytest.raises(TypeError, match="pretrained_shapes_vlm: recipe must be a ShapesVLMRecipe, got dict"):
        pretrained_shapes_vlm(0, "cpu", recipe={"full_epochs": 9})
    with pytest.raises(TypeError, match="shapes_vlm_history: recipe must be a ShapesVLMRecipe, got str"):
        shapes_vlm_history(0, recipe="one turn")
    # align_epochs=0: stage 2 starts from the blind LM and a fresh projector (the ablation "stage 2 only"); the
    # recipe reaches the cache through pretrained_shapes_vlm's recipe argument and keys it
    monkeypatch.setenv("MMBOOK_CACHE_DIR", str(tmp_path))
    tiny = {"train_scenes": 24, "d_model": 16, "n_layer": 1, "n_head": 2, "d_vision": 16, "encoder_epochs": 1,
            "lm_epochs": 1, "full_epochs": 1, "batch_size": 8, "full_packed": False}
    skip = ShapesVLMRecipe(align_epochs=0, **tiny)
    model, vocab = pretrained_shapes_vlm(0, "cpu", recipe=skip)
    history = shapes_vlm_history(0, recipe=skip)
    assert history["align"] == [] and len(history["full"]) == 1 and model.lm.config.d_model == 16
    blind, _ = pretrained_shapes_vlm(0, "cpu", stage="lm", recipe=skip)
    aligned, _ = pretrained_shapes_vlm(0, "cpu", stage="align", recipe=skip)
    assert all(torch.equal(a, b) for a, b in zip(blind.state_dict().values(), aligned.state_dict().values(),
                                                  strict=True))
    assert len(list(tmp_path.rglob("*.pt"))) == 1
    pretrained_shapes_vlm(0, "cpu", recipe=ShapesVLMRecipe(align_epochs=1, **tiny))  # another recipe: its own file
    assert len(list(tmp_path.rglob("*.pt"))) == 2


def test_pretrain_patch_encoder_does_not_depend_on_the_global_random_state(setup):
    # torch seeds its global generator at random in every new process, so a training function that drew anything
    # (here the throw-away probe) from it would give different models in different processes.
    data, vocab, _, _ = setup
    results = []
    for global_seed in (1, 2):
        torch.manual_seed(0)
        model = VisionLanguageModel(len(vocab), d_model=16, n_layer=1, n_head=2, block_size=48, d_vision=16)
        torch.manual_seed(global_seed)
        history = pretrain_patch_encoder(model.encoder, data, epochs=1, batch_size=12, seed=3)
        results.append((history, [p.detach().clone() for p in model.encoder.parameters()]))
    assert results[0][0] == results[1][0]
    assert all(torch.equal(a, b) for a, b in zip(results[0][1], results[1][1], strict=True))


def test_pretrained_cache_names_a_wrong_or_truncated_file(tmp_path, monkeypatch):
    # Planted files at the name of the default model's cache entry: pretrained_shapes_vlm must refuse each of them
    # with an error naming the file instead of loading (or silently retraining over) it.
    import re

    from mmbook.cache import CacheError, save_tensors
    from mmbook.vlm import _build, _cache_key, _cache_path

    monkeypatch.setenv("MMBOOK_CACHE_DIR", str(tmp_path))
    recipe, device = ShapesVLMRecipe(), torch.device("cpu")
    key, path = _cache_key(0, recipe, device), _cache_path(0, recipe, device)
    vocab = shapes_vocab()
    untrained = {k: v.clone() for k, v in _build(vocab, recipe).state_dict().items()}
    blob = {"itos": list(vocab.itos), "history": {s: [1.0] for s in ("encoder", "lm", "align", "full")},
            "states": {s: untrained for s in ("lm", "align", "full")}}
    name = re.escape(str(path))

    torch.save(untrained, path)  # a plain .pt of untrained weights: no header, not a cache file
    with pytest.raises(CacheError, match=f"{name} is not an mmbook cache file"):
        pretrained_shapes_vlm(0, "cpu")

    smaller = VisionLanguageModel(len(vocab), d_model=16, n_layer=1, n_head=2, block_size=48, d_vision=16)
    save_tensors(path, key, {**blob, "states": {s: smaller.state_dict() for s in ("lm", "align", "full")}})
    with pytest.raises(CacheError, match=f"{name} holds weights for stage 'lm' that do not fit the model"):
        pretrained_shapes_vlm(0, "cpu")  # a valid file with the wrong content (another model's weights)

    save_tensors(path, key, blob)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 1000])
    with pytest.raises(CacheError, match=f"{name} is truncated"):
        pretrained_shapes_vlm(0, "cpu")

    save_tensors(path, {**key, "seed": 1}, blob)  # written for other settings
    with pytest.raises(CacheError, match=f"{name} was written for other settings"):
        pretrained_shapes_vlm(0, "cpu")

    save_tensors(path, key, blob)  # well-formed: loads (the cache checks integrity, not quality)
    model, loaded_vocab = pretrained_shapes_vlm(0, "cpu", stage="align")
    assert loaded_vocab.itos == vocab.itos and torch.equal(model.projector[0].weight, untrained["projector.0.weight"])


def test_negative_image_indices_nan_penalties_and_out_of_range_ids_are_refused(setup):
    data, vocab, model, images = setup
    ex = shapes_vlm_examples(data, vocab, model.image_token_id, model.num_image_tokens, ("caption",))
    with pytest.raises(ValueError, match="encode_examples: image_index must be >= 0"):
        encode_examples(vocab, [[("a", "b")]], model.image_token_id, 9, [-1])  # -1 meant the last image
    with pytest.raises(TypeError, match="encode_examples: image_index must be a sequence or tensor of ints"):
        encode_examples(vocab, [[("a", "b")]], model.image_token_id, 9, [0.5])
    shifted = VLMExamples(ex.ids, ex.targets, ex.loss_mask, ex.image_index - 1)
    with pytest.raises(ValueError, match=r"train_vlm: examples.image_index must lie in \[0, 24\)"):
        train_vlm(model, images, shifted, epochs=1)
    with pytest.raises(ValueError, match="train_vlm: lr must be a positive number, got nan"):
        train_vlm(model, images, ex, epochs=1, lr=float("nan"))
    with pytest.raises(ValueError, match=r"VisionLanguageModel.embed: ids must lie in \[0, "):
        model.embed(torch.full((1, 12), -1))  # not nn.Embedding's "index out of range in self"
    with pytest.raises(ValueError, match=r"masked_lm_loss: targets must lie in \[0, 5\)"):
        masked_lm_loss(torch.randn(1, 3, 5), torch.tensor([[0, 7, 1]]), torch.ones(1, 3, dtype=torch.bool))
    prompt = torch.tensor([vocab.encode(CAPTION_PROMPT)])
    with pytest.raises(ValueError, match="VisionLanguageModel.beam_search: length_penalty must be a number >= 0"):
        model.beam_search(images[:1], prompt, 2, 3, length_penalty=float("nan"))  # every score became NaN
    with pytest.raises(ValueError, match="VisionLanguageModel.generate: eos_id must be in"):
        model.generate(images[:1], prompt, 3, eos_id=-5)
    with pytest.raises(ValueError, match="VisionLanguageModel.encode_images: features must have shape"):
        model.encode_images(features=torch.randn(1, 9, 8))
    with pytest.raises(ValueError, match="pretrained_shapes_vlm: device must name a torch device"):
        pretrained_shapes_vlm(device="tpu")


def test_greedy_decode_is_the_models_greedy_loop(setup):
    data, vocab, model, images = setup
    prompt = torch.tensor([vocab.encode("what colour is the circle ?")] * 3)
    expected = model.generate(images[:3], prompt, 4)
    with torch.no_grad():
        prefix = model.embed(model._prompt_ids(prompt, "test"), images[:3])
    banned = [WordVocab.PAD, WordVocab.UNK, WordVocab.BOS, model.image_token_id]
    for use_cache in (True, False):
        got = greedy_decode(model.lm, prefix, 4, banned, use_cache=use_cache)
        assert torch.equal(got, expected)
    unbanned = greedy_decode(model.lm, prefix, 4, [])
    assert unbanned.shape == (3, 4) and unbanned.dtype == torch.long


def test_greedy_decode_rejects_bad_input(setup):
    data, vocab, model, images = setup
    prefix = torch.zeros(2, 5, model.lm.config.d_model)
    with pytest.raises(TypeError, match="greedy_decode: lm must be a GPT"):
        greedy_decode(model, prefix, 2, [])
    with pytest.raises(ValueError, match=r"greedy_decode: prefix must have shape \(batch >= 1, L >= 1, 16\)"):
        greedy_decode(model.lm, prefix[..., :3], 2, [])
    with pytest.raises(ValueError, match="exceed block_size=48"):
        greedy_decode(model.lm, prefix, 44, [])
    with pytest.raises(ValueError, match="max_new_tokens"):
        greedy_decode(model.lm, prefix, 0, [])
    with pytest.raises(ValueError, match="banned"):
        greedy_decode(model.lm, prefix, 2, [model.lm.config.vocab_size])
    with pytest.raises(TypeError, match="banned must be a sequence"):
        greedy_decode(model.lm, prefix, 2, torch.tensor([0]))
    with pytest.raises(ValueError, match=r"greedy_decode: eos_id must be in \[0, 44\)"):
        greedy_decode(model.lm, prefix, 2, [], eos_id=-1)
    with pytest.raises(TypeError, match="use_cache"):
        greedy_decode(model.lm, prefix, 2, [], use_cache=1)


def test_decode_responses_stops_at_eos_and_drops_placeholders(setup):
    data, vocab, model, images = setup
    words = vocab.encode("red circle")
    tokens = torch.tensor([[*words, WordVocab.EOS, words[0]], [model.image_token_id, words[1], WordVocab.PAD,
                                                                WordVocab.PAD]])
    assert decode_responses(vocab, tokens) == ["red circle", vocab.decode([words[1]])]
    with pytest.raises(TypeError, match="decode_responses: vocab must be a WordVocab"):
        decode_responses(None, tokens)
    with pytest.raises(TypeError, match="decode_responses: tokens"):
        decode_responses(vocab, tokens.float())
    with pytest.raises(ValueError, match="decode_responses: tokens"):
        decode_responses(vocab, tokens[0])


def test_lm_optimizer_is_adamw_with_one_cycle():
    w = torch.nn.Parameter(torch.zeros(3))
    optimizer, scheduler = lm_optimizer([w], 0.01, 10, "cpu")
    assert isinstance(optimizer, torch.optim.AdamW) and optimizer.param_groups[0]["weight_decay"] == 0.01
    assert isinstance(scheduler, torch.optim.lr_scheduler.OneCycleLR) and scheduler.total_steps == 10
    with pytest.raises(TypeError, match="lm_optimizer: params must be a non-empty list"):
        lm_optimizer([], 0.01, 10, "cpu")
    with pytest.raises(ValueError, match="lm_optimizer: lr"):
        lm_optimizer([w], 0.0, 10, "cpu")
    with pytest.raises(ValueError, match="lm_optimizer: steps"):
        lm_optimizer([w], 0.01, -1, "cpu")
    with pytest.raises(TypeError, match="lm_optimizer: device"):
        lm_optimizer([w], 0.01, 10, 3)
