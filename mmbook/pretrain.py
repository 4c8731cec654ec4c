"""Pretraining a small language model on a token stream: the loop of chapter 7, reusable for comparisons.

:func:`train_lm` runs AdamW with a linear warm-up and a cosine decay to 10% of the learning rate, gradient
clipping, and random windows from :func:`mmbook.lm.random_windows` drawn with a seeded generator;
:func:`evaluate_lm` scores a model on non-overlapping windows spread evenly over held-out text. Any model
whose ``forward(idx, targets)`` returns an object with a ``.loss`` works: chapter 7's
:class:`mmbook.gpt.GPT` and chapter 17's :class:`mmbook.decoder.Decoder`.
"""

from __future__ import annotations

import math
import time
from typing import NamedTuple

import torch
from torch import nn

from mmbook.checks import check_instance, check_int_tensor, check_number, positive_int
from mmbook.core import torch_generator
from mmbook.lm import random_windows
from mmbook.optim import weight_decay_groups

__all__ = ["TrainResult", "evaluate_lm", "train_lm"]


class TrainResult(NamedTuple):
    """``losses``: the training loss of every step (nats per token); ``cpu_seconds``: process CPU time spent."""

    losses: list[float]
    cpu_seconds: float


def _model_device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def train_lm(model: nn.Module, ids: torch.Tensor, *, steps: int, batch_size: int, seq_len: int, lr: float,
             warmup: int = 50, weight_decay: float = 0.1, clip: float = 1.0, seed: int = 0) -> TrainResult:
    """Train ``model`` in place for ``steps`` AdamW steps on random windows of the stream ``ids`` ``(N,)``.

    Each step draws ``batch_size`` windows of ``seq_len + 1`` tokens (inputs and targets shifted by one) with
    a generator seeded by ``seed`` (through :func:`mmbook.torch_generator`). The learning rate rises linearly
    over ``warmup`` steps, then follows a cosine from ``lr`` down to ``0.1 lr``; betas ``(0.9, 0.95)``; the
    gradient norm is clipped to ``clip``. Weight decay applies to matrices and embeddings only, not to biases or
    normalisation gains (:func:`mmbook.optim.weight_decay_groups`). The model is left in train mode on its device.
    """
    fn = "train_lm"
    check_instance("model", model, fn, nn.Module, "a torch.nn.Module")
    check_int_tensor("ids", ids, fn, 1, "(N,)")
    steps = positive_int("steps", steps, fn)
    batch_size = positive_int("batch_size", batch_size, fn)
    seq_len = positive_int("seq_len", seq_len, fn)
    lr = check_number("lr", lr, fn, 0.0, low_open=True)
    warmup = positive_int("warmup", warmup, fn)
    weight_decay = check_number("weight_decay", weight_decay, fn, 0.0)
    clip = check_number("clip", clip, fn, 0.0, low_open=True)
    device = _model_device(model)
    optimizer = torch.optim.AdamW(weight_decay_groups(model, weight_decay), lr=lr, betas=(0.9, 0.95))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min((s + 1) / warmup, 0.1 + 0.45 * (1 + math.cos(math.pi * s / steps))))
    generator = torch_generator(seed)
    losses = []
    start = time.process_time()
    model.train()
    for _ in range(steps):
        x, y = (t.to(device) for t in random_windows(ids, batch_size, seq_len, generator))
        loss = model(x, y).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), clip)
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
    return TrainResult(losses, time.process_time() - start)


@torch.no_grad()
def evaluate_lm(model: nn.Module, ids: torch.Tensor, seq_len: int, n_windows: int = 256,
                batch_size: int = 64) -> float:
    """Mean next-token cross-entropy (nats) of ``model`` over ``n_windows`` non-overlapping windows of ``ids``.

    The windows start at ``i * stride`` with ``stride = (N - 1) // n_windows``, spread evenly over the text;
    each predicts ``seq_len`` tokens. Runs in eval mode and restores the previous mode.
    """
    fn = "evaluate_lm"
    check_instance("model", model, fn, nn.Module, "a torch.nn.Module")
    check_int_tensor("ids", ids, fn, 1, "(N,)")
    seq_len = positive_int("seq_len", seq_len, fn)
    n_windows = positive_int("n_windows", n_windows, fn)
    batch_size = positive_int("batch_size", batch_size, fn)
    stride = (ids.numel() - 1) // n_windows
    if stride < seq_len:
        raise ValueError(f"{fn}: {n_windows} windows of {seq_len} + 1 tokens do not fit without overlap into "
                         f"{ids.numel()} tokens")
    device = _model_device(model)
    starts = torch.arange(n_windows) * stride
    offsets = torch.arange(seq_len + 1)
    windows = ids.long()[starts[:, None] + offsets[None, :]]  # (n_windows, seq_len + 1)
    was_training = model.training
    model.eval()
    total = 0.0
    try:
        for i in range(0, n_windows, batch_size):
            chunk = windows[i:i + batch_size].to(device)
            total += model(chunk[:, :-1], chunk[:, 1:]).loss.item() * chunk.shape[0]
    finally:
        model.train(was_training)
    return total / n_windows
