"""Pytest plugin: sum the time spent on each notebook and print a table at the end."""

from __future__ import annotations

from collections import defaultdict

_durations: dict[str, float] = defaultdict(float)
_failed: set[str] = set()


def pytest_runtest_logreport(report) -> None:
    path = report.nodeid.split("::", 1)[0]
    if not path.endswith(".ipynb"):
        return
    _durations[path] += report.duration
    if report.failed:
        _failed.add(path)


def pytest_terminal_summary(terminalreporter) -> None:
    if not _durations:
        return
    tr = terminalreporter
    tr.section("time per notebook (s)")
    width = max(len(p) for p in _durations)
    for path in sorted(_durations):
        status = "FAIL" if path in _failed else "ok"
        tr.write_line(f"{path:<{width}}  {_durations[path]:7.1f}  {status}")
    tr.write_line(f"{'total':<{width}}  {sum(_durations.values()):7.1f}")
