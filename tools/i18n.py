#!/usr/bin/env python3
"""Translated editions of the book: gettext message catalogs beside the English source.

English is the single source. The translated notebooks are *generated* from the English ones and a message
catalog per document; they are never edited or committed.

* ``extract`` cuts the prose of every document into blocks - the markdown cells of the chapter and solutions
  notebooks, and the README, course plan, glossary and the book's front page - and writes one gettext template
  per document, ``_build/gettext/<document>.pot`` (generated, not kept in git). A block is a paragraph, a
  heading, a list, a quoted passage or one row of a table; fenced code and display math (``$$ ... $$`` on lines
  of their own) are not translated and are copied as they are.
* ``update LANG [DOCUMENT ...]`` (``make i18n-update``) extracts, then merges the templates into the catalogs
  ``locales/<lang>/LC_MESSAGES/<document>.po`` (kept in git) with ``sphinx-intl update`` (Sphinx's gettext
  workflow): a new block arrives untranslated, a block whose English changed keeps its old translation marked
  *fuzzy*, and a removed block becomes obsolete. It refreshes the catalogs that exist; naming documents starts
  catalogs for them.
* ``generate LANG`` writes the translated edition under ``_build/<lang>/`` with the repository's layout: each
  notebook with the same cells, code, outputs, execution counts and metadata, its markdown blocks replaced by
  their translations; the markdown documents likewise. A block without a current translation stays in English
  (``status`` lists them; ``tests/test_i18n.py`` fails on them for every document that has a catalog).
* ``status LANG`` prints, per document, the number of blocks translated, fuzzy and missing.

Usage: ``python tools/i18n.py extract | update LANG [DOCUMENT ...] | generate LANG [--out DIR] | status LANG``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LOCALES = ROOT / "locales"
TEMPLATES = ROOT / "_build" / "gettext"  # generated, like Sphinx's gettext builder's output
LANGUAGES = ("zh_CN",)
MARKDOWN_DOCUMENTS = ("README.md", "book/index.md", "docs/course_plan.md", "docs/glossary.md")
# Fixed dates in the catalogs' headers, so that extracting twice gives the same files.
_EPOCH = datetime.datetime(2026, 1, 1, tzinfo=datetime.timezone.utc)

_FENCE = re.compile(r"^\s*(```+|~~~+)")
_TABLE_ROW = re.compile(r"^\s*\|")
_TABLE_RULE = re.compile(r"^\s*\|?\s*:?-{3,}:?\s*(\|\s*:?-{3,}:?\s*)*\|?\s*$")
# What does not need translating inside a block: inline and display math, inline code, link targets, URLs.
_NOT_PROSE = re.compile(r"\$\$.*?\$\$|\$[^$\n]*\$|`[^`\n]*`|\]\([^)\n]*\)|https?://\S+", re.DOTALL)


def documents() -> list[Path]:
    """The documents of the book that carry prose, relative to the repository root, in a fixed order."""
    notebooks = sorted((ROOT / "chapters").glob("[0-9]*.ipynb")) + sorted(
        (ROOT / "chapters" / "solutions").glob("*.ipynb"))
    return [Path(p) for p in MARKDOWN_DOCUMENTS] + [p.relative_to(ROOT) for p in notebooks]


@dataclass(frozen=True)
class Piece:
    """A stretch of a markdown text: ``translatable`` blocks become messages, the rest is copied as it is."""

    text: str
    translatable: bool


def split_blocks(text: str) -> list[Piece]:
    """Cut markdown ``text`` into pieces whose concatenation is ``text`` exactly.

    Blank lines separate blocks; a fenced code block or a display-math block (``$$`` opening a line and
    closing one) is one piece however many blank lines it contains and is never translated (a MyST ``toctree``
    directive's ``:caption:`` is the exception: it is the heading of a table of contents); each row of a
    table is a block of its own (the rule row ``|---|`` is copied). A block with no prose left once its math,
    inline code, link targets and URLs are taken out (a formula, a lone code span) is copied too.
    """
    if not isinstance(text, str):
        raise TypeError(f"split_blocks: text must be a str, got {type(text).__name__}")
    lines = text.splitlines(keepends=True)
    pieces: list[Piece] = []
    block: list[str] = []

    def flush() -> None:
        if block:
            joined = "".join(block)
            body = joined.rstrip("\n")
            pieces.append(Piece(body, _is_prose(body)))
            if len(joined) > len(body):
                pieces.append(Piece(joined[len(body):], False))
            block.clear()

    i = 0
    while i < len(lines):
        line = lines[i]
        fence = _FENCE.match(line)
        if fence or line.strip() == "$$" or (line.lstrip().startswith("$$") and line.count("$$") == 1):
            # A verbatim region up to its closing fence / $$ (or the end of the text).
            flush()
            marker = fence.group(1) if fence else "$$"
            j = i + 1
            while j < len(lines) and not (lines[j].strip().startswith(marker) if fence else marker in lines[j]):
                j += 1
            region = lines[i:j + 1]
            if fence and "{toctree}" in line:  # a table of contents: only its caption is prose
                for row in region:
                    caption = re.match(r"(\s*:caption:\s*)(.*?)(\s*)$", row, re.DOTALL)
                    if caption and _is_prose(caption.group(2)):
                        pieces += [Piece(caption.group(1), False), Piece(caption.group(2), True),
                                   Piece(caption.group(3), False)]
                    else:
                        pieces.append(Piece(row, False))
            else:
                pieces.append(Piece("".join(region), False))
            i = j + 1
            continue
        if not line.strip():
            flush()
            pieces.append(Piece(line, False))
        elif _TABLE_ROW.match(line):
            flush()
            body = line.rstrip("\n")
            pieces.append(Piece(body, not _TABLE_RULE.match(line) and _is_prose(body)))
            if len(line) > len(body):
                pieces.append(Piece(line[len(body):], False))
        else:
            block.append(line)
        i += 1
    flush()
    merged: list[Piece] = []
    for piece in pieces:  # adjacent copied pieces merge, so the structure reads simply
        if merged and not piece.translatable and not merged[-1].translatable:
            merged[-1] = Piece(merged[-1].text + piece.text, False)
        else:
            merged.append(piece)
    assert "".join(p.text for p in merged) == text
    return merged


def _is_prose(block: str) -> bool:
    return re.search(r"[^\W\d_]{2,}", _NOT_PROSE.sub(" ", block)) is not None


def markdown_sources(document: Path) -> list[tuple[str, str]]:
    """``(location, markdown)`` of every prose part of ``document`` (relative to the root), in order."""
    path = ROOT / document
    if document.suffix == ".ipynb":
        nb = json.loads(path.read_text(encoding="utf-8"))
        return [(f"{document.as_posix()}:cell{index}", "".join(cell["source"]))
                for index, cell in enumerate(nb["cells"]) if cell["cell_type"] == "markdown"]
    return [(document.as_posix(), path.read_text(encoding="utf-8"))]


def messages(document: Path) -> list[tuple[str, str]]:
    """``(msgid, location)`` of every translatable block of ``document``, in order, repeats included."""
    out = []
    for location, text in markdown_sources(document):
        out.extend((piece.text, location) for piece in split_blocks(text) if piece.translatable)
    return out


def template_catalog(document: Path):  # noqa: ANN201 - babel's Catalog
    """The gettext template of ``document``: one message per distinct block, with every location."""
    from babel.messages.catalog import Catalog

    catalog = Catalog(project="mmbook", version="0.1.0", creation_date=_EPOCH, revision_date=_EPOCH, fuzzy=False,
                      header_comment="# The book's prose, extracted from the English source by tools/i18n.py.")
    for msgid, location in messages(document):
        name, _, cell = location.partition(":")
        catalog.add(msgid, locations=[(name, int(cell[4:]) if cell else None)])
    return catalog


def glossary_terms() -> list[tuple[tuple[str, ...], tuple[str, ...]]]:
    """``(english_forms, chinese_forms)`` of every row of ``docs/glossary.md``.

    English forms: the term without a parenthesised part, and an abbreviation in parentheses on its own
    ("Dynamic time warping (DTW)" gives both; "Additive path (GRU)" only the first: GRU is context, its letters
    are not drawn from the term's); alternatives separated by " / " are forms of the same term.
    Chinese forms: the alternatives of the 中文 column, each without a parenthesised gloss.
    """
    terms = []
    for line in (ROOT / "docs" / "glossary.md").read_text(encoding="utf-8").splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if not line.startswith("| ") or len(cells) < 4 or cells[0] == "Term":
            continue
        english, chinese = cells[0], cells[1]
        forms = []
        for alternative in english.split(" / "):
            bare = re.sub(r"\s*\([^)]*\)", "", alternative).strip()
            forms.append(bare)
            forms += [a for a in re.findall(r"\(([A-Z][A-Za-z0-9-]+)\)", alternative) if _abbreviates(a, bare)]
        zh = [re.sub(r"[（(][^）)]*[）)]", "", a).strip() for a in chinese.split(" / ")]
        terms.append((tuple(f for f in forms if len(f) >= 3), tuple(z for z in zh if z)))
    return terms


def _abbreviates(abbreviation: str, term: str) -> bool:
    """Whether the letters of ``abbreviation`` appear in order in ``term`` (MLP in "Multilayer perceptron")."""
    letters = iter(term.lower())
    return all(ch in letters for ch in abbreviation.lower() if ch.isalpha())


def template_path(document: Path) -> Path:
    return TEMPLATES / document.with_suffix(".pot")


def catalog_path(document: Path, lang: str) -> Path:
    return LOCALES / lang / "LC_MESSAGES" / document.with_suffix(".po")


def extract() -> list[Path]:
    """Write every document's template; remove templates of documents that no longer exist."""
    from babel.messages.pofile import write_po

    written = []
    for document in documents():
        target = template_path(document)
        target.parent.mkdir(parents=True, exist_ok=True)
        with open(target, "wb") as f:
            write_po(f, template_catalog(document), width=0, sort_output=False, include_previous=False)
        written.append(target)
    for stale in set(TEMPLATES.rglob("*.pot")) - set(written):
        stale.unlink()
    return written


def check_lang(lang: str) -> str:
    if lang not in LANGUAGES:
        raise ValueError(f"lang must be one of {LANGUAGES}, got {lang!r}")
    return lang


def update(lang: str, start: list[str] | tuple[str, ...] = ()) -> list[Path]:
    """Extract, then merge the templates into ``lang``'s catalogs (new: untranslated, changed: fuzzy).

    Refreshes every catalog that exists and starts one for each document named in ``start`` (paths relative to
    the repository root, as ``documents()`` lists them). Returns the catalogs merged.
    """
    check_lang(lang)
    known = {d.as_posix(): d for d in documents()}
    unknown = [name for name in start if Path(name).as_posix() not in known]
    if unknown:
        raise ValueError(f"start names documents that are not part of the book: {unknown}")
    chosen = [d for d in documents() if catalog_path(d, lang).is_file() or d.as_posix() in
              {Path(n).as_posix() for n in start}]
    extract()
    with tempfile.TemporaryDirectory() as tmp:  # sphinx-intl merges every template of a folder: only the chosen
        for document in chosen:
            target = Path(tmp) / document.with_suffix(".pot")
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(template_path(document), target)
        if chosen:
            subprocess.run([sys.executable, "-m", "sphinx_intl", "update", "-p", tmp, "-d", str(LOCALES),
                            "-l", lang, "-w", "0", "-j", "1"], check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    return [catalog_path(d, lang) for d in chosen]


def load_translations(document: Path, lang: str) -> dict[str, str] | None:
    """``msgid -> msgstr`` for the current (non-fuzzy, non-empty) translations of ``document``, or ``None``
    when it has no catalog."""
    from babel.messages.pofile import read_po

    path = catalog_path(document, check_lang(lang))
    if not path.is_file():
        return None
    with open(path, "rb") as f:
        catalog = read_po(f)
    return {m.id: m.string for m in catalog if m.id and m.string and not m.fuzzy}


def translate_markdown(text: str, translations: dict[str, str]) -> tuple[str, list[str]]:
    """``text`` with every translatable block replaced by its translation; also the blocks left in English."""
    out, missing = [], []
    for piece in split_blocks(text):
        if piece.translatable and piece.text in translations:
            out.append(translations[piece.text])
        else:
            out.append(piece.text)
            if piece.translatable:
                missing.append(piece.text)
    return "".join(out), missing


def generate_document(document: Path, lang: str, out_root: Path) -> list[str]:
    """Write the translated ``document`` under ``out_root``; return the blocks left in English."""
    translations = load_translations(document, lang) or {}
    source, target = ROOT / document, out_root / document
    target.parent.mkdir(parents=True, exist_ok=True)
    missing: list[str] = []
    if document.suffix == ".ipynb":
        nb = json.loads(source.read_text(encoding="utf-8"))
        for cell in nb["cells"]:
            if cell["cell_type"] == "markdown":
                text, left = translate_markdown("".join(cell["source"]), translations)
                cell["source"] = text.splitlines(keepends=True)
                missing += left
        target.write_text(json.dumps(nb, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    else:
        text, missing = translate_markdown(source.read_text(encoding="utf-8"), translations)
        target.write_text(text, encoding="utf-8")
    return missing


def generate(lang: str, out_root: Path | None = None) -> dict[str, int]:
    """The whole edition under ``out_root`` (default ``_build/<lang>``): documents, figures, front page."""
    out_root = out_root or ROOT / "_build" / check_lang(lang)
    figures = ROOT / "chapters" / "figures"
    if figures.is_dir():
        shutil.copytree(figures, out_root / "chapters" / "figures", dirs_exist_ok=True)
    for extra in ("book/favicon.svg",):
        (out_root / extra).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / extra, out_root / extra)
    return {document.as_posix(): len(generate_document(document, lang, out_root)) for document in documents()}


def status(lang: str) -> list[tuple[str, int, int, int]]:
    """``(document, translated, fuzzy, missing)`` of every document's distinct blocks."""
    from babel.messages.pofile import read_po

    rows = []
    for document in documents():
        wanted = {msgid for msgid, _ in messages(document)}
        path = catalog_path(document, check_lang(lang))
        done = fuzzy = 0
        if path.is_file():
            with open(path, "rb") as f:
                catalog = {m.id: m for m in read_po(f) if m.id}
            done = sum(1 for w in wanted if w in catalog and catalog[w].string and not catalog[w].fuzzy)
            fuzzy = sum(1 for w in wanted if w in catalog and catalog[w].string and catalog[w].fuzzy)
        rows.append((document.as_posix(), done, fuzzy, len(wanted) - done - fuzzy))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("extract", help="write locales/templates/*.pot from the English source")
    p = sub.add_parser("update", help="merge the templates into the catalogs (new: untranslated, changed: fuzzy)")
    p.add_argument("lang", choices=LANGUAGES)
    p.add_argument("documents", nargs="*", help="also start catalogs for these documents (e.g. chapters/00_x.ipynb)")
    p = sub.add_parser("generate", help="write the translated edition")
    p.add_argument("lang", choices=LANGUAGES)
    p.add_argument("--out", type=Path, default=None, help="folder (default _build/LANG)")
    sub.add_parser("status", help="translated, fuzzy and missing blocks per document").add_argument(
        "lang", choices=LANGUAGES)
    args = parser.parse_args(argv)
    if args.command == "extract":
        print(f"wrote {len(extract())} templates under {TEMPLATES.relative_to(ROOT)}")
    elif args.command == "update":
        merged = update(args.lang, args.documents)
        print(f"merged {len(merged)} catalogs under {(LOCALES / args.lang).relative_to(ROOT)}")
    elif args.command == "generate":
        out = args.out or ROOT / "_build" / args.lang
        left = generate(args.lang, out)
        print(f"generated the {args.lang} edition under {out}: {len(left)} documents, "
              f"{sum(left.values())} blocks still in English")
    else:
        rows = status(args.lang)
        for name, done, fuzzy, missing in rows:
            print(f"{name:70s} {done:5d} translated {fuzzy:4d} fuzzy {missing:5d} missing")
        total = [sum(r[i] for r in rows) for i in (1, 2, 3)]
        print(f"{'total':70s} {total[0]:5d} translated {total[1]:4d} fuzzy {total[2]:5d} missing")
    return 0


if __name__ == "__main__":
    sys.exit(main())
