"""Log-weight normalisation, resampling and the fused reweight step (SPEC §6.2–6.3) in Triton.

One program per prompt handles all its ``N`` particles in one block (``BLOCK = next_pow2(N)``,
``next_pow2(N + 1)`` for multinomial resampling; ``N <= 16383``): add the increments, normalise
(fp64 logsumexp), ESS, ``log Zhat`` increment, resample decision, and — for the prompts that
resample — systematic / stratified / multinomial resampling with the ancestor permutation of
SPEC §2, all in one launch for all prompts, with no host synchronisation (the decision stays on
the device).

Resampling follows :func:`tsmc_kernels.reference.resample` step by step in fp64 (weights
``exp(lw - logsumexp lw)``, inclusive cumulative sum normalised by its last element, positions
``(k + u_k) / N`` or normalised exponential spacings, uniforms from the counter-based hash with
stream ``STREAM_RESAMPLE``, row = prompt, counter as in ``reference.resample_positions``), so the
ancestors agree exactly with the reference except if a position falls within a rounding error
(~1e-16) of a cumulative weight. Parallel algorithm inside the program:

1. positions and cumulative weights are written to a per-prompt scratch row (global memory,
   then a CTA barrier);
2. offspring count of particle ``i``: ``G(i) - G(i-1)`` with ``G(i) = #{k : pos_k < C_i}`` found by
   a binary search of the positions for every ``i`` at once (``G(N-1) = N``), which is exactly
   the count of ``searchsorted(C, pos, right=True).clamp_max(N-1) == i``;
3. ``extra_end = cumsum(max(count - 1, 0))`` goes to scratch; every dead slot (``count == 0``)
   finds its source by a binary search of its dead rank in ``extra_end``; survivors keep ``a[i] = i``.

The fused :func:`reweight_triton` resamples from the **fp32** normalised weights, exactly like
``ops.reweight``'s unfused path (normalise -> fp32 -> resample), so both paths agree.
``ess < ess_threshold * N`` is compared against ``ess_threshold * N`` rounded to fp32.
"""
from __future__ import annotations

import math
import warnings

import torch
import triton
import triton.language as tl

from .. import reference, rng
from ._common import cumsum, helper, rmax, rsum, host_key_base, row_key, step_tensor, uniform_f64

__all__ = ["normalize_triton", "resample_triton", "reweight_triton", "MAX_N"]

MAX_N = 16383
_SCHEME_IDS = {"systematic": 0, "stratified": 1, "multinomial": 2}


@helper
def _lse(x):
    """fp64 logsumexp of a block (``-inf`` if every entry is ``-inf``)."""
    m = rmax(x, axis=0)
    safe = tl.where(m == float("-inf"), 0.0, m)
    s = rsum(tl.exp(x - safe), axis=0)
    return tl.where(m == float("-inf"), float("-inf"), safe + tl.log(s))


@helper
def _bisect(base_ptr, value, n, LOG: tl.constexpr, RIGHT: tl.constexpr):
    """Per lane: ``#{k < n : base[k] < value}`` (``RIGHT=False``) or ``<= value`` (``RIGHT=True``)
    for a sorted array (binary search, ``LOG >= log2(n + 1)`` rounds)."""
    lo = tl.full(value.shape, 0, tl.int32)
    hi = tl.full(value.shape, 0, tl.int32) + n
    for _ in tl.static_range(LOG):
        active = lo < hi
        mid = (lo + hi) // 2
        p = tl.load(base_ptr + mid, mask=active, other=0, volatile=True)
        if RIGHT:
            right = p <= value
        else:
            right = p < value
        lo = tl.where(active & right, mid + 1, lo)
        hi = tl.where(active & (~right), mid, hi)
    return lo


@helper
def _ancestors(lw, idx, N, key, pos_ptr, cw_ptr, ext_ptr, SCHEME: tl.constexpr, LOG: tl.constexpr):
    """SPEC §2 ancestors for one prompt from its fp64 log weights ``lw`` (``-inf`` past N)."""
    valid = idx < N
    lse = _lse(lw)
    w = tl.exp(lw - lse)
    w = tl.where(valid, w, 0.0)
    cw = cumsum(w, axis=0)
    cw = cw / rmax(cw, axis=0)  # the cumulative sum is nondecreasing: its max is its last element
    nf = N.to(tl.float64)
    kf = idx.to(tl.float64)
    if SCHEME == 0:
        u0 = uniform_f64(key, tl.full((), 0, tl.int32))
        pos = (kf + u0) / nf
    elif SCHEME == 1:
        pos = (kf + uniform_f64(key, idx)) / nf
    else:
        e = -tl.log(uniform_f64(key, idx))
        e = tl.where(idx <= N, e, 0.0)
        c = cumsum(e, axis=0)
        pos = c / rmax(c, axis=0)  # c[N]: exponentials are positive
    tl.store(pos_ptr + idx, pos, mask=valid)
    tl.store(cw_ptr + idx, cw, mask=valid)
    tl.debug_barrier()
    g_i = _bisect(pos_ptr, cw, N, LOG, False)
    g_i = tl.where(idx >= N - 1, N, g_i)
    cw_prev = tl.load(cw_ptr + idx - 1, mask=valid & (idx > 0), other=0.0, volatile=True)
    g_prev = _bisect(pos_ptr, cw_prev, N, LOG, False)
    g_prev = tl.where(idx == 0, 0, g_prev)
    count = tl.where(valid, g_i - g_prev, 0)
    extra = tl.maximum(count - 1, 0)
    extra_end = cumsum(extra, axis=0)
    dead = valid & (count == 0)
    dead_rank = cumsum(dead.to(tl.int32), axis=0) - 1
    tl.store(ext_ptr + idx, extra_end, mask=valid)
    tl.debug_barrier()
    src = _bisect(ext_ptr, tl.maximum(dead_rank, 0), N, LOG, True)
    src = tl.minimum(src, N - 1)
    return tl.where(dead, src, idx)


@triton.jit(do_not_specialize=["key_base", "ess_thr_n", "N"])
def _weights_kernel(lw_ptr, stride_lw, inc_ptr, stride_inc, mask_ptr, step_ptr, key_base, ess_thr_n, N,
                    out_w_ptr, ess_ptr, lz_ptr, flag_ptr, anc_ptr, pos_ptr, cw_ptr, ext_ptr,
                    MODE: tl.constexpr, HAS_INC: tl.constexpr, ALWAYS: tl.constexpr,
                    SCHEME: tl.constexpr, BLOCK: tl.constexpr, LOG: tl.constexpr):
    """MODE 0: normalise; 1: resample; 2: normalise + resample + reset (reweight)."""
    b = tl.program_id(0)
    b64 = b.to(tl.int64)
    idx = tl.arange(0, BLOCK)
    valid = idx < N
    lw = tl.load(lw_ptr + b64 * stride_lw + idx, mask=valid, other=float("-inf")).to(tl.float64)
    row = b64 * N
    if MODE == 1:
        lse = _lse(lw)
        do_res = (tl.load(mask_ptr + b).to(tl.int32) != 0) & (lse != float("-inf"))
        lwr = lw
    else:
        if HAS_INC:
            lw_new = lw + tl.load(inc_ptr + b64 * stride_inc + idx, mask=valid, other=0.0).to(tl.float64)
        else:
            lw_new = lw
        lse_prev = _lse(lw)
        lse = _lse(lw_new)
        dead = lse == float("-inf")
        norm = lw_new - tl.where(dead, 0.0, lse)
        ess = tl.where(dead, 0.0, 1.0 / rsum(tl.where(valid, tl.exp(2.0 * norm), 0.0), axis=0))
        log_z_inc = tl.where(dead, float("-inf"), lse - tl.where(lse_prev == float("-inf"), 0.0, lse_prev))
        if ALWAYS:
            do_res = ~dead
        else:
            do_res = (~dead) & (ess < ess_thr_n)
        norm32 = norm.to(tl.float32)
        tl.store(ess_ptr + b, ess.to(tl.float32))
        tl.store(lz_ptr + b, log_z_inc.to(tl.float32))
        tl.store(flag_ptr + b, do_res)
        if MODE == 0:
            tl.store(out_w_ptr + row + idx, norm32, mask=valid)
        lwr = norm32.to(tl.float64)
    if MODE != 0:
        if do_res:
            key = row_key(key_base, step_ptr, b)
            anc = _ancestors(lwr, idx, N, key, pos_ptr + row, cw_ptr + row, ext_ptr + row, SCHEME, LOG)
            tl.store(anc_ptr + row + idx, anc.to(tl.int64), mask=valid)
            if MODE == 2:
                reset = tl.full((BLOCK,), 0, tl.float64) - tl.log(N.to(tl.float64))
                tl.store(out_w_ptr + row + idx, reset.to(tl.float32), mask=valid)
        else:
            tl.store(anc_ptr + row + idx, idx.to(tl.int64), mask=valid)
            if MODE == 2:
                tl.store(out_w_ptr + row + idx, norm32, mask=valid)


def _row_major(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(1) == 1 else t.contiguous()


def _launch(mode: int, log_w: torch.Tensor, log_w_inc, mask, ess_threshold: float, scheme: str, seed: int, step,
            num_warps: int | None = None):
    if log_w.dim() != 2:
        raise ValueError(f"log_w must be [B, N], got shape {tuple(log_w.shape)}")
    B, N = log_w.shape
    dev = log_w.device
    out_w = torch.empty(B, N, dtype=torch.float32, device=dev)
    ess = torch.empty(B, dtype=torch.float32, device=dev)
    lz = torch.empty(B, dtype=torch.float32, device=dev)
    flag = torch.empty(B, dtype=torch.bool, device=dev)
    anc = torch.empty(B, N, dtype=torch.int64, device=dev)
    if B == 0 or N == 0:
        return out_w, ess, lz, flag, anc
    log_w = _row_major(log_w)
    has_inc = log_w_inc is not None
    inc = _row_major(log_w_inc) if has_inc else log_w
    if mode != 0:
        if scheme not in _SCHEME_IDS:
            raise ValueError(f"scheme {scheme!r} is not implemented in Triton; expected one of {tuple(_SCHEME_IDS)}")
        scratch_f = torch.empty(2, B * N, dtype=torch.float64, device=dev)
        ext = torch.empty(B * N, dtype=torch.int32, device=dev)
        pos, cw = scratch_f[0], scratch_f[1]
    else:
        pos = cw = out_w
        ext = ess
    if mask is None:
        mask = flag  # unused outside mode 1
    step_t = step_tensor(step, dev)
    # Multinomial resampling draws N + 1 exponentials (lane N is the normaliser); the other schemes
    # use lanes < N only, so N = 64 takes a 64-lane block, not 128 (half the work per thread).
    multinomial = mode != 0 and scheme == "multinomial"
    block = max(16, triton.next_power_of_2(N + 1 if multinomial else N))
    log = int(math.ceil(math.log2(N + 1))) + 1
    if num_warps is None:
        lanes = triton.next_power_of_2(N + 1)
        num_warps = 1 if lanes <= 128 else 4 if lanes <= 2048 else 8 if lanes <= 8192 else 16
    _weights_kernel[(B,)](
        log_w, log_w.stride(0), inc, inc.stride(0), mask, step_t, host_key_base(int(seed), rng.STREAM_RESAMPLE),
        float(ess_threshold) * N, N, out_w, ess, lz, flag, anc, pos, cw, ext,
        MODE=mode, HAS_INC=has_inc, ALWAYS=float(ess_threshold) >= 1.0, SCHEME=_SCHEME_IDS.get(scheme, 0),
        BLOCK=block, LOG=log, num_warps=num_warps)
    return out_w, ess, lz, flag, anc


def _too_many(N: int) -> bool:
    if N > MAX_N:
        warnings.warn(f"N={N} particles per prompt exceeds the Triton kernel's limit ({MAX_N}); "
                      "using the PyTorch reference (it synchronises with the host)")
        return True
    return False


def normalize_triton(log_w: torch.Tensor, log_w_inc: torch.Tensor | None = None, *, ess_threshold: float = 0.5):
    """Triton :func:`tsmc_kernels.reference.normalize_log_weights`: ``(log_w fp32, ess, log_z_inc, resample)``."""
    if _too_many(log_w.shape[-1]):
        return tuple(reference.normalize_log_weights(log_w, log_w_inc, ess_threshold=ess_threshold))
    out_w, ess, lz, flag, _ = _launch(0, log_w, log_w_inc, None, ess_threshold, "systematic", 0, 0)
    return out_w, ess, lz, flag


def resample_triton(log_w: torch.Tensor, mask: torch.Tensor | None = None, *, scheme: str = "systematic",
                    seed: int = 0, step=0) -> torch.Tensor:
    """Triton :func:`tsmc_kernels.reference.resample`: int64 ``[B, N]`` within-prompt ancestors.

    ``seed`` must already be folded to 32 bits. Prompts with ``mask == False`` or all ``-inf``
    weights get the identity.
    """
    if mask is None:
        mask = torch.ones(log_w.shape[0], dtype=torch.bool, device=log_w.device)
    if _too_many(log_w.shape[-1]):
        return reference.resample(log_w, mask, scheme=scheme, seed=seed, step=step)
    return _launch(1, log_w, None, mask.contiguous(), 0.0, scheme, seed, step)[4]


def reweight_triton(log_w: torch.Tensor, log_w_inc: torch.Tensor | None = None, *, ess_threshold: float = 0.5,
                    scheme: str = "systematic", seed: int = 0, step=0, num_warps: int | None = None):
    """Fused normalise + resample + reset in ONE launch for all prompts.

    ``num_warps`` per prompt's program: default 1 up to N = 127, then 4, 8, 16 (a tuning knob).
    Returns ``(log_w_after fp32 [B,N] (-log N where resampled), ess fp32 [B], log_z_inc fp32 [B],
    resampled bool [B], ancestors int64 [B,N])``. ``seed`` must already be folded to 32 bits.
    """
    if _too_many(log_w.shape[-1]):
        norm = reference.normalize_log_weights(log_w, log_w_inc, ess_threshold=ess_threshold)
        anc = reference.resample(norm.log_w, norm.resample, scheme=scheme, seed=seed, step=step)
        new_w = torch.where(norm.resample[:, None], torch.full_like(norm.log_w, -math.log(log_w.shape[1])), norm.log_w)
        return new_w, norm.ess, norm.log_z_inc, norm.resample, anc
    return _launch(2, log_w, log_w_inc, None, ess_threshold, scheme, seed, step, num_warps)
