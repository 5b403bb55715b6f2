"""Where the course runs: profiles, seeds, threads, offline mode and ``llmlab doctor``.

Every notebook calls ``llmlab.env.setup()`` first. All per-profile settings (model ids, steps, batch sizes,
sequence lengths) live in ``PROFILES`` below and nowhere else, so one notebook runs unchanged on a laptop
CPU (``cpu``) and on a Colab T4 or bigger GPU (``gpu``). Chapter: Preface ("How to run this course").

Smoke override, ``LLMLAB_SMOKE=1`` (``smoke_enabled``, applied by ``smoke_profile``):
with the ``gpu`` profile active (``LLMLAB_PROFILE=gpu``, or CUDA present),
``get_profile()`` returns the gpu profile with its hub model ids replaced by the offline
SmolLM2-135M-Instruct (``SMOKE_MODEL``, cached by ``make smollm2``), ``offline=True``,
and steps, batch, sequence length, evaluation examples, new tokens and validation documents capped at
``SMOKE_SIZES``; ``llmlab.measure.time_it`` calls once (``SMOKE_TIMING``). Its name stays
``"gpu"``, so every ``profile.name == "gpu"`` branch runs as it does on Colab: the override
changes model ids and sizes only, never which branches run. It lets a CPU execute the students' gpu path end to end, e.g.
``LLMLAB_PROFILE=gpu LLMLAB_SMOKE=1 jupyter execute labs/02_finetuning.ipynb``.
``LLMLAB_SMOKE`` unset, empty or ``0`` means off; the cpu profile ignores it.
"""
from __future__ import annotations

import os
import random
from dataclasses import dataclass, field, replace

from llmlab.display import use_book_style
from llmlab.memory import estimate_inference_memory, estimate_training_memory

COURSE_MODEL = "llmlab/course-model"  # the name `llmlab.models.load` resolves to the checkpoint shipped here


@dataclass(frozen=True)
class Profile:
    """One place for every setting that differs between a CPU run and a GPU run."""
    name: str
    base_model: str          # what `llmlab.models.load(profile.base_model)` loads
    sft_model: str           # the base (not instruction-tuned) model the fine-tuning lab starts from
    offline: bool            # cpu: never touch the network (HF_HUB_OFFLINE=1)
    dtype: str               # dtype the labs load the base model in
    train_steps: int         # fine-tuning / alignment steps in the labs
    batch_size: int
    seq_len: int
    eval_examples: int       # tasks scored for accuracy and reward tables
    max_new_tokens: int
    val_docs: int = 200      # held-out documents the perplexity of a model is measured on (lab 1)
    labs_gpu_gb: dict = field(default_factory=dict)  # GPU memory (GB) each lab's gpu profile needs, estimated


# SmolLM2-360M's parameters (362M): what the gpu profile's memory figures below are computed for
GPU_MODEL_PARAMS = 362e6

PROFILES = {
    "cpu": Profile(
        name="cpu", base_model=COURSE_MODEL, sft_model=COURSE_MODEL, offline=True, dtype="float32",
        train_steps=100, batch_size=8, seq_len=256, eval_examples=64, max_new_tokens=32,
    ),
    "gpu": Profile(
        name="gpu", base_model="HuggingFaceTB/SmolLM2-360M-Instruct", sft_model="HuggingFaceTB/SmolLM2-360M",
        offline=False, dtype="bfloat16",
        train_steps=300, batch_size=16, seq_len=512, eval_examples=500, max_new_tokens=64,
        # each lab's estimate from llmlab.memory (rule of thumb, 16-bit): SmolLM2-360M has 362M parameters
        labs_gpu_gb={"00_course_loop": round(estimate_inference_memory(GPU_MODEL_PARAMS, 16), 2),
                     # the fp32 baseline stays loaded while each variant (16 bits at most) is measured
                     "01_quantization": round(estimate_inference_memory(GPU_MODEL_PARAMS, 32)
                                              + estimate_inference_memory(GPU_MODEL_PARAMS, 16), 2),
                     # full fine-tuning in fp32 with AdamW: weights, gradients and two moments, 16 B a parameter
                     "02_finetuning": round(estimate_training_memory(GPU_MODEL_PARAMS).total / 1e9, 2),
                     # each stage freed before the next (llmlab.memory.StageMemory): the fullest is PPO's, the
                     # policy in training (16 B a parameter) beside three fp32 models (reference, reward
                     # model, the DPO policy kept for the comparison), plus 20 % for activations
                     "03_alignment": round(1.2 * (
                         estimate_training_memory(GPU_MODEL_PARAMS).total / 1e9
                         + 3 * estimate_inference_memory(GPU_MODEL_PARAMS, 32, overhead=0)), 2),
                     # the fp32 reference in PyTorch, plus one 16-bit copy in the engine being measured (vLLM is
                     # also told to take at most 40 % of the GPU for its weights and paged KV cache)
                     "04_inference_backends": round(estimate_inference_memory(GPU_MODEL_PARAMS, 32)
                                                    + estimate_inference_memory(GPU_MODEL_PARAMS, 16), 2),
                     # full fine-tuning on traces in fp32 with AdamW, then GRPO on the same copy (beta 0: no
                     # reference model, a verifier for reward): one trained model at a time
                     "05_reasoning": round(estimate_training_memory(GPU_MODEL_PARAMS).total / 1e9, 2)},
    ),
}


def has_cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


# ------------------------------------------------------------ capabilities --
#
# What the GPU can do, checked before a lab uses it: a row that needs more prints one
# skip line with the reason instead of failing. `torch.cuda.is_available()` alone says
# too little: a Colab T4 (sm75) has CUDA but emulates bf16 and lacks the kernels of
# torchao's int4 path. Chapter: Preface ("How to run this course") and the labs.

# Minimum compute capability for each torchao int4 weight-only packing format.
# - "plain", the default of `Int4WeightOnlyConfig()` (what lab 1 uses): torchao 0.18
#   quantizes with mslk (torchao/quantization/quantize_/workflows/int4/
#   int4_tensor.py:22-23 imports `mslk.quantize.shuffle.int4_row_quantize_zp`, and
#   from_hp raises "Requires mslk >= 1.0.0" at :139-140 without it) and multiplies
#   with `torch.ops.mslk.bf16i4bf16_rowwise`, a CUTLASS kernel built for
#   `cutlass::arch::Sm90` (its FBGEMM original, pytorch/FBGEMM
#   fbgemm_gpu/experimental/gen_ai/src/quantize/cutlass_extensions/
#   bf16i4bf16_rowwise.cu); torchao's own tests of it skip below sm90
#   (pytorch/ao test/quantization/quantize_/workflows/int4/test_int4_tensor.py,
#   `skipIf(not is_sm_at_least_90())`). So sm90+ (H100), not sm80.
# - "tile_packed_to_4d": the tinygemm kernel in PyTorch itself
#   (`aten._weight_int4pack_mm`, aten/src/ATen/native/cuda/int4mm.cu compiles it for
#   __CUDA_ARCH__ >= 800); torchao checks `get_device_capability()[0] >= 8` at
#   torchao/quantization/quantize_/workflows/int4/int4_tile_packed_to_4d_tensor.py:124.
#   No mslk needed: A100, L4 and newer.
INT4_MIN_CAPABILITY = {"plain": (9, 0), "tile_packed_to_4d": (8, 0)}

# vLLM's GPU requirement: "compute capability 7.5 or higher (e.g., T4, RTX20xx, A100,
# L4, H100, B200, etc.)" (docs/getting_started/installation/gpu.cuda.inc.md, vLLM
# v0.21.0 and main in 2026; earlier docs said 7.0). Turing runs its V1 engine on the
# Triton attention backend (vllm-project/vllm PR 14071, tested on a T4) in float16:
# a T4 has no native bf16, and vLLM casts bfloat16 checkpoints to float16 there.
VLLM_MIN_CAPABILITY = (7, 5)


def cuda_capability() -> tuple[int, int] | None:
    """The CUDA device's compute capability, e.g. (7, 5) on a T4; None without CUDA.
    The checks below and the labs' skip lines read it."""
    if not has_cuda():
        return None
    import torch

    major, minor = torch.cuda.get_device_capability()
    return int(major), int(minor)


def _sm(capability: tuple[int, int]) -> str:
    return f"compute capability {capability[0]}.{capability[1]}"


def bf16_supported() -> bool:
    """Whether the GPU computes in bfloat16 natively (Ampere, sm80, and newer).

    ``torch.cuda.is_bf16_supported()`` also says True on a T4 (sm75), where bf16 runs
    emulated and slowly; ``including_emulation=False`` asks for native support only.
    False on a CPU. Used by the fine-tuning and alignment labs through ``train_dtype``.
    """
    if not has_cuda():
        return False
    import torch

    return bool(torch.cuda.is_bf16_supported(including_emulation=False))


def train_dtype():
    """The dtype the labs train in: bfloat16 on a GPU with native bf16, float16 on
    an older GPU (a T4), float32 on a CPU. Chapter: the fine-tuning and alignment labs.
    """
    import torch

    if not has_cuda():
        return torch.float32
    return torch.bfloat16 if bf16_supported() else torch.float16


def _mslk_int4_kernels() -> tuple[bool, str]:
    """Whether torchao's plain int4 path finds its mslk kernels (as from_hp checks)."""
    try:
        import mslk  # noqa: F401
    except ImportError:
        return False, "the mslk package (torchao's int4 kernels) is not installed"
    except Exception as e:  # noqa: BLE001 (a wheel built for another torch or CUDA)
        return False, f"mslk fails to import: {type(e).__name__}: {e}"
    try:
        from torchao.quantization.quantize_.workflows.int4 import int4_tensor
    except Exception as e:  # noqa: BLE001 (any import failure is a reason to skip)
        return False, f"torchao's int4 module fails to import: {type(e).__name__}: {e}"
    if int4_tensor.int4_row_quantize_zp is None:
        return False, "torchao does not find mslk's int4 quantizer (needs mslk >= 1.0)"
    return True, "mslk found"


def int4_weight_only_supported(packing_format: str = "plain") -> tuple[bool, str]:
    """Whether torchao's ``Int4WeightOnlyConfig(int4_packing_format=packing_format)``
    can run here, and why not: ``(ok, reason)``, the reason fit for a one-line skip.

    ``"plain"`` (torchao's default) needs sm90+ and the mslk package;
    ``"tile_packed_to_4d"`` needs sm80+ (``INT4_MIN_CAPABILITY`` gives the sources).
    Both take bfloat16 activations. Used by the quantization lab (lab 1).
    """
    if not isinstance(packing_format, str):
        raise TypeError(f"packing_format must be a str, got "
                        f"{type(packing_format).__name__}")
    if packing_format not in INT4_MIN_CAPABILITY:
        raise ValueError(f"unknown int4 packing format {packing_format!r}; "
                         f"choose one of {sorted(INT4_MIN_CAPABILITY)}")
    what = f"torchao int4 weight-only ({packing_format})"
    capability = cuda_capability()
    if capability is None:
        return False, f"{what} needs a CUDA GPU; there is none here"
    need = INT4_MIN_CAPABILITY[packing_format]
    if capability < need:
        return False, (f"{what} needs {_sm(need)} or higher; this GPU has "
                       f"{_sm(capability)}")
    if packing_format == "plain":
        ok, why = _mslk_int4_kernels()
        if not ok:
            return False, f"{what}: {why}"
    return True, f"{what} runs here ({_sm(capability)})"


def vllm_supported() -> tuple[bool, str]:
    """Whether vLLM can serve on this machine, and why not: ``(ok, reason)``.

    Needs a CUDA GPU of compute capability 7.5 or higher (T4 and newer;
    ``VLLM_MIN_CAPABILITY`` gives the source) and an importable ``vllm``. Its official
    wheels are CUDA-only, so a CPU says no. Used by the inference-backends lab (lab 4).
    """
    capability = cuda_capability()
    if capability is None:
        return False, "vLLM needs a CUDA GPU; there is none here"
    if capability < VLLM_MIN_CAPABILITY:
        return False, (f"vLLM needs {_sm(VLLM_MIN_CAPABILITY)} or higher; this GPU "
                       f"has {_sm(capability)}")
    try:
        import vllm
    except ImportError:
        return False, "vLLM is not installed (pip install vllm)"
    except Exception as e:  # noqa: BLE001 (e.g. a wheel built against another torch)
        return False, f"vLLM fails to import: {type(e).__name__}: {e}"
    version = getattr(vllm, "__version__", "?")
    return True, f"vLLM {version} runs here ({_sm(capability)})"


def profile_name() -> str:
    """``LLMLAB_PROFILE`` if set, else ``gpu`` when CUDA is available, else ``cpu``."""
    name = os.environ.get("LLMLAB_PROFILE", "").strip().lower()
    if name:
        if name not in PROFILES:
            raise ValueError(f"LLMLAB_PROFILE={name!r} is not a profile; choose one of {sorted(PROFILES)}")
        return name
    return "gpu" if has_cuda() else "cpu"


def get_profile(name: str | None = None) -> Profile:
    """The ``Profile`` named ``name`` (default: the one chosen by ``profile_name()``).

    With ``LLMLAB_SMOKE=1`` the ``gpu`` profile comes through ``smoke_profile``."""
    if name is None:
        name = profile_name()
    if not isinstance(name, str):
        raise TypeError(f"profile name must be a str, got {type(name).__name__}")
    if name not in PROFILES:
        raise ValueError(f"unknown profile {name!r}; choose one of {sorted(PROFILES)}")
    if name == "gpu" and smoke_enabled():
        return smoke_profile(PROFILES[name])
    return PROFILES[name]


# ------------------------------------------------------------------- smoke --

SMOKE_ENV = "LLMLAB_SMOKE"
# The only real model this machine reaches offline (llmlab.models.OFFLINE_MODELS; a
# name, not an import: llmlab.models imports this module). It stands in for both of the
# gpu profile's models although they differ: base_model is SmolLM2-360M-Instruct, but
# sft_model is the BASE SmolLM2-360M (no instruction tuning). Same family, tokenizer and
# chat template (ChatML, no {% generation %} markers), so the SFT code path is the same;
# only "starts from a base model" is not reproduced.
SMOKE_MODEL = "smollm2-135m-instruct"
# Upper bounds on the sizes (each setting becomes min(gpu value, cap)): the fewest that
# still run every statement. 4 steps, not fewer: the labs derive step counts from
# train_steps (lab 2: 3/5 of it, lab 3's alignment: 3/10), and each must stay at least 1;
# batches of 2 (padding); 4 validation documents, the fewest that fill one packed row of
# 256 SmolLM2 tokens.
SMOKE_SIZES = {"train_steps": 4, "batch_size": 2, "seq_len": 128, "eval_examples": 2,
               "max_new_tokens": 4, "val_docs": 4}
# What ``llmlab.measure.time_it`` runs under the smoke override (``smoke_timing``): one
# timed call and no warm-up. A smoke run's timings mean nothing (a CPU standing in for
# a GPU, a few tokens); the calls are the code path, repeating them only costs time.
SMOKE_TIMING = {"repeats": 1, "warmup": 0}


def smoke_enabled() -> bool:
    """Whether the smoke override is on: ``LLMLAB_SMOKE`` is ``1`` (off when unset,
    empty or ``0``; any other value raises a ValueError). Chapter: Preface ("How to
    run this course"); ``make test`` runs the gpu path of every lab, and of every chapter
    where the profile picks the model or a branch, on a CPU with it (tests/test_gpu_path.py;
    ``make test-gpu-path`` runs those alone)."""
    value = os.environ.get(SMOKE_ENV, "").strip()
    if value in ("", "0"):
        return False
    if value == "1":
        return True
    raise ValueError(f"{SMOKE_ENV}={value!r} is not understood; set it to 1 (on) or "
                     f"0 / unset (off)")


def smoke_timing() -> bool:
    """Whether timers run ``SMOKE_TIMING`` (one call, no warm-up): the smoke override is on
    and the profile is ``gpu`` (``LLMLAB_PROFILE=gpu``, or CUDA present). The cpu
    profile's timings are never cut. Chapter: Preface ("How to run this course")."""
    return smoke_enabled() and profile_name() == "gpu"


def smoke_profile(p: Profile) -> Profile:
    """The smoke override, which ``get_profile`` applies to the gpu profile when
    ``LLMLAB_SMOKE=1``: a copy of ``p`` with ``base_model`` and ``sft_model`` set to
    ``SMOKE_MODEL`` (the offline SmolLM2-135M-Instruct), ``offline=True`` and
    ``train_steps``, ``batch_size``, ``seq_len``, ``eval_examples``,
    ``max_new_tokens`` and ``val_docs`` capped at ``SMOKE_SIZES``. ``name``, ``dtype`` and
    ``labs_gpu_gb`` stay as they are, so the labs take the same branches: model ids
    and sizes change, nothing else. Chapter: Preface ("How to run this course")."""
    if not isinstance(p, Profile):
        raise TypeError(f"p must be a Profile, got {type(p).__name__}")
    caps = {k: min(getattr(p, k), cap) for k, cap in SMOKE_SIZES.items()}
    return replace(p, base_model=SMOKE_MODEL, sft_model=SMOKE_MODEL, offline=True,
                   **caps)


def set_offline(offline: bool = True) -> None:
    """Tell huggingface_hub, transformers and datasets not to use the network."""
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        if offline:
            os.environ[var] = "1"
        else:
            os.environ.pop(var, None)
    try:  # huggingface_hub reads the variable at import time; keep an imported copy in step
        import huggingface_hub.constants as c
        c.HF_HUB_OFFLINE = offline
    except (ImportError, AttributeError):
        pass


def is_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")


def set_seed(seed: int = 0, threads: int | None = None) -> None:
    """Seed python, numpy and torch; with ``threads``, fix torch's CPU thread count (1 gives the most
    stable timings on a shared machine)."""
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise ValueError(f"threads must be a positive int, got {threads!r}")
    random.seed(seed)
    try:
        import numpy as np
        np.random.seed(seed % 2**32)
    except ImportError:
        pass
    import torch
    torch.manual_seed(seed)
    if threads is not None:
        torch.set_num_threads(threads)


def setup(seed: int = 0, threads: int | None = None, profile: str | None = None, quiet: bool = False) -> Profile:
    """Start of every notebook: choose the profile, go offline on ``cpu``, seed everything, set threads.

    On ``cpu`` the thread count defaults to 1 so that outputs and timings are
    reproducible; so it does under the smoke override (``LLMLAB_SMOKE=1``) without
    CUDA, where CI runs notebooks side by side on few cores (oversubscribed threads
    make timings erratic)."""
    import logging

    p = get_profile(profile)
    if profile is not None:
        os.environ["LLMLAB_PROFILE"] = p.name
    if p.offline:
        set_offline(True)
        # bitsandbytes' CPU backend tries to fetch an optional kernel from the Hub on some CPUs and logs a
        # warning when it cannot; offline that is expected, and the warning differs from machine to machine.
        logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    # torchao logs each optional CUDA extension it cannot load, and torch logs a deprecation for enums torchao
    # registers: noise about GPU kernels, on every import, on a CPU.
    logging.getLogger("torchao").setLevel(logging.ERROR)
    logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)
    if not has_cuda():  # deepspeed (installed for the scaling-out chapter) otherwise logs a timestamped
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # warning when trl or accelerate first import it
    if p.name == "cpu":
        if threads is None:
            threads = 1
        _quiet_loading()
    elif threads is None and smoke_enabled() and not has_cuda():
        threads = 1
    set_seed(seed, threads)
    use_book_style()  # figures sized for the book's column, stored hi-dpi (llmlab.display)
    if not quiet:
        smoke = ""
        if p.name == "gpu" and smoke_enabled():
            smoke = f" | smoke: {SMOKE_ENV}=1"
        print(f"llmlab profile: {p.name} | base model: {p.base_model} | "
              f"offline: {is_offline()} | seed: {seed}{smoke}")
    return p


def _quiet_loading() -> None:
    """No progress bars for loading the course model (instant on a CPU): they would clutter stored outputs.
    Bars for long steps (training, evaluation) stay, in plain text, since widgets need ipywidgets."""
    import warnings

    try:
        from tqdm import TqdmExperimentalWarning, TqdmWarning
        warnings.filterwarnings("ignore", category=TqdmWarning)
        warnings.filterwarnings("ignore", category=TqdmExperimentalWarning)
    except ImportError:
        pass
    try:
        import transformers
        transformers.utils.logging.disable_progress_bar()
    except ImportError:
        pass
    try:  # datasets' map bars (trl tokenizes its training set with them)
        import datasets
        datasets.disable_progress_bars()
    except ImportError:
        pass


def with_overrides(p: Profile, **kw) -> Profile:
    """A copy of ``p`` with some settings changed (for experiments; the profiles themselves stay fixed)."""
    if not isinstance(p, Profile):
        raise TypeError(f"p must be a Profile, got {type(p).__name__}")
    fields = Profile.__dataclass_fields__
    unknown = set(kw) - set(fields)
    if unknown:
        raise ValueError(f"unknown profile settings {sorted(unknown)}")
    for k, v in kw.items():
        expected = type(getattr(p, k))
        if not isinstance(v, expected) or isinstance(v, bool) and expected is not bool:
            raise TypeError(f"{k} must be {expected.__name__}, got {type(v).__name__}")
    return replace(p, **kw)


# ------------------------------------------------------------------ doctor --

def doctor_report() -> dict:
    """What `llmlab doctor` prints: versions, device and free memory, profile, offline, which labs fit."""
    import importlib.metadata as md
    import platform

    import psutil

    versions = {}
    for pkg in ("llmlab", "torch", "transformers", "tokenizers", "peft", "trl", "accelerate", "datasets",
                "bitsandbytes", "safetensors", "huggingface_hub"):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            versions[pkg] = "not installed"
    rep = {"python": platform.python_version(), "versions": versions,
           "cpu_cores": os.cpu_count(), "ram_free_gb": psutil.virtual_memory().available / 1e9}
    gpu_gb = None
    if has_cuda():
        import torch
        free, total = torch.cuda.mem_get_info()
        gpu_gb = free / 1e9
        rep["device"] = f"cuda: {torch.cuda.get_device_name(0)}, {free / 1e9:.1f} of {total / 1e9:.1f} GB free"
    else:
        rep["device"] = "cpu (no CUDA GPU visible)"
    try:
        rep["profile"] = profile_name()
    except ValueError as e:
        rep["profile"] = f"invalid: {e}"
    rep["offline"] = is_offline()
    labs = {}
    for lab, need in PROFILES["gpu"].labs_gpu_gb.items():
        if gpu_gb is None:
            labs[lab] = f"gpu profile needs {need:g} GB of GPU memory; no GPU here, runs with the cpu profile"
        else:
            labs[lab] = (f"fits ({need:g} GB needed, {gpu_gb:.1f} GB free)" if need <= gpu_gb
                         else f"does not fit ({need:g} GB needed, {gpu_gb:.1f} GB free)")
    rep["labs"] = labs
    return rep


def doctor(argv=None) -> int:
    """Console script ``llmlab doctor``."""
    import sys

    args = sys.argv[1:] if argv is None else argv
    if args not in ([], ["doctor"]):
        print("usage: llmlab doctor", file=sys.stderr)
        return 2
    rep = doctor_report()
    print(f"python          {rep['python']}")
    for k, v in rep["versions"].items():
        print(f"{k:<16}{v}")
    print(f"device          {rep['device']}")
    print(f"cpu cores       {rep['cpu_cores']}, {rep['ram_free_gb']:.1f} GB RAM free")
    print(f"profile         {rep['profile']}   (set LLMLAB_PROFILE=cpu|gpu to override)")
    print(f"offline         {rep['offline']}")
    for lab, verdict in rep["labs"].items():
        print(f"lab {lab:<22}{verdict}")
    return 0
