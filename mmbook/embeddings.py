"""Word embeddings: skip-gram with negative sampling (word2vec), GloVe and fastText subwords.

Everything here works on a token stream of integer word ids, shape ``(n_tokens,)``, with an
optional parallel tensor of document ids so that context windows never cross documents.
Gradients that chapter 4 derives by hand (:func:`sgns_gradients`, :func:`glove_gradients`)
are written out in closed form, so they can be checked against ``torch.autograd``.
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections import Counter
from collections.abc import Iterable, Sequence

import torch
from torch import nn

from mmbook.checks import (
    check_device,
    check_finite,
    check_float_tensor,
    check_ids,
    check_int,
    check_like,
    check_number,
    positive_int,
)
from mmbook.core import torch_generator

__all__ = [
    "FastTextSkipGram",
    "SkipGramNS",
    "Vocabulary",
    "analogy",
    "char_ngrams",
    "cooccurrence_matrix",
    "encode_documents",
    "fnv1a_32",
    "glove_gradients",
    "glove_loss",
    "glove_weighting",
    "negative_sampling_distribution",
    "nearest_neighbours",
    "pair_ranks",
    "pca",
    "sgns_gradients",
    "sgns_loss",
    "skipgram_pairs",
    "subsample_keep_probs",
    "tokenize",
    "train_glove",
    "train_skipgram",
]

_WORD = re.compile(r"[^\W\d]\w*")  # a letter (any script) or "_", then letters, digits and "_"


# ----------------------------------------------------------------------------------------------------------------------
# Tokens and vocabulary
# ----------------------------------------------------------------------------------------------------------------------


def tokenize(text: str) -> list[str]:
    """Lower-case ``text`` and return its words: runs of letters, digits and ``_`` that start with a letter or ``_``.

    ``"Use list.append(x)!"`` gives ``["use", "list", "append", "x"]``; punctuation and bare numbers are dropped,
    identifiers such as ``__init__`` stay whole. Letters are those of any script (``"naïve café Straße"`` gives
    ``["naïve", "café", "straße"]``); the text is put in Unicode normal form NFC first, so an accent typed as a
    combining mark (``"cafe\u0301"``) joins its letter instead of splitting the word.
    """
    if not isinstance(text, str):
        raise TypeError(f"tokenize: text must be a str, got {type(text).__name__}")
    return _WORD.findall(unicodedata.normalize("NFC", text).lower())


class Vocabulary:
    """Words with their corpus counts, ordered by count (descending), ties alphabetically.

    ``words[i]`` is the word with id ``i``; ``counts`` is an int64 tensor of shape ``(vocab_size,)``.
    """

    def __init__(self, words: Sequence[str], counts: Sequence[int]) -> None:
        if isinstance(words, str) or not isinstance(words, Sequence):
            raise TypeError(f"Vocabulary: words must be a sequence of str, got {type(words).__name__}")
        if isinstance(counts, str) or not isinstance(counts, (Sequence, torch.Tensor)):
            raise TypeError(f"Vocabulary: counts must be a sequence of ints, got {type(counts).__name__}")
        words = list(words)
        if not words:
            raise ValueError("Vocabulary: words must be non-empty")
        bad = [w for w in words if not isinstance(w, str)]
        if bad:
            raise TypeError(f"Vocabulary: words must be str, got {bad[:3]!r}")
        counts = [check_int("counts[i]", c.item() if isinstance(c, torch.Tensor) else c, "Vocabulary") for c in counts]
        if len(words) != len(counts):
            raise ValueError(f"Vocabulary: got {len(words)} words but {len(counts)} counts")
        if len(set(words)) != len(words):
            raise ValueError("Vocabulary: words must be unique")
        if any(int(c) < 1 for c in counts):
            raise ValueError("Vocabulary: counts must be positive")
        self.words: list[str] = words
        self.counts: torch.Tensor = torch.tensor([int(c) for c in counts], dtype=torch.int64)
        self._index = {w: i for i, w in enumerate(words)}

    @classmethod
    def build(cls, tokens: Iterable[str], min_count: int = 5) -> Vocabulary:
        """Count ``tokens`` and keep the words seen at least ``min_count`` times."""
        if isinstance(min_count, bool) or not isinstance(min_count, int) or min_count < 1:
            raise ValueError(f"Vocabulary.build: min_count must be a positive int, got {min_count!r}")
        if isinstance(tokens, str):
            raise TypeError("Vocabulary.build: tokens must be an iterable of words, got a single str")
        if not isinstance(tokens, Iterable):
            raise TypeError(f"Vocabulary.build: tokens must be an iterable of words, got {type(tokens).__name__}")
        counter = Counter(tokens)
        kept = sorted(((w, c) for w, c in counter.items() if c >= min_count), key=lambda wc: (-wc[1], wc[0]))
        if not kept:
            raise ValueError(f"Vocabulary.build: no word occurs at least min_count={min_count} times")
        return cls([w for w, _ in kept], [c for _, c in kept])

    def __len__(self) -> int:
        return len(self.words)

    def __contains__(self, word: object) -> bool:
        return word in self._index

    def __repr__(self) -> str:
        return f"Vocabulary({len(self)} words, {int(self.counts.sum())} tokens)"

    def index(self, word: str) -> int:
        """The id of ``word``; a :class:`ValueError` names it when it is not in the vocabulary."""
        if not isinstance(word, str):
            raise TypeError(f"Vocabulary.index: word must be a str, got {type(word).__name__}")
        if word not in self._index:
            raise ValueError(f"Vocabulary.index: {word!r} is not in the vocabulary ({len(self)} words)")
        return self._index[word]

    def encode(self, tokens: Iterable[str]) -> torch.Tensor:
        """Ids of the in-vocabulary tokens, shape ``(n_kept,)``, int64; unknown words are dropped."""
        if isinstance(tokens, str):
            raise TypeError("Vocabulary.encode: tokens must be an iterable of words, got a single str")
        if not isinstance(tokens, Iterable):
            raise TypeError(f"Vocabulary.encode: tokens must be an iterable of words, got {type(tokens).__name__}")
        return torch.tensor([self._index[t] for t in tokens if t in self._index], dtype=torch.int64)


def encode_documents(documents: Sequence[str], vocab: Vocabulary) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokenize and encode each document; return the concatenated ids and each token's document index.

    Both are int64 tensors of shape ``(n_tokens,)``; out-of-vocabulary words are dropped.
    """
    if isinstance(documents, str) or not isinstance(documents, Sequence) \
            or not all(isinstance(doc, str) for doc in documents):
        raise TypeError(f"encode_documents: documents must be a sequence of str, got {type(documents).__name__}")
    if not isinstance(vocab, Vocabulary):
        raise TypeError(f"encode_documents: vocab must be a Vocabulary, got {type(vocab).__name__}")
    encoded = [vocab.encode(tokenize(doc)) for doc in documents]
    if not encoded:
        raise ValueError("encode_documents: documents is empty")
    doc_ids = [torch.full((len(e),), i, dtype=torch.int64) for i, e in enumerate(encoded)]
    return torch.cat(encoded), torch.cat(doc_ids)


def _check_ids(name: str, ids: object, fn: str) -> torch.Tensor:
    if not isinstance(ids, torch.Tensor):
        raise TypeError(f"{fn}: {name} must be a torch.Tensor, got {type(ids).__name__}")
    if ids.ndim != 1 or ids.dtype != torch.int64:
        raise ValueError(f"{fn}: {name} must be a 1-D int64 tensor, got shape {tuple(ids.shape)} and {ids.dtype}")
    return ids


def _check_counts(counts: object, fn: str) -> torch.Tensor:
    if not isinstance(counts, torch.Tensor):
        raise TypeError(f"{fn}: counts must be a torch.Tensor, got {type(counts).__name__}")
    if counts.ndim != 1 or counts.numel() == 0 or bool((counts < 0).any()) or not bool((counts > 0).any()) \
            or not bool(torch.isfinite(counts).all()):
        raise ValueError(f"{fn}: counts must be a non-empty 1-D tensor of finite non-negative counts, got shape "
                         f"{tuple(counts.shape)}")
    return counts


# ----------------------------------------------------------------------------------------------------------------------
# Skip-gram data: subsampling, negatives, (centre, context) pairs
# ----------------------------------------------------------------------------------------------------------------------


def subsample_keep_probs(counts: torch.Tensor, t: float = 1e-3) -> torch.Tensor:
    """Probability of keeping each word under Mikolov et al.'s subsampling, shape ``(vocab_size,)``, float64.

    A word with relative frequency ``f`` is discarded with probability ``1 - sqrt(t / f)``, so it is kept with
    probability ``min(1, sqrt(t / f))``: words rarer than ``t`` are always kept. ``t = 1e-3`` is word2vec's default;
    the paper's ``1e-5`` suits corpora of billions of words.
    """
    counts = _check_counts(counts, "subsample_keep_probs")
    check_number("t", t, "subsample_keep_probs", 0.0, low_open=True)  # t = inf would keep every word
    freq = counts.double() / counts.sum()
    return torch.sqrt(t / freq.clamp_min(1e-300)).clamp(max=1.0)


def negative_sampling_distribution(counts: torch.Tensor, power: float = 0.75) -> torch.Tensor:
    """The noise distribution ``P_n(w) = count(w)^power / sum_v count(v)^power``, shape ``(vocab_size,)``, float64."""
    counts = _check_counts(counts, "negative_sampling_distribution")
    check_number("power", power, "negative_sampling_distribution", 0.0, 1.0)
    weights = counts.double() ** power
    weights[counts == 0] = 0.0
    return weights / weights.sum()


def skipgram_pairs(
    ids: torch.Tensor, window: int, doc_ids: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Every (centre, context) pair at distance ``1..window`` in the token stream ``ids`` of shape ``(n,)``.

    With ``doc_ids`` (shape ``(n,)``), pairs whose two tokens lie in different documents are dropped.
    Returns ``(centres, contexts)``, two int64 tensors of shape ``(n_pairs,)``, ordered by offset
    ``-window..-1, 1..window`` and, within an offset, by position.
    """
    ids = _check_ids("ids", ids, "skipgram_pairs")
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(f"skipgram_pairs: window must be a positive int, got {window!r}")
    if doc_ids is not None:
        doc_ids = _check_ids("doc_ids", doc_ids, "skipgram_pairs")
        if doc_ids.shape != ids.shape:
            raise ValueError(f"skipgram_pairs: doc_ids must have the shape of ids {tuple(ids.shape)}, "
                             f"got {tuple(doc_ids.shape)}")
    centres, contexts = [], []
    n = ids.numel()
    for offset in [*range(-window, 0), *range(1, window + 1)]:
        if abs(offset) >= n:
            continue
        pos = torch.arange(max(0, -offset), min(n, n - offset), device=ids.device)
        if doc_ids is not None:
            pos = pos[doc_ids[pos] == doc_ids[pos + offset]]
        centres.append(ids[pos])
        contexts.append(ids[pos + offset])
    if not centres:
        empty = ids.new_empty(0)
        return empty, empty.clone()
    return torch.cat(centres), torch.cat(contexts)


def _check_distribution(name: str, p: torch.Tensor, fn: str, at_most_one: bool = False) -> None:
    """Floating-point weights, finite and >= 0 (and <= 1 for probabilities), not all zero."""
    check_float_tensor(name, p, fn, finite=True)
    if bool((p < 0).any()) or (at_most_one and bool((p > 1).any())) or not bool((p > 0).any()):
        raise ValueError(f"{fn}: {name} must hold {'probabilities in [0, 1]' if at_most_one else 'weights >= 0'}, "
                         f"not all zero, got values in [{float(p.min())}, {float(p.max())}]")


# ----------------------------------------------------------------------------------------------------------------------
# Skip-gram with negative sampling: loss and hand-derived gradients
# ----------------------------------------------------------------------------------------------------------------------


def _check_sgns(v_c: object, u_o: object, u_neg: object, fn: str) -> None:
    for name, x, nd in (("v_c", v_c, 2), ("u_o", u_o, 2), ("u_neg", u_neg, 3)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{fn}: {name} must be a torch.Tensor, got {type(x).__name__}")
        if x.ndim != nd or not torch.is_floating_point(x):
            raise ValueError(f"{fn}: {name} must be a floating-point tensor with {nd} dimensions, got shape "
                             f"{tuple(x.shape)} and {x.dtype}")
    if u_o.shape != v_c.shape or u_neg.shape[0] != v_c.shape[0] or u_neg.shape[2] != v_c.shape[1]:
        raise ValueError(f"{fn}: expected v_c (batch, dim), u_o (batch, dim), u_neg (batch, k, dim); got "
                         f"{tuple(v_c.shape)}, {tuple(u_o.shape)}, {tuple(u_neg.shape)}")


def sgns_loss(v_c: torch.Tensor, u_o: torch.Tensor, u_neg: torch.Tensor) -> torch.Tensor:
    """Per-pair skip-gram negative-sampling loss, shape ``(batch,)``.

    ``L = -log sigma(u_o . v_c) - sum_k log sigma(-u_k . v_c)`` with centre vectors ``v_c`` ``(batch, dim)``,
    true-context vectors ``u_o`` ``(batch, dim)`` and negative-context vectors ``u_neg`` ``(batch, k, dim)``.
    """
    _check_sgns(v_c, u_o, u_neg, "sgns_loss")
    pos = (u_o * v_c).sum(-1)
    neg = (u_neg * v_c.unsqueeze(1)).sum(-1)  # (batch, k); faster than einsum/bmm on CPU
    return -nn.functional.logsigmoid(pos) - nn.functional.logsigmoid(-neg).sum(-1)


def sgns_gradients(
    v_c: torch.Tensor, u_o: torch.Tensor, u_neg: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Hand-derived gradients of :func:`sgns_loss` (each pair's own loss) w.r.t. ``v_c``, ``u_o`` and ``u_neg``.

    With ``s_o = sigma(u_o . v_c)`` and ``s_k = sigma(u_k . v_c)``:
    ``dL/dv_c = (s_o - 1) u_o + sum_k s_k u_k``, ``dL/du_o = (s_o - 1) v_c``, ``dL/du_k = s_k v_c``.
    Shapes ``(batch, dim)``, ``(batch, dim)``, ``(batch, k, dim)`` — the gradient of ``sgns_loss(...).sum()``.
    """
    _check_sgns(v_c, u_o, u_neg, "sgns_gradients")
    s_o = torch.sigmoid((u_o * v_c).sum(-1, keepdim=True))  # (batch, 1)
    s_k = torch.sigmoid((u_neg * v_c.unsqueeze(1)).sum(-1, keepdim=True))  # (batch, k, 1)
    grad_v = (s_o - 1) * u_o + (s_k * u_neg).sum(1)
    grad_o = (s_o - 1) * v_c
    grad_neg = s_k * v_c.unsqueeze(1)
    return grad_v, grad_o, grad_neg


class SkipGramNS(nn.Module):
    """word2vec's skip-gram with negative sampling: a centre ("input") and a context ("output") table.

    ``forward(centres (batch,), contexts (batch,), negatives (batch, k))`` returns the mean :func:`sgns_loss`.
    ``vectors`` is the trained input table, ``(vocab_size, dim)``. Initialisation follows word2vec: input vectors
    uniform in ``±0.5/dim``, output vectors zero.
    """

    def __init__(self, vocab_size: int, dim: int) -> None:
        super().__init__()
        for name, value in (("vocab_size", vocab_size), ("dim", dim)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"SkipGramNS: {name} must be a positive int, got {value!r}")
        self.vocab_size = vocab_size
        self.dim = dim
        self.input = nn.Embedding(vocab_size, dim)
        self.output = nn.Embedding(vocab_size, dim)
        nn.init.uniform_(self.input.weight, -0.5 / dim, 0.5 / dim)
        nn.init.zeros_(self.output.weight)

    def centre_vectors(self, centres: torch.Tensor) -> torch.Tensor:
        """Input vectors of the centre words, ``(batch,) -> (batch, dim)``."""
        return self.input(centres)

    def forward(self, centres: torch.Tensor, contexts: torch.Tensor, negatives: torch.Tensor) -> torch.Tensor:
        fn = type(self).__name__
        for name, ids in (("centres", centres), ("contexts", contexts), ("negatives", negatives)):
            check_ids(name, ids, fn, self.vocab_size)  # a negative id would wrap to the last word's vector
        if centres.ndim != 1 or contexts.shape != centres.shape or negatives.ndim != 2 \
                or negatives.shape[0] != centres.shape[0]:
            raise ValueError(f"{type(self).__name__}: expected centres (batch,), contexts (batch,), negatives "
                             f"(batch, k); got {tuple(centres.shape)}, {tuple(contexts.shape)}, "
                             f"{tuple(negatives.shape)}")
        return sgns_loss(self.centre_vectors(centres), self.output(contexts), self.output(negatives)).mean()

    @property
    def vectors(self) -> torch.Tensor:
        """The word vectors, ``(vocab_size, dim)``, detached."""
        return self.input.weight.detach()


def train_skipgram(
    model: SkipGramNS,
    ids: torch.Tensor,
    noise: torch.Tensor,
    *,
    doc_ids: torch.Tensor | None = None,
    keep_probs: torch.Tensor | None = None,
    window: int = 5,
    negatives: int = 5,
    epochs: int = 4,
    batch_size: int = 4096,
    lr: float = 0.025,
    seed: int = 0,
    device: torch.device | str | None = None,
) -> list[float]:
    """Train a :class:`SkipGramNS` (or :class:`FastTextSkipGram`) with Adam; return the mean loss of each epoch.

    Each epoch subsamples the token stream ``ids`` ``(n,)`` with ``keep_probs`` ``(vocab_size,)`` (when given),
    builds all pairs within ``window`` (inside one document when ``doc_ids`` is given), shuffles them and draws
    ``negatives`` noise words per pair from ``noise`` ``(vocab_size,)``. Random numbers come from a CPU generator
    seeded with ``seed``, so the data are the same on every device.
    """
    if not isinstance(model, SkipGramNS):
        raise TypeError(f"train_skipgram: model must be a SkipGramNS, got {type(model).__name__}")
    ids = _check_ids("ids", ids, "train_skipgram")
    if not isinstance(noise, torch.Tensor) or noise.shape != (model.vocab_size,):
        raise ValueError(f"train_skipgram: noise must be a tensor of shape ({model.vocab_size},), got "
                         f"{getattr(noise, 'shape', type(noise).__name__)}")
    if keep_probs is not None and (not isinstance(keep_probs, torch.Tensor) or keep_probs.shape != noise.shape):
        raise ValueError(f"train_skipgram: keep_probs must be a tensor of shape ({model.vocab_size},)")
    for name, value in (("negatives", negatives), ("epochs", epochs), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"train_skipgram: {name} must be a positive int, got {value!r}")
    check_ids("ids", ids, "train_skipgram", model.vocab_size)
    _check_distribution("noise", noise, "train_skipgram")
    if keep_probs is not None:
        _check_distribution("keep_probs", keep_probs, "train_skipgram", at_most_one=True)
    check_number("lr", lr, "train_skipgram", 0.0, low_open=True)
    if doc_ids is not None and _check_ids("doc_ids", doc_ids, "train_skipgram").shape != ids.shape:
        raise ValueError(f"train_skipgram: doc_ids must have the shape of ids {tuple(ids.shape)}, got "
                         f"{tuple(doc_ids.shape)}")
    device = check_device("device", device, "train_skipgram") if device is not None else model.input.weight.device
    model.to(device)
    ids, noise = ids.cpu(), noise.cpu()  # the data pipeline runs on the CPU; only batches go to the device
    doc_ids = doc_ids.cpu() if doc_ids is not None else None
    keep_probs = keep_probs.cpu() if keep_probs is not None else None
    generator = torch_generator(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    losses = []
    for _ in range(epochs):
        stream, docs = ids, doc_ids
        if keep_probs is not None:
            keep = torch.rand(ids.numel(), generator=generator, dtype=torch.float64) < keep_probs[ids]
            stream = ids[keep]
            docs = doc_ids[keep] if doc_ids is not None else None
        centres, contexts = skipgram_pairs(stream, window, docs)
        if centres.numel() == 0:
            raise ValueError("train_skipgram: no (centre, context) pairs; the token stream is too short")
        order = torch.randperm(centres.numel(), generator=generator)
        centres, contexts = centres[order], contexts[order]
        noise_words = torch.multinomial(noise, centres.numel() * negatives, replacement=True,
                                        generator=generator).view(-1, negatives)
        total = 0.0
        for start in range(0, centres.numel(), batch_size):
            sl = slice(start, start + batch_size)
            loss = model(centres[sl].to(device), contexts[sl].to(device), noise_words[sl].to(device))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += loss.item() * centres[sl].numel()
        losses.append(total / centres.numel())
    return losses


# ----------------------------------------------------------------------------------------------------------------------
# Similarity queries and projection
# ----------------------------------------------------------------------------------------------------------------------


def _check_vectors(vectors: object, vocab: object, fn: str) -> torch.Tensor:
    if not isinstance(vectors, torch.Tensor) or vectors.ndim != 2 or not torch.is_floating_point(vectors):
        raise TypeError(f"{fn}: vectors must be a floating-point tensor (vocab_size, dim), got "
                        f"{getattr(vectors, 'shape', type(vectors).__name__)}")
    if not isinstance(vocab, Vocabulary):
        raise TypeError(f"{fn}: vocab must be a Vocabulary, got {type(vocab).__name__}")
    if vectors.shape[0] != len(vocab):
        raise ValueError(f"{fn}: vectors has {vectors.shape[0]} rows but the vocabulary has {len(vocab)} words")
    if not bool(torch.isfinite(vectors).all()):
        raise ValueError(f"{fn}: vectors contain NaN or infinite values (did training diverge?)")
    return vectors


def _ranked(vectors: torch.Tensor, vocab: Vocabulary, query: torch.Tensor, k: int,
            exclude: set[int]) -> list[tuple[str, float]]:
    unit = nn.functional.normalize(vectors.detach().double(), dim=1)
    q = nn.functional.normalize(query.detach().double().to(unit.device), dim=0)
    sims = unit @ q
    if exclude:
        sims[sorted(exclude)] = -math.inf
    k = min(k, len(vocab) - len(exclude))
    top = torch.topk(sims, k)
    return [(vocab.words[int(i)], float(s)) for s, i in zip(top.values, top.indices, strict=True)]


def nearest_neighbours(
    vectors: torch.Tensor, vocab: Vocabulary, query: str | torch.Tensor, k: int = 5
) -> list[tuple[str, float]]:
    """The ``k`` words whose vectors have the highest cosine similarity with ``query``.

    ``vectors`` is ``(vocab_size, dim)``; ``query`` is a word (itself excluded from the answer) or a vector
    ``(dim,)``. Returns ``[(word, cosine), ...]``, most similar first.
    """
    vectors = _check_vectors(vectors, vocab, "nearest_neighbours")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"nearest_neighbours: k must be a positive int, got {k!r}")
    if isinstance(query, str):
        if query not in vocab:
            raise ValueError(f"nearest_neighbours: query word {query!r} is not in the vocabulary")
        i = vocab.index(query)
        return _ranked(vectors, vocab, vectors[i], k, {i})
    if not isinstance(query, torch.Tensor) or query.shape != (vectors.shape[1],):
        raise ValueError(f"nearest_neighbours: query must be a word or a vector of shape ({vectors.shape[1]},), "
                         f"got {getattr(query, 'shape', type(query).__name__)}")
    if not bool(torch.isfinite(query).all()) or not bool((query != 0).any()):  # no direction: every cosine is 0
        raise ValueError("nearest_neighbours: query vector must be finite and not all zero")
    return _ranked(vectors, vocab, query, k, set())


def analogy(
    vectors: torch.Tensor, vocab: Vocabulary, a: str, b: str, c: str, k: int = 5
) -> list[tuple[str, float]]:
    """Answer "a is to b as c is to ?" by the words nearest (cosine) to ``b - a + c`` (3CosAdd, unit vectors).

    The three query words are excluded from the answer. ``vectors`` is ``(vocab_size, dim)``.
    """
    vectors = _check_vectors(vectors, vocab, "analogy")
    for name, word in (("a", a), ("b", b), ("c", c)):
        if word not in vocab:
            raise ValueError(f"analogy: {name}={word!r} is not in the vocabulary")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"analogy: k must be a positive int, got {k!r}")
    unit = nn.functional.normalize(vectors.detach().double(), dim=1)
    ia, ib, ic = vocab.index(a), vocab.index(b), vocab.index(c)
    return _ranked(vectors, vocab, unit[ib] - unit[ia] + unit[ic], k, {ia, ib, ic})


def pair_ranks(vectors: torch.Tensor, vocab: Vocabulary, pairs: Sequence[tuple[str, str]]) -> list[int]:
    """For each word pair ``(a, b)``, the rank of ``b`` among ``a``'s neighbours by cosine similarity.

    Rank 1 means ``b`` is ``a``'s nearest neighbour; random vectors give about ``len(vocab) / 2``. ``vectors`` is
    ``(vocab_size, dim)``. Ties count against ``b``, so collapsed (all-equal) vectors get the worst rank, not the best.
    """
    vectors = _check_vectors(vectors, vocab, "pair_ranks")
    if isinstance(pairs, str) or not isinstance(pairs, Sequence) \
            or not all(isinstance(p, (tuple, list)) and len(p) == 2 for p in pairs):
        raise TypeError("pair_ranks: pairs must be a sequence of (word, word) pairs")
    for a, b in pairs:
        for word in (a, b):
            if word not in vocab:
                raise ValueError(f"pair_ranks: {word!r} (in pair {(a, b)!r}) is not in the vocabulary")
        if a == b:
            raise ValueError(f"pair_ranks: a pair needs two different words, got {(a, b)!r}")
    unit = nn.functional.normalize(vectors.detach().double(), dim=1)
    ranks = []
    for a, b in pairs:
        ia, ib = vocab.index(a), vocab.index(b)
        sims = unit @ unit[ia]
        sims[ia] = -math.inf
        ranks.append(int((sims >= sims[ib]).sum()))  # counts b itself, hence no "+ 1"
    return ranks


def pca(x: torch.Tensor, k: int = 2) -> torch.Tensor:
    """Project the rows of ``x`` ``(n, d)`` onto their first ``k`` principal components, shape ``(n, k)``.

    Centres the data and takes the SVD ``X - mean = U S V^T``; the projection is ``U[:, :k] S[:k]``. Each
    component's sign is fixed so that its largest-magnitude loading is positive, which makes the result unique.
    """
    if not isinstance(x, torch.Tensor) or x.ndim != 2 or not torch.is_floating_point(x):
        raise TypeError(f"pca: x must be a floating-point tensor (n, d), got {getattr(x, 'shape', type(x).__name__)}")
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= min(x.shape):
        raise ValueError(f"pca: k must be an int in [1, min(n, d)] = [1, {min(x.shape)}], got {k!r}")
    check_finite("x", x, "pca")
    centred = x - x.mean(dim=0, keepdim=True)
    _, _, vh = torch.linalg.svd(centred, full_matrices=False)
    components = vh[:k]
    rows = torch.arange(k, device=x.device)
    signs = torch.sign(components[rows, components.abs().argmax(dim=1)])
    return centred @ (components * signs.unsqueeze(1)).T


# ----------------------------------------------------------------------------------------------------------------------
# GloVe
# ----------------------------------------------------------------------------------------------------------------------


def cooccurrence_matrix(
    ids: torch.Tensor, vocab_size: int, window: int, doc_ids: torch.Tensor | None = None
) -> torch.Tensor:
    """GloVe's symmetric co-occurrence counts, shape ``(vocab_size, vocab_size)``, float64.

    ``X[i, j]`` sums ``1 / distance`` over every occurrence of word ``j`` within ``window`` tokens of word ``i``
    (inside one document when ``doc_ids`` is given), as in Pennington et al. (2014).
    """
    ids = _check_ids("ids", ids, "cooccurrence_matrix")
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 1:
        raise ValueError(f"cooccurrence_matrix: vocab_size must be a positive int, got {vocab_size!r}")
    check_ids("ids", ids, "cooccurrence_matrix", vocab_size)
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(f"cooccurrence_matrix: window must be a positive int, got {window!r}")
    if doc_ids is not None:
        doc_ids = _check_ids("doc_ids", doc_ids, "cooccurrence_matrix")
        if doc_ids.shape != ids.shape:
            raise ValueError(f"cooccurrence_matrix: doc_ids must have the shape of ids {tuple(ids.shape)}, "
                             f"got {tuple(doc_ids.shape)}")
    flat = torch.zeros(vocab_size * vocab_size, dtype=torch.float64, device=ids.device)
    n = ids.numel()
    for offset in range(1, min(window, n - 1) + 1):
        left, right = ids[:-offset], ids[offset:]
        if doc_ids is not None:
            same = doc_ids[:-offset] == doc_ids[offset:]
            left, right = left[same], right[same]
        weight = torch.full((left.numel(),), 1.0 / offset, dtype=torch.float64, device=ids.device)
        flat.index_add_(0, left * vocab_size + right, weight)
        flat.index_add_(0, right * vocab_size + left, weight)
    return flat.view(vocab_size, vocab_size)


def glove_weighting(x: torch.Tensor, x_max: float = 100.0, alpha: float = 0.75) -> torch.Tensor:
    """GloVe's weight ``f(x) = (x / x_max)^alpha`` for ``x < x_max`` and 1 above; ``f(0) = 0``. Same shape as ``x``."""
    if not isinstance(x, torch.Tensor) or not torch.is_floating_point(x):
        raise TypeError(f"glove_weighting: x must be a floating-point tensor, got {type(x).__name__}")
    check_number("x_max", x_max, "glove_weighting", 0.0, low_open=True)  # inf would weight every pair 0
    check_number("alpha", alpha, "glove_weighting", 0.0, low_open=True)
    return (x.clamp_min(0) / x_max).pow(alpha).clamp(max=1.0)


def _check_glove(w: object, w_ctx: object, b: object, b_ctx: object, x: object, fn: str) -> None:
    for name, t in (("w", w), ("w_ctx", w_ctx), ("b", b), ("b_ctx", b_ctx), ("x", x)):
        if not isinstance(t, torch.Tensor) or not torch.is_floating_point(t):
            raise TypeError(f"{fn}: {name} must be a floating-point tensor, got {type(t).__name__}")
    v = x.shape[0] if x.ndim == 2 else -1
    if x.ndim != 2 or x.shape[1] != v or w.ndim != 2 or w.shape[0] != v or w_ctx.shape != w.shape \
            or b.shape != (v,) or b_ctx.shape != (v,):
        raise ValueError(f"{fn}: expected w, w_ctx (vocab, dim), b, b_ctx (vocab,), x (vocab, vocab); got "
                         f"{tuple(w.shape)}, {tuple(w_ctx.shape)}, {tuple(b.shape)}, {tuple(b_ctx.shape)}, "
                         f"{tuple(x.shape)}")
    for name, t in (("w_ctx", w_ctx), ("b", b), ("b_ctx", b_ctx)):
        check_like(name, t, fn, "w", w)
    if x.numel() and float(x.min()) < 0:  # negative counts would get weight 0 and vanish silently
        raise ValueError(f"{fn}: x must hold co-occurrence counts >= 0, got a minimum of {float(x.min())}")


def _glove_terms(x: torch.Tensor, x_max: float, alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    """f(X) and log X with log 0 replaced by 0 (those entries have f = 0 and drop out)."""
    return glove_weighting(x, x_max, alpha), torch.where(x > 0, x, torch.ones_like(x)).log()


def _glove_dense(w, w_ctx, b, b_ctx, f, log_x, grads=True):
    """Loss and (optionally) gradients in matrix form; f is 0 wherever X is 0, so those entries drop out."""
    e = w @ w_ctx.T  # e_ij = w_i . w~_j + b_i + b~_j - log X_ij, built in place: (vocab, vocab)
    e += b[:, None]
    e += b_ctx[None, :]
    e -= log_x
    fe = f * e
    loss = (fe * e).sum()
    if not grads:
        return loss, None
    g = fe.mul_(2)  # G = 2 f(X) * E
    return loss, (g @ w_ctx, g.T @ w, g.sum(1), g.sum(0))


def glove_loss(
    w: torch.Tensor, w_ctx: torch.Tensor, b: torch.Tensor, b_ctx: torch.Tensor, x: torch.Tensor,
    x_max: float = 100.0, alpha: float = 0.75,
) -> torch.Tensor:
    """GloVe's objective ``J = sum_{ij: X_ij > 0} f(X_ij) (w_i . w~_j + b_i + b~_j - log X_ij)^2`` (a scalar).

    ``w``, ``w_ctx``: word and context vectors ``(vocab, dim)``; ``b``, ``b_ctx``: biases ``(vocab,)``;
    ``x``: co-occurrence counts ``(vocab, vocab)``. Pairs with ``X_ij = 0`` contribute nothing.
    """
    _check_glove(w, w_ctx, b, b_ctx, x, "glove_loss")
    return _glove_dense(w, w_ctx, b, b_ctx, *_glove_terms(x, x_max, alpha), grads=False)[0]


def glove_gradients(
    w: torch.Tensor, w_ctx: torch.Tensor, b: torch.Tensor, b_ctx: torch.Tensor, x: torch.Tensor,
    x_max: float = 100.0, alpha: float = 0.75,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Hand-derived gradients of :func:`glove_loss` w.r.t. ``w``, ``w_ctx``, ``b``, ``b_ctx`` (shapes as the inputs).

    With residual ``e_ij = w_i . w~_j + b_i + b~_j - log X_ij`` and ``G_ij = 2 f(X_ij) e_ij`` (0 where
    ``X_ij = 0``): ``dJ/dW = G W~``, ``dJ/dW~ = G^T W``, ``dJ/db = G 1``, ``dJ/db~ = G^T 1``.
    """
    _check_glove(w, w_ctx, b, b_ctx, x, "glove_gradients")
    return _glove_dense(w, w_ctx, b, b_ctx, *_glove_terms(x, x_max, alpha))[1]


def train_glove(
    x: torch.Tensor, dim: int, *, steps: int = 300, lr: float = 0.05, x_max: float = 100.0, alpha: float = 0.75,
    seed: int = 0, device: torch.device | str | None = None,
) -> tuple[torch.Tensor, list[float]]:
    """Fit GloVe to the co-occurrence matrix ``x`` ``(vocab, vocab)`` by full-batch AdaGrad on :func:`glove_gradients`.

    Returns the word vectors ``w + w~`` ``(vocab, dim)`` (float32, on CPU) and the loss before every step.
    Parameters are drawn uniform in ``±0.5/dim`` on a CPU generator seeded with ``seed``, then moved to ``device``.
    """
    fn = "train_glove"
    check_float_tensor("x", x, fn, finite=True)
    if x.ndim != 2 or x.shape[0] != x.shape[1]:
        raise ValueError(f"{fn}: x must be a square (vocab, vocab) tensor, got {tuple(x.shape)}")
    if x.numel() and float(x.min()) < 0:
        raise ValueError(f"{fn}: x must hold co-occurrence counts >= 0, got a minimum of {float(x.min())}")
    for name, value in (("dim", dim), ("steps", steps)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{fn}: {name} must be a positive int, got {value!r}")
    check_number("lr", lr, fn, 0.0, low_open=True)
    for name, value in (("x_max", x_max), ("alpha", alpha)):
        check_number(name, value, fn, 0.0, low_open=True)
    device = check_device("device", device, fn) if device is not None else x.device
    v = x.shape[0]
    generator = torch_generator(seed)
    params = [(torch.rand(*shape, generator=generator) - 0.5) / dim for shape in ((v, dim), (v, dim), (v,), (v,))]
    params = [p.to(device) for p in params]
    f, log_x = (t.to(device=device, dtype=torch.float32) for t in _glove_terms(x, x_max, alpha))
    history = [torch.zeros_like(p) for p in params]
    losses = []
    for _ in range(steps):
        loss, grads = _glove_dense(*params, f, log_x)
        losses.append(float(loss))
        for p, h, g in zip(params, history, grads, strict=True):
            h += g * g
            p -= lr * g / (h.sqrt() + 1e-8)
    return (params[0] + params[1]).cpu(), losses


# ----------------------------------------------------------------------------------------------------------------------
# fastText: character n-grams
# ----------------------------------------------------------------------------------------------------------------------


def char_ngrams(word: str, n_min: int = 3, n_max: int = 6) -> list[str]:
    """The character n-grams of ``"<" + word + ">"`` with ``n_min <= n <= n_max``, in order of position then length.

    ``char_ngrams("where", 3, 3)`` is ``["<wh", "whe", "her", "ere", "re>"]``. The boundary symbols let prefixes and
    suffixes differ from the same letters inside a word.
    """
    if not isinstance(word, str) or not word:
        raise ValueError(f"char_ngrams: word must be a non-empty str, got {word!r}")
    n_min, n_max = positive_int("n_min", n_min, "char_ngrams"), positive_int("n_max", n_max, "char_ngrams")
    if n_min > n_max:
        raise ValueError(f"char_ngrams: need integers 1 <= n_min <= n_max, got n_min={n_min!r}, n_max={n_max!r}")
    padded = f"<{word}>"
    return [padded[i:i + n] for i in range(len(padded)) for n in range(n_min, n_max + 1) if i + n <= len(padded)]


def fnv1a_32(text: str) -> int:
    """The 32-bit FNV-1a hash of ``text``'s UTF-8 bytes (fastText hashes n-grams with FNV-1a)."""
    if not isinstance(text, str):
        raise TypeError(f"fnv1a_32: text must be a str, got {type(text).__name__}")
    h = 2166136261
    for byte in text.encode("utf-8"):
        h = ((h ^ byte) * 16777619) & 0xFFFFFFFF
    return h


class FastTextSkipGram(SkipGramNS):
    """fastText's skip-gram: a word's centre vector is the mean of its own vector and its n-gram vectors.

    The input table has ``vocab_size + buckets`` rows: row ``i`` is word ``i``, row ``vocab_size + h`` is the
    n-gram hash bucket ``h = fnv1a_32(ngram) % buckets``. Words outside the vocabulary get a vector from their
    n-grams alone (:meth:`word_vector`). ``vectors`` is ``(vocab_size, dim)``. fastText itself uses 2 million
    buckets; ``2**14`` suits a vocabulary of a few thousand words (about 10 000 distinct n-grams).
    """

    def __init__(self, vocab: Vocabulary, dim: int, buckets: int = 2**14, n_min: int = 3, n_max: int = 6) -> None:
        if not isinstance(vocab, Vocabulary):
            raise TypeError(f"FastTextSkipGram: vocab must be a Vocabulary, got {type(vocab).__name__}")
        if isinstance(buckets, bool) or not isinstance(buckets, int) or buckets < 1:
            raise ValueError(f"FastTextSkipGram: buckets must be a positive int, got {buckets!r}")
        super().__init__(len(vocab), dim)
        self.vocab, self.buckets, self.n_min, self.n_max = vocab, buckets, n_min, n_max
        self.input = nn.EmbeddingBag(len(vocab) + buckets, dim, mode="mean")
        nn.init.uniform_(self.input.weight, -1.0 / dim, 1.0 / dim)
        rows = [self.subword_ids(w) for w in vocab.words]
        lengths = torch.tensor([len(r) for r in rows])
        # All words' rows back to back, and where each word's rows start: EmbeddingBag's (input, offsets) form.
        self.register_buffer("flat_ids", torch.tensor([i for r in rows for i in r]))
        self.register_buffer("offsets", torch.cumsum(lengths, 0) - lengths)

    def subword_ids(self, word: str) -> list[int]:
        """Input-table rows of ``word``: its own row (when in the vocabulary), then one bucket per n-gram."""
        if not isinstance(word, str) or not word:
            raise ValueError(f"FastTextSkipGram.subword_ids: word must be a non-empty str, got {word!r}")
        own = [self.vocab.index(word)] if word in self.vocab else []
        return own + [self.vocab_size + fnv1a_32(g) % self.buckets for g in char_ngrams(word, self.n_min, self.n_max)]

    def all_vectors(self) -> torch.Tensor:
        """Every vocabulary word's vector, ``(vocab_size, dim)``, differentiable."""
        return self.input(self.flat_ids, self.offsets)

    def centre_vectors(self, centres: torch.Tensor) -> torch.Tensor:
        # Averaging the ~25 rows of each of the V words once per step is cheaper than doing it per pair.
        return self.all_vectors()[centres]

    def word_vector(self, word: str) -> torch.Tensor:
        """The vector of any word, in the vocabulary or not, shape ``(dim,)``, detached."""
        rows = torch.tensor(self.subword_ids(word), device=self.flat_ids.device)
        return self.input(rows, rows.new_zeros(1))[0].detach()

    @property
    def vectors(self) -> torch.Tensor:
        return self.all_vectors().detach()
