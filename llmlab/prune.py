"""Pruning: removing weights (unstructured), or whole neurons and attention heads (structured).

Read top to bottom. Unstructured pruning zeroes individual weights: ``magnitude_masks`` (the smallest |w|, per
layer or globally, checked in the tests against ``torch.nn.utils.prune``), ``wanda_masks`` (Sun et al., 2024:
score |W_ij| * ||X_j||, compared per output row, from a few calibration batches), the 2:4 semi-structured pattern
NVIDIA's sparse tensor cores accelerate (``semi_structured_masks``, ``is_semi_structured``), and ``sparsity``
reporting. Zeros in a dense tensor still take memory and time. Structured pruning removes rows and columns so
the tensors themselves shrink: ``prune_mlp_neurons`` (intermediate neurons of every MLP) and
``prune_attention_heads`` (query heads within each key/value group, or whole key/value groups), scored by
``mlp_importance`` / ``head_importance`` from the weights or from activations on calibration data (Minitron,
Muralidharan et al., 2024). The pruned ``LlamaForCausalLM`` has a matching config, so ``save_pretrained`` and
``from_pretrained`` work, and it is exactly the original model with those neurons or heads switched off.

Chapter: Distillation and pruning.
"""
from __future__ import annotations

from numbers import Real

import torch

SCOPES = ("layer", "global")
IMPORTANCE = ("weight", "activation")


# ------------------------------------------------------------------ checks --

def _model(model):
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch model, got {type(model).__name__}")
    return model


def _llama(model):
    _model(model)
    if not hasattr(model, "model") or not hasattr(model.model, "layers") or \
            not hasattr(model.model.layers[0], "mlp") or not hasattr(model.model.layers[0].mlp, "gate_proj"):
        raise TypeError(f"expected a LlamaForCausalLM-like model (model.layers[i].mlp.gate_proj), "
                        f"got {type(model).__name__}")
    return model


def _fraction(v, name="sparsity"):
    if isinstance(v, bool) or not isinstance(v, Real):
        raise TypeError(f"{name} must be a number, got {type(v).__name__}")
    if not 0.0 <= v <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {v}")
    return float(v)


def _rows(rows):
    if not isinstance(rows, torch.Tensor) or rows.dim() != 2 or rows.is_floating_point():
        raise ValueError("calibration rows must be a 2-D tensor of token ids (llmlab.pretrain.pack)")
    return rows


def prunable_linears(model) -> dict:
    """The linear layers of the transformer blocks, by name (embeddings and the output head are left dense, as
    pruning papers and libraries do)."""
    _model(model)
    out = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "lm_head" not in n}
    if not out:
        raise ValueError("the model has no linear layers to prune")
    return out


# ---------------------------------------------------------- unstructured --

def _n_pruned(numel, sparsity):
    return round(sparsity * numel)  # torch.nn.utils.prune's rounding


def _smallest_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """1 where kept, 0 for the ``round(sparsity * n)`` smallest scores."""
    mask = torch.ones_like(scores)
    k = _n_pruned(scores.numel(), sparsity)
    if k:
        idx = torch.topk(scores.reshape(-1), k, largest=False).indices
        mask.view(-1)[idx] = 0
    return mask


def magnitude_masks(model, sparsity: float, scope: str = "layer") -> dict:
    """Keep-masks (1 keep, 0 prune) zeroing the smallest-magnitude weights: ``layer`` prunes the same fraction of
    every linear layer; ``global`` ranks all of them together, so layers with smaller weights lose more."""
    sparsity = _fraction(sparsity)
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")
    weights = {n: m.weight.detach() for n, m in prunable_linears(model).items()}
    if scope == "layer":
        return {n: _smallest_mask(w.abs(), sparsity) for n, w in weights.items()}
    flat = _smallest_mask(torch.cat([w.abs().reshape(-1) for w in weights.values()]), sparsity)
    masks, i = {}, 0
    for n, w in weights.items():
        masks[n] = flat[i : i + w.numel()].view_as(w)
        i += w.numel()
    return masks


@torch.no_grad()
def input_norms(model, rows: torch.Tensor, batch_size: int = 8) -> dict:
    """||X_j||_2 for every input feature j of every prunable linear layer, over all calibration tokens."""
    _rows(rows)
    layers = prunable_linears(model)
    sq = {n: torch.zeros(m.in_features, device=m.weight.device) for n, m in layers.items()}

    def hook(name):
        def add(mod, args):  # a pre-hook that returns something replaces the input: return nothing
            sq[name].add_(args[0].detach().float().reshape(-1, args[0].shape[-1]).pow(2).sum(0))
        return add

    hooks = [m.register_forward_pre_hook(hook(n)) for n, m in layers.items()]
    try:
        model.eval()
        for i in range(0, len(rows), batch_size):
            model(input_ids=rows[i : i + batch_size].to(model.device))
    finally:
        for h in hooks:
            h.remove()
    return {n: v.sqrt() for n, v in sq.items()}


def wanda_masks(model, rows: torch.Tensor, sparsity: float) -> dict:
    """Wanda (Sun et al., 2024): score each weight by |W_ij| * ||X_j|| (its weight times the size of the input it
    multiplies, from calibration ``rows``) and prune the lowest ``sparsity`` of each output row. No retraining,
    no weight update (SparseGPT, Frantar & Alistarh, 2023, also updates the remaining weights)."""
    sparsity = _fraction(sparsity)
    norms = input_norms(model, rows)
    masks = {}
    for n, m in prunable_linears(model).items():
        score = m.weight.detach().abs() * norms[n][None, :]
        mask = torch.ones_like(score)
        k = _n_pruned(score.shape[1], sparsity)  # the same count in every output row
        if k:
            mask.scatter_(1, torch.topk(score, k, dim=1, largest=False).indices, 0.0)
        masks[n] = mask
    return masks


def semi_structured_masks(model) -> dict:
    """2:4 sparsity: in every group of 4 consecutive weights along the input axis keep the 2 largest |w|. Exactly
    50 % sparse, in the pattern NVIDIA's sparse tensor cores (Ampere and newer) can skip."""
    masks = {}
    for n, m in prunable_linears(model).items():
        w = m.weight.detach()
        if w.shape[1] % 4:
            raise ValueError(f"{n}: input width {w.shape[1]} is not a multiple of 4")
        g = w.abs().reshape(w.shape[0], -1, 4)
        keep = torch.zeros_like(g).scatter_(-1, g.topk(2, dim=-1).indices, 1.0)
        masks[n] = keep.reshape_as(w)
    return masks


def is_semi_structured(weight: torch.Tensor, n: int = 2, m: int = 4) -> bool:
    """True when every group of ``m`` consecutive weights along the input axis has at most ``n`` non-zeros."""
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise TypeError("weight must be a 2-D tensor")
    if weight.shape[1] % m:
        raise ValueError(f"input width {weight.shape[1]} is not a multiple of {m}")
    return bool(((weight.reshape(weight.shape[0], -1, m) != 0).sum(-1) <= n).all())


@torch.no_grad()
def apply_masks(model, masks: dict):
    """Multiply each named layer's weight by its mask, in place; returns the model."""
    layers = prunable_linears(model)
    if not isinstance(masks, dict):
        raise TypeError(f"masks must be a dict of name -> tensor, got {type(masks).__name__}")
    for n, mask in masks.items():
        if n not in layers:
            raise ValueError(f"no prunable layer {n!r}")
        if not isinstance(mask, torch.Tensor):
            raise TypeError(f"{n}: mask must be a tensor, got {type(mask).__name__}")
        if mask.shape != layers[n].weight.shape:
            raise ValueError(f"{n}: mask {tuple(mask.shape)} does not match weight {tuple(layers[n].weight.shape)}")
        layers[n].weight.mul_(mask.to(layers[n].weight.dtype))
    return model


def sparsity(model) -> list[dict]:
    """One row per prunable linear layer (name, weights, zeros, sparsity), and a last ``total`` row."""
    rows = []
    for n, m in prunable_linears(model).items():
        zeros = int((m.weight == 0).sum())
        rows.append({"layer": n, "weights": m.weight.numel(), "zeros": zeros, "sparsity": zeros / m.weight.numel()})
    total, zeros = sum(r["weights"] for r in rows), sum(r["zeros"] for r in rows)
    rows.append({"layer": "total", "weights": total, "zeros": zeros, "sparsity": zeros / total})
    return rows


# ------------------------------------------------------------ structured --

@torch.no_grad()
def _mean_inputs(model, rows, batch_size, module, reduce):
    """Run ``rows`` through ``model`` and return, per layer, the mean over tokens of ``reduce(x)``, where x is
    the input of ``module(layer)`` with shape (tokens, width). A forward pre-hook on each module collects it."""
    _rows(rows)
    layers = model.model.layers
    sums = [None] * len(layers)
    tokens = 0

    def hook(i):
        def add(mod, args):
            x = reduce(args[0].detach().float().reshape(-1, args[0].shape[-1])).sum(0)
            sums[i] = x if sums[i] is None else sums[i] + x
        return add

    hooks = [module(l).register_forward_pre_hook(hook(i)) for i, l in enumerate(layers)]
    try:
        model.eval()
        for i in range(0, len(rows), batch_size):
            model(input_ids=rows[i : i + batch_size].to(model.device))
            tokens += rows[i : i + batch_size].numel()
    finally:
        for h in hooks:
            h.remove()
    return [x / tokens for x in sums]


def _mlp_activations(model, rows, batch_size=8):
    """Mean |h_j| per intermediate neuron of every layer; h = act(gate(x)) * up(x) is what down_proj reads."""
    return _mean_inputs(model, rows, batch_size, lambda l: l.mlp.down_proj, torch.abs)


def mlp_importance(model, importance: str = "weight", rows: torch.Tensor | None = None) -> list[torch.Tensor]:
    """One score per intermediate neuron, per layer. ``weight``: ||W_gate[j]|| * ||W_up[j]|| * ||W_down[:, j]||
    (small in- or outgoing weights, small contribution). ``activation``: the mean size of the neuron's output
    on calibration ``rows``, mean|h_j| * ||W_down[:, j]||, which is what it adds to the residual stream."""
    _llama(model)
    if importance not in IMPORTANCE:
        raise ValueError(f"importance must be one of {IMPORTANCE}, got {importance!r}")
    out_norm = [l.mlp.down_proj.weight.detach().norm(dim=0) for l in model.model.layers]
    if importance == "weight":
        return [l.mlp.gate_proj.weight.detach().norm(dim=1) * l.mlp.up_proj.weight.detach().norm(dim=1) * o
                for l, o in zip(model.model.layers, out_norm)]
    if rows is None:
        raise ValueError("importance='activation' needs calibration rows")
    return [a * o for a, o in zip(_mlp_activations(model, rows), out_norm)]


def _keep_top(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """Indices of the ``keep`` highest scores, in their original order (so nothing is permuted)."""
    return torch.topk(scores, keep).indices.sort().values


def _slice_linear(lin: torch.nn.Linear, idx: torch.Tensor, dim: int) -> torch.nn.Linear:
    """A new Linear holding only rows (``dim=0``, outputs) or columns (``dim=1``, inputs) ``idx``."""
    idx = idx.to(lin.weight.device)
    w = lin.weight.detach().index_select(dim, idx).clone()
    new = torch.nn.Linear(w.shape[1], w.shape[0], bias=lin.bias is not None, dtype=w.dtype, device=w.device)
    with torch.no_grad():
        new.weight.copy_(w)
        if lin.bias is not None:
            new.bias.copy_(lin.bias.detach().index_select(0, idx) if dim == 0 else lin.bias.detach())
    return new


def _keep_count(n, keep, name):
    if isinstance(keep, bool) or not isinstance(keep, (int, Real)):
        raise TypeError(f"{name} must be an int count or a fraction, got {type(keep).__name__}")
    k = keep if isinstance(keep, int) else round(_fraction(keep, name) * n)
    if not 1 <= k <= n:
        raise ValueError(f"{name} must keep between 1 and {n}, got {keep!r}")
    return k


@torch.no_grad()
def prune_mlp_neurons(model, keep, importance: str = "weight", rows: torch.Tensor | None = None, scores=None):
    """Keep the ``keep`` most important intermediate neurons (an int, or a fraction of ``intermediate_size``) in
    every layer's MLP, in place: gate and up lose rows, down loses columns, ``config.intermediate_size`` shrinks
    (the same count in every layer, so the config still describes the model). ``scores`` overrides the importance
    (one tensor per layer). Returns the model."""
    _llama(model)
    n = model.config.intermediate_size
    k = _keep_count(n, keep, "keep")
    scores = mlp_importance(model, importance, rows) if scores is None else scores
    if len(scores) != len(model.model.layers) or any(s.shape != (n,) for s in scores):
        raise ValueError(f"scores must be one tensor of {n} per layer")
    for layer, s in zip(model.model.layers, scores):
        idx = _keep_top(s, k)
        mlp = layer.mlp
        mlp.gate_proj = _slice_linear(mlp.gate_proj, idx, 0)
        mlp.up_proj = _slice_linear(mlp.up_proj, idx, 0)
        mlp.down_proj = _slice_linear(mlp.down_proj, idx, 1)
        if hasattr(mlp, "intermediate_size"):
            mlp.intermediate_size = k
    model.config.intermediate_size = k
    return model


def _head_dims(model):
    c = model.config
    hd = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    return c.num_attention_heads, c.num_key_value_heads, hd


def _head_activations(model, rows, batch_size=8):
    """Mean ||o_h|| per query head per layer: o_h is head h's attention output, the slice o_proj reads."""
    nh, _, hd = _head_dims(model)
    return _mean_inputs(model, rows, batch_size, lambda l: l.self_attn.o_proj,
                        lambda x: x.reshape(-1, nh, hd).norm(dim=-1))


def head_importance(model, importance: str = "weight", rows: torch.Tensor | None = None) -> list[torch.Tensor]:
    """One score per query head, per layer. ``weight``: ||W_q[head]|| * ||W_o[:, head]||. ``activation``: the
    mean size of what the head writes to the residual stream on calibration ``rows``, estimated as
    mean||o_h|| * ||W_o[:, head]||."""
    _llama(model)
    if importance not in IMPORTANCE:
        raise ValueError(f"importance must be one of {IMPORTANCE}, got {importance!r}")
    nh, _, hd = _head_dims(model)
    out_norm = [l.self_attn.o_proj.weight.detach().reshape(-1, nh, hd).norm(dim=(0, 2)) for l in model.model.layers]
    if importance == "weight":
        return [l.self_attn.q_proj.weight.detach().reshape(nh, hd, -1).norm(dim=(1, 2)) * o
                for l, o in zip(model.model.layers, out_norm)]
    if rows is None:
        raise ValueError("importance='activation' needs calibration rows")
    return [a * o for a, o in zip(_head_activations(model, rows), out_norm)]


@torch.no_grad()
def prune_attention_heads(model, heads_per_group=None, kv_groups=None, importance: str = "weight",
                          rows: torch.Tensor | None = None, scores=None):
    """Shrink every layer's attention, in place. With grouped-query attention each key/value head serves a group
    of query heads (query head h reads key/value head h // group_size). ``kv_groups`` keeps that many whole
    groups (their key/value heads and all their query heads), ranked by the summed importance of their query
    heads; ``heads_per_group`` keeps that many query heads inside each remaining group. Counts are the same in
    every layer so the config (``num_attention_heads``, ``num_key_value_heads``; ``head_dim`` unchanged) still
    describes the model; transformers also wants the new head count to divide ``hidden_size``. ``scores`` overrides
    the importance (one tensor of query-head scores per layer)."""
    _llama(model)
    nh, nkv, hd = _head_dims(model)
    group = nh // nkv
    g_keep = nkv if kv_groups is None else _keep_count(nkv, kv_groups, "kv_groups")
    h_keep = group if heads_per_group is None else _keep_count(group, heads_per_group, "heads_per_group")
    if model.config.hidden_size % (g_keep * h_keep):
        # transformers' LlamaConfig insists on it (even with an explicit head_dim) when the model is saved/loaded
        raise ValueError(f"{g_keep * h_keep} query heads do not divide hidden_size {model.config.hidden_size}; "
                         "transformers would refuse the config")
    scores = head_importance(model, importance, rows) if scores is None else scores
    if len(scores) != len(model.model.layers) or any(s.shape != (nh,) for s in scores):
        raise ValueError(f"scores must be one tensor of {nh} query-head scores per layer")
    for layer, s in zip(model.model.layers, scores):
        s = s.reshape(nkv, group)
        groups = _keep_top(s.sum(1), g_keep)
        heads = torch.cat([g * group + _keep_top(s[g], h_keep) for g in groups.tolist()])
        q_idx = (heads[:, None] * hd + torch.arange(hd, device=heads.device)).reshape(-1)
        kv_idx = (groups[:, None] * hd + torch.arange(hd, device=groups.device)).reshape(-1)
        attn = layer.self_attn
        attn.q_proj = _slice_linear(attn.q_proj, q_idx, 0)
        attn.k_proj = _slice_linear(attn.k_proj, kv_idx, 0)
        attn.v_proj = _slice_linear(attn.v_proj, kv_idx, 0)
        attn.o_proj = _slice_linear(attn.o_proj, q_idx, 1)
        attn.num_key_value_groups = h_keep  # query heads per key/value head, what repeat_kv repeats
        for name, v in (("num_heads", g_keep * h_keep), ("num_key_value_heads", g_keep)):
            if hasattr(attn, name):
                setattr(attn, name, v)
    model.config.head_dim = hd
    model.config.num_attention_heads = g_keep * h_keep
    model.config.num_key_value_heads = g_keep
    return model
