"""Evaluation from scratch: the confusion matrix, precision/recall/F1, reports and data splits.

Labels are 1-D integer arrays (``torch.Tensor``, ``numpy.ndarray`` or lists) with values in
``0 .. num_classes - 1``. Every class in that range is counted, whether or not it occurs, so
results equal ``sklearn.metrics`` called with ``labels=range(num_classes)``. Metrics are computed
on the CPU in float64; tensors on a GPU are copied over.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np
import torch

from mmbook.checks import check_bool, check_int
from mmbook.core import torch_generator

__all__ = [
    "PrecisionRecallF1",
    "brevity_penalty",
    "classification_report",
    "closest_reference_length",
    "confusion_matrix",
    "corpus_bleu",
    "exact_match",
    "kfold_indices",
    "modified_precision",
    "precision_recall_f1",
    "precision_recall_f1_from_confusion",
    "sentence_bleu",
    "split_indices",
]

_AVERAGES = (None, "micro", "macro", "weighted")


def _as_labels(fn: str, name: str, y: Any) -> torch.Tensor:
    if isinstance(y, torch.Tensor):
        t = y.detach().cpu()
    elif isinstance(y, (np.ndarray, list, tuple)):
        arr = np.asarray(y)
        if arr.size == 0:
            arr = arr.astype(np.int64)
        if arr.dtype.kind not in "iu":
            raise TypeError(f"{fn}: {name} must hold integer class labels, got dtype {arr.dtype}")
        t = torch.from_numpy(arr.astype(np.int64))
    else:
        raise TypeError(f"{fn}: {name} must be a tensor, array or list of integer labels, got {type(y).__name__}")
    if t.ndim != 1:
        hint = " (take .argmax(-1) of logits first)" if t.ndim == 2 else ""
        raise ValueError(f"{fn}: {name} must be 1-D (num_samples,), got shape {tuple(t.shape)}{hint}")
    if t.dtype == torch.bool or t.is_floating_point() or t.is_complex():
        raise TypeError(f"{fn}: {name} must hold integer class labels, got dtype {t.dtype}")
    return t.long()


def _check_num_classes(fn: str, num_classes: Any) -> int:  # the call the shown confusion_matrix makes
    return check_int("num_classes", num_classes, fn, 1)


def confusion_matrix(y_true: Any, y_pred: Any, num_classes: int) -> torch.Tensor:
    """Counts ``C[i, j]`` = number of samples of true class ``i`` predicted as class ``j``.

    ``y_true``, ``y_pred``: ``(num_samples,)`` integer labels in ``0 .. num_classes - 1``.
    Returns an int64 tensor ``(num_classes, num_classes)``: rows are true classes, columns
    predictions (the convention of ``sklearn.metrics.confusion_matrix``).
    """
    fn = "confusion_matrix"
    k = _check_num_classes(fn, num_classes)
    t = _as_labels(fn, "y_true", y_true)
    p = _as_labels(fn, "y_pred", y_pred)
    if t.shape != p.shape:
        raise ValueError(f"{fn}: y_true and y_pred must have the same length, got {t.numel()} and {p.numel()}")
    for name, y in (("y_true", t), ("y_pred", p)):
        if y.numel() and (int(y.min()) < 0 or int(y.max()) >= k):
            raise ValueError(
                f"{fn}: {name} must lie in 0..{k - 1} (num_classes={k}), got values in {int(y.min())}..{int(y.max())}"
            )
    return torch.bincount(t * k + p, minlength=k * k).reshape(k, k)


class PrecisionRecallF1(NamedTuple):
    """Per-class tensors ``(num_classes,)`` (float64; support int64), or floats and an int when averaged."""

    precision: torch.Tensor | float
    recall: torch.Tensor | float
    f1: torch.Tensor | float
    support: torch.Tensor | int


def _divide(num: torch.Tensor, den: torch.Tensor, zero_division: float) -> torch.Tensor:
    out = num.double() / den.double().clamp(min=1)
    return torch.where(den == 0, torch.full_like(out, zero_division), out)


def _nan_average(x: torch.Tensor, weights: torch.Tensor | None) -> float:
    keep = ~torch.isnan(x)
    if not bool(keep.any()):
        return math.nan
    x = x[keep]
    if weights is not None:
        w = weights[keep].double()
        if float(w.sum()) > 0:
            return float((x * w).sum() / w.sum())
    return float(x.mean())


def _check_zero_division(fn: str, zero_division: Any) -> float:
    if isinstance(zero_division, bool) or not isinstance(zero_division, (int, float)) or not (
        zero_division in (0, 1) or math.isnan(zero_division)
    ):
        raise ValueError(f"{fn}: zero_division must be 0.0, 1.0 or nan, got {zero_division!r}")
    return float(zero_division)


def precision_recall_f1_from_confusion(
    cm: torch.Tensor, average: str | None = None, zero_division: float = 0.0
) -> PrecisionRecallF1:
    r"""Precision, recall, F1 and support from a confusion matrix ``(num_classes, num_classes)``.

    Per class :math:`c`: :math:`P_c = TP_c / (TP_c + FP_c)`, :math:`R_c = TP_c / (TP_c + FN_c)`,
    :math:`F1_c = 2 TP_c / (2 TP_c + FP_c + FN_c)` (the harmonic mean of :math:`P_c` and :math:`R_c`);
    a ratio whose denominator is 0 is set to ``zero_division`` (0.0, 1.0 or nan).

    ``average``: ``None`` (per class), ``"macro"`` (unweighted mean over classes), ``"weighted"``
    (mean weighted by support), ``"micro"`` (ratios of the summed TP, FP, FN). NaN entries are left
    out of an average. Returns :class:`PrecisionRecallF1`: per-class float64 tensors and int64
    support ``(num_classes,)``, or, when averaged, floats and the total support as an int.
    """
    fn = "precision_recall_f1"
    if not isinstance(cm, torch.Tensor):
        raise TypeError(f"{fn}: cm must be a torch.Tensor, got {type(cm).__name__}")
    if cm.ndim != 2 or cm.shape[0] != cm.shape[1] or cm.shape[0] < 1:
        raise ValueError(f"{fn}: cm must be a square (num_classes, num_classes) matrix, got shape {tuple(cm.shape)}")
    if cm.is_floating_point() or cm.is_complex() or cm.dtype == torch.bool:
        raise TypeError(f"{fn}: cm must hold integer counts, got dtype {cm.dtype}")
    if average not in _AVERAGES:
        raise ValueError(f"{fn}: average must be one of {_AVERAGES}, got {average!r}")
    zd = _check_zero_division(fn, zero_division)
    cm = cm.detach().cpu().long()
    if cm.numel() and int(cm.min()) < 0:
        raise ValueError(f"{fn}: cm must hold counts >= 0, got a minimum of {int(cm.min())}")
    tp = cm.diagonal()
    pred_sum = cm.sum(dim=0)  # TP + FP
    true_sum = cm.sum(dim=1)  # TP + FN = support
    if average == "micro":
        tp, pred_sum, true_sum_m = tp.sum(), pred_sum.sum(), true_sum.sum()
        p = float(_divide(tp, pred_sum, zd))
        r = float(_divide(tp, true_sum_m, zd))
        f = float(_divide(2 * tp, true_sum_m + pred_sum, zd))
        return PrecisionRecallF1(p, r, f, int(true_sum.sum()))
    precision = _divide(tp, pred_sum, zd)
    recall = _divide(tp, true_sum, zd)
    f1 = _divide(2 * tp, true_sum + pred_sum, zd)
    if average is None:
        return PrecisionRecallF1(precision, recall, f1, true_sum)
    weights = true_sum if average == "weighted" else None
    return PrecisionRecallF1(
        _nan_average(precision, weights), _nan_average(recall, weights), _nan_average(f1, weights),
        int(true_sum.sum()),
    )


def precision_recall_f1(
    y_true: Any, y_pred: Any, num_classes: int, average: str | None = None, zero_division: float = 0.0
) -> PrecisionRecallF1:
    """Precision, recall, F1 and support of predictions ``(num_samples,)`` against labels ``(num_samples,)``.

    Equals ``sklearn.metrics.precision_recall_fscore_support(y_true, y_pred,
    labels=range(num_classes), average=average, zero_division=zero_division)``, except that an
    averaged result reports the total support instead of ``None``. See
    :func:`precision_recall_f1_from_confusion` for the definitions and return types.
    """
    cm = confusion_matrix(y_true, y_pred, num_classes)
    return precision_recall_f1_from_confusion(cm, average=average, zero_division=zero_division)


def classification_report(
    y_true: Any,
    y_pred: Any,
    num_classes: int,
    *,
    target_names: Sequence[str] | None = None,
    digits: int = 2,
    output_dict: bool = False,
    zero_division: float = 0.0,
) -> str | dict[str, Any]:
    """Per-class precision, recall, F1 and support, plus accuracy and macro/weighted averages.

    ``y_true``, ``y_pred``: ``(num_samples,)`` integer labels. With ``output_dict=True`` returns
    ``{name: {"precision", "recall", "f1-score", "support"}, "accuracy": float, "macro avg": {...},
    "weighted avg": {...}}``; otherwise a text table with ``digits`` decimals. Both have the layout
    of ``sklearn.metrics.classification_report`` with ``labels=range(num_classes)``.
    """
    fn = "classification_report"
    k = _check_num_classes(fn, num_classes)
    if target_names is None:
        names = [str(c) for c in range(k)]
    else:
        if isinstance(target_names, str) or not all(isinstance(n, str) for n in target_names):
            raise TypeError(f"{fn}: target_names must be a sequence of str, got {target_names!r}")
        names = list(target_names)
        if len(names) != k:
            raise ValueError(f"{fn}: target_names must have num_classes={k} entries, got {len(names)}")
    if isinstance(digits, bool) or not isinstance(digits, int) or digits < 0:
        raise ValueError(f"{fn}: digits must be an int >= 0, got {digits!r}")
    check_bool("output_dict", output_dict, fn)
    _check_zero_division(fn, zero_division)
    cm = confusion_matrix(y_true, y_pred, k)
    per_class = precision_recall_f1_from_confusion(cm, None, zero_division)
    averages = {name: precision_recall_f1_from_confusion(cm, avg, zero_division)
                for name, avg in (("accuracy", "micro"), ("macro avg", "macro"), ("weighted avg", "weighted"))}
    headers = ("precision", "recall", "f1-score", "support")
    if output_dict:
        report: dict[str, Any] = {}
        for c, name in enumerate(names):
            values = (float(per_class.precision[c]), float(per_class.recall[c]), float(per_class.f1[c]),
                      float(per_class.support[c]))
            report[name] = dict(zip(headers, values, strict=True))
        for name, avg in averages.items():
            if name == "accuracy":
                report[name] = avg.f1  # with every class counted, micro P = R = F1 = accuracy
            else:
                report[name] = dict(zip(headers, (avg.precision, avg.recall, avg.f1, float(avg.support)),
                                        strict=True))
        return report
    width = max(max(len(n) for n in names), len("weighted avg"), digits)
    lines = [f"{'':>{width}} " + "".join(f" {h:>9}" for h in headers), ""]
    for c, name in enumerate(names):
        cells = "".join(f" {float(v[c]):>9.{digits}f}" for v in per_class[:3])
        lines.append(f"{name:>{width}} {cells} {int(per_class.support[c]):>9}")
    lines.append("")
    for name, avg in averages.items():
        if name == "accuracy":
            cells = " " * 20 + f" {avg.f1:>9.{digits}f}"
        else:
            cells = "".join(f" {v:>9.{digits}f}" for v in avg[:3])
        lines.append(f"{name:>{width}} {cells} {avg.support:>9}")
    return "\n".join(lines) + "\n"


def _check_count(fn: str, name: str, value: Any, minimum: int) -> int:  # the call the shown splits make
    return check_int(name, value, fn, minimum)


def split_indices(n: int, fractions: Sequence[float] = (0.6, 0.2, 0.2), seed: int = 0) -> list[torch.Tensor]:
    """Shuffle ``0 .. n-1`` with ``seed`` and cut it into parts of the given fractions (e.g. train/val/test).

    Part sizes are ``round(f * n)`` for all but the last part, which takes the rest; each part
    must be non-empty. Returns one int64 tensor ``(part_size,)`` per fraction; together they are a
    partition of ``range(n)``.
    """
    fn = "split_indices"
    n = _check_count(fn, "n", n, 1)
    if isinstance(fractions, str) or not isinstance(fractions, Sequence) or len(fractions) < 1:
        raise TypeError(f"{fn}: fractions must be a sequence of floats, got {fractions!r}")
    if any(not isinstance(f, (int, float)) or not f > 0 for f in fractions) or abs(sum(fractions) - 1) > 1e-9:
        raise ValueError(f"{fn}: fractions must be positive and sum to 1, got {tuple(fractions)}")
    _check_count(fn, "seed", seed, 0)
    sizes = [round(f * n) for f in fractions[:-1]]
    sizes.append(n - sum(sizes))
    if min(sizes) < 1:
        raise ValueError(f"{fn}: fractions {tuple(fractions)} of n={n} give an empty part (sizes {sizes})")
    order = torch.randperm(n, generator=torch_generator(int(seed)))
    return list(torch.split(order, sizes))


def kfold_indices(
    n: int, k: int, *, shuffle: bool = False, seed: int = 0
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``k`` (train, test) index pairs for k-fold cross-validation over ``n`` samples.

    The samples (shuffled with ``seed`` when ``shuffle``) are cut into ``k`` consecutive folds;
    the first ``n % k`` folds have ``n // k + 1`` samples, the others ``n // k``. Fold ``i`` is the
    test set of split ``i``; its train set is every other index, in increasing order. Returns
    int64 tensors ``(n - fold_size,)`` and ``(fold_size,)``, as ``sklearn.model_selection.KFold``.
    """
    fn = "kfold_indices"
    n = _check_count(fn, "n", n, 1)
    k = _check_count(fn, "k", k, 2)
    if k > n:
        raise ValueError(f"{fn}: k={k} folds need at least k samples, got n={n}")
    if not isinstance(shuffle, bool):
        raise TypeError(f"{fn}: shuffle must be a bool, got {type(shuffle).__name__}")
    _check_count(fn, "seed", seed, 0)
    order = torch.randperm(n, generator=torch_generator(int(seed))) if shuffle else torch.arange(n)
    sizes = [n // k + (1 if i < n % k else 0) for i in range(k)]
    splits = []
    for test in torch.split(order, sizes):
        in_test = torch.zeros(n, dtype=torch.bool)
        in_test[test] = True
        splits.append((torch.nonzero(~in_test).flatten(), test.clone()))
    return splits


# ----------------------------------------------------------------------------- text generation: BLEU, exact match
def _as_tokens(fn: str, name: str, text: Any) -> list[str]:
    """A string is split on whitespace; a sequence of strings is taken as the tokens."""
    if isinstance(text, str):
        return text.split()
    if isinstance(text, Sequence) and all(isinstance(t, str) for t in text):
        return list(text)
    raise TypeError(f"{fn}: {name} must be a string or a sequence of string tokens, got {type(text).__name__}")


def _as_references(fn: str, references: Any) -> list[list[str]]:
    if isinstance(references, str) or not isinstance(references, Sequence) or len(references) == 0:
        raise TypeError(f"{fn}: references must be a non-empty list of references (strings or token lists), "
                        f"got {references!r}")
    return [_as_tokens(fn, "each reference", r) for r in references]


def _ngrams(tokens: Sequence[str], n: int) -> dict[tuple[str, ...], int]:
    counts: dict[tuple[str, ...], int] = {}
    for i in range(len(tokens) - n + 1):
        gram = tuple(tokens[i: i + n])
        counts[gram] = counts.get(gram, 0) + 1
    return counts


def modified_precision(candidate: Any, references: Any, n: int) -> tuple[int, int]:
    """BLEU's clipped n-gram counts: ``(matches, total)``.

    ``total`` is the number of n-grams of ``candidate``; each distinct n-gram counts as a match at most
    as often as it occurs in the single reference that contains it most often (Papineni et al., 2002,
    section 2.1). ``candidate`` is a string (split on whitespace) or a list of tokens; ``references`` a
    list of them. The modified precision is ``matches / total``.
    """
    fn = "modified_precision"
    cand = _as_tokens(fn, "candidate", candidate)
    refs = _as_references(fn, references)
    n = _check_count(fn, "n", n, 1)
    counts = _ngrams(cand, n)
    max_ref: dict[tuple[str, ...], int] = {}
    for ref in refs:
        for gram, c in _ngrams(ref, n).items():
            max_ref[gram] = max(max_ref.get(gram, 0), c)
    matches = sum(min(c, max_ref.get(gram, 0)) for gram, c in counts.items())
    return matches, sum(counts.values())


def closest_reference_length(candidate_length: int, reference_lengths: Sequence[int]) -> int:
    """The reference length closest to ``candidate_length`` (the shorter one on a tie): BLEU's effective
    reference length for one sentence."""
    fn = "closest_reference_length"
    candidate_length = _check_count(fn, "candidate_length", candidate_length, 0)
    if isinstance(reference_lengths, (str, int)) or not isinstance(reference_lengths, Sequence) or \
            not reference_lengths:
        raise TypeError(f"{fn}: reference_lengths must be a non-empty sequence of ints, got {reference_lengths!r}")
    return min((_check_count(fn, "each reference length", r, 0) for r in reference_lengths),
               key=lambda r: (abs(r - candidate_length), r))


def brevity_penalty(candidate_length: int, reference_length: int) -> float:
    """``1`` if ``c > r``, else ``exp(1 - r / c)`` (``0`` for an empty candidate), with ``c`` the total
    candidate length and ``r`` the effective reference length of the corpus."""
    fn = "brevity_penalty"
    c = _check_count(fn, "candidate_length", candidate_length, 0)
    r = _check_count(fn, "reference_length", reference_length, 0)
    if c > r:
        return 1.0
    if c == 0:
        return 0.0
    return math.exp(1.0 - r / c)


def corpus_bleu(candidates: Sequence[Any], references: Sequence[Any], max_n: int = 4) -> float:
    """Corpus BLEU of Papineni et al. (2002) with uniform weights ``1 / max_n``, no smoothing, in [0, 1].

    ``candidates[i]`` (a string or a token list) is scored against ``references[i]`` (a list of
    references). Clipped n-gram matches and n-gram totals are summed over the corpus *before* the
    precisions ``p_n`` are formed; ``c`` is the total candidate length and ``r`` the sum of each
    sentence's closest reference length. ``BLEU = BP(c, r) * exp(sum_n log(p_n) / max_n)``, which is 0
    when some ``p_n`` is 0 (or has no n-grams at all). Equals NLTK's ``corpus_bleu`` without smoothing.
    """
    fn = "corpus_bleu"
    if isinstance(candidates, str) or not isinstance(candidates, Sequence):
        raise TypeError(f"{fn}: candidates must be a sequence of candidates, got {type(candidates).__name__}")
    if isinstance(references, str) or not isinstance(references, Sequence) or len(references) != len(candidates):
        raise ValueError(f"{fn}: references must hold one list of references per candidate "
                         f"({len(candidates)}), got {type(references).__name__} of length "
                         f"{len(references) if isinstance(references, Sequence) else '?'}")
    if len(candidates) == 0:
        raise ValueError(f"{fn}: candidates must not be empty")
    max_n = _check_count(fn, "max_n", max_n, 1)
    matches, totals = [0] * max_n, [0] * max_n
    c = r = 0
    for candidate, refs in zip(candidates, references, strict=True):
        cand = _as_tokens(fn, "each candidate", candidate)
        ref_tokens = _as_references(fn, refs)
        for n in range(1, max_n + 1):
            m, t = modified_precision(cand, ref_tokens, n)
            matches[n - 1] += m
            totals[n - 1] += t
        c += len(cand)
        r += closest_reference_length(len(cand), [len(x) for x in ref_tokens])
    if min(matches) == 0:
        return 0.0
    log_precision = sum(math.log(m / t) for m, t in zip(matches, totals, strict=True)) / max_n
    return brevity_penalty(c, r) * math.exp(log_precision)


def sentence_bleu(candidate: Any, references: Any, max_n: int = 4) -> float:
    """BLEU of one candidate against its references: :func:`corpus_bleu` of a one-sentence corpus."""
    return corpus_bleu([candidate], [references], max_n)


def exact_match(predictions: Sequence[str], references: Sequence[Any]) -> float:
    """The fraction of predictions equal to their reference after normalising case and whitespace.

    ``references[i]`` is a string or a list of acceptable strings (a match with any counts).
    """
    fn = "exact_match"
    if isinstance(predictions, str) or not isinstance(predictions, Sequence):
        raise TypeError(f"{fn}: predictions must be a sequence of strings, got {type(predictions).__name__}")
    if isinstance(references, str) or not isinstance(references, Sequence) or len(references) != len(predictions):
        raise ValueError(f"{fn}: references must be a sequence with one entry per prediction ({len(predictions)})")
    if not predictions:
        raise ValueError(f"{fn}: predictions must not be empty")

    def norm(text: Any) -> str:
        if not isinstance(text, str):
            raise TypeError(f"{fn}: predictions and references must be strings, got {type(text).__name__}")
        return " ".join(text.lower().split())

    hits = 0
    for pred, ref in zip(predictions, references, strict=True):
        if not isinstance(ref, (str, Sequence, set, frozenset)):
            raise TypeError(f"{fn}: each reference must be a string or a list of strings, got {type(ref).__name__}")
        options = [ref] if isinstance(ref, str) else list(ref)
        hits += norm(pred) in {norm(o) for o in options}
    return hits / len(predictions)
