import math
import os

import pytest
import torch
import torch.nn.functional as F

from llmlab import distill

torch.set_num_threads(1)
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")


def _logits(seed=0, shape=(3, 5, 11), scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g) * scale, torch.randn(*shape, generator=g) * scale


def _gkd():
    try:
        from trl.experimental.gkd import GKDTrainer
    except ImportError:  # older trl kept it at the top level
        from trl import GKDTrainer
    return GKDTrainer.generalized_jsd_loss


def test_kl_divergences_equal_torch_kl_div():
    s, t = _logits()
    for T in (1.0, 2.0, 0.5):
        ls, lt = F.log_softmax(s / T, -1), F.log_softmax(t / T, -1)
        # F.kl_div(input, target) is KL(target || input)
        fwd = F.kl_div(ls, lt, reduction="sum", log_target=True)
        rev = F.kl_div(lt, ls, reduction="sum", log_target=True)
        assert torch.allclose(distill.forward_kl(s, t, temperature=T, reduction="sum"), fwd, atol=1e-5)
        assert torch.allclose(distill.reverse_kl(s, t, temperature=T, reduction="sum"), rev, atol=1e-5)
    assert not torch.allclose(fwd, rev)  # KL is not symmetric
    assert distill.forward_kl(s, s).abs() < 1e-6  # and is zero between equal distributions


@pytest.mark.parametrize("beta", [0.0, 0.1, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("reduction", ["batchmean", "sum", "mean", "none"])
def test_generalized_jsd_equals_trl(beta, temperature, reduction):
    s, t = _logits(1)
    labels = torch.randint(0, 11, s.shape[:-1], generator=torch.Generator().manual_seed(2))
    labels[0, :2] = -100
    ref = _gkd()
    for lab in (None, labels):
        ours = distill.generalized_jsd(s, t, lab, beta=beta, temperature=temperature, reduction=reduction)
        theirs = ref(s, t, labels=lab, beta=beta, temperature=temperature, reduction=reduction)
        assert ours.shape == theirs.shape
        assert torch.allclose(ours, theirs, atol=1e-5, rtol=1e-5), (beta, temperature, reduction, lab is None)


def test_jsd_is_bounded_and_symmetric_at_half():
    s, t = _logits(3)
    j = distill.generalized_jsd(s, t, beta=0.5, reduction="none").sum(-1)
    assert (j >= -1e-6).all() and (j <= math.log(2) + 1e-6).all()  # JSD lies in [0, log 2]
    assert torch.allclose(distill.generalized_jsd(s, t, beta=0.5), distill.generalized_jsd(t, s, beta=0.5), atol=1e-6)


def test_distillation_loss_mixes_soft_and_hard():
    s, t = _logits(4)
    labels = torch.randint(0, 11, s.shape[:-1], generator=torch.Generator().manual_seed(5))
    ce = F.cross_entropy(s.reshape(-1, 11), labels.reshape(-1))
    T = 2.0
    kl = F.kl_div(F.log_softmax(s / T, -1).reshape(-1, 11), F.log_softmax(t / T, -1).reshape(-1, 11),
                  reduction="batchmean", log_target=True)  # per token: rows are tokens here
    assert torch.allclose(distill.distillation_loss(s, t, labels, T, alpha=0.0)["loss"], ce)
    assert torch.allclose(distill.distillation_loss(s, t, labels, T, alpha=1.0)["loss"], T**2 * kl, atol=1e-5)
    mixed = distill.distillation_loss(s, t, labels, T, alpha=0.3)
    assert torch.allclose(mixed["loss"], 0.3 * T**2 * kl + 0.7 * ce, atol=1e-5)
    # the soft term's gradient shrinks as 1/T^2; the T^2 factor restores its size
    grads = []
    for T in (1.0, 4.0):
        x = s.clone().requires_grad_(True)
        F.kl_div(F.log_softmax(x / T, -1), F.log_softmax(t / T, -1), log_target=True, reduction="sum").backward()
        grads.append(x.grad.norm().item())
    assert grads[1] < grads[0] / 4


def test_student_config_and_training_loop(course_model):
    model, tok = course_model
    cfg = distill.student_config(model.config, num_hidden_layers=1, hidden_size=64, intermediate_size=128,
                                 num_attention_heads=2, num_key_value_heads=1)
    assert (cfg.vocab_size, cfg.head_dim, cfg.num_hidden_layers) == (model.config.vocab_size, 32, 1)
    assert model.config.num_hidden_layers == 4  # the teacher's config is untouched
    from transformers import LlamaForCausalLM

    from llmlab import data, pretrain
    rows = pretrain.pack(data.corpus_split("train", 200), tok, 64)
    torch.manual_seed(0)
    a = LlamaForCausalLM(cfg)
    b = LlamaForCausalLM(cfg)
    b.load_state_dict(a.state_dict())
    ha = distill.distill(model, a, rows, steps=12, batch_size=4, alpha=0.5, progress=False)
    hb = distill.distill(None, b, rows, steps=12, batch_size=4, progress=False)
    assert ha["loss"][-1] < ha["loss"][0] and hb["loss"][-1] < hb["loss"][0]
    assert hb["soft"][0] is None and ha["soft"][0] > 0
    assert ha["hard"][0] == pytest.approx(hb["hard"][0])  # same init, same first batch
    # a prefix of a longer schedule is the start of that run, exactly
    torch.manual_seed(0)
    d, e = LlamaForCausalLM(cfg), LlamaForCausalLM(cfg)
    e.load_state_dict(d.state_dict())
    long = distill.distill(None, d, rows, steps=6, batch_size=4, schedule_steps=6, progress=False)
    short = distill.distill(None, e, rows, steps=3, batch_size=4, schedule_steps=6, progress=False)
    assert short["loss"] == long["loss"][:3]


def test_bad_inputs(course_model):
    model, _ = course_model
    s, t = _logits()
    with pytest.raises(ValueError):
        distill.forward_kl(s, t[..., :5])
    with pytest.raises(TypeError):
        distill.reverse_kl(s.tolist(), t)
    with pytest.raises(ValueError):
        distill.generalized_jsd(s, t, beta=1.5)
    with pytest.raises(ValueError):
        distill.forward_kl(s, t, temperature=0)
    with pytest.raises(ValueError):
        distill.forward_kl(s, t, reduction="avg")
    with pytest.raises(ValueError):
        distill.distillation_loss(s, t, torch.zeros(3, 5, dtype=torch.long), loss="mse")
    with pytest.raises(ValueError):
        distill.distillation_loss(s, t, torch.zeros(3, 4, dtype=torch.long))
    with pytest.raises(TypeError):
        distill.student_config({"hidden_size": 4})
    with pytest.raises(ValueError):
        distill.student_config(model.config, num_attention_heads=6, num_key_value_heads=4)
    with pytest.raises(ValueError):
        distill.distill(model, model, torch.zeros(4, 8), steps=1)
    with pytest.raises(TypeError):
        distill.distill(model, model, torch.zeros(4, 8, dtype=torch.long), steps=1.5)
    with pytest.raises(ValueError):
        distill.distill(None, model, torch.zeros(4, 8, dtype=torch.long), steps=4, schedule_steps=2)
    with pytest.raises(ValueError):
        distill.compare_students(0)
