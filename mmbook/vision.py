"""Image operations written from their definitions: convolution as unfold + matmul, pooling."""

from __future__ import annotations

import torch

__all__ = ["conv2d", "conv_output_size", "max_pool2d"]


def _pair(name: str, value: int | tuple[int, int], fn: str, minimum: int) -> tuple[int, int]:
    pair = (value, value) if isinstance(value, int) and not isinstance(value, bool) else value
    if (not isinstance(pair, tuple) or len(pair) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) and v >= minimum for v in pair)):
        raise ValueError(f"{fn}: {name} must be an int >= {minimum} or a pair of them, got {value!r}")
    return pair


def conv_output_size(size: int, kernel: int, stride: int = 1, padding: int = 0, dilation: int = 1) -> int:
    """``floor((size + 2 padding - dilation (kernel - 1) - 1) / stride) + 1``."""
    out = (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1
    if out < 1:
        raise ValueError(
            f"conv_output_size: input of size {size} is too small for kernel {kernel} "
            f"(padding {padding}, dilation {dilation})"
        )
    return out


def conv2d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    stride: int | tuple[int, int] = 1,
    padding: int | tuple[int, int] = 0,
) -> torch.Tensor:
    """2-D cross-correlation (what deep learning calls convolution) as unfold + matmul.

    ``x``: ``(batch, C_in, H, W)``; ``weight``: ``(C_out, C_in, kH, kW)``; ``bias``:
    ``(C_out,)``. Every ``kH x kW`` patch of every input channel is unrolled into a column
    (``F.unfold``: ``(batch, C_in kH kW, L)`` with ``L = H_out W_out``), and the convolution
    becomes one matrix product with the flattened kernels ``(C_out, C_in kH kW)``.
    Returns ``(batch, C_out, H_out, W_out)``, equal to ``torch.nn.functional.conv2d``.
    """
    fn = "conv2d"
    for name, t in (("x", x), ("weight", weight)):
        if not isinstance(t, torch.Tensor) or not torch.is_floating_point(t):
            raise TypeError(f"{fn}: {name} must be a floating-point torch.Tensor, got {type(t).__name__}"
                            + (f" of {t.dtype}" if isinstance(t, torch.Tensor) else ""))
    if x.ndim != 4:
        raise ValueError(f"{fn}: x must have shape (batch, C_in, H, W), got {tuple(x.shape)}")
    if weight.ndim != 4:
        raise ValueError(f"{fn}: weight must have shape (C_out, C_in, kH, kW), got {tuple(weight.shape)}")
    if weight.shape[1] != x.shape[1]:
        raise ValueError(f"{fn}: weight expects C_in={weight.shape[1]} channels but x has {x.shape[1]} "
                         f"(x {tuple(x.shape)}, weight {tuple(weight.shape)})")
    c_out, _, kh, kw = weight.shape
    if bias is not None and (not isinstance(bias, torch.Tensor) or bias.shape != (c_out,)):
        raise ValueError(f"{fn}: bias must have shape ({c_out},), got {getattr(bias, 'shape', bias)!r}")
    sh, sw = _pair("stride", stride, fn, 1)
    ph, pw = _pair("padding", padding, fn, 0)
    h_out = conv_output_size(x.shape[2], kh, sh, ph)
    w_out = conv_output_size(x.shape[3], kw, sw, pw)
    cols = torch.nn.functional.unfold(x, (kh, kw), padding=(ph, pw), stride=(sh, sw))  # (B, C_in kH kW, L)
    out = weight.reshape(c_out, -1) @ cols  # (B, C_out, L)
    if bias is not None:
        out = out + bias.view(1, c_out, 1)
    return out.view(x.shape[0], c_out, h_out, w_out)


def max_pool2d(x: torch.Tensor, kernel_size: int, stride: int | None = None) -> torch.Tensor:
    """Max pooling over non-padded ``kernel_size`` windows (default stride = kernel_size), via
    unfold: ``(batch, C, H, W) -> (batch, C, H_out, W_out)``, equal to ``F.max_pool2d``."""
    if not isinstance(x, torch.Tensor) or x.ndim != 4:
        raise ValueError(f"max_pool2d: x must be a tensor (batch, C, H, W), got {getattr(x, 'shape', x)!r}")
    k = _pair("kernel_size", kernel_size, "max_pool2d", 1)
    s = _pair("stride", stride if stride is not None else kernel_size, "max_pool2d", 1)
    b, c, h, w = x.shape
    h_out, w_out = conv_output_size(h, k[0], s[0]), conv_output_size(w, k[1], s[1])
    cols = torch.nn.functional.unfold(x, k, stride=s)  # (B, C kH kW, L)
    return cols.view(b, c, k[0] * k[1], -1).amax(dim=2).view(b, c, h_out, w_out)
