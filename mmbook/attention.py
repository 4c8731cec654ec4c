"""Scaled dot-product attention and multi-head attention, written from their equations.

Mask convention used throughout the book: a **boolean** mask with ``True`` where a query
*may attend* to a key (the opposite of ``torch.nn.MultiheadAttention``'s ``attn_mask``).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from mmbook.checks import (
    check_bool,
    check_device,
    check_float_tensor,
    check_like,
    check_module_input,
    check_probability,
    positive_int,
)

__all__ = ["MultiHeadAttention", "causal_mask", "padding_mask", "scaled_dot_product_attention"]


def _check_mask(mask: object, target_shape: torch.Size, fn: str) -> torch.Tensor:
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{fn}: mask must be a boolean torch.Tensor, got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise TypeError(f"{fn}: mask must have dtype torch.bool (True = may attend), got {mask.dtype}")
    try:
        torch.broadcast_shapes(mask.shape, target_shape)
    except RuntimeError:
        raise ValueError(
            f"{fn}: mask of shape {tuple(mask.shape)} does not broadcast to the scores' shape {tuple(target_shape)}"
        ) from None
    if torch.broadcast_shapes(mask.shape, target_shape) != target_shape:
        raise ValueError(
            f"{fn}: mask of shape {tuple(mask.shape)} would enlarge the scores' shape {tuple(target_shape)}"
        )
    return mask


def scaled_dot_product_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``softmax(q k^T / sqrt(d_k)) v`` with an optional boolean mask.

    Shapes: ``q`` ``(..., L, d_k)``, ``k`` ``(..., S, d_k)``, ``v`` ``(..., S, d_v)``; leading
    dimensions must broadcast. ``mask`` is boolean, broadcastable to ``(..., L, S)``, ``True``
    where query ``i`` may attend to key ``j``.

    Returns ``(output, weights)`` with shapes ``(..., L, d_v)`` and ``(..., L, S)``. Each row of
    ``weights`` sums to 1; a query that may attend to no key gets all-zero weights and a zero
    output (instead of the NaNs a plain softmax over ``-inf`` would give).
    """
    fn = "scaled_dot_product_attention"
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_float_tensor(name, t, fn, min_ndim=2)
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"{fn}: q and k must share d_k, got q {tuple(q.shape)} and k {tuple(k.shape)}")
    if q.shape[-1] == 0:
        raise ValueError(f"{fn}: d_k must be at least 1, got q {tuple(q.shape)}")
    check_like("k", k, fn, "q", q)
    check_like("v", v, fn, "q", q)
    if k.shape[-2] != v.shape[-2]:
        raise ValueError(f"{fn}: k and v must have the same length S, got k {tuple(k.shape)} and v {tuple(v.shape)}")
    try:
        batch = torch.broadcast_shapes(q.shape[:-2], k.shape[:-2], v.shape[:-2])
    except RuntimeError:
        raise ValueError(
            f"{fn}: leading dimensions of q {tuple(q.shape)}, k {tuple(k.shape)} and v {tuple(v.shape)} "
            "do not broadcast"
        ) from None
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])  # (..., L, S)
    scores = scores.expand(*batch, q.shape[-2], k.shape[-2])
    if mask is not None:
        mask = _check_mask(mask, scores.shape, fn)
        scores = scores.masked_fill(~mask, float("-inf"))
    weights = torch.softmax(scores, dim=-1)
    if mask is not None:
        weights = weights.nan_to_num(0.0)  # rows with no allowed key
    return weights @ v, weights


def causal_mask(length: int, device: torch.device | str | None = None) -> torch.Tensor:
    """``(length, length)`` boolean mask, ``True`` on and below the diagonal: position i sees j <= i."""
    if isinstance(length, bool) or not isinstance(length, int) or length < 1:
        raise ValueError(f"causal_mask: length must be a positive int, got {length!r}")
    if device is not None and not isinstance(device, torch.device):  # an int would mean a CUDA device
        device = check_device("device", device, "causal_mask")
    return torch.ones(length, length, dtype=torch.bool, device=device).tril()


def padding_mask(lengths: torch.Tensor, max_len: int) -> torch.Tensor:
    """``(batch, 1, max_len)`` boolean mask, ``True`` for the first ``lengths[b]`` keys of row b.

    Broadcasts against scores ``(batch, L, S)``; add a head axis (``mask[:, None]``) for
    ``(batch, heads, L, S)``.
    """
    if not isinstance(lengths, torch.Tensor) or lengths.ndim != 1 or lengths.dtype.is_floating_point \
            or lengths.dtype == torch.bool:
        raise ValueError(f"padding_mask: lengths must be a 1-D integer tensor, got {lengths!r}")
    if isinstance(max_len, bool) or not isinstance(max_len, int) or max_len < 1:
        raise ValueError(f"padding_mask: max_len must be a positive int, got {max_len!r}")
    if (lengths < 0).any() or (lengths > max_len).any():
        raise ValueError(f"padding_mask: lengths must lie in [0, max_len={max_len}], got {lengths.tolist()}")
    positions = torch.arange(max_len, device=lengths.device)
    return (positions[None, :] < lengths[:, None])[:, None, :]


class MultiHeadAttention(nn.Module):
    """Multi-head attention: ``concat_h(attention(x W_q^h, x W_k^h, x W_v^h)) W_o``.

    Inputs are batch-first: ``query`` ``(batch, L, d_model)``, ``key``/``value``
    ``(batch, S, d_model)``. ``mask`` is boolean (``True`` = may attend) of shape ``(L, S)``,
    ``(batch, L, S)`` / ``(batch, 1, S)`` or ``(batch, num_heads, L, S)``.

    Returns ``(output, weights)``: ``(batch, L, d_model)`` and per-head weights
    ``(batch, num_heads, L, S)``.
    """

    def __init__(self, d_model: int, num_heads: int, dropout: float = 0.0, bias: bool = True) -> None:
        super().__init__()
        d_model = positive_int("d_model", d_model, "MultiHeadAttention")
        num_heads = positive_int("num_heads", num_heads, "MultiHeadAttention")
        if d_model % num_heads != 0:
            raise ValueError(
                f"MultiHeadAttention: d_model ({d_model}) must be divisible by num_heads ({num_heads})"
            )
        check_probability("dropout", dropout, "MultiHeadAttention", high_inclusive=False)
        check_bool("bias", bias, "MultiHeadAttention")
        self.d_model, self.num_heads, self.d_head = d_model, num_heads, d_model // num_heads
        self.q_proj = nn.Linear(d_model, d_model, bias=bias)
        self.k_proj = nn.Linear(d_model, d_model, bias=bias)
        self.v_proj = nn.Linear(d_model, d_model, bias=bias)
        self.out_proj = nn.Linear(d_model, d_model, bias=bias)
        self.dropout = nn.Dropout(dropout)

    def _split(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, d_model) -> (B, h, T, d_head)
        b, t, _ = x.shape
        return x.view(b, t, self.num_heads, self.d_head).transpose(1, 2)

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor | None = None,
        value: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        key = query if key is None else key
        value = key if value is None else value
        fn = "MultiHeadAttention"
        for name, t in (("query", query), ("key", key), ("value", value)):
            check_float_tensor(name, t, fn)
            if t.ndim != 3 or t.shape[-1] != self.d_model:
                raise ValueError(f"{fn}: {name} must have shape (batch, seq, {self.d_model}), got {tuple(t.shape)}")
            check_module_input(name, t, fn, self)
        if key.shape[:2] != value.shape[:2] or key.shape[0] != query.shape[0]:
            raise ValueError(
                f"{fn}: query {tuple(query.shape)}, key {tuple(key.shape)} and value {tuple(value.shape)} must share "
                "the batch size, and key and value the length"
            )
        if mask is not None and isinstance(mask, torch.Tensor) and mask.ndim == 3:
            mask = mask[:, None]  # add the head axis
        q, k, v = self._split(self.q_proj(query)), self._split(self.k_proj(key)), self._split(self.v_proj(value))
        if self.dropout.p > 0 and self.training:
            # dropout acts on the attention weights, as in the original Transformer and torch
            _, weights = scaled_dot_product_attention(q, k, v, mask)
            heads = self.dropout(weights) @ v
        else:
            heads, weights = scaled_dot_product_attention(q, k, v, mask)
        b, _, length, _ = heads.shape
        merged = heads.transpose(1, 2).reshape(b, length, self.d_model)
        return self.out_proj(merged), weights

    @torch.no_grad()
    def load_from_torch(self, module: nn.MultiheadAttention) -> MultiHeadAttention:
        """Copy the weights of a ``torch.nn.MultiheadAttention`` with the same sizes into this module."""
        if not isinstance(module, nn.MultiheadAttention):
            raise TypeError(f"load_from_torch: module must be nn.MultiheadAttention, got {type(module).__name__}")
        if module.embed_dim != self.d_model or module.num_heads != self.num_heads:
            raise ValueError(
                f"load_from_torch: sizes differ: ours d_model={self.d_model}, num_heads={self.num_heads}; "
                f"theirs embed_dim={module.embed_dim}, num_heads={module.num_heads}"
            )
        if module.in_proj_weight is None:
            raise ValueError("load_from_torch: modules with separate kdim/vdim projections are not supported")
        w_q, w_k, w_v = module.in_proj_weight.chunk(3, dim=0)
        for proj, w in ((self.q_proj, w_q), (self.k_proj, w_k), (self.v_proj, w_v)):
            proj.weight.copy_(w)
        self.out_proj.weight.copy_(module.out_proj.weight)
        if self.q_proj.bias is None and module.in_proj_bias is not None:  # its biases would be dropped silently
            raise ValueError("load_from_torch: the torch module has biases but this one has none (bias=False)")
        if self.q_proj.bias is not None:
            if module.in_proj_bias is None:
                raise ValueError("load_from_torch: the torch module has no bias but this one does")
            for proj, b in zip((self.q_proj, self.k_proj, self.v_proj), module.in_proj_bias.chunk(3), strict=True):
                proj.bias.copy_(b)
            self.out_proj.bias.copy_(module.out_proj.bias)
        return self
