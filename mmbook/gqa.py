"""Grouped-query attention (GQA) with RoPE, QK-norm, a sliding window and a KV cache: the attention of today's LLMs.

Multi-head attention (chapter 6) gives every query head its own key and value head. Grouped-query attention
(Ainslie et al.) lets ``n_head / n_kv_head`` query heads share one key/value head; multi-query attention
(Shazeer) is the extreme ``n_kv_head = 1``. The arithmetic per query is unchanged, but the KV cache that
generation keeps shrinks by the factor ``n_kv_head / n_head``:

    cache bytes = 2 (keys and values) * L * T * n_kv_head * head_dim * batch * bytes per value
                = 2 L T d (n_kv_head / n_head) ...   when head_dim = d / n_head.

Two options of recent models are switches here: **QK-norm** (Qwen3, OLMo 2) applies an RMSNorm over the head
dimension to every query and key before RoPE, which bounds the attention logits; a **sliding window**
(Mistral) lets a query see only its ``window`` most recent keys (itself included).

Mask convention as in :mod:`mmbook.attention`: boolean, ``True`` where a query may attend to a key.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mmbook.attention import scaled_dot_product_attention
from mmbook.checks import (
    check_bool,
    check_choice,
    check_float_tensor,
    check_module_input,
    check_number,
    positive_int,
)
from mmbook.rmsnorm import RMSNorm
from mmbook.rope import PAIRINGS, apply_rope

__all__ = ["KERNELS", "GroupedQueryAttention", "attention_mask", "kv_cache_bytes", "repeat_kv"]

KERNELS = ("mmbook", "torch", "flash")


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """Repeat each key/value head ``n_rep`` times along the head axis.

    ``x`` ``(batch, n_kv_head, T, head_dim)`` -> ``(batch, n_kv_head * n_rep, T, head_dim)``.

    Query head ``h`` reads key/value head ``h // n_rep``: the repeats of one head are adjacent.
    """
    fn = "repeat_kv"
    check_float_tensor("x", x, fn, ndim=4, shape="(batch, n_kv_head, T, head_dim)")
    n_rep = positive_int("n_rep", n_rep, fn)
    return x if n_rep == 1 else x.repeat_interleave(n_rep, dim=1)


def attention_mask(q_len: int, k_len: int, window: int | None = None,
                   device: torch.device | str | None = None) -> torch.Tensor:
    """Causal (and optionally sliding-window) mask ``(q_len, k_len)``, ``True`` where query ``i`` may see key ``j``.

    The queries are the *last* ``q_len`` of the ``k_len`` positions (with a KV cache of ``P = k_len - q_len``
    earlier positions, query ``i`` sits at position ``P + i``). Query at position ``p`` sees keys
    ``j <= p``, and with a ``window`` only ``p - window < j``: its ``window`` most recent keys, itself included
    (``transformers``' and Mistral's convention). With ``q_len == k_len`` and no window it equals
    :func:`mmbook.attention.causal_mask`; that function stays for chapter 6's square case, while this one also
    covers the rectangular masks of a KV cache and the window.
    """
    fn = "attention_mask"
    q_len = positive_int("q_len", q_len, fn)
    k_len = positive_int("k_len", k_len, fn)
    if q_len > k_len:
        raise ValueError(f"{fn}: q_len={q_len} cannot exceed k_len={k_len} (queries are the last k_len positions)")
    if window is not None:
        positive_int("window", window, fn)
    q_pos = torch.arange(k_len - q_len, k_len, device=device)[:, None]
    k_pos = torch.arange(k_len, device=device)[None, :]
    mask = k_pos <= q_pos
    if window is not None:
        mask &= k_pos > q_pos - window
    return mask


def kv_cache_bytes(n_layer: int, seq_len: int, n_kv_head: int, head_dim: int, batch_size: int = 1,
                   bytes_per_value: int = 2) -> int:
    """Bytes of a KV cache: ``2 * n_layer * seq_len * n_kv_head * head_dim * batch_size * bytes_per_value``.

    The factor 2 counts keys and values. With ``head_dim = d_model / n_head`` this is
    ``2 L T d (n_kv_head / n_head)`` values per sequence. ``bytes_per_value`` is 2 for bfloat16/float16.
    """
    fn = "kv_cache_bytes"
    values = [positive_int(name, v, fn) for name, v in (("n_layer", n_layer), ("seq_len", seq_len),
                                                        ("n_kv_head", n_kv_head), ("head_dim", head_dim),
                                                        ("batch_size", batch_size),
                                                        ("bytes_per_value", bytes_per_value))]
    total = 2
    for v in values:
        total *= v
    return total


def _check_past(past: object, batch: int, n_kv_head: int, head_dim: int, like: torch.Tensor, fn: str) -> None:
    if not (isinstance(past, (tuple, list)) and len(past) == 2 and all(isinstance(t, torch.Tensor) for t in past)):
        raise TypeError(f"{fn}: past must be a (key, value) pair of tensors, got {type(past).__name__}")
    for name, t in zip(("past key", "past value"), past, strict=True):
        if t.ndim != 4 or t.shape[0] != batch or t.shape[1] != n_kv_head or t.shape[3] != head_dim:
            raise ValueError(f"{fn}: {name} must have shape ({batch}, {n_kv_head}, P, {head_dim}), "
                             f"got {tuple(t.shape)}")
        if t.dtype != like.dtype or t.device != like.device:
            raise TypeError(f"{fn}: {name} must have the dtype and device of x ({like.dtype}, {like.device}), "
                            f"got {t.dtype} on {t.device}")
    if past[0].shape[2] != past[1].shape[2]:
        raise ValueError(f"{fn}: past key and value hold different lengths, {past[0].shape[2]} and {past[1].shape[2]}")


class GroupedQueryAttention(nn.Module):
    """Causal self-attention with ``n_head`` query heads sharing ``n_kv_head`` key/value heads.

    ``x`` ``(batch, T, d_model)`` -> ``(y, present)``: ``y`` ``(batch, T, d_model)``; ``present`` the keys
    (after RoPE) and values of all ``P + T`` positions, each ``(batch, n_kv_head, P + T, head_dim)``, when
    ``use_cache`` (else ``None``). ``past`` is such a pair from an earlier call; the new tokens then sit at
    positions ``P, P + 1, ...`` and are rotated accordingly.

    Parameters (``transformers``' names): ``q_proj`` ``(n_head * head_dim, d_model)``, ``k_proj`` and ``v_proj``
    ``(n_kv_head * head_dim, d_model)``, ``o_proj`` ``(d_model, n_head * head_dim)``, and with ``qk_norm`` the
    gains ``q_norm.weight`` and ``k_norm.weight`` ``(head_dim,)``. ``rope=False`` leaves positions to the caller
    (a model with learned position embeddings). ``kernel`` computes the attention itself with
    :func:`mmbook.attention.scaled_dot_product_attention` (``"mmbook"``), PyTorch's
    ``F.scaled_dot_product_attention`` (``"torch"``) or :func:`mmbook.flash.flash_attention` (``"flash"``).
    """

    def __init__(self, d_model: int, n_head: int, n_kv_head: int | None = None, head_dim: int | None = None, *,
                 rope: bool = True, rope_base: float = 10000.0, rope_pairing: str = "half", qk_norm: bool = False,
                 sliding_window: int | None = None, norm_eps: float = 1e-6, bias: bool = False,
                 kernel: str = "mmbook") -> None:
        super().__init__()
        fn = "GroupedQueryAttention"
        self.d_model = positive_int("d_model", d_model, fn)
        self.n_head = positive_int("n_head", n_head, fn)
        self.n_kv_head = positive_int("n_kv_head", n_head if n_kv_head is None else n_kv_head, fn)
        if self.n_head % self.n_kv_head:
            raise ValueError(f"{fn}: n_head={n_head} must be a multiple of n_kv_head={n_kv_head}")
        if head_dim is None:
            if d_model % n_head:
                raise ValueError(f"{fn}: d_model={d_model} must be divisible by n_head={n_head} (or give head_dim)")
            head_dim = d_model // n_head
        self.head_dim = positive_int("head_dim", head_dim, fn)
        self.rope = check_bool("rope", rope, fn)
        if self.rope and self.head_dim % 2:
            raise ValueError(f"{fn}: RoPE needs an even head_dim, got {head_dim}")
        self.rope_base = check_number("rope_base", rope_base, fn, 1.0, low_open=True)
        self.rope_pairing = check_choice("rope_pairing", rope_pairing, fn, PAIRINGS)
        check_bool("qk_norm", qk_norm, fn)
        self.sliding_window = None if sliding_window is None else positive_int("sliding_window", sliding_window, fn)
        check_bool("bias", bias, fn)
        self.kernel = check_choice("kernel", kernel, fn, KERNELS)
        self.q_proj = nn.Linear(d_model, self.n_head * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(d_model, self.n_kv_head * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(d_model, self.n_kv_head * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.n_head * self.head_dim, d_model, bias=bias)
        self.q_norm = RMSNorm(self.head_dim, norm_eps) if qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, norm_eps) if qk_norm else None

    @property
    def n_rep(self) -> int:
        """Query heads per key/value head."""
        return self.n_head // self.n_kv_head

    def forward(self, x: torch.Tensor, past: tuple[torch.Tensor, torch.Tensor] | None = None,
                use_cache: bool = False, *, positions: torch.Tensor | None = None,
                attn_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
        """``positions`` ``(T,)`` or ``(batch, T)`` replaces the default ``P, P + 1, ...`` (RoPE only);
        ``attn_mask`` ``(batch or 1, 1, T, P + T)`` bool, ``True`` where a query may attend to a key, replaces the
        causal (and sliding-window) mask: packed sequences pass their block-diagonal document mask here."""
        fn = "GroupedQueryAttention"
        check_float_tensor("x", x, fn, ndim=3, shape=f"(batch, T, {self.d_model})")
        if x.shape[-1] != self.d_model or x.shape[1] < 1:
            raise ValueError(f"{fn}: x must have shape (batch, T >= 1, {self.d_model}), got {tuple(x.shape)}")
        check_module_input("x", x, fn, self)
        check_bool("use_cache", use_cache, fn)
        b, t, _ = x.shape
        if past is not None:
            _check_past(past, b, self.n_kv_head, self.head_dim, x, fn)
        p = 0 if past is None else past[0].shape[2]
        if positions is not None:
            if not self.rope:
                raise ValueError(f"{fn}: positions needs rope=True (this layer leaves positions to the caller)")
            if not isinstance(positions, torch.Tensor) or positions.shape not in ((t,), (b, t)):
                raise ValueError(f"{fn}: positions must have shape ({t},) or ({b}, {t}), got "
                                 f"{tuple(positions.shape) if isinstance(positions, torch.Tensor) else positions!r}")
        if attn_mask is not None:
            s = p + t
            if not isinstance(attn_mask, torch.Tensor) or attn_mask.dtype != torch.bool or attn_mask.ndim != 4 \
                    or attn_mask.shape[0] not in (1, b) or tuple(attn_mask.shape[1:]) != (1, t, s):
                raise ValueError(f"{fn}: attn_mask must be a bool tensor ({b} or 1, 1, {t}, {s}), got "
                                 f"{tuple(attn_mask.shape) if isinstance(attn_mask, torch.Tensor) else attn_mask!r}")
            if self.kernel == "flash":
                raise ValueError(f"{fn}: attn_mask is not supported by kernel='flash' (causal only)")
        q, k, v = self.project(x, torch.arange(p, p + t, device=x.device) if positions is None else positions)
        if past is not None:
            k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
        heads = self._attend(q, k, v, attn_mask)  # (B, h, T, hd)
        y = self.o_proj(heads.transpose(1, 2).reshape(b, t, self.n_head * self.head_dim))
        return y, ((k, v) if use_cache else None)

    def project(self, x: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Queries ``(B, h, T, hd)``, keys and values ``(B, h_kv, T, hd)`` of ``x`` ``(B, T, d_model)``: the
        projections, QK-norm and RoPE of :meth:`forward`, at explicit ``positions`` (``(T,)`` or ``(B, T)``), for
        callers that manage positions and the cache themselves (packed sequences, a paged KV cache)."""
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.n_head, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.n_kv_head, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.n_kv_head, self.head_dim).transpose(1, 2)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if self.rope:
            q = apply_rope(q, positions, self.rope_base, self.rope_pairing)
            k = apply_rope(k, positions, self.rope_base, self.rope_pairing)
        return q, k, v

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        t, s = q.shape[2], k.shape[2]
        if attn_mask is not None:
            k, v = repeat_kv(k, self.n_rep), repeat_kv(v, self.n_rep)
            if self.kernel == "torch":
                return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
            return scaled_dot_product_attention(q, k, v, attn_mask)[0]
        if self.kernel == "flash":
            from mmbook.flash import flash_attention

            return flash_attention(q, repeat_kv(k, self.n_rep), repeat_kv(v, self.n_rep), causal=True,
                                   window=self.sliding_window)
        k, v = repeat_kv(k, self.n_rep), repeat_kv(v, self.n_rep)
        if self.kernel == "torch" and t == s and self.sliding_window is None:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)
        mask = attention_mask(t, s, self.sliding_window, device=q.device)
        if self.kernel == "torch":
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return scaled_dot_product_attention(q, k, v, mask)[0]

    def extra_repr(self) -> str:
        return (f"n_head={self.n_head}, n_kv_head={self.n_kv_head}, head_dim={self.head_dim}, rope={self.rope}, "
                f"qk_norm={self.q_norm is not None}, sliding_window={self.sliding_window}, kernel={self.kernel!r}")
