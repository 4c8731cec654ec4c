#!/usr/bin/env python3
"""Re-execute notebooks in place, on the CPU, the way ``make test`` runs them.

Each notebook runs top to bottom in a fresh kernel of this environment, with the notebook's
folder as working directory and the environment ``make`` exports (``PYTHONHASHSEED=0``,
``MMBOOK_DEVICE=cpu``). Cells marked ``# NBVAL_RAISES_EXCEPTION`` may raise (their stored traceback is
reduced to the error line, free of machine paths); any other error stops the run and leaves
the file untouched.

What is stored is what JupyterLab would store after "Restart Kernel and Run All Cells":

* the ``raises-exception`` tag on every cell marked ``# NBVAL_RAISES_EXCEPTION`` (Lab's Run All goes on past it);
* ``language_info`` exactly as the kernel reports it (with its ``version``), so that opening the notebook in Lab
  with the same Python changes nothing and does not mark it modified;
* the state of the widgets its outputs display (``metadata.widgets``), so JupyterLab draws them before the
  notebook is run; models no stored output shows (a closed progress bar) are left out.

The kernel talks to this process over CurveZMQ-encrypted sockets (the kernelspec declares support), so it does
not warn about plain-text TCP.

Usage: ``python tools/regen.py [NOTEBOOK_OR_DIR ...]`` (default: ``chapters``).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient
from traitlets.config import Config

RAISES_MARK = "NBVAL_RAISES_EXCEPTION"
RAISES_TAG = "raises-exception"
WIDGET_STATE = "application/vnd.jupyter.widget-state+json"
WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"
# Manager-provisioned CurveZMQ keys for the kernel's sockets (see the module docstring).
KERNEL_CONFIG = Config({"KernelManager": {"transport_encryption": "auto"}})


def _tag_intended_exceptions(nb) -> None:
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        tags = cell.metadata.setdefault("tags", [])
        if RAISES_MARK in cell.source:
            if RAISES_TAG not in tags:
                tags.append(RAISES_TAG)
        elif RAISES_TAG in tags:
            tags.remove(RAISES_TAG)
        if not tags:
            del cell.metadata["tags"]


def _model_refs(value: object) -> set[str]:
    """Model ids a widget's state refers to (``"IPY_MODEL_<id>"`` strings: children, layout, style, ...)."""
    if isinstance(value, str):
        return {value[len("IPY_MODEL_"):]} if value.startswith("IPY_MODEL_") else set()
    if isinstance(value, dict):
        return set().union(*map(_model_refs, value.values())) if value else set()
    if isinstance(value, list):
        return set().union(*map(_model_refs, value)) if value else set()
    return set()


def _keep_displayed_widgets(nb) -> None:
    """Keep in ``metadata.widgets`` only the models a stored output displays, and what those refer to."""
    widgets = nb.metadata.get("widgets", {}).get(WIDGET_STATE)
    if widgets is None:
        return
    state = widgets["state"]
    todo = {output["data"][WIDGET_VIEW]["model_id"] for cell in nb.cells for output in cell.get("outputs", [])
            if WIDGET_VIEW in output.get("data", {})}
    keep: set[str] = set()
    while todo:
        model_id = todo.pop()
        if model_id in state and model_id not in keep:
            keep.add(model_id)
            todo |= _model_refs(state[model_id]["state"])
    widgets["state"] = {model_id: value for model_id, value in state.items() if model_id in keep}
    if not widgets["state"]:
        del nb.metadata["widgets"]


def regen(path: Path, timeout: int = 600) -> float:
    """Execute one notebook in place; return its wall time in seconds."""
    nb = nbformat.read(str(path), as_version=4)
    _tag_intended_exceptions(nb)
    nb.metadata["kernelspec"] = {"display_name": "Python 3 (ipykernel)", "language": "python", "name": "python3"}
    client = NotebookClient(
        nb,
        timeout=timeout,
        kernel_name="python3",
        resources={"metadata": {"path": str(path.parent.resolve())}},
        record_timing=False,
        store_widget_state=True,
        config=KERNEL_CONFIG,
    )
    start = time.perf_counter()
    client.execute()
    elapsed = time.perf_counter() - start
    for cell in nb.cells:  # keep diffs small: no per-run metadata
        cell.metadata.pop("execution", None)
        # The raises-exception tag stays: JupyterLab's Run All honours it (and goes on past the cell), nbval
        # honours both it and the comment marker.
        for output in cell.get("outputs", []):
            # An intended exception keeps its message, not the stack of this machine's file paths.
            if output.get("output_type") == "error":
                output["traceback"] = [f"{output['ename']}: {output['evalue']}"]
    _keep_displayed_widgets(nb)
    nbformat.validate(nb)
    nbformat.write(nb, str(path))
    return elapsed


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    os.environ.setdefault("PYTHONHASHSEED", "0")
    os.environ["MMBOOK_DEVICE"] = "cpu"
    targets: list[Path] = []
    for raw in args or ["chapters"]:
        p = Path(raw)
        if p.is_dir():
            targets.extend(q for q in sorted(p.rglob("*.ipynb")) if ".ipynb_checkpoints" not in q.parts)
        elif p.suffix == ".ipynb" and p.exists():
            targets.append(p)
        else:
            print(f"regen: {raw!r} is neither a directory nor a notebook", file=sys.stderr)
            return 2
    # REGEN_JOBS notebooks at a time (each in its own kernel), as `make test` runs them; 1 by default.
    jobs = int(os.environ.get("REGEN_JOBS", "1") or 1)

    def one(path: Path) -> None:
        print(f"regen {path} ...", flush=True)
        elapsed = regen(path)
        print(f"      {path} done in {elapsed:.1f} s", flush=True)

    if jobs <= 1 or len(targets) <= 1:
        for path in targets:
            one(path)
        return 0
    from concurrent.futures import ThreadPoolExecutor

    # Longest first, so the slowest chapters do not end up last on one worker.
    order = sorted(targets, key=lambda p: "solutions" in p.parts)
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        for future in [pool.submit(one, path) for path in order]:
            future.result()
    return 0


if __name__ == "__main__":
    sys.exit(main())
