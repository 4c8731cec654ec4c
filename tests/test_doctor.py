import json

import pytest

from mmbook import doctor


def test_doctor_reports_ok(capsys):
    assert doctor.main() == 0
    out = capsys.readouterr().out
    assert "torch" in out and "device" in out and "Everything OK." in out


def test_chapter_imports(tmp_path):
    nb = {"cells": [{"cell_type": "code", "source": ["import numpy as np\n", "%matplotlib inline\n",
                                                     "from torch import nn\n"]}]}
    (tmp_path / "x.ipynb").write_text(json.dumps(nb))
    found = doctor.chapter_imports(tmp_path)
    assert found == {"numpy": {"x.ipynb"}, "torch": {"x.ipynb"}}


def test_chapter_imports_bad_dir(tmp_path):
    with pytest.raises(ValueError, match="is not a directory"):
        doctor.chapter_imports(tmp_path / "missing")


def test_doctor_names_missing_module(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(doctor, "CORE", ("torch", "no_such_module_xyz"))
    assert doctor.main() == 1
    assert "no_such_module_xyz cannot be imported" in capsys.readouterr().out


def test_chapter_imports_names_a_wrong_type():
    with pytest.raises(TypeError, match="chapter_imports: chapters_dir must be a str or Path, got int"):
        doctor.chapter_imports(3)
