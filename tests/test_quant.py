"""llmlab.quant against the libraries it explains: torch's quantized tensors (int8 / uint8) and bitsandbytes (NF4)."""
import math

import pytest
import torch

from llmlab import quant as Q

# torch.quantize_per_tensor / _per_channel still work but warn that quantized dtypes are deprecated
pytestmark = pytest.mark.filterwarnings("ignore:torch.quantize_per_tensor:UserWarning")


def _randn(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def _assert_matches_torch(q, ref, x, scale, zero_point=0):
    """``q == ref`` except where ``x / scale`` lies within float32 rounding of a .5 tie.

    We divide by the scale; PyTorch multiplies by ``1 / scale`` (and adds the zero point in a fused multiply-add),
    which can differ in the last bit and so flip a value sitting right on a tie. Those are the only differences
    allowed: off by one, at a near-tie, and at most a few per million elements.
    """
    diff = q.to(torch.int32) != ref.to(torch.int32)
    if diff.any():
        t = (x.double() / scale.double() + zero_point)[diff]
        assert ((q.to(torch.int32) - ref.to(torch.int32))[diff].abs() == 1).all()
        assert ((t - t.floor() - 0.5).abs() < 1e-4).all(), "a mismatch that is not a rounding tie"
        assert diff.sum().item() <= max(1, 5e-6 * q.numel())


# ------------------------------------------------------------------ absmax --

def test_absmax_per_tensor_matches_torch_qint8():
    x = _randn(512, 256) * 3
    q, scale = Q.absmax_quantize(x)
    assert q.dtype == torch.int8 and q.shape == x.shape and scale.shape == ()
    assert scale.item() == pytest.approx(x.abs().max().item() / 127)
    ref = torch.quantize_per_tensor(x, scale.item(), 0, torch.qint8)
    _assert_matches_torch(q, ref.int_repr(), x, scale)
    torch.testing.assert_close(Q.dequantize(q, scale), ref.dequantize(), rtol=0, atol=scale.item() * 1.01)
    assert q.abs().max() == 127  # the absmax element lands on the end of the grid


def test_rounding_is_half_to_even_like_torch():
    x = torch.tensor([-2.5, -1.5, -0.5, 0.5, 1.5, 2.5, 127.0])  # scale is exactly 1: every value a tie
    q, scale = Q.absmax_quantize(x)
    assert scale.item() == 1.0
    assert q.tolist() == [-2, -2, 0, 0, 2, 2, 127]
    assert torch.equal(q, torch.quantize_per_tensor(x, 1.0, 0, torch.qint8).int_repr())


@pytest.mark.parametrize("axis", [0, 1, -1])
def test_absmax_per_channel_matches_torch(axis):
    x = _randn(96, 160, seed=1) * torch.linspace(0.1, 5, 160)  # columns of very different ranges
    q, scale = Q.absmax_quantize(x, axis=axis)
    keep = [1, 1]
    keep[axis] = x.shape[axis]
    assert list(scale.shape) == keep
    zeros = torch.zeros(x.shape[axis], dtype=torch.long)
    ref = torch.quantize_per_channel(x, scale.reshape(-1).double(), zeros, axis % 2, torch.qint8)
    _assert_matches_torch(q, ref.int_repr(), x, scale)
    torch.testing.assert_close(Q.dequantize(q, scale), ref.dequantize())


def test_per_channel_beats_per_tensor_on_uneven_channels():
    x = _randn(64, 128, seed=2) * torch.logspace(-2, 1, 128)
    per_tensor = Q.quantization_error(x, Q.dequantize(*Q.absmax_quantize(x)))
    per_channel = Q.quantization_error(x, Q.dequantize(*Q.absmax_quantize(x, axis=1)))
    assert per_channel["snr_db"] > per_tensor["snr_db"] + 3


@pytest.mark.parametrize("blocksize", [32, 64, 256])
def test_absmax_per_block_is_per_channel_on_the_blocks(blocksize):
    x = _randn(16, 128, seed=3)
    q, scale = Q.absmax_quantize(x, blocksize=blocksize)
    assert q.shape == x.shape and scale.shape == (x.numel() // blocksize, 1)
    blocks = x.reshape(-1, blocksize)
    torch.testing.assert_close(scale, blocks.abs().amax(dim=1, keepdim=True) / 127, rtol=0, atol=0)
    ref = torch.quantize_per_channel(blocks, scale.reshape(-1).double(), torch.zeros(len(scale), dtype=torch.long),
                                     0, torch.qint8)
    _assert_matches_torch(q.reshape(-1, blocksize), ref.int_repr(), blocks, scale)
    x_hat = Q.dequantize(q, scale, blocksize=blocksize)
    assert x_hat.shape == x.shape
    torch.testing.assert_close(x_hat, ref.dequantize().reshape(x.shape))
    assert Q.dequantize(q.reshape(-1), scale, blocksize=blocksize, shape=(16, 128)).shape == (16, 128)


@pytest.mark.parametrize("bits", Q.BITS)
def test_round_trip_error_is_at_most_half_a_step(bits):
    x = _randn(32, 64, seed=bits)
    for axis, blocksize in ((None, None), (0, None), (None, 64)):
        q, scale = Q.absmax_quantize(x, bits, axis, blocksize)
        qmax = 2 ** (bits - 1) - 1
        assert -qmax <= q.min() and q.max() <= qmax and q.abs().max() == qmax
        err = (x - Q.dequantize(q, scale, blocksize=blocksize)).abs()
        step = scale if blocksize is None else scale.expand(-1, blocksize).reshape(x.shape)
        assert (err <= step / 2 * (1 + 1e-5)).all()
        q, scale, zp = Q.zeropoint_quantize(x, bits, axis, blocksize)
        assert q.max() <= 2 ** bits - 1
        err = (x - Q.dequantize(q, scale, zp, blocksize=blocksize)).abs()
        step = scale if blocksize is None else scale.expand(-1, blocksize).reshape(x.shape)
        assert (err <= step / 2 * (1 + 1e-5)).all()


def test_about_six_db_per_bit():
    x = _randn(256, 256, seed=4)
    snr = {b: Q.quantization_error(x, Q.dequantize(*Q.absmax_quantize(x, b)))["snr_db"] for b in (4, 8)}
    assert 4 * 6.02 - 3 < snr[8] - snr[4] < 4 * 6.02 + 3


def test_all_zero_input_and_zero_channels():
    z = torch.zeros(4, 8)
    q, scale = Q.absmax_quantize(z)
    assert scale.item() == 0 and not q.any() and torch.equal(Q.dequantize(q, scale), z)
    q, scale, zp = Q.zeropoint_quantize(z)
    assert scale.item() == 0 and zp.item() == 0 and torch.equal(Q.dequantize(q, scale, zp), z)
    x = _randn(4, 8)
    x[2] = 0  # one all-zero row among normal ones
    for blocksize in (None, 8):
        q, scale = Q.absmax_quantize(x, axis=None if blocksize else 0, blocksize=blocksize)
        x_hat = Q.dequantize(q, scale, blocksize=blocksize)
        assert torch.isfinite(x_hat).all() and not x_hat[2].any()
        q, scale, zp = Q.zeropoint_quantize(x, axis=None if blocksize else 0, blocksize=blocksize)
        x_hat = Q.dequantize(q, scale, zp, blocksize=blocksize)
        assert torch.isfinite(x_hat).all() and not x_hat[2].any()


def test_low_precision_inputs_are_quantized_in_float32():
    x = _randn(64, 64, seed=5)
    for dtype in (torch.bfloat16, torch.float16):
        q, scale = Q.absmax_quantize(x.to(dtype))
        ref_q, ref_scale = Q.absmax_quantize(x.to(dtype).float())
        assert scale.dtype == torch.float32 and torch.equal(q, ref_q) and torch.equal(scale, ref_scale)


# --------------------------------------------------------------- zero-point --

def test_zeropoint_per_tensor_matches_torch_quint8():
    x = torch.rand(512, 256, generator=torch.Generator().manual_seed(6)) * 3 - 0.7  # lopsided: [-0.7, 2.3]
    q, scale, zp = Q.zeropoint_quantize(x)
    assert q.dtype == torch.uint8 and zp.dtype == torch.int32 and q.min() == 0 and q.max() == 255
    assert scale.item() == pytest.approx((x.max() - x.min()).item() / 255)
    assert zp.item() == round(-x.min().item() / scale.item())
    ref = torch.quantize_per_tensor(x, scale.item(), zp.item(), torch.quint8)
    _assert_matches_torch(q, ref.int_repr(), x, scale, zp.item())
    torch.testing.assert_close(Q.dequantize(q, scale, zp), ref.dequantize(), rtol=0, atol=scale.item() * 1.01)
    # on lopsided data the asymmetric grid wastes no codes: about twice the resolution of absmax
    sym = Q.quantization_error(x, Q.dequantize(*Q.absmax_quantize(x)))["rel_rms"]
    assert Q.quantization_error(x, Q.dequantize(q, scale, zp))["rel_rms"] < 0.7 * sym


def test_zeropoint_rounds_after_shifting_like_torch():
    x = torch.tensor([-1.0, 0.5, 1.5, 2.5, 254.0])  # scale 1, zero point 1: ties at 1.5, 2.5, 3.5
    q, scale, zp = Q.zeropoint_quantize(x)
    assert scale.item() == 1.0 and zp.item() == 1
    assert q.tolist() == [0, 2, 2, 4, 255]
    assert torch.equal(q, torch.quantize_per_tensor(x, 1.0, 1, torch.quint8).int_repr())


def test_zeropoint_range_always_includes_zero():
    u = torch.rand(100, generator=torch.Generator().manual_seed(7)) + 1  # in [1, 2]: no zero in the data
    for x, zero_point in ((u, 0), (-u, 255)):  # all positive: the grid starts at 0; all negative: it ends there
        q, scale, zp = Q.zeropoint_quantize(x)
        assert zp.item() == zero_point and scale.item() == pytest.approx(u.max().item() / 255)
    x = u - 1.3  # both signs: 0 still lands exactly on an integer
    q, scale, zp = Q.zeropoint_quantize(x)
    assert 0 < zp.item() < 255 and scale.item() == pytest.approx((x.max() - x.min()).item() / 255)
    assert Q.dequantize(zp.to(torch.uint8), scale, zp).item() == 0.0


def test_zeropoint_per_channel_matches_torch():
    x = _randn(64, 96, seed=9) * torch.linspace(0.5, 4, 96) + torch.linspace(-2, 2, 96)
    q, scale, zp = Q.zeropoint_quantize(x, axis=1)
    assert scale.shape == zp.shape == (1, 96)
    ref = torch.quantize_per_channel(x, scale.reshape(-1).double(), zp.reshape(-1).long(), 1, torch.quint8)
    _assert_matches_torch(q, ref.int_repr(), x, scale, zp)
    torch.testing.assert_close(Q.dequantize(q, scale, zp), ref.dequantize())


# ----------------------------------------------------------------------- NF4 --

bnb = pytest.importorskip("bitsandbytes.functional")


def test_nf4_levels_are_bitsandbytes():
    assert torch.equal(torch.tensor(Q.NF4_LEVELS), bnb.get_4bit_type("nf4", device="cpu"))


def test_nf4_levels_from_normal_quantiles():
    levels = Q.nf4_levels_from_normal()
    torch.testing.assert_close(levels, torch.tensor(Q.NF4_LEVELS), rtol=0, atol=1e-6)
    assert levels[7] == 0 and levels[0] == -1 and levels[-1] == 1 and (levels.diff() > 0).all()
    assert (levels > 0).sum() == 8 and (levels < 0).sum() == 7
    assert Q.NF4_OFFSET == pytest.approx(0.9677083, abs=1e-7)
    # the offset matters: another one gives other levels
    assert (Q.nf4_levels_from_normal(0.99) - levels).abs().max() > 1e-2


def _bnb_nf4(x, blocksize):
    """bitsandbytes' codes (unpacked: two per byte, high nibble first), absmax and dequantized values."""
    # bitsandbytes 0.50.2's CPU dequantize kernel assumes every row starts a new block: with rows shorter than
    # (or not a multiple of) the block it multiplies by the wrong absmax (see the xfail below). Blocks run over
    # the flattened tensor either way, so give it rows of exactly one block.
    packed, state = bnb.quantize_4bit(x.reshape(-1, blocksize), blocksize=blocksize, quant_type="nf4")
    codes = torch.stack([packed.reshape(-1) >> 4, packed.reshape(-1) & 0xF], dim=1).reshape(x.shape)
    return codes, state.absmax, bnb.dequantize_4bit(packed, state).reshape(x.shape)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])  # bnb's CPU path takes all three
@pytest.mark.parametrize("shape, blocksize", [((64,), 64), ((256,), 128), ((256, 64), 64), ((256, 64), 128),
                                              ((256, 64), 256), ((128, 512), 64), ((128, 512), 128),
                                              ((128, 512), 256)])
def test_nf4_matches_bitsandbytes(shape, blocksize, dtype):
    x = _randn(*shape, seed=blocksize, dtype=dtype) * 0.02  # weight-sized values
    x.view(-1)[:blocksize] *= 50  # one block with a much larger absmax
    codes, absmax = Q.nf4_quantize(x, blocksize)
    ref_codes, ref_absmax, ref = _bnb_nf4(x, blocksize)
    assert codes.dtype == torch.uint8 and codes.shape == x.shape and absmax.shape == (x.numel() // blocksize,)
    torch.testing.assert_close(absmax, ref_absmax, rtol=0, atol=0)
    assert torch.equal(codes, ref_codes)
    x_hat = Q.nf4_dequantize(codes, absmax, blocksize, x.shape, dtype=dtype)
    torch.testing.assert_close(x_hat, ref, rtol=0, atol=0)


def _bnb_avx512_dequantize():
    """Whether bitsandbytes' CPU library takes its AVX-512 4-bit dequantize path: it does where the CPU has
    AVX-512F (``has_avx512f()`` in csrc/cpu_ops.cpp, ``dequantizeBlockwise4bitCpu``); elsewhere (AVX2, Arm)
    it takes a scalar loop, or NEON only where rows hold whole blocks."""
    from bitsandbytes.cextension import lib

    try:
        return bool(lib.has_avx512f_cpu())
    except (AttributeError, RuntimeError, OSError):
        return False


def test_bitsandbytes_cpu_dequantize_with_rows_shorter_than_a_block():
    """A bitsandbytes bug that only some CPUs have, so the test asks the CPU instead of a strict xfail.

    Blocks run over the flattened tensor. bitsandbytes 0.50.2's AVX-512 kernel instead indexes absmax by
    ``row * (cols // blocksize) + col // blocksize``, which is 0 for every row when a row (64) is shorter
    than a block (128): every row after the first is scaled by the wrong absmax. Its scalar and NEON paths
    are right. If the AVX-512 assertion starts failing, bitsandbytes fixed the kernel, and ``_bnb_nf4``'s
    one-block rows can go."""
    x = _randn(256, 64, seed=10)
    packed, state = bnb.quantize_4bit(x, blocksize=128, quant_type="nf4")
    theirs = bnb.dequantize_4bit(packed, state)
    ours = Q.nf4_dequantize(*Q.nf4_quantize(x, 128), 128)
    assert torch.equal(theirs[0], ours[0])  # the first row's block is right on every path
    if _bnb_avx512_dequantize():
        wrong_rows = (theirs != ours).any(dim=1)
        assert wrong_rows[2:].all()  # rows 2, 3: block 1, scaled by absmax[0]; and so on
        # exactly the bug described: each row scaled by the first block's absmax
        torch.testing.assert_close(theirs, Q.nf4_dequantize(*_one_absmax(x, 128), 128), rtol=0, atol=0)
    else:
        torch.testing.assert_close(theirs, ours, rtol=0, atol=0)


def _one_absmax(x, blocksize):
    """NF4 codes of ``x`` with every block dequantized by block 0's absmax (what the AVX-512 bug computes)."""
    codes, absmax = Q.nf4_quantize(x, blocksize)
    return codes, absmax[:1].expand_as(absmax).contiguous()


def test_nf4_picks_the_nearest_level_and_ties_go_down_like_bitsandbytes():
    levels = torch.tensor(Q.NF4_LEVELS)
    midpoints = (levels[:-1] + levels[1:]) / 2
    x = torch.cat([torch.tensor([1.0]), midpoints, -midpoints, torch.zeros(64 - 31)])  # absmax 1: exact ties
    codes, _ = Q.nf4_quantize(x, 64)
    assert codes[1:16].tolist() == list(range(15))  # each midpoint goes to the level below it
    assert torch.equal(codes, _bnb_nf4(x, 64)[0])
    y = _randn(64, 64, seed=11)  # off the ties: nearest level in float64
    codes, absmax = Q.nf4_quantize(y, 64)
    dist = ((y.double().reshape(-1, 64) / absmax.double()[:, None])[..., None] - levels.double()).abs()
    assert torch.equal(codes.reshape(-1).long(), dist.argmin(-1).reshape(-1))


def test_nf4_zero_block():
    x = _randn(4, 64, seed=12)
    x[1] = 0
    codes, absmax = Q.nf4_quantize(x, 64)
    assert absmax[1] == 0 and (codes[1] == 7).all()  # 7 is the level 0.0
    x_hat = Q.nf4_dequantize(codes, absmax, 64)
    assert torch.isfinite(x_hat).all() and not x_hat[1].any()
    ref_codes, ref_absmax, ref = _bnb_nf4(x, 64)
    assert torch.equal(codes, ref_codes) and torch.equal(x_hat, ref)


# -------------------------------------------------------- fake quantization --

@pytest.mark.parametrize("bits, axis", [(8, None), (4, None), (8, 0), (4, 1)])
def test_fake_quantize_forward_and_straight_through_gradient(bits, axis):
    x = _randn(32, 48, seed=13).requires_grad_()
    w = _randn(32, 48, seed=14)
    y = Q.fake_quantize(x, bits, axis)
    expected = Q.dequantize(*Q.absmax_quantize(x.detach(), bits, axis))
    assert torch.equal(y, expected) and not torch.equal(y, x)
    (y * w).sum().backward()
    assert torch.equal(x.grad, w)


def test_fake_quantize_keeps_dtype():
    x = _randn(16, 16, dtype=torch.bfloat16).requires_grad_()
    y = Q.fake_quantize(x, 4)
    assert y.dtype == torch.bfloat16
    y.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))


# --------------------------------------------------------------- the error --

def test_quantization_error_by_hand():
    e = Q.quantization_error(torch.tensor([3.0, 4.0]), torch.tensor([3.0, 4.5]))
    assert e == pytest.approx({"max_abs": 0.5, "mean_abs": 0.25, "rel_rms": 0.1, "snr_db": 20.0})
    exact = Q.quantization_error(torch.tensor([1.0, 2.0]), torch.tensor([1.0, 2.0]))
    assert exact["max_abs"] == 0 and exact["rel_rms"] == 0 and exact["snr_db"] == math.inf


# ----------------------------------------------------------------- bad input --

X = torch.ones(4, 8)


@pytest.mark.parametrize("call, err", [
    (lambda: Q.absmax_quantize([1.0, 2.0]), TypeError),
    (lambda: Q.absmax_quantize(torch.arange(8)), ValueError),
    (lambda: Q.absmax_quantize(torch.empty(0)), ValueError),
    (lambda: Q.absmax_quantize(X, bits=16), ValueError),
    (lambda: Q.absmax_quantize(X, bits=1), ValueError),
    (lambda: Q.absmax_quantize(X, bits=8.0), TypeError),
    (lambda: Q.absmax_quantize(X, axis=2), ValueError),
    (lambda: Q.absmax_quantize(X, axis=-3), ValueError),
    (lambda: Q.absmax_quantize(X, blocksize=5), ValueError),
    (lambda: Q.absmax_quantize(X, blocksize=0), ValueError),
    (lambda: Q.absmax_quantize(X, axis=0, blocksize=8), ValueError),
    (lambda: Q.zeropoint_quantize(X.numpy()), TypeError),
    (lambda: Q.zeropoint_quantize(X.bool()), ValueError),
    (lambda: Q.zeropoint_quantize(X, bits=9), ValueError),
    (lambda: Q.zeropoint_quantize(X, axis=5), ValueError),
    (lambda: Q.zeropoint_quantize(X, blocksize=3), ValueError),
    (lambda: Q.dequantize(X, torch.tensor(1.0)), ValueError),
    (lambda: Q.dequantize(X.to(torch.int8), 1.0), TypeError),
    (lambda: Q.dequantize(X.to(torch.int8), torch.ones(3, 1)), ValueError),
    (lambda: Q.dequantize(X.to(torch.int8), torch.ones(4, 1), blocksize=3), ValueError),
    (lambda: Q.dequantize(X.to(torch.int8), torch.tensor(1.0), shape=(5, 5)), ValueError),
    (lambda: Q.nf4_quantize("x"), TypeError),
    (lambda: Q.nf4_quantize(torch.ones(64, dtype=torch.int32)), ValueError),
    (lambda: Q.nf4_quantize(torch.ones(96), blocksize=64), ValueError),
    (lambda: Q.nf4_quantize(torch.empty(0, 64)), ValueError),
    (lambda: Q.nf4_dequantize(torch.zeros(64, dtype=torch.int64), torch.ones(1)), ValueError),
    (lambda: Q.nf4_dequantize(torch.full((64,), 16, dtype=torch.uint8), torch.ones(1)), ValueError),
    (lambda: Q.nf4_dequantize(torch.zeros(128, dtype=torch.uint8), torch.ones(1)), ValueError),
    (lambda: Q.nf4_dequantize(torch.zeros(64, dtype=torch.uint8), [1.0]), TypeError),
    (lambda: Q.nf4_levels_from_normal(1.0), ValueError),
    (lambda: Q.nf4_levels_from_normal("0.97"), TypeError),
    (lambda: Q.fake_quantize(1.0), TypeError),
    (lambda: Q.fake_quantize(torch.ones(3, dtype=torch.int8)), ValueError),
    (lambda: Q.quantization_error(X, X[0]), ValueError),
    (lambda: Q.quantization_error(X, X.long()), ValueError),
    (lambda: Q.quantization_error(X.tolist(), X), TypeError),
])
def test_bad_input(call, err):
    with pytest.raises(err):
        call()


# ----------------------------------------------------------------------- FP4 --

def _e2m1_by_hand():
    """The 8 E2M1 magnitudes from the bit layout: exponent e (2 bits, bias 1), mantissa m (1 bit);
    e = 0 is subnormal, m/2 * 2^(1-1); otherwise (1 + m/2) * 2^(e-1)."""
    return [(m / 2) if e == 0 else (1 + m / 2) * 2 ** (e - 1) for e in range(4) for m in range(2)]


def test_e2m1_levels_from_the_bits():
    assert list(Q.FP4_E2M1_LEVELS) == _e2m1_by_hand() == [0, 0.5, 1, 1.5, 2, 3, 4, 6]


def test_e2m1_round_nearest_ties_to_even_and_saturates():
    levels = torch.tensor(_e2m1_by_hand())
    mid = (levels[:-1] + levels[1:]) / 2  # 0.25 0.75 1.25 1.75 2.5 3.5 5
    assert Q.e2m1_round(mid).tolist() == [0, 1, 1, 2, 2, 4, 4]  # the neighbour with mantissa bit 0
    assert Q.e2m1_round(-mid).tolist() == [-0.0, -1, -1, -2, -2, -4, -4]
    assert Q.e2m1_round(torch.tensor([7.0, -100.0, 6.0, 5.01])).tolist() == [6, -6, 6, 6]
    x = torch.linspace(-7, 7, 2801)  # off the ties: the nearest level, by brute force
    x = x[((x.abs()[:, None] - mid).abs() > 1e-6).all(dim=1)]
    signed = torch.cat([-levels.flip(0), levels])
    nearest = signed[(x[:, None].clamp(-6, 6) - signed).abs().argmin(dim=1)]
    assert torch.equal(Q.e2m1_round(x), nearest)


ao_kernels = pytest.importorskip("torchao.prototype.mx_formats.kernels")


def _unpack_fp4(packed, shape):
    return ao_kernels.f4_unpacked_to_f32(ao_kernels.unpack_uint4(packed)).reshape(shape)


def test_e2m1_round_matches_torchao():
    levels = torch.tensor(Q.FP4_E2M1_LEVELS)
    mid = (levels[:-1] + levels[1:]) / 2
    x = torch.cat([torch.linspace(-8, 8, 4001), mid, -mid, levels, -levels])
    theirs = ao_kernels.f4_unpacked_to_f32(ao_kernels.f32_to_f4_unpacked(x))
    assert torch.equal(Q.e2m1_round(x).abs(), theirs.abs()) and torch.equal(Q.e2m1_round(x), theirs + 0.0)


@pytest.mark.parametrize("shape", [(64, 256), (96, 128)])
def test_mxfp4_matches_torchao(shape):
    from torchao.prototype.mx_formats.mx_tensor import get_fp_scale, to_mx

    x = _randn(*shape, seed=20) * 0.02 * torch.logspace(-1, 1, shape[1])  # blocks of many magnitudes
    elements, scale = Q.mxfp4_quantize(x, 32)
    scale_e8m0, packed = to_mx(x, torch.float4_e2m1fn_x2, 32)  # FLOOR: the spec's scale
    assert torch.equal(scale.reshape(-1), get_fp_scale(scale_e8m0).reshape(-1))
    assert torch.equal(elements, _unpack_fp4(packed, shape))
    exponent = torch.log2(scale)
    assert torch.equal(exponent, exponent.round())  # powers of two: an E8M0 byte holds them
    amax = x.reshape(-1, 32).abs().amax(dim=1, keepdim=True)
    assert ((amax / scale >= 4) & (amax / scale < 8)).all()  # the block max lands in [4, 8)


@pytest.mark.parametrize("shape", [(64, 256), (32, 512)])
def test_nvfp4_matches_torchao(shape):
    from torchao.prototype.mx_formats.nvfp4_tensor import (
        nvfp4_quantize,
        per_tensor_amax_to_scale,
    )

    x = _randn(*shape, seed=21) * 0.02 * torch.logspace(-1, 1, shape[1])
    elements, block_scale, tensor_scale = Q.nvfp4_quantize(x, 16)
    ref_tensor_scale = per_tensor_amax_to_scale(x.abs().amax())
    ref_block, packed = nvfp4_quantize(x, 16, per_tensor_scale=ref_tensor_scale)
    assert tensor_scale.item() == ref_tensor_scale.item()
    assert block_scale.dtype == torch.float8_e4m3fn and torch.equal(
        block_scale.float().reshape(-1), ref_block.float().reshape(-1))
    assert torch.equal(elements, _unpack_fp4(packed, shape))
    # the block scale is the E4M3 cast of max|block| / 6 / tensor scale (not a power of two)
    amax = x.reshape(-1, 16).abs().amax(dim=1, keepdim=True)
    cast = (amax / 6 / tensor_scale).to(torch.float8_e4m3fn).float()
    assert torch.equal(block_scale.float(), cast)
    assert not torch.equal(torch.log2(cast), torch.log2(cast).round())


def test_fp4_dequantize_round_trip_and_error():
    x = _randn(32, 128, seed=22)
    e, s = Q.mxfp4_quantize(x)
    x_mx = Q.fp4_dequantize(e, s, 32)
    e, b, t = Q.nvfp4_quantize(x)
    x_nv = Q.fp4_dequantize(e, t * b.float(), 16)
    assert x_mx.shape == x_nv.shape == x.shape
    # every dequantized value is an E2M1 value times its block's scale
    assert torch.equal(Q.fp4_dequantize(*Q.mxfp4_quantize(x_mx), 32), x_mx)
    snr = {k: Q.quantization_error(x, v)["snr_db"] for k, v in (("mx", x_mx), ("nv", x_nv))}
    assert 15 < snr["mx"] < snr["nv"] < 25  # finer, non-power-of-two scales: NVFP4 closer
    z = torch.zeros(2, 32)
    assert not Q.fp4_dequantize(*Q.mxfp4_quantize(z), 32).any()
    e, b, t = Q.nvfp4_quantize(z)
    assert not Q.fp4_dequantize(e, t * b.float(), 16).any()


# ---------------------------------------------------------------- SmoothQuant --

def test_smoothquant_scales_formula_and_equivalence():
    x = _randn(512, 64, seed=23)
    x[:, 5] *= 40  # an outlier channel
    w = _randn(32, 64, seed=24) * 0.05
    for alpha in (0.0, 0.5, 0.8, 1.0):
        s = Q.smoothquant_scales(x, w, alpha)
        expected = x.abs().amax(0) ** alpha / w.abs().amax(0) ** (1 - alpha)
        torch.testing.assert_close(s, expected)
        torch.testing.assert_close((x / s) @ (w * s).T, x @ w.T, rtol=1e-4, atol=1e-5)
    s = Q.smoothquant_scales(x, w, 0.5)  # alpha 0.5: inputs and weights share each channel's max equally
    torch.testing.assert_close((x / s).abs().amax(0), (w * s).abs().amax(0))
    assert torch.equal(Q.smoothquant_scales(x, w, 0.0), 1 / w.abs().amax(0))
    # smoothing makes per-tensor int8 activations more accurate on the layer's output
    def w8a8(a):
        s = Q.smoothquant_scales(x, w, a)
        xq = Q.dequantize(*Q.absmax_quantize(x / s))
        wq = Q.dequantize(*Q.absmax_quantize(w * s, axis=0))
        return Q.quantization_error(x @ w.T, xq @ wq.T)["snr_db"]
    assert w8a8(0.5) > w8a8(0.0) + 6


def test_smoothquant_scales_match_torchao():
    core = pytest.importorskip("torchao.prototype.smoothquant.core")
    x = _randn(4, 128, 64, seed=25) * torch.logspace(-1, 1.5, 64)
    w = _randn(48, 64, seed=26) * 0.05
    for alpha in (0.25, 0.5, 0.75):
        observer = core.SmoothQuantObserver(w, alpha)
        observer(x)
        theirs, _, _ = observer.calculate_qparams()
        torch.testing.assert_close(Q.smoothquant_scales(x, w, alpha), theirs, rtol=1e-5, atol=0)


# ----------------------------------------------------------------------- GPTQ --

def _correlated_inputs(n, d, seed, rank=16):
    """Calibration inputs whose channels are correlated (a few directions plus noise), as a layer's are."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, rank, generator=g) @ torch.randn(rank, d, generator=g)
    return x + 0.3 * torch.randn(n, d, generator=g)


def _obq_reference(w, x, bits, damp=0.01):
    """GPTQ's result the slow way, from the optimal-brain-quantization update: quantize column i, then move
    the not-yet-quantized columns F by -err * [H_F^-1]_{:,i} / [H_F^-1]_{ii}, with H_F^-1 the inverse of the
    (damped) Hessian restricted to F, recomputed from scratch each step. No Cholesky factor."""
    W, X = w.double().clone(), x.double()
    H = X.T @ X / len(X)
    H += damp * H.diagonal().mean() * torch.eye(len(H), dtype=torch.float64)
    qmax = 2 ** (bits - 1) - 1
    scale = (W.abs().amax(dim=1) / qmax).float().double()
    Q_ = torch.zeros_like(W)
    for i in range(W.shape[1]):
        F = torch.arange(i, W.shape[1])
        Hinv = torch.linalg.inv(H[F][:, F])
        q = torch.round(W[:, i] / scale).clamp(-qmax, qmax)
        Q_[:, i] = q
        err = W[:, i] - q * scale
        W[:, F] -= err[:, None] * Hinv[0][None, :] / Hinv[0, 0]
    return Q_, scale


def test_gptq_equals_the_obq_update():
    w, x = _randn(24, 32, seed=27), _correlated_inputs(256, 32, seed=28)
    q, scale = Q.gptq_quantize(w, x, bits=3)
    ref_q, ref_scale = _obq_reference(w, x, bits=3)
    torch.testing.assert_close(scale.double().reshape(-1), ref_scale)
    assert (q.double() != ref_q).float().mean() < 0.01  # the same codes, up to float near-ties
    assert q.dtype == torch.int8 and scale.shape == (24, 1)


def test_gptq_with_identity_hessian_is_round_to_nearest():
    w = _randn(40, 64, seed=29)
    x = torch.eye(64) * 8.0  # x^T x / n = I: no column says anything about another
    for blocksize in (None, 16):
        q, scale = Q.gptq_quantize(w, x, bits=4, blocksize=blocksize)
        ref_q, ref_scale = Q.absmax_quantize(w, 4, axis=None if blocksize else 0, blocksize=blocksize)
        assert torch.equal(scale, ref_scale)
        _assert_matches_torch(q, ref_q, w.reshape(q.shape), scale if blocksize is None else scale.reshape(
            40, -1).repeat_interleave(blocksize, dim=1))


@pytest.mark.parametrize("blocksize", [None, 16])
def test_gptq_beats_round_to_nearest_on_held_out_inputs(blocksize):
    w = _randn(48, 64, seed=30) * 0.05
    x = _correlated_inputs(1024, 64, seed=31)
    calib, held_out = x[:512], x[512:]
    q, scale = Q.gptq_quantize(w, calib, bits=3, blocksize=blocksize)
    w_gptq = Q.dequantize(q, scale, blocksize=blocksize, shape=w.shape)
    rtn = Q.absmax_quantize(w, 3, axis=None if blocksize else 0, blocksize=blocksize)
    w_rtn = Q.dequantize(*rtn, blocksize=blocksize, shape=w.shape)

    def out_err(v, xs):
        return (xs.double() @ (w - v).double().T).pow(2).sum().item()

    assert out_err(w_gptq, held_out) < 0.5 * out_err(w_rtn, held_out)  # measured: about 0.17
    assert out_err(w_gptq, calib) < 0.5 * out_err(w_rtn, calib)
    # it trades weight error for output error: the weights themselves move further
    assert (w - w_gptq).pow(2).sum() > (w - w_rtn).pow(2).sum()


def test_gptq_dead_inputs():
    w, x = _randn(8, 16, seed=32), _correlated_inputs(64, 16, seed=33)
    x[:, 3] = 0
    q, scale = Q.gptq_quantize(w, x, bits=4)
    assert (q[:, 3] == 0).all() and torch.isfinite(scale).all()


# ------------------------------------------------------------ bad new input --

@pytest.mark.parametrize("call, err", [
    (lambda: Q.e2m1_round([1.0]), TypeError),
    (lambda: Q.e2m1_round(torch.tensor([float("nan")])), ValueError),
    (lambda: Q.mxfp4_quantize(torch.ones(48)), ValueError),
    (lambda: Q.mxfp4_quantize(torch.ones(32, dtype=torch.int32)), ValueError),
    (lambda: Q.nvfp4_quantize(torch.ones(24)), ValueError),
    (lambda: Q.nvfp4_quantize(torch.tensor([float("inf")] * 16)), ValueError),
    (lambda: Q.fp4_dequantize(torch.full((32,), 0.7), torch.ones(1), 32), ValueError),
    (lambda: Q.fp4_dequantize(torch.ones(32), torch.ones(2), 32), ValueError),
    (lambda: Q.fp4_dequantize(torch.ones(32), [1.0], 32), TypeError),
    (lambda: Q.fp4_dequantize(torch.ones(32), torch.ones(1), 32, shape=(3, 3)), ValueError),
    (lambda: Q.smoothquant_scales(torch.ones(4, 8), torch.ones(3, 7)), ValueError),
    (lambda: Q.smoothquant_scales(torch.ones(4, 8), torch.ones(8)), ValueError),
    (lambda: Q.smoothquant_scales(torch.ones(4, 8), torch.ones(3, 8), alpha=1.5), ValueError),
    (lambda: Q.smoothquant_scales(torch.ones(4, 8), torch.ones(3, 8), alpha="0.5"), TypeError),
    (lambda: Q.gptq_quantize(torch.ones(3, 8), torch.ones(4, 7)), ValueError),
    (lambda: Q.gptq_quantize(torch.ones(3, 8), torch.ones(4, 8), bits=1), ValueError),
    (lambda: Q.gptq_quantize(torch.ones(3, 8), torch.ones(4, 8), blocksize=3), ValueError),
    (lambda: Q.gptq_quantize(torch.ones(3, 8), torch.ones(4, 8), damp=0), ValueError),
    (lambda: Q.gptq_quantize(torch.ones(3, 8), "x"), TypeError),
])
def test_bad_input_new(call, err):
    with pytest.raises(err):
        call()
