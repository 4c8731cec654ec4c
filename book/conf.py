"""Sphinx configuration of the HTML book (``make book``).

The source directory is the repository root (so the notebooks are read where they live) and this
folder holds the configuration and the front page. Notebooks are *not* executed: the site shows
the outputs stored by ``make regen``. MathJax is served from the site itself (the copy shipped by
the ``jupyter-server-mathjax`` package), so the built book works offline.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import jupyter_server_mathjax

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

# Offline MathJax 2.7: its files are copied to _static/mathjax after the build, and Sphinx's MathJax
# support loads it from there (a relative mathjax_path is relative to _static).
_MATHJAX_DIR = Path(jupyter_server_mathjax.__file__).parent / "static"
mathjax_path = "mathjax/MathJax.js?config=TeX-AMS-MML_HTMLorMML-full"
# Output: the browser's own MathML rendering (fast; every current browser has MathML Core). The HTML-CSS
# fallback uses the STIX-Web fonts, the only ones that copy ships (as classic Jupyter used them).
mathjax2_config = {
    "menuSettings": {"renderer": "NativeMML"},
    "HTML-CSS": {"availableFonts": [], "preferredFont": None, "webFont": "STIX-Web", "imageFont": None,
                 "linebreaks": {"automatic": True}},
    # myst-nb marks each notebook "ignore" and the math in it "math" (MathJax 3 style); say the same in 2.7 terms.
    "tex2jax": {"processClass": "tex2jax_process|mathjax_process|math|output_area"},
    "messageStyle": "none",
}

html_theme = "sphinx_book_theme"
html_title = "LLMs from Theory to Practice — Multimodal Edition"
html_theme_options = {
    "show_toc_level": 2,
    "use_download_button": True,
    "home_page_in_toc": True,
}
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
    shutil.copytree(_MATHJAX_DIR, outdir / "_static" / "mathjax", dirs_exist_ok=True)
    (outdir / "index.html").write_text(_REDIRECT.format(title=project), encoding="utf-8")


def setup(app) -> dict[str, bool]:  # noqa: ANN001 - Sphinx's extension signature
    app.connect("build-finished", _finish_site)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
