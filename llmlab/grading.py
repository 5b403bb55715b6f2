"""Graded labs with otter-grader: master notebooks in, student notebooks and autograders out, scores back.

Chapter: For instructors. A lab in ``labs/`` is an otter master notebook (``# ASSIGNMENT CONFIG``, questions with
solutions, public and hidden tests). ``make assign`` runs ``assign`` on each master: student notebooks (with the
master's outputs on every cell that is not part of a question) under ``dist/student/``, autograder zips under
``dist/autograder/``, and a copy of the student files in ``labs/student/``, which the website and the Colab
buttons show. ``make grade`` runs ``grade``: ``otter run`` on every submission, no Docker, a time limit each,
one CSV row per submission. ``secret_lines`` lists what must never leave the master (solutions, hidden tests).
"""
from __future__ import annotations

import argparse
import copy
import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

STUDENT_DIR = "student"  # labs/student: the published student versions
_MARKER = re.compile(r"#\s*(BEGIN|END) SOLUTION( NO PROMPT)?\s*$")


def _read(path):
    path = Path(path)
    if path.suffix != ".ipynb" or not path.is_file():
        raise ValueError(f"expected an existing .ipynb file, got {str(path)!r}")
    return json.loads(path.read_text())


def _src(cell) -> str:
    return "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]


def _raw_kind(cell) -> str | None:
    """'BEGIN SOLUTION', 'END TESTS', ... for otter's raw delimiter cells, else None."""
    if cell["cell_type"] != "raw":
        return None
    first = _src(cell).strip().splitlines()[0] if _src(cell).strip() else ""
    m = re.fullmatch(r"#\s*((?:BEGIN|END) (?:QUESTION|SOLUTION|TESTS|PROMPT))", first.strip())
    return m.group(1) if m else None


def lab_name(master) -> str:
    """The assignment name in a master's ``# ASSIGNMENT CONFIG`` cell."""
    import yaml

    nb = _read(master)
    for cell in nb["cells"]:
        if cell["cell_type"] == "raw" and _src(cell).lstrip().startswith("# ASSIGNMENT CONFIG"):
            return yaml.safe_load(_src(cell))["name"]
    raise ValueError(f"{master} is not an otter master notebook (no '# ASSIGNMENT CONFIG' raw cell)")


def secret_lines(master, min_len: int = 8) -> list[str]:
    """Code lines that only the master may hold: solution lines and hidden-test lines, stripped. Left out: the
    markers, lines shorter than ``min_len`` (``pass``, ``try:``: too generic to prove a leak), and lines that
    also stand outside every solution and hidden test of the master (those are not secret)."""
    nb = _read(master)
    secrets, public, block = [], set(), []
    for cell in nb["cells"]:
        kind = _raw_kind(cell)
        if kind:
            verb, what = kind.split()
            block = block + [what] if verb == "BEGIN" else block[:-1]
            continue
        if cell["cell_type"] != "code" or not block or block[-1] == "QUESTION":
            public.update(l.strip() for l in _src(cell).splitlines())
            continue
        lines = _src(cell).splitlines()
        if block[-1] == "SOLUTION":
            inside, marked = False, []
            for line in lines:
                if re.search(r"#\s*BEGIN SOLUTION", line):
                    inside = True
                elif re.search(r"#\s*END SOLUTION", line):
                    inside = False
                elif inside or line.rstrip().endswith("# SOLUTION"):
                    marked.append(line.replace("# SOLUTION", ""))
            has_markers = any("SOLUTION" in l for l in lines)
            secrets += marked if has_markers else lines
        elif block[-1] == "TESTS" and (lines and lines[0].strip() == "# HIDDEN" or "hidden: true" in _src(cell)):
            secrets += [l for l in lines if "HIDDEN" not in l and "TEST CONFIG" not in l]
        elif block[-1] == "TESTS":
            public.update(l.strip() for l in lines)
    return sorted({s.strip() for s in secrets
                   if len(s.strip()) >= min_len and not _MARKER.search(s) and s.strip() not in public})


def leaks(master, paths) -> list[tuple[str, str]]:
    """``(path, line)`` for every secret line of ``master`` found in the text of ``paths`` (files or folders;
    HTML is read as the text a browser shows, so highlighted code counts)."""
    import html as html_lib

    secrets = secret_lines(master)
    found = []
    for root in map(Path, paths):
        files = [root] if root.is_file() else [p for p in root.rglob("*") if p.is_file()]
        for f in files:
            if f.suffix not in (".ipynb", ".py", ".html", ".txt", ".md", ".json", ".js"):
                continue
            text = f.read_text(errors="replace")
            if f.suffix == ".html":
                text = html_lib.unescape(re.sub(r"<[^>]+>", "", text))
            if f.suffix == ".ipynb":
                text = "\n".join(_src(c) for c in json.loads(text)["cells"]) + json.dumps(json.loads(text))
            found += [(str(f), s) for s in secrets if s in text]
    return found


def _transplant_outputs(master_nb: dict, student_nb: dict) -> dict:
    """Copy the executed master's outputs onto the student cells whose code is unchanged. Cells that belong to
    a question (answer cells, ``grader.check`` cells) keep no output, so no answer shows on the website."""
    out = copy.deepcopy(student_nb)
    executed = {}
    for cell in master_nb["cells"]:
        if cell["cell_type"] == "code":
            executed.setdefault(_src(cell), cell)
    for cell in out["cells"]:
        if cell["cell_type"] != "code":
            continue
        src = _src(cell)
        tags = cell.get("metadata", {}).get("tags", [])
        if src.startswith("grader.check"):  # otter gives these cells random ids: make them stable
            cell["id"] = "check-" + re.sub(r"\W", "", src.split("(", 1)[1])
        if "otter_answer_cell" in tags or src.startswith("grader.check") or src not in executed:
            cell["outputs"], cell["execution_count"] = [], None
        else:
            cell["outputs"] = copy.deepcopy(executed[src].get("outputs", []))
            cell["execution_count"] = executed[src].get("execution_count")
    return out


def assign(master, dist="dist", publish_to=None) -> dict:
    """``otter assign`` one master into ``dist``:

    - ``dist/student/<lab>.ipynb`` and ``dist/student/tests/<lab>/``: the student notebook, with the master's
      outputs on every cell outside a question, and its public tests (what students get);
    - ``dist/autograder/<lab>-autograder.zip`` and ``dist/autograder/<lab>.ipynb``: the tests, hidden ones
      included, and the solutions (what graders get).

    With ``publish_to`` (``labs/student``) the student files are copied there too, for the website and Colab.
    Raises if any solution or hidden-test line reaches a student file."""
    master = Path(master)
    name = lab_name(master)
    dist = Path(dist)
    student, autograder = dist / "student", dist / "autograder"
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out"
        # --no-run-tests: nbval already runs every master, its test cells included
        res = subprocess.run([sys.executable, "-m", "otter", "assign", "--no-run-tests", str(master.resolve()),
                              str(out)], capture_output=True, text=True)
        if res.returncode != 0:
            raise RuntimeError(f"otter assign failed for {master}:\n{res.stdout[-2000:]}\n{res.stderr[-2000:]}")
        zips = list((out / "autograder").glob("*-autograder_*.zip"))
        if len(zips) != 1:
            raise RuntimeError(f"expected one autograder zip from otter assign, found {zips}")
        autograder.mkdir(parents=True, exist_ok=True)
        shutil.copy(zips[0], autograder / f"{name}-autograder.zip")
        shutil.copy(out / "autograder" / master.name, autograder / master.name)
        student_nb = _transplant_outputs(json.loads(master.read_text()),
                                         json.loads((out / "student" / master.name).read_text()))
        targets = [student] + ([Path(publish_to)] if publish_to is not None else [])
        for target in targets:
            target.mkdir(parents=True, exist_ok=True)
            (target / master.name).write_text(json.dumps(student_nb, indent=1, ensure_ascii=False) + "\n")
            shutil.rmtree(target / "tests" / name, ignore_errors=True)
            shutil.copytree(out / "student" / "tests", target / "tests" / name)
    student_files = [f for t in targets for f in (t / master.name, t / "tests" / name)]
    leaked = leaks(master, student_files)
    if leaked:
        raise RuntimeError(f"solution or hidden-test lines reached student files: {leaked[:5]}")
    return {"name": name, "student": student / master.name, "autograder": autograder / f"{name}-autograder.zip",
            "solutions": autograder / master.name,
            "published": Path(publish_to) / master.name if publish_to is not None else None}


def grade(autograder, submissions, timeout: float = 600, out_csv=None):
    """Grade every ``.ipynb`` or otter ``.zip`` in ``submissions`` with ``otter run`` (no Docker), each within
    ``timeout`` seconds. Returns a DataFrame, one row per submission: a score per question, total, status."""
    import pandas as pd

    autograder, submissions = Path(autograder), Path(submissions)
    if not autograder.is_file() or autograder.suffix != ".zip":
        raise ValueError(f"autograder must be an existing .zip, got {str(autograder)!r}")
    if not submissions.is_dir():
        raise ValueError(f"submissions must be a folder, got {str(submissions)!r}")
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0:
        raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
    files = sorted(p for p in submissions.iterdir() if p.suffix in (".ipynb", ".zip"))
    if not files:
        raise ValueError(f"no .ipynb or .zip submissions in {submissions}")
    rows = []
    for sub in files:
        row = {"submission": sub.name}
        with tempfile.TemporaryDirectory() as tmp:
            try:
                res = subprocess.run([sys.executable, "-m", "otter", "run", "--no-logo", "-a", str(autograder),
                                      "-o", tmp, str(sub)], capture_output=True, text=True, timeout=timeout)
                results = Path(tmp) / "results.json"
                if results.exists():
                    for t in json.loads(results.read_text())["tests"]:
                        if "score" in t:
                            row[t["name"]] = t["score"]
                    row["status"] = "graded"
                else:
                    row["status"] = f"error: {(res.stderr or res.stdout).strip().splitlines()[-1:]}"
            except subprocess.TimeoutExpired:
                row["status"] = f"timed out after {timeout:g} s"
        rows.append(row)
    df = pd.DataFrame(rows).set_index("submission")
    questions = [c for c in df.columns if c != "status"]
    df[questions] = df[questions].fillna(0.0)
    df.insert(len(questions), "total", df[questions].sum(axis=1))
    if out_csv is not None:
        Path(out_csv).parent.mkdir(parents=True, exist_ok=True)
        df.to_csv(out_csv)
    return df


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m llmlab.grading", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("assign", help="student notebooks and autograder zips for every master in a folder")
    a.add_argument("--labs", default="labs")
    a.add_argument("--dist", default="dist")
    g = sub.add_parser("grade", help="grade a folder of submissions for one lab")
    g.add_argument("lab", help="the lab's notebook name, e.g. 00_course_loop")
    g.add_argument("submissions")
    g.add_argument("--dist", default="dist")
    g.add_argument("--timeout", type=float, default=600)
    args = ap.parse_args(argv)
    if args.cmd == "assign":
        masters = sorted(Path(args.labs).glob("*.ipynb"))
        for m in masters:
            r = assign(m, args.dist, publish_to=Path(args.labs) / STUDENT_DIR)
            print(f"{m}: student {r['published']}, autograder {r['autograder']}")
        return 0
    zip_path = Path(args.dist) / "autograder" / f"{args.lab}-autograder.zip"
    if not zip_path.exists():
        print(f"no autograder at {zip_path}: run `make assign` first", file=sys.stderr)
        return 2
    out_csv = Path(args.dist) / "grades" / f"{args.lab}.csv"
    df = grade(zip_path, args.submissions, args.timeout, out_csv)
    print(df.to_string())
    print(f"written: {out_csv}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
