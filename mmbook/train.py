"""A small, generic training loop with progress bars and a returned history."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import nn

from mmbook.checks import check_bool, check_device, check_finite, check_ids, check_instance, check_number, check_tensor

__all__ = ["accuracy", "evaluate", "fit"]

Batch = Any
ForwardFn = Callable[[nn.Module, Batch, torch.device], tuple[torch.Tensor, torch.Tensor]]
MetricFn = Callable[[torch.Tensor, torch.Tensor], float]


def accuracy(outputs: torch.Tensor, targets: torch.Tensor) -> float:
    """Fraction of rows whose arg-max over the last dimension equals the target class.

    ``outputs`` has shape ``(batch, num_classes)`` (logits or probabilities), ``targets``
    shape ``(batch,)`` with integer class indices.
    """
    check_tensor("outputs", outputs, "accuracy", "float")
    check_tensor("targets", targets, "accuracy", "int")
    if outputs.ndim != 2 or targets.ndim != 1 or outputs.shape[0] != targets.shape[0] or outputs.shape[0] == 0:
        raise ValueError(
            f"accuracy: expected outputs (batch, num_classes) and targets (batch,) with batch > 0, "
            f"got {tuple(outputs.shape)} and {tuple(targets.shape)}"
        )
    check_ids("targets", targets, "accuracy", outputs.shape[1])
    check_finite("outputs", outputs, "accuracy")  # the arg-max of a NaN row is a plausible class
    return (outputs.argmax(dim=-1) == targets).float().mean().item()


def _to(obj: Any, device: torch.device) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, Mapping):
        return {k: _to(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to(v, device) for v in obj)
    return obj


def _default_forward(model: nn.Module, batch: Batch, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Batches are ``(*inputs, target)`` sequences, or dicts with a ``"labels"`` entry."""
    batch = _to(batch, device)
    if isinstance(batch, Mapping):
        if "labels" not in batch:
            raise ValueError(f"fit: a dict batch needs a 'labels' entry, got keys {sorted(batch)}")
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        return model(**inputs), batch["labels"]
    if not isinstance(batch, (list, tuple)) or len(batch) < 2:
        raise ValueError(
            "fit: a batch must be a (inputs..., target) tuple or a dict with 'labels'; "
            f"got {type(batch).__name__}" + (f" of length {len(batch)}" if isinstance(batch, (list, tuple)) else "")
        )
    *inputs, target = batch
    return model(*inputs), target


def evaluate(
    model: nn.Module,
    loader: Iterable[Batch],
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    *,
    metrics: Mapping[str, MetricFn] | None = None,
    device: torch.device | str | None = None,
    forward: ForwardFn | None = None,
) -> dict[str, float]:
    """Mean loss and metrics over a loader, without gradients.

    The loss is the mean of the batch losses weighted by batch size, which is the mean over all examples for a loss
    that is a mean over its batch. Each metric is computed **once**, on the outputs and targets of the whole loader
    concatenated along dimension 0: a mean of per-batch values would be right for accuracy but wrong for metrics
    that are not means over examples (F1, AUC, a median).
    """
    device, forward, metrics = _check_loop("evaluate", model, loader, "loader", loss_fn, metrics, device, forward)
    total_loss, count = 0.0, 0
    all_outputs: list[torch.Tensor] = []
    all_targets: list[torch.Tensor] = []
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for batch in loader:
            outputs, target = forward(model, batch, device)
            n = int(target.shape[0])
            total_loss += loss_fn(outputs, target).item() * n
            if metrics:
                if not (isinstance(outputs, torch.Tensor) and isinstance(target, torch.Tensor)):
                    raise TypeError("evaluate: with metrics, forward must return (outputs, target) tensors, got "
                                    f"({type(outputs).__name__}, {type(target).__name__})")
                all_outputs.append(outputs.detach())
                all_targets.append(target.detach())
            count += n
    model.train(was_training)
    if count == 0:
        raise ValueError("evaluate: loader produced no batches")
    results = {"loss": total_loss / count}
    if metrics:
        outputs, target = torch.cat(all_outputs), torch.cat(all_targets)
        for name, fn in metrics.items():
            results[name] = float(fn(outputs, target))
    return results


def _check_loop(fn: str, model: object, loader: object, loader_name: str, loss_fn: object, metrics: object,
                device: object, forward: object) -> tuple[torch.device, ForwardFn, dict[str, MetricFn]]:
    """The arguments :func:`fit` and :func:`evaluate` share; returns the device, forward and metrics to use."""
    check_instance("model", model, fn, nn.Module, "an nn.Module")
    check_instance(loader_name, loader, fn, Iterable, "an iterable of batches")
    check_instance("loss_fn", loss_fn, fn, Callable, "a callable (outputs, target) -> loss")
    if forward is not None:
        check_instance("forward", forward, fn, Callable, "a callable (model, batch, device) -> (outputs, target)")
    if metrics is not None and not (isinstance(metrics, Mapping) and all(callable(m) for m in metrics.values())):
        raise TypeError(f"{fn}: metrics must map names to callables (outputs, target) -> float, got {metrics!r}")
    if device is None:
        first = next(model.parameters(), None)
        if first is None:
            raise ValueError(f"{fn}: model has no parameters to take the device from; pass device=")
        device = first.device
    else:
        device = check_device("device", device, fn)
    return device, forward or _default_forward, dict(metrics or {})


def _epoch_bar(epochs: int, progress: bool) -> tuple[Any, Any]:
    """A tqdm progress bar over ``1 .. epochs``, and the display handle of its notebook widget (``None`` elsewhere).

    In a notebook the bar is an ipywidgets widget. :func:`fit` shows it under a display id and, once training is
    done, replaces it by the finished bar's text line: a saved notebook (or the HTML book) then shows how training
    ended, never a widget frozen at ``0/epochs``.
    """
    from tqdm.auto import tqdm

    try:
        from tqdm.notebook import tqdm_notebook
    except ImportError:  # no ipywidgets: tqdm.auto is the text bar
        tqdm_notebook = None
    epoch_range = range(1, epochs + 1)
    if progress and tqdm_notebook is not None and issubclass(tqdm, tqdm_notebook):
        from IPython.display import display

        bar = tqdm(epoch_range, desc="epochs", leave=False, display=False)
        return bar, display(bar.container, display_id=True)
    return tqdm(epoch_range, desc="epochs", disable=not progress, leave=False), None


def fit(
    model: nn.Module,
    train_loader: Iterable[Batch],
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    optimizer: torch.optim.Optimizer,
    *,
    epochs: int,
    val_loader: Iterable[Batch] | None = None,
    metrics: Mapping[str, MetricFn] | None = None,
    device: torch.device | str | None = None,
    forward: ForwardFn | None = None,
    scheduler: Any | None = None,
    clip_grad_norm: float | None = None,
    progress: bool = True,
) -> dict[str, list[float]]:
    """Train ``model`` for ``epochs`` epochs and return its history.

    Each batch is a ``(*inputs, target)`` tuple (the model is called as ``model(*inputs)``)
    or a dict with a ``"labels"`` entry (called as ``model(**rest)``); pass ``forward`` to
    map a batch to ``(outputs, target)`` any other way. ``scheduler.step()`` runs once per
    epoch.

    The history maps ``"epoch"``, ``"train_loss"`` (mean over the epoch's batches, weighted
    by batch size) and, with a ``val_loader``, ``"val_loss"`` and ``"val_<metric>"`` to
    per-epoch lists.
    """
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"fit: epochs must be a positive int, got {epochs!r}")
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"fit: optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
    if clip_grad_norm is not None:
        check_number("clip_grad_norm", clip_grad_norm, "fit", 0.0, low_open=True)
    device, forward, _ = _check_loop("fit", model, train_loader, "train_loader", loss_fn, metrics, device, forward)
    if val_loader is not None:
        check_instance("val_loader", val_loader, "fit", Iterable, "an iterable of batches or None")
    if scheduler is not None and not callable(getattr(scheduler, "step", None)):
        raise TypeError(f"fit: scheduler must have a step() method, got {type(scheduler).__name__}")
    check_bool("progress", progress, "fit")
    model.to(device)
    history: dict[str, list[float]] = {"epoch": [], "train_loss": []}
    bar, shown = _epoch_bar(epochs, progress)
    for epoch in bar:
        model.train()
        total, count = 0.0, 0
        for batch in train_loader:
            outputs, target = forward(model, batch, device)
            loss = loss_fn(outputs, target)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if clip_grad_norm is not None:
                nn.utils.clip_grad_norm_(model.parameters(), clip_grad_norm)
            optimizer.step()
            n = int(target.shape[0])
            total += loss.item() * n
            count += n
        if count == 0:
            raise ValueError("fit: train_loader produced no batches")
        if scheduler is not None:
            scheduler.step()
        history["epoch"].append(epoch)
        history["train_loss"].append(total / count)
        postfix = {"train_loss": f"{total / count:.4f}"}
        if val_loader is not None:
            results = evaluate(model, val_loader, loss_fn, metrics=metrics, device=device, forward=forward)
            for name, value in results.items():
                history.setdefault(f"val_{name}", []).append(value)
            postfix["val_loss"] = f"{results['loss']:.4f}"
        bar.set_postfix(postfix)
    if shown is not None:  # the loop closed the bar: its widget becomes the finished bar's text line
        shown.update({"text/plain": str(bar)}, raw=True)
    return history
