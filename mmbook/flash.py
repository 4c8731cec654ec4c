"""FlashAttention's algorithm (Dao et al.), written as plain tiled PyTorch: exact attention in O(T) memory.

Standard attention materialises the ``(L, S)`` matrix of scores and of probabilities, and autograd keeps the
probabilities for the backward pass: memory grows as ``T^2``. FlashAttention never holds more than one
``(block_q, block_k)`` tile of scores:

* **forward** — for each block of queries, walk over the blocks of keys keeping, per query row, the running
  maximum ``m``, the running sum ``l`` of ``exp(score - m)`` and the running weighted sum of values; when a new
  block raises the maximum, the old sum and accumulator are rescaled by ``exp(m_old - m_new)`` (the *online
  softmax*). At the end ``o = acc / l``, and the log-sum-exp ``lse = m + log l`` is saved;
* **backward** — recompute each tile of scores from ``q``, ``k`` and the saved ``lse`` (``p = exp(s - lse)``)
  instead of storing them, and accumulate ``dV += P^T dO``, ``dS = P * (dO V^T - D)`` with
  ``D = rowsum(dO * O)``, ``dQ += dS K``, ``dK += dS^T Q`` (times the scale).

What is saved for the backward pass is ``q, k, v, o`` and ``lse``: ``O(T d)``. The real kernels gain their
speed by keeping tiles in on-chip SRAM; this module shows the algorithm and its memory, not the speed.
:func:`measure_peak_bytes` measures the memory. Mask convention as in :mod:`mmbook.gqa`: with ``causal``, the
``L`` queries are the last ``L`` of the ``S`` positions; a ``window`` keeps each query's ``window`` most recent keys.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from mmbook.checks import check_bool, check_float_tensor, check_like, check_number, positive_int

__all__ = [
    "flash_attention",
    "flash_attention_backward",
    "flash_attention_forward",
    "measure_peak_bytes",
    "online_softmax",
]


def online_softmax(x: torch.Tensor, block_size: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax over the last axis with its normaliser found in one streaming pass over blocks of ``block_size``.

    Keeps a running maximum ``m`` and a running sum ``l = sum exp(x_j - m)``; a block with a larger maximum
    rescales ``l`` by ``exp(m_old - m_new)``. Returns ``(softmax(x), logsumexp(x))`` with shapes ``x.shape`` and
    ``x.shape[:-1]``. ``x`` may hold ``-inf`` (masked entries) but each row needs one finite entry.
    """
    fn = "online_softmax"
    check_float_tensor("x", x, fn, min_ndim=1, nonempty=True)
    block_size = positive_int("block_size", block_size, fn)
    m = torch.full(x.shape[:-1], -math.inf, dtype=x.dtype, device=x.device)
    l = torch.zeros_like(m)  # noqa: E741 - the paper's name
    for start in range(0, x.shape[-1], block_size):
        block = x[..., start:start + block_size]
        m_new = torch.maximum(m, block.amax(dim=-1))
        safe = torch.where(torch.isinf(m_new), torch.zeros_like(m_new), m_new)
        l = l * torch.exp(m - safe) + torch.exp(block - safe[..., None]).sum(dim=-1)  # noqa: E741
        m = m_new
    if bool((l == 0).any()) or bool(torch.isnan(l).any()):
        raise ValueError(f"{fn}: every row of x needs at least one finite entry")
    lse = m + torch.log(l)
    return torch.exp(x - lse[..., None]), lse


def _check_qkv(q: object, k: object, v: object, fn: str) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_float_tensor(name, t, fn, min_ndim=2, nonempty=True)
    check_like("k", k, fn, "q", q)
    check_like("v", v, fn, "q", q)
    if q.shape[:-2] != k.shape[:-2] or k.shape[:-1] != v.shape[:-1] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"{fn}: need q (..., L, d), k (..., S, d) and v (..., S, d_v) with equal leading "
                         f"dimensions, got q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")


def _check_options(causal: object, window: object, scale: object, block_q: object, block_k: object, L: int, S: int,
                   fn: str) -> tuple[float | None, int, int]:
    check_bool("causal", causal, fn)
    if window is not None:
        positive_int("window", window, fn)
        if not causal:
            raise ValueError(f"{fn}: a window needs causal=True (it is a band below the diagonal)")
    if causal and L > S:
        raise ValueError(f"{fn}: with causal=True the L={L} queries must be the last of the S={S} keys (L <= S)")
    if scale is not None:
        scale = check_number("scale", scale, fn, 0.0, low_open=True)
    return scale, positive_int("block_q", block_q, fn), positive_int("block_k", block_k, fn)


def _tile_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, causal: bool, window: int | None) -> torch.Tensor | None:
    """``(bq, bk)`` boolean, True = may attend; None when the whole tile is visible."""
    if not causal:
        return None
    mask = k_pos[None, :] <= q_pos[:, None]
    if window is not None:
        mask &= k_pos[None, :] > q_pos[:, None] - window
    return None if bool(mask.all()) else mask


def _visible(q_lo: int, q_hi: int, k_lo: int, k_hi: int, causal: bool, window: int | None) -> bool:
    """Whether any query in positions [q_lo, q_hi] sees any key in [k_lo, k_hi] (else the tile is skipped)."""
    if not causal:
        return True
    if k_lo > q_hi:  # every key is in the future of every query
        return False
    return window is None or k_hi > q_lo - window


def flash_attention_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True,
                            window: int | None = None, scale: float | None = None, block_q: int = 64,
                            block_k: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Tiled attention forward with the online softmax; returns ``(o, lse)``.

    ``q`` ``(..., L, d)``, ``k`` ``(..., S, d)``, ``v`` ``(..., S, d_v)`` with equal leading dimensions;
    ``o`` ``(..., L, d_v)`` equals ``softmax(q k^T * scale + mask) v`` (``scale`` defaults to ``1/sqrt(d)``);
    ``lse`` ``(..., L)`` is the log-sum-exp of each row of masked, scaled scores. Tiles that the mask hides
    entirely are skipped.
    """
    fn = "flash_attention_forward"
    _check_qkv(q, k, v, fn)
    L, S = q.shape[-2], k.shape[-2]
    scale, block_q, block_k = _check_options(causal, window, scale, block_q, block_k, L, S, fn)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    offset = S - L  # query i sits at position offset + i
    o = torch.empty(*q.shape[:-1], v.shape[-1], dtype=q.dtype, device=q.device)
    lse = torch.empty(q.shape[:-1], dtype=q.dtype, device=q.device)
    for i0 in range(0, L, block_q):
        i1 = min(i0 + block_q, L)
        qi = q[..., i0:i1, :] * scale
        q_pos = torch.arange(offset + i0, offset + i1, device=q.device)
        m = torch.full(qi.shape[:-1], -math.inf, dtype=q.dtype, device=q.device)  # running max  (..., bq)
        l = torch.zeros_like(m)  # noqa: E741 - running sum of exp(s - m)
        acc = torch.zeros(*qi.shape[:-1], v.shape[-1], dtype=q.dtype, device=q.device)  # (..., bq, d_v)
        for j0 in range(0, S, block_k):
            j1 = min(j0 + block_k, S)
            if not _visible(offset + i0, offset + i1 - 1, j0, j1 - 1, causal, window):
                continue
            s = qi @ k[..., j0:j1, :].transpose(-2, -1)  # (..., bq, bk): one tile of scores
            mask = _tile_mask(q_pos, torch.arange(j0, j1, device=q.device), causal, window)
            if mask is not None:
                s = s.masked_fill(~mask, -math.inf)
            m_new = torch.maximum(m, s.amax(dim=-1))
            safe = torch.where(torch.isinf(m_new), torch.zeros_like(m_new), m_new)  # rows with no key yet
            p = torch.exp(s - safe[..., None])
            alpha = torch.exp(m - safe)  # rescales what was accumulated under the old maximum
            l = alpha * l + p.sum(dim=-1)  # noqa: E741
            acc = alpha[..., None] * acc + p @ v[..., j0:j1, :]
            m = m_new
        o[..., i0:i1, :] = acc / l[..., None]
        lse[..., i0:i1] = m + torch.log(l)
    return o, lse


def flash_attention_backward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor, lse: torch.Tensor,
                             grad_o: torch.Tensor, causal: bool = True, window: int | None = None,
                             scale: float | None = None, block_q: int = 64,
                             block_k: int = 64) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients ``(dq, dk, dv)`` of attention, recomputing each score tile from ``q``, ``k`` and ``lse``.

    ``o`` and ``lse`` are :func:`flash_attention_forward`'s outputs, ``grad_o`` ``(..., L, d_v)`` the gradient
    of the loss with respect to ``o``. With ``P = exp(S - lse)``, ``D = rowsum(grad_o * o)``:
    ``dV = P^T dO``, ``dS = P * (dO V^T - D)``, ``dQ = scale dS K``, ``dK = scale dS^T Q``, tile by tile.
    """
    fn = "flash_attention_backward"
    _check_qkv(q, k, v, fn)
    L, S = q.shape[-2], k.shape[-2]
    scale, block_q, block_k = _check_options(causal, window, scale, block_q, block_k, L, S, fn)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    for name, t, shape in (("o", o, (*q.shape[:-1], v.shape[-1])), ("grad_o", grad_o, (*q.shape[:-1], v.shape[-1])),
                           ("lse", lse, tuple(q.shape[:-1]))):
        check_float_tensor(name, t, fn)
        if tuple(t.shape) != tuple(shape):
            raise ValueError(f"{fn}: {name} must have shape {tuple(shape)}, got {tuple(t.shape)}")
        check_like(name, t, fn, "q", q)
    offset = S - L
    d_rows = (grad_o * o).sum(dim=-1)  # D_i = sum_j P_ij dP_ij, one number per query  (..., L)
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    for j0 in range(0, S, block_k):
        j1 = min(j0 + block_k, S)
        kj, vj = k[..., j0:j1, :], v[..., j0:j1, :]
        k_pos = torch.arange(j0, j1, device=q.device)
        for i0 in range(0, L, block_q):
            i1 = min(i0 + block_q, L)
            if not _visible(offset + i0, offset + i1 - 1, j0, j1 - 1, causal, window):
                continue
            qi, doi = q[..., i0:i1, :], grad_o[..., i0:i1, :]
            s = (qi @ kj.transpose(-2, -1)) * scale  # recomputed, never stored
            mask = _tile_mask(torch.arange(offset + i0, offset + i1, device=q.device), k_pos, causal, window)
            if mask is not None:
                s = s.masked_fill(~mask, -math.inf)
            p = torch.exp(s - lse[..., i0:i1, None])  # the probabilities of this tile
            dv[..., j0:j1, :] += p.transpose(-2, -1) @ doi
            ds = p * (doi @ vj.transpose(-2, -1) - d_rows[..., i0:i1, None])
            dq[..., i0:i1, :] += (ds @ kj) * scale
            dk[..., j0:j1, :] += (ds.transpose(-2, -1) @ qi) * scale
    return dq, dk, dv


class _FlashAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, window: int | None,
                scale: float | None, block_q: int, block_k: int) -> torch.Tensor:
        o, lse = flash_attention_forward(q, k, v, causal, window, scale, block_q, block_k)
        ctx.save_for_backward(q, k, v, o, lse)  # O(T d): no (L, S) matrix is kept
        ctx.options = (causal, window, scale, block_q, block_k)
        return o

    @staticmethod
    def backward(ctx: Any, grad_o: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        q, k, v, o, lse = ctx.saved_tensors
        dq, dk, dv = flash_attention_backward(q, k, v, o, lse, grad_o.contiguous(), *ctx.options)
        return dq, dk, dv, None, None, None, None, None


def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True, window: int | None = None,
                    scale: float | None = None, block_q: int = 64, block_k: int = 64) -> torch.Tensor:
    """Attention ``(..., L, d_v)`` by :func:`flash_attention_forward`, differentiable through
    :func:`flash_attention_backward` (a ``torch.autograd.Function`` that saves only ``q, k, v, o, lse``)."""
    return _FlashAttention.apply(q, k, v, causal, window, scale, block_q, block_k)


class _PeakMeter(TorchDispatchMode):
    """Counts the bytes of every storage an operation creates, and forgets them when they are freed."""

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[tuple[str, int], int] = {}
        self.current = 0
        self.peak = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                key = (str(t.device), storage.data_ptr())
                if key in self.live or storage.nbytes() == 0:
                    continue
                self.live[key] = storage.nbytes()
                self.current += storage.nbytes()
                self.peak = max(self.peak, self.current)
                weakref.finalize(storage, self._free, key)
        return out

    def _free(self, key: tuple[str, int]) -> None:
        self.current -= self.live.pop(key, 0)


def measure_peak_bytes(fn: Callable[[], Any]) -> tuple[Any, int]:
    """Run ``fn()`` and return ``(result, peak)``: the most bytes of tensors created inside ``fn`` alive at once.

    Every tensor an operation returns is counted (each storage once) from its creation until it is freed;
    inputs that exist before the call are not counted. It measures what the program asks for, on any
    device, independent of the allocator's caching (``torch.cuda.max_memory_allocated`` measures the same on
    a GPU, plus the allocator's rounding).
    """
    if not callable(fn):
        raise TypeError(f"measure_peak_bytes: fn must be callable, got {type(fn).__name__}")
    meter = _PeakMeter()
    with meter:
        result = fn()
    return result, meter.peak
