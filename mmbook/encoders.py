"""Text encoders written from their equations: a GRU, a post-LN Transformer encoder layer and BERT.

* :class:`GRUCell` / :class:`GRU` follow PyTorch's ``nn.GRU`` equations and parameter layout
  (gate order r, z, n), so weights copy across with ``load_from_torch``.
* :class:`EncoderLayer` is the post-LN Transformer encoder layer of BERT (attention from
  :class:`mmbook.attention.MultiHeadAttention`, GELU feed-forward); it loads weights from
  ``torch.nn.TransformerEncoderLayer``.
* :class:`BertEncoder` is BERT: word + position + token-type embeddings, a stack of
  :class:`EncoderLayer`, and the ``tanh`` pooler on ``[CLS]``. :func:`load_hf_bert_weights`
  copies a ``transformers`` ``BertModel`` into it.
* :func:`mask_tokens` is BERT's masked-LM corruption (15% selected; 80/10/10 replacement).

Masks follow :mod:`mmbook.attention`: ``attention_mask`` is ``(batch, seq)`` with 1/True for
real tokens and 0/False for padding, as Hugging Face tokenizers return it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from mmbook.attention import MultiHeadAttention
from mmbook.checks import (
    check_bool,
    check_device,
    check_float_tensor,
    check_ids,
    check_index,
    check_instance,
    check_int,
    check_int_tensor,
    check_module_input,
    check_number,
    check_probability,
    positive_int,
)

__all__ = [
    "BertConfig",
    "BertEmbeddings",
    "BertEncoder",
    "BertForMaskedLM",
    "EncoderLayer",
    "EncoderOutput",
    "GRU",
    "GRUCell",
    "GRUEncoder",
    "SequenceClassifier",
    "export_hf_bert_weights",
    "load_hf_bert_weights",
    "mask_tokens",
    "mean_pool",
    "sentence_embeddings",
]


class EncoderOutput(NamedTuple):
    """What every encoder here returns: per-token states and one vector per sequence."""

    last_hidden_state: torch.Tensor  # (batch, seq, hidden)
    pooler_output: torch.Tensor  # (batch, hidden)


def _check_ids(input_ids: object, fn: str) -> torch.Tensor:
    if not isinstance(input_ids, torch.Tensor):
        raise TypeError(f"{fn}: input_ids must be a torch.Tensor, got {type(input_ids).__name__}")
    if input_ids.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{fn}: input_ids must be an integer (int64) tensor, got {input_ids.dtype}")
    if input_ids.ndim != 2 or input_ids.shape[1] == 0:
        raise ValueError(f"{fn}: input_ids must have shape (batch, seq) with seq >= 1, got {tuple(input_ids.shape)}")
    return input_ids


def _check_range(ids: torch.Tensor, size: int, name: str, fn: str) -> None:  # the call the shown forwards make
    check_ids(name, ids, fn, size)


def _check_attention_mask(attention_mask: object, input_ids: torch.Tensor, fn: str) -> torch.Tensor:
    if not isinstance(attention_mask, torch.Tensor):
        raise TypeError(f"{fn}: attention_mask must be a torch.Tensor, got {type(attention_mask).__name__}")
    if attention_mask.shape != input_ids.shape:
        raise ValueError(f"{fn}: attention_mask must have the shape of input_ids {tuple(input_ids.shape)}, "
                         f"got {tuple(attention_mask.shape)}")
    if attention_mask.dtype.is_floating_point:
        raise TypeError(f"{fn}: attention_mask must hold 0/1 integers or booleans, got {attention_mask.dtype}")
    if attention_mask.dtype != torch.bool and not bool(((attention_mask == 0) | (attention_mask == 1)).all()):
        raise ValueError(f"{fn}: attention_mask must hold 0/1 integers or booleans, got other values")
    return attention_mask.bool()


# --------------------------------------------------------------------------------------- GRU


class GRUCell(nn.Module):
    """One step of a gated recurrent unit, with ``torch.nn.GRUCell``'s parameters and equations.

    With input ``x`` ``(batch, input_size)`` and state ``h`` ``(batch, hidden_size)``::

        r  = sigmoid(W_ir x + b_ir + W_hr h + b_hr)        reset gate
        z  = sigmoid(W_iz x + b_iz + W_hz h + b_hz)        update gate
        n  = tanh(W_in x + b_in + r * (W_hn h + b_hn))     candidate state
        h' = (1 - z) * n + z * h

    ``weight_ih`` ``(3 * hidden_size, input_size)`` stacks ``W_ir; W_iz; W_in`` in that order
    (r, z, n), ``weight_hh`` ``(3 * hidden_size, hidden_size)`` stacks ``W_hr; W_hz; W_hn``.
    Note that the reset gate multiplies ``W_hn h + b_hn`` *after* the matrix product, as in
    cuDNN and PyTorch (the original paper applies it to ``h`` before).
    """

    def __init__(self, input_size: int, hidden_size: int, bias: bool = True) -> None:
        super().__init__()
        self.input_size = positive_int("input_size", input_size, "GRUCell")
        self.hidden_size = positive_int("hidden_size", hidden_size, "GRUCell")
        check_bool("bias", bias, "GRUCell")
        self.weight_ih = nn.Parameter(torch.empty(3 * hidden_size, input_size))
        self.weight_hh = nn.Parameter(torch.empty(3 * hidden_size, hidden_size))
        self.bias_ih = nn.Parameter(torch.empty(3 * hidden_size)) if bias else None
        self.bias_hh = nn.Parameter(torch.empty(3 * hidden_size)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """PyTorch's initialisation: every parameter uniform in ``[-1/sqrt(H), 1/sqrt(H)]``."""
        bound = 1.0 / math.sqrt(self.hidden_size)
        for p in self.parameters():
            nn.init.uniform_(p, -bound, bound)

    def forward(self, x: torch.Tensor, h: torch.Tensor | None = None) -> torch.Tensor:
        """``x`` ``(batch, input_size)``, ``h`` ``(batch, hidden_size)`` (zeros if None) -> ``(batch, hidden_size)``."""
        if not isinstance(x, torch.Tensor) or x.ndim != 2 or x.shape[1] != self.input_size:
            raise ValueError(f"GRUCell: x must have shape (batch, {self.input_size}), "
                             f"got {tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
        check_float_tensor("x", x, "GRUCell")
        check_module_input("x", x, "GRUCell", self)
        if h is None:
            h = x.new_zeros(x.shape[0], self.hidden_size)
        elif not isinstance(h, torch.Tensor) or h.shape != (x.shape[0], self.hidden_size):
            raise ValueError(f"GRUCell: h must have shape ({x.shape[0]}, {self.hidden_size}), "
                             f"got {tuple(h.shape) if isinstance(h, torch.Tensor) else type(h).__name__}")
        else:
            check_module_input("h", h, "GRUCell", self)
        return self.step(F.linear(x, self.weight_ih, self.bias_ih), h)

    def step(self, gi: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """One update from the input projections ``gi = W_i{r,z,n} x + b_i{r,z,n}``, ``(batch, 3 * hidden_size)``.

        The input projections do not depend on ``h``, so :class:`GRU` computes them for all time
        steps in one matrix product and only the recurrent part runs step by step.
        """
        gh = F.linear(h, self.weight_hh, self.bias_hh)  # (batch, 3 * hidden_size): W_h{r,z,n} h + b_h{r,z,n}
        i_r, i_z, i_n = gi.chunk(3, dim=-1)
        h_r, h_z, h_n = gh.chunk(3, dim=-1)
        r = torch.sigmoid(i_r + h_r)
        z = torch.sigmoid(i_z + h_z)
        n = torch.tanh(i_n + r * h_n)
        return (1 - z) * n + z * h


class GRU(nn.Module):
    """A stack of :class:`GRUCell` run over batch-first sequences, like ``nn.GRU(batch_first=True)``.

    ``forward(x, lengths=None, h0=None)`` takes ``x`` ``(batch, seq, input_size)``, optional
    ``lengths`` ``(batch,)`` (sequences padded on the right) and ``h0``
    ``(num_layers, batch, hidden_size)``. It returns ``(outputs, h_n)``: the top layer's states
    ``(batch, seq, hidden_size)`` (zero after each sequence's end, as ``pad_packed_sequence``
    gives) and the last state of every layer ``(num_layers, batch, hidden_size)``, taken at
    each sequence's own last step.
    """

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, bias: bool = True) -> None:
        super().__init__()
        positive_int("num_layers", num_layers, "GRU")
        positive_int("input_size", input_size, "GRU")
        positive_int("hidden_size", hidden_size, "GRU")
        self.input_size, self.hidden_size, self.num_layers = input_size, hidden_size, num_layers
        self.cells = nn.ModuleList(
            GRUCell(input_size if layer == 0 else hidden_size, hidden_size, bias) for layer in range(num_layers)
        )

    def forward(
        self, x: torch.Tensor, lengths: torch.Tensor | None = None, h0: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not isinstance(x, torch.Tensor) or x.ndim != 3 or x.shape[-1] != self.input_size:
            raise ValueError(f"GRU: x must have shape (batch, seq, {self.input_size}), "
                             f"got {tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
        check_float_tensor("x", x, "GRU")
        check_module_input("x", x, "GRU", self)
        batch, seq, _ = x.shape
        if seq == 0:
            raise ValueError(f"GRU: x must hold at least one time step, got shape {tuple(x.shape)}")
        if lengths is not None:
            if not isinstance(lengths, torch.Tensor) or lengths.shape != (batch,) or lengths.is_floating_point() \
                    or lengths.dtype == torch.bool:
                raise ValueError(f"GRU: lengths must be an integer tensor of shape ({batch},), got {lengths!r}")
            if (lengths < 1).any() or (lengths > seq).any():
                raise ValueError(f"GRU: lengths must lie in [1, {seq}], got {lengths.tolist()}")
        if h0 is not None and (not isinstance(h0, torch.Tensor)
                               or h0.shape != (self.num_layers, batch, self.hidden_size)):
            raise ValueError(f"GRU: h0 must have shape ({self.num_layers}, {batch}, {self.hidden_size}), "
                             f"got {tuple(h0.shape) if isinstance(h0, torch.Tensor) else type(h0).__name__}")
        if h0 is not None:
            check_module_input("h0", h0, "GRU", self)
        # valid[b, t] is True while t < lengths[b]; past the end the state is carried unchanged
        valid = None
        if lengths is not None:
            valid = torch.arange(seq, device=x.device)[None, :] < lengths.to(x.device)[:, None]
        layer_input, finals = x, []
        for layer, cell in enumerate(self.cells):
            h = x.new_zeros(batch, self.hidden_size) if h0 is None else h0[layer]
            gi = F.linear(layer_input, cell.weight_ih, cell.bias_ih)  # all steps at once: (batch, seq, 3 * hidden_size)
            states = []
            for t in range(seq):
                h_new = cell.step(gi[:, t], h)
                h = h_new if valid is None else torch.where(valid[:, t, None], h_new, h)
                states.append(h)
            layer_input = torch.stack(states, dim=1)
            if valid is not None:
                layer_input = layer_input * valid[..., None]  # zero after each sequence's end
            finals.append(h)
        return layer_input, torch.stack(finals, dim=0)

    @torch.no_grad()
    def load_from_torch(self, module: nn.GRU) -> GRU:
        """Copy the weights of a unidirectional ``torch.nn.GRU`` with the same sizes."""
        if not isinstance(module, nn.GRU):
            raise TypeError(f"load_from_torch: module must be nn.GRU, got {type(module).__name__}")
        ours = (self.input_size, self.hidden_size, self.num_layers, self.cells[0].bias_ih is not None)
        theirs = (module.input_size, module.hidden_size, module.num_layers, module.bias)
        if ours != theirs or module.bidirectional or module.proj_size:
            raise ValueError(f"load_from_torch: sizes differ: ours (input, hidden, layers, bias)={ours}, "
                             f"theirs={theirs}, bidirectional={module.bidirectional}")
        for layer, cell in enumerate(self.cells):
            for name in ("weight_ih", "weight_hh") + (("bias_ih", "bias_hh") if cell.bias_ih is not None else ()):
                getattr(cell, name).copy_(getattr(module, f"{name}_l{layer}"))
        return self


def _lengths_from_mask(attention_mask: torch.Tensor, fn: str) -> torch.Tensor:
    lengths = attention_mask.sum(dim=1)
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    if not torch.equal(attention_mask, positions[None, :] < lengths[:, None]):
        raise ValueError(f"{fn}: attention_mask must pad on the right (ones, then zeros) for a recurrent encoder")
    if (lengths < 1).any():
        raise ValueError(f"{fn}: every sequence needs at least one real token, got lengths {lengths.tolist()}")
    return lengths


class GRUEncoder(nn.Module):
    """Token embeddings followed by a :class:`GRU`; the sentence vector is the top layer's last state.

    ``forward(input_ids, attention_mask=None)`` with ``input_ids`` ``(batch, seq)`` and a
    right-padded ``attention_mask`` ``(batch, seq)`` returns an :class:`EncoderOutput`:
    ``last_hidden_state`` ``(batch, seq, hidden_size)`` and ``pooler_output``
    ``(batch, hidden_size)``, the state after each sequence's last real token.
    """

    def __init__(self, vocab_size: int, embed_dim: int, hidden_size: int, num_layers: int = 1,
                 padding_idx: int | None = 0, dropout: float = 0.0) -> None:
        super().__init__()
        positive_int("vocab_size", vocab_size, "GRUEncoder")
        positive_int("embed_dim", embed_dim, "GRUEncoder")
        positive_int("hidden_size", hidden_size, "GRUEncoder")
        if padding_idx is not None:  # a negative index would silently mean vocab_size + padding_idx
            check_index("padding_idx", padding_idx, "GRUEncoder", vocab_size)
        check_probability("dropout", dropout, "GRUEncoder", high_inclusive=False)
        self.hidden_size = hidden_size
        self.embedding = nn.Embedding(vocab_size, embed_dim, padding_idx=padding_idx)
        self.dropout = nn.Dropout(dropout)
        self.gru = GRU(embed_dim, hidden_size, num_layers)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> EncoderOutput:
        _check_ids(input_ids, "GRUEncoder")
        _check_range(input_ids, self.embedding.num_embeddings, "input_ids", "GRUEncoder")
        lengths = None
        if attention_mask is not None:
            lengths = _lengths_from_mask(_check_attention_mask(attention_mask, input_ids, "GRUEncoder"), "GRUEncoder")
        outputs, h_n = self.gru(self.dropout(self.embedding(input_ids)), lengths)
        return EncoderOutput(outputs, h_n[-1])


# ------------------------------------------------------------------------------- Transformer


class EncoderLayer(nn.Module):
    """A post-LN Transformer encoder layer (BERT's), with GELU in the feed-forward block.

    ``x = LayerNorm(x + Dropout(MultiHeadAttention(x)))`` then
    ``x = LayerNorm(x + Dropout(W_2 GELU(W_1 x + b_1) + b_2))``.

    ``forward(x, mask=None)``: ``x`` ``(batch, seq, d_model)``; ``mask`` boolean, ``True`` =
    may attend, ``(batch, 1, seq)`` for padding or ``(seq, seq)``. Returns ``(batch, seq, d_model)``.
    """

    def __init__(self, d_model: int, num_heads: int, d_ff: int, dropout: float = 0.1,
                 attention_dropout: float = 0.1, layer_norm_eps: float = 1e-12) -> None:
        super().__init__()
        positive_int("d_ff", d_ff, "EncoderLayer")
        check_probability("dropout", dropout, "EncoderLayer", high_inclusive=False)
        check_probability("attention_dropout", attention_dropout, "EncoderLayer", high_inclusive=False)
        check_number("layer_norm_eps", layer_norm_eps, "EncoderLayer", 0.0, low_open=True)
        self.attention = MultiHeadAttention(d_model, num_heads, dropout=attention_dropout)
        self.attention_dropout = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model, eps=layer_norm_eps)
        self.linear1 = nn.Linear(d_model, d_ff)
        self.linear2 = nn.Linear(d_ff, d_model)
        self.ff_dropout = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(d_model, eps=layer_norm_eps)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        d = self.attention.d_model
        if check_float_tensor("x", x, "EncoderLayer").ndim != 3 or x.shape[-1] != d:
            raise ValueError(f"EncoderLayer: x must have shape (batch, seq, {d}), got {tuple(x.shape)}")
        check_module_input("x", x, "EncoderLayer", self)
        attended, _ = self.attention(x, mask=mask)
        x = self.norm1(x + self.attention_dropout(attended))
        return self.norm2(x + self.ff_dropout(self.linear2(F.gelu(self.linear1(x)))))

    @torch.no_grad()
    def load_from_torch(self, layer: nn.TransformerEncoderLayer) -> EncoderLayer:
        """Copy a post-LN, GELU ``torch.nn.TransformerEncoderLayer`` (``batch_first`` or not) of the same sizes."""
        if not isinstance(layer, nn.TransformerEncoderLayer):
            raise TypeError(f"load_from_torch: layer must be nn.TransformerEncoderLayer, got {type(layer).__name__}")
        if layer.norm_first or layer.activation_relu_or_gelu != 2:
            raise ValueError("load_from_torch: need a post-LN layer (norm_first=False) with activation='gelu', got "
                             f"norm_first={layer.norm_first}, activation={layer.activation}")
        if layer.linear1.weight.shape != self.linear1.weight.shape:
            raise ValueError(f"load_from_torch: feed-forward sizes differ: ours {tuple(self.linear1.weight.shape)}, "
                             f"theirs {tuple(layer.linear1.weight.shape)}")
        self.attention.load_from_torch(layer.self_attn)
        for ours, theirs in ((self.linear1, layer.linear1), (self.linear2, layer.linear2),
                             (self.norm1, layer.norm1), (self.norm2, layer.norm2)):
            ours.weight.copy_(theirs.weight)
            ours.bias.copy_(theirs.bias)
        return self


# --------------------------------------------------------------------------------------- BERT


@dataclass(frozen=True)
class BertConfig:
    """BERT's hyper-parameters, with the field names (and defaults) of ``transformers.BertConfig``."""

    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    layer_norm_eps: float = 1e-12
    initializer_range: float = 0.02
    pad_token_id: int = 0

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                     "max_position_embeddings", "type_vocab_size"):
            positive_int(name, getattr(self, name), "BertConfig")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"BertConfig: hidden_size ({self.hidden_size}) must be divisible by "
                             f"num_attention_heads ({self.num_attention_heads})")
        for name in ("hidden_dropout_prob", "attention_probs_dropout_prob"):
            check_number(name, getattr(self, name), "BertConfig")
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"BertConfig: {name} must be in [0, 1), got {getattr(self, name)!r}")
        check_number("layer_norm_eps", self.layer_norm_eps, "BertConfig", 0.0, low_open=True)
        check_number("initializer_range", self.initializer_range, "BertConfig", 0.0)
        check_int("pad_token_id", self.pad_token_id, "BertConfig")
        if not 0 <= self.pad_token_id < self.vocab_size:
            raise ValueError(f"BertConfig: pad_token_id must lie in [0, vocab_size), got {self.pad_token_id}")

    @classmethod
    def from_hf(cls, hf_config: Any) -> BertConfig:
        """The same sizes as a ``transformers.BertConfig`` (which must use absolute positions and exact GELU)."""
        if getattr(hf_config, "model_type", None) != "bert":
            raise TypeError(f"BertConfig.from_hf: need a transformers BertConfig, got {type(hf_config).__name__}")
        position = getattr(hf_config, "position_embedding_type", "absolute")
        if hf_config.hidden_act != "gelu" or position != "absolute":
            raise ValueError("BertConfig.from_hf: only hidden_act='gelu' and absolute position embeddings are "
                             f"supported, got {hf_config.hidden_act!r} and {position!r}")
        return cls(**{f.name: getattr(hf_config, f.name) for f in fields(cls)})


class BertEmbeddings(nn.Module):
    """``LayerNorm(E_word[ids] + E_pos[0..seq-1] + E_type[token_type_ids])``, then dropout.

    ``forward(input_ids, token_type_ids=None)``: both ``(batch, seq)`` -> ``(batch, seq, hidden_size)``.
    """

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        _check_range(_check_ids(input_ids, "BertEmbeddings"), self.word_embeddings.num_embeddings, "input_ids",
                     "BertEmbeddings")
        if token_type_ids is not None:
            check_int_tensor("token_type_ids", token_type_ids, "BertEmbeddings")
        seq = input_ids.shape[1]
        if seq > self.position_embeddings.num_embeddings:
            raise ValueError(f"BertEmbeddings: sequence length {seq} exceeds max_position_embeddings "
                             f"{self.position_embeddings.num_embeddings}")
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        elif token_type_ids.shape != input_ids.shape:
            raise ValueError(f"BertEmbeddings: token_type_ids must have the shape of input_ids "
                             f"{tuple(input_ids.shape)}, got {tuple(token_type_ids.shape)}")
        else:
            _check_range(token_type_ids, self.token_type_embeddings.num_embeddings, "token_type_ids",
                         "BertEmbeddings")
        positions = torch.arange(seq, device=input_ids.device)
        x = self.word_embeddings(input_ids) + self.position_embeddings(positions)[None] \
            + self.token_type_embeddings(token_type_ids)
        return self.dropout(self.layer_norm(x))


def _init_bert_weights(module: nn.Module, std: float) -> None:
    """BERT's initialisation: N(0, std) weights, zero biases, LayerNorm (1, 0), padding row zero."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0.0, std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, 0.0, std)
            if m.padding_idx is not None:
                with torch.no_grad():
                    m.weight[m.padding_idx].zero_()
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class BertEncoder(nn.Module):
    """BERT: :class:`BertEmbeddings`, ``num_hidden_layers`` post-LN :class:`EncoderLayer`, a ``[CLS]`` pooler.

    ``forward(input_ids, attention_mask=None, token_type_ids=None)``, all ``(batch, seq)``,
    returns an :class:`EncoderOutput`: ``last_hidden_state`` ``(batch, seq, hidden_size)`` and
    ``pooler_output = tanh(W h_[CLS] + b)`` ``(batch, hidden_size)``.
    """

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        if not isinstance(config, BertConfig):
            raise TypeError(f"BertEncoder: config must be mmbook.encoders.BertConfig, got {type(config).__name__} "
                            "(convert a transformers config with BertConfig.from_hf)")
        self.config = config
        self.embeddings = BertEmbeddings(config)
        self.layers = nn.ModuleList(
            EncoderLayer(config.hidden_size, config.num_attention_heads, config.intermediate_size,
                         config.hidden_dropout_prob, config.attention_probs_dropout_prob, config.layer_norm_eps)
            for _ in range(config.num_hidden_layers)
        )
        self.pooler = nn.Linear(config.hidden_size, config.hidden_size)
        _init_bert_weights(self, config.initializer_range)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None) -> EncoderOutput:
        _check_ids(input_ids, "BertEncoder")
        _check_range(input_ids, self.config.vocab_size, "input_ids", "BertEncoder")
        mask = None
        if attention_mask is not None:
            mask = _check_attention_mask(attention_mask, input_ids, "BertEncoder")[:, None, :]  # (batch, 1, seq)
        x = self.embeddings(input_ids, token_type_ids)
        for layer in self.layers:
            x = layer(x, mask)
        return EncoderOutput(x, torch.tanh(self.pooler(x[:, 0])))


class BertForMaskedLM(nn.Module):
    """:class:`BertEncoder` with BERT's masked-LM head; the output matrix is tied to the word embeddings.

    ``forward(input_ids, attention_mask=None, token_type_ids=None)`` returns logits
    ``(batch, seq, vocab_size)``: ``E_word LayerNorm(GELU(W h + b)) + b_out`` at every position.
    """

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.bert = BertEncoder(config)
        self.transform = nn.Linear(config.hidden_size, config.hidden_size)
        self.transform_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.output_bias = nn.Parameter(torch.zeros(config.vocab_size))
        _init_bert_weights(self.transform, config.initializer_range)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        return self._head(self.bert(input_ids, attention_mask, token_type_ids).last_hidden_state)

    def _head(self, h: torch.Tensor) -> torch.Tensor:
        h = self.transform_norm(F.gelu(self.transform(h)))
        return F.linear(h, self.bert.embeddings.word_embeddings.weight, self.output_bias)

    def mlm_loss(self, input_ids: torch.Tensor, labels: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Mean cross-entropy over the positions where ``labels`` ``(batch, seq)`` is not -100.

        Equal to ``cross_entropy(self(...).flatten(0, 1), labels.flatten(), ignore_index=-100)``,
        but the vocabulary projection runs only at the ~15% selected positions.
        """
        if not isinstance(labels, torch.Tensor) or labels.shape != input_ids.shape:
            raise ValueError(f"mlm_loss: labels must be a tensor of the shape of input_ids {tuple(input_ids.shape)}, "
                             f"got {getattr(labels, 'shape', type(labels).__name__)}")
        check_ids("labels", labels, "mlm_loss", self.bert.config.vocab_size, allow=(-100,))
        selected = labels != -100
        if not selected.any():
            raise ValueError("mlm_loss: no position is selected (every label is -100)")
        h = self.bert(input_ids, attention_mask, token_type_ids).last_hidden_state
        return F.cross_entropy(self._head(h[selected]), labels[selected])


def _bert_pairs(ours: BertEncoder | BertForMaskedLM, hf_model: nn.Module, fn: str):
    """The (our tensor, transformers tensor, name) pairs of a BERT, after checking both sides' types and depth."""
    if not isinstance(ours, (BertEncoder, BertForMaskedLM)):
        raise TypeError(f"{fn}: ours must be a BertEncoder or BertForMaskedLM, got {type(ours).__name__}")
    hf_bert = getattr(hf_model, "bert", hf_model)
    if not (hasattr(hf_bert, "embeddings") and hasattr(hf_bert, "encoder") and hasattr(hf_bert, "config")
            and getattr(hf_bert.config, "model_type", None) == "bert"):
        raise TypeError(f"{fn}: hf_model must be a transformers BERT model, got {type(hf_model).__name__}")
    encoder = ours.bert if isinstance(ours, BertForMaskedLM) else ours
    if len(hf_bert.encoder.layer) != len(encoder.layers):
        raise ValueError(f"{fn}: {len(encoder.layers)} layers here, {len(hf_bert.encoder.layer)} in the "
                         "transformers model")
    pairs = []
    e, he = encoder.embeddings, hf_bert.embeddings
    for name in ("word_embeddings", "position_embeddings", "token_type_embeddings"):
        pairs.append((getattr(e, name).weight, getattr(he, name).weight, f"embeddings.{name}"))
    pairs.append((e.layer_norm.weight, he.LayerNorm.weight, "embeddings.LayerNorm.weight"))
    pairs.append((e.layer_norm.bias, he.LayerNorm.bias, "embeddings.LayerNorm.bias"))
    for i, (layer, hl) in enumerate(zip(encoder.layers, hf_bert.encoder.layer, strict=True)):
        modules = (
            (layer.attention.q_proj, hl.attention.self.query), (layer.attention.k_proj, hl.attention.self.key),
            (layer.attention.v_proj, hl.attention.self.value), (layer.attention.out_proj, hl.attention.output.dense),
            (layer.norm1, hl.attention.output.LayerNorm), (layer.linear1, hl.intermediate.dense),
            (layer.linear2, hl.output.dense), (layer.norm2, hl.output.LayerNorm),
        )
        for j, (mine, theirs) in enumerate(modules):
            pairs.append((mine.weight, theirs.weight, f"layer {i}, module {j} weight"))
            pairs.append((mine.bias, theirs.bias, f"layer {i}, module {j} bias"))
    if getattr(hf_bert, "pooler", None) is not None:
        pairs.append((encoder.pooler.weight, hf_bert.pooler.dense.weight, "pooler.weight"))
        pairs.append((encoder.pooler.bias, hf_bert.pooler.dense.bias, "pooler.bias"))
    head = getattr(getattr(hf_model, "cls", None), "predictions", None)
    if isinstance(ours, BertForMaskedLM) and head is not None:
        pairs += [(ours.transform.weight, head.transform.dense.weight, "transform.weight"),
                  (ours.transform.bias, head.transform.dense.bias, "transform.bias"),
                  (ours.transform_norm.weight, head.transform.LayerNorm.weight, "transform_norm.weight"),
                  (ours.transform_norm.bias, head.transform.LayerNorm.bias, "transform_norm.bias"),
                  (ours.output_bias, head.bias, "output_bias")]
    for mine, theirs, name in pairs:
        if mine.shape != theirs.shape:
            raise ValueError(f"{fn}: {name} has shape {tuple(mine.shape)} here but {tuple(theirs.shape)} in the "
                             "transformers model")
    return pairs


@torch.no_grad()
def load_hf_bert_weights(ours: BertEncoder | BertForMaskedLM, hf_model: nn.Module) -> BertEncoder | BertForMaskedLM:
    """Copy a ``transformers`` BERT into ``ours`` and return ``ours``.

    ``hf_model`` is a ``BertModel`` or a model that holds one as ``.bert``
    (``BertForMaskedLM``, ``BertForSequenceClassification``). When both sides have a
    masked-LM head (``ours`` a :class:`BertForMaskedLM`, ``hf_model`` a ``BertForMaskedLM``)
    it is copied too. Sizes must agree (build ``ours`` with :meth:`BertConfig.from_hf`).
    """
    for mine, theirs, _ in _bert_pairs(ours, hf_model, "load_hf_bert_weights"):
        mine.copy_(theirs)
    return ours


@torch.no_grad()
def export_hf_bert_weights(ours: BertEncoder | BertForMaskedLM, hf_model: nn.Module) -> nn.Module:
    """The reverse of :func:`load_hf_bert_weights`: copy ``ours`` into the ``transformers`` BERT ``hf_model``
    (for instance a ``BertForSequenceClassification``, to fine-tune an encoder pre-trained here) and return it.
    Only the parts both sides have are copied; a classification head on ``hf_model`` keeps its initialisation.
    """
    for mine, theirs, _ in _bert_pairs(ours, hf_model, "export_hf_bert_weights"):
        theirs.copy_(mine)
    return hf_model


# ----------------------------------------------------------------------- pooling, heads, MLM


def mean_pool(last_hidden_state: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Average of the real tokens' states: ``(batch, seq, hidden)``, mask ``(batch, seq)`` -> ``(batch, hidden)``.

    This is sentence-transformers' ``mean`` pooling (padding excluded, the count clamped at 1e-9).
    """
    if not isinstance(last_hidden_state, torch.Tensor) or last_hidden_state.ndim != 3:
        raise ValueError(f"mean_pool: last_hidden_state must have shape (batch, seq, hidden), got "
                         f"{getattr(last_hidden_state, 'shape', type(last_hidden_state).__name__)}")
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.shape != last_hidden_state.shape[:2]:
        raise ValueError(f"mean_pool: attention_mask must have shape {tuple(last_hidden_state.shape[:2])}, got "
                         f"{getattr(attention_mask, 'shape', type(attention_mask).__name__)}")
    check_float_tensor("last_hidden_state", last_hidden_state, "mean_pool")
    if not bool(((attention_mask == 0) | (attention_mask == 1)).all()):
        raise ValueError("mean_pool: attention_mask must hold 0/1 (or False/True) values")
    weights = attention_mask.to(last_hidden_state.dtype)[..., None]
    return (last_hidden_state * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1e-9)


class SequenceClassifier(nn.Module):
    """An encoder's ``pooler_output`` -> dropout -> linear layer: logits ``(batch, num_classes)``.

    ``encoder`` is any module called as ``encoder(input_ids, attention_mask[, token_type_ids])``
    that returns an :class:`EncoderOutput` (:class:`GRUEncoder`, :class:`BertEncoder`).
    """

    def __init__(self, encoder: nn.Module, hidden_size: int, num_classes: int, dropout: float = 0.1) -> None:
        super().__init__()
        if not isinstance(encoder, nn.Module):
            raise TypeError(f"SequenceClassifier: encoder must be an nn.Module, got {type(encoder).__name__}")
        positive_int("hidden_size", hidden_size, "SequenceClassifier")
        positive_int("num_classes", num_classes, "SequenceClassifier")
        check_probability("dropout", dropout, "SequenceClassifier", high_inclusive=False)
        self.encoder = encoder
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(hidden_size, num_classes)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        extra = () if token_type_ids is None else (token_type_ids,)
        pooled = getattr(self.encoder(input_ids, attention_mask, *extra), "pooler_output", None)
        if not isinstance(pooled, torch.Tensor) or pooled.shape[-1] != self.head.in_features:
            raise ValueError(f"SequenceClassifier: the encoder must return an EncoderOutput whose pooler_output has "
                             f"hidden_size={self.head.in_features} features, got {getattr(pooled, 'shape', pooled)}")
        return self.head(self.dropout(pooled))


def mask_tokens(
    input_ids: torch.Tensor,
    *,
    mask_token_id: int,
    vocab_size: int,
    special_token_ids: Sequence[int] = (),
    mlm_probability: float = 0.15,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT's masked-LM corruption of ``input_ids`` ``(batch, seq)``.

    Every token that is not special (``special_token_ids``: padding, ``[CLS]``, ``[SEP]``, ...)
    is *selected* independently with probability ``mlm_probability``. A selected token is
    replaced by ``[MASK]`` with probability 0.8, by a uniformly random non-special token with
    probability 0.1, and left unchanged with probability 0.1.

    Returns ``(corrupted_ids, labels)``, both ``(batch, seq)``: ``labels`` holds the original
    id at selected positions and -100 (``cross_entropy``'s ``ignore_index``) elsewhere. Random
    numbers are drawn on the CPU from ``generator`` (or the global generator), so the result
    is the same on every device.
    """
    fn = "mask_tokens"
    _check_ids(input_ids, fn)
    positive_int("vocab_size", vocab_size, fn)
    check_index("mask_token_id", mask_token_id, fn, vocab_size)
    check_number("mlm_probability", mlm_probability, fn, 0.0, 1.0, low_open=True, high_open=True)
    if isinstance(special_token_ids, (str, bytes)) or not isinstance(special_token_ids, Sequence):
        raise TypeError(f"{fn}: special_token_ids must be a sequence of ids, got {type(special_token_ids).__name__}")
    for i in special_token_ids:  # a negative id would protect vocab_size - 1 instead
        check_index("special_token_ids[i]", i, fn, vocab_size)
    check_instance("generator", generator, fn, (torch.Generator, type(None)), "a torch.Generator or None")
    special = torch.tensor(sorted({*special_token_ids, mask_token_id}), dtype=torch.long)
    ids = input_ids.detach().cpu().long()
    if (ids < 0).any() or (ids >= vocab_size).any():
        raise ValueError(f"mask_tokens: input_ids must lie in [0, vocab_size={vocab_size})")
    allowed = torch.ones(vocab_size, dtype=torch.bool)
    allowed[special] = False
    candidates = allowed.nonzero().squeeze(1)  # ids a random replacement may take
    if candidates.numel() == 0:
        raise ValueError(f"{fn}: special_token_ids and mask_token_id cover the whole vocabulary")
    selected = (torch.rand(ids.shape, generator=generator) < mlm_probability) & allowed[ids]
    action = torch.rand(ids.shape, generator=generator)  # < 0.8: [MASK]; 0.8..0.9: random; >= 0.9: keep
    random_ids = candidates[torch.randint(len(candidates), ids.shape, generator=generator)]
    corrupted = ids.clone()
    corrupted[selected & (action < 0.8)] = mask_token_id
    swap = selected & (action >= 0.8) & (action < 0.9)
    corrupted[swap] = random_ids[swap]
    labels = torch.where(selected, ids, torch.full_like(ids, -100))
    return corrupted.to(input_ids.device, input_ids.dtype), labels.to(input_ids.device)


@torch.no_grad()
def sentence_embeddings(
    encoder: nn.Module,
    tokenizer: Any,
    texts: Sequence[str],
    *,
    batch_size: int = 64,
    max_length: int = 128,
    normalize: bool = True,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Mean-pooled (and by default L2-normalised) sentence vectors ``(len(texts), hidden)``, on the CPU.

    ``encoder`` is called as ``encoder(input_ids, attention_mask, token_type_ids)`` and must
    return an :class:`EncoderOutput` (:class:`BertEncoder`); ``tokenizer`` is a Hugging Face
    tokenizer. Texts are batched in order of length, which saves most of the padding, and the
    result is returned in the original order. This is what sentence-transformers computes for
    a model with ``mean`` pooling and a ``Normalize`` module, such as all-MiniLM-L6-v2.
    """
    if isinstance(texts, str) or not texts or not all(isinstance(t, str) for t in texts):
        raise TypeError("sentence_embeddings: texts must be a non-empty sequence of strings")
    fn = "sentence_embeddings"
    check_instance("encoder", encoder, fn, nn.Module, "an nn.Module")
    if not callable(tokenizer):
        raise TypeError(f"{fn}: tokenizer must be a Hugging Face tokenizer (callable), got {type(tokenizer).__name__}")
    positive_int("batch_size", batch_size, fn)
    positive_int("max_length", max_length, fn)
    check_bool("normalize", normalize, fn)
    device = check_device("device", device, fn) if device is not None else next(encoder.parameters()).device
    was_training = encoder.training
    encoder.eval()
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    chunks = []
    for start in range(0, len(order), batch_size):
        batch = tokenizer([texts[i] for i in order[start:start + batch_size]], padding=True, truncation=True,
                          max_length=max_length, return_tensors="pt")
        mask = batch["attention_mask"].to(device)
        out = encoder(batch["input_ids"].to(device), mask, batch["token_type_ids"].to(device)
                      if "token_type_ids" in batch else None)
        vectors = mean_pool(out.last_hidden_state, mask)
        chunks.append((F.normalize(vectors, dim=-1) if normalize else vectors).cpu())
    encoder.train(was_training)
    result = torch.empty(len(texts), chunks[0].shape[1], dtype=chunks[0].dtype)
    result[torch.tensor(order)] = torch.cat(chunks)
    return result
