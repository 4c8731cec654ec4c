"""Learning from preferences (chapter 19): the Bradley-Terry loss, a small reward model, the KL-regularised
optimum and Direct Preference Optimisation (DPO).

Notation: a prompt :math:`x`, responses :math:`y`, a reward :math:`r(x, y)`, a reference policy
:math:`\\pi_{ref}` and a strength :math:`\\beta > 0` of the KL penalty. The objective
:math:`\\max_\\pi E_{y\\sim\\pi}[r] - \\beta\\,KL(\\pi\\,\\|\\,\\pi_{ref})` has the optimum
:math:`\\pi^*(y|x) \\propto \\pi_{ref}(y|x) \\exp(r(x,y)/\\beta)` (:func:`kl_optimal_policy`); DPO
(:func:`dpo_loss`) fits the policy directly to preference pairs with the Bradley-Terry loss
(:func:`bradley_terry_loss`) of the implicit reward :math:`\\beta \\log \\pi/\\pi_{ref}`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from mmbook.checks import (
    check_float_tensor,
    check_ids,
    check_instance,
    check_number,
    check_same_shape,
    check_tensor,
    positive_int,
)
from mmbook.core import torch_generator
from mmbook.optim import WarmupCosine

__all__ = ["DPOOutput", "RewardModel", "bradley_terry_loss", "dpo_loss", "dpo_train", "kl_optimal_policy",
           "policy_optimizer", "ranked_pairs", "sequence_logprob", "token_logprobs", "upcast_log_softmax"]


def bradley_terry_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor) -> torch.Tensor:
    """Mean of ``-log sigmoid(r_chosen - r_rejected)`` over pairs ``(batch,)``: the negative log-likelihood of
    the observed preferences under the Bradley-Terry model ``P(chosen > rejected) = sigmoid(r_c - r_r)``."""
    fn = "bradley_terry_loss"
    check_float_tensor("r_chosen", r_chosen, fn, 1, "(batch,)", nonempty=True)
    check_float_tensor("r_rejected", r_rejected, fn, 1, "(batch,)", nonempty=True)
    check_same_shape(fn, r_chosen=r_chosen, r_rejected=r_rejected)
    return -F.logsigmoid(r_chosen - r_rejected).mean()


class RewardModel(nn.Module):
    """A small reward model: mean-pooled token embeddings, a two-layer MLP, one scalar per response.

    ``forward(ids, mask)``: ``ids`` ``(batch, T)`` int64 token ids, ``mask`` ``(batch, T)`` bool (True on the
    response's tokens, at least one per row) -> rewards ``(batch,)``.
    """

    def __init__(self, vocab_size: int, d_model: int = 32, hidden: int = 64) -> None:
        super().__init__()
        fn = "RewardModel"
        self.vocab_size = positive_int("vocab_size", vocab_size, fn)
        self.embed = nn.Embedding(vocab_size, positive_int("d_model", d_model, fn))
        self.head = nn.Sequential(nn.Linear(d_model, positive_int("hidden", hidden, fn)), nn.GELU(),
                                  nn.Linear(hidden, 1))

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        fn = "RewardModel.forward"
        check_ids("ids", ids, fn, self.vocab_size, 2, "(batch, T)")
        check_tensor("mask", mask, fn, "bool", 2, "(batch, T)")
        check_same_shape(fn, ids=ids, mask=mask)
        if not bool(mask.any(dim=1).all()):
            raise ValueError(f"{fn}: every row of mask must mark at least one token")
        m = mask.to(self.embed.weight.dtype).unsqueeze(-1)  # (batch, T, 1)
        pooled = (self.embed(ids) * m).sum(1) / m.sum(1)  # (batch, d_model)
        return self.head(pooled).squeeze(-1)


def kl_optimal_policy(ref_logprobs: torch.Tensor, rewards: torch.Tensor, beta: float) -> torch.Tensor:
    """Log-probabilities of ``pi*(y) = pi_ref(y) exp(r(y)/beta) / Z`` over an enumerated set of responses.

    ``ref_logprobs`` and ``rewards``: ``(..., n_responses)``, the last dimension enumerating every response of
    one prompt (``ref_logprobs`` normalised over it). Returns ``(..., n_responses)``, normalised.
    """
    fn = "kl_optimal_policy"
    check_float_tensor("ref_logprobs", ref_logprobs, fn, min_ndim=1, nonempty=True)
    check_float_tensor("rewards", rewards, fn, min_ndim=1, nonempty=True, finite=True)
    check_same_shape(fn, ref_logprobs=ref_logprobs, rewards=rewards)
    beta = check_number("beta", beta, fn, 0.0, low_open=True)
    total = torch.logsumexp(ref_logprobs, dim=-1)
    if not torch.allclose(total, torch.zeros_like(total), atol=1e-5):
        raise ValueError(f"{fn}: ref_logprobs must be normalised over the last dimension (logsumexp 0), "
                         f"got logsumexp up to {float(total.abs().max()):.3g} away from 0")
    return torch.log_softmax(ref_logprobs + rewards / beta, dim=-1)


class DPOOutput(NamedTuple):
    """``loss``: the mean DPO loss; ``losses``: per pair ``(batch,)``; ``chosen_rewards`` / ``rejected_rewards``:
    the implicit rewards ``beta (log pi - log pi_ref)`` ``(batch,)``, detached."""

    loss: torch.Tensor
    losses: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor


def dpo_loss(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
             ref_chosen_logps: torch.Tensor, ref_rejected_logps: torch.Tensor, beta: float = 0.1) -> DPOOutput:
    """The DPO loss ``-log sigmoid(beta [(log pi(y_w) - log pi_ref(y_w)) - (log pi(y_l) - log pi_ref(y_l))])``.

    All four inputs are sequence log-probabilities ``(batch,)`` (see :func:`sequence_logprob`) of the chosen
    (``y_w``) and rejected (``y_l``) responses under the policy and the frozen reference.
    """
    fn = "dpo_loss"
    tensors = {"policy_chosen_logps": policy_chosen_logps, "policy_rejected_logps": policy_rejected_logps,
               "ref_chosen_logps": ref_chosen_logps, "ref_rejected_logps": ref_rejected_logps}
    for name, t in tensors.items():
        check_float_tensor(name, t, fn, 1, "(batch,)", nonempty=True)
    check_same_shape(fn, **tensors)
    beta = check_number("beta", beta, fn, 0.0, low_open=True)
    chosen = beta * (policy_chosen_logps - ref_chosen_logps)
    rejected = beta * (policy_rejected_logps - ref_rejected_logps)
    losses = -F.logsigmoid(chosen - rejected)
    return DPOOutput(losses.mean(), losses, chosen.detach(), rejected.detach())


def upcast_log_softmax(logits: torch.Tensor) -> torch.Tensor:
    """Log-softmax over the last axis; float16 / bfloat16 logits are upcast to float32 first (their log-softmax
    loses digits that a KL or a log-ratio of two such values needs); float32 and float64 keep their dtype."""
    check_float_tensor("logits", logits, "upcast_log_softmax", min_ndim=1)
    return torch.log_softmax(logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits, dim=-1)


def token_logprobs(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """``log p(ids[:, t] | ids[:, :t])`` for ``t = 1 .. T-1`` under a causal LM: ``(batch, T)`` -> ``(batch, T-1)``.

    ``model(ids)`` must return an object with ``.logits`` ``(batch, T, vocab)`` (chapter 7's GPT, chapter 17's
    Decoder). Half-precision logits are upcast to float32; float32 and float64 keep their dtype.
    """
    fn = "token_logprobs"
    check_instance("model", model, fn, nn.Module, "a torch.nn.Module")
    check_tensor("ids", ids, fn, "int", 2, "(batch, T)")
    if ids.shape[1] < 2:
        raise ValueError(f"{fn}: ids must hold at least 2 positions (a prompt token and a response token), "
                         f"got shape {tuple(ids.shape)}")
    return upcast_log_softmax(model(ids).logits[:, :-1]).gather(-1, ids[:, 1:, None]).squeeze(-1)


def sequence_logprob(model: nn.Module, ids: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """``log pi(y | x)``: the sum of the response tokens' log-probabilities, ``(batch,)``.

    ``ids`` ``(batch, T)`` holds prompt and response; ``response_mask`` ``(batch, T)`` bool is True on the response's
    tokens (never on position 0, which has no prediction).
    """
    fn = "sequence_logprob"
    check_tensor("response_mask", response_mask, fn, "bool", 2, "(batch, T)")
    check_tensor("ids", ids, fn, "int", 2, "(batch, T)")
    check_same_shape(fn, ids=ids, response_mask=response_mask)
    if bool(response_mask[:, 0].any()):
        raise ValueError(f"{fn}: response_mask must be False at position 0 (the first token has no prediction)")
    logp = token_logprobs(model, ids)
    return (logp * response_mask[:, 1:].to(logp.dtype)).sum(-1)


def policy_optimizer(params: Any, lr: float, steps: int, warmup: int = 10
                     ) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """The optimiser that :func:`dpo_train` and :func:`mmbook.rl.grpo_train` share, so that their runs differ only
    in the loss and the data: AdamW with betas 0.9 and 0.99 and no weight decay, its learning rate ``lr`` reached
    linearly over ``warmup`` steps and then constant (:class:`mmbook.optim.WarmupCosine` with final factor 1; Adam's
    first steps move every weight by about ``lr`` whatever the size of its noisy gradient). Call
    ``scheduler.step()`` after every ``optimizer.step()``; the callers clip the gradient norm to 1 before each step.
    Returns ``(optimizer, scheduler)``."""
    fn = "policy_optimizer"
    lr = check_number("lr", lr, fn, 0.0, low_open=True)
    steps = positive_int("steps", steps, fn)
    warmup = positive_int("warmup", warmup, fn)
    params = list(params)
    if not params:
        raise ValueError(f"{fn}: params must hold at least one parameter, got none")
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.99), weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, WarmupCosine(warmup, max(steps, warmup + 1), min_factor=1.0))
    return opt, sched


def ranked_pairs(rewards: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Preference pairs from graded samples: ``rewards`` ``(n_prompts, k)`` holds 0/1 rewards of ``k`` samples per
    prompt; within each prompt the ``j``-th rewarded sample is paired with the ``j``-th unrewarded one, as long as
    both kinds last (``min(#1, #0)`` pairs per prompt; a prompt whose samples all agree gives none). Returns the flat
    indices ``(chosen, rejected)``, int64 ``(n_pairs,)``, into the ``n_prompts * k`` samples in row-major order."""
    fn = "ranked_pairs"
    check_float_tensor("rewards", rewards, fn, 2, "(n_prompts, k)", finite=True)
    if not bool(((rewards == 0) | (rewards == 1)).all()):
        raise ValueError(f"{fn}: rewards must be 0 or 1 (a verifier's verdicts), got values "
                         f"{sorted(set(rewards.flatten().tolist()))[:6]}")
    k = rewards.shape[1]
    chosen: list[int] = []
    rejected: list[int] = []
    for i, row in enumerate(rewards.tolist()):
        right = [i * k + j for j, r in enumerate(row) if r == 1.0]
        wrong = [i * k + j for j, r in enumerate(row) if r == 0.0]
        n = min(len(right), len(wrong))
        chosen += right[:n]
        rejected += wrong[:n]
    return torch.tensor(chosen, dtype=torch.long), torch.tensor(rejected, dtype=torch.long)


def dpo_train(policy: nn.Module, chosen: torch.Tensor, rejected: torch.Tensor, ref_chosen: torch.Tensor,
              ref_rejected: torch.Tensor, *, response_mask: torch.Tensor, steps: int, batch: int, lr: float,
              beta: float, seed: int = 0, warmup: int = 10, evaluate: Callable[[nn.Module], Any] | None = None,
              eval_every: int = 10) -> dict[str, list]:
    """Offline DPO: ``steps`` steps of :func:`policy_optimizer` (the optimiser and schedule of
    :func:`mmbook.rl.grpo_train`, ``warmup`` steps of warm-up; gradient norm clipped to 1) on minibatches of
    ``batch`` pairs drawn with replacement (a generator seeded by ``seed``) from the sequences ``chosen`` /
    ``rejected`` ``(N, T)``, whose frozen reference log-probabilities ``ref_chosen`` / ``ref_rejected`` ``(N,)``
    were computed once (:func:`sequence_logprob` with ``response_mask`` ``(N, T)``). ``evaluate(policy)``, if
    given, runs before training and every ``eval_every`` steps. Returns ``{"loss", "chosen_reward",
    "rejected_reward", "reward_accuracy"}`` per step (the batch means of :func:`dpo_loss`'s implicit rewards, and
    the fraction of the batch's pairs whose chosen answer has the larger implicit reward) and
    ``{"eval_step", "eval"}``."""
    fn = "dpo_train"
    check_instance("policy", policy, fn, nn.Module, "a torch.nn.Module")
    check_tensor("chosen", chosen, fn, "int", 2, "(N, T)")
    check_tensor("rejected", rejected, fn, "int", 2, "(N, T)")
    check_tensor("response_mask", response_mask, fn, "bool", 2, "(N, T)")
    check_same_shape(fn, chosen=chosen, rejected=rejected, response_mask=response_mask)
    check_float_tensor("ref_chosen", ref_chosen, fn, 1, "(N,)", finite=True)
    check_float_tensor("ref_rejected", ref_rejected, fn, 1, "(N,)", finite=True)
    if ref_chosen.shape[0] != chosen.shape[0] or ref_rejected.shape[0] != chosen.shape[0] or chosen.shape[0] == 0:
        raise ValueError(f"{fn}: ref_chosen and ref_rejected must hold one log-probability per pair "
                         f"({chosen.shape[0]} pairs, at least one), got {tuple(ref_chosen.shape)} and "
                         f"{tuple(ref_rejected.shape)}")
    steps, batch, eval_every = (positive_int(n, v, fn) for n, v in (("steps", steps), ("batch", batch),
                                                                     ("eval_every", eval_every)))
    lr = check_number("lr", lr, fn, 0.0, low_open=True)
    beta = check_number("beta", beta, fn, 0.0, low_open=True)
    warmup = positive_int("warmup", warmup, fn)
    if evaluate is not None and not callable(evaluate):
        raise TypeError(f"{fn}: evaluate must be a callable evaluate(policy) or None, got {type(evaluate).__name__}")
    opt, sched = policy_optimizer(policy.parameters(), lr, steps, warmup)
    gen = torch_generator(seed)
    hist: dict[str, list] = {"loss": [], "chosen_reward": [], "rejected_reward": [], "reward_accuracy": [],
                             "eval_step": [], "eval": []}
    if evaluate is not None:
        hist["eval_step"].append(0)
        hist["eval"].append(evaluate(policy))
    for step in range(1, steps + 1):
        idx = torch.randint(0, chosen.shape[0], (batch,), generator=gen)
        policy.train()
        out = dpo_loss(sequence_logprob(policy, chosen[idx], response_mask[idx]),
                       sequence_logprob(policy, rejected[idx], response_mask[idx]),
                       ref_chosen[idx], ref_rejected[idx], beta=beta)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
        opt.step()
        sched.step()
        hist["loss"].append(out.loss.item())
        hist["chosen_reward"].append(out.chosen_rewards.mean().item())
        hist["rejected_reward"].append(out.rejected_rewards.mean().item())
        hist["reward_accuracy"].append((out.chosen_rewards > out.rejected_rewards).float().mean().item())
        if evaluate is not None and step % eval_every == 0:
            hist["eval_step"].append(step)
            hist["eval"].append(evaluate(policy))
    policy.eval()
    return hist
