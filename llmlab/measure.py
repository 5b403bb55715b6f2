"""Measuring: timers that report medians, result tables and their plots (memory: ``llmlab.memory``).

Every chapter that shows a number gets it from here, and every table gets a plot. Timings on a shared machine
are noisy: report medians over repeats and ratios between methods, never a single run.
"""
from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def time_it(fn: Callable[[], object], repeats: int = 5, warmup: int = 1) -> dict:
    """Call ``fn`` ``warmup`` times untimed, then ``repeats`` times; return median/min/max seconds.

    Under the smoke override on the gpu profile (``llmlab.env.smoke_timing``: a CPU
    executing the students' gpu path) it calls ``fn`` once, untimed warm-up skipped
    (``llmlab.env.SMOKE_TIMING``); ``repeats`` in the result says how many calls were
    timed."""
    if not callable(fn):
        raise TypeError(f"fn must be callable, got {type(fn).__name__}")
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats must be a positive int, got {repeats!r}")
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
        raise ValueError(f"warmup must be a non-negative int, got {warmup!r}")
    from llmlab import env

    if env.smoke_timing():
        repeats = min(repeats, env.SMOKE_TIMING["repeats"])
        warmup = min(warmup, env.SMOKE_TIMING["warmup"])
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times), "repeats": repeats}


def memory_bandwidth_gb_s(n_bytes: int = 2**28, device: str = "cpu", repeats: int = 5) -> float:
    """Memory bandwidth in GB/s (10^9 bytes/s), measured as the chapter Inference does: the median of ``repeats``
    copies of a float32 tensor of ``n_bytes`` (default 256 MiB, more than any CPU cache holds) into a second
    one, 2 bytes moved per byte copied. ``device``: "cpu" or "cuda" (CUDA work is synchronised before the clock
    is read). Chapter: Lab 4 (the roofline of a model that does not fit in the cache)."""
    import torch

    if isinstance(n_bytes, bool) or not isinstance(n_bytes, int) or n_bytes < 4:
        raise ValueError(f"n_bytes must be an int of at least 4 (one float32), got {n_bytes!r}")
    if str(device) not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
    if str(device) == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' but no CUDA GPU is visible")
    x = torch.ones(n_bytes // 4, dtype=torch.float32, device=device)
    y = torch.empty_like(x)

    def copy():
        y.copy_(x)
        if x.is_cuda:  # a GPU runs ahead of Python: wait before reading the clock
            torch.cuda.synchronize()

    return 2 * x.nbytes / time_it(copy, repeats=repeats)["median_s"] / 1e9


def last_level_cache_bytes(root: str = "/sys/devices/system/cpu/cpu0/cache") -> int | None:
    """The size in bytes of the largest cache CPU 0 reaches (its last level, L3 on most CPUs), as Linux reports it
    in ``root``; ``None`` where it is not reported (macOS, Windows, some containers and Arm boards). Chapter:
    Lab 4 (whether a model's weights fit in the cache)."""
    from pathlib import Path

    units = {"K": 2**10, "M": 2**20, "G": 2**30}
    sizes = []
    for f in sorted(Path(root).glob("index*/size")):
        text = f.read_text().strip().upper()
        try:
            sizes.append(int(text[:-1]) * units[text[-1]] if text[-1:] in units else int(text))
        except (ValueError, IndexError):
            continue
    return max(sizes) if sizes else None


def table(rows: list[dict], index: str | None = None):
    """A pandas DataFrame from a list of dicts (one dict a row), optionally indexed by column ``index``."""
    import pandas as pd

    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise TypeError("rows must be a list of dicts")
    if not rows:
        raise ValueError("rows is empty")
    df = pd.DataFrame(rows)
    if index is not None:
        if index not in df.columns:
            raise ValueError(f"no column {index!r}; columns are {list(df.columns)}")
        df = df.set_index(index)
    return df


def bar_plot(df, columns: list[str], title: str, ylabel: str, ax=None):
    """Grouped bars of ``columns`` of ``df`` (rows on the x axis); returns the matplotlib Axes.

    Long row names are wrapped to the width of their bar (rotated if they would need more than three lines), a
    single column needs no legend (the y label names it), and the bars leave headroom for the legend."""
    import textwrap

    import matplotlib.pyplot as plt
    import pandas as pd

    if not isinstance(df, pd.DataFrame):
        raise TypeError(f"df must be a pandas DataFrame (llmlab.measure.table), got {type(df).__name__}")
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise ValueError(f"columns {missing} not in the table; it has {list(df.columns)}")
    if ax is None:
        _, ax = plt.subplots(figsize=(7, 3.5))
    df[columns].plot.bar(ax=ax, rot=0, legend=len(columns) > 1)
    ax.set_title(title)
    ax.set_ylabel(ylabel)
    ax.grid(axis="y", alpha=0.3)
    names = [str(i) for i in df.index]
    font_pt = plt.rcParams["font.size"] * 0.9
    axes_chars = ax.get_position().width * ax.figure.get_figwidth() * 72 / (0.55 * font_pt)
    per_bar = max(6, int(axes_chars / max(1, len(names))) - 1)
    wrapped = [textwrap.wrap(n, per_bar, break_long_words=False) or [n] for n in names]
    if max(len(w) for w in wrapped) <= 3:
        ax.set_xticks(range(len(names)), ["\n".join(w) for w in wrapped], rotation=0, fontsize=font_pt)
    else:
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=font_pt)
    ax.margins(y=0.22)
    ax.autoscale_view()
    plt.tight_layout()
    return ax


GPU_RESULTS = "gpu_results.json"  # in llmlab/assets: what a real GPU measured, or pending


def _gpu_results() -> dict:
    import json
    from importlib.resources import files

    return json.loads(files("llmlab.assets").joinpath(GPU_RESULTS).read_text())["results"]


def gpu_reference(key: str):
    """The stored GPU reference result ``key`` (llmlab/assets/gpu_results.json), shown beside a CPU run that
    skips a GPU-only measurement. Pending until a real GPU run fills it: then a DataFrame, printed with the GPU,
    the date and the versions it was measured with; until then one line saying so, and ``None``. Used by
    Distillation and pruning, Fine-tuning, Inference, Serving, and labs 1 and 4."""
    import pandas as pd

    results = _gpu_results()
    if key not in results:
        raise ValueError(f"no GPU reference result {key!r}; known: {sorted(results)}")
    entry = results[key]
    if entry["status"] == "pending":
        print(f"GPU reference (stored, {key}): pending. No GPU run has filled it yet; it will show "
              f"{entry['measures']} (columns: {', '.join(entry['columns'])}), with the GPU and the date.")
        return None
    missing = [f for f in ("gpu", "date", "command", "versions") if not entry.get(f)]
    if entry["status"] != "measured" or missing or not entry["rows"]:
        raise ValueError(f"GPU reference {key!r} is neither pending nor measured with its provenance "
                         f"(status {entry['status']!r}, missing {missing or 'rows'})")
    print(f"GPU reference (stored, {key}, not run here): {entry['measures']}; measured on {entry['gpu']} on "
          f"{entry['date']} with {entry['versions']} ({entry['command']})")
    return pd.DataFrame(entry["rows"], columns=entry["columns"])
