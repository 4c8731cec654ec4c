"""The SwiGLU feed-forward network of Llama, Qwen, Mistral and SmolLM (Shazeer, *GLU Variants Improve Transformer*).

GPT-2's feed-forward network is ``W_2 GELU(W_1 x)`` with two matrices. A gated linear unit multiplies a
*gate* by a second linear map of the same input: ``SwiGLU(x) = W_down (SiLU(W_gate x) * W_up x)``, three
matrices, no biases. With a hidden size ``f``, it has ``3 d f`` weights against ``2 d (4d) = 8 d^2`` for
GPT-2's network, so ``f = 8d/3`` (rounded up to a hardware-friendly multiple) keeps the parameter count and
the FLOPs equal; :func:`swiglu_hidden_size` is Meta's Llama rule.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mmbook.checks import check_bool, check_float_tensor, check_module_input, positive_int

__all__ = ["SwiGLU", "silu", "swiglu_hidden_size"]


def silu(x: torch.Tensor) -> torch.Tensor:
    """The sigmoid linear unit (Swish with beta = 1), ``x * sigmoid(x)``, elementwise on any shape."""
    check_float_tensor("x", x, "silu")
    return x * torch.sigmoid(x)


def swiglu_hidden_size(d_model: int, multiple_of: int = 1, ffn_dim_multiplier: float | None = None) -> int:
    """Llama's SwiGLU hidden size: ``int(2 * 4 d / 3)``, optionally scaled, rounded *up* to ``multiple_of``.

    ``multiple_of=1`` gives ``floor(8d/3)``, which matches GPT-2's ``8 d^2`` weights to within ``2d``.
    """
    fn = "swiglu_hidden_size"
    d_model = positive_int("d_model", d_model, fn)
    multiple_of = positive_int("multiple_of", multiple_of, fn)
    hidden = int(2 * 4 * d_model / 3)
    if ffn_dim_multiplier is not None:
        if isinstance(ffn_dim_multiplier, bool) or not isinstance(ffn_dim_multiplier, (int, float)) \
                or not ffn_dim_multiplier > 0:
            raise ValueError(f"{fn}: ffn_dim_multiplier must be a positive number or None, got {ffn_dim_multiplier!r}")
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


class SwiGLU(nn.Module):
    """``down_proj(SiLU(gate_proj(x)) * up_proj(x))``: ``(..., d_model) -> (..., d_model)``, hidden size ``d_ff``.

    The parameter names are ``transformers``' (``LlamaMLP``), so its state dict loads as it is.
    ``fused=True`` uses ``F.silu`` instead of :func:`silu` (same function, one kernel).
    """

    def __init__(self, d_model: int, d_ff: int, bias: bool = False, fused: bool = False) -> None:
        super().__init__()
        self.d_model = positive_int("d_model", d_model, "SwiGLU")
        self.d_ff = positive_int("d_ff", d_ff, "SwiGLU")
        check_bool("bias", bias, "SwiGLU")
        self.fused = check_bool("fused", fused, "SwiGLU")
        self.gate_proj = nn.Linear(d_model, d_ff, bias=bias)
        self.up_proj = nn.Linear(d_model, d_ff, bias=bias)
        self.down_proj = nn.Linear(d_ff, d_model, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_float_tensor("x", x, "SwiGLU", min_ndim=1)
        if x.shape[-1] != self.d_model:
            raise ValueError(f"SwiGLU: x must end in d_model={self.d_model}, got shape {tuple(x.shape)}")
        check_module_input("x", x, "SwiGLU", self)
        gate = self.gate_proj(x)
        gate = F.silu(gate) if self.fused else gate * torch.sigmoid(gate)
        return self.down_proj(gate * self.up_proj(x))
