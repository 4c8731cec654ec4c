"""A small, generic training loop with progress bars and a returned history; a numerically stable cross-entropy;
checkpoints that let an interrupted run resume exactly where it stopped."""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from mmbook.checks import (
    check_bool,
    check_choice,
    check_device,
    check_finite,
    check_ids,
    check_instance,
    check_int,
    check_number,
    check_tensor,
)
from mmbook.optim import clip_grad_norm as _clip_grad_norm

__all__ = ["accuracy", "cross_entropy", "evaluate", "fit", "load_checkpoint", "save_checkpoint"]

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


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    r"""Mean cross-entropy :math:`\frac1B\sum_i \big(\log\sum_k e^{z_{ik}} - z_{i,y_i}\big)`, computed stably.

    ``logits`` ``(batch, num_classes)``, ``targets`` ``(batch,)`` class indices. The log-sum-exp is evaluated as
    :math:`m + \log\sum_k e^{z_k - m}` with :math:`m = \max_k z_k`: the identity is exact, but now the largest
    exponent is :math:`e^0 = 1`, so nothing overflows (the naive :math:`e^{1000}` is ``inf`` in any float format)
    and the sum is at least 1, so its logarithm never sees 0. Returns a 0-dimensional tensor.
    """
    fn = "cross_entropy"
    check_tensor("logits", logits, fn, "float", 2, "(batch, num_classes)", nonempty=True)
    check_tensor("targets", targets, fn, "int", 1, "(batch,)")
    if targets.shape[0] != logits.shape[0]:
        raise ValueError(f"{fn}: targets must have shape ({logits.shape[0]},) to match logits "
                         f"{tuple(logits.shape)}, got {tuple(targets.shape)}")
    check_ids("targets", targets, fn, logits.shape[1])
    m = logits.max(dim=1, keepdim=True).values.detach()  # a constant shift: the gradient is unchanged
    log_sum_exp = m.squeeze(1) + (logits - m).exp().sum(dim=1).log()
    return (log_sum_exp - logits.gather(1, targets[:, None]).squeeze(1)).mean()


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
    scheduler_interval: str = "epoch",
    clip_grad_norm: float | None = None,
    progress: bool = True,
) -> dict[str, list[float]]:
    """Train ``model`` for ``epochs`` epochs and return its history.

    Each batch is a ``(*inputs, target)`` tuple (the model is called as ``model(*inputs)``)
    or a dict with a ``"labels"`` entry (called as ``model(**rest)``); pass ``forward`` to
    map a batch to ``(outputs, target)`` any other way. ``scheduler.step()`` runs once per
    epoch (``scheduler_interval="epoch"``) or after every optimizer step (``"step"``, for warm-up and
    cosine schedules such as ``LambdaLR(optimizer, mmbook.optim.WarmupCosine(...))``). With
    ``clip_grad_norm=m`` the gradients are rescaled to global L2 norm at most ``m`` before each step
    (:func:`mmbook.optim.clip_grad_norm`).

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
    check_choice("scheduler_interval", scheduler_interval, "fit", ("epoch", "step"))
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
                _clip_grad_norm(model.parameters(), clip_grad_norm)
            optimizer.step()
            if scheduler is not None and scheduler_interval == "step":
                scheduler.step()
            n = int(target.shape[0])
            total += loss.item() * n
            count += n
        if count == 0:
            raise ValueError("fit: train_loader produced no batches")
        if scheduler is not None and scheduler_interval == "epoch":
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


def _check_checkpoint_args(fn: str, model: object, optimizer: object, scheduler: object, generator: object) -> None:
    check_instance("model", model, fn, nn.Module, "an nn.Module")
    check_instance("optimizer", optimizer, fn, torch.optim.Optimizer, "a torch.optim.Optimizer")
    if scheduler is not None and not callable(getattr(scheduler, "state_dict", None)):
        raise TypeError(f"{fn}: scheduler must have state_dict() and load_state_dict(), got {type(scheduler).__name__}")
    if generator is not None:
        check_instance("generator", generator, fn, torch.Generator, "a torch.Generator or None")


def _global_rng_states() -> dict[str, Any]:
    """The global RNG states besides PyTorch's CPU one, as tensors and plain values (loadable with weights_only)."""
    version, internal, gauss_next = random.getstate()
    numpy_state = np.random.get_state(legacy=False)
    return {
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "mps_rng": torch.mps.get_rng_state() if torch.backends.mps.is_available() else None,
        "python_rng": {"version": version, "internal": torch.tensor(internal, dtype=torch.int64),
                       "gauss_next": gauss_next},
        "numpy_rng": {"key": torch.from_numpy(numpy_state["state"]["key"].astype(np.int64)),
                      "pos": int(numpy_state["state"]["pos"]), "has_gauss": int(numpy_state["has_gauss"]),
                      "gauss": float(numpy_state["gauss"])},
    }


def _restore_global_rng_states(state: dict[str, Any], fn: str, path: Path) -> None:
    if state["cuda_rng"] is not None:
        if not torch.cuda.is_available():
            raise ValueError(f"{fn}: {str(path)!r} holds CUDA RNG states but CUDA is not available here; "
                             "a resumed run would draw different dropout masks")
        if len(state["cuda_rng"]) != torch.cuda.device_count():
            raise ValueError(f"{fn}: {str(path)!r} holds the RNG states of {len(state['cuda_rng'])} CUDA devices, "
                             f"this machine has {torch.cuda.device_count()}")
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    if state["mps_rng"] is not None:
        if not torch.backends.mps.is_available():
            raise ValueError(f"{fn}: {str(path)!r} holds an MPS RNG state but MPS is not available here")
        torch.mps.set_rng_state(state["mps_rng"])
    py = state["python_rng"]
    random.setstate((py["version"], tuple(int(v) for v in py["internal"].tolist()), py["gauss_next"]))
    npy = state["numpy_rng"]
    np.random.set_state({"bit_generator": "MT19937",
                         "state": {"key": npy["key"].numpy().astype(np.uint32), "pos": npy["pos"]},
                         "has_gauss": npy["has_gauss"], "gauss": npy["gauss"]})


def save_checkpoint(path: str | Path, *, model: nn.Module, optimizer: torch.optim.Optimizer, step: int,
                    scheduler: Any | None = None, generator: torch.Generator | None = None) -> Path:
    """Write everything a training run needs to continue exactly: weights, optimizer state, step, RNG states.

    Saved: ``model.state_dict()``, ``optimizer.state_dict()`` (Adam's moment estimates and step counts, momentum
    buffers: without them the resumed run starts its averages from zero), the ``scheduler``'s state, the
    ``step`` counter, the state of ``generator`` (the ``torch.Generator`` that draws the minibatches, e.g. one from
    :func:`mmbook.torch_generator`) and the global RNG states that :func:`mmbook.set_seed` seeds: PyTorch's CPU
    generator (dropout on the CPU draws from it), every CUDA device's generator when CUDA is available (dropout on a
    GPU draws from that one), the MPS generator on Apple GPUs, Python's ``random`` and NumPy's legacy global
    ``np.random`` (augmentation code often draws from them). Not saved: other generators a program creates itself
    (pass the one that matters as ``generator``), a ``DataLoader``'s iterator position, and cuDNN's choice of
    algorithms. The file is written to a temporary name and renamed, so an interruption never leaves half a
    checkpoint. Returns the path.
    """
    fn = "save_checkpoint"
    _check_checkpoint_args(fn, model, optimizer, scheduler, generator)
    check_int("step", step, fn, 0)
    check_instance("path", path, fn, (str, Path), "a file path")
    path = Path(path)
    state = {
        "step": int(step),
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "generator": generator.get_state() if generator is not None else None,
        "torch_rng": torch.get_rng_state(),
        **_global_rng_states(),
    }
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    tmp.replace(path)
    return path


def load_checkpoint(path: str | Path, *, model: nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: Any | None = None, generator: torch.Generator | None = None) -> int:
    """Restore a :func:`save_checkpoint` file into freshly built objects, in place; return the saved step.

    Pass the same kinds of objects that were saved: a ``scheduler`` or ``generator`` given here must have been
    saved (and the other way round), or the resumed run would silently differ. The global RNG states are restored
    too: PyTorch's CPU generator, the CUDA (or MPS) generators if they were saved (resuming a GPU run on a machine
    without that GPU is refused), Python's ``random`` and NumPy's ``np.random``. The file is read with
    ``weights_only=True`` (no arbitrary code runs).
    """
    fn = "load_checkpoint"
    _check_checkpoint_args(fn, model, optimizer, scheduler, generator)
    check_instance("path", path, fn, (str, Path), "a file path")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{fn}: no checkpoint at path {str(path)!r}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a truncated or foreign file: name it
        raise ValueError(f"{fn}: {str(path)!r} is not a readable checkpoint ({type(exc).__name__}: {exc})") from exc
    expected = {"step", "model", "optimizer", "scheduler", "generator", "torch_rng", "cuda_rng", "mps_rng",
                "python_rng", "numpy_rng"}
    if not isinstance(state, dict) or set(state) != expected:
        raise ValueError(f"{fn}: {str(path)!r} is not a checkpoint written by save_checkpoint")
    for name, given in (("scheduler", scheduler), ("generator", generator)):
        if (given is None) != (state[name] is None):
            raise ValueError(f"{fn}: the checkpoint {'has no' if state[name] is None else 'has a'} {name} state but "
                             f"{name}={'None' if given is None else type(given).__name__} was passed")
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None:
        scheduler.load_state_dict(state["scheduler"])
    if generator is not None:
        generator.set_state(state["generator"])
    torch.set_rng_state(state["torch_rng"])
    _restore_global_rng_states(state, fn, path)
    return int(state["step"])
