"""Core helpers used by every chapter: device selection, seeding and source display."""

from __future__ import annotations

import html
import inspect
import os
import random
import textwrap
from typing import Any

import numpy as np
import torch

from mmbook.checks import check_device

__all__ = [
    "Source", "get_device", "numpy_rng", "python_rng", "seed", "seed_shift", "set_seed", "show", "torch_generator",
]

_DEVICE_ENV = "MMBOOK_DEVICE"
_KNOWN_DEVICE_TYPES = ("cpu", "cuda", "mps")


def _mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def get_device(name: str | None = None) -> torch.device:
    """Return the device the book computes on.

    Order of precedence: the ``name`` argument, then the ``MMBOOK_DEVICE`` environment
    variable, then the best available device (CUDA, then Apple MPS, then CPU).

    Accepted names are ``"cpu"``, ``"cuda"``, ``"cuda:N"`` and ``"mps"``. An unknown name
    raises :class:`ValueError`; a known device that this machine does not have raises
    :class:`RuntimeError`. Both messages name where the value came from.
    """
    source = "name"
    if name is None:
        env_value = os.environ.get(_DEVICE_ENV, "").strip()
        if env_value:
            name, source = env_value, f"environment variable {_DEVICE_ENV}"
    if name is None:
        if torch.cuda.is_available():
            return torch.device("cuda")
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")

    if not isinstance(name, str):
        raise TypeError(f"get_device: {source} must be a str such as 'cpu' or 'cuda', got {type(name).__name__}")
    try:
        device = torch.device(name.strip().lower())
    except (RuntimeError, ValueError):
        raise ValueError(
            f"get_device: unknown device {name!r} from {source}; expected one of 'cpu', 'cuda', 'cuda:N', 'mps'"
        ) from None
    if device.type not in _KNOWN_DEVICE_TYPES or (device.type == "cpu" and device.index not in (None, 0)):
        raise ValueError(
            f"get_device: unknown device {name!r} from {source}; expected one of 'cpu', 'cuda', 'cuda:N', 'mps'"
        )
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(f"get_device: {source} asks for {name!r} but CUDA is not available on this machine")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise RuntimeError(
                f"get_device: {source} asks for {name!r} but only {torch.cuda.device_count()} CUDA device(s) exist"
            )
    if device.type == "mps" and not _mps_available():
        raise RuntimeError(f"get_device: {source} asks for {name!r} but Apple MPS is not available on this machine")
    return device


_SEED_SHIFT_ENV = "MMBOOK_SEED_SHIFT"
# A prime stride keeps shifted seeds away from the small seeds the book uses by hand (0, 1, 2, ...).
_SEED_STRIDE = 1_000_003


def seed_shift() -> int:
    """The seed shift ``k`` from the environment variable ``MMBOOK_SEED_SHIFT`` (0 when unset).

    ``make test-seeds`` sets it to run the whole book with other seeds: every seed the book uses
    goes through :func:`seed`, so one variable reaches all of them. A value that is not a
    non-negative integer raises :class:`ValueError` naming the variable.
    """
    raw = os.environ.get(_SEED_SHIFT_ENV, "").strip()
    if not raw:
        return 0
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(
            f"environment variable {_SEED_SHIFT_ENV} must be a non-negative integer, got {raw!r}"
        ) from None
    if value < 0:
        raise ValueError(f"environment variable {_SEED_SHIFT_ENV} must be a non-negative integer, got {raw!r}")
    return value


def _check_seed(fn: str, seed: Any) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise TypeError(f"{fn}: seed must be an int, got {type(seed).__name__}")
    if not 0 <= int(seed) < 2**32:
        raise ValueError(f"{fn}: seed must be in [0, 2**32), got {seed}")
    return int(seed)


def seed(base: int) -> int:
    """The seed the book actually uses for the nominal seed ``base``.

    ``base`` itself when ``MMBOOK_SEED_SHIFT`` is unset or 0 (so stored outputs are made with the
    seeds the text names), ``(base + k * 1_000_003) mod 2**32`` under shift ``k``. Every seed in the
    book goes through this function: :func:`set_seed`, :func:`torch_generator`, :func:`numpy_rng`
    and :func:`python_rng` call it, and a third-party ``random_state=`` gets ``mmbook.seed(n)``.
    """
    return _shifted(_check_seed("seed", base))


def _shifted(value: int) -> int:
    return (value + seed_shift() * _SEED_STRIDE) % 2**32


def set_seed(seed: int) -> None:
    """Seed Python's ``random``, NumPy's global generator and PyTorch (CPU and all GPUs).

    The seed goes through :func:`mmbook.seed`, so ``MMBOOK_SEED_SHIFT`` shifts it.
    """
    value = _shifted(_check_seed("set_seed", seed))
    random.seed(value)
    np.random.seed(value)
    torch.manual_seed(value)  # also seeds every CUDA device


def torch_generator(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A new ``torch.Generator`` on ``device`` seeded with :func:`mmbook.seed` of ``seed``.

    Draw on the CPU and move the result with ``.to(device)`` so that the numbers are the same on
    every device; a CUDA generator exists for code that must draw on the GPU.
    """
    fn = "torch_generator"
    value = _shifted(_check_seed(fn, seed))
    if device is not None:  # None: the CPU, as for torch.Generator
        device = check_device("device", device, fn)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError(f"{fn}: device {str(device)!r} asks for CUDA but CUDA is not available on this machine")
    return torch.Generator(device=device).manual_seed(value)


def numpy_rng(seed: int) -> np.random.Generator:
    """A new NumPy ``Generator`` (PCG64) seeded with :func:`mmbook.seed` of ``seed``."""
    return np.random.default_rng(_shifted(_check_seed("numpy_rng", seed)))


def python_rng(seed: int) -> random.Random:
    """A new ``random.Random`` seeded with :func:`mmbook.seed` of ``seed``."""
    return random.Random(_shifted(_check_seed("python_rng", seed)))


class Source:
    """The source code of an object; shows highlighted in Jupyter, as plain text elsewhere."""

    def __init__(self, code: str, name: str) -> None:
        for arg, value in (("code", code), ("name", name)):
            if not isinstance(value, str):
                raise TypeError(f"Source: {arg} must be a str, got {type(value).__name__}")
        self.code = code
        self.name = name

    def __repr__(self) -> str:
        return self.code.rstrip("\n")

    __str__ = __repr__

    def _repr_html_(self) -> str:
        try:
            from pygments import highlight
            from pygments.formatters import HtmlFormatter
            from pygments.lexers import PythonLexer
        except ImportError:  # pygments is optional for the package alone
            return f"<pre>{html.escape(self.code)}</pre>"
        formatter = HtmlFormatter(noclasses=True, style="default")
        return highlight(self.code, PythonLexer(), formatter)


def show(obj: Any) -> Source:
    """Return the source of a function, class, method or module, ready to display.

    In a notebook the returned :class:`Source` renders with syntax highlighting; in a
    terminal its ``repr`` is the plain source text.
    """
    target = inspect.unwrap(obj) if callable(obj) else obj
    if not (inspect.isfunction(target) or inspect.ismethod(target) or inspect.isclass(target)
            or inspect.ismodule(target)):
        raise TypeError(
            f"show: obj must be a function, method, class or module, got {type(obj).__name__}"
        )
    try:
        code = inspect.getsource(target)
    except (OSError, TypeError) as err:
        raise TypeError(f"show: no Python source is available for {obj!r} ({err})") from None
    name = getattr(target, "__qualname__", getattr(target, "__name__", repr(target)))
    return Source(textwrap.dedent(code), name)
