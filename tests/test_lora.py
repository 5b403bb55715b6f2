"""llmlab.lora against peft on the same weights: logits, gradients, merged weights, parameter counts, and QLoRA
over bitsandbytes' 4-bit Linear4bit (which runs on the CPU)."""
import copy
import math

import pytest
import torch
from torch import nn

from llmlab import lora as L

peft = pytest.importorskip("peft")
from peft import LoraConfig, get_peft_model  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

ALL = L.LLAMA_PROJECTIONS


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _config(**kw):
    return LlamaConfig(**{**dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2, vocab_size=100, max_position_embeddings=64), **kw})


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return LlamaForCausalLM(_config()).eval()


def _ids(vocab=100, seed=0):
    return torch.randint(0, vocab, (2, 12), generator=torch.Generator().manual_seed(seed))


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def _pair(base, r, alpha, targets, dropout=0.0, seed=1, use_rslora=False):
    """llmlab and peft LoRA on two copies of ``base``, with peft's B made random and both A and B copied into
    llmlab's layers, so the two compute the same non-trivial function. Returns ``(ours, theirs)``."""
    ours = L.apply_lora(copy.deepcopy(base), r, alpha, targets, dropout, use_rslora=use_rslora)
    theirs = get_peft_model(copy.deepcopy(base),
                            LoraConfig(r=r, lora_alpha=alpha, target_modules=list(targets), lora_dropout=dropout,
                                       use_rslora=use_rslora))
    g = torch.Generator().manual_seed(seed)
    layers = {n: m for n, m in ours.named_modules() if isinstance(m, L.LoRALinear)}
    assert layers
    for name, layer in layers.items():
        peft_layer = theirs.base_model.model.get_submodule(name)
        B = peft_layer.lora_B["default"].weight
        with torch.no_grad():
            B.copy_(torch.randn(B.shape, generator=g) * 0.1)
            layer.lora_A.copy_(peft_layer.lora_A["default"].weight)
            layer.lora_B.copy_(B)
    return ours, theirs


def _trainable(model):
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


# --------------------------------------------------------------- the layer --

def test_lora_linear_starts_as_the_base_layer():
    torch.manual_seed(0)
    base = nn.Linear(48, 24)
    torch.manual_seed(7)
    layer = L.LoRALinear(base, r=4, alpha=8)
    torch.manual_seed(7)
    expected_A = nn.Linear(48, 4, bias=False).weight  # peft: A is initialised like an nn.Linear weight
    assert torch.equal(layer.lora_A, expected_A) and not layer.lora_B.any()
    assert layer.lora_A.abs().max() <= 1 / math.sqrt(48)  # kaiming_uniform(a=sqrt 5): U(-1/sqrt(in), 1/sqrt(in))
    assert layer.scaling == 2 and layer.lora_A.shape == (4, 48) and layer.lora_B.shape == (24, 4)
    assert layer.base is base and not any(p.requires_grad for p in base.parameters())
    x = torch.randn(3, 5, 48)
    assert torch.equal(layer(x), base(x))


def test_lora_linear_is_the_formula():
    torch.manual_seed(0)
    layer = L.LoRALinear(nn.Linear(32, 16), r=3, alpha=5)
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(4, 32)
    W, b, A, B = layer.base.weight, layer.base.bias, layer.lora_A, layer.lora_B
    torch.testing.assert_close(layer(x), x @ W.T + b + x @ A.T @ B.T * (5 / 3))
    torch.testing.assert_close(layer(x), x @ (W + layer.delta_weight()).T + b)


# ------------------------------------------------------------- vs peft --

@pytest.mark.parametrize("r, alpha, targets", [
    (4, 8, ("q_proj", "v_proj")),
    (8, 16, ALL),
    (2, 5, ("o_proj", "down_proj")),
    (16, 4, ("k_proj", "gate_proj", "up_proj")),
])
def test_logits_match_peft(tiny, r, alpha, targets):
    ours, theirs = _pair(tiny, r, alpha, targets)
    ids = _ids()
    mine, ref, base = _logits(ours, ids), _logits(theirs, ids), _logits(tiny, ids)
    torch.testing.assert_close(mine, ref, rtol=0, atol=1e-6)
    assert (mine - base).abs().max() > 1e-3  # the adapters really change the output


def test_at_init_the_model_is_unchanged(tiny):
    model = L.apply_lora(copy.deepcopy(tiny), r=8, alpha=16, target_modules=ALL)
    ids = _ids(seed=2)
    assert torch.equal(_logits(model, ids), _logits(tiny, ids))
    layers = [m for m in model.modules() if isinstance(m, L.LoRALinear)]
    assert len(layers) == 7 * 2 and all(not m.lora_B.any() and m.lora_A.any() for m in layers)


def test_trainable_parameters_match_peft_and_the_formula(tiny):
    for r, targets in ((4, ("q_proj", "v_proj")), (8, ALL), (3, ("down_proj",))):
        ours, theirs = _pair(tiny, r, 2 * r, targets)
        trainable = _trainable(ours)
        assert trainable and all(n.endswith((".lora_A", ".lora_B")) for n in trainable)
        count = sum(p.numel() for p in trainable.values())
        assert count == theirs.get_nb_trainable_parameters()[0]
        assert count == L.lora_parameters(tiny.config, r, targets)
        assert sum(p.numel() for p in ours.parameters()) == theirs.get_nb_trainable_parameters()[1]


def _backward_and_compare_adapter_grads(ours, theirs, ids):
    """One backward pass through both models; every adapter of ours gets a non-zero gradient equal to peft's."""
    for model in (ours, theirs):
        model.train()
        model(ids, labels=ids).loss.backward()
    for name, p in ours.named_parameters():
        if name.endswith((".lora_A", ".lora_B")):
            assert p.grad is not None and p.grad.abs().sum() > 0, name
            peft_name = name.replace(".lora_A", ".lora_A.default.weight").replace(".lora_B", ".lora_B.default.weight")
            torch.testing.assert_close(p.grad, theirs.base_model.model.get_parameter(peft_name).grad,
                                       rtol=1e-4, atol=1e-7)


def _frozen(model):
    return [(n, p) for n, p in model.named_parameters() if not n.endswith((".lora_A", ".lora_B"))]


def test_gradients_reach_only_the_adapters_and_match_peft(tiny):
    ours, theirs = _pair(tiny, 4, 8, ALL)
    _backward_and_compare_adapter_grads(ours, theirs, _ids(seed=3))
    for name, p in _frozen(ours):
        assert not p.requires_grad and p.grad is None, name


def test_dropout_matches_peft_in_training_and_is_off_in_eval(tiny):
    ours, theirs = _pair(tiny, 4, 8, ("q_proj", "v_proj", "up_proj"), dropout=0.3)
    ids = _ids(seed=4)
    out = []
    for model in (ours, theirs):
        model.train()
        torch.manual_seed(11)  # the same masks, drawn in the same order
        with torch.no_grad():
            out.append(model(ids).logits)
    torch.testing.assert_close(out[0], out[1], rtol=0, atol=1e-6)
    torch.manual_seed(12)
    assert (_logits(ours, ids) - out[0]).abs().max() > 1e-4  # other masks: dropout is really on in training
    no_dropout = copy.deepcopy(ours)
    for layer in no_dropout.modules():
        if isinstance(layer, L.LoRALinear):
            assert isinstance(layer.dropout, nn.Dropout) and layer.dropout.p == 0.3
            layer.dropout = nn.Identity()
    assert torch.equal(_logits(ours.eval(), ids), _logits(no_dropout, ids))
    assert (_logits(ours, ids) - out[0]).abs().max() > 1e-4


def test_merge_matches_peft_merge_and_unload(tiny):
    ours, theirs = _pair(tiny, 8, 16, ALL)
    ids = _ids(seed=5)
    before = _logits(ours, ids)
    merged, ref = L.merge_lora(ours), theirs.merge_and_unload()
    assert merged is ours and not any(isinstance(m, L.LoRALinear) for m in merged.modules())
    assert type(merged.model.layers[0].self_attn.q_proj) is nn.Linear
    mine, theirs_sd = merged.state_dict(), ref.state_dict()
    assert mine.keys() == theirs_sd.keys() == tiny.state_dict().keys()
    for k in mine:
        assert torch.equal(mine[k], theirs_sd[k]), k
    assert not torch.equal(mine["model.layers.0.self_attn.q_proj.weight"],
                           tiny.state_dict()["model.layers.0.self_attn.q_proj.weight"])
    torch.testing.assert_close(_logits(merged, ids), before, rtol=0, atol=1e-5)


@pytest.mark.parametrize("r, alpha", [(4, 8), (16, 4)])
def test_rslora_matches_peft(tiny, r, alpha):
    """rsLoRA (Kalajdzievski 2023): the same adapter scaled by alpha / sqrt(r); peft's use_rslora=True."""
    ours, theirs = _pair(tiny, r, alpha, ("q_proj", "down_proj"), use_rslora=True)
    name = "model.layers.1.mlp.down_proj"
    layer, peft_layer = ours.get_submodule(name), theirs.base_model.model.get_submodule(name)
    assert layer.scaling == peft_layer.scaling["default"] == alpha / math.sqrt(r) == L.lora_scaling(r, alpha, True)
    assert "use_rslora=True" in repr(layer)
    ids = _ids(seed=8)
    torch.testing.assert_close(_logits(ours, ids), _logits(theirs, ids), rtol=0, atol=1e-6)
    merged, ref = L.merge_lora(ours), theirs.merge_and_unload()
    for k, v in ref.state_dict().items():
        torch.testing.assert_close(merged.state_dict()[k], v, rtol=0, atol=1e-7)


def test_rslora_scaling_by_rank():
    for r in (1, 4, 64):
        assert L.lora_scaling(r, 16) == 16 / r and L.lora_scaling(r, 16, use_rslora=True) == 16 / math.sqrt(r)
    with pytest.raises(TypeError, match="use_rslora must be a bool, got str"):
        L.lora_scaling(4, 8, "yes")
    with pytest.raises(ValueError, match="r must be a positive int"):
        L.lora_scaling(0, 8)
    with pytest.raises(ValueError, match="alpha must be positive"):
        L.lora_scaling(4, -1.0)


def test_dora_formula_matches_peft():
    """DoRA (Liu et al. 2024), the paragraph's formula from scratch: W' = m * V / ||V|| row by row, with
    V = W + (alpha / r) B A and m starting at W's row norms; the same output as peft's use_dora=True."""
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(24, 16, bias=False))
    dora = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, target_modules=["0"], use_dora=True))
    layer = dora.base_model.model[0]
    W, A, B = base[0].weight, layer.lora_A["default"].weight, layer.lora_B["default"].weight
    m = layer.lora_magnitude_vector["default"].weight
    torch.testing.assert_close(m, W.norm(dim=1))  # starts at the base's row norms: the base model exactly
    with torch.no_grad():
        B.normal_(0, 0.3)
        m.mul_(torch.linspace(0.5, 1.5, 16))
        x = torch.randn(5, 24)
        V = W + (8 / 4) * B @ A
        mine = x @ (m[:, None] * V / V.norm(dim=1, keepdim=True)).T
        torch.testing.assert_close(mine, dora(x), rtol=0, atol=1e-5)
        assert (mine - base(x)).abs().max() > 0.1  # not trivially the base layer


def test_half_precision_base_keeps_float32_adapters_like_peft(tiny):
    base = copy.deepcopy(tiny).to(torch.bfloat16)
    ours, theirs = _pair(base, 4, 8, ALL)
    layer = ours.model.layers[0].self_attn.q_proj
    assert layer.lora_A.dtype == layer.lora_B.dtype == torch.float32
    assert theirs.base_model.model.model.layers[0].self_attn.q_proj.lora_A["default"].weight.dtype == torch.float32
    ids = _ids(seed=6)
    mine = _logits(ours, ids)
    assert mine.dtype == torch.bfloat16
    torch.testing.assert_close(mine, _logits(theirs, ids), rtol=0, atol=1e-6)


def test_adapter_state_dict_round_trips_and_matches_peft(tiny):
    from peft import get_peft_model_state_dict

    ours, theirs = _pair(tiny, 4, 8, ("q_proj", "v_proj"))
    sd = L.lora_state_dict(ours)
    assert len(sd) == 2 * 2 * 2 and all(k.endswith((".lora_A", ".lora_B")) for k in sd)
    ref = get_peft_model_state_dict(theirs)
    assert {k.replace("base_model.model.", "").replace(".weight", "") for k in ref} == set(sd)
    fresh = L.apply_lora(copy.deepcopy(tiny), 4, 8, ("q_proj", "v_proj"))
    result = fresh.load_state_dict(sd, strict=False)
    assert not result.unexpected_keys and all(".lora_" not in k for k in result.missing_keys)
    ids = _ids(seed=7)
    assert torch.equal(_logits(fresh, ids), _logits(ours, ids))


def test_course_model_against_peft(course_model):
    model, tok = course_model
    base = copy.deepcopy(model)
    ours, theirs = _pair(base, 8, 16, ALL)
    ids = tok(["Mia has a red ball.", "3 plus 4 is 7."], return_tensors="pt", padding=True)["input_ids"]
    torch.testing.assert_close(_logits(ours, ids), _logits(theirs, ids), rtol=0, atol=1e-5)
    count = sum(p.numel() for p in _trainable(ours).values())
    assert count == theirs.get_nb_trainable_parameters()[0] == L.lora_parameters(model.config, 8, ALL)
    # 4 layers x 8 x [(256+256) + 2(256+64) + (256+256) + 2(256+768) + (768+256)]
    assert count == 4 * 8 * (512 + 2 * 320 + 512 + 2 * 1024 + 1024) == 151_552


# ------------------------------------------------------------------ counting --

def test_projection_shapes_are_the_model_linears():
    cfg = _config(head_dim=32, num_key_value_heads=1)  # head_dim * heads != hidden; one KV head
    model = LlamaForCausalLM(cfg)
    shapes = L.projection_shapes(cfg)
    assert list(shapes) == list(ALL)
    for name, (fan_in, fan_out) in shapes.items():
        for layer in model.model.layers:
            linear = layer.get_submodule(("self_attn." if name in ALL[:4] else "mlp.") + name)
            assert (linear.in_features, linear.out_features) == (fan_in, fan_out), name
    r = 5
    built = L.apply_lora(model, r, 10, ALL)
    assert sum(p.numel() for p in _trainable(built).values()) == L.lora_parameters(cfg, r, ALL)


def test_lora_parameters_by_hand():
    cfg = _config(hidden_size=256, intermediate_size=768, num_attention_heads=8, num_key_value_heads=2,
                  num_hidden_layers=4)
    assert L.lora_parameters(cfg, 8) == 4 * 8 * ((256 + 256) + (256 + 64)) == 26_624  # q and v by default
    assert L.lora_parameters(cfg, 1, "down_proj") == 4 * (768 + 256)
    assert L.lora_parameters(cfg, 2, ["q_proj", "q_proj"]) == 4 * 2 * 512  # a name given twice counts once


# ------------------------------------------------------------------- QLoRA --

@pytest.fixture(scope="module")
def tiny_folder(tiny, tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-llama")
    tiny.save_pretrained(folder)
    return folder


def _load_4bit(folder):
    bnb = pytest.importorskip("bitsandbytes")
    from transformers import BitsAndBytesConfig

    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    model = LlamaForCausalLM.from_pretrained(folder, quantization_config=config).eval()
    assert isinstance(model.model.layers[0].self_attn.q_proj, bnb.nn.Linear4bit)
    return model


@pytest.fixture
def tiny_4bit(tiny_folder):
    """A fresh 4-bit copy for each test: on some CPUs bitsandbytes rewrites 4-bit weights in place on the first
    no-grad eval forward (see ``_keep_4bit_layers_differentiable``), so a shared one would change between tests."""
    return _load_4bit(tiny_folder)


def _no_cpu_repacking(model):
    """What ``apply_lora`` does to every Linear4bit, done to peft's model too, so both run the same 4-bit kernel."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    return model


def _has_avx512bf16():
    """The CPU feature that makes bitsandbytes repack 4-bit weights (its own check, cpuid-based)."""
    from bitsandbytes.functional import has_avx512bf16

    return bool(has_avx512bf16())


def test_qlora_matches_peft_over_linear4bit(tiny_4bit, tiny):
    import bitsandbytes as bnb
    from peft.tuners.lora.bnb import Linear4bit as PeftLinear4bit

    ours, theirs = _pair(tiny_4bit, 4, 8, ALL)
    _no_cpu_repacking(theirs)
    layer = ours.model.layers[1].mlp.down_proj
    assert isinstance(layer.base, bnb.nn.Linear4bit) and layer.base.weight.dtype == torch.uint8
    assert layer.lora_A.dtype == torch.float32 and layer.lora_A.shape == (4, 128)
    assert isinstance(theirs.base_model.model.model.layers[1].mlp.down_proj, PeftLinear4bit)
    ids = _ids(seed=8)
    mine = _logits(ours, ids)
    torch.testing.assert_close(mine, _logits(theirs, ids), rtol=0, atol=1e-5)
    assert (mine - _logits(tiny_4bit, ids)).abs().max() > 1e-3
    # The 4-bit base is close to, not equal to, the float one: same adapters on the float model differ a little.
    full = L.apply_lora(copy.deepcopy(tiny), 4, 8, ALL)
    full.load_state_dict(L.lora_state_dict(ours), strict=False)
    gap = (mine - _logits(full, ids)).abs().max().item()
    assert 0 < gap < 0.5 * _logits(full, ids).abs().max().item()

    count = sum(p.numel() for p in _trainable(ours).values())
    assert count == theirs.get_nb_trainable_parameters()[0] == L.lora_parameters(tiny.config, 4, ALL)


def test_qlora_backward_trains_only_the_adapters(tiny_4bit):
    ours, theirs = _pair(tiny_4bit, 4, 8, ("q_proj", "v_proj", "down_proj"))
    ids = _ids(seed=9)
    _backward_and_compare_adapter_grads(ours, theirs, ids)
    for name, p in _frozen(ours):
        assert p.grad is None, name
    # one optimizer step on the adapters moves the loss
    opt = torch.optim.SGD(list(_trainable(ours).values()), lr=0.5)
    before = ours(ids, labels=ids).loss.item()
    opt.step()
    assert ours(ids, labels=ids).loss.item() < before


def test_merge_refuses_a_4bit_base(tiny_4bit):
    model = L.apply_lora(copy.deepcopy(tiny_4bit), 4, 8)
    with pytest.raises(ValueError, match="4-bit base.*dequantize"):
        L.merge_lora(model)
    assert isinstance(model.model.layers[0].self_attn.q_proj, L.LoRALinear)  # nothing was half merged


def test_qlora_still_trains_after_generating(tiny_4bit):
    model = L.apply_lora(tiny_4bit, 8, 16)  # q_proj, v_proj: their gradients must pass back through 4-bit o_proj
    ids = _ids(seed=10)
    with torch.no_grad():
        model.generate(ids[:, :4], max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert not any(getattr(getattr(m, "weight", None), "quant_state", None) is not None
                   and getattr(m.weight.quant_state, "packing_format_for_cpu", False) for m in model.modules())
    model.train()
    opt = torch.optim.SGD(list(_trainable(model).values()), lr=0.5)
    losses = []
    for _ in range(3):
        loss = model(ids, labels=ids).loss
        loss.backward()
        grads = {n: p.grad for n, p in _trainable(model).items()}
        assert all(g is not None for g in grads.values())  # (A's gradient is 0 while B is: dL/dA = B^T ...)
        assert all(g.abs().sum() > 0 for n, g in grads.items() if n.endswith("lora_B"))
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[2] < losses[1] < losses[0]


def test_bitsandbytes_cpu_repacking_drops_gradients_only_on_avx512_bf16(tiny_4bit):
    """Why apply_lora turns the repacking off, on the CPUs where it happens.

    bitsandbytes 0.50.2 repacks a ``Linear4bit``'s weight for its CPU inference kernel on the first no-grad
    eval forward when the CPU has AVX512-BF16 (``Linear4bit.forward``); that kernel has no backward, so
    a peft adapter trained afterwards gets no gradient. On other CPUs (AVX2, Arm) nothing is repacked and
    peft trains after generating. If the AVX512-BF16 branch starts failing, bitsandbytes fixed it (or
    stopped repacking) and ``_keep_4bit_layers_differentiable`` can go."""
    ids = _ids(seed=11)
    config = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"])
    theirs = get_peft_model(copy.deepcopy(tiny_4bit), config)
    with torch.no_grad():
        theirs.generate(input_ids=ids[:, :4], max_new_tokens=3, do_sample=False, pad_token_id=0)
    theirs.train()
    with torch.no_grad():
        tiny_4bit(ids)  # the same forward, on the plain 4-bit model
    if not _has_avx512bf16():
        theirs(input_ids=ids, labels=ids).loss.backward()
        assert all(p.grad is not None for p in _trainable(theirs).values())
        model = L.apply_lora(tiny_4bit, 8, 16)  # nothing was repacked, so nothing to refuse
        assert any(isinstance(m, L.LoRALinear) for m in model.modules())
        return
    with pytest.warns(UserWarning, match="gemv_4bit: an autograd kernel was not registered"):
        theirs(input_ids=ids, labels=ids).loss.backward()
    assert all(p.grad is None for p in _trainable(theirs).values())  # not one adapter gets a gradient
    with pytest.raises(ValueError, match="model.layers.0.self_attn.q_proj was repacked by bitsandbytes for CPU "
                                         "inference .* call apply_lora before generating"):
        L.apply_lora(tiny_4bit, 8, 16)
    assert not any(isinstance(m, L.LoRALinear) for m in tiny_4bit.modules())


# ------------------------------------------------------------------ errors --

def test_apply_lora_rejects_bad_input(tiny):
    model = copy.deepcopy(tiny)
    cases = [
        (dict(r=0), ValueError, "r must be a positive int, got 0"),
        (dict(r=-2), ValueError, "r must be a positive int"),
        (dict(r=2.0), TypeError, "r must be an int, got float"),
        (dict(r=True), TypeError, "r must be an int, got bool"),
        (dict(alpha=0), ValueError, "alpha must be positive, got 0"),
        (dict(alpha=float("nan")), ValueError, "alpha must be positive"),
        (dict(alpha="16"), TypeError, "alpha must be a number, got str"),
        (dict(dropout=1.0), ValueError, r"dropout must be in \[0, 1\), got 1.0"),
        (dict(dropout=-0.1), ValueError, r"dropout must be in \[0, 1\)"),
        (dict(dropout=None), TypeError, "dropout must be a number, got NoneType"),
        (dict(target_modules=("q_proj", "qproj")), ValueError,
         r"\['qproj'\] match no module in the model; its Linear layers are \['down_proj', 'gate_proj', 'k_proj', "
         r"'lm_head', 'o_proj', 'q_proj', 'up_proj', 'v_proj'\]"),
        (dict(target_modules="all-linear"), ValueError, r"\['all-linear'\] match no module"),
        (dict(target_modules=("self_attn",)), TypeError,
         "'model.layers.0.self_attn' is a LlamaAttention, not a Linear"),
        (dict(target_modules=("embed_tokens",)), TypeError, "is a Embedding, not a Linear"),
        (dict(target_modules=[1]), TypeError, "target_modules must be a str or a list of str"),
        (dict(target_modules=[]), ValueError, "target_modules must be non-empty names"),
        (dict(target_modules=["q_proj", " "]), ValueError, "target_modules must be non-empty names"),
        (dict(use_rslora="yes"), TypeError, "use_rslora must be a bool, got str"),
    ]
    for kwargs, error, match in cases:
        with pytest.raises(error, match=match):
            L.apply_lora(model, **kwargs)
    # a rejected call changes nothing
    assert not any(isinstance(m, L.LoRALinear) for m in model.modules())
    assert all(p.requires_grad for p in model.parameters())
    with pytest.raises(TypeError, match="model must be a torch.nn.Module, got str"):
        L.apply_lora("model")
    L.apply_lora(model, 4, 8, ("q_proj",))
    with pytest.raises(ValueError, match="model.layers.0.self_attn.q_proj already has LoRA; merge_lora"):
        L.apply_lora(model, 4, 8, ("q_proj",))
    L.apply_lora(model, 4, 8, ("v_proj",))  # another target later is fine, and keeps the first adapters trainable
    assert {n.split(".")[-2] for n in _trainable(model)} == {"q_proj", "v_proj"}


def test_lora_linear_rejects_bad_input():
    with pytest.raises(TypeError, match="base must be a torch.nn.Linear .*got Conv1d"):
        L.LoRALinear(nn.Conv1d(4, 4, 1))
    with pytest.raises(ValueError, match="r must be a positive int"):
        L.LoRALinear(nn.Linear(4, 4), r=0)
    with pytest.raises(ValueError, match="alpha must be positive"):
        L.LoRALinear(nn.Linear(4, 4), alpha=-1)
    with pytest.raises(ValueError, match=r"dropout must be in \[0, 1\)"):
        L.LoRALinear(nn.Linear(4, 4), dropout=2)
    with pytest.raises(TypeError, match="use_rslora must be a bool, got int"):
        L.LoRALinear(nn.Linear(4, 4), use_rslora=1)


def test_merge_and_state_dict_need_lora_layers(tiny):
    for fn in (L.merge_lora, L.lora_state_dict):
        with pytest.raises(ValueError, match=r"the model has no LoRA layers \(apply_lora adds them\)"):
            fn(copy.deepcopy(tiny))
        with pytest.raises(TypeError, match="model must be a torch.nn.Module, got dict"):
            fn({})


def test_lora_parameters_rejects_bad_input(tiny):
    with pytest.raises(TypeError, match=r"Llama-style transformers config; dict lacks \['hidden_size'"):
        L.lora_parameters({"hidden_size": 64}, 8)
    with pytest.raises(ValueError, match=r"unknown target_modules \['lm_head'\]; a Llama layer's Linears are"):
        L.lora_parameters(tiny.config, 8, ["q_proj", "lm_head"])
    with pytest.raises(ValueError, match="r must be a positive int, got 0"):
        L.lora_parameters(tiny.config, 0)
    with pytest.raises(TypeError, match="target_modules must be a str or a list of str"):
        L.lora_parameters(tiny.config, 8, None)
