"""The built HTML book renders in a real browser: every chapter and solutions page, with its figures and math.

Run by ``make test`` after ``make book``. The site in ``_build/book`` (the Chinese edition's in ``_build/book/zh_CN``
with ``MMBOOK_BOOK_EDITION=zh_CN``, as ``make test-book LANG=zh_CN`` runs it) is served on 127.0.0.1 (browsers do
not load web fonts from ``file://``), and headless Chromium, driven by Selenium through Debian's
chromedriver, opens each page and reports:

* the page title is the notebook's title (its first ``# `` heading);
* every figure the notebook stores (``image/png`` outputs) is an ``<img>`` that loaded with a width > 0;
* every piece of math (myst-nb emits ``.math`` elements) was typeset by the site's own MathJax 3 with
  CommonHTML output (``mjx-container[jax="CHTML"]``: real TeX fonts and stretchy delimiters, not the browser's
  native MathML), with no MathJax errors;
* no MathJax web font failed to load, and the browser's console shows no error at all (no script, stylesheet,
  font or image that failed to load, no JavaScript error).

A screenshot of a formula-heavy page (chapter 07's positional encodings: matrices in stretchy brackets, an
underbrace, ``\\sin t\\omega``) is saved to ``_build/screenshots/`` for a person to look at.

The browser comes from ``conftest.py``: without Chromium the tests are skipped with the reason; in CI (``CI``
set) a missing browser fails instead, because ``.ci/run`` installs it.
"""

from __future__ import annotations

import functools
import http.server
import json
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
# MMBOOK_BOOK_EDITION=zh_CN (make test-book LANG=zh_CN) tests the Chinese edition: its site is built into
# _build/book/zh_CN from the notebooks tools/i18n.py generates into _build/zh_CN.
EDITION = os.environ.get("MMBOOK_BOOK_EDITION", "en")
if EDITION not in ("en", "zh_CN"):
    raise ValueError(f"MMBOOK_BOOK_EDITION must be 'en' or 'zh_CN', got {EDITION!r}")
SITE = ROOT / "_build" / "book" / ("" if EDITION == "en" else EDITION)
SOURCE = ROOT if EDITION == "en" else ROOT / "_build" / EDITION
SHOTS = ROOT / "_build" / "screenshots"
NOTEBOOKS = sorted((ROOT / "chapters").glob("[0-9]*.ipynb")) + sorted(
    (ROOT / "chapters" / "solutions").glob("[0-9]*.ipynb"))
MATH_TIMEOUT_S = 120.0


def _notebook_facts(path: Path) -> tuple[str, int, bool]:
    """(title, number of stored PNG figures, whether the markdown has $ math) of a notebook."""
    nb = json.loads(path.read_text(encoding="utf-8"))
    title, figures, has_math = "", 0, False
    for cell in nb["cells"]:
        source = "".join(cell["source"])
        if cell["cell_type"] == "markdown":
            if not title:
                first = next((line for line in source.splitlines() if line.startswith("# ")), "")
                title = first[2:].strip()
            has_math = has_math or "$" in source
        for output in cell.get("outputs", []):
            figures += "image/png" in output.get("data", {})
    return title, figures, has_math


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - the base class's name
        pass


@pytest.fixture(scope="module")
def site_url() -> Iterator[str]:
    if not (SITE / "index.html").is_file():
        pytest.fail(f"the book is not built: {SITE / 'index.html'} is missing; run `make book` first")
    handler = functools.partial(_QuietHandler, directory=str(SITE))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


# Resolves once MathJax 3 has typeset the page and the fonts it uses have loaded (or failed).
_WAIT_JS = """
const done = arguments[arguments.length - 1];
const started = Date.now();
(function poll() {
  if (window.MathJax && MathJax.startup && MathJax.startup.promise) {
    MathJax.startup.promise.then(() => document.fonts.ready).then(() => done('ready'), e => done('error: ' + e));
  } else if (Date.now() - started > 60000) {
    done('MathJax never started');
  } else {
    setTimeout(poll, 100);
  }
})();
"""

# The page's state once MathJax has finished: math elements, how they were typeset, errors, fonts, images.
_STATE_JS = """
const article = document.querySelector('article') || document.body;
const math = Array.from(article.querySelectorAll('span.math.notranslate, div.math.notranslate'));
const containers = Array.from(article.querySelectorAll('mjx-container'));
const fonts = Array.from(document.fonts).filter(f => f.family.replace(/"/g, '').startsWith('MJX'));
return {
  title: (document.querySelector('article h1') || {textContent: ''}).textContent,
  mathjax: (window.MathJax && MathJax.version) || null,
  script: (document.querySelector('script[src*="mathjax"]') || {src: ''}).src,
  math: math.length,
  untypeset: math.filter(m => !m.querySelector('mjx-container')).map(m => m.textContent.slice(0, 80)),
  jax: Array.from(new Set(containers.map(c => c.getAttribute('jax')))),
  errors: document.querySelectorAll('mjx-merror, .MathJax_Error, [data-mjx-error]').length,
  fonts_loaded: fonts.filter(f => f.status === 'loaded').map(f => f.family),
  fonts_failed: fonts.filter(f => f.status === 'error').map(f => f.family),
  images: Array.from(article.querySelectorAll('img')).map(i => [i.getAttribute('src'), i.complete, i.naturalWidth]),
};
"""


def _console_errors(browser: object) -> list[str]:
    """The browser console's errors since the last call (failed loads show up here as well as script errors)."""
    return [entry["message"] for entry in browser.get_log("browser") if entry["level"] == "SEVERE"]


def _open(browser: object, url: str) -> dict:
    _console_errors(browser)  # forget the previous page's messages
    browser.get(url)
    browser.set_script_timeout(MATH_TIMEOUT_S)
    waited = browser.execute_async_script(_WAIT_JS)
    assert waited == "ready", f"{url}: {waited}"
    return browser.execute_script(_STATE_JS)


def test_every_notebook_has_a_page() -> None:
    if not (SITE / "index.html").is_file():
        pytest.fail(f"the book is not built: {SITE / 'index.html'} is missing; run `make book` first")
    missing = [str(nb.relative_to(ROOT)) for nb in NOTEBOOKS
               if not (SITE / nb.relative_to(ROOT).with_suffix(".html")).is_file()]
    assert not missing, f"notebooks without a page in {SITE}: {missing}"
    assert len(NOTEBOOKS) >= 2


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=[nb.stem for nb in NOTEBOOKS])
def test_page_renders_with_figures_and_math(notebook: Path, site_url: str, browser: object) -> None:
    title, figures, has_math = _notebook_facts(SOURCE / notebook.relative_to(ROOT))
    page = notebook.relative_to(ROOT).with_suffix(".html").as_posix()
    state = _open(browser, f"{site_url}/{page}")
    errors = _console_errors(browser)

    assert state["title"].rstrip("#¶ ").strip() == title, f"{page}: title {state['title']!r}, expected {title!r}"
    assert state["mathjax"] is not None and state["mathjax"].startswith("3."), (
        f"{page}: MathJax 3 did not load (version {state['mathjax']!r})")
    assert state["script"].startswith(site_url + "/_static/mathjax/"), (
        f"{page}: MathJax is not served by the site itself: {state['script']!r}")
    if has_math:
        assert state["math"] > 0, f"{page}: the notebook has math but the page has no math elements"
        assert state["fonts_loaded"], f"{page}: MathJax typeset math but none of its web fonts loaded"
    assert not state["untypeset"], f"{page}: math MathJax did not typeset: {state['untypeset'][:5]}"
    assert state["jax"] in ([], ["CHTML"]), f"{page}: math typeset with {state['jax']}, expected CommonHTML only"
    assert state["errors"] == 0, f"{page}: {state['errors']} MathJax errors"
    assert not state["fonts_failed"], f"{page}: MathJax fonts that failed to load: {state['fonts_failed']}"
    assert not errors, f"{page}: errors in the browser console: {errors}"
    broken = [src for src, complete, width in state["images"] if not (complete and width > 0)]
    assert not broken, f"{page}: images that did not load: {broken}"
    assert len(state["images"]) >= figures, f"{page}: {len(state['images'])} images for {figures} stored figures"


def test_formula_page_screenshot(site_url: str, browser: object) -> None:
    """Chapter 07's rotation identity, typeset, saved as a picture: stretchy brackets around the 2x2 matrices, an
    underbrace labelled R(k omega), and "sin t omega" with the operator's space."""
    if EDITION != "en":
        pytest.skip("the screenshot for a person to look at is taken of the English edition")
    state = _open(browser, f"{site_url}/chapters/07_transformer.html")
    underbraces = browser.execute_script(
        "return document.querySelectorAll('article mjx-container mjx-munder mjx-stretchy-h').length")
    # Tall brackets are drawn from MathJax's size-variant fonts (mjx-s1..s4) or assembled (mjx-stretchy-v).
    stretchy = browser.execute_script(
        "return document.querySelectorAll('article mjx-container :is(mjx-mo.mjx-s1, mjx-mo.mjx-s2, mjx-mo.mjx-s3, "
        "mjx-mo.mjx-s4, mjx-stretchy-v)').length")
    assert state["jax"] == ["CHTML"] and underbraces >= 1 and stretchy >= 1, (state["jax"], underbraces, stretchy)
    heading = browser.find_element("xpath", "//h2[contains(., 'Positional encodings')]")
    browser.execute_script("arguments[0].scrollIntoView(); window.scrollBy(0, 250);", heading)
    SHOTS.mkdir(parents=True, exist_ok=True)
    assert browser.save_screenshot(str(SHOTS / "07_transformer_positional_encodings.png"))
