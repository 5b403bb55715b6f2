"""llama.cpp from Python: convert a Hugging Face model to GGUF, quantize it, and measure it like the others.

Chapters: Quantization (the GGUF rows of the quantization lab) and Inference and serving. The conversion is
llama.cpp's own ``convert_hf_to_gguf.py``, taken from the source distribution of the installed
``llama-cpp-python`` so the converter and the compiled library are the same llama.cpp; quantization is
llama.cpp's ``llama_model_quantize``, called through ``llama_cpp``'s bindings. Perplexity and task accuracy use
the same rows, prompts and post-processing as ``llmlab.pretrain.evaluate`` and ``llmlab.infer``, so a GGUF row
sits in the same table as a PyTorch row.
"""
from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

# llama.cpp's quantization types the course uses, by the name ``llama-quantize`` prints (llama.h's llama_ftype).
FTYPES = {"F32": 0, "F16": 1, "Q4_0": 2, "Q8_0": 7, "Q2_K": 10, "Q3_K_M": 12, "Q4_K_M": 15, "Q5_K_M": 17,
          "Q6_K": 18}
CONVERTER_FILES = ("convert_hf_to_gguf.py", "conversion", "gguf-py")


def missing() -> str | None:
    """Why llama.cpp cannot run here (a line for a visible skip), or None when ``llama_cpp`` imports."""
    try:
        import llama_cpp  # noqa: F401
    except ImportError as e:
        return f"needs llama-cpp-python, which compiles llama.cpp when installed ({e})"
    return None


def _llama_cpp():
    reason = missing()
    if reason:
        raise RuntimeError(reason)
    import llama_cpp

    return llama_cpp


def _cache_root() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "llmlab"


def converter_dir(fetch: bool = True) -> Path:
    """The llama.cpp source folder holding ``convert_hf_to_gguf.py``, for the installed llama-cpp-python.

    ``$LLAMA_CPP_DIR`` wins when set (a llama.cpp checkout). Otherwise the converter is unpacked once from
    llama-cpp-python's source distribution on PyPI (``pip download``) into ``~/.cache/llmlab``; ``make venv``
    does that at install time, so tests run offline."""
    if os.environ.get("LLAMA_CPP_DIR"):
        path = Path(os.environ["LLAMA_CPP_DIR"])
        if not (path / "convert_hf_to_gguf.py").is_file():
            raise ValueError(f"LLAMA_CPP_DIR={path} holds no convert_hf_to_gguf.py")
        return path
    version = _llama_cpp().__version__
    path = _cache_root() / f"llama.cpp-{version}"
    if all((path / f).exists() for f in CONVERTER_FILES):
        return path
    if not fetch:
        raise FileNotFoundError(f"no llama.cpp converter at {path}; run `python -m llmlab.llamacpp fetch`")
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
                        f"llama-cpp-python=={version}", "-d", tmp], check=True)
        (sdist,) = Path(tmp).glob("llama_cpp_python-*.tar.gz")
        prefix = f"{sdist.name[:-len('.tar.gz')]}/vendor/llama.cpp/"
        staging = path.with_name(path.name + ".partial")
        with tarfile.open(sdist) as tar:
            wanted = [m for m in tar.getmembers() if m.name.startswith(prefix)
                      and m.name[len(prefix):].split("/")[0] in CONVERTER_FILES]
            for m in wanted:
                m.name = m.name[len(prefix):]
            tar.extractall(staging, members=wanted, filter="data")
        staging.replace(path)
    return path


# The converter recognises a BPE tokenizer by hashing how it splits a test string; a tokenizer it has never seen
# (ours) is refused. Ours is byte-level BPE with GPT-2's pre-tokenizer, so we name that one, and the tests check
# that llama.cpp then tokenizes exactly as the Hugging Face tokenizer does.
_CONVERT = """
import runpy, sys
src, pre = sys.argv.pop(1), sys.argv.pop(1)
sys.path[:0] = [src, src + "/gguf-py"]
if pre:
    import conversion.base as base
    base.TextModel.get_vocab_base_pre = lambda self, tokenizer: pre
runpy.run_path(src + "/convert_hf_to_gguf.py", run_name="__main__")
"""


def convert(model_dir, outfile, outtype: str = "f32", pre_tokenizer: str | None = "gpt-2") -> Path:
    """Convert a Hugging Face model folder to a GGUF file with llama.cpp's ``convert_hf_to_gguf.py``.

    ``outtype``: ``f32``, ``f16``, ``bf16`` or ``q8_0`` (what the converter writes itself; k-quants come from
    ``quantize``). ``pre_tokenizer`` names the tokenizer's pre-tokenizer for models the converter does not know
    (None: let the converter recognise it)."""
    model_dir, outfile = Path(model_dir), Path(outfile)
    if not (model_dir / "config.json").is_file():
        raise ValueError(f"{model_dir} is not a Hugging Face model folder (no config.json)")
    if outtype not in ("f32", "f16", "bf16", "q8_0"):
        raise ValueError(f"outtype must be f32, f16, bf16 or q8_0, got {outtype!r}")
    src = converter_dir()
    proc = subprocess.run([sys.executable, "-c", _CONVERT, str(src), pre_tokenizer or "", str(model_dir),
                           "--outfile", str(outfile), "--outtype", outtype],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"convert_hf_to_gguf.py failed:\n{proc.stderr[-3000:]}")
    return outfile


@contextlib.contextmanager
def _silenced():
    """Nothing reaches stdout or stderr inside: neither Python's streams nor what C code writes to file
    descriptors 1 and 2 (llama.cpp's quantizer warns per tensor there, whatever its log level)."""
    import io

    sys.stdout.flush(), sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    try:
        with open(os.devnull, "w") as null, contextlib.redirect_stdout(io.StringIO()), \
                contextlib.redirect_stderr(io.StringIO()):
            os.dup2(null.fileno(), 1), os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved[0], 1), os.dup2(saved[1], 2)
        for fd in saved:
            os.close(fd)


def quantize(infile, outfile, kind: str = "Q4_K_M", threads: int = 1, verbose: bool = False) -> Path:
    """Quantize a GGUF file with llama.cpp's ``llama_model_quantize`` (what the ``llama-quantize`` tool runs);
    ``verbose`` shows llama.cpp's log, a line per tensor with the type it chose, and its warnings (a tensor
    whose rows do not fit the type's blocks falls back to another type: ``tensor_types`` counts the result)."""
    import logging

    llama_cpp = _llama_cpp()
    # llama_cpp routes llama.cpp's log through this logger; at NOTSET it prints every line
    logging.getLogger("llama-cpp-python").setLevel(logging.DEBUG if verbose else logging.ERROR)
    if kind not in FTYPES:
        raise ValueError(f"kind must be one of {sorted(FTYPES)}, got {kind!r}")
    if not Path(infile).is_file():
        raise ValueError(f"no GGUF file at {infile}")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = FTYPES[kind]
    params.nthread = threads
    with contextlib.nullcontext() if verbose else _silenced():
        status = llama_cpp.llama_model_quantize(str(infile).encode(), str(outfile).encode(), params)
    if status != 0:
        raise RuntimeError(f"llama_model_quantize returned {status} for {kind}")
    return Path(outfile)


def tensor_types(path) -> dict:
    """How many tensors of a GGUF file are stored in each type (``{"Q5_0": 180, "F32": 61, ...}``, most first),
    read with the ``gguf`` package. A quantization preset names the type it aims for; llama.cpp falls back to
    another where a tensor's rows do not fit the type's blocks (k-quants need rows of a multiple of 256 weights).
    Chapter: Lab 1 (what a Q4_K_M file of SmolLM2-135M holds)."""
    from collections import Counter

    from gguf import GGUFReader

    if not Path(path).is_file():
        raise ValueError(f"no GGUF file at {path}")
    counts = Counter(t.tensor_type.name for t in GGUFReader(str(path)).tensors)
    return dict(counts.most_common())


KV_CACHE_TYPES = {"f32": 0, "f16": 1}  # ggml_type numbers


def load(path, n_ctx: int = 512, threads: int | None = None, kv_cache: str = "f16"):
    """A ``llama_cpp.Llama`` for a GGUF file, quiet, with logits kept for every position (for perplexity).

    ``kv_cache``: llama.cpp stores keys and values in f16 by default, even for an f32 model; that alone moves
    the course model's logits by about 3e-3. ``"f32"`` keeps them exact to about 1e-5 of PyTorch's."""
    llama_cpp = _llama_cpp()
    if not Path(path).is_file():
        raise ValueError(f"no GGUF file at {path}")
    if kv_cache not in KV_CACHE_TYPES:
        raise ValueError(f"kv_cache must be one of {sorted(KV_CACHE_TYPES)}, got {kv_cache!r}")
    if threads is None:
        import torch

        threads = torch.get_num_threads()
    return llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, n_threads=threads,
                           n_threads_batch=threads, logits_all=True, verbose=False,
                           type_k=KV_CACHE_TYPES[kv_cache], type_v=KV_CACHE_TYPES[kv_cache])


def _llm(llm):
    llama_cpp = _llama_cpp()
    if not isinstance(llm, llama_cpp.Llama):
        raise TypeError(f"expected a llama_cpp.Llama (llmlab.llamacpp.load), got {type(llm).__name__}")
    return llm


def weights_bytes(llm) -> int:
    """Bytes of the model's tensors as llama.cpp holds them (``llama_model_size``)."""
    return int(_llama_cpp().llama_model_size(_llm(llm).model))


def logits(llm, ids) -> "numpy.ndarray":  # noqa: F821
    """Logits (len(ids), vocab) for every position of ``ids``, computed from an empty context."""
    _llm(llm)
    ids = [int(i) for i in ids]
    if not ids:
        raise ValueError("ids must not be empty")
    if len(ids) > llm.n_ctx():
        raise ValueError(f"{len(ids)} tokens do not fit a context of {llm.n_ctx()}")
    llm.reset()
    llm.eval(ids)
    return llm.scores[: len(ids)].copy()


def evaluate(llm, rows) -> float:
    """Mean next-token cross-entropy (nats/token) over ``rows``, as ``llmlab.pretrain.evaluate`` computes it."""
    import torch

    if not isinstance(rows, torch.Tensor) or rows.dim() != 2:
        raise TypeError("rows must be a 2-D tensor of token ids (llmlab.pretrain.validation_rows)")
    total, count = 0.0, 0
    for row in rows.tolist():
        lg = torch.from_numpy(logits(llm, row))[:-1].float()
        total += torch.nn.functional.cross_entropy(lg, torch.tensor(row[1:]), reduction="sum").item()
        count += len(row) - 1
    return total / count


def generate(llm, tokenizer, prompts: list[str], max_new_tokens: int = 32) -> list[str]:
    """Greedy completions of formatted ``prompts``, tokenized by the Hugging Face tokenizer and cut at the first
    newline, as ``llmlab.infer.generate`` does."""
    if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
        raise TypeError("prompts must be a list of strings")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
    out = []
    for prompt in prompts:
        ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        new = greedy(llm, ids, max_new_tokens, stop=lambda new: new[-1] == tokenizer.eos_token_id
                     or "\n" in tokenizer.decode(new))
        out.append(tokenizer.decode(new, skip_special_tokens=True).strip().split("\n")[0].strip())
    return out


def greedy(llm, ids, max_new_tokens: int, stop=None) -> list[int]:
    """Up to ``max_new_tokens`` greedy token ids after ``ids``; ``stop(new_ids)`` ends early when true (None:
    never, which is how the speed tables time exactly ``max_new_tokens`` tokens)."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
    _llm(llm)
    ids = [int(i) for i in ids]
    if not ids:
        raise ValueError("ids must not be empty")
    new = []
    for token in llm.generate(ids, top_k=1, temp=0.0, reset=True):
        new.append(int(token))
        if len(new) == max_new_tokens or (stop is not None and stop(new)):
            break
    return new


def score(llm, tokenizer, tasks, style: str = "qa", max_new_tokens: int = 32) -> list[dict]:
    """``llmlab.infer.score`` for a llama.cpp model: each course task answered greedily and checked."""
    from llmlab import infer

    prompts = [infer.format_prompt(tokenizer, t.prompt, style) for t in tasks]
    return infer.score_completions(tasks, generate(llm, tokenizer, prompts, max_new_tokens))


if __name__ == "__main__":  # python -m llmlab.llamacpp fetch: unpack the converter (make venv runs this)
    if sys.argv[1:] != ["fetch"]:
        sys.exit("usage: python -m llmlab.llamacpp fetch")
    print(f"llama.cpp converter: {converter_dir()}")
