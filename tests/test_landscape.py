"""Chapter: The open-model landscape. The data file is well sourced, and the counts built from it are right."""
import copy
import json
from pathlib import Path

import pytest
import torch

from llmlab import landscape as L
from llmlab import memory, moe, transformer

torch.set_num_threads(1)
DATA = L.DATA


@pytest.fixture(scope="module")
def data():
    return L.load(DATA)


@pytest.fixture(scope="module")
def by_name(data):
    return {m["name"]: m for m in data["models"]}


def test_every_fact_has_a_source_url(data):
    n = L.check_sources(data)
    assert n > 60  # released, licence, ..., for every model, plus the chapter's claims
    for m in data["models"]:
        for key in ("released", "licence", "licence_family", "commercial_use",
                    "outputs_may_train_other_models", "open_data", "published_total"):
            fact = m[key]
            assert fact["value"] == L.NOT_CHECKED or fact["source"].startswith("https://"), (m["name"], key)
        assert m["config"]["values"]["model_type"]


def test_check_sources_catches_an_unsourced_fact(data):
    bad = copy.deepcopy(data)
    bad["models"][0]["licence"]["source"] = None  # a value with no URL
    with pytest.raises(ValueError, match="licence"):
        L.check_sources(bad)
    bad = copy.deepcopy(data)
    bad["models"][1]["released"] = {"value": L.NOT_CHECKED, "source": "https://example.org"}  # unchecked yet sourced
    with pytest.raises(ValueError, match="released"):
        L.check_sources(bad)
    bad = copy.deepcopy(data)
    del bad["models"][2]["published_total"]
    with pytest.raises(ValueError, match="published_total"):
        L.check_sources(bad)
    bad = copy.deepcopy(data)
    bad["claims"]["qlora"]["source"] = "arxiv 2305.14314"  # not a URL
    with pytest.raises(ValueError, match="qlora"):
        L.check_sources(bad)


def test_llama_31_8b_count_is_the_published_exact_total(by_name):
    """The exact total of Llama-3.1-8B, pinned so that any counting error (a missing norm, a tied head counted twice,
    a wrong head_dim) fails. The JSON's sourced published size is the rounded 8B."""
    values = by_name["Llama 3.1 8B"]["config"]["values"]
    counts = L.parameter_counts(values)
    assert counts.total == 8_030_261_248
    assert counts.active == counts.total and counts.routed_experts == 0
    assert counts.embedding == counts.lm_head == 128256 * 4096  # untied: two tables


def test_meta_counts_equal_the_course_closed_form_for_every_llama(data):
    """The from-scratch formula (llmlab.transformer.parameter_count) against transformers' own modules."""
    llamas = [m for m in data["models"] if m["config"]["values"]["model_type"] == "llama"]
    assert len(llamas) >= 2
    for m in llamas:
        values = m["config"]["values"]
        assert L.parameter_counts(values).total == transformer.parameter_count(values), m["name"]


def test_moe_counts_equal_the_mixtral_closed_form(by_name):
    values = by_name["Mixtral 8x7B"]["config"]["values"]
    counts = L.parameter_counts(values)
    assert (counts.total, counts.active) == moe.moe_parameter_count(values)
    assert (counts.n_experts, counts.top_k) == (8, 2)


def test_tied_embeddings_are_counted_once(by_name):
    values = by_name["Gemma 3 270M"]["config"]["values"]
    tied = L.parameter_counts(values)
    untied = L.parameter_counts({**values, "tie_word_embeddings": False})
    assert tied.lm_head == 0
    assert untied.total - tied.total == values["vocab_size"] * values["hidden_size"]


@pytest.fixture(scope="module")
def counts(data):
    """Every model built once on the meta device (about 0.2 s each), shared below."""
    return {
        m["name"]: L.parameter_counts(m["config"]["values"]) for m in data["models"]
    }


def test_every_model_builds_offline_and_lands_near_its_published_size(data, counts):
    """Each architecture builds on the meta device from the stored values alone (no Hub: HF_HUB_OFFLINE=1).
    The counts land within 10 % of the published size; the chapter explains each gap."""
    for m in data["models"]:
        c = counts[m["name"]]
        published = m["published_total"]["value"]
        assert abs(c.total - published) / published < 0.10, (m["name"], c.total)
        assert 0 < c.active <= c.total


NEW_2025 = (
    "Llama 4 Scout",
    "Llama 4 Maverick",
    "DeepSeek-R1",
    "Kimi K2",
    "GLM-4.5-Air",
    "Qwen3-235B-A22B",
)


def test_2025_models_match_published_total_and_active(by_name, counts):
    """Published sizes are rounded ("109B", "17B", "1T"): at two significant figures
    the rounding alone is up to 0.5/12 = 4.2 % (GLM-4.5-Air's "12B" active), at one
    ("1T") up to 5 %; uncounted parts (Llama 4's vision encoder, MTP layers) are ~1 %.
    So: totals within 3 %, and the active count within 4.5 % under the closest of the
    three conventions vendors use (with the embedding, without it, without embedding
    and output head)."""
    for name in NEW_2025:
        m, c = by_name[name], counts[name]
        assert abs(c.total / m["published_total"]["value"] - 1) < 0.03, (name, c.total)
        active = m["published_active"]["value"]
        no_emb = c.active - c.embedding
        conventions = (c.active, no_emb, no_emb - c.lm_head)
        assert min(abs(a / active - 1) for a in conventions) < 0.045, name
        assert c.n_experts and c.top_k, name  # all six are mixtures of experts
    # Maverick's config: MoE every 2nd layer; MoE in every layer would count ~2x 400B
    maverick = by_name["Llama 4 Maverick"]["config"]["values"]
    every = L.parameter_counts({**maverick, "interleave_moe_layer_step": 1})
    assert every.total > 1.5 * 400e9
    # transformers' Glm4MoeConfig defaults count to GLM-4.5-Air (106B), not GLM-4.5
    glm = counts["GLM-4.5-Air"].total
    assert abs(glm - 106e9) < abs(glm - 355e9) / 100


def test_deepseek_configs_are_deepseeks_own_file(by_name):
    """DeepSeek-V3 and R1 use deepseek-ai/DeepSeek-V3's config_671B.json, renamed to
    transformers' keys; Kimi K2 differs from it only where Moonshot's README model
    summary says so."""
    raw = by_name["DeepSeek-V3"]["config"]["raw"]
    mapped = L.from_deepseek_inference(raw)
    for name in ("DeepSeek-V3", "DeepSeek-R1"):
        values = by_name[name]["config"]["values"]
        assert {k: values[k] for k in mapped} == mapped, name
    assert mapped["hidden_size"] == raw["dim"] == 7168
    assert mapped["first_k_dense_replace"] == raw["n_dense_layers"] == 3
    kimi = by_name["Kimi K2"]["config"]["values"]
    changed = {k for k in mapped if kimi[k] != mapped[k]}
    assert changed == {"num_attention_heads", "num_key_value_heads", "n_routed_experts",
                       "first_k_dense_replace", "n_group", "topk_group", "vocab_size"}
    with pytest.raises(TypeError):
        L.from_deepseek_inference([raw])
    with pytest.raises(ValueError, match="unknown keys"):
        L.from_deepseek_inference({**raw, "hidden_size": 1})
    with pytest.raises(ValueError, match="missing keys"):
        L.from_deepseek_inference({k: v for k, v in raw.items() if k != "dim"})


def test_kv_cache_matches_the_memory_module_and_the_architecture(by_name):
    llama = by_name["Llama 3.1 8B"]["config"]["values"]
    assert L.kv_cache(llama, 1024) == memory.kv_cache_bytes(32, 8, 128, 1024)
    # sliding-window layers stop growing at the window: gpt-oss alternates 12 sliding (128) and 12 full layers
    oss = by_name["gpt-oss-20b"]["config"]["values"]
    assert L.kv_cache(oss, 4096) == memory.kv_cache_bytes(12, 8, 64, 4096) + memory.kv_cache_bytes(12, 8, 64, 128)
    # multi-head latent attention caches one 512 + 64 vector per layer and token, not 128 heads' keys and values
    ds = by_name["DeepSeek-V3"]["config"]["values"]
    assert L.kv_cache(ds, 1000) == 61 * (512 + 64) * 1000 * 2


def test_bad_inputs(tmp_path):
    with pytest.raises(TypeError):
        L.load(42)
    with pytest.raises(ValueError):
        L.load(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"models": [{"name": "x", "released": {"value": "2024", "source": None}}]}))
    with pytest.raises(ValueError):
        L.load(bad)
    with pytest.raises(TypeError):
        L.check_sources([])
    with pytest.raises(TypeError):
        L.parameter_counts("llama")
    with pytest.raises(ValueError, match="model_type"):
        L.parameter_counts({"hidden_size": 64})
    with pytest.raises(ValueError, match="model_type"):
        L.parameter_counts({"model_type": "no-such-architecture"})
    with pytest.raises(ValueError):
        L.kv_cache({"model_type": "llama"}, 0)
    with pytest.raises(ValueError):
        L.kv_cache({"model_type": "llama"}, 1.5)


def test_llama_31_config_is_metas_own_arch_args(by_name):
    """Llama 3.1 8B's values: Meta's sku_list arch_args through Meta's MLP rule."""
    cfg = by_name["Llama 3.1 8B"]["config"]
    mapped = L.from_llama_args(cfg["raw"])
    assert {k: cfg["values"][k] for k in mapped} == mapped
    assert mapped["intermediate_size"] == 14336  # 1024 * ceil(int(1.3 * 10922) / 1024)
    with pytest.raises(TypeError):
        L.from_llama_args("llama")
    with pytest.raises(ValueError, match="dim"):
        L.from_llama_args({**cfg["raw"], "dim": 0})
