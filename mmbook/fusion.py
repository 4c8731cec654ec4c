"""Multimodal fusion: ways to combine one vector per modality into one vector, behind one interface.

Every fusion module takes a list of modality vectors ``[(batch, d_1), ..., (batch, d_M)]`` and
returns ``(batch, d_out)``; :func:`make_fusion` builds any of them by name:

=============  =============================================================  ==========================
name           what it computes                                               reference
=============  =============================================================  ==========================
``sum``        ``sum_m w_m P_m x_m``, learned weights ``w = softmax(a)``       (a weighted average)
``concat``     ``W [x_1; ...; x_M] + b``                                       early fusion
``gated``      ``sum_m z_m * tanh(W_m x_m)``, gates ``z`` from all inputs      Arevalo et al. 2017 (GMU)
``tensor``     ``W vec([x_1; 1] (x) ... (x) [x_M; 1]) + b``                    Zadeh et al. 2017 (TFN)
``low_rank``   the same with ``W`` a sum of ``rank`` outer products            Liu et al. 2018 (LMF)
``conv``       project, stack the modalities as channels, ``Conv1d``           convolutional fusion
``recurrent``  project, read the modalities as a sequence into a GRU/LSTM      recurrent fusion
=============  =============================================================  ==========================

:class:`MultimodalClassifier` puts per-modality encoders, a fusion module and a classification
head together (feature-level, or *early*, fusion, optionally with modality dropout during
training); :class:`LateFusionClassifier` combines the predictions of unimodal classifiers by the
sum or the product rule (decision-level, or *late*, fusion). :func:`audio_visual_features` prepares
the noisy audio-visual digits of chapter 11 and :func:`digit_sum_features` its digit-sum task, whose
label needs both modalities; :func:`trace_shapes` records the shapes that flow through a model, for
debugging.

Cross-attention needs more than one vector per modality (over a single key the softmax is 1 and the output is a
linear map of the other modality): :class:`CrossAttentionClassifier` takes two *token sequences*, lets one
modality's tokens attend over the other's and pools the result. :func:`segment_tokens` and :func:`patch_tokens` turn
the chapter's speech and image features into such sequences, and :func:`make_uniform_attention` turns a
:class:`CrossAttentionClassifier` into its control with uniform attention weights.
"""

from __future__ import annotations

import math
import string
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from mmbook.attention import MultiHeadAttention
from mmbook.checks import (
    check_choice,
    check_float_tensor,
    check_instance,
    check_module_input,
    check_number,
    check_probability,
    positive_int,
)
from mmbook.core import torch_generator
from mmbook.vision import patchify

__all__ = [
    "FUSION_METHODS",
    "ConcatFusion",
    "ConvFusion",
    "CrossAttentionClassifier",
    "Fusion",
    "GatedFusion",
    "LateFusionClassifier",
    "LowRankFusion",
    "MLPEncoder",
    "MultimodalClassifier",
    "RecurrentFusion",
    "ShapeTrace",
    "TensorFusion",
    "WeightedSumFusion",
    "audio_visual_features",
    "corrupt_images",
    "digit_sum_features",
    "drop_modalities",
    "fusion_classifier",
    "make_fusion",
    "make_uniform_attention",
    "patch_tokens",
    "segment_tokens",
    "trace_shapes",
]


# ----------------------------------------------------------------------------- argument checks
_check_positive_int = positive_int  # the names the shown LowRankFusion and audio_visual_features use
_check_probability = check_probability


def _check_dims(dims: object, fn: str) -> tuple[int, ...]:
    if not isinstance(dims, (list, tuple)) or len(dims) == 0:
        raise TypeError(f"{fn}: dims must be a non-empty list or tuple of ints (one per modality), got {dims!r}")
    for d in dims:
        if isinstance(d, bool) or not isinstance(d, int) or d < 1:
            raise ValueError(f"{fn}: every entry of dims must be a positive int, got {dims!r}")
    return tuple(dims)


def _check_inputs(xs: object, dims: tuple[int, ...], fn: str, module: nn.Module | None = None) -> list[torch.Tensor]:
    """``xs`` must be a list/tuple of ``len(dims)`` tensors ``(batch, d_m)`` with one batch size (and, given
    ``module``, the dtype and device of its parameters)."""
    if isinstance(xs, torch.Tensor) or not isinstance(xs, (list, tuple)):
        raise TypeError(f"{fn}: expected a list of {len(dims)} tensors (batch, d_m), got {type(xs).__name__}")
    if len(xs) != len(dims):
        raise ValueError(f"{fn}: expected {len(dims)} modality tensors (dims={dims}), got {len(xs)}")
    shapes = []
    for m, (x, d) in enumerate(zip(xs, dims, strict=True)):
        if not isinstance(x, torch.Tensor) or not torch.is_floating_point(x):
            raise TypeError(f"{fn}: modality {m} must be a floating-point tensor, got "
                            f"{x.dtype if isinstance(x, torch.Tensor) else type(x).__name__}")
        if x.ndim != 2 or x.shape[1] != d:
            raise ValueError(f"{fn}: modality {m} must have shape (batch, {d}), got {tuple(x.shape)}")
        if module is not None:
            check_module_input(f"modality {m}", x, fn, module)
        shapes.append(tuple(x.shape))
    if len({s[0] for s in shapes}) != 1:
        raise ValueError(f"{fn}: all modalities must have the same batch size, got shapes {shapes}")
    return list(xs)


def _append_one(x: torch.Tensor) -> torch.Tensor:
    """``(batch, d)`` -> ``(batch, d + 1)``: the vector with a constant 1 appended."""
    return torch.cat([x, x.new_ones(x.shape[0], 1)], dim=1)


# ----------------------------------------------------------------------------- fusion modules
class Fusion(nn.Module):
    """Base class: fuse ``[(batch, d_1), ..., (batch, d_M)]`` into ``(batch, d_out)``.

    Subclasses implement :meth:`fuse`; :meth:`forward` checks the inputs first, so a wrong
    number of modalities or a wrong width raises a ``ValueError`` that names the shapes.
    """

    def __init__(self, dims: Sequence[int], d_out: int) -> None:
        super().__init__()
        name = type(self).__name__
        self.dims = _check_dims(dims, name)
        self.d_out = _check_positive_int("d_out", d_out, name)

    @property
    def num_modalities(self) -> int:
        return len(self.dims)

    def forward(self, xs: Sequence[torch.Tensor]) -> torch.Tensor:
        """``xs``: list of ``(batch, d_m)`` tensors, one per modality -> ``(batch, d_out)``."""
        return self.fuse(_check_inputs(xs, self.dims, type(self).__name__, self))

    def fuse(self, xs: list[torch.Tensor]) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"dims={self.dims}, d_out={self.d_out}"


class WeightedSumFusion(Fusion):
    """Learned weighted sum: ``sum_m w_m (P_m x_m + b_m)`` with ``w = softmax(a)``.

    Each modality is first projected to the common size ``d_out`` by a linear map ``P_m``; the
    modality weights ``w`` (``(M,)``, positive, summing to 1, see :attr:`modality_weights`) are
    learned through their logits ``a``, which start equal. Output ``(batch, d_out)``.
    """

    def __init__(self, dims: Sequence[int], d_out: int) -> None:
        super().__init__(dims, d_out)
        self.projections = nn.ModuleList(nn.Linear(d, d_out) for d in self.dims)
        self.weight_logits = nn.Parameter(torch.zeros(len(self.dims)))

    @property
    def modality_weights(self) -> torch.Tensor:
        """``(M,)``: the current weights ``softmax(a)``."""
        return torch.softmax(self.weight_logits, dim=0)

    def fuse(self, xs: list[torch.Tensor]) -> torch.Tensor:
        w = self.modality_weights
        return sum(w[m] * proj(x) for m, (proj, x) in enumerate(zip(self.projections, xs, strict=True)))


class ConcatFusion(Fusion):
    """Concatenation (feature-level, *early* fusion): ``W [x_1; ...; x_M] + b``, ``(batch, d_out)``.

    ``W`` is ``(d_out, sum_m d_m)``; the fused vector is linear in each modality, so the
    modalities only interact in the layers after the fusion.
    """

    def __init__(self, dims: Sequence[int], d_out: int) -> None:
        super().__init__(dims, d_out)
        self.linear = nn.Linear(sum(self.dims), d_out)

    def fuse(self, xs: list[torch.Tensor]) -> torch.Tensor:
        return self.linear(torch.cat(xs, dim=1))


class GatedFusion(Fusion):
    """Gated multimodal unit (Arevalo et al., 2017): ``sum_m z_m * tanh(W_m x_m + b_m)``.

    The gates ``z_m`` ``(batch, d_out)`` are computed from *all* modalities,
    ``z = softmax_m(G [x_1; ...; x_M] + c)`` taken over the modality axis, so per feature they are
    positive and sum to 1: the unit decides, example by example and feature by feature, which
    modality to listen to. For two modalities this is the paper's
    ``z * h_1 + (1 - z) * h_2`` with ``z = sigmoid(W_z [x_1; x_2])`` (``softmax([a, b])_0 =
    sigmoid(a - b)``). :meth:`gates` returns ``z`` ``(batch, M, d_out)``.
    """

    def __init__(self, dims: Sequence[int], d_out: int) -> None:
        super().__init__(dims, d_out)
        self.hidden = nn.ModuleList(nn.Linear(d, d_out) for d in self.dims)
        self.gate = nn.Linear(sum(self.dims), len(self.dims) * d_out)

    def gates(self, xs: Sequence[torch.Tensor]) -> torch.Tensor:
        """The gates ``z`` ``(batch, M, d_out)``, summing to 1 over the modality axis."""
        xs = _check_inputs(xs, self.dims, "GatedFusion.gates", self)
        logits = self.gate(torch.cat(xs, dim=1)).view(-1, len(self.dims), self.d_out)
        return torch.softmax(logits, dim=1)

    def fuse(self, xs: list[torch.Tensor]) -> torch.Tensor:
        h = torch.stack([torch.tanh(layer(x)) for layer, x in zip(self.hidden, xs, strict=True)], dim=1)
        return (self.gates(xs) * h).sum(dim=1)


class TensorFusion(Fusion):
    """Tensor fusion (Zadeh et al., 2017): ``W vec([x_1; 1] (x) [x_2; 1] (x) ... (x) [x_M; 1]) + b``.

    Appending a 1 to every vector before taking the outer product makes the fused tensor
    contain the constant, every unimodal vector ``x_m``, every bimodal product
    ``x_i (x) x_j``, and so on up to the M-modal product. :meth:`features` returns it
    flattened, ``(batch, prod_m (d_m + 1))`` (row-major: the last modality varies fastest);
    ``W`` is ``(d_out, prod_m (d_m + 1))``, which grows multiplicatively with the widths.
    """

    def __init__(self, dims: Sequence[int], d_out: int) -> None:
        super().__init__(dims, d_out)
        self.linear = nn.Linear(math.prod(d + 1 for d in self.dims), d_out)

    def features(self, xs: Sequence[torch.Tensor]) -> torch.Tensor:
        """The flattened outer product ``(batch, prod_m (d_m + 1))``."""
        xs = _check_inputs(xs, self.dims, "TensorFusion.features")
        z = _append_one(xs[0])
        for x in xs[1:]:
            z = (z.unsqueeze(2) * _append_one(x).unsqueeze(1)).flatten(1)
        return z

    def fuse(self, xs: list[torch.Tensor]) -> torch.Tensor:
        return self.linear(self.features(xs))


class LowRankFusion(Fusion):
    """Low-rank multimodal fusion (Liu et al., 2018): tensor fusion with a rank-``r`` weight.

    The weight tensor of :class:`TensorFusion`, ``W`` of shape
    ``(d_1 + 1, ..., d_M + 1, d_out)``, is restricted to
    ``W = sum_{i=1}^r w_1^(i) (x) ... (x) w_M^(i)`` with factors ``w_m^(i)`` ``(d_m + 1, d_out)``
    (one outer product per output feature). Then the fused vector never has to be formed:
    ``h = sum_i prod_m (w_m^(i)^T [x_m; 1]) + b``, at a cost linear in the widths.
    ``factors[m]`` is ``(rank, d_m + 1, d_out)``; :meth:`full_weight` rebuilds ``W`` and
    :meth:`to_tensor_fusion` an equivalent :class:`TensorFusion`.
    """

    def __init__(self, dims: Sequence[int], d_out: int, rank: int = 4) -> None:
        super().__init__(dims, d_out)
        self.rank = _check_positive_int("rank", rank, "LowRankFusion")
        factors = []
        for m, d in enumerate(self.dims):
            # each factor's contraction w^T [x; 1] has variance ~1 for inputs of size ~1; the first
            # factor also carries 1/sqrt(rank) so that the sum over the rank does too
            std = 1.0 / math.sqrt(d + 1) / (math.sqrt(self.rank) if m == 0 else 1.0)
            factors.append(nn.Parameter(torch.randn(self.rank, d + 1, d_out) * std))
        self.factors = nn.ParameterList(factors)
        self.bias = nn.Parameter(torch.zeros(d_out))

    def fuse(self, xs: list[torch.Tensor]) -> torch.Tensor:
        product = None
        for x, w in zip(xs, self.factors, strict=True):
            a = torch.einsum("bi,rio->bro", _append_one(x), w)  # (batch, rank, d_out)
            product = a if product is None else product * a
        return product.sum(dim=1) + self.bias

    def full_weight(self) -> torch.Tensor:
        """The full weight tensor ``(d_1 + 1, ..., d_M + 1, d_out)`` built from the factors."""
        letters = string.ascii_uppercase[: len(self.dims)]  # one index per modality
        spec = ",".join(f"r{c}z" for c in letters) + f"->{letters}z"
        return torch.einsum(spec, *self.factors)

    def to_tensor_fusion(self) -> TensorFusion:
        """A :class:`TensorFusion` whose weight is :meth:`full_weight`; it computes the same function."""
        tf = TensorFusion(self.dims, self.d_out).to(self.bias.device, self.bias.dtype)
        with torch.no_grad():
            tf.linear.weight.copy_(self.full_weight().reshape(-1, self.d_out).T)
            tf.linear.bias.copy_(self.bias)
        return tf

    def extra_repr(self) -> str:
        return f"dims={self.dims}, d_out={self.d_out}, rank={self.rank}"


class ConvFusion(Fusion):
    """Convolutional fusion: project, stack the modalities as channels, convolve.

    Each modality is projected to ``d_common`` features (default ``d_out``); the stack
    ``(batch, M, d_common)`` is read as an ``M``-channel signal of length ``d_common`` and
    convolved by ``Conv1d(M, channels, kernel_size, padding=kernel_size // 2)``, so every output
    position mixes all modalities over a small window of neighbouring features. A ReLU and a
    linear layer map ``(batch, channels * d_common)`` to ``(batch, d_out)``.
    """

    def __init__(self, dims: Sequence[int], d_out: int, d_common: int | None = None, channels: int = 8,
                 kernel_size: int = 3) -> None:
        super().__init__(dims, d_out)
        fn = "ConvFusion"
        self.d_common = _check_positive_int("d_common", d_out if d_common is None else d_common, fn)
        channels = _check_positive_int("channels", channels, fn)
        kernel_size = _check_positive_int("kernel_size", kernel_size, fn)
        if kernel_size % 2 == 0:
            raise ValueError(f"{fn}: kernel_size must be odd (to keep the length), got {kernel_size}")
        self.projections = nn.ModuleList(nn.Linear(d, self.d_common) for d in self.dims)
        self.conv = nn.Conv1d(len(self.dims), channels, kernel_size, padding=kernel_size // 2)
        self.out = nn.Linear(channels * self.d_common, d_out)

    def stack(self, xs: Sequence[torch.Tensor]) -> torch.Tensor:
        """The projected modalities as channels: ``(batch, M, d_common)``."""
        xs = _check_inputs(xs, self.dims, "ConvFusion.stack", self)
        return torch.stack([proj(x) for proj, x in zip(self.projections, xs, strict=True)], dim=1)

    def fuse(self, xs: list[torch.Tensor]) -> torch.Tensor:
        return self.out(torch.relu(self.conv(self.stack(xs))).flatten(1))


class RecurrentFusion(Fusion):
    """Recurrent fusion: the modalities, projected to ``d_common``, read as a sequence by an RNN.

    The sequence ``(batch, M, d_common)`` (modality order = time order) goes through a
    ``batch_first`` GRU (``cell="gru"``) or LSTM (``cell="lstm"``) with hidden size ``d_out``;
    the output is the last hidden state ``(batch, d_out)``, which has seen every modality.
    """

    def __init__(self, dims: Sequence[int], d_out: int, d_common: int | None = None, cell: str = "gru") -> None:
        super().__init__(dims, d_out)
        fn = "RecurrentFusion"
        self.d_common = _check_positive_int("d_common", d_out if d_common is None else d_common, fn)
        if cell not in ("gru", "lstm"):
            raise ValueError(f"{fn}: cell must be 'gru' or 'lstm', got {cell!r}")
        self.cell = cell
        self.projections = nn.ModuleList(nn.Linear(d, self.d_common) for d in self.dims)
        rnn = nn.GRU if cell == "gru" else nn.LSTM
        self.rnn = rnn(self.d_common, d_out, batch_first=True)

    def sequence(self, xs: Sequence[torch.Tensor]) -> torch.Tensor:
        """The projected modalities as a sequence: ``(batch, M, d_common)``."""
        xs = _check_inputs(xs, self.dims, "RecurrentFusion.sequence", self)
        return torch.stack([proj(x) for proj, x in zip(self.projections, xs, strict=True)], dim=1)

    def fuse(self, xs: list[torch.Tensor]) -> torch.Tensor:
        _, state = self.rnn(self.sequence(xs))
        h_n = state[0] if self.cell == "lstm" else state  # (num_layers, batch, d_out)
        return h_n[-1]


_FUSIONS: dict[str, type[Fusion]] = {
    "sum": WeightedSumFusion,
    "concat": ConcatFusion,
    "gated": GatedFusion,
    "tensor": TensorFusion,
    "low_rank": LowRankFusion,
    "conv": ConvFusion,
    "recurrent": RecurrentFusion,
}
FUSION_METHODS: tuple[str, ...] = tuple(_FUSIONS)


def make_fusion(name: str, dims: Sequence[int], d_out: int, **kwargs: object) -> Fusion:
    """Build a fusion module by name (one of :data:`FUSION_METHODS`).

    ``dims`` are the modality widths ``(d_1, ..., d_M)``; the module maps
    ``[(batch, d_1), ..., (batch, d_M)]`` to ``(batch, d_out)``. Extra keyword arguments go to
    the class (``rank`` for ``low_rank``; ``d_common``, ``channels``, ``kernel_size`` for
    ``conv``; ``d_common``, ``cell`` for ``recurrent``).
    """
    if name not in _FUSIONS:
        raise ValueError(f"make_fusion: name must be one of {FUSION_METHODS}, got {name!r}")
    try:
        return _FUSIONS[name](dims, d_out, **kwargs)
    except TypeError as err:
        if "unexpected keyword argument" in str(err):
            raise TypeError(f"make_fusion: {name!r} does not take {sorted(kwargs)}: {err}") from None
        raise


# ----------------------------------------------------------------------------- classifiers
class MLPEncoder(nn.Sequential):
    """A small per-modality encoder ``(batch, d_in) -> (batch, d_out)``.

    ``Linear -> ReLU -> Dropout``, preceded by ``Linear -> ReLU -> Dropout`` to ``d_hidden``
    features when ``d_hidden`` is given.
    """

    def __init__(self, d_in: int, d_out: int, d_hidden: int | None = None, dropout: float = 0.0) -> None:
        fn = "MLPEncoder"
        d_in = _check_positive_int("d_in", d_in, fn)
        d_out = _check_positive_int("d_out", d_out, fn)
        dropout = _check_probability("dropout", dropout, fn, high_inclusive=False)
        layers: list[nn.Module] = []
        if d_hidden is not None:
            d_hidden = _check_positive_int("d_hidden", d_hidden, fn)
            layers += [nn.Linear(d_in, d_hidden), nn.ReLU(), nn.Dropout(dropout)]
            d_in = d_hidden
        layers += [nn.Linear(d_in, d_out), nn.ReLU(), nn.Dropout(dropout)]
        super().__init__(*layers)
        self.d_in, self.d_out = layers[0].in_features, d_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(batch, d_in) -> (batch, d_out)``."""
        if check_float_tensor("x", x, "MLPEncoder").ndim != 2 or x.shape[1] != self.d_in:
            raise ValueError(f"MLPEncoder: x must have shape (batch, {self.d_in}), got {tuple(x.shape)}")
        check_module_input("x", x, "MLPEncoder", self)
        return super().forward(x)


def drop_modalities(inputs: Sequence[torch.Tensor], p: float, generator: torch.Generator | None = None
                    ) -> list[torch.Tensor]:
    """Modality dropout: with probability ``p`` an example loses one modality, chosen uniformly.

    ``inputs``: ``M >= 2`` tensors ``(batch, ...)`` with one batch size. The dropped modality's
    input is replaced by zeros (for standardised features: the training mean), the same
    "missing" signal used at test time; at most one modality per example is dropped, so no
    example loses everything. Returns new tensors; random numbers come from ``generator`` (or
    PyTorch's global generator) on the CPU.
    """
    fn = "drop_modalities"
    if isinstance(inputs, torch.Tensor) or not isinstance(inputs, (list, tuple)) or len(inputs) < 2:
        raise ValueError(f"{fn}: inputs must be a list of at least 2 tensors, got {type(inputs).__name__}"
                         + (f" of length {len(inputs)}" if isinstance(inputs, (list, tuple)) else ""))
    p = _check_probability("p", p, fn)
    check_instance("generator", generator, fn, (torch.Generator, type(None)), "a torch.Generator or None")
    if not all(isinstance(x, torch.Tensor) for x in inputs):
        raise TypeError(f"{fn}: every input must be a torch.Tensor, got {[type(x).__name__ for x in inputs]}")
    batch = {x.shape[0] if x.ndim else None for x in inputs}
    if len(batch) != 1 or None in batch:
        raise ValueError(f"{fn}: inputs must share the batch size, got shapes {[tuple(x.shape) for x in inputs]}")
    n = inputs[0].shape[0]
    drop = torch.rand(n, generator=generator) < p
    which = torch.randint(len(inputs), (n,), generator=generator)
    out = []
    for m, x in enumerate(inputs):
        keep = ~(drop & (which == m))
        out.append(x * keep.to(x.device, x.dtype).view(-1, *([1] * (x.ndim - 1))))
    return out


class MultimodalClassifier(nn.Module):
    """Feature-level fusion: encode each modality, fuse, classify.

    ``forward(x_1, ..., x_M)`` with ``x_m`` ``(batch, ...)`` (whatever ``encoders[m]`` takes)
    returns logits ``(batch, num_classes)``: ``head(fusion([enc_1(x_1), ..., enc_M(x_M)]))`` with
    ``head = ReLU -> Dropout(dropout) -> Linear(fusion.d_out, num_classes)``. With
    ``modality_dropout > 0`` and in training mode, :func:`drop_modalities` zeroes one modality's
    input of that fraction of examples. A single encoder gives a unimodal classifier.
    """

    def __init__(self, encoders: Sequence[nn.Module], fusion: Fusion, num_classes: int, dropout: float = 0.0,
                 modality_dropout: float = 0.0) -> None:
        super().__init__()
        fn = "MultimodalClassifier"
        if not isinstance(fusion, Fusion):
            raise TypeError(f"{fn}: fusion must be a mmbook.fusion.Fusion, got {type(fusion).__name__}")
        if not isinstance(encoders, (list, tuple)) or not all(isinstance(e, nn.Module) for e in encoders):
            raise TypeError(f"{fn}: encoders must be a list of nn.Module, got {type(encoders).__name__}")
        if len(encoders) != fusion.num_modalities:
            raise ValueError(f"{fn}: got {len(encoders)} encoders for a fusion of {fusion.num_modalities} "
                             f"modalities (dims={fusion.dims})")
        num_classes = _check_positive_int("num_classes", num_classes, fn)
        dropout = _check_probability("dropout", dropout, fn, high_inclusive=False)
        self.modality_dropout = _check_probability("modality_dropout", modality_dropout, fn)
        if self.modality_dropout > 0 and len(encoders) < 2:
            raise ValueError(f"{fn}: modality_dropout needs at least 2 modalities, got {len(encoders)}")
        self.encoders = nn.ModuleList(encoders)
        self.fusion = fusion
        self.head = nn.Sequential(nn.ReLU(), nn.Dropout(dropout), nn.Linear(fusion.d_out, num_classes))

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        if len(inputs) != len(self.encoders):
            raise ValueError(f"MultimodalClassifier: expected {len(self.encoders)} inputs (one per modality), "
                             f"got {len(inputs)}")
        if self.training and self.modality_dropout > 0:
            inputs = tuple(drop_modalities(inputs, self.modality_dropout))
        return self.head(self.fusion([enc(x) for enc, x in zip(self.encoders, inputs, strict=True)]))


def fusion_classifier(dims: Sequence[int], method: str = "concat", d_embed: int = 32, num_classes: int = 10,
                      dropout: float = 0.3, modality_dropout: float = 0.0, **fusion_kwargs: object
                      ) -> MultimodalClassifier:
    """The chapter's recipe: one :class:`MLPEncoder` ``(batch, d_m) -> (batch, d_embed)`` per
    modality, the fusion ``method`` (see :func:`make_fusion`) to ``d_embed`` features, and a
    linear head to ``num_classes``; ``dropout`` in the encoders and the head.

    ``forward(x_1, ..., x_M)`` with ``x_m`` ``(batch, dims[m])`` returns ``(batch, num_classes)``.
    A single entry in ``dims`` with ``method="concat"`` gives a unimodal classifier of the same shape.
    """
    dims = _check_dims(dims, "fusion_classifier")
    check_choice("method", method, "fusion_classifier", FUSION_METHODS)
    d_embed = _check_positive_int("d_embed", d_embed, "fusion_classifier")
    encoders = [MLPEncoder(d, d_embed, dropout=dropout) for d in dims]
    fusion = make_fusion(method, [d_embed] * len(dims), d_embed, **fusion_kwargs)
    return MultimodalClassifier(encoders, fusion, num_classes, dropout=dropout, modality_dropout=modality_dropout)


class CrossAttentionClassifier(nn.Module):
    """Fusion by cross-attention between two token sequences, then the chapter's classification head.

    ``forward(x_q, x_kv)``: ``x_q`` ``(batch, L_q, d_q)``, the tokens of the modality that asks (queries), and
    ``x_kv`` ``(batch, L_kv, d_kv)``, the tokens of the modality it reads (keys and values); ``token_shapes`` is
    ``((L_q, d_q), (L_kv, d_kv))``. Returns logits ``(batch, num_classes)``:

    1. every token of modality ``m`` is embedded as ``e = Dropout(ReLU(t W_m + b_m)) + p_m[l]``, ``(batch, L_m,
       d_embed)``: ``W_m`` is shared by the positions, ``p_m`` ``(L_m, d_embed)`` is a learned position embedding;
    2. the query tokens read the other modality with one :class:`mmbook.attention.MultiHeadAttention`
       (``num_heads`` heads) and keep what they had (a residual): ``h = e_q + MHA(e_q, e_kv, e_kv)``,
       ``(batch, L_q, d_embed)``;
    3. the mean over the ``L_q`` query positions, ``(batch, d_embed)``, goes through the head of
       :class:`MultimodalClassifier`, ``ReLU -> Dropout(dropout) -> Linear(d_embed, num_classes)``.

    The modalities meet in two places: in the attention weights ``softmax_j(q_i . k_j / sqrt(d_head))``, a
    bilinear form of a query token and a key token, and additively, in the residual sum ``h`` before the head's
    ReLU, as in concatenation. With a single key token (``L_kv = 1``) every weight is 1 and ``h = e_q +
    (e_kv W_v + b_v) W_o + b_o``: additive in the two modalities. :meth:`attention_weights` returns the weights,
    ``(batch, num_heads, L_q, L_kv)``.

    The attention is the book's :class:`mmbook.attention.MultiHeadAttention`, the same module that
    :class:`mmbook.crossmodal.CrossAttentionBlock` (chapter 12) wraps; step 2 is that block with its three
    LayerNorms (on its queries, its keys/values and its feed-forward input) and its feed-forward layer left out, on
    purpose. The feed-forward layer is a two-layer MLP applied to ``e_q + MHA(...)``, the sum of the two modalities:
    it would give this operator a hidden layer after the fusion that no other fusion operator gets, and such a layer
    can build the digit-sum table from an additive fusion by itself (chapter 11, Section 5), so a result could not
    be credited to the attention. The block is pre-norm: its LayerNorms would standardise what enters the attention
    and the feed-forward layer, a normalisation the other operators' inputs do not get (the residual stream the head
    sees is not normalised in either case). One bare layer keeps the comparison to one fusion step followed by the
    same head. The tokens, their shared embedding, the position embeddings and the mean pooling are new too;
    :func:`make_uniform_attention` builds the control with uniform weights that isolates the attention itself.
    """

    def __init__(self, token_shapes: Sequence[tuple[int, int]], d_embed: int = 32, num_classes: int = 10,
                 num_heads: int = 4, dropout: float = 0.0) -> None:
        super().__init__()
        fn = "CrossAttentionClassifier"
        if (not isinstance(token_shapes, (list, tuple)) or len(token_shapes) != 2
                or not all(isinstance(s, (list, tuple)) and len(s) == 2 for s in token_shapes)):
            raise TypeError(f"{fn}: token_shapes must be two (length, width) pairs, ((L_q, d_q), (L_kv, d_kv)), "
                            f"got {token_shapes!r}")
        self.token_shapes = tuple(tuple(_check_positive_int(f"token_shapes[{m}][{i}]", v, fn)
                                        for i, v in enumerate(s)) for m, s in enumerate(token_shapes))
        self.d_embed = _check_positive_int("d_embed", d_embed, fn)
        num_classes = _check_positive_int("num_classes", num_classes, fn)
        num_heads = _check_positive_int("num_heads", num_heads, fn)
        if d_embed % num_heads:
            raise ValueError(f"{fn}: d_embed ({d_embed}) must be divisible by num_heads ({num_heads})")
        dropout = _check_probability("dropout", dropout, fn, high_inclusive=False)
        self.embed = nn.ModuleList(nn.Sequential(nn.Linear(d, d_embed), nn.ReLU(), nn.Dropout(dropout))
                                   for _, d in self.token_shapes)
        self.positions = nn.ParameterList(nn.Parameter(0.1 * torch.randn(length, d_embed))
                                          for length, _ in self.token_shapes)
        self.attention = MultiHeadAttention(d_embed, num_heads)
        self.head = nn.Sequential(nn.ReLU(), nn.Dropout(dropout), nn.Linear(d_embed, num_classes))

    def embed_tokens(self, x_q: torch.Tensor, x_kv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The embedded tokens ``e_q`` ``(batch, L_q, d_embed)`` and ``e_kv`` ``(batch, L_kv, d_embed)``."""
        fn = "CrossAttentionClassifier"
        out = []
        for m, (name, x) in enumerate((("x_q", x_q), ("x_kv", x_kv))):
            check_float_tensor(name, x, fn)
            if x.ndim != 3 or tuple(x.shape[1:]) != self.token_shapes[m]:
                raise ValueError(f"{fn}: {name} must have shape (batch, {self.token_shapes[m][0]}, "
                                 f"{self.token_shapes[m][1]}), got {tuple(x.shape)}")
            check_module_input(name, x, fn, self)
            out.append(self.embed[m](x) + self.positions[m])
        if out[0].shape[0] != out[1].shape[0]:
            raise ValueError(f"{fn}: x_q and x_kv must have the same batch size, got {tuple(x_q.shape)} and "
                             f"{tuple(x_kv.shape)}")
        return out[0], out[1]

    def attention_weights(self, x_q: torch.Tensor, x_kv: torch.Tensor) -> torch.Tensor:
        """``(batch, num_heads, L_q, L_kv)``: how much each query token reads each key token (rows sum to 1)."""
        e_q, e_kv = self.embed_tokens(x_q, x_kv)
        return self.attention(e_q, e_kv, e_kv)[1]

    def forward(self, x_q: torch.Tensor, x_kv: torch.Tensor) -> torch.Tensor:
        e_q, e_kv = self.embed_tokens(x_q, x_kv)
        h = e_q + self.attention(e_q, e_kv, e_kv)[0]  # (batch, L_q, d_embed)
        return self.head(h.mean(dim=1))

    def extra_repr(self) -> str:
        return f"token_shapes={self.token_shapes}, d_embed={self.d_embed}, num_heads={self.attention.num_heads}"


def make_uniform_attention(model: CrossAttentionClassifier) -> CrossAttentionClassifier:
    """The uniform-attention control of a :class:`CrossAttentionClassifier`, in place: ``W_Q = 0`` and ``b_Q = 0``
    (``model.attention.q_proj``), frozen (``requires_grad=False``).

    Every query is then the zero vector, every score ``q . k_j / sqrt(d_head)`` is 0 and every attention weight is
    ``1 / L_kv``, for every example, head and query token, before and after training: each query token reads the
    plain mean of the value vectors. The tokens, embeddings, values, residual and head are unchanged and keep
    learning, so the difference between a trained model and its trained control is what the query-dependent
    weights add. The key projection ``model.attention.k_proj`` stays trainable but idle: every score is
    ``0 . k_j``, so it gets exactly zero gradient (its weights only decay under weight decay). Returns ``model``.
    """
    check_instance("model", model, "make_uniform_attention", CrossAttentionClassifier,
                   "a mmbook.fusion.CrossAttentionClassifier")
    q_proj = model.attention.q_proj
    with torch.no_grad():
        q_proj.weight.zero_()
        if q_proj.bias is not None:
            q_proj.bias.zero_()
    q_proj.requires_grad_(False)
    return model


def segment_tokens(audio: torch.Tensor, n_mfcc: int = 20) -> torch.Tensor:
    """Speech features as a token sequence: one token per time segment.

    ``audio`` ``(batch, n_mfcc * segments)`` is the ``"audio"`` feature of :func:`digit_sum_features` or
    :func:`audio_visual_features`, the MFCCs averaged over ``segments`` equal time segments and flattened
    coefficient by coefficient (``audio.view(batch, n_mfcc, segments)``). Returns ``(batch, segments, n_mfcc)``:
    token ``s`` holds the ``n_mfcc`` coefficients of segment ``s``, in time order (a new contiguous tensor).
    """
    fn = "segment_tokens"
    n_mfcc = _check_positive_int("n_mfcc", n_mfcc, fn)
    check_float_tensor("audio", audio, fn, 2, "(batch, n_mfcc * segments)")
    if audio.shape[0] == 0 or audio.shape[1] == 0:
        raise ValueError(f"{fn}: audio must hold at least one example and one segment, got shape "
                         f"{tuple(audio.shape)}")
    if audio.shape[1] % n_mfcc:
        raise ValueError(f"{fn}: audio must have n_mfcc * segments columns with n_mfcc = {n_mfcc}, got shape "
                         f"{tuple(audio.shape)}")
    return audio.reshape(audio.shape[0], n_mfcc, -1).transpose(1, 2).contiguous()


def patch_tokens(images: torch.Tensor, patch_size: int = 4) -> torch.Tensor:
    """Square grey images as a token sequence: one token per ``patch_size`` x ``patch_size`` patch.

    ``images`` ``(batch, side * side)`` (flattened row by row, as the ``"image"`` feature of
    :func:`digit_sum_features`) or ``(batch, side, side)``; ``side`` must be a multiple of ``patch_size``. A thin
    wrapper over chapter 9's :func:`mmbook.vision.patchify`: the images are reshaped to ``(batch, 1, side, side)``
    and cut by it. Returns ``(batch, (side / patch_size)**2, patch_size**2)``: the patches in row-major order (for
    8 x 8 digits and ``patch_size=4`` the four quadrants: top left, top right, bottom left, bottom right), the
    pixels of each patch row by row.
    """
    fn = "patch_tokens"
    patch_size = _check_positive_int("patch_size", patch_size, fn)
    check_float_tensor("images", images, fn, (2, 3), "(batch, side * side) or (batch, side, side)")
    side = math.isqrt(images.shape[1]) if images.ndim == 2 else images.shape[1]
    if (images.ndim == 2 and side * side != images.shape[1]) or (images.ndim == 3 and images.shape[2] != side):
        raise ValueError(f"{fn}: images must be square, (batch, side * side) or (batch, side, side), got shape "
                         f"{tuple(images.shape)}")
    if side % patch_size:
        raise ValueError(f"{fn}: patch_size must divide the image side ({side}), got {patch_size}")
    return patchify(images.reshape(images.shape[0], 1, side, side), patch_size)


class LateFusionClassifier(nn.Module):
    """Decision-level (*late*) fusion: combine the predictions of unimodal classifiers.

    ``forward(x_1, ..., x_M)`` runs ``classifiers[m](x_m)`` -> logits ``(batch, num_classes)``, turns them into
    log-posteriors ``log p_m(y | x_m) = log_softmax(logits_m)`` and returns ``(batch, num_classes)`` normalised
    log-probabilities (``logsumexp`` over classes is 0; ``nll_loss`` and ``cross_entropy`` apply) by one of
    Kittler et al.'s rules:

    * ``combine="product"``: the product rule, ``log_softmax_y( sum_m log p_m(y | x_m) - (M - 1) log p(y) )``.
      It is the Bayes posterior ``p(y | x_1, ..., x_M)`` when the modalities are conditionally independent
      given ``y`` and each classifier returns its modality's posterior. ``prior`` ``(num_classes,)`` is
      ``p(y)`` (positive, summing to 1); ``None`` means uniform, and then the ``(M - 1) log p(y)`` term is a
      constant that the normalisation removes. ``combine="logits"`` is accepted as the former name of this rule.
    * ``combine="probs"`` (default): the sum rule, ``log( mean_m p_m(y | x_m) )`` (a mixture; ``prior`` unused).
    """

    def __init__(self, classifiers: Sequence[nn.Module], combine: str = "probs",
                 prior: torch.Tensor | None = None) -> None:
        super().__init__()
        fn = "LateFusionClassifier"
        if not isinstance(classifiers, (list, tuple)) or len(classifiers) < 1 or not all(
                isinstance(c, nn.Module) for c in classifiers):
            raise TypeError(f"{fn}: classifiers must be a non-empty list of nn.Module, got {classifiers!r}")
        if combine not in ("probs", "product", "logits"):
            raise ValueError(f"{fn}: combine must be 'probs' (sum rule) or 'product' (product rule; 'logits' is "
                             f"its former name), got {combine!r}")
        self.classifiers = nn.ModuleList(classifiers)
        self.combine = "product" if combine == "logits" else combine
        if prior is not None:
            prior = check_float_tensor("prior", prior, fn)
            if prior.ndim != 1 or not bool((prior > 0).all()) or abs(prior.double().sum().item() - 1) > 1e-5:
                raise ValueError(f"{fn}: prior must be a 1-D tensor of positive class probabilities summing to 1, "
                                 f"got shape {tuple(prior.shape)} and sum {prior.double().sum().item():.6g}")
            if self.combine != "product":
                raise ValueError(f"{fn}: prior is used by the product rule only; got combine={combine!r}")
        self.register_buffer("log_prior", None if prior is None else prior.detach().log().clone())

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        if len(inputs) != len(self.classifiers):
            raise ValueError(f"LateFusionClassifier: expected {len(self.classifiers)} inputs, got {len(inputs)}")
        log_post = torch.stack([torch.log_softmax(c(x), dim=-1)
                                for c, x in zip(self.classifiers, inputs, strict=True)])  # (M, batch, C)
        if self.combine == "probs":
            return torch.logsumexp(log_post, dim=0) - math.log(len(self.classifiers))
        scores = log_post.sum(dim=0)  # (batch, C)
        if self.log_prior is not None:
            if self.log_prior.shape[0] != scores.shape[-1]:
                raise ValueError(f"LateFusionClassifier: prior has {self.log_prior.shape[0]} classes, the "
                                 f"classifiers return {scores.shape[-1]}")
            scores = scores - (len(self.classifiers) - 1) * self.log_prior.to(scores.dtype)
        return torch.log_softmax(scores, dim=-1)


# ----------------------------------------------------------------------------- data for chapter 11
def corrupt_images(images: torch.Tensor, noise_std: float = 0.4, occlusion: int = 3,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """Occlude and add noise: one random ``occlusion`` x ``occlusion`` square per image is set to 0,
    then Gaussian noise of standard deviation ``noise_std`` is added everywhere.

    ``images`` ``(batch, channels, height, width)`` -> the same shape (a new tensor). The square
    lies entirely inside the image; ``occlusion=0`` skips it. Random numbers come from
    ``generator`` (or PyTorch's global generator) on the CPU.
    """
    fn = "corrupt_images"
    if not isinstance(images, torch.Tensor) or not torch.is_floating_point(images) or images.ndim != 4:
        raise ValueError(f"{fn}: images must be a floating-point tensor (batch, channels, height, width), got "
                         f"{tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__}")
    check_number("noise_std", noise_std, fn, 0.0)  # NaN would fail "> 0" and add no noise at all
    check_instance("generator", generator, fn, (torch.Generator, type(None)), "a torch.Generator or None")
    n, _, height, width = images.shape
    if isinstance(occlusion, bool) or not isinstance(occlusion, int) or not 0 <= occlusion <= min(height, width):
        raise ValueError(f"{fn}: occlusion must be an int in [0, {min(height, width)}], got {occlusion!r}")
    out = images.detach().cpu().clone()
    if occlusion:
        top = torch.randint(0, height - occlusion + 1, (n,), generator=generator)
        left = torch.randint(0, width - occlusion + 1, (n,), generator=generator)
        rows, cols = torch.arange(height), torch.arange(width)
        in_rows = (rows >= top[:, None]) & (rows < top[:, None] + occlusion)  # (n, height)
        in_cols = (cols >= left[:, None]) & (cols < left[:, None] + occlusion)  # (n, width)
        out = out.masked_fill((in_rows[:, :, None] & in_cols[:, None, :]).unsqueeze(1), 0.0)
    if noise_std > 0:
        out = out + noise_std * torch.randn(out.shape, generator=generator)
    return out.to(images.device)


def _speech_features(ds: object, n_mfcc: int, segments: int, fn: str) -> tuple[torch.Tensor, torch.Tensor]:
    """MFCCs ``(N, n_mfcc, frames)`` of a dataset's noisy waveforms and their ``(N, n_mfcc * segments)`` summary."""
    from mmbook.audio import mfcc

    coeffs = mfcc(ds.waveforms(), sample_rate=ds.sample_rate, n_mfcc=n_mfcc,
                  melkwargs={"n_fft": 400, "hop_length": 320, "n_mels": 40})
    if segments > coeffs.shape[-1]:
        raise ValueError(f"{fn}: segments must be <= the number of frames ({coeffs.shape[-1]}), got {segments}")
    return coeffs, nn.functional.adaptive_avg_pool1d(coeffs, segments).flatten(1)


def audio_visual_features(split: str = "train", seed: int = 0, snr_db: tuple[float, float] = (-15.0, -5.0),
                          image_noise: float = 0.3, occlusion: int = 3, n_mfcc: int = 20,
                          segments: int = 5) -> dict[str, torch.Tensor]:
    """Chapter 11's noisy audio-visual digits as feature tensors, computed once per split.

    From :func:`mmbook.data.audio_visual_digits` (``split``, ``seed``, audio at ``snr_db``):

    * ``"image"`` ``(N, 64)``: the 8x8 image after :func:`corrupt_images` (``image_noise``,
      ``occlusion``; seeded by ``seed`` and the split), flattened;
    * ``"mfcc"`` ``(N, n_mfcc, frames)``: MFCCs of the noisy speech (40 mel bands, 25 ms
      windows every 20 ms: 51 frames for 1 s);
    * ``"audio"`` ``(N, n_mfcc * segments)``: the MFCCs averaged over ``segments`` equal time
      segments and flattened (a coarse picture of how the spectrum changes through the word);
    * ``"labels"`` ``(N,)`` int64 and ``"image_clean"`` ``(N, 64)``.
    """
    from mmbook.data import audio_visual_digits

    fn = "audio_visual_features"
    n_mfcc = _check_positive_int("n_mfcc", n_mfcc, fn)
    segments = _check_positive_int("segments", segments, fn)
    check_number("image_noise", image_noise, fn, 0.0)
    if n_mfcc > 40:
        raise ValueError(f"{fn}: n_mfcc must be <= 40 (the number of mel bands), got {n_mfcc}")
    ds = audio_visual_digits(split, seed=seed, snr_db=snr_db)
    coeffs, audio = _speech_features(ds, n_mfcc, segments, fn)
    generator = torch_generator(seed * 2 + (1 if split == "test" else 0))
    images = corrupt_images(ds.images, image_noise, occlusion, generator)
    return {
        "image": images.flatten(1),
        "image_clean": ds.images.flatten(1).clone(),
        "mfcc": coeffs,
        "audio": audio,
        "labels": ds.labels.clone(),
    }


def digit_sum_features(split: str = "train", seed: int = 0, pairs_per_image: int = 3,
                       snr_db: tuple[float, float] | None = (10.0, 30.0), n_mfcc: int = 20,
                       segments: int = 5) -> dict[str, torch.Tensor]:
    """Chapter 11's digit-sum task as feature tensors: the label ``(a + b) mod 10`` needs both modalities.

    From :func:`mmbook.data.audio_visual_digit_sums` (``split`` one of ``"train"``, ``"val"``, ``"test"``;
    ``seed``, ``pairs_per_image``, speech at ``snr_db``), with the features of :func:`audio_visual_features`
    but clean images:

    * ``"image"`` ``(N, 64)``: the 8x8 image of digit ``a``, flattened, in [0, 1];
    * ``"mfcc"`` ``(N, n_mfcc, frames)``: the MFCCs of the noisy recording of digit ``b`` (51 frames for 1 s);
    * ``"audio"`` ``(N, n_mfcc * segments)``: those MFCCs averaged over ``segments`` equal time segments and
      flattened coefficient by coefficient (``audio.view(N, n_mfcc, segments)``);
    * ``"labels"`` ``(N,)`` int64 ``(a + b) % 10``; ``"image_digits"`` and ``"spoken_digits"`` ``(N,)`` int64,
      ``a`` and ``b``.
    """
    from mmbook.data import audio_visual_digit_sums

    fn = "digit_sum_features"
    n_mfcc = _check_positive_int("n_mfcc", n_mfcc, fn)
    segments = _check_positive_int("segments", segments, fn)
    if n_mfcc > 40:
        raise ValueError(f"{fn}: n_mfcc must be <= 40 (the number of mel bands), got {n_mfcc}")
    ds = audio_visual_digit_sums(split, seed=seed, pairs_per_image=pairs_per_image, snr_db=snr_db)
    coeffs, audio = _speech_features(ds, n_mfcc, segments, fn)
    return {
        "image": ds.images.flatten(1).clone(),
        "mfcc": coeffs,
        "audio": audio,
        "labels": ds.labels.clone(),
        "image_digits": ds.image_digits.clone(),
        "spoken_digits": ds.spoken_digits.clone(),
    }


# ----------------------------------------------------------------------------- debugging
@dataclass
class ShapeTrace:
    """What :func:`trace_shapes` saw: one row per module call, and the error, if any.

    ``rows``: ``(module name, class name, input shapes, output shape)`` tuples in call order;
    the output shape is ``None`` for a call that raised. ``error``: the ``RuntimeError`` the
    forward pass raised, or ``None``.
    """

    rows: list[tuple[str, str, list[tuple[int, ...]], tuple[int, ...] | None]] = field(default_factory=list)
    error: RuntimeError | None = None

    def __str__(self) -> str:
        lines = [f"{'module':<14} {'type':<8} {'input shape(s)':<26} output shape"]
        for name, kind, ins, out in self.rows:
            shown_in = ", ".join(str(tuple(s)) for s in ins)
            lines.append(f"{name:<14} {kind:<8} {shown_in:<26} {'RAISED' if out is None else tuple(out)}")
        if self.error is not None:
            lines.append(f"error: {str(self.error).splitlines()[0]}")
        return "\n".join(lines)

    __repr__ = __str__


def _shape_of(obj: object) -> tuple[int, ...] | None:
    if isinstance(obj, torch.Tensor):
        return tuple(obj.shape)
    if isinstance(obj, (list, tuple)) and obj and isinstance(obj[0], torch.Tensor):
        return tuple(obj[0].shape)  # an RNN returns (output, state): show the output
    return None


def trace_shapes(model: nn.Module, *inputs: torch.Tensor) -> ShapeTrace:
    """Run ``model(*inputs)`` and record the input and output shapes of every leaf module.

    A ``RuntimeError`` raised inside the forward pass (the usual symptom of a shape bug) is
    caught and stored in :attr:`ShapeTrace.error`, so the trace shows how far the data got and
    which module received the wrong shape. The model's training mode is left unchanged;
    gradients are not recorded.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"trace_shapes: model must be an nn.Module, got {type(model).__name__}")
    trace = ShapeTrace()
    handles = []
    pending: dict[int, int] = {}

    def pre_hook(module: nn.Module, args: tuple, name: str) -> None:
        pending[id(module)] = len(trace.rows)
        shapes = [s for s in (_shape_of(a) for a in args) if s is not None]
        trace.rows.append((name, type(module).__name__, shapes, None))

    def post_hook(module: nn.Module, args: tuple, output: object) -> None:
        row = pending.pop(id(module))
        name, kind, shapes, _ = trace.rows[row]
        trace.rows[row] = (name, kind, shapes, _shape_of(output))

    for name, module in model.named_modules():
        if name and not list(module.children()):
            handles.append(module.register_forward_pre_hook(lambda m, a, name=name: pre_hook(m, a, name)))
            handles.append(module.register_forward_hook(post_hook))
    try:
        with torch.no_grad():
            model(*inputs)
    except RuntimeError as err:
        trace.error = err
    finally:
        for h in handles:
            h.remove()
    return trace
