"""Graded labs with otter-grader: master notebooks in, student notebooks and autograders out, scores back.

Chapter: For instructors. A lab in ``labs/`` is an otter master notebook (``# ASSIGNMENT CONFIG``, questions with
solutions, public and hidden tests). ``make assign`` runs ``assign`` on each master: student notebooks (with the
master's outputs on every cell that is not part of a question) under ``dist/student/``, autograder zips under
``dist/autograder/``, and a copy of the student files in ``labs/student/``, which the website and the Colab
buttons show. ``make grade`` runs ``grade``: ``otter run`` on every submission, no Docker, a time limit each,
one CSV row per submission, plus each written answer for grading by hand. ``secret_lines`` lists what must never
leave the master (solutions, hidden tests).

Inside the labs: ``answered`` lets Run-all reach the end of a blank student notebook ("q1: not answered yet"),
and the tests run the student's code inside ``own_work``, which makes the functions that would answer a question
(``llmlab.infer.top_p_filter`` for "write top-p") raise, so an answer that calls them scores nothing and says why.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import dis
import importlib
import inspect
import json
import re
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

STUDENT_DIR = "student"  # labs/student: the published student versions
_MARKER = re.compile(r"#\s*(BEGIN|END) SOLUTION( NO PROMPT)?\s*$")


def _blank_function(fn) -> bool:
    """A function whose body does nothing (``...``, ``pass``), as otter leaves a solution for students."""
    code = getattr(inspect.unwrap(fn), "__code__", None)
    if code is None:
        return False
    ops = [(i.opname, i.argval) for i in dis.get_instructions(code) if i.opname not in ("RESUME", "NOP", "CACHE")]
    return ops in ([("RETURN_CONST", None)], [("LOAD_CONST", None), ("RETURN_VALUE", None)])


def answered(*answers, question: str | None = None) -> bool:
    """False while any of ``answers`` is still otter's blank: ``...``, or a function whose body is only ``...``
    (then ``question: not answered yet`` is printed). The labs guard the cells that use an answer with it, so
    Run-all on a blank student notebook reaches the end."""
    if question is not None and (not isinstance(question, str) or not question.strip()):
        raise ValueError(f"question must be a question's name such as 'q1', got {question!r}")
    blank = any(a is Ellipsis or (inspect.isfunction(inspect.unwrap(a)) and _blank_function(a))
                for a in answers if callable(a) or a is Ellipsis)
    if blank:
        print(f"{question or 'this question'}: not answered yet")
    return not blank


def _resolve(name: str):
    """The object a dotted name such as ``llmlab.infer.top_p_filter`` names (its module imported)."""
    if not isinstance(name, str) or "." not in name:
        raise ValueError(f"name a function or class by its dotted path, such as 'llmlab.infer.top_p_filter', "
                         f"got {name!r}")
    parts = name.split(".")
    for i in range(len(parts) - 1, 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        try:
            for attr in parts[i:]:
                obj = getattr(obj, attr)
        except AttributeError:
            break
        return obj
    raise ValueError(f"{name!r} names nothing that can be imported")


def _raising_code(fn, message: str):
    """A code object that raises ``NotImplementedError(message)`` and fits ``fn`` (the same free variables, so
    it can replace ``fn.__code__``: every reference to ``fn``, aliases included, then raises)."""
    free = fn.__code__.co_freevars
    lines = ["def _outer():", *(f"    {v} = None" for v in free), "    def _blocked(*args, **kwargs):",
             f"        raise NotImplementedError({message!r})",
             *([f"        ({', '.join(free)},)"] if free else []), "    return _blocked"]
    namespace = {}
    exec("\n".join(lines), namespace)  # noqa: S102 (a fixed template: names from a code object, a repr'd message)
    return namespace["_outer"]().__code__


@contextlib.contextmanager
def own_work(question: str, *answers: str):
    """Run the student's code for ``question`` with the functions or classes named in ``answers`` (dotted paths:
    ``"llmlab.infer.top_p_filter"``, ``"transformers.TopPLogitsWarper"``) raising ``NotImplementedError`` with a
    message that says why. The labs' tests call the student's functions inside it: an answer that hands the
    work to the library it imitates fails every test of that question. Everything is restored on exit."""
    if not isinstance(question, str) or not question.strip():
        raise ValueError(f"question must be a question's name such as 'q1', got {question!r}")
    if not answers:
        raise ValueError("name at least one function or class that would answer the question")
    undo = []
    try:
        for name in answers:
            obj = _resolve(name)
            message = (f"{question} is graded on your own code, and it called {name}, which does the work for you: "
                       f"write it without {name.split('.')[-1]} (or anything that calls it).")
            if inspect.isclass(obj):
                def blocked(*args, _message=message, **kwargs):
                    raise NotImplementedError(_message)
                for attr in ("__init__", "__call__", "forward"):
                    if getattr(obj, attr, None) in (None, getattr(object, attr, None)):
                        continue
                    own = attr in vars(obj)
                    undo.append((setattr, obj, attr, vars(obj)[attr]) if own else (delattr, obj, attr))
                    setattr(obj, attr, blocked)
            elif callable(obj) and hasattr(inspect.unwrap(obj), "__code__"):
                fn = inspect.unwrap(obj)
                undo.append((setattr, fn, "__code__", fn.__code__))
                fn.__code__ = _raising_code(fn, message)
            else:
                raise ValueError(f"{name!r} is not a Python function or class, so own_work cannot block it")
        yield
    finally:
        for action, *args in reversed(undo):
            action(*args)


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


def _walk(master):
    """Each cell of a master that is not one of otter's delimiters, as ``(cell, block, question)``: ``block`` the
    innermost open block (``"QUESTION"``, ``"SOLUTION"``, ``"TESTS"``, ``"PROMPT"``, or ``None`` outside them) and
    ``question`` the open question's name (or ``None``)."""
    import yaml

    blocks, question = [], None
    for cell in _read(master)["cells"]:
        kind = _raw_kind(cell)
        if kind is None:
            yield cell, (blocks[-1] if blocks else None), question
            continue
        verb, what = kind.split()
        blocks = blocks + [what] if verb == "BEGIN" else blocks[:-1]
        if kind == "BEGIN QUESTION":
            question = str((yaml.safe_load(_src(cell).split("\n", 1)[1]) or {}).get("name"))
        elif kind == "END QUESTION":
            question = None


def questions(master) -> list[dict]:
    """Each question of a master in order: ``{"name", "points", "manual"}`` from its ``# BEGIN QUESTION`` cell
    (``manual: true``: a written answer, graded by hand). Raises if a question has no points."""
    import yaml

    found = []
    for cell in _read(master)["cells"]:
        if _raw_kind(cell) == "BEGIN QUESTION":
            cfg = yaml.safe_load(_src(cell).split("\n", 1)[1]) or {}
            if not isinstance(cfg.get("points"), (int, float)) or cfg["points"] <= 0:
                raise ValueError(f"{master}: question {cfg.get('name')!r} has no positive points")
            found.append({"name": str(cfg["name"]), "points": cfg["points"], "manual": bool(cfg.get("manual"))})
    return found


def written_answers(master, submission) -> list[dict]:
    """The written (manual) answers of a submitted student notebook: one ``{"question", "points", "answer"}``
    per manual question of ``master``, in order. Otter marks each manual question of a student notebook with
    ``<!-- BEGIN QUESTION -->``; the answer is the markdown answer cell inside it (otter's placeholder text
    counts as no answer)."""
    manual = [q for q in questions(master) if q["manual"]]
    if Path(submission).suffix != ".ipynb":
        raise ValueError(f"expected a submitted .ipynb, got {str(submission)!r}")
    nb = json.loads(Path(submission).read_text())
    blocks, inside = [], None
    for cell in nb["cells"]:
        text = _src(cell)
        if cell["cell_type"] == "markdown" and "<!-- BEGIN QUESTION -->" in text:
            inside = []
        elif cell["cell_type"] == "markdown" and "<!-- END QUESTION -->" in text and inside is not None:
            blocks.append(inside)
            inside = None
        elif inside is not None and "otter_answer_cell" in cell.get("metadata", {}).get("tags", []):
            inside.append(text.strip())
    if len(blocks) != len(manual):
        raise ValueError(f"{submission}: {len(blocks)} written questions found, the lab has {len(manual)}")
    placeholder = "_Type your answer here, replacing this text._"
    return [{"question": q["name"], "points": q["points"],
             "answer": "\n\n".join(a for a in block if a and a != placeholder)} for q, block in zip(manual, blocks)]


def secret_lines(master, min_len: int = 8) -> list[str]:
    """Code lines that only the master may hold: solution lines and hidden-test lines, stripped. Left out: the
    markers, lines shorter than ``min_len`` (``pass``, ``try:``: too generic to prove a leak), and lines that
    also stand outside every solution and hidden test of the master (those are not secret)."""
    secrets, public = [], set()
    for cell, block, _ in _walk(master):
        if cell["cell_type"] == "markdown" and block == "SOLUTION":  # a written answer's model
            secrets += _src(cell).splitlines()
            continue
        if cell["cell_type"] != "code" or block in (None, "QUESTION"):
            public.update(l.strip() for l in _src(cell).splitlines())
            continue
        lines = _src(cell).splitlines()
        if block == "SOLUTION":
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
        elif block == "TESTS" and (lines and lines[0].strip() == "# HIDDEN" or "hidden: true" in _src(cell)):
            secrets += [l for l in lines if "HIDDEN" not in l and "TEST CONFIG" not in l]
        elif block == "TESTS":
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
    a question (answer cells, ``grader.check`` cells) keep no output, so no answer shows on the website; they,
    and the cells that print an answer (``grading.answered``), are tagged ``nbval-ignore-output``."""
    out = copy.deepcopy(student_nb)
    executed = {}
    for cell in master_nb["cells"]:
        if cell["cell_type"] == "code":
            executed.setdefault(_src(cell), cell)
    answers = 0
    for cell in out["cells"]:
        if "otter_answer_cell" in cell.get("metadata", {}).get("tags", []):  # otter gives written answer cells
            answers += 1                                                      # random ids: make them stable
            cell["id"] = f"answer-{answers}"
        if cell["cell_type"] != "code":
            continue
        src = _src(cell)
        tags = cell.get("metadata", {}).get("tags", [])
        if src.startswith("grader.check"):  # otter gives these cells random ids: make them stable
            cell["id"] = "check-" + re.sub(r"\W", "", src.split("(", 1)[1])
        in_question = "otter_answer_cell" in tags or src.startswith("grader.check")
        if in_question or "grading.answered(" in src:
            # what these print depends on the student's answers: nbval, which runs the blank student notebook
            # top to bottom, checks that they run, not what they print
            cell.setdefault("metadata", {})["tags"] = sorted(set(tags) | {"nbval-ignore-output"})
        if in_question or src not in executed:
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


def _grade_one(sub: Path, autograder: Path, timeout: float) -> dict:
    """One submission through ``otter run``: its score per test, and a status."""
    row = {"submission": sub.name}
    with tempfile.TemporaryDirectory() as tmp:
        try:
            # in its own folder: otter writes its log and scratch files to the working directory
            res = subprocess.run([sys.executable, "-m", "otter", "run", "--no-logo", "-a", str(autograder.resolve()),
                                  "-o", tmp, str(sub.resolve())], capture_output=True, text=True, timeout=timeout,
                                 cwd=tmp)
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
    return row


def grade(autograder, submissions, timeout: float = 600, out_csv=None, master=None, jobs: int = 1):
    """Grade every ``.ipynb`` or otter ``.zip`` in ``submissions`` with ``otter run`` (no Docker), each within
    ``timeout`` seconds, ``jobs`` at a time. Returns a DataFrame, one row per submission: a score per autograded
    question, total, status. With ``master`` and ``out_csv``, the written answers of every ``.ipynb`` submission go
    to ``<out_csv stem>-written.csv`` (submission, question, points, answer, and an empty score to fill in)."""
    import pandas as pd

    autograder, submissions = Path(autograder), Path(submissions)
    if not autograder.is_file() or autograder.suffix != ".zip":
        raise ValueError(f"autograder must be an existing .zip, got {str(autograder)!r}")
    if not submissions.is_dir():
        raise ValueError(f"submissions must be a folder, got {str(submissions)!r}")
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0:
        raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise ValueError(f"jobs must be a positive int, got {jobs!r}")
    files = sorted(p for p in submissions.iterdir() if p.suffix in (".ipynb", ".zip"))
    if not files:
        raise ValueError(f"no .ipynb or .zip submissions in {submissions}")
    with ThreadPoolExecutor(jobs) as pool:  # each job waits on its own otter process
        rows = list(pool.map(lambda sub: _grade_one(sub, autograder, timeout), files))
    df = pd.DataFrame(rows).set_index("submission")
    scored = [c for c in df.columns if c != "status"]
    df[scored] = df[scored].fillna(0.0)
    df.insert(len(scored), "total", df[scored].sum(axis=1))
    if out_csv is not None:
        Path(out_csv).parent.mkdir(parents=True, exist_ok=True)
        df.to_csv(out_csv)
        if master is not None and any(q["manual"] for q in questions(master)):
            written = []
            for sub in (f for f in files if f.suffix == ".ipynb"):
                try:
                    written += [{"submission": sub.name, **a, "score": ""} for a in written_answers(master, sub)]
                except ValueError as e:  # cells deleted or moved: say so, and grade the others
                    written.append({"submission": sub.name, "question": "?", "points": "", "answer": f"not found: {e}",
                                    "score": ""})
            pd.DataFrame(written).to_csv(Path(out_csv).with_name(Path(out_csv).stem + "-written.csv"), index=False)
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
    g.add_argument("--jobs", type=int, default=1, help="submissions graded at the same time")
    g.add_argument("--labs", default="labs", help="where the masters are (for the written questions)")
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
    master = Path(args.labs) / f"{args.lab}.ipynb"
    df = grade(zip_path, args.submissions, args.timeout, out_csv, master=master if master.exists() else None,
               jobs=args.jobs)
    print(df.to_string())
    print(f"scores: {out_csv}")
    if master.exists() and any(q["manual"] for q in questions(master)):
        print(f"written answers, to grade by hand: {out_csv.with_name(out_csv.stem + '-written.csv')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
