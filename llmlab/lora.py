"""LoRA from scratch: a low-rank update beside a frozen Linear, put into a model, merged back out, and counted.

Chapter: Fine-tuning (LoRA and QLoRA). LoRA (Hu et al., 2021) leaves a pretrained weight ``W`` (out x in) frozen and
learns ``W + (alpha / r) * B @ A`` instead, with ``A`` (r x in) and ``B`` (out x r): ``r * (in + out)`` trainable
numbers in place of ``in * out``. ``B`` starts at zero, so training starts from exactly the pretrained model.
QLoRA (Dettmers et al., 2023) is the same adapter over a base stored in 4-bit NF4 (bitsandbytes' ``Linear4bit``),
which bitsandbytes also runs on a CPU.

Everything is checked in the tests against peft (``get_peft_model(model, LoraConfig(...))``) on the same weights:
the same logits, the same merged weights, the same number of trainable parameters.

Conventions, as peft's defaults: ``A`` is initialised like an ``nn.Linear`` weight (Kaiming uniform, a = sqrt(5)),
``B`` to zeros; dropout (if any) is applied to the input of the LoRA path only; ``A`` and ``B`` are kept in float32
(or in the base's dtype where that is wider), the input is cast to their dtype and the update cast back to the
base output's dtype. Targets are matched on the last component of a module's name (``"q_proj"`` matches
``model.layers.0.self_attn.q_proj``), as peft does for a list of names.

rsLoRA (Kalajdzievski, 2023, arXiv 2312.03732) changes only the scale: ``alpha / sqrt(r)`` in place of
``alpha / r`` (``use_rslora=True`` here and in peft's ``LoraConfig``). With ``alpha / r`` the update of a trained
adapter shrinks as ``r`` grows, so high ranks learn little more than low ones; ``alpha / sqrt(r)`` keeps its
size steady across ranks.
"""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

LLAMA_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


# ------------------------------------------------------------------ checks --

def _int(v, name):
    if isinstance(v, bool) or not isinstance(v, int):
        raise TypeError(f"{name} must be an int, got {type(v).__name__}")
    return v


def _rank(r):
    if _int(r, "r") <= 0:
        raise ValueError(f"r must be a positive int, got {r}")
    return r


def _number(v, name):
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(v).__name__}")
    return v


def _alpha(alpha):
    if not _number(alpha, "alpha") > 0:  # `not >` also rejects nan
        raise ValueError(f"alpha must be positive, got {alpha}")
    return alpha


def _flag(v, name):
    if not isinstance(v, bool):
        raise TypeError(f"{name} must be a bool, got {type(v).__name__}")
    return v


def lora_scaling(r: int, alpha: float, use_rslora: bool = False) -> float:
    """The factor on ``B @ A``: ``alpha / r`` (LoRA), or ``alpha / sqrt(r)`` with ``use_rslora`` (rsLoRA,
    Kalajdzievski 2023), as peft's ``LoraConfig(use_rslora=...)`` computes it. Chapter: Fine-tuning."""
    _rank(r)
    _alpha(alpha)
    return alpha / math.sqrt(r) if _flag(use_rslora, "use_rslora") else alpha / r


def _dropout(p):
    if not 0 <= _number(p, "dropout") < 1:
        raise ValueError(f"dropout must be in [0, 1), got {p}")
    return p


def _targets(target_modules):
    """A tuple of names from one name or a list / tuple of names."""
    if isinstance(target_modules, str):
        target_modules = (target_modules,)
    if not isinstance(target_modules, (list, tuple, set, frozenset)) or \
            not all(isinstance(t, str) for t in target_modules):
        raise TypeError(f"target_modules must be a str or a list of str, got {target_modules!r}")
    if not target_modules or not all(t.strip() for t in target_modules):
        raise ValueError(f"target_modules must be non-empty names, got {target_modules!r}")
    return tuple(dict.fromkeys(target_modules))  # drop repeats, keep order


def _module(model, name="model"):
    if not isinstance(model, nn.Module):
        raise TypeError(f"{name} must be a torch.nn.Module, got {type(model).__name__}")
    return model


def _is_4bit(weight):
    """A bitsandbytes 4-bit weight: packed integers (``Params4bit``), not a float matrix one can add to."""
    return type(weight).__name__ == "Params4bit" or not weight.is_floating_point()


# ---------------------------------------------------------------- the layer --

class LoRALinear(nn.Module):
    """``base(x) + B(A(dropout(x))) * alpha / r`` around a frozen ``base``: an ``nn.Linear``, or a bitsandbytes
    ``Linear4bit`` (QLoRA), which is an ``nn.Linear`` subclass with a packed 4-bit weight. ``use_rslora=True``
    scales by ``alpha / sqrt(r)`` instead (rsLoRA)."""

    def __init__(self, base: nn.Linear, r: int = 8, alpha: float = 16, dropout: float = 0.0,
                 use_rslora: bool = False):
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"base must be a torch.nn.Linear (or a bitsandbytes Linear4bit), got {type(base).__name__}")
        self.r, self.alpha, self.use_rslora = _rank(r), _alpha(alpha), _flag(use_rslora, "use_rslora")
        self.scaling = lora_scaling(r, alpha, use_rslora)
        self.base = base.requires_grad_(False)
        self.in_features, self.out_features = base.in_features, base.out_features
        w = base.weight
        dtype = torch.float32 if _is_4bit(w) else torch.promote_types(w.dtype, torch.float32)
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, device=w.device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, device=w.device, dtype=dtype))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # what nn.Linear does to its weight
        self.dropout = nn.Dropout(dropout) if _dropout(dropout) else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base(x)
        x = x.to(self.lora_A.dtype)
        update = F.linear(F.linear(self.dropout(x), self.lora_A), self.lora_B) * self.scaling
        return (result + update).to(result.dtype)  # add in the wider dtype, then round once

    def delta_weight(self) -> torch.Tensor:
        """The update as a full matrix, ``B @ A * scaling`` (out x in): what ``merge_lora`` adds to the weight."""
        return (self.lora_B @ self.lora_A) * self.scaling

    def extra_repr(self) -> str:
        rs = ", use_rslora=True" if self.use_rslora else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, alpha={self.alpha}{rs}"


# ------------------------------------------------------------- whole models --

def _keep_4bit_layers_differentiable(model):
    """Stop bitsandbytes repacking 4-bit weights for its CPU inference kernel, which has no backward.

    On a CPU with AVX512-BF16, bitsandbytes (seen in 0.50.2) rewrites a ``Linear4bit``'s weight in place the first
    time it runs in eval mode on an input that needs no gradient (any ``generate`` or ``torch.no_grad`` forward).
    From then on the layer computes through a kernel autograd cannot see through: gradients that must pass back
    through a frozen 4-bit layer are silently dropped, and the LoRA adapters before it never train. Training needs
    the ordinary path, so switch the repacking off, and refuse a model that was already repacked.
    """
    for name, module in model.named_modules():
        quant_state = getattr(getattr(module, "weight", None), "quant_state", None)
        if getattr(quant_state, "packing_format_for_cpu", False):
            raise ValueError(f"{name} was repacked by bitsandbytes for CPU inference (it ran under no_grad in "
                             f"eval mode), and gradients cannot pass through it; load the model again and call "
                             f"apply_lora before generating with it")
    for module in model.modules():
        if getattr(module, "support_avx512bf16_for_cpu", False):
            module.support_avx512bf16_for_cpu = False


def apply_lora(model: nn.Module, r: int = 8, alpha: float = 16,
               target_modules: str | list[str] | tuple[str, ...] = ("q_proj", "v_proj"),
               dropout: float = 0.0, use_rslora: bool = False) -> nn.Module:
    """Freeze every parameter of ``model`` and wrap each Linear named in ``target_modules`` (matched on the last
    component of its name) in a ``LoRALinear``, in place. Returns ``model``; only the ``lora_A`` / ``lora_B``
    parameters are trainable. ``use_rslora=True``: scale by ``alpha / sqrt(r)`` (rsLoRA, as peft's option)."""
    _module(model)
    _rank(r)
    _alpha(alpha)
    _dropout(dropout)
    _flag(use_rslora, "use_rslora")
    targets = _targets(target_modules)
    found = {name: module for name, module in model.named_modules() if name.rsplit(".", 1)[-1] in targets}
    for name, module in found.items():
        if isinstance(module, LoRALinear):
            raise ValueError(f"{name} already has LoRA; merge_lora(model) first, or start from a fresh model")
        if not isinstance(module, nn.Linear):
            raise TypeError(f"target {name!r} is a {type(module).__name__}, not a Linear; LoRA here wraps Linears")
    missing = [t for t in targets if not any(n.rsplit(".", 1)[-1] == t for n in found)]
    if missing:
        linears = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)})
        raise ValueError(f"target_modules {missing} match no module in the model; its Linear layers are {linears}")
    _keep_4bit_layers_differentiable(model)  # QLoRA on a CPU: see there (checks before it changes anything)
    for name, p in model.named_parameters():  # freeze the base (adapters added earlier stay trainable, as in peft)
        if not name.endswith((".lora_A", ".lora_B")):
            p.requires_grad_(False)
    for name, module in found.items():
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, LoRALinear(module, r, alpha, dropout, use_rslora))
    return model


def _lora_layers(model):
    layers = {name: m for name, m in _module(model).named_modules() if isinstance(m, LoRALinear)}
    if not layers:
        raise ValueError("the model has no LoRA layers (apply_lora adds them)")
    return layers


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold each adapter into its base weight, ``W += B @ A * scaling``, and put the plain Linear back, in place.

    The merged model computes the same function with no extra cost per token. Only full-precision bases can be
    merged: a 4-bit weight cannot take the update without requantizing it (and losing most of it).
    """
    layers = _lora_layers(model)
    for name, layer in layers.items():  # check them all before changing any
        if _is_4bit(layer.base.weight):
            raise ValueError(f"{name} has a 4-bit base ({type(layer.base).__name__}); merging needs a full-precision "
                             f"weight: dequantize the model first, or load it in full precision and merge into that "
                             f"(lora_state_dict saves the adapter to move over)")
    with torch.no_grad():
        for name, layer in layers.items():
            weight = layer.base.weight
            weight += layer.delta_weight().to(weight.dtype)
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, layer.base)
    return model


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Just the adapter: every ``lora_A`` / ``lora_B`` tensor by its name in ``model.state_dict()``. A few
    hundred kilobytes to save in place of the whole model; ``model.load_state_dict(sd, strict=False)`` on a model
    with the same ``apply_lora`` puts it back."""
    _lora_layers(model)
    return {k: v.detach().clone() for k, v in model.state_dict().items() if k.endswith((".lora_A", ".lora_B"))}


# ------------------------------------------------------------------ counting --

def projection_shapes(config) -> dict[str, tuple[int, int]]:
    """``(in_features, out_features)`` of each of a Llama-style decoder layer's seven Linears, from its config.

    Attention: queries have ``num_attention_heads`` heads, keys and values ``num_key_value_heads`` (grouped-query
    attention), each of ``head_dim``. The MLP goes ``hidden -> intermediate`` twice (gate, up) and back (down).
    """
    needed = ("hidden_size", "intermediate_size", "num_attention_heads", "num_hidden_layers")
    absent = [a for a in needed if not isinstance(getattr(config, a, None), int)]
    if absent:
        raise TypeError(f"config must be a Llama-style transformers config; {type(config).__name__} lacks {absent}")
    hidden, heads = config.hidden_size, config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    return {
        "q_proj": (hidden, heads * head_dim),
        "k_proj": (hidden, kv_heads * head_dim),
        "v_proj": (hidden, kv_heads * head_dim),
        "o_proj": (heads * head_dim, hidden),
        "gate_proj": (hidden, config.intermediate_size),
        "up_proj": (hidden, config.intermediate_size),
        "down_proj": (config.intermediate_size, hidden),
    }


def lora_parameters(config, r: int = 8,
                    target_modules: str | list[str] | tuple[str, ...] = ("q_proj", "v_proj")) -> int:
    """How many trainable parameters ``apply_lora`` adds to a Llama-style model, without building it:
    ``r * (in + out)`` for each target in each of the ``num_hidden_layers`` layers."""
    shapes = projection_shapes(config)
    _rank(r)
    targets = _targets(target_modules)
    unknown = [t for t in targets if t not in shapes]
    if unknown:
        raise ValueError(f"unknown target_modules {unknown}; a Llama layer's Linears are {list(shapes)}")
    return config.num_hidden_layers * sum(r * sum(shapes[t]) for t in targets)
