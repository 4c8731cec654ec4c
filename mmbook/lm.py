"""Character-level language models: a vocabulary, add-k n-grams, a Bengio-style MLP, perplexity, sampling.

Every model here maps a batch of contexts, the ``context_size`` previous token ids, to scores for
the next token: ``model(contexts)`` with ``contexts`` of shape ``(batch, context_size)`` returns
``(batch, vocab_size)`` logits (for :class:`NGramLM`, log-probabilities, which are valid logits).
:func:`make_windows` cuts a token stream into such contexts, padding the start with the
beginning-of-sequence id, so that every token of a stream is predicted exactly once and models
with different context sizes are scored on the same targets.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Sequence

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from mmbook.checks import check_ids, check_index, check_instance, check_int, check_int_tensor, check_number

__all__ = [
    "CharMLP",
    "CharVocab",
    "NGramLM",
    "make_windows",
    "mean_nll",
    "perplexity",
    "perplexity_from_logits",
    "random_windows",
    "sliding_windows",
    "sample",
]

BOS = "<bos>"
UNK = "<unk>"


class CharVocab:
    """A character vocabulary with two reserved ids: ``bos_id = 0`` (``"<bos>"``) and ``unk_id = 1`` (``"<unk>"``).

    ``<bos>`` pads the left edge of a stream (the "nothing came before" context) and is never a
    character of the text. ``<unk>`` stands for any character the vocabulary does not know;
    :meth:`encode` maps such characters to it, or raises when asked to (``unknown="error"``).
    The known characters follow in sorted order, so the ids do not depend on the text's order.
    """

    bos_id = 0
    unk_id = 1

    def __init__(self, chars: Iterable[str]) -> None:
        chars = list(check_instance("chars", chars, "CharVocab", Iterable, "an iterable of characters"))
        bad = [c for c in chars if not isinstance(c, str) or len(c) != 1]
        if bad:
            raise ValueError(f"CharVocab: chars must be single-character strings, got {bad[:5]!r}")
        if len(set(chars)) != len(chars):
            raise ValueError("CharVocab: chars must not repeat")
        self.itos: list[str] = [BOS, UNK, *sorted(chars)]
        self.stoi: dict[str, int] = {c: i for i, c in enumerate(self.itos) if i >= 2}

    @classmethod
    def from_text(cls, text: str, min_count: int = 1) -> CharVocab:
        """Every character that occurs at least ``min_count`` times in ``text``; rarer ones become ``<unk>``."""
        if not isinstance(text, str):
            raise TypeError(f"CharVocab.from_text: text must be a str, got {type(text).__name__}")
        if not text:
            raise ValueError("CharVocab.from_text: text is empty")
        check_int("min_count", min_count, "CharVocab.from_text", 1)
        counts = Counter(text)
        return cls(c for c, n in counts.items() if n >= min_count)

    def __len__(self) -> int:
        return len(self.itos)

    def __repr__(self) -> str:
        return f"CharVocab({len(self)} ids: <bos>, <unk> and {len(self) - 2} characters)"

    def encode(self, text: str, unknown: str = "unk") -> torch.Tensor:
        """Token ids of ``text``, shape ``(len(text),)``, dtype int64.

        ``unknown="unk"`` maps characters outside the vocabulary to ``unk_id``; ``unknown="error"``
        raises :class:`ValueError` listing them instead.
        """
        if not isinstance(text, str):
            raise TypeError(f"CharVocab.encode: text must be a str, got {type(text).__name__}")
        if unknown not in ("unk", "error"):
            raise ValueError(f"CharVocab.encode: unknown must be 'unk' or 'error', got {unknown!r}")
        if unknown == "error":
            missing = sorted({c for c in text if c not in self.stoi})
            if missing:
                raise ValueError(f"CharVocab.encode: characters not in the vocabulary: {missing[:10]!r}")
        return torch.tensor([self.stoi.get(c, self.unk_id) for c in text], dtype=torch.long)

    def decode(self, ids: torch.Tensor | Sequence[int]) -> str:
        """The text of a 1-D sequence of ids; ``<bos>`` and ``<unk>`` are written out by name."""
        if isinstance(ids, torch.Tensor):
            values = check_ids("ids", ids, "CharVocab.decode", len(self), 1).tolist()
        elif isinstance(ids, (str, bytes)) or not isinstance(ids, Sequence):
            raise TypeError(f"CharVocab.decode: ids must be a tensor or a sequence of ints, got {type(ids).__name__}")
        else:
            values = list(ids)
            if any(isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < len(self) for i in values):
                raise ValueError(f"CharVocab.decode: ids must be ints in [0, {len(self)})")
        return "".join(self.itos[i] for i in values)


def make_windows(
    ids: torch.Tensor, context_size: int, pad_id: int = CharVocab.bos_id
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cut a stream of ids into (context, next token) pairs, one per token of the stream.

    ``ids`` has shape ``(seq,)``. Returns ``contexts`` of shape ``(seq, context_size)``, where row
    ``t`` holds ``ids[t - context_size : t]`` with positions before the start filled with
    ``pad_id``, and ``targets = ids`` of shape ``(seq,)``.
    """
    ids = check_int_tensor("ids", ids, "make_windows", 1).long()
    check_int("context_size", context_size, "make_windows", 0)
    check_int("pad_id", pad_id, "make_windows", 0)
    padded = torch.cat([torch.full((context_size,), pad_id, dtype=torch.long), ids])
    positions = torch.arange(ids.numel()).unsqueeze(1) + torch.arange(context_size).unsqueeze(0)
    return padded[positions], ids.clone()


def sliding_windows(ids: torch.Tensor, seq_len: int, stride: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Every training window of a token stream at a fixed stride, for next-token prediction.

    ``ids`` has shape ``(seq,)``. Window ``w`` starts at ``s = w * stride`` and holds ``inputs[w] = ids[s : s +
    seq_len]`` and ``targets[w] = ids[s + 1 : s + seq_len + 1]``; windows are taken while the targets fit, so there
    are ``(seq - seq_len - 1) // stride + 1`` of them, each of shape ``(seq_len,)``. ``stride == seq_len`` makes
    every token a target exactly once (but the last few, which do not fill a window); a smaller stride overlaps
    windows, so more tokens are predicted with a long context. Both tensors stay on ``ids``' device.
    """
    fn = "sliding_windows"
    ids = check_int_tensor("ids", ids, fn, 1).long()
    check_int("seq_len", seq_len, fn, 1)
    check_int("stride", stride, fn, 1)
    if ids.numel() < seq_len + 1:
        raise ValueError(f"{fn}: ids must hold at least seq_len + 1 = {seq_len + 1} tokens, got {ids.numel()}")
    windows = ids.unfold(0, seq_len + 1, stride)  # (n_windows, seq_len + 1)
    return windows[:, :-1].clone(), windows[:, 1:].clone()


def random_windows(
    ids: torch.Tensor, batch_size: int, seq_len: int, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch of random training windows from a token stream, for next-token prediction.

    ``ids`` has shape ``(seq,)``. Draws ``batch_size`` start positions uniformly from the ``seq - seq_len``
    valid ones, ``[0, seq - seq_len - 1]`` (the last window's target is the stream's last token), with
    ``generator`` and returns ``inputs`` ``(batch_size, seq_len)``,
    ``ids[s : s + seq_len]``, and ``targets`` ``(batch_size, seq_len)``, the same windows shifted by one
    token. Both stay on ``ids``' device.
    """
    fn = "random_windows"
    ids = check_int_tensor("ids", ids, fn, 1).long()
    check_int("batch_size", batch_size, fn, 1)
    check_int("seq_len", seq_len, fn, 1)
    if ids.numel() < seq_len + 1:
        raise ValueError(f"{fn}: ids must hold at least seq_len + 1 = {seq_len + 1} tokens, got {ids.numel()}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"{fn}: generator must be a torch.Generator or None, got {type(generator).__name__}")
    starts = torch.randint(ids.numel() - seq_len, (batch_size,), generator=generator).tolist()
    inputs = torch.stack([ids[s:s + seq_len] for s in starts])
    targets = torch.stack([ids[s + 1:s + seq_len + 1] for s in starts])
    return inputs, targets


def perplexity(mean_nll: float) -> float:
    """Perplexity ``exp(mean_nll)`` from a mean negative log-likelihood per token, in nats."""
    if isinstance(mean_nll, torch.Tensor):
        if mean_nll.numel() != 1:
            raise ValueError(f"perplexity: mean_nll must be a scalar, got shape {tuple(mean_nll.shape)}")
        mean_nll = mean_nll.item()
    if isinstance(mean_nll, bool) or not isinstance(mean_nll, (int, float)):
        raise TypeError(f"perplexity: mean_nll must be a float, got {type(mean_nll).__name__}")
    if math.isnan(mean_nll) or mean_nll < 0:
        raise ValueError(f"perplexity: mean_nll must be a non-negative number, got {mean_nll}")
    return math.exp(mean_nll) if mean_nll < 709.0 else math.inf  # exp overflows a float beyond ~709.78


def perplexity_from_logits(logits: torch.Tensor, targets: torch.Tensor) -> float:
    """``exp`` of the mean cross-entropy of ``logits`` ``(batch, vocab_size)`` against ``targets`` ``(batch,)``."""
    if not isinstance(logits, torch.Tensor) or not logits.is_floating_point():
        raise TypeError(f"perplexity_from_logits: logits must be a float tensor, got {type(logits).__name__}")
    targets = check_int_tensor("targets", targets, "perplexity_from_logits", 1).long()
    if logits.ndim != 2 or logits.shape[0] != targets.shape[0] or logits.shape[0] == 0:
        raise ValueError(
            "perplexity_from_logits: expected logits (batch, vocab_size) and targets (batch,) with batch > 0, "
            f"got {tuple(logits.shape)} and {tuple(targets.shape)}"
        )
    check_ids("targets", targets, "perplexity_from_logits", logits.shape[1])
    return math.exp(F.cross_entropy(logits, targets.to(logits.device)).item())


class NGramLM:
    """An n-gram model with add-k (Lidstone) smoothing over a vocabulary of ``vocab_size`` ids.

    The next-token probability given the previous ``n - 1`` ids is

        p(x | context) = (c(context, x) + k) / (c(context) + k * vocab_size),

    with counts ``c`` from :meth:`fit`. A context never seen in training gets the uniform
    distribution. ``k = 1`` is Laplace smoothing; ``k`` must be positive so that every
    probability is. Calling the model on contexts ``(batch, n - 1)`` returns log-probabilities
    ``(batch, vocab_size)`` in float64.
    """

    def __init__(self, n: int, k: float, vocab_size: int) -> None:
        self.n = check_int("n", n, "NGramLM", 1)
        self.vocab_size = check_int("vocab_size", vocab_size, "NGramLM", 1)
        self.k = k
        if vocab_size ** n >= 2**62:
            raise ValueError(f"NGramLM: vocab_size ** n = {vocab_size}**{n} is too large to index n-grams")
        self.context_size = n - 1
        self._pair_keys: torch.Tensor | None = None

    @property
    def k(self) -> float:
        """The add-k pseudo-count. Smoothing is applied when querying, so ``k`` may change after fitting."""
        return self._k

    @k.setter
    def k(self, value: float) -> None:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"NGramLM: k must be a number, got {type(value).__name__}")
        if not math.isfinite(value) or value <= 0:
            raise ValueError(f"NGramLM: k must be a positive finite number, got {value!r}")
        self._k = float(value)

    def __repr__(self) -> str:
        return f"NGramLM(n={self.n}, k={self.k:g}, vocab_size={self.vocab_size})"

    def _context_keys(self, contexts: torch.Tensor) -> torch.Tensor:
        weights = self.vocab_size ** torch.arange(self.context_size - 1, -1, -1, dtype=torch.long)
        return (contexts * weights).sum(dim=1)

    def _check_contexts(self, contexts: torch.Tensor, where: str) -> torch.Tensor:
        contexts = check_int_tensor("contexts", contexts, where, 2).long()
        if contexts.shape[1] != self.context_size:
            raise ValueError(
                f"{where}: contexts must have shape (batch, {self.context_size}) for n={self.n}, "
                f"got {tuple(contexts.shape)}"
            )
        check_ids("contexts", contexts, where, self.vocab_size)
        return contexts.cpu()

    def _require_fit(self, where: str) -> None:
        if self._pair_keys is None:
            raise RuntimeError(f"{where}: the model is not fitted yet; call fit(ids) first")

    def fit(self, ids: torch.Tensor, pad_id: int = CharVocab.bos_id) -> NGramLM:
        """Count the n-grams of a stream ``ids`` ``(seq,)``, its start padded with ``pad_id``; returns ``self``."""
        ids = check_int_tensor("ids", ids, "NGramLM.fit", 1).long()
        if ids.numel() == 0:
            raise ValueError("NGramLM.fit: ids is empty")
        check_ids("ids", ids, "NGramLM.fit", self.vocab_size)
        check_index("pad_id", pad_id, "NGramLM.fit", self.vocab_size)
        contexts, targets = make_windows(ids.cpu(), self.context_size, pad_id)
        context_keys = self._context_keys(contexts)
        # NumPy's unique (a sort and a diff) is much faster on the CPU than torch.unique.
        pair_keys, pair_counts = np.unique((context_keys * self.vocab_size + targets).numpy(), return_counts=True)
        seen, seen_counts = np.unique(context_keys.numpy(), return_counts=True)
        self._pair_keys, self._pair_counts = torch.from_numpy(pair_keys), torch.from_numpy(pair_counts)
        self._context_keys_seen, self._context_counts = torch.from_numpy(seen), torch.from_numpy(seen_counts)
        return self

    @staticmethod
    def _lookup(keys: torch.Tensor, counts: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
        """Counts of ``query`` keys in the sorted ``keys`` (0 where absent), float64, same shape as ``query``."""
        flat = query.reshape(-1).numpy()
        keys_np = keys.numpy()
        index = np.searchsorted(keys_np, flat).clip(max=keys_np.size - 1)
        found = keys_np[index] == flat
        result = torch.from_numpy(np.where(found, counts.numpy()[index], 0).astype(np.float64))
        return result.reshape(query.shape)

    def counts(self, contexts: torch.Tensor) -> torch.Tensor:
        """Training counts ``c(context, x)`` for every next id ``x``: shape ``(batch, vocab_size)``, float64."""
        self._require_fit("NGramLM.counts")
        contexts = self._check_contexts(contexts, "NGramLM.counts")
        query = self._context_keys(contexts).unsqueeze(1) * self.vocab_size + torch.arange(self.vocab_size)
        return self._lookup(self._pair_keys, self._pair_counts, query)

    def probs(self, contexts: torch.Tensor) -> torch.Tensor:
        """Smoothed next-token distributions, shape ``(batch, vocab_size)``, float64; each row sums to 1."""
        counts = self.counts(contexts)
        return (counts + self.k) / (counts.sum(dim=1, keepdim=True) + self.k * self.vocab_size)

    def log_probs(self, contexts: torch.Tensor) -> torch.Tensor:
        """``log p(x | context)`` for every ``x``, shape ``(batch, vocab_size)``, float64."""
        return self.probs(contexts).log()

    __call__ = log_probs

    def token_log_probs(self, ids: torch.Tensor, pad_id: int = CharVocab.bos_id) -> torch.Tensor:
        """``log p(ids[t] | previous n - 1 ids)`` for every position of a stream ``ids`` ``(seq,)``: ``(seq,)`` float64.

        The start is padded with ``pad_id``. Looks up only the observed (context, next token) and
        context counts, so it is fast on long streams.
        """
        self._require_fit("NGramLM.token_log_probs")
        ids = check_int_tensor("ids", ids, "NGramLM.token_log_probs", 1).long()
        if ids.numel() == 0:
            raise ValueError("NGramLM.token_log_probs: ids is empty")
        check_ids("ids", ids, "NGramLM.token_log_probs", self.vocab_size)
        check_index("pad_id", pad_id, "NGramLM.token_log_probs", self.vocab_size)
        contexts, targets = make_windows(ids.cpu(), self.context_size, pad_id)
        context_keys = self._context_keys(contexts)
        pair = self._lookup(self._pair_keys, self._pair_counts, context_keys * self.vocab_size + targets)
        total = self._lookup(self._context_keys_seen, self._context_counts, context_keys)
        return torch.log(pair + self.k) - torch.log(total + self.k * self.vocab_size)

    def nll(self, ids: torch.Tensor, pad_id: int = CharVocab.bos_id) -> float:
        """Mean negative log-likelihood (nats per token) of a stream ``ids`` ``(seq,)``: ``-mean(token_log_probs)``."""
        return -self.token_log_probs(ids, pad_id).mean().item()

    def perplexity(self, ids: torch.Tensor, pad_id: int = CharVocab.bos_id) -> float:
        """``exp(nll(ids))``."""
        return math.exp(self.nll(ids, pad_id))


class CharMLP(nn.Module):
    """A character-level MLP language model in the style of Bengio et al. (2003).

    Embed each of the ``context_size`` previous ids in ``d_embed`` dimensions, concatenate the
    embeddings, apply a tanh hidden layer of width ``d_hidden``, and map to ``vocab_size``
    next-token logits. Input ``(batch, context_size)`` int64, output ``(batch, vocab_size)``.
    """

    def __init__(self, vocab_size: int, context_size: int, d_embed: int, d_hidden: int) -> None:
        super().__init__()
        self.vocab_size = check_int("vocab_size", vocab_size, "CharMLP", 1)
        self.context_size = check_int("context_size", context_size, "CharMLP", 1)
        check_int("d_embed", d_embed, "CharMLP", 1)
        check_int("d_hidden", d_hidden, "CharMLP", 1)
        self.embed = nn.Embedding(vocab_size, d_embed)
        self.hidden = nn.Linear(context_size * d_embed, d_hidden)
        self.out = nn.Linear(d_hidden, vocab_size)

    def forward(self, contexts: torch.Tensor) -> torch.Tensor:
        contexts = check_ids("contexts", contexts, "CharMLP", self.vocab_size, 2).long()
        if contexts.shape[1] != self.context_size:
            raise ValueError(
                f"CharMLP: contexts must have shape (batch, {self.context_size}), got {tuple(contexts.shape)}"
            )
        x = self.embed(contexts).flatten(start_dim=1)  # (batch, context_size * d_embed)
        h = torch.tanh(self.hidden(x))  # (batch, d_hidden)
        return self.out(h)  # (batch, vocab_size)


def _model_device(model: object) -> torch.device:
    if isinstance(model, nn.Module):
        for p in model.parameters():
            return p.device
    return torch.device("cpu")


def _check_model(model: object, where: str) -> tuple[int, int]:
    sizes = getattr(model, "context_size", None), getattr(model, "vocab_size", None)
    if not callable(model) or any(isinstance(v, bool) or not isinstance(v, int) for v in sizes):
        raise TypeError(
            f"{where}: model must be callable on (batch, context_size) contexts and have int context_size and "
            f"vocab_size attributes, got {type(model).__name__}"
        )
    return sizes


@torch.no_grad()
def mean_nll(model: NGramLM | nn.Module, ids: torch.Tensor, *, pad_id: int = CharVocab.bos_id,
             batch_size: int = 8192) -> float:
    """Mean cross-entropy (nats per token) of ``model``'s logits on every token of ``ids`` ``(seq,)``.

    ``model(contexts)`` maps ``(batch, model.context_size)`` ids to ``(batch, vocab_size)``
    logits; contexts come from :func:`make_windows` and go to the model's device.
    """
    context_size, vocab_size = _check_model(model, "mean_nll")
    ids = check_int_tensor("ids", ids, "mean_nll", 1).long()
    if ids.numel() == 0:
        raise ValueError("mean_nll: ids is empty")
    check_ids("ids", ids, "mean_nll", vocab_size)
    check_index("pad_id", pad_id, "mean_nll", vocab_size)
    check_int("batch_size", batch_size, "mean_nll", 1)
    device = _model_device(model)
    was_training = getattr(model, "training", None)
    if was_training is not None:
        model.eval()
    contexts, targets = make_windows(ids.cpu(), context_size, pad_id)
    total = 0.0
    for start in range(0, ids.numel(), batch_size):
        logits = model(contexts[start:start + batch_size].to(device))
        y = targets[start:start + batch_size].to(logits.device)
        if not isinstance(logits, torch.Tensor) or logits.shape != (y.numel(), vocab_size):
            raise ValueError(f"mean_nll: model must return logits of shape ({y.numel()}, vocab_size={vocab_size}), "
                             f"got {getattr(logits, 'shape', type(logits).__name__)}")
        total += F.cross_entropy(logits.double(), y, reduction="sum").item()
    if was_training:
        model.train()
    return total / ids.numel()


@torch.no_grad()
def sample(model: NGramLM | nn.Module, prompt: torch.Tensor, length: int, *, generator: torch.Generator,
           temperature: float = 1.0, banned_ids: Sequence[int] = (), pad_id: int = CharVocab.bos_id) -> torch.Tensor:
    """Extend ``prompt`` ``(seq,)`` by ``length`` ids drawn one at a time from
    ``softmax(model(context) / temperature)``.

    The context is the last ``model.context_size`` ids (left-padded with ``pad_id``). Ids in
    ``banned_ids`` (say ``<bos>`` and ``<unk>``) are never drawn: their logits are set to
    ``-inf`` before the softmax. Draws use the CPU ``generator``, so a seeded generator gives the
    same text on every device. Returns ``(seq + length,)`` int64 ids on the CPU.
    """
    context_size, vocab_size = _check_model(model, "sample")
    prompt = check_ids("prompt", prompt, "sample", vocab_size, 1).long().cpu()
    check_index("pad_id", pad_id, "sample", vocab_size)
    check_int("length", length, "sample", 0)
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"sample: generator must be a torch.Generator, got {type(generator).__name__}")
    if generator.device.type != "cpu":  # the draws are made on the CPU, whatever the model's device
        raise ValueError(f"sample: generator must be a CPU torch.Generator, got one on {generator.device}")
    check_number("temperature", temperature, "sample", 0.0, low_open=True)  # inf would sample uniformly
    banned = list(check_instance("banned_ids", banned_ids, "sample", Sequence, "a sequence of ids"))
    if any(isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < vocab_size for i in banned):
        raise ValueError(f"sample: banned_ids must be ints in [0, {vocab_size}), got {banned!r}")
    if len(set(banned)) >= vocab_size:
        raise ValueError("sample: banned_ids bans every id of the vocabulary")
    device = _model_device(model)
    was_training = getattr(model, "training", None)
    if was_training is not None:
        model.eval()
    out = torch.cat([torch.full((context_size,), pad_id, dtype=torch.long), prompt])
    for _ in range(length):
        context = out[out.numel() - context_size:].unsqueeze(0)
        logits = model(context.to(device))
        if not isinstance(logits, torch.Tensor) or logits.shape != (1, vocab_size):  # else ids off the vocabulary
            raise ValueError(f"sample: model must return logits of shape (1, vocab_size={vocab_size}), "
                             f"got {getattr(logits, 'shape', type(logits).__name__)}")
        logits = logits[0].double().cpu()
        if not bool((logits < math.inf).all()):  # NaN or +inf: softmax would be NaN
            raise ValueError(f"sample: model returned NaN or +inf logits after {out.numel() - context_size} ids")
        logits[banned] = -math.inf
        if not bool((logits > -math.inf).any()):
            raise ValueError(f"sample: the model gives every id outside banned_ids zero probability after "
                             f"{out.numel() - context_size} ids")
        probs = torch.softmax(logits / temperature, dim=-1)
        out = torch.cat([out, torch.multinomial(probs, 1, generator=generator)])
    if was_training:
        model.train()
    return out[context_size:]
