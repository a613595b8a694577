"""Twisted Sequential Monte Carlo over a Hugging Face causal LM (SPEC §1-2): :func:`smc_generate`.

One step for all ``M = B * N`` particle rows::

    logits, hidden = model(last tokens)                 (ParticleLM, KV cache)
    log_twist      = twist(hidden, completion so far)   ([M, V], optional)
    token, logp, logq, log_zpi, log_psi = ops.twist_sample(logits, log_twist)
    log w          = logp + log psi_t - log psi_{t-1} - logq      (log phi replaces log psi_t at EOS / length limit)
    log_w, ancestors = ops.reweight(log_w, log w)       (normalise, ESS, log Zhat, resample)
    ops.kv_gather_(cache + per-particle buffers, ancestors)

Finished particles (EOS seen) stop proposing and keep their weight; they are still resampled.
The sampler orchestrates; every numeric kernel lives in :mod:`tsmc_kernels.ops`.
"""
from __future__ import annotations

import math
import warnings
from typing import Callable, Sequence

import torch

from .. import ops
from ..potentials.base import as_potential, check_log_phi
from .inputs import check_prompts, eos_ids, pad_id
from .lm import CACHE_MODES, ParticleLM
from .output import SMCOutput

TwistFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _validate(model, input_ids, attention_mask, num_particles, max_new_tokens, ess_threshold, temperature, top_k,
              cache, cuda_graph, reference_completions):
    input_ids, attention_mask = check_prompts(model, input_ids, attention_mask)
    if not isinstance(num_particles, int) or num_particles < 1:
        raise ValueError(f"num_particles must be an int >= 1, got {num_particles!r}")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
    if ess_threshold < 0:
        raise ValueError(f"ess_threshold must be >= 0, got {ess_threshold}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0, got {top_k}")
    if cache not in CACHE_MODES:
        raise ValueError(f"cache must be one of {CACHE_MODES}, got {cache!r}")
    if cuda_graph and input_ids.device.type != "cuda":
        raise ValueError("cuda_graph=True needs the model and inputs on a CUDA device")
    if reference_completions is not None:
        if reference_completions.dim() != 2 or reference_completions.shape[0] != input_ids.shape[0]:
            raise ValueError(f"reference_completions must be [B, T] with B = {input_ids.shape[0]}, "
                             f"got {tuple(reference_completions.shape)}")
    return input_ids, attention_mask


@torch.no_grad()
def smc_generate(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                 num_particles: int = 16, max_new_tokens: int = 128, potential=None, twist: TwistFn | None = None,
                 ess_threshold: float = 0.5, resampling: str = "systematic", temperature: float = 1.0, top_k: int = 0,
                 eos_token_id: int | Sequence[int] | None = None, pad_token_id: int | None = None, seed: int = 0,
                 cache: str = "dynamic", cuda_graph: bool = False, progress: bool = False, tokenizer=None,
                 intermediate_potential=None, intermediate_every: int | None = None,
                 intermediate_delimiters: Sequence[int] | None = None,
                 reference_completions: torch.Tensor | None = None) -> SMCOutput:
    """Sample ``num_particles`` completions per prompt from ``sigma ∝ p0 * phi`` by (twisted) SMC.

    Drop-in next to ``model.generate``: ``input_ids`` ``[B, P]`` (left padding via ``attention_mask``).

    Args:
        potential: final ``log phi`` (see :mod:`tsmc_kernels.potentials`): called on the completions
            of the particles that finish at each step, ``potential(ids [R, t], texts=..., prompt_index=[R])``
            -> ``[R]``; None means ``phi = 1`` (plain sampling from ``p0``).
        twist: ``twist(hidden [M, H], completion_ids [M, t]) -> log psi [M, V]`` (a twist head) or None
            (bootstrap SMC).
        ess_threshold: resample a prompt when ``ESS < ess_threshold * N`` (1 = every step, 0 = never).
        resampling: ``systematic`` | ``stratified`` | ``multinomial`` | ``residual``.
        temperature, top_k: proposal shaping (the weights correct for it).
        eos_token_id, pad_token_id: default from the model's generation config.
        seed: all randomness is a function of ``(seed, step, row)``.
        cache: ``dynamic`` | ``static`` | ``none`` (recompute; the oracle).
        cuda_graph: capture the decode step in a CUDA graph (CUDA only; see README for status).
        progress: show a tqdm bar. tokenizer: needed when a potential reads text.
        intermediate_potential: non-learned twist on partial completions (same protocol as
            ``potential``), evaluated every ``intermediate_every`` tokens and/or after a token in
            ``intermediate_delimiters``.
        reference_completions: ``[B, T]`` conditional SMC: particle 0 of each prompt is forced to these
            tokens (padded after EOS) and always survives resampling (upper bounds, SPEC §4).
    Returns:
        :class:`SMCOutput`.
    """
    input_ids, attention_mask = _validate(model, input_ids, attention_mask, num_particles, max_new_tokens,
                                          ess_threshold, temperature, top_k, cache, cuda_graph, reference_completions)
    ops._check_scheme(resampling)
    phi_fn = as_potential(potential) if potential is not None else None
    inter_fn = as_potential(intermediate_potential) if intermediate_potential is not None else None
    if inter_fn is not None and not intermediate_every and not intermediate_delimiters:
        intermediate_every = 1
    for fn in (phi_fn, inter_fn):
        if fn is not None and fn.needs_text and tokenizer is None:
            raise ValueError(f"potential {fn.name!r} reads text: pass tokenizer=")
    if cuda_graph:
        warnings.warn("cuda_graph=True: graph capture of the SMC step is not implemented yet; running eagerly")

    eos = eos_ids(model, eos_token_id)
    pad = pad_id(model, pad_token_id, eos)
    B, N, T = input_ids.shape[0], num_particles, max_new_tokens
    M = B * N
    device = input_ids.device
    lm = ParticleLM(model, input_ids, attention_mask, num_particles=N, max_new_tokens=T, cache=cache,
                    need_hidden=twist is not None)
    eos_t = torch.tensor(eos, dtype=torch.int64, device=device)
    delim_t = torch.tensor(list(intermediate_delimiters or []), dtype=torch.int64, device=device)
    conditional = reference_completions is not None
    if conditional:
        ref = torch.full((B, T), pad, dtype=torch.int64, device=device)
        n = min(T, reference_completions.shape[1])
        ref[:, :n] = reference_completions[:, :n].to(device)
        forced_rows = torch.arange(B, device=device) * N

    # Per-particle state; every tensor here has M rows and is gathered on resampling.
    tokens = torch.full((M, T), pad, dtype=torch.int64, device=device)
    finished = torch.zeros(M, dtype=torch.bool, device=device)
    lengths = torch.zeros(M, dtype=torch.int64, device=device)
    log_psi_prev = torch.zeros(M, dtype=torch.float32, device=device)  # log psi_{t-1}(s_<t), total twist
    log_inter = torch.zeros(M, dtype=torch.float32, device=device)  # intermediate-potential part of it
    sum_logp = torch.zeros(M, dtype=torch.float32, device=device)
    sum_logq = torch.zeros(M, dtype=torch.float32, device=device)
    log_phi_final = torch.zeros(M, dtype=torch.float32, device=device)
    state = [tokens, finished, lengths, log_psi_prev, log_inter, sum_logp, sum_logq, log_phi_final]

    log_w = torch.full((B, N), -math.log(N), dtype=torch.float32, device=device)
    log_z = torch.zeros(B, dtype=torch.float64, device=device)
    ess_trace, resampled_trace, ancestor_trace = [], [], []
    decoded = torch.zeros((), dtype=torch.int64, device=device)

    logits, hidden = lm.prefill()
    steps = range(T)
    if progress:
        from tqdm.auto import tqdm
        steps = tqdm(steps, desc="smc", unit="tok")
    t = 0
    for t in steps:
        log_twist = twist(hidden, tokens[:, :t]) if twist is not None else None
        out = ops.twist_sample(logits, log_twist, temperature=temperature, top_k=top_k, seed=seed, step=t,
                               validate=t == 0)
        tok, logp, logq, log_psi_tok = out.token, out.logp, out.logq, out.log_psi
        if conditional:
            forced = ops.twist_score(logits[forced_rows], log_twist[forced_rows] if log_twist is not None else None,
                                     ref[:, t], temperature=temperature, top_k=top_k)
            tok, logp, logq, log_psi_tok = (x.index_copy(0, forced_rows, y) for x, y in
                                            ((tok, forced.token), (logp, forced.logp), (logq, forced.logq),
                                             (log_psi_tok, forced.log_psi)))
        active = ~finished
        tok = torch.where(active, tok, torch.full_like(tok, pad))
        is_eos = torch.isin(tok, eos_t) & active if eos else torch.zeros_like(active)
        terminal = active & (is_eos | (t == T - 1))
        tokens[:, t] = tok
        lengths += active
        sum_logp += torch.where(active, logp, 0.0)
        sum_logq += torch.where(active, logq, 0.0)

        inter_due = torch.zeros_like(active)
        if inter_fn is not None:
            if intermediate_every and (t + 1) % intermediate_every == 0:
                inter_due = active & ~terminal
            if delim_t.numel():
                inter_due = inter_due | (torch.isin(tok, delim_t) & active & ~terminal)
        flags = torch.stack([terminal.any(), inter_due.any(), torch.isnan(out.log_zpi[active]).any()]).tolist()
        if flags[2]:
            raise FloatingPointError(f"NaN in the model logits or twist at step {t} (rows "
                                     f"{torch.nonzero(torch.isnan(out.log_zpi) & active).flatten().tolist()[:8]})")
        if flags[1]:
            idx = torch.nonzero(inter_due).flatten()
            new = _call_potential(inter_fn, tokens[idx, : t + 1], idx // N, tokenizer, pad, eos)
            log_inter.index_copy_(0, idx, new.to(device))
        log_phi = torch.zeros(M, dtype=torch.float32, device=device)
        if flags[0] and phi_fn is not None:
            idx = torch.nonzero(terminal).flatten()
            log_phi = log_phi.index_copy(0, idx, _call_potential(phi_fn, tokens[idx, : t + 1], idx // N, tokenizer,
                                                                 pad, eos).to(device))
        log_psi_new = log_psi_tok + log_inter
        inc = torch.where(terminal, logp + log_phi - log_psi_prev - logq, logp + log_psi_new - log_psi_prev - logq)
        # A particle whose twist is already -inf has zero weight and stays dead (avoids -inf - -inf = NaN).
        dead_now = torch.isneginf(logq) | torch.isneginf(log_phi) | torch.isneginf(log_psi_prev)
        inc = torch.where(dead_now, torch.full_like(inc, -math.inf), inc)
        inc = torch.where(active, inc, torch.zeros_like(inc))
        log_psi_prev.copy_(torch.where(active & ~terminal, log_psi_new, log_psi_prev))
        log_phi_final.copy_(torch.where(terminal, log_phi, log_phi_final))
        finished |= terminal
        decoded += active.sum()

        rw = ops.reweight(log_w, inc.view(B, N), ess_threshold=ess_threshold, scheme=resampling, seed=seed, step=t,
                          keep_first=conditional, validate=False)
        log_z += rw.log_z_inc.double()
        log_w = rw.log_w
        ess_trace.append(rw.ess)
        resampled_trace.append(rw.resampled)
        ancestor_trace.append(rw.ancestors)
        lm.gather_(rw.ancestors, state)
        if bool(finished.all()):
            break
        logits, hidden = lm.step(tokens[:, t])
    steps_run = t + 1

    dead = torch.isneginf(log_z)
    if bool(dead.any()):
        ids = torch.nonzero(dead).flatten().tolist()
        shown = ", ".join(map(str, ids[:8])) + (f", ... ({len(ids)} prompts)" if len(ids) > 8 else "")
        warnings.warn(f"all particles of prompt(s) [{shown}] have zero weight "
                      "(the potential is -inf on every particle): their log_z is -inf and weights are -inf")
    completions = tokens[:, :steps_run].reshape(B, N, steps_run)
    prompts = input_ids.unsqueeze(1).expand(B, N, input_ids.shape[1])
    return SMCOutput(
        sequences=torch.cat([prompts, completions], dim=2),
        completions=completions,
        lengths=lengths.view(B, N),
        log_weights=log_w,
        log_z=log_z,
        ess=torch.stack(ess_trace, 1),
        resampled=torch.stack(resampled_trace, 1),
        ancestors=torch.stack(ancestor_trace, 1),
        log_phi=log_phi_final.view(B, N),
        log_p0=sum_logp.view(B, N),
        log_q=sum_logq.view(B, N),
        tokens_decoded=int(decoded),
        steps=steps_run,
    )


def _call_potential(fn, ids: torch.Tensor, prompt_index: torch.Tensor, tokenizer, pad: int, eos: list[int]):
    """Evaluate a potential on ``ids [R, t]`` (rows that just finished / are due), with text if it asks."""
    texts = None
    if fn.needs_text:
        try:
            texts = tokenizer.batch_decode(ids.tolist(), skip_special_tokens=True)
        except Exception as exc:  # noqa: BLE001 - re-raise with context
            raise ValueError(f"could not decode completions for potential {fn.name!r}: {exc}") from exc
    return check_log_phi(fn(ids, texts=texts, prompt_index=prompt_index), ids.shape[0], fn.name)
