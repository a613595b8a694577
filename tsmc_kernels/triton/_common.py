"""Pieces shared by the Triton kernels: the counter-based hash of :mod:`tsmc_kernels.rng` in
``tl.uint32`` arithmetic, its host-side half, and launch helpers.

The hash must produce the same bits as the PyTorch oracle. The per-row key is
``mix32(mix32(mix32(seed32 ^ stream * GOLDEN) ^ step32) ^ row32)``; the innermost
``mix32(seed32 ^ stream * GOLDEN)`` depends only on Python ints, so it is computed on the host
(:func:`host_key_base`) and passed to the kernel as a signed 32-bit int (one compiled variant
whatever the seed); the kernel reads ``step`` from a device tensor and finishes the key.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .. import rng

_M32 = 0xFFFFFFFF


def is_interpreter() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1`` at import time)."""
    import os
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def helper(fn):
    """Decorator for device functions called from kernels.

    Compiled: ``triton.jit``. Under the interpreter every call of a nested ``triton.jit``
    function re-patches ``triton.language`` (~3 ms each), which dominated test time; there the
    helpers stay plain Python functions, which the interpreter runs with the same semantics.
    """
    return fn if is_interpreter() else triton.jit(fn)


# Reductions and scans used by the kernels. Compiled, these are ``tl.max`` & co. Under the
# interpreter ``tl.max`` etc. are nested jit functions (slow, see :func:`helper`); calling
# ``tl.reduce`` / ``tl.associative_scan`` with Triton's own combine functions hits the
# interpreter's numpy fast paths instead (same results; NaN is ignored by the interpreter's max,
# which the kernels' outputs never depend on: a row holding a NaN is flagged and its outputs set).
if is_interpreter():
    _std = tl.standard

    def rmax(x, axis):
        return tl.reduce(x, axis, _std._elementwise_max)

    def rmin(x, axis):
        return tl.reduce(x, axis, _std._elementwise_min)

    def rsum(x, axis):
        return tl.reduce(x, axis, _std._sum_combine)

    def cumsum(x, axis):
        return tl.associative_scan(x, axis, _std._sum_combine)
else:
    rmax = tl.max
    rmin = tl.min
    rsum = tl.sum
    cumsum = tl.cumsum


if is_interpreter():
    def rsum_pair(a, b):
        """``(sum of a, sum of b)`` over axis 0."""
        return rsum(a, 0), rsum(b, 0)

    def rsum_triple(a, b, c):
        """``(sum of a, sum of b, sum of c)`` over axis 0."""
        return rsum(a, 0), rsum(b, 0), rsum(c, 0)

    def rmax_pair(a, b):
        """``(max of a, max of b)`` over axis 0 (NaN ignored, as ``tl.max``)."""
        return rmax(a, 0), rmax(b, 0)
else:
    @triton.jit
    def _add_pair(a0, b0, a1, b1):
        return a0 + a1, b0 + b1

    @triton.jit
    def _add_triple(a0, b0, c0, a1, b1, c1):
        return a0 + a1, b0 + b1, c0 + c1

    @triton.jit
    def _max_pair(a0, b0, a1, b1):
        return tl.maximum(a0, a1), tl.maximum(b0, b1)

    @triton.jit
    def rsum_pair(a, b):
        """``(sum of a, sum of b)`` over axis 0 in one reduction (one shared-memory exchange)."""
        return tl.reduce((a, b), 0, _add_pair)

    @triton.jit
    def rsum_triple(a, b, c):
        """``(sum of a, sum of b, sum of c)`` over axis 0 in one reduction."""
        return tl.reduce((a, b, c), 0, _add_triple)

    @triton.jit
    def rmax_pair(a, b):
        """``(max of a, max of b)`` over axis 0 in one reduction (NaN ignored, as ``tl.max``)."""
        return tl.reduce((a, b), 0, _max_pair)


def _host_mix32(x: int) -> int:
    x &= _M32
    x ^= x >> 16
    x = (x * 0x7FEB352D) & _M32
    x ^= x >> 15
    x = (x * 0x846CA68B) & _M32
    return x ^ (x >> 16)


def host_key_base(seed32: int, stream: int) -> int:
    """``mix32(seed32 ^ stream * GOLDEN)`` as a signed int32 (kernel argument)."""
    v = _host_mix32((seed32 & _M32) ^ ((stream * rng._GOLDEN) & _M32))
    return v - (1 << 32) if v >= (1 << 31) else v


@helper
def mix32(x):
    """lowbias32 on ``tl.uint32`` values (wrapping multiplication, deliberately unsanitised)."""
    x = x ^ (x >> 16)
    x = tl.mul(x, tl.full((), 0x7FEB352D, tl.uint32), sanitize_overflow=False)
    x = x ^ (x >> 15)
    x = tl.mul(x, tl.full((), 0x846CA68B, tl.uint32), sanitize_overflow=False)
    x = x ^ (x >> 16)
    return x


@helper
def row_key(key_base, step_ptr, row):
    """Finish :func:`tsmc_kernels.rng.row_key` on the device: ``step`` is read from memory."""
    base = key_base.to(tl.uint32, bitcast=True)
    step32 = (tl.load(step_ptr).to(tl.int64) & 0xFFFFFFFF).to(tl.uint32)
    row32 = (row.to(tl.int64) & 0xFFFFFFFF).to(tl.uint32)
    return mix32(mix32(base ^ step32) ^ row32)


@helper
def hash_bits(key, counter):
    """``mix32(key ^ counter * 0x85EBCA6B)`` as ``tl.uint32``."""
    c = tl.mul((counter.to(tl.int64) & 0xFFFFFFFF).to(tl.uint32), tl.full((), 0x85EBCA6B, tl.uint32),
               sanitize_overflow=False)
    return mix32(key ^ c)


@helper
def uniform_f64(key, counter):
    """``rng.uniform`` in fp64: ``(bits + 0.5) / 2**32``, exact."""
    k = hash_bits(key, counter)
    return (k.to(tl.float64) + 0.5) * 2.3283064365386963e-10


if is_interpreter() or torch.version.hip is not None:
    @helper
    def fast_log(x):
        """Natural log (interpreter / ROCm: ``tl.log``)."""
        return tl.log(x)

    @helper
    def exp_neg_abs(x):
        """``exp(-|x|)`` (interpreter / ROCm: ``tl.exp``)."""
        return tl.exp(-tl.abs(x))
else:
    from triton.language.extra import libdevice

    @helper
    def fast_log(x):
        """``lg2.approx`` based natural log (abs. error ~1e-7 near 1, rel. ~1e-7 elsewhere)."""
        return libdevice.fast_logf(x)

    @helper
    def exp_neg_abs(x):
        """``exp(-|x|)`` by ``ex2.approx.ftz``: results below 2**-126 flush to 0 (they only ever enter
        sums that hold a 1), which saves the denormal fix-up (3 instructions) ``tl.exp`` gets."""
        return tl.inline_asm_elementwise("ex2.approx.ftz.f32 $0, $1;", "=f,f", [tl.abs(x) * -1.4426950408889634],
                                         dtype=tl.float32, is_pure=True, pack=1)


@helper
def gumbel_f32(key, counter):
    """``rng.gumbel`` in fp32: within ~3e-7 of it, plus the rounding of ``g`` to fp32 (half an ulp: up
    to 1e-6 for ``g >= 16``); CUDA's ``lg2.approx`` adds ~1e-7.

    ``g = -log(E)`` with ``E = -log(u)``, ``u = (k + 0.5) / 2**32``; what matters is ``E`` to a
    small *relative* error, including ``E -> 0`` (``u -> 1``), which is exactly where the Gumbel-max
    winner lives and where a plain ``-log(u)`` in fp32 loses everything. Both halves start from
    ``x = (m + 0.5) / 2**32 <= 1/2`` with ``m = min(k, ~k)`` (one conversion, exact in the integers,
    6e-8 relative in fp32): ``x = u`` when ``u < 1/2``, where ``E = -log(x) >= log 2``, and
    ``x = 1 - u`` otherwise, where ``E = -log1p(-x) = x * P(x)`` by a polynomial (no division, no
    log near 1). Each element costs two logs (``lg2.approx`` on CUDA) and eleven FMAs; the former
    atanh series with a division cost a third MUFU op and ~8 more instructions per element
    (``bench/sass_profile.py`` counts them).
    """
    k = hash_bits(key, counter)
    hi = (k >> 31) != 0  # u >= 1/2
    m = tl.where(hi, ~k, k)
    x = m.to(tl.float32) * 2.3283064365386963e-10 + 1.1641532182693481e-10  # (m + 0.5) / 2**32, one FMA
    # P(x) = -log1p(-x) / x on [0, 1/2]: the degree-9 Chebyshev interpolant in monomial form (relative
    # error 6e-9 with the coefficients in fp32, ~8e-8 evaluated in fp32).
    p = 1.733611959218979 * x + -2.4589618958532813
    p = p * x + 1.9598705801879994
    p = p * x + -0.5900887011957825
    p = p * x + 0.3407464691388898
    p = p * x + 0.1754407734298354
    p = p * x + 0.25195679414147587
    p = p * x + 0.33325516201040967
    p = p * x + 0.5000011985838678
    p = p * x + 0.9999999969965209
    e = tl.where(hi, x * p, -fast_log(x))
    return -fast_log(e)


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of ``device`` (a small stand-in on CPU, to exercise split paths)."""
    if device.type == "cuda":
        return _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    return 2


def default_splits(M: int, units: int, device: torch.device) -> int:
    """Programs per row along the vocabulary: 1 when ``M`` rows alone fill the GPU (``>= 4`` per
    SM), else ~8 programs per SM in all, at most one per ``units`` (the indivisible pieces of a
    row: vocabulary groups, tiles)."""
    sms = num_sms(device)
    if M >= 4 * sms or units < 2:
        return 1
    return max(1, min(-(-8 * sms // M), units))


def step_tensor(step, device: torch.device, rows: int | None = None) -> torch.Tensor:
    """An int64 tensor on ``device`` holding ``step``: ``[1]``, or ``[rows]`` (one step per row) when
    ``rows`` is given and ``step`` has that many elements (a tensor is used as is, no copy)."""
    if isinstance(step, torch.Tensor):
        if step.device != device:
            raise ValueError(f"step is on {step.device} but the data is on {device}")
        if step.numel() != 1 and not (rows is not None and step.dim() == 1 and step.numel() == rows):
            raise ValueError(f"step must have one element{f' or {rows}' if rows is not None else ''}, "
                             f"got shape {tuple(step.shape)}")
        if step.dtype != torch.int64:
            step = step.to(torch.int64)
        return step.reshape(-1)
    # A fill kernel, not torch.tensor (a host-to-device copy, which CUDA-graph capture refuses).
    return torch.full((1,), int(step), dtype=torch.int64, device=device)
