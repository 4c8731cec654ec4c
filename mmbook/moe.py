"""A sparse mixture of experts (MoE): a top-k router with softmax gates, expert capacity and a load-balancing loss.

A dense feed-forward network applies the same weights to every token. An MoE layer holds ``num_experts``
feed-forward networks (here :class:`mmbook.swiglu.SwiGLU`) and a *router*, a linear map to one logit per
expert. Each token goes to its ``top_k`` experts, and their outputs are mixed with the softmax gates:

    p = softmax(W_router x),   S = top_k(p),   y = sum_{e in S} g_e FFN_e(x),   g_e = p_e  (or p_e / sum_S p)

The model then has ``num_experts`` times the feed-forward parameters but spends only ``top_k`` experts'
FLOPs per token (Mixtral: 8 experts, top 2; Qwen3-30B-A3B: 128 experts, top 8).

Two practical additions. A router left alone tends to send most tokens to a few experts; the Switch
Transformer's auxiliary loss ``E * sum_e f_e P_e`` (``f_e`` the fraction of routing slots that chose expert
``e``, ``P_e`` its mean router probability) is smallest for a uniform load. And with a fixed **capacity**
of ``ceil(capacity_factor * tokens * top_k / num_experts)`` slots per expert (what a static-shape
accelerator kernel needs), the tokens that overflow an expert are *dropped* from it — they contribute nothing
from that expert and pass through the residual connection.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from mmbook.checks import (
    check_bool,
    check_float_tensor,
    check_module_input,
    check_number,
    positive_int,
)
from mmbook.swiglu import SwiGLU

__all__ = ["MoEOutput", "RouterOutput", "SparseMoE", "TopKRouter", "expert_capacity", "load_balancing_loss",
           "load_hf_moe_block"]


class RouterOutput(NamedTuple):
    """``logits`` ``(tokens, num_experts)``; ``weights`` and ``indices`` ``(tokens, top_k)``, best expert first."""

    logits: torch.Tensor
    weights: torch.Tensor
    indices: torch.Tensor


class MoEOutput(NamedTuple):
    """What :class:`SparseMoE` returns.

    ``hidden`` has the shape of the input; ``router_logits`` ``(tokens, num_experts)`` (for
    :func:`load_balancing_loss`); ``expert_load`` ``(num_experts,)`` int64, the routing slots each expert was
    chosen for (before capacity); ``dropped`` the number of slots dropped by the capacity limit (0-dim int64).
    """

    hidden: torch.Tensor
    router_logits: torch.Tensor
    expert_load: torch.Tensor
    dropped: torch.Tensor


def expert_capacity(num_tokens: int, num_experts: int, top_k: int, capacity_factor: float) -> int:
    """Slots per expert: ``ceil(capacity_factor * num_tokens * top_k / num_experts)``.

    A capacity factor of 1 gives every expert exactly its share of a perfectly balanced load.
    """
    fn = "expert_capacity"
    num_tokens = positive_int("num_tokens", num_tokens, fn)
    num_experts = positive_int("num_experts", num_experts, fn)
    top_k = positive_int("top_k", top_k, fn)
    capacity_factor = check_number("capacity_factor", capacity_factor, fn, 0.0, low_open=True)
    return math.ceil(capacity_factor * num_tokens * top_k / num_experts)


class TopKRouter(nn.Module):
    """Router logits ``x W^T`` with ``weight`` ``(num_experts, d_model)``, softmax (in float32), top-k.

    ``x`` ``(..., d_model)`` is flattened to ``(tokens, d_model)``. With ``norm_topk_prob`` the ``top_k`` gates
    are renormalised to sum to 1 (Mixtral, Qwen3-MoE); without, they are the plain softmax probabilities.
    """

    def __init__(self, d_model: int, num_experts: int, top_k: int, norm_topk_prob: bool = True) -> None:
        super().__init__()
        fn = "TopKRouter"
        self.d_model = positive_int("d_model", d_model, fn)
        self.num_experts = positive_int("num_experts", num_experts, fn)
        self.top_k = positive_int("top_k", top_k, fn)
        if top_k > num_experts:
            raise ValueError(f"{fn}: top_k={top_k} cannot exceed num_experts={num_experts}")
        self.norm_topk_prob = check_bool("norm_topk_prob", norm_topk_prob, fn)
        self.weight = nn.Parameter(torch.empty(num_experts, d_model))
        nn.init.normal_(self.weight, std=0.02)

    def forward(self, x: torch.Tensor) -> RouterOutput:
        check_float_tensor("x", x, "TopKRouter", min_ndim=1)
        if x.shape[-1] != self.d_model:
            raise ValueError(f"TopKRouter: x must end in d_model={self.d_model}, got shape {tuple(x.shape)}")
        logits = F.linear(x.reshape(-1, self.d_model), self.weight)  # (N, E)
        probs = torch.softmax(logits.float(), dim=-1)
        weights, indices = torch.topk(probs, self.top_k, dim=-1)  # (N, k), largest first
        if self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return RouterOutput(logits, weights.to(x.dtype), indices)


class SparseMoE(nn.Module):
    """A top-k mixture of :class:`SwiGLU` experts: ``(..., d_model) -> MoEOutput`` with ``hidden`` ``(..., d_model)``.

    ``gate`` is the :class:`TopKRouter`, ``experts`` a ``ModuleList`` of ``num_experts`` SwiGLU networks of
    hidden size ``d_ff``. ``capacity_factor=None`` (the default, as in ``transformers``) never drops a token;
    otherwise each expert takes at most :func:`expert_capacity` routing slots, earlier tokens first (a token's
    second choice can take a slot ahead of a later token's first choice; Switch/GShard fill first choices first).
    """

    def __init__(self, d_model: int, d_ff: int, num_experts: int, top_k: int, norm_topk_prob: bool = True,
                 capacity_factor: float | None = None) -> None:
        super().__init__()
        fn = "SparseMoE"
        self.d_model = positive_int("d_model", d_model, fn)
        positive_int("d_ff", d_ff, fn)
        self.gate = TopKRouter(d_model, num_experts, top_k, norm_topk_prob)
        self.experts = nn.ModuleList(SwiGLU(d_model, d_ff) for _ in range(num_experts))
        self.capacity_factor = (None if capacity_factor is None
                                else check_number("capacity_factor", capacity_factor, fn, 0.0, low_open=True))

    @property
    def num_experts(self) -> int:
        return self.gate.num_experts

    @property
    def top_k(self) -> int:
        return self.gate.top_k

    def forward(self, x: torch.Tensor) -> MoEOutput:
        fn = "SparseMoE"
        check_float_tensor("x", x, fn, min_ndim=1, nonempty=True)
        if x.shape[-1] != self.d_model:
            raise ValueError(f"{fn}: x must end in d_model={self.d_model}, got shape {tuple(x.shape)}")
        check_module_input("x", x, fn, self)
        flat = x.reshape(-1, self.d_model)
        router = self.gate(flat)
        out = torch.zeros_like(flat)
        capacity = (None if self.capacity_factor is None
                    else expert_capacity(flat.shape[0], self.num_experts, self.top_k, self.capacity_factor))
        load = torch.bincount(router.indices.reshape(-1), minlength=self.num_experts)
        dropped = 0
        for e, expert in enumerate(self.experts):
            token, slot = torch.where(router.indices == e)  # tokens in ascending order
            if capacity is not None and token.numel() > capacity:
                dropped += token.numel() - capacity
                token, slot = token[:capacity], slot[:capacity]
            if token.numel() == 0:
                continue
            y = expert(flat[token]) * router.weights[token, slot, None]
            out.index_add_(0, token, y)
        return MoEOutput(out.reshape(x.shape), router.logits, load, torch.tensor(dropped))


def load_balancing_loss(router_logits: torch.Tensor | Sequence[torch.Tensor], top_k: int) -> torch.Tensor:
    """The Switch Transformer's auxiliary loss ``E * sum_e f_e P_e`` (a 0-dim float32 tensor).

    ``router_logits`` is ``(tokens, num_experts)`` or a sequence of them (one per MoE layer, concatenated).
    ``f_e`` is the number of routing slots (``tokens * top_k`` in all) that chose expert ``e``, divided by the
    number of tokens, so ``sum_e f_e = top_k``; ``P_e`` is the mean softmax probability of expert ``e``. A
    perfectly uniform router gives ``top_k``; since every ``f_e <= 1`` and the ``P_e`` sum to 1, the loss is at
    most ``E``, reached when the router puts all its probability on one expert.
    """
    fn = "load_balancing_loss"
    if isinstance(router_logits, torch.Tensor):
        router_logits = [router_logits]
    if isinstance(router_logits, (str, bytes)) or not isinstance(router_logits, Sequence) or not router_logits:
        raise TypeError(f"{fn}: router_logits must be a tensor or a non-empty sequence of tensors, "
                        f"got {type(router_logits).__name__}")
    for i, t in enumerate(router_logits):
        check_float_tensor(f"router_logits[{i}]", t, fn, ndim=2, shape="(tokens, num_experts)", nonempty=True)
        if t.shape[1] != router_logits[0].shape[1]:
            raise ValueError(f"{fn}: every router_logits entry needs {router_logits[0].shape[1]} experts, "
                             f"entry {i} has {t.shape[1]}")
    logits = torch.cat([t.float() for t in router_logits], dim=0)
    num_experts = logits.shape[1]
    top_k = positive_int("top_k", top_k, fn)
    if top_k > num_experts:
        raise ValueError(f"{fn}: top_k={top_k} cannot exceed the {num_experts} experts")
    probs = torch.softmax(logits, dim=-1)  # (N, E)
    chosen = torch.topk(probs, top_k, dim=-1).indices
    fraction = torch.zeros(num_experts, dtype=torch.float32, device=logits.device)
    fraction.scatter_add_(0, chosen.reshape(-1), torch.ones(chosen.numel(), device=logits.device))
    fraction = fraction / logits.shape[0]
    return num_experts * (fraction * probs.mean(dim=0)).sum()


@torch.no_grad()
def load_hf_moe_block(ours: SparseMoE, hf_block: nn.Module) -> SparseMoE:
    """Copy a ``transformers`` sparse MoE block (``Qwen3MoeSparseMoeBlock``, ``MixtralSparseMoeBlock``) into ``ours``.

    ``transformers`` stores the experts as 3-D tensors: ``experts.gate_up_proj`` ``(E, 2 f, d)`` holds each
    expert's ``W_gate`` above its ``W_up``, and ``experts.down_proj`` is ``(E, d, f)``; the router weight is
    ``gate.weight`` ``(E, d)``. Returns ``ours``.
    """
    fn = "load_hf_moe_block"
    if not isinstance(ours, SparseMoE):
        raise TypeError(f"{fn}: ours must be a SparseMoE, got {type(ours).__name__}")
    gate, experts = getattr(hf_block, "gate", None), getattr(hf_block, "experts", None)
    if not isinstance(getattr(gate, "weight", None), torch.Tensor) or \
            not isinstance(getattr(experts, "gate_up_proj", None), torch.Tensor):
        raise TypeError(f"{fn}: hf_block must be a transformers sparse MoE block (gate.weight, experts.gate_up_proj), "
                        f"got {type(hf_block).__name__}")
    e, f = ours.num_experts, ours.experts[0].d_ff
    want = {"gate.weight": (e, ours.d_model), "experts.gate_up_proj": (e, 2 * f, ours.d_model),
            "experts.down_proj": (e, ours.d_model, f)}
    got = {"gate.weight": gate.weight, "experts.gate_up_proj": experts.gate_up_proj,
           "experts.down_proj": experts.down_proj}
    for name, shape in want.items():
        if tuple(got[name].shape) != shape:
            raise ValueError(f"{fn}: {name} has shape {tuple(got[name].shape)}, ours needs {shape}")
    ours.gate.weight.copy_(gate.weight)
    for i, expert in enumerate(ours.experts):
        expert.gate_proj.weight.copy_(experts.gate_up_proj[i, :f])
        expert.up_proj.weight.copy_(experts.gate_up_proj[i, f:])
        expert.down_proj.weight.copy_(experts.down_proj[i])
    return ours
