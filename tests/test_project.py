"""The project's promises: pinned versions agree, README's two commands, notebooks stored executed, Colab."""
import json
import re
import subprocess
import tomllib
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent


def _pins(lines):
    return dict(l.strip().split("==", 1) for l in lines if "==" in l and not l.strip().startswith("#"))


def test_environment_yml_agrees_with_constraints():
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    conda_pins = _pins([p for p in pip if not p.startswith("-e")])
    lock = _pins((ROOT / "constraints.txt").read_text().splitlines())
    assert conda_pins, "environment.yml pins nothing"
    for pkg, ver in conda_pins.items():
        assert lock.get(pkg) == ver, f"{pkg}: environment.yml {ver} vs constraints.txt {lock.get(pkg)}"
    py = next(d for d in env["dependencies"] if isinstance(d, str) and d.startswith("python="))
    assert py == "python=3.11"


def test_pyproject_requirements_are_satisfied_by_the_lock():
    from packaging.requirements import Requirement

    proj = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    lock = {k.lower().replace("_", "-"): v for k, v in _pins((ROOT / "constraints.txt").read_text().splitlines()).items()}
    reqs = proj["dependencies"] + [r for extra in proj["optional-dependencies"].values() for r in extra]
    for r in map(Requirement, reqs):
        name = r.name.lower().replace("_", "-")
        assert name in lock, f"{name} is not pinned in constraints.txt"
        assert r.specifier.contains(lock[name], prereleases=True), f"{r} excludes the pinned {lock[name]}"


def test_readme_states_two_commands_and_ci_runs_make_test():
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"## Two commands\s+```bash\n(.*?)```", readme, re.S).group(1)
    assert [l.split("#")[0].strip() for l in block.strip().splitlines()] == ["make book", "make test"]
    assert "make test" in (ROOT / ".ci" / "run").read_text()
    targets = re.findall(r"^([a-z]+):", (ROOT / "Makefile").read_text(), re.M)
    for t in ("book", "test", "execute", "canary"):
        assert t in targets


def _notebooks():
    """What nbval must run: the chapters and the labs' student versions (labs/student, made from the masters by
    `make assign`: nbval runs each blank student notebook top to bottom)."""
    chapters = [p.relative_to(ROOT).as_posix() for p in (ROOT / "book").rglob("*.ipynb")
                if ".ipynb_checkpoints" not in p.parts]
    return sorted(chapters + [p.relative_to(ROOT).as_posix() for p in (ROOT / "labs" / "student").glob("*.ipynb")])


def _executed():
    """What `make execute` runs and stores: the chapters and the lab masters."""
    return sorted([nb for nb in _notebooks() if not nb.startswith("labs/")]
                  + [p.relative_to(ROOT).as_posix() for p in (ROOT / "labs").glob("*.ipynb")])


def test_nbval_collects_every_notebook_on_disk(collected_notebooks, request):
    if not request.config.getoption("--nbval", default=False) and not request.config.getoption(
            "--nbval-lax", default=False):
        pytest.skip("run with --nbval (make test) to compare the collected notebooks with those on disk")
    assert sorted(collected_notebooks) == _notebooks()


def test_every_lab_master_has_its_student_version():
    masters = sorted(p.name for p in (ROOT / "labs").glob("*.ipynb"))
    assert masters and masters == sorted(p.name for p in (ROOT / "labs" / "student").glob("*.ipynb"))


def test_every_notebook_is_in_the_toc_and_stored_executed():
    toc = re.findall(r"file:\s*(\S+)", (ROOT / "_toc.yml").read_text())
    for nb in _notebooks():
        assert nb[: -len(".ipynb")] in toc, f"{nb} is not in _toc.yml"
    for nb in _executed():
        page = nb[: -len(".ipynb")]
        if page.startswith("labs/"):  # the site shows a lab's student version, never its master
            assert page not in toc, f"the master {nb} must not be on the site"
        cells = json.loads((ROOT / nb).read_text())["cells"]
        code = [c for c in cells if c["cell_type"] == "code" and "skip-execution" not in c["metadata"].get("tags", [])]
        assert code and all(c.get("execution_count") for c in code), f"{nb} is not stored executed (make execute)"
        assert json.loads((ROOT / nb).read_text())["metadata"]["kernelspec"]["name"] == "python3"


def test_stored_outputs_hold_no_progress_bars_or_stderr():
    """The site is a book: `make execute` runs with TQDM_DISABLE=1, so no stored output is a progress bar (or
    any other stderr stream: a warning the text should have dealt with)."""
    for nb in _notebooks() + _executed():
        for i, cell in enumerate(json.loads((ROOT / nb).read_text())["cells"]):
            streams = [o for o in cell.get("outputs", []) if o.get("name") == "stderr"]
            assert not streams, f"{nb} cell {i}: stderr stored: {''.join(streams[0]['text'])[:200]!r}"

def test_labs_open_in_colab_from_the_one_repository_url():
    cfg = yaml.safe_load((ROOT / "_config.yml").read_text())
    url = cfg["repository"]["url"]
    slug = url.removeprefix("https://github.com/")
    assert cfg["launch_buttons"]["colab_url"] == "https://colab.research.google.com"
    labs = sorted((ROOT / "labs").glob("*.ipynb"))  # masters; the student versions carry the same cells
    assert labs
    for lab in labs:
        cells = json.loads(lab.read_text())["cells"]
        badge = f"https://colab.research.google.com/github/{slug}/blob/{cfg['repository']['branch']}/labs/student/{lab.name}"
        first = next("".join(c["source"]) for c in cells if c["cell_type"] == "markdown")
        assert badge in first, f"{lab.name}: Colab badge must point at the student version, {badge}"
        install = next("".join(c["source"]) for c in cells if c["cell_type"] == "code")
        assert url in install and "google.colab" in install and "labs/student/tests" in install
        assert not re.search(r"pip install[^\n]*\btorch\b", install), "the install cell must never reinstall torch"
        # llmlab/colab.py installs around Colab's torch and prints each step (tests/test_colab.py)
        assert f'LAB = "{lab.stem}"' in install and "/llmlab/colab.py --lab {LAB}" in install, lab.name
    # the autograder outside this repository (Gradescope) installs llmlab from the same repository
    assert f"git+{url}" in (ROOT / "labs" / "requirements.txt").read_text()
    # chapters open in Colab too: each installs llmlab there, from the same repository
    for nb in sorted((ROOT / "book").rglob("*.ipynb")):
        code = next("".join(c["source"]) for c in json.loads(nb.read_text())["cells"] if c["cell_type"] == "code")
        assert "google.colab" in code and f"git+{url}" in code, f"{nb.name}: first code cell must install on Colab"
        assert not re.search(r"pip install[^\n]*\btorch\b", code)


def test_github_workflows():
    wf = ROOT / ".github" / "workflows"
    texts = {p.name: p.read_text() for p in wf.glob("*.yml")}
    assert any("make test" in t for t in texts.values())
    assert any("deploy-pages" in t and "make book" in t for t in texts.values())
    canary = [t for t in texts.values() if "schedule" in t and "make canary" in t]
    assert canary, "a scheduled canary workflow runs make canary"
    for t in texts.values():
        yaml.safe_load(t)


def test_the_wheel_ships_the_course_model(tmp_path):
    """Colab installs llmlab with pip from the repository: the course model must be inside the wheel."""
    import sys
    import zipfile

    out = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps",
                          "-w", str(tmp_path), str(ROOT)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    names = zipfile.ZipFile(next(tmp_path.glob("llmlab-*.whl"))).namelist()
    for f in ("model.safetensors", "tokenizer.json", "config.json", "card.json", "README.md"):
        assert f"llmlab/assets/course-model/{f}" in names


# notebooks that generate tasks or pairs and train, but not on them: what they train on instead
TRAINS_ON_THE_CORPUS_ONLY = {
    "book/compression/quantization-from-scratch.ipynb": "quantization-aware training continues pretraining on the "
                                                        "corpus; the tasks are only evaluated",
    "book/pretraining/pretraining.ipynb": "trains on the corpus only; the curation section counts the tokens of "
                                          "generated tasks for a data mixture and neither trains nor evaluates on them",
}


def test_no_evaluation_prompt_is_trained_on():
    """Every notebook that makes tasks or preference pairs with llmlab.data and trains asserts, where it makes
    them, that its held-out prompts share nothing with what it trains on (`data.overlap(train, held_out) == []`,
    run by nbval); the held-out sets are drawn with `exclude=`."""
    for nb in _executed():
        code = "\n".join("".join(c["source"]) for c in json.loads((ROOT / nb).read_text())["cells"]
                         if c["cell_type"] == "code")
        makes_data = re.search(r"instruction_tasks\(|preference_pairs\(", code)
        trains = re.search(r"\.backward\(|Trainer\(|\.train\(\)|train_step\(|\.step\(\)", code)
        if not (makes_data and trains) or nb in TRAINS_ON_THE_CORPUS_ONLY:
            continue
        assert re.search(r"assert data\.overlap\([^\n]*\) == \[\]", code), \
            f"{nb} trains on generated data: assert data.overlap(train, held_out) == [] where it makes them"
    for nb in TRAINS_ON_THE_CORPUS_ONLY:
        assert (ROOT / nb).exists(), nb
