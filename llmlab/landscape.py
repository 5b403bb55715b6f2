"""The open-model landscape, computed: parameter counts, KV cache and memory of published model configs.

Chapter: The open-model landscape. The chapter's data is ``llmlab/assets/open_models.json`` (``DATA``; shipped in
the package, so the chapter and the explorers read it on Colab too): for each model, its
release date, licence and published size, every fact with the URL it was read from, and the architecture values
of its ``config.json``. This module turns those values into numbers the chapter can check: it builds each model
with transformers' own classes on PyTorch's ``meta`` device (shapes only: no memory, no download), counts the
parameters, splits a mixture of experts into total and active parameters, and sizes the KV cache.

A fact in the JSON is ``{"value": ..., "source": "https://..."}``; a fact we could not source is
``{"value": "not checked", "source": null}``. ``check_sources`` enforces that rule.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from llmlab.memory import kv_cache_bytes

DATA = Path(__file__).parent / "assets" / "open_models.json"  # every fact with the URL it was read from
NOT_CHECKED = "not checked"
# config.json keys that name the number of routed experts and the experts each token uses, by architecture
EXPERT_KEYS = ("num_local_experts", "num_experts", "n_routed_experts")
TOP_K_KEYS = ("num_experts_per_tok", "experts_per_token")


# ------------------------------------------------------------------ the data --

def _facts(node, path=""):
    """Every ``{"value", "source"}`` dict under ``node``, with its path in the JSON."""
    if isinstance(node, dict):
        if "value" in node and "source" in node:
            yield path, node
            return
        for k, v in node.items():
            yield from _facts(v, f"{path}.{k}" if path else k)
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _facts(v, f"{path}[{i}]")


def check_sources(data: dict) -> int:
    """Check that every fact has a source URL, or says ``"not checked"``; return how many facts were checked.

    Each model needs a ``name``, a ``config`` with ``values`` (or ``null``) and a ``source``, and the facts
    ``released``, ``licence`` and ``published_total``. Raises ``ValueError`` listing every fact that breaks the rule.
    """
    if not isinstance(data, dict) or not isinstance(data.get("models"), list):
        raise TypeError("expected the landscape JSON: a dict with a 'models' list")
    problems = []
    for i, m in enumerate(data["models"]):
        name = m.get("name", f"models[{i}]") if isinstance(m, dict) else f"models[{i}]"
        if not isinstance(m, dict):
            problems.append(f"{name}: not a dict")
            continue
        for key in ("released", "licence", "published_total", "config"):
            if key not in m:
                problems.append(f"{name}: missing {key!r}")
        cfg = m.get("config")
        if isinstance(cfg, dict) and cfg.get("values") is not None:
            if not isinstance(cfg["values"], dict) or "model_type" not in cfg["values"]:
                problems.append(f"{name}: config.values needs a model_type")
            if not _is_url(cfg.get("source")):
                problems.append(f"{name}: config.values has no source URL")
    n = 0
    for path, fact in _facts({"models": data["models"], "claims": data.get("claims", {})}):
        n += 1
        ok = _is_url(fact["source"]) if fact["value"] != NOT_CHECKED else fact["source"] is None
        if not ok:
            problems.append(f"{path}: value {fact['value']!r} needs a source URL (or value 'not checked')")
    if problems:
        raise ValueError("the landscape data breaks the sourcing rule:\n  " + "\n  ".join(problems))
    return n


def _is_url(s) -> bool:
    if isinstance(s, list):
        return bool(s) and all(_is_url(x) for x in s)
    return isinstance(s, str) and s.startswith(("https://", "http://")) and " " not in s


def load(path) -> dict:
    """Read the landscape JSON at ``path`` and check its sources (``check_sources``)."""
    if not isinstance(path, (str, Path)):
        raise TypeError(f"path must be a str or Path, got {type(path).__name__}")
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"no landscape data at {path}")
    data = json.loads(path.read_text())
    check_sources(data)
    return data


# DeepSeek's own inference configs (deepseek-ai/DeepSeek-V3, inference/configs/*.json)
# name the shapes their own way: their key -> transformers' key
DEEPSEEK_INFERENCE_KEYS = {
    "vocab_size": "vocab_size",
    "dim": "hidden_size",
    "inter_dim": "intermediate_size",
    "moe_inter_dim": "moe_intermediate_size",
    "n_layers": "num_hidden_layers",
    "n_dense_layers": "first_k_dense_replace",
    "n_heads": "num_attention_heads",
    "n_routed_experts": "n_routed_experts",
    "n_shared_experts": "n_shared_experts",
    "n_activated_experts": "num_experts_per_tok",
    "n_expert_groups": "n_group",
    "n_limited_groups": "topk_group",
    "q_lora_rank": "q_lora_rank",
    "kv_lora_rank": "kv_lora_rank",
    "qk_nope_head_dim": "qk_nope_head_dim",
    "qk_rope_head_dim": "qk_rope_head_dim",
    "v_head_dim": "v_head_dim",
}
# keys of that file that set numerics, not shapes
DEEPSEEK_INFERENCE_IGNORED = ("route_scale", "score_func", "dtype")


def from_deepseek_inference(raw: dict) -> dict:
    """transformers config values from one of DeepSeek's inference configs
    (``inference/configs/config_671B.json`` in deepseek-ai/DeepSeek-V3), which name the
    same shapes differently (``dim``, ``n_layers``, ``n_heads``, ...).

    Multi-head latent attention has as many KV heads as query heads, so
    ``num_key_value_heads = n_heads``; the result has ``model_type`` ``deepseek_v3`` and
    untied embeddings, as DeepSeek's ``inference/model.py`` builds them.
    Chapter: The open-model landscape.
    """
    if not isinstance(raw, dict):
        kind = type(raw).__name__
        raise TypeError(f"raw must be a dict (a DeepSeek inference config), got {kind}")
    known = set(DEEPSEEK_INFERENCE_KEYS) | set(DEEPSEEK_INFERENCE_IGNORED)
    unknown = sorted(set(raw) - known)
    missing = sorted(set(DEEPSEEK_INFERENCE_KEYS) - set(raw))
    if unknown or missing:
        raise ValueError(
            "not a DeepSeek inference config:"
            f" unknown keys {unknown}, missing keys {missing}"
        )
    values = {"model_type": "deepseek_v3"}
    for key, value in raw.items():
        if key in DEEPSEEK_INFERENCE_KEYS:
            values[DEEPSEEK_INFERENCE_KEYS[key]] = value
    values["num_key_value_heads"] = values["num_attention_heads"]
    values["tie_word_embeddings"] = False
    return values


def from_llama_args(args: dict) -> dict:
    """transformers ``llama`` config values from Meta's ``arch_args``
    (``models/sku_list.py`` in meta-llama/llama-models): ``dim``, ``n_layers``,
    ``n_heads``, ``n_kv_heads``, ``vocab_size``, ``ffn_dim_multiplier`` and
    ``multiple_of``.

    The MLP width follows Meta's ``FeedForward``: ``int(2 * 4 * dim / 3)``, times
    ``ffn_dim_multiplier`` (truncated), rounded up to a multiple of ``multiple_of``;
    for Llama 3.1 8B, 14,336. Chapter: The open-model landscape.
    """
    if not isinstance(args, dict):
        kind = type(args).__name__
        raise TypeError(f"args must be a dict (Meta's arch_args), got {kind}")
    need = ("dim", "n_layers", "n_heads", "vocab_size", "multiple_of")
    missing = [k for k in need if not isinstance(args.get(k), int) or args[k] < 1]
    if missing:
        raise ValueError(f"arch_args need positive ints for {missing}")
    hidden = int(2 * 4 * args["dim"] / 3)
    if args.get("ffn_dim_multiplier") is not None:
        hidden = int(args["ffn_dim_multiplier"] * hidden)
    m = args["multiple_of"]
    return {
        "model_type": "llama",
        "hidden_size": args["dim"],
        "intermediate_size": m * ((hidden + m - 1) // m),
        "num_hidden_layers": args["n_layers"],
        "num_attention_heads": args["n_heads"],
        "num_key_value_heads": args.get("n_kv_heads") or args["n_heads"],
        "vocab_size": args["vocab_size"],
        "tie_word_embeddings": False,
    }


# ------------------------------------------------------------------ counting --

def _config(values):
    """A transformers config from a config.json dict (``model_type`` picks the class)."""
    from transformers import AutoConfig

    if not isinstance(values, dict):
        raise TypeError(f"config values must be a dict (config.json), got {type(values).__name__}")
    values = dict(values)
    model_type = values.pop("model_type", None)
    if not isinstance(model_type, str):
        raise ValueError("config values need a 'model_type' (e.g. 'llama', 'qwen3_moe')")
    try:
        return AutoConfig.for_model(model_type, **values)
    except ValueError as e:
        raise ValueError(f"transformers has no config class for model_type {model_type!r}: {e}") from None


def build_on_meta(values: dict):
    """The model of a config.json dict, built by transformers on the ``meta`` device: every parameter has its
    shape and dtype but no storage, so a 671B-parameter model costs no memory and needs no download."""
    import torch
    from transformers import AutoModelForCausalLM

    config = _config(values)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


@dataclass(frozen=True)
class ParameterCount:
    """Parameters of one model: all of them, those one token uses, and where they sit."""
    total: int          # distinct parameters (tied embeddings counted once)
    active: int         # used by one token: everything but the routed experts, plus k/E of them
    embedding: int      # the input embedding table
    lm_head: int        # the output projection, 0 when tied to the embedding
    routed_experts: int  # parameters of all routed experts together (0 for a dense model)
    n_experts: int      # routed experts per MoE layer (0 for a dense model)
    top_k: int          # experts each token uses (0 for a dense model)


def _moe_shape(values):
    n = next((values[k] for k in EXPERT_KEYS if values.get(k)), 0)
    k = next((values[k] for k in TOP_K_KEYS if values.get(k)), 0)
    return int(n), int(k)


def parameter_counts(values: dict) -> ParameterCount:
    """Count the parameters of a config.json dict by building it on the meta device (``build_on_meta``).

    Routed experts are the tensors under an ``.experts.`` module (transformers stores each layer's experts
    fused, one tensor of shape ``(n_experts, ...)``); a token uses ``top_k`` of the ``n_experts``, so
    ``active = total - routed + routed * top_k / n_experts``. Shared experts (DeepSeek) and routers count as
    active. The embedding table is counted in ``active`` too, as most model cards do, although a token only
    reads one row of it.
    """
    model = build_on_meta(values)
    total = routed = 0
    for name, p in model.named_parameters():  # named_parameters() yields a tied weight once
        total += p.numel()
        if ".experts." in name:
            routed += p.numel()
    n_experts, top_k = _moe_shape(values)
    if routed and not (n_experts and top_k):
        raise ValueError("the model has expert tensors but the config names no expert count / top-k")
    if routed:
        for name, p in model.named_parameters():
            if ".experts." in name and p.shape[0] != n_experts:
                raise ValueError(f"{name} has {p.shape[0]} experts, the config says {n_experts}")
    active = total - routed + (routed * top_k // n_experts if routed else 0)
    emb = model.get_input_embeddings().weight
    head = model.get_output_embeddings().weight
    return ParameterCount(total=total, active=active, embedding=emb.numel(),
                          lm_head=0 if head is emb else head.numel(), routed_experts=routed,
                          n_experts=n_experts if routed else 0, top_k=top_k if routed else 0)


# ------------------------------------------------------------------ KV cache --

def kv_cache(values: dict, seq_len: int, bits: int = 16, batch_size: int = 1) -> int:
    """Bytes of the KV cache for ``seq_len`` tokens, per the architecture's own attention layout.

    - Standard and grouped-query attention: a key and a value of ``head_dim`` per KV head, layer and token
      (``llmlab.memory.kv_cache_bytes``).
    - Sliding-window layers (``layer_types`` of transformers' config, e.g. Gemma 3, gpt-oss) keep at most
      ``sliding_window`` tokens.
    - Multi-head latent attention (DeepSeek-V3, ``kv_lora_rank``): one compressed latent of ``kv_lora_rank``
      plus a shared rotary key of ``qk_rope_head_dim`` per layer and token, whatever the number of heads.
    """
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
        raise ValueError(f"seq_len must be a positive int, got {seq_len!r}")
    config = _config(values)
    layers = config.num_hidden_layers
    if getattr(config, "kv_lora_rank", None):  # MLA caches c_kv and k_rope, one vector of their summed width
        width = config.kv_lora_rank + config.qk_rope_head_dim
        return kv_cache_bytes(layers, 1, width, seq_len, batch_size, bits) // 2  # one vector, not a K and a V
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    types = getattr(config, "layer_types", None) or ["full_attention"] * layers
    window = getattr(config, "sliding_window", None)
    full = sum(t != "sliding_attention" for t in types)
    sliding = len(types) - full
    total = kv_cache_bytes(full, kv_heads, head_dim, seq_len, batch_size, bits) if full else 0
    if sliding:
        kept = min(seq_len, window) if window else seq_len
        total += kv_cache_bytes(sliding, kv_heads, head_dim, kept, batch_size, bits)
    return total
