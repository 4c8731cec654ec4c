"""Check that this environment can run the book: ``python -m mmbook.doctor``.

Prints the versions of the core stack and the device, then checks that every import
found in the chapter notebooks works. Exits non-zero, naming what is missing.
"""

from __future__ import annotations

import ast
import importlib
import json
import platform
import sys
from pathlib import Path

__all__ = ["chapter_imports", "main"]

CORE = ("torch", "torchvision", "torchaudio", "transformers", "tokenizers", "numpy", "sklearn",
        "matplotlib", "nbval", "soundfile")


def _version(module_name: str) -> str:
    module = importlib.import_module(module_name)
    return str(getattr(module, "__version__", "unknown"))


def chapter_imports(chapters_dir: Path) -> dict[str, set[str]]:
    """Map each top-level module imported in a notebook under ``chapters_dir`` to its notebooks."""
    if not isinstance(chapters_dir, (str, Path)):
        raise TypeError(f"chapter_imports: chapters_dir must be a str or Path, got {type(chapters_dir).__name__}")
    chapters_dir = Path(chapters_dir)
    if not chapters_dir.is_dir():
        raise ValueError(f"chapter_imports: chapters_dir {str(chapters_dir)!r} is not a directory")
    found: dict[str, set[str]] = {}
    for path in sorted(chapters_dir.rglob("*.ipynb")):
        if ".ipynb_checkpoints" in path.parts:
            continue
        nb = json.loads(path.read_text(encoding="utf-8"))
        for cell in nb.get("cells", []):
            if cell.get("cell_type") != "code":
                continue
            source = "".join(cell.get("source", []))
            lines = [ln for ln in source.splitlines() if not ln.lstrip().startswith(("%", "!"))]
            try:
                tree = ast.parse("\n".join(lines))
            except SyntaxError:
                continue
            for node in ast.walk(tree):
                names: list[str] = []
                if isinstance(node, ast.Import):
                    names = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                    names = [node.module]
                for name in names:
                    found.setdefault(name, set()).add(path.name)
    return found


def main(argv: list[str] | None = None) -> int:
    problems: list[str] = []
    print(f"python        {platform.python_version()} ({sys.executable})")
    for name in CORE:
        try:
            print(f"{name:<13} {_version(name)}")
        except Exception as err:  # noqa: BLE001 - report any import failure
            print(f"{name:<13} MISSING ({type(err).__name__}: {err})")
            problems.append(f"{name} cannot be imported: {err}")
    try:
        import mmbook

        device = mmbook.get_device()
        print(f"mmbook        {mmbook.__version__}")
        print(f"device        {device}")
    except Exception as err:  # noqa: BLE001
        problems.append(f"mmbook/device: {err}")
        print(f"device        ERROR ({err})")

    chapters_dir = Path(__file__).resolve().parent.parent / "chapters"
    if chapters_dir.is_dir():
        imports = chapter_imports(chapters_dir)
        failed = 0
        for module_name in sorted(imports):
            try:
                importlib.import_module(module_name)
            except Exception as err:  # noqa: BLE001
                failed += 1
                where = ", ".join(sorted(imports[module_name]))
                problems.append(f"{module_name} (imported by {where}) cannot be imported: {err}")
        print(f"chapters      {len(imports) - failed}/{len(imports)} imported modules available")
    else:
        print("chapters      not found next to the package (installed alone); skipped")

    if problems:
        print("\nPROBLEMS:")
        for problem in problems:
            print(f"  - {problem}")
        return 1
    print("\nEverything OK.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
