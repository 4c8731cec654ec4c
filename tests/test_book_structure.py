"""The book's structure: every chapter has the anatomy of the guide, a solutions notebook that solves each of its
exercises, and links (to notebooks, the docs or the README) that point at files that exist."""

import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHAPTERS = sorted((ROOT / "chapters").glob("[0-9][0-9]_*.ipynb"))
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "data" / "README.md"]
LINK = re.compile(r"\]\(([^)\s#]+)(#[^)\s]*)?\)")


def _markdown(path: Path) -> list[str]:
    cells = json.loads(path.read_text(encoding="utf-8"))["cells"]
    return ["".join(c["source"]) for c in cells if c["cell_type"] == "markdown"]


def _exercises(markdown: list[str]) -> int:
    text = "\n".join(markdown)
    section = text.split("## Exercises", 1)[1].split("\n## ", 1)[0]
    return len(re.findall(r"^\d+\.\s", section, re.M))


def test_chapters_are_numbered_from_00_without_gaps():
    assert [int(p.name[:2]) for p in CHAPTERS] == list(range(len(CHAPTERS)))
    assert len(CHAPTERS) >= 18  # 00-16, and Part VI from 17 on


@pytest.mark.parametrize("chapter", CHAPTERS, ids=[p.stem for p in CHAPTERS])
def test_chapter_anatomy_and_solutions(chapter: Path):
    markdown = _markdown(chapter)
    first, text = markdown[0], "\n".join(markdown)
    number = int(chapter.name[:2])
    assert first.startswith(f"# Chapter {number} — "), f"{chapter.name}: title {first.splitlines()[0]!r}"
    for part in ("**Learning objectives.**", "**Prerequisites.**", "**Estimated time.**"):
        assert part in first, f"{chapter.name}: the first cell lacks {part}"
    for heading in ("## Summary", "## Exercises", "## Further reading"):
        assert heading in text, f"{chapter.name}: no {heading!r} section"
    solutions = ROOT / "chapters" / "solutions" / f"{chapter.stem}_solutions.ipynb"
    assert solutions.is_file(), f"{chapter.name}: no solutions notebook {solutions.name}"
    exercises = _exercises(markdown)
    solved = {int(m) for cell in _markdown(solutions)
              for m in re.findall(r"^#+ .*?[Ee]xercise\s*(\d+)", cell, re.M)}
    assert 3 <= exercises <= 6, f"{chapter.name}: {exercises} exercises (the guide asks for 3-6)"
    assert solved == set(range(1, exercises + 1)), f"{chapter.name}: exercises 1..{exercises}, solved {sorted(solved)}"


@pytest.mark.parametrize("document", CHAPTERS + DOCS, ids=[p.name for p in CHAPTERS + DOCS])
def test_relative_links_point_at_existing_files(document: Path):
    texts = _markdown(document) if document.suffix == ".ipynb" else [document.read_text(encoding="utf-8")]
    broken = [target for text in texts for target, _ in LINK.findall(text)
              if "://" not in target and not target.startswith("mailto:")
              and not (document.parent / target).exists()]
    assert not broken, f"{document.relative_to(ROOT)}: links to missing files {broken}"
