"""Validated cache files: a corrupt, truncated, foreign or stale file is named in the error, never loaded."""

import numpy as np
import pytest
import torch

from mmbook.cache import CacheError, cache_dir, cache_path, load_arrays, load_tensors, save_arrays, save_tensors

KEY = {"what": "test", "n": 3}
EXPECTED = {"x": ((3, 2), np.float32), "y": ((3,), np.int64)}


def _arrays():
    return {"x": np.arange(6, dtype=np.float32).reshape(3, 2), "y": np.array([1, 2, 3], dtype=np.int64)}


def test_cache_dir_follows_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("MMBOOK_CACHE_DIR", str(tmp_path / "c"))
    assert cache_dir() == tmp_path / "c" and (tmp_path / "c").is_dir()
    path = cache_path("test", KEY)
    assert path.parent == tmp_path / "c" and path.name.startswith("test_") and path.suffix == ".npz"


def test_round_trip_arrays_and_tensors(tmp_path):
    path = tmp_path / "a.npz"
    save_arrays(path, KEY, _arrays())
    got = load_arrays(path, KEY, EXPECTED)
    assert np.array_equal(got["x"], _arrays()["x"]) and np.array_equal(got["y"], _arrays()["y"])
    tpath = tmp_path / "m.pt"
    save_tensors(tpath, KEY, {"w": torch.ones(2, 2), "itos": ["a", "b"]})
    blob = load_tensors(tpath, KEY)
    assert torch.equal(blob["w"], torch.ones(2, 2)) and blob["itos"] == ["a", "b"]
    assert not list(tmp_path.glob(".*tmp*")), "temporary files must be renamed into place"


def test_key_changes_with_seed_shift(monkeypatch):
    monkeypatch.delenv("MMBOOK_SEED_SHIFT", raising=False)
    base = cache_path("test", KEY)
    monkeypatch.setenv("MMBOOK_SEED_SHIFT", "1")
    assert cache_path("test", KEY) != base


def test_truncated_file_is_named(tmp_path):
    path = tmp_path / "a.npz"
    save_arrays(path, KEY, _arrays())
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 40])
    with pytest.raises(CacheError, match=r"a\.npz is truncated.*delete it"):
        load_arrays(path, KEY, EXPECTED)


def test_wrong_content_is_named(tmp_path):
    # A well-formed file whose payload was replaced by other (same-length) content.
    path = tmp_path / "a.npz"
    save_arrays(path, KEY, _arrays())
    header, payload = path.read_bytes().split(b"\n", 1)
    other = tmp_path / "b.npz"
    save_arrays(other, KEY, {"x": -_arrays()["x"], "y": _arrays()["y"]})
    other_payload = other.read_bytes().split(b"\n", 1)[1]
    forged = payload[:-len(other_payload)] + other_payload if len(other_payload) <= len(payload) else payload[::-1]
    path.write_bytes(header + b"\n" + forged[: len(payload)])
    with pytest.raises(CacheError, match=r"a\.npz is corrupt"):
        load_arrays(path, KEY, EXPECTED)


def test_plain_npz_and_untrained_pt_are_rejected(tmp_path):
    plain = tmp_path / "plain.npz"
    np.savez(plain, **_arrays())
    with pytest.raises(CacheError, match=r"plain\.npz is not an mmbook cache file"):
        load_arrays(plain, KEY, EXPECTED)
    weights = tmp_path / "untrained.pt"
    torch.save({"w": torch.randn(2, 2)}, weights)
    with pytest.raises(CacheError, match=r"untrained\.pt is not an mmbook cache file"):
        load_tensors(weights, KEY)


def test_foreign_key_and_wrong_shape_are_named(tmp_path):
    path = tmp_path / "a.npz"
    save_arrays(path, KEY, _arrays())
    with pytest.raises(CacheError, match=r"a\.npz was written for other settings"):
        load_arrays(path, {"what": "test", "n": 4}, EXPECTED)
    with pytest.raises(CacheError, match=r"a\.npz holds x of shape \(3, 2\), expected \(4, 2\)"):
        load_arrays(path, KEY, {"x": ((4, 2), np.float32)})
    with pytest.raises(CacheError, match=r"a\.npz holds y of dtype int64, expected int32"):
        load_arrays(path, KEY, {"y": ((3,), np.int32)})
    with pytest.raises(CacheError, match=r"lacks the entries \['z'\]"):
        load_arrays(path, KEY, {"z": (None, None)})


def test_bad_arguments():
    with pytest.raises(ValueError, match="prefix must be a short identifier"):
        cache_path("a/b", KEY)
    with pytest.raises(TypeError, match="key must be a mapping"):
        cache_path("test", [1])
    with pytest.raises(ValueError, match="suffix must be"):
        cache_path("test", KEY, ".txt")
    with pytest.raises(ValueError, match="arrays must be a non-empty mapping"):
        save_arrays("x.npz", KEY, {})
