"""A small multimodal assistant: speech, retrieval and visual question answering behind a router (chapter 15).

A question arrives typed or spoken, with or without a picture. The assistant

1. turns speech into text with a closed-vocabulary **template recogniser**: dynamic time warping
   (:func:`dtw_distance`) between the MFCCs of the utterance (:func:`utterance_features`) and those of
   reference recordings of every question it knows (:class:`TemplateRecognizer`);
2. embeds the text and lets a **router** (:class:`Router`) send it to the picture (visual question
   answering), to the documentation (retrieval, :class:`mmbook.retrieval.DocumentStore`) or nowhere
   (abstain: out of scope);
3. answers with a confidence and abstains below a threshold (:class:`Assistant`).

The components are injected, so each can be replaced or tested alone: ``embed`` maps texts to
vectors, ``vqa`` answers a batch of questions about a batch of images with confidences (wrap
chapter 14's model with :func:`vlm_answerer`). :func:`chat` is the plain-function interface and
:func:`chat_widget` the ipywidgets one. :func:`expected_calibration_error` and
:func:`reliability_bins` measure whether the confidences can be trusted.
"""

from __future__ import annotations

import html
import io
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from mmbook.audio import mfcc
from mmbook.cache import CacheError, cache_path, load_arrays, save_arrays
from mmbook.checks import check_finite, check_instance, check_number, positive_int
from mmbook.data import COLOURS, SHAPES, WordVocab
from mmbook.retrieval import DocumentStore

__all__ = [
    "DOC_QUESTIONS", "OUT_OF_SCOPE_QUESTIONS", "ROUTES", "SPOKEN_DOC_QUESTIONS", "SPOKEN_VQA_QUESTIONS",
    "Assistant", "ReliabilityBins", "Reply", "Router", "TemplateRecognizer", "add_noise", "chat", "chat_widget",
    "dtw_distance", "exact_match", "expected_calibration_error", "format_reply", "normalize_answer",
    "reliability_bins", "synthesize_cached", "utterance_features", "vlm_answerer",
]

ROUTES = ("vision", "docs", "abstain")

# Every question of the shapes-scene generator (mmbook.data.scene_questions) except the relations:
# 3 + 5 + 4 + 15 = 27 closed-set questions the speech recogniser learns to hear.
SPOKEN_VQA_QUESTIONS: tuple[str, ...] = (
    *(f"what colour is the {s}?" for s in SHAPES),
    *(f"what shape is the {c} object?" for c in COLOURS),
    "how many shapes are there?",
    *(f"how many {s}s are there?" for s in SHAPES),
    *(f"is there a {c} {s}?" for c in COLOURS for s in SHAPES),
)

# Questions about Python's documentation topics (mmbook.corpus), written for this book, each with the
# topic(s) that answer it ("if" and "else" are the same document in pydoc's topics).
DOC_QUESTIONS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("what does the assert statement do?", ("assert",)),
    ("how do assignment statements bind names to values?", ("assignment",)),
    ("how do I write a coroutine with async def?", ("async",)),
    ("how can a class customize attribute access?", ("attribute-access",)),
    ("what does x += 1 mean?", ("augassign",)),
    ("what does the await expression do?", ("await",)),
    ("how are arithmetic operators like multiplication and division evaluated?", ("binary",)),
    ("what do the bitwise and, or and xor operators do?", ("bitwise",)),
    ("how do the boolean operators and, or and not work?", ("booleans",)),
    ("how do I leave a loop early?", ("break",)),
    ("how do I make an object callable like a function?", ("callable-types",)),
    ("how do I define a class?", ("class",)),
    ("can comparison operators be chained like a < b < c?", ("comparisons",)),
    ("which methods does a context manager define?", ("context-managers",)),
    ("how do I skip to the next iteration of a loop?", ("continue",)),
    ("how do I step through my program with the pdb debugger?", ("debugger",)),
    ("how do I delete a name or an item?", ("del",)),
    ("how do I write a dictionary with curly braces?", ("dict",)),
    ("what happens when an exception is raised?", ("exceptions",)),
    ("how are floating point literals written?", ("floating",)),
    ("how does a for loop iterate over a list?", ("for",)),
    ("what is the syntax of format strings for str.format?", ("formatstrings",)),
    ("how do I define a function?", ("function",)),
    ("what does the global statement do?", ("global",)),
    ("how does the if statement choose which branch to run?", ("if", "else")),
    ("how do I import a module?", ("import",)),
    ("how do I test whether an item is in a list?", ("in",)),
    ("how are hexadecimal and binary integer literals written?", ("integers",)),
    ("what is a lambda expression?", ("lambda",)),
    ("how do I write a list display with square brackets?", ("lists",)),
    ("how do names get bound to objects?", ("naming",)),
    ("what does the nonlocal statement do?", ("nonlocal",)),
    ("what does the pass statement do?", ("pass",)),
    ("how does the power operator work?", ("power",)),
    ("how do I raise an exception?", ("raise",)),
    ("what does the return statement do?", ("return",)),
    ("how do I shift the bits of an integer left or right?", ("shifting",)),
    ("how do I take a slice of a sequence?", ("slicings",)),
    ("what are special method names such as __add__?", ("specialnames",)),
    ("what methods do strings have?", ("string-methods",)),
    ("how do I write string literals with quotes and prefixes?", ("strings",)),
    ("which values count as false in a truth test?", ("truth",)),
    ("how do I catch an exception with try and except?", ("try",)),
    ("what operations do dictionaries support?", ("typesmapping",)),
    ("how do lists, tuples and ranges work as sequences?", ("typesseq",)),
    ("how do I append to or remove items from a mutable sequence?", ("typesseq-mutable",)),
    ("how do while loops work?", ("while",)),
    ("what does the with statement do?", ("with",)),
    ("how does yield turn a function into a generator?", ("yield",)),
    ("what is the value None?", ("bltin-null-object",)),
)

# Documentation questions the speech recogniser also learns (a subset of DOC_QUESTIONS).
SPOKEN_DOC_QUESTIONS: tuple[str, ...] = (
    "how do I define a function?", "what does the with statement do?", "how do I raise an exception?",
    "what does the assert statement do?", "how do while loops work?", "what is a lambda expression?",
    "how do I import a module?", "what methods do strings have?",
)

# Questions neither the picture nor the documentation can answer, some worded like picture questions ("what shape is
# the earth?"). Chapter 15 sets the router's thresholds on the even-numbered ones and tests them on the odd-numbered.
OUT_OF_SCOPE_QUESTIONS: tuple[str, ...] = (
    "what is the capital of france?",
    "who wrote the novel war and peace?",
    "how many legs does a spider have?",
    "what colour is the sky on mars?",
    "is there a cat in the kitchen?",
    "what is the weather like tomorrow?",
    "how tall is mount everest?",
    "what shape is the earth?",
    "how many people live in tokyo?",
    "who won the football world cup in 2014?",
    "what is the best recipe for pancakes?",
    "how do I change a flat tyre?",
    "what is the boiling point of water?",
    "how many moons does jupiter have?",
    "what time is it in new york?",
    "can you recommend a good film?",
    "who painted the mona lisa?",
    "what is the population of brazil?",
    "how do I bake sourdough bread?",
    "when did the second world war end?",
    "what colour are flamingos?",
    "how many players are on a football team?",
    "is there life on other planets?",
    "what is the tallest building in the world?",
    "how far is the moon from the earth?",
    "what should I cook for dinner tonight?",
    "who is the president of the united states?",
    "how many bones are in the human body?",
    "what shape is a rugby ball?",
    "what is the speed of light?",
    "how do I get to the train station?",
    "what is the meaning of life?",
    "which team won the last world series?",
    "how many days are there in a leap year?",
    "is there a doctor nearby?",
    "what colour is a ripe banana?",
    "how do I learn to play the guitar?",
    "what language do they speak in brazil?",
    "who discovered penicillin?",
    "how many triangles are on the flag of jamaica?",
    "what colour is the flag of japan?",
    "how do I treat a sunburn?",
    "when is the next solar eclipse?",
    "who wrote romeo and juliet?",
    "what is the chemical symbol for gold?",
    "how many hours of sleep does a child need?",
    "is there a pharmacy open on sunday?",
    "what shape are the cells of a honeycomb?",
    "where is the nearest petrol station?",
    "how do I renew my passport?",
    "what is the height of the eiffel tower?",
    "what are the symptoms of the flu?",
    "how many calories are in an apple?",
    "which planet is closest to the sun?",
    "what is the best way to learn french?",
    "who invented the telephone?",
    "what time does the museum open?",
    "what colour do you get by mixing blue and yellow?",
    "what is a good name for a cat?",
    "how old is the universe?",
    "will it rain this weekend?",
    "what happens in the play hamlet?",
    "how long should I boil an egg?",
    "what is the largest ocean on earth?",
)


# ----------------------------------------------------------------------------- small checks
def _check_waves(waveforms: object, fn: str) -> list[torch.Tensor]:
    if isinstance(waveforms, torch.Tensor) and waveforms.ndim == 2:
        waveforms = list(waveforms)
    if isinstance(waveforms, torch.Tensor) or not isinstance(waveforms, Sequence) or not waveforms:
        raise TypeError(f"{fn}: waveforms must be a non-empty sequence of 1-D tensors (or a 2-D tensor), got "
                        f"{type(waveforms).__name__}")
    for i, w in enumerate(waveforms):
        if not isinstance(w, torch.Tensor) or w.ndim != 1 or not torch.is_floating_point(w) or w.numel() < 400:
            raise ValueError(f"{fn}: waveforms[{i}] must be a 1-D float tensor of at least 400 samples, got "
                             f"{getattr(w, 'shape', type(w).__name__)}")
        check_finite(f"waveforms[{i}]", w, fn)  # NaN distances would still name a nearest text
    return list(waveforms)


def _check_probability_like(name: str, x: object, fn: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor) or x.ndim != 1 or x.numel() == 0:
        raise ValueError(f"{fn}: {name} must be a non-empty 1-D tensor, got {getattr(x, 'shape', type(x).__name__)}")
    return x


# ----------------------------------------------------------------------------- speech
def add_noise(waveform: torch.Tensor, snr_db: float, generator: torch.Generator | None = None) -> torch.Tensor:
    r"""``waveform`` ``(time,)`` plus white Gaussian noise at a signal-to-noise ratio of ``snr_db`` decibels,
    :math:`\sigma^2 = P_\text{signal} / 10^{\text{SNR}/10}` with :math:`P_\text{signal}` the mean square of the
    waveform. Noise is drawn on the CPU from ``generator`` (or the global generator)."""
    if not isinstance(waveform, torch.Tensor) or waveform.ndim != 1 or not torch.is_floating_point(waveform):
        raise ValueError(f"add_noise: waveform must be a 1-D float tensor, got {getattr(waveform, 'shape', waveform)}")
    if isinstance(snr_db, bool) or not isinstance(snr_db, (int, float)) or not np.isfinite(snr_db):
        raise ValueError(f"add_noise: snr_db must be a finite number, got {snr_db!r}")
    check_instance("generator", generator, "add_noise", (torch.Generator, type(None)), "a torch.Generator or None")
    power = waveform.double().pow(2).mean()
    sigma = (power / 10.0 ** (snr_db / 10.0)).sqrt().float()
    noise = torch.randn(waveform.shape, generator=generator).to(waveform.device)
    return waveform + sigma * noise


def synthesize_cached(requests: Sequence[dict], sample_rate: int = 16000) -> list[torch.Tensor]:
    """:func:`mmbook.speech.synthesize_many`, cached under :func:`mmbook.cache.cache_dir` by the requests.

    espeak-ng is deterministic, so a cache file keyed by the requests returns exactly what a new
    synthesis would. The file is validated on load (header, key, content hash, one float32 waveform per
    request): a corrupt, truncated or foreign one raises :class:`mmbook.cache.CacheError` naming it.
    Returns one float32 waveform ``(num_samples,)`` per request.
    """
    if isinstance(requests, (str, dict)) or not isinstance(requests, Sequence) or not requests:
        raise TypeError(f"synthesize_cached: requests must be a non-empty sequence of dicts, got "
                        f"{type(requests).__name__}")
    fn = "synthesize_cached"
    if isinstance(sample_rate, bool) or not isinstance(sample_rate, int) or sample_rate < 1:
        raise ValueError(f"{fn}: sample_rate must be a positive int, got {sample_rate!r}")
    key = {"what": "speech", "v": 2, "sr": sample_rate, "requests": list(requests)}
    path = cache_path("speech", key)
    if path.is_file():
        arrays = load_arrays(path, key, {f"a{i}": ((None,), np.float32) for i in range(len(requests))}, fn=fn)
        if len(arrays) != len(requests):
            raise CacheError(f"{fn}: {path} holds {len(arrays)} waveforms for {len(requests)} requests; delete it "
                             "and run again (it is rebuilt)")
        return [torch.from_numpy(arrays[f"a{i}"]) for i in range(len(requests))]
    from mmbook.speech import synthesize_many

    waves = synthesize_many(requests, sample_rate=sample_rate)
    save_arrays(path, key, {f"a{i}": w.numpy().astype(np.float32) for i, w in enumerate(waves)})
    return waves


def utterance_features(
    waveforms: Sequence[torch.Tensor] | torch.Tensor,
    sample_rate: int = 16000,
    num_frames: int = 40,
    n_mfcc: int = 12,
    trim_ratio: float = 0.05,
) -> torch.Tensor:
    """Fixed-size MFCC sequences for whole utterances: ``(batch, num_frames, n_mfcc)``.

    For each waveform ``(time,)``: cut the leading and trailing parts quieter than ``trim_ratio``
    times its peak; MFCCs (25 ms windows every 10 ms, 40 mel bands) without ``c0`` (the loudness);
    each coefficient standardised over the utterance (cepstral mean and variance normalisation,
    which removes a fixed channel or voice colouring); then linearly resampled in time to
    ``num_frames`` frames, so a fast and a slow speaker give sequences of the same length.
    """
    fn = "utterance_features"
    waves = _check_waves(waveforms, fn)
    for name, value, low in (("num_frames", num_frames, 2), ("n_mfcc", n_mfcc, 1), ("sample_rate", sample_rate, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{fn}: {name} must be an int >= {low}, got {value!r}")
    check_number("trim_ratio", trim_ratio, fn, 0.0, 1.0, high_open=True)
    if n_mfcc > 39:  # c0 is computed and dropped: n_mfcc + 1 of the 40 mel bands
        raise ValueError(f"{fn}: n_mfcc must be <= 39 (40 mel bands, c0 dropped), got {n_mfcc}")
    out = []
    for w in waves:
        w = w.detach().float().cpu()
        loud = (w.abs() > trim_ratio * w.abs().max()).nonzero().flatten()
        if loud.numel() and loud[-1] - loud[0] >= 400:
            w = w[loud[0]: loud[-1] + 1]
        c = mfcc(w[None], sample_rate, n_mfcc=n_mfcc + 1, melkwargs={"n_fft": 400, "hop_length": 160,
                                                                     "n_mels": 40})[0, 1:]  # (n_mfcc, frames)
        c = (c - c.mean(dim=1, keepdim=True)) / (c.std(dim=1, keepdim=True) + 1e-5)
        out.append(F.interpolate(c[None], size=num_frames, mode="linear", align_corners=True)[0].T)
    return torch.stack(out)


def dtw_distance(x: torch.Tensor, y: torch.Tensor, band: int | None = None, chunk: int = 1024) -> torch.Tensor:
    r"""Dynamic-time-warping distance between every sequence of ``x`` ``(a, L, d)`` and of ``y`` ``(b, M, d)``.

    With the Euclidean frame cost :math:`c_{ij} = \lVert \mathbf{x}_i - \mathbf{y}_j \rVert`, the
    accumulated cost obeys :math:`D_{ij} = c_{ij} + \min(D_{i-1,j-1}, D_{i-1,j}, D_{i,j-1})`,
    :math:`D_{00} = c_{00}`, and :math:`D_{L-1,M-1}` is the cost of the cheapest monotone, continuous
    alignment path from the first frames to the last. Returned divided by :math:`L + M`:
    ``(a, b)``. ``band`` (Sakoe-Chiba) forbids cells with :math:`|i - j| > \text{band}`.
    All cells of one anti-diagonal :math:`i + j = k` depend only on the two previous
    anti-diagonals, so they are computed together, for all pairs at once (``chunk`` pairs at a time).
    With ``band=0`` and ``L == M`` only the diagonal path remains, and its cost is summed directly.
    """
    fn = "dtw_distance"
    for name, t in (("x", x), ("y", y)):
        if not isinstance(t, torch.Tensor) or t.ndim != 3 or not torch.is_floating_point(t) or 0 in t.shape:
            raise ValueError(f"{fn}: {name} must be a non-empty float tensor (batch, frames, features), got "
                             f"{getattr(t, 'shape', type(t).__name__)}")
    if x.shape[2] != y.shape[2]:
        raise ValueError(f"{fn}: x and y must have the same feature size, got {x.shape[2]} and {y.shape[2]}")
    gap = abs(x.shape[1] - y.shape[1])
    if band is not None and (isinstance(band, bool) or not isinstance(band, int) or band < gap):
        raise ValueError(f"{fn}: band must be None or an int >= |L - M| = {gap} (else no "
                         f"path reaches the last cell), got {band!r}")
    a, length, dim = x.shape
    b, m, _ = y.shape
    num_diag = length + m - 1
    rows = torch.arange(length, device=x.device)
    cols = torch.arange(num_diag, device=x.device)[:, None] - rows[None, :]  # (num_diag, L): column j = k - i
    valid = (cols >= 0) & (cols < m)
    if band is not None:
        valid &= (rows[None, :] - cols).abs() <= band
    flat = (rows[None, :] * m + cols.clamp(0, m - 1)).flatten()  # cell (i, k - i) in a flattened (L, M) grid
    out = torch.empty(a, b, dtype=x.dtype, device=x.device)
    per_x = max(1, chunk // b)
    if band == 0 and length == m:  # only the diagonal path is left: linear alignment, no recursion needed
        for start in range(0, a, per_x):
            diff = x[start: start + per_x, None] - y[None]  # (n, b, L, d)
            out[start: start + diff.shape[0]] = diff.norm(dim=-1).sum(dim=-1)
        return out / (length + m)
    for start in range(0, a, per_x):
        xs = x[start: start + per_x]
        n = xs.shape[0]
        cost = torch.cdist(xs.reshape(-1, dim), y.reshape(-1, dim),
                           compute_mode="donot_use_mm_for_euclid_dist")  # (n*L, b*M), exact for equal rows
        cost = cost.view(n, length, b, m).transpose(1, 2).reshape(n * b, length * m)
        skew = cost[:, flat].view(n * b, num_diag, length).masked_fill_(~valid, float("inf"))
        # three anti-diagonals D_{k-2}, D_{k-1}, D_k indexed by row i + 1; column 0 stays +inf (row -1)
        buffers = torch.full((3, n * b, length + 1), float("inf"), dtype=x.dtype, device=x.device)
        prev2, prev, cur = buffers[0], buffers[1], buffers[2]
        prev[:, 1:] = skew[:, 0]  # anti-diagonal 0 holds only D_00 = c_00
        for k in range(1, num_diag):
            torch.minimum(prev[:, :-1], prev2[:, :-1], out=cur[:, 1:])  # D_{i-1, j}, D_{i-1, j-1}
            torch.minimum(cur[:, 1:], prev[:, 1:], out=cur[:, 1:])  # D_{i, j-1}
            cur[:, 1:] += skew[:, k]
            prev2, prev, cur = prev, cur, prev2
        out[start: start + n] = prev[:, length].view(n, b)
    return out / (length + m)


class TemplateRecognizer:
    """Closed-vocabulary speech recognition by nearest reference recording under DTW.

    ``texts[i]`` is what reference recording ``waveforms[i]`` says (several recordings, e.g. by
    different voices, may say the same text). :meth:`transcribe` returns, for each new waveform,
    the text of the reference with the smallest :func:`dtw_distance`, or ``None`` when even that
    distance exceeds ``reject_distance``. Feature settings are those of :func:`utterance_features`.
    """

    def __init__(self, texts: Sequence[str], waveforms: Sequence[torch.Tensor], sample_rate: int = 16000,
                 num_frames: int = 40, band: int | None = None, reject_distance: float | None = None) -> None:
        fn = "TemplateRecognizer"
        if isinstance(texts, str) or not isinstance(texts, Sequence) or not all(isinstance(t, str) for t in texts):
            raise TypeError(f"{fn}: texts must be a sequence of strings")
        waves = _check_waves(waveforms, fn)
        if len(texts) != len(waves):
            raise ValueError(f"{fn}: need one text per waveform, got {len(texts)} texts and {len(waves)} waveforms")
        self.sample_rate, self.num_frames, self.band = sample_rate, num_frames, band
        if reject_distance is not None:  # NaN would reject every utterance
            check_number("reject_distance", reject_distance, fn)
        self.reject_distance = reject_distance
        self.labels: list[str] = list(dict.fromkeys(texts))  # the distinct texts, in first-seen order
        self.reference_label = torch.tensor([self.labels.index(t) for t in texts])
        self.references = utterance_features(waves, sample_rate, num_frames)  # (refs, num_frames, n_mfcc)

    def features(self, waveforms: Sequence[torch.Tensor] | torch.Tensor) -> torch.Tensor:
        """:func:`utterance_features` with this recogniser's settings: ``(batch, num_frames, n_mfcc)``."""
        return utterance_features(waveforms, self.sample_rate, self.num_frames)

    def label_distances(self, waveforms: Sequence[torch.Tensor] | torch.Tensor) -> torch.Tensor:
        """``(batch, num_labels)``: for each waveform, the smallest DTW distance to a reference of each label.
        A 3-D tensor is taken as precomputed :meth:`features` ``(batch, num_frames, n_mfcc)``."""
        is_features = isinstance(waveforms, torch.Tensor) and waveforms.ndim == 3
        if is_features and waveforms.shape[1:] != self.references.shape[1:]:
            raise ValueError(f"TemplateRecognizer: features must have shape (batch, "
                             f"{', '.join(map(str, self.references.shape[1:]))}), got {tuple(waveforms.shape)}")
        if is_features:
            check_finite("features", waveforms, "TemplateRecognizer.label_distances")
        features = waveforms if is_features else self.features(waveforms)
        d = dtw_distance(features, self.references, self.band)  # (batch, refs)
        out = torch.full((d.shape[0], len(self.labels)), float("inf"), dtype=d.dtype)
        return out.scatter_reduce(1, self.reference_label.expand_as(d), d, reduce="amin")

    def transcribe(self, waveforms: Sequence[torch.Tensor] | torch.Tensor) -> tuple[list[str | None], torch.Tensor]:
        """``(texts, distances)``: the recognised text per waveform (``None`` if rejected) and its distance
        ``(batch,)``. Takes waveforms or precomputed features, as :meth:`label_distances`."""
        best, index = self.label_distances(waveforms).min(dim=1)
        texts: list[str | None] = [self.labels[int(i)] for i in index]
        if self.reject_distance is not None:
            texts = [t if float(dist) <= self.reject_distance else None for t, dist in zip(texts, best, strict=True)]
        return texts, best


# ----------------------------------------------------------------------------- routing
class Router:
    r"""Routing by similarity to what each component knows, with an out-of-scope threshold per route.

    ``exemplars`` maps each route (``"vision"``, ``"docs"``) to embeddings ``(n_r, dim)`` of what that
    route can answer: example questions about pictures, the passages of the document store. A query
    :math:`\mathbf{q}` gets the score :math:`s_r = \max_i \cos(\mathbf{q}, \mathbf{e}_{r,i})` per route
    and goes to the route with the largest margin :math:`s_r - \tau_r` over its threshold ``thresholds[r]``;
    when no margin is positive, it is out of scope (``"abstain"``).
    """

    def __init__(self, exemplars: Mapping[str, torch.Tensor], thresholds: Mapping[str, float]) -> None:
        fn = "Router"
        if not isinstance(exemplars, Mapping) or not exemplars or set(exemplars) - set(ROUTES[:2]):
            raise ValueError(f"{fn}: exemplars must map some of {ROUTES[:2]} to embeddings, got "
                             f"{sorted(exemplars) if isinstance(exemplars, Mapping) else type(exemplars).__name__}")
        if not isinstance(thresholds, Mapping) or set(thresholds) != set(exemplars):
            raise ValueError(f"{fn}: thresholds must have the keys of exemplars {sorted(exemplars)}, got "
                             f"{sorted(thresholds) if isinstance(thresholds, Mapping) else type(thresholds).__name__}")
        dims = set()
        for route, e in exemplars.items():
            if not isinstance(e, torch.Tensor) or e.ndim != 2 or not torch.is_floating_point(e) or e.shape[0] == 0:
                raise ValueError(f"{fn}: exemplars[{route!r}] must be a non-empty float tensor (n, dim), got "
                                 f"{getattr(e, 'shape', type(e).__name__)}")
            check_finite(f"exemplars[{route!r}]", e, fn)
            dims.add(e.shape[1])
        for route, t in thresholds.items():  # a NaN threshold would abstain on everything
            check_number(f"thresholds[{route!r}]", t, fn)
        if len(dims) != 1:
            raise ValueError(f"{fn}: all exemplars must have the same dimension, got {sorted(dims)}")
        self.route_names = [r for r in ROUTES[:2] if r in exemplars]
        self.exemplars = {r: F.normalize(exemplars[r].detach().float().cpu(), dim=-1) for r in self.route_names}
        self.thresholds = {r: float(thresholds[r]) for r in self.route_names}
        self.dim = dims.pop()

    def scores(self, queries: torch.Tensor) -> torch.Tensor:
        """``(num_queries, num_routes)``: the best cosine similarity to each route's exemplars
        (columns in the order of :attr:`route_names`)."""
        if not isinstance(queries, torch.Tensor) or queries.ndim != 2 or queries.shape[1] != self.dim:
            raise ValueError(f"Router.scores: queries must have shape (num_queries, {self.dim}), got "
                             f"{getattr(queries, 'shape', type(queries).__name__)}")
        check_finite("queries", queries, "Router.scores")
        q = F.normalize(queries.detach().float().cpu(), dim=-1)
        return torch.stack([(q @ self.exemplars[r].T).amax(dim=1) for r in self.route_names], dim=1)

    def route(self, queries: torch.Tensor) -> tuple[list[str], torch.Tensor]:
        """``(routes, scores)``: one of :data:`ROUTES` per query, and :meth:`scores` ``(num_queries, num_routes)``."""
        scores = self.scores(queries)
        margin = scores - torch.tensor([self.thresholds[r] for r in self.route_names])
        best, index = margin.max(dim=1)
        routes = [self.route_names[int(i)] if float(m) >= 0 else "abstain" for m, i in zip(best, index, strict=True)]
        return routes, scores


# ----------------------------------------------------------------------------- evaluation
def normalize_answer(text: str) -> str:
    """Lower-case, drop punctuation and the articles a/an/the, collapse whitespace (SQuAD's normalisation)."""
    if not isinstance(text, str):
        raise TypeError(f"normalize_answer: text must be a str, got {type(text).__name__}")
    text = re.sub(r"[^\w\s]", " ", text.lower())
    return " ".join(w for w in text.split() if w not in ("a", "an", "the"))


def exact_match(predictions: Sequence[str | None], references: Sequence[str]) -> float:
    """Fraction of predictions equal to their reference after :func:`normalize_answer` (``None``, an
    abstention, never matches)."""
    if isinstance(predictions, str) or isinstance(references, str) or len(predictions) != len(references) \
            or not references:
        raise ValueError("exact_match: predictions and references must be non-empty sequences of equal length")
    hits = [p is not None and normalize_answer(p) == normalize_answer(r) for p, r in zip(predictions, references,
                                                                                        strict=True)]
    return sum(hits) / len(hits)


class ReliabilityBins(NamedTuple):
    """Per-bin statistics of a reliability diagram: ``edges`` ``(num_bins + 1,)``; ``confidence`` and
    ``accuracy`` ``(num_bins,)`` (NaN where a bin is empty); ``count`` ``(num_bins,)`` int64."""

    edges: torch.Tensor
    confidence: torch.Tensor
    accuracy: torch.Tensor
    count: torch.Tensor


def reliability_bins(confidence: torch.Tensor, correct: torch.Tensor, num_bins: int = 10) -> ReliabilityBins:
    """Group predictions into ``num_bins`` equal-width confidence bins ``(e_{b-1}, e_b]`` (the first also holds 0).

    ``confidence`` ``(n,)`` in [0, 1]; ``correct`` ``(n,)`` bool or 0/1. For each bin: the mean confidence,
    the accuracy and the number of predictions.
    """
    fn = "reliability_bins"
    confidence = _check_probability_like("confidence", confidence, fn).double().cpu()
    correct = _check_probability_like("correct", correct, fn).double().cpu()
    if correct.shape != confidence.shape:
        raise ValueError(f"{fn}: correct must have the shape of confidence {tuple(confidence.shape)}, "
                         f"got {tuple(correct.shape)}")
    if (confidence < 0).any() or (confidence > 1).any() or not torch.isfinite(confidence).all():
        raise ValueError(f"{fn}: confidence must lie in [0, 1]")
    if not ((correct == 0) | (correct == 1)).all():
        raise ValueError(f"{fn}: correct must hold only 0/1 or booleans")
    if isinstance(num_bins, bool) or not isinstance(num_bins, int) or num_bins < 1:
        raise ValueError(f"{fn}: num_bins must be a positive int, got {num_bins!r}")
    edges = torch.linspace(0, 1, num_bins + 1, dtype=torch.float64)
    index = torch.bucketize(confidence, edges[1:-1], right=False)  # e_{b-1} < c <= e_b  ->  b
    count = torch.bincount(index, minlength=num_bins)
    total_conf = torch.zeros(num_bins, dtype=torch.float64).index_add_(0, index, confidence)
    total_acc = torch.zeros(num_bins, dtype=torch.float64).index_add_(0, index, correct)
    denom = count.double()
    return ReliabilityBins(edges, total_conf / denom, total_acc / denom, count)


def expected_calibration_error(confidence: torch.Tensor, correct: torch.Tensor, num_bins: int = 10) -> float:
    r"""ECE :math:`= \sum_b \frac{n_b}{n}\,\lvert \operatorname{acc}_b - \operatorname{conf}_b \rvert` over the
    bins of :func:`reliability_bins` (empty bins contribute nothing)."""
    bins = reliability_bins(confidence, correct, num_bins)
    full = bins.count > 0
    weights = bins.count[full].double() / bins.count.sum()
    return float((weights * (bins.accuracy[full] - bins.confidence[full]).abs()).sum())


# ----------------------------------------------------------------------------- the VQA component
VQAFunction = Callable[[torch.Tensor, Sequence[str]], tuple[list[str], torch.Tensor]]


def vlm_answerer(model: Any, vocab: WordVocab, max_new_tokens: int = 4, batch_size: int = 256) -> VQAFunction:
    """Wrap chapter 14's :class:`mmbook.vlm.VisionLanguageModel` as the assistant's VQA component.

    The returned function maps ``images`` ``(batch, 3, 32, 32)`` in [0, 1] and ``batch`` questions to
    ``(answers, confidences)``: the greedy answer (beam search with one beam) and its probability
    :math:`\\prod_t p(w_t \\mid \\ldots)` including the closing ``<eos>``, ``(batch,)`` float64.
    """
    from mmbook.vlm import VisionLanguageModel

    if not isinstance(model, VisionLanguageModel):
        raise TypeError(f"vlm_answerer: model must be a VisionLanguageModel, got {type(model).__name__}")
    if not isinstance(vocab, WordVocab) or len(vocab) != model.vocab_size:
        raise ValueError(f"vlm_answerer: vocab must be the model's WordVocab ({model.vocab_size} words)")
    max_new_tokens = positive_int("max_new_tokens", max_new_tokens, "vlm_answerer")
    batch_size = positive_int("batch_size", batch_size, "vlm_answerer")

    def answer(images: torch.Tensor, questions: Sequence[str]) -> tuple[list[str], torch.Tensor]:
        if isinstance(questions, str) or not isinstance(images, torch.Tensor) or images.ndim != 4 \
                or images.shape[0] != len(questions):
            raise ValueError(f"vqa: need images (batch, 3, 32, 32) and one question per image, got "
                             f"{getattr(images, 'shape', type(images).__name__)} and "
                             f"{len(questions) if not isinstance(questions, str) else 'a string'}")
        encoded = [vocab.encode(q) for q in questions]
        answers: list[str] = [""] * len(questions)
        confidence = torch.zeros(len(questions), dtype=torch.float64)
        groups: dict[int, list[int]] = {}
        for i, ids in enumerate(encoded):  # equal prompt lengths batch together
            groups.setdefault(len(ids), []).append(i)
        for length in sorted(groups):
            for start in range(0, len(groups[length]), batch_size):
                rows = groups[length][start: start + batch_size]
                prompt = torch.tensor([encoded[i] for i in rows], dtype=torch.long, device=model.device)
                tokens, scores = model.beam_search(images[rows].to(model.device), prompt, 1, max_new_tokens)
                for row, toks, score in zip(rows, tokens.cpu().tolist(), scores.cpu(), strict=True):
                    toks = toks[: toks.index(WordVocab.EOS)] if WordVocab.EOS in toks else toks
                    answers[row] = vocab.decode([t for t in toks if t < len(vocab)])
                    confidence[row] = float(score.exp())
        return answers, confidence

    return answer


# ----------------------------------------------------------------------------- the assistant
class Reply(NamedTuple):
    """The assistant's answer to one question.

    ``route``: ``"vision"``, ``"docs"`` or ``"abstain"``; ``answer``: the short answer (a word for
    the picture, a topic title for the documentation; ``None`` when the assistant abstains);
    ``confidence`` in the component's own units (answer probability, cosine similarity);
    ``text``: the sentence shown to the user; ``transcript``: what the recogniser heard (spoken
    questions only); ``guess``: the best guess even when abstaining.
    """

    route: str
    answer: str | None
    confidence: float
    text: str
    transcript: str | None = None
    guess: str | None = None


class Assistant:
    """Routes each question to visual question answering or to retrieval, or abstains.

    * ``embed(texts) -> (len(texts), dim)``: sentence vectors (e.g. MiniLM via
      :func:`mmbook.encoders.sentence_embeddings`), used by the router and the document store;
    * ``router``: a :class:`Router` over the same embedding space;
    * ``store``: a :class:`mmbook.retrieval.DocumentStore`;
    * ``vqa(images, questions) -> (answers, confidences)``: e.g. :func:`vlm_answerer`;
    * ``recognizer``: a :class:`TemplateRecognizer` for spoken questions (optional);
    * ``vqa_threshold`` / ``docs_threshold``: abstain when the answer probability / the retrieval
      similarity is below them.
    """

    def __init__(self, embed: Callable[[list[str]], torch.Tensor], router: Router, store: DocumentStore,
                 vqa: VQAFunction, recognizer: TemplateRecognizer | None = None, vqa_threshold: float = 0.0,
                 docs_threshold: float = 0.0) -> None:
        fn = "Assistant"
        for name, value, kind in (("router", router, Router), ("store", store, DocumentStore)):
            if not isinstance(value, kind):
                raise TypeError(f"{fn}: {name} must be a {kind.__name__}, got {type(value).__name__}")
        for name, value in (("embed", embed), ("vqa", vqa)):
            if not callable(value):
                raise TypeError(f"{fn}: {name} must be callable, got {type(value).__name__}")
        if recognizer is not None and not isinstance(recognizer, TemplateRecognizer):
            raise TypeError(f"{fn}: recognizer must be a TemplateRecognizer or None, got {type(recognizer).__name__}")
        self.embed, self.router, self.store, self.vqa, self.recognizer = embed, router, store, vqa, recognizer
        # a NaN threshold would never abstain ("c < nan" is False)
        self.vqa_threshold = check_number("vqa_threshold", vqa_threshold, fn)
        self.docs_threshold = check_number("docs_threshold", docs_threshold, fn)

    def answer_many(self, questions: Sequence[str | None], images: Sequence[torch.Tensor | None] | None = None,
                    audio: Sequence[torch.Tensor | None] | None = None) -> list[Reply]:
        """Answer a batch: ``questions[i]`` typed (or ``None`` when ``audio[i]`` holds a spoken question
        ``(time,)`` at the recogniser's sample rate), about ``images[i]`` ``(3, 32, 32)`` or ``None``."""
        fn = "Assistant.answer_many"
        if isinstance(questions, str) or not isinstance(questions, Sequence) or not questions:
            raise TypeError(f"{fn}: questions must be a non-empty sequence (str or None per item)")
        n = len(questions)
        images = [None] * n if images is None else list(images)
        audio = [None] * n if audio is None else list(audio)
        if len(images) != n or len(audio) != n:
            raise ValueError(f"{fn}: images and audio must have one entry per question ({n}), got {len(images)} "
                             f"and {len(audio)}")
        texts: list[str | None] = list(questions)
        transcripts: list[str | None] = [None] * n
        spoken = [i for i in range(n) if audio[i] is not None]
        for i in range(n):
            if (texts[i] is None) == (audio[i] is None):
                raise ValueError(f"{fn}: item {i} needs exactly one of a typed question and audio")
            if texts[i] is not None and (not isinstance(texts[i], str) or not texts[i].strip()):
                raise ValueError(f"{fn}: questions[{i}] must be a non-empty string or None, got {texts[i]!r}")
            if images[i] is not None and (not isinstance(images[i], torch.Tensor) or images[i].ndim != 3):
                raise ValueError(f"{fn}: images[{i}] must be a tensor (3, H, W) or None, got "
                                 f"{getattr(images[i], 'shape', type(images[i]).__name__)}")
        if spoken:
            if self.recognizer is None:
                raise ValueError(f"{fn}: spoken questions need a recognizer")
            heard, _ = self.recognizer.transcribe([audio[i] for i in spoken])
            for i, t in zip(spoken, heard, strict=True):
                texts[i] = transcripts[i] = t
        replies: list[Reply | None] = [None] * n
        for i in range(n):
            if texts[i] is None:
                replies[i] = Reply("abstain", None, 0.0, "Sorry, I did not catch that. Could you type the question?")
        known = [i for i in range(n) if texts[i] is not None]
        if known:
            vectors = self.embed([texts[i] for i in known])
            routes, route_scores = self.router.route(vectors)
            for i, r, s in zip(known, routes, route_scores.max(dim=1).values, strict=True):
                if r == "abstain":
                    replies[i] = Reply("abstain", None, float(s), "Sorry, I can only answer questions about the "
                                       "picture or about Python's documentation.", transcripts[i])
                elif r == "vision" and images[i] is None:
                    replies[i] = Reply("vision", None, float(s), "That looks like a question about a picture: "
                                       "please attach one.", transcripts[i])
            docs = [j for j, i in enumerate(known) if replies[i] is None and routes[j] == "docs"]
            if docs:
                hits = self.store.search(vectors[docs], k=1)
                for j, (hit,) in zip(docs, hits, strict=True):
                    i = known[j]
                    first = hit.text.partition(": ")[2]
                    text = f"From the Python documentation, topic '{hit.title}': {first}"
                    if hit.score < self.docs_threshold:
                        replies[i] = Reply("docs", None, hit.score, f"I am not sure; the closest topic is "
                                           f"'{hit.title}'.", transcripts[i], hit.title)
                    else:
                        replies[i] = Reply("docs", hit.title, hit.score, text, transcripts[i], hit.title)
            vision = [i for j, i in enumerate(known) if replies[i] is None and routes[j] == "vision"]
            if vision:
                batch = torch.stack([images[i].float() for i in vision])
                answers, confidence = self.vqa(batch, [texts[i] for i in vision])
                for i, a, c in zip(vision, answers, confidence.tolist(), strict=True):
                    if c < self.vqa_threshold:
                        replies[i] = Reply("vision", None, c, f"I am not sure (my best guess is '{a}').",
                                           transcripts[i], a)
                    else:
                        replies[i] = Reply("vision", a, c, f"{a[:1].upper()}{a[1:]}.", transcripts[i], a)
        return replies  # type: ignore[return-value]

    def ask(self, question: str | None = None, *, image: torch.Tensor | None = None,
            audio: torch.Tensor | None = None) -> Reply:
        """Answer one typed ``question`` or spoken ``audio`` ``(time,)``, about ``image`` ``(3, H, W)`` or none."""
        return self.answer_many([question], [image], [audio])[0]


# ----------------------------------------------------------------------------- interfaces
def format_reply(reply: Reply) -> str:
    """One line for a chat log: the heard transcript (if spoken), the reply text, the route and confidence."""
    if not isinstance(reply, Reply):
        raise TypeError(f"format_reply: reply must be a Reply, got {type(reply).__name__}")
    heard = f'(heard: "{reply.transcript}") ' if reply.transcript else ""
    return f"{heard}{reply.text} [{reply.route}, confidence {reply.confidence:.2f}]"


def chat(assistant: Assistant, question: str | None = None, *, image: torch.Tensor | None = None,
         audio: torch.Tensor | None = None) -> str:
    """The plain-function interface: ask ``assistant`` one question and return the formatted reply."""
    if not isinstance(assistant, Assistant):
        raise TypeError(f"chat: assistant must be an Assistant, got {type(assistant).__name__}")
    return format_reply(assistant.ask(question, image=image, audio=audio))


def _png(image: torch.Tensor) -> bytes:
    import matplotlib.image

    buffer = io.BytesIO()
    matplotlib.image.imsave(buffer, image.permute(1, 2, 0).clamp(0, 1).cpu().numpy(), format="png")
    return buffer.getvalue()


_NO_PICTURE = "(no picture)"
_PLACEHOLDER = "Ask about the picture or about Python..."


def _chat_static_html(pictures: Sequence[str]) -> str:
    """A static picture of :func:`chat_widget` (picture menu, question field, button) and how to use it.

    It is what a page shows where the widget cannot run: the HTML book, or a notebook whose kernel has not run
    the cell (an untrusted notebook in JupyterLab shows HTML, not widgets).
    """
    field = "display:inline-block;border:1px solid #9e9e9e;border-radius:2px;padding:1px 8px;margin:2px 4px"
    names = "".join(f"<li>{html.escape(name)}</li>" for name in pictures)
    listing = (f'<p style="margin:4px 0 0 0">Pictures in the menu:</p><ul style="margin:0">{names}</ul>'
               if pictures else "")
    return (
        '<div class="mmbook-chat" style="border:1px solid #d0d0d0;border-radius:4px;padding:6px 10px;'
        'max-width:640px">'
        f'<div>Picture: <span style="{field}">{html.escape(_NO_PICTURE)} &#9662;</span></div>'
        f'<div>You: <span style="{field};min-width:55%;color:#757575">{html.escape(_PLACEHOLDER)}</span>'
        f'<span style="{field};background:#1976d2;border-color:#1976d2;color:#ffffff">Ask</span></div>'
        '<div style="font-size:90%;color:#555555"><p style="margin:6px 0 0 0"><em>The chat box appears here when '
        "the notebook runs: pick a picture, type a question and press Enter or <b>Ask</b>; each question and its "
        f"reply are added below it.</em></p>{listing}</div></div>"
    )


def chat_widget(assistant: Assistant, images: Mapping[str, torch.Tensor] | None = None) -> Any | None:
    """An ipywidgets chat box (question field, picture menu with preview, log), or ``None`` without ipywidgets.

    ``images`` maps names to pictures ``(3, H, W)`` in [0, 1] the user can ask about. Each question
    goes through :func:`chat`, so the widget and the plain function give the same replies. Displayed, the
    box also carries a static HTML picture of itself and a one-line summary (``text/html``, ``text/plain``),
    which show where the widget cannot run: the HTML book, a notebook not run yet.
    """
    if not isinstance(assistant, Assistant):
        raise TypeError(f"chat_widget: assistant must be an Assistant, got {type(assistant).__name__}")
    images = dict(images or {})
    for name, img in images.items():
        if not isinstance(img, torch.Tensor) or img.ndim != 3:
            raise ValueError(f"chat_widget: images[{name!r}] must be a tensor (3, H, W), got "
                             f"{getattr(img, 'shape', type(img).__name__)}")
    try:
        import ipywidgets as widgets
    except ImportError:
        return None
    none = _NO_PICTURE
    choice = widgets.Dropdown(options=[none, *images], value=none, description="Picture:")
    preview = widgets.Image(format="png", width=96, height=96)
    box = widgets.Text(placeholder=_PLACEHOLDER, description="You:",
                       continuous_update=False, layout=widgets.Layout(width="70%"))
    send = widgets.Button(description="Ask", button_style="primary")
    log = widgets.HTML(value="")

    def show_picture(_: object = None) -> None:
        preview.value = _png(images[choice.value]) if choice.value != none else b""
        preview.layout.display = None if choice.value != none else "none"

    def on_ask(_: object = None) -> None:
        question = box.value.strip()
        if not question:
            return
        image = images.get(choice.value)
        answer = chat(assistant, question, image=image)
        log.value += (f"<p><b>You</b> ({html.escape(choice.value)}): {html.escape(question)}<br>"
                      f"<b>Assistant</b>: {html.escape(answer)}</p>")
        box.value = ""

    choice.observe(show_picture, names="value")
    send.on_click(on_ask)
    box.observe(on_ask, names="value")  # Enter (or leaving the field) asks, like the button
    show_picture()
    static = _chat_static_html(list(images))
    summary = f"Chat box of the assistant (ipywidgets; run the notebook to use it), pictures: {len(images)}"

    class ChatBox(widgets.VBox):
        """The chat box; its display also carries the static picture and the summary line."""

        def _repr_mimebundle_(self, **kwargs: Any) -> dict:
            bundle = super()._repr_mimebundle_(**kwargs)
            bundle.update({"text/plain": summary, "text/html": static})
            return bundle

    return ChatBox([widgets.HBox([choice, preview]), widgets.HBox([box, send]), log])
