"""Image encoders written from their definitions.

* :func:`conv2d` — convolution (cross-correlation) as unfold + matmul; :func:`max_pool2d`;
  :func:`conv_output_size` and :func:`receptive_field` — the sizes they produce and see.
* :func:`patchify` — images to flattened non-overlapping patches (a ViT's tokens).
* :class:`SmallCNN` — a small CNN classifier/encoder (``features``, ``embed``, ``forward``).
* :class:`ViT` with :class:`ViTConfig` — a pre-LN Vision Transformer with a class token and
  learned position embeddings, built on :class:`mmbook.attention.MultiHeadAttention`;
  :func:`load_hf_vit_weights` copies a ``transformers`` ViT into it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from mmbook.attention import MultiHeadAttention
from mmbook.checks import (
    check_bool,
    check_float_tensor,
    check_instance,
    check_int,
    check_like,
    check_module_input,
    check_number,
    check_probability,
    positive_int,
)

__all__ = [
    "SmallCNN",
    "ViT",
    "ViTBlock",
    "ViTConfig",
    "conv2d",
    "conv_output_size",
    "load_hf_vit_weights",
    "max_pool2d",
    "patchify",
    "receptive_field",
]


def _pair(name: str, value: int | tuple[int, int], fn: str, minimum: int) -> tuple[int, int]:
    pair = (value, value) if isinstance(value, int) and not isinstance(value, bool) else value
    if (not isinstance(pair, tuple) or len(pair) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) and v >= minimum for v in pair)):
        raise ValueError(f"{fn}: {name} must be an int >= {minimum} or a pair of them, got {value!r}")
    return pair


def conv_output_size(size: int, kernel: int, stride: int = 1, padding: int = 0, dilation: int = 1) -> int:
    """``floor((size + 2 padding - dilation (kernel - 1) - 1) / stride) + 1``."""
    fn = "conv_output_size"
    for name, value, low in (("size", size, 1), ("kernel", kernel, 1), ("stride", stride, 1), ("padding", padding, 0),
                             ("dilation", dilation, 1)):
        check_int(name, value, fn, low)
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
    check_like("weight", weight, fn, "x", x)
    c_out, _, kh, kw = weight.shape
    if weight.numel() == 0:
        raise ValueError(f"{fn}: weight must not have an empty dimension, got {tuple(weight.shape)}")
    if bias is not None and (not isinstance(bias, torch.Tensor) or bias.shape != (c_out,)):
        raise ValueError(f"{fn}: bias must have shape ({c_out},), got {getattr(bias, 'shape', bias)!r}")
    if bias is not None:
        check_like("bias", bias, fn, "x", x)
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
    check_float_tensor("x", x, "max_pool2d")
    k = _pair("kernel_size", kernel_size, "max_pool2d", 1)
    s = _pair("stride", stride if stride is not None else kernel_size, "max_pool2d", 1)
    b, c, h, w = x.shape
    h_out, w_out = conv_output_size(h, k[0], s[0]), conv_output_size(w, k[1], s[1])
    cols = torch.nn.functional.unfold(x, k, stride=s)  # (B, C kH kW, L)
    return cols.view(b, c, k[0] * k[1], -1).amax(dim=2).view(b, c, h_out, w_out)


def receptive_field(kernel_sizes: Sequence[int], strides: Sequence[int] | None = None) -> int:
    """Receptive field (in input pixels, along one axis) of one output unit of a stack of layers.

    Layer ``ℓ`` has kernel ``k_ℓ`` and stride ``s_ℓ`` (default 1; pooling counts as a layer).
    ``r_0 = 1`` and ``r_ℓ = r_{ℓ-1} + (k_ℓ - 1) * s_1 s_2 ... s_{ℓ-1}``: each layer widens the
    field by ``k_ℓ - 1`` of its *input* units, and one input unit of layer ``ℓ`` is
    ``s_1 ... s_{ℓ-1}`` pixels apart from the next.
    """
    fn = "receptive_field"
    kernels = list(kernel_sizes) if isinstance(kernel_sizes, Sequence) and not isinstance(kernel_sizes, str) else []
    if not kernels or not all(isinstance(k, int) and not isinstance(k, bool) and k >= 1 for k in kernels):
        raise ValueError(f"{fn}: kernel_sizes must be a non-empty sequence of ints >= 1, got {kernel_sizes!r}")
    if strides is not None and (not isinstance(strides, Sequence) or isinstance(strides, str)):
        raise ValueError(f"{fn}: strides must be None or a sequence of ints >= 1, got {strides!r}")
    steps = [1] * len(kernels) if strides is None else list(strides)
    if len(steps) != len(kernels) or not all(
            isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in steps):
        raise ValueError(f"{fn}: strides must be {len(kernels)} ints >= 1 (one per kernel), got {strides!r}")
    field, jump = 1, 1
    for k, s in zip(kernels, steps, strict=True):
        field += (k - 1) * jump
        jump *= s
    return field


def patchify(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Cut images into non-overlapping square patches and flatten each one.

    ``images``: ``(batch, C, H, W)`` with ``H`` and ``W`` multiples of ``patch_size`` ``p``.
    Returns ``(batch, N, C p p)`` with ``N = (H / p) (W / p)`` patches in row-major order (left
    to right, then top to bottom) and each patch flattened channel first, then row, then
    column: the order of a ``Conv2d`` weight ``(d_model, C, p, p)`` flattened, so a patch
    embedding is ``patchify(x) @ weight.reshape(d_model, -1).T + bias``.
    """
    fn = "patchify"
    if not isinstance(images, torch.Tensor) or images.ndim != 4:
        raise ValueError(f"{fn}: images must be a tensor (batch, C, H, W), got {getattr(images, 'shape', images)!r}")
    if isinstance(patch_size, bool) or not isinstance(patch_size, int) or patch_size < 1:
        raise ValueError(f"{fn}: patch_size must be a positive int, got {patch_size!r}")
    b, c, h, w = images.shape
    if h % patch_size or w % patch_size:
        raise ValueError(f"{fn}: image size {h}x{w} is not a multiple of patch_size {patch_size}")
    p = patch_size
    x = images.reshape(b, c, h // p, p, w // p, p)  # (B, C, rows, p, cols, p)
    x = x.permute(0, 2, 4, 1, 3, 5)  # (B, rows, cols, C, p, p)
    return x.reshape(b, (h // p) * (w // p), c * p * p)


# ----------------------------------------------------------------------------- a small CNN


def _check_images(x: object, in_channels: int, fn: str, module: nn.Module | None = None) -> torch.Tensor:
    if not isinstance(x, torch.Tensor) or not torch.is_floating_point(x):
        raise TypeError(f"{fn}: images must be a floating-point torch.Tensor, got "
                        + (f"a tensor of {x.dtype}" if isinstance(x, torch.Tensor) else type(x).__name__))
    if x.ndim != 4 or x.shape[1] != in_channels:
        raise ValueError(f"{fn}: images must have shape (batch, {in_channels}, H, W), got {tuple(x.shape)}")
    if module is not None:
        check_module_input("images", x, fn, module)
    return x


class SmallCNN(nn.Module):
    """A small convolutional image encoder/classifier.

    ``num_blocks`` blocks of ``conv 3x3 (padding 1) -> BatchNorm -> ReLU -> max-pool 2x2``; block
    ``i`` has ``width * 2**i`` channels, so an ``H x W`` image becomes a feature map
    ``(batch, feature_dim, H / 2**num_blocks, W / 2**num_blocks)`` with
    ``feature_dim = width * 2**(num_blocks - 1)``. Global average pooling turns it into one vector
    ``(batch, feature_dim)``, and a linear head maps that to ``out_dim`` outputs (class logits,
    or an embedding for an encoder); ``out_dim=None`` leaves the pooled features as the output.

    * ``features(x)``: the last feature map ``(batch, feature_dim, h, w)`` (a grid of visual tokens);
    * ``embed(x)``: the pooled vector ``(batch, feature_dim)``;
    * ``forward(x)``: ``(batch, out_dim)`` (or ``(batch, feature_dim)`` when ``out_dim`` is None).

    Use ``num_blocks=2`` for 8x8 digits and 3 for 32x32 scenes. ``dropout`` acts before the head.
    """

    def __init__(
        self,
        in_channels: int = 1,
        out_dim: int | None = 10,
        width: int = 32,
        num_blocks: int = 2,
        dropout: float = 0.0,
        batch_norm: bool = True,
    ) -> None:
        super().__init__()
        fn = "SmallCNN"
        self.in_channels = positive_int("in_channels", in_channels, fn)
        if out_dim is not None:
            positive_int("out_dim", out_dim, fn)
        positive_int("width", width, fn)
        positive_int("num_blocks", num_blocks, fn)
        check_probability("dropout", dropout, fn, high_inclusive=False)
        check_bool("batch_norm", batch_norm, fn)
        self.num_blocks, self.out_dim = num_blocks, out_dim
        layers: list[nn.Module] = []
        channels = in_channels
        for i in range(num_blocks):
            c_out = width * 2**i
            layers += [nn.Conv2d(channels, c_out, 3, padding=1, bias=not batch_norm)]
            if batch_norm:
                layers += [nn.BatchNorm2d(c_out)]
            layers += [nn.ReLU(), nn.MaxPool2d(2)]
            channels = c_out
        self.body = nn.Sequential(*layers)
        self.feature_dim = channels
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(channels, out_dim) if out_dim is not None else nn.Identity()

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """``(batch, C_in, H, W) -> (batch, feature_dim, H / 2**num_blocks, W / 2**num_blocks)``."""
        x = _check_images(x, self.in_channels, "SmallCNN", self)
        side = 2**self.num_blocks
        if x.shape[2] < side or x.shape[3] < side:
            raise ValueError(f"SmallCNN: images of {x.shape[2]}x{x.shape[3]} are too small for "
                             f"{self.num_blocks} pooling blocks (need at least {side}x{side})")
        return self.body(x)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Global-average-pooled features: ``(batch, C_in, H, W) -> (batch, feature_dim)``."""
        return self.features(x).mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(batch, C_in, H, W) -> (batch, out_dim)`` (``(batch, feature_dim)`` if ``out_dim`` is None)."""
        return self.head(self.dropout(self.embed(x)))


# ----------------------------------------------------------------------------- a Vision Transformer


@dataclass
class ViTConfig:
    """Sizes of a :class:`ViT`. The defaults are the book's tiny ViT for 8x8 digits.

    The image is ``image_size x image_size`` with ``in_channels`` channels, cut into
    ``(image_size / patch_size)**2`` patches. ``d_ff`` is the hidden size of each block's MLP
    (``intermediate_size`` in ``transformers``); ``num_classes=None`` makes the model an encoder
    whose output is the pooled ``d_model`` vector. ``pool`` is ``"cls"`` (the class token's final
    state, as in ViT and ``ViTForImageClassification``) or ``"mean"`` (mean over patch tokens).
    """

    image_size: int = 8
    patch_size: int = 2
    in_channels: int = 1
    d_model: int = 32
    num_heads: int = 4
    num_layers: int = 2
    d_ff: int = 64
    num_classes: int | None = 10
    dropout: float = 0.0
    layer_norm_eps: float = 1e-6
    pool: str = "cls"

    def __post_init__(self) -> None:
        fn = "ViTConfig"
        for name in ("image_size", "patch_size", "in_channels", "d_model", "num_heads", "num_layers", "d_ff"):
            positive_int(name, getattr(self, name), fn)
        if self.num_classes is not None:
            positive_int("num_classes", self.num_classes, fn)
        if self.image_size % self.patch_size:
            raise ValueError(f"{fn}: image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        if self.d_model % self.num_heads:
            raise ValueError(f"{fn}: d_model ({self.d_model}) must be divisible by num_heads ({self.num_heads})")
        if not isinstance(self.dropout, (int, float)) or not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"{fn}: dropout must be in [0, 1), got {self.dropout!r}")
        check_number("layer_norm_eps", self.layer_norm_eps, fn, 0.0, low_open=True)
        if self.pool not in ("cls", "mean"):
            raise ValueError(f"{fn}: pool must be 'cls' or 'mean', got {self.pool!r}")

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


class ViTBlock(nn.Module):
    """Pre-LN encoder block: ``x + Attn(LN(x))``, then ``x + MLP(LN(x))`` with exact (erf) GELU.

    ``(batch, seq, d_model) -> (batch, seq, d_model)``. Attention is
    :class:`mmbook.attention.MultiHeadAttention`, with no mask (every token sees every token).
    """

    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        check_instance("config", config, "ViTBlock", ViTConfig, "a ViTConfig")
        d = config.d_model
        self.norm1 = nn.LayerNorm(d, eps=config.layer_norm_eps)
        self.attn = MultiHeadAttention(d, config.num_heads, dropout=config.dropout)
        self.norm2 = nn.LayerNorm(d, eps=config.layer_norm_eps)
        self.fc1 = nn.Linear(d, config.d_ff)
        self.fc2 = nn.Linear(config.d_ff, d)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if check_float_tensor("x", x, "ViTBlock").ndim != 3 or x.shape[-1] != self.attn.d_model:
            raise ValueError(f"ViTBlock: x must have shape (batch, seq, {self.attn.d_model}), got {tuple(x.shape)}")
        check_module_input("x", x, "ViTBlock", self)
        attended, _ = self.attn(self.norm1(x))
        x = x + self.dropout(attended)
        hidden = torch.nn.functional.gelu(self.fc1(self.norm2(x)))  # exact erf GELU, as ViT's "gelu"
        return x + self.dropout(self.fc2(hidden))


class ViT(nn.Module):
    """A Vision Transformer (Dosovitskiy et al., 2021), written from its equations.

    ``x`` ``(batch, C, H, W)`` -> patch embedding (a ``Conv2d`` with kernel = stride =
    ``patch_size``, i.e. a linear map of each flattened patch) ``(batch, N, d_model)`` -> prepend
    the learned class token -> add learned position embeddings ``(1, N + 1, d_model)`` ->
    ``num_layers`` pre-LN :class:`ViTBlock` s -> final LayerNorm.

    * ``features(x)``: all final token states ``(batch, N + 1, d_model)`` (token 0 is the class
      token); equal to ``transformers``' ``ViTModel(...).last_hidden_state``;
    * ``embed(x)``: the pooled vector ``(batch, d_model)`` (class token, or mean of patch tokens);
    * ``forward(x)``: ``(batch, num_classes)`` logits (the pooled vector if ``num_classes`` is None).
    """

    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        if not isinstance(config, ViTConfig):
            raise TypeError(f"ViT: config must be a ViTConfig, got {type(config).__name__}")
        self.config = config
        d, p = config.d_model, config.patch_size
        self.patch_embed = nn.Conv2d(config.in_channels, d, kernel_size=p, stride=p)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.pos_embed = nn.Parameter(torch.zeros(1, config.num_patches + 1, d))
        self.dropout = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(ViTBlock(config) for _ in range(config.num_layers))
        self.norm = nn.LayerNorm(d, eps=config.layer_norm_eps)
        self.head = nn.Linear(d, config.num_classes) if config.num_classes is not None else nn.Identity()
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """``(batch, C, H, W) -> (batch, N + 1, d_model)``: the final (normalised) token states."""
        cfg = self.config
        x = _check_images(x, cfg.in_channels, "ViT", self)
        if x.shape[2] != cfg.image_size or x.shape[3] != cfg.image_size:
            raise ValueError(f"ViT: images must be {cfg.image_size}x{cfg.image_size}, got "
                             f"{x.shape[2]}x{x.shape[3]}")
        tokens = self.patch_embed(x).flatten(2).transpose(1, 2)  # (B, N, d): patches in row-major order
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        h = self.dropout(torch.cat([cls, tokens], dim=1) + self.pos_embed)
        for block in self.blocks:
            h = block(h)
        return self.norm(h)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """``(batch, C, H, W) -> (batch, d_model)``: the class token's state (or mean of patch tokens)."""
        h = self.features(x)
        return h[:, 0] if self.config.pool == "cls" else h[:, 1:].mean(dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(batch, C, H, W) -> (batch, num_classes)`` (or ``(batch, d_model)`` without a head)."""
        return self.head(self.embed(x))


@torch.no_grad()
def load_hf_vit_weights(ours: ViT, hf_model: nn.Module) -> ViT:
    """Copy the weights of a ``transformers`` ``ViTModel`` or ``ViTForImageClassification`` into ``ours``.

    The sizes must agree (``hidden_size``, ``num_attention_heads``, ``num_hidden_layers``,
    ``intermediate_size``, ``image_size``, ``patch_size``, ``num_channels``, ``layer_norm_eps``),
    with ``hidden_act="gelu"`` and ``qkv_bias=True``. A classifier's ``classifier`` layer is
    copied into ``ours.head`` (then ``num_labels`` must equal ``num_classes``); a ``ViTModel``'s
    optional pooler is not part of :class:`ViT` and is ignored. Returns ``ours``.
    """
    fn = "load_hf_vit_weights"
    if not isinstance(ours, ViT):
        raise TypeError(f"{fn}: ours must be a mmbook ViT, got {type(ours).__name__}")
    name = type(hf_model).__name__
    if name == "ViTForImageClassification":
        base, classifier = hf_model.vit, hf_model.classifier
    elif name == "ViTModel":
        base, classifier = hf_model, None
    else:
        raise TypeError(f"{fn}: hf_model must be a transformers ViTModel or ViTForImageClassification, got {name}")
    hf, cfg = hf_model.config, ours.config
    pairs = {
        "hidden_size / d_model": (hf.hidden_size, cfg.d_model),
        "num_attention_heads / num_heads": (hf.num_attention_heads, cfg.num_heads),
        "num_hidden_layers / num_layers": (hf.num_hidden_layers, cfg.num_layers),
        "intermediate_size / d_ff": (hf.intermediate_size, cfg.d_ff),
        "image_size": (hf.image_size, cfg.image_size),
        "patch_size": (hf.patch_size, cfg.patch_size),
        "num_channels / in_channels": (hf.num_channels, cfg.in_channels),
        "layer_norm_eps": (hf.layer_norm_eps, cfg.layer_norm_eps),
        "hidden_act": (hf.hidden_act, "gelu"),
        "qkv_bias": (hf.qkv_bias, True),
    }
    if classifier is not None:
        pairs["num_labels / num_classes"] = (hf.num_labels, cfg.num_classes)
    bad = {k: v for k, v in pairs.items() if v[0] != v[1]}
    if bad:
        details = ", ".join(f"{k}: theirs {a!r}, ours {b!r}" for k, (a, b) in bad.items())
        raise ValueError(f"{fn}: configurations differ: {details}")
    emb = base.embeddings
    ours.patch_embed.weight.copy_(emb.patch_embeddings.projection.weight)
    ours.patch_embed.bias.copy_(emb.patch_embeddings.projection.bias)
    ours.cls_token.copy_(emb.cls_token)
    ours.pos_embed.copy_(emb.position_embeddings)
    for block, layer in zip(ours.blocks, base.layers, strict=True):
        block.norm1.load_state_dict(layer.layernorm_before.state_dict())
        block.norm2.load_state_dict(layer.layernorm_after.state_dict())
        att = layer.attention
        for mine, theirs in ((block.attn.q_proj, att.q_proj), (block.attn.k_proj, att.k_proj),
                             (block.attn.v_proj, att.v_proj), (block.attn.out_proj, att.o_proj)):
            mine.load_state_dict(theirs.state_dict())
        block.fc1.load_state_dict(layer.mlp.fc1.state_dict())
        block.fc2.load_state_dict(layer.mlp.fc2.state_dict())
    ours.norm.load_state_dict(base.layernorm.state_dict())
    if classifier is not None:
        ours.head.load_state_dict(classifier.state_dict())
    return ours
