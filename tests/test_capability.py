"""llmlab.env's capability checks (issue 15): bf16, int4 and vLLM on a CPU and on
simulated GPUs. torch.cuda is patched to report each GPU's compute capability; a T4
reports bf16 as supported only when emulation counts, as the real torch does."""
import sys
import types
from contextlib import contextmanager
from unittest import mock

import pytest
import torch

from llmlab import env

GPUS = {"V100": (7, 0), "T4": (7, 5), "A100": (8, 0), "L4": (8, 9), "H100": (9, 0)}


@contextmanager
def gpu(name):
    capability = GPUS[name]

    def is_bf16_supported(including_emulation=True):
        # torch: native from sm80; below, True only through an emulation probe
        return capability >= (8, 0) or including_emulation

    with mock.patch("torch.cuda.is_available", return_value=True), \
         mock.patch("torch.cuda.get_device_capability", return_value=capability), \
         mock.patch("torch.cuda.is_bf16_supported", side_effect=is_bf16_supported):
        yield


@contextmanager
def vllm_installed(installed=True):
    fake = types.ModuleType("vllm")
    fake.__version__ = "0.21.0"
    with mock.patch.dict(sys.modules, {"vllm": fake if installed else None}):
        yield


def test_the_torch_keyword_exists():
    import inspect

    assert "including_emulation" in inspect.signature(
        torch.cuda.is_bf16_supported).parameters


def test_on_a_cpu_everything_says_no_with_a_reason():
    with mock.patch("torch.cuda.is_available", return_value=False):
        assert env.cuda_capability() is None
        assert env.bf16_supported() is False
        assert env.train_dtype() is torch.float32
        for fmt in env.INT4_MIN_CAPABILITY:
            ok, why = env.int4_weight_only_supported(fmt)
            assert not ok and "needs a CUDA GPU" in why and "\n" not in why
        with vllm_installed():
            ok, why = env.vllm_supported()
        assert not ok and why == "vLLM needs a CUDA GPU; there is none here"
    if not torch.cuda.is_available():  # this machine, unpatched (CI has no GPU)
        assert not env.bf16_supported() and not env.vllm_supported()[0]
        assert not env.int4_weight_only_supported()[0]


def test_t4_emulates_bf16_so_it_trains_in_fp16():
    with gpu("T4"):
        assert torch.cuda.is_bf16_supported()  # the trap: True through emulation
        assert env.cuda_capability() == (7, 5)
        assert env.bf16_supported() is False
        assert env.train_dtype() is torch.float16
        ok, why = env.int4_weight_only_supported()
        assert not ok and why == ("torchao int4 weight-only (plain) needs compute "
                                  "capability 9.0 or higher; this GPU has compute "
                                  "capability 7.5")
        ok, why = env.int4_weight_only_supported("tile_packed_to_4d")
        assert not ok and "8.0 or higher" in why
        with vllm_installed():
            assert env.vllm_supported() == (
                True, "vLLM 0.21.0 runs here (compute capability 7.5)")
        with vllm_installed(False):
            assert env.vllm_supported() == (
                False, "vLLM is not installed (pip install vllm)")


@pytest.mark.parametrize("name", ["A100", "L4"])
def test_ampere_and_ada_bf16_and_tinygemm_int4_but_not_plain(name):
    with gpu(name):
        assert env.bf16_supported() is True
        assert env.train_dtype() is torch.bfloat16
        assert env.int4_weight_only_supported("tile_packed_to_4d")[0]
        ok, why = env.int4_weight_only_supported()
        assert not ok and "9.0 or higher" in why
        with vllm_installed():
            assert env.vllm_supported()[0]


def test_h100_plain_int4_needs_mslk():
    with gpu("H100"):
        with mock.patch.dict(sys.modules, {"mslk": None}):  # not installed
            ok, why = env.int4_weight_only_supported()
        assert not ok and why == ("torchao int4 weight-only (plain): the mslk package "
                                  "(torchao's int4 kernels) is not installed")
        with mock.patch.object(env, "_mslk_int4_kernels", return_value=(True, "")):
            assert env.int4_weight_only_supported() == (
                True, ("torchao int4 weight-only (plain) runs here "
                       "(compute capability 9.0)"))


def test_v100_is_below_vllms_minimum():
    with gpu("V100"), vllm_installed():
        ok, why = env.vllm_supported()
    assert not ok and why == ("vLLM needs compute capability 7.5 or higher; this GPU "
                              "has compute capability 7.0")


def test_bad_packing_format_raises():
    with pytest.raises(TypeError, match="packing_format must be a str"):
        env.int4_weight_only_supported(4)
    with pytest.raises(ValueError, match="unknown int4 packing format 'int4'; choose "
                                         "one of \\['plain', 'tile_packed_to_4d'\\]"):
        env.int4_weight_only_supported("int4")
