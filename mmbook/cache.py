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

__all__ = ["CacheError", "cache_dir", "cache_path", "cached_training", "load_arrays", "load_tensors", "save_arrays",
           "save_tensors"]

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
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        source = f"environment variable {_CACHE_ENV}" if override else "the book's cache folder"
        raise RuntimeError(f"cache_dir: {path} (from {source}) cannot be used as a folder: {err}") from None
    return path


def _check_path(path: Any, fn: str) -> Path:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"{fn}: path must be a str or a path, got {type(path).__name__}")
    return Path(path)


def _check_fn(fn: Any) -> str:
    if not isinstance(fn, str) or not fn:
        raise TypeError(f"load_arrays/load_tensors: fn must be the caller's name as a str, got {fn!r}")
    return fn


def _key_text(key: Any, fn: str) -> str:
    """The JSON text of the full key; a key that JSON cannot hold exactly is refused (a NaN would never
    compare equal to itself when the file is loaded, so the entry could never be read back)."""
    if not isinstance(key, Mapping):
        raise TypeError(f"{fn}: key must be a mapping of settings, got {type(key).__name__}")
    try:
        return json.dumps(_full_key(key), sort_keys=True, allow_nan=False)
    except TypeError as err:
        raise TypeError(f"{fn}: key must hold only JSON values (str, numbers, bools, None, lists, dicts): {err}") \
            from None
    except ValueError:
        raise ValueError(f"{fn}: key must not hold NaN or infinite numbers, got {dict(key)!r}") from None


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
    if suffix not in (".npz", ".pt"):
        raise ValueError(f"cache_path: suffix must be '.npz' or '.pt', got {suffix!r}")
    text = _key_text(key, "cache_path")
    return cache_dir() / f"{prefix}_{hashlib.sha1(text.encode()).hexdigest()[:12]}{suffix}"


def _write(path: Path, key: Mapping[str, Any], kind: str, payload: bytes, fn: str) -> None:
    header = {"format": _FORMAT, "version": _VERSION, "kind": kind, "key": _full_key(key),
              "sha256": hashlib.sha256(payload).hexdigest(), "size": len(payload)}
    if not path.parent.is_dir():
        raise FileNotFoundError(f"{fn}: the folder of {path} does not exist")
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")  # per process: two workers may write at once
    with open(tmp, "wb") as f:
        f.write(json.dumps(header, sort_keys=True).encode() + b"\n")
        f.write(payload)
    os.replace(tmp, path)


def _read(path: Path, key: Mapping[str, Any], kind: str, fn: str) -> bytes:
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
    if header.get("key") != json.loads(_key_text(key, fn)):
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
    fn = "save_arrays"
    path = _check_path(path, fn)
    _key_text(key, fn)
    if not isinstance(arrays, Mapping) or not arrays:
        raise ValueError(f"{fn}: arrays must be a non-empty mapping of names to NumPy arrays")
    values = {}
    for name, value in arrays.items():
        if not isinstance(name, str) or not name:
            raise TypeError(f"{fn}: array names must be non-empty strs, got {name!r}")
        try:
            value = np.asarray(value)
        except ValueError as err:  # a ragged list
            raise ValueError(f"{fn}: arrays[{name!r}] is not an array: {err}") from None
        if value.dtype.hasobject:  # stored as a pickle, which load_arrays refuses to read
            raise TypeError(f"{fn}: arrays[{name!r}] must hold numbers, strings or bools, got dtype object")
        values[name] = value
    buf = io.BytesIO()
    np.savez_compressed(buf, **values)
    _write(path, key, "npz", buf.getvalue(), fn)


def load_arrays(path: Path, key: Mapping[str, Any],
                expected: Mapping[str, tuple[tuple | None, Any]] | None = None,
                fn: str = "load_arrays") -> dict[str, np.ndarray]:
    """Read arrays written by :func:`save_arrays`, checking header, key, size, hash and ``expected``.

    ``expected`` maps names to ``(shape, dtype)``; a ``None`` shape, dtype or dimension is not checked.
    Raises :class:`CacheError` naming ``path`` (on behalf of ``fn``) when anything disagrees.
    """
    fn = _check_fn(fn)
    path = _check_path(path, fn)
    _key_text(key, fn)
    if expected is not None:
        expected = _check_expected_spec(expected, fn)
    payload = _read(path, key, "npz", fn)
    try:
        with np.load(io.BytesIO(payload), allow_pickle=False) as z:
            arrays = {name: z[name] for name in z.files}
    except (ValueError, OSError) as err:
        raise CacheError(f"{fn}: {path} cannot be read as arrays ({err}); delete it and run again") from None
    _check_expected(path, arrays, expected, fn)
    return arrays


def _check_expected_spec(expected: Any, fn: str) -> dict[str, tuple[tuple | None, np.dtype | None]]:
    """``expected`` as ``{name: (shape or None, NumPy dtype or None)}``, with the dtypes parsed."""
    if not isinstance(expected, Mapping):
        raise TypeError(f"{fn}: expected must be a mapping of names to (shape, dtype), got {type(expected).__name__}")
    spec = {}
    for name, entry in expected.items():
        if not isinstance(entry, tuple) or len(entry) != 2:
            raise TypeError(f"{fn}: expected[{name!r}] must be a (shape, dtype) pair, got {entry!r}")
        shape, dtype = entry
        if shape is not None and (not isinstance(shape, tuple)
                                  or any(s is not None and not isinstance(s, int) for s in shape)):
            raise TypeError(f"{fn}: expected[{name!r}] shape must be a tuple of ints or None, got {shape!r}")
        try:
            spec[name] = (shape, None if dtype is None else np.dtype(dtype))
        except TypeError:
            raise TypeError(f"{fn}: expected[{name!r}] dtype must be a NumPy dtype or None, got {dtype!r}") from None
    return spec


def save_tensors(path: Path, key: Mapping[str, Any], blob: Mapping[str, Any]) -> None:
    """Write ``blob`` (tensors, lists, numbers, strings: what ``torch.load(weights_only=True)`` accepts)."""
    fn = "save_tensors"
    path = _check_path(path, fn)
    _key_text(key, fn)
    if not isinstance(blob, Mapping):
        raise TypeError(f"{fn}: blob must be a mapping, got {type(blob).__name__}")
    # what load_tensors could not read back must not be written (it would fail on every later run)
    bad = _foreign_entry(blob, "blob")
    if bad is not None:
        raise TypeError(f"{fn}: blob must hold only tensors, numbers, strings, lists, tuples and dicts "
                        f"(what torch.load(weights_only=True) reads back), got {bad}")
    buf = io.BytesIO()
    torch.save(dict(blob), buf)
    _write(path, key, "torch", buf.getvalue(), fn)


_PLAIN = (torch.Tensor, str, bytes, int, float, complex, type(None), torch.dtype, torch.device)


def _foreign_entry(value: Any, where: str) -> str | None:
    """Where in ``value`` an object lies that ``torch.load(weights_only=True)`` refuses (a walk over the
    containers, cheap next to serialising the tensors), or None."""
    if isinstance(value, _PLAIN):
        return None
    if isinstance(value, dict):
        for k, v in value.items():
            bad = _foreign_entry(k, f"a key of {where}") or _foreign_entry(v, f"{where}[{k!r}]")
            if bad is not None:
                return bad
        return None
    if isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            bad = _foreign_entry(v, f"{where}[{i}]")
            if bad is not None:
                return bad
        return None
    return f"{type(value).__name__} at {where}"


def load_tensors(path: Path, key: Mapping[str, Any], fn: str = "load_tensors") -> dict[str, Any]:
    """Read a blob written by :func:`save_tensors`, checking header, key, size and hash (weights only)."""
    fn = _check_fn(fn)
    path = _check_path(path, fn)
    _key_text(key, fn)
    payload = _read(path, key, "torch", fn)
    try:
        blob = torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unpickling failure means the file cannot be used
        raise CacheError(f"{fn}: {path} cannot be read as tensors ({err}); delete it and run again") from None
    if not isinstance(blob, dict):
        raise CacheError(f"{fn}: {path} holds a {type(blob).__name__}, expected a dict; delete it and run again")
    return blob


def cached_training(prefix: str, key: Mapping[str, Any], model: torch.nn.Module, train: Any, *,
                    fn: str = "cached_training") -> tuple[dict[str, Any], bool]:
    """Train ``model`` once and load the result afterwards: ``train(model)`` runs on the first call and returns a
    record (a dict of numbers, lists, strings or tensors: a loss history, a timing); the trained weights and the
    record are saved under :func:`cache_path` ``(prefix, key + the model's device type)``. Later calls load both
    into ``model`` instead of training. Returns ``(record, loaded)``.

    ``key`` must hold every setting that changes the result (architecture, recipe, data size, a version number to
    bump when the code changes). A file whose weights do not fit ``model`` (other names, shapes or dtypes) raises
    :class:`CacheError` naming it, like every other damaged entry.
    """
    fn = _check_fn(fn)
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"{fn}: model must be a torch.nn.Module, got {type(model).__name__}")
    if not callable(train):
        raise TypeError(f"{fn}: train must be a callable train(model) -> dict, got {type(train).__name__}")
    if not isinstance(key, Mapping):
        raise TypeError(f"{fn}: key must be a mapping of settings, got {type(key).__name__}")
    expected = model.state_dict()
    devices = {t.device.type for t in expected.values()} or {"cpu"}
    full = {**key, "_device": sorted(devices)}
    path = cache_path(prefix, full, ".pt")
    if path.is_file():
        blob = load_tensors(path, full, fn=fn)
        state, record = blob.get("state"), blob.get("record")
        if not isinstance(state, dict) or not isinstance(record, dict):
            raise CacheError(f"{fn}: {path} holds no trained weights and record; delete it and run again")
        got = {k: (tuple(v.shape), v.dtype) for k, v in state.items() if isinstance(v, torch.Tensor)}
        want = {k: (tuple(v.shape), v.dtype) for k, v in expected.items()}
        if got != want or len(got) != len(state):
            wrong = sorted(k for k in set(got) | set(want) if got.get(k) != want.get(k))[:3]
            raise CacheError(f"{fn}: {path} holds weights that do not fit the model (first differences: {wrong}); "
                             "delete it and run again")
        model.load_state_dict(state)
        return record, True
    record = train(model)
    if not isinstance(record, dict):
        raise TypeError(f"{fn}: train(model) must return a dict (the record to cache), got {type(record).__name__}")
    save_tensors(path, full, {"state": {k: v.detach().cpu() for k, v in model.state_dict().items()},
                              "record": record})
    return record, False
