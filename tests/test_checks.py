"""The shared argument checks: one order (name, value, fn), one message form, TypeError for types."""

import numpy as np
import pytest
import torch
from torch import nn

from mmbook.checks import (
    check_bool,
    check_choice,
    check_finite,
    check_float_tensor,
    check_fractions,
    check_ids,
    check_index,
    check_instance,
    check_int,
    check_like,
    check_module_input,
    check_number,
    check_probability,
    check_scalar,
    check_token_batch,
    describe,
    positive_int,
)


def test_ints():
    assert check_int("n", np.int64(3), "f") == 3 and type(check_int("n", np.int64(3), "f")) is int
    assert positive_int("n", 1, "f") == 1
    for bad in (True, 2.0, "2", None):
        with pytest.raises(TypeError, match=f"f: n must be an int, got {type(bad).__name__}"):
            check_int("n", bad, "f")
    with pytest.raises(ValueError, match="f: n must be a positive int, got 0"):
        positive_int("n", 0, "f")
    with pytest.raises(ValueError, match="f: n must be an int >= 0, got -1"):
        check_int("n", -1, "f", low=0)
    with pytest.raises(ValueError, match=r"f: n must be an int in \[2, 4\], got 5"):
        check_int("n", 5, "f", 2, 4)
    with pytest.raises(ValueError, match=r"f: i must be in \[0, 3\), got -1"):  # no wrap-around
        check_index("i", -1, "f", 3)


def test_numbers():
    assert check_number("x", 1, "f") == 1.0
    for bad in (float("nan"), float("inf"), -float("inf")):
        with pytest.raises(ValueError, match="f: x must be a finite number"):
            check_number("x", bad, "f")
    with pytest.raises(ValueError, match="f: x must be a positive number, got 0$"):
        check_number("x", 0, "f", 0.0, low_open=True)
    with pytest.raises(ValueError, match=r"f: p must be in \[0, 1\), got 1.0"):
        check_probability("p", 1.0, "f", high_inclusive=False)
    with pytest.raises(ValueError, match=r"f: p must be in \[0, 1\], got nan"):
        check_probability("p", float("nan"), "f")
    for bad in (True, "0.5", None, torch.tensor(0.5)):
        with pytest.raises(TypeError, match="f: x must be a number"):
            check_number("x", bad, "f")


def test_bool_choice_instance():
    assert check_bool("b", np.bool_(True), "f") is True
    with pytest.raises(TypeError, match="f: b must be True or False, got str"):
        check_bool("b", "no", "f")
    assert check_choice("c", None, "f", (None, "a")) is None
    with pytest.raises(ValueError, match="f: c must be one of 'a', 'b', got 'x'"):
        check_choice("c", "x", "f", ("a", "b"))
    with pytest.raises(ValueError, match="f: c must be one of 1, 2, got True"):  # True == 1, but is no choice
        check_choice("c", True, "f", (1, 2))
    with pytest.raises(TypeError, match="f: m must be a module, got int"):
        check_instance("m", 3, "f", nn.Module, "a module")


def test_tensors():
    x = torch.zeros(2, 3)
    assert check_float_tensor("x", x, "f", 2) is x
    with pytest.raises(TypeError, match="f: x must be a torch.Tensor, got list"):
        check_float_tensor("x", [1.0], "f")
    with pytest.raises(TypeError, match="f: x must be a floating-point tensor, got torch.int64"):
        check_float_tensor("x", x.long(), "f")
    with pytest.raises(ValueError, match=r"f: x must have shape \(batch, d\), got shape \(2, 3, 1\)"):
        check_float_tensor("x", x[..., None], "f", 2, "(batch, d)")
    with pytest.raises(ValueError, match=r"f: x must have at least 3 dimensions, got shape \(2, 3\)"):
        check_float_tensor("x", x, "f", min_ndim=3)
    with pytest.raises(ValueError, match="f: x must not be empty"):
        check_float_tensor("x", x[:0], "f", nonempty=True)
    with pytest.raises(ValueError, match="f: x contains NaN or infinite values"):
        check_float_tensor("x", torch.tensor([float("nan")]), "f", finite=True)
    with pytest.raises(ValueError, match="f: x contains NaN"):
        check_finite("x", np.array([np.inf]), "f")
    assert describe(x) == "a tensor of shape (2, 3) and dtype torch.float32" and describe(3) == "int"


def test_ids_and_agreement():
    ids = torch.tensor([[0, 4], [2, -100]])
    assert check_ids("ids", ids, "f", 5, allow=(-100,)) is ids
    with pytest.raises(ValueError, match=r"f: ids must lie in \[0, 5\), got values in \[-100, 4\]"):
        check_ids("ids", ids, "f", 5)
    with pytest.raises(ValueError, match=r"f: ids must lie in \[0, 4\) \(or -100\), got values in \[0, 4\]"):
        check_ids("ids", ids, "f", 4, allow=(-100,))
    with pytest.raises(TypeError, match="f: ids must be an integer tensor, got torch.bool"):
        check_ids("ids", ids > 0, "f", 5)
    check_ids("ids", ids[:0], "f", 5)  # empty: nothing to range-check
    with pytest.raises(TypeError, match="f: b and a must have the same dtype, got torch.float64 and torch.float32"):
        check_like("b", torch.zeros(1).double(), "f", "a", torch.zeros(1))
    layer = nn.Linear(2, 2)
    check_module_input("x", torch.zeros(1, 2), "f", layer)
    with pytest.raises(TypeError, match="f: x has dtype torch.float64 but the model's parameters are torch.float32"):
        check_module_input("x", torch.zeros(1, 2).double(), "f", layer)
    check_module_input("x", torch.zeros(1, 2), "f", nn.ReLU())  # no parameters: nothing to agree with


def test_fractions():
    assert check_fractions("f", [0.5, 0.5], "g") == (0.5, 0.5)
    with pytest.raises(ValueError, match=r"g: f\[1\] must be a positive number, got nan"):
        check_fractions("f", (0.5, float("nan")), "g")
    with pytest.raises(ValueError, match="g: f must be positive and sum to 1"):
        check_fractions("f", (0.5, 0.6), "g")
    with pytest.raises(TypeError, match="g: f must be a non-empty sequence of numbers"):
        check_fractions("f", "ab", "g")


def test_scalar():
    assert check_scalar("s", 2, "f", 0.0, low_open=True) == 2.0
    t = torch.tensor([1.5], requires_grad=True)
    out = check_scalar("s", t, "f")
    assert out.shape == () and out.requires_grad  # a learned parameter keeps its gradient
    with pytest.raises(ValueError, match=r"f: s must be positive and finite \(a hint\), got 0.0"):
        check_scalar("s", 0.0, "f", 0.0, low_open=True, hint=" (a hint)")
    with pytest.raises(ValueError, match="f: s must be finite, got nan"):
        check_scalar("s", torch.tensor(float("nan")), "f")
    with pytest.raises(ValueError, match=r"f: s must be a scalar, got a tensor of shape \(2,\)"):
        check_scalar("s", torch.zeros(2), "f")
    with pytest.raises(TypeError, match="f: s must be a floating-point scalar tensor, got torch.int64"):
        check_scalar("s", torch.tensor(1), "f")
    with pytest.raises(TypeError, match="f: s must be a number or a scalar tensor, got bool"):
        check_scalar("s", True, "f")
    with pytest.raises(ValueError, match="f: s must be finite and >= 1, got 0.5"):
        check_scalar("s", 0.5, "f", 1.0)


def test_token_batch():
    ids, lengths = torch.tensor([[4, 5, 0], [6, 0, 0]]), torch.tensor([2, 1])
    check_token_batch(ids, lengths, "f", vocab_size=7)
    check_token_batch(ids, None, "f")
    with pytest.raises(ValueError, match=r"f: ids must be an integer tensor of shape \(batch, T\), got \(3,\)"):
        check_token_batch(ids[0], None, "f")
    with pytest.raises(ValueError, match=r"f: ids must lie in \[0, 5\)"):
        check_token_batch(ids, lengths, "f", vocab_size=5)
    with pytest.raises(ValueError, match=r"f: lengths must be a \(batch,\) = \(2,\) tensor"):
        check_token_batch(ids, lengths[:1], "f")
    with pytest.raises(TypeError, match="f: lengths must be an integer tensor"):
        check_token_batch(ids, lengths.float(), "f")
    with pytest.raises(ValueError, match=r"f: lengths must lie in \[1, T=3\]"):
        check_token_batch(ids, torch.tensor([0, 1]), "f")
