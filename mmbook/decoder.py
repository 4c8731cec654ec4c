"""A modern decoder-only Transformer (Llama / Qwen3 / Mistral / SmolLM style), built from the book's parts.

Compared with chapter 7's GPT-2, each block swaps three parts and adds options:

* :class:`mmbook.rmsnorm.RMSNorm` instead of LayerNorm (``norm="rms"``; ``"layer"`` for the ablation);
* rotary position embeddings inside attention instead of a learned position table (``positional="rope"``;
  ``"learned"`` for the ablation);
* a :class:`mmbook.swiglu.SwiGLU` feed-forward network instead of GELU (``mlp="swiglu"``; ``"gelu"``);
* grouped-query attention (``n_kv_head < n_head``), QK-norm (``qk_norm``), a sliding window
  (``sliding_window``) and a sparse mixture of experts (``num_experts > 0``), all in
  :mod:`mmbook.gqa` and :mod:`mmbook.moe`;
* no biases anywhere, and the output layer tied to the token embedding (``tie_embeddings``), as in SmolLM2.

The parameter names are ``transformers``' (``embed_tokens``, ``layers.i.input_layernorm``,
``layers.i.self_attn.q_proj``, ``layers.i.mlp.gate_proj``, ``norm``, ``lm_head``), so a Llama, Qwen3,
Mistral, Mixtral or Qwen3-MoE checkpoint maps onto the model with :func:`load_hf_weights`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from mmbook.checks import (
    check_bool,
    check_choice,
    check_ids,
    check_instance,
    check_int,
    check_number,
    positive_int,
)
from mmbook.gpt import FeedForward, GPTConfig, LayerNorm, _check_sampling, sample_next_token
from mmbook.gqa import KERNELS, GroupedQueryAttention
from mmbook.moe import SparseMoE
from mmbook.rmsnorm import RMSNorm
from mmbook.rope import PAIRINGS
from mmbook.swiglu import SwiGLU, swiglu_hidden_size

__all__ = ["Decoder", "DecoderBlock", "DecoderConfig", "DecoderOutput", "decoder_param_count", "load_hf_weights"]

KVCache = list[tuple[torch.Tensor, torch.Tensor]]
_HF_TYPES = ("llama", "qwen3", "qwen3_moe", "mistral", "mixtral")


@dataclass
class DecoderConfig:
    """Sizes and switches of a :class:`Decoder`; the defaults are a small byte-level Llama-style model.

    ``n_kv_head`` defaults to ``n_head`` (multi-head attention); ``head_dim`` to ``d_model // n_head``;
    ``d_ff`` to :func:`mmbook.swiglu.swiglu_hidden_size` for ``mlp="swiglu"`` and ``4 * d_model`` for
    ``"gelu"``. ``max_seq_len`` is the context length (the size of the table with ``positional="learned"``;
    with RoPE nothing limits the length but what the model was trained on). With ``num_experts > 0`` every
    block's feed-forward network is a :class:`mmbook.moe.SparseMoE` of ``num_experts`` SwiGLU experts of
    hidden size ``moe_d_ff`` (default ``d_ff``), ``top_k`` of them per token. ``kernel`` chooses how attention
    is computed (see :class:`mmbook.gqa.GroupedQueryAttention`); ``fused`` uses PyTorch's fused RMSNorm,
    LayerNorm, SiLU and GELU.
    """

    vocab_size: int = 256
    max_seq_len: int = 128
    n_layer: int = 4
    n_head: int = 4
    n_kv_head: int | None = None
    d_model: int = 128
    head_dim: int | None = None
    d_ff: int | None = None
    norm: str = "rms"
    positional: str = "rope"
    mlp: str = "swiglu"
    rope_base: float = 10000.0
    rope_pairing: str = "half"
    qk_norm: bool = False
    sliding_window: int | None = None
    num_experts: int = 0
    top_k: int = 2
    moe_d_ff: int | None = None
    norm_topk_prob: bool = True
    capacity_factor: float | None = None
    norm_eps: float = 1e-6
    tie_embeddings: bool = True
    kernel: str = "mmbook"
    fused: bool = False

    def __post_init__(self) -> None:
        fn = "DecoderConfig"
        for name in ("vocab_size", "max_seq_len", "n_layer", "n_head", "d_model", "top_k"):
            positive_int(name, getattr(self, name), fn)
        for name in ("n_kv_head", "head_dim", "d_ff", "sliding_window", "moe_d_ff"):
            if getattr(self, name) is not None:
                positive_int(name, getattr(self, name), fn)
        check_int("num_experts", self.num_experts, fn, 0)
        if self.n_head % self.kv_heads:
            raise ValueError(f"{fn}: n_head={self.n_head} must be a multiple of n_kv_head={self.n_kv_head}")
        if self.head_dim is None and self.d_model % self.n_head:
            raise ValueError(f"{fn}: d_model={self.d_model} must be divisible by n_head={self.n_head} "
                             "(or give head_dim)")
        check_choice("norm", self.norm, fn, ("rms", "layer"))
        check_choice("positional", self.positional, fn, ("rope", "learned"))
        check_choice("mlp", self.mlp, fn, ("swiglu", "gelu"))
        check_choice("rope_pairing", self.rope_pairing, fn, PAIRINGS)
        check_choice("kernel", self.kernel, fn, KERNELS)
        check_number("rope_base", self.rope_base, fn, 1.0, low_open=True)
        check_number("norm_eps", self.norm_eps, fn, 0.0, low_open=True)
        for name in ("qk_norm", "norm_topk_prob", "tie_embeddings", "fused"):
            check_bool(name, getattr(self, name), fn)
        if self.capacity_factor is not None:
            check_number("capacity_factor", self.capacity_factor, fn, 0.0, low_open=True)
        if self.positional == "rope" and self.attn_head_dim % 2:
            raise ValueError(f"{fn}: RoPE needs an even head_dim, got {self.attn_head_dim}")
        if self.num_experts and self.top_k > self.num_experts:
            raise ValueError(f"{fn}: top_k={self.top_k} cannot exceed num_experts={self.num_experts}")
        if self.num_experts and self.mlp != "swiglu":
            raise ValueError(f"{fn}: the experts are SwiGLU networks; mixture of experts needs mlp='swiglu'")

    @property
    def kv_heads(self) -> int:
        """``n_kv_head``, or ``n_head`` when it is None."""
        return self.n_head if self.n_kv_head is None else self.n_kv_head

    @property
    def attn_head_dim(self) -> int:
        return self.head_dim if self.head_dim is not None else self.d_model // self.n_head

    @property
    def ff_dim(self) -> int:
        """The dense feed-forward hidden size."""
        if self.d_ff is not None:
            return self.d_ff
        return swiglu_hidden_size(self.d_model) if self.mlp == "swiglu" else 4 * self.d_model

    @property
    def expert_dim(self) -> int:
        """The hidden size of each expert."""
        return self.moe_d_ff if self.moe_d_ff is not None else self.ff_dim


def decoder_param_count(config: DecoderConfig) -> int:
    """The number of parameters of ``Decoder(config)``, in closed form.

    With ``d = d_model``, ``h = n_head``, ``g = n_kv_head``, ``k = head_dim``, ``f`` the feed-forward size and
    ``L = n_layer``: attention ``d (h k) + 2 d (g k) + (h k) d`` (plus ``2k`` with QK-norm); a SwiGLU network
    ``3 d f``, a GELU network ``2 d f`` (no biases); a mixture of ``E`` experts ``E (3 d f_e + d)`` with its
    router; two norms of ``d`` (``2d`` for LayerNorm, which has a bias). Plus the embeddings ``V d``, learned
    positions ``T d``, the final norm, and an untied output layer ``V d``.
    """
    check_instance("config", config, "decoder_param_count", DecoderConfig, "a DecoderConfig")
    d, h, g, k = config.d_model, config.n_head, config.kv_heads, config.attn_head_dim
    norm = d if config.norm == "rms" else 2 * d
    attention = 2 * d * h * k + 2 * d * g * k + (2 * k if config.qk_norm else 0)
    if config.num_experts:
        mlp = config.num_experts * (3 * d * config.expert_dim + d)
    else:
        mlp = (3 if config.mlp == "swiglu" else 2) * d * config.ff_dim
    embeddings = config.vocab_size * d + (config.max_seq_len * d if config.positional == "learned" else 0)
    head = 0 if config.tie_embeddings else config.vocab_size * d
    return embeddings + config.n_layer * (2 * norm + attention + mlp) + norm + head


class DecoderOutput(NamedTuple):
    """What :meth:`Decoder.forward` returns.

    ``logits`` ``(batch, T, vocab_size)``; ``loss`` the mean next-token cross-entropy in nats (``None``
    without targets); ``past_key_values`` one ``(key, value)`` pair per layer, each
    ``(batch, n_kv_head, P + T, head_dim)`` (``None`` unless ``use_cache``); ``router_logits`` one
    ``(batch * T, num_experts)`` tensor per layer for a mixture-of-experts model, else ``None``.
    """

    logits: torch.Tensor
    loss: torch.Tensor | None
    past_key_values: KVCache | None
    router_logits: list[torch.Tensor] | None


def _norm(config: DecoderConfig, size: int) -> nn.Module:
    if config.norm == "rms":
        return RMSNorm(size, config.norm_eps, config.fused)
    return LayerNorm(size, config.norm_eps, bias=True, fused=config.fused)


class DecoderBlock(nn.Module):
    """Pre-norm block: ``x + attn(norm_1(x))``, then ``+ mlp(norm_2(.))``; ``(B, T, d) -> (B, T, d)``.

    ``forward(x, past, use_cache)`` returns ``(x, present, router_logits)``; ``router_logits`` is ``None``
    unless the feed-forward network is a mixture of experts. The keywords ``positions`` and ``attn_mask`` go to
    :class:`mmbook.gqa.GroupedQueryAttention` (explicit RoPE positions and a mask in place of the causal one:
    :func:`mmbook.sft.packed_forward` runs packed conversations through this same block this way).
    """

    def __init__(self, config: DecoderConfig) -> None:
        super().__init__()
        check_instance("config", config, "DecoderBlock", DecoderConfig, "a DecoderConfig")
        c = config
        self.input_layernorm = _norm(c, c.d_model)
        self.self_attn = GroupedQueryAttention(
            c.d_model, c.n_head, c.kv_heads, c.attn_head_dim, rope=c.positional == "rope", rope_base=c.rope_base,
            rope_pairing=c.rope_pairing, qk_norm=c.qk_norm, sliding_window=c.sliding_window, norm_eps=c.norm_eps,
            kernel=c.kernel)
        self.post_attention_layernorm = _norm(c, c.d_model)
        if c.num_experts:
            self.mlp: nn.Module = SparseMoE(c.d_model, c.expert_dim, c.num_experts, c.top_k, c.norm_topk_prob,
                                            c.capacity_factor)
        elif c.mlp == "swiglu":
            self.mlp = SwiGLU(c.d_model, c.ff_dim, fused=c.fused)
        else:
            self.mlp = FeedForward(GPTConfig(d_model=c.d_model, n_head=1, d_ff=c.ff_dim, bias=False,
                                             activation="gelu", kernels="torch" if c.fused else "mmbook"))

    def forward(self, x: torch.Tensor, past: tuple[torch.Tensor, torch.Tensor] | None = None,
                use_cache: bool = False, *, positions: torch.Tensor | None = None,
                attn_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, Any, torch.Tensor | None]:
        a, present = self.self_attn(self.input_layernorm(x), past, use_cache, positions=positions,
                                    attn_mask=attn_mask)
        x = x + a
        m = self.mlp(self.post_attention_layernorm(x))
        if isinstance(self.mlp, SparseMoE):
            return x + m.hidden, present, m.router_logits
        return x + m, present, None


class Decoder(nn.Module):
    """A decoder-only language model: token embedding, ``n_layer`` :class:`DecoderBlock` s, a final norm, logits.

    Initialised like chapter 7's GPT (normal, std 0.02; the two projections that write into the residual
    stream with std ``0.02 / sqrt(2 n_layer)``; norm gains 1), so that the ablation compares architectures,
    not initialisations.
    """

    def __init__(self, config: DecoderConfig) -> None:
        super().__init__()
        check_instance("config", config, "Decoder", DecoderConfig, "a DecoderConfig")
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.d_model)
        self.embed_positions = (nn.Embedding(config.max_seq_len, config.d_model)
                                if config.positional == "learned" else None)
        self.layers = nn.ModuleList(DecoderBlock(config) for _ in range(config.n_layer))
        self.norm = _norm(config, config.d_model)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        if self.embed_tokens.weight.is_meta:  # built to receive weights (load_smollm2): no values to initialise
            return
        self.apply(self._init_weights)
        residual_std = 0.02 / math.sqrt(2 * config.n_layer)
        for block in self.layers:
            nn.init.normal_(block.self_attn.o_proj.weight, std=residual_std)
            experts = block.mlp.experts if isinstance(block.mlp, SparseMoE) else [block.mlp]
            for mlp in experts:
                nn.init.normal_((mlp.down_proj if isinstance(mlp, SwiGLU) else mlp.proj).weight, std=residual_std)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, *,
                past_key_values: KVCache | None = None, use_cache: bool = False) -> DecoderOutput:
        """Logits for ``idx`` ``(batch, T)`` int64; the loss against ``targets`` ``(batch, T)`` (-100 ignored).

        With ``past_key_values`` from an earlier call (``use_cache=True``) the new tokens continue at position
        ``P``, the cached length.
        """
        fn = "Decoder.forward"
        c = self.config
        check_ids("idx", idx, fn, c.vocab_size, 2, "(batch, T)")
        b, t = idx.shape
        if t < 1:
            raise ValueError(f"{fn}: idx must hold at least one position, got shape {tuple(idx.shape)}")
        if idx.device != self.embed_tokens.weight.device:
            raise ValueError(f"{fn}: idx is on {idx.device} but the model is on {self.embed_tokens.weight.device}")
        check_bool("use_cache", use_cache, fn)
        past_len = 0
        if past_key_values is not None:
            if not isinstance(past_key_values, (list, tuple)) or len(past_key_values) != c.n_layer:
                raise ValueError(f"{fn}: past_key_values must hold one (key, value) pair per layer ({c.n_layer})")
            first = past_key_values[0]
            if not (isinstance(first, (tuple, list)) and len(first) == 2 and isinstance(first[0], torch.Tensor)
                    and first[0].ndim == 4):
                raise TypeError(f"{fn}: past_key_values[0] must be a (key, value) pair of 4-D tensors")
            past_len = first[0].shape[2]
        if self.embed_positions is not None and past_len + t > c.max_seq_len:
            raise ValueError(f"{fn}: {past_len} cached + {t} new positions exceed max_seq_len={c.max_seq_len} "
                             "(learned positions have no row beyond it)")
        x = self.embed_tokens(idx)
        if self.embed_positions is not None:
            x = x + self.embed_positions(torch.arange(past_len, past_len + t, device=idx.device))
        presents: KVCache = []
        router_logits: list[torch.Tensor] = []
        for i, block in enumerate(self.layers):
            x, present, routed = block(x, None if past_key_values is None else past_key_values[i], use_cache)
            if use_cache:
                presents.append(present)
            if routed is not None:
                router_logits.append(routed)
        logits = self.lm_head(self.norm(x))
        loss = None
        if targets is not None:
            check_ids("targets", targets, fn, c.vocab_size, 2, "(batch, T)", allow=(-100,))
            if targets.shape != idx.shape:
                raise ValueError(f"{fn}: targets must have the shape of idx {tuple(idx.shape)}, "
                                 f"got {tuple(targets.shape)}")
            loss = F.cross_entropy(logits.reshape(b * t, -1), targets.reshape(b * t), ignore_index=-100)
        return DecoderOutput(logits, loss, presents if use_cache else None, router_logits or None)

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 0.0, top_k: int | None = None,
                 top_p: float | None = None, *, use_cache: bool = True, eos_token_id: int | None = None,
                 generator: torch.Generator | None = None, share_prefix: bool = False) -> torch.Tensor:
        """Extend ``idx`` ``(batch, T)`` by up to ``max_new_tokens`` tokens; returns ``(batch, T + new)``.

        ``temperature=0`` (the default) is greedy decoding; otherwise :func:`mmbook.gpt.sample_next_token`
        draws with ``generator``. With the KV cache, the prompt is fed once and then one token per step. With
        ``eos_token_id``, a row that produced it keeps producing it (``transformers`` pads with its pad token,
        which for SmolLM2 is a different id; compare up to the first end-of-sequence), and generation stops
        when every row has. With ``share_prefix`` (KV cache only), the tokens that every row of ``idx`` begins with
        (all but the last) are run once, as a batch of one, and their keys and values are shared by the rows: the
        same computation for prompts that differ only at the end (a system message and examples before
        different questions), without repeating the common part; the results agree with ``share_prefix=False``
        up to floating-point rounding. Runs in eval mode and restores the previous mode.
        """
        fn = "Decoder.generate"
        check_ids("idx", idx, fn, self.config.vocab_size, 2, "(batch, T)")
        if idx.shape[1] < 1:
            raise ValueError(f"{fn}: idx must hold at least one token, got shape {tuple(idx.shape)}")
        check_int("max_new_tokens", max_new_tokens, fn, 0)
        _check_sampling(temperature, top_k, top_p, generator, fn)
        check_bool("use_cache", use_cache, fn)
        check_bool("share_prefix", share_prefix, fn)
        if share_prefix and not use_cache:
            raise ValueError(f"{fn}: share_prefix=True needs use_cache=True (the shared prefix lives in the KV cache)")
        if eos_token_id is not None:
            check_int("eos_token_id", eos_token_id, fn, 0, self.config.vocab_size - 1)
        was_training = self.training
        self.eval()
        try:
            past, start = None, 0
            if share_prefix and idx.shape[0] > 1 and max_new_tokens > 0:
                same = (idx == idx[:1]).all(dim=0).long().cumprod(0)
                start = min(int(same.sum()), idx.shape[1] - 1)  # the common prefix, leaving each row one token
                if start > 0:
                    prefix = self(idx[:1, :start], use_cache=True).past_key_values
                    past = [tuple(t.expand(idx.shape[0], -1, -1, -1) for t in kv) for kv in prefix]
            done = torch.zeros(idx.shape[0], dtype=torch.bool, device=idx.device)
            for _ in range(max_new_tokens):
                out = self(idx[:, start:], past_key_values=past, use_cache=use_cache)
                past = out.past_key_values
                nxt = sample_next_token(out.logits[:, -1, :], temperature, top_k, top_p, generator)
                if eos_token_id is not None:
                    nxt = torch.where(done, torch.full_like(nxt, eos_token_id), nxt)
                    done |= nxt == eos_token_id
                idx = torch.cat([idx, nxt[:, None]], dim=1)
                if use_cache:
                    start = idx.shape[1] - 1  # from now on, one new token per step
                if eos_token_id is not None and bool(done.all()):
                    break
        finally:
            self.train(was_training)
        return idx

    @classmethod
    def from_hf(cls, hf_model: nn.Module, **overrides: Any) -> Decoder:
        """Build a :class:`Decoder` with the sizes of a ``transformers`` Llama, Qwen3, Qwen3-MoE, Mistral or
        Mixtral causal LM and copy its weights in (``overrides`` change config fields such as ``kernel``)."""
        config = _config_from_hf(hf_model, "Decoder.from_hf")
        config = DecoderConfig(**{**asdict(config), **overrides})
        return load_hf_weights(cls(config), hf_model)


def _config_from_hf(hf_model: nn.Module, fn: str) -> DecoderConfig:
    cfg = getattr(hf_model, "config", None)
    model_type = getattr(cfg, "model_type", None)
    if model_type not in _HF_TYPES:
        raise TypeError(f"{fn}: hf_model must be a transformers {'/'.join(_HF_TYPES)} model, "
                        f"got {type(hf_model).__name__} ({model_type})")
    if getattr(cfg, "hidden_act", "silu") != "silu" or getattr(cfg, "attention_bias", False) \
            or getattr(cfg, "mlp_bias", False):
        raise ValueError(f"{fn}: only SiLU feed-forward networks without biases are supported")
    rope = getattr(cfg, "rope_parameters", None) or {}
    if rope.get("rope_type", "default") != "default":
        raise ValueError(f"{fn}: only the default RoPE is supported, got {rope.get('rope_type')!r}")
    window = getattr(cfg, "sliding_window", None) if model_type in ("mistral", "mixtral") else None
    if model_type in ("qwen3", "qwen3_moe") and getattr(cfg, "sliding_window", None) is not None:
        raise ValueError(f"{fn}: Qwen3 with a sliding window on some layers is not supported")
    experts = {"qwen3_moe": getattr(cfg, "num_experts", 0), "mixtral": getattr(cfg, "num_local_experts", 0)}
    num_experts = experts.get(model_type, 0)
    if model_type == "qwen3_moe" and (cfg.decoder_sparse_step != 1 or list(cfg.mlp_only_layers)):
        raise ValueError(f"{fn}: only Qwen3-MoE models with experts in every layer are supported")
    return DecoderConfig(
        vocab_size=cfg.vocab_size, max_seq_len=cfg.max_position_embeddings, n_layer=cfg.num_hidden_layers,
        n_head=cfg.num_attention_heads, n_kv_head=cfg.num_key_value_heads,
        d_model=cfg.hidden_size, head_dim=getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads,
        d_ff=cfg.intermediate_size, rope_base=float(rope.get("rope_theta", 10000.0)), rope_pairing="half",
        qk_norm=model_type in ("qwen3", "qwen3_moe"), sliding_window=window, num_experts=num_experts,
        top_k=getattr(cfg, "num_experts_per_tok", 2) if num_experts else 2,
        moe_d_ff=getattr(cfg, "moe_intermediate_size", None) if model_type == "qwen3_moe" else None,
        norm_topk_prob=bool(getattr(cfg, "norm_topk_prob", True)), norm_eps=float(cfg.rms_norm_eps),
        tie_embeddings=bool(getattr(cfg, "tie_word_embeddings", False)))


@torch.no_grad()
def load_hf_weights(ours: Decoder, hf_model: nn.Module) -> Decoder:
    """Copy the weights of a ``transformers`` Llama / Qwen3 / Qwen3-MoE / Mistral / Mixtral causal LM into ``ours``.

    The names agree once ``transformers``' ``model.`` prefix is removed, except inside a mixture of experts,
    whose 3-D expert tensors are split per expert (:func:`mmbook.moe.load_hf_moe_block`). Every parameter of
    ``ours`` must be filled, with the same shape. Returns ``ours``.
    """
    fn = "load_hf_weights"
    check_instance("ours", ours, fn, Decoder, "a Decoder")
    _config_from_hf(hf_model, fn)  # the same type checks
    c = ours.config
    if c.positional != "rope" or c.norm != "rms" or c.mlp != "swiglu" or c.rope_pairing != "half":
        raise ValueError(f"{fn}: transformers' models need positional='rope', norm='rms', mlp='swiglu' and "
                         "rope_pairing='half'")
    theirs = {k.removeprefix("model."): v for k, v in hf_model.state_dict().items()}
    params = dict(ours.named_parameters())
    for name, p in params.items():
        if name == "lm_head.weight" and c.tie_embeddings:
            continue  # the same tensor as embed_tokens.weight
        parts = name.split(".")
        if len(parts) > 4 and parts[2] == "mlp" and parts[3] == "experts":  # layers.i.mlp.experts.e.{proj}.weight
            i, e, proj = parts[1], int(parts[4]), parts[5]
            up = theirs.get(f"layers.{i}.mlp.experts.gate_up_proj")
            down = theirs.get(f"layers.{i}.mlp.experts.down_proj")
            if up is None or down is None:
                raise ValueError(f"{fn}: hf_model has no experts in layer {i}")
            f = up.shape[1] // 2
            src = {"gate_proj": up[e, :f], "up_proj": up[e, f:], "down_proj": down[e]}[proj]
        else:
            if name not in theirs:
                raise ValueError(f"{fn}: hf_model has no parameter {name!r} (are the configurations equal?)")
            src = theirs[name]
        if tuple(src.shape) != tuple(p.shape):
            raise ValueError(f"{fn}: shape mismatch for {name}: ours {tuple(p.shape)}, theirs {tuple(src.shape)}")
        p.copy_(src)
    return ours
