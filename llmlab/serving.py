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


# ------------------------------------------------------------------ scheduling, simulated --
#
# A real server's latency under load is set by two things: what one engine step costs (measured above, per
# batch size) and the scheduler that decides which requests share a step. ``simulate`` keeps the first fixed
# and swaps the second, so that schedulers can be compared on one engine, at loads this machine could not
# drive for real. It is a discrete-event simulation: time jumps from one engine step to the next.

POLICIES = ("serial", "static", "continuous")


def _step_cost(step_s, max_batch):
    if not isinstance(step_s, dict) or not step_s:
        raise TypeError("step_s must be a non-empty dict {batch size: seconds per decode step}")
    for b, s in step_s.items():
        _positive_int(b, "a step_s batch size")
        _real(s, f"step_s[{b}]", low_open=True)
    sizes = sorted(step_s)
    if sizes[0] != 1:
        raise ValueError(f"step_s must give the cost of a batch of 1, got sizes {sizes}")
    if max_batch > sizes[-1]:
        raise ValueError(f"max_batch={max_batch} is larger than the largest measured batch ({sizes[-1]})")

    def cost(b):  # linear between measured batch sizes
        if b in step_s:
            return float(step_s[b])
        hi = next(s for s in sizes if s > b)
        lo = max(s for s in sizes if s < b)
        return step_s[lo] + (step_s[hi] - step_s[lo]) * (b - lo) / (hi - lo)

    return cost


def poisson_arrivals(rate: float, n: int, seed: int = 0) -> list[float]:
    """``n`` arrival times (seconds, from 0) of an open-loop Poisson process of ``rate`` requests per second:
    independent exponential gaps, so users arrive whatever the server is doing. Chapter: Serving."""
    import random

    rate = _real(rate, "rate", low_open=True)
    _positive_int(n, "n")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    rng, t, out = random.Random(seed), 0.0, []
    for _ in range(n):
        t += rng.expovariate(rate)
        out.append(t)
    return out


def simulate(step_s: dict, prefill_s, output_tokens, arrivals=None, users: int | None = None,
             policy: str = "continuous", max_batch: int = 8, think_s: float = 0.0) -> dict:
    """Discrete-event simulation of one engine serving requests under a scheduling ``policy``.

    Costs, measured on a real engine: ``step_s[b]`` is the time of one decode step that advances ``b``
    sequences by one token (linear in between measured sizes); ``prefill_s`` the time to prefill one request
    (a number, or one per request), which also yields its first token. Requests: ``output_tokens[i]`` tokens
    each, arriving either at the given ``arrivals`` times (an **open loop**: users come whatever the server
    does, e.g. ``poisson_arrivals``) or from ``users`` clients that each send their next request ``think_s``
    after the previous one is answered (a **closed loop**, as ``load_test`` does), in index order.

    Policies: ``"serial"`` answers one request at a time (the llama-cpp-python server); ``"static"`` forms a
    batch of up to ``max_batch`` waiting requests and runs it until its longest member is done, finished
    members keeping their slot (padding) and newcomers waiting for the whole batch (``generate`` on a batch);
    ``"continuous"`` admits waiting requests into free slots at every step and drops finished ones at once
    (Orca's iteration-level scheduling, vLLM, ``transformers serve --continuous-batching``). Admitted requests'
    prefills run as one iteration before the next decode step, stalling it (no chunked prefill).

    Returns per-request lists ``arrival_s``, ``ttft_s``, ``latency_s`` (arrival to last token), ``tpot_s``, and
    ``makespan_s``, ``requests_per_s``, ``tokens_per_s``, ``mean_queue`` (time-average number of requests
    waiting, for Little's law) and p50/p99 of TTFT and latency. Chapter: Serving."""
    if policy not in POLICIES:
        raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
    _positive_int(max_batch, "max_batch")
    if policy == "serial":
        max_batch = 1
    cost = _step_cost(step_s, max_batch)
    if isinstance(output_tokens, (str, bytes)) or not isinstance(output_tokens, (list, tuple)):
        raise TypeError("output_tokens must be a list of ints, one per request")
    if not output_tokens:
        raise ValueError("output_tokens must not be empty")
    n_out = [_positive_int(k, "output_tokens[i]") for k in output_tokens]
    n = len(n_out)
    if isinstance(prefill_s, (list, tuple)):
        if len(prefill_s) != n:
            raise ValueError(f"prefill_s has {len(prefill_s)} entries for {n} requests")
        prefill = [_real(p, "prefill_s[i]") for p in prefill_s]
    else:
        prefill = [_real(prefill_s, "prefill_s")] * n
    think_s = _real(think_s, "think_s")
    if (arrivals is None) == (users is None):
        raise ValueError("give either arrivals (an open loop) or users (a closed loop), not both")
    if arrivals is not None:
        if isinstance(arrivals, (str, bytes)) or not isinstance(arrivals, (list, tuple)):
            raise TypeError("arrivals must be a list of times in seconds")
        if len(arrivals) != n:
            raise ValueError(f"arrivals has {len(arrivals)} times for {n} requests")
        arrive = [_real(a, "arrivals[i]") for a in arrivals]
        if any(b < a for a, b in zip(arrive, arrive[1:])):
            raise ValueError("arrivals must be sorted")
        next_sent = n
    else:
        _positive_int(users, "users")
        arrive = [math.inf] * n
        for i in range(min(users, n)):
            arrive[i] = 0.0
        next_sent = min(users, n)

    first, finish, start = [math.nan] * n, [math.nan] * n, [math.nan] * n
    left = list(n_out)
    t, nxt, done = 0.0, 0, 0  # nxt: the next request not yet queued (requests arrive in index order)
    waiting: list[int] = []
    running: list[int] = []
    batch_size = 0  # static batching: the slots the current batch holds, finished members included

    def finish_request(i):
        nonlocal done, next_sent
        finish[i] = t
        done += 1
        if arrivals is None and next_sent < n:  # closed loop: this user sends its next request
            arrive[next_sent] = t + think_s
            next_sent += 1

    while done < n:
        while nxt < n and arrive[nxt] <= t:
            waiting.append(nxt)
            nxt += 1
        if not running and not waiting:
            t = arrive[nxt]  # idle until the next arrival
            continue
        if waiting and len(running) < max_batch and (policy != "static" or not running):
            admit = waiting[: max_batch - len(running)]
            del waiting[: len(admit)]
            for i in admit:
                start[i] = t
            t += sum(prefill[i] for i in admit)  # one prefill iteration for the newcomers
            for i in admit:
                first[i] = t
                left[i] -= 1
                if left[i] == 0:
                    finish_request(i)
                else:
                    running.append(i)
            batch_size = len(admit)
            continue
        t += cost(batch_size if policy == "static" else len(running))  # one decode step
        still = []
        for i in running:
            left[i] -= 1
            if left[i] == 0:
                finish_request(i)
            else:
                still.append(i)
        running = still

    latency = [f - a for f, a in zip(finish, arrive)]
    ttft = [f - a for f, a in zip(first, arrive)]
    tpot = [(f - s) / (k - 1) if k > 1 else math.nan for f, s, k in zip(finish, first, n_out)]
    span = max(finish) - min(arrive)
    return {"policy": policy, "max_batch": max_batch, "arrival_s": arrive, "ttft_s": ttft,
            "latency_s": latency, "tpot_s": tpot, "makespan_s": span,
            "requests_per_s": n / span if span > 0 else math.inf,
            "tokens_per_s": sum(n_out) / span if span > 0 else math.inf,
            "mean_queue": sum(s - a for s, a in zip(start, arrive)) / span if span > 0 else 0.0,
            "ttft_p50_s": _percentile(ttft, 50), "ttft_p99_s": _percentile(ttft, 99),
            "latency_p50_s": _percentile(latency, 50), "latency_p99_s": _percentile(latency, 99)}


def step_costs(engine, batch_sizes=(1, 2, 4, 8), context: int = 32, prompt_tokens: int = 10,
               repeats: int = 5) -> dict:
    """What ``simulate`` needs, measured in process on a real engine: ``step_s[b]``, the seconds of one decode
    step that advances ``b`` sequences by one token each after ``context`` tokens, and ``prefill_s``, the
    seconds to prefill one ``prompt_tokens``-token prompt. Each is the least of ``repeats`` runs (the work is
    fixed; a loaded machine only adds time). Time is the CPU time of the calling thread
    (``time.thread_time``), where both engines compute when they run on one thread: on an idle machine it is the
    wall time, and on a busy one it leaves out the time other processes held the core.

    ``engine`` is a transformers causal LM (a batch of ``b`` rows, one new token each, on a KV cache) or a
    ``llama_cpp.Llama`` (llama.cpp batches by putting the tokens of all sequences in one ``llama_decode``;
    here ``b`` tokens of one sequence stand in for them: the same weight matrices multiply ``b`` rows, and at
    this short context the attention that differs is a small share). Chapter: Serving."""
    if isinstance(batch_sizes, (str, bytes)) or not isinstance(batch_sizes, (list, tuple)) or not batch_sizes:
        raise TypeError("batch_sizes must be a non-empty list of ints")
    sizes = sorted({_positive_int(b, "batch size") for b in batch_sizes})
    if sizes[0] != 1:
        raise ValueError("batch_sizes must include 1")
    _positive_int(context, "context")
    _positive_int(prompt_tokens, "prompt_tokens")
    _positive_int(repeats, "repeats")
    clock = time.thread_time
    ids = [(7 * k + 3) % 500 + 10 for k in range(context + max(sizes) + prompt_tokens)]  # any in-vocab ids
    llama_cpp = importlib.util.find_spec("llama_cpp") and __import__("llama_cpp")
    if llama_cpp and isinstance(engine, llama_cpp.Llama):
        if context + max(sizes) > engine.n_ctx() or prompt_tokens > engine.n_ctx():
            raise ValueError("context + the largest batch must fit the Llama's n_ctx")

        engine.reset()
        engine.eval(ids[:context])
        step = dict.fromkeys(sizes, math.inf)
        for k in range(repeats + 1):  # interleaved: a burst of load hits every size alike
            for b in sizes:
                engine.n_tokens = context  # eval first drops the cache past n_tokens
                t0 = clock()
                engine.eval(ids[context:context + b])
                if k:  # the first round warms up
                    step[b] = min(step[b], clock() - t0)
        best = math.inf
        for k in range(repeats + 1):
            engine.reset()
            t0 = clock()
            engine.eval(ids[:prompt_tokens])
            if k:
                best = min(best, clock() - t0)
        return {"step_s": step, "prefill_s": best}
    import torch

    if not (isinstance(engine, torch.nn.Module) and hasattr(engine, "config")):
        raise TypeError(f"engine must be a transformers causal LM or a llama_cpp.Llama, "
                        f"got {type(engine).__name__}")
    device = next(engine.parameters()).device
    step = dict.fromkeys(sizes, math.inf)
    with torch.inference_mode():
        caches = {b: engine(torch.tensor([ids[:context]] * b, device=device), use_cache=True).past_key_values
                  for b in sizes}
        for k in range(repeats + 1):  # interleaved, the first round warms up
            for b in sizes:
                new = torch.tensor([[ids[context]]] * b, device=device)
                t0 = clock()
                engine(new, past_key_values=caches[b], use_cache=True)
                if k:
                    step[b] = min(step[b], clock() - t0)
                caches[b].crop(-1)  # drop the new token: every round sees the same context
        prompt = torch.tensor([ids[:prompt_tokens]], device=device)
        best = math.inf
        for k in range(repeats + 1):
            t0 = clock()
            engine(prompt, use_cache=True)
            if k:
                best = min(best, clock() - t0)
    return {"step_s": step, "prefill_s": best}


def record_step_costs(path, repeats: int = 100, batch_sizes=(1, 2, 4, 8)) -> dict:
    """Measure ``step_costs`` of the course model in transformers (float32, one thread) and in llama.cpp (its
    f32 GGUF, one thread, f32 KV cache), the least thread CPU time of ``repeats`` runs each, and write them
    to ``path`` as JSON with their provenance (CPU, load, versions, date). The
    Serving chapter's simulations read this file and re-measure a slice live. Made with
    ``python -c "from llmlab import serving; serving.record_step_costs('book/inference/serving_step_costs.json')"``.
    Chapter: Serving."""
    import datetime
    import json
    import platform

    import torch

    from llmlab import llamacpp, models

    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a path, got {type(path).__name__}")
    _positive_int(repeats, "repeats")
    torch.set_num_threads(1)
    model, _ = models.load(models.COURSE_MODEL, dtype="float32")
    costs = {"transformers": step_costs(model, batch_sizes, repeats=repeats)}
    with tempfile.TemporaryDirectory() as tmp:
        gguf = llamacpp.convert(models.COURSE_MODEL_DIR, Path(tmp) / "course-f32.gguf", "f32")
        llm = llamacpp.load(gguf, threads=1, kv_cache="f32")
        costs["llama.cpp"] = step_costs(llm, batch_sizes, repeats=repeats)
        llm.close()
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    import llama_cpp
    import transformers

    record = {"costs": {e: {"step_s": {str(b): s for b, s in c["step_s"].items()}, "prefill_s": c["prefill_s"]}
                        for e, c in costs.items()},
              "context_tokens": 32, "prompt_tokens": 10, "repeats": repeats, "threads": 1,
              "provenance": {"cpu": cpu, "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
                             "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                             "torch": torch.__version__, "transformers": transformers.__version__,
                             "llama_cpp_python": llama_cpp.__version__, "python": platform.python_version(),
                             "made_by": "llmlab.serving.record_step_costs"}}
    Path(path).write_text(json.dumps(record, indent=1) + "\n")
    return record


def load_step_costs(path) -> dict:
    """The step costs ``record_step_costs`` stored: ``{engine: {"step_s": {b: s}, "prefill_s": s}}`` with integer
    batch sizes, plus the record's ``provenance``. Chapter: Serving."""
    import json

    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a path, got {type(path).__name__}")
    if not Path(path).is_file():
        raise ValueError(f"no step-cost record at {path}")
    record = json.loads(Path(path).read_text())
    costs = {e: {"step_s": {int(b): float(s) for b, s in c["step_s"].items()}, "prefill_s": float(c["prefill_s"])}
             for e, c in record["costs"].items()}
    return {"costs": costs, "provenance": record["provenance"], "repeats": record["repeats"]}


# ------------------------------------------------------------------ many adapters, one batch --

def multi_lora_linear(x, weight, lora_A, lora_B, adapter_ids, scaling=1.0, bias=None):
    """One linear layer for a batch whose rows use different LoRA adapters: the idea behind Punica's SGMV
    kernel and S-LoRA. The base product ``x W^T`` is computed once for the whole batch; each row then adds its
    own adapter's low-rank update, ``scaling[a] * (x A_a^T) B_a^T``, with the adapters' matrices gathered by
    row. Requests for different fine-tunes of one base model share every base-weight read, as in plain
    batching, instead of each adapter needing its own merged copy of the model.

    ``x``: (batch, ..., in); ``weight``: (out, in); ``lora_A``: (n_adapters, r, in); ``lora_B``:
    (n_adapters, out, r); ``adapter_ids``: (batch,) integer tensor, ``-1`` for the base model alone;
    ``scaling``: a number or one per adapter (peft's ``lora_alpha / r``). Chapter: Serving."""
    import torch

    for name, t in (("x", x), ("weight", weight), ("lora_A", lora_A), ("lora_B", lora_B),
                    ("adapter_ids", adapter_ids)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if weight.dim() != 2 or lora_A.dim() != 3 or lora_B.dim() != 3 or x.dim() < 2:
        raise ValueError("shapes: x (batch, ..., in), weight (out, in), lora_A (n, r, in), lora_B (n, out, r)")
    out_f, in_f = weight.shape
    n, r, a_in = lora_A.shape
    if x.shape[-1] != in_f or a_in != in_f or lora_B.shape != (n, out_f, r):
        raise ValueError(f"shapes do not fit: x {tuple(x.shape)}, weight {tuple(weight.shape)}, "
                         f"lora_A {tuple(lora_A.shape)}, lora_B {tuple(lora_B.shape)}")
    if adapter_ids.dtype not in (torch.int32, torch.int64) or adapter_ids.shape != (x.shape[0],):
        raise ValueError(f"adapter_ids must be an integer tensor of shape ({x.shape[0]},)")
    if bool(((adapter_ids < -1) | (adapter_ids >= n)).any()):
        raise ValueError(f"adapter_ids must lie in [-1, {n - 1}]")
    if isinstance(scaling, torch.Tensor):
        if scaling.shape != (n,):
            raise ValueError(f"scaling must have one value per adapter ({n},)")
        scale = scaling.to(x.dtype)
    else:
        scale = torch.full((n,), _real(scaling, "scaling"), dtype=x.dtype)
    if bias is not None and (not isinstance(bias, torch.Tensor) or bias.shape != (out_f,)):
        raise ValueError(f"bias must be a tensor of shape ({out_f},) or None")
    y = torch.nn.functional.linear(x, weight, bias)  # the shared base product, one for the whole batch
    use = adapter_ids >= 0
    if bool(use.any()):
        ids = adapter_ids.clamp(min=0)
        A, B = lora_A[ids], lora_B[ids]  # gathered per row: (batch, r, in), (batch, out, r)
        flat = x.reshape(x.shape[0], -1, in_f)
        delta = torch.bmm(torch.bmm(flat, A.transpose(1, 2)), B.transpose(1, 2))  # (batch, tokens, out)
        delta = delta * (scale[ids] * use.to(x.dtype)).view(-1, 1, 1)
        y = y + delta.reshape(y.shape)
    return y
