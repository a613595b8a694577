"""PyTorch definition of every kernel contract (SPEC §6): the test oracle and the fallback path.

Each function here is the *meaning* of the op of the same name in :mod:`tsmc_kernels.ops`;
faster backends (Triton, C++, CUDA) must agree with it. Everything is computed in fp64 and
returned in fp32 (log values) or int64 (indices). Random numbers come from
:mod:`tsmc_kernels.rng`, so every backend draws the same numbers.

Conventions (``M = B * N`` particle rows, ``V`` vocabulary):

* ``twist_sample``: the proposal is ``q(v) ∝ exp((log p0(v) + log psi(v)) / temperature)``
  restricted to the entries ``>=`` the k-th largest when ``top_k > 0``; ``p0 = softmax(logits)``
  at temperature 1. Rows whose proposal has no finite entry return token 0 and ``logq = -inf``;
  NaN in a row propagates to its ``log_zpi`` (the flag the sampler checks).
* ``normalize_log_weights``: returned log weights are normalised (``logsumexp == 0`` per prompt);
  a prompt whose weights are all ``-inf`` returns ``-inf`` weights, ``ess = 0``,
  ``log_z_inc = -inf`` and no resampling — never NaN.
* ``resample``: offspring counts from sorted positions in the cumulative weights, then the
  ancestor permutation of SPEC §2 (a particle with offspring is its own ancestor; its extra
  copies fill the dead slots in order).
"""
from __future__ import annotations

import math
from typing import NamedTuple, Sequence

import torch

from . import rng

SCHEMES = ("systematic", "stratified", "multinomial", "residual")


class TwistSampleOutput(NamedTuple):
    """Per-row outputs of :func:`twist_sample`; all ``[M]``."""

    token: torch.Tensor  # int64, sampled token id
    logp: torch.Tensor  # fp32, log p0(token) at temperature 1
    logq: torch.Tensor  # fp32, log q(token) under the proposal actually sampled from
    log_zpi: torch.Tensor  # fp32, logsumexp_v(log p0(v) + log psi(v))
    log_psi: torch.Tensor  # fp32, log psi(token) (0 without a twist)
    entropy: torch.Tensor  # fp32, entropy of p0 in nats


class NormalizeOutput(NamedTuple):
    """Outputs of :func:`normalize_log_weights`."""

    log_w: torch.Tensor  # fp32 [B, N], normalised: logsumexp over N is 0 (or all -inf)
    ess: torch.Tensor  # fp32 [B], (sum W)^2 / sum W^2, 0 for a dead prompt
    log_z_inc: torch.Tensor  # fp32 [B], logsumexp(log_w + inc) - logsumexp(log_w)
    resample: torch.Tensor  # bool [B], ess < ess_threshold * N (always if threshold >= 1)


def _logsumexp(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    # torch.logsumexp already returns -inf for all -inf rows and NaN for NaN rows.
    return torch.logsumexp(x, dim=dim)


def _proposal(logits, log_twist, temperature, top_k):
    """fp64 ``(logp0, tw, logq, log_zpi, entropy, dead, bad)``: every per-vocab quantity of SPEC §6.1.

    Rows with bad values follow the convention every backend shares (see ``ops.twist_sample``):
    ``bad`` marks rows with a NaN / +inf logit or twist; a bad logit makes ``logp0`` and
    ``entropy`` NaN, either kind makes ``logq`` and ``log_zpi`` NaN.
    """
    x = logits.double()
    lse0 = _logsumexp(x)
    bad_x = torch.isnan(lse0) | torch.isposinf(lse0)  # a NaN or +inf logit
    logp0 = torch.where(torch.isneginf(lse0)[:, None], torch.full_like(x, -math.inf), x - lse0[:, None])
    logp0 = torch.where(bad_x[:, None], torch.full_like(x, math.nan), logp0)
    tw = log_twist.double() if log_twist is not None else torch.zeros_like(x)
    bad = bad_x | (torch.isnan(tw) | torch.isposinf(tw)).any(-1)
    s = logp0 + tw
    log_zpi = torch.where(bad, torch.full_like(lse0, math.nan), _logsumexp(s))
    r = s / temperature
    if 0 < top_k < x.shape[1]:
        kth = torch.topk(r, top_k, dim=-1).values[:, -1:]
        r = torch.where(r >= kth, r, torch.full_like(r, -math.inf))
    lse_r = _logsumexp(r)
    logq = torch.where(bad[:, None], torch.full_like(r, math.nan), r - lse_r[:, None])
    p0 = logp0.exp()
    entropy = -torch.where(p0 > 0, p0 * logp0, torch.zeros_like(p0)).sum(-1)
    entropy = torch.where(bad_x, torch.full_like(entropy, math.nan), entropy)
    return logp0, tw, logq, log_zpi, entropy, torch.isneginf(lse_r) & ~bad, bad


def _at(x: torch.Tensor, token: torch.Tensor) -> torch.Tensor:
    return x.gather(1, token[:, None])[:, 0]


def twist_sample(logits: torch.Tensor, log_twist: torch.Tensor | None = None, *, temperature: float = 1.0,
                 top_k: int = 0, seed: int = 0, step=0) -> TwistSampleOutput:
    """Score the twisted proposal and draw one token per row by Gumbel-max.

    Args:
        logits: base-model logits ``[M, V]`` (any float dtype).
        log_twist: log-twists ``log psi_t(s_<t, v)`` ``[M, V]`` or ``None`` (``psi = 1``).
        temperature: proposal temperature (> 0), applied to ``log p0 + log psi``.
        top_k: keep only proposal entries ``>=`` the k-th largest (0 = all).
        seed, step: RNG key of row ``m`` (``step``: an int, a 0-dim tensor, or ``[M]``: one step per
            row); the draw is :func:`gumbel_max`.
    Returns:
        :class:`TwistSampleOutput` of ``[M]`` tensors.
    """
    logp0, tw, logq, log_zpi, entropy, dead, bad = _proposal(logits, log_twist, temperature, top_k)
    token = gumbel_max(torch.where(bad[:, None], torch.zeros_like(logq), logq), seed, step)
    token = torch.where(dead | bad, torch.zeros_like(token), token)
    logq_tok = torch.where(dead, torch.full_like(log_zpi, -math.inf), _at(logq, token))
    return TwistSampleOutput(token, _at(logp0, token).float(), logq_tok.float(), log_zpi.float(),
                             _at(tw, token).float(), entropy.float())


def gumbel_max(scores: torch.Tensor, seed: int = 0, step=0) -> torch.Tensor:
    """The token each row of ``scores`` (fp64 ``[M, V]``, ``log q`` up to a per-row constant; ``-inf``
    allowed) draws: a two-level Gumbel-max, exact for ``q ∝ exp(scores)``.

    The vocabulary is cut into groups of ``G = rng.TOKEN_GROUP`` consecutive ids (the last one
    shorter). Row ``m`` picks the group ``g* = argmax_g L_g + gumbel(seed, step, STREAM_TOKEN_GROUP, m, g)``
    with ``L_g = logsumexp`` of the group's scores (a group with mass ``e^L_g`` wins with probability
    proportional to it), then the token ``argmax_{v in g*} scores_v + gumbel(seed, step, STREAM_TOKEN,
    m, v)``; ties go to the earliest index at both levels (as ``torch.argmax``). A kernel can therefore
    stream the row once, keep only the best group so far, and draw token noise for the groups that
    lead when they are read (a few per row) instead of for every entry. A row without a finite
    score returns 0. ``step`` is an int, a 0-dim tensor or ``[M]``. Returns int64 ``[M]``.
    """
    M, V = scores.shape
    G = min(rng.TOKEN_GROUP, V)  # (one short group when V is smaller: no padding to 2048)
    n_groups = -(-V // G)
    dev = scores.device
    rows = torch.arange(M, device=dev)
    padded = torch.nn.functional.pad(scores, (0, n_groups * G - V), value=-math.inf).view(M, n_groups, G)
    mass = _logsumexp(padded)  # [M, n_groups]
    g_noise = rng.gumbel(rng.row_key(seed, step, rng.STREAM_TOKEN_GROUP, rows)[:, None],
                         torch.arange(n_groups, device=dev)[None, :])
    group = torch.argmax(torch.where(torch.isneginf(mass), mass, mass + g_noise), dim=-1)  # [M]
    inside = padded[rows, group]  # [M, G]
    ids = group[:, None] * G + torch.arange(G, device=dev)[None, :]
    t_noise = rng.gumbel(rng.row_key(seed, step, rng.STREAM_TOKEN, rows)[:, None], ids)
    token = ids.gather(1, torch.argmax(torch.where(torch.isneginf(inside), inside, inside + t_noise), dim=-1)[:, None])
    return token[:, 0]


def twist_score(logits: torch.Tensor, log_twist: torch.Tensor | None, tokens: torch.Tensor, *,
                temperature: float = 1.0, top_k: int = 0) -> TwistSampleOutput:
    """Like :func:`twist_sample` but for given ``tokens`` (int64 ``[M]``) instead of sampled ones.

    Used for teacher forcing (twist training, conditional SMC): the same proposal, no randomness.
    A token outside the top-k gets ``logq = -inf``.
    """
    logp0, tw, logq, log_zpi, entropy, _dead, _bad = _proposal(logits, log_twist, temperature, top_k)
    tokens = tokens.to(torch.int64)
    return TwistSampleOutput(tokens, _at(logp0, tokens).float(), _at(logq, tokens).float(), log_zpi.float(),
                             _at(tw, tokens).float(), entropy.float())


def normalize_log_weights(log_w: torch.Tensor, log_w_inc: torch.Tensor | None = None, *,
                          ess_threshold: float = 0.5) -> NormalizeOutput:
    """Add increments, normalise per prompt, and decide whether to resample.

    Args:
        log_w: current log weights ``[B, N]`` (need not be normalised).
        log_w_inc: log incremental weights ``[B, N]`` or ``None`` (zero).
        ess_threshold: resample where ``ess < ess_threshold * N``; ``>= 1`` means always, 0 never.
    Returns:
        :class:`NormalizeOutput`.
    """
    lw_prev = log_w.double()
    lw = lw_prev + log_w_inc.double() if log_w_inc is not None else lw_prev
    N = lw.shape[1]
    lse_prev = _logsumexp(lw_prev)
    lse = _logsumexp(lw)
    dead = torch.isneginf(lse)
    safe_lse = torch.where(dead, torch.zeros_like(lse), lse)
    norm = lw - safe_lse[:, None]
    ess = torch.where(dead, torch.zeros_like(lse), 1.0 / torch.exp(2 * norm).sum(-1))
    safe_prev = torch.where(torch.isneginf(lse_prev), torch.zeros_like(lse_prev), lse_prev)
    log_z_inc = torch.where(dead, torch.full_like(lse, -math.inf), lse - safe_prev)
    always = ess_threshold >= 1.0
    resample = (~dead) & ((ess < ess_threshold * N) | always)
    return NormalizeOutput(norm.float(), ess.float(), log_z_inc.float(), resample)


def resample_positions(scheme: str, N: int, B: int, seed: int, step, device, counts_floor=None) -> torch.Tensor:
    """Sorted positions in [0, 1) (fp64 ``[B, N]``) whose place in the cumulative weights picks ancestors.

    ``residual`` is handled in :func:`offspring_counts` and does not use this function.
    """
    key = rng.row_key(seed, step, rng.STREAM_RESAMPLE, torch.arange(B, device=device))[:, None]
    k = torch.arange(N, device=device)[None, :]
    if scheme == "systematic":
        return (k + rng.uniform(key, torch.zeros_like(k))) / N
    if scheme == "stratified":
        return (k + rng.uniform(key, k)) / N
    if scheme == "multinomial":
        e = -torch.log(rng.uniform(key, torch.arange(N + 1, device=device)[None, :]))
        c = e.cumsum(-1)
        return c[:, :N] / c[:, N:]
    raise ValueError(f"unknown resampling scheme {scheme!r}; expected one of {SCHEMES}")


def _multinomial_counts(w: torch.Tensor, draws: int, key: torch.Tensor) -> torch.Tensor:
    """Counts of ``draws`` iid draws from the normalised weights ``w`` (fp64 ``[N]``), sorted-uniform method."""
    N = w.shape[0]
    e = -torch.log(rng.uniform(key, torch.arange(draws + 1, device=w.device)))
    c = e.cumsum(-1)
    pos = c[:draws] / c[draws]
    cw = w.cumsum(-1)
    cw = cw / cw[-1]
    return torch.bincount(torch.searchsorted(cw, pos, right=True).clamp_max(N - 1), minlength=N)


def offspring_counts(log_w: torch.Tensor, *, scheme: str = "systematic", seed: int = 0, step=0,
                     keep_first: bool = False) -> torch.Tensor:
    """Offspring count of every particle, int64 ``[B, N]`` summing to ``N`` per prompt.

    ``keep_first=True`` is conditional SMC's resampling (SPEC §4): particle 0 keeps one offspring
    and the other ``N - 1`` are multinomial draws from all N, whatever ``scheme`` says.
    """
    lw = log_w.double()
    B, N = lw.shape
    w = torch.exp(lw - _logsumexp(lw)[:, None])
    if keep_first:
        key = rng.row_key(seed, step, rng.STREAM_RESAMPLE, torch.arange(B, device=lw.device))
        counts = torch.stack([_multinomial_counts(w[b], N - 1, key[b]) for b in range(B)])
        counts[:, 0] += 1
        return counts
    if scheme == "residual":
        base = torch.floor(N * w)
        rest = N * w - base
        R = (N - base.sum(-1)).long()
        counts = base.long()
        key = rng.row_key(seed, step, rng.STREAM_RESAMPLE, torch.arange(B, device=lw.device))
        for b in range(B):
            if int(R[b]) > 0:
                counts[b] += _multinomial_counts(rest[b], int(R[b]), key[b])
        return counts
    pos = resample_positions(scheme, N, B, seed, step, lw.device)
    cw = w.cumsum(-1)
    cw = cw / cw[:, -1:]  # exact 1.0 at the end: a position < 1 never falls past the last live particle
    anc = torch.searchsorted(cw, pos, right=True).clamp_max(N - 1)
    return torch.zeros(B, N, dtype=torch.int64, device=lw.device).scatter_add_(1, anc, torch.ones_like(anc))


def ancestors_from_counts(counts: torch.Tensor) -> torch.Tensor:
    """SPEC §2 ancestor permutation from offspring counts ``[B, N]`` (each row sums to N).

    A particle with ``counts >= 1`` is its own ancestor; the ``counts - 1`` extra copies of each
    particle, in particle order, fill the dead slots (``counts == 0``) in slot order.
    """
    B, N = counts.shape
    idx = torch.arange(N, device=counts.device).expand(B, N)
    extra = (counts - 1).clamp_min(0)
    extra_end = extra.cumsum(-1)  # inclusive prefix sum: copies of i fill dead ranks [end_{i-1}, end_i)
    dead = counts == 0
    dead_rank = dead.long().cumsum(-1) - 1
    src = torch.searchsorted(extra_end, dead_rank.clamp_min(0), right=True)
    return torch.where(dead, src.clamp_max(N - 1), idx).contiguous()


def resample(log_w: torch.Tensor, resample_mask: torch.Tensor, *, scheme: str = "systematic", seed: int = 0,
             step=0, keep_first: bool = False) -> torch.Tensor:
    """Ancestors int64 ``[B, N]`` (indices within each prompt) with the permutation property.

    Prompts where ``resample_mask`` is False, or whose weights are all ``-inf``, get the identity.
    ``keep_first``: conditional resampling (see :func:`offspring_counts`).
    """
    B, N = log_w.shape
    ident = torch.arange(N, device=log_w.device).expand(B, N)
    live = resample_mask & ~torch.isneginf(_logsumexp(log_w.double()))
    if not bool(live.any()):
        return ident.contiguous()
    safe = torch.where(live[:, None], log_w.double(), torch.zeros_like(log_w, dtype=torch.float64))
    anc = ancestors_from_counts(offspring_counts(safe, scheme=scheme, seed=seed, step=step, keep_first=keep_first))
    return torch.where(live[:, None], anc, ident).contiguous()


def flat_ancestors(ancestors: torch.Tensor) -> torch.Tensor:
    """``[B, N]`` within-prompt ancestors -> ``[M]`` global row indices (a flat ``[M]`` passes through)."""
    if ancestors.dim() == 1:
        return ancestors
    B, N = ancestors.shape
    return (ancestors + N * torch.arange(B, device=ancestors.device)[:, None]).reshape(-1)


def rows_dense(t: torch.Tensor) -> bool:
    """Whether every row ``t[i]`` fills one gap-free block of memory (in any internal order).

    True for contiguous rows and also for permuted layouts such as an ``[M, L, H, D]`` buffer
    seen as ``[M, H, L, D]``: the row is then copied as the raw block, which is exact.
    """
    dims = sorted((st, sz) for st, sz in zip(t.stride()[1:], t.shape[1:]) if sz != 1)
    expected = 1
    for stride, size in dims:
        if stride != expected:
            return False
        expected *= size
    return True


def dense_row_pieces(t: torch.Tensor, max_pieces: int = 256) -> list[torch.Tensor]:
    """Views of ``t`` that cover each of its elements exactly once, split along dims 1, 2, ...
    until every piece has dense rows (:func:`rows_dense`), at most ``max_pieces`` of them.

    A KV cache seen from column ``P`` on (``k[:, :, P:]``, ``[M, H, L - P, D]``) has rows with gaps;
    its ``H`` pieces ``k[:, h, P:]`` have dense rows, which the gather kernels copy as blocks. When
    more pieces would be needed, ``t`` itself is returned (the kernels then copy it row by row).
    """
    if t.dim() <= 1 or rows_dense(t) or t.shape[1] > max_pieces:
        return [t]
    return [p for i in range(t.shape[1]) for p in dense_row_pieces(t[:, i], max_pieces // t.shape[1])]


def kv_gather_(tensors: Sequence[torch.Tensor], ancestors: torch.Tensor) -> None:
    """In place, for every tensor ``t`` (dim 0 = M rows): ``t[i] = t[a[i]]`` where ``a[i] != i``.

    Relies on the permutation property: rows that are read are never written.
    """
    a = flat_ancestors(ancestors)
    moved = torch.nonzero(a != torch.arange(a.numel(), device=a.device)).flatten()
    if moved.numel() == 0:
        return
    src = a[moved]
    for t in tensors:
        t[moved.to(t.device)] = t[src.to(t.device)]
