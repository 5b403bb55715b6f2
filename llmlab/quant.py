"""Quantization from scratch: absmax and zero-point integers, NF4, FP4 (MXFP4, NVFP4), SmoothQuant, GPTQ,
fake quantization, and how much is lost.

Chapter: Quantization. Each function is small enough to read top to bottom and is checked in the tests against
the library it explains: ``torch.quantize_per_tensor`` / ``torch.quantize_per_channel`` for int8 and uint8,
bitsandbytes' ``quantize_4bit(quant_type="nf4")`` for NF4, torchao's ``mx_formats`` for MXFP4 and NVFP4 and its
SmoothQuant observer for the smoothing factors. GPTQ is checked against the optimal-brain-quantization update it
reorganizes (tests/test_quant.py), since torchao's GPTQ runs on CUDA only.

Conventions. Quantizers compute in float32 whatever the input dtype and return float32 scales; ``dequantize``
returns float32. Integers are rounded with ``torch.round`` (round half to even, as PyTorch does). A group
(tensor, channel or block) that is all zeros gets scale 0 and quantizes to 0 instead of dividing by zero.
Groups are chosen with ``axis`` (one scale per slice along that axis) or ``blocksize`` (one scale per run of
``blocksize`` elements of the flattened tensor, as bitsandbytes does); neither means one scale for the tensor.
"""
from __future__ import annotations

import math

import torch

BITS = (2, 3, 4, 5, 6, 7, 8)  # every width here fits an int8 / uint8

# The 16 NF4 levels exactly as bitsandbytes stores them (bitsandbytes.functional.get_4bit_type("nf4")).
NF4_LEVELS = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)
# The outermost probability NF4 takes a quantile at (bitsandbytes' create_normal_map writes 0.9677083): the tail
# left out is half a bin, averaged over 15 and 16 bins. At 1.0 the extreme level would be the infinite quantile.
NF4_OFFSET = 1 - (1 / 30 + 1 / 32) / 2


# ------------------------------------------------------------------ checks --

def _tensor(x, name="x"):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got {x.dtype}")
    if x.numel() == 0:
        raise ValueError(f"{name} is empty")
    return x


def _int(v, name):
    if isinstance(v, bool) or not isinstance(v, int):
        raise TypeError(f"{name} must be an int, got {type(v).__name__}")
    return v


def _bits(bits):
    if _int(bits, "bits") not in BITS:
        raise ValueError(f"bits must be one of {BITS}, got {bits}")
    return bits


def _blocksize(blocksize, numel):
    if _int(blocksize, "blocksize") <= 0 or numel % blocksize:
        raise ValueError(f"blocksize must be a positive divisor of the number of elements ({numel}), "
                         f"got {blocksize}")
    return blocksize


def _groups(x, axis, blocksize):
    """Return ``x`` reshaped for grouping and the dims to reduce over (keepdim): one statistic per group."""
    if axis is not None and blocksize is not None:
        raise ValueError("pass axis (per channel) or blocksize (per block), not both")
    if blocksize is not None:
        return x.reshape(-1, _blocksize(blocksize, x.numel())), (1,)
    if axis is None:
        return x, tuple(range(x.dim()))
    if _int(axis, "axis") >= x.dim() or axis < -x.dim() or x.dim() == 0:
        raise ValueError(f"axis must be in [{-x.dim()}, {x.dim()}) for a {x.dim()}-D tensor, got {axis}")
    axis %= x.dim()
    return x, tuple(d for d in range(x.dim()) if d != axis)


def _reduce(fn, x, dims, per_tensor):
    if per_tensor:
        return fn(x)  # a 0-D tensor: one scale for everything
    return fn(x, dim=dims, keepdim=True) if dims else x.clone()  # a 1-D tensor along axis 0 is its own channel


def _safe(scale):
    """The scale to divide by: 1 where a group is all zeros (its values are 0 anyway)."""
    return torch.where(scale > 0, scale, torch.ones_like(scale))


# ------------------------------------------------------- integer quantization --

def absmax_quantize(x: torch.Tensor, bits: int = 8, axis: int | None = None,
                    blocksize: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric quantization: ``q = round(x / scale)`` with ``scale = max|x| / qmax``, ``qmax = 2^(bits-1) - 1``.

    Returns ``(q, scale)``: ``q`` is int8 with ``x``'s shape, in ``[-qmax, qmax]`` (the -2^(bits-1) code is
    unused, so 0 maps to 0 and the range is symmetric). ``scale`` is 0-D (per tensor), keeps ``x``'s dims with
    size 1 except along ``axis`` (per channel), or has shape ``(n_blocks, 1)`` (per block).
    """
    _tensor(x)
    qmax = 2 ** (_bits(bits) - 1) - 1
    xg, dims = _groups(x.float(), axis, blocksize)
    scale = _reduce(torch.amax, xg.abs(), dims, axis is None and blocksize is None) / qmax
    q = torch.round(xg / _safe(scale)).clamp(-qmax, qmax)
    return q.to(torch.int8).reshape(x.shape), scale


def zeropoint_quantize(x: torch.Tensor, bits: int = 8, axis: int | None = None,
                       blocksize: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric (affine) quantization: ``q = round(x / scale + zero_point)``, ``q`` in ``[0, 2^bits - 1]``.

    The range ``[min(x, 0), max(x, 0)]`` is spread over all ``2^bits`` codes, so a lopsided tensor (say, after
    a ReLU) wastes none of them; 0 is always in the range and maps exactly to the integer ``zero_point``.
    Returns ``(q, scale, zero_point)``: ``q`` is stored as uint8 (like PyTorch's ``quint8``), ``zero_point``
    as int32 with ``scale``'s shape (see ``absmax_quantize`` for the shapes).
    """
    _tensor(x)
    qmax = 2 ** _bits(bits) - 1
    xg, dims = _groups(x.float(), axis, blocksize)
    per_tensor = axis is None and blocksize is None
    lo = _reduce(torch.amin, xg, dims, per_tensor).clamp(max=0)
    hi = _reduce(torch.amax, xg, dims, per_tensor).clamp(min=0)
    scale = (hi - lo) / qmax
    zero_point = torch.round(-lo / _safe(scale)).clamp(0, qmax).to(torch.int32)
    q = torch.round(xg / _safe(scale) + zero_point).clamp(0, qmax)  # shift, then round (as PyTorch does)
    return q.to(torch.uint8).reshape(x.shape), scale, zero_point


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None = None,
               blocksize: int | None = None, shape: tuple[int, ...] | None = None) -> torch.Tensor:
    """Back to floats (float32, the scales' dtype): ``(q - zero_point) * scale``, the inverse of both quantizers
    up to rounding.

    Pass the ``blocksize`` used to quantize per block (``q`` is then regrouped into blocks to meet its scales),
    and ``shape`` to reshape the result (default ``q.shape``).
    """
    if not isinstance(q, torch.Tensor) or not isinstance(scale, torch.Tensor):
        raise TypeError(f"q and scale must be torch.Tensors, got {type(q).__name__}, {type(scale).__name__}")
    if q.is_floating_point() or q.is_complex() or q.dtype == torch.bool or q.numel() == 0:
        raise ValueError(f"q must be a non-empty integer tensor, got {q.dtype} with {q.numel()} elements")
    _tensor(scale, "scale")
    shape = q.shape if shape is None else torch.Size(shape)
    if shape.numel() != q.numel():
        raise ValueError(f"shape {tuple(shape)} does not hold q's {q.numel()} elements")
    qg = q if blocksize is None else q.reshape(-1, _blocksize(blocksize, q.numel()))
    qg = qg.to(torch.int32) - (0 if zero_point is None else zero_point)
    try:
        return (qg * scale).reshape(shape)
    except RuntimeError as e:  # scale / zero_point do not broadcast against q: wrong blocksize or axis
        raise ValueError(f"scale {tuple(scale.shape)} does not fit q {tuple(qg.shape)}: {e}") from None


# ------------------------------------------------------------------- NF4 --

def nf4_levels_from_normal(offset: float = NF4_OFFSET) -> torch.Tensor:
    """Derive the NF4 levels as QLoRA does: quantiles of a standard normal, normalized to [-1, 1].

    8 positive levels at evenly spaced probabilities from ``offset`` down to (not including) 0.5, 7 negative
    ones the same way, and an exact 0: 16 values, asymmetric so that zero is representable.
    """
    if isinstance(offset, bool) or not isinstance(offset, (int, float)):
        raise TypeError(f"offset must be a number, got {type(offset).__name__}")
    if not 0.5 < offset < 1:
        raise ValueError(f"offset must be in (0.5, 1), got {offset}")
    normal = torch.distributions.Normal(torch.tensor(0.0, dtype=torch.float64), 1.0)  # float64 quantiles
    positive = normal.icdf(torch.linspace(offset, 0.5, 9, dtype=torch.float64)[:-1])
    negative = -normal.icdf(torch.linspace(offset, 0.5, 8, dtype=torch.float64)[:-1])
    levels = torch.cat([negative, torch.zeros(1, dtype=torch.float64), positive]).sort().values
    return (levels / levels.max()).float()


def nf4_quantize(x: torch.Tensor, blocksize: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """4-bit NormalFloat: per block of ``blocksize`` elements divide by the block's absmax, then store the index
    of the nearest NF4 level. Returns ``(codes, absmax)``: uint8 codes 0..15 with ``x``'s shape (one per
    element; bitsandbytes packs two per byte) and the float32 absmax per block, shape ``(n_blocks,)``."""
    _tensor(x)
    blocks = x.float().reshape(-1, _blocksize(blocksize, x.numel()))
    absmax = blocks.abs().amax(dim=1)
    normalized = blocks / _safe(absmax)[:, None]  # in [-1, 1]
    levels = torch.tensor(NF4_LEVELS)
    midpoints = (levels[:-1] + levels[1:]) / 2
    codes = torch.bucketize(normalized, midpoints)  # nearest level = how many midpoints lie below; ties go down
    return codes.to(torch.uint8).reshape(x.shape), absmax


def nf4_dequantize(codes: torch.Tensor, absmax: torch.Tensor, blocksize: int = 64,
                   shape: tuple[int, ...] | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Look each code up in ``NF4_LEVELS`` and multiply by its block's absmax; reshape to ``shape``
    (default ``codes.shape``) and cast to ``dtype``."""
    if not isinstance(codes, torch.Tensor) or not isinstance(absmax, torch.Tensor):
        raise TypeError(f"codes and absmax must be torch.Tensors, got {type(codes).__name__}, "
                        f"{type(absmax).__name__}")
    if codes.dtype != torch.uint8 or codes.numel() == 0:
        raise ValueError(f"codes must be a non-empty uint8 tensor, got {codes.dtype} with {codes.numel()} elements")
    if codes.max() > 15:
        raise ValueError(f"NF4 codes are 0..15, got {codes.max().item()}")
    _tensor(absmax, "absmax")
    n_blocks = codes.numel() // _blocksize(blocksize, codes.numel())
    if absmax.numel() != n_blocks:
        raise ValueError(f"{n_blocks} blocks of {blocksize} need {n_blocks} absmax values, got {absmax.numel()}")
    shape = codes.shape if shape is None else torch.Size(shape)
    if shape.numel() != codes.numel():
        raise ValueError(f"shape {tuple(shape)} does not hold {codes.numel()} codes")
    values = torch.tensor(NF4_LEVELS)[codes.long()].reshape(n_blocks, blocksize)
    return (values * absmax.float().reshape(-1, 1)).reshape(shape).to(dtype)


# -------------------------------------------------------------------- FP4 --
# E2M1, the 4-bit float of MXFP4 and NVFP4: 1 sign bit, 2 exponent bits (bias 1), 1 mantissa bit. Exponent 0
# is subnormal (0 and 0.5); there is no inf or NaN. These are its 8 magnitudes (15 values with the sign).
FP4_E2M1_LEVELS = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
FP8_E4M3_MAX = 448.0  # torch.finfo(torch.float8_e4m3fn).max: the largest NVFP4 block scale


def _finite(x, name="x"):
    _tensor(x, name)
    if not torch.isfinite(x.abs().amax()):  # the max is nan or inf if any element is
        raise ValueError(f"{name} must be finite")
    return x


def e2m1_round(x: torch.Tensor) -> torch.Tensor:
    """Round each value to the nearest FP4 (E2M1) value, ties to the even mantissa as IEEE rounding does,
    saturating at +-6 (float32 out). The element rounding of MXFP4 and NVFP4.

    The grid's step is 0.5 below 2, 1 from 2 to 4 and 2 from 4 to 6, so rounding ``|x| / step`` to an integer
    (``torch.round``: half to even) and multiplying back is rounding to the grid; an even multiple of the step
    is a level whose mantissa bit is 0, so ties go where IEEE's round-half-to-even sends them."""
    _finite(x)
    a = x.float().abs().clamp(max=FP4_E2M1_LEVELS[-1])
    step = torch.where(a < 2, 0.5, torch.where(a < 4, 1.0, 2.0))
    return torch.sign(x.float()) * torch.round(a / step) * step


def mxfp4_quantize(x: torch.Tensor, blocksize: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """MXFP4 (OCP Microscaling spec v1.0): per block of 32 one shared power-of-two scale (an E8M0 exponent),
    ``scale = 2^(floor(log2 max|x|) - 2)`` (2 is E2M1's largest exponent), elements ``e2m1_round(x / scale)``.

    The block's largest value lands in [4, 8) and saturates at 6 above it, as the spec's conversion does.
    Returns ``(elements, scale)``: float32 values on the E2M1 grid with ``x``'s shape, and the float32 scales
    (exact powers of two) of shape ``(n_blocks, 1)``; ``fp4_dequantize`` multiplies them back."""
    _finite(x)
    blocks = x.float().reshape(-1, _blocksize(blocksize, x.numel()))
    _, e = torch.frexp(blocks.abs().amax(dim=1, keepdim=True))  # amax = m 2^e with m in [0.5, 1)
    scale = torch.exp2((e - 1 - 2).clamp(-127, 127).float())  # E8M0 holds 2^-127 .. 2^127
    return e2m1_round(blocks / scale).reshape(x.shape), scale


def nvfp4_quantize(x: torch.Tensor, blocksize: int = 16) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """NVFP4 (NVIDIA Blackwell): E2M1 elements, one FP8 E4M3 scale per block of 16 and one float32 scale per
    tensor. The tensor scale ``max|x| / (448 * 6)`` puts the block scales ``max|block| / 6`` (divided by it)
    into E4M3's range; each block scale is rounded to E4M3, so unlike MXFP4 it need not be a power of two.

    Returns ``(elements, block_scale, tensor_scale)``: float32 E2M1 values with ``x``'s shape, the
    ``torch.float8_e4m3fn`` block scales of shape ``(n_blocks, 1)`` and the 0-D float32 tensor scale. Dequantize
    with ``fp4_dequantize(elements, tensor_scale * block_scale.float(), blocksize)``."""
    _finite(x)
    blocks = x.float().reshape(-1, _blocksize(blocksize, x.numel()))
    tensor_scale = blocks.abs().amax() / (FP8_E4M3_MAX * FP4_E2M1_LEVELS[-1])
    block_amax = blocks.abs().amax(dim=1, keepdim=True)
    block_scale = (block_amax / FP4_E2M1_LEVELS[-1] / _safe(tensor_scale)).clamp(
        torch.finfo(torch.float8_e4m3fn).tiny, FP8_E4M3_MAX).to(torch.float8_e4m3fn)
    # multiply by the reciprocal of the two scales, as NVIDIA's kernels (and torchao) do
    elements = e2m1_round(blocks * ((1 / _safe(tensor_scale)) / block_scale.float()))
    return elements.reshape(x.shape), block_scale, tensor_scale


def fp4_dequantize(elements: torch.Tensor, scale: torch.Tensor, blocksize: int,
                   shape: tuple[int, ...] | None = None) -> torch.Tensor:
    """Multiply FP4 elements by their block's float scale (MXFP4: ``scale``; NVFP4: ``tensor_scale *
    block_scale.float()``); float32, reshaped to ``shape`` (default ``elements.shape``)."""
    _finite(elements, "elements")
    _finite(scale, "scale")
    on_grid = torch.isin(elements.abs().float(), torch.tensor(FP4_E2M1_LEVELS))
    if not on_grid.all():
        raise ValueError("elements must be FP4 (E2M1) values: 0, +-0.5, +-1, +-1.5, +-2, +-3, +-4, +-6")
    n_blocks = elements.numel() // _blocksize(blocksize, elements.numel())
    if scale.numel() != n_blocks:
        raise ValueError(f"{n_blocks} blocks of {blocksize} need {n_blocks} scales, got {scale.numel()}")
    shape = elements.shape if shape is None else torch.Size(shape)
    if shape.numel() != elements.numel():
        raise ValueError(f"shape {tuple(shape)} does not hold {elements.numel()} elements")
    return (elements.float().reshape(n_blocks, blocksize) * scale.float().reshape(-1, 1)).reshape(shape)


# ------------------------------------------------- activations: SmoothQuant --

def _matrix(w, name="w"):
    _finite(w, name)
    if w.dim() != 2:
        raise ValueError(f"{name} must be 2-D (out_features, in_features), got shape {tuple(w.shape)}")
    return w


def _inputs(x, in_features, name="x"):
    _finite(x, name)
    if x.dim() < 2 or x.shape[-1] != in_features:
        raise ValueError(f"{name} must have shape (..., {in_features}) to feed the layer, got {tuple(x.shape)}")
    return x.reshape(-1, in_features)


def smoothquant_scales(x: torch.Tensor, w: torch.Tensor, alpha: float = 0.5) -> torch.Tensor:
    """SmoothQuant's per-input-channel smoothing factors ``s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)``.

    ``x``: calibration inputs of the linear layer, shape ``(..., in_features)``; ``w``: its weight, shape
    ``(out_features, in_features)``. Dividing the inputs by ``s`` and multiplying the weight's columns by it
    leaves ``x @ w.T`` unchanged and moves the activations' outlier channels into the weight. ``alpha``, the
    migration strength, splits the difficulty: at 1 every input channel's max becomes 1 (all of it in the
    weight), at 0 every weight column's max does (all of it left in the inputs), at 0.5 each channel's input
    and weight maxima become equal. Returns float32 of shape ``(in_features,)``."""
    _matrix(w)
    x = _inputs(x, w.shape[1])
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
        raise TypeError(f"alpha must be a number, got {type(alpha).__name__}")
    if not 0 <= alpha <= 1:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    x_max, w_max = x.float().abs().amax(dim=0), w.float().abs().amax(dim=0)
    s = x_max.pow(alpha) / w_max.pow(1 - alpha)
    return torch.where((x_max > 0) & (w_max > 0), s, torch.ones_like(s))  # a dead channel keeps scale 1


# ---------------------------------------------------------------------- GPTQ --

def gptq_quantize(w: torch.Tensor, x: torch.Tensor, bits: int = 4, blocksize: int | None = None,
                  damp: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    """GPTQ: quantize a linear layer's weight column by column, pushing each column's rounding error onto the
    columns not yet quantized so that the layer's output on the calibration inputs moves least.

    ``w``: weight ``(out_features, in_features)``; ``x``: calibration inputs ``(..., in_features)``. The
    Hessian of ``||x w^T - x q^T||^2`` is ``H = x^T x / n`` (damped by ``damp`` times its mean diagonal);
    column ``i``'s error, divided by ``U[i, i]`` (``U``: the upper Cholesky factor of ``H^-1``), is subtracted
    from the later columns times ``U[i, i+1:]``. Scales are symmetric absmax, per output row (``blocksize``
    None, fixed from ``w`` before the loop) or per group of ``blocksize`` columns (set from the error-updated
    weights when the loop reaches the group, as GPTQ does). Returns ``(q, scale)`` in ``absmax_quantize``'s
    format (``axis=0``, or ``blocksize`` blocks along rows), so ``dequantize`` reads it; computed in float64.
    With ``H`` the identity nothing is pushed and this is round-to-nearest."""
    _matrix(w)
    x = _inputs(x, w.shape[1])
    qmax = 2 ** (_bits(bits) - 1) - 1
    out_f, in_f = w.shape
    if blocksize is not None and (_int(blocksize, "blocksize") <= 0 or in_f % blocksize):
        raise ValueError(f"blocksize must divide in_features ({in_f}), got {blocksize}")
    if isinstance(damp, bool) or not isinstance(damp, (int, float)) or not 0 < damp < 1:
        raise ValueError(f"damp must be a number in (0, 1), got {damp!r}")
    W = w.double().clone()
    H = x.double().T @ x.double() / len(x)
    dead = H.diagonal() == 0  # an input that is always 0: its column never matters
    H[dead, dead] = 1
    W[:, dead] = 0
    H += damp * H.diagonal().mean() * torch.eye(in_f, dtype=torch.float64)
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    q = torch.zeros(out_f, in_f, dtype=torch.int8)
    scales = []
    if blocksize is None:
        scale = (W.abs().amax(dim=1) / qmax).float()
        scales.append(scale[:, None])
    for i in range(in_f):
        if blocksize is not None and i % blocksize == 0:
            scale = (W[:, i : i + blocksize].abs().amax(dim=1) / qmax).float()
            scales.append(scale[:, None])
        s = _safe(scale).double()
        q[:, i] = torch.round(W[:, i] / s).clamp(-qmax, qmax).to(torch.int8)
        err = (W[:, i] - q[:, i].double() * scale.double()) / U[i, i]
        W[:, i + 1 :] -= err[:, None] * U[i, i + 1 :][None, :]
    if blocksize is None:
        return q, scales[0]
    return q, torch.cat(scales, dim=1).reshape(-1, 1)  # block order: row by row, as absmax_quantize's


# ------------------------------------------------- training and measurement --

def fake_quantize(x: torch.Tensor, bits: int = 8, axis: int | None = None) -> torch.Tensor:
    """Quantize and dequantize in the forward pass, let the gradient through unchanged (straight-through
    estimator): the forward sees the rounding error, the backward treats rounding as the identity.
    Quantization-aware training puts this around weights so they learn to sit well on the grid."""
    x_hat = dequantize(*absmax_quantize(x, bits, axis)).to(x.dtype)
    return x_hat.detach() + (x - x.detach())  # value: x_hat exactly (x - x.detach() is 0); gradient: 1


def quantization_error(x: torch.Tensor, x_hat: torch.Tensor) -> dict:
    """How far ``x_hat`` is from ``x``: max and mean absolute error, relative RMS error ``||x - x_hat|| / ||x||``,
    and the signal-to-noise ratio in dB, ``20 log10(||x|| / ||x - x_hat||)`` (about 6 dB per bit)."""
    _tensor(x)
    _tensor(x_hat, "x_hat")
    if x.shape != x_hat.shape:
        raise ValueError(f"x and x_hat must have the same shape, got {tuple(x.shape)} and {tuple(x_hat.shape)}")
    x, err = x.double(), (x.double() - x_hat.double())
    signal, noise = x.norm().item(), err.norm().item()
    return {
        "max_abs": err.abs().max().item(),
        "mean_abs": err.abs().mean().item(),
        "rel_rms": noise / signal if signal else (0.0 if noise == 0 else math.inf),
        "snr_db": math.inf if noise == 0 else -math.inf if signal == 0 else 20 * math.log10(signal / noise),
    }
