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

SCORINGS = ("softmax", "sigmoid")

class TopKRouter(nn.Module):
    """Mixtral's router: a linear gate scores every expert, softmax turns the scores into probabilities, each
    token keeps its ``k`` most probable experts, and (``normalize=True``) their probabilities are rescaled to sum
    to 1. Switch Transformer (``k=1``) does not renormalize: a weight of exactly 1 would give the gate no gradient.

    ``forward(x)`` takes ``(..., hidden)`` and returns ``(logits, weights, indices)``: the gate's logits
    ``(tokens, n_experts)``, the float32 weights ``(tokens, k)`` and the chosen experts ``(tokens, k)``, most
    probable first.

    ``scoring="sigmoid"`` scores each expert with its own sigmoid instead of a softmax (DeepSeek-V3's
    affinities). When ``expert_bias`` (a ``(n_experts,)`` tensor, set by ``update_expert_bias``) is not
    None, the top ``k`` are chosen by score + bias, while the weights stay the unbiased scores of the chosen
    experts: auxiliary-loss-free load balancing (DeepSeek-V3; Wang et al. 2024). The tests check that
    against transformers' ``DeepseekV3TopkRouter`` with one expert group.
    """

    def __init__(self, hidden: int, n_experts: int, k: int, normalize: bool = True,
                 scoring: str = "softmax"):
        super().__init__()
        _int(hidden, "hidden")
        self.n_experts, self.k = _int(n_experts, "n_experts"), _k(k, n_experts)
        if not isinstance(normalize, bool):
            raise TypeError(f"normalize must be a bool, got {type(normalize).__name__}")
        if scoring not in SCORINGS:
            raise ValueError(f"scoring must be one of {SCORINGS}, got {scoring!r}")
        self.normalize, self.scoring = normalize, scoring
        self.weight = nn.Parameter(torch.empty(n_experts, hidden))  # transformers' name and shape
        nn.init.normal_(self.weight, std=0.02)
        # auxiliary-loss-free balancing (DeepSeek-V3): a per-expert bias added to the scores for the
        # top-k choice only; None = plain top-k. Not saved with the weights (persistent=False).
        self.register_buffer("expert_bias", None, persistent=False)

    def forward(self, x: torch.Tensor):
        if _tensor(x).shape[-1] != self.weight.shape[1]:
            raise ValueError(f"x's last dimension must be {self.weight.shape[1]}, got shape {tuple(x.shape)}")
        logits = F.linear(x.reshape(-1, x.shape[-1]), self.weight)  # (tokens, n_experts)
        if self.scoring == "softmax":
            probs = logits.float().softmax(dim=-1)
        else:  # DeepSeek-V3's affinities: one sigmoid per expert
            probs = logits.float().sigmoid()
        if self.expert_bias is None:
            weights, indices = probs.topk(self.k, dim=-1)  # (tokens, k), largest first
        else:  # the bias decides which experts; the unbiased scores weight them
            indices = (probs + self.expert_bias.float()).topk(self.k, dim=-1).indices
            weights = probs.gather(1, indices)
        if self.normalize:  # = softmax over the k chosen logits only (Mixtral's paper writes it that way)
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return logits, weights, indices

    def extra_repr(self):
        return (f"hidden={self.weight.shape[1]}, n_experts={self.n_experts}, k={self.k}, "
                f"normalize={self.normalize}, scoring={self.scoring!r}")


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



# ------------------------------------------- balancing without a loss, dropless routing --

def update_expert_bias(router: TopKRouter, tokens_per_expert, gamma: float) -> torch.Tensor:
    """Auxiliary-loss-free load balancing, one update (DeepSeek-V3, section 2.1.2; Wang et al. 2024).

    After a training step, each expert's bias moves by ``gamma`` against its load error:
    ``bias_e += gamma * sign(mean load - load_e)``, down for an overloaded expert and up for an underloaded
    one. The bias changes only which experts a token picks (``TopKRouter.expert_bias``), never the weights
    of their outputs, and it has no gradient: the language-modeling loss is left alone. Sets the router's
    ``expert_bias`` (zeros at the first call) and returns it. Chapter: Mixture of experts.
    """
    if not isinstance(router, TopKRouter):
        raise TypeError(f"router must be a TopKRouter, got {type(router).__name__}")
    if not isinstance(tokens_per_expert, torch.Tensor) or tokens_per_expert.shape != (router.n_experts,):
        raise ValueError(f"tokens_per_expert must be a tensor of shape ({router.n_experts},)")
    if isinstance(gamma, bool) or not isinstance(gamma, (int, float)):
        raise TypeError(f"gamma must be a number, got {type(gamma).__name__}")
    if not (gamma > 0 and math.isfinite(gamma)):
        raise ValueError(f"gamma must be positive and finite, got {gamma}")
    load = tokens_per_expert.detach().float().cpu()
    if router.expert_bias is None:
        router.expert_bias = torch.zeros(router.n_experts, device=router.weight.device)
    step = gamma * torch.sign(load.mean() - load)
    router.expert_bias = router.expert_bias + step.to(router.expert_bias.device)
    return router.expert_bias


def capacity_accounting(tokens_per_expert, capacity: int | None) -> dict:
    """What a capacity buffer does with a given load: ``routed`` assignments, ``dropped`` (over the
    buffer), ``computed`` rows (``n_experts * capacity`` with fixed buffers: padding included) and
    ``padding`` rows (empty slots computed anyway). ``capacity=None`` is dropless routing (MegaBlocks,
    Gale et al. 2023): every assignment is computed once, nothing is dropped or padded, at the price of
    groups of varying size. Chapter: Mixture of experts."""
    if not isinstance(tokens_per_expert, torch.Tensor) or tokens_per_expert.dim() != 1:
        raise ValueError("tokens_per_expert must be a 1-D tensor of counts")
    if tokens_per_expert.is_floating_point() or (tokens_per_expert < 0).any():
        raise ValueError("tokens_per_expert must hold non-negative integer counts")
    load = tokens_per_expert.long()
    routed = int(load.sum())
    if capacity is None:
        return {"routed": routed, "dropped": 0, "computed": routed, "padding": 0}
    _int(capacity, "capacity")
    kept = int(load.clamp(max=capacity).sum())
    computed = capacity * len(load)
    return {"routed": routed, "dropped": routed - kept, "computed": computed, "padding": computed - kept}


def sort_by_expert(indices: torch.Tensor, n_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The permutation a dropless (or expert-parallel) MoE starts with: the ``(tokens, k)`` assignments
    flattened slot-major (first choices first, as ``MoELayer``) and stably sorted by expert. Returns
    ``(order, counts)``: ``order`` indexes the flattened ``(k * tokens)`` assignments, expert 0's first;
    ``counts[e]`` is expert ``e``'s group size. Chapters: Mixture of experts, Scaling out."""
    if not isinstance(indices, torch.Tensor) or indices.dim() != 2 or indices.is_floating_point():
        raise ValueError("indices must be an integer tensor of shape (tokens, k)")
    _int(n_experts, "n_experts")
    if indices.numel() and (indices.min() < 0 or indices.max() >= n_experts):
        raise ValueError(f"indices must lie in [0, {n_experts})")
    flat = indices.T.reshape(-1)  # slot-major
    order = torch.sort(flat, stable=True).indices
    return order, torch.bincount(flat, minlength=n_experts)


def dropless_forward(layer: MoELayer, x: torch.Tensor) -> torch.Tensor:
    """A dropless MoE forward pass the MegaBlocks way: route, sort the assignments by expert
    (``sort_by_expert``), run each expert on its contiguous group (whatever its size: no capacity, no
    padding, no token dropped), and scatter the weighted outputs back. Equals ``MoELayer`` with
    ``capacity_factor=None``; sets the layer's ``router_logits``, ``tokens_per_expert`` and ``dropped``
    (0) the same way. Chapter: Mixture of experts."""
    if not isinstance(layer, MoELayer):
        raise TypeError(f"layer must be a MoELayer, got {type(layer).__name__}")
    hidden = layer.gate.weight.shape[1]
    if _tensor(x).shape[-1] != hidden:
        raise ValueError(f"x's last dimension must be {hidden}, got shape {tuple(x.shape)}")
    flat = x.reshape(-1, hidden)
    logits, weights, indices = layer.gate(flat)
    order, counts = sort_by_expert(indices, layer.gate.n_experts)
    n = len(flat)
    token, slot = order % n, order // n  # flattened slot-major: position = slot * n + token
    grouped = flat[token]  # (k * tokens, hidden), expert 0's tokens first
    pieces = []
    for expert, rows in zip(layer.experts, grouped.split(counts.tolist())):
        if len(rows):
            pieces.append(expert(rows))
    y = torch.cat(pieces) * weights[token, slot, None]
    out = torch.zeros_like(flat).index_add_(0, token, y.to(flat.dtype))
    layer.router_logits, layer.tokens_per_expert, layer.dropped = logits, counts.cpu(), 0
    return out.reshape(x.shape)
