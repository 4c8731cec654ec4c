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


def test_entries_that_could_never_be_read_back_are_refused(tmp_path):
    path = tmp_path / "a.npz"
    # a NaN in the key never compares equal to itself: the entry would be "for other settings" on every load
    with pytest.raises(ValueError, match="cache_path: key must not hold NaN or infinite numbers"):
        cache_path("test", {"lr": float("nan")})
    with pytest.raises(ValueError, match="save_arrays: key must not hold NaN"):
        save_arrays(path, {"lr": float("inf")}, _arrays())
    with pytest.raises(TypeError, match="cache_path: key must hold only JSON values"):
        cache_path("test", {"x": object()})
    # an object array is stored as a pickle, which load_arrays refuses
    with pytest.raises(TypeError, match=r"save_arrays: arrays\['a'\] must hold numbers, strings or bools, got dtype"):
        save_arrays(path, KEY, {"a": np.array([{"x": 1}])})
    with pytest.raises(ValueError, match=r"save_arrays: arrays\['a'\] is not an array"):
        save_arrays(path, KEY, {"a": [[1], [1, 2]]})
    with pytest.raises(TypeError, match="save_arrays: array names must be non-empty strs, got 1"):
        save_arrays(path, KEY, {1: np.zeros(2)})
    # a blob torch.load(weights_only=True) would refuse
    with pytest.raises(TypeError, match=r"save_tensors: blob must hold only tensors.*got function at blob\['f'\]\[0\]"):
        save_tensors(tmp_path / "b.pt", KEY, {"f": [lambda: 0]})
    with pytest.raises(TypeError, match=r"save_tensors: blob must hold only.*got object at blob\['s'\]\['k'\]"):
        save_tensors(tmp_path / "b.pt", KEY, {"s": {"k": object()}})
    assert not any(tmp_path.iterdir())
    save_tensors(tmp_path / "b.pt", KEY, {"t": torch.ones(2), "meta": {"names": ["a"], "n": (1, 2.5, None)},
                                          "dtype": torch.float16})
    assert load_tensors(tmp_path / "b.pt", KEY)["dtype"] is torch.float16


def test_wrong_types_are_named(tmp_path, monkeypatch):
    path = tmp_path / "a.npz"
    save_arrays(path, KEY, _arrays())
    for call, fn in ((lambda: save_arrays(5, KEY, _arrays()), "save_arrays"),
                     (lambda: load_arrays(None, KEY), "load_arrays"),
                     (lambda: save_tensors(3, KEY, {}), "save_tensors"),
                     (lambda: load_tensors(3.0, KEY), "load_tensors")):
        with pytest.raises(TypeError, match=f"{fn}: path must be a str or a path"):
            call()
    for call, fn in ((lambda: save_arrays(path, [1], _arrays()), "save_arrays"),
                     (lambda: load_arrays(path, [1]), "load_arrays"),
                     (lambda: load_tensors(path, "k"), "load_tensors")):
        with pytest.raises(TypeError, match=f"{fn}: key must be a mapping of settings"):
            call()
    with pytest.raises(TypeError, match="load_arrays: expected must be a mapping"):
        load_arrays(path, KEY, [("x", None)])
    with pytest.raises(TypeError, match=r"load_arrays: expected\['x'\] must be a \(shape, dtype\) pair, got \(3,\)"):
        load_arrays(path, KEY, {"x": (3,)})
    with pytest.raises(TypeError, match=r"load_arrays: expected\['x'\] shape must be a tuple of ints or None, got 3"):
        load_arrays(path, KEY, {"x": (3, None)})
    with pytest.raises(TypeError, match=r"load_arrays: expected\['x'\] dtype must be a NumPy dtype or None"):
        load_arrays(path, KEY, {"x": (None, "floot")})
    with pytest.raises(TypeError, match="fn must be the caller's name as a str, got 3"):
        load_arrays(path, KEY, fn=3)
    assert load_arrays(path, KEY, EXPECTED, fn="caller")["y"].tolist() == [1, 2, 3]
    with pytest.raises(FileNotFoundError, match="save_arrays: the folder of .*no/such/a.npz does not exist"):
        save_arrays(tmp_path / "no" / "such" / "a.npz", KEY, _arrays())
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("MMBOOK_CACHE_DIR", str(tmp_path / "file"))
    with pytest.raises(RuntimeError, match="cache_dir: .*file \\(from environment variable MMBOOK_CACHE_DIR\\) cannot"):
        cache_dir()


def test_cached_training_trains_once_then_loads(tmp_path, monkeypatch):
    from mmbook.cache import cached_training

    monkeypatch.setenv("MMBOOK_CACHE_DIR", str(tmp_path))
    calls = []

    def train(model):
        calls.append(1)
        with torch.no_grad():
            model.weight.fill_(2.0)
        return {"losses": [3.0, 1.0]}

    first = torch.nn.Linear(2, 2)
    record, loaded = cached_training("toy", {"steps": 1}, first, train)
    assert (record, loaded, len(calls)) == ({"losses": [3.0, 1.0]}, False, 1)
    second = torch.nn.Linear(2, 2)
    record, loaded = cached_training("toy", {"steps": 1}, second, train)
    assert (record, loaded, len(calls)) == ({"losses": [3.0, 1.0]}, True, 1)  # loaded, not trained again
    assert torch.equal(second.weight, torch.full((2, 2), 2.0)) and torch.equal(second.bias, first.bias)
    cached_training("toy", {"steps": 2}, torch.nn.Linear(2, 2), train)  # another key: trains again
    assert len(calls) == 2


def test_cached_training_rejects_weights_of_another_model(tmp_path, monkeypatch):
    from mmbook.cache import cached_training

    monkeypatch.setenv("MMBOOK_CACHE_DIR", str(tmp_path))
    cached_training("toy", {"steps": 1}, torch.nn.Linear(2, 2), lambda m: {})
    path = next(tmp_path.glob("toy_*.pt"))
    # a well-formed entry under the same key whose weights belong to a larger layer
    save_tensors(path, {"steps": 1, "_device": ["cpu"]},
                 {"state": torch.nn.Linear(3, 2).state_dict(), "record": {}})
    with pytest.raises(CacheError, match="toy_.*do not fit the model"):
        cached_training("toy", {"steps": 1}, torch.nn.Linear(2, 2), lambda m: {})
    path.write_bytes(path.read_bytes()[:40])  # truncated
    with pytest.raises(CacheError, match="toy_"):
        cached_training("toy", {"steps": 1}, torch.nn.Linear(2, 2), lambda m: {})


def test_cached_training_bad_arguments(tmp_path, monkeypatch):
    from mmbook.cache import cached_training

    monkeypatch.setenv("MMBOOK_CACHE_DIR", str(tmp_path))
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        cached_training("toy", {}, "model", lambda m: {})
    with pytest.raises(TypeError, match="train must be a callable"):
        cached_training("toy", {}, torch.nn.Linear(2, 2), None)
    with pytest.raises(TypeError, match="key must be a mapping"):
        cached_training("toy", [1], torch.nn.Linear(2, 2), lambda m: {})
    with pytest.raises(TypeError, match="must return a dict"):
        cached_training("toy", {}, torch.nn.Linear(2, 2), lambda m: [1.0])
    assert not list(tmp_path.glob("toy_*")), "a failed training must not leave a cache entry"
