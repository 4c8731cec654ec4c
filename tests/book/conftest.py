"""Headless Chromium for the browser tests of the HTML book and of JupyterLab.

Selenium drives Debian's ``chromium`` through its ``chromedriver``. Without them the browser tests are skipped
with the reason; in CI (``CI`` set) a missing browser fails instead, because ``.ci/run`` installs it.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator

import pytest


def _find(*names: str) -> str | None:
    for name in names:
        path = shutil.which(name)
        if path:
            return path
    return None


CHROMIUM = _find("chromium", "chromium-browser", "google-chrome")
CHROMEDRIVER = _find("chromedriver")


def missing_browser_reason() -> str | None:
    """Why the browser tests cannot run here, or ``None`` when they can."""
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (make venv installs it)"
    if CHROMIUM is None or CHROMEDRIVER is None:
        return "headless Chromium and chromedriver not found (Debian: apt-get install chromium chromium-driver)"
    return None


def require_browser() -> None:
    """Skip (or, in CI, fail) the calling test or fixture when there is no browser."""
    reason = missing_browser_reason()
    if reason is not None:
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the browser tests, but {reason}")
        pytest.skip(reason)


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    """A headless Chromium window of 1280 x 1600 that records the console (``get_log("browser")``)."""
    require_browser()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})  # console messages and failed loads
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1280,1600"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()
