"""Two more inference engines for the same model: CTranslate2 and ONNX Runtime GenAI, converted offline.

Chapter: Inference backends (the lab *One model, every backend*). Each engine has its own file format, made
from the Hugging Face folder by the engine's own converter, and its own decode loop in C++:

- **CTranslate2**: ``ctranslate2.converters.TransformersConverter`` writes ``model.bin`` (weights in
  ``float32``, ``int8``, ...) and ``vocabulary.json``; ``ctranslate2.Generator`` decodes batches of token strings.
- **ONNX Runtime GenAI**: ``onnxruntime_genai.models.builder`` writes an ONNX graph (fused attention with a KV
  cache; ``fp32``, or ``int4`` block-quantized matmuls) and ``genai_config.json``; ``og.Model`` and
  ``og.Generator`` decode token ids.

``convert``, ``load``, ``greedy`` and ``next_token_logits`` give both the same interface, so the lab compares them
with transformers and llama.cpp in one table; the tests check each fp32 model's greedy tokens against
transformers'. ``missing(backend)`` says why an engine cannot run here, for a visible skip.
"""
from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

BACKENDS = ("ctranslate2", "onnxruntime-genai")
# the weight formats each converter writes that run on a CPU (CTranslate2's quantization names; the builder's -p)
PRECISIONS = {"ctranslate2": ("float32", "int8", "int8_float32", "int16"),
              "onnxruntime-genai": ("fp32", "int8", "int4")}
_MODULES = {"ctranslate2": ("ctranslate2",), "onnxruntime-genai": ("onnxruntime_genai", "onnx", "onnx_ir")}


def _backend(backend):
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a str, got {type(backend).__name__}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return backend


def missing(backend: str) -> str | None:
    """Why ``backend`` cannot run here (one line for a visible skip), or None when it can."""
    _backend(backend)
    absent = [m for m in _MODULES[backend] if importlib.util.find_spec(m) is None]
    if absent:
        pip = {"ctranslate2": "ctranslate2", "onnxruntime_genai": "onnxruntime-genai", "onnx": "onnx",
               "onnx_ir": "onnx-ir"}
        return f"needs {', '.join(pip[m] for m in absent)} (pip install {' '.join(pip[m] for m in absent)})"
    return None


def _require(backend):
    reason = missing(backend)
    if reason:
        raise RuntimeError(f"{backend} {reason}")


# ------------------------------------------------------------------ converting --

# The ONNX Runtime GenAI builder finds the LM head as "any Linear whose output size is the vocabulary size".
# The course model's MLP is exactly as wide as its vocabulary (768), so every gate and up projection matched and
# the logits were read off the first layer (max |logit diff| ~12 against transformers, garbage text). When the
# model has an ``lm_head`` attribute (every Hugging Face causal LM), we make the builder take that module only.
_BUILD = """
import runpy, sys
import onnxruntime_genai.models  # puts the builder's folder on sys.path: it imports `builders`
import builders.base as base

_has_lm_head = base.Model.has_lm_head


def has_lm_head(self, module):
    head = getattr(self.weights, "lm_head", None)
    if isinstance(head, base.torch.nn.Module):
        return module is head
    return _has_lm_head(self, module)


base.Model.has_lm_head = has_lm_head
runpy.run_module("onnxruntime_genai.models.builder", run_name="__main__")
"""


def convert(backend: str, model_dir, out_dir, precision: str) -> Path:
    """Convert a Hugging Face model folder into ``out_dir`` with the engine's own converter; returns ``out_dir``.

    ``precision``: one of ``PRECISIONS[backend]`` (CTranslate2: ``float32``, ``int8``...; ONNX Runtime GenAI:
    ``fp32``, ``int8``, ``int4``, for the CPU). The builder runs in a subprocess (it is a script)."""
    _backend(backend)
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    if not (model_dir / "config.json").is_file():
        raise ValueError(f"{model_dir} is not a Hugging Face model folder (no config.json)")
    if precision not in PRECISIONS[backend]:
        raise ValueError(f"precision for {backend} must be one of {PRECISIONS[backend]}, got {precision!r}")
    _require(backend)
    if backend == "ctranslate2":
        import ctranslate2

        converter = ctranslate2.converters.TransformersConverter(str(model_dir))
        converter.convert(str(out_dir), quantization=precision, force=True)
        return out_dir
    cache = out_dir.with_name(out_dir.name + ".builder-cache")
    proc = subprocess.run([sys.executable, "-c", _BUILD, "-i", str(model_dir), "-o", str(out_dir), "-p", precision,
                           "-e", "cpu", "-c", str(cache)], capture_output=True, text=True)
    shutil.rmtree(cache, ignore_errors=True)  # the builder's download cache: empty for a local folder
    if proc.returncode != 0 or not (out_dir / "genai_config.json").is_file():
        raise RuntimeError(f"onnxruntime_genai.models.builder failed:\n{(proc.stderr or proc.stdout)[-3000:]}")
    return out_dir


def file_bytes(path) -> int:
    """Bytes of every file of a converted model folder (or of one file)."""
    path = Path(path)
    if not path.exists():
        raise ValueError(f"nothing at {path}")
    return path.stat().st_size if path.is_file() else sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


# ------------------------------------------------------------------ running --

@dataclass
class Engine:
    """A loaded model: ``backend``, its folder, and the engine's own object (``ctranslate2.Generator`` or
    ``onnxruntime_genai.Model``); ``vocab`` maps ids to CTranslate2's token strings."""
    backend: str
    path: Path
    model: object
    vocab: list | None = None


def load(backend: str, path, threads: int = 1) -> Engine:
    """Load a converted model for the CPU with ``threads`` threads (1: reproducible timings)."""
    _backend(backend)
    path = Path(path)
    if isinstance(threads, bool) or not isinstance(threads, int):
        raise TypeError(f"threads must be an int, got {type(threads).__name__}")
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    _require(backend)
    if backend == "ctranslate2":
        import ctranslate2

        if not (path / "model.bin").is_file():
            raise ValueError(f"{path} is not a CTranslate2 model folder (no model.bin)")
        vocab = json.loads((path / "vocabulary.json").read_text())
        model = ctranslate2.Generator(str(path), device="cpu", intra_threads=threads, inter_threads=1)
        return Engine(backend, path, model, vocab)
    import onnxruntime_genai as og

    if not (path / "genai_config.json").is_file():
        raise ValueError(f"{path} is not an ONNX Runtime GenAI model folder (no genai_config.json)")
    config = og.Config(str(path))
    config.clear_providers()  # the CPU
    config.overlay(json.dumps({"model": {"decoder": {"session_options": {
        "intra_op_num_threads": threads, "inter_op_num_threads": 1}}}}))
    return Engine(backend, path, og.Model(config))


def _engine(engine):
    if not isinstance(engine, Engine):
        raise TypeError(f"expected an Engine (llmlab.backends.load), got {type(engine).__name__}")
    return engine


def _batch(ids):
    """A batch of prompts as lists of ints; one prompt (a flat list) is a batch of one."""
    if hasattr(ids, "tolist"):
        ids = ids.tolist()
    if not isinstance(ids, (list, tuple)) or not ids:
        raise TypeError("ids must be a non-empty list of token ids, or a list of such lists")
    single = not isinstance(ids[0], (list, tuple))
    batch = [ids] if single else list(ids)
    for row in batch:
        if not isinstance(row, (list, tuple)) or not row:
            raise ValueError("every prompt must be a non-empty list of token ids")
        if not all(isinstance(i, int) and not isinstance(i, bool) for i in row):
            raise TypeError("token ids must be ints")
    return [list(r) for r in batch], single


def greedy(engine: Engine, ids, max_new_tokens: int) -> list:
    """Exactly ``max_new_tokens`` greedy token ids after each prompt (no stop at the end of text, so the speed
    tables time the same work everywhere, as ``model.generate(..., min_new_tokens=n)`` does).

    ``ids``: one prompt (a list of ints; returns a list of ints) or a batch (a list of lists; returns a list of
    lists). ONNX Runtime GenAI batches prompts of one length only (it would need padding otherwise)."""
    _engine(engine)
    batch, single = _batch(ids)
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int):
        raise TypeError(f"max_new_tokens must be an int, got {type(max_new_tokens).__name__}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if engine.backend == "ctranslate2":
        vocab = engine.vocab
        if any(not 0 <= i < len(vocab) for row in batch for i in row):
            raise ValueError(f"token ids must be in [0, {len(vocab)})")
        tokens = [[vocab[i] for i in row] for row in batch]
        results = engine.model.generate_batch(tokens, max_length=max_new_tokens, min_length=max_new_tokens,
                                              sampling_topk=1, beam_size=1, include_prompt_in_result=False)
        out = [r.sequences_ids[0] for r in results]
    else:
        import numpy as np
        import onnxruntime_genai as og

        if len({len(r) for r in batch}) != 1:
            raise ValueError("onnxruntime-genai: the prompts of a batch must have the same length (no padding here)")
        n = len(batch[0])
        params = og.GeneratorParams(engine.model)
        params.set_search_options(do_sample=False, max_length=n + max_new_tokens, min_length=n + max_new_tokens,
                                  batch_size=len(batch))
        generator = og.Generator(engine.model, params)
        generator.append_tokens(np.array(batch, dtype=np.int32))
        steps = []
        while not generator.is_done():
            generator.generate_next_token()
            steps.append(generator.get_next_tokens().tolist())
        out = [list(col) for col in zip(*steps)]
    return out[0] if single else out


def next_token_logits(engine: Engine, ids) -> "numpy.ndarray":  # noqa: F821
    """The logits (vocab,) the model gives the token after one prompt ``ids`` (a list of ints)."""
    import numpy as np

    _engine(engine)
    batch, single = _batch(ids)
    if not single:
        raise ValueError("next_token_logits takes one prompt (a list of ints)")
    if engine.backend == "ctranslate2":
        return np.asarray(engine.model.forward_batch(batch))[0, -1].astype(np.float32)
    import onnxruntime_genai as og

    params = og.GeneratorParams(engine.model)
    params.set_search_options(do_sample=False, max_length=len(batch[0]) + 1, batch_size=1)
    generator = og.Generator(engine.model, params)
    generator.append_tokens(np.array(batch, dtype=np.int32))
    return np.asarray(generator.get_logits()).reshape(-1).astype(np.float32)
