#!/usr/bin/env python3
"""Turn a percent-format script into an (unexecuted) notebook, for drafting chapters.

Cells start with ``# %%`` (code) or ``# %% [markdown]`` (markdown; each line's leading
``# `` is removed). Run ``make regen NB=...`` afterwards to execute it.

Usage: ``python tools/py2nb.py draft.py chapters/NN_slug.ipynb``
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import nbformat

MARKER = re.compile(r"^# %%(?P<md>\s*\[markdown\])?\s*$")


def convert(text: str) -> nbformat.NotebookNode:
    cells: list[tuple[str, list[str]]] = []
    for line in text.splitlines():
        match = MARKER.match(line)
        if match:
            cells.append(("markdown" if match.group("md") else "code", []))
        elif cells:
            cells[-1][1].append(line)
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"display_name": "Python 3 (ipykernel)", "language": "python", "name": "python3"}
    nb.metadata["language_info"] = {"name": "python"}
    for kind, lines in cells:
        while lines and not lines[-1].strip():
            lines.pop()
        while lines and not lines[0].strip():
            lines.pop(0)
        if kind == "markdown":
            body = "\n".join(ln[2:] if ln.startswith("# ") else ln.lstrip("#") for ln in lines)
            nb.cells.append(nbformat.v4.new_markdown_cell(body))
        elif lines:
            nb.cells.append(nbformat.v4.new_code_cell("\n".join(lines)))
    for i, cell in enumerate(nb.cells):
        cell["id"] = f"c{i:03d}"
    return nb


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    src, dst = Path(args[0]), Path(args[1])
    nb = convert(src.read_text(encoding="utf-8"))
    nbformat.validate(nb)
    nbformat.write(nb, str(dst))
    print(f"wrote {dst} ({len(nb.cells)} cells)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
