"""Rotary position embeddings (RoPE, Su et al.), in the two pairings the field uses.

RoPE does not add a vector to the token embedding. It rotates every query and key, inside attention,
by an angle proportional to its position: the head dimension is cut into ``head_dim / 2`` pairs, and
pair ``i`` of the vector at position ``m`` turns by ``m * theta_i`` with ``theta_i = base^(-2i/head_dim)``.
Because rotations compose, ``<R_m q, R_n k> = <q, R_{n-m} k>``: attention scores depend on the positions
only through their difference ``m - n``.

Which coordinates form a pair is a convention:

* ``"interleaved"`` — pairs ``(x[2i], x[2i+1])``, as in the paper, GPT-J, Meta's original Llama code and
  llama.cpp / GGUF files;
* ``"half"`` — pairs ``(x[i], x[i + head_dim/2])``, computed with :func:`rotate_half`, as in
  ``transformers``' Llama, Qwen and Mistral.

The two are the same rotation after a fixed permutation of the head dimensions
(:func:`interleaved_to_half_permutation`); that is why converting a checkpoint between them permutes the
rows of ``W_q`` and ``W_k``.
"""

from __future__ import annotations

import torch

from mmbook.checks import check_choice, check_float_tensor, check_int_tensor, check_number, positive_int

__all__ = [
    "PAIRINGS",
    "apply_rope",
    "interleaved_to_half_permutation",
    "rope_cos_sin",
    "rope_frequencies",
    "rotate_half",
    "rotate_pairs",
]

PAIRINGS = ("half", "interleaved")


def _check_head_dim(head_dim: object, fn: str) -> int:
    head_dim = positive_int("head_dim", head_dim, fn)
    if head_dim % 2:
        raise ValueError(f"{fn}: head_dim must be even (RoPE rotates pairs of dimensions), got {head_dim}")
    return head_dim


def rope_frequencies(head_dim: int, base: float = 10000.0) -> torch.Tensor:
    """The rotation speeds ``theta_i = base^(-2i/head_dim)``, ``i = 0 .. head_dim/2 - 1``: ``(head_dim/2,)`` float64.

    Pair 0 turns by one radian per position; the last pair by about ``1/base`` radians, i.e. once in
    ``2 pi base`` positions.
    """
    fn = "rope_frequencies"
    head_dim = _check_head_dim(head_dim, fn)
    base = check_number("base", base, fn, 1.0, low_open=True)
    return base ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)


def rope_cos_sin(positions: torch.Tensor, head_dim: int, base: float = 10000.0, pairing: str = "half",
                 dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """``cos(m theta)`` and ``sin(m theta)`` laid out for ``pairing``: each ``(*positions.shape, head_dim)``.

    ``positions`` is an integer tensor of any shape (``(T,)`` or ``(batch, T)``). The angles are computed in
    float64 and rounded once to ``dtype``. For ``"half"`` the ``head_dim/2`` angles are repeated as
    ``[a_0 .. a_{h-1}, a_0 .. a_{h-1}]``; for ``"interleaved"`` as ``[a_0, a_0, a_1, a_1, ...]``.
    """
    fn = "rope_cos_sin"
    check_int_tensor("positions", positions, fn)
    check_choice("pairing", pairing, fn, PAIRINGS)
    angles = positions.to(torch.float64)[..., None] * rope_frequencies(head_dim, base).to(positions.device)
    angles = torch.cat([angles, angles], -1) if pairing == "half" else angles.repeat_interleave(2, dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """``[x1, x2] -> [-x2, x1]`` on the last axis (the halves ``x1 = x[..., :d/2]``, ``x2 = x[..., d/2:]``)."""
    check_float_tensor("x", x, "rotate_half", min_ndim=1)
    _check_head_dim(x.shape[-1], "rotate_half")
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def rotate_pairs(x: torch.Tensor) -> torch.Tensor:
    """``(x[2i], x[2i+1]) -> (-x[2i+1], x[2i])`` on the last axis: :func:`rotate_half` for interleaved pairs."""
    check_float_tensor("x", x, "rotate_pairs", min_ndim=1)
    _check_head_dim(x.shape[-1], "rotate_pairs")
    even, odd = x[..., 0::2], x[..., 1::2]
    return torch.stack([-odd, even], dim=-1).flatten(-2)


def apply_rope(x: torch.Tensor, positions: torch.Tensor, base: float = 10000.0, pairing: str = "half") -> torch.Tensor:
    """Rotate queries or keys ``x`` ``(batch, heads, T, head_dim)`` to their ``positions``; same shape out.

    ``positions`` is ``(T,)`` or ``(batch, T)`` integer (with a KV cache of ``P`` earlier positions, the new
    ones are ``P, P+1, ...``). Each pair ``(a, b)`` becomes ``(a cos - b sin, a sin + b cos)``, written as
    ``x * cos + rotate(x) * sin`` with :func:`rotate_half` or :func:`rotate_pairs`.
    """
    fn = "apply_rope"
    check_float_tensor("x", x, fn, ndim=4, shape="(batch, heads, T, head_dim)")
    check_int_tensor("positions", positions, fn, (1, 2), "(T,) or (batch, T)")
    check_choice("pairing", pairing, fn, PAIRINGS)
    if positions.shape[-1] != x.shape[2] or (positions.ndim == 2 and positions.shape[0] not in (1, x.shape[0])):
        raise ValueError(f"{fn}: positions of shape {tuple(positions.shape)} do not fit x of shape {tuple(x.shape)} "
                         "(need (T,) or (batch, T))")
    cos, sin = rope_cos_sin(positions, x.shape[-1], base, pairing, x.dtype)
    if positions.ndim == 2:  # (batch, T, head_dim) -> (batch, 1, T, head_dim), shared by the heads
        cos, sin = cos[:, None], sin[:, None]
    rotated = rotate_half(x) if pairing == "half" else rotate_pairs(x)
    return x * cos + rotated * sin


def interleaved_to_half_permutation(head_dim: int) -> torch.Tensor:
    """The permutation ``perm`` ``(head_dim,)`` that turns interleaved pairs into half-split pairs.

    ``apply_rope(x[..., perm], pairing="half") == apply_rope(x, pairing="interleaved")[..., perm]``.

    ``perm = [0, 2, 4, ..., 1, 3, 5, ...]``: the first elements of the pairs, then the second elements.
    Permuting the output rows of ``W_q`` and ``W_k`` of each head by ``perm`` converts a checkpoint made for
    interleaved RoPE (a GGUF file) into one for the half-split form (``transformers``).
    """
    head_dim = _check_head_dim(head_dim, "interleaved_to_half_permutation")
    return torch.cat([torch.arange(0, head_dim, 2), torch.arange(1, head_dim, 2)])
