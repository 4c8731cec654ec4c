"""Audio features written from their definitions: STFT, mel filterbank, log-mel, MFCC, WAV I/O,
SpecAugment masking, and a small CNN audio encoder on log-mel inputs.

Conventions match torchaudio, which the book uses as the reference: a waveform is a float
tensor ``(..., time)``; spectrograms are ``(..., n_freqs, frames)`` with
``n_freqs = n_fft // 2 + 1``; mel spectrograms ``(..., n_mels, frames)``.
"""

from __future__ import annotations

import inspect
import math
import os
import wave
from pathlib import Path

import torch
from torch import nn

from mmbook.checks import (
    check_bool,
    check_choice,
    check_finite,
    check_float_tensor,
    check_instance,
    check_int,
    check_module_input,
    check_number,
    positive_int,
)

__all__ = [
    "AudioCNN",
    "amplitude_to_db",
    "dct_matrix",
    "hz_to_mel",
    "log_mel_spectrogram",
    "mask_along_axis",
    "mel_filterbank",
    "mel_spectrogram",
    "mel_to_hz",
    "mfcc",
    "read_wav",
    "spec_augment",
    "spectrogram",
    "stft",
    "write_wav",
]

_MEL_SCALES = ("htk", "slaney")
_PAD_MODES = ("reflect", "constant", "replicate", "circular")


def _check_positive_number(name: str, value: object, fn: str) -> float:
    return check_number(name, value, fn, 0.0, low_open=True)


_check_positive_int = positive_int  # the name the shown sources (stft, mel_filterbank, AudioCNN) use


def _check_frequencies(name: str, value: object, fn: str) -> torch.Tensor:
    """Frequencies (Hz or mels) as a float64 tensor: finite and >= 0 (log10(1 + f / 700) is NaN below -700 Hz)."""
    if isinstance(value, (bool, str, bytes)) or not isinstance(value, (int, float, list, tuple, torch.Tensor)):
        raise TypeError(f"{fn}: {name} must be a number or a tensor of numbers, got {type(value).__name__}")
    f = torch.as_tensor(value, dtype=torch.float64)
    if f.numel() and not (bool(torch.isfinite(f).all()) and float(f.min()) >= 0):
        raise ValueError(f"{fn}: {name} must be finite and >= 0, got values in [{float(f.min())}, {float(f.max())}]")
    return f


def _check_waveform(waveform: object, fn: str, fft: bool = True) -> torch.Tensor:
    check_float_tensor("waveform", waveform, fn)
    # torch.fft on the CPU: 'Unsupported dtype Half' (CUDA has half-precision FFTs of power-of-two sizes)
    if fft and waveform.dtype not in (torch.float32, torch.float64) and waveform.device.type == "cpu":
        raise TypeError(f"{fn}: waveform must be float32 or float64, got {waveform.dtype}; convert it with .float()")
    if waveform.ndim < 1 or waveform.ndim > 3:
        raise ValueError(
            f"{fn}: waveform must have shape (time,), (channel, time) or (batch, channel, time), "
            f"got {tuple(waveform.shape)}"
        )
    return waveform


def hz_to_mel(freq: torch.Tensor | float, mel_scale: str = "htk") -> torch.Tensor:
    """Hertz to mels. ``"htk"``: ``2595 log10(1 + f / 700)``. ``"slaney"``: linear below
    1 kHz (``3 f / 200``), logarithmic above (``15 + 27 ln(f / 1000) / ln 6.4``)."""
    if mel_scale not in _MEL_SCALES:
        raise ValueError(f"hz_to_mel: mel_scale must be 'htk' or 'slaney', got {mel_scale!r}")
    f = _check_frequencies("freq", freq, "hz_to_mel")
    if mel_scale == "htk":
        return 2595.0 * torch.log10(1.0 + f / 700.0)
    f_sp, min_log_hz = 200.0 / 3, 1000.0
    min_log_mel, logstep = min_log_hz / f_sp, math.log(6.4) / 27.0
    return torch.where(f >= min_log_hz, min_log_mel + torch.log(f.clamp_min(1e-10) / min_log_hz) / logstep, f / f_sp)


def mel_to_hz(mels: torch.Tensor | float, mel_scale: str = "htk") -> torch.Tensor:
    """Inverse of :func:`hz_to_mel`."""
    if mel_scale not in _MEL_SCALES:
        raise ValueError(f"mel_to_hz: mel_scale must be 'htk' or 'slaney', got {mel_scale!r}")
    m = _check_frequencies("mels", mels, "mel_to_hz")
    if mel_scale == "htk":
        return 700.0 * (10.0 ** (m / 2595.0) - 1.0)
    f_sp, min_log_hz = 200.0 / 3, 1000.0
    min_log_mel, logstep = min_log_hz / f_sp, math.log(6.4) / 27.0
    return torch.where(m >= min_log_mel, min_log_hz * torch.exp(logstep * (m - min_log_mel)), f_sp * m)


def mel_filterbank(
    n_freqs: int,
    f_min: float,
    f_max: float,
    n_mels: int,
    sample_rate: int,
    norm: str | None = None,
    mel_scale: str = "htk",
) -> torch.Tensor:
    """Triangular mel filterbank, shape ``(n_freqs, n_mels)`` (float32), as torchaudio's
    ``melscale_fbanks``.

    ``n_mels + 2`` points equally spaced in mels between ``f_min`` and ``f_max`` are mapped
    back to Hz; filter ``m`` rises linearly from point ``m`` to ``m + 1`` and falls to
    ``m + 2``, evaluated at the STFT bin frequencies ``linspace(0, sample_rate / 2, n_freqs)``.
    ``norm="slaney"`` scales each triangle to unit area (``2 / (f_{m+2} - f_m)``).
    Raises ``ValueError`` when a filter would fall between two bins and be all zeros.
    """
    fn = "mel_filterbank"
    n_freqs = _check_positive_int("n_freqs", n_freqs, fn)
    n_mels = _check_positive_int("n_mels", n_mels, fn)
    sample_rate = _check_positive_number("sample_rate", sample_rate, fn)
    if n_freqs < 2:
        raise ValueError(f"{fn}: n_freqs must be at least 2, got {n_freqs}")
    nyquist = sample_rate / 2
    if isinstance(f_min, bool) or not isinstance(f_min, (int, float)) or not 0 <= f_min < nyquist:
        raise ValueError(f"{fn}: f_min must be in [0, {nyquist:g}) Hz (Nyquist for {sample_rate:g} Hz), got {f_min!r}")
    if isinstance(f_max, bool) or not isinstance(f_max, (int, float)) or not f_min < f_max <= nyquist:
        raise ValueError(
            f"{fn}: f_max must be in (f_min={f_min:g}, {nyquist:g}] Hz (Nyquist for sample_rate={sample_rate:g}), "
            f"got {f_max!r}"
        )
    if norm not in (None, "slaney"):
        raise ValueError(f"{fn}: norm must be None or 'slaney', got {norm!r}")
    if mel_scale not in _MEL_SCALES:
        raise ValueError(f"{fn}: mel_scale must be 'htk' or 'slaney', got {mel_scale!r}")

    all_freqs = torch.linspace(0, nyquist, n_freqs)
    m_pts = torch.linspace(float(hz_to_mel(f_min, mel_scale)), float(hz_to_mel(f_max, mel_scale)), n_mels + 2)
    f_pts = mel_to_hz(m_pts, mel_scale).to(torch.float32)
    f_diff = f_pts[1:] - f_pts[:-1]  # (n_mels + 1,)
    slopes = f_pts.unsqueeze(0) - all_freqs.unsqueeze(1)  # (n_freqs, n_mels + 2)
    down = -slopes[:, :-2] / f_diff[:-1]
    up = slopes[:, 2:] / f_diff[1:]
    fb = torch.clamp(torch.minimum(down, up), min=0.0)
    if norm == "slaney":
        fb = fb * (2.0 / (f_pts[2: n_mels + 2] - f_pts[:n_mels])).unsqueeze(0)
    empty = (fb.max(dim=0).values == 0.0).nonzero().flatten().tolist()
    if empty:
        raise ValueError(
            f"{fn}: n_mels={n_mels} is too large for n_freqs={n_freqs} between {f_min:g} and {f_max:g} Hz: "
            f"filters {empty[:5]}{'...' if len(empty) > 5 else ''} contain no frequency bin"
        )
    return fb


def stft(
    waveform: torch.Tensor,
    n_fft: int = 400,
    hop_length: int | None = None,
    win_length: int | None = None,
    window: torch.Tensor | None = None,
    center: bool = True,
    pad_mode: str = "reflect",
) -> torch.Tensor:
    """Short-time Fourier transform by framing + windowing + real FFT.

    ``X[..., k, t] = sum_n x[t * hop + n] w[n] exp(-2 pi i k n / n_fft)`` for
    ``k = 0 .. n_fft // 2``. With ``center=True`` the signal is padded by ``n_fft // 2`` on
    both sides (``pad_mode``) so frame ``t`` is centred on sample ``t * hop``. The window
    (default: periodic Hann of ``win_length``) is zero-padded to ``n_fft`` in the middle.
    Defaults follow torchaudio: ``win_length = n_fft``, ``hop_length = win_length // 2``
    (``torch.stft`` itself defaults to ``n_fft // 4``).
    Returns a complex tensor ``(..., n_fft // 2 + 1, frames)``, as ``torch.stft``.
    """
    fn = "stft"
    waveform = _check_waveform(waveform, fn)
    n_fft = _check_positive_int("n_fft", n_fft, fn)
    win_length = _check_positive_int("win_length", win_length if win_length is not None else n_fft, fn)
    if hop_length is None and win_length < 2:
        raise ValueError(f"{fn}: the default hop_length = win_length // 2 needs win_length >= 2, got {win_length}")
    hop_length = _check_positive_int("hop_length", hop_length if hop_length is not None else win_length // 2, fn)
    if win_length > n_fft:
        raise ValueError(f"{fn}: win_length ({win_length}) must be <= n_fft ({n_fft})")
    check_bool("center", center, fn)
    check_choice("pad_mode", pad_mode, fn, _PAD_MODES)
    if window is None:
        window = torch.hann_window(win_length, periodic=True, dtype=waveform.dtype, device=waveform.device)
    check_float_tensor("window", window, fn)
    if window.shape != (win_length,):
        raise ValueError(f"{fn}: window must have shape ({win_length},), got {tuple(window.shape)}")
    left = (n_fft - win_length) // 2
    window = torch.nn.functional.pad(window, (left, n_fft - win_length - left))
    x = waveform
    if center:
        pad = n_fft // 2
        if pad_mode == "reflect" and x.shape[-1] <= pad:
            raise ValueError(f"{fn}: waveform of {x.shape[-1]} samples is too short to reflect-pad by {pad}")
        shape = x.shape
        x = torch.nn.functional.pad(x.reshape(-1, 1, shape[-1]), (pad, pad), mode=pad_mode).reshape(*shape[:-1], -1)
    if x.shape[-1] < n_fft:
        raise ValueError(f"{fn}: waveform of {x.shape[-1]} samples is shorter than n_fft={n_fft}")
    frames = x.unfold(-1, n_fft, hop_length)  # (..., frames, n_fft)
    spec = torch.fft.rfft(frames * window, dim=-1)  # (..., frames, n_freqs)
    return spec.transpose(-1, -2)


def spectrogram(waveform: torch.Tensor, n_fft: int = 400, hop_length: int | None = None,
                win_length: int | None = None, power: float = 2.0, center: bool = True,
                pad_mode: str = "reflect") -> torch.Tensor:
    """``|STFT|**power``: ``(..., n_fft // 2 + 1, frames)`` (power 2: energy, 1: magnitude)."""
    check_number("power", power, "spectrogram", 0.0, low_open=True)
    _check_waveform(waveform, "spectrogram")
    spec = stft(waveform, n_fft, hop_length, win_length, center=center, pad_mode=pad_mode)
    return spec.abs().pow(power)


def mel_spectrogram(
    waveform: torch.Tensor,
    sample_rate: int = 16000,
    n_fft: int = 400,
    win_length: int | None = None,
    hop_length: int | None = None,
    f_min: float = 0.0,
    f_max: float | None = None,
    n_mels: int = 40,
    power: float = 2.0,
    center: bool = True,
    pad_mode: str = "reflect",
    norm: str | None = None,
    mel_scale: str = "htk",
) -> torch.Tensor:
    """Mel spectrogram ``(..., n_mels, frames)``: the filterbank applied to the power
    spectrogram, ``M = F^T S``; arguments and defaults as ``torchaudio.transforms.MelSpectrogram``
    except ``n_mels``: torchaudio's 128 bands are too many for its own ``n_fft=400`` (201 bins; at
    16 kHz at most 89 HTK bands have a bin each, and torchaudio warns and returns empty filters), so the
    default is the 40 bands the book uses, which fit ``n_fft=400`` at every sample rate up to 48 kHz."""
    fn = "mel_spectrogram"
    _check_waveform(waveform, fn)  # name this function, not stft, in the error
    sample_rate = _check_positive_number("sample_rate", sample_rate, fn)
    spec = spectrogram(waveform, n_fft, hop_length, win_length, power, center, pad_mode)
    fb = mel_filterbank(n_fft // 2 + 1, f_min, f_max if f_max is not None else sample_rate / 2, n_mels,
                        sample_rate, norm, mel_scale).to(spec.dtype).to(spec.device)
    return torch.matmul(spec.transpose(-1, -2), fb).transpose(-1, -2)


def amplitude_to_db(x: torch.Tensor, multiplier: float = 10.0, amin: float = 1e-10,
                    top_db: float | None = 80.0) -> torch.Tensor:
    """``multiplier * log10(max(x, amin))``, floored at ``top_db`` below the maximum of each
    ``(channel, freq, time)`` block, as torchaudio's ``AmplitudeToDB`` (reference 1)."""
    fn = "amplitude_to_db"
    check_float_tensor("x", x, fn, min_ndim=2, nonempty=True)
    check_number("multiplier", multiplier, fn, 0.0, low_open=True)
    check_number("amin", amin, fn, 0.0, low_open=True)
    if top_db is not None:  # a negative top_db would raise every cell to the maximum: a constant
        check_number("top_db", top_db, fn, 0.0, low_open=True)
    x_db = multiplier * torch.log10(torch.clamp(x, min=amin))
    if top_db is not None:
        shape = x_db.shape
        channels = shape[-3] if x_db.ndim > 2 else 1
        packed = x_db.reshape(-1, channels, shape[-2], shape[-1])
        floor = packed.amax(dim=(-3, -2, -1)) - top_db
        x_db = torch.maximum(packed, floor.view(-1, 1, 1, 1)).reshape(shape)
    return x_db


def dct_matrix(n_mfcc: int, n_mels: int, norm: str | None = "ortho") -> torch.Tensor:
    """DCT-II basis ``(n_mels, n_mfcc)``: column k is ``cos(pi / n_mels * (n + 1/2) * k)``,
    scaled to be orthonormal with ``norm="ortho"`` (else multiplied by 2)."""
    n_mfcc = _check_positive_int("n_mfcc", n_mfcc, "dct_matrix")
    n_mels = _check_positive_int("n_mels", n_mels, "dct_matrix")
    if n_mfcc > n_mels:
        raise ValueError(f"dct_matrix: n_mfcc ({n_mfcc}) cannot exceed n_mels ({n_mels})")
    if norm not in (None, "ortho"):
        raise ValueError(f"dct_matrix: norm must be None or 'ortho', got {norm!r}")
    n = torch.arange(n_mels, dtype=torch.float32)
    k = torch.arange(n_mfcc, dtype=torch.float32).unsqueeze(1)
    dct = torch.cos(math.pi / n_mels * (n + 0.5) * k)  # (n_mfcc, n_mels)
    if norm is None:
        dct = dct * 2.0
    else:
        dct[0] *= 1.0 / math.sqrt(2.0)
        dct = dct * math.sqrt(2.0 / n_mels)
    return dct.t()


def mfcc(
    waveform: torch.Tensor,
    sample_rate: int = 16000,
    n_mfcc: int = 40,
    norm: str | None = "ortho",
    log_mels: bool = False,
    melkwargs: dict | None = None,
) -> torch.Tensor:
    """Mel-frequency cepstral coefficients ``(..., n_mfcc, frames)``: the DCT-II of the log
    mel spectrogram (decibels with an 80 dB floor, or ``log(M + 1e-6)`` with ``log_mels``),
    as ``torchaudio.transforms.MFCC``."""
    fn = "mfcc"
    _check_waveform(waveform, fn)
    n_mfcc = _check_positive_int("n_mfcc", n_mfcc, fn)
    check_bool("log_mels", log_mels, fn)
    melkwargs = dict(check_instance("melkwargs", melkwargs, fn, (dict, type(None)), "a dict or None") or {})
    if "sample_rate" in melkwargs:
        raise ValueError("mfcc: pass sample_rate as an argument, not inside melkwargs")
    unknown = sorted(set(melkwargs) - set(inspect.signature(mel_spectrogram).parameters) - {"waveform"})
    if unknown or "waveform" in melkwargs:
        raise ValueError(f"{fn}: melkwargs must hold arguments of mel_spectrogram, got {unknown or ['waveform']}")
    mel = mel_spectrogram(waveform, sample_rate=sample_rate, **melkwargs)
    n_mels = mel.shape[-2]
    if not 1 <= n_mfcc <= n_mels:
        raise ValueError(f"mfcc: n_mfcc must be an int in [1, n_mels={n_mels}], got {n_mfcc!r}")
    log_mel = torch.log(mel + 1e-6) if log_mels else amplitude_to_db(mel)
    basis = dct_matrix(n_mfcc, n_mels, norm).to(log_mel.dtype).to(log_mel.device)
    return torch.matmul(log_mel.transpose(-1, -2), basis).transpose(-1, -2)


def write_wav(path: str | Path, waveform: torch.Tensor, sample_rate: int) -> None:
    """Write a float waveform ``(time,)`` or ``(channels, time)`` in [-1, 1] as 16-bit PCM WAV
    with the standard library (values outside [-1, 1] are clipped)."""
    fn = "write_wav"
    check_instance("path", path, fn, (str, os.PathLike), "a str or a path")  # an int would be a file descriptor
    waveform = _check_waveform(waveform, fn, fft=False)
    if waveform.ndim == 3 or waveform.shape[-1] == 0 or waveform.shape[0] == 0:
        raise ValueError(f"write_wav: waveform must be (time,) or (channels, time), got {tuple(waveform.shape)}")
    if waveform.ndim == 2 and waveform.shape[0] > waveform.shape[1]:  # (time, channels) would write a file of noise
        raise ValueError(f"write_wav: waveform must be (channels, time), got {tuple(waveform.shape)}: more channels "
                         "than samples; transpose a (time, channels) tensor with .T")
    check_finite("waveform", waveform, fn)  # NaN would be written as silence
    sample_rate = check_int("sample_rate", sample_rate, fn, 1, 2**32 - 1)
    if not Path(path).parent.is_dir():
        raise FileNotFoundError(f"{fn}: the folder of {str(path)!r} does not exist")
    data = waveform.detach().cpu().reshape(-1 if waveform.ndim == 1 else waveform.shape[0], waveform.shape[-1])
    if waveform.ndim == 1:
        data = data.reshape(1, -1)
    pcm = (data.clamp(-1.0, 1.0) * 32767.0).round().to(torch.int16).t().contiguous()  # (time, channels)
    with wave.open(str(path), "wb") as f:
        f.setnchannels(pcm.shape[1])
        f.setsampwidth(2)
        f.setframerate(sample_rate)
        f.writeframes(pcm.numpy().astype("<i2").tobytes())


def read_wav(path: str | Path) -> tuple[torch.Tensor, int]:
    """Read a 16-bit PCM WAV file with the standard library.

    Returns ``(waveform, sample_rate)`` with ``waveform`` float32 ``(channels, time)`` in
    [-1, 1) (``int16 / 32768``, as soundfile and torchaudio scale it)."""
    import numpy as np

    path = Path(check_instance("path", path, "read_wav", (str, os.PathLike), "a str or a path"))
    if not path.is_file():
        folder = " (it is a folder)" if path.is_dir() else ""
        raise FileNotFoundError(f"read_wav: no such file {str(path)!r}{folder}")
    try:
        with wave.open(str(path), "rb") as f:
            if f.getsampwidth() != 2:
                raise ValueError(f"read_wav: only 16-bit PCM is supported, {path.name} has {8 * f.getsampwidth()}-bit")
            channels, rate, frames = f.getnchannels(), f.getframerate(), f.readframes(f.getnframes())
    except (wave.Error, EOFError) as err:
        raise ValueError(f"read_wav: {str(path)!r} is not a WAV file ({err})") from None
    pcm = np.frombuffer(frames, dtype="<i2").reshape(-1, channels).T.astype(np.float32) / 32768.0
    return torch.from_numpy(np.ascontiguousarray(pcm)), rate


# ----------------------------------------------------------------------------- features for a classifier


def log_mel_spectrogram(
    waveform: torch.Tensor,
    sample_rate: int = 16000,
    n_fft: int = 400,
    hop_length: int = 160,
    n_mels: int = 40,
    f_min: float = 0.0,
    f_max: float | None = None,
    top_db: float | None = 80.0,
) -> torch.Tensor:
    """Log-mel spectrogram in decibels, ``10 log10(max(M, 1e-10))``, one example at a time.

    ``waveform`` ``(time,)`` or ``(batch, time)`` -> ``(n_mels, frames)`` or ``(batch, n_mels, frames)``
    with ``frames = 1 + time // hop_length`` (centred frames). Unlike :func:`amplitude_to_db` on a
    3-D tensor (which torchaudio reads as ``(channel, freq, time)`` and floors jointly), the
    ``top_db`` floor is set per example: ``max(M_dB) - top_db`` of that example alone, so an
    example's features never depend on the others in its batch. Defaults: 25 ms windows every
    10 ms at 16 kHz, 40 HTK mel bands.
    """
    fn = "log_mel_spectrogram"
    if not isinstance(waveform, torch.Tensor) or waveform.ndim not in (1, 2):
        raise ValueError(f"{fn}: waveform must be a tensor (time,) or (batch, time), got "
                         f"{tuple(waveform.shape) if isinstance(waveform, torch.Tensor) else type(waveform).__name__}")
    _check_waveform(waveform, fn)  # name this function, not mel_spectrogram
    if top_db is not None and (isinstance(top_db, bool) or not isinstance(top_db, (int, float)) or not top_db > 0
                               or not math.isfinite(top_db)):
        raise ValueError(f"{fn}: top_db must be a positive number or None, got {top_db!r}")
    mel = mel_spectrogram(waveform, sample_rate=sample_rate, n_fft=n_fft, hop_length=hop_length, n_mels=n_mels,
                          f_min=f_min, f_max=f_max)  # (..., n_mels, frames)
    db = 10.0 * torch.log10(torch.clamp(mel, min=1e-10))
    if top_db is not None:
        db = torch.maximum(db, db.amax(dim=(-2, -1), keepdim=True) - top_db)
    return db


def mask_along_axis(
    spec: torch.Tensor,
    mask_param: int,
    axis: int,
    mask_value: float = 0.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """One random mask per example along the frequency (``axis=-2``) or time (``axis=-1``) axis.

    ``spec`` ``(..., n_mels, frames)``; every index of the leading dimensions gets its own mask.
    As in SpecAugment (and ``torchaudio.functional.mask_along_axis_iid``, whose draws this
    reproduces exactly for the same random state): a width ``v = u_1 * mask_param`` and a start
    ``v_0 = u_2 * (size - v)`` with ``u_1, u_2 ~ U[0, 1)``; indices
    ``floor(v_0) <= i < floor(v_0) + floor(v)`` are set to ``mask_value``. Returns a new tensor.
    """
    fn = "mask_along_axis"
    if not isinstance(spec, torch.Tensor) or not torch.is_floating_point(spec) or spec.ndim < 2:
        raise ValueError(f"{fn}: spec must be a floating-point tensor (..., n_mels, frames), got "
                         f"{tuple(spec.shape) if isinstance(spec, torch.Tensor) else type(spec).__name__}")
    if isinstance(mask_param, bool) or not isinstance(mask_param, int) or mask_param < 0:
        raise ValueError(f"{fn}: mask_param must be a non-negative int, got {mask_param!r}")
    if axis not in (-2, -1):
        raise ValueError(f"{fn}: axis must be -2 (frequency) or -1 (time), got {axis!r}")
    size = spec.shape[axis]
    if mask_param > size:
        raise ValueError(f"{fn}: mask_param ({mask_param}) exceeds the size of axis {axis} ({size})")
    check_number("mask_value", mask_value, fn)
    check_instance("generator", generator, fn, (torch.Generator, type(None)), "a torch.Generator or None")
    if mask_param == 0:
        return spec.clone()
    lead = spec.shape[:-2]
    width = torch.rand(lead, generator=generator, dtype=spec.dtype, device=spec.device) * mask_param
    start = torch.rand(lead, generator=generator, dtype=spec.dtype, device=spec.device) * (size - width)
    first = start.long()[..., None, None]
    stop = (start.long() + width.long())[..., None, None]
    index = torch.arange(size, device=spec.device)
    index = index.view(-1, 1) if axis == -2 else index.view(1, -1)  # broadcast along (n_mels, frames)
    return spec.masked_fill((index >= first) & (index < stop), mask_value)


def spec_augment(
    spec: torch.Tensor,
    freq_mask_param: int = 8,
    time_mask_param: int = 20,
    num_freq_masks: int = 1,
    num_time_masks: int = 1,
    mask_value: float = 0.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """SpecAugment's masking (Park et al., 2019) without time warping: ``num_freq_masks``
    frequency masks of up to ``freq_mask_param`` bands, then ``num_time_masks`` time masks of up
    to ``time_mask_param`` frames, drawn independently for every example of
    ``spec`` ``(..., n_mels, frames)``. Masked cells get ``mask_value`` (0 = the mean of
    standardised features). Returns a new tensor of the same shape."""
    fn = "spec_augment"
    for name, value in (("num_freq_masks", num_freq_masks), ("num_time_masks", num_time_masks)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"spec_augment: {name} must be a non-negative int, got {value!r}")
    check_float_tensor("spec", spec, fn, min_ndim=2)
    for name, value, axis in (("freq_mask_param", freq_mask_param, -2), ("time_mask_param", time_mask_param, -1)):
        if check_int(name, value, fn, 0) > spec.shape[axis]:
            raise ValueError(f"{fn}: {name} ({value}) exceeds the size of axis {axis} ({spec.shape[axis]})")
    out = spec
    for _ in range(num_freq_masks):
        out = mask_along_axis(out, freq_mask_param, -2, mask_value, generator)
    for _ in range(num_time_masks):
        out = mask_along_axis(out, time_mask_param, -1, mask_value, generator)
    return out if out is not spec else spec.clone()


class AudioCNN(nn.Module):
    """A small convolutional audio classifier/encoder on (standardised) log-mel spectrograms.

    The ``n_mels`` bands of a log-mel ``(batch, n_mels, frames)`` are the input *channels* of
    1-D convolutions over time (temporal convolution, as in TC-ResNet): each filter sees the
    whole spectrum of ``kernel_size`` neighbouring frames, which costs far less than a 2-D CNN
    that treats the spectrogram as an image. Block ``i`` is
    ``Conv1d(kernel_size, padding kernel_size // 2) -> BatchNorm -> ReLU -> MaxPool1d(2)`` with
    ``channels[i]`` outputs; the first convolution has stride ``stride`` (2 halves the frame rate
    at once). With the defaults, 101 frames (1 s at a 10 ms hop) become 6 tokens of 64 features.

    * ``features(x)``: ``(batch, feature_dim, frames')`` with ``feature_dim = channels[-1]``;
    * ``tokens(x)``: the same as a sequence of audio tokens ``(batch, frames', feature_dim)``
      (for cross-attention in later chapters);
    * ``embed(x)``: the time average ``(batch, feature_dim)``;
    * ``forward(x)``: ``dropout -> linear`` on the embedding, ``(batch, out_dim)`` (the embedding
      itself when ``out_dim`` is None).

    Inputs should be standardised (zero mean, unit variance over the training set), so that a
    SpecAugment mask value of 0 means "average".
    """

    def __init__(
        self,
        n_mels: int = 40,
        out_dim: int | None = 10,
        channels: tuple[int, ...] = (32, 64, 64),
        kernel_size: int = 3,
        stride: int = 2,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        fn = "AudioCNN"
        self.n_mels = _check_positive_int("n_mels", n_mels, fn)
        if out_dim is not None:
            _check_positive_int("out_dim", out_dim, fn)
        if isinstance(channels, (str, bytes)) or not isinstance(channels, (tuple, list)) or not channels:
            raise ValueError(f"{fn}: channels must be a non-empty tuple of positive ints, got {channels!r}")
        for c in channels:
            _check_positive_int("channels[i]", c, fn)
        kernel_size = _check_positive_int("kernel_size", kernel_size, fn)
        if kernel_size % 2 == 0:
            raise ValueError(f"{fn}: kernel_size must be odd (so padding keeps frames centred), got {kernel_size}")
        self.stride = _check_positive_int("stride", stride, fn)
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
            raise ValueError(f"{fn}: dropout must be in [0, 1), got {dropout!r}")
        layers: list[nn.Module] = []
        c_in = n_mels
        for i, c_out in enumerate(channels):
            layers += [nn.Conv1d(c_in, c_out, kernel_size, stride=stride if i == 0 else 1, padding=kernel_size // 2,
                                 bias=False), nn.BatchNorm1d(c_out), nn.ReLU(), nn.MaxPool1d(2)]
            c_in = c_out
        self.body = nn.Sequential(*layers)
        self.num_blocks, self.feature_dim, self.out_dim = len(channels), c_in, out_dim
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(c_in, out_dim) if out_dim is not None else nn.Identity()

    def min_frames(self) -> int:
        """The fewest input frames that leave at least one output frame."""
        return self.stride * 2**self.num_blocks

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """``(batch, n_mels, frames) -> (batch, feature_dim, frames')``."""
        if not isinstance(x, torch.Tensor) or not torch.is_floating_point(x):
            raise TypeError("AudioCNN: x must be a floating-point tensor, got "
                            + (f"a tensor of {x.dtype}" if isinstance(x, torch.Tensor) else type(x).__name__))
        if x.ndim != 3 or x.shape[1] != self.n_mels:
            raise ValueError(f"AudioCNN: x must have shape (batch, n_mels={self.n_mels}, frames), "
                             f"got {tuple(x.shape)}")
        if x.shape[2] < self.min_frames():
            raise ValueError(f"AudioCNN: {x.shape[2]} frames are too few for stride {self.stride} and "
                             f"{self.num_blocks} pooling blocks (need at least {self.min_frames()})")
        check_module_input("x", x, "AudioCNN", self)
        return self.body(x)

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        """``(batch, n_mels, frames) -> (batch, frames', feature_dim)``: one token per output frame."""
        return self.features(x).transpose(1, 2)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """``(batch, n_mels, frames) -> (batch, feature_dim)``: the features averaged over time."""
        return self.features(x).mean(dim=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(batch, n_mels, frames) -> (batch, out_dim)`` (``(batch, feature_dim)`` if ``out_dim`` is None)."""
        return self.head(self.dropout(self.embed(x)))
