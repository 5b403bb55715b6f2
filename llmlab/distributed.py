"""Scaling out: what data, tensor and pipeline parallelism and ZeRO/FSDP save, and a real data-parallel run.

Chapter: Scaling out. Read top to bottom: the memory calculator (the ZeRO paper's model-state accounting,
Rajbhandari et al. 2020), the communication a ring all-reduce costs (simulated, then over real processes),
the Megatron split of the MLP (Shoeybi et al. 2019), expert parallelism's all-to-all (simulated, then over
real processes), pipeline schedules and their bubble (GPipe, Huang et al.
2019; 1F1B, Narayanan et al. 2021), and last a data-parallel training run on CPU processes (gloo) that
``torchrun --nproc_per_node 2 -m llmlab.distributed train --out DIR`` starts, checked against one process.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from llmlab.memory import _number
from llmlab.transformer import _int

GB = 1e9
STRATEGIES = ("ddp", "zero1", "zero2", "zero3", "fsdp")  # fsdp (FULL_SHARD) shards what ZeRO-3 shards


# ------------------------------------------------------------------ memory: model states per GPU --

@dataclass(frozen=True)
class ModelStates:
    """Bytes one GPU holds for the model states (no activations), and the bytes it sends per step for the
    data-parallel gradient/parameter exchange."""
    weights: float
    gradients: float
    optimizer: float
    dp_traffic: float

    @property
    def total(self):
        return self.weights + self.gradients + self.optimizer

    def gb(self) -> dict:
        return {k: v / GB for k, v in {**asdict(self), "total": self.total}.items()}


def model_state_bytes(n_params, n_gpus=1, strategy="ddp", tensor_parallel=1, pipeline_parallel=1,
                      weight_bytes=2, grad_bytes=2, optimizer_bytes=12) -> ModelStates:
    """Per-GPU model-state bytes for ``n_params`` parameters on ``n_gpus`` GPUs (the ZeRO paper's accounting).

    Mixed-precision Adam keeps 16-bit weights (2 B) and gradients (2 B), and ``K = 12`` B of optimizer state per
    parameter (fp32 master weights, momentum and variance). Tensor (``t``) and pipeline (``p``) parallelism split
    the parameters ``t * p`` ways; the ``d = n_gpus / (t * p)`` data-parallel replicas then shard
    optimizer states (ZeRO-1), also gradients (ZeRO-2), also weights (ZeRO-3 = FSDP full sharding) ``d`` ways.
    ``dp_traffic``: bytes each GPU sends per step over the data-parallel group: a ring all-reduce of the
    gradients, ``2 (d-1)/d`` of their bytes (ZeRO-1/2 send the same as a reduce-scatter plus an all-gather);
    ZeRO-3 all-gathers the weights again for the backward pass, 1.5 times that.
    Splits are ideal (even); real layers split less evenly (embeddings, norms).
    """
    _number(n_params, "n_params")
    _int(n_gpus, "n_gpus")
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    t, p = _int(tensor_parallel, "tensor_parallel"), _int(pipeline_parallel, "pipeline_parallel")
    if n_gpus % (t * p):
        raise ValueError(f"n_gpus ({n_gpus}) must be a multiple of tensor_parallel * pipeline_parallel ({t * p})")
    for v, name in ((weight_bytes, "weight_bytes"), (grad_bytes, "grad_bytes"), (optimizer_bytes, "optimizer_bytes")):
        _number(v, name, positive=False)
    d = n_gpus // (t * p)
    local = n_params / (t * p)  # the parameters this GPU's model-parallel slice owns
    stage = {"ddp": 0, "zero1": 1, "zero2": 2, "zero3": 3, "fsdp": 3}[strategy]
    weights = weight_bytes * local / (d if stage >= 3 else 1)
    grads = grad_bytes * local / (d if stage >= 2 else 1)
    opt = optimizer_bytes * local / (d if stage >= 1 else 1)
    traffic = 2 * (d - 1) / d * grad_bytes * local * (1.5 if stage == 3 else 1.0)
    return ModelStates(weights, grads, opt, traffic)


# ------------------------------------------------------------------ communication: the ring all-reduce --

def all_reduce_traffic(n_bytes, n_gpus) -> float:
    """Bytes each of ``n_gpus`` sends (and receives) in a ring all-reduce of ``n_bytes``: ``2 (G-1)/G * n_bytes``,
    nearly twice the buffer whatever ``G`` is, which is why data parallelism scales."""
    _number(n_bytes, "n_bytes", positive=False)
    _int(n_gpus, "n_gpus")
    return 2 * (n_gpus - 1) / n_gpus * n_bytes


def _ring_steps(world):
    """The ring's schedule: ``world - 1`` reduce-scatter steps, then ``world - 1`` all-gather steps; each step yields
    ``(phase, moves)`` with ``moves[r]`` = (chunk rank r sends to its right neighbour, chunk it receives from its
    left). After the reduce-scatter rank r holds the full sum of chunk ``(r + 1) % world``."""
    for k in range(world - 1):
        yield "reduce", [((r - k) % world, (r - k - 1) % world) for r in range(world)]
    for k in range(world - 1):
        yield "gather", [((r + 1 - k) % world, (r - k) % world) for r in range(world)]


def simulate_ring_all_reduce(tensors: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[int]]:
    """A ring all-reduce (sum) of one tensor per simulated rank, in one process: returns each rank's result and
    the bytes each rank sent. Every rank's result is the elementwise sum; each sent ``2 (G-1)/G`` of the bytes."""
    if not isinstance(tensors, (list, tuple)) or not all(isinstance(x, torch.Tensor) for x in tensors):
        raise TypeError("tensors must be a list of torch.Tensor, one per rank")
    world = len(tensors)
    if world < 1 or len({(x.shape, x.dtype) for x in tensors}) != 1:
        raise ValueError("tensors must be a non-empty list of tensors of one shape and dtype")
    if tensors[0].numel() < world:
        raise ValueError(f"need at least one element per rank ({world}), got {tensors[0].numel()}")
    chunks = [list(x.detach().clone().reshape(-1).tensor_split(world)) for x in tensors]
    sent = [0] * world
    for phase, moves in _ring_steps(world):
        outgoing = [chunks[r][s].clone() for r, (s, _) in enumerate(moves)]  # all ranks send at once
        for r, (s, recv) in enumerate(moves):
            left = (r - 1) % world
            data = outgoing[left]
            sent[left] += data.numel() * data.element_size()
            if phase == "reduce":
                chunks[r][recv] += data
            else:
                chunks[r][recv].copy_(data)
    return [torch.cat(c).view_as(x) for c, x in zip(chunks, tensors)], sent


def ring_all_reduce(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over all ranks of the default process group in place, with point-to-point sends around a
    ring (what NCCL and gloo do for large buffers); returns it. Compare with ``torch.distributed.all_reduce``."""
    import torch.distributed as dist

    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"tensor must be a torch.Tensor, got {type(tensor).__name__}")
    if not dist.is_initialized():
        raise ValueError("ring_all_reduce needs an initialized process group (run it under torchrun)")
    world, rank = dist.get_world_size(), dist.get_rank()
    if not tensor.is_contiguous() or tensor.numel() < world:
        raise ValueError(f"tensor must be contiguous with at least {world} elements")
    chunks = tensor.view(-1).tensor_split(world)
    right, left = (rank + 1) % world, (rank - 1) % world
    for phase, moves in _ring_steps(world):
        send, recv = moves[rank]
        buf = torch.empty_like(chunks[recv])
        req = dist.isend(chunks[send].clone(), right)
        dist.recv(buf, left)
        req.wait()
        if phase == "reduce":
            chunks[recv].add_(buf)
        else:
            chunks[recv].copy_(buf)
    return tensor


# ------------------------------------------------------------------ tensor parallelism: the Megatron MLP --

def tensor_parallel_mlp(mlp, x: torch.Tensor, t: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Run a Llama MLP (``down(silu(gate(x)) * up(x))``) split over ``t`` simulated GPUs, Megatron style.

    GPU ``r`` holds a slice of the intermediate features: rows ``r*I/t : (r+1)*I/t`` of ``gate_proj`` and
    ``up_proj`` (a *column* split of the matrices ``x @ W``) and the matching columns of ``down_proj`` (a *row*
    split). The elementwise SwiGLU needs no communication; each GPU ends with a partial ``(…, hidden)`` output,
    and one all-reduce (the sum) gives the full output. Returns ``(sum, partials)``.
    """
    for name in ("gate_proj", "up_proj", "down_proj"):
        if not isinstance(getattr(mlp, name, None), torch.nn.Linear):
            raise TypeError(f"mlp must have Linear gate_proj, up_proj and down_proj, got {type(mlp).__name__}")
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    inter = mlp.gate_proj.out_features
    if _int(t, "t") > inter or inter % t:
        raise ValueError(f"t ({t}) must divide the intermediate size ({inter})")
    act = F.silu if getattr(mlp, "act_fn", None) is None else mlp.act_fn
    g, u, dn = mlp.gate_proj, mlp.up_proj, mlp.down_proj
    partials = []
    for r in range(t):
        cols = slice(r * inter // t, (r + 1) * inter // t)
        gate = F.linear(x, g.weight[cols], None if g.bias is None else g.bias[cols])
        up = F.linear(x, u.weight[cols], None if u.bias is None else u.bias[cols])
        partial = F.linear(act(gate) * up, dn.weight[:, cols])
        if dn.bias is not None and r == 0:  # the row-parallel bias is added once, not t times
            partial = partial + dn.bias
        partials.append(partial)
    return torch.stack(partials).sum(0), partials


def tensor_parallel_traffic(batch, seq_len, hidden, t, bytes_per_value=2) -> float:
    """Bytes each GPU sends per transformer layer per training step under Megatron tensor parallelism: two
    all-reduces of the ``batch * seq_len * hidden`` activations forward (after attention and after the MLP) and
    two backward. Unlike data parallelism this grows with the batch and sits on the critical path, so ``t``
    stays within one node's NVLink."""
    for v, n in ((batch, "batch"), (seq_len, "seq_len"), (hidden, "hidden")):
        _int(v, n)
    _int(t, "t")
    _number(bytes_per_value, "bytes_per_value")
    return 4 * all_reduce_traffic(batch * seq_len * hidden * bytes_per_value, t)


# ------------------------------------------------------------------ expert parallelism: all-to-all --

def _expert_owner(n_experts, world):
    _int(world, "world")
    if n_experts % world:
        raise ValueError(f"world ({world}) must divide the number of experts ({n_experts})")
    return n_experts // world  # rank r holds experts r * per : (r + 1) * per


def _check_moe(layer):
    from llmlab.moe import MoELayer

    if not isinstance(layer, MoELayer):
        raise TypeError(f"layer must be a llmlab.moe.MoELayer, got {type(layer).__name__}")
    if layer.capacity_factor is not None:
        raise ValueError("expert parallelism here is dropless: use a layer with capacity_factor=None")


def _route(layer, x):
    """Route one rank's tokens: ``(flat, weights, token, slot, expert, rank_counts)`` with the assignments
    sorted by expert (so by destination rank too, experts being split contiguously)."""
    from llmlab.moe import sort_by_expert

    hidden = layer.gate.weight.shape[1]
    if not isinstance(x, torch.Tensor) or x.shape[-1] != hidden:
        raise ValueError(f"x must be a tensor of shape (..., {hidden})")
    flat = x.reshape(-1, hidden)
    _, weights, indices = layer.gate(flat)
    order, counts = sort_by_expert(indices, layer.gate.n_experts)
    n = len(flat)
    token, slot = order % n, order // n
    return flat, weights, token, slot, indices.T.reshape(-1)[order], counts


def _run_local(layer, rows, experts):
    """The owning rank's work: each received row through its expert (rows grouped by expert id)."""
    out = torch.empty_like(rows)
    for e in experts.unique().tolist():
        mask = experts == e
        out[mask] = layer.experts[e](rows[mask]).to(rows.dtype)
    return out


def simulate_expert_parallel(layer, xs: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[list[int]]]:
    """Expert parallelism in one process: ``len(xs)`` simulated ranks, rank ``r`` holding experts
    ``r*E/G .. (r+1)*E/G - 1`` of the MoE ``layer`` and the tokens ``xs[r]``.

    Each rank routes its tokens, *dispatches* every assignment to the rank holding its expert (an
    all-to-all), the owners run their experts, and a second all-to-all *combines*: the outputs go back to
    the token's rank, which sums them with the router's weights. Returns each rank's output (equal to
    ``layer(xs[r])``) and ``sent[r][d]``, the activation bytes rank ``r`` sent to rank ``d`` in the dispatch
    (the combine sends the same bytes back; ``r == d`` stays local and costs nothing).
    Chapter: Scaling out."""
    _check_moe(layer)
    if not isinstance(xs, (list, tuple)) or not xs:
        raise TypeError("xs must be a non-empty list of tensors, one per rank")
    world = len(xs)
    per = _expert_owner(layer.gate.n_experts, world)
    routed = [_route(layer, x) for x in xs]
    sent = [[0] * world for _ in range(world)]
    # dispatch: rank d receives, from every source r, the rows whose expert it owns
    inbox = {d: [] for d in range(world)}
    for r, (flat, _, token, _, expert, _) in enumerate(routed):
        dest = expert // per
        for d in range(world):
            rows = flat[token[dest == d]]
            inbox[d].append((rows, expert[dest == d]))
            if d != r:
                sent[r][d] += rows.numel() * rows.element_size()
    results = {d: [_run_local(layer, rows, ex) for rows, ex in inbox[d]] for d in range(world)}
    outputs = []
    for r, (flat, weights, token, slot, expert, _) in enumerate(routed):  # combine
        y = torch.cat([results[d][r] for d in range(world)])  # in dispatch order: sorted by expert
        out = torch.zeros_like(flat).index_add_(0, token, (y * weights[token, slot, None]).to(flat.dtype))
        outputs.append(out.reshape(xs[r].shape))
    return outputs, sent


def expert_parallel_forward(layer, x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """The same over real processes: every rank of the default process group calls it with its own tokens;
    rank ``r`` computes only with its experts ``r*E/G .. (r+1)*E/G - 1`` (the other experts of ``layer`` are
    not touched). Two ``all_to_all_single`` calls (gloo and NCCL both have it) move the rows: dispatch, then
    combine, preceded by one small all-to-all of the row counts. Returns ``(output, bytes)``: this rank's
    output (equal to ``layer(x)``) and the activation bytes it sent to other ranks, dispatch plus combine.
    Chapter: Scaling out."""
    import torch.distributed as dist

    _check_moe(layer)
    if not dist.is_initialized():
        raise ValueError("expert_parallel_forward needs an initialized process group (run it under torchrun)")
    world, rank = dist.get_world_size(), dist.get_rank()
    per = _expert_owner(layer.gate.n_experts, world)
    flat, weights, token, slot, expert, counts = _route(layer, x)
    send_counts = counts.view(world, per).sum(1)  # rows for each destination rank, in rank order
    recv_counts = torch.empty_like(send_counts)
    dist.all_to_all_single(recv_counts, send_counts)
    send, recv = send_counts.tolist(), recv_counts.tolist()
    rows = flat[token].contiguous()
    got = rows.new_empty(sum(recv), rows.shape[1])
    dist.all_to_all_single(got, rows, recv, send)  # dispatch
    got_expert = expert.new_empty(sum(recv))
    dist.all_to_all_single(got_expert, expert.contiguous(), recv, send)  # which expert, per row
    y_local = _run_local(layer, got, got_expert)
    y = rows.new_empty(rows.shape)
    dist.all_to_all_single(y, y_local, send, recv)  # combine: back in dispatch order
    out = torch.zeros_like(flat).index_add_(0, token, (y * weights[token, slot, None]).to(flat.dtype))
    row_bytes = flat.shape[1] * flat.element_size()
    moved = (sum(send) - send[rank] + sum(recv) - recv[rank]) * row_bytes
    return out.reshape(x.shape), moved


def expert_parallel_traffic(hidden, k, world, bytes_per_value=2) -> float:
    """Bytes one token costs its rank per MoE layer in a forward pass under expert parallelism with the
    experts spread evenly over ``world`` ranks and routing spread evenly over the experts: the token's
    hidden vector goes to each of its ``k`` experts, a share ``(G-1)/G`` of them on other ranks, and their
    outputs come back: ``2 k (G-1)/G * hidden * bytes``. The backward pass sends as much again.
    Chapter: Scaling out."""
    _int(hidden, "hidden")
    _int(k, "k")
    _int(world, "world")
    _number(bytes_per_value, "bytes_per_value")
    return 2 * k * (world - 1) / world * hidden * bytes_per_value


def _expert_parallel_check(seed=0) -> dict:
    """Run under a process group: a small MoE layer (the same weights on every rank), each rank's own
    tokens through ``expert_parallel_forward`` and through the whole layer in this one process. Returns the
    largest difference over all ranks and the bytes each rank sent."""
    import torch.distributed as dist

    from llmlab.moe import MoELayer

    world, rank = dist.get_world_size(), dist.get_rank()
    with torch.random.fork_rng():  # leaves the training run's random state alone
        torch.manual_seed(seed)
        layer = MoELayer(hidden=32, intermediate=48, n_experts=2 * world, k=2)
        with torch.no_grad():
            layer.gate.weight.normal_(0, 0.5)
        x = torch.randn(2, 12, 32, generator=torch.Generator().manual_seed(100 + rank))
    with torch.no_grad():
        ours, moved = expert_parallel_forward(layer, x)
        diff = torch.tensor([(ours - layer(x)).abs().max().item()])
    dist.all_reduce(diff, op=dist.ReduceOp.MAX)
    every = [torch.zeros(1) for _ in range(world)]
    dist.all_gather(every, torch.tensor([float(moved)]))
    return {"expert_parallel_max_abs_diff": diff.item(),
            "expert_parallel_bytes_per_rank": [int(v.item()) for v in every],
            "expert_parallel_tokens_per_rank": x.shape[0] * x.shape[1],
            "expert_parallel_hidden": 32, "expert_parallel_k": 2}


# ------------------------------------------------------------------ pipeline parallelism: schedules --

def bubble_fraction(p, m) -> float:
    """Idle fraction of a pipeline of ``p`` stages with ``m`` micro-batches (GPipe and 1F1B alike):
    ``(p-1) / (m+p-1)``."""
    _int(p, "p")
    _int(m, "m")
    return (p - 1) / (m + p - 1)


@dataclass(frozen=True)
class PipelineSchedule:
    """A simulated schedule: ``ops`` are ``(stage, "F"|"B", micro_batch, start, end)``; ``bubble`` the idle
    fraction of stage-time; ``in_flight[s]`` the most micro-batches whose activations stage ``s`` holds at once."""
    kind: str
    p: int
    m: int
    ops: list
    makespan: float
    bubble: float
    in_flight: list


def pipeline_schedule(p, m, kind="1f1b", forward=1.0, backward=2.0) -> PipelineSchedule:
    """Simulate ``m`` micro-batches through ``p`` stages. ``gpipe``: every stage runs all forwards, then all
    backwards. ``1f1b`` (PipeDream-Flush): stage ``s`` runs ``p-s-1`` warm-up forwards, then alternates one
    forward and one backward. A forward needs the previous stage's forward of that micro-batch; a backward
    needs the next stage's backward (the last stage: its own forward)."""
    _int(p, "p")
    _int(m, "m")
    if kind not in ("gpipe", "1f1b"):
        raise ValueError(f"kind must be 'gpipe' or '1f1b', got {kind!r}")
    _number(forward, "forward")
    _number(backward, "backward")
    orders = []
    for s in range(p):
        if kind == "gpipe":
            order = [("F", j) for j in range(m)] + [("B", j) for j in range(m)]
        else:
            warm = min(p - s - 1, m)
            order = [("F", j) for j in range(warm)]
            for j in range(m - warm):
                order += [("F", warm + j), ("B", j)]
            order += [("B", j) for j in range(m - warm, m)]
        orders.append(order)
    done, ops = {}, []
    free = [0.0] * p
    pos = [0] * p
    while any(pos[s] < len(orders[s]) for s in range(p)):
        progressed = False
        for s in range(p):
            if pos[s] == len(orders[s]):
                continue
            kind_, j = orders[s][pos[s]]
            if kind_ == "F":
                deps = [("F", s - 1, j)] if s > 0 else []
            else:
                deps = [("F", s, j)] + ([("B", s + 1, j)] if s < p - 1 else [])
            if all(d in done for d in deps):
                start = max([free[s]] + [done[d] for d in deps])
                end = start + (forward if kind_ == "F" else backward)
                done[(kind_, s, j)] = free[s] = end
                ops.append((s, kind_, j, start, end))
                pos[s] += 1
                progressed = True
        if not progressed:  # cannot happen for these two schedules; guards against an infinite loop
            raise RuntimeError("pipeline schedule deadlocked")
    makespan = max(free)
    bubble = 1 - m * (forward + backward) / makespan
    in_flight = []
    for s in range(p):
        live = peak = 0
        for _, k, _, _, _ in sorted((o for o in ops if o[0] == s), key=lambda o: o[3]):
            live += 1 if k == "F" else -1
            peak = max(peak, live)
        in_flight.append(peak)
    return PipelineSchedule(kind, p, m, ops, makespan, bubble, in_flight)


# ------------------------------------------------------------------ a real data-parallel run (gloo, CPU) --

def global_batches(tokenizer, steps: int, global_batch: int, seq_len: int) -> torch.Tensor:
    """``(steps, global_batch, seq_len)`` token ids from the course's training corpus, the same on every rank."""
    from llmlab.data import corpus_split
    from llmlab.pretrain import pack

    need, n_docs = steps * global_batch, 64
    while True:
        rows = pack(corpus_split("train", n_docs), tokenizer, seq_len)
        if len(rows) >= need:
            return rows[:need].view(steps, global_batch, seq_len)
        n_docs *= 2


def shard(batch: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """Rank ``rank``'s contiguous share of a global batch (the first dimension split ``world`` ways)."""
    if not isinstance(batch, torch.Tensor):
        raise TypeError(f"batch must be a torch.Tensor, got {type(batch).__name__}")
    _int(world, "world")
    if _int(rank, "rank", minimum=0) >= world:
        raise ValueError(f"rank must be below world ({world}), got {rank}")
    if len(batch) % world:
        raise ValueError(f"the global batch ({len(batch)}) must divide evenly over {world} ranks")
    n = len(batch) // world
    return batch[rank * n:(rank + 1) * n]


def train(out, steps=4, global_batch=8, seq_len=64, lr=2e-3, dtype="float32", mode="ddp", seed=0,
          log=True) -> dict:
    """Train the course model for ``steps`` steps on a fixed sequence of global batches; rank 0 writes
    ``out/result.json`` (losses, checksum, per-rank parameter bytes, the ring all-reduce check) and
    ``out/state.pt`` (the final weights). Under torchrun (``WORLD_SIZE`` > 1) every rank takes its shard of
    each global batch and gradients are averaged: ``mode`` ``ddp`` (DistributedDataParallel) or ``fsdp``
    (FSDP2 ``fully_shard`` per decoder layer). Alone, one process takes the whole global batch. ``log``: rank 0
    prints each step's loss."""
    import torch.distributed as dist

    from llmlab.env import COURSE_MODEL, set_seed
    from llmlab.models import load

    _int(steps, "steps")
    _int(global_batch, "global_batch")
    _int(seq_len, "seq_len", minimum=2)
    _number(lr, "lr")
    if mode not in ("ddp", "fsdp"):
        raise ValueError(f"mode must be 'ddp' or 'fsdp', got {mode!r}")
    if dtype not in ("float32", "float64"):
        raise ValueError(f"dtype must be 'float32' or 'float64', got {dtype!r}")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        dist.init_process_group("gloo")
    rank = dist.get_rank() if world > 1 else 0
    set_seed(seed, threads=1)
    model, tok = load(COURSE_MODEL, dtype="float32", device_map="cpu")  # gloo: CPU processes, even beside a GPU
    model = model.to(getattr(torch, dtype)).train()
    full_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    batches = global_batches(tok, steps, global_batch, seq_len)
    result = {"world_size": world, "mode": mode if world > 1 else "single", "dtype": dtype, "steps": steps,
              "global_batch": global_batch, "seq_len": seq_len, "full_param_bytes": full_bytes}
    if world > 1:
        gen = torch.Generator().manual_seed(1234 + rank)
        x = torch.randn(10_000, generator=gen, dtype=getattr(torch, dtype))
        ring, ref = ring_all_reduce(x.clone()), x.clone()
        dist.all_reduce(ref)
        ints = torch.randint(-1000, 1000, (1001,), generator=gen).to(getattr(torch, dtype))
        ring_i, ref_i = ring_all_reduce(ints.clone()), ints.clone()
        dist.all_reduce(ref_i)
        result["ring_allreduce_max_abs_diff"] = (ring - ref).abs().max().item()
        result["ring_allreduce_integers_equal"] = bool(torch.equal(ring_i, ref_i))
        result.update(_expert_parallel_check())
        if mode == "ddp":
            from torch.nn.parallel import DistributedDataParallel

            model = DistributedDataParallel(model)
        else:
            from torch.distributed.fsdp import fully_shard

            for layer in model.model.layers:
                fully_shard(layer)
            fully_shard(model)
    local = [p.to_local() if hasattr(p, "to_local") else p for p in model.parameters()]
    mine = torch.tensor([float(sum(p.numel() * p.element_size() for p in local))])
    if world > 1:
        every = [torch.zeros(1) for _ in range(world)]
        dist.all_gather(every, mine)
        result["param_bytes_per_rank"] = [int(v.item()) for v in every]
    else:
        result["param_bytes_per_rank"] = [int(mine.item())]
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    losses = []
    for step in range(steps):
        x = shard(batches[step], rank, world)
        logits = model(input_ids=x).logits[:, :-1]
        # mean next-token loss over this shard's tokens (the same count on every rank), computed in the model's
        # dtype: transformers' own loss casts the logits to float32 even for a float64 model
        loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), x[:, 1:].reshape(-1))
        loss.backward()  # DDP and FSDP average gradients over ranks here
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss = loss.detach().clone()
        if world > 1:
            dist.all_reduce(loss)
            loss /= world
        losses.append(loss.item())
        if rank == 0 and log:
            print(f"step {step + 1}/{steps}  rank 0 rows {rank * len(x)}-{rank * len(x) + len(x) - 1} of "
                  f"{global_batch}  global loss {loss.item():.6f}", flush=True)
    inner = model.module if hasattr(model, "module") else model
    state = {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone()
             for k, v in inner.state_dict().items()}  # FSDP: all-gather each shard (every rank takes part)
    result["losses"] = losses
    result["checksum"] = float(sum(v.double().sum().item() for v in state.values()))
    if rank == 0:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        torch.save(state, out / "state.pt")
        (out / "result.json").write_text(json.dumps(result, indent=1))
        if log:
            print(f"wrote {out.name}/result.json: world {world}, final checksum {result['checksum']:.6f}", flush=True)
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return result


def launch(out, nproc=1, timeout=300, **kw) -> subprocess.CompletedProcess:
    """Run ``train`` in fresh processes: ``nproc`` > 1 under ``torchrun --standalone``, 1 as a plain
    ``python -m llmlab.distributed train``. Returns the finished process (``stdout`` holds the log)."""
    _int(nproc, "nproc")
    args = ["-m", "llmlab.distributed", "train", "--out", str(out)]
    for k, v in kw.items():
        args += [f"--{k.replace('_', '-')}", str(v)]
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), *args]
    else:
        cmd = [sys.executable, *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "LLMLAB_PROFILE": "cpu"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd[1:])} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr[-3000:]}")
    return proc


def compare_runs(a, b) -> dict:
    """How far two ``train`` outputs (folders) differ: the largest loss difference and parameter difference."""
    a, b = Path(a), Path(b)
    for d in (a, b):
        if not (d / "result.json").is_file():
            raise ValueError(f"{d} holds no result.json from llmlab.distributed.train")
    ra, rb = (json.loads((d / "result.json").read_text()) for d in (a, b))
    sa, sb = (torch.load(d / "state.pt") for d in (a, b))
    if ra["steps"] != rb["steps"] or sa.keys() != sb.keys():
        raise ValueError("the two runs trained different models or numbers of steps")
    return {"max_loss_diff": max(abs(x - y) for x, y in zip(ra["losses"], rb["losses"])),
            "max_param_diff": max((sa[k].double() - sb[k].double()).abs().max().item() for k in sa),
            "checksum_diff": abs(ra["checksum"] - rb["checksum"])}


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m llmlab.distributed",
                                 description="Data-parallel training of the course model on CPU processes.")
    sub = ap.add_subparsers(dest="command", required=True)
    tr = sub.add_parser("train", help="train a few steps; run under torchrun for data parallelism")
    tr.add_argument("--out", required=True)
    tr.add_argument("--steps", type=int, default=4)
    tr.add_argument("--global-batch", type=int, default=8)
    tr.add_argument("--seq-len", type=int, default=64)
    tr.add_argument("--lr", type=float, default=2e-3)
    tr.add_argument("--dtype", default="float32", choices=("float32", "float64"))
    tr.add_argument("--mode", default="ddp", choices=("ddp", "fsdp"))
    a = ap.parse_args(argv)
    train(a.out, a.steps, a.global_batch, a.seq_len, a.lr, a.dtype, a.mode)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
