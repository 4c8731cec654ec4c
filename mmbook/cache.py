"""Validated cache files: what the book computes once (synthesised speech, trained models) and loads later.

A cache file is one JSON header line followed by the payload (an ``.npz`` archive of arrays, or a
``torch.save`` blob of tensors). The header records the format, the cache key (every setting that
changes the result, plus the library versions) and the SHA-256 of the payload. Loading checks all three
and then the expected names, shapes and dtypes, so a corrupt, truncated, foreign or stale file raises
:class:`CacheError` naming the file (and saying to delete it) instead of returning a wrong dataset or
model. Files are written to a per-process temporary name and renamed, so two notebook workers can write
the same entry at once.

The folder is ``data/cache/`` beside the package, or the folder named by ``MMBOOK_CACHE_DIR``
(the unit tests point it at a temporary folder, so they never write into the real cache).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mmbook.core import seed_shift

__all__ = ["CacheError", "cache_dir", "cache_path", "load_arrays", "load_tensors", "save_arrays", "save_tensors"]

_FORMAT = "mmbook-cache"
_VERSION = 1
_CACHE_ENV = "MMBOOK_CACHE_DIR"
_MAX_HEADER = 1 << 16


class CacheError(RuntimeError):
    """A cache file that cannot be trusted: the message names the file and says to delete it."""


def cache_dir() -> Path:
    """The cache folder (created on demand): ``MMBOOK_CACHE_DIR`` if set, else ``data/cache`` beside the package."""
    override = os.environ.get(_CACHE_ENV, "").strip()
    path = Path(override) if override else Path(__file__).resolve().parent.parent / "data" / "cache"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _full_key(key: Mapping[str, Any]) -> dict[str, Any]:
    full = {str(k): v for k, v in key.items()}
    # What changes a cached result besides the caller's settings: the numerical libraries, and the seed shift
    # (``make test-seeds`` must not load the files made with the book's own seeds).
    full["_libs"] = {"torch": torch.__version__, "numpy": np.__version__}
    full["_seed_shift"] = seed_shift()
    return full


def cache_path(prefix: str, key: Mapping[str, Any], suffix: str = ".npz") -> Path:
    """The file for the entry ``key`` (a JSON-serialisable mapping of every setting that changes the result).

    The name is ``prefix`` plus a hash of the key, the library versions and the seed shift, so changing
    any of them makes a new entry instead of loading a stale one.
    """
    if not isinstance(prefix, str) or not prefix.isidentifier():
        raise ValueError(f"cache_path: prefix must be a short identifier such as 'speech', got {prefix!r}")
    if not isinstance(key, Mapping):
        raise TypeError(f"cache_path: key must be a mapping of settings, got {type(key).__name__}")
    if suffix not in (".npz", ".pt"):
        raise ValueError(f"cache_path: suffix must be '.npz' or '.pt', got {suffix!r}")
    text = json.dumps(_full_key(key), sort_keys=True)
    return cache_dir() / f"{prefix}_{hashlib.sha1(text.encode()).hexdigest()[:12]}{suffix}"


def _write(path: Path, key: Mapping[str, Any], kind: str, payload: bytes) -> None:
    header = {"format": _FORMAT, "version": _VERSION, "kind": kind, "key": _full_key(key),
              "sha256": hashlib.sha256(payload).hexdigest(), "size": len(payload)}
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")  # per process: two workers may write at once
    with open(tmp, "wb") as f:
        f.write(json.dumps(header, sort_keys=True).encode() + b"\n")
        f.write(payload)
    os.replace(tmp, path)


def _read(path: Path, key: Mapping[str, Any], kind: str, fn: str) -> bytes:
    path = Path(path)
    advice = "delete it and run again (it is rebuilt)"
    with open(path, "rb") as f:
        line = f.readline(_MAX_HEADER)
        payload = f.read()
    try:
        header = json.loads(line)
        if not isinstance(header, dict) or header.get("format") != _FORMAT:
            raise ValueError
    except ValueError:
        raise CacheError(f"{fn}: {path} is not an mmbook cache file (no valid header); {advice}") from None
    if header.get("version") != _VERSION or header.get("kind") != kind:
        raise CacheError(f"{fn}: {path} has format version {header.get('version')} / kind {header.get('kind')!r}, "
                         f"expected {_VERSION} / {kind!r}; {advice}")
    if header.get("key") != json.loads(json.dumps(_full_key(key), sort_keys=True)):
        raise CacheError(f"{fn}: {path} was written for other settings ({header.get('key')}); {advice}")
    if header.get("size") != len(payload):
        raise CacheError(f"{fn}: {path} is truncated ({len(payload)} of {header.get('size')} payload bytes); {advice}")
    if hashlib.sha256(payload).hexdigest() != header.get("sha256"):
        raise CacheError(f"{fn}: {path} is corrupt (its content hash does not match its header); {advice}")
    return payload


def _check_expected(path: Path, got: Mapping[str, Any], expected: Mapping[str, tuple[tuple | None, Any]] | None,
                    fn: str) -> None:
    if expected is None:
        return
    missing = sorted(set(expected) - set(got))
    if missing:
        raise CacheError(f"{fn}: {path} lacks the entries {missing}; delete it and run again (it is rebuilt)")
    for name, (shape, dtype) in expected.items():
        value = got[name]
        vshape, vdtype = tuple(value.shape), value.dtype
        if shape is not None and (len(vshape) != len(shape)
                                  or any(s is not None and s != v for s, v in zip(shape, vshape, strict=True))):
            raise CacheError(f"{fn}: {path} holds {name} of shape {vshape}, expected {shape}; delete it and run again")
        if dtype is not None and vdtype != dtype:
            raise CacheError(f"{fn}: {path} holds {name} of dtype {vdtype}, expected {dtype}; delete it and run again")


def save_arrays(path: Path, key: Mapping[str, Any], arrays: Mapping[str, np.ndarray]) -> None:
    """Write ``arrays`` (name -> NumPy array) to ``path`` with a header holding ``key`` and the content hash."""
    if not isinstance(arrays, Mapping) or not arrays:
        raise ValueError("save_arrays: arrays must be a non-empty mapping of names to NumPy arrays")
    buf = io.BytesIO()
    np.savez_compressed(buf, **{k: np.asarray(v) for k, v in arrays.items()})
    _write(path, key, "npz", buf.getvalue())


def load_arrays(path: Path, key: Mapping[str, Any],
                expected: Mapping[str, tuple[tuple | None, Any]] | None = None,
                fn: str = "load_arrays") -> dict[str, np.ndarray]:
    """Read arrays written by :func:`save_arrays`, checking header, key, size, hash and ``expected``.

    ``expected`` maps names to ``(shape, dtype)``; a ``None`` shape, dtype or dimension is not checked.
    Raises :class:`CacheError` naming ``path`` (on behalf of ``fn``) when anything disagrees.
    """
    payload = _read(path, key, "npz", fn)
    try:
        with np.load(io.BytesIO(payload), allow_pickle=False) as z:
            arrays = {name: z[name] for name in z.files}
    except (ValueError, OSError) as err:
        raise CacheError(f"{fn}: {path} cannot be read as arrays ({err}); delete it and run again") from None
    _check_expected(path, arrays, {k: (s, None if d is None else np.dtype(d)) for k, (s, d) in expected.items()}
                    if expected is not None else None, fn)
    return arrays


def save_tensors(path: Path, key: Mapping[str, Any], blob: Mapping[str, Any]) -> None:
    """Write ``blob`` (tensors, lists, numbers, strings: what ``torch.load(weights_only=True)`` accepts)."""
    if not isinstance(blob, Mapping):
        raise TypeError(f"save_tensors: blob must be a mapping, got {type(blob).__name__}")
    buf = io.BytesIO()
    torch.save(dict(blob), buf)
    _write(path, key, "torch", buf.getvalue())


def load_tensors(path: Path, key: Mapping[str, Any], fn: str = "load_tensors") -> dict[str, Any]:
    """Read a blob written by :func:`save_tensors`, checking header, key, size and hash (weights only)."""
    payload = _read(path, key, "torch", fn)
    try:
        blob = torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unpickling failure means the file cannot be used
        raise CacheError(f"{fn}: {path} cannot be read as tensors ({err}); delete it and run again") from None
    if not isinstance(blob, dict):
        raise CacheError(f"{fn}: {path} holds a {type(blob).__name__}, expected a dict; delete it and run again")
    return blob
