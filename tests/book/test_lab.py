"""JupyterLab as a reader meets it, driven in headless Chromium.

``make test`` starts JupyterLab from this environment on a free port (with its own temporary Jupyter
directories, and the book's notebooks marked trusted as ``make lab`` does) and:

* opens chapter 00: the notebook is not marked modified once its kernel is up (where the stored
  ``language_info`` is the running kernel's, i.e. after ``make regen`` with this Python), no news pop-up
  appears; then clears every output, runs "Restart Kernel and Run All Cells" from the Run menu and checks that
  every code cell ran, that only the cells tagged ``raises-exception`` show an error, and that the figures
  are drawn;
* opens ``tests/book/chat_widget.ipynb`` - chapter 15's chat widget (``mmbook.assistant.chat_widget``) on an
  assistant with canned answers, as running chapter 15 whole would take over a minute: before running, the
  widget is drawn from the state ``make regen`` stored and the notebook is not modified; after Run All, a
  picture is chosen and a question typed, and the assistant's reply appears in the chat log.

The server's log must not warn that a notebook is not trusted or that a kernel runs over unencrypted TCP.
Nothing is saved: autosave is off and both notebooks are compared byte for byte afterwards.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.book.conftest import require_browser

ROOT = Path(__file__).resolve().parents[2]
CHAPTER = ROOT / "chapters" / "00_how_to_use_this_book.ipynb"
CHAT = ROOT / "tests" / "book" / "chat_widget.ipynb"
START_TIMEOUT_S = 120.0
RUN_TIMEOUT_S = 300.0
RAISES_TAG = "raises-exception"
# An error output in Lab is rendered as stderr text holding IPython's traceback.
TRACEBACK = re.compile(r"Traceback \(most recent call last\)|Cell In\[\d+\], line \d+")


@dataclass
class Lab:
    url: str
    token: str
    log: Path

    def tree(self, path: Path) -> str:
        return f"{self.url}/lab/tree/{path.relative_to(ROOT).as_posix()}?token={self.token}"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _user_settings(settings: Path) -> None:
    """Autosave off (the test must not write the notebooks) and every cell kept in the page (no windowing)."""
    for plugin, values in {"docmanager-extension/plugin": {"autosave": False},
                           "notebook-extension/tracker": {"windowingMode": "none"}}.items():
        path = settings / "@jupyterlab" / f"{plugin}.jupyterlab-settings"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(values), encoding="utf-8")


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    require_browser()
    home = tmp_path_factory.mktemp("jupyter")
    env = dict(os.environ, MMBOOK_DEVICE="cpu", PYTHONHASHSEED="0")
    for variable, folder in {"JUPYTER_CONFIG_DIR": "config", "JUPYTER_DATA_DIR": "data",
                             "JUPYTER_RUNTIME_DIR": "runtime", "JUPYTERLAB_SETTINGS_DIR": "settings",
                             "JUPYTERLAB_WORKSPACES_DIR": "workspaces"}.items():
        (home / folder).mkdir()
        env[variable] = str(home / folder)
    _user_settings(home / "settings")
    # As `make lab` does: the book's notebooks are trusted (in this temporary data folder).
    subprocess.run([sys.executable, "-m", "jupyter", "trust", str(CHAPTER), str(CHAT)], env=env, check=True,
                   capture_output=True, timeout=120)
    port, token = _free_port(), secrets.token_hex(16)
    log = home / "server.log"
    command = [sys.executable, "-m", "jupyterlab", "--no-browser", f"--port={port}", "--ServerApp.port_retries=0",
               "--ServerApp.ip=127.0.0.1", f"--ServerApp.root_dir={ROOT}", f"--IdentityProvider.token={token}",
               f"--FileCheckpoints.checkpoint_dir={home / 'checkpoints'}"]  # not next to the notebooks
    if os.geteuid() == 0:
        command.append("--allow-root")
    with log.open("w", encoding="utf-8") as out:
        server = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            try:
                urllib.request.urlopen(f"{url}/api/status?token={token}", timeout=5).close()
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"JupyterLab did not start:\n{log.read_text(encoding='utf-8')[-3000:]}")
                time.sleep(0.5)
        yield Lab(url, token, log)
    finally:
        server.send_signal(signal.SIGTERM)  # the server shuts its kernels down
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(timeout=10)
    text = log.read_text(encoding="utf-8")
    assert "is not trusted" not in text, "JupyterLab logged an untrusted notebook"
    assert "without encryption" not in text, "a kernel ran over unencrypted TCP (tools/lab/jupyter_server_config.json)"


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


_STATE_JS = """
const cells = Array.from(document.querySelectorAll('.jp-NotebookPanel:not(.lm-mod-hidden) .jp-Notebook .jp-CodeCell'));
const indicator = document.querySelector('.jp-NotebookPanel:not(.lm-mod-hidden) .jp-Notebook-ExecutionIndicator');
return {
  kernel: indicator ? indicator.getAttribute('data-status') : null,
  dirty: Array.from(document.querySelectorAll('.lm-TabBar-tab.jp-mod-current.jp-mod-dirty')).length > 0,
  cells: cells.map(cell => ({
    prompt: (cell.querySelector('.jp-InputPrompt') || {textContent: ''}).textContent.trim(),
    stderr: Array.from(cell.querySelectorAll('.jp-OutputArea-output[data-mime-type="application/vnd.jupyter.stderr"]'))
              .map(o => o.textContent),
    images: Array.from(cell.querySelectorAll('.jp-OutputArea-output img')).filter(i => i.naturalWidth > 0).length,
    widgets: cell.querySelectorAll('.jp-OutputArea-output .jupyter-widgets').length,
    text: (cell.querySelector('.jp-Cell-outputWrapper') || {textContent: ''}).textContent,
  })),
  news: document.body.innerText.includes('Jupyter news'),
};
"""


def _state(browser: object) -> dict:
    return browser.execute_script(_STATE_JS)


def _wait(browser: object, done, what: str, timeout: float = START_TIMEOUT_S) -> dict:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    state = _state(browser)
    while not done(state):
        if time.monotonic() > deadline:
            pytest.fail(f"JupyterLab: timed out waiting for {what}; last state: {json.dumps(state)[:3000]}")
        time.sleep(0.5)
        state = _state(browser)
    return state


def _open(browser: object, lab: Lab, notebook: Path) -> dict:
    """Open a notebook and wait for all its code cells, with their stored prompts, and an idle kernel."""
    cells = _code_cells(notebook)
    browser.get(lab.tree(notebook))
    return _wait(browser, lambda s: s["kernel"] == "idle" and [c["prompt"] for c in s["cells"]] == [
        f"[{c['execution_count']}]:" for c in cells], f"{notebook.name} and its kernel")


def _menu(browser: object, menu: str, command: str) -> None:
    """Choose an entry of JupyterLab's menu bar, as a reader clicks it."""
    from selenium.webdriver.common.by import By

    browser.find_element(By.XPATH, f"//li[contains(@class, 'lm-MenuBar-item')][normalize-space(.)='{menu}']").click()
    browser.find_element(By.CSS_SELECTOR, f"li.lm-Menu-item[data-command='{command}']").click()


def _restart_and_run_all(browser: object, code_cells: int) -> dict:
    """Clear every output, then Run > Restart Kernel and Run All Cells; wait for every cell and an idle kernel."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.ui import WebDriverWait

    _menu(browser, "Edit", "editmenu:clear-all")
    _wait(browser, lambda s: all(c["prompt"] in ("[ ]:", "") for c in s["cells"]), "outputs to clear")
    _menu(browser, "Run", "runmenu:restart-and-run-all")
    WebDriverWait(browser, 30).until(expected_conditions.element_to_be_clickable(
        (By.CSS_SELECTOR, ".jp-Dialog .jp-Dialog-button.jp-mod-accept"))).click()  # "Restart"
    return _wait(browser, lambda s: s["kernel"] == "idle" and len(s["cells"]) == code_cells and all(
        re.fullmatch(r"\[\d+\]:", c["prompt"]) for c in s["cells"]), "Run All to finish", RUN_TIMEOUT_S)


def _code_cells(notebook: Path) -> list[dict]:
    return [c for c in json.loads(notebook.read_text(encoding="utf-8"))["cells"] if c["cell_type"] == "code"]


def _language_info_is_this_kernels(notebook: Path) -> bool:
    stored = json.loads(notebook.read_text(encoding="utf-8"))["metadata"].get("language_info", {})
    return stored.get("version") == ".".join(map(str, sys.version_info[:3]))


def test_chapter_00_runs_all_in_lab(lab: Lab, browser: object) -> None:
    before = _digest(CHAPTER)
    cells = _code_cells(CHAPTER)
    tagged = [RAISES_TAG in c.get("metadata", {}).get("tags", []) for c in cells]
    figures = [sum("image/png" in o.get("data", {}) for o in c.get("outputs", [])) for c in cells]
    _open(browser, lab, CHAPTER)
    time.sleep(2)  # the kernel's language_info arrives after "idle"
    if _language_info_is_this_kernels(CHAPTER):
        assert not _state(browser)["dirty"], "opening chapter 00 marked it modified"

    state = _restart_and_run_all(browser, len(cells))
    assert not state["news"], "JupyterLab asked about Jupyter news (tools/lab/overrides.json)"
    for index, (cell, is_tagged, stored_figures) in enumerate(zip(state["cells"], tagged, figures, strict=True)):
        errors = [text for text in cell["stderr"] if TRACEBACK.search(text)]
        if is_tagged:  # the demonstration of an error did raise, and Run All went on past it
            assert errors, f"code cell {index} is tagged {RAISES_TAG!r} but showed no error"
        else:
            assert not errors, f"code cell {index} failed in JupyterLab:\n{errors[0][-2000:]}"
        assert cell["images"] >= stored_figures, f"code cell {index}: {cell['images']} of {stored_figures} figures"
    assert any(tagged), "chapter 00 demonstrates an error: the check above must see one"
    stale = [c["text"] for c in state["cells"] if re.search(r"(?<![0-9])0/[0-9]+ ", c["text"])]
    assert not stale, f"a progress bar left at its start: {stale}"
    assert _digest(CHAPTER) == before, "JupyterLab wrote chapter 00"


def test_chat_widget_shows_before_running_and_answers_after(lab: Lab, browser: object) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import Select

    before = _digest(CHAT)
    _open(browser, lab, CHAT)
    opened = _wait(browser, lambda s: s["cells"][-1]["widgets"] > 0, "the stored chat widget to be drawn")
    assert "VBox(" not in opened["cells"][-1]["text"] and "Error displaying widget" not in opened["cells"][-1]["text"]
    time.sleep(2)
    assert _language_info_is_this_kernels(CHAT), "tests/book/chat_widget.ipynb: run make regen NB=... on it"
    assert not _state(browser)["dirty"], "opening the chat notebook marked it modified"

    state = _restart_and_run_all(browser, len(_code_cells(CHAT)))
    assert not any(TRACEBACK.search(text) for cell in state["cells"] for text in cell["stderr"]), state["cells"]
    chat = browser.find_elements(By.CSS_SELECTOR, ".jp-NotebookPanel:not(.lm-mod-hidden) .jp-CodeCell")[-1]
    Select(chat.find_element(By.CSS_SELECTOR, ".widget-dropdown select")).select_by_visible_text("a red square")
    question = chat.find_element(By.CSS_SELECTOR, ".widget-text input")
    question.send_keys("what colour is the circle?", Keys.ENTER)
    deadline = time.monotonic() + 60
    while "Red. [vision, confidence 0.90]" not in chat.text:
        assert time.monotonic() < deadline, f"no reply in the chat log: {chat.text!r}"
        time.sleep(0.25)
    assert "You (a red square): what colour is the circle?" in chat.text
    preview = chat.find_element(By.CSS_SELECTOR, ".widget-image")
    assert browser.execute_script("return arguments[0].naturalWidth", preview) == 32
    assert _digest(CHAT) == before, "JupyterLab wrote the chat notebook"
