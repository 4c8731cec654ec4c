"""Plots shared by the chapters: training curves from a :func:`mmbook.train.fit` history."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

__all__ = ["plot_history"]


def plot_history(
    history: Mapping[str, Sequence[float]],
    keys: Sequence[str] | None = None,
    *,
    ax=None,
    title: str | None = None,
    logy: bool = False,
):
    """Draw per-epoch curves from a history and return the matplotlib ``Axes``.

    ``keys`` defaults to every entry except ``"epoch"``. The x axis is ``history["epoch"]``
    when present, else 1..n.
    """
    import matplotlib.pyplot as plt

    from mmbook.checks import check_bool

    if not isinstance(history, Mapping) or not history:
        raise ValueError(f"plot_history: history must be a non-empty mapping of name -> values, got {history!r}")
    if isinstance(keys, str):
        raise TypeError(f"plot_history: keys must be a sequence of names such as ['loss'], got {keys!r}")
    keys = list(keys) if keys is not None else [k for k in history if k != "epoch"]
    missing = [k for k in keys if k not in history]
    if missing:
        raise ValueError(f"plot_history: keys {missing} not in history (has {sorted(history)})")
    for key in keys:
        if isinstance(history[key], (str, bytes)) or not isinstance(history[key], Sequence):
            raise TypeError(f"plot_history: history[{key!r}] must be a sequence of numbers, "
                            f"got {type(history[key]).__name__}")
    check_bool("logy", logy, "plot_history")
    if ax is not None and not callable(getattr(ax, "plot", None)):
        raise TypeError(f"plot_history: ax must be a matplotlib Axes or None, got {type(ax).__name__}")
    if not keys:
        raise ValueError("plot_history: nothing to plot")
    if ax is None:
        _, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    for key in keys:
        values = list(history[key])
        xs = list(history["epoch"]) if "epoch" in history and len(history["epoch"]) == len(values) else list(
            range(1, len(values) + 1)
        )
        ax.plot(xs, values, marker="o", markersize=3, label=key)
    ax.set_xlabel("epoch")
    ax.set_ylabel("value")
    if logy:
        ax.set_yscale("log")
    if title:
        ax.set_title(title)
    ax.legend()
    ax.grid(alpha=0.3)
    return ax
