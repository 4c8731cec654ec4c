"""Optimisers written from their update equations, gradient clipping, learning-rate schedules and early stopping.

:class:`SGD` (with momentum, Nesterov momentum and L2 weight decay), :class:`Adagrad`, :class:`RMSprop`,
:class:`Adam` and :class:`AdamW` are ``torch.optim.Optimizer`` subclasses, so they plug into any training loop,
including :func:`mmbook.train.fit`. Each ``step`` is the textbook equation, one parameter
tensor at a time, with the conventions of ``torch.optim`` (chapter 3 checks them step for step
against it). :func:`clip_grad_norm` rescales gradients to a maximal global L2 norm; :class:`WarmupCosine` is a
linear warm-up followed by cosine decay, as a factor for ``torch.optim.lr_scheduler.LambdaLR``.
:class:`EarlyStopping` watches a validation metric and keeps the best weights.
:func:`weight_decay_groups` splits a model's parameters into the matrices that weight decay should shrink and the
biases and normalisation gains that it should leave alone.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from mmbook.checks import check_bool, check_instance, check_int, check_number, positive_int

__all__ = ["SGD", "Adagrad", "Adam", "AdamW", "EarlyStopping", "RMSprop", "WarmupCosine", "clip_grad_norm",
           "weight_decay_groups"]

Params = Iterable[torch.Tensor] | Iterable[dict[str, Any]]


def _closure_loss(closure: Callable[[], torch.Tensor] | None) -> torch.Tensor | None:
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()


class SGD(torch.optim.Optimizer):
    r"""Stochastic gradient descent with optional momentum, Nesterov momentum and L2 weight decay.

    With learning rate :math:`\eta`, momentum :math:`\mu`, dampening :math:`\tau` and weight
    decay :math:`\lambda`, one step on a parameter :math:`\theta` with gradient
    :math:`\nabla L(\theta)` is::

        g_t = grad L(theta_{t-1}) + lambda * theta_{t-1}       # L2 penalty (lambda/2)||theta||^2
        b_t = g_t                      if t == 1               # momentum buffer ("velocity")
              mu * b_{t-1} + (1 - tau) * g_t   otherwise
        d_t = g_t + mu * b_t           if nesterov else  b_t   (d_t = g_t when mu == 0)
        theta_t = theta_{t-1} - eta * d_t

    These are the conventions of ``torch.optim.SGD``. Parameters may have any shape; the
    state ``self.state[p]["momentum_buffer"]`` has the shape of ``p``.
    """

    def __init__(
        self,
        params: Params,
        lr: float,
        momentum: float = 0.0,
        dampening: float = 0.0,
        weight_decay: float = 0.0,
        nesterov: bool = False,
    ) -> None:
        check_instance("params", params, "SGD", Iterable, "an iterable of tensors or parameter groups")
        lr = check_number("lr", lr, "SGD", 0.0)
        momentum = check_number("momentum", momentum, "SGD", 0.0)
        dampening = check_number("dampening", dampening, "SGD", 0.0)
        weight_decay = check_number("weight_decay", weight_decay, "SGD", 0.0)
        check_bool("nesterov", nesterov, "SGD")
        if nesterov and (momentum == 0 or dampening != 0):
            raise ValueError(
                f"SGD: nesterov=True needs momentum > 0 and dampening == 0, got momentum={momentum}, "
                f"dampening={dampening}"
            )
        defaults = {"lr": lr, "momentum": momentum, "dampening": dampening, "weight_decay": weight_decay,
                    "nesterov": nesterov}
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor | None:
        """Update every parameter that has a gradient, in place; return the closure's loss if given."""
        loss = _closure_loss(closure)
        for group in self.param_groups:
            lr, mu, tau = group["lr"], group["momentum"], group["dampening"]
            wd, nesterov = group["weight_decay"], group["nesterov"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                if wd != 0:
                    g = g + wd * p
                if mu != 0:
                    state = self.state[p]
                    if "momentum_buffer" not in state:
                        buf = g.clone()
                    else:
                        buf = mu * state["momentum_buffer"] + (1 - tau) * g
                    state["momentum_buffer"] = buf
                    g = g + mu * buf if nesterov else buf
                p.sub_(lr * g)
        return loss


class Adam(torch.optim.Optimizer):
    r"""Adam (Kingma & Ba, 2015), with L2 or decoupled (AdamW) weight decay.

    With step size :math:`\eta`, decay rates :math:`\beta_1, \beta_2`, :math:`\epsilon` and weight
    decay :math:`\lambda`, step :math:`t = 1, 2, \dots` on a parameter :math:`\theta` is::

        g_t = grad L(theta_{t-1}) (+ lambda * theta_{t-1}   coupled L2, decoupled_weight_decay=False)
        theta_{t-1} <- (1 - eta * lambda) * theta_{t-1}     (decoupled_weight_decay=True, AdamW)
        m_t = beta1 * m_{t-1} + (1 - beta1) * g_t            first moment,  m_0 = 0
        v_t = beta2 * v_{t-1} + (1 - beta2) * g_t**2         second moment, v_0 = 0
        m_hat = m_t / (1 - beta1**t),  v_hat = v_t / (1 - beta2**t)     bias corrections
        theta_t = theta_{t-1} - eta * m_hat / (sqrt(v_hat) + eps)

    These are the conventions of ``torch.optim.Adam`` / ``AdamW``. The state
    ``self.state[p]`` holds ``step`` (an int) and ``exp_avg``, ``exp_avg_sq`` of the shape of ``p``.
    """

    def __init__(
        self,
        params: Params,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        decoupled_weight_decay: bool = False,
    ) -> None:
        name = type(self).__name__
        check_instance("params", params, name, Iterable, "an iterable of tensors or parameter groups")
        lr = check_number("lr", lr, name, 0.0)
        eps = check_number("eps", eps, name, 0.0)
        weight_decay = check_number("weight_decay", weight_decay, name, 0.0)
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise TypeError(f"{name}: betas must be a pair (beta1, beta2), got {betas!r}")
        beta1, beta2 = (check_number(f"betas[{i}]", b, name, 0.0, 1.0, high_open=True) for i, b in enumerate(betas))
        check_bool("decoupled_weight_decay", decoupled_weight_decay, name)
        defaults = {"lr": lr, "betas": (beta1, beta2), "eps": eps, "weight_decay": weight_decay,
                    "decoupled_weight_decay": decoupled_weight_decay}
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor | None:
        """Update every parameter that has a gradient, in place; return the closure's loss if given."""
        loss = _closure_loss(closure)
        for group in self.param_groups:
            lr, (beta1, beta2), eps = group["lr"], group["betas"], group["eps"]
            wd, decoupled = group["weight_decay"], group["decoupled_weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                state["step"] += 1
                t = state["step"]
                if wd != 0:
                    if decoupled:
                        p.mul_(1 - lr * wd)
                    else:
                        g = g + wd * p
                m = beta1 * state["exp_avg"] + (1 - beta1) * g
                v = beta2 * state["exp_avg_sq"] + (1 - beta2) * g * g
                state["exp_avg"], state["exp_avg_sq"] = m, v
                m_hat = m / (1 - beta1**t)
                v_hat = v / (1 - beta2**t)
                p.sub_(lr * m_hat / (v_hat.sqrt() + eps))
        return loss


class AdamW(Adam):
    """Adam with decoupled weight decay (Loshchilov & Hutter, 2019): ``theta <- (1 - lr * wd) * theta``.

    The decay shrinks the weights directly instead of entering the gradient, so it is *not*
    rescaled by ``1 / (sqrt(v_hat) + eps)``. Default ``weight_decay=1e-2`` as in ``torch.optim.AdamW``.
    """

    def __init__(
        self,
        params: Params,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
    ) -> None:
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                         decoupled_weight_decay=True)


class Adagrad(torch.optim.Optimizer):
    r"""AdaGrad (Duchi, Hazan & Singer, 2011): every coordinate's step is divided by its accumulated gradient norm.

    With learning rate :math:`\eta`, :math:`\epsilon`, weight decay :math:`\lambda` and initial accumulator
    :math:`s_0`, one step on a parameter :math:`\theta` is, elementwise::

        g_t = grad L(theta_{t-1}) + lambda * theta_{t-1}
        s_t = s_{t-1} + g_t**2                              sum of all squared gradients so far
        theta_t = theta_{t-1} - eta * g_t / (sqrt(s_t) + eps)

    A coordinate that has seen large (or many) gradients takes small steps; a rarely active one (a rare word's
    embedding) keeps a large step. The steps shrink like 1/sqrt(t) for ever. These are the conventions of
    ``torch.optim.Adagrad`` (with ``lr_decay=0``); ``self.state[p]`` holds ``step`` and ``sum`` (shape of ``p``).
    """

    def __init__(self, params: Params, lr: float = 1e-2, eps: float = 1e-10, weight_decay: float = 0.0,
                 initial_accumulator_value: float = 0.0) -> None:
        check_instance("params", params, "Adagrad", Iterable, "an iterable of tensors or parameter groups")
        defaults = {"lr": check_number("lr", lr, "Adagrad", 0.0),
                    "eps": check_number("eps", eps, "Adagrad", 0.0),
                    "weight_decay": check_number("weight_decay", weight_decay, "Adagrad", 0.0),
                    "initial_accumulator_value": check_number("initial_accumulator_value",
                                                              initial_accumulator_value, "Adagrad", 0.0)}
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor | None:
        """Update every parameter that has a gradient, in place; return the closure's loss if given."""
        loss = _closure_loss(closure)
        for group in self.param_groups:
            lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad if wd == 0 else p.grad + wd * p
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["sum"] = torch.full_like(p, group["initial_accumulator_value"])
                state["step"] += 1
                state["sum"] = state["sum"] + g * g
                p.sub_(lr * g / (state["sum"].sqrt() + eps))
        return loss


class RMSprop(torch.optim.Optimizer):
    r"""RMSProp (Hinton, 2012): AdaGrad with a *moving* average of squared gradients, so steps do not die out.

    With learning rate :math:`\eta`, smoothing constant :math:`\alpha`, :math:`\epsilon`, weight decay
    :math:`\lambda` and momentum :math:`\mu`, one step on :math:`\theta` is, elementwise::

        g_t = grad L(theta_{t-1}) + lambda * theta_{t-1}
        r_t = alpha * r_{t-1} + (1 - alpha) * g_t**2        r_0 = 0, no bias correction
        d_t = g_t / (sqrt(r_t) + eps)
        b_t = mu * b_{t-1} + d_t   (b_0 = 0),   d_t <- b_t  if mu > 0
        theta_t = theta_{t-1} - eta * d_t

    These are the conventions of ``torch.optim.RMSprop`` (``centered=False``). Adam is RMSProp's denominator plus
    a moving average of the gradient itself and bias corrections for both. ``self.state[p]`` holds ``step``,
    ``square_avg`` and, with momentum, ``momentum_buffer`` (shape of ``p``).
    """

    def __init__(self, params: Params, lr: float = 1e-2, alpha: float = 0.99, eps: float = 1e-8,
                 weight_decay: float = 0.0, momentum: float = 0.0) -> None:
        check_instance("params", params, "RMSprop", Iterable, "an iterable of tensors or parameter groups")
        defaults = {"lr": check_number("lr", lr, "RMSprop", 0.0),
                    "alpha": check_number("alpha", alpha, "RMSprop", 0.0, 1.0, high_open=True),
                    "eps": check_number("eps", eps, "RMSprop", 0.0),
                    "weight_decay": check_number("weight_decay", weight_decay, "RMSprop", 0.0),
                    "momentum": check_number("momentum", momentum, "RMSprop", 0.0)}
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor | None:
        """Update every parameter that has a gradient, in place; return the closure's loss if given."""
        loss = _closure_loss(closure)
        for group in self.param_groups:
            lr, alpha, eps = group["lr"], group["alpha"], group["eps"]
            wd, mu = group["weight_decay"], group["momentum"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad if wd == 0 else p.grad + wd * p
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["square_avg"] = torch.zeros_like(p)
                    if mu > 0:
                        state["momentum_buffer"] = torch.zeros_like(p)
                state["step"] += 1
                state["square_avg"] = alpha * state["square_avg"] + (1 - alpha) * g * g
                d = g / (state["square_avg"].sqrt() + eps)
                if mu > 0:
                    state["momentum_buffer"] = mu * state["momentum_buffer"] + d
                    d = state["momentum_buffer"]
                p.sub_(lr * d)
        return loss


def clip_grad_norm(parameters: torch.Tensor | Iterable[torch.Tensor], max_norm: float,
                   eps: float = 1e-6) -> torch.Tensor:
    r"""Rescale the gradients so that their *global* L2 norm is at most ``max_norm``; return the norm before.

    The global norm treats all gradients as one long vector, :math:`\lVert g\rVert = \sqrt{\sum_p \sum_i
    g_{p,i}^2}`. Every gradient is multiplied by the same factor :math:`c = \min(1, m / (\lVert g\rVert + \epsilon))`,
    so the *direction* of the update is kept and only its length is capped (clipping each tensor or each coordinate
    separately would change the direction). Parameters without a gradient are skipped. The conventions
    (``eps = 1e-6``, the factor applied even when it is 1) are those of ``torch.nn.utils.clip_grad_norm_``.
    Returns the total norm, a 0-dimensional tensor (0 when no parameter has a gradient). A NaN or infinite norm is
    returned as is and turns the gradients into NaN or 0, as torch's does by default: check it when it matters.
    """
    fn = "clip_grad_norm"
    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    check_instance("parameters", parameters, fn, Iterable, "a tensor or an iterable of tensors")
    parameters = list(parameters)
    for i, p in enumerate(parameters):
        check_instance(f"parameters[{i}]", p, fn, torch.Tensor, "a tensor")
    max_norm = check_number("max_norm", max_norm, fn, 0.0, low_open=True)
    eps = check_number("eps", eps, fn, 0.0)
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return torch.tensor(0.0)
    total = torch.sqrt(sum(g.detach().pow(2).sum() for g in grads))  # one long vector: the sum of all squares
    coef = torch.clamp(max_norm / (total + eps), max=1.0)
    with torch.no_grad():
        for g in grads:
            g.mul_(coef.to(g.dtype))
    return total


class WarmupCosine:
    r"""Learning-rate factor for a linear warm-up followed by cosine decay, for ``LambdaLR`` (one call per step).

    With ``W = warmup_steps``, ``T = total_steps`` and final factor ``f_min``, the factor at step ``s = 0, 1, ...``
    (the number of ``scheduler.step()`` calls so far) is::

        (s + 1) / W                                              s < W       rises to 1 at s = W - 1
        f_min + (1 - f_min) * (1 + cos(pi * (s - W) / (T - W))) / 2    W <= s <= T  from 1 down to f_min
        f_min                                                    s > T

    Warm-up protects the first steps, when Adam's second-moment estimate rests on a handful of gradients and the
    weights are far from anything sensible; the cosine then anneals the step smoothly so that the last steps
    average the noise away; ``warmup_steps=0`` gives the cosine alone (``CosineAnnealingLR``). Use
    ``torch.optim.lr_scheduler.LambdaLR(optimizer, WarmupCosine(W, T))`` and call ``scheduler.step()`` after every
    ``optimizer.step()`` (``fit(..., scheduler_interval="step")``). It is a class, not a closure, so that the
    scheduler's ``state_dict`` (and a checkpoint) holds its settings.
    """

    def __init__(self, warmup_steps: int, total_steps: int, min_factor: float = 0.0) -> None:
        fn = "WarmupCosine"
        check_int("warmup_steps", warmup_steps, fn, 0)
        check_int("total_steps", total_steps, fn, 1)
        if total_steps <= warmup_steps:
            raise ValueError(f"{fn}: total_steps must be larger than warmup_steps, got total_steps={total_steps}, "
                             f"warmup_steps={warmup_steps}")
        self.warmup_steps, self.total_steps = int(warmup_steps), int(total_steps)
        self.min_factor = check_number("min_factor", min_factor, fn, 0.0, 1.0)

    def __call__(self, step: int) -> float:
        """The factor that multiplies the base learning rate at ``step`` (0-based)."""
        check_int("step", step, "WarmupCosine", 0)
        w, t = self.warmup_steps, self.total_steps
        if step < w:
            return (step + 1) / w
        if step > t:
            return self.min_factor
        return self.min_factor + (1 - self.min_factor) * (1 + math.cos(math.pi * (step - w) / (t - w))) / 2

    def __repr__(self) -> str:
        return f"WarmupCosine(warmup_steps={self.warmup_steps}, total_steps={self.total_steps}, " \
               f"min_factor={self.min_factor})"


def weight_decay_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Two optimizer parameter groups: tensors with 2 or more dimensions decay, the others do not.

    Weight decay pulls a parameter towards 0. For a weight matrix or an embedding table that is a pull towards a
    simpler function (smaller weights, smaller logits). For a bias or a LayerNorm/RMSNorm gain it is not: a gain of
    0 silences its features (the neutral value is 1), and a bias only shifts, so decaying them adds a bias towards
    a worse model without regularising anything (GPT-2, nanoGPT and LLaMA-style recipes all exclude them). Returns
    ``[{"params": matrices, "weight_decay": weight_decay}, {"params": vectors, "weight_decay": 0.0}]`` for any
    ``torch.optim`` optimizer; parameters with ``requires_grad=False`` are left out, a shared parameter is listed
    once.
    """
    fn = "weight_decay_groups"
    check_instance("model", model, fn, nn.Module, "an nn.Module")
    weight_decay = check_number("weight_decay", weight_decay, fn, 0.0)
    params = [p for p in model.parameters() if p.requires_grad]  # model.parameters() already skips duplicates
    if not params:
        raise ValueError(f"{fn}: model has no trainable parameters")
    return [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]


class EarlyStopping:
    """Stop training when a validation metric has not improved for ``patience`` epochs.

    Call :meth:`step` once per epoch with the epoch's validation value (and the model, to keep a
    copy of its best weights). An epoch *improves* when its value beats the best so far by more
    than ``min_delta`` (lower is better for ``mode="min"``, higher for ``mode="max"``); a NaN never
    improves. :meth:`step` returns ``True`` once ``patience`` consecutive epochs have not improved.
    Attributes: ``best`` (best value), ``best_epoch`` (1-based), ``epoch`` (epochs seen),
    ``num_bad_epochs``, ``best_state`` (a detached copy of the model's ``state_dict`` or ``None``).
    """

    def __init__(self, patience: int = 10, min_delta: float = 0.0, mode: str = "min") -> None:
        positive_int("patience", patience, "EarlyStopping")
        self.min_delta = check_number("min_delta", min_delta, "EarlyStopping", 0.0)
        if mode not in ("min", "max"):
            raise ValueError(f"EarlyStopping: mode must be 'min' or 'max', got {mode!r}")
        self.patience = patience
        self.mode = mode
        self.best = math.inf if mode == "min" else -math.inf
        self.best_epoch = 0
        self.epoch = 0
        self.num_bad_epochs = 0
        self.best_state: dict[str, torch.Tensor] | None = None

    def _improves(self, value: float) -> bool:
        if self.mode == "min":
            return value < self.best - self.min_delta
        return value > self.best + self.min_delta

    @property
    def should_stop(self) -> bool:
        """Whether ``patience`` consecutive epochs have passed without improvement."""
        return self.num_bad_epochs >= self.patience

    def step(self, value: float | torch.Tensor, model: nn.Module | None = None) -> bool:
        """Record one epoch's validation ``value``; return ``True`` when training should stop."""
        if isinstance(value, torch.Tensor):
            if value.numel() != 1:
                raise ValueError(f"EarlyStopping.step: value must be a scalar, got shape {tuple(value.shape)}")
            value = value.item()
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise TypeError(f"EarlyStopping.step: value must be a float, got {type(value).__name__}")
        if model is not None and not isinstance(model, nn.Module):
            raise TypeError(f"EarlyStopping.step: model must be an nn.Module or None, got {type(model).__name__}")
        self.epoch += 1
        if self._improves(float(value)):
            self.best, self.best_epoch, self.num_bad_epochs = float(value), self.epoch, 0
            if model is not None:
                self.best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        else:
            self.num_bad_epochs += 1
        return self.should_stop

    def restore(self, model: nn.Module) -> nn.Module:
        """Load the best weights seen into ``model`` (in place) and return it."""
        if not isinstance(model, nn.Module):
            raise TypeError(f"EarlyStopping.restore: model must be an nn.Module, got {type(model).__name__}")
        if self.best_state is None:
            raise ValueError("EarlyStopping.restore: no weights were kept; pass model= to step()")
        model.load_state_dict(self.best_state)
        return model
