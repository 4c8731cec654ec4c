"""Derivatives the book derives by hand, and the numerical checks it verifies them with."""

from __future__ import annotations

from collections.abc import Callable

import torch

from mmbook.checks import check_float_tensor, check_instance, check_number
from mmbook.checks import check_float_tensor as _check_tensor  # the name softmax_jacobian's shown source uses

__all__ = ["max_relative_error", "numerical_gradient", "numerical_jacobian", "softmax", "softmax_jacobian"]


def softmax(z: torch.Tensor) -> torch.Tensor:
    """Softmax over the last dimension, shifted by the row maximum for numerical stability.

    ``z``: ``(..., n)`` logits. Returns probabilities of the same shape.
    """
    check_float_tensor("z", z, "softmax")
    if z.ndim and z.shape[-1] == 0:
        raise ValueError(f"softmax: z must have at least one logit in its last dimension, got shape {tuple(z.shape)}")
    shifted = z - z.max(dim=-1, keepdim=True).values
    e = shifted.exp()
    return e / e.sum(dim=-1, keepdim=True)


def softmax_jacobian(z: torch.Tensor) -> torch.Tensor:
    """Jacobian of softmax at ``z`` of shape ``(n,)``: ``J = diag(s) - s s^T``, shape ``(n, n)``.

    ``J[i, j] = d s_i / d z_j = s_i (delta_ij - s_j)``.
    """
    _check_tensor("z", z, "softmax_jacobian", ndim=1)
    s = softmax(z)
    return torch.diag(s) - torch.outer(s, s)


def numerical_jacobian(
    f: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, eps: float = 1e-6
) -> torch.Tensor:
    """Central finite-difference Jacobian ``(f(x + eps e_j) - f(x - eps e_j)) / (2 eps)``.

    ``x`` of any shape; ``f(x)`` of any shape. Returns ``(f(x).numel(), x.numel())``.
    Use float64: the truncation error is O(eps^2) and the round-off error O(u / eps).
    """
    fn = "numerical_jacobian"
    check_instance("f", f, fn, Callable, "a callable")
    check_float_tensor("x", x, fn, nonempty=True)
    eps = check_number("eps", eps, fn, 0.0, low_open=True)
    x = x.detach()
    flat = x.reshape(-1)
    columns = []
    for j in range(flat.numel()):
        step = torch.zeros_like(flat)
        step[j] = eps
        plus, minus = f((flat + step).reshape(x.shape)), f((flat - step).reshape(x.shape))
        if not (isinstance(plus, torch.Tensor) and isinstance(minus, torch.Tensor)):
            raise TypeError(f"{fn}: f must return a torch.Tensor, got {type(plus).__name__}")
        if plus.shape != minus.shape or (columns and plus.numel() != columns[0].numel()):  # else broadcasting
            raise ValueError(f"{fn}: f must return the same shape at every point, got {tuple(plus.shape)} and "
                             f"{tuple(minus.shape) if plus.shape != minus.shape else (columns[0].numel(),)}")
        plus, minus = plus.reshape(-1), minus.reshape(-1)
        columns.append((plus - minus) / (2 * eps))
    return torch.stack(columns, dim=1)


def numerical_gradient(f: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Central finite-difference gradient of a scalar function; same shape as ``x``."""
    check_instance("f", f, "numerical_gradient", Callable, "a callable")
    check_float_tensor("x", x, "numerical_gradient", nonempty=True)
    check_number("eps", eps, "numerical_gradient", 0.0, low_open=True)
    value = f(x.detach())
    if not (isinstance(value, torch.Tensor) and value.numel() == 1) and not isinstance(value, float):
        raise ValueError(f"numerical_gradient: f must return a scalar, got {getattr(value, 'shape', value)!r}")
    # keep x's dtype: torch.as_tensor(python_float) would be float32 and ruin a float64 check
    return numerical_jacobian(lambda t: torch.as_tensor(f(t), dtype=x.dtype).reshape(1), x, eps).reshape(x.shape)


def max_relative_error(a: torch.Tensor, b: torch.Tensor, floor: float = 1e-12) -> float:
    """``max |a - b| / max(|a| + |b|, floor)`` elementwise: the usual gradient-check metric."""
    fn = "max_relative_error"
    # NaN would give a NaN error, which passes a check written ``err > tol``
    check_float_tensor("a", a, fn, nonempty=True, finite=True)
    check_float_tensor("b", b, fn, nonempty=True, finite=True)
    if a.shape != b.shape:
        raise ValueError(f"{fn}: a and b must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    floor = check_number("floor", floor, fn, 0.0, low_open=True)
    denom = (a.abs() + b.abs()).clamp_min(floor)
    return ((a - b).abs() / denom).max().item()
