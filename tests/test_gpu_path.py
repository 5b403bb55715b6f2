"""The students' real path on this CPU (issue 15): every lab master, and every chapter where
the profile picks the model or a branch (``profile_dependence``), executed top to bottom
under the gpu profile's code path, in ``make test`` (and so CI).

Each notebook runs in a fresh kernel with ``LLMLAB_PROFILE=gpu LLMLAB_SMOKE=1``
(``llmlab.env.smoke_profile``): the hub ids become the offline SmolLM2-135M-Instruct (``make
smollm2``), the sizes are capped and timers call once (``llmlab.env.SMOKE_TIMING``); the
profile's name, and so every branch on it, stays "gpu" (the hardware differs: float32 where
a T4 computes in float16, no CUDA row). A row that truly needs CUDA prints one
"skipped...: reason" line instead of failing. Each notebook is its own unit for the pytest
workers (``timing_table.unit_of``), so the two workers share them. With
``LLMLAB_GPU_PATH_REPORT=<dir>`` each run's seconds and skip lines are written there as JSON
(the closing notes' table of which rows each profile shows)."""
import ast
import json
import os
import re
import time
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from llmlab import env, models

ROOT = Path(__file__).resolve().parent.parent
LABS = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "labs").glob("0*.ipynb"))


def _is_cpu_check(node):
    """``if profile.name == "cpu":`` holding only asserts, with no else: claims about the
    course model that the gpu path skips and nbval's cpu run makes."""
    t = node.test
    return (
        isinstance(node, ast.If)
        and not node.orelse
        and all(isinstance(b, (ast.Assert, ast.Pass)) for b in node.body)
        and isinstance(t, ast.Compare)
        and isinstance(t.left, ast.Attribute)
        and isinstance(t.left.value, ast.Name)
        and t.left.value.id == "profile"
        and t.left.attr == "name"
        and [type(o) for o in t.ops] == [ast.Eq]
        and isinstance(t.comparators[0], ast.Constant)
        and t.comparators[0].value == "cpu"
    )


def _called(call):
    """The name a call calls: ``f`` for ``f()``, ``a.b.f()`` and ``b.f()``."""
    f = call.func
    return f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else None


def _owner(call):
    """``models`` for ``models.load()`` and ``llmlab.models.load()``; None for ``load()``."""
    v = getattr(call.func, "value", None)
    return v.id if isinstance(v, ast.Name) else v.attr if isinstance(v, ast.Attribute) else None


def profile_dependence(source):
    """The lines of notebook code ``source`` where the profile picks the model or a branch:
    ``models.load`` or ``models.resolve`` with no model named (the profile's base model),
    the profile under another name (``get_profile()``, ``setup()`` kept in another
    variable), and every use of ``profile`` but two. Not counted: its sizes (``env.SMOKE_SIZES``'
    settings: the same statements, run more or fewer times; the smoke override caps them
    below every profile's anyway), and ``if profile.name == "cpu":`` blocks of asserts
    alone (claims about the course model: the gpu path runs the same statements less those
    checks, which nbval makes on the cpu profile). Also not counted: the dtype
    ``models.load`` picks, float32 on any CPU (hardware, which a CPU cannot stand in for)."""
    if not isinstance(source, str):
        raise TypeError(f"source must be a str, got {type(source).__name__}")
    # IPython's magics and shell lines are not Python: a `pass` at their indentation
    code = "\n".join(
        ln[: len(ln) - len(ln.lstrip())] + "pass" if ln.lstrip().startswith(("%", "!")) else ln
        for ln in source.splitlines()
    )
    tree = ast.parse(code)
    uncounted = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and _is_cpu_check(node):
            uncounted.add(id(node.test.left.value))
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                and node.value.id == "profile" and node.attr in env.SMOKE_SIZES):
            uncounted.add(id(node.value))
    lines = set()
    for node in ast.walk(tree):
        if (isinstance(node, ast.Name) and node.id == "profile" and isinstance(node.ctx, ast.Load)
                and id(node) not in uncounted):
            lines.add(node.lineno)
        if isinstance(node, ast.Call) and _called(node) in ("load", "resolve") and (
                _owner(node) == "models" and not node.args
                and not any(k.arg == "name" for k in node.keywords)):
            lines.add(node.lineno)
        # the profile under another name: get_profile(), or setup()'s result kept elsewhere
        if isinstance(node, ast.Call) and _called(node) == "get_profile":
            lines.add(node.lineno)
        if (isinstance(node, ast.Assign) and isinstance(node.value, ast.Call)
                and _called(node.value) == "setup"
                and not all(isinstance(t, ast.Name) and t.id == "profile" for t in node.targets)):
            lines.add(node.lineno)
    return [code.splitlines()[n - 1].strip() for n in sorted(lines)]


def notebook_profile_dependence(path):
    """``profile_dependence`` of every code cell of the notebook at ``path``."""
    nb = nbformat.read(ROOT / path, as_version=4)
    return [ln for c in nb.cells if c.cell_type == "code" for ln in profile_dependence(c.source)]


# the chapters where the profile picks the model or a branch: every other one runs on the
# gpu path the statements nbval runs on the cpu profile (at other sizes, less its checks)
CHAPTERS = sorted(
    str(p.relative_to(ROOT))
    for p in (ROOT / "book").rglob("*.ipynb")
    if ".ipynb_checkpoints" not in p.parts and notebook_profile_dependence(p.relative_to(ROOT))
)
# rows that need CUDA: without it each prints its skip line (the words below are in it)
CUDA_SKIPS = {"labs/01_quantization.ipynb": ("int4 weight-only, torchao",),
              "labs/04_inference_backends.ipynb": ("vLLM", "torch.compile")}
# "skipped: reason", "skipped vLLM: reason": the reason is what the student reads
SKIP_LINE = re.compile(r"^skipped\b[^:\n]*:\s*(\S.*)$", re.M)


def _text(output):
    if output.get("output_type") == "stream":
        return output.get("text", "")
    return output.get("data", {}).get("text/plain", "")


def run_gpu_path(path, timeout=600):
    """Execute the notebook at ``path`` (relative to the repository) under the smoke
    override; returns the executed notebook and its wall seconds."""
    nb = nbformat.read(ROOT / path, as_version=4)
    env = dict(os.environ, LLMLAB_PROFILE="gpu", LLMLAB_SMOKE="1", TQDM_DISABLE="1")
    client = NotebookClient(
        nb,
        timeout=timeout,
        kernel_name="python3",
        allow_errors=True,
        resources={"metadata": {"path": str((ROOT / path).parent)}},
    )
    start = time.perf_counter()
    client.execute(env=env)
    return nb, time.perf_counter() - start


@pytest.mark.slow
@pytest.mark.parametrize("path", LABS + CHAPTERS)
def test_gpu_path_runs_end_to_end(path):
    models.offline_model_dir(env.SMOKE_MODEL)  # missing: an error naming `make smollm2`
    nb, seconds = run_gpu_path(path)
    code = [c for c in nb.cells if c.cell_type == "code"]
    errors = [
        f"cell {nb.cells.index(c)}: {o['ename']}: {o['evalue'][:300]}"
        for c in code
        for o in c.outputs
        if o["output_type"] == "error"
    ]
    assert not errors, f"{path} under the gpu path:\n" + "\n".join(errors)
    text = "\n".join(_text(o) for c in code for o in c.outputs)
    # the gpu profile ran, with the smoke override named (llmlab.env.setup prints it)
    assert "llmlab profile: gpu" in text and "smoke: LLMLAB_SMOKE=1" in text, path
    skips = [m.group(0) for m in SKIP_LINE.finditer(text)]
    bare = [line for line in re.findall(r"^skipped\b.*$", text, re.M) if line not in skips]
    assert not bare, f"{path}: skip lines without a reason: {bare}"
    import torch

    if not torch.cuda.is_available():
        missing = [w for w in CUDA_SKIPS.get(path, ()) if not any(w in line for line in skips)]
        assert not missing, f"{path}: no skip line for the CUDA rows {missing}"
    tracebacks = [
        o.get("text", "")[-300:]
        for c in code
        for o in c.outputs
        if o.get("name") == "stderr" and "Traceback" in o.get("text", "")
    ]
    assert not tracebacks, f"{path} printed a traceback: {tracebacks}"
    out = os.environ.get("LLMLAB_GPU_PATH_REPORT")
    if out:
        os.makedirs(out, exist_ok=True)
        name = path.replace("/", "__").removesuffix(".ipynb") + ".json"
        report = {"notebook": path, "seconds": round(seconds, 1), "skipped": skips}
        (Path(out) / name).write_text(json.dumps(report, indent=1) + "\n")


@pytest.mark.parametrize(
    "source, counted",
    [
        ('model, tok = models.load()', ["model, tok = models.load()"]),
        ('models.resolve(dtype="float32")', ['models.resolve(dtype="float32")']),
        ("models.load(COURSE_MODEL)", []),
        ('models.load(name="x")', []),
        ("m = models.load(profile.base_model)", ["m = models.load(profile.base_model)"]),
        ("n = profile.train_steps // 4\nb = min(8, profile.batch_size)", []),
        ('if profile.name == "cpu":\n    assert n > 1, n', []),
        ('if profile.name == "cpu":\n    x = 1', ['if profile.name == "cpu":']),
        ('if profile.name == "cpu":\n    assert n\nelse:\n    pass', ['if profile.name == "cpu":']),
        ('if profile.name == "gpu":\n    assert n', ['if profile.name == "gpu":']),
        ('k = 64 if profile.name == "cpu" else 8', ['k = 64 if profile.name == "cpu" else 8']),
        ("f(profile)", ["f(profile)"]),
        ("profile = llmlab.env.setup(seed=0)", []),
        ("llmlab.models.load()", ["llmlab.models.load()"]),
        ("p = llmlab.env.get_profile()", ["p = llmlab.env.get_profile()"]),
        ("p = llmlab.env.setup(seed=0)", ["p = llmlab.env.setup(seed=0)"]),
        # magics, indented too, are skipped as Python
        ('if colab:\n    %pip install -q x\nmodels.load()', ["models.load()"]),
    ],
)
def test_profile_dependence_counts_models_and_branches_not_sizes_or_cpu_checks(source, counted):
    """The rule that picks the chapters on the gpu path (CHAPTERS)."""
    assert profile_dependence(source) == counted


def test_profile_dependence_rejects_what_is_not_code():
    with pytest.raises(TypeError, match="source must be a str"):
        profile_dependence(None)
    with pytest.raises(SyntaxError):
        profile_dependence("def (")


def test_every_lab_and_the_chapters_running_the_profiles_models_are_on_the_gpu_path():
    """Every lab (Colab's path) and every chapter where the profile picks the model: for
    the rest, nbval's cpu run makes the statements the gpu path would."""
    assert LABS and all(notebook_profile_dependence(lab) for lab in LABS)
    for p in sorted((ROOT / "book").rglob("*.ipynb")):
        rel = str(p.relative_to(ROOT))
        if "profile.base_model" in p.read_text() or "profile.sft_model" in p.read_text():
            assert rel in CHAPTERS, rel
    assert all(notebook_profile_dependence(c) for c in CHAPTERS)


def test_how_to_run_names_the_chapters_on_the_gpu_path():
    """The page *How to run this course* links every chapter the rule puts on the gpu path."""
    page = (ROOT / "book" / "foundations" / "how-to-run.md").read_text()
    for chapter in CHAPTERS:
        target = "../" + str(Path(chapter).relative_to("book").with_suffix(""))
        assert f"<{target}>`" in page, f"how-to-run.md does not name {chapter}"
