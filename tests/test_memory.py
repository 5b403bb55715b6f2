import pytest
import torch

from llmlab import memory as M


def test_rule_of_thumb_reproduces_the_notes_examples():
    assert M.estimate_inference_memory(7e9, 16) == pytest.approx(16.8)
    assert M.estimate_inference_memory(7e9, 8) == pytest.approx(8.4)
    # the formula is just P * Q / 8 bytes plus overhead
    assert M.estimate_inference_memory(1e9, 4, overhead=0) == pytest.approx(0.5)


@pytest.mark.parametrize("args, err", [
    ((-7e9, 16), ValueError), ((0, 16), ValueError), ((7e9, 7), ValueError), ((7e9, 1), ValueError),
    (("7B", 16), TypeError), ((7e9, "16"), TypeError), ((7e9, True), TypeError), ((7e9, 16, -0.1), ValueError),
    ((float("nan"), 16), ValueError), ((float("inf"), 16), ValueError),
])
def test_rule_of_thumb_rejects_bad_input(args, err):
    with pytest.raises(err):
        M.estimate_inference_memory(*args)


def _tiny(layers=2, hidden=256, inter=768, heads=8, kv=2, vocab=768):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter,
                                        num_hidden_layers=layers, num_attention_heads=heads,
                                        num_key_value_heads=kv))


@pytest.mark.parametrize("cfg, batch, seq, ckpt", [
    (dict(), 2, 128, False), (dict(layers=3, hidden=512, inter=1024), 1, 64, False), (dict(), 2, 128, True)])
def test_training_estimate_matches_a_measured_step(cfg, batch, seq, ckpt):
    model = _tiny(**cfg)
    if ckpt:
        model.gradient_checkpointing_enable()
    n = sum(p.numel() for p in model.parameters())
    x = torch.randint(0, 768, (batch, seq))
    measured = M.measure_training_step(model, x, torch.optim.AdamW(model.parameters()))
    est = M.estimate_training_memory(n, M.Shape.of(model), batch, seq, checkpointing=ckpt)
    assert est.weights == pytest.approx(measured.weights, rel=1e-3)
    assert est.gradients == pytest.approx(measured.gradients, rel=1e-3)
    assert est.optimizer == pytest.approx(measured.optimizer, rel=1e-3)
    assert est.activations == pytest.approx(measured.activations, rel=0.1)


def test_lora_and_8bit_optimizer_estimates():
    full = M.estimate_training_memory(7e9, optimizer="adamw")
    assert full.gb()["weights"] == pytest.approx(28) and full.gb()["optimizer"] == pytest.approx(56)
    qlora = M.estimate_training_memory(7e9, weight_bits=4, trainable_params=20e6)
    assert qlora.gb()["total"] < 4 < full.gb()["total"]
    assert M.estimate_training_memory(7e9, optimizer="adamw_8bit").optimizer == pytest.approx(14e9)
    with pytest.raises(ValueError):
        M.estimate_training_memory(7e9, optimizer="lion")
    with pytest.raises(ValueError):
        M.estimate_training_memory(7e9, trainable_params=8e9)
    with pytest.raises(TypeError):
        M.estimate_training_memory(7e9, shape={"hidden": 4096})
    with pytest.raises(TypeError):
        M.estimate_training_memory(7e9, batch_size="x")
    with pytest.raises(ValueError, match="full training"):
        M.estimate_training_memory(7e9, weight_bits=4)
    with pytest.raises(ValueError):
        M.optimizer_bytes_per_param("adafactor", hidden=0)


def test_kv_cache_matches_transformers_cache():
    model = _tiny(layers=2)
    x = torch.randint(0, 768, (3, 40))
    with torch.no_grad():
        cache = model(input_ids=x, use_cache=True).past_key_values
    measured = sum(layer.keys.numel() * layer.keys.element_size() + layer.values.numel() * layer.values.element_size()
                   for layer in cache.layers)
    est = M.kv_cache_bytes(n_layers=2, n_kv_heads=2, head_dim=32, seq_len=40, batch_size=3, bits=32)
    assert est == measured
    with pytest.raises(ValueError):
        M.kv_cache_bytes(2, 2, 32, 0)


def test_fits():
    # Colab's T4 as CUDA reports it: 15,828,320,256 bytes = 15095 MiB = 14.74 GiB, not 15 GiB
    assert M.GPUS["T4"] == 15_828_320_256 / 1e9
    assert 14.7 < M.GPUS["T4"] * 1e9 / 2**30 < 14.75 and int(M.GPUS["T4"] * 1e9) // 2**20 == 15095
    assert M.usable_gb("T4") == pytest.approx(M.GPUS["T4"] - M.CUDA_CONTEXT_GB)
    assert 0.3 <= M.CUDA_CONTEXT_GB <= 0.6
    # the context reserve decides near the edge: 15.6 GB (a 13B model at 8 bits, rule of thumb) fit in 15 GiB,
    # but not in what is left of a T4 after the CUDA context
    assert M.fits(15.6, 15 * 2**30 / 1e9) and not M.fits(15.6, "T4")
    assert M.fits(15.3, "T4") and "CUDA context" in M.fits(15.3, "T4").reason
    assert M.fits(15.8, 15.83).available_gb == 15.83  # a number is taken as given, no reserve
    with pytest.raises(TypeError):
        M.usable_gb(16)
    with pytest.raises(ValueError):
        M.usable_gb("T5")
    assert not M.fits(16.8, "T4") and "short" in M.fits(16.8, "T4").reason
    with pytest.raises(ValueError):
        M.fits(float("nan"), "T4")
    assert M.fits(8.4, "T4") and "spare" in M.fits(8.4, "T4").reason
    assert M.fits(30, 40).ok
    with pytest.raises(ValueError):
        M.fits(1, "TPU")
    with pytest.raises(TypeError):
        M.fits("8", "T4")


def test_serving_peak_is_measured_in_a_fresh_process():
    from llmlab.models import COURSE_MODEL_DIR

    r = M.measure_serving_peak(COURSE_MODEL_DIR, batch_size=2, new_tokens=8)
    weights = (COURSE_MODEL_DIR / "model.safetensors").stat().st_size
    assert r["baseline"] < r["after_load"] <= r["peak"]
    assert r["after_load"] - r["baseline"] > 0.9 * weights  # the weights, at least, were loaded
    with pytest.raises(ValueError):
        M.measure_serving_peak(COURSE_MODEL_DIR / "missing")
    with pytest.raises(ValueError):
        M.measure_serving_peak(COURSE_MODEL_DIR, dtype="int3")


def test_serialized_size_sees_dynamic_quantization():
    """torch's dynamic int8 packs Linear weights where parameters() cannot see them; the saved size can."""
    import copy

    model = _tiny(layers=2)
    q = torch.ao.quantization.quantize_dynamic(copy.deepcopy(model), {torch.nn.Linear}, dtype=torch.qint8)
    full, packed = M.serialized_bytes(model), M.serialized_bytes(q)
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    assert full - packed == pytest.approx(linear * 3, rel=0.05)  # 4 bytes -> 1 byte per Linear weight
    assert full == pytest.approx(M.model_bytes(model), rel=0.02)
    with pytest.raises(TypeError):
        M.serialized_bytes("model")


def test_file_bytes_of_a_saved_model(tmp_path):
    model = _tiny(layers=2)
    model.save_pretrained(tmp_path / "m")
    weights = (tmp_path / "m" / "model.safetensors").stat().st_size
    total = M.file_bytes(tmp_path / "m")
    assert total > weights >= M.model_bytes(model) and M.file_bytes(tmp_path / "m" / "model.safetensors") == weights
    with pytest.raises(ValueError, match="no file or folder"):
        M.file_bytes(tmp_path / "missing")
    with pytest.raises(TypeError, match="path must be"):
        M.file_bytes(3)


def test_held_bytes_counts_a_training_stage_and_release_frees_it():
    """What lab 3 prints after each stage: the model, its gradients and AdamW's two moments are
    4 x the weights (as estimate_training_memory counts them); freed, they are gone."""
    before = M.release()
    model = _tiny(layers=2)
    view = next(model.parameters())[:1]  # a view shares its storage: counted once
    weights = M.model_bytes(model)
    assert M.held_bytes() - before == pytest.approx(weights, rel=1e-2)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.tensor([[1, 2, 3]])).logits.sum().backward()
    opt.step()
    # weights, gradients, two moments (the buffers get none; AdamW adds a step count per tensor)
    # (1 %: whatever else the process creates meanwhile, such as caches made on a first call)
    assert M.held_bytes() - before == pytest.approx(4 * weights, rel=1e-2)
    del model, opt, view
    assert M.release() - before < 0.01 * weights
    for bad in ("gpu", "cuda:0", None):
        with pytest.raises(ValueError, match="device must be"):
            M.held_bytes(bad)
        with pytest.raises(ValueError, match="device must be"):
            M.release(bad)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA GPU"):
            M.held_bytes("cuda")


def test_stage_memory_records_each_stage_and_what_freeing_leaves():
    M.release()
    stages = M.StageMemory("cpu")
    start = M.held_bytes() / 1e6
    model = _tiny(layers=2)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.tensor([[1, 2, 3]])).logits.sum().backward()
    opt.step()
    mb = M.model_bytes(model) / 1e6
    row = stages.end("train")
    assert row["held at the end MB"] - start == pytest.approx(4 * mb, rel=1e-2) and row["held once freed MB"] is None
    with pytest.raises(RuntimeError, match="was not freed"):
        stages.end("next")
    del opt  # the model stays for the next stage, its optimizer state and gradients go
    model.zero_grad(set_to_none=True)
    assert stages.freed()["held once freed MB"] - start == pytest.approx(mb, rel=1e-2)
    with pytest.raises(RuntimeError, match="before freed"):
        stages.freed()
    assert [r["stage"] for r in stages.rows] == ["train"] and "CUDA peak MB" not in stages.rows[0]
    for bad in ("", "  ", None, 3):
        with pytest.raises(ValueError, match="stage must be"):
            stages.end(bad)
    with pytest.raises(ValueError, match="device must be"):
        M.StageMemory("gpu")
