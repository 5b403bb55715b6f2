"""llmlab.colab, the Colab installer: its plan per runtime, and its runs with a fake pip (no network, no real pip)."""
import ast
import subprocess
import sys
from pathlib import Path

import pytest

from llmlab import colab
from llmlab.colab import GPU_OFFLOAD, LLAMA, LLAMA_WHEELS, plan

T4 = (7, 5)
COLAB_TORCH = {"torch": "2.10.0+cu128", "torchvision": "0.25.0+cu128", "torchaudio": None, "triton": "3.6.0"}


@pytest.fixture
def repo(tmp_path):
    root = tmp_path / "llm-lab"
    (root / "labs").mkdir(parents=True)
    (root / "pyproject.toml").write_text("[project]\nname = 'llmlab'\n")
    for lab in ("00_course_loop", "04_inference_backends"):
        (root / "labs" / f"{lab}.ipynb").write_text("{}")
    (root / "labs" / "requirements.txt").write_text("")
    return root


class FakePip:
    """Records (command, env) of every call; pip installs whose command contains a string in ``fail`` fail, and
    ``python -c`` probes return ``probe_rc``."""

    def __init__(self, fail=(), probe_rc=0):
        self.fail, self.probe_rc, self.calls = fail, probe_rc, []

    def __call__(self, cmd, env):
        self.calls.append((list(cmd), dict(env)))
        if cmd[1] == "-c":
            return subprocess.CompletedProcess(cmd, self.probe_rc, "", "")
        if any(f in " ".join(cmd) for f in self.fail):
            err = "ERROR: No matching distribution found for x\n\n[notice] A new release of pip is available\n"
            return subprocess.CompletedProcess(cmd, 1, "", err)
        return subprocess.CompletedProcess(cmd, 0, "", "")

    def installs(self):
        return [c[5:] for c, _ in self.calls if c[1:5] == ["-m", "pip", "install", "-q"]]


def _main(repo, *flags, runner, before=COLAB_TORCH, after=None, gpu=("12", T4)):
    seen, lines = [before, after or before], []
    code = colab.main(["--repo", str(repo), "--lab", "04_inference_backends", *flags], runner=runner,
                      versions=lambda: seen.pop(0), gpu=lambda: gpu, out=lines.append)
    return code, lines


def test_t4_cuda12_plan_takes_the_cu124_wheel_then_the_course_package(repo):
    steps = plan("2.10.0+cu128", "12", T4, True, False, repo)
    cuda, cpu, course, vllm = steps
    assert cuda.args == ("--only-binary", ":all:", "--extra-index-url", f"{LLAMA_WHEELS}/cu124", LLAMA)
    assert cuda.probe == GPU_OFFLOAD and "llama_supports_gpu_offload()" in GPU_OFFLOAD
    assert cpu.when == "failed" and f"{LLAMA_WHEELS}/cpu" in cpu.args and ":all:" in cpu.args
    assert course.course and course.args == (f"{repo}[labs,grading]",)
    assert vllm.skip.startswith("opt-in on Colab (--vllm)") and "2.10.0" in vllm.skip
    assert plan("2.13.0+cu130", "13", T4, True, False, repo)[0].args[3] == f"{LLAMA_WHEELS}/cu130"


def test_the_llamacpp_extra_follows_the_wheel_that_installed(repo):
    pip = FakePip()
    code, lines = _main(repo, "--llamacpp", runner=pip)
    assert code == 0
    assert pip.installs()[0][-2:] == [f"{LLAMA_WHEELS}/cu124", LLAMA]  # the CUDA wheel, and no CPU wheel after it
    assert [c for c, _ in pip.calls if c[1] == "-c"] == [[sys.executable, "-c", GPU_OFFLOAD]]
    assert pip.installs()[1] == [f"{repo}[labs,grading,llamacpp]"]
    assert lines[1].startswith("installed llama-cpp-python (CUDA wheel, cu124) (")
    assert lines[2].startswith("installed llmlab[labs,grading] (course package) with llamacpp (")
    assert any(ln.startswith("skipped vLLM: opt-in on Colab") for ln in lines)

    pip = FakePip(fail=("whl/cu124", "whl/cpu"))
    assert _main(repo, "--llamacpp", runner=pip)[0] == 0
    assert [f"{repo}[labs,grading]"] in pip.installs()


def test_no_gpu_takes_the_cpu_wheel_and_skips_vllm_with_a_reason(repo):
    llama, _, vllm = plan("2.10.0+cu128", "12", None, True, False, repo)
    assert llama.when == "" and llama.args[-2:] == (f"{LLAMA_WHEELS}/cpu", LLAMA)
    assert vllm.skip and not vllm.args
    (wanted,) = [s for s in plan("2.10.0+cu128", "12", None, False, True, repo) if "vLLM" in s.what]
    assert "compute capability 7.5+" in wanted.skip and "no GPU" in wanted.skip
    assert "7.5+" in plan("2.10.0", "12", (7, 0), False, True, repo)[-1].skip  # a V100


def test_vllm_for_a_torch_that_no_release_pins_is_skipped_naming_it(repo):
    step = plan("2.12.0+cu128", "12", T4, False, True, repo)[-1]
    assert step.what == "vLLM" and "torch 2.12.0" in step.skip and "replace Colab's torch" in step.skip


def test_vllm_for_a_pinned_torch_on_cuda12_is_the_cu129_build_after_a_dry_run(repo):
    dry, install = plan("2.11.0+cu128", "12", T4, False, True, repo)[-2:]
    want = ("vllm==0.26.0+cu129", "--extra-index-url", "https://wheels.vllm.ai/0.26.0/cu129")
    assert dry.dry and dry.args == want and install.args == want and install.when == "ok" and not install.dry
    assert plan("2.13.0+cu130", "13", T4, False, True, repo)[-1].args == ("vllm==0.27.1",)  # PyPI's is cu13
    assert plan("2.10.0+cu128", "12", T4, False, True, repo)[-1].args == ("vllm==0.19.1",)  # before 0.20

    pip = FakePip()
    _main(repo, "--vllm", runner=pip, before={"torch": "2.11.0+cu128"})
    vllm = [c for c, _ in pip.calls if any(a.startswith("vllm==") for a in c)]
    assert vllm == [[sys.executable, "-m", "pip", "install", "-q", "--dry-run", *want],
                    [sys.executable, "-m", "pip", "install", "-q", *want]]

    pip = FakePip(fail=("vllm==",))
    code, lines = _main(repo, "--vllm", runner=pip, before={"torch": "2.11.0+cu128"})
    assert code == 0 and len([c for c in pip.installs() if "vllm==0.26.0+cu129" in c]) == 1  # the dry run only
    (line,) = [ln for ln in lines[1:] if "vllm" in ln.lower()]  # lines[0] names the (tmp) pins path
    assert line.startswith("skipped vLLM: vllm==0.26.0+cu129 does not resolve against Colab's torch 2.11.0+cu128")
    assert "No matching distribution" in line and "[notice]" not in line


def test_a_failing_cuda_wheel_falls_back_to_the_cpu_wheel_and_then_to_a_skip_line(repo):
    pip = FakePip(fail=("whl/cu124",))
    code, lines = _main(repo, "--llamacpp", runner=pip)
    assert code == 0 and [c[-2] for c in pip.installs()[:2]] == [f"{LLAMA_WHEELS}/cu124", f"{LLAMA_WHEELS}/cpu"]
    assert lines[1].startswith("FAILED llama-cpp-python (CUDA wheel, cu124) (") and "No matching" in lines[1]
    assert lines[2].startswith("installed llama-cpp-python (CPU wheel)")
    assert pip.installs()[2] == [f"{repo}[labs,grading,llamacpp]"]

    pip = FakePip(probe_rc=1)  # the CUDA wheel installs but cannot offload: uninstalled, then the CPU wheel
    _main(repo, "--llamacpp", runner=pip)
    assert [sys.executable, "-m", "pip", "uninstall", "-q", "-y", "llama-cpp-python"] in [c for c, _ in pip.calls]
    assert pip.installs()[1][-2] == f"{LLAMA_WHEELS}/cpu"

    pip = FakePip(fail=("whl/cu124", "whl/cpu"))
    code, lines = _main(repo, "--llamacpp", runner=pip)
    assert code == 0
    (skip,) = [ln for ln in lines if ln.startswith("skipped llama-cpp-python:")]
    assert "compiles it" in skip and "3-4 min" in skip
    assert not any(ln.startswith("FAILED llama-cpp-python (CPU") for ln in lines)
    assert lines[-1].startswith("setup for 04_inference_backends done in")

    code, lines = _main(repo, runner=FakePip(fail=("[labs,grading]",)))  # the course package itself fails
    assert code == 1 and "the course package FAILED" in lines[-1]


def test_a_changed_torch_fails_with_a_clear_line(repo):
    code, lines = _main(repo, runner=FakePip(), after={**COLAB_TORCH, "torch": "2.13.0"})
    assert code == 1
    assert lines[-1].startswith("FAILED: torch changed from 2.10.0+cu128 to 2.13.0")
    assert "Disconnect and delete runtime" in lines[-1]


def test_the_constraint_file_pins_what_is_installed_and_every_pip_gets_it(repo):
    pip = FakePip()
    code, lines = _main(repo, "--llamacpp", "--vllm", runner=pip)
    pins = repo.parent / "colab-pins.txt"
    assert code == 0 and pins.read_text() == "torch==2.10.0+cu128\ntorchvision==0.25.0+cu128\ntriton==3.6.0\n"
    assert lines[0].startswith("keeping Colab's torch 2.10.0+cu128, torchvision 0.25.0+cu128, triton 3.6.0")
    assert f"%env PIP_CONSTRAINT={pins}" in lines[0]
    assert len(pip.calls) >= 5  # CUDA wheel, its probe, course package, vLLM dry run and install
    for cmd, env in pip.calls:
        assert env["PIP_CONSTRAINT"] == str(pins), cmd
    assert "PIP_CONSTRAINT" not in colab.os.environ or colab.os.environ["PIP_CONSTRAINT"] != str(pins)


def test_bad_inputs_give_one_clear_error(repo, tmp_path):
    with pytest.raises(SystemExit, match=r"unknown lab '04_inference'; the labs are: 00_course_loop, "
                                         r"04_inference_backends$"):
        colab.parse(["--repo", str(repo), "--lab", "04_inference"])
    with pytest.raises(SystemExit, match=r"no course repository at .*nowhere; clone it first: git clone"):
        colab.parse(["--repo", str(tmp_path / "nowhere"), "--lab", "04_inference_backends"])
    # as the script Colab runs: one line on stderr, before anything is installed
    out = subprocess.run([sys.executable, colab.__file__, "--repo", str(repo), "--lab", "nope"],
                         capture_output=True, text=True, timeout=30, check=False)
    assert out.returncode == 1 and out.stdout == "" and out.stderr.strip().splitlines() == [
        "colab.py: unknown lab 'nope'; the labs are: 00_course_loop, 04_inference_backends"]


def test_detect_gpu_reads_torch_in_a_subprocess():
    def fake(stdout, rc=0):
        return lambda cmd, env: subprocess.CompletedProcess(cmd, rc, stdout, "")
    assert colab.detect_gpu(fake("12.8 7 5\n")) == ("12", (7, 5))
    assert colab.detect_gpu(fake("warning: something\n13.0\n")) == ("13", None)
    assert colab.detect_gpu(fake("- \n")) == (None, None)
    assert colab.detect_gpu(fake("", rc=1)) == (None, None)


def test_the_script_imports_only_the_standard_library():
    tree = ast.parse(Path(colab.__file__).read_text())
    top = set()
    for node in tree.body:
        if isinstance(node, ast.Import):
            top |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, "a relative import cannot run as a script"
            top.add(node.module.split(".")[0])
    assert top and top <= set(sys.stdlib_module_names) | {"__future__"}, top - set(sys.stdlib_module_names)
    # run as a script, llmlab/ comes first on sys.path: none of its modules may shadow the standard library
    shadows = {p.stem for p in Path(colab.__file__).parent.glob("*.py")} & set(sys.stdlib_module_names)
    assert not shadows, shadows
