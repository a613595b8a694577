"""Fused twist scoring + Gumbel-max sampling (SPEC §6.1), one pass over the vocabulary per row.

Each program streams a range of vocabulary tiles of one row, reading every logit and twist
once, two tiles per iteration with the next two already being loaded. Per tile pair, one max
and one sum block reduction (tuples: one shared-memory exchange each) give

* the base's ``(max, sum e^(x-max), sum e^(x-max) (x-max))``, folded into the row's ``logsumexp(x)``
  (max ``m0``, sum ``S0``) and entropy sum ``A0 = sum e^(x-m0) (x-m0)`` (fp64 scalars, rescaled as
  ``A <- e^(m-m')(A + (m-m') S)``; maxima start at ``-1e30`` and ``x - max`` is clamped there, so
  that ``-inf`` entries add exactly 0 and ``0 * inf`` never appears; entries below ``-1e30`` count
  as ``-inf``, and a row with nothing above it as a row without a finite entry), giving
  ``H = log S0 - A0 / S0``;
* the proposal's ``(max, sum e^(r-max))`` for ``r = (x + log psi) / T`` (top-k restricted): the
  group's log mass, folded into the row's ``logsumexp(r)`` (``m2, S2``).

Without a twist, at ``T = 1`` and without top-k the proposal is ``x`` itself: one ``exp`` per
element serves both. ``logsumexp(x + log psi)`` (``m1, S1``), giving
``log Zpi = (m1 - m0) + log S1 - log S0``, is the proposal's own unless a temperature or top-k
makes them differ; then every lane keeps it online (one ``exp`` per element: :func:`_online`),
reduced once at the end.

The token is drawn by the two-level Gumbel-max of
:func:`tsmc_kernels.reference.gumbel_max`: when a group of ``rng.TOKEN_GROUP = 2048`` ids (a tile
pair by default) is complete, its log mass plus its group noise is compared with the best so
far (the leader's index is kept: a select, no branch); after the loop the winner's tokens are
drawn (``argmax r + g`` over its 2048 entries, read again: 1.3% more bytes at V = 151936). Token
noise is thus drawn for one group instead of every entry. (Until 2026-12-05 every group that took
the lead was drawn inside the loop, ``ln(#groups) + 0.6`` times per row, and the base's sums were
per-lane accumulators: the branch with its nested loop and those accumulators held registers for
the whole loop, 124 per thread with a twist at 4 warps where it now takes 69, and 90 without
where it takes 52: more programs per SM now, more bytes in flight.)

Compiled for sm_90 (bf16 inputs, 1024-wide tiles, 4 warps; ``exp`` is ``ex2.approx.ftz``), the loop
issues 18 SASS instructions per element without a twist and 29 with one for a group too light to
take the lead (its group noise skipped; 20 / 31 with it; ``bench/sass_profile.py``, Triton 3.9; 31 / 40
at 8 warps before 2026-12-05, where the per-pair block reductions weigh twice as much).
``num_stages >= 2`` replaces the register prefetch of the next pair by Triton's cp.async
pipeline into shared memory (about 2 more instructions per element, more bytes in flight).

Everything is fp32 inside (the cross-lane / cross-split sums of ``x`` in fp64, the row's proposal
sum in fp64); inputs may be fp32/bf16/fp16/fp64.
The noise is the counter-based hash of :mod:`tsmc_kernels.rng` (streams ``STREAM_TOKEN_GROUP``,
counter = group index, and ``STREAM_TOKEN``, counter = vocabulary index; row = particle row) in
``tl.uint32`` arithmetic: the same bits as the reference, so tokens agree with it except at
fp32-level near-ties of a group's or a token's score. ``step`` is read from a device tensor inside
the kernel (CUDA-graph safe, no host sync).

When there are few rows (``M < 4 * #SMs``) the vocabulary is split across several programs per
row, each with whole groups, that write partial sums and their best group; a second small kernel
combines them and draws the token in the winning group (no atomics, the result does not depend
on the split). With one split the first kernel writes the outputs directly.

Top-k (``top_k > 0``): the per-row k-th largest value of ``x + log psi`` (fp32, computed the same
way as in the kernel) is found first by the radix select of :mod:`.topk` (2 to 4 more reads of
the inputs, on the device, no host sync); the kernel then keeps the entries ``>=`` it. The
reference picks the k-th largest in fp64, so the kept sets can differ only where fp32 rounding
creates a tie at the boundary.

Rows with bad values follow the convention of every backend (``ops.twist_sample``): token 0; a NaN
or ``+inf`` logit makes ``logp``, ``logq``, ``log_zpi`` and ``entropy`` NaN, a NaN or ``+inf`` twist
``logq`` and ``log_zpi``. A row whose proposal has no finite entry returns token 0 and ``logq = -inf``.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import rng
from ._common import (default_splits, exp_neg_abs, gumbel_f32, helper, host_key_base, rmax, rmax_pair, rmin,
                      row_key, rsum, rsum_pair, rsum_triple, step_tensor)
from .topk import topk_threshold_triton

__all__ = ["twist_sample_triton"]

_NF = 10  # fp64 fields per partial: m0 S0 A0 m1 S1 m2 S2 best_val bad_x bad_tw


_NEG_INF = tl.constexpr(float("-inf"))
# The running max of a lane that has seen nothing yet. Finite, so v - m is never -inf - -inf, and
# far enough from FLT_MAX that v - m cannot overflow for any finite v. Entries below it act as -inf:
# next to any ordinary logit their weight e^(v - max) is 0 anyway (finfo.min masks, for instance).
_FLOOR = tl.constexpr(-1e30)
_D_MIN = tl.constexpr(-1e30)  # v - m is clamped here: exp(-1e30) = 0 and 0 * -1e30 = 0
_POS_INF = tl.constexpr(float("inf"))
_GUMBEL_MAX = tl.constexpr(23.0)  # above every value of gumbel_f32 (at most 33 log 2 = 22.87 + rounding)


@helper
def _online(m, s, v):
    """Per-lane online (max, sum e^(v-max)) update with ONE exp per element.

    ``m`` starts at ``_FLOOR = -1e30`` (finite: no ``-inf - -inf``), ``s`` at 0. ``e = exp(-|d|)`` with
    ``d = max(v - m, -1e30)`` serves both cases: a new maximum rescales the old sum by ``e``, any
    other value adds ``e``. A ``-inf`` entry gives ``d = -1e30``, ``e = 0``: no change (and
    ``e * d = 0``, not NaN). A NaN entry makes ``s`` NaN (the clamp keeps NaN), a ``+inf`` one
    makes ``m`` ``+inf``: :func:`_lanes_to_scalar` and the kernel flag both from the final state.
    """
    gt = v > m
    d = tl.maximum(v - m, _D_MIN, propagate_nan=tl.PropagateNan.ALL)
    e = exp_neg_abs(d)
    s_new = tl.where(gt, s * e + 1.0, s + e)
    return tl.where(gt, v, m), s_new, d, e, gt


@helper
def _lanes_to_scalar(m, s):
    """Combine per-lane (max, sum) into one: fp32 max (``-inf`` when no lane saw a finite value),
    fp64 sum (NaN when a lane saw a NaN)."""
    live = s != 0.0
    mm = rmax(tl.where(live, m, _NEG_INF), axis=0)
    safe = tl.where(mm == _NEG_INF, 0.0, mm)
    sc = tl.where(live, tl.exp(m - safe), 0.0).to(tl.float64)
    return mm, rsum(sc * s.to(tl.float64), axis=0)


@helper
def _finalize(row, logits_ptr, stride_l, twist_ptr, stride_t, inv_temp,
              m0, s0, a0, m1, s1, m2, s2, best_idx, bad_x, bad_tw,
              token_ptr, logp_ptr, logq_ptr, lzpi_ptr, lpsi_ptr, ent_ptr,
              HAS_TWIST: tl.constexpr, TEMPERED: tl.constexpr):
    row64 = row.to(tl.int64)
    no_draw = s2 == 0.0  # the proposal has no finite entry: token 0
    bx = bad_x != 0
    bt = bad_tw != 0
    tok = tl.where(no_draw | bx | bt, 0, best_idx)
    # The winner's logit and twist are read again here (two scalar loads, cached).
    tx = tl.load(logits_ptr + row64 * stride_l + tok).to(tl.float32)
    if HAS_TWIST:
        tt = tl.load(twist_ptr + row64 * stride_t + tok).to(tl.float32)
    else:
        tt = tl.full((), 0, tl.float32)
    dead0 = s0 == 0.0  # every logit is -inf
    log_s0 = tl.log(tl.where(dead0, 1.0, s0)).to(tl.float32)
    logp = tl.where(dead0, _NEG_INF, (tx - m0) - log_s0)
    dead1 = s1 == 0.0
    log_s1 = tl.log(tl.where(dead1, 1.0, s1)).to(tl.float32)
    log_zpi = tl.where(dead0 | dead1, _NEG_INF, (m1 - m0) + (log_s1 - log_s0))
    a0_over = (a0 / tl.where(dead0, 1.0, s0)).to(tl.float32)
    entropy = tl.where(dead0, 0.0, log_s0 - a0_over)
    r_tok = tx + tt
    if TEMPERED:
        r_tok = r_tok * inv_temp
    log_s2 = tl.log(tl.where(s2 == 0.0, 1.0, s2)).to(tl.float32)
    logq = tl.where(no_draw, _NEG_INF, (r_tok - m2) - log_s2)
    # Bad values (token 0, above): NaN / +inf logits poison the row, NaN / +inf twists its log Zpi and logq.
    logp = tl.where(bx, float("nan"), logp)
    entropy = tl.where(bx, float("nan"), entropy)
    log_zpi = tl.where(bx | bt, float("nan"), log_zpi)
    logq = tl.where(bx | bt, float("nan"), logq)
    tl.store(token_ptr + row, tok.to(tl.int64))
    tl.store(logp_ptr + row, logp)
    tl.store(logq_ptr + row, logq)
    tl.store(lzpi_ptr + row, log_zpi)
    tl.store(lpsi_ptr + row, tt)
    tl.store(ent_ptr + row, entropy)


@helper
def _proposal_r(u, thr, inv_temp, TEMPERED: tl.constexpr, TOPK: tl.constexpr):
    """The proposal's scores ``r = u / T`` (``-inf`` outside the top-k) from ``u = x + log psi``."""
    r = u
    if TEMPERED:
        r = r * inv_temp
    if TOPK:
        r = tl.where(u >= thr, r, _NEG_INF)
    return r


@helper
def _fold(m, s, m_add, s_add):
    """Online logsumexp of scalars, one ``exp``: ``(m, s)`` and ``(m_add, s_add)`` (sums relative to
    maxima that are at least ``_FLOOR``, so ``m_add - m`` is never NaN) into one, in ``s``'s dtype."""
    gt = m_add > m
    e = exp_neg_abs(m_add - m)
    return tl.maximum(m, m_add), tl.where(gt, s * e.to(s.dtype) + s_add, s + s_add * e)


@helper
def _entropy_terms(xa, xb, mx):
    """Per lane ``e^(x - mx)`` and ``e^(x - mx) (x - mx)`` summed over two tiles, with ``x - mx``
    clamped at ``-1e30`` as in :func:`_online` (``mx`` at least ``_FLOOR``): a ``-inf`` entry adds
    exactly 0, a NaN entry (or ``+inf``, through ``mx``) NaN."""
    da = tl.maximum(xa - mx, _D_MIN, propagate_nan=tl.PropagateNan.ALL)
    db = tl.maximum(xb - mx, _D_MIN, propagate_nan=tl.PropagateNan.ALL)
    ea = exp_neg_abs(da)
    eb = exp_neg_abs(db)
    return ea + eb, ea * da + eb * db


@helper
def _pair_lse_entropy(xa, xb):
    """``(max, sum e^(x - max), sum e^(x - max) (x - max))`` of two tiles as fp32 scalars (the max
    at least ``_FLOOR``): the base's pair sums, which are also the proposal's when ``r = x``."""
    mx = tl.maximum(rmax(tl.maximum(xa, xb), axis=0), _FLOOR)
    s_terms, a_terms = _entropy_terms(xa, xb, mx)
    s, a = rsum_pair(s_terms, a_terms)
    return mx, s, a


@helper
def _pair_sums(xa, xb, ra, rb):
    """The base's pair sums (as :func:`_pair_lse_entropy`) and the proposal's ``(max, sum e^(r - max))``
    (the max at least ``_FLOOR``; a NaN or ``+inf`` entry makes the sum NaN), with one max and one
    sum reduction for both: ``(mr, sr, mx, sx, ax)``."""
    mx, mr = rmax_pair(tl.maximum(xa, xb), tl.maximum(ra, rb))
    mx = tl.maximum(mx, _FLOOR)
    mr = tl.maximum(mr, _FLOOR)
    s_terms, a_terms = _entropy_terms(xa, xb, mx)
    sx, ax, sr = rsum_triple(s_terms, a_terms, exp_neg_abs(ra - mr) + exp_neg_abs(rb - mr))
    return mr, sr, mx, sx, ax


@helper
def _fold_entropy(m, s, a, m_add, s_add, a_add):
    """:func:`_fold` of ``(max, sum, entropy sum)`` scalars (the entropy sum ``a = sum e^(x-m) (x-m)``
    rescaled as ``a <- e^(m-m')(a + (m-m') s)``; ``e * d`` first, so that a huge ``d`` next to a
    zero sum gives 0 rather than ``0 * inf``)."""
    d = m_add - m
    gt = d > 0
    e = exp_neg_abs(d)
    ed = e * d
    s_new = tl.where(gt, s * e.to(s.dtype) + s_add, s + s_add * e)
    a_new = tl.where(gt, a * e.to(a.dtype) - ed.to(a.dtype) * s + a_add, a + (a_add * e + ed * s_add))
    return tl.maximum(m, m_add), s_new, a_new


@helper
def _load_pair(base, offs, v_end, other, BLOCK: tl.constexpr):
    """The tiles at ``offs`` and ``offs + BLOCK`` (entries at or past ``v_end`` read as ``other``)."""
    return (tl.load(base + offs, mask=offs < v_end, other=other),
            tl.load(base + offs + BLOCK, mask=offs + BLOCK < v_end, other=other))


@helper
def _load_inputs(l_base, t_base, offs, v_end, HAS_TWIST: tl.constexpr, BLOCK: tl.constexpr):
    """The logits and twists of the tile pair at ``offs`` as loaded (the logits stand in for the
    twists when there are none: unused then)."""
    xa, xb = _load_pair(l_base, offs, v_end, _NEG_INF, BLOCK)
    if HAS_TWIST:
        ta, tb = _load_pair(t_base, offs, v_end, 0.0, BLOCK)
    else:
        ta = xa
        tb = xb
    return xa, xb, ta, tb


@helper
def _tile_draw(key, r, offs, bv, bi):
    """Gumbel-max over one tile: per-lane running maxima ``bv`` of ``r + g`` at indices ``bi``."""
    val = r + gumbel_f32(key, offs)  # the noise is finite: -inf entries stay -inf
    upd = val > bv
    return tl.where(upd, val, bv), tl.where(upd, offs, bi)


@helper
def _group_draw(key, l_base, t_base, thr, inv_temp, g_start, V, lanes,
                HAS_TWIST: tl.constexpr, TEMPERED: tl.constexpr, TOPK: tl.constexpr,
                BLOCK: tl.constexpr, TILES_PER_GROUP: tl.constexpr):
    """The token drawn in the group starting at ``g_start``: ``argmax r + g`` over its entries, read
    again (earliest index on ties); ``r`` is formed exactly as in the main loop."""
    bv = tl.full((BLOCK,), 0, tl.float32) + _NEG_INF
    bi = tl.full((BLOCK,), 0, tl.int32)
    for tile_start in range(g_start, tl.minimum(g_start + TILES_PER_GROUP * BLOCK, V), BLOCK):
        offs = tile_start + lanes
        x = tl.load(l_base + offs, mask=offs < V, other=_NEG_INF).to(tl.float32)
        if HAS_TWIST:
            u = x + tl.load(t_base + offs, mask=offs < V, other=0.0).to(tl.float32)
        else:
            u = x
        bv, bi = _tile_draw(key, _proposal_r(u, thr, inv_temp, TEMPERED, TOPK), offs, bv, bi)
    best = rmax(bv, axis=0)
    return rmin(tl.where(bv == best, bi, 2147483647), axis=0)


@helper
def _close_group(gm, gs, group, m2, s2, best_val, best_idx, group_key):
    """A group is complete (log mass ``gm + log gs``): the upper level of reference.gumbel_max. It
    leads when its log mass + group noise beats every earlier group's (earliest on ties); its index
    is kept, and the winner's tokens are drawn once after the loop (:func:`_draw_in_group`; by the
    combine kernel when the row is split). Folds the group into the row's sums ``(m2, s2)``."""
    group = tl.full((), 0, tl.int32) + group  # (a Python int under the interpreter)
    log_mass = tl.where(gs > 0.0, gm + tl.log(gs), _NEG_INF)
    # The noise never exceeds 33 log 2 = 22.87 (32-bit uniforms): a group that cannot take the lead
    # even with more skips it (~40 instructions per pair; LM rows hold few groups of any weight).
    if log_mass + _GUMBEL_MAX > best_val:
        cand = log_mass + gumbel_f32(group_key, group)
        lead = cand > best_val
        best_val = tl.where(lead, cand, best_val)
        best_idx = tl.where(lead, group, best_idx)
    m2, s2 = _fold(m2, s2, gm, gs)
    return m2, s2, best_val, best_idx


@helper
def _draw_in_group(best_val, group, key, l_base, t_base, thr, inv_temp, V, HAS_TWIST: tl.constexpr,
                   TEMPERED: tl.constexpr, TOPK: tl.constexpr, BLOCK: tl.constexpr, TILES_PER_GROUP: tl.constexpr):
    """The token of the row: drawn in the winning ``group`` (its entries read again: 2048 ids, once
    per row), 0 when no group has a finite mass (``best_val = -inf``)."""
    tok = tl.full((), 0, tl.int32)
    if best_val > _NEG_INF:
        tok = _group_draw(key, l_base, t_base, thr, inv_temp, group * TILES_PER_GROUP * BLOCK, V, tl.arange(0, BLOCK),
                          HAS_TWIST, TEMPERED, TOPK, BLOCK, TILES_PER_GROUP)
    return tok


@helper
def _pair_step(xa, xb, ta, tb, t, t_end, m0, s0, a0, m1, s1, gm, gs, m2, s2, best_val, best_idx, group_key,
               thr, inv_temp, HAS_TWIST: tl.constexpr, TEMPERED: tl.constexpr, TOPK: tl.constexpr,
               SAME_R: tl.constexpr, BASE_PAIRS: tl.constexpr, TILES_PER_GROUP: tl.constexpr):
    """The main loop's work on the tile pair ``t, t + 1`` (raw loads ``xa, xb`` / ``ta, tb``): every
    accumulator updated, the group closed when the pair completes one."""
    xa = xa.to(tl.float32)
    xb = xb.to(tl.float32)
    if HAS_TWIST:  # (else ta, tb are unused)
        ta = ta.to(tl.float32)
        tb = tb.to(tl.float32)
    # NaN / +inf logits and twists are not masked: they surface in the sums (m0 / s0, m1 / s1, the
    # proposal's), which flag the row (its token is then 0).
    if BASE_PAIRS:  # the proposal is the base: one exp per element serves both sums
        bm, bs, ba = _pair_lse_entropy(xa, xb)
        pm = bm
        ps = bs
    else:
        if HAS_TWIST:
            ua = xa + ta
            ub = xb + tb
            if not SAME_R:  # else r = u: its sums are the proposal's
                m1, s1, _d, _e, _g = _online(m1, s1, ua)  # log p0 + log psi, per lane
                m1, s1, _d, _e, _g = _online(m1, s1, ub)
        else:
            ua = xa
            ub = xb
        ra = _proposal_r(ua, thr, inv_temp, TEMPERED, TOPK)
        rb = _proposal_r(ub, thr, inv_temp, TEMPERED, TOPK)
        pm, ps, bm, bs, ba = _pair_sums(xa, xb, ra, rb)
    m0, s0, a0 = _fold_entropy(m0, s0, a0, bm, bs, ba)
    # A pair that is a whole group (the GPU default) closes it without running group sums; the
    # two calls differ only in those (bench/sass_profile.py counts the first).
    if TILES_PER_GROUP == 2:
        m2, s2, best_val, best_idx = _close_group(pm, ps, t // 2, m2, s2, best_val, best_idx, group_key)
    else:
        gm, gs = _fold(gm, gs, pm, ps)
        if ((t + 2) % TILES_PER_GROUP == 0) | (t + 2 >= t_end):
            m2, s2, best_val, best_idx = _close_group(gm, gs, t // TILES_PER_GROUP, m2, s2, best_val, best_idx,
                                                      group_key)
            gm = tl.full((), 0, tl.float32) + _FLOOR
            gs = tl.full((), 0, tl.float32)
    return m0, s0, a0, m1, s1, gm, gs, m2, s2, best_val, best_idx


@triton.jit(do_not_specialize=["key_base", "group_key_base", "inv_temp", "tiles_per_split"])
def _twist_sample_kernel(logits_ptr, stride_l, twist_ptr, stride_t, thr_ptr, step_ptr, step_stride, key_base,
                         group_key_base, inv_temp, V, tiles_per_split, part_f_ptr, part_i_ptr,
                         token_ptr, logp_ptr, logq_ptr, lzpi_ptr, lpsi_ptr, ent_ptr,
                         HAS_TWIST: tl.constexpr, TEMPERED: tl.constexpr, TOPK: tl.constexpr, SAME_R: tl.constexpr,
                         BASE_PAIRS: tl.constexpr, SPLIT: tl.constexpr, BLOCK: tl.constexpr,
                         TILES_PER_GROUP: tl.constexpr, STAGES: tl.constexpr):
    row = tl.program_id(0)
    split = tl.program_id(1)
    row64 = row.to(tl.int64)
    key = row_key(key_base, step_ptr + row * step_stride, row)
    group_key = row_key(group_key_base, step_ptr + row * step_stride, row)
    lanes = tl.arange(0, BLOCK)
    l_base = logits_ptr + row64 * stride_l
    t_base = twist_ptr + row64 * stride_t
    if TOPK:
        thr = tl.load(thr_ptr + row)
    else:
        thr = 0.0

    # The base's sums (max m0, sum S0 and entropy sum A0 in fp64) are scalars folded once per tile
    # pair, from the same block reductions as the proposal's. Only logsumexp(x + log psi), needed
    # on its own when the proposal is tempered or top-k, is kept per lane (m1, s1) and reduced at the end.
    m0 = tl.full((), 0, tl.float32) + _FLOOR
    s0 = tl.full((), 0, tl.float64)
    a0 = tl.full((), 0, tl.float64)
    zero = tl.full((BLOCK,), 0, tl.float32)
    m1 = zero + _FLOOR
    s1 = zero
    # The proposal's sums are scalars, reduced once per pair: this group's (gm, gs) (unused when
    # the pair is the group), the row's so far (m2, s2; the sum in fp64).
    gm = tl.full((), 0, tl.float32) + _FLOOR
    gs = tl.full((), 0, tl.float32)
    m2 = tl.full((), 0, tl.float32) + _FLOOR
    s2 = tl.full((), 0, tl.float64)
    best_val = tl.full((), 0, tl.float32) + _NEG_INF  # the leading group's log mass + group noise
    best_idx = tl.full((), 0, tl.int32)  # that group's index

    t_begin = split * tiles_per_split
    t_end = tl.minimum(t_begin + tiles_per_split, (V + BLOCK - 1) // BLOCK)
    v_end = tl.minimum(t_end * BLOCK, V)
    # Two tiles per iteration (a group holds an even number of them).
    if STAGES > 1:
        # Triton's software pipeline: the next STAGES - 1 pairs are streamed into shared memory
        # (cp.async) while this one is reduced, so registers do not bound the bytes in flight.
        for t in tl.range(t_begin, t_end, 2, num_stages=STAGES):
            xa, xb, ta, tb = _load_inputs(l_base, t_base, t * BLOCK + lanes, v_end, HAS_TWIST, BLOCK)
            m0, s0, a0, m1, s1, gm, gs, m2, s2, best_val, best_idx = _pair_step(
                xa, xb, ta, tb, t, t_end, m0, s0, a0, m1, s1, gm, gs, m2, s2, best_val, best_idx, group_key,
                thr, inv_temp, HAS_TWIST, TEMPERED, TOPK, SAME_R, BASE_PAIRS, TILES_PER_GROUP)
    else:
        # The next pair is loaded while this one is reduced (registers, double-buffered): otherwise
        # every iteration would wait out a full memory latency with one load per program in flight.
        xa_next, xb_next, ta_next, tb_next = _load_inputs(l_base, t_base, t_begin * BLOCK + lanes, v_end, HAS_TWIST,
                                                          BLOCK)
        for t in range(t_begin, t_end, 2):
            xa = xa_next
            xb = xb_next
            ta = ta_next
            tb = tb_next
            xa_next, xb_next, ta_next, tb_next = _load_inputs(l_base, t_base, (t + 2) * BLOCK + lanes, v_end,
                                                              HAS_TWIST, BLOCK)
            m0, s0, a0, m1, s1, gm, gs, m2, s2, best_val, best_idx = _pair_step(
                xa, xb, ta, tb, t, t_end, m0, s0, a0, m1, s1, gm, gs, m2, s2, best_val, best_idx, group_key,
                thr, inv_temp, HAS_TWIST, TEMPERED, TOPK, SAME_R, BASE_PAIRS, TILES_PER_GROUP)

    if HAS_TWIST:
        if SAME_R:
            m1 = m2
            s1 = s2
        else:
            m1, s1 = _lanes_to_scalar(m1, s1)
        bad_tw = ((m1 == _POS_INF) | (s1 != s1)).to(tl.int32)  # a +inf / NaN in logit + twist
    else:
        m1 = m0
        s1 = s0
        bad_tw = tl.full((), 0, tl.int32)
    bad_x = ((m0 == _POS_INF) | (s0 != s0)).to(tl.int32)  # a +inf / NaN logit (see _entropy_terms)
    if SPLIT:
        nsplit = tl.num_programs(1)
        p = part_f_ptr + (row64 * nsplit + split) * 10
        tl.store(p + 0, m0.to(tl.float64))
        tl.store(p + 1, s0)
        tl.store(p + 2, a0)
        tl.store(p + 3, m1.to(tl.float64))
        tl.store(p + 4, s1)
        tl.store(p + 5, m2.to(tl.float64))
        tl.store(p + 6, s2)
        tl.store(p + 7, best_val.to(tl.float64))
        tl.store(p + 8, bad_x.to(tl.float64))
        tl.store(p + 9, bad_tw.to(tl.float64))
        tl.store(part_i_ptr + row64 * nsplit + split, best_idx)
    else:
        tok = _draw_in_group(best_val, best_idx, key, l_base, t_base, thr, inv_temp, V, HAS_TWIST, TEMPERED, TOPK,
                             BLOCK, TILES_PER_GROUP)
        _finalize(row, logits_ptr, stride_l, twist_ptr, stride_t, inv_temp,
                  m0, s0, a0, m1, s1, m2, s2, tok, bad_x, bad_tw,
                  token_ptr, logp_ptr, logq_ptr, lzpi_ptr, lpsi_ptr, ent_ptr, HAS_TWIST, TEMPERED)


@helper
def _combine_pair(m, s, mask):
    """Combine per-split (max, sum) vectors into one (max, sum)."""
    mm = rmax(tl.where(mask, m, float("-inf")), axis=0)
    safe = tl.where(mm == float("-inf"), 0.0, mm)
    sc = tl.where(mask & (m != float("-inf")), tl.exp(m - safe), 0.0)
    return mm, rsum(sc * s, axis=0), sc, safe


@triton.jit(do_not_specialize=["key_base", "inv_temp"])
def _twist_combine_kernel(logits_ptr, stride_l, twist_ptr, stride_t, thr_ptr, step_ptr, step_stride, key_base,
                          inv_temp, V, nsplit, part_f_ptr, part_i_ptr,
                          token_ptr, logp_ptr, logq_ptr, lzpi_ptr, lpsi_ptr, ent_ptr,
                          HAS_TWIST: tl.constexpr, TEMPERED: tl.constexpr, TOPK: tl.constexpr,
                          BLOCK_S: tl.constexpr, BLOCK: tl.constexpr, TILES_PER_GROUP: tl.constexpr):
    row = tl.program_id(0)
    row64 = row.to(tl.int64)
    sp = tl.arange(0, BLOCK_S)
    ok = sp < nsplit
    p = part_f_ptr + (row64 * nsplit + sp) * 10
    m0v = tl.load(p + 0, mask=ok, other=float("-inf"))
    s0v = tl.load(p + 1, mask=ok, other=0.0)
    a0v = tl.load(p + 2, mask=ok, other=0.0)
    m1v = tl.load(p + 3, mask=ok, other=float("-inf"))
    s1v = tl.load(p + 4, mask=ok, other=0.0)
    m2v = tl.load(p + 5, mask=ok, other=float("-inf"))
    s2v = tl.load(p + 6, mask=ok, other=0.0)
    bvv = tl.load(p + 7, mask=ok, other=float("-inf"))
    bad_x = rmax(tl.load(p + 8, mask=ok, other=0.0), axis=0)
    bad_tw = rmax(tl.load(p + 9, mask=ok, other=0.0), axis=0)
    biv = tl.load(part_i_ptr + row64 * nsplit + sp, mask=ok, other=2147483647)

    m0, s0, sc0, safe0 = _combine_pair(m0v, s0v, ok)
    delta = tl.where(m0v == float("-inf"), 0.0, m0v - safe0)
    a0 = rsum(tl.where(sc0 > 0.0, sc0 * (a0v + delta * s0v), 0.0), axis=0)
    m1, s1, _sc1, _safe1 = _combine_pair(m1v, s1v, ok)
    m2, s2, _sc2, _safe2 = _combine_pair(m2v, s2v, ok)
    # The winning group is the splits' best (earliest on ties); its token is drawn here.
    best_val = rmax(bvv, axis=0)
    group = rmin(tl.where(ok & (bvv == best_val), biv, 2147483647), axis=0)
    if TOPK:
        thr = tl.load(thr_ptr + row)
    else:
        thr = 0.0
    key = row_key(key_base, step_ptr + row * step_stride, row)
    tok = _draw_in_group(best_val, group, key, logits_ptr + row64 * stride_l, twist_ptr + row64 * stride_t, thr,
                         inv_temp, V, HAS_TWIST, TEMPERED, TOPK, BLOCK, TILES_PER_GROUP)
    _finalize(row, logits_ptr, stride_l, twist_ptr, stride_t, inv_temp,
              m0.to(tl.float32), s0, a0, m1.to(tl.float32), s1, m2.to(tl.float32), s2,
              tok, bad_x, bad_tw,
              token_ptr, logp_ptr, logq_ptr, lzpi_ptr, lpsi_ptr, ent_ptr, HAS_TWIST, TEMPERED)


def _row_major(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(1) == 1 else t.contiguous()


def twist_sample_triton(logits: torch.Tensor, log_twist: torch.Tensor | None = None, *, temperature: float = 1.0,
                        top_k: int = 0, seed: int = 0, step=0, num_splits: int | None = None,
                        block_v: int | None = None, num_warps: int | None = None, num_stages: int | None = None):
    """Triton implementation of :func:`tsmc_kernels.reference.twist_sample`.

    Args:
        logits: ``[M, V]`` fp32/bf16/fp16/fp64, unit stride along V (copied otherwise).
        log_twist: ``[M, V]`` or ``None``.
        temperature, top_k: as in the reference. ``top_k`` in ``(0, V)`` costs 2-4 extra reads of
            the inputs (the radix select of :func:`.topk.topk_threshold_triton`).
        seed: the seed already folded to 32 bits (``rng.fold_seed``; ops does it).
        step: int64 0-dim / 1-element tensor on the device (read inside the kernel), an int, or an
            int64 ``[M]`` tensor (one step per row).
        num_splits: programs per row along V (default: automatic, >1 only when ``M`` is small).
        block_v, num_warps: vocabulary tile (a power of two in ``[8, 1024]``, default
            ``min(1024, next_power_of_2(V))``: with 1024 a tile pair is one group of the draw) and
            warps per program (default ``block_v // 128``, at most 4).
        num_stages: ``None`` or 1 (default): the next tile pair is prefetched into registers;
            ``>= 2``: Triton's software pipeline streams the next ``num_stages - 1`` pairs into
            shared memory instead (more bytes in flight per program; a tuning knob that
            ``bench/test_bench_kernels.py::test_twist_sample_configs`` sweeps on the GPU).
    Returns:
        ``(token int64[M], logp, logq, log_zpi, log_psi, entropy fp32[M])``.
    """
    if logits.dim() != 2:
        raise ValueError(f"logits must be [M, V], got shape {tuple(logits.shape)}")
    M, V = logits.shape
    if V < 1:
        raise ValueError("logits must have a non-empty vocabulary dimension")
    if log_twist is not None and log_twist.shape != logits.shape:
        raise ValueError(f"log_twist shape {tuple(log_twist.shape)} does not match logits {tuple(logits.shape)}")
    dev = logits.device
    token = torch.empty(M, dtype=torch.int64, device=dev)
    outs = [torch.empty(M, dtype=torch.float32, device=dev) for _ in range(5)]
    if M == 0:
        return (token, *outs)
    logits = _row_major(logits)
    has_twist = log_twist is not None
    twist = _row_major(log_twist) if has_twist else logits
    topk = 0 < top_k < V
    thr = topk_threshold_triton(logits, twist if has_twist else None, top_k) if topk else outs[0]
    step_t = step_tensor(step, dev, rows=M).contiguous()
    tempered = float(temperature) != 1.0
    inv_temp = 1.0 / float(temperature)
    key_base = host_key_base(int(seed), rng.STREAM_TOKEN)

    group = rng.TOKEN_GROUP
    if block_v is None:
        block_v = min(group // 2, max(16, triton.next_power_of_2(V)))
    elif not (8 <= block_v <= group // 2 and block_v & (block_v - 1) == 0):
        raise ValueError(f"block_v must be a power of two in [8, {group // 2}], got {block_v}")
    tiles_per_group = group // block_v  # even: the kernel takes tiles in pairs
    n_tiles = triton.cdiv(V, block_v)
    n_groups = triton.cdiv(V, group)
    splits = default_splits(M, n_groups, dev) if num_splits is None else max(1, min(int(num_splits), n_groups))
    tiles_per_split = tiles_per_group * triton.cdiv(n_groups, splits)  # whole groups
    splits = triton.cdiv(n_tiles, tiles_per_split)
    stages = 1 if num_stages is None else int(num_stages)
    if stages < 1:
        raise ValueError(f"num_stages must be >= 1, got {num_stages}")
    if num_warps is None:
        num_warps = max(1, min(4, block_v // 128))  # H200 sweep: 4 warps beat 8 at block 1024 (M 16, 1024)
    if splits > 1:
        part_f = torch.empty(M, splits, _NF, dtype=torch.float64, device=dev)
        part_i = torch.empty(M, splits, dtype=torch.int32, device=dev)
    else:
        part_f, part_i = outs[0], token  # unused
    step_stride = int(step_t.numel() > 1)
    same_r = not (tempered or topk)
    _twist_sample_kernel[(M, splits)](
        logits, logits.stride(0), twist, twist.stride(0), thr, step_t, step_stride, key_base,
        host_key_base(int(seed), rng.STREAM_TOKEN_GROUP), inv_temp, V, tiles_per_split, part_f, part_i, token, *outs,
        HAS_TWIST=has_twist, TEMPERED=tempered, TOPK=topk, SAME_R=same_r, BASE_PAIRS=same_r and not has_twist,
        SPLIT=splits > 1,
        BLOCK=block_v, TILES_PER_GROUP=tiles_per_group, STAGES=stages, num_warps=num_warps)
    if splits > 1:
        _twist_combine_kernel[(M,)](
            logits, logits.stride(0), twist, twist.stride(0), thr, step_t, step_stride, key_base, inv_temp, V, splits,
            part_f, part_i, token, *outs,
            HAS_TWIST=has_twist, TEMPERED=tempered, TOPK=topk, BLOCK_S=max(2, triton.next_power_of_2(splits)),
            BLOCK=block_v, TILES_PER_GROUP=tiles_per_group, num_warps=num_warps)
    return (token, *outs)
