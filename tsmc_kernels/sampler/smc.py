"""Twisted Sequential Monte Carlo over a Hugging Face causal LM (SPEC §1-2): :func:`smc_generate`.

One step for all ``M = B * N`` particle rows, in two device-only halves::

    propose:  logits, hidden = model(last tokens)              (ParticleLM, KV cache)
              log_twist      = twist(hidden, completion so far) ([M, V], optional)
              token, logp, logq, log_psi = ops.twist_sample(logits, log_twist)
    (host)    potentials of the particles that finished (EOS / length limit), NaN check
    weigh:    log w = logp + log psi_t - log psi_{t-1} - logq    (log phi replaces log psi_t once known)
              log_w, ancestors = ops.reweight(log_w, log w)     (normalise, ESS, log Zhat, resample)
              ops.kv_gather_(cache + per-particle buffers, ancestors)

Neither half synchronises with the host, so with ``cuda_graph=True`` each is captured once in a
CUDA graph and replayed. The host looks at the particles every ``sync_every`` steps: with 1 (the
default) between the halves, so a finished particle's potential enters the weight of the step it
finished in; with ``K > 1`` after every ``K`` whole steps, so it enters up to ``K`` steps later
(until then the particle carries its last twist value, which is just another choice of SMC
intermediate target: the final target and ``Zhat`` stay exact). Without potentials (``phi = 1``,
set on the device) the host never needs to look between the halves and checks after the step.
Finished particles stop proposing and keep their weight; they are still resampled.
The sampler orchestrates; every numeric kernel lives in :mod:`tsmc_kernels.ops`.
"""
from __future__ import annotations

import contextlib
import math
from typing import Callable, NamedTuple, Sequence

import torch

from .. import ops
from ..potentials.base import as_potential, check_log_phi, positional_arity
from .attention import with_packed_decode_attention
from .inputs import (check_int, check_prompts, check_token_ids, eos_ids, in_eval_mode, is_any_of, model_vocab,
                     pad_id, token_id_list, warn_caller)
from .lm import CACHE_MODES, ParticleLM
from .output import SMCOutput, ZeroWeightWarning

TwistFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
GRAPH_WARMUP_STEPS = 2  # eager steps before capture (compiles kernels, allocates library workspaces)


def _validate(model, input_ids, attention_mask, pad_token_id, num_particles, max_new_tokens, ess_threshold, temperature,
              top_k, cache, cuda_graph, sync_every, reference_completions, token_type_ids=None):
    input_ids, attention_mask = check_prompts(model, input_ids, attention_mask, pad_token_id, token_type_ids)
    ops.check_ess_threshold(ess_threshold)
    ops.check_temperature(temperature)
    if cache not in CACHE_MODES:
        raise ValueError(f"cache must be one of {CACHE_MODES}, got {cache!r}")
    if cuda_graph and input_ids.device.type != "cuda":
        raise ValueError("cuda_graph=True needs the model and inputs on a CUDA device")
    if cuda_graph and cache == "none":
        raise ValueError("cuda_graph=True needs a KV cache (cache='static'), not cache='none'")
    if reference_completions is not None:
        check_token_ids("reference_completions", reference_completions, model_vocab(model))
        if reference_completions.dim() != 2 or reference_completions.shape[0] != input_ids.shape[0] or \
                reference_completions.shape[1] == 0:
            raise ValueError(f"reference_completions must be [B, T] with B = {input_ids.shape[0]} and T >= 1, "
                             f"got {tuple(reference_completions.shape)}")
    return input_ids, attention_mask


def _check_reference_ends(reference_completions: torch.Tensor, max_new_tokens: int, eos: list[int]) -> None:
    """A reference narrower than ``max_new_tokens`` would have its missing tokens forced to the pad
    id: only rows that end (contain an EOS id) may be shorter."""
    if reference_completions.shape[1] >= max_new_tokens:
        return
    ended = is_any_of(reference_completions.cpu().long(), torch.tensor(eos, dtype=torch.int64)).any(1)
    if not bool(ended.all()):
        raise ValueError(f"reference_completions has {reference_completions.shape[1]} columns, fewer than "
                         f"max_new_tokens = {max_new_tokens}, and row(s) {torch.nonzero(~ended).flatten().tolist()[:8]} "
                         "contain no EOS: pass them in full")


def _check_twist_callable(twist) -> None:
    """``TypeError`` for a twist that cannot be called as ``twist(hidden, completion_ids)`` (before the model runs)."""
    if twist is None:
        return
    if not callable(twist):
        raise TypeError(f"twist must be a callable twist(hidden [M, H], completion_ids [M, t]) -> log psi [M, V] "
                        f"(e.g. a TwistHead) or None, got {type(twist).__name__}")
    fn = twist.forward if isinstance(twist, torch.nn.Module) else twist
    if positional_arity(fn) < 2:
        raise TypeError(f"twist {type(twist).__name__} takes {positional_arity(fn)} positional argument(s); a twist is "
                        "called as twist(hidden [M, H], completion_ids [M, t]) -> log psi [M, V] (e.g. a TwistHead)")


def _check_graph_twist(twist) -> None:
    from ..twist.heads import TwistHead

    if twist is not None and not (isinstance(twist, TwistHead) and not twist.needs_ids):
        raise ValueError("cuda_graph=True needs a twist that reads only the hidden states (an MLP or embedding "
                         f"TwistHead); {type(twist).__name__} reads token ids on the host: use cuda_graph=False")


@in_eval_mode
@torch.no_grad()
@with_packed_decode_attention
def smc_generate(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                 num_particles: int = 16, max_new_tokens: int = 128, potential=None, twist: TwistFn | None = None,
                 ess_threshold: float = 0.5, resampling: str = "systematic", temperature: float = 1.0, top_k: int = 0,
                 eos_token_id: int | Sequence[int] | None = None, pad_token_id: int | None = None, seed: int = 0,
                 cache: str = "dynamic", cuda_graph: bool = False, sync_every: int = 1, progress: bool | str = False,
                 tokenizer=None, intermediate_potential=None, intermediate_every: int | None = None,
                 intermediate_delimiters: Sequence[int] | None = None,
                 reference_completions: torch.Tensor | None = None, compile_decode: bool = False,
                 token_type_ids: torch.Tensor | None = None) -> SMCOutput:
    """Sample ``num_particles`` completions per prompt from ``sigma ∝ p0 * phi`` by (twisted) SMC.

    Drop-in next to ``model.generate``: ``input_ids`` ``[B, P]`` (or the tokenizer's ``BatchEncoding``
    whole: ``smc_generate(model, tok(texts, return_tensors="pt"), ...)``), padding via ``attention_mask`` (left;
    right padding, a tokenizer's default, is left-aligned first: every prompt continues after its last token;
    without a mask, tokens equal to the pad id mark padding when that id is not an EOS id, as in ``generate``).
    The model runs in eval mode (a model in training mode is switched for the call, with a warning).

    Args:
        potential: final ``log phi`` (see :mod:`tsmc_kernels.potentials`): called on the completions
            of the particles that finished, ``potential(ids [R, t], texts=..., prompt_index=[R])``
            -> ``[R]``; None means ``phi = 1`` (plain sampling from ``p0``).
        twist: ``twist(hidden [M, H], completion_ids [M, t]) -> log psi [M, V]`` (a twist head) or None
            (bootstrap SMC).
        ess_threshold: resample a prompt when ``ESS < ess_threshold * N`` (1 = every step, 0 = never).
        resampling: ``systematic`` | ``stratified`` | ``multinomial`` | ``residual``.
        temperature, top_k: proposal shaping (the weights correct for it). ``top_k > 0`` never proposes a
            token outside the k most likely under ``p0 * psi``: the particles and ``Zhat`` then describe
            ``sigma`` restricted to such completions (``Z`` times their share of sigma's mass), not ``sigma``.
        eos_token_id, pad_token_id: default from the model's generation config (the pad id also marks
            prompt padding when no attention_mask is given).
        token_type_ids: accepted so that ``**tok(...)`` works like ``generate(**tok(...))``; must be all 0.
        seed: all randomness is a function of ``(seed, step, row)`` (``row = b * N + n``: a prompt at
            another batch index draws other numbers); seeds are folded to 32 bits
            (:func:`~tsmc_kernels.rng.fold_seed`: seeds from 2**32 on can repeat a smaller seed's run).
        cache: ``dynamic`` | ``static`` | ``none`` (recompute; the oracle).
        cuda_graph: capture the two halves of the SMC step (forward + twist + sample; weights +
            resample + KV gather) in CUDA graphs after two eager steps and replay them. CUDA only;
            implies ``cache="static"``; the twist must be a hidden-state :class:`TwistHead`; no
            intermediate potentials. Same result as ``cuda_graph=False`` with the same ``sync_every``.
        sync_every: the host looks at the particles (potentials, NaN check, all finished?) every
            ``sync_every`` steps. 1: a finished particle's potential is applied in the step it
            finished. ``K > 1``: up to ``K`` steps later (still exact; ``ess``/``resampled``/``ancestors``
            get one extra column when potentials are applied after the last token), ``K`` times
            fewer host round trips; not with intermediate potentials.
        progress: show a tqdm bar (a string is its label; default label "smc").
        tokenizer: needed when a potential reads text.
        intermediate_potential: non-learned twist on partial completions (same protocol as
            ``potential``), evaluated every ``intermediate_every`` tokens and/or after a token in
            ``intermediate_delimiters``.
        reference_completions: ``[B, T]`` conditional SMC: particle 0 of each prompt is forced to these
            tokens (padded after EOS) and always survives resampling (upper bounds, SPEC §4); the
            free particles then resample multinomially whatever ``resampling`` says. A reference
            the proposal cannot make (outside ``top_k``, ``phi = 0``) is not checked here
            (:func:`~tsmc_kernels.bounds.log_z_bounds` checks it).
        compile_decode: run the model's one-token decode forward through ``torch.compile`` (inductor
            fuses its small kernels; with ``cuda_graph=True`` the compiled kernels are what the graph
            replays). Needs ``cache="static"`` (implied by ``cuda_graph``). The first call per shape
            pays the compile time; the prefill stays eager. Same tokens and weights up to rounding.
    Returns:
        :class:`SMCOutput`.
    """
    # Integers first, as Python ints (numpy / 0-dim torch integers are welcome).
    num_particles, max_new_tokens, sync_every, top_k, seed = (
        check_int(name, value, low) for name, value, low in (
            ("num_particles", num_particles, 1), ("max_new_tokens", max_new_tokens, 1), ("sync_every", sync_every, 1),
            ("top_k", top_k, 0), ("seed", seed, 0)))
    input_ids, attention_mask = _validate(model, input_ids, attention_mask, pad_token_id, num_particles, max_new_tokens,
                                          ess_threshold, temperature, top_k, cache, cuda_graph, sync_every,
                                          reference_completions, token_type_ids)
    ops._check_scheme(resampling)
    _check_twist_callable(twist)
    phi_fn = as_potential(potential) if potential is not None else None
    inter_fn = as_potential(intermediate_potential) if intermediate_potential is not None else None
    if intermediate_every is not None:
        intermediate_every = check_int("intermediate_every", intermediate_every, 1)
    if intermediate_delimiters is not None:
        intermediate_delimiters = token_id_list("intermediate_delimiters", intermediate_delimiters, model_vocab(model))
    if inter_fn is None and (intermediate_every is not None or intermediate_delimiters):
        raise ValueError("intermediate_every / intermediate_delimiters need an intermediate_potential")
    if inter_fn is not None and not intermediate_every and not intermediate_delimiters:
        intermediate_every = 1
    for fn in (phi_fn, inter_fn):
        if fn is not None and fn.needs_text and tokenizer is None:
            raise ValueError(f"potential {fn.name!r} reads text: pass tokenizer=")
    if inter_fn is not None and (sync_every > 1 or cuda_graph):
        raise ValueError("intermediate potentials are evaluated on the host every step: "
                         "use sync_every=1 and cuda_graph=False")
    if cuda_graph:
        _check_graph_twist(twist)
        cache = "static"

    from ..twist.heads import bind_prompts
    eos = eos_ids(model, eos_token_id)
    if reference_completions is not None:
        _check_reference_ends(reference_completions, max_new_tokens, eos)
    # A head that reads token ids (ModelTwistHead) is bound to these prompts for the call.
    with bind_prompts(twist, input_ids, attention_mask, num_particles):
        run = _SMCRun(model, input_ids, attention_mask, num_particles=num_particles, max_new_tokens=max_new_tokens,
                      cache=cache, twist=twist, phi_fn=phi_fn, inter_fn=inter_fn,
                      intermediate_every=intermediate_every, intermediate_delimiters=intermediate_delimiters,
                      ess_threshold=ess_threshold, resampling=resampling, temperature=temperature, top_k=top_k,
                      seed=seed, eos=eos, pad=pad_id(model, pad_token_id, eos),
                      reference_completions=reference_completions, tokenizer=tokenizer, sync_every=sync_every,
                      pass_ids=not cuda_graph, compile_decode=compile_decode)
        if cuda_graph and run.lm.other_layers():
            raise NotImplementedError(f"cuda_graph=True supports K/V attention caches only; this model's cache also "
                                      f"has {run.lm.other_layers()} layers: use cuda_graph=False")
        return _decode(run, max_new_tokens, cuda_graph=cuda_graph, sync_every=sync_every, progress=progress,
                       mid_sync=sync_every == 1 and (phi_fn is not None or inter_fn is not None))


def _decode(run: "_SMCRun", T: int, *, cuda_graph: bool, sync_every: int, progress: bool | str,
            mid_sync: bool) -> SMCOutput:
    """The step loop of :func:`smc_generate`: eager steps, then (``cuda_graph``) capture and replay.
    ``mid_sync``: the host looks between the halves (to evaluate potentials; phi = 1 is set on the device)."""
    device = run.input_ids.device
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=T, desc=progress if isinstance(progress, str) else "smc", unit="tok")
    graphs, warmup = None, None
    if cuda_graph:  # eager warm-up steps run on a side stream, as graph capture requires
        warmup = torch.cuda.Stream(device=device)
        warmup.wait_stream(torch.cuda.current_stream(device))
    steps_run, flushed = 0, False
    for t in range(T):
        if cuda_graph and t == GRAPH_WARMUP_STEPS:
            torch.cuda.current_stream(device).wait_stream(warmup)
            graphs = run.capture()
        with torch.cuda.stream(warmup) if cuda_graph and graphs is None else contextlib.nullcontext():
            if graphs is not None:
                graphs.propose.replay()
            else:
                run.propose(t)
            run.lm.t = t  # completion tokens in the cache (a replay does not advance the Python counter)
            done = run.host_sync(t, before_weigh=True) if mid_sync else False
            if graphs is not None:
                graphs.weigh.replay()
            else:
                run.weigh()
            steps_run = t + 1
            if not mid_sync and ((t + 1) % sync_every == 0 or t == T - 1):
                done = run.host_sync(t, before_weigh=False)
                if done and bool(run.phi_due.any()):
                    run.flush()
                    flushed = True
        if bar is not None:
            bar.update(1)
        if done:
            break
    if bar is not None:  # every particle may finish before max_new_tokens: end the bar where the run ended
        bar.total = steps_run
        bar.close()
    if cuda_graph and graphs is None:
        torch.cuda.current_stream(device).wait_stream(warmup)
    return run.output(steps_run, steps_run + flushed)


class _Graphs(NamedTuple):
    propose: "torch.cuda.CUDAGraph"
    weigh: "torch.cuda.CUDAGraph"


class _SMCRun:
    """Device state of one :func:`smc_generate` call.

    :meth:`propose` and :meth:`weigh` only launch device work and index with the device step
    counter ``self.t`` (never a Python int, except for the twist's ids when ``pass_ids``), so
    both can be captured in CUDA graphs; :meth:`host_sync` is the only place that reads values.
    """

    def __init__(self, model, input_ids, attention_mask, *, num_particles, max_new_tokens, cache, twist, phi_fn,
                 inter_fn, intermediate_every, intermediate_delimiters, ess_threshold, resampling, temperature, top_k,
                 seed, eos, pad, reference_completions, tokenizer, sync_every, pass_ids, compile_decode=False):
        B, N, T = input_ids.shape[0], num_particles, max_new_tokens
        M = B * N
        device = input_ids.device
        self.B, self.N, self.M, self.T = B, N, M, T
        self.input_ids, self.twist, self.phi_fn, self.inter_fn = input_ids, twist, phi_fn, inter_fn
        self.intermediate_every, self.tokenizer, self.pad, self.eos = intermediate_every, tokenizer, pad, eos
        self.sample_kw = dict(temperature=temperature, top_k=top_k)
        self.seed, self.ess_threshold, self.resampling = seed, ess_threshold, resampling
        self.sync_every, self.pass_ids = sync_every, pass_ids
        self.lm = ParticleLM(model, input_ids, attention_mask, num_particles=N, max_new_tokens=T, cache=cache,
                             need_hidden=twist is not None, compile_decode=compile_decode)
        self.eos_t = torch.tensor(eos, dtype=torch.int64, device=device)
        self.delim_t = torch.tensor(list(intermediate_delimiters or []), dtype=torch.int64, device=device)
        self.conditional = reference_completions is not None
        if self.conditional:
            self.ref = torch.full((B, T), pad, dtype=torch.int64, device=device)
            n = min(T, reference_completions.shape[1])
            self.ref[:, :n] = reference_completions[:, :n].to(device)
            self.forced_rows = torch.arange(B, device=device) * N

        def zeros(dtype, *shape):
            return torch.zeros(*(shape or (M,)), dtype=dtype, device=device)

        f32, i64, boolean = torch.float32, torch.int64, torch.bool
        self.t = zeros(i64, 1)  # device step counter
        # Per particle; gathered on resampling.
        self.tokens = torch.full((M, T), pad, dtype=i64, device=device)
        self.finished, self.lengths = zeros(boolean), zeros(i64)
        self.log_psi_prev = zeros(f32)  # log psi_{t-1}(s_<t): the twist part of the current target
        self.log_inter = zeros(f32)  # the intermediate-potential part of it
        self.sum_logp, self.sum_logq, self.log_phi = zeros(f32), zeros(f32), zeros(f32)
        self.awaiting = zeros(boolean)  # finished, potential not evaluated yet
        self.state = [self.tokens, self.finished, self.lengths, self.log_psi_prev, self.log_inter, self.sum_logp,
                      self.sum_logq, self.log_phi, self.awaiting]
        # Written by propose, read by the host and weigh.
        self.active, self.terminal = zeros(boolean), zeros(boolean)
        self.delim_hit, self.nan = zeros(boolean), zeros(boolean)
        self.logp, self.logq, self.log_psi_tok = zeros(f32), zeros(f32), zeros(f32)
        # Potentials known for these rows (set by the host or by propose), consumed by weigh.
        self.phi_due, self.phi_value = zeros(boolean), zeros(f32)
        # Per prompt.
        self.log_w = torch.full((B, N), -math.log(N), dtype=f32, device=device)
        self.log_z = zeros(torch.float64, B)
        self.decoded = zeros(i64, 1)
        # Traces; one spare column for the potential-only step that sync_every > 1 may need.
        self.ess = zeros(f32, B, T + 1)
        self.resampled = zeros(boolean, B, T + 1)
        self.ancestors = zeros(i64, B, T + 1, N)
        self.first_logits, self.first_hidden = self.lm.prefill()

    # ------------------------------------------------------------------ device halves of a step
    def propose(self, t: int | None = None) -> None:
        """Forward the last tokens (not at step 0), sample every active row's next token."""
        first = t == 0
        if first:
            logits, hidden = self.first_logits, self.first_hidden
        else:
            logits, hidden = self.lm.step(self.tokens.index_select(1, self.t - 1).squeeze(1))
        log_twist = None
        if self.twist is not None:
            log_twist = self.twist(hidden, self.tokens[:, :t] if self.pass_ids else None)
            if not isinstance(log_twist, torch.Tensor):  # None would silently mean psi = 1 (host-side check)
                raise TypeError(f"twist {type(self.twist).__name__} returned {type(log_twist).__name__}"
                                f"{'' if t is None else f' at step {t}'}, expected log psi [M, V] (a float tensor)")
        out = ops.twist_sample(logits, log_twist, seed=self.seed, step=self.t, validate=first, **self.sample_kw)
        tok, logp, logq, log_psi = out.token, out.logp, out.logq, out.log_psi
        if self.conditional:
            rows = self.forced_rows
            forced = ops.twist_score(logits[rows], log_twist[rows] if log_twist is not None else None,
                                     self.ref.index_select(1, self.t).squeeze(1), validate=False, **self.sample_kw)
            tok, logp, logq, log_psi = (x.index_copy(0, rows, y) for x, y in
                                        ((tok, forced.token), (logp, forced.logp), (logq, forced.logq),
                                         (log_psi, forced.log_psi)))
        active = ~self.finished
        tok = torch.where(active, tok, torch.full_like(tok, self.pad))
        is_eos = is_any_of(tok, self.eos_t) & active  # False everywhere without EOS ids
        terminal = active & (is_eos | (self.t == self.T - 1))
        self.tokens.index_copy_(1, self.t, tok.unsqueeze(1))
        self.lengths += active
        self.sum_logp += torch.where(active, logp, 0.0)
        self.sum_logq += torch.where(active, logq, 0.0)
        self.decoded += active.sum()
        # NaN or +inf logits / twists: log Zpi and log q are NaN (ops.twist_sample); -inf is a dead row.
        self.nan |= ~((out.log_zpi < math.inf) & ~torch.isnan(out.logq)) & active
        if self.delim_t.numel():
            self.delim_hit.copy_(is_any_of(tok, self.delim_t) & active & ~terminal)
        self.finished |= terminal
        if self.phi_fn is None:
            self.phi_due |= terminal  # phi = 1: known on the device (phi_value is 0)
        else:
            self.awaiting |= terminal
        for buf, val in ((self.active, active), (self.terminal, terminal), (self.logp, logp), (self.logq, logq),
                         (self.log_psi_tok, log_psi)):
            buf.copy_(val)

    def weigh(self) -> None:
        """Incremental weights, normalise + resample (``ops.reweight``), gather the particles."""
        active, due, prev = self.active, self.phi_due, self.log_psi_prev
        psi_next = torch.where(due, self.phi_value, torch.where(active, self.log_psi_tok + self.log_inter, prev))
        inc = torch.where(active, self.logp + psi_next - prev - self.logq, psi_next - prev)
        # A particle whose target is already -inf has zero weight and stays dead (avoids -inf - -inf = NaN).
        dead = torch.isneginf(prev) | (active & torch.isneginf(self.logq)) | (due & torch.isneginf(self.phi_value))
        inc = torch.where(dead, torch.full_like(inc, -math.inf), inc)
        inc = torch.where(active | due, inc, torch.zeros_like(inc))
        self.log_phi.copy_(torch.where(due, self.phi_value, self.log_phi))
        prev.copy_(psi_next)
        due.zero_()
        self.phi_value.zero_()
        rw = ops.reweight(self.log_w, inc.view(self.B, self.N), ess_threshold=self.ess_threshold,
                          scheme=self.resampling, seed=self.seed, step=self.t, keep_first=self.conditional,
                          validate=False)
        self.log_z += rw.log_z_inc.double()
        self.log_w.copy_(rw.log_w)
        self.ess.index_copy_(1, self.t, rw.ess.unsqueeze(1))
        self.resampled.index_copy_(1, self.t, rw.resampled.unsqueeze(1))
        self.ancestors.index_copy_(1, self.t, rw.ancestors.unsqueeze(1))
        self.lm.gather_(rw.ancestors, self.state)
        self.t += 1

    def flush(self) -> None:
        """A weigh step without a proposal: applies the potentials the host set after the last token."""
        self.active.zero_()
        self.weigh()

    def capture(self):
        """Capture :meth:`propose` and :meth:`weigh` in two CUDA graphs sharing one memory pool."""
        propose, weigh = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()
        with torch.cuda.graph(propose):
            self.propose()
        with torch.cuda.graph(weigh, pool=propose.pool()):
            self.weigh()

        return _Graphs(propose, weigh)

    # ------------------------------------------------------------------ host
    def host_sync(self, t: int, before_weigh: bool) -> bool:
        """Read the step's flags; evaluate due potentials; True when every particle has finished.

        ``before_weigh``: called between propose and weigh of step ``t`` (``sync_every == 1``), so
        potentials enter this step's weights; else after weigh (they enter the next weigh).
        """
        N, device = self.N, self.tokens.device
        inter_due = torch.zeros_like(self.active)
        if self.inter_fn is not None:
            live = self.active & ~self.terminal
            if self.intermediate_every and (t + 1) % self.intermediate_every == 0:
                inter_due = live
            inter_due = inter_due | self.delim_hit
        flags = torch.stack([self.awaiting.any(), inter_due.any(), self.nan.any(), self.finished.all()]).tolist()
        if flags[2]:
            rows = torch.nonzero(self.nan).flatten().tolist()[:8]
            when = f"step {t}" if before_weigh else f"steps {t + 1 - self.sync_every}..{t}"
            raise FloatingPointError(f"NaN or +inf in the model logits or twist at {when} (rows {rows})")
        if flags[1]:
            idx = torch.nonzero(inter_due).flatten()
            new = _call_potential(self.inter_fn, self.tokens[idx, : t + 1], self.lengths[idx], idx // N, self.tokenizer)
            self.log_inter.index_copy_(0, idx, new.to(device))
        if flags[0]:
            idx = torch.nonzero(self.awaiting).flatten()
            ids = self.tokens[idx, : t + 1]
            if before_weigh and getattr(self.phi_fn, "uses_cache", False) and hasattr(self.phi_fn, "log_phi_cached"):
                new = check_log_phi(self.phi_fn.log_phi_cached(self.lm, idx, ids, idx // N), idx.numel(),
                                    self.phi_fn.name)
            else:
                new = _call_potential(self.phi_fn, ids, self.lengths[idx], idx // N, self.tokenizer)
            self.phi_value.index_copy_(0, idx, new.to(device))
            self.phi_due[idx] = True
            self.awaiting[idx] = False
        return bool(flags[3])

    def output(self, steps: int, columns: int) -> SMCOutput:
        """Assemble :class:`SMCOutput` after ``steps`` decoding steps and ``columns`` reweightings."""
        B, N = self.B, self.N
        dead = torch.isneginf(self.log_z)
        if bool(dead.any()):
            ids = torch.nonzero(dead).flatten().tolist()
            shown = ", ".join(map(str, ids[:8])) + (f", ... ({len(ids)} prompts)" if len(ids) > 8 else "")
            warn_caller(f"all particles of prompt(s) [{shown}] have zero weight "
                        "(the potential, the twist or the model gave every particle probability 0): their log_z "
                        "is -inf and weights are -inf", ZeroWeightWarning)
        # With sync_every > 1 the loop may run idle steps after the last token: not part of T'.
        width = min(steps, int(self.lengths.max()))
        completions = self.tokens[:, :width].reshape(B, N, width)
        prompts = self.input_ids.unsqueeze(1).expand(B, N, self.input_ids.shape[1])
        return SMCOutput(
            sequences=torch.cat([prompts, completions], dim=2),
            completions=completions,
            lengths=self.lengths.view(B, N),
            log_weights=self.log_w,
            log_z=self.log_z,
            ess=self.ess[:, :columns].clone(),
            resampled=self.resampled[:, :columns].clone(),
            ancestors=self.ancestors[:, :columns].clone(),
            log_phi=self.log_phi.view(B, N),
            log_p0=self.sum_logp.view(B, N),
            log_q=self.sum_logq.view(B, N),
            tokens_decoded=int(self.decoded),
            steps=steps,
        )


def _call_potential(fn, ids: torch.Tensor, lengths: torch.Tensor, prompt_index: torch.Tensor, tokenizer):
    """Evaluate a potential on ``ids [R, t]`` (rows that finished / are due; padded after EOS), with the
    text of each row's first ``lengths [R]`` tokens if it asks (with ``sync_every > 1`` a row may have
    finished steps ago: the pad id after its EOS need not be a token the decoder skips)."""
    texts = None
    if fn.needs_text:
        try:
            rows = [row[:n] for row, n in zip(ids.tolist(), lengths.tolist())]
            texts = tokenizer.batch_decode(rows, skip_special_tokens=True)
        except Exception as exc:  # noqa: BLE001 - re-raise with context
            raise ValueError(f"could not decode completions for potential {fn.name!r}: {exc}") from exc
    return check_log_phi(fn(ids, texts=texts, prompt_index=prompt_index), ids.shape[0], fn.name)
