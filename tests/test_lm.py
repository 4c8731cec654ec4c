import math
from collections import Counter

import pytest
import torch
from torch.nn import functional as F

from mmbook.lm import (
    CharMLP,
    CharVocab,
    NGramLM,
    make_windows,
    mean_nll,
    perplexity,
    perplexity_from_logits,
    random_windows,
    sample,
)

TEXT = "the cat sat on the mat. the dog sat on the log. a cat and a dog.\n"


@pytest.fixture
def vocab():
    return CharVocab.from_text(TEXT)


# ---------------------------------------------------------------- CharVocab


def test_vocab_round_trip_and_layout(vocab):
    assert vocab.itos[:2] == ["<bos>", "<unk>"] and vocab.bos_id == 0 and vocab.unk_id == 1
    assert vocab.itos[2:] == sorted(set(TEXT))
    assert len(vocab) == len(set(TEXT)) + 2
    ids = vocab.encode(TEXT)
    assert ids.dtype == torch.int64 and ids.shape == (len(TEXT),)
    assert vocab.decode(ids) == TEXT
    assert vocab.decode(ids.tolist()) == TEXT


def test_vocab_unknown_characters(vocab):
    ids = vocab.encode("cat!Z")
    assert ids.tolist()[3:] == [vocab.unk_id, vocab.unk_id]
    assert vocab.decode(ids) == "cat<unk><unk>"
    with pytest.raises(ValueError, match=r"not in the vocabulary: \['!', 'Z'\]"):
        vocab.encode("cat!Z", unknown="error")
    rare = CharVocab.from_text("aaab", min_count=2)
    assert rare.itos == ["<bos>", "<unk>", "a"] and rare.encode("ab").tolist() == [2, 1]


def test_vocab_bad_input(vocab):
    with pytest.raises(TypeError, match="text must be a str"):
        CharVocab.from_text(["a"])
    with pytest.raises(ValueError, match="text is empty"):
        CharVocab.from_text("")
    with pytest.raises(ValueError, match="min_count must be a positive int"):
        CharVocab.from_text("abc", min_count=0)
    with pytest.raises(ValueError, match="single-character"):
        CharVocab(["ab"])
    with pytest.raises(ValueError, match="must not repeat"):
        CharVocab(["a", "a"])
    with pytest.raises(ValueError, match="unknown must be 'unk' or 'error', got 'skip'"):
        vocab.encode("a", unknown="skip")
    with pytest.raises(TypeError, match="text must be a str"):
        vocab.encode(3)
    with pytest.raises(ValueError, match=r"ids must lie in \[0, "):
        vocab.decode(torch.tensor([0, 999]))
    with pytest.raises(ValueError, match="ids must be ints"):
        vocab.decode([0, -1])


# ---------------------------------------------------------------- windows


def test_make_windows_matches_loop():
    ids = torch.tensor([5, 6, 7, 8])
    contexts, targets = make_windows(ids, 3, pad_id=0)
    expected = []
    for t in range(4):
        expected.append([ids[j].item() if j >= 0 else 0 for j in range(t - 3, t)])
    assert contexts.tolist() == expected and targets.tolist() == [5, 6, 7, 8]
    empty, _ = make_windows(ids, 0)
    assert empty.shape == (4, 0)


def test_make_windows_bad_input():
    with pytest.raises(TypeError, match="ids must be a torch.Tensor"):
        make_windows([1, 2], 2)
    with pytest.raises(TypeError, match="must be an integer tensor"):
        make_windows(torch.ones(3), 2)
    with pytest.raises(ValueError, match=r"1 dimension\(s\), got shape \(1, 3\)"):
        make_windows(torch.ones(1, 3, dtype=torch.long), 2)
    with pytest.raises(ValueError, match="context_size must be an int >= 0, got -1"):
        make_windows(torch.tensor([1]), -1)


# ---------------------------------------------------------------- n-grams


def _reference_prob(text_ids, n, k, vocab_size, context, token):
    """Add-k probability from plain Python counts of the padded stream."""
    padded = [0] * (n - 1) + text_ids
    grams = Counter(tuple(padded[i:i + n]) for i in range(len(text_ids)))
    ctx_count = sum(c for g, c in grams.items() if g[:-1] == tuple(context))
    return (grams[(*context, token)] + k) / (ctx_count + k * vocab_size)


@pytest.mark.parametrize("n", [1, 2, 3])
def test_ngram_matches_python_counts(vocab, n):
    ids = vocab.encode(TEXT)
    V = len(vocab)
    model = NGramLM(n, 0.5, V).fit(ids)
    contexts, targets = make_windows(ids, n - 1)
    probs = model.probs(contexts[:20])
    reference = torch.tensor(
        [[_reference_prob(ids.tolist(), n, 0.5, V, c, x) for x in range(V)] for c in contexts[:20].tolist()],
        dtype=torch.float64,
    )
    torch.testing.assert_close(probs, reference, rtol=1e-12, atol=0)
    torch.testing.assert_close(probs.sum(1), torch.ones(20, dtype=torch.float64), rtol=0, atol=1e-12)
    # nll via direct lookups vs via cross-entropy of the full log-probability table
    torch.testing.assert_close(model.nll(ids), F.cross_entropy(model(contexts), targets).item(), rtol=1e-12, atol=0)
    torch.testing.assert_close(model.nll(ids), mean_nll(model, ids, batch_size=7), rtol=1e-12, atol=0)
    assert model.perplexity(ids) == pytest.approx(math.exp(model.nll(ids)), rel=1e-12)
    per_token = model.token_log_probs(ids)
    assert per_token.shape == ids.shape and per_token.dtype == torch.float64
    torch.testing.assert_close(per_token, model.log_probs(contexts).gather(1, targets[:, None])[:, 0],
                               rtol=1e-12, atol=0)


def test_ngram_unseen_context_is_uniform_and_k_can_change(vocab):
    V = len(vocab)
    model = NGramLM(3, 1.0, V).fit(vocab.encode(TEXT))
    unseen = torch.tensor([[vocab.unk_id, vocab.unk_id]])
    torch.testing.assert_close(model.probs(unseen), torch.full((1, V), 1 / V, dtype=torch.float64))
    seen = vocab.encode("th").unsqueeze(0)
    p1 = model.probs(seen)[0, vocab.stoi["e"]].item()
    model.k = 0.01
    p2 = model.probs(seen)[0, vocab.stoi["e"]].item()
    assert p2 > p1  # less smoothing puts more mass on the observed continuation
    assert model.counts(seen)[0, vocab.stoi["e"]].item() == TEXT.count("the")


def test_ngram_bad_input(vocab):
    V = len(vocab)
    with pytest.raises(ValueError, match="n must be a positive int, got 0"):
        NGramLM(0, 1.0, V)
    with pytest.raises(ValueError, match="k must be a positive finite number, got 0"):
        NGramLM(2, 0, V)
    with pytest.raises(ValueError, match="too large"):
        NGramLM(40, 1.0, 1000)
    model = NGramLM(2, 1.0, V)
    with pytest.raises(RuntimeError, match="not fitted"):
        model.nll(torch.tensor([2, 3]))
    with pytest.raises(RuntimeError, match="not fitted"):
        model.counts(torch.zeros(1, 1, dtype=torch.long))
    with pytest.raises(ValueError, match="ids is empty"):
        model.fit(torch.tensor([], dtype=torch.long))
    with pytest.raises(ValueError, match=r"ids must lie in \[0, "):
        model.fit(torch.tensor([2, V]))
    with pytest.raises(ValueError, match=r"pad_id must be in \[0, "):
        model.fit(torch.tensor([2, 3]), pad_id=V)
    model.fit(vocab.encode(TEXT))
    with pytest.raises(ValueError, match=r"contexts must have shape \(batch, 1\) for n=2, got \(3, 2\)"):
        model.probs(torch.zeros(3, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="k must be a positive"):
        model.k = -1.0
    with pytest.raises(TypeError, match="k must be a number, got str"):
        model.k = "0.1"
    with pytest.raises(ValueError, match="token_log_probs: ids is empty"):
        model.token_log_probs(torch.tensor([], dtype=torch.long))
    with pytest.raises(ValueError, match=r"pad_id must be in \[0, "):
        model.nll(torch.tensor([2, 3]), pad_id=V)


# ---------------------------------------------------------------- perplexity


def test_perplexity_and_uniform_logits():
    assert perplexity(math.log(7.0)) == pytest.approx(7.0, rel=1e-15)
    targets = torch.tensor([0, 3, 9, 2])
    assert perplexity_from_logits(torch.zeros(4, 10, dtype=torch.float64), targets) == pytest.approx(10.0, rel=1e-14)
    torch.manual_seed(0)
    logits = torch.randn(4, 10, dtype=torch.float64)
    manual = math.exp(-sum(torch.log_softmax(logits[i], 0)[t].item() for i, t in enumerate(targets.tolist())) / 4)
    assert perplexity_from_logits(logits, targets) == pytest.approx(manual, rel=1e-12)


def test_perplexity_bad_input():
    with pytest.raises(ValueError, match="non-negative number, got -1"):
        perplexity(-1.0)
    with pytest.raises(TypeError, match="mean_nll must be a float, got str"):
        perplexity("1")
    with pytest.raises(ValueError, match=r"got \(4, 10\) and \(3,\)"):
        perplexity_from_logits(torch.zeros(4, 10), torch.zeros(3, dtype=torch.long))
    with pytest.raises(TypeError, match="logits must be a float tensor"):
        perplexity_from_logits(torch.zeros(4, 10, dtype=torch.long), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"targets must lie in \[0, 10\)"):
        perplexity_from_logits(torch.zeros(2, 10), torch.tensor([0, 10]))


# ---------------------------------------------------------------- the MLP


def test_char_mlp_matches_manual_forward():
    torch.manual_seed(0)
    model = CharMLP(vocab_size=11, context_size=3, d_embed=4, d_hidden=6).double()
    contexts = torch.randint(0, 11, (5, 3))
    one_hot = F.one_hot(contexts, 11).double()  # (5, 3, 11)
    embedded = (one_hot @ model.embed.weight).reshape(5, 12)
    hidden = torch.tanh(embedded @ model.hidden.weight.T + model.hidden.bias)
    expected = hidden @ model.out.weight.T + model.out.bias
    torch.testing.assert_close(model(contexts), expected, rtol=1e-12, atol=1e-12)


def test_mean_nll_matches_cross_entropy_over_windows():
    torch.manual_seed(0)
    model = CharMLP(vocab_size=9, context_size=2, d_embed=3, d_hidden=5)
    ids = torch.randint(0, 9, (50,))
    contexts, targets = make_windows(ids, 2)
    with torch.no_grad():
        expected = F.cross_entropy(model(contexts).double(), targets).item()
    assert mean_nll(model, ids, batch_size=8) == pytest.approx(expected, rel=1e-9)
    assert model.training  # mean_nll restores the mode


def test_char_mlp_and_mean_nll_bad_input():
    with pytest.raises(ValueError, match="context_size must be a positive int, got 0"):
        CharMLP(10, 0, 4, 8)
    with pytest.raises(TypeError, match="d_hidden must be an int, got float"):
        CharMLP(10, 2, 4, 8.0)
    model = CharMLP(10, 2, 4, 8)
    with pytest.raises(ValueError, match=r"contexts must have shape \(batch, 2\), got \(3, 4\)"):
        model(torch.zeros(3, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="ids is empty"):
        mean_nll(model, torch.tensor([], dtype=torch.long))
    with pytest.raises(ValueError, match=r"ids must lie in \[0, 10\)"):
        mean_nll(model, torch.tensor([3, 12]))
    with pytest.raises(TypeError, match="int context_size"):
        mean_nll(lambda x: x, torch.tensor([1]))


# ---------------------------------------------------------------- sampling


def test_sample_is_seeded_and_follows_the_model(vocab):
    ids = vocab.encode(TEXT)
    model = NGramLM(2, 1e-9, len(vocab)).fit(ids)  # almost the maximum-likelihood bigram model
    a = sample(model, vocab.encode("t"), 30, generator=torch.Generator().manual_seed(1))
    b = sample(model, vocab.encode("t"), 30, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and a.shape == (31,) and a[0] == vocab.stoi["t"]
    # every sampled bigram occurs in the training text (with k = 1e-9 anything else is ~1e-7 likely)
    text = vocab.decode(a)
    assert all(text[i:i + 2] in TEXT for i in range(len(text) - 1))
    # a unigram model draws every token from the same distribution: compare frequencies with it
    unigram = NGramLM(1, 0.5, len(vocab)).fit(ids)
    draws = sample(unigram, torch.tensor([], dtype=torch.long), 1000, generator=torch.Generator().manual_seed(0))
    freq = torch.bincount(draws, minlength=len(vocab)).double() / 1000
    probs = unigram.probs(torch.zeros(1, 0, dtype=torch.long))[0]
    assert (freq - probs).abs().max() < 0.07  # a frequency's standard deviation is <= sqrt(0.25 / 1000) = 0.016


def test_sample_banned_ids_are_never_drawn(vocab):
    model = NGramLM(1, 1e6, len(vocab)).fit(vocab.encode(TEXT))  # nearly uniform over all ids
    banned = [vocab.bos_id, vocab.unk_id, vocab.stoi["a"]]
    out = sample(model, torch.tensor([], dtype=torch.long), 500, generator=torch.Generator().manual_seed(0),
                 banned_ids=banned)
    assert not torch.isin(out, torch.tensor(banned)).any()
    assert len(set(out.tolist())) == len(vocab) - 3  # every other id is drawn from 500 near-uniform draws


def test_sample_low_temperature_is_greedy(vocab):
    model = NGramLM(3, 0.1, len(vocab)).fit(vocab.encode(TEXT))
    out = sample(model, vocab.encode("th"), 2, generator=torch.Generator().manual_seed(0), temperature=1e-3)
    assert vocab.decode(out) == "the "  # "th" is always followed by "e", and "he" by " ", in TEXT
    expected = vocab.encode("th").tolist()
    for _ in range(2):
        expected.append(int(model.probs(torch.tensor([expected[-2:]]))[0].argmax()))
    assert out.tolist() == expected


def test_sample_bad_input(vocab):
    model = NGramLM(2, 1.0, len(vocab)).fit(vocab.encode(TEXT))
    gen = torch.Generator().manual_seed(0)
    with pytest.raises(TypeError, match="generator must be a torch.Generator"):
        sample(model, vocab.encode("a"), 3, generator=0)
    with pytest.raises(ValueError, match="temperature must be a positive number, got 0"):
        sample(model, vocab.encode("a"), 3, generator=gen, temperature=0)
    with pytest.raises(ValueError, match="length must be an int >= 0"):
        sample(model, vocab.encode("a"), -2, generator=gen)
    with pytest.raises(ValueError, match="banned_ids must be ints"):
        sample(model, vocab.encode("a"), 3, generator=gen, banned_ids=[len(vocab)])
    with pytest.raises(ValueError, match="bans every id"):
        sample(model, vocab.encode("a"), 3, generator=gen, banned_ids=range(len(vocab)))
    with pytest.raises(ValueError, match=r"prompt must lie in \[0, "):
        sample(model, torch.tensor([999]), 3, generator=gen)


def test_random_windows_are_shifted_slices_of_the_stream():
    ids = torch.arange(100, 120)  # token value = position + 100, so a window's start is readable from its values
    x, y = random_windows(ids, 500, 5, torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (500, 5) and x.dtype == torch.long
    starts = x[:, 0] - 100
    assert torch.equal(x, 100 + starts[:, None] + torch.arange(5))  # contiguous windows ...
    assert torch.equal(y, x + 1)  # ... and the targets are the next tokens
    assert set(starts.tolist()) == set(range(20 - 5))  # every valid start is drawn (the last: 14), none beyond
    assert int(y.max()) == 119  # the stream's last token is a target
    again = random_windows(ids, 500, 5, torch.Generator().manual_seed(0))
    assert torch.equal(again[0], x) and torch.equal(again[1], y)


def test_random_windows_rejects_bad_input():
    ids = torch.arange(10)
    with pytest.raises(TypeError, match="ids"):
        random_windows([1, 2, 3], 2, 2)
    with pytest.raises(ValueError, match="seq_len"):
        random_windows(ids, 2, 0)
    with pytest.raises(ValueError, match="batch_size"):
        random_windows(ids, 0, 2)
    with pytest.raises(ValueError, match="at least seq_len"):
        random_windows(ids, 2, 10)
    x, y = random_windows(ids, 3, 9)  # exactly one window fits: ids[0:9] -> ids[1:10]
    assert torch.equal(x[0], ids[:9]) and torch.equal(y[0], ids[1:])
    with pytest.raises(TypeError, match="generator"):
        random_windows(ids, 2, 2, generator=0)


def test_bad_input_reaches_no_embedding_and_no_plausible_answer(vocab):
    model = CharMLP(len(vocab), 3, 4, 8)
    for bad in (len(vocab), -1):  # -1 would wrap to the last row of the embedding table
        with pytest.raises(ValueError, match=rf"CharMLP: contexts must lie in \[0, {len(vocab)}\)"):
            model(torch.full((2, 3), bad))
    with pytest.raises(TypeError, match="CharVocab: chars must be an iterable of characters, got int"):
        CharVocab(3)
    with pytest.raises(TypeError, match="CharVocab.decode: ids must be a tensor or a sequence of ints, got NoneType"):
        vocab.decode(None)
    assert perplexity(1e6) == math.inf  # not an OverflowError
    gen = torch.Generator().manual_seed(0)
    with pytest.raises(ValueError, match="sample: temperature must be a positive number, got inf"):
        sample(model, vocab.encode("a"), 3, generator=gen, temperature=math.inf)  # would sample uniformly
    with pytest.raises(TypeError, match="sample: banned_ids must be a sequence of ids, got int"):
        sample(model, vocab.encode("a"), 3, generator=gen, banned_ids=1)

    class NaNModel(torch.nn.Module):
        context_size, vocab_size = 3, len(vocab)

        def forward(self, contexts):
            return torch.full((contexts.shape[0], len(vocab)), math.nan)

    with pytest.raises(ValueError, match="sample: model returned NaN or \\+inf logits after 1 ids"):
        sample(NaNModel(), vocab.encode("a"), 3, generator=gen)

    class WrongVocab(NaNModel):
        def forward(self, contexts):
            return torch.zeros(contexts.shape[0], 2)

    with pytest.raises(ValueError, match=r"mean_nll: model must return logits of shape \(3, vocab_size=17\)"):
        mean_nll(WrongVocab(), vocab.encode("abc"))


def test_sample_checks_what_the_model_returns():
    class Logits(torch.nn.Module):
        context_size, vocab_size = 1, 5

        def __init__(self, logits):
            super().__init__()
            self.logits = logits

        def forward(self, contexts):
            return self.logits.expand(contexts.shape[0], -1)

    gen = torch.Generator().manual_seed(0)
    # four logits for a vocabulary of five: ids would be drawn from the wrong table, silently
    with pytest.raises(ValueError, match=r"sample: model must return logits of shape \(1, vocab_size=5\), got"):
        sample(Logits(torch.zeros(1, 4)), torch.tensor([1]), 2, generator=gen)
    # the only id the model allows is banned: torch.multinomial's 'probability tensor contains inf, nan'
    only_two = torch.tensor([[-math.inf, -math.inf, 0.0, -math.inf, -math.inf]])
    with pytest.raises(ValueError, match="sample: the model gives every id outside banned_ids zero probability "
                                         "after 1 ids"):
        sample(Logits(only_two), torch.tensor([1]), 2, generator=gen, banned_ids=[2])
    assert sample(Logits(only_two), torch.tensor([1]), 2, generator=gen).tolist() == [1, 2, 2]
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match="sample: generator must be a CPU torch.Generator, got one on cuda"):
            sample(Logits(torch.zeros(1, 5)), torch.tensor([1]), 2, generator=torch.Generator("cuda"))
