"""Installs the course on Google Colab around Colab's own torch, never over it. The chapter "How to run this
course" describes it; every lab's first cell runs it, after a shallow clone, as
``!{sys.executable} /content/llm-lab/llmlab/colab.py --lab 04_inference_backends [--llamacpp] [--vllm]``. It uses the standard library only (no llmlab, no torch
import): it pins the installed torch, torchvision, torchaudio and triton in a constraints file given to every pip it
runs, installs the course package, takes llama-cpp-python from prebuilt wheels only (abetlen's CUDA indexes cu124 and
cu130, then its CPU index; PyPI has only the sdist, and pip would silently compile it:
https://github.com/abetlen/llama-cpp-python/pull/2272, https://github.com/abetlen/llama-cpp-python/issues/1872), and
installs vLLM only on request and only a release that pins exactly this torch (each release pins one torch:
https://github.com/vllm-project/vllm/pull/48155, https://github.com/vllm-project/vllm/issues/34224), on compute
capability 7.5+, where the T4 runs Triton attention (https://github.com/vllm-project/vllm/pull/24022,
https://github.com/vllm-project/vllm/pull/45375), as the ``+cu129`` build on CUDA 12 because PyPI's vLLM >= 0.20 is a
CUDA 13 build that Colab's driver cannot load (https://github.com/Open-Athena/MarinFold/pull/115,
https://github.com/vllm-project/vllm/issues/44335). Decisions live in the pure ``plan``; ``run`` and ``main`` execute
them through an injectable runner, one printed line per step."""
from __future__ import annotations

import argparse
import importlib
import importlib.metadata as md
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

CLONE = "git clone -q --depth 1 https://github.com/llmlab-course/llm-lab /content/llm-lab"
PINNED = ("torch", "torchvision", "torchaudio", "triton")
LLAMA, LLAMA_WHEELS = "llama-cpp-python>=0.3.30", "https://abetlen.github.io/llama-cpp-python/whl"
LLAMA_CUDA_INDEX = {"12": "cu124", "13": "cu130"}  # torch's CUDA major -> abetlen's wheel index
GPU_OFFLOAD = "import llama_cpp, sys; sys.exit(not llama_cpp.llama_supports_gpu_offload())"
LLAMA_BUILD = ("no prebuilt wheel installs here; `pip install llama-cpp-python` compiles it from source "
               "(about 3-4 min CPU-only, 10-20+ min with CMAKE_ARGS=-DGGML_CUDA=on)")
# torch -> the vLLM release pinning exactly it (requirements/cuda.txt). Best effort: a wrong pair fails the dry run.
VLLM_FOR_TORCH = {"2.10.0": "0.19.1", "2.11.0": "0.26.0", "2.13.0": "0.27.1"}


@dataclass(frozen=True)
class Step:
    """One ``pip install <args>``, or, with ``skip``, one line saying why not.

    ``when`` chains it to the step before: "failed" (a fallback) or "ok" (the install after a dry run).
    ``probe``: Python that must exit 0 after the install, else the package is uninstalled and the step fails.
    ``extra``: the course-package extra its success enables. ``course``: the course package, which gains those
    extras and whose failure fails the script. ``give_up``: the skip line printed instead of FAILED."""
    what: str
    args: tuple[str, ...] = ()
    skip: str = ""
    when: str = ""
    dry: bool = False
    probe: str = ""
    extra: str = ""
    course: bool = False
    give_up: str = ""


def plan(torch_version, cuda_major, capability, llamacpp, vllm, repo) -> list[Step]:
    """The steps for this runtime, decided without running anything; ``capability`` is None without a GPU."""
    steps = []
    if llamacpp:
        # with its dependencies (numpy, diskcache, jinja2) from PyPI: the offload probe imports it; PyPI has
        # only llama-cpp-python's sdist, which --only-binary rules out, so the wheel comes from the index
        wheel = ("--only-binary", ":all:", "--extra-index-url")
        idx = LLAMA_CUDA_INDEX.get(str(cuda_major)) if capability else None
        if idx:
            steps.append(Step(f"llama-cpp-python (CUDA wheel, {idx})", (*wheel, f"{LLAMA_WHEELS}/{idx}", LLAMA),
                              probe=GPU_OFFLOAD, extra="llamacpp"))
        steps.append(Step("llama-cpp-python (CPU wheel)", (*wheel, f"{LLAMA_WHEELS}/cpu", LLAMA),
                          when="failed" if idx else "", extra="llamacpp",
                          give_up=f"skipped llama-cpp-python: {LLAMA_BUILD}"))
    else:
        steps.append(Step("llama-cpp-python", skip="not requested (--llamacpp); the llama.cpp rows print a skip"))
    steps.append(Step("llmlab[labs,grading] (course package)", (f"{repo}[labs,grading]",), course=True))
    return steps + _vllm(torch_version, cuda_major, capability, vllm)


def _vllm(torch_version, cuda_major, capability, wanted) -> list[Step]:
    """A dry run then the install of the vLLM release pinning this torch, or one skip step."""
    tv = (torch_version or "").split("+")[0]
    ver, cu = VLLM_FOR_TORCH.get(tv), str(cuda_major)
    spec, idx = f"vllm=={ver}", ()
    if ver and tuple(map(int, ver.split("."))) >= (0, 20) and cu == "12":  # PyPI's vLLM >= 0.20 is a CUDA 13 build
        spec, idx = f"vllm=={ver}+cu129", ("--extra-index-url", f"https://wheels.vllm.ai/{ver}/cu129")
    if not wanted:
        why = (f"opt-in on Colab (--vllm): it fits only if a vLLM release pins exactly this torch ({tv or 'none'}); "
               "any other would replace Colab's torch")
    elif not torch_version:
        why = "torch is not installed"
    elif not capability or tuple(capability) < (7, 5):
        why = f"needs a CUDA GPU with compute capability 7.5+; this runtime has {capability or 'no GPU'}"
    elif not ver:
        why = (f"no vLLM release known to pin torch {tv}; installing one would replace Colab's torch "
               "(run vLLM from its own venv instead)")
    elif not idx and tuple(map(int, ver.split("."))) >= (0, 20) and cu != "13":
        why = f"vLLM {ver} has wheels for CUDA 12 and 13 only; this torch is built for CUDA {cuda_major}"
    else:
        return [Step(f"{spec} (dry run)", (spec, *idx), dry=True,
                     give_up=f"skipped vLLM: {spec} does not resolve against Colab's torch {torch_version}"),
                Step(spec, (spec, *idx), when="ok")]
    return [Step("vLLM", skip=why)]


def pip_command(step: Step) -> list[str]:
    """The pip command line that carries out ``step``."""
    return [sys.executable, "-m", "pip", "install", "-q", *(["--dry-run"] if step.dry else []), *step.args]


def _subprocess(cmd, env):
    return subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)


def _last_line(result) -> str:
    """pip's last meaningful line (its error), without the "[notice]" lines it prints after it."""
    lines = [ln.strip() for ln in f"{result.stdout or ''}\n{result.stderr or ''}".splitlines()]
    lines = [ln for ln in lines if ln and not ln.startswith("[notice]")]
    return (lines or ["no output"])[-1][:200]


def _say(line: str):
    print(line, flush=True)


def run(steps, env, runner=None, out=_say) -> bool:
    """Runs ``steps`` (one printed line each) with ``env`` for every command; False if the course package failed."""
    runner, gained, ok, course_ok = runner or _subprocess, [], False, True
    for step in steps:
        if step.skip:
            out(f"skipped {step.what}: {step.skip}")
            ok = False
            continue
        if (step.when == "failed" and ok) or (step.when == "ok" and not ok):
            continue
        if step.course and gained:
            spec = step.args[0][:-1] + "".join(f",{e}" for e in gained) + "]"
            step = replace(step, what=f"{step.what} with {', '.join(gained)}", args=(spec, *step.args[1:]))
        t = time.monotonic()
        result = runner(pip_command(step), env)
        ok, why = result.returncode == 0, _last_line(result)
        if ok and step.probe and runner([sys.executable, "-c", step.probe], env).returncode:
            name = re.split(r"[<>=!~\[ ]", step.args[-1])[0]
            runner([sys.executable, "-m", "pip", "uninstall", "-q", "-y", name], env)
            ok, why = False, f'installed, but fails `python -c "{step.probe}"` here; uninstalled it'
        secs = f"{time.monotonic() - t:.0f}s"
        if ok:
            out(f"{'resolves' if step.dry else 'installed'} {step.what} ({secs})")
            gained += [step.extra] if step.extra and step.extra not in gained else []
        elif step.give_up:
            out(f"{step.give_up} ({secs}; pip: {why})")
        else:
            out(f"FAILED {step.what} ({secs}): {why}")
        course_ok = course_ok and (ok or not step.course)
    return course_ok


def installed() -> dict:
    """The installed versions of ``PINNED`` (None for those missing), read from their metadata."""
    importlib.invalidate_caches()
    found = {}
    for name in PINNED:
        try:
            found[name] = md.version(name)
        except md.PackageNotFoundError:
            found[name] = None
    return found


def detect_gpu(runner=None, env=None) -> tuple:
    """torch's CUDA major ("12", or None) and the GPU's compute capability ((7, 5), or None), asked of torch in a
    subprocess so that this process never imports it."""
    code = ("import torch; c = torch.cuda; "
            "print(torch.version.cuda or '-', *(c.get_device_capability() if c.is_available() else ()))")
    result = (runner or _subprocess)([sys.executable, "-c", code], env or dict(os.environ))
    words = (result.stdout.strip().splitlines() or [""])[-1].split() if result.returncode == 0 else []
    cuda = words[0].split(".")[0] if words and words[0] != "-" else None
    return cuda, ((int(words[1]), int(words[2])) if len(words) == 3 else None)


def parse(argv=None) -> argparse.Namespace:
    """The command line, checked: a missing repository or an unknown lab exits with one line naming the fix."""
    p = argparse.ArgumentParser(prog="colab.py", description="Install the course on Colab around its own torch.")
    p.add_argument("--lab", required=True, help="the lab notebook's name, e.g. 04_inference_backends")
    p.add_argument("--repo", type=Path, default=Path(__file__).resolve().parent.parent, help="the course's clone")
    p.add_argument("--pins", type=Path, help="the constraints file to write (default: next to the clone)")
    p.add_argument("--llamacpp", action="store_true", help="llama-cpp-python from prebuilt wheels")
    p.add_argument("--vllm", action="store_true", help="vLLM, only a release pinning this torch")
    a = p.parse_args(argv)
    if not (a.repo / "pyproject.toml").is_file():
        raise SystemExit(f"colab.py: no course repository at {a.repo}; clone it first: {CLONE}")
    labs = sorted(f.stem for f in (a.repo / "labs").glob("0*.ipynb"))
    if a.lab not in labs:
        raise SystemExit(f"colab.py: unknown lab {a.lab!r}; the labs are: {', '.join(labs)}")
    a.pins = a.pins or a.repo.resolve().parent / "colab-pins.txt"
    return a


def main(argv=None, runner=None, versions=installed, gpu=None, out=_say) -> int:
    """Pins torch, runs the plan, checks torch is unchanged. 0 unless the course package failed or torch changed."""
    a, t0, runner = parse(argv), time.monotonic(), runner or _subprocess
    pins = {name: v for name, v in versions().items() if v}
    a.pins.write_text("".join(f"{name}=={v}\n" for name, v in pins.items()))
    env = {**os.environ, "PIP_CONSTRAINT": str(a.pins), "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    kept = ", ".join(f"{name} {v}" for name, v in pins.items()) or "nothing: no torch is installed"
    out(f"keeping Colab's {kept} (constraints {a.pins}; for your own %pip: %env PIP_CONSTRAINT={a.pins})")
    cuda, cap = gpu() if gpu else detect_gpu(runner, env)
    ok = run(plan(pins.get("torch"), cuda, cap, a.llamacpp, a.vllm, a.repo), env, runner, out)
    now = versions().get("torch")
    if now != pins.get("torch"):
        out(f"FAILED: torch changed from {pins.get('torch')} to {now}; Runtime > Disconnect and delete runtime, "
            "then rerun this cell")
        return 1
    out(f"setup for {a.lab} done in {time.monotonic() - t0:.0f}s"
        + ("" if ok else "; the course package FAILED (line above)"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
