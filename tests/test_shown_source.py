"""Every stored ``mmbook.show(X)`` output is the current source of ``X``.

A notebook that prints a function's source goes stale when the module changes; nbval finds that only by running
every notebook. This test finds it in a second, from the stored outputs alone, and names the notebook to
regenerate.
"""

from __future__ import annotations

import importlib
import json
import pkgutil
import re
from pathlib import Path

import pytest

import mmbook

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "chapters").rglob("*.ipynb"))
SHOW = re.compile(r"mmbook\.show\(([A-Za-z_][\w.]*)\)")


def _modules() -> list:
    mods = [mmbook]
    for info in pkgutil.iter_modules(mmbook.__path__):
        if not info.name.startswith("_"):
            mods.append(importlib.import_module(f"mmbook.{info.name}"))
    return mods


def current_sources(dotted: str) -> set[str]:
    """The plain-text ``mmbook.show`` of every object of the package that ``dotted`` can name."""
    found = set()
    if dotted.startswith("mmbook."):  # written with its full path: mmbook.metrics.f1
        modules, dotted = [mmbook], dotted.removeprefix("mmbook.")
    else:  # imported by name from one of the modules
        modules = _modules()
    for module in modules:
        obj = module
        for part in dotted.split("."):
            obj = getattr(obj, part, None)
            if obj is None:
                break
        if obj is not None and obj is not module:
            try:
                found.add(repr(mmbook.show(obj)))
            except TypeError:
                pass
    return found


def shown_cells(notebook: Path) -> list[tuple[int, str, str]]:
    nb = json.loads(notebook.read_text(encoding="utf-8"))
    cells = []
    for i, cell in enumerate(nb["cells"]):
        match = SHOW.fullmatch("".join(cell["source"]).strip()) if cell["cell_type"] == "code" else None
        if match:
            texts = [o["data"]["text/plain"] for o in cell.get("outputs", []) if "text/plain" in o.get("data", {})]
            cells.append((i, match.group(1), "".join(texts[0]) if texts else ""))
    return cells


def test_the_book_shows_source():
    assert sum(len(shown_cells(nb)) for nb in NOTEBOOKS) >= 50


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=[nb.stem for nb in NOTEBOOKS])
def test_stored_source_is_current(notebook: Path):
    stale = [f"cell {i}: mmbook.show({name})" for i, name, stored in shown_cells(notebook)
             if stored not in current_sources(name)]
    assert not stale, (f"{notebook.relative_to(ROOT)} shows source that has changed since it was run "
                       f"(make regen NB={notebook.relative_to(ROOT)}): {stale}")


def test_a_stale_output_is_caught(tmp_path):
    nb = {"cells": [{"cell_type": "code", "source": "mmbook.show(show)", "metadata": {},
                     "outputs": [{"output_type": "execute_result", "data": {"text/plain": "def show(obj): pass"}}]}]}
    path = tmp_path / "stale.ipynb"
    path.write_text(json.dumps(nb), encoding="utf-8")
    ((i, name, stored),) = shown_cells(path)
    assert name == "show" and stored not in current_sources(name)
    assert repr(mmbook.show(mmbook.show)) in current_sources("show")
