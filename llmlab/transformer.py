"""A Llama from scratch in plain PyTorch: RMSNorm, RoPE, grouped-query attention, SwiGLU, the block, the model.

Chapters: Embeddings and positions, Attention, The transformer block (book part I, "From tokens to a
transformer"). The file reads top to bottom like nanoGPT's ``model.py`` and transformers' ``modeling_llama.py``,
and its parameter names are transformers' (``model.embed_tokens``, ``model.layers.N.self_attn.q_proj``, ...,
``lm_head``), so a Hugging Face Llama's weights load by name: ``Llama.from_hf(hf_model)``,
``Llama.from_pretrained(folder)``. The tests check every piece against its transformers counterpart and the
whole model's logits against ``LlamaForCausalLM`` (course model, fp32: equal to 1e-5).

Conventions. Activations are ``(batch, seq, hidden)``; inside attention, ``(batch, heads, seq, head_dim)``.
RoPE uses transformers' "rotate half" layout (dimension ``i`` pairs with ``i + head_dim/2``; Meta's original code
pairs neighbours ``2i, 2i+1`` and the conversion script permutes the q/k weights to match). Masks are boolean,
True where a query may attend to a key, as in ``torch.nn.functional.scaled_dot_product_attention``. A causal mask
is aligned bottom-right: with ``Lq`` queries and ``Lk >= Lq`` keys, query ``i`` sits at position ``Lk - Lq + i``,
which is what decoding with a KV cache needs (PyTorch's ``is_causal`` aligns top-left; they agree when
``Lq == Lk``). Rotary angles, norms and softmax are computed in float32 whatever the model's dtype.
"""
from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

ROPE_TYPES = ("default", "linear", "llama3")  # the rotary variants implemented here (Llama 1/2, Code Llama, 3.1+)


# ------------------------------------------------------------------ checks --

def _tensor(x, name="x", dim=None):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got {x.dtype}")
    if dim is not None and x.dim() != dim:
        raise ValueError(f"{name} must be {dim}-D, got shape {tuple(x.shape)}")
    return x


def _int(v, name, minimum=1):
    if isinstance(v, bool) or not isinstance(v, int):
        raise TypeError(f"{name} must be an int, got {type(v).__name__}")
    if v < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {v}")
    return v


def _positive(v, name):
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(v).__name__}")
    if not (v > 0 and math.isfinite(v)):
        raise ValueError(f"{name} must be positive and finite, got {v}")
    return float(v)


def _check_qkv(q, k, v):
    """q: (B, Hq, Lq, D); k, v: (B, Hkv, Lk, D) with Hkv dividing Hq. Returns the number of query heads per kv head."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        _tensor(t, name, dim=4)
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} must agree on batch (dim 0) and head_dim (dim 3)")
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"the number of query heads ({q.shape[1]}) must be a multiple of the number of key/value "
                         f"heads ({k.shape[1]})")
    if min(q.shape) == 0 or min(k.shape) == 0:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} must not be empty")
    return q.shape[1] // k.shape[1]


# ------------------------------------------------------------------ config --

@dataclass(frozen=True)
class Config:
    """The numbers that fix a Llama: read from a transformers ``LlamaConfig``, a ``config.json`` dict, or given.

    ``num_key_value_heads`` (default: ``num_attention_heads``, plain multi-head attention) below
    ``num_attention_heads`` is grouped-query attention. ``head_dim`` defaults to ``hidden_size //
    num_attention_heads``. ``rope_scaling`` is ``None`` (plain RoPE) or a dict with ``rope_type`` "linear"
    (``factor``) or "llama3" (``factor``, ``low_freq_factor``, ``high_freq_factor``,
    ``original_max_position_embeddings``). ``pad_token_id``'s embedding starts at zero and gets no gradient
    through the embedding lookup, as in transformers.
    """
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    initializer_range: float = 0.02
    pad_token_id: int | None = None

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "max_position_embeddings"):
            _int(getattr(self, name), name)
        if self.num_key_value_heads is None:
            object.__setattr__(self, "num_key_value_heads", self.num_attention_heads)
        _int(self.num_key_value_heads, "num_key_value_heads")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                             f"num_key_value_heads ({self.num_key_value_heads})")
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise ValueError(f"hidden_size ({self.hidden_size}) must be a multiple of num_attention_heads "
                                 f"({self.num_attention_heads}) when head_dim is not given")
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
        if _int(self.head_dim, "head_dim") % 2:
            raise ValueError(f"head_dim must be even (RoPE rotates pairs of dimensions), got {self.head_dim}")
        object.__setattr__(self, "rms_norm_eps", _positive(self.rms_norm_eps, "rms_norm_eps"))
        object.__setattr__(self, "rope_theta", _positive(self.rope_theta, "rope_theta"))
        _positive(self.initializer_range, "initializer_range")
        for name in ("tie_word_embeddings", "attention_bias", "mlp_bias"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be a bool, got {type(getattr(self, name)).__name__}")
        object.__setattr__(self, "rope_scaling", _rope_scaling(self.rope_scaling, self.max_position_embeddings))
        if self.pad_token_id is not None and _int(self.pad_token_id, "pad_token_id", minimum=0) >= self.vocab_size:
            raise ValueError(f"pad_token_id must be below vocab_size ({self.vocab_size}), got {self.pad_token_id}")

    @classmethod
    def from_hf(cls, config) -> Config:
        """A ``Config`` from a transformers config (``LlamaConfig``), a ``config.json`` dict, or a ``Config``.

        Both spellings of RoPE settings are read: transformers 5's ``rope_parameters`` (which holds
        ``rope_theta`` too) and the older top-level ``rope_theta`` plus ``rope_scaling`` (with ``type`` or
        ``rope_type``) that many config.json files on the Hub still use.
        """
        if isinstance(config, Config):
            return config
        if isinstance(config, Mapping):
            d = dict(config)
        elif callable(getattr(config, "to_dict", None)):
            d = config.to_dict()
        else:
            raise TypeError(f"config must be a transformers config, a dict or a Config, got {type(config).__name__}")
        if d.get("model_type", "llama") != "llama":
            raise ValueError(f"not a Llama config: model_type is {d['model_type']!r}")
        if d.get("hidden_act", "silu") != "silu":
            raise ValueError(f"Llama's MLP uses silu, this config asks for {d['hidden_act']!r}")
        missing = [f.name for f in fields(cls)[:5] if f.name not in d]
        if missing:
            raise ValueError(f"the config lacks {missing}")
        rope = dict(d.get("rope_parameters") or d.get("rope_scaling") or {})
        if rope.get("partial_rotary_factor", 1.0) != 1.0:
            raise ValueError("partial rotary embeddings (partial_rotary_factor < 1) are not implemented")
        theta = rope.pop("rope_theta", d.get("rope_theta", 10000.0))
        rope_type = rope.get("rope_type") or rope.get("type") or "default"
        known = {f.name for f in fields(cls)} - {"rope_theta", "rope_scaling"}
        return cls(**{k: v for k, v in d.items() if k in known and v is not None}, rope_theta=theta,
                   rope_scaling=None if rope_type == "default" else rope)


def _rope_scaling(scaling, max_position_embeddings=None):
    """Check a rope scaling dict and fill in what transformers fills in; ``None`` for plain RoPE."""
    if scaling is None:
        return None
    if not isinstance(scaling, Mapping):
        raise TypeError(f"rope_scaling must be a dict or None, got {type(scaling).__name__}")
    scaling = dict(scaling)
    old_key = scaling.pop("type", None)  # what transformers 4 configs called rope_type
    rope_type = scaling["rope_type"] = scaling.get("rope_type") or old_key or "default"
    if rope_type not in ROPE_TYPES:
        raise ValueError(f"rope_type must be one of {ROPE_TYPES}, got {rope_type!r}")
    if rope_type == "default":
        return None
    need = {"linear": ("factor",),
            "llama3": ("factor", "low_freq_factor", "high_freq_factor")}[rope_type]
    if rope_type == "llama3":  # transformers falls back to max_position_embeddings as well
        if max_position_embeddings is not None:
            scaling.setdefault("original_max_position_embeddings", max_position_embeddings)
        need += ("original_max_position_embeddings",)
    for key in need:
        if key not in scaling:
            raise ValueError(f"{rope_type} rope scaling needs {key!r}, got keys {sorted(scaling)}")
        _positive(scaling[key], key)
    if rope_type == "llama3" and scaling["high_freq_factor"] <= scaling["low_freq_factor"]:
        raise ValueError("llama3 rope scaling needs high_freq_factor > low_freq_factor")
    return scaling


def parameter_count(config) -> int:
    """The closed-form number of parameters of a Llama with this config (a ``Config``, a transformers config or a
    config.json dict), tied embeddings counted once.

    ``V*d`` (embeddings) ``+ L * [d*(H+2*Hkv)*hd + H*hd*d`` (q, k, v, o) ``+ 3*d*I`` (gate, up, down)
    ``+ 2*d`` (two norms) ``+ biases] + d`` (final norm) ``+ V*d`` (lm_head, unless tied).
    """
    c = Config.from_hf(config)
    d, hd, h, kv, i = c.hidden_size, c.head_dim, c.num_attention_heads, c.num_key_value_heads, c.intermediate_size
    attention = d * (h + 2 * kv) * hd + h * hd * d + ((h + 2 * kv) * hd + d if c.attention_bias else 0)
    mlp = 3 * d * i + (2 * i + d if c.mlp_bias else 0)
    per_layer = attention + mlp + 2 * d
    embeddings = c.vocab_size * d
    lm_head = 0 if c.tie_word_embeddings else c.vocab_size * d
    return embeddings + c.num_hidden_layers * per_layer + d + lm_head


# ------------------------------------------------------------------ RMSNorm --

class RMSNorm(nn.Module):
    """``x / sqrt(mean(x^2) + eps) * weight``: LayerNorm without the mean subtraction and the bias.
    Computed in float32, cast back to the input's dtype before the weight, as transformers does."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(_int(dim, "dim")))
        self.eps = _positive(eps, "eps")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _tensor(x).shape[-1:] != self.weight.shape:
            raise ValueError(f"x's last dimension must be {self.weight.numel()}, got shape {tuple(x.shape)}")
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)

    def extra_repr(self):
        return f"{self.weight.numel()}, eps={self.eps}"


# --------------------------------------------------------------------- RoPE --

def rope_inv_freq(head_dim: int, theta: float = 10000.0, scaling: dict | None = None) -> torch.Tensor:
    """The ``head_dim / 2`` rotation speeds ``theta^(-2i/head_dim)`` (radians per position), float32.

    ``scaling`` rescales them for longer contexts: "linear" divides all by ``factor`` (position interpolation);
    "llama3" divides only the slow ones (wavelength above ``original_max_position_embeddings /
    low_freq_factor``), keeps the fast ones (below ``... / high_freq_factor``) and blends in between.
    """
    if _int(head_dim, "head_dim") % 2:
        raise ValueError(f"head_dim must be even (RoPE rotates pairs of dimensions), got {head_dim}")
    theta = _positive(theta, "theta")
    scaling = _rope_scaling(scaling)
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if scaling is None:
        return inv_freq
    factor = scaling["factor"]
    if scaling["rope_type"] == "linear":
        return inv_freq / factor
    # llama3: wavelengths longer than the original context are slowed down by `factor`, short ones kept
    old_context = scaling["original_max_position_embeddings"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_context / low, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelen - low) / (high - low)  # 0 at the slow end of the band, 1 at the fast end
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    in_between = (wavelen >= old_context / high) & (wavelen <= old_context / low)
    return torch.where(in_between, blended, scaled)


def rope_cos_sin(inv_freq: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of ``position * inv_freq``, each half repeated (rotate-half layout): ``positions``' shape plus
    ``head_dim``, float32."""
    _tensor(inv_freq, "inv_freq", dim=1)
    if not isinstance(positions, torch.Tensor) or positions.is_floating_point() or positions.dtype == torch.bool:
        raise TypeError("positions must be an integer torch.Tensor")
    angles = positions[..., None].float() * inv_freq.float()  # (..., head_dim / 2)
    angles = torch.cat((angles, angles), dim=-1)  # (..., head_dim)
    return angles.cos(), angles.sin()


def rope_frequencies(head_dim: int, seq_len: int, theta: float = 10000.0,
                     scaling: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(cos, sin)`` for positions ``0 .. seq_len - 1``, each ``(seq_len, head_dim)`` float32; see
    ``rope_inv_freq`` for ``theta`` and ``scaling``."""
    positions = torch.arange(_int(seq_len, "seq_len"))
    return rope_cos_sin(rope_inv_freq(head_dim, theta, scaling), positions)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """``(x1, x2) -> (-x2, x1)`` on the two halves of the last dimension: a 90-degree turn of every pair."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
               sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate queries and keys ``(batch, heads, seq, head_dim)`` by their positions' angles.

    ``cos``/``sin`` are ``(seq, head_dim)`` (one set of positions for the batch) or ``(batch, seq, head_dim)``.
    Pair ``(x_i, x_{i+d/2})`` turns by ``position * inv_freq_i``, so ``q_m . k_n`` depends only on ``m - n``.
    """
    for name, t in (("q", q), ("k", k)):
        _tensor(t, name, dim=4)
    for name, t in (("cos", cos), ("sin", sin)):
        _tensor(t, name)
    if cos.shape != sin.shape or cos.dim() not in (2, 3):
        raise ValueError(f"cos and sin must both be (seq, head_dim) or (batch, seq, head_dim), got "
                         f"{tuple(cos.shape)} and {tuple(sin.shape)}")
    for name, t in (("q", q), ("k", k)):
        if t.shape[-2:] != cos.shape[-2:] or (cos.dim() == 3 and cos.shape[0] not in (1, t.shape[0])):
            raise ValueError(f"{name} {tuple(t.shape)} does not fit cos/sin {tuple(cos.shape)}: seq and head_dim "
                             f"must match")
    if cos.dim() == 3:
        cos, sin = cos[:, None], sin[:, None]  # broadcast over heads
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


# ---------------------------------------------------------------- attention --

def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """``(batch, kv_heads, seq, head_dim) -> (batch, kv_heads * n_rep, seq, head_dim)``: each key/value head
    serves ``n_rep`` consecutive query heads (grouped-query attention)."""
    _tensor(x, dim=4)
    if _int(n_rep, "n_rep") == 1:
        return x
    b, h, s, d = x.shape
    return x[:, :, None].expand(b, h, n_rep, s, d).reshape(b, h * n_rep, s, d)


def _causal_mask(lq: int, lk: int, device) -> torch.Tensor:
    """True where query ``i`` (at position ``lk - lq + i``) may see key ``j``: ``j <= lk - lq + i``."""
    return torch.ones(lq, lk, dtype=torch.bool, device=device).tril(diagonal=lk - lq)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True,
              mask: torch.Tensor | None = None) -> torch.Tensor:
    """Scaled dot-product attention written out: ``softmax(q k^T / sqrt(head_dim) + mask) v``.

    q: ``(batch, heads, Lq, head_dim)``; k, v: ``(batch, kv_heads, Lk, head_dim)`` with ``kv_heads`` dividing
    ``heads`` (repeated to match). ``causal`` hides later keys (bottom-right aligned, needs ``Lk >= Lq``);
    ``mask`` is a boolean tensor broadcastable to ``(batch, heads, Lq, Lk)``, True where attending is allowed.
    A query that may see no key at all (only padding) gets the average of all values instead of NaN.
    Returns ``(batch, heads, Lq, head_dim)``.
    """
    n_rep = _check_qkv(q, k, v)
    lq, lk = q.shape[2], k.shape[2]
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    if causal and lq > lk:
        raise ValueError(f"causal attention needs at least as many keys as queries, got {lq} queries, {lk} keys")
    if mask is not None:
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
            raise TypeError(f"mask must be a boolean torch.Tensor, got {getattr(mask, 'dtype', type(mask).__name__)}")
        target = (q.shape[0], q.shape[1], lq, lk)
        try:
            fits = torch.broadcast_shapes(mask.shape, target) == target
        except RuntimeError:
            fits = False
        if not fits:
            raise ValueError(f"mask {tuple(mask.shape)} does not broadcast to (batch, heads, Lq, Lk) = {target}")
    k, v = repeat_kv(k, n_rep), repeat_kv(v, n_rep)
    scores = q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5  # (batch, heads, Lq, Lk)
    allowed = _causal_mask(lq, lk, q.device) if causal else None
    if mask is not None:
        allowed = mask if allowed is None else allowed & mask
    if allowed is not None:
        scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
    weights = torch.softmax(scores.float(), dim=-1).to(q.dtype)
    return weights @ v


def online_softmax_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_size: int = 64,
                             causal: bool = True) -> torch.Tensor:
    """The same result as ``attention``, computed one block of ``block_size`` keys at a time (FlashAttention).

    The ``Lq x Lk`` score matrix is never stored: each query keeps a running maximum ``m`` of the scores seen so
    far, a running sum ``l`` of ``exp(score - m)`` and a running output. When a block raises the maximum, the old
    sum and output are rescaled by ``exp(m_old - m_new)``; the answer is ``output / l`` at the end. Exact up to
    float rounding. Same shapes and ``causal`` convention as ``attention``; computed in float32.
    """
    n_rep = _check_qkv(q, k, v)
    _int(block_size, "block_size")
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    lq, lk = q.shape[2], k.shape[2]
    if causal and lq > lk:
        raise ValueError(f"causal attention needs at least as many keys as queries, got {lq} queries, {lk} keys")
    k, v = repeat_kv(k, n_rep).float(), repeat_kv(v, n_rep).float()
    q32 = q.float() * q.shape[-1] ** -0.5
    q_pos = torch.arange(lk - lq, lk, device=q.device)  # each query's position among the keys
    out = torch.zeros_like(q32)
    row_max = torch.full((*q.shape[:3], 1), -math.inf, device=q.device)
    row_sum = torch.zeros((*q.shape[:3], 1), device=q.device)
    for start in range(0, lk, block_size):
        k_block, v_block = k[:, :, start:start + block_size], v[:, :, start:start + block_size]
        scores = q32 @ k_block.transpose(-2, -1)  # (batch, heads, Lq, block)
        if causal:
            k_pos = torch.arange(start, start + k_block.shape[2], device=q.device)
            scores = scores.masked_fill(k_pos[None, :] > q_pos[:, None], -math.inf)
        new_max = torch.maximum(row_max, scores.amax(dim=-1, keepdim=True))
        # a query that has seen only masked keys so far still has max -inf: subtract 0 there (exp(-inf) = 0)
        shift = torch.where(new_max == -math.inf, torch.zeros_like(new_max), new_max)
        p = torch.exp(scores - shift)
        rescale = torch.exp(row_max - shift)  # how much the old running sum and output shrink
        row_sum = row_sum * rescale + p.sum(dim=-1, keepdim=True)
        out = out * rescale + p @ v_block
        row_max = new_max
    return (out / row_sum).to(q.dtype)


# ------------------------------------------------------- KV cache of attention variants --

LAYER_TYPES = ("full_attention", "sliding_attention")  # transformers' names in ``config.layer_types``


def _bits(bits):
    _int(bits, "bits")
    if bits not in (1, 2, 4, 8, 16, 32):
        raise ValueError(f"bits must be one of (1, 2, 4, 8, 16, 32), got {bits}")
    return bits


def mla_cache_bytes(num_layers: int, kv_lora_rank: int, qk_rope_head_dim: int, seq_len: int,
                    batch_size: int = 1, bits: int = 16) -> int:
    """Bytes of the KV cache of multi-head latent attention (MLA, DeepSeek-V2 and V3).

    Chapter: Attention. MLA caches, per layer and token, one compressed latent of ``kv_lora_rank`` numbers
    (every head's keys and values are up-projected from it) and one RoPE key of ``qk_rope_head_dim`` numbers
    shared by all heads: ``num_layers * (kv_lora_rank + qk_rope_head_dim) * seq_len * batch_size * bits / 8``,
    whatever the number of heads. transformers' ``DeepseekV3Attention`` caches exactly these two tensors (checked
    in the tests against a filled ``DynamicCache``).
    """
    for v, name in ((num_layers, "num_layers"), (kv_lora_rank, "kv_lora_rank"),
                    (qk_rope_head_dim, "qk_rope_head_dim"), (batch_size, "batch_size")):
        _int(v, name)
    _int(seq_len, "seq_len", minimum=0)
    return num_layers * (kv_lora_rank + qk_rope_head_dim) * seq_len * batch_size * _bits(bits) // 8


def hybrid_cache_bytes(layer_types, num_kv_heads: int, head_dim: int, seq_len: int,
                       sliding_window: int | None = None, batch_size: int = 1, bits: int = 16) -> int:
    """Bytes of the KV cache of a model that mixes global and sliding-window attention layers.

    Chapter: Attention. ``layer_types``: one entry per layer, ``"full_attention"`` or ``"sliding_attention"``
    (transformers' ``config.layer_types``: Mistral 7B is all sliding, Gemma 2 alternates 1:1, Gemma 3 has five
    sliding layers per global one). A query in a sliding layer sees itself and the ``sliding_window - 1`` tokens
    before it, so between decode steps such a layer keeps ``min(seq_len, sliding_window - 1)`` tokens; a global
    layer keeps all ``seq_len``. Each kept token costs a key and a value of ``num_kv_heads * head_dim`` numbers.
    Equal to the bytes of transformers' ``DynamicCache`` after a forward pass (checked in the tests); with every
    layer global it is ``llmlab.memory.kv_cache_bytes``.
    """
    if isinstance(layer_types, str) or not hasattr(layer_types, "__iter__"):
        raise TypeError(f"layer_types must be a sequence of {LAYER_TYPES}, got {type(layer_types).__name__}")
    layer_types = list(layer_types)
    if not layer_types or any(t not in LAYER_TYPES for t in layer_types):
        raise ValueError(f"layer_types must be a non-empty sequence of {LAYER_TYPES}, got {layer_types[:4]}...")
    for v, name in ((num_kv_heads, "num_kv_heads"), (head_dim, "head_dim"), (batch_size, "batch_size")):
        _int(v, name)
    _int(seq_len, "seq_len", minimum=0)
    if "sliding_attention" in layer_types:
        if sliding_window is None:
            raise ValueError("sliding layers need sliding_window (the tokens a query sees, itself included)")
        _int(sliding_window, "sliding_window", minimum=2)
    elif sliding_window is not None:
        _int(sliding_window, "sliding_window", minimum=2)
    tokens = sum(seq_len if t == "full_attention" else min(seq_len, sliding_window - 1) for t in layer_types)
    return 2 * num_kv_heads * head_dim * tokens * batch_size * _bits(bits) // 8


class Attention(nn.Module):
    """Multi-head self-attention with grouped-query heads and RoPE: q/k/v projections, rotate q and k, attend
    (causal), merge the heads, output projection ``o_proj``.

    ``forward(x, cos, sin, mask=None, past=None)`` takes ``x`` ``(batch, seq, hidden_size)`` and the positions'
    ``cos``/``sin``; ``past`` is this layer's cached ``(k, v)`` of earlier tokens. Returns ``(output, (k, v))``,
    the keys and values now including this call's tokens.
    """

    def __init__(self, hidden_size: int, num_heads: int, num_kv_heads: int | None = None,
                 head_dim: int | None = None, bias: bool = False):
        super().__init__()
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        if _int(num_heads, "num_heads") % _int(num_kv_heads, "num_kv_heads"):
            raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
        if head_dim is None:
            if _int(hidden_size, "hidden_size") % num_heads:
                raise ValueError(f"hidden_size ({hidden_size}) must be a multiple of num_heads ({num_heads}) "
                                 f"when head_dim is not given")
            head_dim = hidden_size // num_heads
        _int(hidden_size, "hidden_size")
        _int(head_dim, "head_dim")
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.q_proj = nn.Linear(hidden_size, num_heads * head_dim, bias=bias)
        self.k_proj = nn.Linear(hidden_size, num_kv_heads * head_dim, bias=bias)
        self.v_proj = nn.Linear(hidden_size, num_kv_heads * head_dim, bias=bias)
        self.o_proj = nn.Linear(num_heads * head_dim, hidden_size, bias=bias)

    def forward(self, x, cos, sin, mask=None, past=None):
        if _tensor(x, dim=3).shape[-1] != self.q_proj.in_features:
            raise ValueError(f"x must be (batch, seq, {self.q_proj.in_features}), got {tuple(x.shape)}")
        b, s, _ = x.shape
        q = self.q_proj(x).view(b, s, self.num_heads, self.head_dim).transpose(1, 2)  # (b, heads, s, head_dim)
        k = self.k_proj(x).view(b, s, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, s, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, k, cos.to(x.dtype), sin.to(x.dtype))
        if past is not None:  # the cache holds keys already rotated to their own positions
            k, v = torch.cat((past[0], k), dim=2), torch.cat((past[1], v), dim=2)
        out = attention(q, k, v, causal=True, mask=mask)
        out = out.transpose(1, 2).reshape(b, s, self.num_heads * self.head_dim)
        return self.o_proj(out), (k, v)


# ---------------------------------------------------------------- the block --

class SwiGLU(nn.Module):
    """Llama's MLP: ``down_proj(silu(gate_proj(x)) * up_proj(x))``, a gated unit with ``intermediate_size``
    hidden features (three matrices instead of the classic two)."""

    def __init__(self, hidden_size: int, intermediate_size: int, bias: bool = False):
        super().__init__()
        self.gate_proj = nn.Linear(_int(hidden_size, "hidden_size"), _int(intermediate_size, "intermediate_size"),
                                   bias=bias)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=bias)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _tensor(x).shape[-1] != self.gate_proj.in_features:
            raise ValueError(f"x's last dimension must be {self.gate_proj.in_features}, got shape {tuple(x.shape)}")
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    """One decoder layer, pre-norm: ``x + attention(norm(x))``, then ``x + mlp(norm(x))``.
    ``forward(x, cos, sin, mask=None, past=None)`` returns ``(x, (k, v))`` like ``Attention``."""

    def __init__(self, config):
        super().__init__()
        c = Config.from_hf(config)
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.self_attn = Attention(c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim,
                                   c.attention_bias)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.mlp = SwiGLU(c.hidden_size, c.intermediate_size, c.mlp_bias)

    def forward(self, x, cos, sin, mask=None, past=None):
        h, kv = self.self_attn(self.input_layernorm(x), cos, sin, mask, past)
        x = x + h
        x = x + self.mlp(self.post_attention_layernorm(x))
        return x, kv


# ---------------------------------------------------------------- the model --

class KVCache:
    """The keys and values of the tokens seen so far: ``layers[i]`` is layer ``i``'s ``(k, v)``, each
    ``(batch, kv_heads, offset, head_dim)`` with RoPE already applied. ``offset`` is how many positions that is,
    so the next token sits at position ``offset``. Pass the same cache to each ``Llama`` call; it fills itself."""

    def __init__(self):
        self.layers: list[tuple[torch.Tensor, torch.Tensor]] = []

    @property
    def offset(self) -> int:
        return self.layers[0][0].shape[2] if self.layers else 0

    def __repr__(self):
        return f"KVCache(layers={len(self.layers)}, offset={self.offset})"


class Llama(nn.Module):
    """A Llama decoder: token embeddings, ``num_hidden_layers`` blocks, a final RMSNorm and the ``lm_head``
    (tied to the embeddings when ``config.tie_word_embeddings``). ``config``: a ``Config``, a transformers
    ``LlamaConfig`` or a config.json dict; weights start as transformers initializes them (normal, std
    ``initializer_range``)."""

    def __init__(self, config):
        super().__init__()
        self.config = c = Config.from_hf(config)
        self.model = nn.ModuleDict(dict(
            embed_tokens=nn.Embedding(c.vocab_size, c.hidden_size, padding_idx=c.pad_token_id),
            layers=nn.ModuleList(Block(c) for _ in range(c.num_hidden_layers)),
            norm=RMSNorm(c.hidden_size, c.rms_norm_eps),
        ))
        self.lm_head = nn.Linear(c.hidden_size, c.vocab_size, bias=False)
        if c.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight  # one matrix, read in and written out
        self.apply(self._init_weights)
        if c.pad_token_id is not None:  # last: a tied lm_head shares this matrix and was just initialized too
            with torch.no_grad():
                self.model.embed_tokens.weight[c.pad_token_id].zero_()

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=self.config.initializer_range)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                kv_cache: KVCache | None = None, position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Logits ``(batch, seq, vocab_size)`` for token ids ``(batch, seq)``.

        ``attention_mask`` ``(batch, past + seq)``: 1 for real tokens, 0 for padding (hidden as keys).
        ``kv_cache``: a ``KVCache`` holding ``past`` earlier tokens; this call reads it and appends its own keys
        and values. ``position_ids`` ``(batch, seq)``: default ``past, past + 1, ...`` for every row.
        """
        if not isinstance(input_ids, torch.Tensor):
            raise TypeError(f"input_ids must be a torch.Tensor, got {type(input_ids).__name__}")
        if input_ids.is_floating_point() or input_ids.dtype == torch.bool or input_ids.dim() != 2 \
                or input_ids.numel() == 0:
            raise ValueError(f"input_ids must be a non-empty 2-D integer tensor (batch, seq), got "
                             f"{input_ids.dtype} {tuple(input_ids.shape)}")
        if input_ids.min() < 0 or input_ids.max() >= self.config.vocab_size:
            raise ValueError(f"token ids must be in [0, {self.config.vocab_size}), got "
                             f"[{input_ids.min().item()}, {input_ids.max().item()}]")
        if kv_cache is not None and not isinstance(kv_cache, KVCache):
            raise TypeError(f"kv_cache must be a KVCache, got {type(kv_cache).__name__}")
        b, s = input_ids.shape
        layers = self.model.layers
        past = kv_cache.layers if kv_cache is not None else []
        if past and (len(past) != len(layers) or past[0][0].shape[0] != b):
            raise ValueError(f"kv_cache holds {len(past)} layers for batch {past[0][0].shape[0]}, the model has "
                             f"{len(layers)} layers and the input batch is {b}")
        offset = kv_cache.offset if kv_cache is not None else 0
        if position_ids is None:
            position_ids = torch.arange(offset, offset + s, device=input_ids.device)[None]
        elif not isinstance(position_ids, torch.Tensor) or position_ids.shape not in ((b, s), (1, s)):
            raise ValueError(f"position_ids must be a tensor of shape ({b}, {s}), got "
                             f"{getattr(position_ids, 'shape', type(position_ids).__name__)}")
        mask = None
        if attention_mask is not None:
            if not isinstance(attention_mask, torch.Tensor) or attention_mask.shape != (b, offset + s):
                raise ValueError(f"attention_mask must be a tensor of shape (batch, past + seq) = ({b}, {offset + s}),"
                                 f" got {getattr(attention_mask, 'shape', type(attention_mask).__name__)}")
            mask = attention_mask.bool()[:, None, None, :]  # (batch, 1, 1, keys): hide padded keys
        x = self.model.embed_tokens(input_ids)
        inv_freq = rope_inv_freq(self.config.head_dim, self.config.rope_theta, self.config.rope_scaling)
        cos, sin = rope_cos_sin(inv_freq.to(x.device), position_ids)  # (batch or 1, seq, head_dim), float32
        present = []
        for i, layer in enumerate(layers):
            x, kv = layer(x, cos, sin, mask, past[i] if past else None)
            present.append(kv)
        if kv_cache is not None:
            kv_cache.layers = present
        return self.lm_head(self.model.norm(x))

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int = 20, attention_mask: torch.Tensor | None = None,
                 eos_token_id: int | None = None, pad_token_id: int | None = None) -> torch.Tensor:
        """Greedy decoding with a ``KVCache``: the prompt in one pass, then one token per pass.

        Returns the prompt followed by the new tokens, ``(batch, seq + n)``, as transformers' ``generate(...,
        do_sample=False)`` does: left-padded prompts (``attention_mask``) get positions counted from their first
        real token, a row that has produced ``eos_token_id`` continues with ``pad_token_id`` (default: eos), and
        decoding stops early once every row has.
        """
        if not isinstance(input_ids, torch.Tensor):
            raise TypeError(f"input_ids must be a torch.Tensor, got {type(input_ids).__name__}")
        _int(max_new_tokens, "max_new_tokens")
        for name, t in (("eos_token_id", eos_token_id), ("pad_token_id", pad_token_id)):
            if t is not None:
                _int(t, name, minimum=0)
        pad_token_id = eos_token_id if pad_token_id is None else pad_token_id
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        elif not isinstance(attention_mask, torch.Tensor) or attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask must be a tensor shaped like input_ids {tuple(input_ids.shape)}")
        cache = KVCache()
        positions = (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)
        tokens, step_ids = input_ids, input_ids
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        for _ in range(max_new_tokens):
            logits = self(step_ids, attention_mask, cache, positions)
            next_ids = logits[:, -1].argmax(dim=-1)
            if eos_token_id is not None:
                next_ids = torch.where(done, torch.full_like(next_ids, pad_token_id), next_ids)
                done |= next_ids == eos_token_id
            tokens = torch.cat((tokens, next_ids[:, None]), dim=1)
            if done.all():
                break
            step_ids, positions = next_ids[:, None], positions[:, -1:] + 1
            attention_mask = torch.cat((attention_mask, torch.ones_like(attention_mask[:, :1])), dim=1)
        return tokens

    # ------------------------------------------------------------- loading --

    @classmethod
    def from_hf(cls, hf_model_or_state_dict, config=None, dtype: torch.dtype | None = None) -> Llama:
        """A ``Llama`` holding a transformers ``LlamaForCausalLM``'s weights (copied by name), or a state dict's
        (then ``config`` is required). ``dtype`` and device: the checkpoint's (its embedding matrix's) unless
        ``dtype`` is given."""
        source = hf_model_or_state_dict
        if isinstance(source, nn.Module):
            if config is None:
                config = getattr(source, "config", None)
            state = source.state_dict()
        elif isinstance(source, Mapping):
            state = dict(source)
        else:
            raise TypeError(f"expected a transformers model or a state dict, got {type(source).__name__}")
        if config is None:
            raise ValueError("a state dict carries no config: pass config (a LlamaConfig or config.json dict)")
        if dtype is not None and not isinstance(dtype, torch.dtype):
            raise TypeError(f"dtype must be a torch.dtype, got {type(dtype).__name__}")
        model = cls(config)
        state = {k: v for k, v in state.items() if not k.endswith("rotary_emb.inv_freq")}  # in old checkpoints
        if model.config.tie_word_embeddings and "lm_head.weight" not in state and "model.embed_tokens.weight" in state:
            state["lm_head.weight"] = state["model.embed_tokens.weight"]  # tied checkpoints store the matrix once
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as e:
            raise ValueError(f"the weights do not fit this config: {e}") from None
        embed = state["model.embed_tokens.weight"]  # present: load_state_dict checked
        model.to(device=embed.device, dtype=dtype or embed.dtype)
        return model.eval()

    @classmethod
    def from_pretrained(cls, path_or_hf_model, dtype: torch.dtype | None = None) -> Llama:
        """Load a local Hugging Face Llama checkpoint folder (``config.json`` + ``*.safetensors``, sharded or
        not), the course model's name, or a loaded transformers model. Never downloads: Hub ids are refused."""
        if isinstance(path_or_hf_model, nn.Module):
            return cls.from_hf(path_or_hf_model, dtype=dtype)
        from safetensors.torch import load_file

        from llmlab.models import resolve

        kind, location = resolve(path_or_hf_model)  # TypeError / ValueError for a bad name
        if kind == "hub":
            raise ValueError(f"local folders only: {path_or_hf_model!r} is not a folder (download it first, e.g. "
                             f"with llmlab.models.load or huggingface_hub.snapshot_download)")
        folder = Path(location)
        files = sorted(folder.glob("*.safetensors"))
        if not (folder / "config.json").is_file() or not files:
            raise ValueError(f"{folder} must hold config.json and *.safetensors weights")
        config = json.loads((folder / "config.json").read_text())
        state = {}
        for f in files:
            state.update(load_file(os.fspath(f)))
        return cls.from_hf(state, config, dtype=dtype)
