"""Reinforcement learning for language models (chapter 19): REINFORCE, PPO's clipped objective, GRPO, the
evaluation of sampled answers (pass@k, majority vote), and a task with a verifiable reward: the parity of a bit
string, answered directly or through a scratchpad of running parities.

The losses take per-token or per-sequence log-probabilities (:func:`mmbook.preference.token_logprobs`) so that
they work with any causal LM. The parity task writes every problem of ``n`` bits with the same width
(``"0110="`` -> ``"0"``, or with the scratchpad ``"0100"``, the answer last), so a batch of prompts needs no
padding and an answer is exactly a fixed number of tokens; :func:`noisy_parity_trace` is a teacher that slips.
:func:`train_answers` fine-tunes on (prompt, answer) pairs and :func:`grpo_train` runs GRPO with any prompt writer
and any verifiable reward.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Hashable, Sequence
from typing import Any, NamedTuple

import torch
from torch import nn

from mmbook.cache import cached_training
from mmbook.checks import (
    check_bool,
    check_device,
    check_float_tensor,
    check_instance,
    check_int,
    check_number,
    check_same_shape,
    check_tensor,
    positive_int,
)
from mmbook.core import set_seed, torch_generator
from mmbook.decoder import Decoder, DecoderConfig
from mmbook.optim import WarmupCosine
from mmbook.preference import policy_optimizer, token_logprobs, upcast_log_softmax

__all__ = ["VOCAB", "Chapter19Parity", "TrainHistory", "chapter19_recipes", "chapter19_sft_model",
           "decode", "encode", "generate_answers", "group_advantages", "grpo_loss",
           "grpo_train", "kl_k3", "majority_vote",
           "noisy_parity_trace", "parity_answer", "parity_problems", "parity_prompt", "parity_reward",
           "pass_at_k", "ppo_clip_loss", "reinforce_loss", "sample_and_grade", "sequence_kl", "train_answers"]

VOCAB = "0123456789+=,"
_INDEX = {ch: i for i, ch in enumerate(VOCAB)}


# --- losses -----------------------------------------------------------------------------------------------

def reinforce_loss(logps: torch.Tensor, rewards: torch.Tensor, baseline: float | torch.Tensor = 0.0) -> torch.Tensor:
    """REINFORCE: ``-mean((r - b) log pi(y))`` over sampled responses ``(batch,)``; its gradient is an unbiased
    estimate of ``-grad E[r]`` for any baseline ``b`` that does not depend on the sampled response."""
    fn = "reinforce_loss"
    check_float_tensor("logps", logps, fn, 1, "(batch,)", nonempty=True)
    check_float_tensor("rewards", rewards, fn, 1, "(batch,)", finite=True)
    check_same_shape(fn, logps=logps, rewards=rewards)
    if isinstance(baseline, torch.Tensor):
        check_float_tensor("baseline", baseline, fn, (0, 1), finite=True)
    else:
        baseline = check_number("baseline", baseline, fn)
    return -((rewards - baseline).detach() * logps).mean()


def _check_ratio_inputs(fn: str, logp_new: torch.Tensor, logp_old: torch.Tensor, advantages: torch.Tensor,
                        clip_eps: float) -> float:
    check_float_tensor("logp_new", logp_new, fn, min_ndim=1, nonempty=True)
    check_float_tensor("logp_old", logp_old, fn, min_ndim=1)
    check_same_shape(fn, logp_new=logp_new, logp_old=logp_old)
    check_float_tensor("advantages", advantages, fn, 1, "(batch,)", finite=True)
    if advantages.shape[0] != logp_new.shape[0]:
        raise ValueError(f"{fn}: advantages must have one entry per row of logp_new ({logp_new.shape[0]}), "
                         f"got {advantages.shape[0]}")
    return check_number("clip_eps", clip_eps, fn, 0.0, 1.0, low_open=True, high_open=True)


def _clipped(logp_new: torch.Tensor, logp_old: torch.Tensor, advantages: torch.Tensor, clip_eps: float) -> torch.Tensor:
    a = advantages.detach().reshape(-1, *([1] * (logp_new.ndim - 1)))
    ratio = torch.exp(logp_new - logp_old.detach())
    return torch.minimum(ratio * a, ratio.clamp(1 - clip_eps, 1 + clip_eps) * a)


def ppo_clip_loss(logp_new: torch.Tensor, logp_old: torch.Tensor, advantages: torch.Tensor,
                  clip_eps: float = 0.2, mask: torch.Tensor | None = None) -> torch.Tensor:
    """PPO's clipped surrogate, negated: ``-mean(min(rho A, clip(rho, 1-eps, 1+eps) A))``, ``rho = pi/pi_old``.

    ``logp_new`` / ``logp_old``: ``(batch,)`` (per response) or ``(batch, T)`` (per token); ``advantages``:
    ``(batch,)``. Per token, ``mask`` ``(batch, T)`` bool (True on response tokens, at least one per row) is
    required: the terms are averaged over each response's tokens, then over responses (padding never counts).
    """
    fn = "ppo_clip_loss"
    clip_eps = _check_ratio_inputs(fn, logp_new, logp_old, advantages, clip_eps)
    if logp_new.ndim == 1:
        if mask is not None:
            raise ValueError(f"{fn}: mask is for per-token log-probabilities (batch, T); logp_new has shape "
                             f"{tuple(logp_new.shape)}")
        return -_clipped(logp_new, logp_old, advantages, clip_eps).mean()
    if logp_new.ndim != 2:
        raise ValueError(f"{fn}: logp_new must be (batch,) or (batch, T), got shape {tuple(logp_new.shape)}")
    if mask is None:
        raise ValueError(f"{fn}: per-token log-probabilities (batch, T) need mask (batch, T), True on response "
                         "tokens, so that padding is not averaged in")
    check_tensor("mask", mask, fn, "bool", 2, "(batch, T)")
    check_same_shape(fn, logp_new=logp_new, mask=mask)
    if not bool(mask.any(dim=1).all()):
        raise ValueError(f"{fn}: every row of mask must mark at least one response token")
    m = mask.to(logp_new.dtype)
    per_seq = (_clipped(logp_new, logp_old, advantages, clip_eps) * m).sum(1) / m.sum(1)
    return -per_seq.mean()


def group_advantages(rewards: torch.Tensor, eps: float = 1e-6, scale: bool = True) -> torch.Tensor:
    """GRPO's group-relative advantages: ``(r - mean_group) / (std_group + eps)`` for ``rewards``
    ``(n_prompts, group)``; the sample standard deviation (``unbiased``), as in DeepSeekMath. ``scale=False``
    only subtracts the mean (Dr. GRPO). A group whose rewards are all equal gets advantages 0."""
    fn = "group_advantages"
    check_float_tensor("rewards", rewards, fn, 2, "(n_prompts, group)", finite=True)
    if rewards.shape[1] < 2:
        raise ValueError(f"{fn}: a group needs at least 2 samples, got shape {tuple(rewards.shape)}")
    eps = check_number("eps", eps, fn, 0.0, low_open=True)
    check_bool("scale", scale, fn)
    centred = rewards - rewards.mean(dim=1, keepdim=True)
    return centred / (rewards.std(dim=1, keepdim=True) + eps) if scale else centred


def kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Schulman's ``k3`` estimator of ``KL(pi || pi_ref)`` from tokens sampled from ``pi``:
    ``exp(ref - logp) - (ref - logp) - 1`` elementwise (unbiased, and never negative)."""
    fn = "kl_k3"
    check_float_tensor("logp", logp, fn, min_ndim=1)
    check_float_tensor("ref_logp", ref_logp, fn, min_ndim=1)
    check_same_shape(fn, logp=logp, ref_logp=ref_logp)
    d = ref_logp - logp
    return torch.exp(d) - d - 1


def grpo_loss(logp_new: torch.Tensor, logp_old: torch.Tensor, ref_logp: torch.Tensor, advantages: torch.Tensor,
              mask: torch.Tensor, clip_eps: float = 0.2, beta: float = 0.04) -> tuple[torch.Tensor, torch.Tensor]:
    """GRPO (DeepSeekMath): per token, PPO's clipped term with the response's group advantage minus
    ``beta`` times the ``k3`` KL estimate to the reference; averaged over each response's tokens, then over
    responses; negated. Returns ``(loss, mean k3 KL per token)``.

    ``logp_new``, ``logp_old``, ``ref_logp``: ``(batch, T)`` token log-probabilities; ``advantages`` ``(batch,)``;
    ``mask`` ``(batch, T)`` bool, True on response tokens (at least one per row).
    """
    fn = "grpo_loss"
    clip_eps = _check_ratio_inputs(fn, logp_new, logp_old, advantages, clip_eps)
    check_float_tensor("ref_logp", ref_logp, fn, 2, "(batch, T)")
    check_tensor("mask", mask, fn, "bool", 2, "(batch, T)")
    if logp_new.ndim != 2:
        raise ValueError(f"{fn}: logp_new must be (batch, T), got shape {tuple(logp_new.shape)}")
    check_same_shape(fn, logp_new=logp_new, ref_logp=ref_logp, mask=mask)
    if not bool(mask.any(dim=1).all()):
        raise ValueError(f"{fn}: every row of mask must mark at least one response token")
    beta = check_number("beta", beta, fn, 0.0)
    m = mask.to(logp_new.dtype)
    kl = kl_k3(logp_new, ref_logp.detach())
    per_token = _clipped(logp_new, logp_old, advantages, clip_eps) - beta * kl
    per_seq = (per_token * m).sum(1) / m.sum(1)
    return -per_seq.mean(), ((kl * m).sum() / m.sum()).detach()


# --- evaluation of samples ----------------------------------------------------------------------------------

def pass_at_k(n: int, c: int, k: int) -> float:
    """The unbiased estimator of pass@k from ``n`` samples of which ``c`` are correct (Chen et al., 2021):
    ``1 - C(n - c, k) / C(n, k)``, the chance that ``k`` of the ``n`` drawn without replacement hold a correct one."""
    fn = "pass_at_k"
    n = positive_int("n", n, fn)
    c = check_int("c", c, fn, 0, n)
    k = check_int("k", k, fn, 1, n)
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def majority_vote(answers: Sequence[Hashable]) -> Hashable:
    """The most frequent answer; a tie goes to the answer that appeared first (deterministic, no set order)."""
    fn = "majority_vote"
    if isinstance(answers, (str, bytes)) or not isinstance(answers, Sequence):
        raise TypeError(f"{fn}: answers must be a sequence (list or tuple) of answers, got {type(answers).__name__}")
    if len(answers) == 0:
        raise ValueError(f"{fn}: answers must not be empty")
    counts: dict[Hashable, int] = {}
    for a in answers:
        counts[a] = counts.get(a, 0) + 1
    best = max(counts.values())
    return next(a for a in answers if counts[a] == best)


# --- the parity task ----------------------------------------------------------------------------------------

def encode(text: str) -> list[int]:
    """Token ids of ``text`` over :data:`VOCAB` (digits, ``+``, ``=``, ``,``; the parity task uses ``0``, ``1``
    and ``=``)."""
    if not isinstance(text, str):
        raise TypeError(f"encode: text must be a str, got {type(text).__name__}")
    bad = sorted({ch for ch in text if ch not in _INDEX})
    if bad:
        raise ValueError(f"encode: text may contain only {VOCAB!r}, got {bad}")
    return [_INDEX[ch] for ch in text]


def decode(ids: Sequence[int] | torch.Tensor) -> str:
    """The text of token ids over :data:`VOCAB`."""
    values = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
    if any(not isinstance(i, int) or not 0 <= i < len(VOCAB) for i in values):
        raise ValueError(f"decode: ids must be ints in [0, {len(VOCAB)}), got {values}")
    return "".join(VOCAB[i] for i in values)


def parity_problems(n_bits: int) -> list[tuple[int, ...]]:
    """All ``2**n_bits`` bit strings of length ``n_bits`` (tuples of 0/1), in counting order."""
    n_bits = check_int("n_bits", n_bits, "parity_problems", 1, 16)
    return [tuple((i >> k) & 1 for k in range(n_bits)) for i in range(2 ** n_bits)]


def _check_bits(bits: Sequence[int], fn: str) -> None:
    if not isinstance(bits, (tuple, list)) or not bits or any(b not in (0, 1) or isinstance(b, bool) for b in bits):
        raise ValueError(f"{fn}: bits must be a non-empty tuple or list of 0s and 1s, got {bits!r}")


def parity_prompt(bits: Sequence[int]) -> str:
    """``"0110="``: the bits, then ``=``."""
    _check_bits(bits, "parity_prompt")
    return "".join(map(str, bits)) + "="


def parity_answer(bits: Sequence[int], scratchpad: bool = False) -> str:
    """The parity (XOR) of ``bits`` as ``"0"`` or ``"1"``; with ``scratchpad`` the running parity after every bit
    (``0110`` -> ``"0100"``), one XOR per written token, the answer last."""
    _check_bits(bits, "parity_answer")
    check_bool("scratchpad", scratchpad, "parity_answer")
    running, out = 0, []
    for b in bits:
        running ^= b
        out.append(str(running))
    return "".join(out) if scratchpad else out[-1]


def noisy_parity_trace(bits: Sequence[int], p: float, generator: torch.Generator) -> str:
    """A noisy teacher's scratchpad for ``bits``: the running parity, each written step flipped with probability
    ``p`` (one ``torch.rand`` draw from ``generator`` per bit). The trace goes on from what was written, so the
    last token (the answer) is the parity of the corrupted trace: wrong when an odd number of steps was flipped."""
    fn = "noisy_parity_trace"
    _check_bits(bits, fn)
    p = check_number("p", p, fn, 0.0, 1.0)
    check_instance("generator", generator, fn, torch.Generator, "a torch.Generator")
    running, out = 0, []
    for b in bits:
        running ^= b
        running ^= int(torch.rand((), generator=generator).item() < p)
        out.append(str(running))
    return "".join(out)


def parity_reward(texts: Sequence[str], problems: Sequence[Sequence[int]]) -> torch.Tensor:
    """1.0 where the last character of a generated answer is the parity of the problem's bits, else 0.0
    (``(len(texts),)`` float32): a verifiable reward for answer-only and scratchpad answers alike."""
    fn = "parity_reward"
    if isinstance(texts, (str, bytes)) or not isinstance(texts, Sequence):
        raise TypeError(f"{fn}: texts must be a sequence (list or tuple) of str, got {type(texts).__name__}")
    if len(texts) != len(problems):
        raise ValueError(f"{fn}: got {len(texts)} texts for {len(problems)} problems")
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise TypeError(f"{fn}: texts[{i}] must be a str (a decoded answer), got {type(t).__name__}")
    return torch.tensor([1.0 if t[-1:] == parity_answer(p) else 0.0 for t, p in zip(texts, problems, strict=True)])


# --- training and sampling ----------------------------------------------------------------------------------

def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


class TrainHistory(NamedTuple):
    """``losses``: the loss of every step; ``eval_steps`` / ``evals``: when ``evaluate`` ran and what it returned."""

    losses: list[float]
    eval_steps: list[int]
    evals: list[Any]


def train_answers(model: nn.Module, prompts: torch.Tensor, answers: torch.Tensor, *, steps: int, batch_size: int,
                  lr: float, seed: int = 0, weight_decay: float = 0.0,
                  evaluate: Callable[[nn.Module], Any] | None = None, eval_every: int = 100) -> TrainHistory:
    """Supervised training on (prompt, answer) pairs with the loss on the answer tokens only.

    ``prompts`` ``(N, P)`` and ``answers`` ``(N, A)`` int64 ids; AdamW with a cosine decay to 0 over all ``steps``
    (:class:`mmbook.optim.WarmupCosine` without warm-up), capped by a linear warm-up over the first 10% of the steps
    (the factor is ``min((s + 1) / W, cosine(s))``); batches drawn with a seeded generator. ``evaluate(model)`` runs
    every ``eval_every`` steps and after the last. Leaves the model in train mode.
    """
    fn = "train_answers"
    check_instance("model", model, fn, nn.Module, "a torch.nn.Module")
    check_tensor("prompts", prompts, fn, "int", 2, "(N, P)")
    check_tensor("answers", answers, fn, "int", 2, "(N, A)")
    if prompts.shape[0] != answers.shape[0]:
        raise ValueError(f"{fn}: prompts and answers must have as many rows, "
                         f"got {prompts.shape[0]} and {answers.shape[0]}")
    steps = positive_int("steps", steps, fn)
    batch_size = positive_int("batch_size", batch_size, fn)
    lr = check_number("lr", lr, fn, 0.0, low_open=True)
    eval_every = positive_int("eval_every", eval_every, fn)
    device = _device(model)
    seqs = torch.cat([prompts, answers], dim=1).long()
    targets = seqs.clone()
    targets[:, :prompts.shape[1]] = -100  # no loss on the prompt
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=weight_decay)
    warm = max(1, steps // 10)
    cosine = WarmupCosine(0, steps)  # the cosine from the first step; the warm-up ramp caps it for 10% of the steps
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min((s + 1) / warm, cosine(s)))
    gen = torch_generator(seed)
    losses: list[float] = []
    eval_steps: list[int] = []
    evals: list[Any] = []
    model.train()
    for step in range(1, steps + 1):
        idx = torch.randint(0, seqs.shape[0], (batch_size,), generator=gen)
        x, y = seqs[idx].to(device), targets[idx].to(device)
        loss = model(x[:, :-1], y[:, 1:]).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if evaluate is not None and (step % eval_every == 0 or step == steps):
            eval_steps.append(step)
            evals.append(evaluate(model))
            model.train()
    return TrainHistory(losses, eval_steps, evals)


def generate_answers(model: nn.Module, prompts: torch.Tensor, n_new: int, temperature: float = 0.0,
                     generator: torch.Generator | None = None) -> list[str]:
    """The ``n_new`` tokens that ``model.generate`` appends to each prompt ``(N, P)``, as text (greedy at
    ``temperature=0``, else sampled with ``generator``)."""
    fn = "generate_answers"
    check_tensor("prompts", prompts, fn, "int", 2, "(N, P)")
    n_new = positive_int("n_new", n_new, fn)
    out = model.generate(prompts.to(_device(model)), n_new, temperature=temperature, generator=generator)
    return [decode(row) for row in out[:, prompts.shape[1]:].cpu()]


@torch.no_grad()
def sample_and_grade(model: nn.Module, prompts: torch.Tensor, problems: Sequence[Any], *, k: int, n_new: int,
                     reward_fn: Callable[[Sequence[str], Sequence[Any]], torch.Tensor], temperature: float = 1.0,
                     generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Samples ``k`` answers of ``n_new`` tokens for each of the prompts ``(N, P)`` (the problems ``problems[i]``)
    at ``temperature`` with ``generator``, and grades them with ``reward_fn(texts, problems)`` (e.g.
    :func:`parity_reward`). Returns ``(sequences, rewards)``: the prompts with their answers ``(N * k, P + n_new)``
    on the model's device (the ``k`` samples of a prompt consecutive) and the rewards ``(N, k)``."""
    fn = "sample_and_grade"
    check_instance("model", model, fn, nn.Module, "a torch.nn.Module")
    check_tensor("prompts", prompts, fn, "int", 2, "(N, P)")
    if isinstance(problems, (str, bytes)) or not isinstance(problems, Sequence):
        raise TypeError(f"{fn}: problems must be a sequence (list or tuple), got {type(problems).__name__}")
    if len(problems) != prompts.shape[0]:
        raise ValueError(f"{fn}: problems must hold one problem per prompt ({prompts.shape[0]}), got {len(problems)}")
    k = positive_int("k", k, fn)
    n_new = positive_int("n_new", n_new, fn)
    temperature = check_number("temperature", temperature, fn, 0.0, low_open=True)
    if not callable(reward_fn):
        raise TypeError(f"{fn}: reward_fn must be callable, got {type(reward_fn).__name__}")
    batch = prompts.repeat_interleave(k, 0).to(_device(model))
    seqs = model.generate(batch, n_new, temperature=temperature, generator=generator)
    texts = [decode(row) for row in seqs[:, prompts.shape[1]:].cpu()]
    rewards = reward_fn(texts, [p for p in problems for _ in range(k)])
    return seqs, rewards.reshape(prompts.shape[0], k)


@torch.no_grad()
def sequence_kl(policy: nn.Module, ref: nn.Module, ids: torch.Tensor, n_response: int) -> torch.Tensor:
    """Exact ``KL(pi(.|prefix) || pi_ref(.|prefix))`` summed over the last ``n_response`` positions of each
    sequence ``ids`` ``(N, T)`` (the full next-token distributions, not a sampled estimate): ``(N,)``. With
    ``ids`` sampled from ``pi`` its mean estimates the sequence-level KL of the two policies."""
    fn = "sequence_kl"
    check_tensor("ids", ids, fn, "int", 2, "(N, T)")
    n_response = check_int("n_response", n_response, fn, 1, ids.shape[1] - 1)
    lp, lr = (upcast_log_softmax(m(ids).logits[:, -n_response - 1:-1]) for m in (policy, ref))
    return (lp.exp() * (lp - lr)).sum(-1).sum(-1)


def grpo_train(policy: nn.Module, ref: nn.Module, problems: Sequence[Any], *, steps: int, n_prompts: int,
               group: int, n_new: int, lr: float, prompt_fn: Callable[[Any], str],
               reward_fn: Callable[[Sequence[str], Sequence[Any]], torch.Tensor], beta: float = 0.04,
               clip_eps: float = 0.2, temperature: float = 1.0, seed: int = 0, warmup: int = 10,
               evaluate: Callable[[nn.Module], Any] | None = None, eval_every: int = 10) -> dict[str, list[Any]]:
    """GRPO with a verifiable reward: each step draws ``n_prompts`` problems, samples ``group`` answers of
    ``n_new`` tokens per problem at ``temperature``, and takes one step of
    :func:`mmbook.preference.policy_optimizer` (AdamW, betas 0.9 and 0.99, no weight decay, a linear warm-up over
    ``warmup`` steps, then a constant learning rate; the optimiser of :func:`mmbook.preference.dpo_train`; gradient
    norm clipped to 1) on :func:`grpo_loss` (on-policy, so ``logp_old`` is the detached current policy and the
    ratio is 1 at the step).

    ``prompt_fn(problem)`` writes a problem's prompt over :data:`VOCAB` (every prompt must have the same length, e.g.
    :func:`parity_prompt`) and ``reward_fn(texts, problems)`` grades the ``n_prompts * group`` sampled answers: it
    must return a floating tensor ``(n_prompts * group,)`` of finite rewards (e.g. :func:`parity_reward`). ``beta``
    multiplies the ``k3`` KL estimate averaged over an answer's tokens; the clipped advantage term is averaged over
    the same tokens, so the ``1 / n_new`` scales both terms alike, and ``beta`` is the price of one nat of the
    answer's sequence KL in units of the standardised group advantage (in units of the raw reward, ``beta`` times
    the group's reward standard deviation). ``ref`` is only read: its log-probabilities are
    computed without gradients in eval mode, and its mode is restored afterwards (its ``requires_grad`` flags are
    never touched), so it may be the same model a later run trains.

    Returns ``{"reward": mean sampled reward per step, "kl": mean k3 KL per token per step, "eval_step": [...],
    "eval": evaluate(policy) at step 0 and every ``eval_every`` steps and at the end}``.
    """
    fn = "grpo_train"
    check_instance("policy", policy, fn, nn.Module, "a torch.nn.Module")
    check_instance("ref", ref, fn, nn.Module, "a torch.nn.Module")
    if ref is policy:
        raise ValueError(f"{fn}: ref must be a separate, frozen copy of the starting policy, got the policy itself")
    steps = positive_int("steps", steps, fn)
    n_prompts = positive_int("n_prompts", n_prompts, fn)
    group = check_int("group", group, fn, 2)
    n_new = positive_int("n_new", n_new, fn)
    lr = check_number("lr", lr, fn, 0.0, low_open=True)
    beta = check_number("beta", beta, fn, 0.0)
    clip_eps = check_number("clip_eps", clip_eps, fn, 0.0, 1.0, low_open=True, high_open=True)
    temperature = check_number("temperature", temperature, fn, 0.0, low_open=True)
    seed = check_int("seed", seed, fn, 0)
    warmup = positive_int("warmup", warmup, fn)
    eval_every = positive_int("eval_every", eval_every, fn)
    for name, f in (("prompt_fn", prompt_fn), ("reward_fn", reward_fn)):
        if not callable(f):
            raise TypeError(f"{fn}: {name} must be callable, got {type(f).__name__}")
    if evaluate is not None and not callable(evaluate):
        raise TypeError(f"{fn}: evaluate must be a callable evaluate(policy) or None, got {type(evaluate).__name__}")
    if isinstance(problems, (str, bytes)) or not isinstance(problems, Sequence):
        raise TypeError(f"{fn}: problems must be a sequence (list or tuple), got {type(problems).__name__}")
    if len(problems) < n_prompts:
        raise ValueError(f"{fn}: need at least n_prompts={n_prompts} problems, got {len(problems)}")
    device = _device(policy)
    encoded = [encode(prompt_fn(p)) for p in problems]
    lengths = sorted({len(e) for e in encoded})
    if len(lengths) != 1:
        raise ValueError(f"{fn}: every prompt must have the same length, got lengths {lengths}")
    prompts_all = torch.tensor(encoded)
    n_samples = n_prompts * group
    opt, sched = policy_optimizer(policy.parameters(), lr, steps, warmup)
    gen = torch_generator(seed)
    ref_was_training = ref.training
    ref.eval()
    hist: dict[str, list[Any]] = {"reward": [], "kl": [], "eval_step": [], "eval": []}
    try:
        for step in range(steps + 1):
            if evaluate is not None and (step % eval_every == 0 or step == steps):
                hist["eval_step"].append(step)
                hist["eval"].append(evaluate(policy))
            if step == steps:
                break
            pick = torch.randint(0, len(problems), (n_prompts,), generator=gen)
            batch = prompts_all[pick].repeat_interleave(group, dim=0).to(device)
            seqs = policy.generate(batch, n_new, temperature=temperature, generator=gen)
            texts = [decode(row) for row in seqs[:, batch.shape[1]:].cpu()]
            rewards = reward_fn(texts, [problems[i] for i in pick.tolist() for _ in range(group)])
            if not isinstance(rewards, torch.Tensor) or not rewards.is_floating_point():
                got = f"a {rewards.dtype} tensor" if isinstance(rewards, torch.Tensor) else type(rewards).__name__
                raise TypeError(f"{fn}: reward_fn must return a floating-point tensor, got {got}")
            if tuple(rewards.shape) != (n_samples,):
                raise ValueError(f"{fn}: reward_fn must return one reward per sampled answer, shape ({n_samples},) "
                                 f"(n_prompts * group), got shape {tuple(rewards.shape)}")
            if not bool(torch.isfinite(rewards).all()):
                raise ValueError(f"{fn}: reward_fn returned NaN or infinite rewards")
            rewards = rewards.to(torch.float32)
            adv = group_advantages(rewards.cpu().view(n_prompts, group)).reshape(-1).to(device)
            policy.train()
            logp = token_logprobs(policy, seqs)[:, -n_new:]
            with torch.no_grad():
                ref_logp = token_logprobs(ref, seqs)[:, -n_new:]
            mask = torch.ones_like(logp, dtype=torch.bool)
            loss, kl = grpo_loss(logp, logp.detach(), ref_logp, adv, mask, clip_eps, beta)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
            opt.step()
            sched.step()
            hist["reward"].append(float(rewards.mean()))
            hist["kl"].append(float(kl))
    finally:
        ref.train(ref_was_training)
    return hist


def chapter19_recipes() -> dict[str, dict[str, Any]]:
    """The cache recipes (``mmbook.cache`` keys) of chapter 19's parity models, in one place for the chapter, its
    solutions and the tests; a fresh copy on every call.

    ``"parity"``: the split of the 256 strings of 8 bits (``split_seed`` 70, 128 for training) and the training of a
    2-layer ``Decoder`` (d_model 64, 4 heads) by :func:`train_answers` (300 steps of 64, lr 3e-3, weight decay 0.1;
    seeds 71 for the initial weights, 72 for the batches); ``"scratchpad"``: section 7's scratchpad model (the parity
    recipe with ``task``); ``"noisy_sft"``: section 8's fine-tuning of that model on the noisy teacher (every step
    flipped with probability 0.1, 16 copies per training string, 150 steps; seeds 80 for the noise, 82 for the
    batches); ``"rl_common"``: the settings that section 8's GRPO and section 9's DPO runs share.
    """
    parity = {"bits": 8, "split_seed": 70, "n_train": 128, "n_layer": 2, "n_head": 4, "d_model": 64,
              "steps": 300, "batch": 64, "lr": 3e-3, "weight_decay": 0.1, "seeds": [71, 72]}
    scratchpad = {"task": "scratchpad", **parity}
    noisy_sft = {"task": "noisy parity", "p": 0.1, "copies": 16, "steps": 150, "lr": 3e-3, "seeds": [80, 82],
                 "start": scratchpad, "version": 2}
    rl_common = {"sft": noisy_sft, "steps": 100, "optimizer": "policy_optimizer, warm-up 10, clip 1",
                 "eval": {"strings": "test_bits[:32]", "samples": 16, "seed": 90, "every": 20}, "version": 4}
    return copy.deepcopy({"parity": parity, "scratchpad": scratchpad, "noisy_sft": noisy_sft,
                          "rl_common": rl_common})


class Chapter19Parity(NamedTuple):
    """What :func:`chapter19_sft_model` builds: ``model``, the noisy-teacher SFT model (eval mode); the split
    (``train_bits``, ``test_bits``: 128 strings each, as tuples of bits) and their prompts ``(128, 9)``."""

    model: nn.Module
    train_bits: list[tuple[int, ...]]
    test_bits: list[tuple[int, ...]]
    train_prompts: torch.Tensor
    test_prompts: torch.Tensor


def chapter19_sft_model(device: str | torch.device = "cpu") -> Chapter19Parity:
    """Chapter 19's noisy-teacher SFT model, built as the chapter builds it, from the recipes of
    :func:`chapter19_recipes`: section 7's scratchpad model, then section 8's fine-tuning on noisy traces. Both
    are trained once and cached (``mmbook.cache.cached_training``, prefixes ``ch19_parity`` and ``ch19_noisy_sft``:
    the chapter's own entries), so after the chapter has run this only loads them. Every seed goes through
    ``mmbook`` (``MMBOOK_SEED_SHIFT`` applies). The model lives on ``device``."""
    device = check_device("device", device, "chapter19_sft_model")
    recipes = chapter19_recipes()
    cfg, sft = recipes["parity"], recipes["noisy_sft"]
    n_bits = cfg["bits"]
    all_bits = parity_problems(n_bits)
    perm = torch.randperm(len(all_bits), generator=torch_generator(cfg["split_seed"])).tolist()
    train_bits = [all_bits[i] for i in perm[:cfg["n_train"]]]
    test_bits = [all_bits[i] for i in perm[cfg["n_train"]:]]

    def encode_all(texts: list[str]) -> torch.Tensor:
        return torch.tensor([encode(t) for t in texts])

    train_prompts = encode_all([parity_prompt(b) for b in train_bits])
    test_prompts = encode_all([parity_prompt(b) for b in test_bits])
    set_seed(cfg["seeds"][0])  # the chapter's initial weights
    config = DecoderConfig(vocab_size=len(VOCAB), max_seq_len=2 * n_bits + 2, n_layer=cfg["n_layer"],
                           n_head=cfg["n_head"], d_model=cfg["d_model"])
    model = Decoder(config).to(device)
    scratch_answers = encode_all([parity_answer(b, scratchpad=True) for b in train_bits])
    cached_training("ch19_parity", recipes["scratchpad"], model,
                    lambda m: {"loss": train_answers(m, train_prompts, scratch_answers, steps=cfg["steps"],
                                                     batch_size=cfg["batch"], lr=cfg["lr"], seed=cfg["seeds"][1],
                                                     weight_decay=cfg["weight_decay"]).losses})
    noise = torch_generator(sft["seeds"][0])
    sft_bits = [b for b in train_bits for _ in range(sft["copies"])]
    sft_answers = [noisy_parity_trace(b, sft["p"], noise) for b in sft_bits]
    cached_training("ch19_noisy_sft", sft, model,
                    lambda m: {"loss": train_answers(m, encode_all([parity_prompt(b) for b in sft_bits]),
                                                     encode_all(sft_answers), steps=sft["steps"],
                                                     batch_size=cfg["batch"], lr=sft["lr"], seed=sft["seeds"][1],
                                                     weight_decay=cfg["weight_decay"]).losses})
    return Chapter19Parity(model.eval(), train_bits, test_bits, train_prompts, test_prompts)
