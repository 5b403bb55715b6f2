import copy

import pytest
import torch
import torch.nn.utils.prune as tprune

from llmlab import data, pretrain, prune

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def calib(course_model):
    _, tok = course_model
    return pretrain.pack(data.corpus_split("validation", 40), tok, 64)[:8]


def _logits(model, x):
    with torch.no_grad():
        return model(input_ids=x).logits


@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.9])
def test_magnitude_per_layer_equals_torch_l1_unstructured(course_model, sparsity):
    model, _ = course_model
    ours = prune.magnitude_masks(model, sparsity, scope="layer")
    for name, lin in prune.prunable_linears(model).items():
        ref = copy.deepcopy(lin)
        tprune.l1_unstructured(ref, "weight", amount=sparsity)
        assert torch.equal(ours[name], ref.weight_mask), name


@pytest.mark.parametrize("sparsity", [0.2, 0.7])
def test_magnitude_global_equals_torch_global_unstructured(course_model, sparsity):
    model, _ = course_model
    ref = copy.deepcopy(model)
    layers = prune.prunable_linears(ref)
    tprune.global_unstructured([(m, "weight") for m in layers.values()], tprune.L1Unstructured, amount=sparsity)
    ours = prune.magnitude_masks(model, sparsity, scope="global")
    for name, m in layers.items():
        assert torch.equal(ours[name], m.weight_mask), name
    per_layer = [r["sparsity"] for r in prune.sparsity(prune.apply_masks(copy.deepcopy(model), ours))[:-1]]
    assert max(per_layer) - min(per_layer) > 0.05  # global ranking prunes layers unevenly


def test_apply_masks_and_sparsity_report(course_model):
    model, _ = course_model
    m = prune.apply_masks(copy.deepcopy(model), prune.magnitude_masks(model, 0.6))
    rep = prune.sparsity(m)
    assert rep[-1]["layer"] == "total" and rep[-1]["sparsity"] == pytest.approx(0.6, abs=1e-3)
    assert all(r["sparsity"] == pytest.approx(0.6, abs=1e-3) for r in rep[:-1])
    assert prune.sparsity(model)[-1]["zeros"] == 0  # the original is untouched


def test_wanda_scores_weight_times_input_norm(course_model, calib):
    model, _ = course_model
    norms = prune.input_norms(model, calib)
    # by hand for one layer: the input to layer 0's q_proj is the normed embedding
    captured = []
    h = model.model.layers[0].self_attn.q_proj.register_forward_pre_hook(lambda mod, a: captured.append(a[0]))
    _logits(model, calib)
    h.remove()
    x = captured[0].reshape(-1, captured[0].shape[-1])
    assert torch.allclose(norms["model.layers.0.self_attn.q_proj"], x.norm(dim=0), rtol=1e-4)
    masks = prune.wanda_masks(model, calib, 0.5)
    w = model.model.layers[0].self_attn.q_proj.weight
    mask = masks["model.layers.0.self_attn.q_proj"]
    assert (mask.sum(1) == w.shape[1] // 2).all()  # Wanda compares weights within each output row
    score = w.abs() * x.norm(dim=0)
    row = score[0]
    assert row[mask[0] == 1].min() >= row[mask[0] == 0].max()
    mag = prune.magnitude_masks(model, 0.5)["model.layers.0.self_attn.q_proj"]
    assert not torch.equal(mask, mag)


def test_semi_structured_2_4(course_model):
    model, _ = course_model
    masks = prune.semi_structured_masks(model)
    m = prune.apply_masks(copy.deepcopy(model), masks)
    for lin in prune.prunable_linears(m).values():
        assert prune.is_semi_structured(lin.weight)
    assert prune.sparsity(m)[-1]["sparsity"] == pytest.approx(0.5)
    assert not prune.is_semi_structured(model.model.layers[0].mlp.up_proj.weight)
    unstructured = prune.apply_masks(copy.deepcopy(model), prune.magnitude_masks(model, 0.5))
    assert not all(prune.is_semi_structured(l.weight) for l in prune.prunable_linears(unstructured).values())


def test_pruning_nothing_changes_nothing(course_model, calib):
    model, _ = course_model
    m = prune.prune_mlp_neurons(copy.deepcopy(model), keep=1.0)
    m = prune.prune_attention_heads(m, heads_per_group=4, kv_groups=2)
    assert torch.equal(_logits(m, calib), _logits(model, calib))


def test_pruned_mlp_equals_masked_original(course_model, calib, tmp_path):
    model, _ = course_model
    scores = prune.mlp_importance(model, "activation", calib)
    m = prune.prune_mlp_neurons(copy.deepcopy(model), keep=0.5, scores=scores)
    assert m.config.intermediate_size == 384 and m.model.layers[0].mlp.up_proj.weight.shape == (384, 256)
    masked = copy.deepcopy(model)
    with torch.no_grad():
        for layer, s in zip(masked.model.layers, scores):
            drop = torch.topk(s, 384, largest=False).indices  # the least important half
            layer.mlp.down_proj.weight[:, drop] = 0  # switched off: contributes nothing
    torch.testing.assert_close(_logits(m, calib), _logits(masked, calib), atol=1e-4, rtol=1e-4)
    assert sum(p.numel() for p in m.parameters()) < sum(p.numel() for p in model.parameters())
    from transformers import LlamaForCausalLM
    m.save_pretrained(tmp_path)
    again = LlamaForCausalLM.from_pretrained(tmp_path)
    assert torch.equal(_logits(again, calib), _logits(m, calib))


@pytest.mark.parametrize("heads_per_group,kv_groups", [(2, None), (None, 1), (1, 1)])
def test_pruned_heads_equal_masked_original(course_model, calib, tmp_path, heads_per_group, kv_groups):
    model, _ = course_model
    nh, nkv, hd = 8, 2, 32
    scores = prune.head_importance(model, "weight")
    m = prune.prune_attention_heads(copy.deepcopy(model), heads_per_group, kv_groups, scores=scores)
    g_keep, h_keep = kv_groups or nkv, heads_per_group or nh // nkv
    assert (m.config.num_attention_heads, m.config.num_key_value_heads) == (g_keep * h_keep, g_keep)
    assert m.model.layers[0].self_attn.k_proj.weight.shape == (g_keep * hd, 256)
    masked = copy.deepcopy(model)
    with torch.no_grad():
        for layer, s in zip(masked.model.layers, scores):
            s = s.reshape(nkv, nh // nkv)
            keep = set()
            for g in torch.topk(s.sum(1), g_keep).indices.tolist():
                keep |= {g * (nh // nkv) + h for h in torch.topk(s[g], h_keep).indices.tolist()}
            for h in set(range(nh)) - keep:  # a head whose output projection is zero writes nothing
                layer.self_attn.o_proj.weight[:, h * hd:(h + 1) * hd] = 0
    torch.testing.assert_close(_logits(m, calib), _logits(masked, calib), atol=1e-4, rtol=1e-4)
    from transformers import LlamaForCausalLM
    m.save_pretrained(tmp_path)
    again = LlamaForCausalLM.from_pretrained(tmp_path)
    assert torch.equal(_logits(again, calib), _logits(m, calib))
    out = again.generate(calib[:1, :8], max_new_tokens=4, do_sample=False)  # the KV cache works with fewer heads
    assert out.shape == (1, 12)


def test_importance_orders(course_model, calib):
    model, _ = course_model
    for kind in ("weight", "activation"):
        mlp = prune.mlp_importance(model, kind, calib)
        heads = prune.head_importance(model, kind, calib)
        assert len(mlp) == len(heads) == 4 and mlp[0].shape == (768,) and heads[0].shape == (8,)
        assert all((s >= 0).all() for s in mlp + heads)


def test_bad_inputs(course_model, calib):
    model, _ = course_model
    with pytest.raises(ValueError):
        prune.magnitude_masks(model, 1.5)
    with pytest.raises(TypeError):
        prune.magnitude_masks(model, "half")
    with pytest.raises(ValueError):
        prune.magnitude_masks(model, 0.5, scope="row")
    with pytest.raises(TypeError):
        prune.sparsity("model")
    with pytest.raises(ValueError):
        prune.apply_masks(copy.deepcopy(model), {"nope": torch.ones(1)})
    with pytest.raises(TypeError):
        prune.apply_masks(copy.deepcopy(model), {"model.layers.0.mlp.up_proj": 1.0})
    with pytest.raises(ValueError):
        prune.wanda_masks(model, calib.float(), 0.5)
    with pytest.raises(ValueError):
        prune.mlp_importance(model, "activation")
    with pytest.raises(ValueError):
        prune.head_importance(model, "gradient")
    with pytest.raises(ValueError):
        prune.prune_mlp_neurons(copy.deepcopy(model), keep=0)
    with pytest.raises(ValueError):
        prune.prune_attention_heads(copy.deepcopy(model), kv_groups=3)
    with pytest.raises(ValueError):  # 3 heads do not divide hidden 256: transformers would refuse the config
        prune.prune_attention_heads(copy.deepcopy(model), heads_per_group=3)
    with pytest.raises(TypeError):
        prune.prune_mlp_neurons(torch.nn.Linear(2, 2), keep=1)
    with pytest.raises(TypeError):
        prune.is_semi_structured(torch.ones(8))
