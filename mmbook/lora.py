"""LoRA: low-rank adaptation of a frozen linear layer (Hu et al., 2021).

Fine-tuning changes a weight ``W`` ``(out, in)`` by some ``ΔW``. LoRA restricts the change to rank ``r``,
``ΔW = (α / r) B A`` with ``A`` ``(r, in)`` and ``B`` ``(out, r)``, and trains only ``A`` and ``B``::

    y = W x + (α / r) B (A x)

``B`` starts at zero, so the adapted model starts exactly at the base model; ``A`` starts random (Kaiming-uniform,
as ``nn.Linear`` and ``peft`` do), so the gradient of ``B`` is not zero. The scale ``α / r`` is often said to keep
the update's size independent of ``r`` at a fixed learning rate; under Adam it does not (chapter 18, exercise 5:
with ``α`` fixed the update shrinks as ``r`` grows; with ``α = 2 r`` it grows). After training,
:meth:`LoRALinear.merge` adds ``(α / r) B A`` into ``W``: the merged layer computes the same outputs with no extra
cost at inference.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from mmbook.checks import check_instance, check_module_input, check_number, positive_int
from mmbook.core import torch_generator

__all__ = [
    "LoRALinear",
    "apply_lora",
    "count_parameters",
    "load_lora_state_dict",
    "lora_layers",
    "lora_state_dict",
    "merge_lora",
    "training_memory",
    "unmerge_lora",
]


class LoRALinear(nn.Module):
    """``base(x) + (alpha / r) * x A^T B^T`` for a frozen ``nn.Linear`` ``base``; ``(..., in) -> (..., out)``.

    ``lora_A`` ``(r, in)`` is drawn Kaiming-uniform (``a = sqrt(5)``, ``nn.Linear``'s rule) from a generator seeded
    with ``seed`` (through :func:`mmbook.torch_generator`); ``lora_B`` ``(out, r)`` starts at zero. The base layer's
    parameters are frozen. :meth:`merge` folds the update into ``base.weight``; :meth:`unmerge` takes it out again.
    There is no dropout on the adapter's input (``peft``'s ``lora_dropout``; its default 0 computes the same map).
    """

    def __init__(self, base: nn.Linear, r: int, alpha: float, *, seed: int = 0) -> None:
        super().__init__()
        fn = "LoRALinear"
        check_instance("base", base, fn, nn.Linear, "a torch.nn.Linear")
        self.r = positive_int("r", r, fn)
        self.alpha = check_number("alpha", alpha, fn, 0.0, low_open=True)
        if r > min(base.in_features, base.out_features):
            raise ValueError(f"{fn}: r={r} exceeds min(in_features, out_features) = "
                             f"{min(base.in_features, base.out_features)}")
        self.base = base
        for p in base.parameters():
            p.requires_grad_(False)
        w = base.weight
        a = torch.empty(r, base.in_features, dtype=w.dtype)
        bound = 1.0 / math.sqrt(base.in_features)  # kaiming_uniform_(a=sqrt(5)) gives U(-1/sqrt(in), 1/sqrt(in))
        a.uniform_(-bound, bound, generator=torch_generator(seed))
        self.lora_A = nn.Parameter(a.to(w.device))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r, dtype=w.dtype, device=w.device))
        self.merged = False

    @property
    def scaling(self) -> float:
        """``alpha / r``."""
        return self.alpha / self.r

    def delta_weight(self) -> torch.Tensor:
        """``(alpha / r) B A``, ``(out, in)``: the update LoRA adds to the base weight."""
        return self.scaling * (self.lora_B @ self.lora_A)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_module_input("x", x, "LoRALinear", self)
        y = self.base(x)
        if self.merged:
            return y
        return y + self.scaling * F.linear(F.linear(x, self.lora_A), self.lora_B)

    @torch.no_grad()
    def merge(self) -> None:
        """``W <- W + (alpha / r) B A``; afterwards ``forward`` is the base layer alone (no-op if merged)."""
        if not self.merged:
            self.base.weight += self.delta_weight()
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo :meth:`merge` (up to float rounding); no-op if not merged."""
        if self.merged:
            self.base.weight -= self.delta_weight()
            self.merged = False

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha:g}, scaling={self.scaling:g}, merged={self.merged}"


def apply_lora(model: nn.Module, targets: Sequence[str], r: int, alpha: float, *,
               layers: Iterable[int] | None = None, seed: int = 0) -> list[str]:
    """Freeze every parameter of ``model`` and wrap each ``nn.Linear`` whose name ends in one of ``targets``
    (e.g. ``("q_proj", "v_proj")``) in a :class:`LoRALinear` of rank ``r``; returns the wrapped names, sorted.

    With ``layers``, only modules under ``layers.{i}.`` for ``i`` in ``layers`` are wrapped (LoRA on a subset of
    the blocks). Adapter ``k`` (in name order) draws its ``A`` with seed ``seed + k``. A target that matches no
    linear layer is an error (a typo would otherwise train nothing).
    """
    fn = "apply_lora"
    check_instance("model", model, fn, nn.Module, "a torch.nn.Module")
    if isinstance(targets, str) or not isinstance(targets, Sequence) or not targets \
            or not all(isinstance(t, str) and t for t in targets):
        raise TypeError(f"{fn}: targets must be a non-empty list of module names such as ['q_proj', 'v_proj'], "
                        f"got {targets!r}")
    r = positive_int("r", r, fn)
    alpha = check_number("alpha", alpha, fn, 0.0, low_open=True)
    if layers is None:
        keep = None
    else:
        if isinstance(layers, (str, bytes)) or not isinstance(layers, Iterable):
            raise TypeError(f"{fn}: layers must be an iterable of block indices, got {type(layers).__name__}")
        keep = set(layers)
        if not keep or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in keep):
            raise ValueError(f"{fn}: layers must be non-negative block indices, got {sorted(keep, key=repr)!r:.80}")
    if any(isinstance(m, LoRALinear) for m in model.modules()):
        raise ValueError(f"{fn}: model already has LoRA adapters")
    found = []
    for name, module in sorted(model.named_modules()):
        last = name.rsplit(".", 1)[-1]
        if last not in targets or not isinstance(module, nn.Linear):
            continue
        parts = name.split(".")
        if keep is not None and not (len(parts) > 1 and parts[0] == "layers" and int(parts[1]) in keep):
            continue
        found.append(name)
    missing = [t for t in targets if not any(n.rsplit(".", 1)[-1] == t for n in found)]
    if missing:
        raise ValueError(f"{fn}: no nn.Linear named {missing} in model"
                         f"{'' if keep is None else f' under layers {sorted(keep)}'}")
    for name in found:  # validate everything before changing the model, so a bad call leaves it intact
        module = model.get_submodule(name)
        if r > min(module.in_features, module.out_features):
            raise ValueError(f"{fn}: r={r} exceeds min(in_features, out_features) = "
                             f"{min(module.in_features, module.out_features)} of {name}")
    for p in model.parameters():
        p.requires_grad_(False)
    for k, name in enumerate(found):
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, LoRALinear(getattr(parent, child), r, alpha, seed=seed + k))
    return found


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    """The :class:`LoRALinear` modules of ``model`` by name."""
    check_instance("model", model, "lora_layers", nn.Module, "a torch.nn.Module")
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def _require_lora(model: nn.Module, fn: str) -> dict[str, LoRALinear]:
    layers = lora_layers(model)
    if not layers:
        raise ValueError(f"{fn}: model has no LoRA adapters (call apply_lora first)")
    return layers


def merge_lora(model: nn.Module) -> None:
    """:meth:`LoRALinear.merge` every adapter of ``model``."""
    for m in _require_lora(model, "merge_lora").values():
        m.merge()


def unmerge_lora(model: nn.Module) -> None:
    """:meth:`LoRALinear.unmerge` every adapter of ``model``."""
    for m in _require_lora(model, "unmerge_lora").values():
        m.unmerge()


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the adapters' ``lora_A`` and ``lora_B`` tensors (CPU copies), by parameter name: what to save."""
    _require_lora(model, "lora_state_dict")
    return {n: p.detach().cpu().clone() for n, p in model.named_parameters() if n.rsplit(".", 1)[-1] in
            ("lora_A", "lora_B")}


@torch.no_grad()
def load_lora_state_dict(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy adapter tensors saved by :func:`lora_state_dict` into ``model`` (same names and shapes required)."""
    fn = "load_lora_state_dict"
    params = {n: p for n, p in model.named_parameters() if n.rsplit(".", 1)[-1] in ("lora_A", "lora_B")}
    if not params:
        raise ValueError(f"{fn}: model has no LoRA adapters (call apply_lora first)")
    if not isinstance(state, dict) or set(state) != set(params):
        got = sorted(state)[:4] if isinstance(state, dict) else type(state).__name__
        raise ValueError(f"{fn}: state must hold exactly the model's {len(params)} adapter tensors, got {got}")
    for n, p in params.items():
        if tuple(state[n].shape) != tuple(p.shape):
            raise ValueError(f"{fn}: {n} has shape {tuple(state[n].shape)}, the model's is {tuple(p.shape)}")
        p.copy_(state[n])


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """``(trainable, total)`` numbers of parameters of ``model`` (tied tensors counted once)."""
    check_instance("model", model, "count_parameters", nn.Module, "a torch.nn.Module")
    params = list(model.parameters())  # parameters() already yields a shared tensor once
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def training_memory(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """Bytes held by the parameters, their gradients and the optimizer's state, measured from the tensors.

    Call after at least one ``optimizer.step()`` (before it, Adam has no state yet). Returns
    ``{"parameters", "trainable", "gradients", "optimizer"}``: all parameters, the trainable ones, every
    ``.grad`` that exists, and every tensor in ``optimizer.state`` (Adam: two per parameter, plus a step count).
    """
    fn = "training_memory"
    check_instance("model", model, fn, nn.Module, "a torch.nn.Module")
    check_instance("optimizer", optimizer, fn, torch.optim.Optimizer, "a torch.optim.Optimizer")
    if not optimizer.state:
        raise ValueError(f"{fn}: optimizer has no state yet; call it after one optimizer.step()")
    params = list(model.parameters())
    nbytes = lambda t: t.numel() * t.element_size()  # noqa: E731
    return {"parameters": sum(nbytes(p) for p in params),
            "trainable": sum(nbytes(p) for p in params if p.requires_grad),
            "gradients": sum(nbytes(p.grad) for p in params if p.grad is not None),
            "optimizer": sum(nbytes(v) for s in optimizer.state.values() for v in s.values()
                             if isinstance(v, torch.Tensor))}
