"""pytest plugin (``-p tests.nbval_portable``): notebook outputs compared the same way on every CPU.

nbval compares a cell's new output with the stored one character for character. That is right for what cannot
depend on the hardware (ids, counts, shapes, strings, exact matches), and wrong for floating-point results:
PyTorch picks its kernels by CPU (AVX-512, AVX2, Arm NEON, or ``ATEN_CPU_CAPABILITY``), so sums round
differently in their last digits, and a training run that rounds differently drifts. A cell whose printed
numbers depend on the CPU carries one of two tags, and asserts the claim its prose makes in its own code,
with a tolerance (a planted change that breaks the claim fails the cell):

- ``nbval-mask-floats``: every decimal number (``0.173``, ``-2.5``, ``3.6e-07``, ``1e-05``, ``nan``) is
  replaced by ``FLOAT`` in both outputs before nbval compares them. Integers, words, column names, the number
  of lines and which outputs exist (a table, a figure) are still compared exactly.
- ``nbval-mask-numbers``: the same for every number, integers too, for counts a training run's drift moves
  (correct answers out of 64, the step a curve crosses a line).

In both, runs of spaces and tabs become one space, since a number's width moves a table's column alignment.
Cells whose whole output depends on the CPU (text sampled from a trained model, timings) keep nbval's own
``nbval-ignore-output`` and assert their claims the same way.
"""
import re

MASK_FLOATS = "nbval-mask-floats"
MASK_NUMBERS = "nbval-mask-numbers"
TAGS = (MASK_FLOATS, MASK_NUMBERS)

# A decimal number: 0.173, .5, -2.5, 3.6e-07, 1e-05, 1.2E+03; nan and inf as words (a loss can overflow on
# one CPU and not on another). Not the digits inside a word (h100, x86_64), nor a version (2.13.0).
_DECIMAL = r"(?:\d+\.\d+|\.\d+)(?:[eE][-+]?\d+)?|\d+[eE][-+]?\d+"
_INTEGER = r"\d{1,3}(?:,\d{3})+(?!\d)|\d+"  # with thousands separators: 3,410,176
_NOT_IN_A_WORD = r"(?<![\w.])[-+]?(?:{})(?![\w.]*\d)"
_NAN_INF = r"|(?<![\w.])[-+]?(?:nan|inf)(?!\w)"
_FLOAT = re.compile(_NOT_IN_A_WORD.format(_DECIMAL) + _NAN_INF, re.IGNORECASE)
_NUMBER = re.compile(_NOT_IN_A_WORD.format(f"{_DECIMAL}|{_INTEGER}") + _NAN_INF, re.IGNORECASE)
_SPACES = re.compile(r"[ \t]+")


def mask_floats(text: str) -> str:
    """``text`` with every decimal number replaced by ``FLOAT`` and runs of spaces made one."""
    return _SPACES.sub(" ", _FLOAT.sub("FLOAT", text))


def mask_numbers(text: str) -> str:
    """``text`` with every number, integers too, replaced by ``NUM`` and runs of spaces made one."""
    return _SPACES.sub(" ", _NUMBER.sub("NUM", text))


def pytest_configure(config):
    try:
        from nbval.plugin import IPyNbCell
    except ImportError:  # nbval not installed: nothing to extend
        return
    if hasattr(IPyNbCell, "_nbval_sanitize"):
        return
    IPyNbCell._nbval_sanitize = IPyNbCell.sanitize
    IPyNbCell._nbval_compare_outputs = IPyNbCell.compare_outputs

    def sanitize(self, s):
        """nbval's sanitize (the --nbval-sanitize-with patterns), then this cell's mask."""
        s = self._nbval_sanitize(s)
        if not isinstance(s, str):
            return s
        tags = self.cell.metadata.get("tags", [])
        if MASK_NUMBERS in tags:
            return mask_numbers(s)
        if MASK_FLOATS in tags:
            return mask_floats(s)
        return s

    def compare_outputs(self, test, ref, skip_compare=None):
        passed = self._nbval_compare_outputs(test, ref, skip_compare)
        _record(self, test, ref, passed)
        return passed

    IPyNbCell.sanitize = sanitize
    IPyNbCell.compare_outputs = compare_outputs


# ------------------------------------------------------------------------------------------ the report --
# With LLMLAB_NBVAL_REPORT=<folder> (make test sets it), every compared cell whose output moved from the stored
# one is written there, one JSON line per cell: how it moved (numbers only, or its text too), by how much, and
# whether nbval passed it. The run ends with the per-notebook table (`python -m tests.nbval_portable <folder>`
# prints it again); the How to run page's "what differs between CPUs" comes from two such runs.

def _comparable_texts(outputs):
    """The text nbval compares for a cell (streams by name, and each text MIME type), before masking."""
    texts = []
    for out in outputs:
        if out.get("output_type") == "stream":
            texts.append(f"[{out.get('name')}] {out.get('text', '')}")
        for mime, value in sorted((out.get("data") or {}).items()):  # stored and new order differ
            if mime.startswith("text/") and isinstance(value, str):
                texts.append(f"[{mime}] {value}")
    return texts


def _numbers(text):
    values = []
    for m in _NUMBER.finditer(text):
        try:
            values.append(float(m.group(0).replace(",", "")))
        except ValueError:
            pass
    return values


ROUND_OFF = 1e-3  # values below this in magnitude are round-off measurements (a max |difference| of 3.6e-07)


def describe_change(reference: str, test: str) -> dict:
    """How ``test`` differs from ``reference``: ``same``, ``numbers`` (only numbers moved) or ``text`` (words,
    lines or the count of numbers changed too). For ``numbers``: the largest relative change among values of at
    least ``ROUND_OFF`` in magnitude (results: a loss, an accuracy), with that pair, and the largest value among
    round-off-sized ones (a max |difference| that went from 3.6e-07 to 7.7e-07)."""
    if reference == test:
        return {"change": "same"}
    if mask_numbers(reference) != mask_numbers(test):
        return {"change": "text"}
    worst = {"change": "numbers", "max_rel": 0.0, "round_off": 0.0}
    for a, b in zip(_numbers(reference), _numbers(test)):
        if a == b or a != a or b != b:
            continue
        if max(abs(a), abs(b)) < ROUND_OFF:
            worst["round_off"] = max(worst["round_off"], abs(a), abs(b))
            continue
        rel = abs(a - b) / max(abs(a), abs(b))
        if rel > worst["max_rel"]:
            worst.update(max_rel=rel, reference=a, test=b)
    return worst


def _record(cell, test, ref, passed):
    import json
    import os

    folder = os.environ.get("LLMLAB_NBVAL_REPORT")
    if not folder:
        return
    ref_text = "\n".join(_comparable_texts(ref))
    test_text = "\n".join(_comparable_texts(test))
    sanitize = type(cell)._nbval_sanitize
    change = describe_change(sanitize(cell, ref_text), sanitize(cell, test_text))
    if change["change"] == "same":
        return
    tags = [t for t in cell.cell.metadata.get("tags", []) if t.startswith("nbval")]
    row = {"notebook": str(cell.fspath.relto(cell.config.rootdir)), "cell": cell.cell_num, "tags": tags,
           "passed": bool(passed), **change}
    os.makedirs(folder, exist_ok=True)
    worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
    with open(os.path.join(folder, f"{worker}.jsonl"), "a") as f:
        f.write(json.dumps(row) + "\n")


def pytest_terminal_summary(terminalreporter, config):
    """The per-notebook table of what moved, on the controller (xdist workers only write their lines), and
    the run's provenance beside the lines (run.json)."""
    import json
    import os

    folder = os.environ.get("LLMLAB_NBVAL_REPORT")
    nbval = config.getoption("--nbval", default=False) or config.getoption("--nbval-lax", default=False)
    if not folder or hasattr(config, "workerinput") or not nbval:
        return
    os.makedirs(folder, exist_ok=True)  # a run where nothing moved has its provenance too
    run = provenance()
    with open(os.path.join(folder, "run.json"), "w") as f:
        json.dump(run, f, indent=1)
    tr = terminalreporter
    tr.section(f"notebook outputs that moved from the stored ones ({run['kernels']})")
    rows = report(folder)
    for line in format_report(rows) if rows else ["none: every output is as stored"]:
        tr.write_line(line)


def provenance() -> dict:
    """Which CPU and kernels ran: what a row of the report needs to be read later."""
    import datetime
    import os
    import platform

    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    env = {k: os.environ[k] for k in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS")
           if k in os.environ}
    kernels = f"PyTorch kernels: {torch.backends.cpu.get_cpu_capability()}"
    if env:
        kernels += " (" + ", ".join(f"{k}={v}" for k, v in env.items()) + ")"
    return {"cpu": cpu, "machine": platform.machine(), "kernels": kernels, "env": env, "torch": torch.__version__,
            "date": datetime.date.today().isoformat()}


def report(folder) -> list[dict]:
    """Per notebook, from the JSON lines in ``folder``: the cells whose output moved, those whose text moved
    (not only numbers), those nbval failed, the largest relative change of a result (with its cell and both
    values) and the largest round-off-sized value that moved. Largest change first."""
    import json
    from pathlib import Path

    notebooks = {}
    for path in sorted(Path(folder).glob("*.jsonl")):
        for line in path.read_text().splitlines():
            row = json.loads(line)
            nb = notebooks.setdefault(row["notebook"], {"notebook": row["notebook"], "moved": set(), "text": set(),
                                                        "failed": set(), "max_rel": 0.0, "round_off": 0.0})
            nb["moved"].add(row["cell"])
            if row["change"] == "text":
                nb["text"].add(row["cell"])
            if not row["passed"]:
                nb["failed"].add(row["cell"])
            nb["round_off"] = max(nb["round_off"], row.get("round_off", 0.0))
            if row.get("max_rel", 0.0) > nb["max_rel"]:
                nb.update(max_rel=row["max_rel"], worst_cell=row["cell"], reference=row["reference"],
                          test=row["test"])
    rows = sorted(notebooks.values(), key=lambda r: (-r["max_rel"], -len(r["moved"]), r["notebook"]))
    for r in rows:
        for key in ("moved", "text", "failed"):
            r[key] = sorted(r[key])
    return rows


def format_report(rows) -> list[str]:
    lines = [f"{'notebook':<48} {'moved':>5} {'text':>4} {'failed':>6}  {'round-off':>9}  "
             "largest change of a result: cell, stored -> now"]
    for r in rows:
        worst = (f"{r['max_rel']:.1%}: cell {r['worst_cell']}, {r['reference']:g} -> {r['test']:g}"
                 if r["max_rel"] else "-")
        small = f"{r['round_off']:.1e}" if r["round_off"] else "-"
        lines.append(f"{r['notebook']:<48} {len(r['moved']):>5} {len(r['text']):>4} {len(r['failed']):>6}  "
                     f"{small:>9}  {worst}")
    return lines


def save(path, runs: dict, stored: str) -> dict:
    """Write the reports of several runs (``{label: folder}``) to ``path`` as JSON, with each run's provenance
    and a line saying where the stored outputs come from: the data behind the How to run page's table."""
    import json
    from pathlib import Path

    data = {"stored": stored, "runs": []}
    for label, folder in runs.items():
        run = json.loads((Path(folder) / "run.json").read_text())
        data["runs"].append({"label": label, **run, "notebooks": report(folder)})
    Path(path).write_text(json.dumps(data, indent=1) + "\n")
    return data


def markdown_table(data: dict) -> str:
    """The How to run page's table: per notebook, the cells that moved in each run and the largest changes
    (of a result, and of a round-off-sized value) in the last run; largest change first."""
    runs = data["runs"]
    last = {r["notebook"]: r for r in runs[-1]["notebooks"]}
    names = sorted({r["notebook"] for run in runs for r in run["notebooks"]},
                   key=lambda n: (-last.get(n, {}).get("max_rel", 0.0), n))
    head = ["notebook"] + [f"cells moved, {run['label']}" for run in runs] + [
        f"largest change of a result, {runs[-1]['label']}", f"largest round-off value, {runs[-1]['label']}"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name in names:
        cells = []
        for run in runs:
            row = next((r for r in run["notebooks"] if r["notebook"] == name), None)
            cells.append(f"{len(row['moved'])} ({len(row['text'])} in text)" if row and row["text"]
                         else str(len(row["moved"])) if row else "0")
        r = last.get(name)
        result = (f"{100 * r['max_rel']:.2g}% ({r['reference']:g} → {r['test']:g})" if r and r["max_rel"] else "—")
        small = f"{r['round_off']:.1e}" if r and r["round_off"] else "—"
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {result} | {small} |")
    return "\n".join(lines)


if __name__ == "__main__":
    import sys

    args = sys.argv[1:]
    if len(args) == 1:
        print("\n".join(format_report(report(args[0]))))
    elif len(args) >= 5 and args[0] == "--save" and len(args) % 2 == 1:
        # --save OUT.json "stored outputs: ..." LABEL FOLDER [LABEL FOLDER ...]
        print(markdown_table(save(args[1], dict(zip(args[3::2], args[4::2])), args[2])))
    else:
        sys.exit("usage: python -m tests.nbval_portable <report folder>\n"
                 "       python -m tests.nbval_portable --save OUT.json STORED LABEL FOLDER [LABEL FOLDER ...]")
