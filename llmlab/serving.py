"""Serving a model behind an OpenAI-compatible HTTP API, and measuring it as its users feel it.

Chapter: Serving: latency, throughput and the backends. ``LlamaCppServer`` starts llama-cpp-python's
OpenAI-compatible server (``python -m llama_cpp.server``) on a GGUF file, and ``TransformersServer`` starts
``transformers serve`` (with or without continuous batching) on a model folder; each runs as a subprocess on a
free localhost port and is always stopped again. ``stream_completion`` sends one streamed request through the
official ``openai`` client and times it (time to first token, time per output token); ``load_test`` sends many at
once and reports the trade-off a server makes between latency and throughput.

Two of llama-cpp-python's server defaults differ from what the course compares against:
- ``repeat_penalty`` defaults to 1.1 (Hugging Face's ``repetition_penalty`` defaults to 1.0). llama.cpp applies
  penalties before its greedy sampler, so even ``temperature=0`` output differs from plain greedy decoding;
  ``stream_completion`` sends ``repeat_penalty=1.0`` unless told otherwise.
- ``interrupt_requests`` defaults to True: a streaming answer is cut short as soon as another request waits.
  ``LlamaCppServer`` turns it off, so that concurrent requests queue instead of cutting each other off.
That server holds one ``llama_cpp.Llama`` behind a lock: it answers one request at a time (no batching across
requests), and it reuses the KV cache of the previous request's longest common prefix (prefix caching).
"""
from __future__ import annotations

import atexit
import importlib.util
import math
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from numbers import Real
from pathlib import Path

# what ``pip install llama-cpp-python[server]`` adds (module names), and the client
SERVER_MODULES = ("fastapi", "uvicorn", "sse_starlette", "starlette_context", "pydantic_settings", "yaml")
CLIENT_MODULES = ("openai",)
KV_CACHE_TYPES = {"f32": 0, "f16": 1}  # ggml_type numbers, as llmlab.llamacpp.KV_CACHE_TYPES
# sent with every request unless the caller overrides it: llama.cpp's 1.1 penalty changes even greedy output
GREEDY_EXTRA_BODY = {"repeat_penalty": 1.0}


def missing() -> str | None:
    """Why the server cannot run here (one line for a visible skip), or None."""
    from llmlab import llamacpp

    reason = llamacpp.missing()
    if reason:
        return reason
    absent = [m for m in SERVER_MODULES if importlib.util.find_spec(m) is None]
    if absent:
        return (f"needs llama-cpp-python's server dependencies (missing: {', '.join(absent)}; "
                "pip install fastapi uvicorn sse-starlette starlette-context pydantic-settings pyyaml)")
    if any(importlib.util.find_spec(m) is None for m in CLIENT_MODULES):
        return "needs the openai client (pip install openai)"
    return None


# ------------------------------------------------------------------ checks --

def _positive_int(v, name):
    if isinstance(v, bool) or not isinstance(v, int):
        raise TypeError(f"{name} must be an int, got {type(v).__name__}")
    if v < 1:
        raise ValueError(f"{name} must be >= 1, got {v}")
    return v


def _real(v, name, low=0.0, low_open=False):
    if isinstance(v, bool) or not isinstance(v, Real):
        raise TypeError(f"{name} must be a number, got {type(v).__name__}")
    if not math.isfinite(v) or v < low or (low_open and v == low):
        raise ValueError(f"{name} must be a finite number {'>' if low_open else '>='} {low}, got {v}")
    return float(v)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------ the servers --

class OpenAIServer:
    """An OpenAI-compatible HTTP server run as a subprocess on 127.0.0.1, as a context manager. Subclasses say
    which command starts it (``command``), which path answers once it is ready (``ready_path``) and which
    ``extra_body`` makes ``temperature=0`` plain greedy decoding (``greedy_extra_body``). Chapter: Serving."""

    ready_path = "/v1/models"
    greedy_extra_body: dict | None = None

    def __init__(self, model: str, port: int | None = None, startup_timeout: float = 60):
        if port is not None:
            _positive_int(port, "port")
            if port > 65535:
                raise ValueError(f"port must be <= 65535, got {port}")
        self.startup_timeout = _real(startup_timeout, "startup_timeout", low_open=True)
        self.port = port
        self.model = model  # the name requests use in their ``model`` field
        self.process: subprocess.Popen | None = None
        self._log = None
        self._log_path: Path | None = None

    def command(self) -> list[str]:
        raise NotImplementedError

    def environment(self) -> dict:
        return dict(os.environ)

    @property
    def base_url(self) -> str:
        """The API root the ``openai`` client talks to: ``http://127.0.0.1:PORT/v1``."""
        if self.port is None:
            raise RuntimeError("the server has not been started")
        return f"http://127.0.0.1:{self.port}/v1"

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def log_tail(self, chars: int = 3000) -> str:
        """The end of the server's log (stdout and stderr)."""
        if self._log_path is None or not self._log_path.exists():
            return ""
        return self._log_path.read_text(errors="replace")[-chars:]

    def _check_ready(self) -> None:
        reason = missing()
        if reason:
            raise RuntimeError(reason)

    def start(self):
        """Start the server and wait until ``ready_path`` answers 200; RuntimeError (with the end of the
        server's log) if it exits or does not answer within ``startup_timeout`` seconds."""
        self._check_ready()
        if self.running():
            raise RuntimeError(f"the server is already running at {self.base_url}")
        if self.port is None:
            self.port = free_port()
        fd, name = tempfile.mkstemp(prefix="llmlab-server-", suffix=".log")
        os.close(fd)
        self._log_path = Path(name)
        self._log = open(self._log_path, "wb")
        self.process = subprocess.Popen(self.command(), stdout=self._log, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL, env=self.environment())
        atexit.register(self.stop)  # a notebook kernel that exits never leaves a server behind
        url = f"http://127.0.0.1:{self.port}{self.ready_path}"
        deadline = time.monotonic() + self.startup_timeout
        while True:
            if self.process.poll() is not None:
                tail = self.log_tail()
                self.stop()
                raise RuntimeError(f"{type(self).__name__}: the server exited with code "
                                   f"{self.process.returncode}:\n{tail}")
            try:
                with urllib.request.urlopen(url, timeout=2) as r:
                    if r.status == 200:
                        return self
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                pass
            if time.monotonic() > deadline:
                tail = self.log_tail()
                self.stop()
                raise RuntimeError(f"{type(self).__name__}: the server did not answer within "
                                   f"{self.startup_timeout:g} s:\n{tail}")
            time.sleep(0.1)

    def stop(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL after 5 s) and delete its log; safe to call twice."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=5)
        if self._log is not None:
            self._log.close()
            self._log = None
        if self._log_path is not None:  # the log's tail is in any error raised; the file itself is not kept
            self._log_path.unlink(missing_ok=True)
            self._log_path = None
        try:
            atexit.unregister(self.stop)
        except Exception:  # noqa: BLE001 - unregistering is best effort
            pass

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def client(self, timeout: float = 120.0):
        """An ``openai.OpenAI`` client for this server (the api key is a dummy: the server checks none)."""
        import openai

        return openai.OpenAI(base_url=self.base_url, api_key="not-needed", timeout=timeout, max_retries=0)


class LlamaCppServer(OpenAIServer):
    """llama-cpp-python's OpenAI-compatible server on a GGUF file::

        with LlamaCppServer("course-f32.gguf") as server:
            client = server.client()
            client.completions.create(model=server.model, prompt="Mia has a", max_tokens=8)

    Starts ``python -m llama_cpp.server`` on 127.0.0.1 (a free port unless ``port`` is given), waits until
    ``/v1/models`` answers, and on exit stops the process (terminate, then kill). ``kv_cache="f32"`` keeps keys and
    values in f32, as ``llmlab.llamacpp.load(kv_cache="f32")`` does, so the server's greedy tokens are the
    in-process ones. The server answers one request at a time (one ``llama_cpp.Llama`` behind a lock): no
    batching across requests. Chapter: Serving."""

    greedy_extra_body = GREEDY_EXTRA_BODY  # llama.cpp's default repeat_penalty 1.1 changes even greedy output

    def __init__(self, gguf_path, port: int | None = None, n_ctx: int = 512, threads: int = 1,
                 kv_cache: str = "f32", startup_timeout: float = 60):
        if not isinstance(gguf_path, (str, os.PathLike)):
            raise TypeError(f"gguf_path must be a path, got {type(gguf_path).__name__}")
        self.gguf_path = Path(gguf_path)
        if not self.gguf_path.is_file():
            raise ValueError(f"no GGUF file at {self.gguf_path}")
        self.n_ctx = _positive_int(n_ctx, "n_ctx")
        self.threads = _positive_int(threads, "threads")
        if kv_cache not in KV_CACHE_TYPES:
            raise ValueError(f"kv_cache must be one of {sorted(KV_CACHE_TYPES)}, got {kv_cache!r}")
        self.kv_cache = kv_cache
        super().__init__(self.gguf_path.stem, port, startup_timeout)  # the name it answers to (--model_alias)

    def command(self) -> list[str]:
        """The command line that starts the server (printed by the chapter)."""
        kv = str(KV_CACHE_TYPES[self.kv_cache])
        return [sys.executable, "-m", "llama_cpp.server", "--model", str(self.gguf_path),
                "--model_alias", self.model, "--host", "127.0.0.1", "--port", str(self.port),
                "--n_ctx", str(self.n_ctx), "--n_batch", str(self.n_ctx), "--n_ubatch", str(self.n_ctx),
                "--n_threads", str(self.threads), "--n_threads_batch", str(self.threads),
                "--type_k", kv, "--type_v", kv, "--interrupt_requests", "False"]


class TransformersServer(OpenAIServer):
    """``transformers serve``: Hugging Face transformers' own OpenAI-compatible server, on a local model folder,
    with continuous batching over a paged KV cache (``continuous_batching=True``) or one ``generate`` per request.

    On a CPU the paged cache is sized explicitly (``num_blocks`` pages of ``block_size`` tokens, at most
    ``max_batch_tokens`` tokens per step): left to itself it sizes the cache from the machine's memory, which
    takes tens of seconds on the first request. ``threads`` sets the server's torch threads (OMP_NUM_THREADS). It
    answers to the model folder's path, runs offline, and rejects fields it does not know (so
    ``greedy_extra_body`` is None). Chapter: Serving."""

    ready_path = "/health"  # its /v1/models lists the Hub cache, which need not exist offline

    def __init__(self, model_dir, port: int | None = None, continuous_batching: bool = True, threads: int = 1,
                 num_blocks: int = 64, block_size: int = 32, max_batch_tokens: int = 256, device: str = "cpu",
                 startup_timeout: float = 120):
        if not isinstance(model_dir, (str, os.PathLike)):
            raise TypeError(f"model_dir must be a path, got {type(model_dir).__name__}")
        self.model_dir = Path(model_dir)
        if not (self.model_dir / "config.json").is_file():
            raise ValueError(f"{self.model_dir} is not a Hugging Face model folder (no config.json)")
        if not isinstance(continuous_batching, bool):
            raise TypeError(f"continuous_batching must be a bool, got {type(continuous_batching).__name__}")
        self.continuous_batching = continuous_batching
        self.threads = _positive_int(threads, "threads")
        self.num_blocks = _positive_int(num_blocks, "num_blocks")
        self.block_size = _positive_int(block_size, "block_size")
        self.max_batch_tokens = _positive_int(max_batch_tokens, "max_batch_tokens")
        if not isinstance(device, str) or not device:
            raise TypeError(f"device must be a str such as 'cpu' or 'cuda', got {device!r}")
        self.device = device
        super().__init__(str(self.model_dir), port, startup_timeout)

    def _check_ready(self) -> None:
        absent = [m for m in ("fastapi", "uvicorn", "openai") if importlib.util.find_spec(m) is None]
        if absent:
            raise RuntimeError(f"transformers serve needs {', '.join(absent)} (pip install fastapi uvicorn openai)")

    def command(self) -> list[str]:
        cmd = [sys.executable, "-c", "import sys; from transformers.cli.transformers import main; sys.exit(main())",
               "serve", str(self.model_dir), "--host", "127.0.0.1", "--port", str(self.port),
               "--device", self.device, "--dtype", "float32"]
        if self.continuous_batching:
            cmd += ["--continuous-batching", "--cb-num-blocks", str(self.num_blocks),
                    "--cb-block-size", str(self.block_size), "--cb-max-batch-tokens", str(self.max_batch_tokens)]
        else:
            cmd += ["--no-continuous-batching"]
        return cmd

    def environment(self) -> dict:
        env = dict(os.environ, OMP_NUM_THREADS=str(self.threads), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
        env.setdefault("TOKENIZERS_PARALLELISM", "false")
        return env


# ------------------------------------------------------------------ measuring --

def _client(client):
    try:
        import openai
    except ImportError as e:
        raise RuntimeError(missing() or str(e)) from e
    if not isinstance(client, openai.OpenAI):
        raise TypeError(f"client must be an openai.OpenAI client (LlamaCppServer.client()), "
                        f"got {type(client).__name__}")
    return client


def stream_completion(client, model: str, prompt: str, max_tokens: int = 32, temperature: float = 0.0,
                      **kw) -> dict:
    """One streamed ``/v1/completions`` request through the official ``openai`` client, timed as a user sees it.

    Returns ``text``, ``tokens`` (the stream's reported usage, else the chunks that carried text:
    llama-cpp-python sends one per token), ``chunks``,
    ``ttft_s`` (request sent to first text: queueing, prefill and the first decode step), ``tpot_s`` (mean gap
    between the later tokens: decode), ``total_s`` and ``finish_reason``. llama.cpp's ``repeat_penalty=1.0`` is sent
    as ``extra_body`` unless the caller passes its own (``extra_body=None`` for servers that reject unknown fields);
    other keyword arguments go to ``client.completions.create``. Chapter: Serving."""
    _client(client)
    if not isinstance(model, str) or not model:
        raise TypeError(f"model must be a non-empty str, got {model!r}")
    if not isinstance(prompt, str):
        raise TypeError(f"prompt must be a str, got {type(prompt).__name__}")
    if not prompt:
        raise ValueError("prompt must not be empty")
    _positive_int(max_tokens, "max_tokens")
    temperature = _real(temperature, "temperature")
    extra_body = kw.pop("extra_body") if "extra_body" in kw else GREEDY_EXTRA_BODY
    times, pieces, finish, usage = [], [], None, None
    t0 = time.perf_counter()
    stream = client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens,
                                       temperature=temperature, stream=True, extra_body=extra_body, **kw)
    for chunk in stream:
        now = time.perf_counter()
        usage = getattr(chunk, "usage", None) or usage
        if not chunk.choices:
            continue
        choice = chunk.choices[0]
        if choice.text:
            times.append(now)
            pieces.append(choice.text)
        finish = choice.finish_reason or finish
    total = time.perf_counter() - t0
    # servers that report usage in the stream (transformers serve) give the token count; otherwise each text
    # chunk is one token (llama-cpp-python sends one per token)
    n = usage.completion_tokens if usage is not None and usage.completion_tokens else len(times)
    return {"text": "".join(pieces), "tokens": n, "chunks": len(times),
            "ttft_s": times[0] - t0 if times else total,
            "tpot_s": (times[-1] - times[0]) / (n - 1) if n > 1 and times else float("nan"),
            "total_s": total, "finish_reason": finish}


def _percentile(xs, q):
    xs = sorted(x for x in xs if not math.isnan(x))
    if not xs:
        return float("nan")
    k = (len(xs) - 1) * q / 100
    lo, hi = math.floor(k), math.ceil(k)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def load_test(client, model: str, prompts: list[str], concurrency: int, max_tokens: int = 32, **kw) -> dict:
    """``len(prompts)`` streamed requests sent by ``concurrency`` threads at once (a closed loop: each thread
    sends its next request when the last one is answered). Reports ``requests_per_s`` and ``tokens_per_s``
    (output tokens over the wall time), median and p90 ``ttft_s``, ``tpot_s`` and ``latency_s`` (whole request),
    and ``results`` (each request's ``stream_completion`` dict, in prompt order). Chapter: Serving."""
    _client(client)
    if isinstance(prompts, str) or not isinstance(prompts, (list, tuple)) \
            or not all(isinstance(p, str) for p in prompts):
        raise TypeError("prompts must be a list of strings")
    if not prompts:
        raise ValueError("prompts must not be empty")
    _positive_int(concurrency, "concurrency")
    _positive_int(max_tokens, "max_tokens")
    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        results = list(pool.map(lambda p: stream_completion(client, model, p, max_tokens, **kw), prompts))
    wall = time.perf_counter() - t0
    ttft, tpot, latency = ([r[k] for r in results] for k in ("ttft_s", "tpot_s", "total_s"))
    return {"concurrency": concurrency, "requests": len(prompts), "wall_s": wall,
            "requests_per_s": len(prompts) / wall, "tokens_per_s": sum(r["tokens"] for r in results) / wall,
            "ttft_p50_s": statistics.median(ttft), "ttft_p90_s": _percentile(ttft, 90),
            "tpot_p50_s": _percentile(tpot, 50), "tpot_p90_s": _percentile(tpot, 90),
            "latency_p50_s": statistics.median(latency), "latency_p90_s": _percentile(latency, 90),
            "results": results}
