"""Explorers: ipywidgets that turn a chapter's knobs and recompute its numbers with the chapter's own functions.

Each explorer is one call in its chapter (``widgets.memory_planner()``) and returns an ``Explorer``: controls, a
``compute`` function of their values and a view of its result (an HTML table and a figure). Live in Jupyter and
on Colab; on the website the stored widget state shows the controls and the default output. Every error a
knob can cause is shown inside the widget, never lost in a log. Tests drive the explorers through ``set``.

Chapters: Tokenization (``tokenizer_explorer``), Attention and the block (``rope_explorer``), Memory and compute
(``memory_planner``), Quantization from scratch (``quantization_explorer``), Inference (``sampling_explorer``,
``roofline_explorer``), Fine-tuning (``lora_explorer``).
"""
from __future__ import annotations

import base64
import functools
import html
import io
import math
from contextlib import contextmanager
from typing import Callable

import ipywidgets as W

LIVE_NOTE = "live in Jupyter or on Colab; the website shows the default setting"
PALETTE = ["#fde2e4", "#d7e3fc", "#e2f0cb", "#fff1c1", "#e8dff5", "#cdeac0"]


# ---------------------------------------------------------------- the shape --

class Explorer:
    """Controls, a ``compute(**values)`` and a ``render(result) -> html``: recomputed whenever a control moves.
    ``summary(result) -> str`` is the one-line plain text a notebook stores beside the widget (nbval compares it).

    ``result`` holds the last computed value (``None`` after an error), ``message`` the error shown instead.
    ``set(**values)`` moves several controls and recomputes once (what the tests use).
    """

    def __init__(self, title: str, controls: dict[str, W.ValueWidget], compute: Callable,
                 render: Callable[[object], str], summary: Callable[[object], str] | None = None):
        if not controls or not all(isinstance(c, W.ValueWidget) for c in controls.values()):
            raise TypeError("controls must be a non-empty dict of ipywidgets value widgets")
        self.title, self.controls = title, controls
        self._compute, self._render, self._summary = compute, render, summary
        self.result, self.message = None, None
        self.output = W.HTML(layout=W.Layout(width="auto"))
        self._holding = False
        for control in controls.values():
            control.observe(self._changed, names="value")
            control.layout.width = "auto"
        grid = W.GridBox(list(controls.values()), layout=W.Layout(
            grid_template_columns="repeat(auto-fill, minmax(320px, 1fr))", grid_gap="2px 12px"))
        self.widget = W.VBox([W.HTML(f"<b>{html.escape(title)}</b> <small>({LIVE_NOTE})</small>"), grid,
                              self.output], layout=W.Layout(border="1px solid #ddd", padding="6px"))
        self.widget.add_class("llmlab-explorer")
        self.update()

    def values(self) -> dict:
        return {name: control.value for name, control in self.controls.items()}

    def set(self, **values) -> Explorer:
        unknown = sorted(set(values) - set(self.controls))
        if unknown:
            raise ValueError(f"unknown controls {unknown}; this explorer has {sorted(self.controls)}")
        with self._hold():
            for name, value in values.items():
                self.controls[name].value = value
        self.update()
        return self

    @contextmanager
    def _hold(self):
        self._holding = True
        try:
            yield
        finally:
            self._holding = False

    def _changed(self, change):
        if not self._holding:
            self.update()

    def update(self) -> None:
        """Recompute from the controls; any error becomes a message in the widget."""
        try:
            result = self._compute(**self.values())
            view = self._render(result)
        except Exception as e:  # noqa: BLE001 - a reader's knob must never crash the page; show why instead
            self.result, self.message = None, f"{type(e).__name__}: {e}"
            self.output.value = (f'<div class="llmlab-explorer-error" style="color:#a00;padding:4px">'
                                 f"&#9888; {html.escape(self.message)}</div>")
            return
        self.result, self.message = result, None
        self.output.value = view

    def _repr_mimebundle_(self, **kwargs):
        # the widget view by its model id, as ipywidgets 8 writes it; ipywidgets 7 (what Colab ships and renders)
        # displays widgets another way, so the bundle is written here for both
        view = {"version_major": 2, "version_minor": 0, "model_id": self.widget.model_id}
        return {"text/plain": f"{self.title} ({LIVE_NOTE}): {self.summary()}",
                "application/vnd.jupyter.widget-view+json": view}

    def summary(self) -> str:
        """One line of the current result (what a notebook without widget support prints)."""
        if self.message is not None:
            return self.message
        return self._summary(self.result) if self._summary else "computed"

    def __repr__(self):
        return f"<Explorer {self.title!r}: {self.values()}>"


# ---------------------------------------------------------------- helpers --

def _figure_html(fig, alt: str) -> str:
    """A matplotlib figure as an inline 2x PNG sized for the book's column, then closed."""
    from llmlab.display import DENSITY, MAX_WIDTH_IN

    width_in = min(fig.get_figwidth(), MAX_WIDTH_IN)
    fig.set_figwidth(width_in)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100 * DENSITY, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    data = base64.b64encode(buf.getvalue()).decode()
    return (f'<img src="data:image/png;base64,{data}" alt="{html.escape(alt)}" '
            f'style="width:{int(width_in * 100)}px;max-width:100%">')


def _figure(w=7.0, h=2.8, ncols=1):
    import matplotlib.pyplot as plt

    from llmlab.display import use_book_style

    use_book_style()
    with plt.ioff():
        fig, axes = plt.subplots(1, ncols, figsize=(w, h))
    return fig, axes


def _table(rows: list[tuple[str, str]]) -> str:
    cells = "".join(f"<tr><td>{html.escape(k)}</td><td style='text-align:right'><b>{html.escape(v)}</b></td></tr>"
                    for k, v in rows)
    return f"<table class='llmlab-explorer-table'>{cells}</table>"


def _dropdown(options, value, description):
    options = list(options)
    if value not in options:
        raise ValueError(f"{description} must be one of {options}, got {value!r}")
    return W.Dropdown(options=options, value=value, description=description, style={"description_width": "90px"})


def _number(value, lo, hi, description, integer=False):
    """A knob's starting value: a number (an int where the knob is whole) within the knob's range."""
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds):
        raise TypeError(f"{description} must be {'an int' if integer else 'a number'}, got {type(value).__name__}")
    if not lo <= value <= hi:
        raise ValueError(f"{description} must be between {lo} and {hi}, got {value}")
    return value


def _text(value, description):
    if not isinstance(value, str):
        raise TypeError(f"{description} must be a str, got {type(value).__name__}")
    return value


def _int_slider(value, lo, hi, description, step=1):
    return W.IntSlider(value=_number(value, lo, hi, description, integer=True), min=lo, max=hi, step=step,
                       description=description, continuous_update=False, style={"description_width": "90px"})


def _float_slider(value, lo, hi, step, description):
    return W.FloatSlider(value=_number(value, lo, hi, description), min=lo, max=hi, step=step,
                         description=description, continuous_update=False, style={"description_width": "90px"})


# -------------------------------------------------------- Tokenization --

def _tokenize(tok, text: str) -> tuple[list[int], list[str]]:
    """Ids and the text of each token, for llmlab's ``BPE`` or a Hugging Face tokenizer."""
    from llmlab.tokenization import BPE

    if isinstance(tok, BPE):
        ids = tok.encode(text)
        return ids, [tok.vocab[i].decode("utf-8", errors="replace") for i in ids]
    if not callable(getattr(tok, "convert_ids_to_tokens", None)):
        raise TypeError(f"a tokenizer must be an llmlab BPE or a Hugging Face tokenizer, got {type(tok).__name__}")
    ids = tok(text, add_special_tokens=False)["input_ids"]
    return ids, [tok.decode([i]) for i in ids]


def _default_tokenizers() -> dict:
    from llmlab import data, models, pretrain
    from llmlab.env import COURSE_MODEL
    from llmlab.tokenization import BPE, SPECIAL_TOKENS

    _, course = models.load(COURSE_MODEL)
    bpe = BPE().train(data.corpus_split("train", pretrain.Recipe().tokenizer_docs), 768, SPECIAL_TOKENS)
    return {f"course tokenizer ({len(course):,} ids)": course, f"BPE from scratch ({bpe.vocab_size} ids)": bpe}


def smollm2_tokenizer():
    """SmolLM2's real tokenizer (49,152 ids) when ``make smollm2`` has cached it, else ``None``."""
    from llmlab import models

    if not models.is_cached("smollm2-135m-instruct"):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(models.offline_model_dir("smollm2-135m-instruct"))


def tokenize_all(tokenizers: dict, text: str) -> dict:
    """For each named tokenizer: ids, token texts, the count and tokens per character of ``text``."""
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    if not text.strip():
        raise ValueError("type some text to tokenize")
    out = {}
    for name, tok in tokenizers.items():
        ids, pieces = _tokenize(tok, text)
        out[name] = {"ids": ids, "pieces": pieces, "n_tokens": len(ids), "tokens_per_char": len(ids) / len(text)}
    return out


def _render_tokens(result: dict) -> str:
    parts = []
    for name, r in result.items():
        spans = "".join(
            f'<span title="id {i}" style="background:{PALETTE[n % len(PALETTE)]};border-radius:3px;'
            f'padding:1px 2px;margin:1px;font-family:monospace;white-space:pre;display:inline-block">'
            f'{html.escape(p)}<sub style="color:#666">{i}</sub></span>'
            for n, (i, p) in enumerate(zip(r["ids"], r["pieces"])))
        parts.append(f"<div style='margin:4px 0'><b>{html.escape(name)}</b>: {r['n_tokens']} tokens, "
                     f"{r['tokens_per_char']:.2f} per character<br>{spans}</div>")
    return "".join(parts)


def tokenizer_explorer(text: str = "Zara flies her purple drone to the library.", tokenizers: dict | None = None,
                       include_smollm2: bool = True) -> Explorer:
    """Type text, see each tokenizer's tokens coloured with their ids, and tokens per character. ``tokenizers``
    maps names to llmlab ``BPE`` or Hugging Face tokenizers (default: the course tokenizer and a 768-id BPE
    trained from scratch); SmolLM2's real tokenizer joins when cached (``make smollm2``). Chapter: Tokenization."""
    if tokenizers is None:
        tokenizers = _default_tokenizers()
    if not isinstance(tokenizers, dict) or not tokenizers:
        raise TypeError("tokenizers must be a non-empty dict of name -> tokenizer")
    tokenizers = dict(tokenizers)
    note = ""
    if include_smollm2:
        smol = smollm2_tokenizer()
        if smol is None:
            note = ("<p><small>SmolLM2's tokenizer: not cached here (<code>make smollm2</code>, or <code>python -m "
                    "llmlab.models fetch smollm2-135m-instruct</code> on Colab, fetches it).</small></p>")
        else:
            tokenizers[f"SmolLM2 ({len(smol):,} ids)"] = smol
    controls = {"text": W.Textarea(value=_text(text, "text"), description="text", continuous_update=False,
                                   layout=W.Layout(width="98%", height="60px"))}
    return Explorer("Tokenizer explorer", controls, lambda text: tokenize_all(tokenizers, text),
                    lambda r: _render_tokens(r) + note,
                    lambda r: "; ".join(f"{name}: {v['n_tokens']} tokens" for name, v in r.items()))


# -------------------------------------------------------- Inference: sampling --

@functools.lru_cache(maxsize=1)
def _course_model():
    from llmlab import models
    from llmlab.env import COURSE_MODEL

    return models.load(COURSE_MODEL, dtype="float32")


@functools.lru_cache(maxsize=32)
def _next_token_logits(prompt: str):
    import torch

    model, tokenizer = _course_model()
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        return model(ids).logits[0, -1].float()


def sampling(prompt: str, temperature: float, top_k: int, top_p: float, n_samples: int = 8,
             n_tokens: int = 6, seed: int = 0) -> dict:
    """The course model's next-token distribution after ``prompt`` before and after ``infer.warp_logits``
    (``top_k`` 0 = off, ``top_p`` 1 = off; temperature 0 = greedy), the kept set, and seeded samples of a few
    tokens from ``infer.decode`` with the same settings."""
    import torch

    from llmlab import infer

    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError("type a prompt: the explorer shows the distribution of the token that follows it")
    model, tokenizer = _course_model()
    logits = _next_token_logits(prompt)
    k = None if top_k == 0 else int(top_k)
    p = None if top_p >= 1 else float(top_p)
    before = logits.softmax(-1)
    if temperature == 0:
        after = torch.zeros_like(before)
        after[logits.argmax()] = 1.0
    else:
        after = infer.warp_logits(logits, temperature, k, p).softmax(-1)
    kept = int((after > 0).sum())
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    gen = torch.Generator().manual_seed(seed)
    out = infer.decode(model, ids.repeat(n_samples, 1), max_new_tokens=n_tokens, temperature=temperature,
                       top_k=k, top_p=p, generator=gen)
    samples = tokenizer.batch_decode(out[:, ids.shape[1]:], skip_special_tokens=True)
    order = before.argsort(descending=True)[:12].tolist()
    return {"prompt": prompt, "kept": kept, "vocab": before.numel(),
            "top": [(tokenizer.decode([i]), before[i].item(), after[i].item()) for i in order],
            "kept_mass_before": before[after > 0].sum().item(), "samples": samples,
            "distinct_samples": len(set(samples))}


def _render_sampling(r: dict) -> str:
    import numpy as np

    fig, ax = _figure(7.0, 2.6)
    labels = [repr(t)[1:-1] or "∅" for t, _, _ in r["top"]]
    x = np.arange(len(labels))
    ax.bar(x - 0.2, [b for _, b, _ in r["top"]], 0.4, label="model", color="#bbb")
    ax.bar(x + 0.2, [a for _, _, a in r["top"]], 0.4, label="after the knobs", color="#3a6ea5")
    ax.set_xticks(x, labels, rotation=40, ha="right", fontsize=8)
    ax.set_ylabel("probability")
    ax.legend(fontsize=8)
    ax.set_title("The 12 most likely next tokens")
    img = _figure_html(fig, "Bar chart of the course model's 12 most likely next tokens, before and after "
                            "temperature, top-k and top-p")
    samples = "".join(f"<li><code>{html.escape(r['prompt'])}</code><b>{html.escape(s)}</b></li>"
                      for s in r["samples"])
    token, before, after = r["top"][0]
    table = _table([("most likely next token", f"{token!r}: {before:.3f} -> {after:.3f}"),
                    ("tokens kept", f"{r['kept']:,} of {r['vocab']:,}"),
                    ("their probability before renormalising", f"{r['kept_mass_before']:.3f}"),
                    ("distinct samples", f"{r['distinct_samples']} of {len(r['samples'])}")])
    return f"{table}{img}<ul style='margin:2px'>{samples}</ul>"


def sampling_explorer(prompt: str = "Mia has a red", temperature: float = 1.0, top_k: int = 0,
                      top_p: float = 1.0) -> Explorer:
    """Temperature, top-k and top-p on the course model's real next-token distribution: the kept set, the
    renormalised bars and a few seeded samples (``infer.warp_logits`` and ``infer.decode``). Chapter: Inference."""
    controls = {
        "prompt": W.Text(value=_text(prompt, "prompt"), description="prompt", continuous_update=False,
                         style={"description_width": "90px"}),
        "temperature": _float_slider(temperature, 0.0, 2.0, 0.05, "temperature"),
        "top_k": _int_slider(top_k, 0, 100, "top-k (0: off)"),
        "top_p": _float_slider(top_p, 0.05, 1.0, 0.05, "top-p (1: off)"),
    }
    return Explorer("Sampling explorer", controls, sampling, _render_sampling,
                    lambda r: f"{r['kept']:,} of {r['vocab']:,} tokens kept; most likely {r['top'][0][0]!r}")


# -------------------------------------------------------- Memory and compute --

@functools.lru_cache(maxsize=1)
def published_configs() -> dict:
    """Dense models of the landscape chapter's data (``landscape.DATA``, shipped in the package) by name: their
    transformers config values (``_params_and_config`` counts their parameters on the meta device)."""
    from llmlab import landscape

    out = {}
    for m in landscape.load(landscape.DATA)["models"]:
        values = (m.get("config") or {}).get("values")
        if not values or any(values.get(k) for k in landscape.EXPERT_KEYS):
            continue
        if values.get("model_type") not in ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3",
                                            "olmo2", "smollm3", "granite"):
            continue
        out[m["name"]] = values
    return out


@functools.lru_cache(maxsize=64)
def _params_and_config(name: str):
    from llmlab import landscape

    values = published_configs()[name]
    return landscape.parameter_counts(values).total, landscape._config(values)


METHODS = ("inference", "full fine-tuning (AdamW)", "LoRA (r=16, q,v)", "QLoRA (r=16, q,v, 4-bit base)")
PRECISIONS = {"fp32": 32, "bf16 / fp16": 16, "int8": 8, "4-bit": 4}


def plan_memory(model: str, precision: str, method: str, batch: int, context: int, gpu: str,
                checkpointing: bool = True) -> dict:
    """The memory chapter's estimates for one setting: ``estimate_inference_memory`` weights plus
    ``kv_cache_bytes`` (16-bit) to serve, ``estimate_training_memory`` to train (LoRA counted by
    ``lora.lora_parameters``), and ``fits`` on ``gpu``. All in GB."""
    from llmlab import lora, memory

    if model not in published_configs():
        raise ValueError(f"unknown model {model!r}; known: {sorted(published_configs())}")
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {list(PRECISIONS)}, got {precision!r}")
    n_params, config = _params_and_config(model)
    limit = getattr(config, "max_position_embeddings", None)
    if limit and context > limit:
        raise ValueError(f"context {context:,} is over {model}'s limit of {limit:,} tokens")
    shape = memory.Shape.of(config)
    bits = PRECISIONS[precision]
    if method == "inference":
        weights = memory.estimate_inference_memory(n_params, bits, overhead=0)
        kv = memory.kv_cache_bytes(shape.n_layers, shape.n_kv_heads, getattr(config, "head_dim", None)
                                   or shape.head_dim, context, batch, bits=16) / memory.GB
        parts = {"weights": weights, "KV cache": kv}
    else:
        trainable = None
        if method.startswith(("LoRA", "QLoRA")):
            trainable = lora.lora_parameters(config, r=16, target_modules=("q_proj", "v_proj"))
        if method.startswith("QLoRA"):
            bits = 4
        est = memory.estimate_training_memory(n_params, shape, batch_size=batch, seq_len=context,
                                              weight_bits=bits, trainable_params=trainable,
                                              checkpointing=checkpointing)
        parts = {k: v for k, v in est.gb().items() if k != "total"}
    total = sum(parts.values())
    fit = memory.fits(total, gpu)
    return {"model": model, "n_params": n_params, "bits": bits, "parts": parts, "total_gb": total,
            "fits": fit.ok, "available_gb": fit.available_gb, "reason": fit.reason}


def _render_memory(r: dict) -> str:
    fig, ax = _figure(7.0, 1.4)
    left = 0.0
    colors = ["#3a6ea5", "#e3a33b", "#6aa84f", "#b55d8a"]
    for (name, gb), color in zip(r["parts"].items(), colors):
        ax.barh([0], [gb], left=left, color=color, label=f"{name} {gb:.1f} GB")
        left += gb
    ax.axvline(r["available_gb"], color="k", ls="--", lw=1)
    ax.text(r["available_gb"], 0.45, " GPU", va="bottom", fontsize=8)
    ax.set_yticks([])
    ax.set_xlim(0, max(left, r["available_gb"]) * 1.15)
    ax.set_xlabel("GB")
    ax.legend(fontsize=8, ncol=4, loc="upper center", bbox_to_anchor=(0.5, -0.45), frameon=False)
    img = _figure_html(fig, "Stacked bar of the estimated memory by part, with a dashed line at the GPU's "
                            "usable memory")
    verdict = "fits" if r["fits"] else "does not fit"
    table = _table([("parameters", f"{r['n_params'] / 1e9:.2f} B"), ("weight bits", str(r["bits"])),
                    ("total", f"{r['total_gb']:.1f} GB"), (verdict, r["reason"])])
    return table + img


def memory_planner(model: str = "Llama 2 7B", precision: str = "bf16 / fp16", method: str = METHODS[3],
                   batch: int = 1, context: int = 512, gpu: str = "T4") -> Explorer:
    """Model (a published config from the landscape chapter), precision, method, batch, context and GPU: the
    memory chapter's breakdown and whether it fits, with the margin. Chapter: Memory and compute."""
    from llmlab import memory

    controls = {
        "model": _dropdown(sorted(published_configs()), model, "model"),
        "precision": _dropdown(list(PRECISIONS), precision, "precision"),
        "method": _dropdown(list(METHODS), method, "method"),
        "batch": _int_slider(batch, 1, 64, "batch"),
        "context": W.BoundedIntText(value=_number(context, 1, 10_000_000, "context", integer=True), min=1,
                                    max=10_000_000, description="context", style={"description_width": "90px"}),
        "gpu": _dropdown(list(memory.GPUS), gpu, "GPU"),
    }
    return Explorer("Memory planner", controls, plan_memory, _render_memory, lambda r: r["reason"])


# -------------------------------------------------------- Quantization --

@functools.lru_cache(maxsize=1)
def _weight_matrix():
    model, _ = _course_model()
    name = "model.layers.0.mlp.up_proj.weight"  # the matrix the quantization chapter starts with
    return name, model.state_dict()[name].detach().clone()


GRANULARITIES = ("tensor", "channel", "block 32", "block 64", "block 128")


def quantize_weight(bits: int, granularity: str, outlier: float) -> dict:
    """Absmax-quantize a real weight matrix of the course model (``quant.absmax_quantize``, then
    ``quant.dequantize``) with one weight set to ``outlier`` times the matrix's largest (0: none): the error
    of every weight and ``quant.quantization_error``'s SNR."""
    from llmlab import quant

    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
    if not 0 <= outlier <= 1000:
        raise ValueError(f"outlier must be between 0 (none) and 1000 times the largest weight, got {outlier}")
    name, w = _weight_matrix()
    w = w.clone()
    if outlier:
        w[0, 0] = outlier * w.abs().max()
    axis = 0 if granularity == "channel" else None
    block = int(granularity.split()[1]) if granularity.startswith("block") else None
    q, scale = quant.absmax_quantize(w, bits, axis=axis, blocksize=block)
    w_hat = quant.dequantize(q, scale, blocksize=block, shape=w.shape)
    err = quant.quantization_error(w, w_hat)
    rest = (w_hat - w).flatten()[1:] if outlier else (w_hat - w).flatten()
    return {"matrix": name, "shape": tuple(w.shape), "bits": bits, "granularity": granularity,
            "outlier": outlier, **err, "errors": rest, "std_w": w.std().item()}


def _render_quant(r: dict) -> str:
    fig, ax = _figure(7.0, 2.4)
    ax.hist(r["errors"].numpy(), bins=80, color="#3a6ea5")
    ax.set_xlabel("dequantized minus original weight")
    ax.set_ylabel("weights")
    ax.set_title(f"{r['bits']}-bit absmax, per {r['granularity']}")
    img = _figure_html(fig, "Histogram of the quantization error of every weight of one matrix of the course "
                            "model")
    table = _table([("matrix", f"{r['matrix']} {r['shape']}"), ("SNR", f"{r['snr_db']:.1f} dB"),
                    ("relative RMS error", f"{r['rel_rms']:.4f}"), ("max |error|", f"{r['max_abs']:.4f}")])
    return table + img


def quantization_explorer(bits: int = 4, granularity: str = "block 64", outlier: float = 0.0) -> Explorer:
    """Bits, granularity (tensor, channel, block size) and one outlier's size: the error histogram and SNR on a
    real weight matrix of the course model. Chapter: Quantization from scratch."""
    controls = {
        "bits": _int_slider(bits, 2, 8, "bits"),
        "granularity": _dropdown(list(GRANULARITIES), granularity, "scale per"),
        "outlier": _float_slider(outlier, 0.0, 50.0, 1.0, "outlier (x max)"),
    }
    return Explorer("Quantization explorer", controls, quantize_weight, _render_quant,
                    lambda r: f"{r['bits']}-bit per {r['granularity']}: SNR {r['snr_db']:.1f} dB")


# -------------------------------------------------------- RoPE and attention --

LLAMA31_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192}  # Llama 3.1's config.json
SCALINGS = {"none": None, "linear x8": {"rope_type": "linear", "factor": 8.0}, "llama3 x8": LLAMA31_ROPE}
ATTENTION_PROMPT = "Mia has a red ball. She gives the ball to Tom, and Tom says thank you."


@functools.lru_cache(maxsize=1)
def _attentions():
    import torch

    from llmlab import models
    from llmlab.env import COURSE_MODEL

    model, tokenizer = models.load(COURSE_MODEL, dtype="float32", attn_implementation="eager")
    ids = tokenizer(ATTENTION_PROMPT, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        att = model(ids, output_attentions=True).attentions
    return [a[0] for a in att], tokenizer.convert_ids_to_tokens(ids[0])


def rope_and_attention(position: int, pair: int, scaling: str, layer: int, head: int, head_dim: int = 128,
                       theta: float = 500000.0) -> dict:
    """RoPE's rotation speeds for a scaling type (``transformer.rope_inv_freq``; default head size and base:
    Llama 3.1's): the chosen pair's speed, wavelength and angle at ``position``, how many pairs the scaling keeps,
    divides by its factor or blends; and the course model's attention weights of one layer and head."""
    import torch

    from llmlab import transformer

    if scaling not in SCALINGS:
        raise ValueError(f"scaling must be one of {list(SCALINGS)}, got {scaling!r}")
    if not 0 <= pair < head_dim // 2:
        raise ValueError(f"pair must be in [0, {head_dim // 2 - 1}] (head_dim {head_dim} has {head_dim // 2} pairs)")
    att, tokens = _attentions()
    if not 0 <= layer < len(att) or not 0 <= head < att[0].shape[0]:
        raise ValueError(f"layer must be in [0, {len(att) - 1}] and head in [0, {att[0].shape[0] - 1}]")
    inv = {name: transformer.rope_inv_freq(head_dim, theta, s) for name, s in SCALINGS.items()}
    plain, scaled = inv["none"], inv[scaling]
    factor = (SCALINGS[scaling] or {}).get("factor", 1.0)
    kept = torch.isclose(scaled, plain, rtol=1e-6)
    divided = torch.isclose(scaled, plain / factor, rtol=1e-6) & ~kept
    f = scaled[pair].item()
    return {"position": position, "pair": pair, "scaling": scaling, "inv_freq": f,
            "wavelength": 2 * math.pi / f, "angle_deg": math.degrees(position * f) % 360,
            "kept": int(kept.sum()), "divided": int(divided.sum()), "blended": int((~kept & ~divided).sum()),
            "factor": factor, "inv_all": {k: v.tolist() for k, v in inv.items()}, "head_dim": head_dim,
            "theta": theta, "layer": layer, "head": head, "weights": att[layer][head], "tokens": tokens}


def _rope_counts(r: dict) -> str:
    return f"{r['kept']} kept, {r['divided']} divided by {r['factor']:g}, {r['blended']} blended"


def _render_rope(r: dict) -> str:
    fig, (ax1, ax2) = _figure(7.6, 3.4, ncols=2)
    for name, inv in r["inv_all"].items():
        wl = [2 * math.pi / f for f in inv]
        ax1.semilogy(range(len(wl)), wl, label=name, lw=2.5 if name == r["scaling"] else 1)
    ax1.axvline(r["pair"], color="k", ls=":", lw=1)
    ax1.set_xlabel("dimension pair")
    ax1.set_ylabel("wavelength (positions)")
    ax1.legend(fontsize=7)
    ax1.set_title(f"RoPE, head_dim {r['head_dim']}, base {r['theta']:,.0f}", fontsize=9)
    labels = [t.replace("\u0120", "\u00b7") for t in r["tokens"]]
    ax2.imshow(r["weights"].numpy(), cmap="Blues", vmin=0)
    ax2.set_xticks(range(len(labels)), labels, rotation=90, fontsize=6)
    ax2.set_yticks(range(len(labels)), labels, fontsize=6)
    ax2.set_title(f"course model: layer {r['layer']}, head {r['head']}", fontsize=9)
    img = _figure_html(fig, "Left: RoPE wavelength per dimension pair for each scaling type. Right: the "
                            "course model's attention weights for one layer and head, query rows and key columns")
    table = _table([("pairs", _rope_counts(r)),
                    (f"pair {r['pair']}: rotation speed", f"{r['inv_freq']:.4g} rad per position"),
                    ("wavelength", f"{r['wavelength']:,.1f} positions"),
                    (f"angle at position {r['position']:,}", f"{r['angle_deg']:.1f} degrees")])
    return table + img


def rope_explorer(position: int = 100, pair: int = 40, scaling: str = "llama3 x8", layer: int = 0,
                  head: int = 0, head_dim: int = 128, theta: float = 500000.0) -> Explorer:
    """Position, frequency (dimension pair) and scaling type of RoPE (head size and base: Llama 3.1's by
    default), and an attention heatmap for a chosen layer and head of the course model on a short story.
    Chapter: Attention and the block."""
    att, _ = _attentions()
    controls = {
        "position": _int_slider(position, 0, 131072, "position"),
        "pair": _int_slider(pair, 0, head_dim // 2 - 1, "pair i"),
        "scaling": _dropdown(list(SCALINGS), scaling, "scaling"),
        "layer": _int_slider(layer, 0, len(att) - 1, "layer"),
        "head": _int_slider(head, 0, att[0].shape[0] - 1, "head"),
    }
    return Explorer("RoPE and attention explorer", controls,
                    lambda **v: rope_and_attention(**v, head_dim=head_dim, theta=theta), _render_rope,
                    lambda r: f"{r['scaling']}: " + _rope_counts(r))


# -------------------------------------------------------- Fine-tuning: LoRA --

def lora_plan(model: str, rank: int, alpha: float, targets: tuple) -> dict:
    """``lora.lora_parameters`` for a published config: trainable parameters, their share, the adapter's bytes
    (fp32 and bf16), AdamW's states for them, and the update's scale ``alpha / r``."""
    from llmlab import lora

    if model not in published_configs():
        raise ValueError(f"unknown model {model!r}; known: {sorted(published_configs())}")
    if not targets:
        raise ValueError("choose at least one target module")
    n_params, config = _params_and_config(model)
    trainable = lora.lora_parameters(config, r=rank, target_modules=tuple(targets))
    return {"model": model, "n_params": n_params, "trainable": trainable, "share": trainable / n_params,
            "adapter_mb_fp32": trainable * 4 / 1e6, "adapter_mb_bf16": trainable * 2 / 1e6,
            "adamw_mb": trainable * 8 / 1e6, "scale": alpha / rank, "rank": rank, "targets": tuple(targets),
            "per_target": {t: lora.lora_parameters(config, r=rank, target_modules=(t,)) for t in targets}}


def _render_lora(r: dict) -> str:
    fig, ax = _figure(7.0, 2.2)
    names = list(r["per_target"])
    ax.barh(names, [r["per_target"][t] / 1e6 for t in names], color="#3a6ea5")
    ax.set_xlabel("trainable parameters (millions)")
    ax.set_title(f"LoRA rank {r['rank']} on {r['model']}")
    img = _figure_html(fig, "Horizontal bars of LoRA's trainable parameters per target module")
    table = _table([("trainable parameters", f"{r['trainable']:,} ({r['share']:.3%} of {r['n_params'] / 1e9:.2f} B)"),
                    ("adapter, fp32 / bf16", f"{r['adapter_mb_fp32']:.1f} / {r['adapter_mb_bf16']:.1f} MB"),
                    ("AdamW states (fp32)", f"{r['adamw_mb']:.1f} MB"), ("scale alpha / r", f"{r['scale']:.3g}")])
    return table + img


def lora_explorer(model: str = "Llama 2 7B", rank: int = 16, alpha: float = 32.0,
                  targets: tuple = ("q_proj", "v_proj")) -> Explorer:
    """Rank, alpha and target modules on a published config: trainable parameters, adapter memory and the
    update's scale (``lora.lora_parameters``). Chapter: Fine-tuning."""
    from llmlab import lora

    unknown = [t for t in targets if t not in lora.LLAMA_PROJECTIONS] if isinstance(targets, (tuple, list)) else None
    if unknown is None or unknown:
        raise ValueError(f"targets must be a tuple of {lora.LLAMA_PROJECTIONS}, got {targets!r}")
    controls = {
        "model": _dropdown(sorted(published_configs()), model, "model"),
        "rank": _int_slider(rank, 1, 256, "rank r"),
        "alpha": _float_slider(alpha, 1.0, 256.0, 1.0, "alpha"),
        "targets": W.SelectMultiple(options=list(lora.LLAMA_PROJECTIONS), value=tuple(targets),
                                    description="targets", rows=7, style={"description_width": "90px"}),
    }
    return Explorer("LoRA explorer", controls, lora_plan, _render_lora,
                    lambda r: f"{r['trainable']:,} trainable parameters ({r['share']:.3%})")


# -------------------------------------------------------- Inference: the roofline --

BYTES_PER_PARAM = {"fp32": 4.0, "bf16 / fp16": 2.0, "int8": 1.0, "4-bit": 0.5}


def _kv_bytes_per_token(config) -> int:
    from llmlab import memory

    shape = memory.Shape.of(config)
    head_dim = getattr(config, "head_dim", None) or shape.head_dim
    return memory.kv_cache_bytes(shape.n_layers, shape.n_kv_heads, head_dim, 1, 1, bits=16)


def _model_numbers(model: str, models: dict | None) -> tuple[float, float, int | None]:
    """``(n_params, kv_bytes_per_token, max_context)`` of an extra model or a published config."""
    if models and model in models:
        m = models[model]
        return m["n_params"], m.get("kv_bytes_per_token", 0), m.get("max_context")
    if model not in published_configs():
        raise ValueError(f"unknown model {model!r}; known: {sorted({*published_configs(), *(models or {})})}")
    n_params, config = _params_and_config(model)
    return n_params, _kv_bytes_per_token(config), getattr(config, "max_position_embeddings", None)


def roofline_point(gpu: str, model: str, precision: str, batch: int, context: int, hardware: dict | None = None,
                   models: dict | None = None, measured: list | None = None) -> dict:
    """``infer.roofline`` for a GPU (bandwidth and dense 16-bit peak from ``infer``'s data-sheet tables, or a
    ``hardware`` entry ``name -> (GB/s, TFLOP/s or None)``), a model at ``precision`` (a published config, or a
    ``models`` entry ``name -> {n_params, kv_bytes_per_token, max_context}``), a batch and a context: both bounds,
    the binding one, the ridge point, and the curve over batch sizes. ``measured`` points (dicts with ``label,
    hardware, model, precision, batch, tokens_per_s``) that match the selection come back with their share of
    the roofline."""
    from llmlab import infer

    hardware = {**_gpus(), **(hardware or {})}
    if gpu not in hardware:
        raise ValueError(f"unknown hardware {gpu!r}; known: {sorted(hardware)}")
    if precision not in BYTES_PER_PARAM:
        raise ValueError(f"precision must be one of {list(BYTES_PER_PARAM)}, got {precision!r}")
    n_params, kv, limit = _model_numbers(model, models)
    if limit and context > limit:
        raise ValueError(f"context {context:,} is over {model}'s limit of {limit:,} tokens")
    bandwidth, peak = hardware[gpu]

    def bound(b):
        return infer.roofline(n_params, BYTES_PER_PARAM[precision], bandwidth, b, kv, context, peak_tflops=peak)

    point = bound(batch)
    batches = [2 ** i for i in range(11)]
    curve = [bound(b) for b in batches]
    points = []
    for m in measured or []:
        if (m["hardware"], m["model"], m["precision"]) == (gpu, model, precision):
            roof = bound(m["batch"])["tokens_per_s"]
            points.append({**m, "roofline_tokens_per_s": roof, "share": m["tokens_per_s"] / roof})
    return {**point, "gpu": gpu, "model": model, "precision": precision, "batch": batch, "context": context,
            "bandwidth_gb_s": bandwidth, "peak_tflops": peak, "batches": batches, "curve": curve,
            "measured": points}


def _gpus() -> dict:
    from llmlab import infer

    return {g: (infer.GPU_BANDWIDTH_GB_S[g], infer.GPU_PEAK_TFLOPS[g])
            for g in infer.GPU_BANDWIDTH_GB_S if g in infer.GPU_PEAK_TFLOPS}


def _render_roofline(r: dict) -> str:
    fig, ax = _figure(7.0, 2.8)
    ax.loglog(r["batches"], [c["memory_bound_tokens_per_s"] for c in r["curve"]], "--", label="memory roof")
    if r["peak_tflops"] is not None:
        ax.loglog(r["batches"], [c["compute_bound_tokens_per_s"] for c in r["curve"]], ":", label="compute roof")
    ax.loglog(r["batches"], [c["tokens_per_s"] for c in r["curve"]], "k-", lw=2, label="roofline (the lower)")
    ax.plot([r["batch"]], [r["tokens_per_s"]], "o", color="#c00", label=f"batch {r['batch']}")
    for m in r["measured"]:
        ax.plot([m["batch"]], [m["tokens_per_s"]], "s", color="#6aa84f", label=m["label"])
    ax.set_xlabel("batch size (sequences decoded together)")
    ax.set_ylabel("tokens/s, all sequences")
    ax.set_title(f"{r['model']} ({r['precision']}) on {r['gpu']}, context {r['context']:,}")
    ax.legend(fontsize=7)
    img = _figure_html(fig, "Log-log plot of decoding tokens per second against batch size: the memory roof, "
                            "the compute roof and the roofline, with the chosen batch marked")
    rows = [("bound at this batch", f"{r['tokens_per_s']:,.0f} tokens/s ({r['bound']}-bound)"),
            ("arithmetic intensity", f"{r['arithmetic_intensity']:,.1f} FLOP/byte"),
            ("ridge point", f"{r['ridge_point']:,.0f} FLOP/byte" if r["peak_tflops"] is not None
             else "none (no compute roof given)"),
            ("KV cache read per step", f"{r['kv_bytes'] / 1e9:.2f} GB of {r['bytes_per_step'] / 1e9:.2f} GB")]
    rows += [(m["label"], f"{m['tokens_per_s']:,.0f} tokens/s = {m['share']:.0%} of the roofline")
             for m in r["measured"]]
    return _table(rows) + img


def roofline_explorer(gpu: str = "T4", model: str = "Llama 2 7B", precision: str = "bf16 / fp16", batch: int = 1,
                      context: int = 1024, hardware: dict | None = None, models: dict | None = None,
                      measured: list | None = None) -> Explorer:
    """GPU, model, precision, batch and context: the memory and compute bounds of decoding, the ridge point, and
    where ``measured`` points fall (``roofline_point``; ``hardware`` and ``models`` add entries to the GPUs and
    published configs). Chapters: Inference and Serving."""
    controls = {
        "gpu": _dropdown([*(hardware or {}), *sorted(_gpus())], gpu, "hardware"),
        "model": _dropdown([*(models or {}), *sorted(published_configs())], model, "model"),
        "precision": _dropdown(list(BYTES_PER_PARAM), precision, "weights"),
        "batch": W.SelectionSlider(options=[2 ** i for i in range(11)], value=_dropdown(
                                   [2 ** i for i in range(11)], batch, "batch").value, description="batch",
                                   continuous_update=False, style={"description_width": "90px"}),
        "context": W.BoundedIntText(value=_number(context, 0, 10_000_000, "context", integer=True), min=0,
                                    max=10_000_000, description="context", style={"description_width": "90px"}),
    }
    return Explorer("Roofline explorer", controls,
                    lambda **v: roofline_point(**v, hardware=hardware, models=models, measured=measured),
                    _render_roofline, _roofline_summary)


def _roofline_summary(r: dict) -> str:
    shares = "".join(f"; {m['label']} at {m['share']:.0%} of it" for m in r["measured"])
    return f"{r['tokens_per_s']:,.0f} tokens/s, {r['bound']}-bound{shares}"
