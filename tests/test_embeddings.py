import math

import numpy as np
import pytest
import torch

from mmbook.calculus import numerical_gradient
from mmbook.embeddings import (
    FastTextSkipGram,
    SkipGramNS,
    Vocabulary,
    analogy,
    char_ngrams,
    cooccurrence_matrix,
    encode_documents,
    fnv1a_32,
    glove_gradients,
    glove_loss,
    glove_weighting,
    nearest_neighbours,
    negative_sampling_distribution,
    pair_ranks,
    pca,
    sgns_gradients,
    sgns_loss,
    skipgram_pairs,
    subsample_keep_probs,
    tokenize,
    train_glove,
    train_skipgram,
)


@pytest.fixture
def toy_vocab():
    return Vocabulary(["a", "b", "c", "d"], [10, 5, 5, 1])


def test_tokenize_keeps_non_ascii_words_whole():
    assert tokenize("naïve café Straße Ünïcode 東京 ñandú") == ["naïve", "café", "straße", "ünïcode", "東京", "ñandú"]
    assert tokenize("cafe\u0301 au lait") == ["café", "au", "lait"]  # a combining accent joins its letter (NFC)
    assert tokenize("x² 3rd _x9") == ["x²", "rd", "_x9"]


def test_tokenize():
    assert tokenize("Use list.append(x) in __init__, 3.14 or x2!") == [
        "use", "list", "append", "x", "in", "__init__", "or", "x2"]
    with pytest.raises(TypeError, match="text must be a str, got int"):
        tokenize(3)


def test_vocabulary_build_order_and_encode():
    vocab = Vocabulary.build("b a c a b a d".split(), min_count=2)
    assert vocab.words == ["a", "b"] and vocab.counts.tolist() == [3, 2]
    assert vocab.index("b") == 1 and "c" not in vocab and len(vocab) == 2
    assert vocab.encode(["a", "c", "b"]).tolist() == [0, 1]
    ties = Vocabulary.build(["z", "y", "x"], min_count=1)
    assert ties.words == ["x", "y", "z"]  # equal counts: alphabetical


def test_vocabulary_bad_input():
    with pytest.raises(ValueError, match="min_count must be a positive int, got 0"):
        Vocabulary.build(["a"], min_count=0)
    with pytest.raises(ValueError, match="no word occurs at least min_count=3"):
        Vocabulary.build(["a", "b"], min_count=3)
    with pytest.raises(TypeError, match="got a single str"):
        Vocabulary.build("abc")
    with pytest.raises(ValueError, match="2 words but 1 counts"):
        Vocabulary(["a", "b"], [1])
    with pytest.raises(ValueError, match="unique"):
        Vocabulary(["a", "a"], [1, 1])
    with pytest.raises(ValueError, match="'zz' is not in the vocabulary"):
        Vocabulary(["a"], [1]).index("zz")
    with pytest.raises(TypeError, match="single str"):
        Vocabulary(["a"], [1]).encode("a")


def test_encode_documents(toy_vocab):
    ids, docs = encode_documents(["a b zz", "c a"], toy_vocab)
    assert ids.tolist() == [0, 1, 2, 0] and docs.tolist() == [0, 0, 1, 1]
    with pytest.raises(TypeError, match="documents must be a sequence of str"):
        encode_documents("a b", toy_vocab)
    with pytest.raises(TypeError, match="vocab must be a Vocabulary"):
        encode_documents(["a"], {"a": 0})


def test_subsample_and_noise():
    counts = torch.tensor([900, 90, 9, 1])
    keep = subsample_keep_probs(counts, t=0.01)
    freq = counts.double() / 1000
    np.testing.assert_allclose(keep.numpy(), np.minimum(1, np.sqrt(0.01 / freq.numpy())), rtol=1e-12)
    noise = negative_sampling_distribution(counts, power=0.75)
    expected = counts.double().numpy() ** 0.75
    np.testing.assert_allclose(noise.numpy(), expected / expected.sum(), rtol=1e-12)
    np.testing.assert_allclose(negative_sampling_distribution(counts, 0.0).numpy(), 0.25, rtol=1e-12)
    with pytest.raises(ValueError, match="t must be a positive number"):
        subsample_keep_probs(counts, t=0)
    with pytest.raises(ValueError, match="power must be in"):
        negative_sampling_distribution(counts, power=2)
    with pytest.raises(TypeError, match="counts must be a torch.Tensor"):
        negative_sampling_distribution([1, 2])
    with pytest.raises(ValueError, match="non-negative counts"):
        subsample_keep_probs(torch.tensor([-1, 2]))


def test_skipgram_pairs_matches_loop():
    g = torch.Generator().manual_seed(0)
    stream = torch.randint(0, 7, (30,), generator=g)
    docs = torch.tensor([0] * 12 + [1] * 3 + [2] * 15)
    centres, contexts = skipgram_pairs(stream, 3, docs)
    loop = sorted((int(stream[i]), int(stream[j])) for i in range(30) for j in range(30)
                  if 0 < abs(i - j) <= 3 and docs[i] == docs[j])
    assert sorted(zip(centres.tolist(), contexts.tolist(), strict=True)) == loop
    c2, _ = skipgram_pairs(torch.tensor([1, 2]), 5)
    assert c2.tolist() == [2, 1]


def test_skipgram_pairs_bad_input():
    with pytest.raises(ValueError, match="window must be a positive int, got 0"):
        skipgram_pairs(torch.tensor([1, 2]), 0)
    with pytest.raises(ValueError, match="1-D int64"):
        skipgram_pairs(torch.tensor([1.0, 2.0]), 1)
    with pytest.raises(ValueError, match="doc_ids must have the shape"):
        skipgram_pairs(torch.tensor([1, 2]), 1, torch.tensor([0]))


def test_sgns_gradients_match_autograd_and_differences():
    torch.manual_seed(0)
    v = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    u = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    n = torch.randn(3, 2, 4, dtype=torch.float64, requires_grad=True)
    loss = sgns_loss(v, u, n)
    manual = -torch.log(torch.sigmoid((u * v).sum(-1))) - torch.log(
        torch.sigmoid(-torch.einsum("bkd,bd->bk", n, v))).sum(-1)
    torch.testing.assert_close(loss, manual, rtol=1e-12, atol=0)
    loss.sum().backward()
    gv, gu, gn = sgns_gradients(v.detach(), u.detach(), n.detach())
    torch.testing.assert_close(gv, v.grad, rtol=0, atol=1e-12)
    torch.testing.assert_close(gu, u.grad, rtol=0, atol=1e-12)
    torch.testing.assert_close(gn, n.grad, rtol=0, atol=1e-12)
    fd = numerical_gradient(lambda t: sgns_loss(t, u.detach(), n.detach()).sum(), v.detach())
    torch.testing.assert_close(gv, fd, rtol=0, atol=1e-8)


def test_sgns_bad_input():
    with pytest.raises(ValueError, match=r"expected v_c \(batch, dim\)"):
        sgns_loss(torch.zeros(2, 3), torch.zeros(2, 4), torch.zeros(2, 1, 3))
    with pytest.raises(ValueError, match="u_neg must be a floating-point tensor with 3 dimensions"):
        sgns_gradients(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2, 3))
    with pytest.raises(TypeError, match="v_c must be a torch.Tensor"):
        sgns_loss([1.0], torch.zeros(2, 3), torch.zeros(2, 1, 3))


def test_skipgram_model_and_training_learns_structure():
    # Two "topics": words 0-4 only co-occur with each other, words 5-9 likewise.
    g = torch.Generator().manual_seed(0)
    stream = torch.cat([torch.randint(0, 5, (400,), generator=g), torch.randint(5, 10, (400,), generator=g)])
    docs = torch.cat([torch.zeros(400, dtype=torch.int64), torch.ones(400, dtype=torch.int64)])
    torch.manual_seed(0)
    model = SkipGramNS(10, 8)
    assert torch.all(model.output.weight == 0)
    initial = model(torch.tensor([0]), torch.tensor([1]), torch.tensor([[2, 3]]))
    assert math.isclose(initial.item(), 3 * math.log(2), rel_tol=1e-6)
    losses = train_skipgram(model, stream, torch.full((10,), 0.1, dtype=torch.float64), doc_ids=docs, window=2,
                            negatives=3, epochs=6, batch_size=1024, lr=0.1)
    assert losses[-1] < losses[0]
    unit = torch.nn.functional.normalize(model.vectors, dim=1)
    sims = unit @ unit.T
    within = (sims[:5, :5].sum() - 5) / 20
    across = sims[:5, 5:].mean()
    assert within > across + 0.3


def test_skipgram_bad_input():
    with pytest.raises(ValueError, match="dim must be a positive int, got 0"):
        SkipGramNS(5, 0)
    model = SkipGramNS(5, 2)
    with pytest.raises(ValueError, match=r"expected centres \(batch,\)"):
        model(torch.tensor([0, 1]), torch.tensor([0]), torch.tensor([[1]]))
    noise = torch.full((5,), 0.2, dtype=torch.float64)
    with pytest.raises(TypeError, match="model must be a SkipGramNS"):
        train_skipgram(torch.nn.Linear(2, 2), torch.tensor([0, 1]), noise)
    with pytest.raises(ValueError, match=r"noise must be a tensor of shape \(5,\)"):
        train_skipgram(model, torch.tensor([0, 1]), torch.ones(4))
    with pytest.raises(ValueError, match=r"ids must lie in \[0, 5\), got values in \[0, 7\]"):
        train_skipgram(model, torch.tensor([0, 7]), noise)
    with pytest.raises(ValueError, match="epochs must be a positive int"):
        train_skipgram(model, torch.tensor([0, 1]), noise, epochs=0)
    with pytest.raises(ValueError, match="doc_ids must have the shape of ids"):
        train_skipgram(model, torch.tensor([0, 1]), noise, doc_ids=torch.tensor([0]))


def test_neighbours_analogy_and_ranks(toy_vocab):
    vectors = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [-1.0, 0.0]])
    assert [w for w, _ in nearest_neighbours(vectors, toy_vocab, "a", k=3)] == ["b", "c", "d"]
    (word, sim), = nearest_neighbours(vectors, toy_vocab, torch.tensor([0.0, 2.0]), k=1)
    assert word == "c" and math.isclose(sim, 1.0)
    # a, b and c are excluded from the answer, so only d remains
    assert analogy(vectors, toy_vocab, "a", "c", "b", k=1)[0][0] == "d"
    assert pair_ranks(vectors, toy_vocab, [("a", "b"), ("a", "d"), ("c", "a")]) == [1, 3, 3]  # d ties with a
    assert pair_ranks(torch.ones(4, 2), toy_vocab, [("a", "b")]) == [3]  # collapsed vectors: worst rank


def test_neighbours_bad_input(toy_vocab):
    vectors = torch.randn(4, 2)
    with pytest.raises(ValueError, match="query word 'zz' is not in the vocabulary"):
        nearest_neighbours(vectors, toy_vocab, "zz")
    with pytest.raises(ValueError, match="vectors has 3 rows but the vocabulary has 4 words"):
        nearest_neighbours(torch.randn(3, 2), toy_vocab, "a")
    with pytest.raises(ValueError, match=r"query must be a word or a vector of shape \(2,\)"):
        nearest_neighbours(vectors, toy_vocab, torch.zeros(3))
    with pytest.raises(ValueError, match="c='zz' is not in the vocabulary"):
        analogy(vectors, toy_vocab, "a", "b", "zz")
    with pytest.raises(ValueError, match="two different words"):
        pair_ranks(vectors, toy_vocab, [("a", "a")])
    with pytest.raises(ValueError, match="NaN or infinite"):
        pair_ranks(torch.full((4, 2), float("nan")), toy_vocab, [("a", "b")])
    with pytest.raises(TypeError, match="pairs must be a sequence"):
        pair_ranks(vectors, toy_vocab, "ab")


def test_pca_matches_covariance_eigenvectors():
    torch.manual_seed(0)
    x = torch.randn(20, 5, dtype=torch.float64) @ torch.randn(5, 5, dtype=torch.float64)
    ours = pca(x, 2)
    centred = x.numpy() - x.numpy().mean(0)
    _, eigenvectors = np.linalg.eigh(np.cov(centred, rowvar=False))  # ascending eigenvalues
    ref = torch.from_numpy(centred @ eigenvectors[:, [-1, -2]])
    ref = ref * torch.sign((ref * ours).sum(0))
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-10)
    torch.testing.assert_close(pca(-x, 2), -ours, rtol=0, atol=1e-10)  # fixed component signs: a unique answer
    with pytest.raises(ValueError, match=r"k must be an int in \[1, min\(n, d\)\] = \[1, 5\], got 6"):
        pca(x, 6)
    with pytest.raises(TypeError, match="x must be a floating-point tensor"):
        pca(torch.ones(3, 3, dtype=torch.int64))


def test_cooccurrence_matches_loop():
    stream = torch.tensor([0, 1, 2, 0, 3, 1, 0, 2])
    docs = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    x = cooccurrence_matrix(stream, 4, 2, docs)
    loop = torch.zeros(4, 4, dtype=torch.float64)
    for i in range(8):
        for j in range(8):
            if 0 < abs(i - j) <= 2 and docs[i] == docs[j]:
                loop[stream[i], stream[j]] += 1 / abs(i - j)
    torch.testing.assert_close(x, loop, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match=r"ids must lie in \[0, 2\), got values in \[0, 3\]"):
        cooccurrence_matrix(stream, 2, 2)
    with pytest.raises(ValueError, match="window must be a positive int"):
        cooccurrence_matrix(stream, 4, 0)


def test_glove_weighting():
    x = torch.tensor([0.0, 1.0, 50.0, 100.0, 400.0], dtype=torch.float64)
    expected = [0.0, 0.01**0.75, 0.5**0.75, 1.0, 1.0]
    np.testing.assert_allclose(glove_weighting(x).numpy(), expected, rtol=1e-12)
    with pytest.raises(ValueError, match="x_max must be a positive number"):
        glove_weighting(x, x_max=0)
    with pytest.raises(TypeError, match="floating-point tensor"):
        glove_weighting(torch.tensor([1, 2]))


def test_glove_loss_and_gradients():
    torch.manual_seed(0)
    x = torch.tensor([[0.0, 2.0, 5.0], [2.0, 0.0, 0.5], [5.0, 0.5, 1.0]], dtype=torch.float64)
    params = [torch.randn(3, 2, dtype=torch.float64), torch.randn(3, 2, dtype=torch.float64),
              torch.randn(3, dtype=torch.float64), torch.randn(3, dtype=torch.float64)]
    w, wc, b, bc = params
    loop = sum(glove_weighting(x[i, j], 3.0) * (w[i] @ wc[j] + b[i] + bc[j] - math.log(x[i, j])) ** 2
               for i in range(3) for j in range(3) if x[i, j] > 0)
    torch.testing.assert_close(glove_loss(*params, x, 3.0), loop, rtol=1e-12, atol=0)
    leaves = [p.clone().requires_grad_() for p in params]
    glove_loss(*leaves, x, 3.0).backward()
    for g, p in zip(glove_gradients(*params, x, 3.0), leaves, strict=True):
        torch.testing.assert_close(g, p.grad, rtol=0, atol=1e-10)
    with pytest.raises(ValueError, match=r"expected w, w_ctx \(vocab, dim\)"):
        glove_loss(w, wc, b, bc, torch.ones(4, 4, dtype=torch.float64))
    with pytest.raises(TypeError, match="b must be a floating-point tensor"):
        glove_gradients(w, wc, [0.0], bc, x)


def test_train_glove_fits_low_rank_counts():
    torch.manual_seed(0)
    a = torch.rand(12, 2, dtype=torch.float64)
    x = torch.exp(a @ a.T + 1.0)  # exactly representable: log X = A A^T + 1
    vectors, losses = train_glove(x, 3, steps=300, lr=0.1, x_max=10.0)
    assert vectors.shape == (12, 3) and losses[-1] < 0.01 * losses[0]
    with pytest.raises(ValueError, match="x must be a square"):
        train_glove(torch.ones(2, 3), 2)
    with pytest.raises(ValueError, match="steps must be a positive int"):
        train_glove(x, 2, steps=0)


def test_char_ngrams_and_hash():
    assert char_ngrams("where", 3, 3) == ["<wh", "whe", "her", "ere", "re>"]
    grams = char_ngrams("ab", 3, 6)
    assert grams == ["<ab", "<ab>", "ab>"]
    assert fnv1a_32("") == 0x811C9DC5 and fnv1a_32("a") == 0xE40C292C and fnv1a_32("foobar") == 0xBF9CF968
    with pytest.raises(ValueError, match="word must be a non-empty str"):
        char_ngrams("")
    with pytest.raises(ValueError, match="1 <= n_min <= n_max"):
        char_ngrams("abc", 4, 3)
    with pytest.raises(TypeError, match="text must be a str"):
        fnv1a_32(b"a")


def test_fasttext_vectors_are_ngram_means(toy_vocab):
    torch.manual_seed(0)
    model = FastTextSkipGram(toy_vocab, 4, buckets=97)
    rows = model.subword_ids("a")
    assert rows[0] == 0 and all(4 <= r < 4 + 97 for r in rows[1:])
    torch.testing.assert_close(model.vectors[0], model.input.weight[rows].mean(0).detach(), rtol=0, atol=1e-6)
    oov = model.subword_ids("abc")
    assert all(r >= 4 for r in oov)
    torch.testing.assert_close(model.word_vector("abc"), model.input.weight[oov].mean(0).detach(), rtol=0, atol=1e-6)
    loss = model(torch.tensor([0, 1]), torch.tensor([2, 3]), torch.tensor([[1], [0]]))
    assert math.isclose(loss.item(), 2 * math.log(2), rel_tol=1e-6)
    with pytest.raises(TypeError, match="vocab must be a Vocabulary"):
        FastTextSkipGram(["a"], 4)
    with pytest.raises(ValueError, match="buckets must be a positive int"):
        FastTextSkipGram(toy_vocab, 4, buckets=0)
    with pytest.raises(ValueError, match="word must be a non-empty str"):
        model.word_vector("")


def test_bad_input_never_wraps_or_turns_into_a_plausible_answer():
    vocab = Vocabulary(["a", "b", "c", "d", "e"], [10, 5, 4, 3, 2])
    nan = math.nan
    for model in (SkipGramNS(5, 4), FastTextSkipGram(vocab, 4, buckets=16)):
        name = type(model).__name__
        for bad in (-1, 5):  # FastText's centre_vectors would index its table with -1: the last word
            with pytest.raises(ValueError, match=rf"{name}: centres must lie in \[0, 5\)"):
                model(torch.tensor([bad]), torch.tensor([0]), torch.tensor([[1]]))
        with pytest.raises(ValueError, match=rf"{name}: negatives must lie in \[0, 5\)"):
            model(torch.tensor([0]), torch.tensor([0]), torch.tensor([[-1]]))
    model, noise, ids = SkipGramNS(5, 4), negative_sampling_distribution(vocab.counts), torch.tensor([0, 1, 2, 3])
    with pytest.raises(ValueError, match=r"train_skipgram: ids must lie in \[0, 5\)"):
        train_skipgram(model, torch.tensor([0, -1, 1]), noise, epochs=1)
    for bad in (torch.full((5,), nan), -noise, torch.zeros(5)):
        with pytest.raises(ValueError, match="train_skipgram: noise"):
            train_skipgram(model, ids, bad, epochs=1)
    with pytest.raises(ValueError, match=r"train_skipgram: keep_probs must hold probabilities in \[0, 1\]"):
        train_skipgram(model, ids, noise, keep_probs=torch.full((5,), 2.0), epochs=1)
    with pytest.raises(ValueError, match="train_skipgram: lr must be a positive number, got nan"):
        train_skipgram(model, ids, noise, lr=nan, epochs=1)
    with pytest.raises(ValueError, match="train_skipgram: device must name a torch device"):
        train_skipgram(model, ids, noise, device="tpu", epochs=1)
    with pytest.raises(ValueError, match="subsample_keep_probs: t must be a positive number, got inf"):
        subsample_keep_probs(vocab.counts, math.inf)  # would keep every word
    vectors = torch.randn(5, 4)
    for query in (torch.zeros(4), torch.full((4,), nan)):  # no direction: every cosine 0 (or NaN)
        with pytest.raises(ValueError, match="nearest_neighbours: query vector must be finite and not all zero"):
            nearest_neighbours(vectors, vocab, query)
    with pytest.raises(ValueError, match="pca: x contains NaN"):
        pca(torch.full((4, 3), nan))
    with pytest.raises(ValueError, match=r"cooccurrence_matrix: ids must lie in \[0, 5\), got values in \[-1, 2\]"):
        cooccurrence_matrix(torch.tensor([-1, 2]), 5, 2)
    x = cooccurrence_matrix(torch.tensor([0, 1, 2, 3, 4]), 5, 2).float()
    w, b = torch.randn(5, 3), torch.randn(5)
    with pytest.raises(ValueError, match="glove_weighting: x_max must be a positive number, got inf"):
        glove_weighting(x, x_max=math.inf)  # every weight would be 0
    with pytest.raises(TypeError, match="glove_loss: w_ctx and w must have the same dtype"):
        glove_loss(w, w.double(), b, b, x)
    with pytest.raises(ValueError, match="glove_gradients: x must hold co-occurrence counts >= 0"):
        glove_gradients(w, w, b, b, -x)
    with pytest.raises(ValueError, match="train_glove: x contains NaN"):
        train_glove(x * nan, 3, steps=1)
    with pytest.raises(ValueError, match="train_glove: lr must be a positive number, got inf"):
        train_glove(x, 3, steps=1, lr=math.inf)
    with pytest.raises(TypeError, match="char_ngrams: n_min must be an int, got bool"):
        char_ngrams("abc", True, 3)
    with pytest.raises(TypeError, match=r"Vocabulary: words must be str, got \[1\]"):
        Vocabulary([1], [1])
    with pytest.raises(TypeError, match="Vocabulary: counts\\[i\\] must be an int, got float"):
        Vocabulary(["a"], [1.5])
    with pytest.raises(TypeError, match="encode_documents: documents must be a sequence of str"):
        encode_documents(["a b", 3], vocab)
    with pytest.raises(TypeError, match="Vocabulary.index: word must be a str, got list"):
        vocab.index(["a"])
