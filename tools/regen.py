#!/usr/bin/env python3
"""Re-execute notebooks in place, on the CPU, the way ``make test`` runs them.

Each notebook runs top to bottom in a fresh kernel of this environment, with the notebook's
folder as working directory and the environment ``make`` exports (``PYTHONHASHSEED=0``,
``MMBOOK_DEVICE=cpu``). Cells marked ``# NBVAL_RAISES_EXCEPTION`` may raise (their stored traceback is
reduced to the error line, free of machine paths); any other error stops the run and leaves
the file untouched.

Usage: ``python tools/regen.py [NOTEBOOK_OR_DIR ...]`` (default: ``chapters``).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient

RAISES_MARK = "NBVAL_RAISES_EXCEPTION"
RAISES_TAG = "raises-exception"


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
        store_widget_state=False,
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
    nb.metadata.get("language_info", {}).pop("version", None)
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
