"""Graded labs: otter assign makes student versions without secrets; otter run grades without Docker; every
question has points, an answer cell and a row in its lab's intro; each question's tests pass the reference
solution and fail a blank answer and one that calls the library function it asks the student to write."""
import json
import os
import re
import zipfile
from pathlib import Path

import pandas as pd
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


@pytest.mark.site
def test_the_instructors_page_shows_the_sample_grades_as_a_table():
    page = (ROOT / "_build" / "html" / "book" / "instructors" / "grading.html").read_text()
    tables = re.findall(r"<table.*?</table>", page, re.S)
    shown = [t for t in tables if "a_solution.ipynb" in t]
    assert len(shown) == 1, "the sample grades are not rendered as a table"
    for submission in pd.read_csv(SAMPLE_GRADES)["submission"]:
        assert submission in shown[0]
    assert "{csv-table}" not in page


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


SAMPLE_GRADES = ROOT / "book" / "instructors" / "sample-grades.csv"


@pytest.mark.slow
def test_grading_scores_solutions_blanks_wrong_raising_looping_and_imported_answers(assigned, tmp_path):
    """Six real submissions of lab 0 through `otter run`; the scores are the table the instructors' chapter shows
    (book/instructors/sample-grades.csv: LLMLAB_UPDATE_SAMPLE_GRADES=1 rewrites it)."""
    r = assigned["00_course_loop"]
    subs = tmp_path / "subs"
    subs.mkdir()
    (subs / "a_solution.ipynb").write_text(r["solutions"].read_text())
    (subs / "b_blank.ipynb").write_text(r["student"].read_text())
    kv = "kv_bytes = memory.kv_cache_bytes(cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim, 512, 8, 16)"
    acc = ("def accuracy(rows):\n    exact = [r['correct'] for r in rows if r['correct'] is not None]\n"
           "    if not exact:\n        raise ValueError('none')\n    return sum(exact) / len(exact)")
    best = "best_chat_kind = scores['accuracy, chat'].astype(float).idxmax()"
    # passes every public test, fails the hidden ones: None counted as wrong, a wrong kind, a wrong size
    _submission(r["student"], {0: "kv_bytes = 1", 1: "def accuracy(rows):\n    return sum(bool(r['correct']) for r in rows) / len(rows)",
                               2: "best_chat_kind = 'add'"}, subs / "c_wrong.ipynb")
    _submission(r["student"], {0: kv, 1: "raise RuntimeError('student bug')", 2: best}, subs / "d_raises.ipynb")
    # a submission that never finishes (it waits rather than spins, leaving the CPU to the other test worker)
    _submission(r["student"], {0: kv, 1: acc + "\nimport time\nwhile True:\n    time.sleep(1)"},
                subs / "e_loops.ipynb")
    # right answers, but q2 hands the work to the llmlab function it asks for
    _submission(r["student"], {0: kv, 1: "def accuracy(rows):\n    return evaluate.accuracy(rows)['value']", 2: best},
                subs / "f_imports.ipynb")
    # two at a time: the looping one waits out its timeout beside the others, not after them
    df = grading.grade(r["autograder"], subs, timeout=45, out_csv=tmp_path / "grades.csv", jobs=2)
    assert (tmp_path / "grades.csv").exists()
    assert list(df.index) == ["a_solution.ipynb", "b_blank.ipynb", "c_wrong.ipynb", "d_raises.ipynb", "e_loops.ipynb",
                              "f_imports.ipynb"]
    full = sum(q["points"] for q in grading.questions(LAB0))
    assert full == 5 and df.loc["a_solution.ipynb", "total"] == pytest.approx(full), df.to_string()
    assert df.loc["b_blank.ipynb", "total"] == 0
    assert 0 < df.loc["c_wrong.ipynb", "total"] < full
    assert df.loc["d_raises.ipynb", "status"] == "graded"
    assert df.loc["d_raises.ipynb", "q1"] == 2 and df.loc["d_raises.ipynb", "q2"] == 0
    assert df.loc["d_raises.ipynb", "q3"] == 1
    assert df.loc["e_loops.ipynb", "status"].startswith("timed out") and df.loc["e_loops.ipynb", "total"] == 0
    assert df.loc["f_imports.ipynb", "status"] == "graded" and df.loc["f_imports.ipynb", "q2"] == 0
    assert df.loc["f_imports.ipynb", "q1"] == 2 and df.loc["f_imports.ipynb", "q3"] == 1
    if os.environ.get("LLMLAB_UPDATE_SAMPLE_GRADES"):
        df.to_csv(SAMPLE_GRADES)
    shown = pd.read_csv(SAMPLE_GRADES, index_col="submission")
    assert shown.equals(pd.read_csv(tmp_path / "grades.csv", index_col="submission")), \
        f"{SAMPLE_GRADES} is not what `make grade` gives now: rerun with LLMLAB_UPDATE_SAMPLE_GRADES=1"


def _questions_in_intro(master):
    """The rows of the master's "What you will be graded on" table: (question, points, graded)."""
    nb = json.loads(Path(master).read_text())
    intro = [grading._src(c) for c in nb["cells"] if c["cell_type"] == "markdown"
             and "## What you will be graded on" in grading._src(c)]
    assert len(intro) == 1, f"{master.name}: one 'What you will be graded on' section"
    rows = re.findall(r"^\| (q\w+) \| ([\d.]+) \| (automatically|by hand) \|", intro[0], re.M)
    return [(q, float(p), how == "by hand") for q, p, how in rows]


def test_every_question_has_points_an_answer_cell_and_a_row_in_the_intro(assigned):
    for m in MASTERS:
        qs = grading.questions(m)
        assert qs, m.name
        assert _questions_in_intro(m) == [(q["name"], float(q["points"]), q["manual"]) for q in qs], m.name
        prose = "".join(grading._src(c) for c in json.loads(m.read_text())["cells"] if c["cell_type"] == "markdown")
        assert not re.search(r"\b(\w+) (short )?questions are graded", prose), f"{m.name}: a count in prose drifts"
        # each question's text states its points, as the table does
        for q in qs:
            unit = "point" if q["points"] == 1 else "points"
            label = rf"\*\*Question {q['name'][1:]} \({'written, ' if q['manual'] else ''}{q['points']:g} {unit}\)\.\*\*"
            assert re.search(label, prose), f"{m.name}: no '{label}'"
        student = json.loads(assigned[m.stem]["student"].read_text())["cells"]
        checks = re.findall(r'grader\.check\("(\w+)"\)', "".join(grading._src(c) for c in student
                                                                   if c["cell_type"] == "code"))
        assert checks == [q["name"] for q in qs if not q["manual"]], m.name
        code_answers = [c for c in student if c["cell_type"] == "code" and "otter_answer_cell" in c["metadata"].get("tags", [])]
        assert len(code_answers) >= len(checks), f"{m.name}: an autograded question without an answer cell"
        # a written question has a markdown answer cell: blank, it reads as no answer
        assert [a["question"] for a in grading.written_answers(m, assigned[m.stem]["student"])] == \
            [q["name"] for q in qs if q["manual"]]
        assert all(a["answer"] == "" for a in grading.written_answers(m, assigned[m.stem]["student"]))


def test_written_answers_reach_the_instructors_export(assigned, tmp_path, monkeypatch):
    r = assigned["01_quantization"]
    nb = json.loads(r["student"].read_text())
    answers = iter(["The embeddings stay in fp32.", "One scale per tensor rounds most weights to zero."])
    inside = False
    for cell in nb["cells"]:
        inside = inside or "<!-- BEGIN QUESTION -->" in grading._src(cell)
        if inside and "otter_answer_cell" in cell["metadata"].get("tags", []) and cell["cell_type"] == "markdown":
            cell["source"] = next(answers)
            inside = False
    sub = tmp_path / "student_a.ipynb"
    sub.write_text(json.dumps(nb))
    got = grading.written_answers(MASTERS[1], sub)
    assert [(a["question"], a["points"], a["answer"]) for a in got] == [
        ("q3b", 1, "The embeddings stay in fp32."), ("q4b", 1, "One scale per tensor rounds most weights to zero.")]
    with pytest.raises(ValueError, match="written questions found"):
        grading.written_answers(LAB0, sub)

    # `make grade` writes them beside the scores, one row per submission and question (otter run stood in for:
    # the scores are not what this checks); a submission whose question cells were deleted is named, not fatal
    def fake_otter_run(cmd, **kwargs):
        (Path(cmd[cmd.index("-o") + 1]) / "results.json").write_text(json.dumps({"tests": [{"name": "q1", "score": 2}]}))
        return type("Done", (), {"stdout": "", "stderr": ""})()

    broken = {**nb, "cells": [c for c in nb["cells"] if "<!-- BEGIN QUESTION -->" not in grading._src(c)]}
    (tmp_path / "student_b.ipynb").write_text(json.dumps(broken))
    monkeypatch.setattr(grading.subprocess, "run", fake_otter_run)
    df = grading.grade(r["autograder"], tmp_path, out_csv=tmp_path / "grades" / "lab1.csv", master=MASTERS[1])
    assert list(df["q1"]) == [2, 2]
    written = pd.read_csv(tmp_path / "grades" / "lab1-written.csv", keep_default_na=False)
    assert list(written.columns) == ["submission", "question", "points", "answer", "score"]
    assert written.loc[written.submission == "student_a.ipynb", "answer"].tolist() == [a["answer"] for a in got]
    assert written.loc[written.submission == "student_b.ipynb", "answer"].str.startswith("not found").all()


# ---- every question's tests, in process: the reference solution, a blank answer, and an imported answer ----
PREAMBLE = """
import math
import numpy as np
import pandas as pd
import torch
from transformers import LlamaConfig
from llmlab import align, data, evaluate, grading, infer, lora, memory, quant, reasoning
"""


def _lab1_results(rows):
    return pd.DataFrame([{"variant": v, "weights MB": w, "estimate MB": e, "task accuracy": a} for v, w, e, a in rows]
                        ).set_index("variant")


def _track(step, rm, gold):
    return [{"step": step * i, "rm score": r, "gold reward": g} for i, (r, g) in enumerate(zip(rm, gold))]


def _chat_scores(accuracies):
    return pd.DataFrame({"accuracy, chat": accuracies}, index=["add", "color_qa", "compare"])


def _lab5_run(completions, answers, counts, n_samples=8):
    """What lab 5's answer cells read of its run: greedy completions and their verified answers, sample counts."""
    return {"sft_greedy": [{"completions": [c], "tokens": [12]} for c in completions],
            "sft_greedy_scored": [{"answers": [a]} for a in answers], "N_EVAL": len(completions),
            "N_SAMPLES": n_samples, "counts": counts, "pass_at": {k: {"value": 0.5} for k in range(1, n_samples + 1)}}


# the data the data-reading questions read, as each profile's run would produce it (rows the gpu profile skips:
# torch's dynamic int8 and the GGUF rows where llama.cpp is absent, as on Colab; rows it adds: torchao int4)
PROFILE_DATA = {
    "00_course_loop": {"cpu": {"scores": _chat_scores([0.2, 0.6, 0.4])},
                       "gpu": {"scores": _chat_scores([0.9, 0.3, 0.5])}},
    "01_quantization": {
        "cpu": {"results": _lab1_results([
            ("fp32", 13.9, 13.6, 0.66), ("int8, bitsandbytes", 6.2, 3.4, 0.64), ("nf4, bitsandbytes", 4.1, 1.7, 0.6),
            ("int2 per tensor, llmlab.quant", None, 0.85, 0.02), ("int8, torch dynamic", 5.1, 3.4, 0.65),
            ("Q2_K, llama.cpp", 2.0, 0.85, 0.5)])},
        "gpu": {"results": _lab1_results([
            ("fp32", 1450.0, 1448.0, 0.71), ("int8, bitsandbytes", 470.0, 362.0, 0.7),
            ("nf4, bitsandbytes", 300.0, 181.0, 0.69), ("int2 per tensor, llmlab.quant", None, 90.5, 0.0),
            ("int4 weight-only, torchao", 330.0, 181.0, 0.68)])},
    },
    "03_alignment": {"cpu": {"ppo_track": _track(5, [1.98, 2.01, 1.997, 1.95, 1.93], [0.68, 0.66, 0.55, 0.45, 0.40])},
                     "gpu": {"ppo_track": _track(10, [0.1, 0.5, 0.9, 1.2], [0.3, 0.35, 0.41, 0.44])}},
    "05_reasoning": {"cpu": _lab5_run(["7 plus 5 is 12.\nAnswer: 12", "Answer: 5 6 4", "Start with"], ["12", "564", None],
                                      [0, 3, 8]),
                     "gpu": _lab5_run(["9 minus 2 is 7.\nAnswer: 7.", "Answer: 1 0 4 6"], ["7", "1046"], [1, 8])},
}

# answers that call the library function the question asks the student to write
IMPORTED = {
    ("00_course_loop", "q2"): "def accuracy(rows):\n    return evaluate.accuracy(rows)['value']",
    ("01_quantization", "q1"): "def absmax_int8(x):\n    return quant.absmax_quantize(x, 8)",
    ("02_finetuning", "q1"): "def lora_trainable(config, r):\n    return lora.lora_parameters(config, r, ATTENTION)\n"
                             "llama3_lora_params = lora_trainable(llama3_8b, 16)",
    ("02_finetuning", "q2"): "def lora_forward(x, W, A, B, alpha):\n"
                             "    layer = lora.LoRALinear(torch.nn.Linear(W.shape[1], W.shape[0], bias=False), "
                             "r=A.shape[0], alpha=alpha)\n"
                             "    with torch.no_grad():\n        layer.base.weight.copy_(W)\n"
                             "        layer.lora_A.copy_(A)\n        layer.lora_B.copy_(B)\n    return layer(x)",
    ("03_alignment", "q1"): "def bt_loss(chosen, rejected):\n    return align.bradley_terry_loss(chosen, rejected)",
    ("03_alignment", "q2"): "def dpo_loss_by_hand(pc, pr, rc, rr, beta):\n"
                            "    return align.dpo_loss(*(torch.tensor(v) for v in (pc, pr, rc, rr)), beta=beta).loss.item()\n"
                            "dpo_by_hand = dpo_loss_by_hand(policy_chosen, policy_rejected, ref_chosen, ref_rejected, BETA)",
    ("04_inference_backends", "q1"): "def kv_cache_gb(n_layers, n_heads, n_kv_heads, head_dim, context, batch, bits):\n"
                                     "    return memory.kv_cache_bytes(n_layers, n_kv_heads, head_dim, context, batch, bits) / 1e9\n"
                                     "llama3_kv_gb = kv_cache_gb(32, 32, 8, 128, 8192, 4, 16)",
    ("04_inference_backends", "q2"): "def top_p(logits, p):\n    return infer.top_p_filter(logits, p)",
    ("04_inference_backends", "q3"): "def roofline_tokens_per_s(n_params, bytes_per_param, bandwidth_gb_s, batch):\n"
                                     "    return infer.roofline(n_params, bytes_per_param, bandwidth_gb_s, batch_size=batch)"
                                     "['tokens_per_s']\n"
                                     "t4_int4_tokens_per_s = roofline_tokens_per_s(8.03e9, 0.5, infer.GPU_BANDWIDTH_GB_S['T4'], 1)",
    ("05_reasoning", "q1"): "def extract_answer(completion):\n    return data.extract_final_answer(completion)",
    ("05_reasoning", "q2"): "def pass_at_k(n, c, k):\n    return reasoning.pass_at_k(n, c, k)",
    ("05_reasoning", "q3"): "def group_advantages(rewards, group_size):\n"
                            "    return reasoning.group_advantages(rewards, group_size)",
}

# the master's cells a question's code reads, found by what they define (cheap cells: configs and inputs)
CONTEXT_CELLS = {"00_course_loop": [], "01_quantization": [], "04_inference_backends": [], "05_reasoning": [],
                 "02_finetuning": ["llama3_8b = LlamaConfig(", "def llama3_estimate("],
                 "03_alignment": ["policy_chosen, policy_rejected = ["]}


def _answer_cells(master, student):
    """(question, solution source, blank source) for each autograded question, in order."""
    sources = [(q, grading._src(cell)) for cell, block, q in grading._walk(master)
               if cell["cell_type"] == "code" and block == "SOLUTION"]
    blanks = [grading._src(c) for c in json.loads(Path(student).read_text())["cells"]
              if c["cell_type"] == "code" and "otter_answer_cell" in c["metadata"].get("tags", [])]
    assert len(blanks) == len(sources), master
    return [(q, sol, blank) for (q, sol), blank in zip(sources, blanks)]


def _score(test_file, answer, context, data_):
    from otter.test_files import OKTestFile

    env = dict(data_)
    exec(PREAMBLE + context, env)
    exec(answer, env)  # a blank answer cell must run too: Run-all goes on past it
    tf = OKTestFile.from_file(str(test_file))
    tf.run(env)
    return tf.score, tf.possible, [r.message for r in tf.test_case_results if not r.passed]


def _profile_data(lab):
    """What the data-reading questions read, per profile: ``results``, ``scores``, ``ppo_track``."""
    base = {"results": {"qa": [{"correct": True}], "chat": [{"correct": False}]}}
    return {profile: {**base, **given} for profile, given in PROFILE_DATA.get(lab, {"cpu": {}}).items()}


@pytest.mark.parametrize("lab", [m.stem for m in MASTERS])
def test_every_question_passes_its_solution_and_fails_blank_and_imported_answers(lab, assigned, course_model, tmp_path):
    """Each autograded question's tests (public and hidden, from the autograder zip, scored as otter scores them)
    give full points to the reference solution and zero to a blank answer, on each profile's data; an answer
    that calls the function the question asks for scores zero, every failed case saying why."""
    r = assigned[lab]
    with zipfile.ZipFile(r["autograder"]) as z:
        z.extractall(tmp_path)
    master = ROOT / "labs" / f"{lab}.ipynb"
    cells = [grading._src(c) for c in json.loads(master.read_text())["cells"] if c["cell_type"] == "code"]
    context = "\n".join(next(c for c in cells if marker in c) for marker in CONTEXT_CELLS[lab])
    context += f"\ncfg = LlamaConfig(**{course_model[0].config.to_dict()!r})\n"
    answered_before = ""  # a question may read an earlier one's answer (lab 2: q3 reads q1's)
    for q, solution, blank in _answer_cells(master, r["student"]):
        test_file = tmp_path / "tests" / f"{q}.py"
        for profile, data_ in _profile_data(lab).items():
            score, possible, failed = _score(test_file, solution, context + answered_before, data_)
            assert score == possible > 0, (lab, q, profile, failed)
            score, _, failed = _score(test_file, blank, context + answered_before, data_)
            assert score == 0 and failed, (lab, q, profile)
            if (lab, q) in IMPORTED:
                score, _, failed = _score(test_file, IMPORTED[lab, q], context + answered_before, data_)
                assert score == 0, (lab, q)
                assert all(f"{q} is graded on your own code" in m for m in failed), (lab, q, failed)
        answered_before += "\n" + solution
    assert {q for lab_, q in IMPORTED if lab_ == lab} <= {q for q, *_ in _answer_cells(master, r["student"])}


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
    with pytest.raises(ValueError, match="jobs"):
        grading.grade(z, tmp_path, jobs=0)
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
    setup = next(grading._src(c) for c in json.loads(student.read_text())["cells"] if "LAB = " in grading._src(c))
    assert 'TESTS = f"tests/{LAB}"' in setup and "/content/llm-lab/labs/student/tests/" in setup
    monkeypatch.chdir(student.parent)
    grader = otter.Notebook(tests_dir="tests/00_course_loop")
    cfg = course_model[0].config
    right = {"kv_bytes": memory.kv_cache_bytes(cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim,
                                               512, 8, 16),
             "accuracy": lambda rows: sum(r["correct"] for r in rows) / len(rows),
             "best_chat_kind": "color_qa", "data": data, "cfg": cfg, "grading": grading}
    for q in ("q1", "q2", "q3"):
        assert grader.check(q, global_env=right).passed_all_public, q
    wrong = {**right, "kv_bytes": -1, "accuracy": lambda rows: 1.0, "best_chat_kind": "poem"}
    for q in ("q1", "q2", "q3"):
        assert not grader.check(q, global_env=wrong).passed_all_public, q


def test_answered_tells_otters_blanks_from_answers(capsys):
    def blank(x):
        ...

    def documented_blank(x):
        """What the student must write."""
        ...

    def written(x):
        return x

    assert not grading.answered(..., question="q1") and "q1: not answered yet" in capsys.readouterr().out
    assert not grading.answered(blank, 3, question="q2") and "q2: not answered yet" in capsys.readouterr().out
    assert not grading.answered(documented_blank)
    assert grading.answered(written, 0, None, "text", question="q3") and capsys.readouterr().out.count("q3") == 0
    with pytest.raises(ValueError, match="question"):
        grading.answered(1, question="")


def test_own_work_blocks_what_it_names_through_any_alias_and_restores_it():
    import torch
    from transformers import TopPLogitsWarper

    from llmlab import infer, lora
    from llmlab.infer import top_p_filter as alias

    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    before = infer.top_p_filter(logits, 0.5)
    with grading.own_work("q2", "llmlab.infer.top_p_filter", "transformers.TopPLogitsWarper", "llmlab.lora.LoRALinear"):
        for call in (lambda: infer.top_p_filter(logits, 0.5), lambda: alias(logits, 0.5),
                     lambda: infer.warp_logits(logits, top_p=0.5),  # another llmlab function that calls it
                     lambda: TopPLogitsWarper(0.5), lambda: lora.LoRALinear(torch.nn.Linear(4, 4), r=2, alpha=2)):
            with pytest.raises(NotImplementedError, match="q2 is graded on your own code"):
                call()
        assert infer.top_k_filter(logits, 2).isfinite().sum() == 2  # what it does not name still works
    assert torch.equal(alias(logits, 0.5), before) and torch.equal(TopPLogitsWarper(0.5)(None, logits), before)
    assert lora.LoRALinear(torch.nn.Linear(4, 4), r=2, alpha=2)(torch.ones(1, 4)).shape == (1, 4)
    with pytest.raises(RuntimeError):  # restored when the block raises, too
        with grading.own_work("q1", "llmlab.infer.top_p_filter"):
            raise RuntimeError
    assert torch.equal(infer.top_p_filter(logits, 0.5), before)
    for bad in [("",), ("q1",), ("q1", "top_p_filter"), ("q1", "llmlab.infer.nothing_here"),
                ("q1", "llmlab.infer.GPU_BANDWIDTH_GB_S")]:
        with pytest.raises(ValueError):
            with grading.own_work(*bad):
                pass


def test_questions_and_their_points():
    qs = grading.questions(ROOT / "labs" / "01_quantization.ipynb")
    assert [(q["name"], q["points"], q["manual"]) for q in qs] == [
        ("q1", 2, False), ("q2", 1, False), ("q3", 1, False), ("q3b", 1, True), ("q4", 1, False), ("q4b", 1, True)]
    with pytest.raises(ValueError):
        grading.questions(ROOT / "labs" / "missing.ipynb")
