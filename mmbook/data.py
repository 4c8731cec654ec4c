"""The book's multimodal datasets, generated offline and deterministically from a seed.

* :func:`audio_visual_digits` — each sample a handwritten digit image (scikit-learn's
  ``load_digits``), the digit spoken (synthesised with espeak-ng in many voices, rates and
  pitches, plus noise) and its word, aligned by label. Train and test never share an image or
  a recording.
* :func:`audio_visual_digit_sums` — an image of one digit and a recording of another, drawn
  independently, labelled with their sum mod 10: a label that neither modality determines alone.
* :func:`shapes_scenes` — small RGB images of coloured shapes on a grid, with captions
  ("a red circle above a blue square") and question/answer pairs about colour, shape, count,
  existence and spatial relation.

Synthesised recordings are cached under ``data/cache/`` (git-ignored; rebuilt on demand).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from mmbook.checks import check_bool, check_instance, check_int, check_number
from mmbook.core import numpy_rng, torch_generator
from mmbook.core import seed as _book_seed

__all__ = [
    "ANSWERS",
    "COLOURS",
    "DIGIT_WORDS",
    "QUESTION_KINDS",
    "RELATIONS",
    "SHAPES",
    "AudioVisualDigitSums",
    "AudioVisualDigits",
    "Scene",
    "ShapeObject",
    "ShapesScenes",
    "WordVocab",
    "audio_visual_digit_sums",
    "audio_visual_digits",
    "cache_dir",
    "caption_truth",
    "converse_caption",
    "describe_scene",
    "render_scene",
    "scene_questions",
    "shapes_scenes",
    "spoken_digit_recordings",
    "swap_attributes",
    "swap_relation",
]

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def cache_dir() -> Path:
    """The cache folder, :func:`mmbook.cache.cache_dir` (``data/cache`` next to the package; git-ignored)."""
    from mmbook.cache import cache_dir as _cache_dir

    return _cache_dir()


_check_int = check_int


# ----------------------------------------------------------------------------- audio-visual digits
def spoken_digit_recordings(
    recordings_per_digit: int = 40, sample_rate: int = 16000, duration: float = 1.0, seed: int = 0
) -> dict[str, object]:
    """Synthesise ``recordings_per_digit`` distinct recordings of each spoken digit word.

    Recording ``i`` of every digit uses voice ``VOICE_VARIANTS[(i + digit) % 17]``, a speaking
    rate drawn uniformly from 110..230 words per minute and a pitch from 25..75 (seeded). Each
    waveform is centred in a window of ``duration`` seconds (zero-padded or trimmed).

    Returns a dict with ``waveforms`` ``(10 * R, num_samples)`` float32, ``labels``
    ``(10 * R,)`` int64, ``voices`` (list of str), ``rates`` and ``pitches`` ``(10 * R,)``,
    and ``sample_rate``. Cached under ``data/cache/``.
    """
    fn = "spoken_digit_recordings"
    recordings_per_digit = _check_int("recordings_per_digit", recordings_per_digit, fn, 1, 1000)
    sample_rate = _check_int("sample_rate", sample_rate, fn, 4000, 48000)
    seed = _check_int("seed", seed, fn, 0)
    check_number("duration", duration, fn, 0.2, 5.0)
    from mmbook.cache import cache_path, load_arrays, save_arrays
    from mmbook.speech import VOICE_VARIANTS, synthesize_many

    key = {"what": "spoken_digits", "v": 1, "r": recordings_per_digit, "sr": sample_rate, "d": duration,
           "s": seed}
    path = cache_path("spoken_digits", key)
    n, num_samples = 10 * recordings_per_digit, int(round(duration * sample_rate))
    if path.is_file():
        z = load_arrays(path, key, {"waveforms": ((n, num_samples), np.float32), "labels": ((n,), np.int64),
                                    "voices": ((n,), None), "rates": ((n,), np.int64), "pitches": ((n,), np.int64)},
                        fn=fn)
        return {
            "waveforms": torch.from_numpy(z["waveforms"]),
            "labels": torch.from_numpy(z["labels"]),
            "voices": [str(v) for v in z["voices"]],
            "rates": torch.from_numpy(z["rates"]),
            "pitches": torch.from_numpy(z["pitches"]),
            "sample_rate": sample_rate,
        }
    rng = numpy_rng(seed)
    jobs, labels, voices, rates, pitches = [], [], [], [], []
    for digit, word in enumerate(DIGIT_WORDS):
        for i in range(recordings_per_digit):
            voice = VOICE_VARIANTS[(i + digit) % len(VOICE_VARIANTS)]
            rate, pitch = int(rng.integers(110, 231)), int(rng.integers(25, 76))
            jobs.append({"text": word, "voice": voice, "rate": rate, "pitch": pitch})
            labels.append(digit)
            voices.append(voice)
            rates.append(rate)
            pitches.append(pitch)
    raw = synthesize_many(jobs, sample_rate=sample_rate)
    num_samples = int(round(duration * sample_rate))
    waves = np.zeros((len(raw), num_samples), dtype=np.float32)
    for row, wave in enumerate(raw):
        w = wave.numpy()
        nonzero = np.flatnonzero(np.abs(w) > 1e-3)  # trim espeak's leading/trailing silence
        if nonzero.size:
            w = w[nonzero[0]: nonzero[-1] + 1]
        w = w[:num_samples]
        start = (num_samples - w.size) // 2
        waves[row, start: start + w.size] = w
    result = {
        "waveforms": waves,
        "labels": np.array(labels, dtype=np.int64),
        "voices": np.array(voices),
        "rates": np.array(rates, dtype=np.int64),
        "pitches": np.array(pitches, dtype=np.int64),
    }
    save_arrays(path, key, result)
    return {
        "waveforms": torch.from_numpy(waves),
        "labels": torch.from_numpy(result["labels"]),
        "voices": voices,
        "rates": torch.from_numpy(result["rates"]),
        "pitches": torch.from_numpy(result["pitches"]),
        "sample_rate": sample_rate,
    }


class AudioVisualDigits(Dataset):
    """Aligned (image, speech, word) triples of the ten digits; see :func:`audio_visual_digits`.

    Item ``i`` is a dict: ``image`` ``(1, 8, 8)`` float32 in [0, 1], ``waveform``
    ``(num_samples,)`` float32 (the recording plus this item's noise), ``label`` int64
    tensor, ``word`` str, ``recording`` int (index into ``recordings``).
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        recording_index: torch.Tensor,
        recordings: torch.Tensor,
        sample_rate: int,
        snr_db: torch.Tensor,
        noise_seed: int,
    ) -> None:
        self.images, self.labels = images, labels
        self.recording_index, self.recordings = recording_index, recordings
        self.sample_rate, self.snr_db, self.noise_seed = sample_rate, snr_db, noise_seed

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def waveform(self, index: int) -> torch.Tensor:
        """The noisy waveform of item ``index``: recording + Gaussian noise at ``snr_db[index]``."""
        index = _check_item(index, len(self), "AudioVisualDigits.waveform")  # -1 gets item n-1's noise
        clean = self.recordings[self.recording_index[index]]
        if not torch.isfinite(self.snr_db[index]):
            return clean.clone()
        power = clean.pow(2).mean().clamp_min(1e-12)
        noise_power = power / (10.0 ** (self.snr_db[index] / 10.0))
        gen = torch_generator((self.noise_seed * 1_000_003 + int(index)) % 2**32)
        return clean + torch.randn(clean.shape, generator=gen) * noise_power.sqrt()

    def waveforms(self) -> torch.Tensor:
        """All noisy waveforms stacked: ``(len(self), num_samples)``."""
        return torch.stack([self.waveform(i) for i in range(len(self))])

    def __getitem__(self, index: int) -> dict[str, object]:
        index = _check_item(index, len(self), "AudioVisualDigits")
        label = self.labels[index]
        return {
            "image": self.images[index],
            "waveform": self.waveform(index),
            "label": label,
            "word": DIGIT_WORDS[int(label)],
            "recording": int(self.recording_index[index]),
        }


def _digit_images_split(seed: int, test_fraction: float) -> tuple[torch.Tensor, torch.Tensor, np.ndarray, np.ndarray]:
    """scikit-learn's digits as ``(1797, 1, 8, 8)`` images in [0, 1] and ``(1797,)`` labels, with the train and
    test indices of a split stratified by label (``test_fraction``, seeded)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.tensor(digits.target, dtype=torch.int64)
    idx_train, idx_test = train_test_split(
        np.arange(len(labels)), test_size=test_fraction, stratify=digits.target, random_state=_book_seed(seed)
    )
    return images, labels, idx_train, idx_test


def _recording_pools(rec: dict[str, object], split: str, seed: int, test_fraction: float, recordings_per_digit: int,
                     held_out_voices: Sequence[str] | None, fn: str) -> dict[int, np.ndarray]:
    """For each digit, the indices into ``rec`` (:func:`spoken_digit_recordings`) of the recordings that ``split``
    may use: a seeded ``test_fraction`` share of each digit's recordings for ``"test"`` and the rest otherwise, or,
    with ``held_out_voices``, the recordings in those voices for ``"test"`` and the others otherwise."""
    rng = numpy_rng(seed)
    rec_labels = rec["labels"].numpy()
    n_test = max(1, int(round(test_fraction * recordings_per_digit)))
    pools = {}
    held = None if held_out_voices is None else np.isin(np.array(rec["voices"]), list(held_out_voices))
    for digit in range(10):
        rows = np.flatnonzero(rec_labels == digit)
        if held is None:
            perm = rng.permutation(rows)
            pools[digit] = np.sort(perm[:n_test] if split == "test" else perm[n_test:])
            continue
        pools[digit] = rows[held[rows]] if split == "test" else rows[~held[rows]]
        if pools[digit].size == 0:
            raise ValueError(f"{fn}: with recordings_per_digit={recordings_per_digit}, no recording of digit "
                             f"{digit} is in the {split} voices (held_out_voices={list(held_out_voices)!r}); "
                             f"use more recordings per digit")
    return pools


def audio_visual_digits(
    split: str = "train",
    seed: int = 0,
    recordings_per_digit: int = 40,
    test_fraction: float = 0.25,
    sample_rate: int = 16000,
    duration: float = 1.0,
    snr_db: tuple[float, float] | None = (10.0, 30.0),
    held_out_voices: Sequence[str] | None = None,
) -> AudioVisualDigits:
    """The audio-visual digits, one split.

    Images: scikit-learn's 1,797 handwritten digits (8x8, scaled to [0, 1]), split
    stratified by label with ``test_fraction`` (seeded). Speech: :func:`spoken_digit_recordings`;
    for each digit, a ``test_fraction`` share of its recordings is reserved for the test
    split, so train and test never share a recording (they do share voices: a test recording
    is usually spoken by a voice that also speaks the same digit in training). With
    ``held_out_voices`` (names from :data:`mmbook.speech.VOICE_VARIANTS`) the recordings are split
    by voice instead: the test split draws only from recordings in those voices (all of them),
    the training split only from the others, so no voice is heard in both. Each image is paired
    with a random recording of the same digit from its own split, and gets its own Gaussian noise
    at a signal-to-noise ratio drawn uniformly from ``snr_db`` (``None``: clean audio).
    """
    fn = "audio_visual_digits"
    if split not in ("train", "test"):
        raise ValueError(f"{fn}: split must be 'train' or 'test', got {split!r}")
    seed = _check_int("seed", seed, fn, 0)
    if not isinstance(test_fraction, float) or not 0.05 <= test_fraction <= 0.5:
        raise ValueError(f"{fn}: test_fraction must be a float in [0.05, 0.5], got {test_fraction!r}")
    if snr_db is not None:  # a NaN bound would give NaN ratios, and NaN meant clean audio
        if not isinstance(snr_db, Sequence) or isinstance(snr_db, str) or len(snr_db) != 2:
            raise TypeError(f"{fn}: snr_db must be None or a (low, high) pair of numbers, got {snr_db!r}")
        low, high = (check_number(f"snr_db[{i}]", v, fn) for i, v in enumerate(snr_db))
        if low > high:
            raise ValueError(f"{fn}: snr_db must be None or a (low, high) pair with low <= high, got {snr_db!r}")
    recordings_per_digit = _check_int("recordings_per_digit", recordings_per_digit, fn, 4, 1000)
    if held_out_voices is not None:
        from mmbook.speech import VOICE_VARIANTS

        if isinstance(held_out_voices, str) or not isinstance(held_out_voices, Sequence) or not held_out_voices:
            raise TypeError(f"{fn}: held_out_voices must be None or a non-empty sequence of voice names such as "
                            f"['whisper'], got {held_out_voices!r}")
        bad = [v for v in held_out_voices if v not in VOICE_VARIANTS]
        if bad or len(set(held_out_voices)) != len(held_out_voices) or len(held_out_voices) >= len(VOICE_VARIANTS):
            raise ValueError(f"{fn}: held_out_voices must be distinct names from {VOICE_VARIANTS}, leaving at "
                             f"least one voice for training; got {held_out_voices!r}")
    images, labels, idx_train, idx_test = _digit_images_split(seed, test_fraction)
    idx = np.sort(idx_train if split == "train" else idx_test)

    rec = spoken_digit_recordings(recordings_per_digit, sample_rate, duration, seed=0)
    pools = _recording_pools(rec, split, seed, test_fraction, recordings_per_digit, held_out_voices, fn)
    pair_rng = numpy_rng(seed * 7919 + (1 if split == "test" else 0))
    chosen = np.array([pair_rng.choice(pools[int(labels[i])]) for i in idx], dtype=np.int64)
    if snr_db is None:
        snr = torch.full((len(idx),), float("inf"))
    else:
        snr = torch.from_numpy(pair_rng.uniform(snr_db[0], snr_db[1], size=len(idx)).astype(np.float32))
    return AudioVisualDigits(
        images=images[idx],
        labels=labels[idx],
        recording_index=torch.from_numpy(chosen),
        recordings=rec["waveforms"],
        sample_rate=sample_rate,
        snr_db=snr,
        noise_seed=seed * 2 + (1 if split == "test" else 0),
    )


class AudioVisualDigitSums(AudioVisualDigits):
    """Pairs of a handwritten digit ``a`` and an independently drawn spoken digit ``b``, labelled
    ``(a + b) mod 10``; see :func:`audio_visual_digit_sums`.

    ``labels`` ``(N,)`` is the target ``(image_digits + spoken_digits) % 10``; ``image_digits`` and
    ``spoken_digits`` ``(N,)`` int64 are what each modality shows. Item ``i`` is the dict of
    :class:`AudioVisualDigits` with ``word`` the *spoken* word, plus ``image_digit`` and ``spoken_digit``.
    """

    def __init__(self, images: torch.Tensor, image_digits: torch.Tensor, spoken_digits: torch.Tensor,
                 recording_index: torch.Tensor, recordings: torch.Tensor, sample_rate: int, snr_db: torch.Tensor,
                 noise_seed: int) -> None:
        super().__init__(images, (image_digits + spoken_digits) % 10, recording_index, recordings, sample_rate,
                         snr_db, noise_seed)
        self.image_digits, self.spoken_digits = image_digits, spoken_digits

    def __getitem__(self, index: int) -> dict[str, object]:
        index = _check_item(index, len(self), "AudioVisualDigitSums")
        item = super().__getitem__(index)
        spoken = int(self.spoken_digits[index])
        return item | {"word": DIGIT_WORDS[spoken], "image_digit": int(self.image_digits[index]),
                       "spoken_digit": spoken}


def audio_visual_digit_sums(
    split: str = "train",
    seed: int = 0,
    pairs_per_image: int = 3,
    val_fraction: float = 0.2,
    recordings_per_digit: int = 40,
    test_fraction: float = 0.25,
    sample_rate: int = 16000,
    duration: float = 1.0,
    snr_db: tuple[float, float] | None = (10.0, 30.0),
) -> AudioVisualDigitSums:
    """A task that needs both modalities: an image of digit ``a``, a recording of digit ``b``, label ``(a + b) mod 10``.

    The images are those of :func:`audio_visual_digits` (same ``seed`` and ``test_fraction``): ``"test"`` takes its
    test images, and its training images are split again, stratified by digit, into ``"train"`` and ``"val"``
    (``val_fraction`` of them, seeded), so the three splits never share an image. Each image appears in
    ``pairs_per_image`` examples; each example draws the spoken digit ``b`` uniformly from 0..9, independently of
    the image, and one recording of ``b`` from the split's recordings (``"test"`` uses the test recordings of
    :func:`audio_visual_digits`, ``"train"`` and ``"val"`` the others), with its own Gaussian noise at a
    signal-to-noise ratio drawn uniformly from ``snr_db`` (``None``: clean). Because ``b`` is uniform and
    independent of ``a``, the label is independent of either modality alone. Returns an
    :class:`AudioVisualDigitSums` of ``pairs_per_image`` times the split's number of images.
    """
    fn = "audio_visual_digit_sums"
    if split not in ("train", "val", "test"):
        raise ValueError(f"{fn}: split must be 'train', 'val' or 'test', got {split!r}")
    seed = _check_int("seed", seed, fn, 0)
    pairs_per_image = _check_int("pairs_per_image", pairs_per_image, fn, 1, 100)
    for name, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not isinstance(value, float) or not 0.05 <= value <= 0.5:
            raise ValueError(f"{fn}: {name} must be a float in [0.05, 0.5], got {value!r}")
    if snr_db is not None:
        if not isinstance(snr_db, Sequence) or isinstance(snr_db, str) or len(snr_db) != 2:
            raise TypeError(f"{fn}: snr_db must be None or a (low, high) pair of numbers, got {snr_db!r}")
        low, high = (check_number(f"snr_db[{i}]", v, fn) for i, v in enumerate(snr_db))
        if low > high:
            raise ValueError(f"{fn}: snr_db must be None or a (low, high) pair with low <= high, got {snr_db!r}")
    recordings_per_digit = _check_int("recordings_per_digit", recordings_per_digit, fn, 4, 1000)
    from sklearn.model_selection import train_test_split

    images, labels, idx_train, idx_test = _digit_images_split(seed, test_fraction)
    if split == "test":
        idx = np.sort(idx_test)
    else:
        idx_train = np.sort(idx_train)
        idx_fit, idx_val = train_test_split(idx_train, test_size=val_fraction, stratify=labels[idx_train].numpy(),
                                            random_state=_book_seed(seed * 7919 + 5))
        idx = np.sort(idx_fit if split == "train" else idx_val)
    rec = spoken_digit_recordings(recordings_per_digit, sample_rate, duration, seed=0)
    pools = _recording_pools(rec, "test" if split == "test" else "train", seed, test_fraction, recordings_per_digit,
                             None, fn)
    part = ("train", "val", "test").index(split)
    pair_rng = numpy_rng(seed * 7919 + 11 + part)
    rows = np.repeat(idx, pairs_per_image)
    spoken = pair_rng.integers(0, 10, size=rows.size)
    chosen = np.array([pair_rng.choice(pools[int(b)]) for b in spoken], dtype=np.int64)
    if snr_db is None:
        snr = torch.full((rows.size,), float("inf"))
    else:
        snr = torch.from_numpy(pair_rng.uniform(snr_db[0], snr_db[1], size=rows.size).astype(np.float32))
    return AudioVisualDigitSums(
        images=images[rows],
        image_digits=labels[rows],
        spoken_digits=torch.from_numpy(spoken.astype(np.int64)),
        recording_index=torch.from_numpy(chosen),
        recordings=rec["waveforms"],
        sample_rate=sample_rate,
        snr_db=snr,
        noise_seed=seed * 3 + 100 + part,
    )


# ----------------------------------------------------------------------------- shapes scenes
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 160, 60),
    "blue": (50, 90, 230),
    "yellow": (235, 200, 30),
    "purple": (150, 60, 190),
}
SHAPES = ("circle", "square", "triangle")
RELATIONS = ("above", "below", "left of", "right of")
QUESTION_KINDS = ("colour", "shape", "count", "exists", "relation")
_NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
ANSWERS = tuple(COLOURS) + SHAPES + _NUMBER_WORDS[:5] + ("yes", "no")


@dataclass(frozen=True)
class ShapeObject:
    """One shape in a scene: its kind, colour and grid cell (row 0 is the top)."""

    shape: str
    colour: str
    row: int
    col: int

    @property
    def name(self) -> str:
        return f"{self.colour} {self.shape}"


@dataclass
class Scene:
    """A scene: objects on a ``grid`` x ``grid`` board, with per-object pixel jitter."""

    objects: list[ShapeObject]
    grid: int
    jitter: list[tuple[int, int, int]] = field(default_factory=list)  # (dy, dx, dsize) per object


def _check_item(index: object, n: int, fn: str) -> int:
    """A dataset index in ``[-n, n)`` (negative counts from the end, as for a list), returned in ``[0, n)``."""
    if isinstance(index, torch.Tensor) and index.numel() == 1 and not index.is_floating_point() \
            and index.dtype != torch.bool:
        index = int(index.item())
    if isinstance(index, (bool, np.bool_)) or not isinstance(index, (int, np.integer)):
        raise TypeError(f"{fn}: index must be an int, got {type(index).__name__}")
    if not -n <= index < n:
        raise IndexError(f"{fn}: index {index} out of range for {n} items")
    return int(index) % n


def _check_scene(scene: object, fn: str) -> Scene:
    check_instance("scene", scene, fn, Scene, "a Scene")
    for obj in scene.objects:
        if not isinstance(obj, ShapeObject) or obj.shape not in SHAPES or obj.colour not in COLOURS \
                or not (0 <= obj.row < scene.grid and 0 <= obj.col < scene.grid):
            raise ValueError(f"{fn}: scene objects must be ShapeObjects with a shape in {SHAPES}, a colour in "
                             f"{tuple(COLOURS)} and a cell inside the {scene.grid}x{scene.grid} grid, got {obj!r}")
    return scene


def _relation(a: ShapeObject, b: ShapeObject, vertical_first: bool) -> str:
    vertical = "above" if a.row < b.row else "below" if a.row > b.row else None
    horizontal = "left of" if a.col < b.col else "right of" if a.col > b.col else None
    if vertical and horizontal:
        return vertical if vertical_first else horizontal
    return vertical or horizontal  # type: ignore[return-value]


def _holds(a: ShapeObject, relation: str, b: ShapeObject) -> bool:
    return {"above": a.row < b.row, "below": a.row > b.row, "left of": a.col < b.col,
            "right of": a.col > b.col}[relation]


def describe_scene(scene: Scene, rng: np.random.Generator | None = None) -> str:
    """A caption: ``"a red circle"``, ``"a red circle above a blue square"`` or, for three or more
    objects, the relation between the first two followed by ``"and a green triangle"``."""
    objs = _check_scene(scene, "describe_scene").objects
    if not objs:
        raise ValueError("describe_scene: scene has no objects")
    check_instance("rng", rng, "describe_scene", (np.random.Generator, type(None)), "a numpy Generator or None")
    if len(objs) == 1:
        return f"a {objs[0].name}"
    vertical_first = True if rng is None else bool(rng.integers(0, 2))
    text = f"a {objs[0].name} {_relation(objs[0], objs[1], vertical_first)} a {objs[1].name}"
    for extra in objs[2:]:
        text += f" and a {extra.name}"
    return text


def _parse_caption(caption: object, fn: str, name: str = "captions") -> tuple[list[tuple[str, str]], str | None]:
    check_instance(name, caption, fn, str, "a str")
    colours, shapes = "|".join(COLOURS), "|".join(SHAPES)
    obj = rf"a ({colours}) ({shapes})"
    match = re.fullmatch(rf"{obj}(?: ({'|'.join(RELATIONS)}) {obj})?((?: and {obj})*)", caption)
    if match is None:
        raise ValueError(f"{fn}: {name} must look like 'a <colour> <shape>[ <relation> a <colour> <shape>]"
                         f"[ and a <colour> <shape> ...]' with a colour in {tuple(COLOURS)}, a shape in {SHAPES} "
                         f"and a relation in {RELATIONS}, got {caption!r}")
    named = [(match[1], match[2])] + ([(match[4], match[5])] if match[3] is not None else [])
    return named + re.findall(rf" and {obj}", match[6]), match[3]


def caption_truth(scenes: Sequence[Scene], captions: Sequence[str]) -> torch.Tensor:
    """Which captions are true of which scenes: ``(len(scenes), len(captions))`` bool, entry ``[i, j]`` true when
    every object caption ``j`` names is in scene ``i`` and, for ``"a <object> <relation> a <object>[ and a
    <object> ...]"``, the relation holds between the first two.

    A caption of the form :func:`describe_scene` writes is true of its own scene, and it can be true of others:
    ``"a red circle left of a blue square"`` also describes a scene with the red circle above *and* left of the
    blue square, and it means the same as ``"a blue square right of a red circle"``. A caption naming one object
    twice is never true (the objects of a scene are distinct).
    """
    fn = "caption_truth"
    for name, items in (("scenes", scenes), ("captions", captions)):
        if isinstance(items, str) or not isinstance(items, Sequence):
            raise TypeError(f"{fn}: {name} must be a sequence, got {type(items).__name__}")
    distinct = sorted(set(captions))  # a few hundred distinct captions at most: decide each once per scene
    column = {c: k for k, c in enumerate(distinct)}
    parsed = [_parse_caption(c, fn) for c in distinct]
    rows = []
    for scene in scenes:
        by_name = {(o.colour, o.shape): o for o in _check_scene(scene, fn).objects}
        rows.append([len(set(named)) == len(named) and all(n in by_name for n in named)
                     and (relation is None or _holds(by_name[named[0]], relation, by_name[named[1]]))
                     for named, relation in parsed])
    table = torch.tensor(rows, dtype=torch.bool).reshape(len(scenes), len(distinct))
    return table[:, [column[c] for c in captions]]


_CONVERSE = {"above": "below", "below": "above", "left of": "right of", "right of": "left of"}


def _related_pair(caption: object, fn: str) -> tuple[str, str, str, str]:
    """The two related objects of a caption, its relation and the rest (``" and a <object>"`` ...)."""
    named, relation = _parse_caption(caption, fn, "caption")
    if relation is None:
        raise ValueError(f"{fn}: caption must look like 'a <colour> <shape> <relation> a <colour> <shape>[ and a "
                         f"<colour> <shape> ...]' (two related objects), got {caption!r}")
    rest = "".join(f" and a {colour} {shape}" for colour, shape in named[2:])
    return " ".join(named[0]), relation, " ".join(named[1]), rest


def swap_relation(caption: str) -> str:
    """Swap the two objects around the relation: ``"a red circle left of a blue square"`` ->
    ``"a blue square left of a red circle"`` (further objects, ``" and a green triangle"``, are kept). The twin
    uses exactly the same words, and for a scene of two distinct objects it is false whenever the original is
    true (the compositionality test of chapter 13; with more objects, or two equal ones, it can be true as well).
    ``caption`` must follow the grammar of :func:`describe_scene` with two or more objects."""
    first, relation, second, rest = _related_pair(caption, "swap_relation")
    return f"a {second} {relation} a {first}{rest}"


def swap_attributes(caption: str) -> str:
    """Swap the colours of the two related objects: ``"a red circle left of a blue square"`` ->
    ``"a blue circle left of a red square"``. Same words again; the result equals the input when both objects
    have the same colour."""
    first, relation, second, rest = _related_pair(caption, "swap_attributes")
    (c1, s1), (c2, s2) = first.split(" "), second.split(" ")
    return f"a {c2} {s1} {relation} a {c1} {s2}{rest}"


def converse_caption(caption: str) -> str:
    """The same statement the other way round: ``"a red circle left of a blue square"`` ->
    ``"a blue square right of a red circle"`` (further objects are kept). Unlike :func:`swap_relation`'s twin,
    the converse is true exactly when the original is (:func:`caption_truth`): one meaning in two word orders."""
    first, relation, second, rest = _related_pair(caption, "converse_caption")
    return f"a {second} {_CONVERSE[relation]} a {first}{rest}"


def scene_questions(scene: Scene, rng: np.random.Generator) -> list[tuple[str, str, str]]:
    """Question/answer pairs ``(question, answer, kind)`` that are unambiguous for ``scene``.

    Kinds: ``colour`` (of the only shape of a kind), ``shape`` (of the only object of a colour),
    ``count`` (all objects, or of one shape; answers are number words), ``exists`` (yes/no,
    balanced) and ``relation`` (yes/no, true and false relations balanced).
    """
    objs = _check_scene(scene, "scene_questions").objects
    check_instance("rng", rng, "scene_questions", np.random.Generator, "a numpy Generator")
    if not objs:
        raise ValueError("scene_questions: scene has no objects")
    out: list[tuple[str, str, str]] = []
    shape_counts = {s: sum(o.shape == s for o in objs) for s in SHAPES}
    colour_counts = {c: sum(o.colour == c for o in objs) for c in COLOURS}
    unique_shapes = [o for o in objs if shape_counts[o.shape] == 1]
    if unique_shapes:
        o = unique_shapes[int(rng.integers(len(unique_shapes)))]
        out.append((f"what colour is the {o.shape}?", o.colour, "colour"))
    unique_colours = [o for o in objs if colour_counts[o.colour] == 1]
    if unique_colours:
        o = unique_colours[int(rng.integers(len(unique_colours)))]
        out.append((f"what shape is the {o.colour} object?", o.shape, "shape"))
    if rng.integers(0, 2):
        out.append(("how many shapes are there?", _NUMBER_WORDS[len(objs)], "count"))
    else:
        s = SHAPES[int(rng.integers(len(SHAPES)))]
        out.append((f"how many {s}s are there?", _NUMBER_WORDS[shape_counts[s]], "count"))
    present = {(o.shape, o.colour) for o in objs}
    if rng.integers(0, 2):
        o = objs[int(rng.integers(len(objs)))]
        out.append((f"is there a {o.colour} {o.shape}?", "yes", "exists"))
    else:
        absent = [(s, c) for s in SHAPES for c in COLOURS if (s, c) not in present]
        s, c = absent[int(rng.integers(len(absent)))]
        out.append((f"is there a {c} {s}?", "no", "exists"))
    if len(objs) >= 2:
        i, j = rng.choice(len(objs), size=2, replace=False)
        a, b = objs[int(i)], objs[int(j)]
        true_rel = [r for r in RELATIONS if _holds(a, r, b)]
        false_rel = [r for r in RELATIONS if not _holds(a, r, b)]
        if rng.integers(0, 2) and true_rel:
            rel, ans = true_rel[int(rng.integers(len(true_rel)))], "yes"
        else:
            rel, ans = false_rel[int(rng.integers(len(false_rel)))], "no"
        out.append((f"is the {a.name} {rel} the {b.name}?", ans, "relation"))
    return out


def render_scene(scene: Scene, image_size: int = 32) -> torch.Tensor:
    """Rasterise a scene to a ``(3, image_size, image_size)`` uint8 image on a light background."""
    image_size = _check_int("image_size", image_size, "render_scene", 8 * _check_scene(scene, "render_scene").grid, 512)
    img = np.full((image_size, image_size, 3), 235, dtype=np.uint8)
    cell = image_size / scene.grid
    yy, xx = np.mgrid[0:image_size, 0:image_size].astype(np.float32) + 0.5
    jitter = scene.jitter or [(0, 0, 0)] * len(scene.objects)
    for obj, (dy, dx, ds) in zip(scene.objects, jitter, strict=True):
        cy, cx = (obj.row + 0.5) * cell + dy, (obj.col + 0.5) * cell + dx
        r = 0.36 * cell + ds
        if obj.shape == "circle":
            mask = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
        elif obj.shape == "square":
            half = 0.85 * r
            mask = (np.abs(yy - cy) <= half) & (np.abs(xx - cx) <= half)
        elif obj.shape == "triangle":  # apex up
            top, bottom = cy - r, cy + 0.8 * r
            mask = (yy >= top) & (yy <= bottom) & (np.abs(xx - cx) <= (yy - top) / (bottom - top) * r)
        else:
            raise ValueError(f"render_scene: unknown shape {obj.shape!r}; expected one of {SHAPES}")
        img[mask] = COLOURS[obj.colour]
    return torch.from_numpy(img).permute(2, 0, 1).contiguous()


def _random_scene(rng: np.random.Generator, grid: int, min_objects: int, max_objects: int) -> Scene:
    n = int(rng.integers(min_objects, max_objects + 1))
    cells = rng.choice(grid * grid, size=n, replace=False)
    kinds = rng.choice(len(SHAPES) * len(COLOURS), size=n, replace=False)  # (shape, colour) unique
    objects = [
        ShapeObject(SHAPES[int(k) // len(COLOURS)], tuple(COLOURS)[int(k) % len(COLOURS)], int(c) // grid,
                    int(c) % grid)
        for c, k in zip(cells, kinds, strict=True)
    ]
    jitter = [(int(rng.integers(-1, 2)), int(rng.integers(-1, 2)), int(rng.integers(-1, 1))) for _ in objects]
    return Scene(objects=objects, grid=grid, jitter=jitter)


class ShapesScenes(Dataset):
    """Shapes scenes with captions and questions; see :func:`shapes_scenes`.

    Item ``i`` is a dict: ``image`` ``(3, H, W)`` float32 in [0, 1], ``caption`` str,
    ``questions`` list of ``(question, answer, kind)``, ``objects`` list of
    :class:`ShapeObject`.
    """

    def __init__(self, scenes: list[Scene], captions: list[str], questions: list[list[tuple[str, str, str]]],
                 images: torch.Tensor) -> None:
        self.scenes, self.captions, self.questions, self.images = scenes, captions, questions, images

    def __len__(self) -> int:
        return len(self.scenes)

    def __getitem__(self, index: int) -> dict[str, object]:
        index = _check_item(index, len(self), "ShapesScenes")
        return {
            "image": self.images[index].float() / 255.0,
            "caption": self.captions[index],
            "questions": self.questions[index],
            "objects": self.scenes[index].objects,
        }

    def qa_pairs(self, kinds: Sequence[str] | None = None) -> list[tuple[int, str, str, str]]:
        """Flatten to ``(scene_index, question, answer, kind)``, optionally only some kinds."""
        if isinstance(kinds, str):
            raise TypeError(f"qa_pairs: kinds must be a sequence of kinds such as ['colour'], got {kinds!r}")
        if kinds is not None:
            bad = [k for k in kinds if k not in QUESTION_KINDS]
            if bad:
                raise ValueError(f"qa_pairs: unknown kinds {bad}; expected a subset of {QUESTION_KINDS}")
        return [(i, q, a, k) for i, qs in enumerate(self.questions) for q, a, k in qs
                if kinds is None or k in kinds]


def shapes_scenes(
    n: int = 2000,
    seed: int = 0,
    image_size: int = 32,
    grid: int = 3,
    min_objects: int = 1,
    max_objects: int = 3,
) -> ShapesScenes:
    """Generate ``n`` shapes scenes (deterministic for a seed; about 2,000 scenes per second).

    Each scene has ``min_objects``..``max_objects`` objects in distinct cells of a ``grid`` x
    ``grid`` board, each a distinct (shape, colour) pair from :data:`SHAPES` x
    :data:`COLOURS`, jittered by a pixel. Images are ``(3, image_size, image_size)``.
    Use different seeds for train and test sets.
    """
    fn = "shapes_scenes"
    n = _check_int("n", n, fn, 1, 1_000_000)
    seed = _check_int("seed", seed, fn, 0)
    grid = _check_int("grid", grid, fn, 2, 8)
    min_objects = _check_int("min_objects", min_objects, fn, 1, grid * grid)
    max_objects = _check_int("max_objects", max_objects, fn, min_objects, min(grid * grid, 9))
    _check_int("image_size", image_size, fn, 8 * grid, 512)
    rng = numpy_rng(seed)
    scenes, captions, questions, images = [], [], [], []
    for _ in range(n):
        scene = _random_scene(rng, grid, min_objects, max_objects)
        scenes.append(scene)
        captions.append(describe_scene(scene, rng))
        questions.append(scene_questions(scene, rng))
        images.append(render_scene(scene, image_size))
    return ShapesScenes(scenes, captions, questions, torch.stack(images))


# ----------------------------------------------------------------------------- word vocabulary
class WordVocab:
    """A word-level vocabulary for the small, closed-vocabulary texts of the generated datasets
    (captions, questions, answers). Words are lower-cased and split on spaces; ``"?"``, ``","``
    and ``"."`` become tokens of their own.

    Ids 0..3 are the specials ``<pad>``, ``<unk>``, ``<bos>``, ``<eos>``; the other words follow
    in sorted order, so the ids do not depend on the order of ``texts``.
    """

    PAD, UNK, BOS, EOS = 0, 1, 2, 3
    SPECIALS = ("<pad>", "<unk>", "<bos>", "<eos>")

    def __init__(self, texts: Sequence[str]) -> None:
        if isinstance(texts, str) or not isinstance(texts, Sequence):
            raise TypeError(f"WordVocab: texts must be a sequence of strings, got {type(texts).__name__}")
        words = sorted({w for t in texts for w in self.split(t)} - set(self.SPECIALS))
        self.itos: list[str] = list(self.SPECIALS) + words
        self.stoi: dict[str, int] = {w: i for i, w in enumerate(self.itos)}

    @staticmethod
    def split(text: str) -> list[str]:
        """Lower-case and split into words, with ``? , .`` as separate tokens."""
        if not isinstance(text, str):
            raise TypeError(f"WordVocab: text must be a str, got {type(text).__name__}")
        for mark in ("?", ",", "."):
            text = text.replace(mark, f" {mark} ")
        return text.lower().split()

    def __len__(self) -> int:
        return len(self.itos)

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        """Word ids of ``text`` (unknown words map to ``<unk>``), optionally framed by ``<bos>``/``<eos>``."""
        check_bool("bos", bos, "WordVocab.encode")
        check_bool("eos", eos, "WordVocab.encode")
        ids = [self.stoi.get(w, self.UNK) for w in self.split(text)]
        return ([self.BOS] if bos else []) + ids + ([self.EOS] if eos else [])

    def encode_batch(self, texts: Sequence[str], bos: bool = False, eos: bool = False,
                     max_len: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Pad to a batch: ``ids`` ``(batch, T)`` int64 (``<pad>`` = 0) and ``lengths`` ``(batch,)``.
        ``max_len`` truncates (and pads) every sequence to exactly that length."""
        if isinstance(texts, str):
            raise TypeError("WordVocab.encode_batch: texts must be a sequence of strings, not one string")
        seqs = [self.encode(t, bos, eos) for t in texts]
        if max_len is not None:
            max_len = _check_int("max_len", max_len, "WordVocab.encode_batch", 1)
            seqs = [s[:max_len] for s in seqs]
        width = max_len if max_len is not None else max((len(s) for s in seqs), default=0)
        ids = torch.zeros(len(seqs), width, dtype=torch.int64)
        for row, seq in enumerate(seqs):
            ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.int64)
        return ids, torch.tensor([len(s) for s in seqs], dtype=torch.int64)

    def decode(self, ids: Sequence[int] | torch.Tensor, skip_special: bool = True) -> str:
        """Words joined by spaces (``" ?"`` re-attached); specials dropped unless ``skip_special=False``."""
        if isinstance(ids, torch.Tensor):
            if ids.ndim != 1:
                raise ValueError(f"WordVocab.decode: ids must be 1-D, got shape {tuple(ids.shape)}")
            ids = ids.tolist()
        if isinstance(ids, (str, bytes)) or not isinstance(ids, Sequence):
            raise TypeError(f"WordVocab.decode: ids must be a sequence or 1-D tensor of ints, got {type(ids).__name__}")
        words = []
        for i in ids:
            if isinstance(i, bool) or not isinstance(i, (int, np.integer)):  # int(4.7) would silently be 4
                raise TypeError(f"WordVocab.decode: ids must be ints, got {type(i).__name__}")
            if not 0 <= int(i) < len(self.itos):
                raise ValueError(f"WordVocab.decode: id {i} out of range for a vocabulary of {len(self.itos)}")
            if skip_special and int(i) < len(self.SPECIALS):
                continue
            words.append(self.itos[int(i)])
        return " ".join(words).replace(" ?", "?").replace(" ,", ",").replace(" .", ".")
