"""The built HTML book renders in a real browser: every chapter and solutions page, with its figures and math.

Run by ``make test`` after ``make book``. The site in ``_build/book`` is served on 127.0.0.1 (browsers do
not load web fonts from ``file://``), and headless Chromium, driven by Selenium through Debian's
chromedriver, opens each page and reports:

* the page title is the notebook's title (its first ``# `` heading);
* every figure the notebook stores (``image/png`` outputs) is an ``<img>`` that loaded with a width > 0;
* every piece of math (myst-nb emits ``.math`` elements) was typeset by MathJax, with no MathJax errors.

Without Chromium the tests are skipped with the reason; in CI (``CI`` set) a missing browser fails instead,
because ``.ci/run`` installs it.
"""

from __future__ import annotations

import functools
import http.server
import json
import os
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SITE = ROOT / "_build" / "book"
NOTEBOOKS = sorted((ROOT / "chapters").glob("[0-9]*.ipynb")) + sorted(
    (ROOT / "chapters" / "solutions").glob("[0-9]*.ipynb"))
MATH_TIMEOUT_S = 120.0


def _find(*names: str) -> str | None:
    for name in names:
        path = shutil.which(name)
        if path:
            return path
    return None


CHROMIUM = _find("chromium", "chromium-browser", "google-chrome")
CHROMEDRIVER = _find("chromedriver")


def _missing_browser_reason() -> str | None:
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (make venv installs it)"
    if CHROMIUM is None or CHROMEDRIVER is None:
        return "headless Chromium and chromedriver not found (Debian: apt-get install chromium chromium-driver)"
    return None


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


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    reason = _missing_browser_reason()
    if reason is not None:
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the browser test, but {reason}")
        pytest.skip(reason)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1280,1600"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


# The page's state once MathJax has finished: counts of math elements, typeset formulas and errors,
# and every image in the article with whether it loaded.
_STATE_JS = """
const article = document.querySelector('article') || document.body;
const hub = (typeof MathJax !== 'undefined' && MathJax.Hub) ? MathJax.Hub : null;
return {
  title: (document.querySelector('article h1') || {textContent: ''}).textContent,
  mathjax: hub ? MathJax.version : null,
  pending: hub ? (hub.queue.pending + hub.queue.running) : -1,
  math: article.querySelectorAll('span.math.notranslate, div.math.notranslate').length,
  typeset: article.querySelectorAll('script[type^="math/tex"]').length,
  rendered: article.querySelectorAll('[id^="MathJax-Element-"][id$="-Frame"]').length,
  errors: document.querySelectorAll('.MathJax_Error, merror, [data-mjx-error]').length,
  images: Array.from(article.querySelectorAll('img')).map(i => [i.getAttribute('src'), i.complete, i.naturalWidth]),
};
"""


def test_every_notebook_has_a_page() -> None:
    if not (SITE / "index.html").is_file():
        pytest.fail(f"the book is not built: {SITE / 'index.html'} is missing; run `make book` first")
    missing = [str(nb.relative_to(ROOT)) for nb in NOTEBOOKS
               if not (SITE / nb.relative_to(ROOT).with_suffix(".html")).is_file()]
    assert not missing, f"notebooks without a page in {SITE}: {missing}"
    assert len(NOTEBOOKS) >= 2


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=[nb.stem for nb in NOTEBOOKS])
def test_page_renders_with_figures_and_math(notebook: Path, site_url: str, browser: object) -> None:
    title, figures, has_math = _notebook_facts(notebook)
    page = notebook.relative_to(ROOT).with_suffix(".html").as_posix()
    browser.get(f"{site_url}/{page}")
    deadline = time.monotonic() + MATH_TIMEOUT_S
    state = browser.execute_script(_STATE_JS)
    while state["pending"] != 0 and time.monotonic() < deadline:
        time.sleep(0.25)
        state = browser.execute_script(_STATE_JS)

    assert state["title"].rstrip("#¶ ").strip() == title, f"{page}: title {state['title']!r}, expected {title!r}"
    assert state["mathjax"] is not None, f"{page}: MathJax did not load"
    assert state["pending"] == 0, f"{page}: MathJax still busy after {MATH_TIMEOUT_S:.0f} s"
    if has_math:
        assert state["math"] > 0, f"{page}: the notebook has math but the page has no math elements"
    assert state["typeset"] == state["math"] and state["rendered"] >= state["math"], (
        f"{page}: {state['math']} math elements, {state['typeset']} typeset, {state['rendered']} rendered")
    assert state["errors"] == 0, f"{page}: {state['errors']} MathJax errors"
    broken = [src for src, complete, width in state["images"] if not (complete and width > 0)]
    assert not broken, f"{page}: images that did not load: {broken}"
    assert len(state["images"]) >= figures, f"{page}: {len(state['images'])} images for {figures} stored figures"
