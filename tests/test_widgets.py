"""The explorers (llmlab.widgets), driven as a reader drives them: move a control, read what the widget shows.

Each result must equal the chapter's own function for the same values; a bad value must become a message in
the widget. The chapters' stored outputs are checked against the explorers' defaults in test_chapter_defaults_*.
"""
import json
import math
import re
from pathlib import Path

import pytest
import torch

from llmlab import infer, landscape, lora, memory, quant, transformer, widgets
from llmlab.tokenization import BPE, SPECIAL_TOKENS

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def course():
    return widgets._course_model()


# ------------------------------------------------------------------ the shape --

def test_explorer_rejects_bad_controls_and_unknown_names():
    with pytest.raises(TypeError):
        widgets.Explorer("x", {}, lambda: 1, str)
    e = widgets.Explorer("x", {"n": widgets.W.IntSlider(value=1)}, lambda n: n * 2, str)
    with pytest.raises(ValueError, match="unknown controls"):
        e.set(m=3)


def test_an_error_in_the_callback_is_shown_in_the_widget_and_cleared_by_a_good_value():
    def compute(n):
        if n == 3:
            raise ValueError("three is not allowed")
        return n * 2

    e = widgets.Explorer("x", {"n": widgets.W.IntSlider(value=1, max=10)}, compute, lambda r: f"<b>{r}</b>")
    assert e.result == 2 and e.output.value == "<b>2</b>"
    e.controls["n"].value = 3  # as a reader moving the slider: the observer recomputes
    assert e.result is None and "three is not allowed" in e.message
    assert "three is not allowed" in e.output.value and "llmlab-explorer-error" in e.output.value
    e.set(n=4)
    assert e.result == 8 and e.message is None and e.output.value == "<b>8</b>"


def test_the_notebook_shows_a_widget_view_and_a_short_plain_text():
    e = widgets.Explorer("Demo", {"n": widgets.W.IntSlider(value=1)}, lambda n: n, str)
    bundle = e._repr_mimebundle_()
    assert "application/vnd.jupyter.widget-view+json" in bundle
    assert bundle["text/plain"].startswith("Demo (live in Jupyter or on Colab")


# ------------------------------------------------------------------ tokenizer --

@pytest.fixture(scope="module")
def small_bpe():
    texts = ["the cat sat on the mat. the dog sat on the log."] * 3
    return BPE().train(texts, 300, SPECIAL_TOKENS)


def test_tokenizer_explorer_shows_each_tokenizers_ids(course, small_bpe):
    _, tok = course
    e = widgets.tokenizer_explorer(tokenizers={"course": tok, "bpe": small_bpe}, include_smollm2=False)
    e.set(text="The cat sat, the dog ran!")
    text = "The cat sat, the dog ran!"
    assert e.result["course"]["ids"] == tok(text, add_special_tokens=False)["input_ids"]
    assert e.result["bpe"]["ids"] == small_bpe.encode(text)
    assert "".join(e.result["bpe"]["pieces"]) == text
    for name, r in e.result.items():
        assert r["tokens_per_char"] == pytest.approx(len(r["ids"]) / len(text))
        assert f"{r['n_tokens']} tokens" in e.output.value
        assert all(f"<sub style=\"color:#666\">{i}</sub>" in e.output.value for i in r["ids"])
    e.set(text="   ")
    assert e.result is None and "type some text" in e.output.value


def test_tokenizer_explorer_adds_smollm2_when_cached(course):
    from llmlab import models

    if not models.is_cached("smollm2-135m-instruct"):
        pytest.skip("SmolLM2-135M is not cached here: `make smollm2` fetches it")
    smol = widgets.smollm2_tokenizer()
    assert len(smol) == 49152
    e = widgets.tokenizer_explorer(tokenizers={"course": course[1]})
    (name,) = [n for n in e.result if n.startswith("SmolLM2")]
    text = e.values()["text"]
    assert e.result[name]["ids"] == smol(text, add_special_tokens=False)["input_ids"]


# ------------------------------------------------------------------ sampling --

def test_sampling_explorer_keeps_what_warp_logits_keeps(course):
    e = widgets.sampling_explorer(prompt="Mia has a red")
    assert e.message is None and e.result["kept"] == e.result["vocab"]  # the defaults filter nothing
    e.set(temperature=0.7, top_k=5)
    logits = widgets._next_token_logits("Mia has a red")
    expected = infer.warp_logits(logits, 0.7, 5, None).softmax(-1)
    assert e.result["kept"] == int((expected > 0).sum()) <= 5
    assert [a for _, _, a in e.result["top"][:5]] == pytest.approx(expected.sort(descending=True).values[:5].tolist())
    assert f"{e.result['kept']:,} of" in e.output.value
    e.set(top_k=0, top_p=0.5)
    assert e.result["kept"] == int((infer.top_p_filter(logits, 0.5) > -math.inf).sum())
    e.set(temperature=0.0)  # greedy: one token kept, every sample the same
    assert e.result["kept"] == 1 and e.result["distinct_samples"] == 1
    e.set(prompt="")
    assert e.result is None and "type a prompt" in e.output.value


# ------------------------------------------------------------------ memory --

def _published(name):
    values = widgets.published_configs()[name]
    return landscape.parameter_counts(values).total, landscape._config(values)


def test_memory_planner_equals_the_chapters_functions():
    e = widgets.memory_planner()
    n_params, config = _published("Llama 2 7B")
    shape = memory.Shape.of(config)
    trainable = lora.lora_parameters(config, r=16, target_modules=("q_proj", "v_proj"))
    est = memory.estimate_training_memory(n_params, shape, batch_size=1, seq_len=512, weight_bits=4,
                                          trainable_params=trainable, checkpointing=True)
    assert e.result["total_gb"] == pytest.approx(est.total / memory.GB)
    assert e.result["reason"] == memory.fits(est.total / memory.GB, "T4").reason
    e.set(method="inference", precision="4-bit", batch=8, context=4096, gpu="A100-40GB")
    kv = memory.kv_cache_bytes(32, 32, 128, 4096, 8, bits=16) / memory.GB
    weights = memory.estimate_inference_memory(n_params, 4, overhead=0)
    assert e.result["parts"] == pytest.approx({"weights": weights, "KV cache": kv})
    verdict = memory.fits(weights + kv, "A100-40GB")
    assert e.result["fits"] == verdict.ok and html_of(verdict.reason) in e.output.value
    e.set(context=100_000)  # over Llama 2's 4,096
    assert e.result is None and "over Llama 2 7B's limit of 4,096 tokens" in e.message
    assert html_of(e.message) in e.output.value
    e.set(context=512, method=widgets.METHODS[1], precision="4-bit")
    assert e.result is None and "at least 16 bits" in e.output.value


def html_of(s):
    import html

    return html.escape(s)


# ------------------------------------------------------------------ quantization --

def test_quantization_explorer_equals_quant_and_outliers_cost_snr():
    e = widgets.quantization_explorer(bits=4, granularity="block 64")
    _, w = widgets._weight_matrix()
    q, s = quant.absmax_quantize(w, 4, blocksize=64)
    assert e.result["snr_db"] == pytest.approx(
        quant.quantization_error(w, quant.dequantize(q, s, blocksize=64, shape=w.shape))["snr_db"])
    assert f"{e.result['snr_db']:.1f} dB" in e.output.value
    snr4 = e.result["snr_db"]
    e.set(bits=8)
    assert e.result["snr_db"] > snr4 + 15  # about 6 dB a bit
    e.set(bits=4, granularity="tensor", outlier=0.0)
    clean = e.result["snr_db"]
    e.set(outlier=20.0)  # one weight 20x the largest: a per-tensor scale wastes every level on it
    assert e.result["snr_db"] < clean - 10
    e.set(granularity="block 64")
    assert e.result["snr_db"] > clean  # blocks confine the outlier to its own 64 weights


# ------------------------------------------------------------------ RoPE and attention --

def test_rope_explorer_equals_transformer_and_hf_attention(course):
    e = widgets.rope_explorer()
    r = e.result
    plain = transformer.rope_inv_freq(128, 500000.0)
    llama3 = transformer.rope_inv_freq(128, 500000.0, widgets.LLAMA31_ROPE)
    assert r["inv_freq"] == pytest.approx(llama3[r["pair"]].item())
    assert r["kept"] + r["divided"] + r["blended"] == 64
    assert r["kept"] == int(torch.isclose(llama3, plain).sum())
    e.set(scaling="linear x8", pair=3, position=1000)
    assert e.result["inv_freq"] == pytest.approx(plain[3].item() / 8)
    assert (e.result["kept"], e.result["divided"], e.result["blended"]) == (0, 64, 0)
    assert e.result["angle_deg"] == pytest.approx(math.degrees(1000 * plain[3].item() / 8) % 360, abs=1e-3)
    assert f"{e.result['wavelength']:,.1f} positions" in e.output.value
    model, tok = course
    e.set(layer=model.config.num_hidden_layers - 1, head=1)
    weights = e.result["weights"]
    assert torch.allclose(weights.sum(-1), torch.ones(weights.shape[0]), atol=1e-5)
    assert torch.equal(weights.triu(1), torch.zeros_like(weights))  # causal: no query sees a later key
    ids = tok(widgets.ATTENTION_PROMPT, return_tensors="pt")["input_ids"]
    eager = type(model).from_pretrained(model.name_or_path, attn_implementation="eager")
    with torch.no_grad():
        ref = eager(ids, output_attentions=True).attentions[-1][0, 1]
    assert torch.allclose(weights, ref, atol=1e-6)
    e.set(pair=64)  # the slider stops at 63; a value past it is clamped, never an error
    assert e.values()["pair"] == 63 and e.message is None


# ------------------------------------------------------------------ LoRA --

def test_lora_explorer_equals_lora_parameters():
    e = widgets.lora_explorer()
    _, config = _published("Llama 2 7B")
    assert e.result["trainable"] == lora.lora_parameters(config, 16, ("q_proj", "v_proj")) == 8_388_608
    e.set(rank=8, targets=tuple(lora.LLAMA_PROJECTIONS), alpha=16.0)
    assert e.result["trainable"] == lora.lora_parameters(config, 8, lora.LLAMA_PROJECTIONS)
    assert e.result["adapter_mb_bf16"] == pytest.approx(e.result["trainable"] * 2 / 1e6)
    assert e.result["scale"] == 2.0 and f"{e.result['trainable']:,}" in e.output.value
    e.set(targets=())
    assert e.result is None and "at least one target" in e.output.value


# ------------------------------------------------------------------ roofline --

def test_roofline_explorer_equals_infer_roofline_and_places_measured_points():
    measured = [{"label": "measured", "hardware": "T4", "model": "Llama 2 7B", "precision": "4-bit", "batch": 4,
                 "tokens_per_s": 50.0}]
    e = widgets.roofline_explorer(measured=measured)
    n_params, config = _published("Llama 2 7B")
    kv = memory.kv_cache_bytes(32, 32, 128, 1, 1, bits=16)
    ref = infer.roofline(n_params, 2.0, "T4", 1, kv, 1024, peak_tflops="T4")
    assert e.result["tokens_per_s"] == pytest.approx(ref["tokens_per_s"]) and e.result["bound"] == "memory"
    assert e.result["measured"] == []  # measured at 4-bit, shown at 16-bit: not on this plot
    e.set(precision="4-bit", context=0)
    (m,) = e.result["measured"]
    roof = infer.roofline(n_params, 0.5, "T4", 4, kv, 0, peak_tflops="T4")["tokens_per_s"]
    assert m["share"] == pytest.approx(50.0 / roof) and "of the roofline" in e.output.value
    e.set(batch=1024, context=0)  # no KV cache: a big enough batch reaches the compute roof
    assert e.result["bound"] == "compute"
    e.set(context=10**6)
    assert e.result is None and "limit" in e.output.value


def test_roofline_explorer_takes_measured_hardware_and_models_without_a_compute_roof():
    cpu = {"this CPU": (20.0, None)}
    tiny = {"tiny": {"n_params": 1e6, "kv_bytes_per_token": 1000, "max_context": 256}}
    measured = [{"label": "decode", "hardware": "this CPU", "model": "tiny", "precision": "fp32", "batch": 1,
                 "tokens_per_s": 1000.0}]
    e = widgets.roofline_explorer(gpu="this CPU", model="tiny", precision="fp32", context=0, hardware=cpu,
                                  models=tiny, measured=measured)
    assert e.result["tokens_per_s"] == pytest.approx(20e9 / 4e6) and e.result["bound"] == "memory"
    (m,) = e.result["measured"]
    assert m["share"] == pytest.approx(1000.0 / 5000.0)
    assert "none (no compute roof given)" in e.output.value and "decode at 20% of it" in e.summary()
    e.set(context=100)
    assert e.result["kv_bytes"] == 100 * 1000
    e.set(context=300)
    assert e.result is None and "limit of 256 tokens" in e.message


# ------------------------------------------------------------------ the chapters --

# Each explorer, the page it lives on, and what the chapter prints elsewhere that its default must show:
# (a regex over the chapter's own printed outputs, a regex over the explorer's stored view, compare).
EXPLORERS = {
    "Tokenizer explorer": "book/transformer/tokenization.ipynb",
    "RoPE and attention explorer": "book/transformer/attention-and-the-block.ipynb",
    "Memory planner": "book/foundations/memory-and-compute.ipynb",
    "Quantization explorer": "book/compression/quantization-from-scratch.ipynb",
    "Sampling explorer": "book/inference/inference.ipynb",
    "Roofline explorer": "book/inference/inference.ipynb",
    "LoRA explorer": "book/finetuning/fine-tuning.ipynb",
}


def _printed(nb) -> str:
    """Everything the notebook's cells printed or displayed as text, widgets left out."""
    out = []
    for cell in nb["cells"]:
        for o in cell.get("outputs", []):
            data = o.get("data", {})
            if "application/vnd.jupyter.widget-view+json" in data:
                continue
            out.append("".join(o.get("text") or data.get("text/plain") or ""))
            out.append("".join(data.get("text/html") or ""))
    return "\n".join(out)


def stored_view(path: str, title: str) -> str:
    """The HTML the explorer ``title`` showed when its chapter was executed, read from the notebook's stored
    widget state (what the website renders)."""
    nb = json.loads((ROOT / path).read_text())
    state = nb["metadata"]["widgets"]["application/vnd.jupyter.widget-state+json"]["state"]
    for cell in nb["cells"]:
        for o in cell.get("outputs", []):
            data = o.get("data", {})
            if "".join(data.get("text/plain", "")).startswith(title + " ("):
                box = state[data["application/vnd.jupyter.widget-view+json"]["model_id"]]["state"]
                children = [state[c.removeprefix("IPY_MODEL_")]["state"] for c in box["children"]]
                return children[-1]["value"]
    raise AssertionError(f"{path} shows no {title}")


@pytest.mark.parametrize("title", sorted(EXPLORERS))
def test_every_explorer_is_stored_in_its_chapter_with_a_view(title):
    view = stored_view(EXPLORERS[title], title)
    assert "llmlab-explorer-error" not in view, f"{title}'s default setting shows an error"
    assert "llmlab-explorer-table" in view or "<sub" in view
    if title != "Tokenizer explorer":
        assert '<img src="data:image/png;base64,' in view, f"{title} stored no figure"


def _number(pattern, text, what):
    m = re.search(pattern, text)
    assert m, f"{what}: no match for {pattern!r}"
    return m.group(1)


def test_chapter_defaults_match_what_the_chapters_print():
    """Each explorer's stored default equals a number its chapter computed and printed elsewhere."""
    nbs = {p: json.loads((ROOT / p).read_text()) for p in set(EXPLORERS.values())}
    printed = {p: _printed(nb) for p, nb in nbs.items()}

    memory_nb = json.loads((ROOT / "book/foundations/memory-and-compute.ipynb").read_text())
    qlora = _number(r"QLoRA on a 4-bit base(?:\s+[\d.]+){4}\s+([\d.]+)", _printed(memory_nb), "memory plan")
    assert f"<b>{qlora} GB</b>" in stored_view(EXPLORERS["Memory planner"], "Memory planner")

    lora_params = _number(r"LoRA r=16 on all linear layers:\s+([\d,]+) trainable",
                          printed[EXPLORERS["LoRA explorer"]], "LoRA count")
    assert f"<b>{lora_params} (" in stored_view(EXPLORERS["LoRA explorer"], "LoRA explorer")

    tok = printed[EXPLORERS["Tokenizer explorer"]]
    ids = _number(r"\[(\d+(?:, \d+){5,})\]\ndecodes back to the same text: True", tok, "the BPE's ids")
    view = stored_view(EXPLORERS["Tokenizer explorer"], "Tokenizer explorer")
    bpe_row = next(r for r in view.split("<div style='margin:4px 0'>") if r.startswith("<b>BPE from scratch"))
    assert re.findall(r'<sub style="color:#666">(\d+)</sub>', bpe_row) == ids.split(", ")

    rope = _number(r"llama3 scaling of the \d+ frequency pairs: (\d+ kept, \d+ divided by 8, \d+ blended)",
                   printed[EXPLORERS["RoPE and attention explorer"]], "RoPE's pairs")
    assert f"<b>{rope}</b>" in stored_view(EXPLORERS["RoPE and attention explorer"], "RoPE and attention explorer")

    snr = float(_number(r"int4 absmax SNR ([\d.]+) dB", printed[EXPLORERS["Quantization explorer"]], "int4 SNR"))
    shown = float(_number(r"SNR</td><td style='text-align:right'><b>([\d.]+) dB",
                          stored_view(EXPLORERS["Quantization explorer"], "Quantization explorer"), "explorer SNR"))
    assert shown == pytest.approx(snr, abs=0.051)

    inference = printed[EXPLORERS["Sampling explorer"]]
    first = _number(r"the 8 most likely of \d+ tokens\n\s*'([^']+)'", inference, "top token")
    kept = _number(r"top-p = 0.9\s+(\d+)", inference, "top-p kept")
    view = stored_view(EXPLORERS["Sampling explorer"], "Sampling explorer")
    assert f"&#x27;{html_of(first)}&#x27;:" in view and f"<b>{kept} of" in view
    # the roofline opens on this CPU: the bound and the measured engines of the chapter's speed table
    view = stored_view(EXPLORERS["Roofline explorer"], "Roofline explorer")
    bound = int(_number(r"bound \(main-memory copy\)\s+(\d+)", inference, "the CPU's bound"))
    shown = _number(r"<b>([\d,]+) tokens/s \(memory-bound\)</b>", view, "the explorer's bound")
    assert int(shown.replace(",", "")) == bound
    for engine, share in re.findall(r"\n(PyTorch \(HF generate\)|PyTorch \(infer\.decode\)|llama\.cpp \(f32 GGUF\))"
                                    r"\s+\d+\s+[\d.]+\s+([\d.]+)", inference):
        pct = _number(rf"{re.escape(html_of(engine))}</td><td style='text-align:right'><b>[\d,]+ tokens/s = (\d+)%",
                      view, engine)
        assert abs(int(pct) - 100 * float(share)) <= 1, (engine, pct, share)


def test_a_line_under_each_explorer_says_where_it_is_live():
    calls = re.compile(r"widgets\.(\w+_explorer|memory_planner)\(")
    found = {}
    for path in sorted(set(EXPLORERS.values())):
        cells = json.loads((ROOT / path).read_text())["cells"]
        for i, cell in enumerate(cells):
            if cell["cell_type"] == "code" and calls.search("".join(cell["source"])):
                found.setdefault(path, []).append(calls.search("".join(cell["source"])).group(1))
                after = cells[i + 1] if i + 1 < len(cells) else {"cell_type": "none", "source": ""}
                text = "".join(after["source"])
                assert after["cell_type"] == "markdown" and "Colab" in text and "launch button" in text, \
                    f"{path}: no line under the explorer in cell {i} saying how to make it live"
    assert sum(len(v) for v in found.values()) == len(EXPLORERS), found


def test_explorers_reject_bad_starting_values_with_one_clear_error():
    bad = [
        (lambda: widgets.memory_planner(model="GPT-5"), ValueError, "model must be one of"),
        (lambda: widgets.memory_planner(batch=0), ValueError, "batch must be between 1 and 64"),
        (lambda: widgets.memory_planner(context="long"), TypeError, "context must be an int"),
        (lambda: widgets.quantization_explorer(bits=9), ValueError, "bits must be between 2 and 8"),
        (lambda: widgets.quantization_explorer(granularity="row"), ValueError, "scale per must be one of"),
        (lambda: widgets.sampling_explorer(prompt=3), TypeError, "prompt must be a str"),
        (lambda: widgets.sampling_explorer(temperature=-1.0), ValueError, "temperature must be between"),
        (lambda: widgets.lora_explorer(targets=("qkv",)), ValueError, "targets must be a tuple"),
        (lambda: widgets.roofline_explorer(gpu="T5"), ValueError, "hardware must be one of"),
        (lambda: widgets.roofline_explorer(batch=3), ValueError, "batch must be one of"),
        (lambda: widgets.rope_explorer(pair=64), ValueError, "pair i must be between 0 and 63"),
        (lambda: widgets.tokenizer_explorer(text=None, tokenizers={"b": BPE()}), TypeError, "text must be a str"),
    ]
    for make, error, message in bad:
        with pytest.raises(error, match=re.escape(message)):
            make()
