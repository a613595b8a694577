"""The top-k threshold of :func:`~.twist_sample.twist_sample_triton`: per row, the k-th largest
of ``u = x + log psi`` (fp32, as the sampling kernel forms it), by radix select.

Each score becomes an order-preserving ``uint32`` key (``~bits`` for negatives, ``bits | 2**31``
otherwise; ``-0`` as ``+0``; NaN and ``+inf`` as ``-inf``, as the sampling kernel treats them) and
the k-th largest key is found 8 bits at a time from the top. Pass ``p`` reads the row once and
counts, in a 256-bin histogram, the next digit of the entries whose key agrees with the digits
found so far; the digit holding the k-th largest is the highest bin whose count from the top
reaches the k still to find. Keys of bf16 logits without a twist carry 16 significant bits and
of fp16 ones 19 (the rest are fixed), so those take 2 and 3 passes; any other input 4.

Each pass is one launch over ``(rows, splits)`` (the vocabulary is split across programs when
rows are few, as in the sampling kernel): a program first finishes the previous pass's digit from
the row's partial histograms (every program of the row gets the same answer; no atomics, so the
result is deterministic), then writes its own partial histogram. A last one-program-per-row
launch finishes the last digit and writes the value. Nothing is read back on the host: CUDA-graph
capturable. The result is exactly ``torch.topk(u, k).values[:, -1]`` (``+0`` where that is ``-0``).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import cumsum, default_splits, helper, rmax, rsum

__all__ = ["topk_threshold_triton"]

_BINS = tl.constexpr(256)  # one 8-bit digit per pass


@helper
def _keys(l_base, t_base, offs, V, HAS_TWIST: tl.constexpr):
    """Order-preserving ``uint32`` keys of the scores at ``offs`` (entries at or past ``V``: ``-inf``)."""
    ok = offs < V
    u = tl.load(l_base + offs, mask=ok, other=float("-inf")).to(tl.float32)
    if HAS_TWIST:
        u = u + tl.load(t_base + offs, mask=ok, other=0.0).to(tl.float32)
    u = tl.where((u != u) | (u == float("inf")), float("-inf"), u)
    b = u.to(tl.uint32, bitcast=True)
    b = tl.where(b == 0x80000000, 0, b)  # -0 -> +0
    return tl.where(b >= 0x80000000, ~b, b | 0x80000000)


@helper
def _select(h, prefix, k_rem, SHIFT: tl.constexpr):
    """The digit at ``SHIFT`` of the k_rem-th largest key among those counted in ``h`` (int32 [256]):
    returns ``prefix`` with it set and the rank still to find inside its bin."""
    bins = tl.arange(0, _BINS)
    from_top = rsum(h, 0) - cumsum(h, 0) + h  # entries in bins >= b
    digit = rmax(tl.where(from_top >= k_rem, bins, -1), 0)
    here = bins == digit
    k_rem = k_rem - (rsum(tl.where(here, from_top, 0), 0) - rsum(tl.where(here, h, 0), 0))
    return prefix | (digit.to(tl.uint32) << SHIFT), k_rem


@helper
def _row_state(row, nsplit, k, hist_in, state_in, PASS: tl.constexpr):
    """``(prefix, k_rem)`` after the digits of passes ``< PASS`` (read back from the previous pass)."""
    prefix = tl.full((), 0, tl.uint32)
    k_rem = tl.full((), 0, tl.int32) + k
    if PASS > 0:
        if PASS > 1:
            prefix = tl.load(state_in + row * 2).to(tl.uint32)
            k_rem = tl.load(state_in + row * 2 + 1).to(tl.int32)
        bins = tl.arange(0, _BINS)
        h = tl.zeros((_BINS,), tl.int32)
        for s in range(0, nsplit):
            h += tl.load(hist_in + (row * nsplit + s) * _BINS + bins)
        prefix, k_rem = _select(h, prefix, k_rem, 24 - 8 * (PASS - 1))
    return prefix, k_rem


@triton.jit(do_not_specialize=["k", "tiles_per_split"])
def _radix_pass_kernel(logits_ptr, stride_l, twist_ptr, stride_t, V, k, tiles_per_split, hist_in, hist_out,
                       state_in, state_out, PASS: tl.constexpr, HAS_TWIST: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    split = tl.program_id(1)
    nsplit = tl.num_programs(1)
    row64 = row.to(tl.int64)
    prefix, k_rem = _row_state(row64, nsplit, k, hist_in, state_in, PASS)
    if PASS > 0:
        if split == 0:
            tl.store(state_out + row64 * 2, prefix.to(tl.int64))
            tl.store(state_out + row64 * 2 + 1, k_rem.to(tl.int64))
    SHIFT: tl.constexpr = 24 - 8 * PASS
    l_base = logits_ptr + row64 * stride_l
    t_base = twist_ptr + row64 * stride_t
    lanes = tl.arange(0, BLOCK)
    h = tl.zeros((_BINS,), tl.int32)
    t_begin = split * tiles_per_split
    for t in range(t_begin, tl.minimum(t_begin + tiles_per_split, tl.cdiv(V, BLOCK))):
        offs = t * BLOCK + lanes
        key = _keys(l_base, t_base, offs, V, HAS_TWIST)
        keep = offs < V
        if PASS > 0:
            keep = keep & ((key >> (SHIFT + 8)) == (prefix >> (SHIFT + 8)))
        h += tl.histogram(((key >> SHIFT) & 0xFF).to(tl.int32), _BINS, mask=keep)
    tl.store(hist_out + (row64 * nsplit + split) * _BINS + tl.arange(0, _BINS), h)


@triton.jit(do_not_specialize=["k"])
def _radix_finish_kernel(k, nsplit, hist_in, state_in, thr_ptr, PASSES: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    prefix, _k = _row_state(row, nsplit, k, hist_in, state_in, PASSES)
    # The key's bits below the last digit are 0 for a positive score and 1 for a negative one: the
    # score's own bits there are 0 either way.
    HIGH: tl.constexpr = (0xFFFFFFFF >> (32 - 8 * PASSES)) << (32 - 8 * PASSES)
    bits = tl.where(prefix >= 0x80000000, prefix ^ 0x80000000, ~prefix & tl.full((), HIGH, tl.uint32))
    tl.store(thr_ptr + row, bits.to(tl.float32, bitcast=True))


def _passes(logits: torch.Tensor, has_twist: bool) -> int:
    if not has_twist and logits.dtype == torch.bfloat16:
        return 2
    if not has_twist and logits.dtype == torch.float16:
        return 3
    return 4


def topk_threshold_triton(logits: torch.Tensor, log_twist: torch.Tensor | None, top_k: int, *,
                          num_splits: int | None = None, block: int | None = None,
                          num_warps: int = 4) -> torch.Tensor:
    """Per-row k-th largest of ``logits + log_twist`` in fp32 (NaN and ``+inf`` count as ``-inf``).

    Args:
        logits: ``[M, V]`` fp32/bf16/fp16/fp64 with unit stride along V.
        log_twist: ``[M, V]`` (unit stride along V) or ``None``.
        top_k: ``k`` in ``[1, V]``.
        num_splits: programs per row along V (default: ~8 programs per SM in all, 1 when rows fill the GPU).
        block: entries per program and iteration (a power of two, default 2048 on CUDA).
    Returns:
        fp32 ``[M]``: ``torch.topk(u, top_k).values[:, -1]`` for the fp32 scores ``u``.
    """
    M, V = logits.shape
    if not 1 <= top_k <= V:
        raise ValueError(f"top_k must be in [1, {V}], got {top_k}")
    dev = logits.device
    thr = torch.empty(M, dtype=torch.float32, device=dev)
    if M == 0:
        return thr
    has_twist = log_twist is not None
    twist = log_twist if has_twist else logits
    if block is None:
        block = 2048 if dev.type == "cuda" else 1024
    block = min(block, max(16, triton.next_power_of_2(V)))
    n_tiles = triton.cdiv(V, block)
    if num_splits is None:
        num_splits = default_splits(M, n_tiles, dev)
    tiles_per_split = triton.cdiv(n_tiles, max(1, min(int(num_splits), n_tiles)))
    splits = triton.cdiv(n_tiles, tiles_per_split)
    hist = torch.empty(2, M, splits, 256, dtype=torch.int32, device=dev)
    state = torch.empty(2, M, 2, dtype=torch.int64, device=dev)
    passes = _passes(logits, has_twist)
    for p in range(passes):
        _radix_pass_kernel[(M, splits)](
            logits, logits.stride(0), twist, twist.stride(0), V, top_k, tiles_per_split,
            hist[(p - 1) % 2], hist[p % 2], state[(p - 1) % 2], state[p % 2],
            PASS=p, HAS_TWIST=has_twist, BLOCK=block, num_warps=num_warps)
    _radix_finish_kernel[(M,)](top_k, splits, hist[(passes - 1) % 2], state[(passes - 1) % 2], thr, PASSES=passes,
                               num_warps=1)
    return thr
