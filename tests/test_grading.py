"""Graded labs: otter assign makes student versions without secrets; otter run grades without Docker."""
import copy
import json
from pathlib import Path

import pytest

from llmlab import grading

ROOT = Path(__file__).resolve().parent.parent
MASTERS = sorted((ROOT / "labs").glob("*.ipynb"))
LAB0 = ROOT / "labs" / "00_course_loop.ipynb"


@pytest.fixture(scope="module")
def assigned(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("assign")
    return {m.stem: grading.assign(m, tmp / "dist", publish_to=tmp / "published") for m in MASTERS}


def test_masters_are_otter_masters_named_after_their_file():
    assert MASTERS
    for m in MASTERS:
        assert grading.lab_name(m) == m.stem
        assert grading.secret_lines(m), f"{m.name} has no solution or hidden test"


def test_student_versions_hold_no_secret(assigned):
    for name, r in assigned.items():
        master = ROOT / "labs" / f"{name}.ipynb"
        assert grading.leaks(master, [r["student"].parent, r["published"].parent]) == []
        # the detector finds what it looks for: the solution notebook holds every solution line
        assert len(grading.leaks(master, [r["solutions"]])) > 0


def test_committed_student_versions_are_up_to_date(assigned):
    """labs/student (what the site and Colab show) is exactly what `make assign` makes from the masters."""
    def view(path):
        return [(c["cell_type"], "".join(c["source"]), json.dumps(c.get("outputs", []), sort_keys=True))
                for c in json.loads(Path(path).read_text())["cells"]]

    for name, r in assigned.items():
        committed = ROOT / "labs" / "student" / f"{name}.ipynb"
        assert committed.exists(), f"run `make assign` to publish {committed}"
        assert view(committed) == view(r["published"]), f"{committed} is stale: run `make assign`"
        for test in (r["published"].parent / "tests" / name).glob("*.py"):
            assert (ROOT / "labs" / "student" / "tests" / name / test.name).read_text() == test.read_text()


@pytest.mark.site
def test_the_site_holds_no_secret():
    site = ROOT / "_build" / "html"
    assert site.exists(), "run make book"
    for m in MASTERS:
        assert grading.leaks(m, [site]) == []


def _submission(student_nb: Path, answers: dict, out: Path):
    """Fill a student notebook's answer cells (in order) with the given sources."""
    nb = json.loads(student_nb.read_text())
    i = 0
    for cell in nb["cells"]:
        if "otter_answer_cell" in cell["metadata"].get("tags", []):
            if i in answers:
                cell["source"] = answers[i]
            i += 1
    out.write_text(json.dumps(nb))


@pytest.mark.slow
def test_grading_scores_solutions_blanks_wrong_raising_and_looping(assigned, tmp_path):
    r = assigned["00_course_loop"]
    subs = tmp_path / "subs"
    subs.mkdir()
    (subs / "a_solution.ipynb").write_text(r["solutions"].read_text())
    (subs / "b_blank.ipynb").write_text(r["student"].read_text())
    kv = "kv_bytes = memory.kv_cache_bytes(cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim, 512, 8, 16)"
    acc = ("def accuracy(rows):\n    exact = [r['correct'] for r in rows if r['correct'] is not None]\n"
           "    if not exact:\n        raise ValueError('none')\n    return sum(exact) / len(exact)")
    # passes every public test, fails the hidden ones: None counted as wrong, a wrong kind, a wrong size
    _submission(r["student"], {0: "kv_bytes = 1", 1: "def accuracy(rows):\n    return sum(bool(r['correct']) for r in rows) / len(rows)",
                               2: "best_chat_kind = 'add'"}, subs / "c_wrong.ipynb")
    _submission(r["student"], {0: kv, 1: "raise RuntimeError('student bug')", 2: "best_chat_kind = scores['accuracy, chat'].astype(float).idxmax()"},
                subs / "d_raises.ipynb")
    _submission(r["student"], {0: kv, 1: acc + "\nwhile True:\n    pass"}, subs / "e_loops.ipynb")
    df = grading.grade(r["autograder"], subs, timeout=45, out_csv=tmp_path / "grades.csv")
    assert (tmp_path / "grades.csv").exists()
    assert list(df.index) == ["a_solution.ipynb", "b_blank.ipynb", "c_wrong.ipynb", "d_raises.ipynb", "e_loops.ipynb"]
    full = 5.0
    assert df.loc["a_solution.ipynb", "total"] == pytest.approx(full)
    assert df.loc["b_blank.ipynb", "total"] == 0
    assert 0 < df.loc["c_wrong.ipynb", "total"] < full
    assert df.loc["d_raises.ipynb", "status"] == "graded"
    assert df.loc["d_raises.ipynb", "q1"] == 2 and df.loc["d_raises.ipynb", "q2"] == 0
    assert df.loc["d_raises.ipynb", "q3"] == 1
    assert df.loc["e_loops.ipynb", "status"].startswith("timed out") and df.loc["e_loops.ipynb", "total"] == 0


def test_bad_inputs(tmp_path):
    with pytest.raises(ValueError):
        grading.lab_name(tmp_path / "missing.ipynb")
    plain = tmp_path / "plain.ipynb"
    plain.write_text(json.dumps({"cells": [], "metadata": {}, "nbformat": 4, "nbformat_minor": 5}))
    with pytest.raises(ValueError, match="not an otter master"):
        grading.lab_name(plain)
    with pytest.raises(ValueError):
        grading.grade(tmp_path / "missing.zip", tmp_path)
    z = tmp_path / "a.zip"
    z.write_bytes(b"")
    with pytest.raises(ValueError):
        grading.grade(z, tmp_path / "nope")
    with pytest.raises(ValueError):
        grading.grade(z, tmp_path, timeout=0)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="no .ipynb"):
        grading.grade(z, empty)


def test_public_checks_run_from_the_published_student_notebook(monkeypatch, course_model):
    """The student notebook's `grader.check` finds its public tests beside it (labs/student/tests/<lab>), and
    they pass right answers and fail wrong ones."""
    import otter

    from llmlab import data, memory

    student = ROOT / "labs" / "student" / "00_course_loop.ipynb"
    setup = "".join(json.loads(student.read_text())["cells"][1]["source"])
    assert 'TESTS = f"tests/{LAB}"' in setup and "/content/llm-lab/labs/student/tests/" in setup
    monkeypatch.chdir(student.parent)
    grader = otter.Notebook(tests_dir="tests/00_course_loop")
    cfg = course_model[0].config
    right = {"kv_bytes": memory.kv_cache_bytes(cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim,
                                               512, 8, 16),
             "accuracy": lambda rows: sum(r["correct"] for r in rows) / len(rows),
             "best_chat_kind": "color_qa", "data": data, "cfg": cfg}
    for q in ("q1", "q2", "q3"):
        assert grader.check(q, global_env=right).passed_all_public, q
    wrong = {**right, "kv_bytes": -1, "accuracy": lambda rows: 1.0, "best_chat_kind": "poem"}
    for q in ("q1", "q2", "q3"):
        assert not grader.check(q, global_env=wrong).passed_all_public, q
