"""Shared test setup: the cpu profile, no network, and the list of notebooks nbval collected."""
import os
from pathlib import Path

import pytest

from tests.timing_table import unit_of

ROOT = Path(__file__).resolve().parent.parent

# Tests and the notebooks nbval runs both use the cpu profile and never reach the Hub.
os.environ["LLMLAB_PROFILE"] = "cpu"
for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
    os.environ[var] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_configure(config):
    config.addinivalue_line("markers", "site: needs the built website (make book) and Chromium")
    config.addinivalue_line("markers", "slow: trains or re-measures the course model")
    config._llmlab_notebooks = set()


def pytest_collection_modifyitems(session, config, items):
    for item in items:
        path = Path(str(item.fspath))
        if path.suffix == ".ipynb":
            config._llmlab_notebooks.add(path.resolve().relative_to(ROOT).as_posix())
    _longest_files_first(items)


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """--dist loadfile, except that each test of tests/test_gpu_path.py (one notebook each, run
    for minutes) is a unit of its own (``timing_table.unit_of``)."""
    if config.getoption("dist", None) != "loadfile":
        return None
    from xdist.scheduler import LoadFileScheduling

    class LoadUnitScheduling(LoadFileScheduling):
        def _split_scope(self, nodeid):
            return unit_of(nodeid)

    return LoadUnitScheduling(config, log)


def _longest_files_first(items):
    """Order the files by their seconds in the last recorded run (tests/file_seconds.json, see timing_table),
    longest first, keeping each file's own order: pytest-xdist's --dist loadfile hands files to the workers in
    this order, and longest-first keeps one worker from running a long notebook alone at the end. A file with
    no record counts as long."""
    import json

    record = ROOT / "tests" / "file_seconds.json"
    seconds = json.loads(record.read_text()) if record.exists() else {}
    position = {}
    for i, item in enumerate(items):
        position.setdefault(unit_of(item.nodeid), i)

    def key(item):
        path = unit_of(item.nodeid)
        return -seconds.get(path, float("inf")), position[path]

    items.sort(key=key)


@pytest.fixture(scope="session")
def collected_notebooks(request):
    return request.config._llmlab_notebooks


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a module's tests (reproducible sums; the other pytest worker
    keeps the second core); the previous count comes back after the module."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def course_model():
    from llmlab.models import load

    return load("llmlab/course-model")
