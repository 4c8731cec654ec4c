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

__all__ = ["Source", "get_device", "set_seed", "show"]

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
    if device.type not in _KNOWN_DEVICE_TYPES:
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


def set_seed(seed: int) -> None:
    """Seed Python's ``random``, NumPy's global generator and PyTorch (CPU and all GPUs)."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise TypeError(f"set_seed: seed must be an int, got {type(seed).__name__}")
    if not 0 <= int(seed) < 2**32:
        raise ValueError(f"set_seed: seed must be in [0, 2**32), got {seed}")
    seed = int(seed)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


class Source:
    """The source code of an object; shows highlighted in Jupyter, as plain text elsewhere."""

    def __init__(self, code: str, name: str) -> None:
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
