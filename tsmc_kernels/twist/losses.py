"""Twist-learning losses (SPEC §3): CTL (default), SIXO, FUDGE, soft-Q and DPG.

Every loss is computed from **one teacher-forced forward pass of the frozen base model** over the
final sampled sequences (:func:`teacher_force`, under ``no_grad``); only the head runs with
gradients, so no gradient flows through the sampling loop. Sample weights are computed under
``no_grad`` at sampling time and stored in the :class:`TwistBatch`.

Indexing: completion token ``s_t`` (``t = 1..L``) sits in column ``t-1`` of every ``[M, L]``
tensor; column ``t-1`` of ``log_psi`` is ``log psi_t(s_1:t)`` (the head at the state after
``s_<t``, evaluated at ``s_t``). Column ``L_i - 1`` of particle ``i`` is *terminal* (EOS or the
length limit): there the sampler uses ``phi`` in the weight and the head's value only in the
proposal, and the optimal twist is ``psi*_T = phi``; all losses below train it too.

Losses (``W``: the final SMC weights, normalised per prompt, approximating ``sigma``; ``sg``:
stop-gradient; sums over the valid positions of each sequence, averages over prompts):

* ``ctl`` — contrastive twist learning, ``sum_t KL(sigma(s_1:t) || pi_t)``; on a batch::

      loss = sum_t m_t KL(W_t / m_t || Wneg_t),     gradient in f_t:  -(W_i - m_t Wneg_it)   f = log psi_t

  ``Wneg_t = softmax_i(log p0(s_1:t) + log psi_t(s_1:t) - log q(s_1:t))`` over the particles that
  reach ``t`` (the self-normalised IS weights of ``pi_t``: ``q`` is the sampling proposal, ``psi``
  the current head) and ``m_t = sum_{i reaching t} W_i``. The gradient estimates
  ``E_sigma[grad f_t] - E_pi_t[grad f_t]`` (SPEC §3); it vanishes at ``psi_t ∝ psi*_t`` (CTL
  identifies each ``psi_t`` up to a constant per ``t``).
  With resampling during sampling the negatives are approximate; sample with ``ess_threshold=0``
  (SIS, the default of the trainers) for the exact estimator.
* ``sixo`` — noise contrastive: ``- sum_t [ sum_i W_i log sigmoid(f_it) + mean_j log sigmoid(-f_jt) ]``
  with the negatives ``j`` from base-model rollouts (``batch.ref``); optimum ``f_t = log psi*_t - log Z``.
* ``fudge`` — BCE of ``psi_t = exp(f_t)`` against the label ``y = phi in [0, 1]`` on base-model
  rollouts (``batch.ref``); use a head with ``activation="logsigmoid"`` so ``f <= 0``.
* ``soft_q`` — ``(sg[log Zpi_{t+1}] - f_t)^2`` for non-terminal ``t`` (``log Zpi_{t+1} =
  logsumexp_v log p0(v|s_1:t) + log psi_{t+1}(s_1:t, v)`` with the current head) and
  ``(log phi - f_T)^2`` at the terminal position (``log phi`` floored at ``log_phi_floor``);
  uniform weights over the sampled particles.
* ``dpg`` — learns the proposal ``q ∝ p0 psi`` towards ``sigma``: minimises ``KL(sigma || q)``, i.e.
  ``- sum_t sum_i W_i [f_it - sum_v sg(q(v | s_<t)) log psi_t(s_<t, v)]`` (the SPEC's expression,
  negated so that it is minimised; its gradient is ``-E_sigma[grad log q(s_t | s_<t)]``).

Entry points: :func:`teacher_force` (base pass), :func:`prefix_quantities` (the head's per-position
quantities from that pass), :func:`twist_loss` (dispatch by name), and the tensor-level loss
functions ``ctl_loss`` ... ``dpg_loss``.
"""
from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field, replace
from typing import Callable, NamedTuple

import torch

from .. import ops
from ..sampler.inputs import cache_kwarg, in_eval_mode, left_align
from .heads import TwistInputs

__all__ = ["LOSSES", "TwistBatch", "PrefixQuantities", "teacher_force", "prefix_quantities", "twist_loss",
           "ctl_loss", "sixo_loss", "fudge_loss", "soft_q_loss", "dpg_loss", "loss_needs"]


@dataclass
class TwistBatch:
    """Sampled sequences and every no-grad quantity the losses need (``M = B * N`` rows).

    Attributes:
        tokens: int64 ``[M, L]`` completion ids (pad after EOS). mask: bool ``[M, L]`` ``t < L_i``.
        terminal: bool ``[M, L]`` ``t == L_i - 1``. lengths: int64 ``[M]``.
        inputs: :class:`~.heads.TwistInputs` of the head (hidden states ``[M, L, H]`` and ids).
        log_p0: fp32 ``[M, L]`` ``log p0(s_t | s_<t)``.
        logits: ``[M, L, V]`` base logits, kept only for losses that need full rows (soft-Q, DPG).
        log_phi: fp32 ``[M]``. log_weights: fp32 ``[B, N]`` final normalised SMC weights.
        log_q_sample, log_psi_sample: fp32 ``[M, L]`` per-token ``log q`` and ``log psi`` under the
            head that sampled (``log q`` enters CTL's negative weights).
        ref: base-model rollouts (another batch) for SIXO / FUDGE, or None.
    """

    tokens: torch.Tensor
    mask: torch.Tensor
    terminal: torch.Tensor
    lengths: torch.Tensor
    inputs: TwistInputs
    log_p0: torch.Tensor
    log_phi: torch.Tensor
    log_weights: torch.Tensor
    num_prompts: int
    num_particles: int
    logits: torch.Tensor | None = None
    log_q_sample: torch.Tensor | None = None
    log_psi_sample: torch.Tensor | None = None
    temperature: float = 1.0
    top_k: int = 0
    ref: "TwistBatch | None" = None
    extra: dict = field(default_factory=dict)


class PrefixQuantities(NamedTuple):
    """Per-position quantities of a head on a :class:`TwistBatch` (``[M, L]`` unless noted).

    ``log_psi`` and ``log_psi_rows`` carry gradients; the rest are computed without.
    """

    log_p0: torch.Tensor  # log p0(s_t | s_<t)
    log_psi: torch.Tensor  # log psi_t(s_1:t), with grad
    log_psi_rows: torch.Tensor | None  # [M, L, V] log psi_t(s_<t, .), with grad (when asked)
    log_q: torch.Tensor | None  # log q_t(s_t | s_<t) under the current head (no grad)
    log_zpi: torch.Tensor | None  # log Zpi_t(s_<t) = logsumexp_v log p0(v) + log psi_t(v) (no grad)
    mask: torch.Tensor
    terminal: torch.Tensor


# ----------------------------------------------------------------------------- the base pass

@in_eval_mode
@torch.no_grad()
def teacher_force(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, completions: torch.Tensor,
                  lengths: torch.Tensor, *, keep_logits: bool = False, chunk_size: int = 64,
                  head=None, temperature: float = 1.0, top_k: int = 0) -> dict:
    """One forward pass of the frozen base model over prompt + completion (``no_grad``).

    As in the sampler, each prompt is run once and its KV cache repeated for its ``N`` particles;
    then the completions run in one batched call (``chunk_size`` rows at a time).

    Args:
        input_ids: ``[B, P]`` prompts, attention_mask ``[B, P]`` or None (right padding is left-aligned
            first, as the samplers do).
        completions: ``[B, N, L]`` (or ``[M, L]`` with ``M = B * N``), lengths ``[B, N]`` / ``[M]``.
        keep_logits: return the ``[M, L, V]`` logits (soft-Q / DPG need them).
        head: if given, also the sampling-time ``log q`` / ``log psi`` of every token under it
            (``temperature``/``top_k`` as when sampling).
    Returns:
        dict with ``tokens, mask, terminal, lengths, inputs, log_p0`` and optionally ``logits``,
        ``log_q_sample``, ``log_psi_sample`` (see :class:`TwistBatch`).
    """
    from transformers import DynamicCache

    B, P = input_ids.shape
    device = input_ids.device
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    input_ids, attention_mask = left_align(input_ids, attention_mask.to(device=device, dtype=torch.long))
    L = completions.shape[-1]
    tokens = completions.reshape(-1, L).to(device)
    M = tokens.shape[0]
    if M % B:
        raise ValueError(f"{M} completion rows is not a multiple of {B} prompts")
    N = M // B
    lengths = lengths.reshape(M).to(device)
    pos = torch.arange(L, device=device)
    mask = pos[None, :] < lengths[:, None]
    terminal = pos[None, :] == (lengths[:, None] - 1)
    ids = torch.cat([input_ids.repeat_interleave(N, 0), tokens], 1)
    seq_mask = torch.cat([attention_mask.repeat_interleave(N, 0), torch.ones(M, L, dtype=torch.long, device=device)], 1)
    position_ids = (seq_mask.cumsum(1) - 1).clamp_min(0)
    keep_kw = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}
    cache_kw = cache_kwarg(model)
    hidden, log_p0, logits_all, log_q_s, log_psi_s = [], [], [], [], []
    per = max(1, chunk_size // N)  # prompts per chunk
    for b0 in range(0, B, per):
        bs = slice(b0, min(B, b0 + per))
        rows = slice(b0 * N, min(B, b0 + per) * N)
        cache = DynamicCache(config=model.config)
        pm = attention_mask[bs]
        out = model(input_ids=input_ids[bs], attention_mask=pm, position_ids=(pm.cumsum(1) - 1).clamp_min(0),
                    **{cache_kw: cache}, use_cache=True, output_hidden_states=True, return_dict=True, **keep_kw)
        h = out.hidden_states[-1][:, -1:].repeat_interleave(N, 0)
        lg = out.logits[:, -1:].repeat_interleave(N, 0)
        if L > 1:
            cache.batch_repeat_interleave(N)  # the prompts' cache, filled in place
            out = model(input_ids=tokens[rows, : L - 1], attention_mask=seq_mask[rows, : P + L - 1],
                        position_ids=position_ids[rows, P: P + L - 1], **{cache_kw: cache},
                        cache_position=torch.arange(P, P + L - 1, device=device), use_cache=True,
                        output_hidden_states=True, return_dict=True)
            h = torch.cat([h, out.hidden_states[-1]], 1)
            lg = torch.cat([lg, out.logits], 1)
        del out, cache
        hidden.append(h)
        V = lg.shape[-1]
        flat_tok = tokens[rows].reshape(-1)
        log_p0.append(ops.twist_score(lg.reshape(-1, V), None, flat_tok).logp.view(-1, L))
        if head is not None:
            rows_psi = head.log_psi_rows(TwistInputs(h, ids[rows], seq_mask[rows], P))
            sc = ops.twist_score(lg.reshape(-1, V), rows_psi.reshape(-1, V), flat_tok, temperature=temperature,
                                 top_k=top_k)
            log_q_s.append(sc.logq.view(-1, L))
            log_psi_s.append(sc.log_psi.view(-1, L))
        if keep_logits:
            logits_all.append(lg)
    res = dict(tokens=tokens, mask=mask, terminal=terminal, lengths=lengths,
               inputs=TwistInputs(torch.cat(hidden), ids, seq_mask, P), log_p0=torch.cat(log_p0),
               num_prompts=B, num_particles=N, temperature=temperature, top_k=top_k)
    if keep_logits:
        res["logits"] = torch.cat(logits_all)
    if head is not None:
        res["log_q_sample"] = torch.cat(log_q_s)
        res["log_psi_sample"] = torch.cat(log_psi_s)
    return res


def prefix_quantities(head, batch: TwistBatch, *, rows: bool = False, proposal: bool = False,
                      chunk_size: int = 64) -> PrefixQuantities:
    """The head's per-position quantities on ``batch`` (the one shared function of every loss).

    Args:
        rows: also the ``[M, L, V]`` log-twist rows with gradients (DPG).
        proposal: also ``log q`` and ``log Zpi`` of every position under the current head, without
            gradient, via :func:`tsmc_kernels.ops.twist_score` (needs ``batch.logits``).
    """
    log_psi = _fp(head.log_psi_tokens(batch.inputs, batch.tokens))
    R = head.log_psi_rows(batch.inputs) if rows else None
    log_q = log_zpi = None
    if proposal:
        if batch.logits is None:
            raise ValueError("this loss needs the base logits: build the batch with keep_logits=True")
        M, L, V = batch.logits.shape
        qs, zs = [], []
        with torch.no_grad():
            for a in range(0, M, chunk_size):
                sl = slice(a, min(M, a + chunk_size))
                r = R[sl].detach() if R is not None else head.log_psi_rows(batch.inputs.select(sl))
                sc = ops.twist_score(batch.logits[sl].reshape(-1, V), r.reshape(-1, V), batch.tokens[sl].reshape(-1),
                                     temperature=batch.temperature, top_k=batch.top_k)
                qs.append(sc.logq.view(-1, L))
                zs.append(sc.log_zpi.view(-1, L))
        log_q, log_zpi = torch.cat(qs), torch.cat(zs)
    return PrefixQuantities(batch.log_p0, log_psi, R, log_q, log_zpi, batch.mask, batch.terminal)


# ----------------------------------------------------------------------------- the losses

def _fp(x: torch.Tensor) -> torch.Tensor:
    """fp32 (fp64 stays fp64, for gradient checks)."""
    return x if x.dtype == torch.float64 else x.float()


def _weights(log_w: torch.Tensor) -> torch.Tensor:
    """``exp`` of normalised log weights ``[B, N]``; zeros for dead prompts (all ``-inf``)."""
    w = torch.exp(_fp(log_w))
    return torch.nan_to_num(w, nan=0.0)


def _masked_softmax(x: torch.Tensor, mask: torch.Tensor, dim: int) -> torch.Tensor:
    x = x.masked_fill(~mask, -math.inf)
    m = x.amax(dim, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    e = torch.exp(x - m) * mask
    s = e.sum(dim, keepdim=True)
    return torch.where(s > 0, e / s.clamp_min(1e-300), torch.zeros_like(e))


def ctl_loss(log_psi: torch.Tensor, mask: torch.Tensor, log_w_pos: torch.Tensor, log_w_base: torch.Tensor) -> torch.Tensor:
    """Contrastive twist learning on a batch (module docstring): for each prompt and position ``t``,

        m_t * KL( W_t / m_t  ||  softmax_i(log_w_base_it + f_it) )       (over the particles reaching t)

    summed over ``t``, averaged over prompts. Its gradient in ``f`` is ``-(W_i - m_t Wneg_it)``, the
    CTL gradient, with the negatives ``Wneg_t = softmax_i(log p0(s_1:t) + log psi_t(s_1:t) - log q(s_1:t))``
    recomputed under the *current* head (so several gradient steps on one batch stay correct).

    Args:
        log_psi: ``[M, L]`` ``f = log psi_t(s_1:t)`` (with grad). mask: bool ``[M, L]``.
        log_w_pos: ``[B, N]`` normalised final weights (positives).
        log_w_base: ``[M, L]`` ``log p0(s_1:t) - log q(s_1:t)`` under the sampling proposal (no grad).
    """
    B, N = log_w_pos.shape
    L = log_psi.shape[1]
    m = mask.view(B, N, L)
    f = _fp(log_psi).view(B, N, L)
    w = _weights(log_w_pos)[:, :, None] * m  # W_i on the particles reaching t
    mass = w.sum(1)  # m_t  [B, L]
    logits = (_fp(log_w_base.detach()).view(B, N, L) + f).masked_fill(~m, -math.inf)
    lse = torch.logsumexp(logits, 1)  # [B, L]
    lse = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    log_neg = torch.where(m, logits - lse[:, None], torch.zeros_like(logits))
    # m_t KL(W/m_t || Wneg) = sum_i W_i (log W_i - log m_t - log Wneg_i)
    log_wn = torch.where(w > 0, torch.log(w.clamp_min(1e-300)) - torch.log(mass.clamp_min(1e-300))[:, None],
                         torch.zeros_like(w))
    return (w * (log_wn - log_neg)).sum() / B


def sixo_loss(log_psi: torch.Tensor, mask: torch.Tensor, log_w_pos: torch.Tensor, ref_log_psi: torch.Tensor,
              ref_mask: torch.Tensor, ref_prompts: int) -> torch.Tensor:
    """SIXO: positives ``W``-weighted through ``log sigmoid(f)``, base-model negatives through ``log sigmoid(-f)``."""
    B, N = log_w_pos.shape
    L = log_psi.shape[1]
    w = (_weights(log_w_pos)[:, :, None] * mask.view(B, N, L)).reshape(B * N, L).detach()
    pos = (w * torch.nn.functional.logsigmoid(_fp(log_psi)).masked_fill(~mask, 0.0)).sum() / B
    n_ref = ref_log_psi.shape[0] // ref_prompts
    neg = torch.nn.functional.logsigmoid(-_fp(ref_log_psi)).masked_fill(~ref_mask, 0.0).sum() / (ref_prompts * n_ref)
    return -(pos + neg)


def fudge_loss(log_psi: torch.Tensor, mask: torch.Tensor, log_phi: torch.Tensor) -> torch.Tensor:
    """FUDGE: ``BCE(psi_t, y)`` with ``y = phi`` of each base-model rollout, summed over ``t``, mean over rows."""
    y = torch.exp(_fp(log_phi))
    if bool((y > 1 + 1e-5).any()):
        raise ValueError(f"FUDGE needs labels phi in [0, 1], got phi up to {float(y.max()):.4g}: use an indicator "
                         "potential (or rescale it) for loss='fudge'")
    f = _fp(log_psi)
    if bool((f.detach()[mask] > 0).any()):
        raise ValueError("FUDGE needs log psi <= 0: build the head with activation='logsigmoid'")
    f = f.clamp_max(-1e-7)
    log1m = torch.log(-torch.expm1(f))  # log(1 - psi)
    y = y.clamp(0.0, 1.0)[:, None]
    bce = -(y * f + (1 - y) * log1m)
    return bce.masked_fill(~mask, 0.0).sum() / f.shape[0]


def soft_q_loss(log_psi: torch.Tensor, mask: torch.Tensor, terminal: torch.Tensor, log_zpi: torch.Tensor,
                log_phi: torch.Tensor, *, log_phi_floor: float = -30.0) -> torch.Tensor:
    """Soft-Q: ``(sg[log Zpi_{t+1}] - f_t)^2`` (non-terminal) and ``(log phi - f_T)^2`` (terminal).

    Args:
        log_zpi: ``[M, L]`` ``log Zpi_t`` of every position under the current head (target source).
        log_phi: ``[M]``, floored at ``log_phi_floor`` (``phi = 0`` has no finite target).
    """
    M, L = log_psi.shape
    nxt = torch.cat([log_zpi[:, 1:], torch.zeros_like(log_zpi[:, :1])], 1).detach()
    nxt = _fp(nxt)
    phi = _fp(log_phi).clamp_min(log_phi_floor)[:, None].expand(M, L)
    target = torch.where(terminal, phi, nxt)
    err = (target - _fp(log_psi)) ** 2
    return err.masked_fill(~mask, 0.0).sum() / M


def dpg_loss(log_psi: torch.Tensor, log_psi_rows: torch.Tensor, log_q_rows: torch.Tensor, mask: torch.Tensor,
             log_w_pos: torch.Tensor) -> torch.Tensor:
    """DPG: ``- sum_t E_W[f_t(s_t) - sum_v sg(q(v)) f_t(v)]`` (minimises ``KL(sigma || q)``).

    Args:
        log_psi: ``[M, L]`` (grad). log_psi_rows: ``[M, L, V]`` (grad). log_q_rows: ``[M, L, V]``
        the current proposal (no grad).
    """
    B, N = log_w_pos.shape
    L = log_psi.shape[1]
    w = (_weights(log_w_pos)[:, :, None] * mask.view(B, N, L)).reshape(B * N, L).detach()
    q = torch.exp(_fp(log_q_rows.detach()))
    expect = (q * _fp(log_psi_rows)).sum(-1)
    term = (_fp(log_psi) - expect).masked_fill(~mask, 0.0)
    return -(w * term).sum() / B


# ----------------------------------------------------------------------------- dispatch

@dataclass(frozen=True)
class LossSpec:
    """What a loss needs: the base logits kept, base-model rollouts (``ref``), the twisted samples."""

    fn: Callable
    keep_logits: bool = False
    needs_ref: bool = False
    needs_twisted: bool = True


def _run_ctl(head, batch: TwistBatch, **_):
    pq = prefix_quantities(head, batch)
    if batch.log_q_sample is None:
        raise ValueError("CTL needs the sampling-time log q: build the batch with teacher_force(head=...)")
    log_w_base = batch.log_p0.cumsum(1) - batch.log_q_sample.cumsum(1)
    return ctl_loss(pq.log_psi, pq.mask, batch.log_weights, log_w_base)


def _run_sixo(head, batch: TwistBatch, **_):
    if batch.ref is None:
        raise ValueError("SIXO needs base-model rollouts (batch.ref)")
    pq = prefix_quantities(head, batch)
    ref = prefix_quantities(head, batch.ref)
    return sixo_loss(pq.log_psi, pq.mask, batch.log_weights, ref.log_psi, ref.mask, batch.ref.num_prompts)


def _run_fudge(head, batch: TwistBatch, **_):
    data = batch.ref if batch.ref is not None else batch
    pq = prefix_quantities(head, data)
    return fudge_loss(pq.log_psi, pq.mask, data.log_phi)


def _run_soft_q(head, batch: TwistBatch, log_phi_floor: float = -30.0, **_):
    pq = prefix_quantities(head, batch, proposal=True)
    return soft_q_loss(pq.log_psi, pq.mask, pq.terminal, pq.log_zpi, batch.log_phi, log_phi_floor=log_phi_floor)


def _run_dpg(head, batch: TwistBatch, **_):
    pq = prefix_quantities(head, batch, rows=True, proposal=True)
    log_p0_rows = torch.log_softmax(_fp(batch.logits), -1)
    log_q_rows = log_p0_rows + _fp(pq.log_psi_rows.detach()) - pq.log_zpi[..., None]
    if batch.temperature != 1.0 or batch.top_k:
        raise ValueError("DPG learns the exact twisted proposal: sample with temperature=1 and top_k=0")
    return dpg_loss(pq.log_psi, pq.log_psi_rows, log_q_rows, pq.mask, batch.log_weights)


LOSSES: dict[str, LossSpec] = {
    "ctl": LossSpec(_run_ctl),
    "sixo": LossSpec(_run_sixo, needs_ref=True),
    "fudge": LossSpec(_run_fudge, needs_ref=True, needs_twisted=False),
    "soft_q": LossSpec(_run_soft_q, keep_logits=True),
    "dpg": LossSpec(_run_dpg, keep_logits=True),
}


def loss_needs(name: str) -> LossSpec:
    """The :class:`LossSpec` of loss ``name`` (``ValueError`` listing the known names otherwise)."""
    key = name.lower().replace("-", "_")
    if key not in LOSSES:
        raise ValueError(f"unknown twist loss {name!r}; expected one of {sorted(LOSSES)}")
    return LOSSES[key]


def twist_loss(name: str, head, batch: TwistBatch, **options) -> torch.Tensor:
    """The scalar loss ``name`` of ``head`` on ``batch`` (gradients reach only the head).

    Options: ``log_phi_floor`` (soft-Q); another option is a ``TypeError`` (a typo would be ignored).
    """
    check_loss_options(name, options)
    return loss_needs(name).fn(head, batch, **options)


def check_loss_options(name: str, options: dict) -> None:
    """``TypeError`` for an option that loss ``name`` does not take (a typo would be silently ignored)."""
    known = [p for p in inspect.signature(loss_needs(name).fn).parameters if p not in ("head", "batch", "_")]
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise TypeError(f"twist loss {name!r} has no option(s) {unknown}; its options: {known or 'none'}")


def _sis_log_weights(log_p0, log_q, mask, log_phi, shape) -> torch.Tensor:
    """Normalised final weights of runs that never resampled, ``log p0 + log phi - log q`` summed over
    the tokens (``[M, L]`` teacher-forced values, ``log_phi [M]``), fp32 ``shape = [B, N]``.

    The sampler's own weights are the same quantity from the decode-time logits; in bf16 those
    differ from a teacher-forced pass by up to ~0.2 nats per sequence (SmolLM2), which would make CTL's
    positive weights (from the sampler) and negative weights (teacher-forced) disagree.
    """
    lw = (torch.where(mask, log_p0.float() - log_q.float(), 0.0).sum(1) + log_phi.float()).view(shape)
    lse = torch.logsumexp(lw, 1, keepdim=True)
    return torch.where(torch.isneginf(lse), lw, lw - lse)


def make_batch(model, head, input_ids, attention_mask, out, *, loss: str = "ctl", ref_out=None, chunk_size: int = 64,
               temperature: float = 1.0, top_k: int = 0) -> TwistBatch:
    """A :class:`TwistBatch` from :class:`~tsmc_kernels.SMCOutput` ``out`` (twisted samples under ``head``)
    and ``ref_out`` (base-model rollouts, for SIXO / FUDGE). When ``out`` never resampled its weights
    are recomputed from the teacher-forced ``log p0`` / ``log q`` (:func:`_sis_log_weights`)."""
    spec = loss_needs(loss)

    def build(o, with_head):
        d = teacher_force(model, input_ids, attention_mask, o.completions, o.lengths, keep_logits=spec.keep_logits,
                          chunk_size=chunk_size, head=head if with_head else None, temperature=temperature,
                          top_k=top_k)
        log_phi = o.log_phi.reshape(-1).to(input_ids.device)
        log_w = o.log_weights
        if d.get("log_q_sample") is not None and not bool(o.resampled.any()):
            log_w = _sis_log_weights(d["log_p0"], d["log_q_sample"], d["mask"], log_phi, log_w.shape)
        return TwistBatch(log_phi=log_phi, log_weights=log_w, **d)

    with torch.no_grad():
        main = build(out, True) if out is not None else None
        ref = build(ref_out, False) if ref_out is not None else None
    if main is None:
        return ref
    return replace(main, ref=ref) if ref is not None else main
