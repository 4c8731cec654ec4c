import pytest
import torch

import mmbook
from mmbook.calculus import max_relative_error, numerical_gradient, numerical_jacobian, softmax, softmax_jacobian


def test_softmax_and_jacobian_match_torch():
    mmbook.set_seed(0)
    z = torch.randn(7, dtype=torch.float64)
    torch.testing.assert_close(softmax(z), torch.softmax(z, -1), rtol=0, atol=1e-15)
    ref = torch.autograd.functional.jacobian(lambda t: torch.softmax(t, -1), z)
    torch.testing.assert_close(softmax_jacobian(z), ref, rtol=0, atol=1e-12)
    # central differences in float64: truncation O(eps^2) + round-off O(u/eps) << 1e-8
    torch.testing.assert_close(numerical_jacobian(lambda t: torch.softmax(t, -1), z), ref, rtol=0, atol=1e-8)


def test_numerical_gradient_keeps_float64_for_python_floats():
    x = torch.tensor([0.3, -1.2, 2.0], dtype=torch.float64)
    grad = numerical_gradient(lambda t: float((t ** 3).sum()), x)
    torch.testing.assert_close(grad, 3 * x ** 2, rtol=0, atol=1e-8)


def test_max_relative_error():
    a = torch.tensor([1.0, 2.0])
    assert max_relative_error(a, a) == 0.0
    assert max_relative_error(a, torch.tensor([1.0, 3.0])) == pytest.approx(0.2)


def test_bad_input():
    with pytest.raises(ValueError, match=r"z must have 1 dimension\(s\), got shape \(2, 2\)"):
        softmax_jacobian(torch.zeros(2, 2))
    with pytest.raises(TypeError, match="z must be a torch.Tensor, got list"):
        softmax([1.0, 2.0])
    with pytest.raises(TypeError, match="floating-point"):
        softmax(torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="eps must be positive"):
        numerical_jacobian(torch.sin, torch.zeros(2), eps=0)
    with pytest.raises(ValueError, match="f must return a scalar"):
        numerical_gradient(torch.sin, torch.zeros(2, dtype=torch.float64))
    with pytest.raises(ValueError, match="same shape"):
        max_relative_error(torch.zeros(2), torch.zeros(3))
