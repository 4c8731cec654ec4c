"""Sphinx configuration of the HTML book (``make book``).

The source directory is the repository root (so the notebooks are read where they live) and this
folder holds the configuration and the front page. Notebooks are *not* executed: the site shows
the outputs stored by ``make regen``. MathJax 3 is served from the site itself (the complete
distribution, with its fonts, shipped by the ``django-static-mathjax`` package), so the built book works
offline.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import mathjax  # django-static-mathjax: the MathJax 3 distribution as package data

project = "Large Language Models, from Theory to Practice — the Multimodal Edition"
author = "The mmbook authors"
copyright = "the mmbook authors, MIT licence"  # noqa: A001 - Sphinx's name for it
release = "0.1.0"

root_doc = "book/index"
extensions = ["myst_nb"]
include_patterns = [
    "book/index.md",
    "chapters/*.ipynb",
    "chapters/solutions/*.ipynb",
    "docs/*.md",
]
exclude_patterns = ["_build", ".venv", "**/.ipynb_checkpoints"]

# MyST: $...$ and $$...$$ math as in the notebooks, and heading anchors for cross-links.
myst_enable_extensions = ["dollarmath", "amsmath"]
myst_heading_anchors = 3
nb_execution_mode = "off"
nb_merge_streams = True
# Widgets: the site is static and offline, so no ipywidgets JavaScript is loaded (myst-nb would fetch it from a
# CDN) and a widget's output is shown by the next richest type it carries: the book's chat widget stores a static
# HTML picture of itself (mmbook.assistant.chat_widget), fit's progress bar its final text line.
nb_ipywidgets_js: dict = {}
nb_mime_priority_overrides = [(builder, "application/vnd.jupyter.widget-view+json", None)
                              for builder in ("html", "dirhtml", "singlehtml")]

# Offline MathJax 3 with CommonHTML output and its own web fonts (TeX fonts, so brackets stretch and
# operators such as \sin are spaced as in print). The distribution's es5/ folder is copied to _static/mathjax
# after the build; a relative mathjax_path is relative to _static, and MathJax finds its fonts and the TeX
# extensions it loads on demand next to the script.
_MATHJAX_DIR = Path(mathjax.__file__).parent / "static" / "mathjax" / "es5"
mathjax_path = "mathjax/tex-mml-chtml.js"
# myst-parser adds options.processHtmlClass to this (only the math it marked is typeset).
mathjax3_config: dict = {"options": {}}

html_theme = "sphinx_book_theme"
html_title = "LLMs from Theory to Practice — Multimodal Edition"
html_favicon = "favicon.svg"  # relative to this folder; also spares browsers a request for /favicon.ico
html_theme_options = {
    "show_toc_level": 2,
    "use_download_button": True,
    "home_page_in_toc": True,
    # One search field, in the sidebar (the theme would add a second one to the top bar; Ctrl+K opens it anyway).
    "navbar_persistent": [],
}
# The figures are drawn on white, so pages open in light mode (the page's button still switches to dark mode).
# Left unset, the theme logs "invalid theme mode" to the browser's console on every page.
html_context = {"default_mode": "light"}
html_last_updated_fmt = None
html_copy_source = True


_REDIRECT = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<meta http-equiv="refresh" content="0; url=book/index.html"></head>
<body><p><a href="book/index.html">{title}</a></p></body></html>
"""


def _finish_site(app, exception) -> None:  # noqa: ANN001 - Sphinx's event signature
    """Copy the offline MathJax into the site and put an ``index.html`` at its top (``build-finished``)."""
    if exception is not None or app.builder.format != "html":
        return
    outdir = Path(app.outdir)
    target = outdir / "_static" / "mathjax"
    shutil.rmtree(target, ignore_errors=True)  # no files of another MathJax version left behind
    shutil.copytree(_MATHJAX_DIR, target)
    (outdir / "index.html").write_text(_REDIRECT.format(title=project), encoding="utf-8")


def _chinese_search() -> type:
    """Sphinx 9.0's Chinese search language with its stemmer named as the code it ships.

    For the Latin words of a Chinese page it loads the English snowball stemmer's JavaScript (``EnglishStemmer``)
    but writes ``window.Stemmer = ChineseStemmer`` into ``language_data.js``, a class that does not exist: every page
    of the Chinese edition would log a ReferenceError and its search box would not work. The class name in that line
    comes from ``language_name``. Chinese words are split by jieba (a pinned requirement).
    """
    from sphinx.search.zh import SearchChinese

    class SearchChineseFixed(SearchChinese):
        language_name = "English"  # the stemmer class of english-stemmer.js, which this language loads

    return SearchChineseFixed


def _register_chinese_search(app, config) -> None:  # noqa: ANN001 - Sphinx's event signature
    """Only the Chinese edition registers the Chinese search language (which imports jieba)."""
    if str(config.language).startswith("zh"):
        app.add_search_language(_chinese_search())


def setup(app) -> dict[str, bool]:  # noqa: ANN001 - Sphinx's extension signature
    app.connect("build-finished", _finish_site)
    app.connect("config-inited", _register_chinese_search)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
