"""A neural speech recogniser trained with connectionist temporal classification (CTC), chapter 15.

Chapter 15's template recogniser (:class:`mmbook.assistant.TemplateRecognizer`) can only hear whole
utterances it has a recording of. A CTC model instead emits, for every audio frame, a distribution over
the output symbols plus a *blank*, and is trained on (audio, label sequence) pairs without any alignment:

* :func:`ctc_loss` is the negative log-likelihood of the labels, summed over every alignment with the
  forward (alpha) recursion in log space; it equals ``torch.nn.functional.ctc_loss``;
* :func:`ctc_greedy_decode` (best path) and :func:`ctc_prefix_beam_search` (best labelling, approximately)
  turn frame distributions into label sequences;
* :func:`edit_distance` and :func:`error_rate` score them (word or digit error rate);
* :func:`digit_sequences` builds spoken digit strings from :func:`mmbook.data.spoken_digit_recordings`,
  split by voice; :func:`log_mel_features` turns them into normalised log-mel frames;
* :class:`CTCRecognizer` (a convolution that halves the frame rate, a bidirectional GRU and a linear
  layer) is the acoustic model and :func:`train_ctc_recognizer` trains it;
* :class:`CTCDigitsRecipe` (:data:`CHAPTER15_CTC_RECIPE`) is chapter 15's recipe, and
  :func:`pretrained_ctc_recognizer` trains it once and loads it from the cache afterwards.

Shapes are batch first: ``log_probs`` ``(batch, T, V)`` with ``T`` frames and ``V`` symbols, the blank
included (``torch.nn.functional.ctc_loss`` takes ``(T, batch, V)``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mmbook.audio import log_mel_spectrogram
from mmbook.checks import (
    check_bool,
    check_choice,
    check_device,
    check_float_tensor,
    check_ids,
    check_instance,
    check_int,
    check_int_tensor,
    check_number,
    positive_int,
)
from mmbook.core import numpy_rng, torch_generator

__all__ = [
    "CHAPTER15_CTC_RECIPE",
    "CTCDigitsRecipe",
    "CTCRecognizer",
    "ctc_greedy_decode",
    "ctc_loss",
    "ctc_prefix_beam_search",
    "digit_sequences",
    "edit_distance",
    "error_rate",
    "log_mel_features",
    "pretrained_ctc_recognizer",
    "train_ctc_recognizer",
]

# A finite stand-in for log 0: log-sum-exp over -inf entries has NaN gradients, over -1e30 it has zeros.
_LOG_ZERO = -1e30


def _check_lengths(name: str, lengths: Any, fn: str, batch: int, low: int, high: int) -> torch.Tensor:
    lengths = check_int_tensor(name, lengths, fn, 1, "(batch,)")
    if lengths.shape[0] != batch:
        raise ValueError(f"{fn}: {name} must have shape ({batch},), one length per example, got {tuple(lengths.shape)}")
    if lengths.numel() and (int(lengths.min()) < low or int(lengths.max()) > high):
        raise ValueError(f"{fn}: {name} must lie in [{low}, {high}], got values in "
                         f"[{int(lengths.min())}, {int(lengths.max())}]")
    return lengths.long()


def _check_log_probs(log_probs: Any, fn: str, ndim: int = 3) -> torch.Tensor:
    shape = "(batch, T, V)" if ndim == 3 else "(T, V)"
    log_probs = check_float_tensor("log_probs", log_probs, fn, ndim, shape, nonempty=True)
    if log_probs.shape[-1] < 2:
        raise ValueError(f"{fn}: log_probs must have at least 2 symbols (the blank and one label) in its last "
                         f"dimension, got shape {tuple(log_probs.shape)}")
    if torch.isnan(log_probs).any():
        raise ValueError(f"{fn}: log_probs contains NaN values")
    return log_probs


def ctc_loss(log_probs: torch.Tensor, targets: torch.Tensor, input_lengths: torch.Tensor,
             target_lengths: torch.Tensor, blank: int = 0, reduction: str = "mean",
             zero_infinity: bool = False) -> torch.Tensor:
    r"""CTC loss by the forward recursion in log space; equals ``torch.nn.functional.ctc_loss``.

    ``log_probs`` ``(batch, T, V)``: log-softmax outputs (``V`` symbols including ``blank``);
    ``targets`` ``(batch, U_max)`` integer labels, padded after ``target_lengths[b]``;
    ``input_lengths`` ``(batch,)`` in ``[1, T]``, ``target_lengths`` ``(batch,)`` in ``[0, U_max]``.

    With the extended label :math:`\mathbf{y}' = (\varnothing, y_1, \varnothing, y_2, \ldots, y_U,
    \varnothing)` of length :math:`2U + 1`, :math:`\alpha_t(s)` is the log-probability of all alignments of
    the first :math:`t + 1` frames that end in :math:`y'_s`:
    :math:`\alpha_t(s) = \log p_t(y'_s) + \operatorname{logsumexp}(\alpha_{t-1}(s), \alpha_{t-1}(s-1),
    \alpha_{t-1}(s-2))`, the last term only when :math:`y'_s` is a label different from :math:`y'_{s-2}`.
    The loss of an example is :math:`-\operatorname{logsumexp}(\alpha_{T-1}(2U), \alpha_{T-1}(2U-1))`.

    ``reduction``: ``"none"`` gives ``(batch,)``; ``"sum"`` their sum; ``"mean"`` (as PyTorch) the mean
    over the batch of each loss divided by its target length (at least 1). An impossible alignment (too few
    frames for the labels and their repeats) has loss ``inf``, or 0 with ``zero_infinity=True``.
    """
    fn = "ctc_loss"
    log_probs = _check_log_probs(log_probs, fn)
    batch, num_frames, num_symbols = log_probs.shape
    blank = check_int("blank", blank, fn, 0, num_symbols - 1)
    targets = check_int_tensor("targets", targets, fn, 2, "(batch, U_max)")
    if targets.shape[0] != batch:
        raise ValueError(f"{fn}: targets must have shape ({batch}, U_max), one row per example of log_probs, got "
                         f"{tuple(targets.shape)}")
    input_lengths = _check_lengths("input_lengths", input_lengths, fn, batch, 1, num_frames)
    target_lengths = _check_lengths("target_lengths", target_lengths, fn, batch, 0, targets.shape[1])
    reduction = check_choice("reduction", reduction, fn, ("none", "mean", "sum"))
    zero_infinity = check_bool("zero_infinity", zero_infinity, fn)
    max_labels = targets.shape[1]
    positions = torch.arange(max_labels, device=targets.device)
    valid = positions[None] < target_lengths[:, None].to(targets.device)  # (batch, U_max)
    labels = targets.long().masked_fill(~valid, blank if max_labels else 0)
    if valid.any():
        check_ids("targets", labels[valid], fn, num_symbols)
        if bool((labels[valid] == blank).any()):
            raise ValueError(f"{fn}: targets must not contain the blank symbol {blank} within target_lengths")

    device = log_probs.device
    labels = labels.to(device)
    num_states = 2 * max_labels + 1
    extended = torch.full((batch, num_states), blank, dtype=torch.long, device=device)
    extended[:, 1::2] = labels  # (batch, 2 U_max + 1): blank, y_1, blank, y_2, ..., blank
    # A skip from s - 2 to s is allowed into a label that differs from the label two states back.
    skip = torch.zeros(batch, num_states, dtype=torch.bool, device=device)
    if max_labels > 1:
        skip[:, 3::2] = labels[:, 1:] != labels[:, :-1]
    emit = log_probs.gather(2, extended[:, None, :].expand(batch, num_frames, num_states))  # (batch, T, S)
    neg = torch.full((batch, 1), _LOG_ZERO, dtype=log_probs.dtype, device=device)
    # alpha before the first frame: all mass on a virtual state before s = 0, so that frame 0 may start in
    # state 0 (a blank) or state 1 (the first label) and nowhere else.
    alpha = torch.full((batch, num_states), _LOG_ZERO, dtype=log_probs.dtype, device=device)
    start = alpha.clone()
    start[:, 0] = 0.0
    lengths = input_lengths.to(device)
    for t in range(num_frames):
        previous = start if t == 0 else alpha
        stay = previous
        step = torch.cat([neg, previous[:, :-1]], dim=1)
        jump = torch.cat([neg, neg, previous[:, :-2]], dim=1).masked_fill(~skip, _LOG_ZERO)
        new = torch.logsumexp(torch.stack([stay, step, jump]), dim=0) + emit[:, t]
        new = new.clamp_min(_LOG_ZERO)  # unreachable states stay at "log 0" instead of drifting below it
        alpha = new if t == 0 else torch.where((t < lengths)[:, None], new, alpha)
    last = (2 * target_lengths).to(device)  # index of the final blank
    end_blank = alpha.gather(1, last[:, None])[:, 0]
    end_label = alpha.gather(1, (last - 1).clamp_min(0)[:, None])[:, 0]
    end_label = torch.where(last > 0, end_label, torch.full_like(end_label, _LOG_ZERO))
    log_likelihood = torch.logsumexp(torch.stack([end_blank, end_label]), dim=0)
    impossible = log_likelihood < _LOG_ZERO / 2
    fill = 0.0 if zero_infinity else math.inf
    losses = torch.where(impossible, torch.full_like(log_likelihood, fill), -log_likelihood)
    if reduction == "none":
        return losses
    if reduction == "sum":
        return losses.sum()
    return (losses / target_lengths.to(device).clamp_min(1).to(losses.dtype)).mean()


def ctc_greedy_decode(log_probs: torch.Tensor, input_lengths: torch.Tensor | None = None,
                      blank: int = 0) -> list[list[int]]:
    """Best-path decoding: the most likely symbol of every frame, repeats merged, blanks removed.

    ``log_probs`` ``(batch, T, V)`` (log-probabilities or any scores: only the argmax matters);
    ``input_lengths`` ``(batch,)`` in ``[1, T]`` (default: all ``T``). Returns one list of label ids per
    example. This is the labelling of the single most likely *alignment*, which need not be the most likely
    labelling (:func:`ctc_prefix_beam_search` sums over alignments).
    """
    fn = "ctc_greedy_decode"
    log_probs = _check_log_probs(log_probs, fn)
    batch, num_frames, num_symbols = log_probs.shape
    blank = check_int("blank", blank, fn, 0, num_symbols - 1)
    if input_lengths is None:
        input_lengths = torch.full((batch,), num_frames, dtype=torch.long)
    input_lengths = _check_lengths("input_lengths", input_lengths, fn, batch, 1, num_frames)
    best = log_probs.argmax(dim=-1).cpu()
    out = []
    for row, length in zip(best, input_lengths.tolist(), strict=True):
        path = row[:length].tolist()
        out.append([s for i, s in enumerate(path) if s != blank and (i == 0 or s != path[i - 1])])
    return out


def _logaddexp(a: float, b: float) -> float:
    if a == -math.inf:
        return b
    if b == -math.inf:
        return a
    return max(a, b) + math.log1p(math.exp(-abs(a - b)))


def _add_to_beam(beams: dict[tuple[int, ...], list[float]], prefix: tuple[int, ...], b: float, nb: float) -> None:
    """Add log-probabilities ``b`` (ending in a blank) and ``nb`` (ending in the last label) to ``prefix``."""
    if b == -math.inf and nb == -math.inf:  # no alignment reaches this prefix (a repeat without a blank between)
        return
    entry = beams.setdefault(prefix, [-math.inf, -math.inf])
    entry[0], entry[1] = _logaddexp(entry[0], b), _logaddexp(entry[1], nb)


def ctc_prefix_beam_search(log_probs: torch.Tensor, beam_width: int = 8,
                           blank: int = 0) -> list[tuple[tuple[int, ...], float]]:
    r"""Prefix beam search for one utterance: ``log_probs`` ``(T, V)`` -> the ``beam_width`` best labellings.

    Every prefix :math:`\ell` keeps two log-probabilities after frame :math:`t`: of the alignments of frames
    :math:`0..t` that collapse to :math:`\ell` and end in a blank (:math:`p_b`) or in :math:`\ell`'s last label
    (:math:`p_{nb}`). A frame extends a prefix by a blank or its last label (same prefix) or by a new label
    :math:`c` (prefix :math:`\ell c`; when :math:`c` repeats the last label only alignments ending in a blank
    may extend it). After each frame the ``beam_width`` prefixes with the largest :math:`p_b + p_{nb}` are kept.
    Returns ``(labels, log_probability)`` pairs, best first; with a beam wider than the number of distinct
    prefixes nothing is pruned and each log-probability is exactly that of the labelling, ``-ctc_loss``.
    Ties are broken by the labels, so the result does not depend on dict order.
    """
    fn = "ctc_prefix_beam_search"
    log_probs = _check_log_probs(log_probs, fn, ndim=2)
    num_frames, num_symbols = log_probs.shape
    blank = check_int("blank", blank, fn, 0, num_symbols - 1)
    beam_width = positive_int("beam_width", beam_width, fn)
    table = log_probs.detach().double().cpu().tolist()
    neg = -math.inf
    beams: dict[tuple[int, ...], tuple[float, float]] = {(): (0.0, neg)}  # prefix -> (log p_b, log p_nb)
    for frame in table:
        nxt: dict[tuple[int, ...], list[float]] = {}
        for prefix, (p_b, p_nb) in beams.items():
            total = _logaddexp(p_b, p_nb)
            _add_to_beam(nxt, prefix, total + frame[blank], neg)  # a blank: same prefix, now ending in a blank
            for c in range(num_symbols):
                if c == blank:
                    continue
                if prefix and c == prefix[-1]:
                    _add_to_beam(nxt, prefix, neg, p_nb + frame[c])  # the last label repeated: merged into it
                    _add_to_beam(nxt, prefix + (c,), neg, p_b + frame[c])  # after a blank: a new, repeated label
                else:
                    _add_to_beam(nxt, prefix + (c,), neg, total + frame[c])
        ranked = sorted(nxt.items(), key=lambda kv: (-_logaddexp(*kv[1]), kv[0]))
        beams = {prefix: (b, nb) for prefix, (b, nb) in ranked[:beam_width]}
    result = [(prefix, _logaddexp(b, nb)) for prefix, (b, nb) in beams.items()]
    return sorted(result, key=lambda kv: (-kv[1], kv[0]))


def _as_sequence(name: str, value: Any, fn: str) -> list:
    if isinstance(value, (str, bytes)) or not isinstance(value, (Sequence, torch.Tensor, np.ndarray)):
        raise TypeError(f"{fn}: {name} must be a sequence of symbols (a list of words or label ids), got "
                        f"{type(value).__name__}")
    return value.tolist() if isinstance(value, (torch.Tensor, np.ndarray)) else list(value)


def edit_distance(reference: Sequence[Any], hypothesis: Sequence[Any]) -> int:
    """Levenshtein distance between two symbol sequences: the fewest substitutions, deletions and insertions
    that turn ``reference`` into ``hypothesis`` (dynamic programme over a ``(len(ref)+1, len(hyp)+1)`` table).
    Sequences of words, label ids or characters are all fine; a plain string counts as a type error (split it
    into the symbols you mean)."""
    fn = "edit_distance"
    ref, hyp = _as_sequence("reference", reference, fn), _as_sequence("hypothesis", hypothesis, fn)
    row = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, start=1):
        diagonal, row[0] = row[0], i
        for j, h in enumerate(hyp, start=1):
            diagonal, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, diagonal + (r != h))
    return row[-1]


def error_rate(references: Sequence[Sequence[Any]], hypotheses: Sequence[Sequence[Any]]) -> float:
    """Word (or digit, character) error rate: total :func:`edit_distance` over total reference length.

    ``references`` and ``hypotheses``: equally long lists of symbol sequences. Can exceed 1 (insertions).
    """
    fn = "error_rate"
    for name, value in (("references", references), ("hypotheses", hypotheses)):
        if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
            raise TypeError(f"{fn}: {name} must be a list of symbol sequences, got {type(value).__name__}")
    if len(references) != len(hypotheses):
        raise ValueError(f"{fn}: references and hypotheses must have the same length, got {len(references)} and "
                         f"{len(hypotheses)}")
    total = sum(len(_as_sequence(f"references[{i}]", r, fn)) for i, r in enumerate(references))
    if total == 0:
        raise ValueError(f"{fn}: references must hold at least one symbol in all (the rate divides by their length)")
    return sum(edit_distance(r, h) for r, h in zip(references, hypotheses, strict=True)) / total


def digit_sequences(count: int, voices: Sequence[str], min_digits: int = 1, max_digits: int = 4,
                    gap_seconds: tuple[float, float] = (0.05, 0.2), seed: int = 0,
                    recordings: dict[str, Any] | None = None) -> dict[str, Any]:
    """``count`` spoken digit strings, each said by one voice of ``voices``, built from
    :func:`mmbook.data.spoken_digit_recordings` (default arguments, or the ``recordings`` it returned).

    For each string (seeded): a voice, a length in ``[min_digits, max_digits]``, digits drawn uniformly, for
    each digit one recording of it in that voice (silence trimmed), joined by silences drawn from
    ``gap_seconds``. Returns a dict: ``waveforms`` (list of ``(num_samples,)`` float32), ``digits`` (list of
    int lists), ``segments`` (list of ``(start, end)`` sample ranges of the digits: the true word
    boundaries), ``voices`` (list of str) and ``sample_rate``. Split train and test by passing disjoint
    voice lists: no voice is then heard in both.
    """
    fn = "digit_sequences"
    count = positive_int("count", count, fn)
    min_digits = check_int("min_digits", min_digits, fn, 1, 20)
    max_digits = check_int("max_digits", max_digits, fn, min_digits, 20)
    seed = check_int("seed", seed, fn, 0)
    if not isinstance(gap_seconds, (tuple, list)) or len(gap_seconds) != 2:
        raise TypeError(f"{fn}: gap_seconds must be a (low, high) pair of numbers, got {gap_seconds!r}")
    low_gap = check_number("gap_seconds[0]", gap_seconds[0], fn, 0.0, 2.0)
    high_gap = check_number("gap_seconds[1]", gap_seconds[1], fn, low_gap, 2.0)
    if recordings is None:
        from mmbook.data import spoken_digit_recordings

        recordings = spoken_digit_recordings()
    check_instance("recordings", recordings, fn, dict, "the dict spoken_digit_recordings returns")
    if not {"waveforms", "labels", "voices", "sample_rate"} <= set(recordings):
        raise ValueError(f"{fn}: recordings must hold 'waveforms', 'labels', 'voices' and 'sample_rate' (what "
                         f"spoken_digit_recordings returns), got keys {sorted(recordings)}")
    if isinstance(voices, str) or not isinstance(voices, Sequence) or not voices:
        raise TypeError(f"{fn}: voices must be a non-empty list of voice names such as ['m1', 'f2'], got {voices!r}")
    rec_voices = list(recordings["voices"])
    labels = recordings["labels"].tolist()
    pools: dict[tuple[str, int], list[int]] = {}
    for i, (v, d) in enumerate(zip(rec_voices, labels, strict=True)):
        pools.setdefault((v, d), []).append(i)
    for v in voices:
        missing = [d for d in range(10) if (v, d) not in pools]
        if missing:
            raise ValueError(f"{fn}: voices must each have recordings of all ten digits; {v!r} has none of "
                             f"{missing}")
    sample_rate = int(recordings["sample_rate"])
    rng = numpy_rng(seed)
    trimmed: dict[int, torch.Tensor] = {}
    waves, digits, segments, who = [], [], [], []
    for _ in range(count):
        voice = voices[int(rng.integers(len(voices)))]
        n = int(rng.integers(min_digits, max_digits + 1))
        string = [int(d) for d in rng.integers(0, 10, size=n)]
        parts, bounds, position = [], [], 0
        for k, d in enumerate(string):
            pool = pools[(voice, d)]
            index = pool[int(rng.integers(len(pool)))]
            if index not in trimmed:
                w = recordings["waveforms"][index]
                loud = (w.abs() > 1e-3).nonzero().flatten()
                trimmed[index] = w[loud[0]: loud[-1] + 1] if loud.numel() else w
            gap = int(round(rng.uniform(low_gap, high_gap) * sample_rate))
            if k == 0:
                gap = int(round(high_gap * sample_rate))  # the same lead-in silence for every string
            parts += [torch.zeros(gap), trimmed[index]]
            position += gap
            bounds.append((position, position + trimmed[index].numel()))
            position += trimmed[index].numel()
        parts.append(torch.zeros(int(round(high_gap * sample_rate))))
        waves.append(torch.cat(parts).float())
        digits.append(string)
        segments.append(bounds)
        who.append(voice)
    return {"waveforms": waves, "digits": digits, "segments": segments, "voices": who, "sample_rate": sample_rate}


def log_mel_features(waveforms: Sequence[torch.Tensor], sample_rate: int = 16000,
                     n_mels: int = 40) -> tuple[torch.Tensor, torch.Tensor]:
    """Padded, normalised log-mel frames of a list of waveforms: ``(features, lengths)``.

    Each waveform ``(num_samples,)`` gives :func:`mmbook.audio.log_mel_spectrogram` (25 ms windows every 10 ms,
    ``n_mels`` bands, ``1 + num_samples // 160`` frames), standardised per band over that utterance (mean 0,
    variance 1: removes a voice's fixed colouring and the level). ``features`` ``(batch, n_mels, T_max)``
    zero-padded, ``lengths`` ``(batch,)`` int64 frame counts.
    """
    fn = "log_mel_features"
    if isinstance(waveforms, torch.Tensor) or not isinstance(waveforms, Sequence) or not waveforms:
        raise TypeError(f"{fn}: waveforms must be a non-empty list of 1-D tensors, got {type(waveforms).__name__}")
    for i, w in enumerate(waveforms):
        check_float_tensor(f"waveforms[{i}]", w, fn, 1, "(num_samples,)", finite=True)
        if w.numel() < 400:
            raise ValueError(f"{fn}: waveforms[{i}] must have at least 400 samples (one 25 ms window), got "
                             f"{w.numel()}")
    sample_rate = check_int("sample_rate", sample_rate, fn, 4000, 48000)
    n_mels = check_int("n_mels", n_mels, fn, 1, 128)
    feats = []
    for w in waveforms:
        m = log_mel_spectrogram(w.float().cpu(), sample_rate=sample_rate, n_mels=n_mels)  # (n_mels, frames)
        feats.append((m - m.mean(dim=1, keepdim=True)) / (m.std(dim=1, keepdim=True) + 1e-5))
    lengths = torch.tensor([f.shape[1] for f in feats])
    out = torch.zeros(len(feats), n_mels, int(lengths.max()))
    for i, f in enumerate(feats):
        out[i, :, : f.shape[1]] = f
    return out, lengths


def _frame_mask(lengths: torch.Tensor, frames: int) -> torch.Tensor:
    """``(batch, frames)`` float mask: 1 for the frames before each example's length, 0 after."""
    return (torch.arange(frames, device=lengths.device)[None] < lengths[:, None]).float()


class CTCRecognizer(nn.Module):
    """Acoustic model for CTC: log-mel frames in, per-frame log-probabilities over ``num_symbols`` out.

    two ``Conv1d(., channels, 5, stride 2)``, each followed by a LayerNorm over the channels of every frame and
    a GELU (a quarter of the frame rate: 40 ms per output frame), a bidirectional ``GRU`` of width ``hidden`` per
    direction,
    and a linear layer to ``num_symbols`` (symbol 0 is the blank). ``forward(features (batch, n_mels, T),
    lengths (batch,))`` returns ``(log_probs (batch, T_out, num_symbols), out_lengths (batch,))`` with
    ``T_out = (T - 1) // 2 + 1``; padded frames do not reach the GRU's valid outputs (packed sequences).
    """

    def __init__(self, num_symbols: int = 11, n_mels: int = 40, channels: int = 64, hidden: int = 64) -> None:
        super().__init__()
        fn = "CTCRecognizer"
        self.num_symbols = check_int("num_symbols", num_symbols, fn, 2)
        self.n_mels = positive_int("n_mels", n_mels, fn)
        channels, hidden = positive_int("channels", channels, fn), positive_int("hidden", hidden, fn)
        self.conv1 = nn.Conv1d(n_mels, channels, kernel_size=5, stride=2, padding=2)
        self.conv2 = nn.Conv1d(channels, channels, kernel_size=5, stride=2, padding=2)
        self.norm1, self.norm2 = nn.LayerNorm(channels), nn.LayerNorm(channels)  # per frame, over the channels
        self.gru = nn.GRU(channels, hidden, batch_first=True, bidirectional=True)
        self.head = nn.Linear(2 * hidden, num_symbols)

    def output_lengths(self, lengths: torch.Tensor) -> torch.Tensor:
        """Frames after the two stride-2 convolutions: ``(T_mid - 1) // 2 + 1`` with ``T_mid = (T - 1) // 2 + 1``."""
        half = torch.div(lengths - 1, 2, rounding_mode="floor") + 1
        return torch.div(half - 1, 2, rounding_mode="floor") + 1

    def forward(self, features: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        fn = "CTCRecognizer"
        features = check_float_tensor("features", features, fn, 3, "(batch, n_mels, T)")
        if features.shape[1] != self.n_mels:
            raise ValueError(f"{fn}: features must have {self.n_mels} mel bands in dimension 1, got shape "
                             f"{tuple(features.shape)}")
        lengths = _check_lengths("lengths", lengths, fn, features.shape[0], 1, features.shape[2]).to(features.device)
        # Frames past an example's length are zeroed before each convolution, so that its outputs do not depend
        # on the padding (a convolution near the end would otherwise read it).
        x = features * _frame_mask(lengths, features.shape[2])[:, None, :]
        half = torch.div(lengths - 1, 2, rounding_mode="floor") + 1
        h = F.gelu(self.norm1(self.conv1(x).transpose(1, 2))).transpose(1, 2)
        h = h * _frame_mask(half, h.shape[2])[:, None, :]
        h = F.gelu(self.norm2(self.conv2(h).transpose(1, 2)))  # (batch, T_out, channels)
        out_lengths = self.output_lengths(lengths)
        packed = nn.utils.rnn.pack_padded_sequence(h, out_lengths.cpu(), batch_first=True, enforce_sorted=False)
        h, _ = self.gru(packed)
        total = int(self.output_lengths(torch.tensor(features.shape[2])))
        h, _ = nn.utils.rnn.pad_packed_sequence(h, batch_first=True, total_length=total)
        return self.head(h).log_softmax(dim=-1), out_lengths


def train_ctc_recognizer(model: CTCRecognizer, features: torch.Tensor, lengths: torch.Tensor,
                         targets: torch.Tensor, target_lengths: torch.Tensor, epochs: int = 20,
                         batch_size: int = 32, lr: float = 3e-3, seed: int = 0,
                         loss_fn: str = "ours") -> dict[str, Any]:
    """Train ``model`` with AdamW (gradient clipping at 1, a cosine learning-rate decay) on CTC.

    ``features`` ``(N, n_mels, T)`` and ``lengths`` ``(N,)`` from :func:`log_mel_features`; ``targets``
    ``(N, U_max)`` label ids (1..V-1, blank 0) with ``target_lengths`` ``(N,)``. Minibatches are drawn in a
    seeded order. ``loss_fn``: ``"ours"`` (:func:`ctc_loss`) or ``"torch"`` (``F.ctc_loss``, faster; equal in
    value). Returns ``{"loss": [mean loss per epoch]}``.
    """
    fn = "train_ctc_recognizer"
    check_instance("model", model, fn, CTCRecognizer, "a CTCRecognizer")
    features = check_float_tensor("features", features, fn, 3, "(N, n_mels, T)", finite=True)
    n = features.shape[0]
    lengths = _check_lengths("lengths", lengths, fn, n, 1, features.shape[2])
    targets = check_ids("targets", targets, fn, model.num_symbols, 2, "(N, U_max)")
    target_lengths = _check_lengths("target_lengths", target_lengths, fn, n, 1, targets.shape[1])
    if targets.shape[0] != n:
        raise ValueError(f"{fn}: targets must have {n} rows, one per example of features, got {tuple(targets.shape)}")
    epochs, batch_size = positive_int("epochs", epochs, fn), positive_int("batch_size", batch_size, fn)
    lr = check_number("lr", lr, fn, 0.0, 1.0, low_open=True)
    seed = check_int("seed", seed, fn, 0)
    loss_fn = check_choice("loss_fn", loss_fn, fn, ("ours", "torch"))
    device = next(model.parameters()).device
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-2)
    steps = epochs * math.ceil(n / batch_size)
    schedule = torch.optim.lr_scheduler.LambdaLR(  # cosine decay to 5% of lr
        optimizer, lambda s: 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * s / steps)))
    gen = torch_generator(seed)
    history = []
    model.train()
    for _ in range(epochs):
        order = torch.randperm(n, generator=gen)
        total = 0.0
        for start in range(0, n, batch_size):
            idx = order[start: start + batch_size]
            frames = int(lengths[idx].max())
            x, x_len = features[idx, :, :frames].to(device), lengths[idx].to(device)
            y, y_len = targets[idx].to(device), target_lengths[idx].to(device)
            log_probs, out_len = model(x, x_len)
            if loss_fn == "ours":
                loss = ctc_loss(log_probs, y, out_len, y_len)
            else:
                loss = F.ctc_loss(log_probs.transpose(0, 1), y, out_len, y_len)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            total += float(loss.detach()) * len(idx)
        history.append(total / n)
    model.eval()
    return {"loss": history}


# ----------------------------------------------------------------------------- chapter 15's trained recogniser
@dataclass(frozen=True)
class CTCDigitsRecipe:
    """Chapter 15's recipe for its digit-string recogniser.

    The data: ``strings`` training strings of 1 to ``max_digits`` digits (:func:`digit_sequences`, ``data_seed``)
    from every voice of :data:`mmbook.speech.VOICE_VARIANTS` except ``held_out``; the model: a
    :class:`CTCRecognizer` with ``channels`` and ``hidden`` over 40 log-mel bands and 11 symbols (blank + ten
    digits); the training: :func:`train_ctc_recognizer` with ``epochs``, ``batch_size``, ``lr`` and the seed
    ``seed`` (also the seed set before the weights are drawn), PyTorch's ``F.ctc_loss``.
    """

    strings: int = 600
    max_digits: int = 3
    held_out: tuple[str, ...] = ("m4", "f4", "klatt2", "croak")
    epochs: int = 16
    batch_size: int = 16
    lr: float = 0.005
    channels: int = 48
    hidden: int = 48
    data_seed: int = 151
    seed: int = 15

    def as_key(self) -> dict[str, Any]:
        """The cache key (JSON values). Its fields and values are the ones chapter 15 has always used
        (``version`` 3), so weights cached before this recipe object existed are found again."""
        return {"chapter": 15, "what": "ctc_digits", "version": 3, "strings": self.strings,
                "max_digits": self.max_digits, "held_out": list(self.held_out), "epochs": self.epochs,
                "batch": self.batch_size, "lr": self.lr, "channels": self.channels, "hidden": self.hidden,
                "data_seed": self.data_seed, **({} if self.seed == 15 else {"seed": self.seed})}

    def train_voices(self) -> list[str]:
        """The voices of the training strings: all of :data:`mmbook.speech.VOICE_VARIANTS` but ``held_out``."""
        from mmbook.speech import VOICE_VARIANTS

        return [v for v in VOICE_VARIANTS if v not in self.held_out]

    def training_data(self, recordings: dict[str, Any] | None = None) -> dict[str, Any]:
        """The training strings and their CTC inputs: ``strings`` (from :func:`digit_sequences`), ``features``
        ``(strings, 40, T)`` and ``lengths`` ``(strings,)`` (:func:`log_mel_features`), ``targets``
        ``(strings, max_digits)`` (digit ``d`` is label ``d + 1``, 0 pads) and ``target_lengths`` ``(strings,)``.
        ``recordings``: :func:`mmbook.data.spoken_digit_recordings`' result, loaded if ``None``."""
        from mmbook.data import spoken_digit_recordings

        recordings = spoken_digit_recordings() if recordings is None else recordings
        strings = digit_sequences(self.strings, self.train_voices(), 1, self.max_digits, seed=self.data_seed,
                                  recordings=recordings)
        features, lengths = log_mel_features(strings["waveforms"])
        targets = torch.zeros(len(strings["digits"]), self.max_digits, dtype=torch.long)
        for row, digits in enumerate(strings["digits"]):
            targets[row, :len(digits)] = torch.tensor(digits) + 1
        target_lengths = torch.tensor([len(d) for d in strings["digits"]])
        return {"strings": strings, "features": features, "lengths": lengths, "targets": targets,
                "target_lengths": target_lengths}

    def __post_init__(self) -> None:
        fn = "CTCDigitsRecipe"
        for name in ("strings", "max_digits", "epochs", "batch_size", "channels", "hidden"):
            positive_int(name, getattr(self, name), fn)
        check_int("data_seed", self.data_seed, fn, 0)
        check_int("seed", self.seed, fn, 0)
        check_number("lr", self.lr, fn, 0.0, 1.0, low_open=True)
        if (not isinstance(self.held_out, tuple) or not self.held_out
                or not all(isinstance(v, str) for v in self.held_out)):
            raise TypeError(f"{fn}: held_out must be a non-empty tuple of voice names, got {self.held_out!r}")


CHAPTER15_CTC_RECIPE = CTCDigitsRecipe()


def pretrained_ctc_recognizer(device: torch.device | str | None = None, recipe: CTCDigitsRecipe | None = None, *,
                              recordings: dict[str, Any] | None = None
                              ) -> tuple[CTCRecognizer, dict[str, Any], bool]:
    """Chapter 15's trained digit-string recogniser, in eval mode on ``device`` (default: :func:`get_device`).

    Trained with ``recipe`` (default :data:`CHAPTER15_CTC_RECIPE`) on the first call and cached
    (:func:`mmbook.cache.cached_training`: a validated file keyed by ``recipe.as_key()``, the seed shift and the
    device type); later calls load it. The training data is built only when the model is trained
    (``recordings``: :func:`mmbook.data.spoken_digit_recordings`' result, to save loading it again). Returns
    ``(model, record, loaded)``: ``record["loss"]`` holds the mean CTC loss of each epoch, ``loaded`` says
    whether the weights came from the cache.
    """
    from mmbook.cache import cached_training
    from mmbook.core import get_device, set_seed

    fn = "pretrained_ctc_recognizer"
    device = check_device("device", device, fn) if device is not None else get_device()
    recipe = CHAPTER15_CTC_RECIPE if recipe is None else check_instance("recipe", recipe, fn, CTCDigitsRecipe,
                                                                         "a CTCDigitsRecipe")
    if recordings is not None and not isinstance(recordings, dict):
        raise TypeError(f"{fn}: recordings must be the dict of mmbook.data.spoken_digit_recordings, got "
                        f"{type(recordings).__name__}")

    def train(model: CTCRecognizer) -> dict[str, Any]:
        data = recipe.training_data(recordings)
        return train_ctc_recognizer(model, data["features"], data["lengths"], data["targets"],
                                    data["target_lengths"], epochs=recipe.epochs, batch_size=recipe.batch_size,
                                    lr=recipe.lr, seed=recipe.seed, loss_fn="torch")

    set_seed(recipe.seed)
    model = CTCRecognizer(num_symbols=11, n_mels=40, channels=recipe.channels, hidden=recipe.hidden).to(device)
    record, loaded = cached_training("ch15_ctc", recipe.as_key(), model, train, fn=fn)
    return model.eval(), record, loaded
