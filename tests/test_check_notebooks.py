import copy
import json
from pathlib import Path

import nbformat
import pytest

from tools.check_notebooks import check_notebook, main

ROOT = Path(__file__).resolve().parent.parent


def _executed_nb():
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.cells = [
        nbformat.v4.new_markdown_cell("# Title"),
        nbformat.v4.new_code_cell("x = 1", execution_count=1),
        nbformat.v4.new_code_cell("x + 1", execution_count=2,
                                  outputs=[nbformat.v4.new_output("execute_result", {"text/plain": "2"},
                                                                  execution_count=2)]),
    ]
    return nb


def _write(tmp_path, nb, name="nb.ipynb"):
    path = tmp_path / name
    nbformat.write(nb, str(path))
    return path


def test_clean_notebook_passes(tmp_path):
    assert check_notebook(_write(tmp_path, _executed_nb())) == []


def test_stripped_notebook_fails(tmp_path):
    nb = _executed_nb()
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.execution_count = None
            cell.outputs = []
    problems = check_notebook(_write(tmp_path, nb))
    assert any("never executed" in p for p in problems)


def test_out_of_order_notebook_fails(tmp_path):
    nb = _executed_nb()
    nb.cells[1].execution_count = 2
    nb.cells[2].execution_count = 1
    nb.cells[2].outputs[0]["execution_count"] = 1
    problems = check_notebook(_write(tmp_path, nb))
    assert any("out of order" in p for p in problems)


def test_rerun_cell_fails(tmp_path):
    nb = _executed_nb()
    nb.cells[2].execution_count = 5
    nb.cells[2].outputs[0]["execution_count"] = 5
    assert any("execution count 5, expected 2" in p for p in check_notebook(_write(tmp_path, nb)))


def test_unmarked_error_fails_marked_error_passes(tmp_path):
    nb = _executed_nb()
    nb.cells[2].outputs = [nbformat.v4.new_output("error", ename="ValueError", evalue="boom", traceback=[])]
    assert any("stored error ValueError: boom" in p for p in check_notebook(_write(tmp_path, nb)))
    nb.cells[2].source = "# NBVAL_RAISES_EXCEPTION\nraise ValueError('boom')"
    nb.cells[2].metadata["tags"] = ["raises-exception"]
    assert check_notebook(_write(tmp_path, nb)) == []


def test_intended_error_needs_both_the_comment_and_the_tag(tmp_path):
    """nbval reads the comment, JupyterLab's Run All the tag: one without the other fails."""
    nb = _executed_nb()
    nb.cells[2].outputs = [nbformat.v4.new_output("error", ename="ValueError", evalue="boom", traceback=[])]
    nb.cells[2].source = "# NBVAL_RAISES_EXCEPTION\nraise ValueError('boom')"
    problems = check_notebook(_write(tmp_path, nb))
    assert problems == ["cell 2: marked NBVAL_RAISES_EXCEPTION but not tagged 'raises-exception' "
                        "(JupyterLab's Run All would stop at it)"], problems
    nb.cells[2].source = "raise ValueError('boom')"
    nb.cells[2].metadata["tags"] = ["raises-exception"]
    problems = check_notebook(_write(tmp_path, nb))
    assert problems == ["cell 2: tagged 'raises-exception' but not marked # NBVAL_RAISES_EXCEPTION "
                        "(nbval reads the comment)"], problems


def test_marked_cell_without_error_fails(tmp_path):
    nb = _executed_nb()
    nb.cells[1].source = "# NBVAL_RAISES_EXCEPTION\nx = 1"
    nb.cells[1].metadata["tags"] = ["raises-exception"]
    assert check_notebook(_write(tmp_path, nb)) == ["cell 1: marked NBVAL_RAISES_EXCEPTION but stored no error"]


def test_machine_path_fails(tmp_path):
    nb = _executed_nb()
    nb.cells[2].outputs = [nbformat.v4.new_output("stream", name="stderr",
                                                  text="/home/alice/.venv/lib/python3.11/site-packages/x.py: W")]
    assert any("machine path" in p for p in check_notebook(_write(tmp_path, nb)))


def test_empty_code_cell_and_wrong_kernel_fail(tmp_path):
    nb = _executed_nb()
    nb.cells.append(nbformat.v4.new_code_cell(""))
    nb.metadata["kernelspec"]["name"] = "myenv"
    problems = check_notebook(_write(tmp_path, nb))
    assert any("empty code cell" in p for p in problems)
    assert any("kernelspec" in p for p in problems)


def test_large_notebook_fails(tmp_path):
    nb = _executed_nb()
    nb.cells[1].outputs = [nbformat.v4.new_output("stream", name="stdout", text="x" * (3 * 1024 * 1024 + 10))]
    assert any("larger than the 3 MB limit" in p for p in check_notebook(_write(tmp_path, nb)))


def test_invalid_notebook_fails(tmp_path):
    path = tmp_path / "bad.ipynb"
    path.write_text(json.dumps({"cells": "nope"}))
    assert any("not a valid notebook" in p for p in check_notebook(path))


def test_every_book_notebook_is_clean_and_stripped_copy_is_not(tmp_path, capsys):
    notebooks = sorted((ROOT / "chapters").rglob("*.ipynb"))
    assert notebooks, "the book has no notebooks"
    assert main([str(ROOT / "chapters")]) == 0
    nb = nbformat.read(str(notebooks[0]), as_version=4)
    stripped = copy.deepcopy(nb)
    for cell in stripped.cells:
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
    path = _write(tmp_path, stripped, notebooks[0].name)
    assert main([str(path)]) == 1
    assert "never executed" in capsys.readouterr().out


def test_main_bad_path():
    with pytest.raises(SystemExit, match="neither a directory nor a notebook"):
        main(["does/not/exist.txt"])


def _verdict_cell(source, printed):
    return nbformat.v4.new_code_cell(source, execution_count=3,
                                     outputs=[nbformat.v4.new_output("stream", name="stdout", text=printed)])


@pytest.mark.parametrize("source, printed, problem", [
    # a literal True with nothing behind it
    ('print("x equals y:", True)', "x equals y: True\n", "asserts nothing"),
    # a computed verdict that is printed, not asserted
    ('import torch\nprint("close:", torch.allclose(a, b))', "close: True\n", "asserts nothing"),
    ('assert n == 3\nprint(f"small: {err < 1e-6}")', "small: True\n", "without asserting it"),
    ('assert x > 0\nprint("sums to one:", bool(abs(s - 1) < 1e-12))', "sums to one: True\n", "without asserting it"),
])
def test_unasserted_verdicts_fail(tmp_path, source, printed, problem):
    nb = _executed_nb()
    nb.cells.append(_verdict_cell(source, printed))
    problems = check_notebook(_write(tmp_path, nb))
    assert any(problem in p and "cell 3" in p for p in problems), problems


@pytest.mark.parametrize("source", [
    'torch.testing.assert_close(a, b)\nprint("close:", True)',
    'ok = torch.allclose(a, b)\nassert ok\nprint("close:", ok)',
    'assert abs(s - 1) < 1e-12\nprint("sums to one:", bool(abs(s - 1) < 1e-12))',
    'assert err < 1e-6, err\nprint(f"small: {err < 1e-6}")',
])
def test_asserted_verdicts_pass(tmp_path, source):
    nb = _executed_nb()
    nb.cells.append(_verdict_cell(source, "verdict: True\n"))
    assert check_notebook(_write(tmp_path, nb)) == []
