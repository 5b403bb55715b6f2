"""Compute and scaling laws: FLOPs of a training step, 6*N*D, the Chinchilla loss law, and a small sweep.

Read top to bottom: how many FLOPs a Llama spends per token (``matmul_params``, ``flops_per_token``,
``training_flops``); the parametric law L(N, D) = E + A/N^alpha + B/D^beta of Hoffmann et al. (2022) with their
constants and Besiroglu et al.'s (2024) refit (``ScalingLaw``), and the compute-optimal split of a budget;
published training budgets; fitting a power law and finding the compute frontier; and ``sweep``, which trains
tiny Llamas with the course recipe (``llmlab.pretrain``) to measure loss against compute on this machine.
``python -m llmlab.scaling --out llmlab/assets/scaling_sweep.json`` runs the stored sweep once, with provenance.

Chapter: Pretraining.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np


# ---------------------------------------------------------------- checks --

def _positive(x, name):
    if isinstance(x, bool) or not isinstance(x, (int, float, np.integer, np.floating)):
        raise TypeError(f"{name} must be a number, got {type(x).__name__}")
    if not math.isfinite(x) or x <= 0:
        raise ValueError(f"{name} must be a positive finite number, got {x!r}")
    return x


def _positive_int(x, name):
    if isinstance(x, bool) or not isinstance(x, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(x).__name__}")
    if x < 1:
        raise ValueError(f"{name} must be >= 1, got {x!r}")
    return int(x)


def _array(x, name):
    try:
        a = np.asarray(x, dtype=float)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a sequence of numbers") from None
    if a.ndim != 1 or a.size == 0:
        raise ValueError(f"{name} must be a non-empty 1-D sequence, got shape {a.shape}")
    if not np.all(np.isfinite(a)) or np.any(a <= 0):
        raise ValueError(f"{name} must hold positive finite numbers")
    return a


def _config_fields(config):
    need = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
    if not all(hasattr(config, k) for k in need):
        raise TypeError(f"config must be a Llama-style config with {need}, got {type(config).__name__}")
    d, layers, heads = config.hidden_size, config.num_hidden_layers, config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or d // heads
    return d, config.intermediate_size, layers, heads, kv, head_dim, config.vocab_size


# ------------------------------------------------------- FLOPs per token --

def matmul_params(config) -> int:
    """Weights that multiply every token: q, k, v, o and the three MLP matrices of each layer, plus the output
    head. The input embedding (a lookup, no multiply) and the norms (elementwise) are left out. Chapter: Pretraining."""
    d, ff, layers, heads, kv, hd, vocab = _config_fields(config)
    attn = d * heads * hd + 2 * d * kv * hd + heads * hd * d
    mlp = 3 * d * ff
    return layers * (attn + mlp) + vocab * d


def flops_per_token(config, seq_len: int, causal: bool = False) -> dict:
    """Matmul FLOPs per token of one training step: forward = 2 * matmul_params + the attention term
    4 * layers * seq_len * (heads * head_dim) (QK^T and attention-times-V, every score computed, as eager attention
    does; ``causal=True`` halves it, as kernels that skip masked blocks do); backward = 2 * forward; train = 3 *
    forward. With the attention term dropped, train is the familiar 6 * N. Chapter: Pretraining."""
    seq_len = _positive_int(seq_len, "seq_len")
    if not isinstance(causal, bool):
        raise TypeError("causal must be a bool")
    d, ff, layers, heads, kv, hd, vocab = _config_fields(config)
    attention = 4 * layers * seq_len * heads * hd // (2 if causal else 1)
    forward = 2 * matmul_params(config) + attention
    return {"forward": forward, "backward": 2 * forward, "train": 3 * forward, "attention_forward": attention}


def training_flops(n_params, n_tokens) -> float:
    """C = 6 * N * D: 2 FLOPs per parameter per token forward (a multiply and an add), 4 backward (the gradients
    with respect to the inputs and to the weights). Chapter: Pretraining."""
    return 6.0 * _positive(n_params, "n_params") * _positive(n_tokens, "n_tokens")


# ---------------------------------------------------- the Chinchilla law --

@dataclass(frozen=True)
class ScalingLaw:
    """L(N, D) = E + A / N**alpha + B / D**beta (nats per token; N parameters, D training tokens).
    Chapter: Pretraining."""
    E: float
    A: float
    B: float
    alpha: float
    beta: float
    source: str = ""

    def __post_init__(self):
        for k in ("E", "A", "B", "alpha", "beta"):
            _positive(getattr(self, k), k)

    def loss(self, n_params, n_tokens):
        """Predicted loss; ``n_params`` and ``n_tokens`` may be numbers or numpy arrays."""
        n, d = np.asarray(n_params, dtype=float), np.asarray(n_tokens, dtype=float)
        if np.any(~np.isfinite(n)) or np.any(n <= 0) or np.any(~np.isfinite(d)) or np.any(d <= 0):
            raise ValueError("n_params and n_tokens must be positive and finite")
        out = self.E + self.A / n ** self.alpha + self.B / d ** self.beta
        return float(out) if out.ndim == 0 else out

    def compute_optimal(self, compute) -> tuple[float, float]:
        """The (N, D) that minimise ``loss`` under C = 6 N D. Setting dL/dN = 0 with D = C / (6N) gives
        N = G (C/6)^(beta/(alpha+beta)), G = (alpha A / (beta B))^(1/(alpha+beta)), and D = C / (6N)."""
        c = _positive(compute, "compute") / 6.0
        g = (self.alpha * self.A / (self.beta * self.B)) ** (1 / (self.alpha + self.beta))
        n = g * c ** (self.beta / (self.alpha + self.beta))
        return n, c / n


# Hoffmann et al. (2022), "Training Compute-Optimal Large Language Models", approach 3 (eq. 10, rounded as printed).
HOFFMANN_2022 = ScalingLaw(E=1.69, A=406.4, B=410.7, alpha=0.34, beta=0.28, source="Hoffmann et al. 2022")
# Besiroglu, Erdil, Barnett and You (2024), "Chinchilla Scaling: A replication attempt": the same law refitted
# to data read off Hoffmann et al.'s figure, with the optimiser run to convergence.
BESIROGLU_2024 = ScalingLaw(E=1.8172, A=482.01, B=2085.43, alpha=0.3478, beta=0.3658,
                            source="Besiroglu et al. 2024")


def chinchilla_rule(compute, tokens_per_param: float = 20.0) -> tuple[float, float]:
    """The rule of thumb drawn from Hoffmann et al. (2022): D = 20 N, so C = 6 N (20 N) and N = sqrt(C / 120).
    Chapter: Pretraining."""
    c = _positive(compute, "compute")
    r = _positive(tokens_per_param, "tokens_per_param")
    n = math.sqrt(c / (6.0 * r))
    return n, r * n


# Published (parameters, training tokens). Llama 3's "over 15T tokens" is taken as 15T.
PUBLISHED_BUDGETS = [
    {"model": "GPT-3 175B", "params": 175e9, "tokens": 300e9, "source": "Brown et al. 2020"},
    {"model": "Gopher 280B", "params": 280e9, "tokens": 300e9, "source": "Rae et al. 2021"},
    {"model": "Chinchilla 70B", "params": 70e9, "tokens": 1.4e12, "source": "Hoffmann et al. 2022"},
    {"model": "Llama 2 7B", "params": 7e9, "tokens": 2e12, "source": "Touvron et al. 2023"},
    {"model": "Llama 3 8B", "params": 8e9, "tokens": 15e12, "source": "Llama Team, Meta 2024"},
    {"model": "Llama 3 70B", "params": 70e9, "tokens": 15e12, "source": "Llama Team, Meta 2024"},
]


# ------------------------------------------------------------- fitting --

@dataclass(frozen=True)
class PowerLaw:
    """y = e + a * x**(-b); ``e`` is 0 for a pure power law."""
    a: float
    b: float
    e: float = 0.0

    def __call__(self, x):
        return self.e + self.a * np.asarray(x, dtype=float) ** (-self.b)


def _loglog_fit(x, y):
    slope, intercept = np.polyfit(np.log(x), np.log(y), 1)
    return math.exp(intercept), -slope


def fit_power_law(x, y, offset: bool = False) -> PowerLaw:
    """Least squares in log space. Without ``offset``: a straight line in log-log, y = a x^-b. With ``offset``:
    y = e + a x^-b, e scanned over [0, min(y)) (coarse grid, then a finer one around the best) with a and b from
    the log-log line of y - e at each e, keeping the e whose curve has the least squared log error.
    Chapter: Pretraining."""
    x, y = _array(x, "x"), _array(y, "y")
    if x.shape != y.shape:
        raise ValueError(f"x and y must have the same length, got {x.size} and {y.size}")
    if np.unique(x).size < (3 if offset else 2):
        raise ValueError(f"need at least {3 if offset else 2} distinct x values")
    if not isinstance(offset, bool):
        raise TypeError("offset must be a bool")
    if not offset:
        return PowerLaw(*_loglog_fit(x, y))

    def error(e):
        a, b = _loglog_fit(x, y - e)
        return float(np.sum((np.log(y) - np.log(e + a * x ** -b)) ** 2)), a, b

    lo, hi = 0.0, float(y.min())
    best = None
    for _ in range(4):  # each round: 200 points between lo and hi, then zoom in around the best one
        grid = np.linspace(lo, hi, 201)[:-1] if best is None else np.linspace(lo, hi, 201)
        grid = grid[grid < y.min()]
        scored = [(error(e), e) for e in grid]
        (err, a, b), e = min(scored, key=lambda s: s[0][0])
        best = (e, a, b)
        step = (hi - lo) / 200
        lo, hi = max(0.0, e - step), min(float(y.min()) * (1 - 1e-9), e + step)
    e, a, b = best
    return PowerLaw(a, b, e)


def frontier(compute, loss) -> list[int]:
    """Indices of the compute frontier: points (sorted by compute) whose loss is lower than that of every point
    with less compute. The lower envelope a compute-optimal choice lies on. Chapter: Pretraining."""
    c, l = _array(compute, "compute"), _array(loss, "loss")
    if c.shape != l.shape:
        raise ValueError("compute and loss must have the same length")
    keep, best = [], math.inf
    for i in sorted(range(c.size), key=lambda i: (c[i], l[i])):
        if l[i] < best:
            keep.append(i)
            best = l[i]
    return keep


# --------------------------------------------------------- the sweep --

def tiny_recipe(width: int, steps: int, layers: int = 2, seq_len: int = 128, batch_size: int = 16,
                threads: int = 1, train_docs: int = 20_000, val_docs: int = 200):
    """The course recipe (``llmlab.pretrain.Recipe``: AdamW, warm-up then cosine, clipping at 1) for a smaller
    Llama: ``width`` a multiple of 32 (head dim 32, one key/value head per 4 query heads where there are 4),
    MLP 3 * width, warm-up 5% of ``steps``, as the course model's 100 of 2,000. Chapter: Pretraining."""
    from llmlab.pretrain import Recipe

    width, steps = _positive_int(width, "width"), _positive_int(steps, "steps")
    if width % 32:
        raise ValueError(f"width must be a multiple of 32 (head dim 32), got {width}")
    heads = width // 32
    return Recipe(hidden_size=width, intermediate_size=3 * width, num_hidden_layers=_positive_int(layers, "layers"),
                  num_attention_heads=heads, num_key_value_heads=max(1, heads // 4),
                  seq_len=_positive_int(seq_len, "seq_len"), batch_size=_positive_int(batch_size, "batch_size"),
                  steps=steps, warmup=max(1, steps // 20), threads=_positive_int(threads, "threads"),
                  train_docs=_positive_int(train_docs, "train_docs"), val_docs=_positive_int(val_docs, "val_docs"))


def run_point(recipe, tokenizer) -> dict:
    """Train one model with ``llmlab.pretrain.train`` and return its row: sizes, tokens, FLOPs, loss, time.
    Chapter: Pretraining."""
    from llmlab.pretrain import Recipe, llama_config, train

    if not isinstance(recipe, Recipe):
        raise TypeError(f"recipe must be a llmlab.pretrain.Recipe (see tiny_recipe), got {type(recipe).__name__}")
    model, _, hist = train(recipe, tokenizer=tokenizer, eval_every=recipe.steps, progress=False)
    config = llama_config(recipe, tokenizer)
    tokens = hist["tokens_seen"]
    n_all = sum(p.numel() for p in model.parameters())
    return {"width": recipe.hidden_size, "layers": recipe.num_hidden_layers, "steps": recipe.steps,
            "params": n_all, "params_non_embedding": n_all - model.get_input_embeddings().weight.numel(),
            "matmul_params": matmul_params(config), "tokens": tokens,
            "flops_6ND": training_flops(matmul_params(config), tokens),
            "flops": flops_per_token(config, recipe.seq_len)["train"] * tokens,
            "val_loss": hist["val_loss"][-1], "train_loss": hist["train_loss"][-1],
            "wall_s": round(hist["wall_time_s"], 2)}


def sweep(widths=(32, 64, 128), steps=(64, 128, 256, 512), tokenizer=None, progress: bool = True,
          **recipe_kw) -> list[dict]:
    """Train one tiny Llama per (width, steps) with the course recipe on the course corpus (the course model's
    tokenizer) and return one row per run (``run_point``). Chapter: Pretraining."""
    if isinstance(widths, (int, str)) or isinstance(steps, (int, str)):
        raise TypeError("widths and steps must be sequences of ints")
    recipes = [tiny_recipe(w, s, **recipe_kw) for w in widths for s in steps]
    if not recipes:
        raise ValueError("widths and steps must not be empty")
    if tokenizer is None:
        from transformers import AutoTokenizer

        from llmlab.models import COURSE_MODEL_DIR
        tokenizer = AutoTokenizer.from_pretrained(COURSE_MODEL_DIR)
    rows = []
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(recipes, desc="sweep", mininterval=2)
    for r in recipes:
        rows.append(run_point(r, tokenizer))
        if bar is not None:
            bar.update(1)
            bar.set_postfix(width=r.hidden_size, steps=r.steps, loss=f"{rows[-1]['val_loss']:.3f}")
    if bar is not None:
        bar.close()
    return rows


def main(argv=None):
    import datetime
    import platform

    import torch
    import transformers

    from llmlab.pretrain import cpu_name

    ap = argparse.ArgumentParser(description="Train the scaling sweep of tiny course Llamas and store it as JSON.")
    ap.add_argument("--out", required=True)
    ap.add_argument("--widths", default="32,64,128")
    ap.add_argument("--steps", default="64,128,256,512")
    ap.add_argument("--merge", nargs="+", metavar="PART",
                    help="instead of training, join sweeps stored by earlier runs (run in parallel, one per width)")
    a = ap.parse_args(argv)
    if a.merge:
        parts = [json.loads(Path(p).read_text()) for p in a.merge]
        if any(p["settings"] != parts[0]["settings"] or p["steps"] != parts[0]["steps"] for p in parts):
            raise ValueError("the parts were run with different settings")
        out = {"rows": [r for p in parts for r in p["rows"]], "widths": [w for p in parts for w in p["widths"]],
               "steps": parts[0]["steps"], "settings": parts[0]["settings"],
               "provenance": {**parts[0]["provenance"],
                              "wall_time_s": max(p["provenance"]["wall_time_s"] for p in parts),
                              "command": "; ".join(p["provenance"]["command"] for p in parts),
                              "note": f"{len(parts)} processes run side by side, one torch thread each; wall time "
                                      "is the longest one's. The machine was shared with other jobs.",
                              "parts": [p["provenance"] for p in parts]}}
        Path(a.out).write_text(json.dumps(out, indent=1) + "\n")
        print(json.dumps({k: v for k, v in out["provenance"].items() if k != "parts"}))
        return
    widths = [int(w) for w in a.widths.split(",")]
    steps = [int(s) for s in a.steps.split(",")]
    settings = {k: v for k, v in tiny_recipe(widths[0], steps[0]).__dict__.items()
                if k not in ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads",
                             "steps", "warmup")}
    t0 = time.perf_counter()
    rows = sweep(widths, steps)
    out = {"rows": rows, "widths": widths, "steps": steps, "settings": settings,
           "provenance": {"wall_time_s": round(time.perf_counter() - t0, 1), "command": "python -m llmlab.scaling "
                          + " ".join(argv if argv is not None else __import__("sys").argv[1:]),
                          "hardware": f"{cpu_name()}, {torch.get_num_threads()} torch thread(s), no GPU",
                          "python": platform.python_version(), "torch": torch.__version__,
                          "transformers": transformers.__version__, "numpy": np.__version__,
                          "date": datetime.date.today().isoformat()}}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps(out["provenance"]))


if __name__ == "__main__":
    main()
