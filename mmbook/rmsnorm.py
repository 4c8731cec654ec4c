"""Root-mean-square layer normalisation (RMSNorm), the normalisation of Llama, Qwen, Mistral and SmolLM.

LayerNorm (chapter 7) centres each vector, divides by its standard deviation, then scales and shifts.
RMSNorm keeps only the rescaling: ``y = x / sqrt(mean(x^2) + eps) * weight``, with no mean, no bias and
no variance around the mean. It is cheaper (one reduction instead of two) and, in practice, trains as
well; when a vector happens to have mean 0 it equals LayerNorm without a bias.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mmbook.checks import check_bool, check_float_tensor, check_number, positive_int

__all__ = ["RMSNorm", "rms"]


def rms(x: torch.Tensor, eps: float = 0.0) -> torch.Tensor:
    """The root mean square over the last axis, ``sqrt(mean(x^2) + eps)``: ``(..., d) -> (..., 1)``."""
    check_float_tensor("x", x, "rms", min_ndim=1, nonempty=True)
    check_number("eps", eps, "rms", 0.0)
    return torch.sqrt(x.pow(2).mean(dim=-1, keepdim=True) + eps)


class RMSNorm(nn.Module):
    """``x / sqrt(mean(x^2) + eps) * weight`` over the last axis; input and output ``(..., d_model)``.

    ``weight`` (the gain, ``gamma``) starts at ones; there is no bias. Inputs in float16 or bfloat16 are
    normalised in float32 and cast back before the gain is applied, as ``transformers``' Llama does, so
    that the mean of squares neither overflows nor loses its low bits. ``fused=True`` computes the same
    with ``torch.nn.functional.rms_norm``.
    """

    def __init__(self, d_model: int, eps: float = 1e-6, fused: bool = False) -> None:
        super().__init__()
        self.d_model = positive_int("d_model", d_model, "RMSNorm")
        self.eps = check_number("eps", eps, "RMSNorm", 0.0, low_open=True)
        self.fused = check_bool("fused", fused, "RMSNorm")
        self.weight = nn.Parameter(torch.ones(d_model))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_float_tensor("x", x, "RMSNorm", min_ndim=1)
        if x.shape[-1] != self.d_model:
            raise ValueError(f"RMSNorm: x must end in d_model={self.d_model}, got shape {tuple(x.shape)}")
        if self.fused:
            return F.rms_norm(x, (self.d_model,), self.weight, self.eps)
        dtype = x.dtype
        h = x.float() if dtype in (torch.float16, torch.bfloat16) else x
        h = h * torch.rsqrt(h.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return self.weight * h.to(dtype)

    def extra_repr(self) -> str:
        return f"{self.d_model}, eps={self.eps}"
