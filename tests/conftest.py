"""Shared test setup: the cpu profile, no network, and the list of notebooks nbval collected."""
import os
from pathlib import Path

import pytest

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


@pytest.fixture(scope="session")
def collected_notebooks(request):
    return request.config._llmlab_notebooks


@pytest.fixture(scope="session")
def course_model():
    from llmlab.models import load

    return load("llmlab/course-model")
