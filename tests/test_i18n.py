"""The translated editions (tools/i18n.py): complete, current, faithful to the code, consistent in terminology.

Every document of the book has a catalog in ``locales/<lang>/LC_MESSAGES/``, and for each:

* every prose block of the current English source has a translation, and none is fuzzy (its English changed
  since it was translated) - ``make i18n-update`` then translating the new and fuzzy messages fixes both;
* a translation keeps its block's inline math, inline code, link targets and heading level exactly;
* a glossary term (``docs/glossary.md``) in the English is rendered with the glossary's Chinese term (or kept
  in English), and the first use in a notebook gives the English term too (case-insensitive matching with a
  plural ending, except for names with inner capitals such as ZeRO; a term inside a longer glossary term, such as
  "precision" in "mixed precision", is rendered as the longer term's translation says, though its first use still
  gives the English); a translator can waive one message
  for one term with the comment ``glossary-ignore: <term>`` (a word used in another sense);
* the generated notebook has the English notebook's cells, code, outputs, execution counts and metadata
  exactly, so the strict nbval run of the English notebook verifies the translated one.

The block splitter is tested on its own first (round trip, fences, display math, tables, bad input).
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
import i18n  # noqa: E402 - tools/ is not a package on the path

LANG = "zh_CN"
CATALOGUED = [d for d in i18n.documents() if i18n.catalog_path(d, LANG).is_file()]


def _catalog(document: Path) -> dict:
    from babel.messages.pofile import read_po

    with open(i18n.catalog_path(document, LANG), "rb") as f:
        return {m.id: m for m in read_po(f) if m.id}


def test_split_blocks_round_trip_on_every_document() -> None:
    for document in i18n.documents():
        for _, text in i18n.markdown_sources(document):
            assert "".join(p.text for p in i18n.split_blocks(text)) == text


def test_split_blocks_structure() -> None:
    text = ("# Title\n\nA paragraph with $x^2$ and `code`.\n\n$$\na = b\n\nc = d\n$$\n\n"
            "```python\nx = 1\n\ny = 2\n```\n| Name | Value |\n|---|---|\n| one | two |\n\n$y = f(x)$\n")
    pieces = i18n.split_blocks(text)
    prose = [p.text for p in pieces if p.translatable]
    assert prose == ["# Title", "A paragraph with $x^2$ and `code`.", "| Name | Value |", "| one | two |"]
    copied = "".join(p.text for p in pieces if not p.translatable)
    assert "$$\na = b\n\nc = d\n$$" in copied and "```python\nx = 1\n\ny = 2\n```" in copied
    assert "|---|---|" in copied and "$y = f(x)$" in copied  # a rule row and a lone formula are not prose
    toc = i18n.split_blocks("```{toctree}\n:caption: Chapters\n:glob:\n\n/chapters/*\n```\n")
    assert [p.text for p in toc if p.translatable] == ["Chapters"]


def test_split_blocks_rejects_bad_input() -> None:
    with pytest.raises(TypeError, match="text must be a str"):
        i18n.split_blocks(["not", "a", "string"])
    with pytest.raises(ValueError, match="lang must be one of"):
        i18n.load_translations(Path("book/index.md"), "xx_XX")
    with pytest.raises(ValueError, match="not part of the book"):
        i18n.update(LANG, ["chapters/99_missing.ipynb"])


def test_translate_markdown_replaces_blocks_and_reports_the_rest() -> None:
    text = "# Title\n\nFirst paragraph.\n\n$$\nx\n$$\n\nSecond paragraph.\n"
    out, missing = i18n.translate_markdown(text, {"# Title": "# 标题", "First paragraph.": "第一段。"})
    assert out == "# 标题\n\n第一段。\n\n$$\nx\n$$\n\nSecond paragraph.\n"
    assert missing == ["Second paragraph."]


def test_there_are_catalogs() -> None:
    assert CATALOGUED, f"no catalog under {i18n.LOCALES / LANG}"


def test_every_document_has_a_catalog() -> None:
    """The whole book is translated: a new chapter or page needs its catalog (make i18n-update DOCS=...)."""
    without = [d.as_posix() for d in i18n.documents() if d not in CATALOGUED]
    assert not without, f"{len(without)} documents without a {LANG} catalog: {without[:5]}"


@pytest.mark.parametrize("document", CATALOGUED, ids=[d.as_posix() for d in CATALOGUED])
def test_catalog_is_complete_and_current(document: Path) -> None:
    catalog = _catalog(document)
    wanted = [msgid for msgid, _ in i18n.messages(document)]
    missing = [m for m in wanted if m not in catalog or not catalog[m].string]
    fuzzy = [m for m in wanted if m in catalog and catalog[m].string and catalog[m].fuzzy]
    assert not missing, (f"{document}: {len(missing)} blocks without a translation (run make i18n-update, then "
                         f"translate them), e.g. {missing[0][:120]!r}")
    assert not fuzzy, (f"{document}: {len(fuzzy)} translations whose English changed since (fuzzy), e.g. "
                       f"{fuzzy[0][:120]!r}")
    stale = [m for m, message in catalog.items() if m not in set(wanted) and not getattr(message, "obsolete", False)]
    assert not stale, f"{document}: {len(stale)} messages no longer in the English (run make i18n-update)"


# Inline math and inline code may run over one line break (not a blank line), as markdown allows.
_KEPT = re.compile(r"\$\$.*?\$\$|\$(?:[^$\n]|\n(?!\n))+?\$|`(?:[^`\n]|\n(?!\n))+`|\]\(([^)\n]*)\)",
                   re.DOTALL)


@pytest.mark.parametrize("document", CATALOGUED, ids=[d.as_posix() for d in CATALOGUED])
def test_translations_keep_math_code_links_and_headings(document: Path) -> None:
    problems = []
    for msgid, message in _catalog(document).items():
        if not message.string:
            continue
        keep = sorted(m.group(0) for m in _KEPT.finditer(msgid))
        got = sorted(m.group(0) for m in _KEPT.finditer(message.string))
        if keep != got:
            problems.append(f"{msgid[:60]!r}: math/code/links {sorted(set(keep) ^ set(got))[:3]}")
        level = re.match(r"#*", msgid).group(0)
        if re.match(r"#*", message.string).group(0) != level:
            problems.append(f"{msgid[:60]!r}: heading level changed")
    assert not problems, f"{document}: " + "; ".join(problems[:5])


def _case(term: str) -> int:
    """Case-insensitive matching, except for names with capitals inside (ZeRO is not "zero", LoRA not "lora")."""
    return 0 if any(ch.isupper() for ch in term[1:]) else re.IGNORECASE


@pytest.mark.parametrize("document", CATALOGUED, ids=[d.as_posix() for d in CATALOGUED])
def test_glossary_terms_are_translated_consistently(document: Path) -> None:
    catalog = _catalog(document)
    terms = i18n.glossary_terms()
    problems, seen = [], set()
    for msgid in dict.fromkeys(m for m, _ in i18n.messages(document)):
        message = catalog.get(msgid)
        if message is None or not message.string:
            continue
        waived = {c.split(":", 1)[1].strip().lower() for c in message.user_comments
                  if c.startswith("glossary-ignore:")}
        english_text = re.sub(r"\s+", " ", _KEPT.sub(" ¤ ", msgid))  # a term may break across lines; code is no word
        spans = [(m.start(), m.end(), index, form) for index, (english_forms, _) in enumerate(terms)
                 for form in english_forms
                 for m in re.finditer(rf"(?<![\w-]){re.escape(form)}(?:s|es)?(?![\w-])", english_text, _case(form))]
        # A term counts where it is not part of a longer term ("spectrogram" in "log-mel spectrogram",
        # "precision" in "mixed precision"): the longer term's own translation is checked instead.
        standalone = [(index, form) for a, b, index, form in spans
                      if not any(c <= a and b <= d and (d - c) > (b - a) and j != index for c, d, j, _ in spans)]
        for index, (english_forms, chinese_forms) in enumerate(terms):
            anywhere = [form for _, _, j, form in spans if j == index]  # inside a longer term too
            used = [form for j, form in standalone if j == index]
            if not anywhere or anywhere[0].lower() in waived:
                continue
            text = message.string
            kept_in_english = any(f.lower() in text.lower() for f in english_forms)
            squeezed = text.replace(" ", "")  # "He 初始化" and "He初始化" are the same term
            if used and not kept_in_english and not any(z.replace(" ", "") in squeezed for z in chinese_forms):
                problems.append(f"{used[0]!r} -> none of {chinese_forms} in {text[:50]!r}")
            key = english_forms[0].lower()
            if key not in seen and document.suffix == ".ipynb":
                seen.add(key)
                if not kept_in_english:
                    problems.append(f"first use of {anywhere[0]!r} without the English term: {text[:50]!r}")
    assert not problems, f"{document}: {len(problems)} terminology problems: " + "; ".join(problems[:6])


_NOTEBOOKS = [d for d in CATALOGUED if d.suffix == ".ipynb"] or [Path("chapters/00_how_to_use_this_book.ipynb")]


@pytest.mark.parametrize("document", _NOTEBOOKS, ids=[d.as_posix() for d in _NOTEBOOKS])
def test_generated_notebook_has_the_same_code_and_outputs(document: Path, tmp_path: Path) -> None:
    i18n.generate_document(document, LANG, tmp_path)
    english = json.loads((ROOT / document).read_text(encoding="utf-8"))
    translated = json.loads((tmp_path / document).read_text(encoding="utf-8"))
    assert translated["metadata"] == english["metadata"] and len(translated["cells"]) == len(english["cells"])
    changed = 0
    for a, b in zip(english["cells"], translated["cells"], strict=True):
        assert a["cell_type"] == b["cell_type"]
        if a["cell_type"] == "code":
            assert a == b  # source, outputs, execution count, metadata: all identical
        else:
            assert {k: v for k, v in a.items() if k != "source"} == {k: v for k, v in b.items() if k != "source"}
            changed += a["source"] != b["source"]
    if document in CATALOGUED:
        assert changed == sum(1 for c in english["cells"] if c["cell_type"] == "markdown"
                              and any(p.translatable for p in i18n.split_blocks("".join(c["source"]))))
