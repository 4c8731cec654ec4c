"""Speculative decoding: a cheap draft proposes, the target verifies, and the output distribution is the target's.

One round (Leviathan et al., 2023; Chen et al., 2023): the draft model ``q`` proposes ``k`` tokens one after the
other; the target ``p`` scores all of them in *one* forward pass; draft token ``x`` is accepted with probability
``min(1, p(x) / q(x))``; at the first rejection a replacement is drawn from the *residual*
``r(y) = max(0, p(y) - q(y)) / sum_z max(0, p(z) - q(z))`` and the round ends; if all ``k`` are accepted, a bonus
token is drawn from the target's next distribution. Then for every token ``y``

    P(out = y) = q(y) min(1, p(y)/q(y)) + (1 - sum_x min(p(x), q(x))) r(y)
               = min(p(y), q(y)) + max(0, p(y) - q(y)) = p(y),

so the output is distributed exactly as the target's own samples. The expected acceptance per token is
``alpha = sum_x min(p(x), q(x)) = 1 - TV(p, q)``. With greedy decoding (temperature 0) the rule becomes:
accept while the draft's token is the target's argmax; output the target's argmax at the first mismatch.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
from torch import nn

from mmbook.checks import check_float_tensor, check_instance, check_int, check_number, check_tensor
from mmbook.decoder import Decoder

__all__ = ["SpeculativeResult", "acceptance_probability", "exact_output_distribution", "expected_speedup",
           "layer_skip_draft", "residual_distribution", "speculative_generate", "speculative_step"]


def _check_dists(p: object, q: object, fn: str) -> tuple[torch.Tensor, torch.Tensor]:
    for name, d in (("p", p), ("q", q)):
        check_float_tensor(name, d, fn, 1, "(vocab_size,)", nonempty=True, finite=True)
        if bool((d < 0).any()) or abs(float(d.sum()) - 1.0) > 1e-5:
            raise ValueError(f"{fn}: {name} must be a probability distribution (>= 0, sum 1), got sum "
                             f"{float(d.sum()):.6g} and min {float(d.min()):.3g}")
    if p.shape != q.shape:
        raise ValueError(f"{fn}: p and q must have the same shape, got {tuple(p.shape)} and {tuple(q.shape)}")
    return p, q


def acceptance_probability(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """``alpha = sum_x min(p(x), q(x))``: the probability that one draft token is accepted; ``(..., V) -> (...)``."""
    fn = "acceptance_probability"
    check_float_tensor("p", p, fn, min_ndim=1)
    check_float_tensor("q", q, fn, min_ndim=1)
    if p.shape != q.shape:
        raise ValueError(f"{fn}: p and q must have the same shape, got {tuple(p.shape)} and {tuple(q.shape)}")
    return torch.minimum(p, q).sum(-1)


def expected_speedup(alpha: float, k: int, cost: float) -> float:
    """Tokens per unit of target time of speculative decoding against plain decoding, for a constant ``alpha``.

    A round emits ``1 + alpha + ... + alpha^k = (1 - alpha^(k+1)) / (1 - alpha)`` tokens on average and costs
    ``k`` draft steps of ``cost`` target steps each plus one target pass over ``k + 1`` positions, taken to cost one
    step (true while that pass stays memory-bound): ``speed-up = (1 - alpha^(k+1)) / ((1 - alpha) (k cost + 1))``.
    ``alpha`` in ``[0, 1]`` (``alpha = 1`` gives ``(k + 1) / (k cost + 1)``), ``k >= 1``, ``cost >= 0``.
    """
    fn = "expected_speedup"
    alpha = check_number("alpha", alpha, fn, 0.0, 1.0)
    k = check_int("k", k, fn, 1)
    cost = check_number("cost", cost, fn, 0.0)
    tokens = float(k + 1) if alpha == 1.0 else (1 - alpha ** (k + 1)) / (1 - alpha)
    return tokens / (k * cost + 1)


def residual_distribution(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """``max(0, p - q)`` normalised, ``(V,)``; when ``p == q`` (nothing left over) it returns ``p``."""
    p, q = _check_dists(p, q, "residual_distribution")
    r = torch.clamp(p - q, min=0)
    total = r.sum()
    return p.clone() if float(total) <= 0 else r / total


def speculative_step(p: torch.Tensor, q: torch.Tensor, draft_token: int,
                     generator: torch.Generator) -> tuple[bool, int]:
    """Accept ``draft_token`` (drawn from ``q``) with probability ``min(1, p/q)``, else draw from the residual.

    Returns ``(accepted, token)``: the draft token when accepted, the replacement otherwise. The uniform number
    and the replacement come from ``generator`` (CPU).
    """
    fn = "speculative_step"
    p, q = _check_dists(p, q, fn)
    x = check_int("draft_token", draft_token, fn, 0, p.shape[0] - 1)
    if float(q[x]) <= 0:
        raise ValueError(f"{fn}: draft_token {x} has probability 0 under q, so the draft cannot have drawn it")
    check_instance("generator", generator, fn, torch.Generator, "a torch.Generator")
    u = float(torch.rand((), generator=generator, dtype=torch.float64))
    if u < min(1.0, float(p[x]) / float(q[x])):
        return True, x
    r = residual_distribution(p, q).double().cpu()
    return False, int(torch.multinomial(r, 1, generator=generator))


Dist = Callable[[tuple[int, ...]], torch.Tensor]


def exact_output_distribution(target: Dist, draft: Dist, prefix: Sequence[int], k: int, n: int) -> dict:
    """The exact distribution of the first ``n`` tokens that speculative sampling emits, by enumeration.

    ``target(context)`` and ``draft(context)`` return next-token distributions ``(V,)`` (float64) for a tuple of
    token ids. Every draft sequence of ``k`` tokens is enumerated with its probability, then every acceptance
    outcome (accept with ``min(1, p/q)``, else a residual token), and rounds are chained until ``n`` tokens are
    out. Returns ``{tokens (tuple of n ids): probability}``; cost grows like ``V^(n + k)``, for small ``V`` only.
    """
    fn = "exact_output_distribution"
    k = check_int("k", k, fn, 1, 8)
    n = check_int("n", n, fn, 1, 8)
    if not callable(target) or not callable(draft):
        raise TypeError(f"{fn}: target and draft must be callables context -> distribution")
    out: dict[tuple[int, ...], float] = {}

    def emit(context: tuple[int, ...], emitted: tuple[int, ...], prob: float) -> None:
        if len(emitted) >= n:
            key = emitted[:n]
            out[key] = out.get(key, 0.0) + prob
        else:
            run_round(context, emitted, prob)

    def run_round(context: tuple[int, ...], emitted: tuple[int, ...], prob: float) -> None:
        def walk(ctx: tuple[int, ...], i: int, accepted: tuple[int, ...], prob: float) -> None:
            p = target(ctx).double()
            if i == k:  # all k accepted: a bonus token from the target
                for y in range(p.shape[0]):
                    if p[y] > 0:
                        emit(ctx + (y,), emitted + accepted + (y,), prob * float(p[y]))
                return
            q = draft(ctx).double()
            r = residual_distribution(p, q)
            for x in range(q.shape[0]):
                if q[x] <= 0:
                    continue
                a = min(1.0, float(p[x]) / float(q[x]))
                if a > 0:
                    walk(ctx + (x,), i + 1, accepted + (x,), prob * float(q[x]) * a)
                if a < 1:
                    for y in range(r.shape[0]):
                        if r[y] > 0:
                            emit(ctx + (y,), emitted + accepted + (y,), prob * float(q[x]) * (1 - a) * float(r[y]))

        walk(context, 0, (), prob)

    emit(tuple(int(t) for t in prefix), (), 1.0)
    return out


def layer_skip_draft(model: Decoder, keep: Sequence[int]) -> Decoder:
    """A draft model that runs only the layers ``keep`` of ``model`` (sharing, not copying, their weights).

    The embedding, the final norm and the output layer are shared too, so per token the draft reads the kept
    layers *and* the whole output layer: its cost is ``(bytes of the kept layers + output layer) / (bytes of all
    layers + output layer)``, more than ``len(keep) / n_layer``. It needs no training. The draft's module dicts
    are its own (submodules, parameters, buffers and hooks): replacing a submodule of the draft or registering a
    hook on it leaves ``model`` unchanged.
    """
    fn = "layer_skip_draft"
    check_instance("model", model, fn, Decoder, "a Decoder")
    keep = list(keep)
    if not keep or any(not isinstance(i, int) or not 0 <= i < model.config.n_layer for i in keep) \
            or keep != sorted(set(keep)):
        raise ValueError(f"{fn}: keep must be increasing layer indices in [0, {model.config.n_layer}), got {keep}")
    draft = copy.copy(model)  # shallow: shares every parameter tensor and submodule ...
    for attr, value in vars(model).items():  # ... but not the dicts that hold them, nor the hook dicts
        if isinstance(value, dict):
            setattr(draft, attr, type(value)(value))
    draft.layers = nn.ModuleList(model.layers[i] for i in keep)
    draft.config = copy.copy(model.config)
    draft.config.n_layer = len(keep)
    return draft


class SpeculativeResult(NamedTuple):
    """What :func:`speculative_generate` returns: ``tokens`` ``(1, T + new)``, the number of target forward
    passes (``rounds``), the draft tokens proposed and accepted, and ``checked``: the draft tokens the rule
    actually judged (a round stops at its first rejection, so the drafts after it are proposed but never checked;
    ``accepted / checked`` estimates the acceptance rate, ``accepted / proposed`` underestimates it), and
    ``draft_calls``: the draft's forward passes after its prefill (one per proposed token, plus one catch-up pass
    after a round whose drafts were all accepted, except the last round), the count a model of the run's time needs."""

    tokens: torch.Tensor
    rounds: int
    proposed: int
    accepted: int
    checked: int = 0
    draft_calls: int = 0


def _truncate(past: list, length: int) -> list:
    return [(k[:, :, :length], v[:, :, :length]) for k, v in past]


@torch.no_grad()
def speculative_generate(target: Decoder, draft: Decoder, idx: torch.Tensor, max_new_tokens: int, k: int = 4, *,
                         temperature: float = 0.0, generator: torch.Generator | None = None) -> SpeculativeResult:
    """Generate up to ``max_new_tokens`` tokens after ``idx`` ``(1, T)`` with speculative decoding.

    Each round the draft proposes ``k`` tokens (with its own KV cache), the target scores them in one forward
    pass (with its KV cache), and :func:`speculative_step` (``temperature > 0``, draws from ``generator``) or the
    greedy rule (``temperature == 0``) decides. Rejected positions are cut from both caches. Greedy output is
    the target's greedy output token for token; sampled output has the target's distribution.
    """
    fn = "speculative_generate"
    check_instance("target", target, fn, Decoder, "a Decoder")
    check_instance("draft", draft, fn, Decoder, "a Decoder")
    if draft.config.vocab_size != target.config.vocab_size:
        raise ValueError(f"{fn}: draft and target need the same vocabulary, got {draft.config.vocab_size} and "
                         f"{target.config.vocab_size}")
    check_tensor("idx", idx, fn, "int", 2, "(1, T)")
    if idx.shape[0] != 1 or idx.shape[1] < 1:
        raise ValueError(f"{fn}: idx must have shape (1, T >= 1), got {tuple(idx.shape)}")
    max_new_tokens = check_int("max_new_tokens", max_new_tokens, fn, 1)
    k = check_int("k", k, fn, 1)
    temperature = check_number("temperature", temperature, fn, 0.0)
    if temperature > 0:
        check_instance("generator", generator, fn, torch.Generator, "a torch.Generator (temperature > 0)")
    was = {m: m.training for m in (*target.modules(), *draft.modules())}  # the two may share layers
    if any(was.values()):
        target.eval()
        draft.eval()
    tokens = idx[0].tolist()
    start = len(tokens)
    out_t = target(idx[:, :-1], use_cache=True) if idx.shape[1] > 1 else None
    t_past = out_t.past_key_values if out_t is not None else None
    d_out = draft(idx[:, :-1], use_cache=True) if idx.shape[1] > 1 else None
    d_past = d_out.past_key_values if d_out is not None else None
    rounds = proposed = accepted = checked = draft_calls = 0
    dev = idx.device

    def probs(logits: torch.Tensor) -> torch.Tensor:
        return torch.softmax(logits.double() / temperature, dim=-1).cpu()

    try:
        while len(tokens) - start < max_new_tokens:
            n_ctx = len(tokens)  # cached: n_ctx - 1 positions in both models
            kk = min(k, max_new_tokens - (n_ctx - start))
            drafts, q_rows = [], []
            last = tokens[-1]
            for _ in range(kk):
                o = draft(torch.tensor([[last]], device=dev), past_key_values=d_past, use_cache=True)
                d_past = o.past_key_values
                draft_calls += 1
                logit = o.logits[0, -1]
                if temperature == 0:
                    last = int(logit.argmax())
                else:
                    q_rows.append(probs(logit))
                    last = int(torch.multinomial(q_rows[-1], 1, generator=generator))
                drafts.append(last)
            o = target(torch.tensor([[tokens[-1]] + drafts], device=dev), past_key_values=t_past, use_cache=True)
            t_past = o.past_key_values
            rounds += 1
            proposed += kk
            new: list[int] = []
            for i, x in enumerate(drafts):
                if temperature == 0:
                    best = int(o.logits[0, i].argmax())
                    ok, tok = best == x, best
                else:
                    ok, tok = speculative_step(probs(o.logits[0, i]), q_rows[i], x, generator)
                new.append(tok)
                checked += 1
                if not ok:
                    break
                accepted += 1
            else:  # every draft accepted: a bonus token from the target
                logit = o.logits[0, kk]
                new.append(int(logit.argmax()) if temperature == 0
                           else int(torch.multinomial(probs(logit), 1, generator=generator)))
            new = new[: max_new_tokens - (n_ctx - start)]
            tokens.extend(new)
            if len(tokens) - start >= max_new_tokens:
                break  # done: no cache needs to follow the new tokens
            keep = len(tokens) - 1  # the last token is not yet in any cache
            t_past = _truncate(t_past, keep)
            d_past = _truncate(d_past, min(keep, d_past[0][0].shape[2]))
            if d_past[0][0].shape[2] < keep:  # the draft has not seen the bonus token's predecessor
                o = draft(torch.tensor([tokens[d_past[0][0].shape[2]:keep]], device=dev), past_key_values=d_past,
                          use_cache=True)
                d_past = o.past_key_values
                draft_calls += 1
    finally:
        if any(was.values()):
            for m, mode in was.items():
                m.training = mode
    return SpeculativeResult(torch.tensor([tokens], device=dev), rounds, proposed, accepted, checked, draft_calls)
