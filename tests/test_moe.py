"""llmlab.moe against transformers' Mixtral: the sparse MoE block, its router and the load-balancing loss."""
import math

import pytest
import torch
from transformers import MixtralConfig
from transformers.models.mixtral import modeling_mixtral as hf

from llmlab import moe
from llmlab.transformer import SwiGLU, parameter_count

H, I, E, K = 32, 48, 4, 2


def _randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _mixtral_block(n_experts=E, k=K, seed=0):
    config = MixtralConfig(hidden_size=H, intermediate_size=I, num_local_experts=n_experts, num_experts_per_tok=k,
                           experts_implementation="eager")
    block = hf.MixtralSparseMoeBlock(config).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in block.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return block


def _ours_from(block):
    """Our layer with a MixtralSparseMoeBlock's weights. transformers 5 fuses the experts into 3-D parameters:
    ``gate_up_proj`` (experts, 2 * intermediate, hidden), gate rows first, and ``down_proj`` (experts, hidden,
    intermediate)."""
    n_experts, two_i, hidden = block.experts.gate_up_proj.shape
    ours = moe.MoELayer(hidden, two_i // 2, n_experts, block.top_k)
    with torch.no_grad():
        ours.gate.weight.copy_(block.gate.weight)
        for e, expert in enumerate(ours.experts):
            gate, up = block.experts.gate_up_proj[e].chunk(2, dim=0)
            expert.gate_proj.weight.copy_(gate)
            expert.up_proj.weight.copy_(up)
            expert.down_proj.weight.copy_(block.experts.down_proj[e])
    return ours


# ------------------------------------------------------------------ router --

@pytest.mark.parametrize("n_experts, k", [(4, 1), (4, 2), (8, 2), (8, 8)])
def test_router_matches_mixtral(n_experts, k):
    block = _mixtral_block(n_experts, k)
    ours = _ours_from(block)
    x = _randn(5, 9, H, seed=1)
    logits, weights, indices = ours.gate(x)
    ref_logits, ref_weights, ref_indices = block.gate(x)
    torch.testing.assert_close(logits, ref_logits)
    torch.testing.assert_close(weights, ref_weights)
    assert torch.equal(indices, ref_indices)
    assert weights.dtype == torch.float32 and weights.shape == (45, k)
    torch.testing.assert_close(weights.sum(-1), torch.ones(45))


def test_renormalized_top_k_is_softmax_of_the_top_k_logits():
    router = moe.TopKRouter(H, 8, 2)
    logits, weights, indices = router(_randn(20, H, seed=2))
    torch.testing.assert_close(weights, logits.gather(1, indices).softmax(-1))
    switch = moe.TopKRouter(H, 8, 1, normalize=False)  # Switch: the raw probability, not 1
    switch.load_state_dict(router.state_dict())
    _, w1, i1 = switch(_randn(20, H, seed=2))
    torch.testing.assert_close(w1[:, 0], logits.softmax(-1).amax(-1))
    assert torch.equal(i1[:, 0], indices[:, 0])


# --------------------------------------------------------------- the layer --

@pytest.mark.parametrize("n_experts, k", [(4, 1), (4, 2), (8, 2), (3, 3)])
def test_moe_layer_matches_mixtral_sparse_moe_block(n_experts, k):
    block = _mixtral_block(n_experts, k, seed=n_experts + k)
    ours = _ours_from(block)
    x = _randn(3, 11, H, seed=3)
    with torch.no_grad():
        y, ref = ours(x), block(x)
    assert y.shape == x.shape
    torch.testing.assert_close(y, ref, rtol=0, atol=1e-6)
    assert ours.dropped == 0 and ours.tokens_per_expert.sum() == 33 * k
    assert ours.router_logits.shape == (33, n_experts)


def test_moe_layer_is_the_weighted_sum_of_its_experts():
    layer = moe.MoELayer(H, I, E, K)
    x = _randn(10, H, seed=4)
    with torch.no_grad():
        y = layer(x)
        _, weights, indices = layer.gate(x)
        every = torch.stack([expert(x) for expert in layer.experts], dim=1)  # (tokens, experts, hidden)
        ref = (every.gather(1, indices[..., None].expand(-1, -1, H)) * weights[..., None]).sum(1)
    torch.testing.assert_close(y, ref)


def test_one_expert_is_a_swiglu():
    layer = moe.MoELayer(H, I, 1, 1)
    mlp = SwiGLU(H, I)
    mlp.load_state_dict(layer.experts[0].state_dict())
    x = _randn(2, 5, H, seed=5)
    torch.testing.assert_close(layer(x), mlp(x))


def test_gradients_reach_the_router_and_the_chosen_experts_only():
    x = _randn(1, H, seed=6)  # one token
    for k, normalize in ((2, True), (1, False), (1, True)):
        layer = moe.MoELayer(H, I, 4, k)
        layer.gate.normalize = normalize
        layer(x).sum().backward()
        chosen = set(layer.gate(x)[2][0].tolist())
        for e, expert in enumerate(layer.experts):
            assert (expert.down_proj.weight.grad is not None) == (e in chosen)
        router_grad = layer.gate.weight.grad.abs().max().item()
        if normalize and k == 1:  # the weight is p / p = 1 whatever the logits: no gradient for the router
            assert router_grad < 1e-6
        else:
            assert router_grad > 1e-4


# ---------------------------------------------------------------- capacity --

def _hand_routed(capacity_factor):
    """4 experts, top-1; the router sends tokens 0-4 to expert 0, token 5 to expert 1, tokens 6-7 to expert 2."""
    layer = moe.MoELayer(4, 8, 4, 1, capacity_factor=capacity_factor)
    with torch.no_grad():
        layer.gate.weight.copy_(torch.eye(4) * 10)  # expert e scores the token's feature e
    x = torch.eye(4)[[0, 0, 0, 0, 0, 1, 2, 2]] + 0.01
    return layer, x


def test_capacity_drops_exactly_the_overflow():
    layer, x = _hand_routed(capacity_factor=1.0)
    assert moe.expert_capacity(8, 4, 1, 1.0) == 2  # 8 tokens, 4 experts, top-1: 2 per expert
    with torch.no_grad():
        y = layer(x)
        full = moe.MoELayer(4, 8, 4, 1)
        full.load_state_dict(layer.state_dict())
        y_full = full(x)
    assert layer.tokens_per_expert.tolist() == [5, 1, 2, 0]
    assert layer.dropped == 3  # tokens 2, 3, 4: expert 0's third to fifth
    torch.testing.assert_close(y[:2], y_full[:2])
    assert not y[2:5].any()  # dropped: nothing added, the token rides the residual
    torch.testing.assert_close(y[5:], y_full[5:])
    layer.capacity_factor = 2.5  # capacity ceil(2.5 * 2) = 5: nothing dropped
    with torch.no_grad():
        torch.testing.assert_close(layer(x), y_full)
    assert layer.dropped == 0


def test_capacity_serves_first_choices_before_second_choices():
    layer = moe.MoELayer(4, 8, 4, 2, capacity_factor=1.0)  # 2 tokens, top-2, 4 experts: capacity 1
    with torch.no_grad():
        layer.gate.weight.copy_(torch.eye(4) * 10)
    x = torch.tensor([[1.0, 2, 0, 0], [2.0, 1, 0, 0]])  # token 0 prefers expert 1 then 0; token 1, 0 then 1
    with torch.no_grad():
        y = layer(x)
        _, weights, indices = layer.gate(x)
        first = [layer.experts[1](x[:1]) * weights[0, 0], layer.experts[0](x[1:]) * weights[1, 0]]
    assert indices.tolist() == [[1, 0], [0, 1]]
    assert layer.tokens_per_expert.tolist() == [2, 2, 0, 0] and layer.dropped == 2
    # token order alone would give expert 0 to token 0's second choice; first choices go first
    torch.testing.assert_close(y, torch.cat(first), rtol=0, atol=0)


# ------------------------------------------------------------ the aux loss --

@pytest.mark.parametrize("n_experts, k", [(4, 1), (4, 2), (8, 2), (16, 4)])
def test_load_balancing_loss_matches_transformers(n_experts, k):
    layers = tuple(_randn(6, 10, n_experts, seed=s).reshape(60, n_experts) * 2 for s in range(3))
    ref = hf.load_balancing_loss_func(layers, n_experts, k)
    torch.testing.assert_close(moe.load_balancing_loss(layers, k, n_experts), ref)
    torch.testing.assert_close(moe.load_balancing_loss(layers[0], k, n_experts),
                               hf.load_balancing_loss_func(layers[:1], n_experts, k))


def test_balanced_routing_gives_k_and_collapse_gives_n_experts():
    n, k = 8, 2
    # each token prefers a different pair of experts: every expert chosen equally often
    balanced = torch.full((8, n), -5.0)
    for t in range(8):
        balanced[t, [t, (t + 1) % n]] = 5.0
    assert moe.load_balancing_loss(balanced, k, n).item() == pytest.approx(k, rel=1e-6)
    uniform = torch.zeros(16, n)  # identical probabilities: P_e = 1 / n whatever f is
    assert moe.load_balancing_loss(uniform, k, n).item() == pytest.approx(k)
    collapsed = torch.zeros(16, n)
    collapsed[:, :k] = 30.0  # every token, the same two experts, all the probability
    assert moe.load_balancing_loss(collapsed, k, n).item() == pytest.approx(n, rel=1e-6)
    rand = moe.load_balancing_loss(_randn(4096, n, seed=7) * 0.1, k, n).item()
    assert k <= rand < k * 1.01  # a fresh router (small random logits) is almost balanced


def test_load_balancing_loss_gradient_flows_through_probabilities():
    logits = _randn(64, 4, seed=8).requires_grad_()
    moe.load_balancing_loss(logits, 1, 4).backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0


# -------------------------------------------------------------- parameters --

def test_parameter_counts_match_a_mixtral_on_the_meta_device():
    config = MixtralConfig(vocab_size=1000, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                           num_attention_heads=4, num_key_value_heads=2, num_local_experts=6, num_experts_per_tok=2)
    with torch.device("meta"):
        model = hf.MixtralForCausalLM(config)
    total, active = moe.moe_parameter_count(config)
    assert total == sum(p.numel() for p in model.parameters())
    expert = 3 * 64 * 96
    assert total - active == 3 * (6 - 2) * expert
    llama = {k: v for k, v in config.to_dict().items() if k not in ("model_type", "rope_parameters")}
    assert active == parameter_count({**llama, "intermediate_size": 2 * 96}) + 3 * 6 * 64  # + routers


def test_mixtral_8x7b_is_47b_total_13b_active():
    total, active = moe.moe_parameter_count(dict(
        vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, num_local_experts=8, num_experts_per_tok=2))
    assert round(total / 1e9, 1) == 46.7 and round(active / 1e9, 1) == 12.9  # Mixtral paper: 47B and 13B


# ----------------------------------------------------------------- bad input --

# ------------------------------------------- balancing without a loss, dropless routing --

def test_biased_sigmoid_router_matches_deepseek_v3():
    from transformers import DeepseekV3Config
    from transformers.models.deepseek_v3 import modeling_deepseek_v3 as ds

    config = DeepseekV3Config(hidden_size=H, n_routed_experts=8, num_experts_per_tok=2, n_group=1, topk_group=1,
                              routed_scaling_factor=1.0, norm_topk_prob=True)
    ref = ds.DeepseekV3TopkRouter(config)
    ours = moe.TopKRouter(H, 8, 2, scoring="sigmoid")
    with torch.no_grad():
        ref.weight.copy_(_randn(8, H, seed=3) * 0.5)
        ref.e_score_correction_bias.copy_(_randn(8, seed=4) * 0.3)
        ours.weight.copy_(ref.weight)
    ours.expert_bias = ref.e_score_correction_bias.clone()
    x = _randn(40, H, seed=5)
    logits, weights, indices = ours(x)
    ref_logits, ref_weights, ref_indices = ref(x)
    i, p = indices.sort(-1)  # transformers' top-k is unsorted
    ri, rp = ref_indices.sort(-1)
    assert torch.equal(i, ri)
    torch.testing.assert_close(weights.gather(1, p), ref_weights.gather(1, rp))
    torch.testing.assert_close(logits, ref_logits)
    unbiased = moe.TopKRouter(H, 8, 2, scoring="sigmoid")
    with torch.no_grad():
        unbiased.weight.copy_(ref.weight)
    assert not torch.equal(unbiased(x)[2].sort(-1)[0], i)  # the bias changed some choices
    assert "expert_bias" not in ours.state_dict()  # not saved with the weights


def test_expert_bias_changes_choices_not_weights():
    router = moe.TopKRouter(H, E, K)
    x = _randn(30, H, seed=6)
    probs = router(x)[0].softmax(-1)
    router.expert_bias = torch.tensor([10.0, 10.0, 0.0, 0.0])  # force experts 0 and 1
    _, weights, indices = router(x)
    assert torch.equal(indices.sort(-1)[0], torch.tensor([[0, 1]] * 30))
    chosen = probs[:, :2]
    torch.testing.assert_close(weights.sort(-1)[0], (chosen / chosen.sum(-1, keepdim=True)).sort(-1)[0])


def test_update_expert_bias_moves_against_the_load():
    router = moe.TopKRouter(H, 4, 1)
    bias = moe.update_expert_bias(router, torch.tensor([8, 2, 5, 5]), 0.5)  # mean 5
    assert bias.tolist() == [-0.5, 0.5, 0.0, 0.0] and router.expert_bias is bias
    moe.update_expert_bias(router, torch.tensor([1, 9, 3, 3]), 0.25)
    assert router.expert_bias.tolist() == [-0.25, 0.25, 0.25, 0.25]


def test_update_expert_bias_balances_a_skewed_router():
    torch.manual_seed(0)
    router = moe.TopKRouter(H, 4, 1)
    with torch.no_grad():
        router.weight.normal_(0, 0.1)
        router.weight[0] += 0.05  # every token leans towards expert 0
    x = _randn(256, H, seed=7) + 1.0
    with torch.no_grad():
        def share():
            return torch.bincount(router(x)[2].flatten(), minlength=4).float() / len(x)

        before = share().max().item()
        for _ in range(100):
            moe.update_expert_bias(router, torch.bincount(router(x)[2].flatten(), minlength=4), 0.004)
        assert before > 0.8 and share().max().item() < 0.28


@pytest.mark.parametrize("k", [1, 2, 4])
def test_dropless_forward_equals_the_layer_without_capacity(k):
    layer = moe.MoELayer(H, I, E, k)
    x = _randn(3, 7, H, seed=8)
    with torch.no_grad():
        torch.testing.assert_close(moe.dropless_forward(layer, x), layer(x), rtol=0, atol=1e-6)
    assert layer.dropped == 0 and int(layer.tokens_per_expert.sum()) == 21 * k


def test_sort_by_expert_and_capacity_accounting():
    indices = torch.tensor([[2, 0], [0, 1], [2, 1]])
    order, counts = moe.sort_by_expert(indices, 4)
    flat = indices.T.reshape(-1)
    assert flat[order].tolist() == [0, 0, 1, 1, 2, 2] and counts.tolist() == [2, 2, 2, 0]
    assert order.tolist() == [1, 3, 4, 5, 0, 2]  # first choices before second choices
    load = torch.tensor([5, 1, 2, 0])
    assert moe.capacity_accounting(load, 2) == {"routed": 8, "dropped": 3, "computed": 8, "padding": 3}
    assert moe.capacity_accounting(load, None) == {"routed": 8, "dropped": 0, "computed": 8, "padding": 0}
    # the same numbers as MoELayer's capacity (the hand-made example of the chapter)
    layer = moe.MoELayer(4, 8, 4, 1, capacity_factor=1.0)
    with torch.no_grad():
        layer.gate.weight.copy_(torch.eye(4) * 10)
        layer(torch.eye(4)[[0, 0, 0, 0, 0, 1, 2, 2]] + 0.01)
    assert moe.capacity_accounting(layer.tokens_per_expert, 2)["dropped"] == layer.dropped == 3


LAYER = moe.MoELayer(H, I, E, K)


@pytest.mark.parametrize("call, err", [
    (lambda: moe.TopKRouter(H, 4, 5), ValueError),
    (lambda: moe.TopKRouter(H, 0, 1), ValueError),
    (lambda: moe.TopKRouter(H, 4, 2.0), TypeError),
    (lambda: moe.TopKRouter(H, 4, 2, normalize=1), TypeError),
    (lambda: moe.TopKRouter(H, 4, 2)(torch.ones(3, H + 1)), ValueError),
    (lambda: moe.MoELayer(H, 0, E, K), ValueError),
    (lambda: moe.MoELayer(H, I, E, K, capacity_factor=0), ValueError),
    (lambda: moe.MoELayer(H, I, E, K, capacity_factor="1"), TypeError),
    (lambda: LAYER([1.0] * H), TypeError),
    (lambda: LAYER(torch.ones(2, H, dtype=torch.long)), ValueError),
    (lambda: LAYER(torch.ones(2, H - 1)), ValueError),
    (lambda: LAYER(torch.ones(0, H)), ValueError),
    (lambda: moe.expert_capacity(0, 4, 1, 1.0), ValueError),
    (lambda: moe.expert_capacity(8, 4, 1, math.inf), ValueError),
    (lambda: moe.load_balancing_loss(torch.ones(5, 4), 2, 3), ValueError),
    (lambda: moe.load_balancing_loss(torch.ones(5, 4), 5, 4), ValueError),
    (lambda: moe.load_balancing_loss([], 1, 4), ValueError),
    (lambda: moe.load_balancing_loss("logits", 1, 4), TypeError),
    (lambda: moe.load_balancing_loss(torch.ones(5, 4, dtype=torch.long), 1, 4), ValueError),
    (lambda: moe.moe_parameter_count({"hidden_size": 8}), ValueError),
    (lambda: moe.moe_parameter_count([1, 2]), TypeError),
    (lambda: moe.TopKRouter(H, 4, 2, scoring="relu"), ValueError),
    (lambda: moe.update_expert_bias(LAYER, torch.ones(E), 0.1), TypeError),
    (lambda: moe.update_expert_bias(LAYER.gate, torch.ones(E + 1), 0.1), ValueError),
    (lambda: moe.update_expert_bias(LAYER.gate, torch.ones(E), 0), ValueError),
    (lambda: moe.update_expert_bias(LAYER.gate, torch.ones(E), "0.1"), TypeError),
    (lambda: moe.capacity_accounting(torch.ones(4), 2), ValueError),
    (lambda: moe.capacity_accounting(torch.tensor([1, -1]), 2), ValueError),
    (lambda: moe.capacity_accounting(torch.tensor([1, 2]), 0), ValueError),
    (lambda: moe.sort_by_expert(torch.tensor([[0, 4]]), 4), ValueError),
    (lambda: moe.sort_by_expert(torch.ones(2, 2), 4), ValueError),
    (lambda: moe.dropless_forward(LAYER.gate, torch.ones(2, H)), TypeError),
    (lambda: moe.dropless_forward(LAYER, torch.ones(2, H + 1)), ValueError),
])
def test_bad_input(call, err):
    with pytest.raises(err):
        call()
