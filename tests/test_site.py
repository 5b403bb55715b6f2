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


HOST = "book/foundations/memory-and-compute.html"  # its <head> loads MathJax and the widget manager


def render_on_host(body: str, name: str) -> str:
    """``body`` rendered in one document under the host page's <head> (the site's own MathJax and widget
    manager): one Chromium run for the content of many pages (a render per page costs a minute of CI)."""
    head = (SITE / HOST).read_text().split("<body", 1)[0]
    check = SITE / "book" / "foundations" / name
    check.write_text(f"{head}<body>{body}</body></html>")
    try:
        return render(check.relative_to(SITE).as_posix())
    finally:
        check.unlink()


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
    assert "16.8" in text_of(memory_page)  # the rule of thumb's worked example, computed by a cell
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


def _math_errors(dom: str) -> list[str]:
    """The TeX MathJax could not typeset: `<mjx-merror>` elements and their `data-mjx-error` messages."""
    return re.findall(r'data-mjx-error="([^"]*)"', dom) + (["<mjx-merror>"] if "<mjx-merror" in dom else [])


def _pages_with_math():
    pages = sorted(p.relative_to(SITE).as_posix() for p in SITE.rglob("*.html")
                   if "_static" not in p.parts and "_sources" not in p.parts and not p.name.startswith("_"))
    has_tex = re.compile(r'\\\(|\\\[|\$\$|class="math')
    return [p for p in pages if has_tex.search((SITE / p).read_text(errors="replace"))]


def _typeset_all(pages, extra: str = "") -> dict:
    """MathJax errors per page, from one Chromium run: every page's article (images and scripts left out) in one
    document with the site's own MathJax set-up."""
    sections = []
    for page in pages:
        article = re.search(r"<article.*?</article>", (SITE / page).read_text(), re.S).group(0)
        article = re.sub(r"<script\b.*?</script>|<img[^>]*>", "", article, flags=re.S)
        sections.append(f'<section data-math-page="{page}">{article}</section>')
    if extra:
        sections.append(f'<section data-math-page="extra"><article class="bd-article">{extra}</article></section>')
    dom = render_on_host("".join(sections), "_math_check.html")
    parts = re.split(r'<section data-math-page="([^"]+)">', dom)
    return {page: (_math_errors(body), "mjx-container" in body) for page, body in zip(parts[1::2], parts[2::2])}


def test_every_equation_on_every_page_typesets():
    """MathJax turns TeX it cannot read into yellow error text (`\\text{lm_head}`: "'_' allowed only in math
    mode"); the page still loads. The math of every page that has any is typeset, and must hold no such error."""
    pages = _pages_with_math()
    assert len(pages) >= 10, pages  # the chapters with equations, found from the built pages
    result = _typeset_all(pages)
    assert sorted(result) == pages
    for page, (errors, typeset) in result.items():
        assert typeset, f"{page}: MathJax did not typeset the page"
        assert errors == [], f"{page}: MathJax errors {errors}"


def test_the_math_check_finds_a_broken_equation():
    broken = r'<p><span class="math notranslate nohighlight">\(\text{lm_head, unless tied}\)</span></p>'
    result = _typeset_all(["book/foundations/memory-and-compute.html"], extra=broken)
    assert result["book/foundations/memory-and-compute.html"] == ([], True)
    errors, _ = result["extra"]
    assert errors and any("math mode" in e for e in errors), errors


# The explorers (llmlab.widgets) and their controls' widget classes, as the html-manager draws them.
EXPLORER_PAGES = {
    "book/transformer/tokenization.html": {"Tokenizer explorer": ["widget-textarea"]},
    "book/transformer/attention-and-the-block.html": {
        "RoPE and attention explorer": ["widget-slider"] * 4 + ["widget-dropdown"]},
    "book/foundations/memory-and-compute.html": {
        "Memory planner": ["widget-dropdown"] * 4 + ["widget-slider", "widget-text"]},
    "book/compression/quantization-from-scratch.html": {
        "Quantization explorer": ["widget-slider"] * 2 + ["widget-dropdown"]},
    "book/inference/inference.html": {
        "Sampling explorer": ["widget-text"] + ["widget-slider"] * 3,
        "Roofline explorer": ["widget-dropdown"] * 3 + ["widget-slider", "widget-text"]},
    "book/finetuning/fine-tuning.html": {
        "LoRA explorer": ["widget-dropdown"] + ["widget-slider"] * 2 + ["widget-select-multiple"]},
}


def test_every_explorer_shows_its_controls_and_default_output_offline():
    """One Chromium run over one document holding every explorer page's stored widget state and views, loaded
    with the site's own widget manager (_static/widgets/embed.js): each explorer's box, its controls and its
    default output are drawn, and no script comes from another host."""
    head = (SITE / HOST).read_text().split("<body", 1)[0]
    assert re.search(r'<script src="[./]*_static/widgets/embed\.js', head), "the widget manager is not loaded"
    sections = []
    for page in EXPLORER_PAGES:
        source = (SITE / page).read_text()
        assert "cdn" not in " ".join(re.findall(r'<script[^>]+src="([^"]+)"', source)).lower(), page
        states = re.findall(r'<script type="application/vnd\.jupyter\.widget-state\+json">.*?</script>', source, re.S)
        views = re.findall(r'<script type="application/vnd\.jupyter\.widget-view\+json">.*?</script>', source, re.S)
        assert len(states) == 1 and len(views) == len(EXPLORER_PAGES[page]), (page, len(states), len(views))
        if page != HOST:  # the host page's state is in its head already
            sections.append(states[0])
        sections.append(f'<section data-explorer-page="{page}">'
                        + "".join(f"<div>{v}</div>" for v in views) + "</section>")
    dom = render_on_host("".join(sections), "_widget_check.html")
    parts = re.split(r'<section data-explorer-page="([^"]+)">', dom)
    shown = dict(zip(parts[1::2], parts[2::2]))
    assert sorted(shown) == sorted(EXPLORER_PAGES)
    for page, explorers in EXPLORER_PAGES.items():
        boxes = re.split(r'class="[^"]*llmlab-explorer"', shown[page])[1:]
        assert len(boxes) == len(explorers), f"{page}: {len(boxes)} explorer boxes drawn, {len(explorers)} stored"
        for box, (title, controls) in zip(boxes, explorers.items()):
            assert title in text_of(box), f"{page}: {title} not drawn"
            for kind in set(controls):
                n = len(re.findall(rf'class="[^"]*jupyter-widgets[^"]*\b{kind}\b', box))
                assert n >= controls.count(kind), f"{page}, {title}: {n} {kind} controls of {controls.count(kind)}"
            assert "llmlab-explorer-error" not in box
            assert "llmlab-explorer-table" in box or "<sub" in box, f"{page}, {title}: no default output"
