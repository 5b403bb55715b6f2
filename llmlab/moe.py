"""Mixture of experts from scratch: a top-k router, a sparse feed-forward layer with capacity, the balancing loss.

Chapter: Mixture of experts (book part I, "From tokens to a transformer"). A mixture-of-experts (MoE) layer
replaces a block's one feed-forward network by ``n_experts`` of them (here ``llmlab.transformer.SwiGLU``, Llama's
MLP) and a *router* that sends each token to only ``k`` of them. The tests check ``MoELayer`` against
transformers' ``MixtralSparseMoeBlock`` (same weights, same output) and ``load_balancing_loss`` against
transformers' ``load_balancing_loss_func``.

Conventions. Activations are ``(..., hidden)``; inside the layer tokens are flattened to ``(tokens, hidden)``.
Router probabilities and weights are computed in float32 whatever the input dtype, as transformers does.
``MoELayer.forward`` returns a tensor shaped like its input, so it drops into a ``Block`` in place of
``SwiGLU``; what a training loop or a chapter wants to look at (router logits, tokens per expert, tokens dropped)
is kept on the layer after each call.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from llmlab.transformer import SwiGLU, _int, parameter_count  # _int: the same integer check


# ------------------------------------------------------------------ checks --

def _tensor(x, name="x"):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got {x.dtype}")
    if x.dim() == 0 or x.numel() == 0:
        raise ValueError(f"{name} must be a non-empty tensor of shape (..., features), got {tuple(x.shape)}")
    return x


def _k(k, n_experts):
    if _int(k, "k") > n_experts:
        raise ValueError(f"k must be at most n_experts ({n_experts}), got {k}")
    return k


# ------------------------------------------------------------------ router --

class TopKRouter(nn.Module):
    """Mixtral's router: a linear gate scores every expert, softmax turns the scores into probabilities, each
    token keeps its ``k`` most probable experts, and (``normalize=True``) their probabilities are rescaled to sum
    to 1. Switch Transformer (``k=1``) does not renormalize: a weight of exactly 1 would give the gate no gradient.

    ``forward(x)`` takes ``(..., hidden)`` and returns ``(logits, weights, indices)``: the gate's logits
    ``(tokens, n_experts)``, the float32 weights ``(tokens, k)`` and the chosen experts ``(tokens, k)``, most
    probable first.
    """

    def __init__(self, hidden: int, n_experts: int, k: int, normalize: bool = True):
        super().__init__()
        _int(hidden, "hidden")
        self.n_experts, self.k = _int(n_experts, "n_experts"), _k(k, n_experts)
        if not isinstance(normalize, bool):
            raise TypeError(f"normalize must be a bool, got {type(normalize).__name__}")
        self.normalize = normalize
        self.weight = nn.Parameter(torch.empty(n_experts, hidden))  # transformers' name and shape
        nn.init.normal_(self.weight, std=0.02)

    def forward(self, x: torch.Tensor):
        if _tensor(x).shape[-1] != self.weight.shape[1]:
            raise ValueError(f"x's last dimension must be {self.weight.shape[1]}, got shape {tuple(x.shape)}")
        logits = F.linear(x.reshape(-1, x.shape[-1]), self.weight)  # (tokens, n_experts)
        probs = logits.float().softmax(dim=-1)
        weights, indices = probs.topk(self.k, dim=-1)  # (tokens, k), largest first
        if self.normalize:  # = softmax over the k chosen logits only (Mixtral's paper writes it that way)
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return logits, weights, indices

    def extra_repr(self):
        return f"hidden={self.weight.shape[1]}, n_experts={self.n_experts}, k={self.k}, normalize={self.normalize}"


Router = TopKRouter


# --------------------------------------------------------------- the layer --

def expert_capacity(n_tokens: int, n_experts: int, k: int, capacity_factor: float) -> int:
    """How many tokens one expert may take: ``ceil(capacity_factor * k * n_tokens / n_experts)``, the fair share
    of the ``k * n_tokens`` assignments times a margin (Switch Transformer, GShard)."""
    _int(n_tokens, "n_tokens")
    _k(k, _int(n_experts, "n_experts"))
    if isinstance(capacity_factor, bool) or not isinstance(capacity_factor, (int, float)):
        raise TypeError(f"capacity_factor must be a number, got {type(capacity_factor).__name__}")
    if not (capacity_factor > 0 and math.isfinite(capacity_factor)):
        raise ValueError(f"capacity_factor must be positive and finite, got {capacity_factor}")
    return math.ceil(capacity_factor * k * n_tokens / n_experts)


class MoELayer(nn.Module):
    """A sparse feed-forward layer: ``y = sum over the token's k experts e of weight_e * expert_e(x)``.

    ``n_experts`` SwiGLU experts of ``intermediate`` hidden features each and a ``TopKRouter``; each token runs
    through only ``k`` experts, so the layer holds ``n_experts`` MLPs' parameters but computes with ``k``.
    With ``capacity_factor`` each expert takes at most ``expert_capacity(tokens, n_experts, k, capacity_factor)``
    tokens per call; the assignments over that are dropped (first choices are served before second choices, then
    tokens in order). A dropped assignment adds nothing: a token dropped by all its experts gets 0 here and so
    passes through the block on its residual connection alone.

    After each call the layer keeps ``router_logits`` (for ``load_balancing_loss``), ``tokens_per_expert``
    (assignments routed to each expert, before dropping) and ``dropped`` (assignments dropped, an int).
    """

    def __init__(self, hidden: int, intermediate: int, n_experts: int, k: int,
                 capacity_factor: float | None = None):
        super().__init__()
        self.gate = TopKRouter(hidden, n_experts, k)
        self.experts = nn.ModuleList(SwiGLU(hidden, _int(intermediate, "intermediate")) for _ in range(n_experts))
        if capacity_factor is not None:
            expert_capacity(1, n_experts, k, capacity_factor)  # checks it
        self.capacity_factor = capacity_factor
        self.router_logits, self.tokens_per_expert, self.dropped = None, None, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.gate.weight.shape[1]
        if _tensor(x).shape[-1] != hidden:
            raise ValueError(f"x's last dimension must be {hidden}, got shape {tuple(x.shape)}")
        flat = x.reshape(-1, hidden)  # (tokens, hidden)
        logits, weights, indices = self.gate(flat)
        n_experts, k = self.gate.n_experts, self.gate.k
        capacity = None
        if self.capacity_factor is not None:
            capacity = expert_capacity(len(flat), n_experts, k, self.capacity_factor)
        out = torch.zeros_like(flat)
        counts, dropped = [], 0
        for e, expert in enumerate(self.experts):
            # (slot, token) pairs routed to e, slot-major: every first choice before any second choice
            slot, token = torch.where(indices.T == e)
            counts.append(len(token))
            if capacity is not None and len(token) > capacity:
                dropped += len(token) - capacity
                slot, token = slot[:capacity], token[:capacity]
            if len(token) == 0:
                continue
            y = expert(flat[token]) * weights[token, slot, None]  # float32 weights, as transformers
            out.index_add_(0, token, y.to(out.dtype))
        self.router_logits = logits
        self.tokens_per_expert = torch.tensor(counts)
        self.dropped = dropped
        return out.reshape(x.shape)

    def extra_repr(self):
        return f"capacity_factor={self.capacity_factor}"


# ------------------------------------------------------------ the aux loss --

def load_balancing_loss(router_logits, k: int, n_experts: int) -> torch.Tensor:
    """Switch Transformer's auxiliary loss as transformers computes it for Mixtral:
    ``n_experts * sum_e f_e * P_e``.

    ``f_e``: the fraction of tokens that chose expert ``e`` among their top ``k`` (the ``f_e`` sum to ``k``);
    ``P_e``: the router's mean probability for ``e``. ``f`` counts and has no gradient; the gradient flows
    through ``P``, pulling probability away from the experts that get the most tokens. With the tokens spread
    evenly (every ``f_e = k / n_experts``) the loss is exactly ``k``; when every token picks the same ``k``
    experts with all the probability it is ``n_experts``.

    ``router_logits``: ``(tokens, n_experts)`` (any leading dims), or a list/tuple of them, one per layer,
    pooled as transformers does.
    """
    _int(n_experts, "n_experts")
    _k(k, n_experts)
    if isinstance(router_logits, Sequence) and not isinstance(router_logits, (str, bytes)):
        if len(router_logits) == 0:
            raise ValueError("router_logits is an empty sequence")
        layers = list(router_logits)
    else:
        layers = [router_logits]
    for i, t in enumerate(layers):
        if _tensor(t, "router_logits").shape[-1] != n_experts:
            raise ValueError(f"router_logits must end in n_experts={n_experts}, got shape {tuple(t.shape)}")
    logits = torch.cat([t.reshape(-1, n_experts) for t in layers])
    probs = logits.float().softmax(dim=-1)  # (tokens, n_experts)
    chosen = probs.topk(k, dim=-1).indices
    f = F.one_hot(chosen, n_experts).sum(dim=1).float().mean(dim=0)  # top-k assignments per token, per expert
    p = probs.mean(dim=0)
    return n_experts * (f * p).sum()


# -------------------------------------------------------------- parameters --

def moe_parameter_count(config) -> tuple[int, int]:
    """``(total, active)`` parameters of a Mixtral-style model (a transformers ``MixtralConfig`` or config.json
    dict): every block's MLP replaced by ``num_local_experts`` experts and a router, ``num_experts_per_tok`` of
    them used per token. Active parameters are those one token's forward pass multiplies by."""
    if hasattr(config, "to_dict"):
        config = config.to_dict()
    if not isinstance(config, dict):
        raise TypeError(f"config must be a transformers config or a dict, got {type(config).__name__}")
    missing = [key for key in ("num_local_experts", "num_experts_per_tok") if key not in config]
    if missing:
        raise ValueError(f"not a mixture-of-experts config: it lacks {missing}")
    n_experts = _int(config["num_local_experts"], "num_local_experts")
    k = _k(config["num_experts_per_tok"], n_experts)
    dense = {key: v for key, v in config.items() if key not in ("model_type", "rope_scaling", "rope_parameters")}
    one_mlp = parameter_count(dense)  # the same model with one expert per block (a Llama) ...
    d, i, layers = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    expert, router = 3 * d * i, n_experts * d
    total = one_mlp + layers * ((n_experts - 1) * expert + router)  # ... plus the other experts and the routers
    active = one_mlp + layers * ((k - 1) * expert + router)
    return total, active
