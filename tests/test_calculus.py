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
    with pytest.raises(ValueError, match="eps must be a positive number"):
        numerical_jacobian(torch.sin, torch.zeros(2), eps=0)
    with pytest.raises(ValueError, match="f must return a scalar"):
        numerical_gradient(torch.sin, torch.zeros(2, dtype=torch.float64))
    with pytest.raises(ValueError, match="same shape"):
        max_relative_error(torch.zeros(2), torch.zeros(3))


def test_bad_input_is_named_not_passed_on():
    x = torch.zeros(2, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"softmax: z must have at least one logit"):
        softmax(torch.empty(0))
    with pytest.raises(TypeError, match="numerical_jacobian: f must be a callable, got int"):
        numerical_jacobian(3, x)
    for eps in (float("nan"), float("inf"), -1e-6):
        with pytest.raises(ValueError, match="numerical_jacobian: eps must be a positive number"):
            numerical_jacobian(torch.sin, x, eps=eps)
    with pytest.raises(TypeError, match="numerical_jacobian: eps must be a number, got str"):
        numerical_jacobian(torch.sin, x, eps="1e-6")
    with pytest.raises(TypeError, match="numerical_jacobian: f must return a torch.Tensor, got list"):
        numerical_jacobian(lambda t: [1.0], x)
    with pytest.raises(TypeError, match="numerical_gradient: f must be a callable"):
        numerical_gradient(None, x)
    with pytest.raises(ValueError, match="numerical_gradient: eps must be a positive number"):
        numerical_gradient(lambda t: t.sum(), x, eps=0.0)
    with pytest.raises(ValueError, match="max_relative_error: a must not be empty"):
        max_relative_error(torch.empty(0), torch.empty(0))
    for floor in (0.0, -1.0, float("nan")):  # floor <= 0 divides 0 by 0; NaN hides every difference
        with pytest.raises(ValueError, match="max_relative_error: floor must be a positive number"):
            max_relative_error(x, x, floor=floor)


def test_nan_empty_and_changing_shapes_are_named():
    nan = float("nan")
    # a NaN error compares False with every tolerance: a check written `err > tol` would pass
    with pytest.raises(ValueError, match="max_relative_error: a contains NaN or infinite values"):
        max_relative_error(torch.tensor([nan, 0.0]), torch.zeros(2))
    with pytest.raises(ValueError, match="max_relative_error: b contains NaN or infinite values"):
        max_relative_error(torch.zeros(1), torch.tensor([float("inf")]))
    # an empty x: torch.stack's 'expects a non-empty TensorList'
    with pytest.raises(ValueError, match=r"numerical_jacobian: x must not be empty, got shape \(0,\)"):
        numerical_jacobian(lambda t: t, torch.zeros(0))
    with pytest.raises(ValueError, match=r"numerical_gradient: x must not be empty, got shape \(0, 2\)"):
        numerical_gradient(lambda t: t.sum(), torch.zeros(0, 2))
    # f(x + eps) and f(x - eps) of different shapes broadcast into a wrong Jacobian
    with pytest.raises(ValueError, match=r"numerical_jacobian: f must return the same shape at every point, "
                                         r"got \(1,\) and \(0,\)"):
        numerical_jacobian(lambda t: t[t > 0], torch.zeros(2, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"numerical_jacobian: f must return the same shape at every point"):
        numerical_jacobian(lambda t: t[: 1 + int(t[0] == 0)], torch.zeros(2, dtype=torch.float64))
