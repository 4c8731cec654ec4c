#!/usr/bin/env python3
"""Notebook hygiene check: fail notebooks that would pass nbval for the wrong reasons.

A stripped or partly executed notebook passes ``pytest --nbval`` silently (there is nothing
to compare), so every notebook of the book must be:

* valid nbformat 4;
* fully executed, in order, by a fresh kernel: the non-empty code cells carry execution
  counts 1, 2, 3, ... and no code cell is empty;
* free of stored errors, except in a cell marked ``# NBVAL_RAISES_EXCEPTION`` and tagged
  ``raises-exception`` - an intended, explained exception. The two go together: nbval reads the comment,
  JupyterLab's "Run All" the tag (without it Lab stops at the error and leaves every later cell unrun);
* free of machine paths (home, temporary or virtual-environment directories) in outputs;
* free of unasserted verdicts: a code cell whose output prints a line ending in ``: True`` or
  ``: False`` must contain an ``assert`` (or call a checking function such as
  ``torch.testing.assert_close``), so that lax and GPU runs check what the printed line claims;
* at most 3 MB on disk.

Usage: ``python tools/check_notebooks.py [PATH ...]`` (files or directories; default
``chapters``). Exits 1 and lists every problem when any notebook fails.
"""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

MAX_BYTES = 3 * 1024 * 1024
RAISES_MARK = "NBVAL_RAISES_EXCEPTION"
RAISES_TAG = "raises-exception"
# Paths that identify one machine: home and temp directories, Windows user folders, venvs.
MACHINE_PATH = re.compile(
    r"(?:/home/[\w.-]+|/root/|/Users/[\w.-]+|/tmp/|/work/|/private/var/|[A-Za-z]:\\\\?Users\\\\?"
    r"|site-packages|dist-packages|\.venv/)"
)


# A printed verdict: a line ending in ": True" / ": False" (optionally followed by punctuation).
VERDICT = re.compile(r":\s*(?:True|False)\W*$", re.MULTILINE)
# What counts as checking the claim in the cell itself: an assert statement, a testing helper, or raising.
ASSERTS = re.compile(r"^\s*assert\b|\bassert_\w+\(|\bassert\w*\(|^\s*raise\b|\bpytest\.raises\b", re.MULTILINE)


_BOOL_CALLS = {"bool", "all", "any", "allclose", "isclose", "equal", "array_equal", "array_equiv", "isfinite",
               "is_tensor", "isinstance", "issubset", "startswith", "endswith"}


def _is_boolean_expr(node: ast.AST) -> bool:
    if isinstance(node, (ast.Compare, ast.BoolOp)) or (isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not)):
        return True
    if isinstance(node, ast.Call):
        func = node.func
        name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
        if name in _BOOL_CALLS:
            return True
        if isinstance(func, ast.Attribute) and name in ("all", "any", "item"):
            return _is_boolean_expr(func.value) if name == "item" else True
    return False


def _unwrap_bool(node: ast.AST) -> ast.AST:
    while (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "bool"
           and len(node.args) == 1):
        node = node.args[0]
    return node


def unasserted_verdicts(source: str) -> list[str]:
    """The boolean expressions a cell prints as a verdict (``print("...:", expr)``) without asserting them.

    A verdict counts as asserted when an ``assert`` statement in the cell tests the same expression, or the
    name it prints. Literal ``True`` verdicts are covered by the cell-level rule (an assert must exist).
    """
    lines = [line for line in source.splitlines() if not line.lstrip().startswith(("%", "!"))]
    try:
        tree = ast.parse("\n".join(lines))
    except SyntaxError:
        return []
    asserted = [ast.unparse(node.test) for node in ast.walk(tree) if isinstance(node, ast.Assert)]
    missing = []
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "print"):
            continue
        candidates = []
        if node.args and isinstance(node.args[-1], ast.JoinedStr):
            values = node.args[-1].values
            if values and isinstance(values[-1], ast.FormattedValue):
                candidates.append(values[-1].value)
        if len(node.args) >= 2:
            candidates.append(node.args[-1])
        for expr in candidates:
            if not _is_boolean_expr(expr):
                continue
            text = ast.unparse(_unwrap_bool(expr))
            names = {n.id for n in ast.walk(expr) if isinstance(n, ast.Name)} if isinstance(expr, ast.Name) else set()
            if not any(text in a or any(re.search(rf"\b{n}\b", a) for n in names) for a in asserted):
                missing.append(text)
    return missing


def _stream_text(output: dict) -> str:
    if output.get("output_type") == "stream" and output.get("name") == "stdout":
        text = output.get("text", "")
        return "".join(text) if isinstance(text, list) else text
    return ""


def _text_of_output(output: dict) -> str:
    parts: list[str] = []
    if "text" in output:
        parts.append("".join(output["text"]) if isinstance(output["text"], list) else output["text"])
    for mime, value in output.get("data", {}).items():
        if mime.startswith("text/") or mime.endswith("json"):
            parts.append("".join(value) if isinstance(value, list) else str(value))
    if output.get("output_type") == "error":
        parts.append(output.get("ename", "") + ": " + output.get("evalue", ""))
        parts.extend(output.get("traceback", []))
    return "\n".join(parts)


def check_notebook(path: Path) -> list[str]:
    """Return the list of problems with one notebook (empty when it is clean)."""
    path = Path(path)
    problems: list[str] = []
    size = path.stat().st_size
    if size > MAX_BYTES:
        problems.append(f"is {size / 1e6:.1f} MB, larger than the 3 MB limit")
    try:
        import nbformat

        nb = nbformat.read(str(path), as_version=nbformat.NO_CONVERT)
        if nb.nbformat != 4:
            problems.append(f"is nbformat {nb.nbformat}, expected 4")
        nbformat.validate(nb)
    except Exception as err:  # noqa: BLE001 - any read/validation failure is a problem
        return problems + [f"is not a valid notebook: {type(err).__name__}: {str(err).splitlines()[0]}"]

    expected = 1
    code_cells = 0
    for index, cell in enumerate(nb.cells):
        if cell.cell_type != "code":
            continue
        code_cells += 1
        where = f"cell {index}"
        source = cell.source if isinstance(cell.source, str) else "".join(cell.source)
        if not source.strip():
            problems.append(f"{where}: empty code cell")
            continue
        count = cell.get("execution_count")
        if count is None:
            problems.append(f"{where}: code cell was never executed")
        elif count != expected:
            problems.append(f"{where}: execution count {count}, expected {expected} (out of order or re-run)")
        expected = (count if isinstance(count, int) else expected) + 1
        has_mark, has_tag = RAISES_MARK in source, RAISES_TAG in cell.get("metadata", {}).get("tags", [])
        marked = has_mark or has_tag
        if has_mark and not has_tag:
            problems.append(f"{where}: marked {RAISES_MARK} but not tagged {RAISES_TAG!r} "
                            "(JupyterLab's Run All would stop at it)")
        elif has_tag and not has_mark:
            problems.append(f"{where}: tagged {RAISES_TAG!r} but not marked # {RAISES_MARK} (nbval reads the comment)")
        has_error = False
        for output in cell.get("outputs", []):
            if output.get("output_type") == "error":
                has_error = True
                if not marked:
                    problems.append(f"{where}: stored error {output.get('ename')}: {output.get('evalue')}")
            if output.get("output_type") == "execute_result" and count is not None:
                if output.get("execution_count") != count:
                    problems.append(f"{where}: result count {output.get('execution_count')} != cell count {count}")
            match = MACHINE_PATH.search(_text_of_output(output))
            if match:
                problems.append(f"{where}: machine path {match.group(0)!r} in an output")
        printed = "".join(_stream_text(o) for o in cell.get("outputs", []))
        verdict = VERDICT.search(printed)
        if verdict and not marked and not ASSERTS.search(source):
            line = printed[: verdict.end()].splitlines()[-1].strip()
            problems.append(f"{where}: prints the verdict {line!r} but asserts nothing")
        elif verdict and not marked:
            for text in unasserted_verdicts(source):
                problems.append(f"{where}: prints the verdict `{text}` without asserting it")
        if marked and not has_error and count is not None:
            problems.append(f"{where}: marked {RAISES_MARK} but stored no error")
    if code_cells == 0:
        problems.append("has no code cells")
    kernel = nb.metadata.get("kernelspec", {}).get("name")
    if kernel != "python3":
        problems.append(f"kernelspec is {kernel!r}, expected 'python3'")
    return problems


def iter_notebooks(paths: list[str]) -> list[Path]:
    found: list[Path] = []
    for raw in paths:
        p = Path(raw)
        if p.is_dir():
            found.extend(q for q in sorted(p.rglob("*.ipynb")) if ".ipynb_checkpoints" not in q.parts)
        elif p.suffix == ".ipynb" and p.exists():
            found.append(p)
        else:
            raise SystemExit(f"check_notebooks: {raw!r} is neither a directory nor a notebook")
    return found


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    notebooks = iter_notebooks(args or ["chapters"])
    if not notebooks:
        print("check_notebooks: no notebooks found", file=sys.stderr)
        return 1
    failed = 0
    for nb_path in notebooks:
        problems = check_notebook(nb_path)
        if problems:
            failed += 1
            print(f"FAIL {nb_path}")
            for problem in problems:
                print(f"     {problem}")
    print(f"check_notebooks: {len(notebooks) - failed} clean, {failed} failing, of {len(notebooks)} notebooks")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
