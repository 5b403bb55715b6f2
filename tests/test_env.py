import os
import subprocess
import sys
from pathlib import Path

import pytest

from llmlab import env


def test_profile_choice_and_override(monkeypatch):
    monkeypatch.setenv("LLMLAB_PROFILE", "gpu")
    assert env.get_profile().name == "gpu"
    monkeypatch.delenv("LLMLAB_PROFILE")
    assert env.profile_name() == ("gpu" if env.has_cuda() else "cpu")
    monkeypatch.setenv("LLMLAB_PROFILE", "tpu")
    with pytest.raises(ValueError, match="not a profile"):
        env.get_profile()


def test_profiles_hold_the_same_settings():
    cpu, gpu = env.PROFILES["cpu"], env.PROFILES["gpu"]
    assert cpu.base_model == env.COURSE_MODEL and cpu.offline
    assert gpu.train_steps > cpu.train_steps and gpu.eval_examples > cpu.eval_examples
    with pytest.raises(ValueError):
        env.with_overrides(cpu, nonsense=1)
    assert env.with_overrides(cpu, train_steps=3).train_steps == 3
    labs = {p.stem for p in (Path(__file__).resolve().parent.parent / "labs").glob("*.ipynb")}
    assert set(gpu.labs_gpu_gb) == labs, "every lab states the GPU memory its gpu profile needs"
    # a T4 as CUDA reports it (14.74 GiB), less the CUDA context: every lab's gpu profile fits
    from llmlab import memory

    assert max(gpu.labs_gpu_gb.values()) <= memory.usable_gb("T4") < 15.4


def test_setup_goes_offline_and_is_reproducible(monkeypatch, capsys):
    import torch

    for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(v, raising=False)
    p = env.setup(seed=7, profile="cpu")
    assert p.name == "cpu" and env.is_offline() and torch.get_num_threads() == 1
    assert "profile: cpu" in capsys.readouterr().out
    a = torch.rand(3)
    env.setup(seed=7, profile="cpu", quiet=True)
    assert torch.equal(a, torch.rand(3))


def test_bad_inputs():
    with pytest.raises(TypeError):
        env.set_seed("1")
    with pytest.raises(ValueError):
        env.set_seed(1, threads=0)
    with pytest.raises(ValueError):
        env.get_profile("tpu")
    with pytest.raises(TypeError):
        env.get_profile(3)
    with pytest.raises(TypeError):
        env.with_overrides(env.PROFILES["cpu"], train_steps="many")


def test_doctor_console_script():
    exe = Path(sys.executable).with_name("llmlab")
    out = subprocess.run([str(exe), "doctor"], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "LLMLAB_PROFILE": "cpu"})
    assert out.returncode == 0, out.stderr
    for word in ("torch", "transformers", "device", "profile         cpu", "offline", "lab 00_course_loop"):
        assert word in out.stdout
    bad = subprocess.run([str(exe), "nonsense"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "usage" in bad.stderr
