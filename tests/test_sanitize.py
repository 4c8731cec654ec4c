"""The nbval sanitize file: every rule is parsed by nbval and does what it says."""

import re
from pathlib import Path

from nbval.plugin import get_sanitize_patterns

CFG = Path(__file__).resolve().parent / "nbval_sanitize.cfg"


def _apply(text: str) -> str:
    for regex, replace in get_sanitize_patterns(CFG.read_text()):
        text = re.sub(regex, replace, text)
    return text


def test_every_section_yields_one_rule():
    text = CFG.read_text()
    sections = re.findall(r"^\[.+\]$", text, flags=re.MULTILINE)
    rules = get_sanitize_patterns(text)
    assert len(rules) == len(sections) == text.count("\nregex: ")
    assert all(replace.strip() for _, replace in rules)
    for regex, _ in rules:
        re.compile(regex)


def test_rules_replace_what_they_should():
    assert _apply("<function f at 0x7f3a2b1c9d30>") == "<function f at 0xADDRESS>"
    assert _apply("/work/x/.venv/lib/python3.11/site-packages/torch/nn.py") == "SITE-PACKAGES/torch/nn.py"
    assert _apply("saved to /home/alice/book/fig.png") == "saved to HOME-PATH"
    assert _apply("epoch took 12.5 s, step 3 ms") == "epoch took TIME, step TIME"
    assert _apply("100%|##| 50/50 [00:03<00:00, 15.21it/s]") == "100%|##| 50/50 [ELAPSED, RATE]"


def test_rules_leave_results_alone():
    for text in ("accuracy: 0.9633", "perplexity 12.34", "shape (64, 10)", "max |ours - ref| < 1e-06: True",
                 "3 classes", "weights sum to 1"):
        assert _apply(text) == text
