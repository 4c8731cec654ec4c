"""Argument checks shared by the public functions and modules of mmbook.

Every check has the same argument order, ``check(name, value, fn, ...)``: the caller's argument name, the
value it got, and the public function or class the caller called. Every message has the same form,
``"{fn}: {name} must be ..., got ..."``. A value of the wrong Python type or tensor dtype raises
:class:`TypeError`; a value of the right type but out of range, of the wrong shape or not finite raises
:class:`ValueError`.

The checks are meant for function entry and the top of a module's ``forward``: a few attribute reads per
argument, and at most one reduction over a tensor (the range of ids, finiteness), never a Python loop over
its elements.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

__all__ = [
    "check_bool",
    "check_choice",
    "check_device",
    "check_finite",
    "check_float_tensor",
    "check_fractions",
    "check_ids",
    "check_index",
    "check_instance",
    "check_int",
    "check_int_tensor",
    "check_like",
    "check_module_input",
    "check_number",
    "check_probability",
    "check_same_shape",
    "check_scalar",
    "check_tensor",
    "check_token_batch",
    "describe",
    "positive_int",
]


def describe(value: object) -> str:
    """A short description of what a caller passed: a tensor's shape and dtype, else the type's name."""
    if isinstance(value, torch.Tensor):
        return f"a tensor of shape {tuple(value.shape)} and dtype {value.dtype}"
    if isinstance(value, np.ndarray):
        return f"a numpy array of shape {value.shape} and dtype {value.dtype}"
    return type(value).__name__


def check_instance(name: str, value: Any, fn: str, types: type | tuple[type, ...], what: str) -> Any:
    """``value`` must be an instance of ``types`` (``what`` says it in words, e.g. ``"a GPTConfig"``)."""
    if not isinstance(value, types) or (isinstance(value, bool) and bool not in _as_tuple(types)):
        raise TypeError(f"{fn}: {name} must be {what}, got {type(value).__name__}")
    return value


def _as_tuple(types: type | tuple[type, ...]) -> tuple[type, ...]:
    return types if isinstance(types, tuple) else (types,)


def _is_int(value: object) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def check_int(name: str, value: Any, fn: str, low: int | None = None, high: int | None = None) -> int:
    """An int (``bool`` is not one) in ``[low, high]``; either bound may be None. Returns a Python int."""
    if not _is_int(value):
        raise TypeError(f"{fn}: {name} must be an int, got {type(value).__name__}")
    value = int(value)
    if (low is not None and value < low) or (high is not None and value > high):
        if high is None and low == 1:
            bound = "a positive int"
        elif high is None:
            bound = f"an int >= {low}"
        elif low is None:
            bound = f"an int <= {high}"
        else:
            bound = f"an int in [{low}, {high}]"
        raise ValueError(f"{fn}: {name} must be {bound}, got {value}")
    return value


def positive_int(name: str, value: Any, fn: str) -> int:
    """An int >= 1."""
    return check_int(name, value, fn, low=1)


def check_number(name: str, value: Any, fn: str, low: float | None = None, high: float | None = None, *,
                 low_open: bool = False, high_open: bool = False) -> float:
    """A finite real number (int or float, not bool) in the interval given by ``low``/``high``.

    ``low_open``/``high_open`` exclude the bound itself. NaN and infinities are always rejected: they
    compare False with everything, so they would pass a range check written the other way round.
    Returns a Python float.
    """
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"{fn}: {name} must be a number, got {type(value).__name__}")
    shown = value if isinstance(value, (int, float)) else float(value)  # the caller's 0 reads "got 0", not "0.0"
    value = float(value)
    ok = math.isfinite(value)
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if not ok:
        if high is None and low == 0:
            bound = "a positive number" if low_open else "a number >= 0"
        elif low is None and high is None:
            bound = "a finite number"
        elif high is None:
            bound = f"a number {'>' if low_open else '>='} {low:g}"
        elif low is None:
            bound = f"a number {'<' if high_open else '<='} {high:g}"
        else:
            bound = f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        raise ValueError(f"{fn}: {name} must be {bound}, got {shown!r}")
    return value


def check_scalar(name: str, value: Any, fn: str, low: float | None = None, *, low_open: bool = False,
                 hint: str = "") -> float | torch.Tensor:
    """A finite real number, or a one-element floating-point tensor (a learned parameter, gradients kept), that is
    ``>= low`` (``> low`` with ``low_open``). Returns a Python float, or the tensor reshaped to ``()``. ``hint`` is
    appended to the message (e.g. what the number means)."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"{fn}: {name} must be a scalar, got a tensor of shape {tuple(value.shape)}")
        if not torch.is_floating_point(value):
            raise TypeError(f"{fn}: {name} must be a floating-point scalar tensor, got {value.dtype}")
        number = float(value.detach().reshape(()).item())
    elif isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"{fn}: {name} must be a number or a scalar tensor, got {type(value).__name__}")
    else:
        number = float(value)
    ok = math.isfinite(number) and (low is None or (number > low if low_open else number >= low))
    if not ok:
        if low is None:
            bound = "finite"
        elif low == 0 and low_open:
            bound = "positive and finite"
        else:
            bound = f"finite and {'>' if low_open else '>='} {low:g}"
        raise ValueError(f"{fn}: {name} must be {bound}{hint}, got {number}")
    return value.reshape(()) if isinstance(value, torch.Tensor) else number


def check_probability(name: str, value: Any, fn: str, high_inclusive: bool = True) -> float:
    """A number in ``[0, 1]`` (``[0, 1)`` with ``high_inclusive=False``, e.g. a dropout rate)."""
    return check_number(name, value, fn, 0.0, 1.0, high_open=not high_inclusive)


def check_fractions(name: str, value: Any, fn: str) -> tuple[float, ...]:
    """A non-empty sequence of positive finite numbers that sum to 1 (the shares of a train/val/test split)."""
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or len(value) == 0:
        raise TypeError(f"{fn}: {name} must be a non-empty sequence of numbers, got {value!r}")
    values = tuple(check_number(f"{name}[{i}]", v, fn, 0.0, low_open=True) for i, v in enumerate(value))
    if abs(sum(values) - 1.0) > 1e-9:
        raise ValueError(f"{fn}: {name} must be positive and sum to 1, got {tuple(value)}")
    return values


def check_bool(name: str, value: Any, fn: str) -> bool:
    """``True`` or ``False`` (a string such as ``"no"`` would be truthy)."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{fn}: {name} must be True or False, got {type(value).__name__}")
    return bool(value)


def check_choice(name: str, value: Any, fn: str, choices: Iterable[Any]) -> Any:
    """One of ``choices`` (compared with ``==``; unhashable values are fine)."""
    choices = tuple(choices)
    if isinstance(value, torch.Tensor) or not any(type(value) is type(c) and value == c for c in choices):
        raise ValueError(f"{fn}: {name} must be one of {', '.join(map(repr, choices))}, got {value!r}")
    return value


_KINDS = {
    "float": ("a floating-point", torch.is_floating_point),
    "int": ("an integer", lambda t: not t.dtype.is_floating_point and not t.dtype.is_complex and t.dtype != torch.bool),
    "bool": ("a boolean", lambda t: t.dtype == torch.bool),
}


def check_tensor(name: str, x: Any, fn: str, kind: str | None = None, ndim: int | tuple[int, ...] | None = None,
                 shape: str | None = None, *, min_ndim: int | None = None, nonempty: bool = False,
                 finite: bool = False) -> torch.Tensor:
    """A ``torch.Tensor`` of dtype ``kind`` (``"float"``, ``"int"``, ``"bool"`` or None for any) with ``ndim``
    dimensions (an int or a tuple of allowed ints) or at least ``min_ndim``. ``shape`` describes the expected
    shape in words for the message, e.g. ``"(batch, seq, d_model)"``. ``nonempty`` rejects a tensor with a
    zero-size dimension; ``finite`` rejects NaN and infinities (one reduction)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{fn}: {name} must be a torch.Tensor, got {type(x).__name__}")
    if kind is not None:
        what, ok = _KINDS[kind]
        if not ok(x):
            raise TypeError(f"{fn}: {name} must be {what} tensor, got {x.dtype}")
    if ndim is not None and x.ndim not in ((ndim,) if isinstance(ndim, int) else ndim):
        want = shape if shape is not None else (f"{ndim} dimension(s)" if isinstance(ndim, int)
                                                else f"{' or '.join(map(str, ndim))} dimensions")
        raise ValueError(f"{fn}: {name} must have {'shape ' if shape is not None else ''}{want}, "
                         f"got shape {tuple(x.shape)}")
    if min_ndim is not None and x.ndim < min_ndim:
        raise ValueError(f"{fn}: {name} must have at least {min_ndim} dimensions, got shape {tuple(x.shape)}")
    if nonempty and x.numel() == 0:
        raise ValueError(f"{fn}: {name} must not be empty, got shape {tuple(x.shape)}")
    if finite:
        check_finite(name, x, fn)
    return x


def check_float_tensor(name: str, x: Any, fn: str, ndim: int | tuple[int, ...] | None = None,
                       shape: str | None = None, *, min_ndim: int | None = None, nonempty: bool = False,
                       finite: bool = False) -> torch.Tensor:
    """:func:`check_tensor` with ``kind="float"``."""
    return check_tensor(name, x, fn, "float", ndim, shape, min_ndim=min_ndim, nonempty=nonempty, finite=finite)


def check_int_tensor(name: str, x: Any, fn: str, ndim: int | tuple[int, ...] | None = None,
                     shape: str | None = None) -> torch.Tensor:
    """:func:`check_tensor` with ``kind="int"`` (any integer dtype; not bool, not float)."""
    return check_tensor(name, x, fn, "int", ndim, shape)


def check_finite(name: str, x: torch.Tensor | np.ndarray, fn: str) -> None:
    """No NaN or infinite entry (NaN compares False with everything, so it would pass as a plausible value)."""
    finite = bool(torch.isfinite(x).all()) if isinstance(x, torch.Tensor) else bool(np.isfinite(x).all())
    if not finite:
        raise ValueError(f"{fn}: {name} contains NaN or infinite values")


def check_ids(name: str, ids: Any, fn: str, size: int, ndim: int | tuple[int, ...] | None = None,
              shape: str | None = None, *, allow: Iterable[int] = ()) -> torch.Tensor:
    """An integer tensor whose entries lie in ``[0, size)`` (token ids, class targets, indices); entries in
    ``allow`` are also accepted (e.g. an ``ignore_index`` of -100). A negative id would wrap around to the end
    of a table; one past the end fails deep inside ``nn.Embedding`` or ``cross_entropy``."""
    ids = check_int_tensor(name, ids, fn, ndim, shape)
    if ids.numel():
        values = ids
        allowed = tuple(allow)
        if allowed:
            keep = torch.ones_like(ids, dtype=torch.bool)
            for a in allowed:
                keep &= ids != a
            values = ids[keep]
        if values.numel():
            low, high = torch.aminmax(values)
            low, high = int(low), int(high)
            if low < 0 or high >= size:
                extra = f" (or {', '.join(map(str, allowed))})" if allowed else ""
                raise ValueError(f"{fn}: {name} must lie in [0, {size}){extra}, got values in [{low}, {high}]")
    return ids


def check_token_batch(ids: Any, lengths: Any, fn: str, vocab_size: int | None = None) -> None:
    """A batch of token ids ``(batch, T)`` (integer; in ``[0, vocab_size)`` when ``vocab_size`` is given) and its
    ``lengths`` ``(batch,)`` in ``[1, T]`` (``None``: no padding). The argument names are ``ids`` and ``lengths``."""
    if not isinstance(ids, torch.Tensor) or ids.ndim != 2 or ids.dtype.is_floating_point or ids.dtype == torch.bool:
        got = tuple(ids.shape) if isinstance(ids, torch.Tensor) else type(ids).__name__
        raise ValueError(f"{fn}: ids must be an integer tensor of shape (batch, T), got {got}")
    if vocab_size is not None:  # a negative id would wrap to the end of the embedding table
        check_ids("ids", ids, fn, vocab_size)
    if lengths is not None:
        if not isinstance(lengths, torch.Tensor) or lengths.ndim != 1 or lengths.shape[0] != ids.shape[0]:
            got = tuple(lengths.shape) if isinstance(lengths, torch.Tensor) else type(lengths).__name__
            raise ValueError(f"{fn}: lengths must be a (batch,) = ({ids.shape[0]},) tensor, got {got}")
        check_int_tensor("lengths", lengths, fn)
        if lengths.numel() and (int(lengths.min()) < 1 or int(lengths.max()) > ids.shape[1]):
            # a length of 0 would mask every token and leave an input-independent answer
            raise ValueError(f"{fn}: lengths must lie in [1, T={ids.shape[1]}], got {lengths.tolist()}")


def check_device(name: str, value: Any, fn: str) -> torch.device:
    """A ``torch.device`` or a name such as ``"cpu"``, ``"cuda"`` or ``"cuda:1"``, returned as a ``torch.device``."""
    if not isinstance(value, (str, torch.device)):
        raise TypeError(f"{fn}: {name} must be a torch.device or a name such as 'cpu', got {type(value).__name__}")
    try:
        return torch.device(value)
    except RuntimeError:
        raise ValueError(f"{fn}: {name} must name a torch device such as 'cpu' or 'cuda', got {value!r}") from None


def check_index(name: str, value: Any, fn: str, size: int) -> int:
    """An int in ``[0, size)``: negative indices are refused rather than counted from the end."""
    value = check_int(name, value, fn)
    if not 0 <= value < size:
        raise ValueError(f"{fn}: {name} must be in [0, {size}), got {value}")
    return value


def check_like(name: str, x: torch.Tensor, fn: str, like_name: str, like: torch.Tensor) -> None:
    """``x`` has the dtype and device of ``like`` (float32 mixed with float64 otherwise fails deep in a matmul)."""
    if x.dtype != like.dtype:
        raise TypeError(f"{fn}: {name} and {like_name} must have the same dtype, got {x.dtype} and {like.dtype}")
    if x.device != like.device:
        raise ValueError(f"{fn}: {name} and {like_name} must be on the same device, got {x.device} and {like.device}")


def check_same_shape(fn: str, **tensors: torch.Tensor) -> None:
    """Every tensor passed by keyword has the shape of the first one; the message names both (the argument
    names are the keywords): ``check_same_shape("f", logp=logp, ref_logp=ref_logp)``."""
    names = list(tensors)
    first = tensors[names[0]]
    for name in names[1:]:
        if tensors[name].shape != first.shape:
            raise ValueError(f"{fn}: {name} must have the shape of {names[0]} {tuple(first.shape)}, "
                             f"got {tuple(tensors[name].shape)}")


def _first_parameter(module: nn.Module) -> torch.Tensor | None:
    """The first parameter in ``module.parameters()`` order, found without building that generator (this runs
    in every forward, and ``next(module.parameters())`` costs several microseconds)."""
    for p in module._parameters.values():
        if p is not None:
            return p
    for child in module._modules.values():
        if child is not None:
            p = _first_parameter(child)
            if p is not None:
                return p
    return None


def check_module_input(name: str, x: torch.Tensor, fn: str, module: nn.Module) -> None:
    """A floating-point input ``x`` has the dtype and device of ``module``'s parameters."""
    p = _first_parameter(module)
    if p is None:
        return
    if x.dtype != p.dtype and torch.is_floating_point(x):
        raise TypeError(f"{fn}: {name} has dtype {x.dtype} but the model's parameters are {p.dtype}; "
                        f"convert one of them with .to({p.dtype}) or .to({x.dtype})")
    if x.device != p.device:
        raise ValueError(f"{fn}: {name} is on {x.device} but the model's parameters are on {p.device}; "
                         "move one of them with .to(device)")
