"""The nbval tags for CPU-dependent outputs (tests/nbval_portable.py): what they mask, what they still catch."""
import json
import os
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

from tests import nbval_portable as P

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("text, floats, numbers", [
    ("loss 0.173.", "loss FLOAT.", "loss NUM."),
    ("max abs difference 3.6e-07 at 1e-05", "max abs difference FLOAT at FLOAT", "max abs difference NUM at NUM"),
    ("3,410,176 parameters, 12.5 %", "3,410,176 parameters, FLOAT %", "NUM parameters, NUM %"),
    ("-0.25 +.5 nan inf", "FLOAT FLOAT FLOAT FLOAT", "NUM NUM NUM NUM"),
    ("step 12: 45/64 correct", "step 12: 45/64 correct", "step NUM: NUM/NUM correct"),
    ("          qa    chat\nall    1.0   0.156", " qa chat\nall FLOAT FLOAT", " qa chat\nall NUM NUM"),
])
def test_masks(text, floats, numbers):
    assert P.mask_floats(text) == floats
    assert P.mask_numbers(text) == numbers


@pytest.mark.parametrize("text", ["torch 2.13.0", "an h100 and an x86_64 CPU", "information, nano", "E4M3 fp8"])
def test_masks_leave_words_and_versions(text):
    assert P.mask_floats(text) == text
    assert P.mask_numbers(text) == text


def test_describe_change():
    assert P.describe_change("a 0.5", "a 0.5") == {"change": "same"}
    moved = P.describe_change("loss 0.173, acc 0.50, diff 3.6e-07", "loss 0.174, acc 0.50, diff 7.7e-07")
    assert moved["change"] == "numbers" and moved["reference"] == 0.173 and moved["test"] == 0.174
    assert moved["max_rel"] == pytest.approx(0.001 / 0.174) and moved["round_off"] == 7.7e-07
    assert P.describe_change("LoRA wins 0.8", "base wins 0.8") == {"change": "text"}
    assert P.describe_change("0.8", "0.8 0.9") == {"change": "text"}


def _cell(source, stored, tags=()):
    cell = nbformat.v4.new_code_cell(source, execution_count=1, metadata={"tags": list(tags)})
    cell.outputs = [nbformat.v4.new_output("stream", name="stdout", text=stored)]
    return cell


# (source, stored output, tags, should nbval pass?)
CASES = [
    ('print("loss 0.174 after 12 steps")', "loss 0.173 after 12 steps\n", [P.MASK_FLOATS], True),
    ('print("loss 0.174 after 13 steps")', "loss 0.173 after 12 steps\n", [P.MASK_FLOATS], False),  # an integer
    ('print("loss 0.174 after 13 steps")', "loss 0.173 after 12 steps\n", [P.MASK_NUMBERS], True),
    ('print("loss 0.174 after 12 steps")', "loss 0.173 after 12 steps\n", [], False),  # untagged: exact
    ('print("LoRA beats the base model: 0.83")', "the base model beats LoRA: 0.83\n", [P.MASK_FLOATS], False),
    ('print("a\\nb 0.5")', "a 0.5\n", [P.MASK_NUMBERS], False),  # the shape: one line more
    # a planted change that flips the claim: the output still masks, the cell's assertion fails
    ('acc = 0.41\nprint(f"accuracy {acc}")\nassert acc > 0.6, "SFT should reach 0.6"', "accuracy 0.83\n",
     [P.MASK_FLOATS], False),
    ('acc = 0.79\nprint(f"accuracy {acc}")\nassert acc > 0.6, "SFT should reach 0.6"', "accuracy 0.83\n",
     [P.MASK_FLOATS], True),
]


def test_tagged_cells_pass_on_moved_digits_and_fail_on_anything_else(tmp_path):
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.cells = [_cell(src, out, tags) for src, out, tags, _ in CASES]
    path = tmp_path / "planted.ipynb"
    nbformat.write(nb, path)
    report = tmp_path / "report"
    env = {**os.environ, "LLMLAB_NBVAL_REPORT": str(report), "PYTHONPATH": str(ROOT)}
    run = subprocess.run([sys.executable, "-m", "pytest", str(path), "--nbval", "-p", "tests.nbval_portable",
                          "-p", "no:cacheprovider", "-p", "no:xdist", "--rootdir", str(tmp_path), "-rA", "-q"],
                         capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    outcome = {}
    for line in run.stdout.splitlines():
        for word in ("PASSED", "FAILED"):
            if line.startswith(word) and "::Cell " in line:
                outcome[int(line.split("::Cell ")[1].split()[0])] = word == "PASSED"
    assert outcome == {i: case[3] for i, case in enumerate(CASES)}, run.stdout[-3000:]
    assert "SFT should reach 0.6" in run.stdout
    rows = [json.loads(line) for f in report.glob("*.jsonl") for line in f.read_text().splitlines()]
    moved = {r["cell"]: r for r in rows}
    assert moved[0]["change"] == "numbers" and moved[0]["passed"] and moved[0]["test"] == 0.174
    assert moved[4]["change"] == "text" and not moved[4]["passed"]
    assert 7 in moved and moved[7]["passed"]  # accuracy 0.83 -> 0.79, masked


def test_every_nbval_tag_in_the_notebooks_is_one_nbval_knows():
    """A misspelt tag (nbval-mask-float) would silently compare nothing differently."""
    from nbval.plugin import metadata_tags

    known = {*metadata_tags, *P.TAGS}
    for path in sorted(p for d in ("book", "labs") for p in (ROOT / d).rglob("*.ipynb")
                       if ".ipynb_checkpoints" not in p.parts):
        nb = nbformat.read(path, as_version=4)
        for i, cell in enumerate(nb.cells):
            tags = set(cell.metadata.get("tags", []))
            unknown = {t for t in tags if t.startswith("nbval")} - known
            assert not unknown, f"{path.relative_to(ROOT)} cell {i}: unknown tags {unknown}"
            assert len(tags & {*P.TAGS, "nbval-ignore-output"}) <= 1, f"{path.relative_to(ROOT)} cell {i}: {tags}"


def test_the_how_to_run_page_shows_the_measured_cpu_differences():
    """The page's table is the recorded report of two runs (make test with this machine's kernels and with
    CPU=default against the stored outputs, saved with `python -m tests.nbval_portable --save`), not numbers
    typed by hand."""
    data = json.loads((ROOT / "book" / "foundations" / "cpu_differences.json").read_text())
    assert len(data["runs"]) == 2 and data["stored"]
    forced = [run["env"].get("ATEN_CPU_CAPABILITY") for run in data["runs"]]
    assert "default" in forced and len(set(forced)) == 2, "this machine's kernels, and the portable ones"
    for run in data["runs"]:
        assert {"cpu", "kernels", "torch", "date", "notebooks"} <= set(run)
        for row in run["notebooks"]:
            assert not row["failed"], f"{run['label']}: {row['notebook']} failed cells {row['failed']}"
            assert set(row["text"]) <= set(row["moved"])
    page = (ROOT / "book" / "foundations" / "how-to-run.md").read_text()
    assert P.markdown_table(data) in page
    assert data["stored"] in page
