"""pytest plugin (``-p tests.timing_table``): a per-notebook timing table at the end of the run.

Budget (DESIGN.md): at most 3 minutes per lab notebook; the table flags any notebook over it."""
from collections import defaultdict
from pathlib import Path

BUDGET_S = 180.0
_durations = defaultdict(float)
_cells = defaultdict(int)
_failed = defaultdict(int)


def pytest_runtest_logreport(report):
    path = report.nodeid.split("::")[0]
    if not path.endswith(".ipynb"):
        return
    _durations[path] += report.duration
    if report.when == "call":
        _cells[path] += 1
        _failed[path] += report.failed


def pytest_terminal_summary(terminalreporter):
    if not _durations:
        return
    tr = terminalreporter
    tr.section("per-notebook timing")
    width = max(len(p) for p in _durations)
    tr.write_line(f"{'notebook':<{width}}  {'cells':>5}  {'failed':>6}  {'seconds':>8}  budget")
    for path in sorted(_durations):
        s = _durations[path]
        over = "OVER 3 min" if s > BUDGET_S else "ok"
        tr.write_line(f"{path:<{width}}  {_cells[path]:>5}  {_failed[path]:>6}  {s:>8.1f}  {over}")
    tr.write_line(f"{'total':<{width}}  {sum(_cells.values()):>5}  {sum(_failed.values()):>6}  "
                  f"{sum(_durations.values()):>8.1f}")
