import json

import pytest
import torch

from llmlab import distributed as D

torch.set_num_threads(1)


# ---------------------------------------------------------------- the memory calculator --

def test_calculator_reproduces_the_zero_paper():
    """Rajbhandari et al. 2020, Figure 1: a 7.5B model on 64 GPUs with mixed-precision Adam (K = 12)."""
    gb = {s: D.model_state_bytes(7.5e9, 64, s).total / 1e9 for s in ("ddp", "zero1", "zero2", "zero3")}
    assert round(gb["ddp"], 1) == 120.0
    assert round(gb["zero1"], 1) == 31.4
    assert round(gb["zero2"], 1) == 16.6
    assert round(gb["zero3"], 1) == 1.9
    assert D.model_state_bytes(7.5e9, 64, "fsdp") == D.model_state_bytes(7.5e9, 64, "zero3")


def test_calculator_model_parallel_and_traffic():
    n = 70e9
    base = D.model_state_bytes(n, 8, "ddp")
    tp = D.model_state_bytes(n, 8, "ddp", tensor_parallel=8)  # d = 1: nothing to average
    assert tp.total == pytest.approx(base.total / 8) and tp.dp_traffic == 0
    three_d = D.model_state_bytes(n, 64, "zero1", tensor_parallel=8, pipeline_parallel=4)  # d = 2
    assert three_d.weights == pytest.approx(2 * n / 32)
    assert three_d.optimizer == pytest.approx(12 * n / 64)
    assert base.dp_traffic == pytest.approx(D.all_reduce_traffic(2 * n, 8))
    assert D.model_state_bytes(n, 8, "zero3").dp_traffic == pytest.approx(1.5 * base.dp_traffic)
    assert D.all_reduce_traffic(100, 1) == 0 and D.all_reduce_traffic(100, 4) == 150
    # Megatron: 4 all-reduces of b*s*h activations per layer and step; nothing to send with t = 1
    assert D.tensor_parallel_traffic(2, 16, 64, 1) == 0
    assert D.tensor_parallel_traffic(2, 16, 64, 4) == 4 * D.all_reduce_traffic(2 * 16 * 64 * 2, 4)


def test_calculator_against_deepspeed_estimators():
    """DeepSpeed's estimators (no offload) = the paper's accounting plus extra sharded bytes per parameter:
    ZeRO-2 adds 4 B (an fp32 copy of the gradients), ZeRO-3 adds 2 B, plus the largest layer gathered in fp32."""
    pytest.importorskip("deepspeed")
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    for n, nodes, per_node, largest in ((int(7.5e9), 8, 8, int(1e8)), (int(70e9), 1, 8, int(2e9))):
        g = nodes * per_node
        _, ds2 = estimate_zero2_model_states_mem_needs(n, per_node, nodes, cpu_offload=False)
        assert ds2 == pytest.approx(D.model_state_bytes(n, g, "zero2").total + 4 * n / g, abs=1)
        _, ds3, layer = estimate_zero3_model_states_mem_needs(n, largest, per_node, nodes, cpu_offload=False)
        assert layer == 4 * largest
        assert ds3 == pytest.approx(D.model_state_bytes(n, g, "zero3").total + 2 * n / g + layer, abs=1)


def test_calculator_bad_inputs():
    with pytest.raises(ValueError):
        D.model_state_bytes(7e9, 8, "zero4")
    with pytest.raises(ValueError):
        D.model_state_bytes(7e9, 8, tensor_parallel=3)
    with pytest.raises(ValueError):
        D.model_state_bytes(-1, 8)
    with pytest.raises(TypeError):
        D.model_state_bytes("7B", 8)
    with pytest.raises(TypeError):
        D.model_state_bytes(7e9, 8.0)
    with pytest.raises(ValueError):
        D.model_state_bytes(7e9, 0)
    with pytest.raises(ValueError):
        D.model_state_bytes(7e9, 8, optimizer_bytes=-4)
    with pytest.raises(ValueError):
        D.bubble_fraction(0, 4)
    with pytest.raises(TypeError):
        D.tensor_parallel_traffic(1.5, 16, 64, 2)
    with pytest.raises(ValueError):
        D.all_reduce_traffic(-1, 2)
    with pytest.raises(ValueError):
        D.pipeline_schedule(4, 8, "zigzag")
    with pytest.raises(ValueError):
        D.shard(torch.zeros(7, 2), 0, 2)
    with pytest.raises(ValueError):
        D.shard(torch.zeros(8, 2), 2, 2)
    with pytest.raises(TypeError):
        D.simulate_ring_all_reduce(torch.zeros(4))
    with pytest.raises(ValueError):
        D.ring_all_reduce(torch.zeros(4))  # no process group
    with pytest.raises(ValueError):
        D.train("/tmp/never", mode="tp")
    with pytest.raises(ValueError):
        D.compare_runs("/nonexistent-a", "/nonexistent-b")


# ---------------------------------------------------------------- communication and model parallelism --

@pytest.mark.parametrize("world", [2, 3, 5])
def test_simulated_ring_all_reduce(world):
    gen = torch.Generator().manual_seed(world)
    xs = [torch.randn(3, 7, generator=gen, dtype=torch.float64) for _ in range(world)]
    out, sent = D.simulate_ring_all_reduce(xs)
    total = torch.stack(xs).sum(0)
    for o in out:
        torch.testing.assert_close(o, total)
    # each rank sent 2 (G-1) chunks of 21/G elements (chunks differ by at most one element)
    assert sum(sent) == pytest.approx(world * D.all_reduce_traffic(21 * 8, world), abs=2 * world * 8)


def test_tensor_parallel_mlp_equals_the_full_mlp(course_model):
    model, _ = course_model
    mlp = model.model.layers[1].mlp  # transformers' LlamaMLP
    x = torch.randn(2, 5, model.config.hidden_size, generator=torch.Generator().manual_seed(0)).to(model.device)
    with torch.no_grad():
        full = mlp(x)
        for t in (1, 2, 4, 8):
            out, partials = D.tensor_parallel_mlp(mlp, x, t)
            assert len(partials) == t
            torch.testing.assert_close(out, full, atol=1e-5, rtol=1e-5)
        assert (partials[0] - full).abs().max() > 1e-3  # one shard alone is not the answer
    with pytest.raises(ValueError):
        D.tensor_parallel_mlp(mlp, x, 5)
    with pytest.raises(TypeError):
        D.tensor_parallel_mlp(torch.nn.Linear(2, 2), x, 2)


@pytest.mark.parametrize("kind", ["gpipe", "1f1b"])
def test_pipeline_schedules(kind):
    for p, m in ((1, 1), (2, 3), (4, 8), (8, 4)):
        s = D.pipeline_schedule(p, m, kind)
        assert len(s.ops) == 2 * p * m
        assert s.bubble == pytest.approx(D.bubble_fraction(p, m))
        assert s.in_flight == ([m] * p if kind == "gpipe" else [min(p - i, m) for i in range(p)])
        # no stage runs two things at once
        for stage in range(p):
            spans = sorted((o[3], o[4]) for o in s.ops if o[0] == stage)
            assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:]))


# ---------------------------------------------------------------- expert parallelism --

@pytest.mark.parametrize("world, k", [(1, 2), (2, 1), (2, 2), (4, 3)])
def test_simulated_expert_parallel_equals_the_layer(world, k):
    from llmlab import moe

    torch.manual_seed(world)
    layer = moe.MoELayer(16, 24, 8, k)
    xs = [torch.randn(2, 9, 16, generator=torch.Generator().manual_seed(r)) for r in range(world)]
    with torch.no_grad():
        outs, sent = D.simulate_expert_parallel(layer, xs)
        for o, x in zip(outs, xs):
            torch.testing.assert_close(o, layer(x), rtol=0, atol=1e-6)
    per = 8 // world
    for r, x in enumerate(xs):  # bytes to rank d = rows whose expert d owns, times a row's bytes
        chosen = layer.gate(x)[2].flatten()
        for d in range(world):
            rows = 0 if d == r else int(((chosen // per) == d).sum())
            assert sent[r][d] == rows * 16 * 4


def test_expert_parallel_traffic_and_bad_input():
    assert D.expert_parallel_traffic(4096, 2, 8) == D.tensor_parallel_traffic(1, 1, 4096, 8) / 2
    assert D.expert_parallel_traffic(10, 1, 1) == 0
    from llmlab import moe

    layer = moe.MoELayer(8, 8, 4, 2)
    with pytest.raises(ValueError):
        D.simulate_expert_parallel(layer, [torch.ones(3, 8)] * 3)  # 3 does not divide 4 experts
    with pytest.raises(TypeError):
        D.simulate_expert_parallel(torch.nn.Linear(8, 8), [torch.ones(3, 8)])
    with pytest.raises(TypeError):
        D.simulate_expert_parallel(layer, torch.ones(3, 8))
    with pytest.raises(ValueError):
        D.simulate_expert_parallel(layer, [torch.ones(3, 7)])
    with pytest.raises(ValueError):
        D.simulate_expert_parallel(moe.MoELayer(8, 8, 4, 2, capacity_factor=1.0), [torch.ones(3, 8)])
    with pytest.raises(ValueError):
        D.expert_parallel_forward(layer, torch.ones(3, 8))  # no process group
    with pytest.raises(TypeError):
        D.expert_parallel_traffic(4096.0, 2, 8)


# ---------------------------------------------------------------- a real 2-process run (gloo) --

def test_two_process_data_parallel_equals_one_process(tmp_path):
    """torchrun with 2 CPU processes (DDP over gloo) against one process on the same global batches."""
    kw = dict(steps=3, global_batch=4, seq_len=32, lr=1e-4)
    D.launch(tmp_path / "ddp", nproc=2, **kw)
    D.train(tmp_path / "single", **kw)
    torch.set_num_threads(1)
    diff = D.compare_runs(tmp_path / "single", tmp_path / "ddp")
    assert diff["max_loss_diff"] < 1e-5 and diff["max_param_diff"] < 1e-5, diff
    r = json.loads((tmp_path / "ddp" / "result.json").read_text())
    assert r["world_size"] == 2 and r["mode"] == "ddp" and len(r["losses"]) == 3
    assert r["param_bytes_per_rank"] == [r["full_param_bytes"]] * 2  # DDP replicates the whole model
    assert r["ring_allreduce_integers_equal"] and r["ring_allreduce_max_abs_diff"] < 1e-5
    # expert parallelism's all-to-all over gloo equals the whole MoE layer in one process
    assert r["expert_parallel_max_abs_diff"] < 1e-6
    assert len(r["expert_parallel_bytes_per_rank"]) == 2 and min(r["expert_parallel_bytes_per_rank"]) > 0
