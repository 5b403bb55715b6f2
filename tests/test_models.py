import json
import socket

import pytest
import torch

from llmlab import env, models
from llmlab.env import COURSE_MODEL


def test_course_model_shape_and_size():
    card = models.course_model_card()
    cfg = __import__("json").loads((models.COURSE_MODEL_DIR / "config.json").read_text())
    assert cfg["model_type"] == "llama" and cfg["num_key_value_heads"] < cfg["num_attention_heads"]
    for k in ("hidden_size", "intermediate_size", "vocab_size"):
        assert cfg[k] % 256 == 0
    size = (models.COURSE_MODEL_DIR / "model.safetensors").stat().st_size
    assert size <= 25e6
    assert card["n_params"] * 4 <= size <= card["n_params"] * 4 + 100_000  # fp32 weights + header


def test_load_by_name_and_by_path(course_model):
    model, tok = course_model
    assert model.config.model_type == "llama" and tok.eos_token == "<|endoftext|>"
    again, _ = models.load(models.COURSE_MODEL_DIR)
    for (n, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), n


@pytest.mark.slow
def test_card_validation_loss_is_reproduced(course_model):
    from llmlab.pretrain import Recipe, evaluate, validation_rows

    model, tok = course_model
    card = models.course_model_card()
    torch.set_num_threads(2)
    loss = evaluate(model, validation_rows(tok, Recipe(**card["recipe"])))
    assert loss == pytest.approx(card["val_loss"], abs=2e-3)


def test_course_model_writes_its_world(course_model):
    from llmlab.pretrain import sample

    model, tok = course_model
    text = sample(model, tok, "Mia has a", max_new_tokens=40)
    assert text.startswith("Mia has a") and "." in text[10:]
    assert sample(model, tok, "3 plus 4 is", max_new_tokens=3).startswith("3 plus 4 is 7")


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a network connection fails the test."""
    attempts = []

    def guard(*a, **k):
        attempts.append(a)
        raise AssertionError(f"network access attempted: {a}")

    monkeypatch.setattr(socket.socket, "connect", guard)
    monkeypatch.setattr(socket, "create_connection", guard)
    return attempts


def test_cpu_profile_tries_no_download(no_network, capsys, monkeypatch):
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)  # the profile itself must switch the network off
    env.setup(profile="cpu", quiet=True)
    assert env.is_offline()
    model, _ = models.load()  # the profile's base model: the course model
    assert model.config.model_type == "llama"
    model, _ = models.load("HuggingFaceTB/SmolLM2-360M-Instruct")  # a hub id offline: falls back
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and "using the course model" in out[0] and "Traceback" not in out[0]
    assert no_network == []


def test_hub_failure_falls_back_with_one_line(monkeypatch, capsys):
    """Online but unreachable (the connection fails): still one line and the course model."""
    env.set_offline(False)
    try:
        def refuse(*a, **k):
            raise OSError("connection refused (test)")
        monkeypatch.setattr(socket, "create_connection", refuse)
        monkeypatch.setattr(socket.socket, "connect", refuse)
        model, tok = models.load("someone/not-a-model")
    finally:
        env.set_offline(True)
    captured = capsys.readouterr()
    lines = captured.out.strip().splitlines()
    assert len(lines) == 1 and "someone/not-a-model" in lines[0]
    assert "Retrying" not in captured.err and "Traceback" not in captured.err
    assert model.config.model_type == "llama"


def test_bad_inputs(tmp_path):
    with pytest.raises(TypeError):
        models.load(42)
    with pytest.raises(ValueError):
        models.load("")
    with pytest.raises(ValueError):
        models.load(str(tmp_path / "missing" / "model"))
    with pytest.raises(ValueError):
        models.load(COURSE_MODEL, dtype="float13")
    with pytest.raises(TypeError):
        models.count_parameters("model")


def test_offline_models_are_known_by_name_and_say_how_to_fetch_them(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMLAB_CACHE", str(tmp_path))
    with pytest.raises(ValueError, match="known: \\['smollm2-135m-instruct'\\]"):
        models.offline_model_dir("smollm2-1.7b")
    with pytest.raises(TypeError):
        models.offline_model_dir(135)
    assert not models.is_cached("smollm2-135m-instruct")
    with pytest.raises(FileNotFoundError, match="`make smollm2` \\(or `python -m llmlab.models fetch"):
        models.load("smollm2-135m-instruct")


def test_smollm2_stand_in_is_smollm2():
    """The cached stand-in (make smollm2): SmolLM2's tokenizer, ChatML template and 134.5M parameters."""
    if not models.is_cached("smollm2-135m-instruct"):
        pytest.skip("SmolLM2-135M is not cached here: `make smollm2` fetches it")
    folder = models.offline_model_dir("smollm2-135m-instruct")
    config = json.loads((folder / "config.json").read_text())
    assert (config["num_hidden_layers"], config["num_attention_heads"], config["num_key_value_heads"]) == (30, 9, 3)
    assert config["tie_word_embeddings"] is True
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    assert len(tok) == 49152
    chat = tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False)
    assert "<|im_start|>user\nHi<|im_end|>" in chat
    provenance = json.loads((folder / "provenance.json").read_text())
    assert provenance["n_params"] == 134_515_008 and "Q4_1" in provenance["note"]


def test_default_dtype_is_the_profiles_where_the_hardware_has_it(monkeypatch):
    """The gpu profile's bfloat16 only where bf16 is native: float16 on a T4, float32 on a CPU (the smoke run
    of the gpu path on this CPU, which bf16 would slow several times)."""
    import torch

    from llmlab import env, models

    monkeypatch.setenv("LLMLAB_PROFILE", "cpu")
    assert models.default_dtype() == torch.float32
    monkeypatch.setenv("LLMLAB_PROFILE", "gpu")
    for cuda, native, want in ((False, False, torch.float32), (True, False, torch.float16),
                               (True, True, torch.bfloat16)):
        monkeypatch.setattr(env, "has_cuda", lambda cuda=cuda: cuda)
        monkeypatch.setattr(env, "bf16_supported", lambda native=native: native)
        assert models.default_dtype() == want, (cuda, native)
