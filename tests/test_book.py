"""The website reads like a book: code and figures fit the column, tables and outputs are clean, every page links
to the others and to its sources, chapters open with objectives and close with exercises, labs sit after their
chapters. Each check here would have caught a problem a reader reported (issue: the website reads like a book)."""
import base64
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from llmlab.display import COLUMN_PX, DENSITY, display_width

ROOT = Path(__file__).resolve().parent.parent
SITE = ROOT / "_build" / "html"
WIDTH = 88  # code columns the article shows without scrolling
CHAPTERS = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "book").rglob("*.ipynb")
                  if ".ipynb_checkpoints" not in p.parts)
MASTERS = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "labs").glob("*.ipynb"))
STUDENT = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "labs" / "student").glob("*.ipynb"))
PAGES_MD = ["book/index.md", "book/foundations/how-to-run.md", "book/instructors/grading.md"]


def cells(nb):
    return json.loads((ROOT / nb).read_text())["cells"]


def source(cell):
    return "".join(cell["source"])


@pytest.mark.parametrize("nb", CHAPTERS + STUDENT)
def test_code_fits_the_column(nb):
    """No code line the site shows is wider than the column. The labs are checked as students get them: a
    master's long `# SOLUTION` line becomes `x = ...`, and its hidden tests never reach the page."""
    long = [(c["id"], line) for c in cells(nb) if c["cell_type"] == "code"
            for line in source(c).splitlines() if len(line) > WIDTH]
    assert not long, f"{nb}: {len(long)} code lines over {WIDTH} columns, e.g. {long[0]} (make format)"


def test_notebook_code_is_formatted():
    """The chapters' code as ruff formats it (make format). The lab masters are formatted by hand: a formatter
    would split a `# SOLUTION` line or a hidden test into fragments that otter cannot strip."""
    ruff = shutil.which("ruff", path=str(Path(sys.executable).parent)) or shutil.which("ruff")
    assert ruff, "ruff is missing: it is in the dev extra (make venv)"
    out = subprocess.run([ruff, "format", "--check", "--no-cache", f"--line-length={WIDTH}", *CHAPTERS],
                         capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, f"notebooks not formatted (make format):\n{out.stdout[-1500:]}{out.stderr[-500:]}"


def _figures(nb):
    for c in cells(nb):
        for o in c.get("outputs", []):
            if "image/png" in o.get("data", {}):
                yield c, o


@pytest.mark.parametrize("nb", CHAPTERS + STUDENT)
def test_figures_fit_the_column_sharp_with_alt_text_and_caption(nb):
    for c, o in _figures(nb):
        png = base64.b64decode(o["data"]["image/png"])
        width, density = display_width(png, o.get("metadata", {}).get("image/png"))
        where = f"{nb} cell {c['id']}"
        assert width <= COLUMN_PX, f"{where}: figure {width} px wide, the column {COLUMN_PX} (narrower figsize)"
        assert density >= DENSITY - 0.01, f"{where}: stored at {density:.1f}x, not hi-dpi (llmlab.env.setup)"
        meta = c["metadata"].get("mystnb", {})
        alt = meta.get("image", {}).get("alt", "")
        caption = meta.get("figure", {}).get("caption", "")
        assert len(alt) >= 40, f"{where}: no real alt text (cell metadata mystnb.image.alt)"
        assert caption.strip(), f"{where}: no caption (cell metadata mystnb.figure.caption)"


@pytest.mark.parametrize("nb", CHAPTERS + STUDENT)
def test_tables_show_a_dash_not_nan(nb):
    for c in cells(nb):
        for o in c.get("outputs", []):
            html = "".join(o.get("data", {}).get("text/html", ""))
            assert "<td>NaN</td>" not in html, f"{nb} cell {c['id']}: a table shows NaN (llmlab.display)"


@pytest.mark.parametrize("nb", CHAPTERS + STUDENT)
def test_printed_tables_scroll_and_prose_wraps(nb):
    """Printed prose wraps in the column (the site's CSS); a printed table keeps its rows and scrolls sideways:
    its cell is tagged wide-output."""
    table_row = re.compile(r"\S {2,}\S.* {2,}\S")
    for c in cells(nb):
        lines = [line for o in c.get("outputs", []) if o.get("output_type") == "stream"
                 for line in "".join(o["text"]).splitlines()]
        if any(len(line) > WIDTH and table_row.search(line) for line in lines):
            assert "wide-output" in c["metadata"].get("tags", []), f"{nb} cell {c['id']}: tag it wide-output"
    css = (ROOT / "book" / "assets" / "llmlab.css").read_text()
    assert "white-space: pre-wrap" in css and "tag_wide-output" in css


@pytest.mark.parametrize("nb", CHAPTERS + MASTERS)
def test_install_and_setup_cells_are_folded(nb):
    code = [c for c in cells(nb) if c["cell_type"] == "code"]
    setup = [c for c in code[:3] if "google.colab" in source(c) or "env.setup(" in source(c)]
    assert len(setup) == 2, f"{nb}: expected the Colab install cell and the setup cell"
    for c in setup:
        assert "hide-input" in c["metadata"].get("tags", []), f"{nb} cell {c['id']}: tag it hide-input"


def test_labs_follow_their_chapters():
    toc = yaml.safe_load((ROOT / "_toc.yml").read_text())
    order = [ch["file"] for part in toc["parts"] for ch in part["chapters"]]
    after = {"labs/student/00_course_loop": "book/foundations/how-to-run",
             "labs/student/01_quantization": "book/compression/quantization-from-scratch",
             "labs/student/02_finetuning": "book/finetuning/fine-tuning",
             "labs/student/03_alignment": "book/alignment/preference-trainers",
             "labs/student/04_inference_backends": "book/inference/serving",
             "labs/student/05_reasoning": "book/alignment/reasoning"}
    assert sorted(after) == sorted(p[:-len(".ipynb")] for p in STUDENT)
    for lab, chapter in after.items():
        assert order.index(lab) == order.index(chapter) + 1, f"{lab} must come right after {chapter}"


def _markdown(page):
    if page.endswith(".md"):
        return (ROOT / page).read_text()
    return "\n".join(source(c) for c in cells(page) if c["cell_type"] == "markdown")


@pytest.mark.parametrize("page", CHAPTERS + MASTERS + PAGES_MD)
def test_pages_link_each_other_and_never_cite_unseen_notes(page):
    text = _markdown(page)
    if page != "book/index.md":  # the landing page links every page through its table of contents
        assert re.search(r"\{doc\}`|\]\([^)]+\.(ipynb|md)\)", text), f"{page} links to no other page"
    assert not re.search(r"\b[Cc]hapter \*[A-Z]", text), f"{page}: a chapter named in italics, not linked"
    notes = re.findall(r"[^.\n]*\b(?:the|course|study) notes\b[^.\n]*", text, flags=re.I)
    assert not notes, f"{page}: refers to notes readers never see: {notes[0]!r}"


def test_every_citation_is_in_the_linked_bibliography():
    bib = (ROOT / "book" / "references.bib").read_text()
    pairs = re.findall(r"@\w+\{([^,]+),(.*?)\n\}", bib, flags=re.S)
    entries = dict(pairs)
    assert len(entries) >= 40
    keys = [k for k, _ in pairs]
    assert len(keys) == len(entries), f"keys entered twice: {sorted({k for k in keys if keys.count(k) > 1})}"
    for key, body in entries.items():  # a link (url or DOI), or for print-only work where it was printed
        linked = re.search(r"\b(url\s*=\s*\{https?://|doi\s*=)", body)
        assert linked or re.search(r"\b(journal|school)\s*=", body), f"{key}: no link"
    assert sum(bool(re.search(r"\b(url|doi)\s*=", b)) for b in entries.values()) >= 0.95 * len(entries)
    cited = set()
    for page in CHAPTERS + MASTERS + PAGES_MD:
        for keys in re.findall(r"\{cite(?::[pt])?\}`([^`]+)`", _markdown(page)):
            cited |= {k.strip() for k in keys.split(",")}
    assert cited, "no page cites a paper"
    assert not cited - set(entries), f"cited but not in references.bib: {sorted(cited - set(entries))}"
    assert "{bibliography}" in (ROOT / "book" / "references.md").read_text()


@pytest.mark.parametrize("nb", CHAPTERS)
def test_chapters_open_with_objectives_and_close_with_exercises(nb):
    md = [source(c) for c in cells(nb) if c["cell_type"] == "markdown"]
    assert md[1].startswith("**In this chapter you will**"), f"{nb}: no learning objectives after the title"
    assert len(re.findall(r"^- ", md[1], flags=re.M)) >= 3
    last = source(cells(nb)[-1])
    assert last.startswith("## Exercises"), f"{nb}: the last cell must be the exercises"
    exercises = re.findall(r"^\d+\. ", last, flags=re.M)
    assert len(exercises) >= 3 and last.count(":class: dropdown") >= len(exercises), f"{nb}: exercises with hints"



@pytest.mark.site
def test_site_folds_setup_cells_and_keeps_one_search_field():
    page = SITE / "book" / "inference" / "inference.html"
    assert page.exists(), "run make book"
    dom = page.read_text()
    assert dom.count("hide-input") >= 2 or dom.count("above-input") >= 2, "setup cells are not folded"
    assert "navbar-persistent--container" in dom  # the header's search field that llmlab.css hides on desktop
    css = (ROOT / "book" / "assets" / "llmlab.css").read_text()
    assert re.search(r"\.navbar-persistent--container\s*\{\s*display:\s*none", css)
    assert (SITE / "book" / "references.html").exists()


def run_minutes(nb: str) -> float:
    """Minutes a notebook's stored run took: the sum of its code cells' execution times (nbclient's metadata)."""
    from datetime import datetime

    total = 0.0
    for c in cells(nb):
        t = c.get("metadata", {}).get("execution", {})
        if "iopub.execute_input" in t and "shell.execute_reply" in t:
            start, end = (datetime.fromisoformat(t[k].replace("Z", "+00:00"))
                          for k in ("iopub.execute_input", "shell.execute_reply"))
            total += (end - start).total_seconds()
    return total / 60


def _run_times_rows():
    toc = yaml.safe_load((ROOT / "_toc.yml").read_text())
    rows = []
    for page in (ch["file"] for part in toc["parts"] for ch in part["chapters"]):
        stored = page.replace("labs/student/", "labs/") + ".ipynb"  # a lab's run is its master's
        if (ROOT / stored).exists():
            rows.append((page, max(1, round(run_minutes(stored)))))
    return rows


def test_start_here_states_measured_run_times():
    """The landing page's time per chapter and lab is what the stored runs took (LLMLAB_UPDATE_RUN_TIMES=1
    rewrites the table from them); a later re-execution may move each by a minute or a third."""
    import os

    index = ROOT / "book" / "index.md"
    text = index.read_text()
    table = re.search(r"\| notebook \| minutes \|\n\|---\|---:\|\n(?:\|.*\|\n)+", text)
    rows = _run_times_rows()
    if os.environ.get("LLMLAB_UPDATE_RUN_TIMES"):
        new = "| notebook | minutes |\n|---|---:|\n" + "".join(
            f"| {{doc}}`{p.split('/', 1)[1] if p.startswith('book/') else '../' + p}` | {m} |\n" for p, m in rows)
        index.write_text(text.replace(table.group(0), new) if table else text.replace("RUN_TIMES_TABLE\n", new))
        text = index.read_text()
        table = re.search(r"\| notebook \| minutes \|\n\|---\|---:\|\n(?:\|.*\|\n)+", text)
    assert table, "book/index.md: no run-time table (LLMLAB_UPDATE_RUN_TIMES=1 writes it)"
    stated = re.findall(r"\| \{doc\}`(?:\.\./)?([^`]+)` \| (\d+) \|", table.group(0))
    assert [("book/" + p if not p.startswith("labs/") else p) for p, _ in stated] == [p for p, _ in rows]
    for (page, minutes), (_, said) in zip(rows, stated):
        measured = run_minutes(page.replace("labs/student/", "labs/") + ".ipynb")
        assert abs(int(said) - measured) <= max(1.0, measured / 3), f"{page}: says {said} min, ran {measured:.1f}"


@pytest.mark.parametrize("nb", CHAPTERS + STUDENT)
def test_long_printouts_are_folded(nb):
    """A printout of more than 40 lines (a whole config file) is folded behind a toggle: tag hide-output."""
    for c in cells(nb):
        lines = sum("".join(o.get("text", "")).count("\n") for o in c.get("outputs", [])
                    if o.get("output_type") == "stream")
        if lines > 40:
            assert "hide-output" in c["metadata"].get("tags", []), f"{nb} cell {c['id']}: {lines} lines shown"


def test_gpu_only_measurements_show_their_stored_gpu_reference():
    """Where a page skips a measurement that needs a CUDA GPU, it shows the stored GPU reference beside the
    skip (llmlab.measure.gpu_reference): a dated table from a real GPU run, or a line saying it is pending."""
    from llmlab import measure

    shown = set()
    for nb in CHAPTERS + STUDENT:
        text = "\n".join("".join(o.get("text", "")) for c in cells(nb) for o in c.get("outputs", []))
        shown |= set(re.findall(r"GPU reference \(stored, ([\w-]+)\)", text))
        gpu_skips = [line for line in text.splitlines() if line.startswith("skipped")
                     and re.search(r"\b(GPU|CUDA)\b", line) and "launch" not in line]
        if gpu_skips:
            assert "GPU reference (stored" in text, f"{nb} skips {gpu_skips[0][:80]!r} with no GPU reference"
    assert shown == set(measure._gpu_results()), "every stored GPU reference is shown on its page"
