import random

import numpy as np
import pytest
import torch

import mmbook
from mmbook.core import Source


def test_get_device_default_is_available(monkeypatch):
    monkeypatch.delenv("MMBOOK_DEVICE", raising=False)
    device = mmbook.get_device()
    assert isinstance(device, torch.device)
    torch.zeros(1, device=device)  # usable


def test_get_device_env_override(monkeypatch):
    monkeypatch.setenv("MMBOOK_DEVICE", "cpu")
    assert mmbook.get_device() == torch.device("cpu")
    monkeypatch.setenv("MMBOOK_DEVICE", " CPU ")
    assert mmbook.get_device() == torch.device("cpu")


def test_get_device_argument_beats_env(monkeypatch):
    monkeypatch.setenv("MMBOOK_DEVICE", "definitely-not-a-device")
    assert mmbook.get_device("cpu") == torch.device("cpu")


def test_get_device_unknown_name(monkeypatch):
    monkeypatch.setenv("MMBOOK_DEVICE", "tpu")
    with pytest.raises(ValueError, match="MMBOOK_DEVICE.*'tpu'|'tpu'.*MMBOOK_DEVICE"):
        mmbook.get_device()
    with pytest.raises(ValueError, match="unknown device 'gpu0'"):
        mmbook.get_device("gpu0")


def test_get_device_wrong_type():
    with pytest.raises(TypeError, match="must be a str"):
        mmbook.get_device(0)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised when CUDA is missing")
def test_get_device_unavailable_cuda(monkeypatch):
    monkeypatch.setenv("MMBOOK_DEVICE", "cuda")
    with pytest.raises(RuntimeError, match="CUDA is not available"):
        mmbook.get_device()


def test_set_seed_reproducible():
    mmbook.set_seed(123)
    a = (random.random(), np.random.rand(), torch.rand(3))
    mmbook.set_seed(123)
    b = (random.random(), np.random.rand(), torch.rand(3))
    assert a[0] == b[0] and a[1] == b[1]
    assert torch.equal(a[2], b[2])
    mmbook.set_seed(124)
    assert not torch.equal(torch.rand(3), b[2])


@pytest.mark.parametrize("bad", [1.5, "0", None, True])
def test_set_seed_type_errors(bad):
    with pytest.raises(TypeError, match="seed must be an int"):
        mmbook.set_seed(bad)


def test_set_seed_range():
    with pytest.raises(ValueError, match=r"seed must be in \[0, 2\*\*32\), got -1"):
        mmbook.set_seed(-1)


def _example(x):
    """Doc."""
    return x + 1


def test_show_plain_and_html():
    src = mmbook.show(_example)
    assert isinstance(src, Source)
    assert repr(src).startswith("def _example(x):")
    assert "return x + 1" in str(src)
    html = src._repr_html_()
    assert "<span" in html and "_example" in html


def test_show_class_and_module():
    assert "class Source" in repr(mmbook.show(Source))
    assert "def get_device" in repr(mmbook.show(mmbook.core))


def test_show_bad_input():
    with pytest.raises(TypeError, match="show: obj must be a function, method, class or module, got int"):
        mmbook.show(3)
    with pytest.raises(TypeError, match="no Python source"):
        mmbook.show(int)


def test_seed_shift_reaches_every_generator(monkeypatch):
    monkeypatch.delenv("MMBOOK_SEED_SHIFT", raising=False)
    assert mmbook.seed(7) == 7 and mmbook.seed_shift() == 0
    base = (mmbook.torch_generator(7).initial_seed(), mmbook.numpy_rng(7).integers(1 << 30),
            mmbook.python_rng(7).random())
    monkeypatch.setenv("MMBOOK_SEED_SHIFT", "2")
    assert mmbook.seed_shift() == 2
    assert mmbook.seed(7) == 7 + 2 * 1_000_003
    assert mmbook.torch_generator(7).initial_seed() == 7 + 2 * 1_000_003
    assert mmbook.numpy_rng(7).integers(1 << 30) != base[1]
    assert mmbook.python_rng(7).random() != base[2]
    mmbook.set_seed(7)
    assert torch.initial_seed() == 7 + 2 * 1_000_003
    assert mmbook.seed(2**32 - 1) == (2**32 - 1 + 2 * 1_000_003) % 2**32


@pytest.mark.parametrize("raw", ["-1", "two", "1.5"])
def test_seed_shift_rejects_bad_environment(monkeypatch, raw):
    monkeypatch.setenv("MMBOOK_SEED_SHIFT", raw)
    with pytest.raises(ValueError, match="MMBOOK_SEED_SHIFT must be a non-negative integer"):
        mmbook.seed(0)


@pytest.mark.parametrize("fn", [mmbook.seed, mmbook.torch_generator, mmbook.numpy_rng, mmbook.python_rng])
def test_seed_helpers_reject_bad_seeds(fn):
    with pytest.raises(TypeError, match="seed must be an int, got float"):
        fn(1.0)
    with pytest.raises(ValueError, match=r"seed must be in \[0, 2\*\*32\), got -3"):
        fn(-3)


def test_torch_generator_names_a_wrong_device(monkeypatch):
    with pytest.raises(ValueError, match="torch_generator: device must name a torch device.*got 'gpu'"):
        mmbook.torch_generator(0, "gpu")
    with pytest.raises(TypeError, match="torch_generator: device must be a torch.device or a name.*got int"):
        mmbook.torch_generator(0, 3)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match="torch_generator: device 'cuda' asks for CUDA but CUDA is not available"):
        mmbook.torch_generator(0, "cuda")
    # the CPU by name, as a torch.device, or None (torch.Generator's default) draw the same numbers
    draws = [torch.rand(3, generator=mmbook.torch_generator(5, d)) for d in ("cpu", torch.device("cpu"), None)]
    assert torch.equal(draws[0], draws[1]) and torch.equal(draws[0], draws[2])


def test_get_device_refuses_a_cpu_index():
    with pytest.raises(ValueError, match="get_device: unknown device 'cpu:3' from name"):
        mmbook.get_device("cpu:3")
    assert mmbook.get_device("cpu:0") == torch.device("cpu", 0)


def test_source_checks_its_arguments():
    with pytest.raises(TypeError, match="Source: code must be a str, got int"):
        Source(5, "x")
    with pytest.raises(TypeError, match="Source: name must be a str, got NoneType"):
        Source("x = 1", None)
    assert repr(Source("x = 1\n", "x")) == "x = 1"
