"""A real browser reads the built site (make book) from disk: what a reader sees."""
import html
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SITE = ROOT / "_build" / "html"
pytestmark = pytest.mark.site


def chromium():
    exe = os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if not exe or not shutil.which(exe):
        pytest.fail("Chromium is needed for the browser check (make test installs it, or: apt-get install chromium)")
    return exe


def render(page: str, query: str = "") -> str:
    """The DOM after the page's scripts ran (MathJax included), as headless Chromium sees it."""
    path = SITE / page
    assert path.exists(), f"{path} missing: run make book"
    uri = path.as_uri() + (f"?{query}" if query else "")
    out = subprocess.run(
        [chromium(), "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
         "--allow-file-access-from-files", "--virtual-time-budget=15000", "--dump-dom", uri],
        capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


def text_of(dom: str) -> str:
    dom = re.sub(r"<(script|style)\b.*?</\1>", " ", dom, flags=re.S)
    return html.unescape(re.sub(r"<[^>]+>", " ", dom))


@pytest.fixture(scope="module")
def memory_page():
    return render("book/foundations/memory-and-compute.html")


def test_title_and_typeset_math(memory_page):
    assert re.search(r"<title>\s*Memory and compute", memory_page)
    assert "mjx-container" in memory_page, "MathJax did not typeset the page"
    assert "\\(" not in text_of(memory_page) and "$$" not in text_of(memory_page), "raw TeX is visible"
    assert "cdn" not in " ".join(re.findall(r'<script[^>]+src="([^"]+)"', memory_page)).lower()


def test_executed_outputs_are_shown(memory_page):
    assert "cell_output" in memory_page
    assert "16.8" in text_of(memory_page)  # the notes' example, computed by a cell
    assert re.search(r'<img[^>]+src="[^"]+\.png"', memory_page), "the chapter's plots are missing"


def test_lab_page_has_colab_link():
    dom = render("labs/student/00_course_loop.html")
    assert re.search(r'href="https://colab\.research\.google\.com/github/[^"]+/labs/student/00_course_loop\.ipynb"', dom)
    assert "cell_output" in dom
    assert 'grader.check' in text_of(dom)  # the student version, with its checks
    assert not list(SITE.glob("labs/00_course_loop*")), "a lab master was published"


def test_search_works_offline():
    dom = render("search.html", query="q=bitsandbytes")
    assert re.search(r"Search finished, found [1-9]\d* page", dom), "the search found nothing"
    assert 'href="book/foundations/memory-and-compute.html' in dom
