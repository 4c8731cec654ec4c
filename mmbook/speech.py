"""Offline speech synthesis with espeak-ng (the ``espeakng-loader`` wheel ships the library).

The book's spoken data is synthesised, not recorded, so every reader gets the same audio
without a download. espeak-ng is a formant synthesiser: robotic, but varied enough across
voices, rates and pitches for an audio classifier to have something real to learn.

Determinism. espeak-ng carries hidden state from one utterance to the next (the same call
twice gives slightly different samples), but a freshly initialised engine is reproducible.
So synthesis runs in a small worker process that initialises the engine once and then
forks a child for every utterance: each child starts from the same pristine state, and the
same arguments always give the same samples, whatever was spoken before.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

__all__ = ["ESPEAK_SAMPLE_RATE", "VOICE_VARIANTS", "synthesize", "synthesize_many"]

ESPEAK_SAMPLE_RATE = 22050
# espeak-ng's English voice with some of its bundled variants: male, female and Klatt voices.
VOICE_VARIANTS = ("m1", "m2", "m3", "m4", "m5", "m6", "m7", "f1", "f2", "f3", "f4", "f5",
                  "klatt", "klatt2", "klatt3", "croak", "whisper")

_WORKER = Path(__file__).resolve().parent / "_espeak_worker.py"


def _variant_exists(variant: str) -> bool:
    """Whether espeak-ng ships the voice variant ``variant`` (an unknown one is silently ignored by espeak-ng)."""
    import espeakng_loader

    return (Path(espeakng_loader.get_data_path()) / "voices" / "!v" / variant).is_file()


def _check_request(text: object, voice: object, rate: object, pitch: object, pitch_range: object,
                   fn: str = "synthesize", where: str = "") -> None:
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"{fn}: {where}text must be a non-empty string, got {text!r}")
    if "\0" in text:  # espeak-ng reads a C string: it would stop speaking at the NUL
        raise ValueError(f"{fn}: {where}text must not contain a NUL character, got {text!r}")
    if not isinstance(voice, str) or not voice.strip():
        raise ValueError(f"{fn}: {where}voice must be a non-empty string, got {voice!r}")
    if "+" in voice:
        variant = voice.split("+", 1)[1]
        if variant not in VOICE_VARIANTS and (not variant or "/" in variant or not _variant_exists(variant)):
            raise ValueError(f"{fn}: {where}voice {voice!r} names an unknown variant {variant!r} "
                             f"(espeak-ng would ignore it); the book's variants are {', '.join(VOICE_VARIANTS)}")
    for name, value, lo, hi in (("rate", rate, 80, 450), ("pitch", pitch, 0, 100),
                                ("pitch_range", pitch_range, 0, 100)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not lo <= value <= hi:
            raise ValueError(f"{fn}: {where}{name} must be an int in [{lo}, {hi}], got {value!r}")


def synthesize_many(
    requests: Sequence[dict], sample_rate: int = 16000
) -> list[torch.Tensor]:
    """Speak many utterances; each request is a dict with ``text`` and optional ``voice``,
    ``rate``, ``pitch``, ``pitch_range`` (see :func:`synthesize`). Returns one float32
    waveform ``(num_samples,)`` in [-1, 1] per request, at ``sample_rate``.
    """
    return _synthesize_many(requests, sample_rate, "synthesize_many")


def _synthesize_many(requests: Sequence[dict], sample_rate: int, fn: str) -> list[torch.Tensor]:
    if isinstance(sample_rate, bool) or not isinstance(sample_rate, (int, np.integer)) or sample_rate <= 0:
        raise ValueError(f"{fn}: sample_rate must be a positive int, got {sample_rate!r}")
    sample_rate = int(sample_rate)
    if isinstance(requests, (str, dict)) or not isinstance(requests, Sequence):
        raise TypeError(f"{fn}: requests must be a sequence of dicts, got {type(requests).__name__}")
    jobs = []
    for i, req in enumerate(requests):
        if not isinstance(req, dict) or "text" not in req:
            raise ValueError(f"{fn}: requests[{i}] must be a dict with a 'text' entry, got {req!r}")
        job = {"voice": "m1", "rate": 160, "pitch": 50, "pitch_range": 50, **req}
        unknown = set(job) - {"text", "voice", "rate", "pitch", "pitch_range"}
        if unknown:
            raise ValueError(f"{fn}: requests[{i}] has unknown keys {sorted(unknown, key=repr)}")
        _check_request(job["text"], job["voice"], job["rate"], job["pitch"], job["pitch_range"], fn,
                       "" if fn == "synthesize" else f"requests[{i}]: ")
        job = {**job, "rate": int(job["rate"]), "pitch": int(job["pitch"]), "pitch_range": int(job["pitch_range"])}
        if "+" not in job["voice"] and job["voice"] in VOICE_VARIANTS:
            job["voice"] = f"en+{job['voice']}"
        jobs.append(job)
    if not jobs:
        return []
    result = subprocess.run(
        [sys.executable, str(_WORKER)], input=json.dumps(jobs).encode(), capture_output=True, check=False,
        env={**os.environ, "PYTHONHASHSEED": "0"},
    )
    if result.returncode != 0:
        raise RuntimeError(f"{fn}: the espeak-ng worker failed: {result.stderr.decode(errors='replace')[-800:]}")
    with np.load(io.BytesIO(result.stdout)) as arrays:
        raw = [arrays[f"a{i}"] for i in range(len(jobs))]
    waves = [torch.from_numpy(samples.astype(np.float32) / 32768.0) for samples in raw]
    if sample_rate != ESPEAK_SAMPLE_RATE:
        import torchaudio.functional as AF

        # One batched call: zero-padding at the end leaves every waveform's own samples unchanged.
        lengths = [w.numel() for w in waves]
        padded = torch.zeros(len(waves), max(max(lengths), 1))
        for row, w in enumerate(waves):
            padded[row, : w.numel()] = w
        resampled = AF.resample(padded, ESPEAK_SAMPLE_RATE, sample_rate)
        waves = [resampled[row, : -(-n * sample_rate // ESPEAK_SAMPLE_RATE)].clone() for row, n in enumerate(lengths)]
    return waves


def synthesize(
    text: str,
    voice: str = "m1",
    rate: int = 160,
    pitch: int = 50,
    pitch_range: int = 50,
    sample_rate: int = 16000,
) -> torch.Tensor:
    """Speak ``text`` and return a float32 waveform of shape ``(num_samples,)`` in [-1, 1].

    ``voice`` is an English variant from :data:`VOICE_VARIANTS` (or any espeak-ng voice
    name such as ``"en-us"``); ``rate`` in words per minute (80..450), ``pitch`` and
    ``pitch_range`` in 0..100. espeak-ng produces 22050 Hz audio; it is resampled to
    ``sample_rate`` with torchaudio's band-limited sinc resampler. Deterministic. For many
    utterances use :func:`synthesize_many`, which starts the worker once.
    """
    return _synthesize_many(
        [{"text": text, "voice": voice, "rate": rate, "pitch": pitch, "pitch_range": pitch_range}],
        sample_rate, "synthesize",
    )[0]
