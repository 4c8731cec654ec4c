"""Weight quantization: absmax and zero-point integers, per tensor, per channel and per group, and an int8 layer.

A ``b``-bit quantizer stores each weight as an integer code ``n`` and a few floating-point numbers shared by a
*group* of weights (the whole tensor, one output channel, or ``group_size`` consecutive weights of a row):

* **absmax** (symmetric): ``s = max|w| / (2^(b-1) - 1)``, ``n = round(w / s)`` in ``[-(2^(b-1) - 1), 2^(b-1) - 1]``,
  ``w_hat = s n``;
* **zero-point** (affine, asymmetric), on the range widened to contain 0, ``w_lo = min(min w, 0)`` and
  ``w_hi = max(max w, 0)`` (so that 0 is exact): ``s = (w_hi - w_lo) / (2^b - 1)``, ``z = round(-w_lo / s)``,
  ``n = clamp(round(w / s) + z, 0, 2^b - 1)``, ``w_hat = s (n - z)``.

In both, every weight of a group is reconstructed to within half a step: ``|w - w_hat| <= s / 2``
(:func:`error_bound`). One large weight (an *outlier*) makes ``s`` large for its whole group, which is why smaller
groups cost fewer errors and more scales (:func:`bits_per_weight`).

:class:`Int8Linear` is a weight-only int8 linear layer (int8 codes and one float scale per output channel;
activations stay in floating point); :func:`int8_linear_reference` computes a layer whose inputs are also integers
with exact integer arithmetic. :func:`quantize_decoder` replaces (fake-quantizes) every linear weight of a model.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from mmbook.checks import check_choice, check_float_tensor, check_instance, check_int, check_int_tensor

__all__ = ["SCHEMES", "Int8Linear", "QuantizedTensor", "bits_per_weight", "dequantize", "error_bound",
           "fake_quantize", "int8_linear_reference", "int8_weight_only", "q4_1_dequantize", "quantize",
           "quantize_decoder"]

SCHEMES = ("absmax", "zeropoint")


class QuantizedTensor(NamedTuple):
    """What :func:`quantize` returns for a weight of shape ``(out, in)``.

    ``codes`` ``(out, n_groups, group)`` int16 (absmax: ``[-(2^(b-1) - 1), 2^(b-1) - 1]``; zero-point:
    ``[0, 2^b - 1]``, so 8-bit zero-point codes are 0..255, outside int8); ``scale`` and ``zero``
    ``(out, n_groups, 1)`` (``zero`` is all zeros for absmax; per-tensor scales are repeated over rows and groups);
    ``shape`` the original shape; ``bits``; ``scheme``; ``group_size`` (``in`` for per-channel, ``None`` for one
    scale per tensor).
    """

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    shape: tuple[int, int]
    bits: int
    scheme: str
    group_size: int | None


def _grouped(w: torch.Tensor, group_size: int | None, fn: str) -> torch.Tensor:
    out, inp = w.shape
    if group_size is None:
        return w.reshape(out, 1, inp)
    check_int("group_size", group_size, fn, 1)
    if inp % group_size:
        raise ValueError(f"{fn}: group_size={group_size} must divide the input size {inp} of w {tuple(w.shape)}")
    return w.reshape(out, inp // group_size, group_size)


def quantize(w: torch.Tensor, bits: int = 8, scheme: str = "absmax", granularity: str = "channel",
             group_size: int | None = None) -> QuantizedTensor:
    """Quantize a weight ``w`` ``(out, in)`` to ``bits``-bit integer codes.

    ``granularity`` is ``"tensor"`` (one scale), ``"channel"`` (one per output row) or ``"group"`` (one per
    ``group_size`` consecutive weights of a row; ``group_size`` must divide ``in``). ``scheme`` is ``"absmax"``
    or ``"zeropoint"`` (see the module docstring). A group of zeros gets scale 1 (its codes are 0).
    """
    fn = "quantize"
    check_float_tensor("w", w, fn, 2, "(out, in)", nonempty=True, finite=True)
    bits = check_int("bits", bits, fn, 2, 8)
    check_choice("scheme", scheme, fn, SCHEMES)
    check_choice("granularity", granularity, fn, ("tensor", "channel", "group"))
    if granularity == "group":
        if group_size is None:
            raise ValueError(f"{fn}: granularity='group' needs a group_size")
        g = _grouped(w, group_size, fn)
    elif group_size is not None:
        raise ValueError(f"{fn}: group_size is only for granularity='group', got {group_size} with {granularity!r}")
    else:
        g = _grouped(w, None, fn)
    stat_dims = (0, 1, 2) if granularity == "tensor" else (2,)
    if scheme == "absmax":
        qmax = 2 ** (bits - 1) - 1
        scale = g.abs().amax(dim=stat_dims, keepdim=True) / qmax
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        codes = torch.clamp(torch.round(g / scale), -qmax, qmax)
        zero = torch.zeros_like(scale)
    else:
        qmax = 2 ** bits - 1
        low = torch.clamp(g.amin(dim=stat_dims, keepdim=True), max=0.0)  # 0 must be representable exactly
        high = torch.clamp(g.amax(dim=stat_dims, keepdim=True), min=0.0)
        scale = (high - low) / qmax
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        zero = torch.round(-low / scale)
        codes = torch.clamp(torch.round(g / scale) + zero, 0, qmax)
    expand = g.shape[:2] + (1,)
    return QuantizedTensor(codes.to(torch.int16), scale.expand(expand).contiguous(), zero.expand(expand).contiguous(),
                           (w.shape[0], w.shape[1]), bits, scheme,
                           group_size if granularity == "group" else (w.shape[1] if granularity == "channel" else None))


def _check_qt(qt: object, fn: str) -> QuantizedTensor:
    check_instance("qt", qt, fn, QuantizedTensor, "a QuantizedTensor from quantize")
    return qt


def dequantize(qt: QuantizedTensor) -> torch.Tensor:
    """The reconstructed weight ``s (q - z)`` in the original shape ``(out, in)`` and the scale's dtype."""
    _check_qt(qt, "dequantize")
    return ((qt.codes.to(qt.scale.dtype) - qt.zero) * qt.scale).reshape(qt.shape)


def error_bound(qt: QuantizedTensor) -> torch.Tensor:
    """The bound ``s / 2`` on ``|w - w_hat|`` for every weight, ``(out, in)``: half a quantization step."""
    _check_qt(qt, "error_bound")
    return (qt.scale / 2).expand(qt.codes.shape).reshape(qt.shape)


def fake_quantize(w: torch.Tensor, bits: int = 8, scheme: str = "absmax", granularity: str = "channel",
                  group_size: int | None = None) -> torch.Tensor:
    """``dequantize(quantize(w, ...))``: the weight the quantized model computes with, same shape and dtype."""
    return dequantize(quantize(w, bits, scheme, granularity, group_size)).to(w.dtype)


def bits_per_weight(bits: int, group_size: int | None, n_in: int | None = None, scale_bits: int = 16,
                    zero_point: bool = False, n_out: int | None = None, zero_bits: int | None = None) -> float:
    """Storage per weight: ``bits`` plus the group's scale (and zero point / minimum) spread over its weights.

    ``group_size=None`` means one scale for the tensor (give ``n_in`` and ``n_out``); per-channel is
    ``group_size = n_in``. With ``zero_point=True`` the group also stores a zero point of ``zero_bits`` bits:
    by default ``scale_bits``, a float minimum as in GGUF's Q4_1 (``bits_per_weight(4, 32, zero_point=True) =
    5.0``); an integer zero point as :func:`quantize` makes needs only ``zero_bits=bits``.
    """
    fn = "bits_per_weight"
    check_int("bits", bits, fn, 1, 32)
    check_int("scale_bits", scale_bits, fn, 0, 64)
    zero_bits = scale_bits if zero_bits is None else check_int("zero_bits", zero_bits, fn, 0, 64)
    extra = scale_bits + (zero_bits if zero_point else 0)
    if group_size is None:
        if n_in is None or n_out is None:
            raise ValueError(f"{fn}: one scale per tensor needs n_in and n_out")
        return bits + extra / (check_int("n_in", n_in, fn, 1) * check_int("n_out", n_out, fn, 1))
    return bits + extra / check_int("group_size", group_size, fn, 1)


class Int8Linear(nn.Module):
    """A weight-only int8 linear layer: ``y = (x W_q^T) * s + b``, ``x`` ``(..., in)`` -> ``(..., out)``.

    ``qweight`` ``(out, in)`` int8 codes from per-channel absmax quantization, ``scale`` ``(out,)`` float32 (a
    buffer), ``bias`` as in the layer it replaces. The codes are converted to the input's dtype for the product
    (the way weight-only kernels dequantize on the fly); the scale is applied after the sum, which is exact
    algebra because it is shared by a whole row. Build it with :meth:`from_linear`.
    """

    def __init__(self, qweight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        fn = "Int8Linear"
        check_int_tensor("qweight", qweight, fn, 2, "(out, in)")
        if qweight.dtype != torch.int8:
            raise TypeError(f"{fn}: qweight must be int8, got {qweight.dtype}")
        check_float_tensor("scale", scale, fn, 1, "(out,)")
        if scale.shape[0] != qweight.shape[0]:
            raise ValueError(f"{fn}: scale must have shape ({qweight.shape[0]},), got {tuple(scale.shape)}")
        self.register_buffer("qweight", qweight)
        self.register_buffer("scale", scale)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self.in_features, self.out_features = qweight.shape[1], qweight.shape[0]

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Int8Linear:
        """Quantize ``linear``'s weight per output channel with 8-bit absmax."""
        check_instance("linear", linear, "Int8Linear.from_linear", nn.Linear, "a torch.nn.Linear")
        qt = quantize(linear.weight.detach().float(), 8, "absmax", "channel")
        return cls(qt.codes.reshape(qt.shape).to(torch.int8), qt.scale.reshape(-1).contiguous(), linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fn = "Int8Linear"
        check_float_tensor("x", x, fn, min_ndim=1)
        if x.shape[-1] != self.in_features:
            raise ValueError(f"{fn}: x must have shape (..., {self.in_features}), got {tuple(x.shape)}")
        y = F.linear(x, self.qweight.to(x.dtype)) * self.scale.to(x.dtype)
        return y if self.bias is None else y + self.bias.to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def int8_linear_reference(x_int: torch.Tensor, x_scale: torch.Tensor | float, qweight: torch.Tensor,
                          w_scale: torch.Tensor) -> torch.Tensor:
    """A linear layer on integer inputs with exact integer arithmetic, ``(batch, in) -> (batch, out)`` float64.

    ``x = x_scale * x_int`` (``x_scale`` a number or ``(batch,)``) and ``W = w_scale[:, None] * qweight``; the
    dot products ``x_int . q_row`` are summed in int64 (exact, no rounding), and only the final product with
    the two scales is a floating-point (float64) operation.
    """
    fn = "int8_linear_reference"
    check_int_tensor("x_int", x_int, fn, 2, "(batch, in)")
    check_int_tensor("qweight", qweight, fn, 2, "(out, in)")
    check_float_tensor("w_scale", w_scale, fn, 1, "(out,)")
    if x_int.shape[1] != qweight.shape[1] or w_scale.shape[0] != qweight.shape[0]:
        raise ValueError(f"{fn}: x_int {tuple(x_int.shape)}, qweight {tuple(qweight.shape)} and w_scale "
                         f"{tuple(w_scale.shape)} do not fit (need (batch, in), (out, in), (out,))")
    acc = x_int.long() @ qweight.long().T  # exact integer sums
    xs = torch.as_tensor(x_scale, dtype=torch.float64)
    if xs.ndim > 1 or (xs.ndim == 1 and xs.shape[0] != x_int.shape[0]):
        raise ValueError(f"{fn}: x_scale must be a number or have shape ({x_int.shape[0]},), got {tuple(xs.shape)}")
    if xs.ndim == 1:
        xs = xs[:, None]
    return acc.double() * xs * w_scale.double()[None, :]


@torch.no_grad()
def quantize_decoder(model: nn.Module, bits: int, scheme: str = "absmax", granularity: str = "group",
                     group_size: int | None = 32, skip: tuple[str, ...] = ("lm_head", "embed_tokens")) -> int:
    """Replace, in place, the weight of every ``nn.Linear`` in ``model`` by its fake-quantized version.

    Modules whose qualified name contains one of ``skip`` are left alone (by default the token embedding and
    the output layer it is tied to, which GGUF files keep at 8 bits or more). Returns the number of weights
    quantized.
    """
    fn = "quantize_decoder"
    check_instance("model", model, fn, nn.Module, "a torch.nn.Module")
    if not isinstance(skip, tuple) or not all(isinstance(s, str) for s in skip):
        raise TypeError(f"{fn}: skip must be a tuple of strings, got {skip!r}")
    count = 0
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and not any(s in name for s in skip):
            w = module.weight
            w.copy_(fake_quantize(w.float(), bits, scheme, granularity, group_size).to(w.dtype))
            count += w.numel()
    return count


def int8_weight_only(model: nn.Module, skip: tuple[str, ...] = ("lm_head", "embed_tokens")) -> int:
    """Replace, in place, every ``nn.Linear`` of ``model`` (except names containing one of ``skip``) by an
    :class:`Int8Linear`. Returns the number of layers replaced."""
    fn = "int8_weight_only"
    check_instance("model", model, fn, nn.Module, "a torch.nn.Module")
    if not isinstance(skip, tuple) or not all(isinstance(s, str) for s in skip):
        raise TypeError(f"{fn}: skip must be a tuple of strings, got {skip!r}")
    targets = [(name, m) for name, m in model.named_modules()
               if isinstance(m, nn.Linear) and not any(s in name for s in skip)]
    for name, linear in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, Int8Linear.from_linear(linear))
    return len(targets)


Q4_1_BLOCK_BYTES = 20  # float16 scale d, float16 minimum m, 16 bytes of 4-bit codes for 32 weights


def q4_1_dequantize(raw: torch.Tensor) -> torch.Tensor:
    """GGUF's Q4_1 format decoded from its raw bytes: ``raw`` is a uint8 tensor of blocks of 20 bytes, each a
    float16 scale ``d``, a float16 minimum ``m`` and 16 bytes of 4-bit codes ``n`` (weights 0-15 of the block in
    the low nibbles, 16-31 in the high ones). Returns the float32 weights ``w = d * n + m``, 32 per block, flat.
    The products and sums are float32, as the ``gguf`` package computes them."""
    fn = "q4_1_dequantize"
    if not isinstance(raw, torch.Tensor) or raw.dtype != torch.uint8:
        raise TypeError(f"{fn}: raw must be a uint8 tensor of the file's bytes, got "
                        f"{getattr(raw, 'dtype', type(raw).__name__)}")
    if raw.numel() == 0 or raw.numel() % Q4_1_BLOCK_BYTES:
        raise ValueError(f"{fn}: raw must hold whole blocks of {Q4_1_BLOCK_BYTES} bytes, got {raw.numel()} bytes")
    blocks = raw.reshape(-1, Q4_1_BLOCK_BYTES)
    d = blocks[:, 0:2].contiguous().view(torch.float16).float()  # (n_blocks, 1)
    m = blocks[:, 2:4].contiguous().view(torch.float16).float()
    packed = blocks[:, 4:]
    codes = torch.cat([packed & 0x0F, packed >> 4], dim=1).float()  # (n_blocks, 32)
    return (d * codes + m).reshape(-1)
