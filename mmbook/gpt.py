"""A GPT (decoder-only Transformer) written from its equations, with a KV cache and sampling.

The pieces, each usable on its own:

* :func:`sinusoidal_positional_encoding` — the fixed encodings of *Attention Is All You Need*;
  learned position embeddings are an ``nn.Embedding`` inside :class:`GPT`.
* :class:`LayerNorm` — normalise each vector to mean 0 and variance 1, then scale and shift.
* :func:`gelu` — exact (``erf``) or GPT-2's tanh approximation.
* :class:`FeedForward`, :class:`CausalSelfAttention` and the pre-LN :class:`Block`.
* :class:`GPT` with :class:`GPTConfig`: forward pass with an optional KV cache, ``generate``
  (greedy, temperature, top-k, top-p) and ``from_hf_gpt2`` to load the weights of a
  ``transformers`` GPT-2.
* :func:`gpt_param_count` — the closed-form number of parameters.

With ``GPTConfig(kernels="mmbook")``, the default, the model runs the book's own code: attention
calls :func:`mmbook.attention.scaled_dot_product_attention` with
:func:`mmbook.attention.causal_mask` (so the attention equation lives in one place), and
:class:`LayerNorm` and :func:`gelu` compute their formulas term by term. ``kernels="torch"``
swaps in PyTorch's fused kernels — ``F.scaled_dot_product_attention`` (same boolean mask
convention), ``F.layer_norm`` and ``F.gelu`` — with the same parameters and the same results
to float32 round-off. It is about 30% faster to train on a CPU, more on a GPU, and does not
store the attention weights.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from mmbook.attention import causal_mask, scaled_dot_product_attention
from mmbook.checks import (
    check_bool,
    check_float_tensor,
    check_ids,
    check_instance,
    check_int,
    check_like,
    check_module_input,
    check_number,
    positive_int,
)

__all__ = [
    "GPT",
    "Block",
    "CausalSelfAttention",
    "FeedForward",
    "GPTConfig",
    "GPTOutput",
    "LayerNorm",
    "gelu",
    "gpt_param_count",
    "load_hf_gpt2_weights",
    "sample_next_token",
    "sinusoidal_positional_encoding",
    "top_k_filter",
    "top_p_filter",
]

KVCache = list[tuple[torch.Tensor, torch.Tensor]]
_POSITIONAL = ("learned", "sinusoidal")
_ACTIVATIONS = ("gelu_tanh", "gelu")
_KERNELS = ("mmbook", "torch")


def _check_config(config: object, fn: str) -> None:
    check_instance("config", config, fn, GPTConfig, "a GPTConfig")
    config.__post_init__()  # again: a field changed after construction (n_head=3 with d_model=8) is caught here


def _check_tokens(x: object, fn: str, module: nn.Module, d_model: int) -> None:
    """``x`` ``(batch, T, d_model)`` in the dtype and on the device of ``module``'s parameters."""
    check_float_tensor("x", x, fn)
    if x.ndim != 3 or x.shape[-1] != d_model:
        raise ValueError(f"{fn}: x must have shape (batch, T, {d_model}), got {tuple(x.shape)}")
    check_module_input("x", x, fn, module)


# ----------------------------------------------------------------------------- configuration


@dataclass
class GPTConfig:
    """Sizes and switches of a :class:`GPT`. The defaults are the book's small byte-level model.

    ``block_size`` is the context length (GPT-2's ``n_positions``); ``d_ff`` defaults to
    ``4 * d_model``. ``dropout`` is applied to the embeddings, the attention weights and both
    residual branches (GPT-2's ``embd_pdrop``, ``attn_pdrop``, ``resid_pdrop``). ``bias``
    switches the biases of every Linear and LayerNorm. ``positional`` is ``"learned"``
    (GPT-2) or ``"sinusoidal"`` (fixed, no parameters); ``activation`` is ``"gelu_tanh"``
    (GPT-2's ``gelu_new``) or ``"gelu"`` (exact, with ``erf``); ``tie_embeddings`` shares the
    token embedding with the output layer; ``kernels`` picks ``"mmbook"`` (the book's attention,
    LayerNorm and GELU code) or ``"torch"`` (PyTorch's fused kernels for the same three).
    """

    vocab_size: int = 256
    block_size: int = 128
    n_layer: int = 4
    n_head: int = 4
    d_model: int = 128
    d_ff: int | None = None
    dropout: float = 0.0
    bias: bool = True
    layer_norm_eps: float = 1e-5
    positional: str = "learned"
    activation: str = "gelu_tanh"
    tie_embeddings: bool = True
    kernels: str = "mmbook"

    def __post_init__(self) -> None:
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "d_model"):
            positive_int(name, getattr(self, name), "GPTConfig")
        if self.d_ff is not None:
            positive_int("d_ff", self.d_ff, "GPTConfig")
        if self.d_model % self.n_head:
            raise ValueError(f"GPTConfig: d_model={self.d_model} must be divisible by n_head={self.n_head}")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) or not 0 <= self.dropout < 1:
            raise ValueError(f"GPTConfig: dropout must be a float in [0, 1), got {self.dropout!r}")
        check_number("layer_norm_eps", self.layer_norm_eps, "GPTConfig", 0.0, low_open=True)
        if not isinstance(self.bias, bool) or not isinstance(self.tie_embeddings, bool):
            raise TypeError(
                f"GPTConfig: bias and tie_embeddings must be bools, got {self.bias!r} and {self.tie_embeddings!r}"
            )
        for name, allowed in (("positional", _POSITIONAL), ("activation", _ACTIVATIONS), ("kernels", _KERNELS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"GPTConfig: {name} must be one of {allowed}, got {getattr(self, name)!r}")
        if self.positional == "sinusoidal" and self.d_model % 2:
            raise ValueError(f"GPTConfig: sinusoidal positions need an even d_model, got {self.d_model}")

    @property
    def n_positions(self) -> int:
        """GPT-2's name for ``block_size``."""
        return self.block_size

    @property
    def d_head(self) -> int:
        return self.d_model // self.n_head

    @property
    def ff_dim(self) -> int:
        """The hidden width of the feed-forward network (``d_ff`` or ``4 * d_model``)."""
        return self.d_ff if self.d_ff is not None else 4 * self.d_model

    @classmethod
    def gpt2_small(cls, **overrides: Any) -> GPTConfig:
        """GPT-2 small (124M): vocabulary 50257, 1024 positions, 12 layers, 12 heads, d_model 768."""
        sizes = dict(vocab_size=50257, block_size=1024, n_layer=12, n_head=12, d_model=768)
        return cls(**{**sizes, **overrides})


def gpt_param_count(config: GPTConfig) -> int:
    """The number of parameters of ``GPT(config)``, from the closed-form count.

    With ``d = d_model``, ``f = ff_dim``, ``V = vocab_size``, ``T = block_size``, ``L = n_layer``
    and ``b = 1`` if ``bias`` else ``0``: each block has two LayerNorms (``(1 + b) d`` each),
    attention (``4 d^2 + 4 b d``) and the feed-forward network (``2 d f + b (f + d)``); the
    model adds token embeddings ``V d``, learned positions ``T d``, a final LayerNorm and,
    untied, an output matrix ``V d``.
    """
    _check_config(config, "gpt_param_count")
    d, f, v, t, n = config.d_model, config.ff_dim, config.vocab_size, config.block_size, config.n_layer
    b = int(config.bias)
    layer_norm = (1 + b) * d
    attention = 4 * d * d + 4 * b * d
    feed_forward = 2 * d * f + b * (f + d)
    per_block = 2 * layer_norm + attention + feed_forward
    embeddings = v * d + (t * d if config.positional == "learned" else 0)
    head = 0 if config.tie_embeddings else v * d
    return embeddings + n * per_block + layer_norm + head


# ----------------------------------------------------------------------------- building blocks


def sinusoidal_positional_encoding(n_positions: int, d_model: int, base: float = 10000.0) -> torch.Tensor:
    """The fixed positional encodings of Vaswani et al., shape ``(n_positions, d_model)``, float32.

    ``PE[p, 2i] = sin(p * w_i)`` and ``PE[p, 2i + 1] = cos(p * w_i)`` with frequencies
    ``w_i = base ** (-2i / d_model)``, ``i = 0 .. d_model/2 - 1``.
    """
    fn = "sinusoidal_positional_encoding"
    positive_int("n_positions", n_positions, fn)
    positive_int("d_model", d_model, fn)
    if d_model % 2:
        raise ValueError(f"{fn}: d_model must be even (sin/cos pairs), got {d_model}")
    check_number("base", base, fn, 1.0, low_open=True)
    positions = torch.arange(n_positions, dtype=torch.float64)[:, None]  # (P, 1)
    freqs = base ** (-torch.arange(0, d_model, 2, dtype=torch.float64) / d_model)  # (d/2,)
    angles = positions * freqs  # (P, d/2)
    pe = torch.empty(n_positions, d_model, dtype=torch.float64)
    pe[:, 0::2] = torch.sin(angles)
    pe[:, 1::2] = torch.cos(angles)
    return pe.float()


def gelu(x: torch.Tensor, approximate: str = "none") -> torch.Tensor:
    """Gaussian error linear unit, ``x * Phi(x)``, elementwise on a tensor of any shape.

    ``approximate="none"``: ``0.5 x (1 + erf(x / sqrt 2))``, exact.
    ``approximate="tanh"``: ``0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))``, the form
    GPT-2 was trained with (``gelu_new`` in ``transformers``).
    """
    if not isinstance(x, torch.Tensor) or not torch.is_floating_point(x):
        raise TypeError(f"gelu: x must be a floating-point torch.Tensor, got {getattr(x, 'dtype', type(x).__name__)}")
    if approximate == "none":
        return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))
    if approximate == "tanh":
        return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))))
    raise ValueError(f"gelu: approximate must be 'none' or 'tanh', got {approximate!r}")


class LayerNorm(nn.Module):
    """Layer normalisation over the last axis: ``(x - mean) / sqrt(var + eps) * weight + bias``.

    ``var`` is the biased (population) variance, as in the paper and ``torch.nn.LayerNorm``.
    Input and output ``(..., d_model)``. ``fused=True`` computes the same with ``F.layer_norm``.
    """

    def __init__(self, d_model: int, eps: float = 1e-5, bias: bool = True, fused: bool = False) -> None:
        super().__init__()
        positive_int("d_model", d_model, "LayerNorm")
        check_number("eps", eps, "LayerNorm", 0.0, low_open=True)
        check_bool("bias", bias, "LayerNorm")
        check_bool("fused", fused, "LayerNorm")
        self.d_model, self.eps, self.fused = d_model, float(eps), bool(fused)
        self.weight = nn.Parameter(torch.ones(d_model))
        self.bias = nn.Parameter(torch.zeros(d_model)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_float_tensor("x", x, "LayerNorm")
        if x.ndim < 1 or x.shape[-1] != self.d_model:
            raise ValueError(
                f"LayerNorm: x must end in d_model={self.d_model}, got {tuple(getattr(x, 'shape', ()))}"
            )
        if self.fused:
            return F.layer_norm(x, (self.d_model,), self.weight, self.bias, self.eps)
        mean = x.mean(dim=-1, keepdim=True)
        var = ((x - mean) ** 2).mean(dim=-1, keepdim=True)
        y = (x - mean) / torch.sqrt(var + self.eps) * self.weight
        return y + self.bias if self.bias is not None else y

    def extra_repr(self) -> str:
        return f"{self.d_model}, eps={self.eps}, bias={self.bias is not None}"


class FeedForward(nn.Module):
    """Position-wise feed-forward network ``W_2 GELU(W_1 x + b_1) + b_2``, ``(B, T, d) -> (B, T, d)``."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        _check_config(config, "FeedForward")
        self.fc = nn.Linear(config.d_model, config.ff_dim, bias=config.bias)
        self.proj = nn.Linear(config.ff_dim, config.d_model, bias=config.bias)
        self.approximate = "tanh" if config.activation == "gelu_tanh" else "none"
        self.fused = config.kernels == "torch"
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_tokens(x, "FeedForward", self, self.fc.in_features)
        h = self.fc(x)
        h = F.gelu(h, approximate=self.approximate) if self.fused else gelu(h, self.approximate)
        return self.dropout(self.proj(h))


class CausalSelfAttention(nn.Module):
    """Masked multi-head self-attention with an optional KV cache.

    ``x`` is ``(batch, T, d_model)``. ``past`` is ``None`` or the ``(key, value)`` pair this
    layer returned for the earlier positions, each ``(batch, n_head, T0, d_head)``. Returns
    ``(y, present)``: ``y`` ``(batch, T, d_model)`` and ``present`` the keys and values of all
    ``T0 + T`` positions (``None`` unless ``use_cache``). The new query at absolute position
    ``T0 + i`` may attend to keys ``0 .. T0 + i`` — rows ``T0 ..`` of a causal mask of size ``T0 + T``.
    """

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        _check_config(config, "CausalSelfAttention")
        self.n_head, self.d_head, self.d_model = config.n_head, config.d_head, config.d_model
        self.qkv = nn.Linear(config.d_model, 3 * config.d_model, bias=config.bias)  # W_q, W_k, W_v side by side
        self.proj = nn.Linear(config.d_model, config.d_model, bias=config.bias)
        self.attn_dropout = nn.Dropout(config.dropout)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.fused = config.kernels == "torch"

    def forward(
        self, x: torch.Tensor, past: tuple[torch.Tensor, torch.Tensor] | None = None, use_cache: bool = False
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
        _check_tokens(x, "CausalSelfAttention", self, self.d_model)
        b, t, _ = x.shape
        if past is not None:
            _check_past(past, (b, self.n_head, None, self.d_head), "CausalSelfAttention", "past", x, "x")
        q, k, v = self.qkv(x).split(self.d_model, dim=-1)
        q, k, v = (z.view(b, t, self.n_head, self.d_head).transpose(1, 2) for z in (q, k, v))  # (B, h, T, dh)
        if past is not None:
            k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
        s = k.shape[2]  # T0 + T keys
        mask = causal_mask(s, device=x.device)[s - t:]  # (T, S): query T0+i sees keys 0..T0+i
        p_drop = self.attn_dropout.p if self.training else 0.0
        if self.fused:
            heads = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p_drop)
        elif p_drop > 0:
            _, weights = scaled_dot_product_attention(q, k, v, mask)
            heads = self.attn_dropout(weights) @ v
        else:
            heads, _ = scaled_dot_product_attention(q, k, v, mask)
        y = heads.transpose(1, 2).reshape(b, t, self.d_model)  # concatenate the heads
        return self.resid_dropout(self.proj(y)), ((k, v) if use_cache else None)


class Block(nn.Module):
    """Pre-LN Transformer block: ``x + attn(LN_1(x))``, then ``+ ffn(LN_2(.))``; ``(B, T, d) -> (B, T, d)``."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        _check_config(config, "Block")
        fused = config.kernels == "torch"
        self.ln_1 = LayerNorm(config.d_model, config.layer_norm_eps, config.bias, fused)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = LayerNorm(config.d_model, config.layer_norm_eps, config.bias, fused)
        self.mlp = FeedForward(config)

    def forward(
        self, x: torch.Tensor, past: tuple[torch.Tensor, torch.Tensor] | None = None, use_cache: bool = False
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
        a, present = self.attn(self.ln_1(x), past, use_cache)
        x = x + a
        x = x + self.mlp(self.ln_2(x))
        return x, present


# ----------------------------------------------------------------------------- sampling


def _check_logits(logits: object, fn: str) -> torch.Tensor:
    if not isinstance(logits, torch.Tensor) or not torch.is_floating_point(logits):
        raise TypeError(f"{fn}: logits must be a floating-point torch.Tensor, got {type(logits).__name__}")
    if logits.ndim < 1 or logits.shape[-1] < 1:
        raise ValueError(f"{fn}: logits must have shape (..., vocab_size), got {tuple(logits.shape)}")
    return logits


def _check_past(past: object, shape: tuple, fn: str, name: str, like: torch.Tensor | None = None,
                like_name: str = "") -> None:
    """A ``(key, value)`` pair of tensors of ``shape`` ``(batch, heads, P, d_head)`` (``None`` = any size), of the
    dtype and device of ``like`` when given."""
    if not (isinstance(past, (tuple, list)) and len(past) == 2 and all(isinstance(t, torch.Tensor) for t in past)):
        raise TypeError(f"{fn}: {name} must be a (key, value) pair of tensors, got {type(past).__name__}")
    for t in past:
        if t.ndim != 4 or any(want is not None and got != want for got, want in zip(t.shape, shape, strict=True)):
            want = tuple(label if w is None else w for w, label in zip(shape, ("batch", "heads", "P", "d_head"),
                                                                       strict=True))
            raise ValueError(f"{fn}: {name} must hold keys and values of shape {want}, got {tuple(t.shape)}")
        if like is not None:
            check_like(name, t, fn, like_name, like)


def _check_sampling(temperature: object, top_k: object, top_p: object, generator: object, fn: str) -> None:
    check_number("temperature", temperature, fn, 0.0)  # NaN would pick the last id, inf a uniform draw
    if top_k is not None:
        positive_int("top_k", top_k, fn)
    if top_p is not None:
        check_number("top_p", top_p, fn, 0.0, 1.0, low_open=True)
    check_instance("generator", generator, fn, (torch.Generator, type(None)), "a torch.Generator or None")


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the ``k`` largest logits of each row, set the rest to ``-inf``; ``(..., V) -> (..., V)``.

    Logits tied with the k-th largest are kept too, so a row may keep more than ``k`` entries
    when there are ties. ``k >= V`` returns the logits unchanged.
    """
    _check_logits(logits, "top_k_filter")
    positive_int("k", k, "top_k_filter")
    if k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]  # (..., 1)
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus filtering: keep the smallest set of most probable tokens whose mass is ``>= p``.

    Sorting the probabilities of a row in decreasing order, a token is kept when the mass of
    the tokens before it is still ``< p``; so the most probable token is always kept, and the
    kept set is minimal. Others get ``-inf``. Shapes ``(..., V) -> (..., V)``; ``p`` in ``(0, 1]``.
    """
    _check_logits(logits, "top_p_filter")
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 < p <= 1:
        raise ValueError(f"top_p_filter: p must be a number in (0, 1], got {p!r}")
    if p >= 1:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = torch.softmax(sorted_logits.double(), dim=-1)
    mass_before = torch.cumsum(probs, dim=-1) - probs
    remove_sorted = mass_before >= p
    remove = torch.zeros_like(remove_sorted).scatter(-1, order, remove_sorted)
    return logits.masked_fill(remove, float("-inf"))


def sample_next_token(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Choose one token per row of ``logits`` ``(batch, V)``; returns ``(batch,)`` int64.

    ``temperature == 0`` is greedy decoding (argmax; ``top_k``/``top_p`` are then irrelevant).
    Otherwise the logits are divided by ``temperature``, filtered by :func:`top_k_filter` and
    :func:`top_p_filter`, and a token is drawn by inverting the cumulative distribution at one
    uniform number per row. The uniforms come from ``generator`` (on its own device, CPU by
    default) and are then moved to the logits' device, so a seeded generator gives the same
    draws on any device.
    """
    fn = "sample_next_token"
    _check_logits(logits, fn)
    if logits.ndim != 2:
        raise ValueError(f"{fn}: logits must have shape (batch, vocab_size), got {tuple(logits.shape)}")
    _check_sampling(temperature, top_k, top_p, generator, fn)
    if bool(torch.isnan(logits).any()):  # argmax and the inverse CDF would turn NaN into a plausible id
        raise ValueError(f"{fn}: logits contain NaN (did the model diverge?)")
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k is not None:
        logits = top_k_filter(logits, top_k)
    if top_p is not None:
        logits = top_p_filter(logits, top_p)
    probs = torch.softmax(logits.double(), dim=-1)
    cdf = torch.cumsum(probs, dim=-1)  # (B, V)
    if not bool(torch.isfinite(cdf[:, -1]).all()):
        raise ValueError(f"{fn}: every row of logits needs a finite largest entry, got +inf or a row of -inf")
    gen_device = generator.device if generator is not None else torch.device("cpu")
    u = torch.rand(logits.shape[0], 1, dtype=torch.float64, generator=generator, device=gen_device)
    u = u.to(logits.device) * cdf[:, -1:]
    # The first index whose cumulative mass exceeds u; tokens of zero probability are never chosen.
    return torch.searchsorted(cdf, u, right=True).squeeze(-1).clamp_(max=logits.shape[-1] - 1)


# ----------------------------------------------------------------------------- the model


class GPTOutput(NamedTuple):
    """What :meth:`GPT.forward` returns.

    ``logits`` ``(batch, T, vocab_size)``; ``loss`` the mean cross-entropy in nats (``None``
    without targets); ``past_key_values`` one ``(key, value)`` pair per layer, each
    ``(batch, n_head, P + T, d_head)`` (``None`` unless ``use_cache``).
    """

    logits: torch.Tensor
    loss: torch.Tensor | None
    past_key_values: KVCache | None


class GPT(nn.Module):
    """A GPT-2-style decoder-only Transformer.

    Token embedding plus positional encoding, ``n_layer`` pre-LN :class:`Block` s, a final
    :class:`LayerNorm` and a linear output layer (tied to the token embedding by default).
    Initialised as GPT-2: normal weights with std 0.02, and std ``0.02 / sqrt(2 n_layer)`` for
    the two projections that write into the residual stream. With sinusoidal positions, whose
    entries are of size 1, the input embeddings are multiplied by ``sqrt(d_model)`` (as in
    *Attention Is All You Need*) so that the positions do not drown the tokens.
    """

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        _check_config(config, "GPT")
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.d_model)
        if config.positional == "learned":
            self.wpe = nn.Embedding(config.block_size, config.d_model)
        else:
            self.wpe = None
            pe = sinusoidal_positional_encoding(config.block_size, config.d_model)
            self.register_buffer("pe", pe, persistent=False)
        self.embed_scale = 1.0 if config.positional == "learned" else math.sqrt(config.d_model)
        self.drop = nn.Dropout(config.dropout)
        self.h = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = LayerNorm(config.d_model, config.layer_norm_eps, config.bias, config.kernels == "torch")
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.wte.weight
        self.apply(self._init_weights)
        residual_std = 0.02 / math.sqrt(2 * config.n_layer)
        for block in self.h:
            nn.init.normal_(block.attn.proj.weight, mean=0.0, std=residual_std)
            nn.init.normal_(block.mlp.proj.weight, mean=0.0, std=residual_std)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(
        self,
        idx: torch.Tensor | None = None,
        targets: torch.Tensor | None = None,
        *,
        inputs_embeds: torch.Tensor | None = None,
        past_key_values: KVCache | None = None,
        use_cache: bool = False,
    ) -> GPTOutput:
        """Logits for every position, the loss when ``targets`` are given, and the KV cache.

        Give exactly one of ``idx`` (token ids, ``(batch, T)`` int64) or ``inputs_embeds``
        (``(batch, T, d_model)``, in the space of ``self.wte``'s rows, e.g. image features
        projected into the model, as chapter 14 does). ``targets`` ``(batch, T)`` int64;
        positions with ``-100`` are ignored by the loss. With ``past_key_values`` from an earlier
        call (``use_cache=True``), the new positions continue at ``P``, the cached length;
        ``P + T`` must not exceed ``block_size``.
        """
        fn = "GPT.forward"
        cfg = self.config
        if (idx is None) == (inputs_embeds is None):
            raise ValueError(f"{fn}: give exactly one of idx and inputs_embeds")
        if idx is not None:
            if not isinstance(idx, torch.Tensor) or idx.dtype != torch.long or idx.ndim != 2:
                raise TypeError(
                    f"{fn}: idx must be an int64 tensor of shape (batch, T), got "
                    f"{getattr(idx, 'dtype', type(idx).__name__)} {tuple(getattr(idx, 'shape', ()))}"
                )
            check_ids("idx", idx, fn, cfg.vocab_size)
            check_module_input("idx", idx, fn, self)
            x = self.wte(idx)
        else:
            if not isinstance(inputs_embeds, torch.Tensor) or not torch.is_floating_point(inputs_embeds):
                raise TypeError(f"{fn}: inputs_embeds must be a floating-point tensor (batch, T, d_model)")
            if inputs_embeds.ndim != 3 or inputs_embeds.shape[-1] != cfg.d_model:
                raise ValueError(
                    f"{fn}: inputs_embeds must have shape (batch, T, {cfg.d_model}), got {tuple(inputs_embeds.shape)}"
                )
            check_module_input("inputs_embeds", inputs_embeds, fn, self)
            x = inputs_embeds
        b, t = x.shape[:2]
        if t < 1:
            raise ValueError(f"{fn}: the input must hold at least one position, got T={t}")
        check_bool("use_cache", use_cache, fn)
        past_len = 0
        if past_key_values is not None:
            if not isinstance(past_key_values, (list, tuple)) or len(past_key_values) != cfg.n_layer:
                raise ValueError(f"{fn}: past_key_values must hold one (key, value) pair per layer ({cfg.n_layer})")
            _check_past(past_key_values[0], (None, cfg.n_head, None, cfg.d_head), fn, "past_key_values[0]",
                        self.wte.weight, "the model's parameters")
            past_len = past_key_values[0][0].shape[2]
            if past_key_values[0][0].shape[0] != b:
                raise ValueError(
                    f"{fn}: past_key_values has batch {past_key_values[0][0].shape[0]} but the input has batch {b}"
                )
        if past_len + t > cfg.block_size:
            raise ValueError(
                f"{fn}: {past_len} cached + {t} new positions exceed block_size={cfg.block_size}"
            )
        positions = torch.arange(past_len, past_len + t, device=x.device)
        pos = self.wpe(positions) if self.wpe is not None else self.pe[positions].to(x.dtype)
        x = self.drop(x * self.embed_scale + pos)
        presents: KVCache = []
        for i, block in enumerate(self.h):
            x, present = block(x, None if past_key_values is None else past_key_values[i], use_cache)
            if use_cache:
                presents.append(present)
        logits = self.lm_head(self.ln_f(x))
        loss = None
        if targets is not None:
            if not isinstance(targets, torch.Tensor) or targets.dtype != torch.long or targets.shape != (b, t):
                raise ValueError(
                    f"{fn}: targets must be an int64 tensor of shape {(b, t)}, got "
                    f"{getattr(targets, 'dtype', type(targets).__name__)} {tuple(getattr(targets, 'shape', ()))}"
                )
            check_ids("targets", targets, fn, cfg.vocab_size, allow=(-100,))
            loss = F.cross_entropy(logits.reshape(b * t, -1), targets.reshape(b * t), ignore_index=-100)
        return GPTOutput(logits, loss, presents if use_cache else None)

    @torch.no_grad()
    def generate(
        self,
        idx: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        use_cache: bool = True,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Extend ``idx`` ``(batch, T)`` by ``max_new_tokens`` tokens; returns ``(batch, T + max_new_tokens)``.

        Each step feeds the model, takes the last position's logits and calls
        :func:`sample_next_token` (``temperature=0`` is greedy). Without the cache every step
        re-reads the last ``block_size`` tokens; with it, only the newest token is fed and the
        keys and values of the earlier ones are reused. Once the sequence is longer than
        ``block_size`` the cache cannot slide (positions would shift), so those steps re-read
        the last ``block_size`` tokens as the uncached path does. Runs in eval mode (no dropout)
        and restores the previous mode.
        """
        fn = "GPT.generate"
        if not isinstance(idx, torch.Tensor) or idx.dtype != torch.long or idx.ndim != 2 or idx.shape[1] < 1:
            raise TypeError(
                f"{fn}: idx must be a non-empty int64 tensor of shape (batch, T), got "
                f"{getattr(idx, 'dtype', type(idx).__name__)} {tuple(getattr(idx, 'shape', ()))}"
            )
        check_int("max_new_tokens", max_new_tokens, fn, 0)
        _check_sampling(temperature, top_k, top_p, generator, fn)
        check_bool("use_cache", use_cache, fn)
        block = self.config.block_size
        was_training = self.training
        self.eval()
        try:
            past = None
            for _ in range(max_new_tokens):
                if use_cache and past is not None and idx.shape[1] <= block:
                    out = self(idx[:, -1:], past_key_values=past, use_cache=True)
                else:
                    out = self(idx[:, -block:], use_cache=use_cache)
                past = out.past_key_values
                nxt = sample_next_token(out.logits[:, -1, :], temperature, top_k, top_p, generator)
                idx = torch.cat([idx, nxt[:, None]], dim=1)
        finally:
            self.train(was_training)
        return idx

    @classmethod
    def from_hf_gpt2(cls, hf_model: nn.Module) -> GPT:
        """Build a :class:`GPT` with the sizes of a ``transformers`` GPT-2 and copy its weights in."""
        cfg = getattr(hf_model, "config", None)
        if getattr(cfg, "model_type", None) != "gpt2":
            raise TypeError(f"from_hf_gpt2: hf_model must be a transformers GPT-2 model, got {type(hf_model).__name__}")
        activations = _HF_ACTIVATIONS
        if cfg.activation_function not in activations:
            raise ValueError(f"from_hf_gpt2: unsupported activation_function {cfg.activation_function!r}")
        config = GPTConfig(
            vocab_size=cfg.vocab_size,
            block_size=cfg.n_positions,
            n_layer=cfg.n_layer,
            n_head=cfg.n_head,
            d_model=cfg.n_embd,
            d_ff=cfg.n_inner,
            dropout=0.0,
            bias=True,
            layer_norm_eps=float(cfg.layer_norm_epsilon),
            activation=activations[cfg.activation_function],
            tie_embeddings=bool(getattr(cfg, "tie_word_embeddings", True)),
        )
        return load_hf_gpt2_weights(cls(config), hf_model)


_HF_ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu"}


@torch.no_grad()
def load_hf_gpt2_weights(ours: GPT, hf_model: nn.Module) -> GPT:
    """Copy the weights of a ``transformers`` ``GPT2LMHeadModel`` (or ``GPT2Model``) into ``ours``.

    GPT-2 stores its projections as ``Conv1D`` modules whose weight is ``(in, out)`` — the
    transpose of ``nn.Linear``'s ``(out, in)`` — so those are transposed on the way in. Its
    ``c_attn`` holds ``W_q, W_k, W_v`` side by side, exactly as our ``qkv`` does. Returns ``ours``.
    """
    fn = "load_hf_gpt2_weights"
    if not isinstance(ours, GPT):
        raise TypeError(f"{fn}: ours must be a GPT, got {type(ours).__name__}")
    cfg = getattr(hf_model, "config", None)
    if getattr(cfg, "model_type", None) != "gpt2":
        raise TypeError(f"{fn}: hf_model must be a transformers GPT-2 model, got {type(hf_model).__name__}")
    if getattr(cfg, "scale_attn_by_inverse_layer_idx", False) or getattr(cfg, "add_cross_attention", False):
        raise ValueError(f"{fn}: scale_attn_by_inverse_layer_idx and cross-attention are not supported")
    c = ours.config
    if not c.bias or c.positional != "learned" or not getattr(cfg, "scale_attn_weights", True):
        raise ValueError(f"{fn}: GPT-2 needs bias=True, positional='learned' and scaled attention")
    # settings no weight shape reveals: the weights would load and compute something else
    theirs_settings = {"n_head": getattr(cfg, "n_head", None),
                       "activation": _HF_ACTIVATIONS.get(getattr(cfg, "activation_function", None)),
                       "layer_norm_eps": getattr(cfg, "layer_norm_epsilon", None)}
    for name, value in theirs_settings.items():
        if getattr(c, name) != value:
            raise ValueError(f"{fn}: ours has {name}={getattr(c, name)!r} but hf_model has {value!r} "
                             "(build ours with GPT.from_hf_gpt2)")
    theirs = {k.removeprefix("transformer."): v for k, v in hf_model.state_dict().items()}
    mapping: dict[str, tuple[str, bool]] = {  # ours -> (theirs, transpose)
        "wte.weight": ("wte.weight", False),
        "wpe.weight": ("wpe.weight", False),
        "ln_f.weight": ("ln_f.weight", False),
        "ln_f.bias": ("ln_f.bias", False),
    }
    for i in range(c.n_layer):
        for ln in ("ln_1", "ln_2"):
            for p in ("weight", "bias"):
                mapping[f"h.{i}.{ln}.{p}"] = (f"h.{i}.{ln}.{p}", False)
        for ours_name, their_name in (("attn.qkv", "attn.c_attn"), ("attn.proj", "attn.c_proj"),
                                      ("mlp.fc", "mlp.c_fc"), ("mlp.proj", "mlp.c_proj")):
            mapping[f"h.{i}.{ours_name}.weight"] = (f"h.{i}.{their_name}.weight", True)
            mapping[f"h.{i}.{ours_name}.bias"] = (f"h.{i}.{their_name}.bias", False)
    if not c.tie_embeddings:
        mapping["lm_head.weight"] = ("lm_head.weight", False)
    params = dict(ours.named_parameters())
    missing = sorted(set(params) - set(mapping))
    if missing:
        raise ValueError(f"{fn}: no GPT-2 source for our parameters {missing[:4]}")
    for name, (their_name, transpose) in mapping.items():
        if their_name not in theirs:
            raise ValueError(f"{fn}: hf_model has no parameter {their_name!r} (are the layer counts equal?)")
        src = theirs[their_name].t() if transpose else theirs[their_name]
        if src.shape != params[name].shape:
            raise ValueError(
                f"{fn}: shape mismatch for {name}: ours {tuple(params[name].shape)}, theirs {tuple(src.shape)}"
            )
        params[name].copy_(src)
    return ours
