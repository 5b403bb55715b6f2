"""pytest plugin (``-p tests.timing_table``): a per-notebook timing table at the end of the run.

Budget (DESIGN.md): at most 3 minutes per lab notebook; the table flags any notebook over it. With
``LLMLAB_TIMINGS_OUT=<file>`` the seconds of every test file (notebooks and unit-test modules) are written there
as JSON; copied to ``tests/file_seconds.json``, they let ``conftest.py`` hand the longest files to the pytest-xdist
workers first, so that two workers finish together instead of one waiting on a long notebook at the end."""
import json
import os
from collections import defaultdict

BUDGET_S = 180.0
_durations = defaultdict(float)
_cells = defaultdict(int)
_failed = defaultdict(int)
# files whose every test is its own unit for the workers and in the timings: each runs a
# notebook for minutes (tests/test_gpu_path.py), so that both workers share them
PER_TEST_FILES = ("tests/test_gpu_path.py",)


def unit_of(nodeid):
    """What pytest-xdist hands a worker as one piece (conftest.py) and what the timings count:
    a test file, or one test of a file in PER_TEST_FILES."""
    path = nodeid.split("::")[0]
    return nodeid if path in PER_TEST_FILES else path


def pytest_runtest_logreport(report):
    path = unit_of(report.nodeid)
    _durations[path] += report.duration
    if not path.endswith((".ipynb", ".ipynb]")):
        return
    if report.when == "call":
        _cells[path] += 1
        _failed[path] += report.failed


def pytest_terminal_summary(terminalreporter):
    out = os.environ.get("LLMLAB_TIMINGS_OUT")
    if out and _durations:
        os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
        with open(out, "w") as f:
            json.dump({p: round(s, 1) for p, s in sorted(_durations.items())}, f, indent=1)
            f.write("\n")
    notebooks = {p: s for p, s in _durations.items() if p.endswith((".ipynb", ".ipynb]"))}
    if not notebooks:
        return
    tr = terminalreporter
    tr.section("per-notebook timing")
    width = max(len(p) for p in notebooks)
    tr.write_line(f"{'notebook':<{width}}  {'cells':>5}  {'failed':>6}  {'seconds':>8}  budget")
    for path in sorted(notebooks):
        s = notebooks[path]
        over = "OVER 3 min" if s > BUDGET_S else "ok"
        tr.write_line(f"{path:<{width}}  {_cells[path]:>5}  {_failed[path]:>6}  {s:>8.1f}  {over}")
    tr.write_line(f"{'total':<{width}}  {sum(_cells.values()):>5}  {sum(_failed.values()):>6}  "
                  f"{sum(notebooks.values()):>8.1f}")
