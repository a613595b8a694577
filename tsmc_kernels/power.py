"""Power-distribution Metropolis-Hastings over a Hugging Face causal LM (SPEC §5): :func:`power_sample`.

Target ``pi(x) ∝ p0(x)^alpha`` over completions ``x`` of a prompt (a completion ends at EOS or at
the length limit). Proposal: the base model at temperature ``1/alpha`` (optionally top-k), drawn
with :func:`tsmc_kernels.ops.twist_sample`. One **move** on a chain in state ``x`` (length ``L``)::

    c  ~ P_cut(c | x)                      c in [0, L): keep x[:c]
    x' = x[:c] + suffix ~ q(. | x[:c])     until EOS or the length limit
    log A = alpha * (log p0(x'[c:]) - log p0(x[c:])) + log q(x[c:]) - log q(x'[c:])
            + log P_cut(c | x') - log P_cut(c | x)
    accept with probability min(1, A)

with **full** suffixes on both sides (no truncation bias). Cut rules (:data:`CUT_RULES`):

* ``"uniform"``: ``P_cut(c | x) = 1 / L`` (the correction is ``log L - log L'``).
* ``"entropy"``: ``w_t = max(H_t - H_{t-1}, 0) ** cut_power`` with ``H_t`` the entropy of
  ``p0(. | x[:t])`` and ``H_{-1} = 0``; ``P_cut(t | x) = w_t / sum w`` (uniform when every ``w`` is 0).
  Because ``w_c`` only depends on ``x[:c]`` the correction is ``log sum w(x) - log sum w(x')``
  (computed in general form, so the uniform fallback is handled too).

EOS is terminal: a chain that ended at EOS is never grown; only a cut at or before its EOS
resamples it. **Block-wise annealing**: the completion grows ``block_size`` tokens at a time (the
new tokens are drawn from the proposal and always kept); after block ``k`` the target is ``p0^alpha``
over completions of length ``<= k * block_size`` (the length limit is the block end), and
``n_mcmc`` moves are run on it.

**KV reuse.** Every chain keeps its per-token ``log p0``, ``log q`` and ``H_t`` in ``[M, T]`` fp32
buffers, so a move only computes its new suffix. The key/value cache is an append-only *arena* of
columns shared by all ``M = B * num_chains`` rows, with a per-row attention mask over columns and
explicit position ids. A proposal cut at ``c`` masks out the row's old suffix columns and decodes
the new suffix on top (one token per row per forward pass, whatever the cuts); on accept the old
columns stay masked, on reject the new ones are masked and the old ones unmasked again: nothing is
recomputed and the prompt is never re-prefilled. When the arena is full it is compacted (each row's
valid columns gathered to the front). Rows whose proposal has finished feed masked-out pad tokens
until every row is done. :func:`power_sample_reference` runs the same chain (same random numbers:
they are keyed by ``(seed, move, offset, row)``, never by batch layout or global state) by
re-decoding every sequence from scratch; the tests check both give identical chains.

Random streams (:mod:`tsmc_kernels.rng`): token noise is ``ops.twist_sample(step=move * T + j)``
for the ``j``-th token of a proposal; cut uniforms use stream :data:`STREAM_CUT` and accept
uniforms stream :data:`STREAM_ACCEPT`, both with ``step = move`` and ``row = chain row``.
"""
from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import NamedTuple, Sequence

import torch

from . import ops, rng
from .sampler.inputs import check_int, check_prompts, eos_ids, pad_id

__all__ = ["power_sample", "power_sample_reference", "PowerOutput", "CUT_RULES"]

CUT_RULES = ("entropy", "uniform")
STREAM_ACCEPT = 3  # MH accept uniforms: step = move index, row = chain row
STREAM_CUT = 4  # cut-position uniforms: step = move index, row = chain row
ARENA_EXTRA = 1.0  # arena columns beyond prompt + max_new_tokens, in units of max_new_tokens


# ----------------------------------------------------------------------------- output

@dataclass
class PowerOutput:
    """Final states of the chains of :func:`power_sample` (``B`` prompts x ``C = num_chains`` chains).

    Attributes:
        completions: int64 ``[B, C, T']`` completion ids, padded after EOS with the pad id
            (``T'`` = the longest completion).
        sequences: int64 ``[B, C, P + T']`` prompt (as given, left padding included) then completion.
        lengths: int64 ``[B, C]`` completion lengths (EOS included).
        log_p0: fp32 ``[B, C]`` ``log p0(completion | prompt)`` at temperature 1.
        acceptance: fp32 ``[B, C, num_blocks]`` fraction of the ``n_mcmc`` moves accepted by each
            chain in each block (NaN when ``n_mcmc == 0``). ``acceptance.mean((0, 1))`` is the
            per-block rate over all chains.
        tokens_decoded: tokens sampled by the proposal, over all chains, growth and MH proposals
            included (accepted or not). The prompt prefill is not counted.
        forward_passes: number of model forward calls (prefill included).
        block_ends: the length limit after each block (``min(k * block_size, max_new_tokens)``).
    """

    completions: torch.Tensor
    sequences: torch.Tensor
    lengths: torch.Tensor
    log_p0: torch.Tensor
    acceptance: torch.Tensor
    tokens_decoded: int
    forward_passes: int
    block_ends: list

    @property
    def num_blocks(self) -> int:
        return len(self.block_ends)

    def best_index(self) -> torch.Tensor:
        """int64 ``[B]``: the chain whose completion has the highest ``log p0`` per prompt."""
        return self.log_p0.argmax(dim=1)

    def best(self) -> torch.Tensor:
        """int64 ``[B, P + T']``: the highest-``log p0`` sequence of each prompt."""
        idx = self.best_index()
        return self.sequences[torch.arange(self.sequences.shape[0], device=idx.device), idx]


# ----------------------------------------------------------------------------- validation

def _validate(model, input_ids, attention_mask, *, alpha, cut, cut_power, num_chains, max_new_tokens, block_size,
              n_mcmc, top_k, seed):
    input_ids, attention_mask = check_prompts(model, input_ids, attention_mask, left_padded=True)
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha <= 0:
        raise ValueError(f"alpha must be a finite number > 0, got {alpha!r}")
    if cut not in CUT_RULES:
        raise ValueError(f"unknown cut rule {cut!r}; expected one of {CUT_RULES}")
    if not isinstance(cut_power, (int, float)) or not math.isfinite(cut_power) or cut_power <= 0:
        raise ValueError(f"cut_power must be a finite number > 0, got {cut_power!r}")
    for name, value, low in (("num_chains", num_chains, 1), ("max_new_tokens", max_new_tokens, 1),
                             ("block_size", block_size, 1), ("n_mcmc", n_mcmc, 0), ("top_k", top_k, 0)):
        check_int(name, value, low)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    return input_ids, attention_mask


def _setup(model, input_ids, attention_mask, alpha, cut, cut_power, num_chains, max_new_tokens, block_size, n_mcmc,
           top_k, seed, eos_token_id, pad_token_id):
    if block_size is None:
        block_size = max(1, -(-max_new_tokens // 16)) if isinstance(max_new_tokens, int) else max_new_tokens
    input_ids, attention_mask = _validate(model, input_ids, attention_mask, alpha=alpha, cut=cut, cut_power=cut_power,
                                          num_chains=num_chains, max_new_tokens=max_new_tokens, block_size=block_size,
                                          n_mcmc=n_mcmc, top_k=top_k, seed=seed)
    input_ids = input_ids.long()
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    attention_mask = attention_mask.long()
    eos = eos_ids(model, eos_token_id)
    pad = pad_id(model, pad_token_id, eos)
    ends = [min(k * block_size, max_new_tokens) for k in range(1, -(-max_new_tokens // block_size) + 1)]
    return input_ids, attention_mask, eos, pad, ends


# ----------------------------------------------------------------------------- MH arithmetic (shared)

class _Scores(NamedTuple):
    """Per-position quantities of M chains: all ``[M, T]`` (zeros past ``length``) and ``length [M]``."""

    logp: torch.Tensor  # fp32, log p0(x_t | x_<t)
    logq: torch.Tensor  # fp32, log q(x_t | x_<t) (the proposal: temperature 1/alpha, top-k)
    ent: torch.Tensor  # fp32, entropy of p0(. | x_<t)
    length: torch.Tensor  # int64


def _log_cut_weights(ent: torch.Tensor, length: torch.Tensor, cut: str, cut_power: float) -> torch.Tensor:
    """Unnormalised ``log w_t`` (fp64 ``[M, T]``; ``-inf`` at ``t >= length`` or where ``w_t = 0``).

    Rows whose weights are all zero fall back to uniform (``0`` on ``[0, length)``).
    """
    T = ent.shape[1]
    valid = torch.arange(T, device=ent.device)[None, :] < length[:, None]
    if cut == "uniform":
        lw = torch.zeros(ent.shape, dtype=torch.float64, device=ent.device)
    else:
        e = ent.double()
        d = e - torch.cat([torch.zeros_like(e[:, :1]), e[:, :-1]], 1)
        lw = torch.where(d > 0, cut_power * torch.log(d.clamp_min(1e-300)), -math.inf)
    lw = torch.where(valid, lw, -math.inf)
    fallback = torch.isneginf(lw).all(1, keepdim=True)
    return torch.where(fallback & valid, torch.zeros_like(lw), lw)


def _choose_cut(log_w: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF draw of a cut from ``log_w`` ``[M, T]`` with uniforms ``u`` ``[M]``; never a zero-weight position."""
    T = log_w.shape[1]
    cdf = torch.softmax(log_w, 1).cumsum(1)
    c = torch.searchsorted(cdf.contiguous(), u.double()[:, None].contiguous(), right=True)[:, 0]
    pos = torch.arange(T, device=log_w.device)[None, :]
    last = torch.where(torch.isfinite(log_w), pos, -1).max(1).values
    return torch.minimum(c, last).clamp_min(0)


def _suffix_sum(x: torch.Tensor, start: torch.Tensor, end: torch.Tensor) -> torch.Tensor:
    """fp64 ``[M]``: ``sum_{start <= t < end} x[:, t]``."""
    t = torch.arange(x.shape[1], device=x.device)[None, :]
    keep = (t >= start[:, None]) & (t < end[:, None])
    return torch.where(keep, x.double(), 0.0).sum(1)


def _log_accept(old: _Scores, new: _Scores, c: torch.Tensor, *, alpha: float, cut: str, cut_power: float
                ) -> torch.Tensor:
    """fp64 ``[M]``: ``log A`` of SPEC §5 for the move ``old -> new`` cut at ``c`` (full suffixes both sides)."""
    lw_old = _log_cut_weights(old.ent, old.length, cut, cut_power)
    lw_new = _log_cut_weights(new.ent, new.length, cut, cut_power)
    at = lambda lw: lw.gather(1, c[:, None])[:, 0] - torch.logsumexp(lw, 1)  # noqa: E731  log P_cut(c | .)
    log_a = (alpha * (_suffix_sum(new.logp, c, new.length) - _suffix_sum(old.logp, c, old.length))
             + _suffix_sum(old.logq, c, old.length) - _suffix_sum(new.logq, c, new.length)
             + at(lw_new) - at(lw_old))
    return torch.nan_to_num(log_a, nan=-math.inf)


def _uniform(seed: int, move: int, stream: int, M: int, device) -> torch.Tensor:
    key = rng.row_key(seed, move, stream, torch.arange(M, device=device))
    return rng.uniform(key, torch.zeros_like(key))


# ----------------------------------------------------------------------------- the KV arena

def _arena_classes():
    """The cache classes, created on first use so that importing this module does not import transformers."""
    global _ArenaLayer, _ArenaCache
    if _ArenaLayer is not None:
        return _ArenaLayer, _ArenaCache
    from transformers.cache_utils import DynamicCache, DynamicLayer

    class ArenaLayer(DynamicLayer):
        """A full-attention layer cache with preallocated columns ``[M, H, capacity, D]`` written in place."""

        def __init__(self, capacity: int):
            super().__init__()
            self.capacity, self.length = capacity, 0
            self.kbuf = self.vbuf = None

        def lazy_initialization(self, key_states, value_states):
            self.dtype, self.device = key_states.dtype, key_states.device
            M, H, _, D = key_states.shape
            self.kbuf = key_states.new_zeros(M, H, self.capacity, D)
            self.vbuf = value_states.new_zeros(M, value_states.shape[1], self.capacity, value_states.shape[3])
            self.is_initialized = True

        def update(self, key_states, value_states, *args, **kwargs):
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            n, q = self.length, key_states.shape[-2]
            if n + q > self.capacity:
                self.resize(max(n + q, 2 * self.capacity))
            self.kbuf[:, :, n:n + q] = key_states
            self.vbuf[:, :, n:n + q] = value_states
            self.length = n + q
            self._views()
            return self.keys, self.values

        def _views(self):
            self.keys = self.kbuf[:, :, :self.length]
            self.values = self.vbuf[:, :, :self.length]

        def resize(self, capacity: int):
            if self.kbuf is not None and capacity > self.capacity:
                pad = lambda b: torch.cat([b, b.new_zeros(*b.shape[:2], capacity - b.shape[2], b.shape[3])], 2)  # noqa
                self.kbuf, self.vbuf = pad(self.kbuf), pad(self.vbuf)
            self.capacity = max(capacity, self.capacity)

        def get_seq_length(self) -> int:
            return self.length

        def get_max_length(self) -> int:
            return -1

        def repeat_rows(self, n: int):
            if self.kbuf is not None:
                self.kbuf = self.kbuf.repeat_interleave(n, 0)
                self.vbuf = self.vbuf.repeat_interleave(n, 0)
                self._views()

        def zero_columns(self, keep: torch.Tensor):
            """Zero K/V where ``keep`` (bool ``[M, length]``) is False (masked prompt padding: no NaN leaks)."""
            if self.kbuf is not None:
                k = keep[:, None, :, None]
                self.kbuf[:, :, :self.length] = torch.where(k, self.kbuf[:, :, :self.length], 0)
                self.vbuf[:, :, :self.length] = torch.where(k, self.vbuf[:, :, :self.length], 0)

        def move_columns(self, start: int, src: torch.Tensor):
            """Columns ``start .. start + W`` of row ``m`` become the old columns ``src[m]`` (int64 ``[M, W]``)."""
            if self.kbuf is None:
                return
            rows = torch.arange(src.shape[0], device=src.device)[:, None]
            W = src.shape[1]
            for buf in (self.kbuf, self.vbuf):
                buf[:, :, start:start + W] = buf[rows, :, src].permute(0, 2, 1, 3)
            self.length = start + W
            self._views()

    class ArenaCache(DynamicCache):
        """A ``DynamicCache`` whose layers are :class:`ArenaLayer` (full attention only)."""

        def __init__(self, num_layers: int, capacity: int):
            layers = [ArenaLayer(capacity) for _ in range(num_layers)]
            super(DynamicCache, self).__init__(layers=layers)

    _ArenaLayer, _ArenaCache = ArenaLayer, ArenaCache
    return ArenaLayer, ArenaCache


_ArenaLayer = _ArenaCache = None


def _num_cache_layers(model) -> int:
    """Number of decoder layers; raises for models whose cache is not plain full attention."""
    from transformers.cache_utils import DynamicCache, DynamicLayer

    probe = DynamicCache(config=model.config)
    kinds = {type(layer).__name__ for layer in probe.layers}
    if probe.layers and kinds != {DynamicLayer.__name__}:
        raise NotImplementedError(f"power_sample supports full-attention decoder models; this model's cache has "
                                  f"layers of type {sorted(kinds)} (sliding-window or linear attention)")
    n = len(probe.layers) or getattr(model.config.get_text_config(decoder=True), "num_hidden_layers", 0)
    if not n:
        raise NotImplementedError("could not determine the number of decoder layers of this model")
    return n


class _Arena:
    """The shared KV arena of ``M`` chain rows (see the module docstring).

    Columns ``0 .. Pp-1`` (``Pp = P - 1``) hold the prompt without its last token, prefilled once
    per prompt. A chain of length ``L`` has its *fed tokens* ``s_0 .. s_{L-1}`` in the arena
    (``s_0`` = the last prompt token, ``s_k`` = completion token ``k - 1``): ``col[m, k]`` is the
    column of ``s_k`` (-1 past ``L``). Feeding ``s_k`` gives the logits of completion token ``k``.
    ``mask`` is the committed per-row column mask and ``prop`` the mask of the running proposal.
    """

    def __init__(self, model, prompt_ids, prompt_mask, num_chains: int, T: int):
        self.model = model
        B, P = prompt_ids.shape
        self.M, self.T, self.Pp = B * num_chains, T, P - 1
        device = prompt_ids.device
        # Room for the prompt, a full completion and ARENA_EXTRA * T more columns (compaction frees them);
        # mask column `capacity` is a trash slot that is never read.
        self.capacity = self.Pp + T + max(1, int(ARENA_EXTRA * T))
        _, cache_cls = _arena_classes()
        self.cache = cache_cls(_num_cache_layers(model), self.capacity)
        self.mask = torch.zeros(self.M, self.capacity + 1, dtype=torch.long, device=device)
        self.prop = torch.zeros_like(self.mask)
        self.forward_passes = 0
        self.logits_to_keep = "logits_to_keep" in inspect.signature(model.forward).parameters
        if self.Pp > 0:
            pm = prompt_mask[:, :self.Pp]
            self._forward(prompt_ids[:, :self.Pp], pm, (pm.cumsum(1) - 1).clamp_min(0),
                          torch.arange(self.Pp, device=device))
            for layer in self.cache.layers:
                layer.zero_columns(pm.bool())
                layer.repeat_rows(num_chains)
            self.mask[:, :self.Pp] = pm.repeat_interleave(num_chains, 0)
        self.length = self.Pp

    def _forward(self, ids, mask, position_ids, cache_position):
        kw = {"logits_to_keep": 1} if self.logits_to_keep else {}
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=position_ids, past_key_values=self.cache,
                         cache_position=cache_position, use_cache=True, return_dict=True, **kw)
        self.forward_passes += 1
        return out.logits[:, -1]

    def _grow(self, need: int):
        cap = max(need, self.capacity + self.T)
        for layer in self.cache.layers:
            layer.resize(cap)
        grow = lambda m: torch.cat([m[:, :self.capacity], m.new_zeros(self.M, cap - self.capacity + 1)], 1)  # noqa
        self.mask, self.prop = grow(self.mask), grow(self.prop)
        self.capacity = cap

    def reserve(self, tokens: int, col: torch.Tensor, length: torch.Tensor) -> torch.Tensor:
        """Make room for ``tokens`` more columns (compact, then grow if needed); returns the renumbered ``col``."""
        if self.length + tokens <= self.capacity:
            return col
        col = self.compact(col, length)
        if self.length + tokens > self.capacity:
            self._grow(self.length + tokens)
        return col

    def compact(self, col: torch.Tensor, length: torch.Tensor) -> torch.Tensor:
        """Gather each row's fed columns to ``Pp .. Pp + W`` (right-aligned; ``W`` = the longest row)."""
        W = int(length.max())
        k = torch.arange(W, device=col.device)[None, :]
        src_k = k - (W - length)[:, None]  # fed-token index held by new column Pp + k
        valid = src_k >= 0
        src = torch.where(valid, col.gather(1, src_k.clamp_min(0)), 0)
        for layer in self.cache.layers:
            layer.move_columns(self.Pp, src)
        self.length = self.Pp + W
        self.mask[:, self.Pp:] = 0
        self.mask[:, self.Pp:self.length] = valid.long()
        kk = torch.arange(col.shape[1], device=col.device)[None, :]
        return torch.where(kk < length[:, None], self.Pp + (W - length)[:, None] + kk, -1)

    def begin(self, cut: torch.Tensor, active: torch.Tensor, col: torch.Tensor, length: torch.Tensor) -> None:
        """Start a proposal: the proposal mask drops the columns of ``s_k``, ``k >= cut`` of active rows."""
        self.prop.copy_(self.mask)
        k = torch.arange(col.shape[1], device=col.device)[None, :]
        drop = active[:, None] & (k >= cut[:, None]) & (k < length[:, None])
        self.prop.scatter_(1, torch.where(drop, col, self.capacity), 0)

    def step(self, tokens: torch.Tensor, positions: torch.Tensor, live: torch.Tensor) -> tuple[torch.Tensor, int]:
        """Feed one token per row (``[M]``) at ``positions`` (``[M]``); returns ``(logits [M, V], column)``."""
        if self.length + 1 > self.capacity:  # only if reserve() under-estimated: grow
            self._grow(self.length + 1)
        n = self.length
        self.prop[:, n] = live.long()
        self.mask[:, n] = 0
        dev = tokens.device
        logits = self._forward(tokens[:, None], self.prop[:, :n + 1], positions[:, None],
                               torch.arange(n, n + 1, device=dev))
        self.length = n + 1
        return logits, n

    def commit(self, accept: torch.Tensor) -> None:
        """Accepted rows take the proposal mask; rejected rows keep their old columns."""
        self.mask.copy_(torch.where(accept[:, None], self.prop, self.mask))


# ----------------------------------------------------------------------------- the cached sampler

class _Chains:
    """State of the ``M`` chains and their proposals (cached path)."""

    def __init__(self, model, prompt_ids, prompt_mask, num_chains, T, eos, pad, alpha, top_k, seed):
        device = prompt_ids.device
        self.M, self.T, self.pad, self.alpha, self.top_k, self.seed = prompt_ids.shape[0] * num_chains, T, pad, \
            alpha, top_k, seed
        M = self.M
        self.eos = torch.tensor(eos, dtype=torch.int64, device=device)
        self.last_prompt = prompt_ids[:, -1].repeat_interleave(num_chains, 0)
        self.prompt_len = prompt_mask.sum(1).repeat_interleave(num_chains, 0)
        self.arena = _Arena(model, prompt_ids, prompt_mask, num_chains, T)
        self.tokens = torch.full((M, T), pad, dtype=torch.int64, device=device)
        f = lambda: torch.zeros(M, T, dtype=torch.float32, device=device)  # noqa: E731
        self.scores = _Scores(f(), f(), f(), torch.zeros(M, dtype=torch.int64, device=device))
        self.col = torch.full((M, T), -1, dtype=torch.int64, device=device)
        self.decoded = torch.zeros((), dtype=torch.int64, device=device)

    def ended(self) -> torch.Tensor:
        L = self.scores.length
        last = self.tokens.gather(1, (L - 1).clamp_min(0)[:, None])[:, 0]
        return (L > 0) & torch.isin(last, self.eos)

    @torch.no_grad()
    def propose(self, cut: torch.Tensor, active: torch.Tensor, limit: int, move: int):
        """Decode a suffix from ``cut`` for ``active`` rows until EOS or ``limit``; returns the proposal state."""
        T, arena = self.T, self.arena
        min_cut = int(torch.where(active, cut, limit).min())
        self.col = arena.reserve(limit - min_cut, self.col, self.scores.length)
        arena.begin(cut, active, self.col, self.scores.length)
        tok, col = self.tokens.clone(), self.col.clone()
        logp, logq, ent = (x.clone() for x in self.scores[:3])
        pos = torch.where(active, cut, self.scores.length)
        live = active.clone()
        nan_rows = torch.zeros_like(live)
        j = 0
        while bool(live.any()):
            prev = tok.gather(1, (pos - 1).clamp(0, T - 1)[:, None])[:, 0]
            feed = torch.where(live, torch.where(pos == 0, self.last_prompt, prev), self.pad)
            positions = (self.prompt_len - 1 + pos).clamp_min(0)
            logits, column = arena.step(feed, positions, live)
            out = ops.twist_sample(logits, None, temperature=1.0 / self.alpha, top_k=self.top_k, seed=self.seed,
                                   step=move * T + j, validate=False)
            idx = pos.clamp_max(T - 1)[:, None]
            for buf, val in ((tok, out.token), (logp, out.logp), (logq, out.logq), (ent, out.entropy),
                             (col, torch.full_like(out.token, column))):
                buf.scatter_(1, idx, torch.where(live, val.to(buf.dtype), buf.gather(1, idx)[:, 0])[:, None])
            self.decoded += live.sum()
            nan_rows |= live & torch.isnan(out.log_zpi)
            done = torch.isin(out.token, self.eos) | (pos + 1 >= limit)
            pos = pos + live.long()
            live = live & ~done
            j += 1
        _check_no_nan(nan_rows, move)
        length = torch.where(active, pos, self.scores.length)
        past = torch.arange(T, device=pos.device)[None, :] >= length[:, None]
        tok = tok.masked_fill(past, self.pad)
        logp, logq, ent = (x.masked_fill(past, 0.0) for x in (logp, logq, ent))
        return tok, _Scores(logp, logq, ent, length), col

    def commit(self, accept: torch.Tensor, proposal) -> None:
        tok, sc, col = proposal
        a = accept[:, None]
        self.tokens = torch.where(a, tok, self.tokens)
        self.scores = _Scores(*(torch.where(a, n, o) for n, o in zip(sc[:3], self.scores[:3])),
                              torch.where(accept, sc.length, self.scores.length))
        self.col = torch.where(a, col, self.col)
        self.arena.commit(accept)


def _check_no_nan(nan_rows: torch.Tensor, move: int) -> None:
    """Raise if the model gave NaN logits on some chain row (bool ``[M]``) during proposal ``move``."""
    if bool(nan_rows.any()):
        rows = torch.nonzero(nan_rows).flatten().tolist()[:8]
        raise FloatingPointError(f"NaN in the model logits while decoding proposal {move} (chain rows {rows})")


def _progress(total: int, enabled: bool, desc: str):
    if not enabled:
        return None
    from tqdm.auto import tqdm
    return tqdm(total=total, desc=desc, unit="move")


@torch.no_grad()
def power_sample(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *, alpha: float = 4.0,
                 cut: str = "entropy", cut_power: float = 4.0, num_chains: int = 1, max_new_tokens: int = 256,
                 block_size: int | None = None, n_mcmc: int = 10, top_k: int = 0, seed: int = 0,
                 progress: bool = False, eos_token_id: int | Sequence[int] | None = None,
                 pad_token_id: int | None = None) -> PowerOutput:
    """Sample completions from ``p0^alpha`` by block-wise Metropolis-Hastings with KV reuse (SPEC §5).

    Drop-in next to ``model.generate``: ``input_ids`` ``[B, P]`` (or ``[P]``), left padding via
    ``attention_mask`` ``[B, P]``. ``num_chains`` independent chains run per prompt, all
    ``M = B * num_chains`` of them batched in one forward pass per token.

    Args:
        alpha: power of the target ``p0^alpha`` (> 0); the proposal is the model at temperature ``1/alpha``.
        cut: ``"entropy"`` (cut at entropy jumps) or ``"uniform"``.
        cut_power: ``beta`` of the entropy cut, ``w_t = max(H_t - H_{t-1}, 0) ** beta``.
        max_new_tokens: the final length limit ``T``.
        block_size: tokens added per block (default ``ceil(T / 16)``: 16 blocks); the last block may be shorter.
        n_mcmc: MH moves per chain after each block (0: plain temperature-``1/alpha`` sampling).
        top_k: restrict the proposal to its top-k tokens (0 = off; the acceptance ratio corrects for it).
        seed: all randomness is a function of ``(seed, move, token offset, row)``.
        progress: show a tqdm bar over moves.
        eos_token_id, pad_token_id: default from the model's generation config.
    Returns:
        :class:`PowerOutput` (completions ``[B, num_chains, T']``, ``log_p0``, per-block ``acceptance``,
        ``tokens_decoded``).
    """
    input_ids, attention_mask, eos, pad, ends = _setup(model, input_ids, attention_mask, alpha, cut, cut_power,
                                                       num_chains, max_new_tokens, block_size, n_mcmc, top_k, seed,
                                                       eos_token_id, pad_token_id)
    T, M = max_new_tokens, input_ids.shape[0] * num_chains
    device = input_ids.device
    chains = _Chains(model, input_ids, attention_mask, num_chains, T, eos, pad, float(alpha), top_k, seed)
    accepted = torch.zeros(M, len(ends), dtype=torch.float32, device=device)
    all_rows = torch.ones(M, dtype=torch.bool, device=device)
    bar = _progress(len(ends) * (1 + n_mcmc), progress, "power-mh")
    move = 0
    for b, limit in enumerate(ends):
        grow = ~chains.ended() & (chains.scores.length < limit)
        chains.commit(grow, chains.propose(chains.scores.length, grow, limit, move))
        move += 1
        if bar is not None:
            bar.update(1)
        for _ in range(n_mcmc):
            log_w = _log_cut_weights(chains.scores.ent, chains.scores.length, cut, cut_power)
            c = _choose_cut(log_w, _uniform(seed, move, STREAM_CUT, M, device))
            proposal = chains.propose(c, all_rows, limit, move)
            log_a = _log_accept(chains.scores, proposal[1], c, alpha=float(alpha), cut=cut, cut_power=cut_power)
            accept = torch.log(_uniform(seed, move, STREAM_ACCEPT, M, device)) < log_a
            chains.commit(accept, proposal)
            accepted[:, b] += accept.float()
            move += 1
            if bar is not None:
                bar.update(1)
                bar.set_postfix(block=f"{b + 1}/{len(ends)}", acc=f"{float(accept.float().mean()):.2f}")
    if bar is not None:
        bar.close()
    return _output(input_ids, num_chains, chains.tokens, chains.scores, accepted, n_mcmc, chains.decoded,
                   chains.arena.forward_passes, ends)


def _output(input_ids, num_chains, tokens, scores: _Scores, accepted, n_mcmc, decoded, forwards, ends) -> PowerOutput:
    B, P = input_ids.shape
    Tp = max(1, int(scores.length.max()))
    comps = tokens[:, :Tp].reshape(B, num_chains, Tp)
    acc = accepted / n_mcmc if n_mcmc > 0 else torch.full_like(accepted, math.nan)
    return PowerOutput(
        completions=comps,
        sequences=torch.cat([input_ids.unsqueeze(1).expand(B, num_chains, P), comps], 2),
        lengths=scores.length.view(B, num_chains),
        log_p0=scores.logp.double().sum(1).float().view(B, num_chains),
        acceptance=acc.view(B, num_chains, len(ends)),
        tokens_decoded=int(decoded),
        forward_passes=int(forwards),
        block_ends=list(ends),
    )


# ----------------------------------------------------------------------------- the re-decoding reference

class _Recompute:
    """Full forward passes over ``[prompt | completion]`` (no cache): the oracle for the arena."""

    def __init__(self, model, prompt_ids, prompt_mask, num_chains, T, alpha, top_k):
        self.model, self.T, self.alpha, self.top_k = model, T, alpha, top_k
        self.P = prompt_ids.shape[1]
        self.prompt = prompt_ids.repeat_interleave(num_chains, 0)
        pm = prompt_mask.repeat_interleave(num_chains, 0)
        # Causal attention: completion columns after the position read never influence it.
        self.mask = torch.cat([pm, torch.ones(pm.shape[0], T, dtype=torch.long, device=pm.device)], 1)
        self.positions = (self.mask.cumsum(1) - 1).clamp_min(0)
        self.forward_passes = 0

    def logits(self, tokens: torch.Tensor) -> torch.Tensor:
        """``[M, T, V]``: row ``m``, index ``t`` gives the logits of completion token ``t`` after ``tokens[m, :t]``."""
        ids = torch.cat([self.prompt, tokens], 1)
        out = self.model(input_ids=ids, attention_mask=self.mask, position_ids=self.positions, use_cache=False,
                         return_dict=True)
        self.forward_passes += 1
        return out.logits[:, self.P - 1:self.P - 1 + self.T]

    def score(self, tokens: torch.Tensor, length: torch.Tensor) -> _Scores:
        """Teacher-forced ``log p0``, ``log q`` and entropies of every position (zeros past ``length``)."""
        lg = self.logits(tokens)
        M, T, V = lg.shape
        s = ops.twist_score(lg.reshape(M * T, V), None, tokens.reshape(-1), temperature=1.0 / self.alpha,
                            top_k=self.top_k)
        past = torch.arange(T, device=tokens.device)[None, :] >= length[:, None]
        f = lambda x: x.view(M, T).masked_fill(past, 0.0)  # noqa: E731
        return _Scores(f(s.logp), f(s.logq), f(s.entropy), length)


@torch.no_grad()
def power_sample_reference(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                           alpha: float = 4.0, cut: str = "entropy", cut_power: float = 4.0, num_chains: int = 1,
                           max_new_tokens: int = 256, block_size: int | None = None, n_mcmc: int = 10,
                           top_k: int = 0, seed: int = 0, progress: bool = False,
                           eos_token_id: int | Sequence[int] | None = None,
                           pad_token_id: int | None = None) -> PowerOutput:
    """:func:`power_sample` without any cache: the test oracle.

    Same arguments, same random numbers, hence the same chain (up to float rounding on exact ties).
    Every proposal token re-runs the whole ``[prompt | completion]`` sequence, and before every
    move the current and proposed chains are re-scored by teacher forcing (``ops.twist_score``)
    instead of using stored per-token values. Cost ``O(M (P + T)^2)`` per token and ``O(M T V)``
    memory: tiny models only.
    """
    input_ids, attention_mask, eos, pad, ends = _setup(model, input_ids, attention_mask, alpha, cut, cut_power,
                                                       num_chains, max_new_tokens, block_size, n_mcmc, top_k, seed,
                                                       eos_token_id, pad_token_id)
    T, M = max_new_tokens, input_ids.shape[0] * num_chains
    device = input_ids.device
    eos_t = torch.tensor(eos, dtype=torch.int64, device=device)
    lm = _Recompute(model, input_ids, attention_mask, num_chains, T, float(alpha), top_k)
    tokens = torch.full((M, T), pad, dtype=torch.int64, device=device)
    length = torch.zeros(M, dtype=torch.int64, device=device)
    accepted = torch.zeros(M, len(ends), dtype=torch.float32, device=device)
    decoded = 0
    t_idx = torch.arange(T, device=device)[None, :]

    def decode(cut_at, active, limit, move):
        nonlocal decoded
        tok, pos, live, j = tokens.clone(), torch.where(active, cut_at, length), active.clone(), 0
        nan_rows = torch.zeros_like(live)
        while bool(live.any()):
            lg = lm.logits(tok)
            lg = lg.gather(1, pos.clamp_max(T - 1)[:, None, None].expand(-1, 1, lg.shape[2]))[:, 0]
            out = ops.twist_sample(lg, None, temperature=1.0 / alpha, top_k=top_k, seed=seed, step=move * T + j,
                                   validate=False)
            idx = pos.clamp_max(T - 1)[:, None]
            tok.scatter_(1, idx, torch.where(live, out.token, tok.gather(1, idx)[:, 0])[:, None])
            decoded += int(live.sum())
            nan_rows |= live & torch.isnan(out.log_zpi)
            done = torch.isin(out.token, eos_t) | (pos + 1 >= limit)
            pos = pos + live.long()
            live = live & ~done
            j += 1
        _check_no_nan(nan_rows, move)
        new_len = torch.where(active, pos, length)
        return tok.masked_fill(t_idx >= new_len[:, None], pad), new_len

    bar = _progress(len(ends) * (1 + n_mcmc), progress, "power-mh-ref")
    move = 0
    for b, limit in enumerate(ends):
        last = tokens.gather(1, (length - 1).clamp_min(0)[:, None])[:, 0]
        grow = ~((length > 0) & torch.isin(last, eos_t)) & (length < limit)
        new_tok, new_len = decode(length, grow, limit, move)
        tokens, length = torch.where(grow[:, None], new_tok, tokens), torch.where(grow, new_len, length)
        move += 1
        if bar is not None:
            bar.update(1)
        for _ in range(n_mcmc):
            old = lm.score(tokens, length)
            log_w = _log_cut_weights(old.ent, old.length, cut, cut_power)
            c = _choose_cut(log_w, _uniform(seed, move, STREAM_CUT, M, device))
            new_tok, new_len = decode(c, torch.ones(M, dtype=torch.bool, device=device), limit, move)
            new = lm.score(new_tok, new_len)
            log_a = _log_accept(old, new, c, alpha=float(alpha), cut=cut, cut_power=cut_power)
            accept = torch.log(_uniform(seed, move, STREAM_ACCEPT, M, device)) < log_a
            tokens, length = torch.where(accept[:, None], new_tok, tokens), torch.where(accept, new_len, length)
            accepted[:, b] += accept.float()
            move += 1
            if bar is not None:
                bar.update(1)
    if bar is not None:
        bar.close()
    final = lm.score(tokens, length)
    return _output(input_ids, num_chains, tokens, final, accepted, n_mcmc, decoded, lm.forward_passes, ends)

