"""Bidirectional bounds on ``log Z`` (SPEC §4): :func:`log_z_bounds`, :func:`iwae_bounds`, exact samples.

What it computes, per prompt (``input_ids [B, P]`` -> tensors ``[B]``):

* **lower bound** ``LB = E[log Zhat]`` over ``num_runs`` independent SMC runs of ``num_particles``
  particles (Jensen: ``LB <= log Z``). With ``ess_threshold=0`` (no resampling) this is the IWAE
  bound ``E log (1/K) sum_k w_k``.
* **upper bound** ``UB = E[log Zhat]`` of *conditional* SMC: particle 0 is forced to an exact
  target sample and survives every resampling (the other ``K - 1`` slots are multinomial draws from
  all ``K``); ``UB >= log Z``. It runs through :func:`tsmc_kernels.smc_generate`
  (``reference_completions=``), one exact sample per run.
* the **KL estimates** of SPEC §4, in two flavours (see :class:`LogZBounds`):

  - *proposal* KLs (``kl_q_sigma``, ``kl_sigma_q``): ``q`` is the sampling distribution of **one
    particle without resampling**, i.e. the (twisted) proposal ``q(s_1:T) = prod_t q_t(s_t | s_<t)``,
    whose log density is ``SMCOutput.log_q``. With ``log w = log p0 + log phi - log q``::

        KL(q || sigma) = log Z - E_q[log w]         (E_q: every particle of no-resampling runs)
        KL(sigma || q) = E_sigma[log w] - log Z     (E_sigma: the exact samples of the UB runs)

  - *SMC* KLs (``smc_kl_q_sigma``, ``smc_kl_sigma_q``): with resampling the particles are no
    longer draws from ``q``. SMC is importance sampling on the extended space of all particles and
    ancestors, with ``Zhat`` as the weight, so ``log Z - LB = KL(Q_smc || Sigma_smc)`` and
    ``UB - log Z = KL(Sigma_smc || Q_smc)`` exactly (Q_smc: the SMC proposal of the whole particle
    system plus a final index drawn by weight; Sigma_smc: the extended target, whose selected
    particle is an exact sample). Both are upper bounds (data processing) on the KLs, either way
    round, between ``sigma`` and the distribution of one particle drawn by final weight from an
    SMC run; their sum is ``UB - LB`` whatever ``log Z`` is used. For ``ess_threshold=0`` and
    ``num_particles=1`` the two flavours coincide (``LB = E_q log w``, ``UB = E_sigma log w``).

  ``log Z`` in these formulas is ``log_z=`` when given (e.g. by enumeration), else the pooled
  estimate ``log mean_r Zhat_r`` over the lower-bound runs (``Zhat`` is unbiased for ``Z``).

* **Exact target samples** for the upper bound: :func:`rejection_samples` (``phi <= 1``: draw from
  ``p0``, accept with probability ``phi``; the default), :func:`enumeration_samples` (tiny models,
  :mod:`tsmc_kernels.exact`), or a user tensor ``[B, num_runs, T]`` from a known generative story.

The lower-bound runs default to multinomial resampling, the scheme conditional SMC uses for the
free particles, so that both bounds describe the same SMC sampler (any scheme gives a valid LB).

Example::

    b = log_z_bounds(model, ids, potential=phi, twist=head, num_particles=16, num_runs=32,
                     max_new_tokens=64, tokenizer=tok)
    print(b.summary())            # LB <= log Z <= UB per prompt, with standard errors and KLs
"""
from __future__ import annotations

import hashlib
import math
import warnings
from dataclasses import dataclass, fields
from typing import NamedTuple, Sequence

import torch

from .exact import Enumeration
from .potentials.base import Potential, as_potential
from .sampler.inputs import check_int, check_prompts, eos_ids, model_vocab, pad_id
from .sampler.output import ZeroWeightWarning
from .sampler.smc import smc_generate

__all__ = ["LogZBounds", "RejectionStats", "log_z_bounds", "iwae_bounds", "rejection_samples",
           "enumeration_samples"]

# smc_generate arguments that log_z_bounds passes through (the rest it sets itself).
_PASS_THROUGH = ("temperature", "top_k", "eos_token_id", "pad_token_id", "cache", "intermediate_potential",
                 "intermediate_every", "intermediate_delimiters", "progress")


@dataclass
class LogZBounds:
    """Result of :func:`log_z_bounds`; every tensor is fp64 ``[B]`` unless stated.

    Attributes:
        lower, lower_se: ``E[log Zhat]`` of plain SMC (``<= log Z``) and its standard error.
        upper, upper_se: ``E[log Zhat]`` of SMC conditioned on an exact sample (``>= log Z``).
        log_z_ref: the ``log Z`` used in the KL estimates (``log_z=`` or the pooled estimate
            ``log mean Zhat`` of the lower-bound runs); ``log_z_ref_se`` its standard error
            (delta method; 0 when given).
        elbo, elbo_se: ``E_q[log p0 phi / q]`` for one particle drawn from the proposal ``q``
            (no resampling); NaN when ``proposal_kl=False`` and the runs resample.
        eubo, eubo_se: ``E_sigma[log p0 phi / q]`` over the exact samples.
        kl_q_sigma, kl_sigma_q: proposal KLs ``log_z_ref - elbo`` and ``eubo - log_z_ref``
            (``kl_q_sigma = inf`` when ``q`` proposes completions with ``phi = 0``; both NaN when
            ``log_z_ref = -inf``: every lower-bound run dead and no ``log_z`` given).
        smc_kl_q_sigma, smc_kl_sigma_q: extended-space KLs ``log_z_ref - lower`` and
            ``upper - log_z_ref`` (see the module docstring); their sum is ``upper - lower`` (NaN
            when ``log_z_ref = -inf``, as above).
        *_se of the KLs: standard errors combining the two terms as independent.
        log_z_lower_runs, log_z_upper_runs: fp64 ``[B, R]`` the ``log Zhat`` of every run.
        dead_runs: int64 ``[B]`` lower-bound runs whose particles all had ``phi = 0``
            (``log Zhat = -inf``; one of them makes ``lower = -inf``, an exact but useless bound).
        exact_log_z_mc: ``log mean phi`` over the ``p0`` proposals of rejection sampling (an
            unbiased estimate of ``Z`` from plain Monte Carlo); NaN if no rejection sampling ran.
        num_particles, num_runs, ess_threshold, resampling: the settings.
    """

    lower: torch.Tensor
    lower_se: torch.Tensor
    upper: torch.Tensor
    upper_se: torch.Tensor
    log_z_ref: torch.Tensor
    log_z_ref_se: torch.Tensor
    elbo: torch.Tensor
    elbo_se: torch.Tensor
    eubo: torch.Tensor
    eubo_se: torch.Tensor
    kl_q_sigma: torch.Tensor
    kl_q_sigma_se: torch.Tensor
    kl_sigma_q: torch.Tensor
    kl_sigma_q_se: torch.Tensor
    smc_kl_q_sigma: torch.Tensor
    smc_kl_q_sigma_se: torch.Tensor
    smc_kl_sigma_q: torch.Tensor
    smc_kl_sigma_q_se: torch.Tensor
    log_z_lower_runs: torch.Tensor
    log_z_upper_runs: torch.Tensor
    dead_runs: torch.Tensor
    exact_log_z_mc: torch.Tensor
    num_particles: int
    num_runs: int
    ess_threshold: float
    resampling: str

    @property
    def gap(self) -> torch.Tensor:
        """``upper - lower`` ``[B]``: bounds the symmetrised extended-space KL (SPEC §4)."""
        return self.upper - self.lower

    @property
    def gap_se(self) -> torch.Tensor:
        return torch.sqrt(self.lower_se ** 2 + self.upper_se ** 2)

    def summary(self) -> str:
        """A small per-prompt table of the bounds and KL estimates."""
        mode = "IWAE (no resampling)" if self.ess_threshold == 0 else \
            f"SMC (resample when ESS < {self.ess_threshold:g} N, {self.resampling})"
        lines = [f"{mode}, {self.num_particles} particles, {self.num_runs} runs",
                 f"{'prompt':>6} {'lower':>16} {'upper':>16} {'gap':>8} {'KL(q|s)':>8} {'KL(s|q)':>8} "
                 f"{'KLsmc(q|s)':>10} {'KLsmc(s|q)':>10}"]
        for b in range(self.lower.shape[0]):
            lines.append(f"{b:>6} {_pm(self.lower[b], self.lower_se[b]):>16} "
                         f"{_pm(self.upper[b], self.upper_se[b]):>16} "
                         f"{float(self.gap[b]):>8.3f} {float(self.kl_q_sigma[b]):>8.3f} "
                         f"{float(self.kl_sigma_q[b]):>8.3f} {float(self.smc_kl_q_sigma[b]):>10.3f} "
                         f"{float(self.smc_kl_sigma_q[b]):>10.3f}")
        for b, dead in enumerate(self.dead_runs.tolist()):
            if dead:
                lines.append(f"prompt {b}: {dead} of {self.num_runs} lower-bound runs had every particle at phi = 0 "
                             "(log Zhat = -inf: lower = -inf)")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        """Plain Python values (lists per prompt), e.g. for JSON."""
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            out[f.name] = v.tolist() if isinstance(v, torch.Tensor) else v
        return out


def _pm(x, se) -> str:
    return f"{float(x):.3f}±{float(se):.3f}"


class RejectionStats(NamedTuple):
    """Bookkeeping of :func:`rejection_samples`, all ``[B]``."""

    proposals: torch.Tensor  # int64, p0 samples drawn
    accepted: torch.Tensor  # int64, of which accepted (>= num)
    log_z_mc: torch.Tensor  # fp64, log mean phi over the proposals (plain Monte Carlo estimate of log Z)


# ------------------------------------------------------------------------------------ helpers

def _derive_seed(seed: int, tag: str, chunk: int) -> int:
    """An independent 31-bit seed for each (purpose, chunk) so that no two smc_generate calls share random numbers."""
    h = hashlib.blake2b(f"{int(seed)}:{tag}:{chunk}".encode(), digest_size=4).digest()
    return int.from_bytes(h, "little") & 0x7FFFFFFF


def _mean_se(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and standard error over dim 1 of fp64 ``[B, n]``. A row with ``-inf`` has mean ``-inf``
    (certain: one such draw proves the expectation is ``-inf``) and standard error 0."""
    x = x.double()
    n = x.shape[1]
    mean = x.mean(1)
    finite = torch.isfinite(x).all(1)
    se = x.std(1) / math.sqrt(n) if n > 1 else torch.full_like(mean, math.inf)
    se = torch.where(finite, se, torch.zeros_like(se))
    return mean, se


def _log_mean_exp_se(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``log mean exp(x)`` over dim 1 and its delta-method standard error."""
    x = x.double()
    n = x.shape[1]
    lme = torch.logsumexp(x, 1) - math.log(n)
    m = torch.where(torch.isfinite(lme), lme, torch.zeros_like(lme))
    r = torch.exp(x - m[:, None])  # ratios Zhat / mean Zhat
    se = r.std(1) / math.sqrt(n) if n > 1 else torch.full_like(lme, math.inf)
    return lme, torch.where(torch.isfinite(lme), se, torch.full_like(se, math.nan))


def _diff_se(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.sqrt(a ** 2 + b ** 2)


def _chunks(total: int, per: int):
    per = max(1, per)
    j = 0
    while j < total:
        yield j, min(total, j + per)
        j += per


class _PromptMap(Potential):
    """``potential`` called on a batch whose prompt ``i`` is the user's prompt ``index[i]``: repeated
    prompts (one per run) and subsets keep per-prompt potentials (gold answers) right."""

    def __init__(self, inner: Potential, index: torch.Tensor):
        self.inner, self.index = inner, index.to(torch.int64).cpu()
        self.needs_text, self.name = inner.needs_text, inner.name

    def log_phi(self, completion_ids, texts, prompt_index):
        mapped = self.index[prompt_index.cpu()].to(prompt_index.device)
        return self.inner(completion_ids, texts=texts, prompt_index=mapped)


def _runs(model, input_ids, attention_mask, *, runs: int, num_particles: int, max_rows: int, seed: int, tag: str,
          reference: torch.Tensor | None = None, **kw):
    """``runs`` independent SMC runs per prompt in chunks of at most ``max_rows`` particle rows.

    Yields ``(j0, j1, out)``: ``out`` covers runs ``j0:j1`` of every prompt, rows ordered prompt-major
    (``b * (j1 - j0) + j``). ``reference``: ``[B, runs, T]`` exact samples, one per run.
    """
    B = input_ids.shape[0]
    per = max(1, max_rows // (B * num_particles))
    for c, (j0, j1) in enumerate(_chunks(runs, per)):
        r = j1 - j0
        ids = input_ids.repeat_interleave(r, 0)
        mask = attention_mask.repeat_interleave(r, 0) if attention_mask is not None else None
        ref = reference[:, j0:j1].reshape(B * r, -1) if reference is not None else None
        index = torch.arange(B).repeat_interleave(r)
        kw_c = dict(kw)
        for key in ("potential", "intermediate_potential"):
            if kw_c.get(key) is not None:
                kw_c[key] = _PromptMap(as_potential(kw_c[key]), index)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ZeroWeightWarning)
            out = smc_generate(model, ids, mask, num_particles=num_particles, seed=_derive_seed(seed, tag, c),
                               reference_completions=ref, **kw_c)
        yield j0, j1, out


def _pad_to(x: torch.Tensor, T: int, pad: int) -> torch.Tensor:
    """Pad (with ``pad``) or cut the last dim of ``x`` to ``T``."""
    if x.shape[-1] >= T:
        return x[..., :T]
    extra = torch.full((*x.shape[:-1], T - x.shape[-1]), pad, dtype=x.dtype, device=x.device)
    return torch.cat([x, extra], -1)


def _sample_lengths(x: torch.Tensor, eos: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Lengths (EOS included) of completions ``x [..., T]`` and whether each ended with EOS.

    A row without EOS has length ``T``: only EOS ends a completion early, and the pad id is a token
    like any other before it (a completion may end in it at the length limit)."""
    T = x.shape[-1]
    pos = torch.arange(T, device=x.device)
    if eos:
        is_eos = torch.isin(x, torch.tensor(list(eos), dtype=x.dtype, device=x.device))
    else:
        is_eos = torch.zeros_like(x, dtype=torch.bool)
    has_eos = is_eos.any(-1)
    first_eos = torch.where(is_eos, pos, T).amin(-1) + 1
    return torch.where(has_eos, first_eos, torch.full_like(first_eos, T)), has_eos


def _check_exact(exact: torch.Tensor, B: int, R: int, T: int, eos: list[int], pad: int, vocab: int | None):
    """Validate user exact samples ``[B, R, T']`` and return them as int64 ``[B, R, T]``."""
    if not isinstance(exact, torch.Tensor):
        raise TypeError(f"exact_samples must be a tensor [B, num_runs, T], an Enumeration (or a list of them) "
                        f"or None, got {type(exact).__name__}")
    if exact.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
        raise TypeError(f"exact_samples must hold integer token ids, got {exact.dtype}")
    if exact.dim() != 3 or exact.shape[0] != B or exact.shape[1] != R or exact.shape[2] == 0:
        raise ValueError(f"exact_samples must be [B, num_runs, T] = [{B}, {R}, T] (one exact target sample per "
                         f"upper-bound run), got shape {tuple(exact.shape)}")
    exact = exact.long()
    if bool((exact < 0).any()) or (vocab is not None and bool((exact >= vocab).any())):
        raise ValueError(f"exact_samples contain ids outside the model's vocabulary [0, {vocab})")
    lengths, has_eos = _sample_lengths(exact, eos)
    if bool((lengths > T).any()):
        b, r = (int(i) for i in torch.nonzero(lengths > T)[0])
        raise ValueError(f"exact sample {r} of prompt {b} has length {int(lengths[b, r])} > max_new_tokens={T}: "
                         "exact samples must come from the same max_new_tokens")
    short = (lengths < T) & ~has_eos
    if bool(short.any()):
        b, r = (int(i) for i in torch.nonzero(short)[0])
        raise ValueError(f"exact sample {r} of prompt {b} ends after {int(lengths[b, r])} tokens without EOS "
                         f"(max_new_tokens={T}): not a complete sequence")
    # Normalise: pad after the end, exactly T columns.
    pos = torch.arange(exact.shape[-1], device=exact.device)
    exact = torch.where(pos < lengths[..., None], exact, torch.full_like(exact, pad))
    return _pad_to(exact, T, pad)


# ------------------------------------------------------------------------------ exact samples

def enumeration_samples(enumeration: Enumeration, num: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """``num`` exact samples (with replacement) of ``sigma ∝ p0 * phi`` from an enumeration.

    The enumeration must carry the potential (:meth:`Enumeration.with_potential`). Returns int64
    ``[num, T]`` completions padded after EOS with the enumeration's pad id.
    """
    if not isinstance(enumeration, Enumeration):
        raise TypeError(f"enumeration must be an Enumeration, got {type(enumeration).__name__}")
    check_int("num", num, 1)
    if not bool(torch.isfinite(torch.logsumexp(enumeration.log_p0 + enumeration.log_phi, 0))):
        raise ValueError("the enumeration's target has zero mass (phi = 0 on every completion)")
    idx = torch.multinomial(enumeration.target().double(), num, replacement=True, generator=generator)
    return enumeration.completions[idx].clone()


@torch.no_grad()
def rejection_samples(model, input_ids: torch.Tensor, potential, num: int,
                      attention_mask: torch.Tensor | None = None, *,
                      max_new_tokens: int = 128, seed: int = 0, tokenizer=None, max_proposals: int | None = None,
                      batch_size: int | None = None, max_rows: int = 2048, eos_token_id=None, pad_token_id=None,
                      cache: str = "dynamic", return_stats: bool = False):
    """``num`` exact samples of ``sigma ∝ p0 * phi`` per prompt by rejection sampling (``phi`` in ``[0, 1]``).

    Draws completions from ``p0`` (``smc_generate`` without potential effect on the particles:
    ``ess_threshold=0``, no twist, temperature 1) and accepts each with probability ``phi``.

    Args:
        input_ids: ``[B, P]`` prompts (left padding via ``attention_mask``).
        potential: ``log phi`` (protocol of :mod:`tsmc_kernels.potentials`); must be ``<= 0``.
        num: accepted samples wanted per prompt.
        max_proposals: give up (``RuntimeError``) when a prompt has drawn this many ``p0`` samples
            without ``num`` acceptances (default ``max(10_000, 100 * num)``).
        batch_size: proposals per prompt per round (default: adapted to the acceptance rate seen).
        max_rows: at most this many particle rows per ``smc_generate`` call (the KV cache grows with it).
    Returns:
        int64 ``[B, num, max_new_tokens]`` padded after EOS; with ``return_stats`` also a
        :class:`RejectionStats`.
    Raises:
        ValueError: the potential returns ``log phi > 0`` (``phi > 1``) on some proposal.
        RuntimeError: the acceptance is too rare for ``max_proposals``.
    """
    input_ids, attention_mask = check_prompts(model, input_ids, attention_mask)
    check_int("num", num, 1)
    if max_proposals is None:
        max_proposals = max(10_000, 100 * num)
    check_int("max_proposals", max_proposals, 1)
    check_int("max_rows", max_rows, 1)
    if batch_size is not None:
        check_int("batch_size", batch_size, 1, " (or None: adapted to the acceptance)")
    fn = as_potential(potential)
    eos = eos_ids(model, eos_token_id)
    pad = pad_id(model, pad_token_id, eos)
    B, T = input_ids.shape[0], max_new_tokens
    device = input_ids.device
    accepted: list[list[torch.Tensor]] = [[] for _ in range(B)]
    n_acc = [0] * B
    n_prop = [0] * B
    log_phi_sum = [torch.tensor(-math.inf, dtype=torch.float64) for _ in range(B)]
    gen = torch.Generator().manual_seed(_derive_seed(seed, "rejection-uniforms", 0))
    rnd = 0
    while True:
        pending = [b for b in range(B) if n_acc[b] < num]
        if not pending:
            break
        over = [b for b in pending if n_prop[b] >= max_proposals]
        if over:
            b = over[0]
            rate = n_acc[b] / max(1, n_prop[b])
            raise RuntimeError(f"rejection sampling: prompt {b} accepted {n_acc[b]} of {n_prop[b]} p0 samples "
                               f"(acceptance ~{rate:.2e}), needs {num}; raise max_proposals, or pass exact "
                               "samples from elsewhere (exact_samples=)")
        # Proposals per prompt this round: enough for the remaining samples at the acceptance seen so far.
        if batch_size is not None:
            n = batch_size
        else:
            need = max(num - n_acc[b] for b in pending)
            rate = min((n_acc[b] + 1) / (n_prop[b] + 2) for b in pending)
            n = max(32, math.ceil(1.2 * need / rate))
        n = min(n, max(1, max_rows // len(pending)), max(max_proposals - n_prop[b] for b in pending))
        idx = torch.tensor(pending, device=device)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ZeroWeightWarning)
            out = smc_generate(model, input_ids[idx], attention_mask[idx] if attention_mask is not None else None,
                               num_particles=n, max_new_tokens=T, potential=_PromptMap(fn, idx.cpu()),
                               ess_threshold=0.0,
                               seed=_derive_seed(seed, "rejection", rnd), tokenizer=tokenizer,
                               eos_token_id=eos_token_id, pad_token_id=pad_token_id, cache=cache)
        log_phi = out.log_phi.double().cpu()
        if bool((log_phi > 1e-6).any()):
            raise ValueError(f"rejection sampling needs phi <= 1 (log phi <= 0), but potential {fn.name!r} returned "
                             f"log phi = {float(log_phi.max()):.4g}; rescale it (subtract an upper bound of log phi: "
                             "the target is unchanged) or pass exact_samples=")
        u = torch.rand(log_phi.shape, generator=gen, dtype=torch.float64)
        acc = torch.log(u) < log_phi
        comps = _pad_to(out.completions, T, pad)
        for i, b in enumerate(pending):
            n_prop[b] += n
            log_phi_sum[b] = torch.logaddexp(log_phi_sum[b], torch.logsumexp(log_phi[i], 0))
            keep = torch.nonzero(acc[i]).flatten()[: num - n_acc[b]]
            if keep.numel():
                accepted[b].append(comps[i, keep.to(device)])
                n_acc[b] += keep.numel()
        rnd += 1
    samples = torch.stack([torch.cat(a, 0) for a in accepted])
    if not return_stats:
        return samples
    props = torch.tensor(n_prop, dtype=torch.int64)
    stats = RejectionStats(props, torch.tensor(n_acc, dtype=torch.int64),
                           torch.stack(log_phi_sum) - torch.log(props.double()))
    return samples, stats


def _enumeration_target(e: Enumeration, b: int, input_ids, attention_mask, potential, tokenizer) -> Enumeration:
    """Enumeration ``e`` of prompt ``b`` with ``log_phi`` from this call's ``potential`` (whatever it
    carried: one built without :meth:`~Enumeration.with_potential` would give samples of ``p0``, not
    of ``sigma``); ``ValueError`` if it was enumerated for another prompt."""
    if e.prompt is not None:
        real = input_ids[b] if attention_mask is None else input_ids[b][attention_mask[b].bool()]
        if not torch.equal(real.cpu(), e.prompt.to(torch.int64)):
            raise ValueError(f"exact_samples[{b}]: this Enumeration was built for the prompt {e.prompt.tolist()[:12]}, "
                             f"not for prompt {b} {real.tolist()[:12]} (pass them in the prompts' order)")
    fn = as_potential(potential)
    texts = None
    if fn.needs_text:
        if tokenizer is None:
            raise ValueError(f"potential {fn.name!r} reads text: pass tokenizer= to score the Enumeration")
        texts = tokenizer.batch_decode([c[:n].tolist() for c, n in zip(e.completions, e.lengths)],
                                       skip_special_tokens=True)
    return e.with_potential(fn, texts=texts, prompt_index=b)


def _resolve_exact(exact_samples, model, input_ids, attention_mask, potential, *, num_runs, max_new_tokens, seed,
                   tokenizer, eos, pad, max_rows, max_proposals, smc_kw):
    """Exact samples ``[B, R, T]`` from whatever ``exact_samples`` is, and the rejection MC log Z (or NaN)."""
    B, R, T = input_ids.shape[0], num_runs, max_new_tokens
    nan = torch.full((B,), math.nan, dtype=torch.float64)
    if exact_samples is None or (isinstance(exact_samples, str) and exact_samples == "rejection"):
        samples, stats = rejection_samples(model, input_ids, potential, R, attention_mask, max_new_tokens=T, seed=seed,
                                           tokenizer=tokenizer, max_proposals=max_proposals, max_rows=max_rows,
                                           eos_token_id=smc_kw.get("eos_token_id"),
                                           pad_token_id=smc_kw.get("pad_token_id"),
                                           cache=smc_kw.get("cache", "dynamic"), return_stats=True)
        return samples, stats.log_z_mc
    if isinstance(exact_samples, str):
        raise ValueError(f"exact_samples: unknown method {exact_samples!r}; expected 'rejection', an Enumeration, "
                         "a list of Enumerations (one per prompt) or a tensor [B, num_runs, T]")
    if isinstance(exact_samples, Enumeration):
        if B != 1:
            raise ValueError(f"one Enumeration is for one prompt; got {B} prompts: pass a list of {B} Enumerations")
        exact_samples = [exact_samples]
    if isinstance(exact_samples, (list, tuple)):
        if len(exact_samples) != B or not all(isinstance(e, Enumeration) for e in exact_samples):
            raise ValueError(f"exact_samples as a list must hold {B} Enumerations (one per prompt)")
        g = torch.Generator().manual_seed(_derive_seed(seed, "enumeration", 0))
        targets = [_enumeration_target(e, b, input_ids, attention_mask, potential, tokenizer)
                   for b, e in enumerate(exact_samples)]
        rows = [enumeration_samples(e, R, g) for e in targets]
        width = max(r.shape[1] for r in rows)  # _check_exact then checks the lengths against max_new_tokens
        return torch.stack([_pad_to(r, width, pad) for r in rows]).to(input_ids.device), nan
    return exact_samples, nan


# --------------------------------------------------------------------------------- the bounds

@torch.no_grad()
def log_z_bounds(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *, potential,
                 twist=None, num_particles: int = 16, num_runs: int = 32, max_new_tokens: int = 128,
                 ess_threshold: float = 0.5, resampling: str | bool = "multinomial", exact_samples=None,
                 log_z=None, proposal_kl: bool = True, seed: int = 0, tokenizer=None, max_rows: int = 2048,
                 max_proposals: int | None = None, **smc_kwargs) -> LogZBounds:
    """Stochastic lower and upper bounds on ``log Z`` per prompt, and KL estimates (SPEC §4).

    Args:
        input_ids: ``[B, P]`` prompts (left padding via ``attention_mask``).
        potential: ``log phi`` (protocol of :mod:`tsmc_kernels.potentials`); ``phi <= 1`` when the
            exact samples come from rejection sampling.
        twist: the twist of :func:`smc_generate` (``None``: bootstrap SMC).
        num_particles: ``K`` particles per run. num_runs: independent runs per bound and prompt.
        ess_threshold: resample when ``ESS < ess_threshold * K`` (0: never, the IWAE bounds).
        resampling: scheme of the lower-bound runs (the upper-bound runs always resample their
            free particles multinomially); ``False`` means ``ess_threshold=0``.
        exact_samples: ``None`` / ``"rejection"`` (rejection sampling from ``p0``), an
            :class:`~tsmc_kernels.exact.Enumeration` (one prompt) or a list of them (one per
            prompt, in the prompts' order: checked; their target is re-scored with ``potential``),
            or an int tensor ``[B, num_runs, T]`` (one exact sample per upper-bound run, padded
            after EOS; a row without EOS is a completion of exactly ``max_new_tokens`` tokens).
        log_z: known ``log Z`` (float or ``[B]``) for the KL estimates; default the pooled estimate.
        proposal_kl: when the runs resample, also run ``num_runs`` no-resampling runs to estimate
            ``E_q[log p0 phi / q]`` (the proposal KLs); free when ``ess_threshold=0``.
        seed: every run, the rejection sampler and the enumeration draws derive their seeds from it.
        max_rows: particle rows per :func:`smc_generate` call: runs are chunked to bound the KV-cache
            memory (lower it for large models; results do not depend on it statistically). A call
            holds at least one run of every prompt (``B * num_particles`` rows), even above it.
        max_proposals: rejection-sampling budget per prompt (see :func:`rejection_samples`).
        **smc_kwargs: passed to :func:`smc_generate`: ``temperature``, ``top_k``, ``eos_token_id``,
            ``pad_token_id``, ``cache``, ``intermediate_potential``, ``intermediate_every``,
            ``intermediate_delimiters``, ``progress``.
    Returns:
        :class:`LogZBounds`.
    Raises:
        ValueError: bad shapes/values of ``exact_samples``; an exact sample with ``phi = 0`` or
            outside the proposal's support (``top_k``, a ``-inf`` twist); ``phi > 1`` with rejection.
    """
    unknown = set(smc_kwargs) - set(_PASS_THROUGH)
    if unknown:
        raise TypeError(f"log_z_bounds got unexpected arguments {sorted(unknown)}; smc_generate options it passes "
                        f"through: {list(_PASS_THROUGH)}")
    input_ids, attention_mask = check_prompts(model, input_ids, attention_mask)
    if resampling is False:
        ess_threshold, resampling = 0.0, "multinomial"
    elif resampling is True:
        resampling = "multinomial"
    check_int("num_runs", num_runs, 2, " (standard errors need two runs)")
    check_int("num_particles", num_particles, 1)
    check_int("max_new_tokens", max_new_tokens, 1)
    check_int("max_rows", max_rows, 1)
    if potential is None:
        raise ValueError("log_z_bounds needs a potential (with phi = 1, log Z = 0 trivially)")
    fn = as_potential(potential)
    B, R, N, T = input_ids.shape[0], num_runs, num_particles, max_new_tokens
    eos = eos_ids(model, smc_kwargs.get("eos_token_id"))
    pad = pad_id(model, smc_kwargs.get("pad_token_id"), eos)
    kw = dict(max_new_tokens=T, potential=fn, twist=twist, tokenizer=tokenizer, **smc_kwargs)
    if log_z is not None:
        given_log_z = torch.as_tensor(log_z, dtype=torch.float64).detach().cpu().reshape(-1)
        if given_log_z.numel() not in (1, B):
            raise ValueError(f"log_z must be a float or have one value per prompt ({B}), got {given_log_z.numel()}")
        given_log_z = given_log_z.expand(B).clone()

    exact, log_z_mc = _resolve_exact(exact_samples, model, input_ids, attention_mask, fn, num_runs=R,
                                     max_new_tokens=T, seed=seed, tokenizer=tokenizer, eos=eos, pad=pad,
                                     max_rows=max_rows, max_proposals=max_proposals, smc_kw=smc_kwargs)
    exact = _check_exact(exact, B, R, T, eos, pad, model_vocab(model)).to(input_ids.device)

    # Lower bound: plain SMC runs (and, without resampling, the proposal's log w for the ELBO).
    lz_lo = torch.empty(B, R, dtype=torch.float64)
    iwae = ess_threshold == 0
    logw_q = torch.empty(B, R * N, dtype=torch.float64) if iwae else None
    for j0, j1, out in _runs(model, input_ids, attention_mask, runs=R, num_particles=N, max_rows=max_rows, seed=seed,
                             tag="lower", ess_threshold=ess_threshold, resampling=resampling, **kw):
        lz_lo[:, j0:j1] = out.log_z.double().cpu().view(B, j1 - j0)
        if iwae:
            logw_q[:, j0 * N:j1 * N] = _log_w(out).view(B, (j1 - j0) * N)
    if not iwae and proposal_kl:
        logw_q = torch.empty(B, R * N, dtype=torch.float64)
        for j0, j1, out in _runs(model, input_ids, attention_mask, runs=R, num_particles=N, max_rows=max_rows,
                                 seed=seed, tag="proposal", ess_threshold=0.0, resampling=resampling, **kw):
            logw_q[:, j0 * N:j1 * N] = _log_w(out).view(B, (j1 - j0) * N)

    # Upper bound: conditional SMC, particle 0 forced to an exact sample and kept by every resampling.
    lz_up = torch.empty(B, R, dtype=torch.float64)
    logw_sigma = torch.empty(B, R, dtype=torch.float64)
    for j0, j1, out in _runs(model, input_ids, attention_mask, runs=R, num_particles=N, max_rows=max_rows, seed=seed,
                             tag="upper", reference=exact, ess_threshold=ess_threshold, resampling=resampling, **kw):
        r = j1 - j0
        ref = exact[:, j0:j1].reshape(B * r, T)
        _check_forced(out, ref, j0, r, eos, pad)
        lz_up[:, j0:j1] = out.log_z.double().cpu().view(B, r)
        logw_sigma[:, j0:j1] = _log_w(out)[:, 0].view(B, r)

    lower, lower_se = _mean_se(lz_lo)
    upper, upper_se = _mean_se(lz_up)
    eubo, eubo_se = _mean_se(logw_sigma)
    if logw_q is not None:
        elbo, elbo_se = _mean_se(logw_q)
    else:
        elbo = elbo_se = torch.full((B,), math.nan, dtype=torch.float64)
    if log_z is None:
        ref_lz, ref_se = _log_mean_exp_se(lz_lo)
    else:
        ref_lz, ref_se = given_log_z, torch.zeros(B, dtype=torch.float64)
    return LogZBounds(
        lower=lower, lower_se=lower_se, upper=upper, upper_se=upper_se,
        log_z_ref=ref_lz, log_z_ref_se=ref_se,
        elbo=elbo, elbo_se=elbo_se, eubo=eubo, eubo_se=eubo_se,
        kl_q_sigma=ref_lz - elbo, kl_q_sigma_se=_diff_se(ref_se, elbo_se),
        kl_sigma_q=eubo - ref_lz, kl_sigma_q_se=_diff_se(eubo_se, ref_se),
        smc_kl_q_sigma=ref_lz - lower, smc_kl_q_sigma_se=_diff_se(ref_se, lower_se),
        smc_kl_sigma_q=upper - ref_lz, smc_kl_sigma_q_se=_diff_se(upper_se, ref_se),
        log_z_lower_runs=lz_lo, log_z_upper_runs=lz_up,
        dead_runs=torch.isneginf(lz_lo).sum(1),
        exact_log_z_mc=log_z_mc.double().cpu(),
        num_particles=N, num_runs=R, ess_threshold=float(ess_threshold), resampling=resampling,
    )


def iwae_bounds(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs) -> LogZBounds:
    """:func:`log_z_bounds` without resampling (``ess_threshold=0``): the IWAE lower bound and its
    conditional (upper-bound) counterpart. Same arguments."""
    kwargs.pop("resampling", None)
    return log_z_bounds(model, input_ids, attention_mask, **{**kwargs, "ess_threshold": 0.0})


def _log_w(out) -> torch.Tensor:
    """``log p0 + log phi - log q`` of every particle, fp64 ``[B, N]`` on the CPU."""
    return (out.log_p0.double() + out.log_phi.double() - out.log_q.double()).cpu()


def _check_forced(out, ref: torch.Tensor, j0: int, r: int, eos, pad):
    """Particle 0 of every conditional run must be its exact sample, with ``phi > 0`` and ``q > 0``."""
    got = _pad_to(out.completions[:, 0], ref.shape[1], pad)
    lengths, _ = _sample_lengths(ref, eos)
    pos = torch.arange(ref.shape[1], device=ref.device)
    same = ((got == ref) | (pos >= lengths[:, None])).all(1)
    if not bool(same.all()):  # would be a bug in smc_generate's conditional path
        raise RuntimeError("conditional SMC lost the exact sample in particle 0")
    rows = torch.nonzero(torch.isneginf(out.log_phi[:, 0])).flatten()
    if rows.numel():
        i = int(rows[0])
        raise ValueError(f"exact sample {j0 + i % r} of prompt {i // r} has phi = 0: it is not a sample of the "
                         "target (wrong potential, prompt or sampler?)")
    rows = torch.nonzero(torch.isneginf(out.log_q[:, 0])).flatten()
    if rows.numel():
        i = int(rows[0])
        raise ValueError(f"exact sample {j0 + i % r} of prompt {i // r} has proposal probability 0 (top_k, or a "
                         "twist that is -inf on it): the upper bound needs q > 0 wherever sigma > 0")
