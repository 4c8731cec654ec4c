"""Cross-modal attention: text that looks at images.

Building blocks of chapter 12, all batch-first:

* :class:`PatchEncoder` — a two-layer convolutional stem that turns a ``(batch, 3, 32, 32)`` image
  into a grid of patch features plus fixed 2-D sine-cosine position embeddings
  (:func:`sincos_position_embedding_2d`).
* :class:`TextTransformer` — a small Transformer over word ids (bidirectional or causal), with
  optional cross-attention blocks interleaved before its self-attention layers.
* :class:`CrossAttentionBlock` — queries from text, keys and values from image patches.
* :class:`FiLM` — feature-wise linear modulation, ``gamma(c) * x + beta(c)``.
* :class:`GatedCrossAttentionBlock` — Flamingo's ``tanh``-gated cross-attention, an exact identity
  at initialisation.
* :class:`PerceiverResampler` — a fixed number of learned latents that cross-attend to any number
  of patches.
* :class:`VQAModel` — visual question answering baselines and fusions (question only, image only,
  concatenation, FiLM, cross-attention, gated cross-attention, a Perceiver resampler) with one interface, and
  :func:`train_vqa` / :func:`fit_vqa` (epochs chosen on a validation split) / :func:`predict_vqa`.

Attention itself is :class:`mmbook.attention.MultiHeadAttention` (boolean masks, ``True`` = may attend).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from mmbook.attention import MultiHeadAttention, padding_mask
from mmbook.checks import (
    check_bool,
    check_device,
    check_float_tensor,
    check_ids,
    check_instance,
    check_module_input,
    check_number,
    positive_int,
)
from mmbook.checks import check_token_batch as _check_ids
from mmbook.core import torch_generator
from mmbook.gpt import sinusoidal_positional_encoding

__all__ = [
    "FUSIONS",
    "CrossAttentionBlock",
    "FeedForward",
    "FiLM",
    "GatedCrossAttentionBlock",
    "PatchEncoder",
    "PerceiverResampler",
    "SelfAttentionBlock",
    "TextTransformer",
    "VQAModel",
    "fit_vqa",
    "masked_mean",
    "predict_vqa",
    "sincos_position_embedding_2d",
    "train_vqa",
]

FUSIONS = ("question", "image", "concat", "film", "cross", "gated", "perceiver")


# ----------------------------------------------------------------------------- argument checks
_positive_int = positive_int  # the name the shown classes (and other modules importing it) use


def _check_tokens(name: str, x: object, fn: str, d_model: int, module: nn.Module | None = None) -> torch.Tensor:
    check_float_tensor(name, x, fn)
    if x.ndim != 3 or x.shape[-1] != d_model:
        raise ValueError(f"{fn}: {name} must have shape (batch, seq, {d_model}), got {tuple(x.shape)}")
    if module is not None:
        check_module_input(name, x, fn, module)
    return x


# ----------------------------------------------------------------------------- small helpers
def sincos_position_embedding_2d(grid: int, d_model: int) -> torch.Tensor:
    """Fixed 2-D sine-cosine position embeddings for a ``grid`` x ``grid`` patch grid.

    The first ``d_model / 2`` dimensions encode the row, the second half the column, each with
    the 1-D Transformer encoding ``PE(p, 2i) = sin(p / 10000^(2i/h))``, ``PE(p, 2i+1) =
    cos(p / 10000^(2i/h))`` where ``h = d_model / 2``, i.e.
    :func:`mmbook.gpt.sinusoidal_positional_encoding` ``(grid, h)`` for the row and for the column.
    Returns ``(grid * grid, d_model)`` float32, patches in row-major order. ``d_model`` must be divisible by 4.
    """
    fn = "sincos_position_embedding_2d"
    grid, d_model = _positive_int("grid", grid, fn), _positive_int("d_model", d_model, fn)
    if d_model % 4:
        raise ValueError(f"{fn}: d_model must be divisible by 4 (sin and cos for rows and columns), got {d_model}")
    half = d_model // 2
    one_d = sinusoidal_positional_encoding(grid, half)  # (grid, half): the 1-D Transformer encoding
    rows = one_d[:, None, :].expand(grid, grid, half)
    cols = one_d[None, :, :].expand(grid, grid, half)
    return torch.cat([rows, cols], dim=-1).reshape(grid * grid, d_model)


def masked_mean(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean over the sequence axis of ``x`` ``(batch, T, d)``, counting only positions where the
    boolean ``mask`` ``(batch, T)`` is ``True`` (``None``: all). Returns ``(batch, d)``."""
    if not isinstance(x, torch.Tensor) or x.ndim != 3:
        raise ValueError(f"masked_mean: x must be a (batch, T, d) tensor, got {getattr(x, 'shape', type(x))}")
    check_float_tensor("x", x, "masked_mean")
    if mask is None:
        return x.mean(dim=1)
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or mask.shape != x.shape[:2]:
        raise ValueError(
            f"masked_mean: mask must be a bool tensor of shape {tuple(x.shape[:2])}, got "
            f"{getattr(mask, 'dtype', type(mask))} {tuple(getattr(mask, 'shape', ()))}"
        )
    weights = mask.to(x.dtype).unsqueeze(-1)
    return (x * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1.0)


class FeedForward(nn.Module):
    """Position-wise ``Linear -> GELU -> Linear`` with hidden size ``mult * d_model``; ``(..., d_model)``."""

    def __init__(self, d_model: int, mult: int = 2) -> None:
        super().__init__()
        d_model, mult = _positive_int("d_model", d_model, "FeedForward"), _positive_int("mult", mult, "FeedForward")
        self.net = nn.Sequential(nn.Linear(d_model, mult * d_model), nn.GELU(), nn.Linear(mult * d_model, d_model))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        d_model = self.net[0].in_features
        if check_float_tensor("x", x, "FeedForward").ndim < 1 or x.shape[-1] != d_model:
            raise ValueError(f"FeedForward: x must have shape (..., {d_model}), got {tuple(x.shape)}")
        check_module_input("x", x, "FeedForward", self)
        return self.net(x)


class SelfAttentionBlock(nn.Module):
    """Pre-norm Transformer block: ``x + MHA(LN(x))`` then ``x + FF(LN(x))``; ``(batch, T, d_model)``.

    ``mask`` is boolean, ``True`` = may attend, shaped as :class:`MultiHeadAttention` accepts.
    """

    def __init__(self, d_model: int, num_heads: int, ff_mult: int = 2) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.attn = MultiHeadAttention(d_model, num_heads)
        self.ff = FeedForward(d_model, ff_mult)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        _check_tokens("x", x, "SelfAttentionBlock", self.attn.d_model, self)
        x = x + self.attn(self.norm1(x), mask=mask)[0]
        return x + self.ff(self.norm2(x))


# ----------------------------------------------------------------------------- image and text encoders
class PatchEncoder(nn.Module):
    """A small patch encoder for ``(batch, 3, image_size, image_size)`` images in [0, 1].

    The image is padded (edge pixels repeated) to ``grid * patch`` pixels with ``patch =
    ceil(image_size / grid)`` and cut into ``grid`` x ``grid`` non-overlapping patches; a two-layer
    patch embedding ``Conv(3 -> hidden, kernel = stride = patch) -> GELU -> Conv1x1(hidden ->
    d_model)`` (a per-patch MLP, as a ViT's patch embedding with one more layer) maps each patch to
    a feature vector, fixed 2-D sine-cosine position embeddings are added (unless
    ``position=False``), and one more per-patch layer ``x + ReLU(LN(Conv1x1(x)))`` follows. Each
    patch's features depend on its own pixels and position only.

    Pixels are first standardised with ``pixel_mean`` and ``pixel_std`` (defaults: the statistics
    of :func:`mmbook.data.shapes_scenes` images, mostly light background); without this the
    near-constant background makes the first layer learn very slowly.

    :meth:`feature_map` returns ``(batch, d_model, grid, grid)`` and accepts FiLM parameters
    ``gamma``, ``beta`` ``(batch, d_model)`` that modulate that last layer before its ReLU;
    :meth:`forward` returns patch tokens ``(batch, grid * grid, d_model)`` in row-major order.
    """

    def __init__(self, d_model: int = 64, grid: int = 3, image_size: int = 32, hidden: int = 64,
                 position: bool = True, pixel_mean: float = 0.9, pixel_std: float = 0.13) -> None:
        super().__init__()
        fn = "PatchEncoder"
        d_model, grid = _positive_int("d_model", d_model, fn), _positive_int("grid", grid, fn)
        image_size, hidden = _positive_int("image_size", image_size, fn), _positive_int("hidden", hidden, fn)
        if grid > image_size:
            raise ValueError(f"{fn}: grid ({grid}) must not exceed image_size ({image_size})")
        check_number("pixel_mean", pixel_mean, fn)
        check_number("pixel_std", pixel_std, fn, 0.0, low_open=True)
        check_bool("position", position, fn)
        self.d_model, self.grid, self.image_size = d_model, grid, image_size
        self.pixel_mean, self.pixel_std = float(pixel_mean), float(pixel_std)
        self.patch = -(-image_size // grid)  # ceil
        pad = grid * self.patch - image_size
        self.padding = (pad // 2, pad - pad // 2, pad // 2, pad - pad // 2)  # left, right, top, bottom
        self.embed = nn.Sequential(nn.Conv2d(3, hidden, kernel_size=self.patch, stride=self.patch), nn.GELU(),
                                   nn.Conv2d(hidden, d_model, kernel_size=1))
        self.mix = nn.Conv2d(d_model, d_model, kernel_size=1)
        self.norm = nn.LayerNorm(d_model)  # over the channels of each patch: patches stay independent
        pos = sincos_position_embedding_2d(grid, d_model) if position else torch.zeros(grid * grid, d_model)
        self.register_buffer("pos", pos.T.reshape(1, d_model, grid, grid).clone(), persistent=False)

    def embed_patches(self, images: torch.Tensor) -> torch.Tensor:
        """Standardise, pad, embed each patch and add positions: ``(batch, 3, H, W)`` -> ``(batch, d_model,
        grid, grid)``."""
        fn = "PatchEncoder"
        if not isinstance(images, torch.Tensor) or not torch.is_floating_point(images):
            raise TypeError(f"{fn}: images must be a floating-point tensor, got {getattr(images, 'dtype', images)}")
        if images.ndim != 4 or images.shape[1:] != (3, self.image_size, self.image_size):
            raise ValueError(
                f"{fn}: images must have shape (batch, 3, {self.image_size}, {self.image_size}), "
                f"got {tuple(images.shape)}"
            )
        check_module_input("images", images, fn, self)
        images = (images - self.pixel_mean) / self.pixel_std
        if any(self.padding):
            images = nn.functional.pad(images, self.padding, mode="replicate")
        return self.embed(images) + self.pos

    def modulate(
        self, x: torch.Tensor, gamma: torch.Tensor | None = None, beta: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The last layer, ``x + ReLU(gamma * LN(Conv1x1(x)) + beta)`` on ``(batch, d_model, grid, grid)``;
        without ``gamma`` and ``beta`` it is ``x + ReLU(LN(Conv1x1(x)))``."""
        h = self.norm(self.mix(x).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        if gamma is not None or beta is not None:
            expected = (x.shape[0], self.d_model)
            for name, t in (("gamma", gamma), ("beta", beta)):
                if not isinstance(t, torch.Tensor) or tuple(t.shape) != expected:
                    raise ValueError(f"PatchEncoder: {name} must have shape {expected}, got {getattr(t, 'shape', t)}")
            h = gamma[:, :, None, None] * h + beta[:, :, None, None]
        return x + torch.relu(h)

    def feature_map(
        self, images: torch.Tensor, gamma: torch.Tensor | None = None, beta: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``(batch, 3, H, W)`` -> ``(batch, d_model, grid, grid)``, optionally FiLM-modulated."""
        return self.modulate(self.embed_patches(images), gamma, beta)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Patch tokens ``(batch, grid * grid, d_model)``."""
        return self.feature_map(images).flatten(2).transpose(1, 2)


class TextTransformer(nn.Module):
    """A small Transformer over word ids: embeddings + learned positions, ``num_layers``
    :class:`SelfAttentionBlock` s and a final LayerNorm.

    ``forward(ids, lengths)`` maps ids ``(batch, T)`` (and optional ``lengths`` ``(batch,)``;
    padding keys are masked) to tokens ``(batch, T, d_model)``. With ``causal=True`` position
    ``t`` sees only positions ``<= t`` (a language model). ``cross_blocks`` (one module per
    layer, each called as ``block(x, visual) -> (x, weights)``) are applied *before* each
    self-attention layer, the way Flamingo interleaves its gated cross-attention layers with a
    frozen language model; ``visual`` is ``(batch, S, d_model)``.
    """

    def __init__(self, vocab_size: int, d_model: int = 64, num_heads: int = 4, num_layers: int = 1,
                 max_len: int = 32, causal: bool = False) -> None:
        super().__init__()
        fn = "TextTransformer"
        vocab_size, d_model = _positive_int("vocab_size", vocab_size, fn), _positive_int("d_model", d_model, fn)
        max_len = _positive_int("max_len", max_len, fn)
        if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < 0:
            raise ValueError(f"{fn}: num_layers must be a non-negative int, got {num_layers!r}")
        check_bool("causal", causal, fn)
        self.d_model, self.max_len, self.causal = d_model, max_len, bool(causal)
        self.embed = nn.Embedding(vocab_size, d_model)
        self.pos = nn.Parameter(torch.randn(max_len, d_model) * 0.02)
        self.blocks = nn.ModuleList(SelfAttentionBlock(d_model, num_heads) for _ in range(num_layers))
        self.norm = nn.LayerNorm(d_model)

    def forward(
        self,
        ids: torch.Tensor,
        lengths: torch.Tensor | None = None,
        visual: torch.Tensor | None = None,
        cross_blocks: Sequence[nn.Module] | None = None,
    ) -> torch.Tensor:
        fn = "TextTransformer"
        _check_ids(ids, lengths, fn, self.embed.num_embeddings)
        batch, length = ids.shape
        if length > self.max_len:
            raise ValueError(f"{fn}: sequence length {length} exceeds max_len={self.max_len}")
        if cross_blocks is not None:
            if len(cross_blocks) != len(self.blocks):
                raise ValueError(f"{fn}: need one cross block per layer ({len(self.blocks)}), got {len(cross_blocks)}")
            _check_tokens("visual", visual, fn, self.d_model)
        mask = None
        if lengths is not None:
            mask = padding_mask(lengths.to(ids.device), length)  # (batch, 1, T)
        if self.causal:
            causal = torch.ones(length, length, dtype=torch.bool, device=ids.device).tril()
            mask = causal[None] if mask is None else mask & causal[None]
        x = self.embed(ids) + self.pos[:length]
        for i, block in enumerate(self.blocks):
            if cross_blocks is not None:
                x = cross_blocks[i](x, visual)[0]
            x = block(x, mask)
        return self.norm(x)


# ----------------------------------------------------------------------------- cross-modal blocks
class CrossAttentionBlock(nn.Module):
    """Text queries attend to image keys and values (pre-norm, residual):

    ``x <- x + MHA(LN(x), LN(v), LN(v))``, then ``x <- x + FF(LN(x))``.

    ``forward(x, visual)``: ``x`` ``(batch, T, d_model)`` text tokens, ``visual`` ``(batch, S,
    d_model)`` patch tokens. Returns ``(x, weights)``, weights ``(batch, num_heads, T, S)``.
    """

    def __init__(self, d_model: int, num_heads: int, ff_mult: int = 2) -> None:
        super().__init__()
        self.d_model = _positive_int("d_model", d_model, "CrossAttentionBlock")
        self.norm_q, self.norm_kv, self.norm_ff = nn.LayerNorm(d_model), nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.attn = MultiHeadAttention(d_model, num_heads)
        self.ff = FeedForward(d_model, ff_mult)

    def forward(self, x: torch.Tensor, visual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        fn = "CrossAttentionBlock"
        _check_tokens("x", x, fn, self.d_model, self)
        _check_tokens("visual", visual, fn, self.d_model, self)
        kv = self.norm_kv(visual)
        attended, weights = self.attn(self.norm_q(x), kv, kv)
        x = x + attended
        return x + self.ff(self.norm_ff(x)), weights


class GatedCrossAttentionBlock(CrossAttentionBlock):
    """Flamingo's gated cross-attention block:

    ``x <- x + tanh(alpha_attn) * MHA(LN(x), LN(v), LN(v))``, then
    ``x <- x + tanh(alpha_ff) * FF(LN(x))``,

    with the scalar gates ``alpha_attn`` and ``alpha_ff`` initialised to 0, so that a freshly
    inserted block leaves the language model's computation exactly unchanged. Shapes as
    :class:`CrossAttentionBlock`.
    """

    def __init__(self, d_model: int, num_heads: int, ff_mult: int = 2) -> None:
        super().__init__(d_model, num_heads, ff_mult)
        self.alpha_attn = nn.Parameter(torch.zeros(()))
        self.alpha_ff = nn.Parameter(torch.zeros(()))

    def forward(self, x: torch.Tensor, visual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        fn = "GatedCrossAttentionBlock"
        _check_tokens("x", x, fn, self.d_model, self)
        _check_tokens("visual", visual, fn, self.d_model, self)
        kv = self.norm_kv(visual)
        attended, weights = self.attn(self.norm_q(x), kv, kv)
        x = x + torch.tanh(self.alpha_attn) * attended
        return x + torch.tanh(self.alpha_ff) * self.ff(self.norm_ff(x)), weights


class FiLM(nn.Module):
    """Feature-wise linear modulation: ``FiLM(x | c) = gamma(c) * x + beta(c)`` per channel.

    A linear layer maps the condition ``c`` ``(batch, d_cond)`` to ``(gamma, beta)``, each
    ``(batch, num_channels)``; ``gamma = 1 + delta`` so that a zero-initialised layer is the
    identity. ``forward(x, c)`` modulates ``x`` ``(batch, num_channels, ...)`` (feature maps or
    tokens with channels second) and :meth:`params` returns ``(gamma, beta)``.
    """

    def __init__(self, d_cond: int, num_channels: int) -> None:
        super().__init__()
        self.d_cond = _positive_int("d_cond", d_cond, "FiLM")
        self.num_channels = _positive_int("num_channels", num_channels, "FiLM")
        self.proj = nn.Linear(d_cond, 2 * num_channels)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def params(self, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(gamma, beta)``, each ``(batch, num_channels)``."""
        if not isinstance(c, torch.Tensor) or c.ndim != 2 or c.shape[1] != self.d_cond:
            raise ValueError(f"FiLM: c must have shape (batch, {self.d_cond}), got {getattr(c, 'shape', c)}")
        check_float_tensor("c", c, "FiLM")
        check_module_input("c", c, "FiLM", self)
        delta, beta = self.proj(c).chunk(2, dim=-1)
        return 1.0 + delta, beta

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or x.ndim < 2 or x.shape[1] != self.num_channels:
            raise ValueError(
                f"FiLM: x must have shape (batch, {self.num_channels}, ...), got {getattr(x, 'shape', x)}"
            )
        check_float_tensor("x", x, "FiLM")
        gamma, beta = self.params(c)
        if x.shape[0] != gamma.shape[0]:
            raise ValueError(f"FiLM: x and c must share the batch size, got {x.shape[0]} and {c.shape[0]}")
        extra = (1,) * (x.ndim - 2)
        return gamma.view(*gamma.shape, *extra) * x + beta.view(*beta.shape, *extra)


class PerceiverResampler(nn.Module):
    """A fixed number of learned latents that cross-attend to a variable number of input tokens.

    Each of ``depth`` layers does ``z <- z + MHA(LN(z), [LN(x); LN(z)])`` and ``z <- z + FF(LN(z))``,
    where ``[x; z]`` concatenates the inputs and the latents along the sequence axis (as in
    Flamingo). ``forward(x, mask)``: ``x`` ``(batch, S, d_model)`` for any ``S``, optional boolean
    ``mask`` ``(batch, S)`` (``True`` = a real token). Returns ``(batch, num_latents, d_model)``.
    Without position information in ``x``, the output does not depend on the order of the inputs.
    """

    def __init__(self, d_model: int, num_latents: int = 8, num_heads: int = 4, depth: int = 1) -> None:
        super().__init__()
        fn = "PerceiverResampler"
        self.d_model = _positive_int("d_model", d_model, fn)
        self.num_latents = _positive_int("num_latents", num_latents, fn)
        depth = _positive_int("depth", depth, fn)
        self.latents = nn.Parameter(torch.randn(num_latents, d_model) * 0.02)
        self.layers = nn.ModuleList(
            nn.ModuleDict({"norm_x": nn.LayerNorm(d_model), "norm_z": nn.LayerNorm(d_model),
                           "attn": MultiHeadAttention(d_model, num_heads), "norm_ff": nn.LayerNorm(d_model),
                           "ff": FeedForward(d_model)})
            for _ in range(depth)
        )
        self.norm = nn.LayerNorm(d_model)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        fn = "PerceiverResampler"
        _check_tokens("x", x, fn, self.d_model, self)
        batch, length, _ = x.shape
        attend = None
        if mask is not None:
            if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or mask.shape != (batch, length):
                raise ValueError(
                    f"{fn}: mask must be a bool tensor of shape {(batch, length)}, got "
                    f"{getattr(mask, 'dtype', type(mask))} {tuple(getattr(mask, 'shape', ()))}"
                )
            latent_ok = torch.ones(batch, self.num_latents, dtype=torch.bool, device=x.device)
            attend = torch.cat([mask, latent_ok], dim=1)[:, None, :]  # (batch, 1, S + num_latents)
        z = self.latents.expand(batch, -1, -1)
        for layer in self.layers:
            zn = layer["norm_z"](z)
            kv = torch.cat([layer["norm_x"](x), zn], dim=1)
            z = z + layer["attn"](zn, kv, kv, mask=attend)[0]
            z = z + layer["ff"](layer["norm_ff"](z))
        return self.norm(z)


# ----------------------------------------------------------------------------- visual question answering
class VQAModel(nn.Module):
    """Answer a question about an image by classification over ``num_answers`` answers.

    ``fusion`` chooses how the modalities meet (all are built with the same text and image encoders for the
    same ``d_model``; ``text_layers`` and ``head_hidden`` set the rest of the size):

    * ``"question"`` — the question alone (the language prior): ``MLP(q)``;
    * ``"image"`` — the image alone: ``MLP(mean of patches)``;
    * ``"concat"`` — late fusion: ``MLP([q; mean of patches])``;
    * ``"film"`` — the question's ``(gamma, beta)`` modulate the image's feature maps,
      then ``MLP([q; mean of modulated patches])``;
    * ``"cross"`` — the question tokens cross-attend to the patches (``num_cross`` blocks,
      each followed by a self-attention block over the question), then ``MLP(mean of tokens)``;
    * ``"gated"`` — as ``"cross"`` with Flamingo's :class:`GatedCrossAttentionBlock` (``tanh`` gates at 0:
      the model starts as the question-only model);
    * ``"perceiver"`` — a :class:`PerceiverResampler` turns the patches into ``num_latents`` tokens, which
      the question tokens cross-attend to as in ``"cross"``.

    ``head_hidden`` is the width of the MLP head's hidden layer (default ``2 * d_model``): with
    ``text_layers`` it lets a late-fusion model be given the same parameter count as an attention model.

    ``q`` is the masked mean of the :class:`TextTransformer` tokens. ``forward(images, ids,
    lengths, image_index=None)``: ids ``(batch, T)``, lengths ``(batch,)``, and images ``(batch, 3,
    32, 32)`` — or, with ``image_index`` ``(batch,)``, ``(num_images, 3, 32, 32)`` with question ``i``
    about image ``image_index[i]`` (each image is then encoded once however many questions ask about
    it). Returns logits ``(batch, num_answers)``. After a forward pass of a ``"cross"`` or ``"gated"``
    model, ``last_attention`` holds the last block's weights ``(batch, num_heads, T, grid * grid)``
    (``(batch, num_heads, T, num_latents)`` for ``"perceiver"``).
    """

    def __init__(self, fusion: str, vocab_size: int, num_answers: int, d_model: int = 64, num_heads: int = 4,
                 grid: int = 3, num_cross: int = 1, text_layers: int = 1, head_hidden: int | None = None,
                 num_latents: int = 4) -> None:
        super().__init__()
        fn = "VQAModel"
        if fusion not in FUSIONS:
            raise ValueError(f"{fn}: fusion must be one of {FUSIONS}, got {fusion!r}")
        num_answers = _positive_int("num_answers", num_answers, fn)
        num_cross = _positive_int("num_cross", num_cross, fn)
        d_model = _positive_int("d_model", d_model, fn)
        head_hidden = 2 * d_model if head_hidden is None else _positive_int("head_hidden", head_hidden, fn)
        num_latents = _positive_int("num_latents", num_latents, fn)
        self.fusion = fusion
        self.text = TextTransformer(vocab_size, d_model, num_heads, num_layers=text_layers)
        self.image = PatchEncoder(d_model, grid)
        if fusion == "film":
            self.film = FiLM(d_model, d_model)
        if fusion in ("cross", "gated", "perceiver"):
            block = GatedCrossAttentionBlock if fusion == "gated" else CrossAttentionBlock
            self.cross = nn.ModuleList(block(d_model, num_heads) for _ in range(num_cross))
            self.mix = nn.ModuleList(SelfAttentionBlock(d_model, num_heads) for _ in range(num_cross))
        width = 2 * d_model if fusion in ("concat", "film") else d_model
        self.head = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, head_hidden), nn.GELU(),
                                  nn.Linear(head_hidden, num_answers))
        if fusion == "perceiver":  # built last: the other fusions draw the same initial weights as before
            self.resampler = PerceiverResampler(d_model, num_latents, num_heads)
        self.last_attention: torch.Tensor | None = None

    def forward(self, images: torch.Tensor, ids: torch.Tensor, lengths: torch.Tensor,
                image_index: torch.Tensor | None = None) -> torch.Tensor:
        fn = "VQAModel"
        _check_ids(ids, lengths, fn)
        if lengths is None:
            raise ValueError(f"{fn}: lengths is required")
        if not isinstance(images, torch.Tensor) or images.ndim != 4:
            raise ValueError(f"{fn}: images must be (num_images, 3, H, W), got {getattr(images, 'shape', images)}")
        if image_index is None:
            if images.shape[0] != ids.shape[0]:
                raise ValueError(
                    f"{fn}: without image_index, images and ids must share the batch size, got "
                    f"{tuple(images.shape)} and {tuple(ids.shape)}"
                )
            image_index = torch.arange(ids.shape[0], device=ids.device)
        elif (not isinstance(image_index, torch.Tensor) or image_index.shape != ids.shape[:1]
              or image_index.dtype.is_floating_point):
            raise ValueError(f"{fn}: image_index must be an integer ({ids.shape[0]},) tensor, got {image_index!r}")
        check_ids("image_index", image_index, fn, images.shape[0])  # -1 would silently mean the last image
        keep = padding_mask(lengths.to(ids.device), ids.shape[1])[:, 0]  # (batch, T)
        tokens = self.text(ids, lengths)
        q = masked_mean(tokens, keep)
        if self.fusion == "question":
            return self.head(q)
        if self.fusion == "film":  # the patch embedding once per image, the modulated layer per question
            gamma, beta = self.film.params(q)
            x = self.image.embed_patches(images)[image_index]
            patches = self.image.modulate(x, gamma, beta).flatten(2).mean(dim=2)
            return self.head(torch.cat([q, patches], dim=-1))
        patches = self.image(images)[image_index]  # (batch, grid * grid, d_model)
        if self.fusion == "image":
            return self.head(patches.mean(dim=1))
        if self.fusion == "concat":
            return self.head(torch.cat([q, patches.mean(dim=1)], dim=-1))
        if self.fusion == "perceiver":
            patches = self.resampler(patches)  # (batch, num_latents, d_model)
        mask = keep[:, None, :]
        for cross, mix in zip(self.cross, self.mix, strict=True):
            tokens, weights = cross(tokens, patches)
            tokens = mix(tokens, mask)
        self.last_attention = weights.detach()
        return self.head(masked_mean(tokens, keep))


def _check_vqa_data(fn: str, images: object, scene_index: object, ids: object, lengths: object,
                    answers: object | None) -> None:
    if not isinstance(images, torch.Tensor) or images.ndim != 4:
        raise ValueError(f"{fn}: images must be (num_scenes, 3, H, W), got {getattr(images, 'shape', images)}")
    check_float_tensor("images", images, fn)
    _check_ids(ids, lengths, fn)
    n = ids.shape[0]
    for name, t in (("scene_index", scene_index), ("answers", answers)):
        if name == "answers" and t is None:
            continue
        if not isinstance(t, torch.Tensor) or t.shape != (n,) or t.dtype.is_floating_point:
            got = getattr(t, "shape", t)
            raise ValueError(f"{fn}: {name} must be an integer ({n},) tensor, one entry per question, got {got}")
    if n and (scene_index.min() < 0 or scene_index.max() >= images.shape[0]):
        raise ValueError(f"{fn}: scene_index must lie in [0, {images.shape[0]}), the number of images")


def _scene_batches(scene_index: torch.Tensor, num_scenes: int, scenes_per_batch: int,
                   generator: torch.Generator | None) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Batches of whole scenes: ``(scenes, rows, image_index)`` with the questions ``rows`` about
    ``scenes`` and, per row, the position of its scene in ``scenes``."""
    order = torch.randperm(num_scenes, generator=generator) if generator is not None else torch.arange(num_scenes)
    batches = []
    for scenes in order.split(scenes_per_batch):
        scenes = scenes.sort().values
        rows = torch.nonzero(torch.isin(scene_index, scenes)).squeeze(1)
        batches.append((scenes, rows, torch.searchsorted(scenes, scene_index[rows])))
    return batches


def _vqa_epochs(
    fn: str, model: VQAModel, images: torch.Tensor, scene_index: torch.Tensor, ids: torch.Tensor,
    lengths: torch.Tensor, answers: torch.Tensor, epochs: int, scenes_per_batch: int, lr: float, seed: int,
    device: torch.device | str | None,
) -> Iterator[float]:
    """Check the arguments, then train epoch by epoch, yielding each epoch's mean training loss."""
    epochs = _positive_int("epochs", epochs, fn)
    scenes_per_batch = _positive_int("scenes_per_batch", scenes_per_batch, fn)
    if not isinstance(model, VQAModel):
        raise TypeError(f"{fn}: model must be a VQAModel, got {type(model).__name__}")
    _check_vqa_data(fn, images, scene_index, ids, lengths, answers)
    check_ids("answers", answers, fn, model.head[-1].out_features)  # not cross_entropy's "Target 5 is out of bounds"
    check_number("lr", lr, fn, 0.0, low_open=True)
    device = check_device("device", device, fn) if device is not None else next(model.parameters()).device
    return _vqa_epoch_losses(model, images, scene_index, ids, lengths, answers, epochs, scenes_per_batch, lr, seed,
                             device)


def _vqa_epoch_losses(model: VQAModel, images: torch.Tensor, scene_index: torch.Tensor, ids: torch.Tensor,
                      lengths: torch.Tensor, answers: torch.Tensor, epochs: int, scenes_per_batch: int, lr: float,
                      seed: int, device: torch.device) -> Iterator[float]:
    model.to(device).train()
    num_scenes = images.shape[0]
    images, ids, lengths, answers = images.to(device), ids.to(device), lengths.to(device), answers.to(device)
    # the fused implementation updates all parameters in one kernel: several times faster for small models
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01,
                                  fused=device.type in ("cpu", "cuda"))
    generator = torch_generator(seed)
    steps = epochs * math.ceil(num_scenes / scenes_per_batch)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.15)
    for _ in range(epochs):
        model.train()
        total, count = 0.0, 0
        for scenes, rows, image_index in _scene_batches(scene_index, num_scenes, scenes_per_batch, generator):
            scenes, rows, image_index = scenes.to(device), rows.to(device), image_index.to(device)
            logits = model(images[scenes], ids[rows], lengths[rows], image_index)
            loss = nn.functional.cross_entropy(logits, answers[rows])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            total += loss.item() * rows.numel()
            count += rows.numel()
        yield total / max(count, 1)


def train_vqa(
    model: VQAModel,
    images: torch.Tensor,
    scene_index: torch.Tensor,
    ids: torch.Tensor,
    lengths: torch.Tensor,
    answers: torch.Tensor,
    *,
    epochs: int = 10,
    scenes_per_batch: int = 64,
    lr: float = 3e-3,
    seed: int = 0,
    device: torch.device | str | None = None,
) -> list[float]:
    """Train a :class:`VQAModel` with AdamW and a one-cycle learning-rate schedule.

    ``images`` ``(num_scenes, 3, 32, 32)`` float in [0, 1]; question ``i`` is about scene
    ``scene_index[i]`` and has word ids ``ids[i]`` ``(T,)``, length ``lengths[i]`` and answer
    index ``answers[i]``. A batch is ``scenes_per_batch`` scenes with all their questions, so each
    image is encoded once per batch; the order is drawn by a generator seeded with ``seed``.
    Returns the mean training loss of each epoch (per question).
    """
    return list(_vqa_epochs("train_vqa", model, images, scene_index, ids, lengths, answers, epochs,
                            scenes_per_batch, lr, seed, device))


def fit_vqa(
    model: VQAModel,
    train: Sequence[torch.Tensor],
    validation: Sequence[torch.Tensor],
    *,
    epochs: int = 10,
    scenes_per_batch: int = 64,
    lr: float = 3e-3,
    seed: int = 0,
    device: torch.device | str | None = None,
) -> dict[str, object]:
    """Train as :func:`train_vqa` and keep the epoch with the best validation accuracy (early stopping).

    ``train`` and ``validation`` are each ``(images, scene_index, ids, lengths, answers)`` as
    :func:`train_vqa` takes them (two disjoint sets of scenes). After every epoch the model answers
    the validation questions; at the end the weights of the epoch with the highest validation accuracy
    (the earliest, on a tie) are restored. The test set plays no part in the choice. Returns a dict
    with ``"loss"`` (training loss per epoch), ``"validation"`` (validation accuracy per epoch) and
    ``"best_epoch"`` (1-based).
    """
    fn = "fit_vqa"
    check_instance("model", model, fn, VQAModel, "a VQAModel")
    for name, split in (("train", train), ("validation", validation)):
        if isinstance(split, torch.Tensor) or not isinstance(split, Sequence) or len(split) != 5:
            raise TypeError(f"{fn}: {name} must be a sequence (images, scene_index, ids, lengths, answers), "
                            f"got {type(split).__name__}" + (f" of length {len(split)}"
                                                             if isinstance(split, Sequence) else ""))
    v_images, v_scene_index, v_ids, v_lengths, v_answers = validation
    _check_vqa_data(fn, v_images, v_scene_index, v_ids, v_lengths, v_answers)
    if v_ids.shape[0] == 0:
        raise ValueError(f"{fn}: validation must hold at least one question")
    check_ids("validation answers", v_answers, fn, model.head[-1].out_features)
    losses, accuracies, best, best_state = [], [], -1.0, None
    for loss in _vqa_epochs(fn, model, *train, epochs, scenes_per_batch, lr, seed, device):
        losses.append(loss)
        predicted = predict_vqa(model, v_images, v_scene_index, v_ids, v_lengths)
        accuracies.append((predicted == v_answers.cpu()).double().mean().item())
        if accuracies[-1] > best:
            best = accuracies[-1]
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    model.load_state_dict(best_state)
    return {"loss": losses, "validation": accuracies, "best_epoch": accuracies.index(best) + 1}


@torch.no_grad()
def predict_vqa(
    model: VQAModel,
    images: torch.Tensor,
    scene_index: torch.Tensor,
    ids: torch.Tensor,
    lengths: torch.Tensor,
    scenes_per_batch: int = 256,
) -> torch.Tensor:
    """Predicted answer indices ``(num_questions,)`` (on the CPU), in evaluation mode."""
    fn = "predict_vqa"
    check_instance("model", model, fn, VQAModel, "a VQAModel")
    scenes_per_batch = _positive_int("scenes_per_batch", scenes_per_batch, fn)
    _check_vqa_data(fn, images, scene_index, ids, lengths, None)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = torch.zeros(ids.shape[0], dtype=torch.int64)
    for scenes, rows, image_index in _scene_batches(scene_index, images.shape[0], scenes_per_batch, None):
        logits = model(images[scenes].to(device), ids[rows].to(device), lengths[rows].to(device),
                       image_index.to(device))
        out[rows] = logits.argmax(dim=-1).cpu()
    model.train(was_training)
    return out
