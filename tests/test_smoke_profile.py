"""The smoke override (``LLMLAB_SMOKE=1``, llmlab.env): the gpu profile's code path
with the offline SmolLM2-135M and capped sizes, so a CPU can execute what a Colab
student runs (issue 15)."""
import pytest

from llmlab import env, models

SIZES = ("train_steps", "batch_size", "seq_len", "eval_examples", "max_new_tokens", "val_docs")


def test_off_by_default_and_gpu_unchanged(monkeypatch):
    monkeypatch.setenv("LLMLAB_PROFILE", "gpu")
    for value in (None, "", "0", " 0 "):
        if value is None:
            monkeypatch.delenv("LLMLAB_SMOKE", raising=False)
        else:
            monkeypatch.setenv("LLMLAB_SMOKE", value)
        assert not env.smoke_enabled()
        assert env.get_profile() is env.PROFILES["gpu"]
        assert env.get_profile("gpu") is env.PROFILES["gpu"]


def test_smoke_gpu_profile(monkeypatch):
    monkeypatch.setenv("LLMLAB_PROFILE", "gpu")
    monkeypatch.setenv("LLMLAB_SMOKE", "1")
    gpu, p = env.PROFILES["gpu"], env.get_profile()
    assert env.smoke_enabled() and p == env.get_profile("gpu")
    # the same branches: the name stays "gpu", and so do the dtype and memory table
    assert p.name == "gpu" and p.dtype == gpu.dtype and p.labs_gpu_gb == gpu.labs_gpu_gb
    # the model ids: the offline real model, which llmlab.models resolves locally
    assert p.base_model == p.sft_model == env.SMOKE_MODEL
    assert env.SMOKE_MODEL in models.OFFLINE_MODELS
    assert models.OFFLINE_MODELS[env.SMOKE_MODEL]["hub_id"].startswith(
        "HuggingFaceTB/SmolLM2-"
    )
    assert p.offline and not gpu.offline
    for k in SIZES:  # capped, never raised
        assert getattr(p, k) == min(getattr(gpu, k), env.SMOKE_SIZES[k])
        assert 1 <= getattr(p, k) <= getattr(gpu, k)
    # the labs' derived step counts stay positive (lab 2: 3/5, lab 3's alignment: 3/10)
    assert p.train_steps * 3 // 10 >= 1
    # nothing else differs from the gpu profile
    fields = env.Profile.__dataclass_fields__
    changed = {k for k in fields if getattr(p, k) != getattr(gpu, k)}
    assert changed <= {"base_model", "sft_model", "offline", *SIZES}
    assert env.PROFILES["gpu"] is gpu and gpu.base_model.startswith("HuggingFaceTB/")


def test_cpu_profile_ignores_smoke(monkeypatch):
    monkeypatch.setenv("LLMLAB_PROFILE", "cpu")
    monkeypatch.setenv("LLMLAB_SMOKE", "1")
    assert env.get_profile() is env.PROFILES["cpu"]


def test_setup_names_the_override(monkeypatch, capsys):
    # these import torch, transformers and matplotlib (seconds); not under test here
    seeded = []
    monkeypatch.setattr(env, "set_seed", lambda seed, threads: seeded.append(threads))
    monkeypatch.setattr(env, "use_book_style", lambda: None)
    monkeypatch.setattr(env, "_quiet_loading", lambda: None)
    monkeypatch.setattr(env, "has_cuda", lambda: False)
    monkeypatch.delenv("DS_ACCELERATOR", raising=False)  # setup sets it without CUDA
    monkeypatch.setenv("LLMLAB_SMOKE", "1")
    for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(v, raising=False)
    monkeypatch.setenv("LLMLAB_PROFILE", "gpu")
    p = env.setup(profile="gpu")
    out = capsys.readouterr().out
    assert p.name == "gpu" and env.is_offline()
    assert f"base model: {env.SMOKE_MODEL}" in out and "smoke: LLMLAB_SMOKE=1" in out
    assert seeded == [1], "one thread on a CPU, as the cpu profile"
    monkeypatch.setenv("LLMLAB_SMOKE", "0")
    monkeypatch.setenv("LLMLAB_PROFILE", "cpu")
    env.setup(profile="cpu")
    assert "smoke" not in capsys.readouterr().out


def test_bad_values(monkeypatch):
    monkeypatch.setenv("LLMLAB_PROFILE", "gpu")
    for value in ("yes", "true", "2", "on"):
        monkeypatch.setenv("LLMLAB_SMOKE", value)
        with pytest.raises(ValueError, match="LLMLAB_SMOKE"):
            env.get_profile()
    with pytest.raises(TypeError):
        env.smoke_profile("gpu")
