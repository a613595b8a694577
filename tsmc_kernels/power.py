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
recomputed and the prompt is never re-prefilled. The arena is an HF ``StaticCache`` of
``P - 1 + 2T + T/4`` columns; when it is full it is compacted (each row's live columns, committed or in
its running proposal, gathered to the front), so it never grows and a CUDA graph of the step
stays valid (``cuda_graph=True``).

**Chains do not wait for each other.** A chain whose proposal is complete is decided and starts
its next move (the next MH move, or the growth of its next block) in the same step, so every
forward pass serves all chains that have a token to decode, whatever move each is in; a
synchronous batch would idle each row until the longest suffix of the move ends (about 1.4x more
forward passes for uniform cuts). :func:`power_sample_reference` runs the same chains move by
move (same random numbers: they are keyed by ``(seed, chain's move, offset, row)``, never by which
chains share a forward pass, timing or global state) by re-decoding every sequence from scratch;
the tests check both give identical chains.

Random streams (:mod:`tsmc_kernels.rng`): token noise is ``ops.twist_sample(step=move * T + j)``
(one step per row) for the ``j``-th token of a proposal; cut uniforms use stream :data:`STREAM_CUT` and accept
uniforms stream :data:`STREAM_ACCEPT`, both with ``step = move`` and ``row = chain row``.
"""
from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import NamedTuple, Sequence

import torch

from . import ops, rng
from .sampler.attention import with_packed_decode_attention
from .sampler.inputs import (cache_kwarg, check_int, check_positions, check_prompts, eos_ids, in_eval_mode, is_any_of,
                             pad_id)
from .sampler.output import compact_repr, decode_completions

__all__ = ["power_sample", "power_sample_reference", "PowerOutput", "CUT_RULES"]

CUT_RULES = ("entropy", "uniform")
STREAM_ACCEPT = 3  # MH accept uniforms: step = move index, row = chain row
STREAM_CUT = 4  # cut-position uniforms: step = move index, row = chain row
GRAPH_WARMUP_STEPS = 2  # eager steps before capture (compiles kernels, allocates workspaces)
# Free arena columns after a compaction, as a fraction of the block limit: attention reads every
# attended column at each step (and HF's masked SDPA path copies K/V per query head), while a
# compaction is one gather of the live columns, so compact often rather than attend wide.
ARENA_ROOM = 0.25


# ----------------------------------------------------------------------------- output

@dataclass(repr=False)
class PowerOutput:
    """Final states of the chains of :func:`power_sample` (``B`` prompts x ``C = num_chains`` chains).

    Attributes:
        completions: int64 ``[B, C, T']`` completion ids, padded after EOS with the pad id
            (``T'`` = the longest completion).
        sequences: int64 ``[B, C, P + T']`` prompt (left-padded: a right-padded prompt is
            left-aligned first) then completion.
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

    __repr__ = compact_repr

    def texts(self, tokenizer, **decode_kw) -> list[list[str]]:
        """The completions as text, ``[B][C]`` strings (see :meth:`SMCOutput.texts`)."""
        return decode_completions(tokenizer, self.completions, self.lengths, **decode_kw)

    @property
    def num_blocks(self) -> int:
        return len(self.block_ends)

    @property
    def acceptance_rate(self) -> torch.Tensor:
        """fp32 ``[B, C, num_blocks]``: :attr:`acceptance` (the acceptance rate per block)."""
        return self.acceptance

    def best_index(self) -> torch.Tensor:
        """int64 ``[B]``: the chain whose completion has the highest ``log p0`` per prompt."""
        return self.log_p0.argmax(dim=1)

    def best(self) -> torch.Tensor:
        """int64 ``[B, P + T']``: the highest-``log p0`` sequence of each prompt."""
        idx = self.best_index()
        return self.sequences[torch.arange(self.sequences.shape[0], device=idx.device), idx]


# ----------------------------------------------------------------------------- validation

def _validate(model, input_ids, attention_mask, pad_token_id, *, alpha, cut, cut_power, max_new_tokens,
              token_type_ids=None):
    input_ids, attention_mask = check_prompts(model, input_ids, attention_mask, pad_token_id, token_type_ids)
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 < alpha <= 1 / ops.MIN_TEMPERATURE:
        raise ValueError(f"alpha must be a Python number in (0, {1 / ops.MIN_TEMPERATURE:g}] (the proposal's "
                         f"temperature is 1 / alpha), got {alpha!r}")
    if cut not in CUT_RULES:
        raise ValueError(f"unknown cut rule {cut!r}; expected one of {CUT_RULES}")
    if isinstance(cut_power, bool) or not isinstance(cut_power, (int, float)) or not math.isfinite(cut_power) \
            or cut_power <= 0:
        raise ValueError(f"cut_power must be a finite Python number > 0, got {cut_power!r}")
    check_positions(model, input_ids, attention_mask, max_new_tokens, "a completion would run past them")
    return input_ids, attention_mask


def _int_args(num_chains, max_new_tokens, block_size, n_mcmc, top_k, seed) -> tuple:
    """The integer arguments as Python ints (numpy / 0-dim torch integers welcome; ``ValueError``
    below their bounds); ``block_size=None`` becomes ``ceil(max_new_tokens / 16)``."""
    max_new_tokens = check_int("max_new_tokens", max_new_tokens, 1)
    if block_size is None:
        block_size = max(1, -(-max_new_tokens // 16))
    return (check_int("num_chains", num_chains, 1), max_new_tokens, check_int("block_size", block_size, 1),
            check_int("n_mcmc", n_mcmc, 0), check_int("top_k", top_k, 0), check_int("seed", seed, 0))


def _setup(model, input_ids, attention_mask, alpha, cut, cut_power, max_new_tokens, block_size, eos_token_id,
           pad_token_id, token_type_ids=None):
    input_ids, attention_mask = _validate(model, input_ids, attention_mask, pad_token_id, alpha=alpha, cut=cut,
                                          cut_power=cut_power, max_new_tokens=max_new_tokens,
                                          token_type_ids=token_type_ids)
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


def _log_accept(old: _Scores, new: _Scores, c: torch.Tensor, lw_old: torch.Tensor, lw_new: torch.Tensor, *,
                alpha: float) -> torch.Tensor:
    """fp64 ``[M]``: ``log A`` of SPEC §5 for the move ``old -> new`` cut at ``c`` (full suffixes both sides);
    ``lw_old`` / ``lw_new``: :func:`_log_cut_weights` of the two states (the caller has them anyway)."""
    at = lambda lw: lw.gather(1, c[:, None])[:, 0] - torch.logsumexp(lw, 1)  # noqa: E731  log P_cut(c | .)
    log_a = (alpha * (_suffix_sum(new.logp, c, new.length) - _suffix_sum(old.logp, c, old.length))
             + _suffix_sum(old.logq, c, old.length) - _suffix_sum(new.logq, c, new.length)
             + at(lw_new) - at(lw_old))
    return torch.nan_to_num(log_a, nan=-math.inf)


def _uniform(seed: int, move, stream: int, M: int, device) -> torch.Tensor:
    """fp64 ``[M]`` uniforms of ``stream`` for row ``m`` at move ``move`` (an int, or int64 ``[M]``: one per row)."""
    key = rng.row_key(seed, move, stream, torch.arange(M, device=device))
    return rng.uniform(key, torch.zeros_like(key))


def _uniforms(bases: torch.Tensor, moves: torch.Tensor) -> torch.Tensor:
    """fp64 ``[S, M]``: :func:`_uniform` of ``S`` streams at once. ``bases``: int64 ``[S, 1]`` of
    :func:`rng.stream_base` (made outside the captured step), ``moves``: int64 ``[S, M]``."""
    key = rng.keyed_row(bases, moves, torch.arange(moves.shape[1], device=moves.device))
    return rng.uniform(key, torch.zeros_like(key))


# ----------------------------------------------------------------------------- the KV arena

def _arena_config(model, columns: int):
    """The config the arena's caches are built from (plain full attention in every layer).

    A model with sliding-window layers runs when every position of the run fits in the window
    (``columns``: the arena's width, ``P - 1 + 2T + room(T)``, which bounds both the column and the
    position distance of any query and key): then a sliding layer attends to exactly what a full one
    does, and the caches are built from a copy of the config with those layers made full (HF's
    sliding caches would drop columns that this run still reads). Raises ``NotImplementedError``
    otherwise, and for linear-attention / chunked / hybrid layers.
    """
    import copy

    from transformers.cache_utils import DynamicCache, DynamicLayer

    kinds = lambda config: {type(layer).__name__ for layer in DynamicCache(config=config).layers}  # noqa: E731
    found = kinds(model.config)
    if found <= {DynamicLayer.__name__}:
        return model.config
    text = model.config.get_text_config(decoder=True)
    window = getattr(text, "sliding_window", None)
    if found <= {DynamicLayer.__name__, "DynamicSlidingWindowLayer"} and isinstance(window, int):
        if columns > window:
            raise NotImplementedError(
                f"power_sample: this run spans {columns} key/value columns (prompt - 1 + 2 * max_new_tokens + "
                f"room), more than the model's sliding window of {window}: shorten the prompt or max_new_tokens "
                f"(smc_generate runs sliding-window models at any length)")
        config = copy.deepcopy(model.config)
        full = config.get_text_config(decoder=True)
        full.sliding_window = None
        if getattr(full, "layer_types", None) is not None:
            full.layer_types = ["full_attention" if kind == "sliding_attention" else kind for kind in full.layer_types]
        if kinds(config) <= {DynamicLayer.__name__}:
            return config
    raise NotImplementedError(f"power_sample supports full-attention decoder models (and sliding-window ones whose "
                              f"window holds the whole run); this model's cache has layers of type {sorted(found)}")


def _room(limit: int) -> int:
    return max(1, int(ARENA_ROOM * limit))


class _Arena:
    """The shared KV arena of ``M`` chain rows (see the module docstring): an HF ``StaticCache``
    of ``capacity`` columns, a per-row column mask, and a device column counter.

    Columns ``0 .. Pp-1`` (``Pp = P - 1``) hold the prompt without its last token, prefilled once
    per prompt and copied to its chains' rows. A chain of length ``L`` has its *fed tokens*
    ``s_0 .. s_{L-1}`` in the arena (``s_0`` = the last prompt token, ``s_k`` = completion token
    ``k - 1``): ``col[m, k]`` is the column of ``s_k`` (-1 past ``L``). Feeding ``s_k`` gives the
    logits of completion token ``k``.
    ``mask`` is the committed per-row column mask and ``prop`` the mask of the running proposal
    (mask column ``max_capacity`` is a trash slot, never read).

    ``max_capacity = Pp + 2T + room(T)`` columns are allocated once, and attention reads only the
    first ``capacity = Pp + 2 * limit + room(limit)`` (:meth:`widen`; ``limit``: the widest block any
    chain is in; ``room(n) = max(1, n * ARENA_ROOM)``). A row's live columns (committed ``<= limit``
    plus its running proposal's new ones ``<= limit``) fit in ``2 * limit``, so after a compaction at
    least ``room(limit)`` columns are free: the arena never grows and its tensors never move.
    :meth:`step` reads only device tensors (the column to write is ``self.column``), so it can be
    CUDA-graph captured; ``self.length`` is the host's copy of that counter, advanced by the caller
    after each step.
    """

    def __init__(self, model, prompt_ids, prompt_mask, num_chains: int, T: int):
        from transformers import StaticCache

        self.model = model
        B, P = prompt_ids.shape
        self.M, self.Pp = B * num_chains, P - 1
        device = prompt_ids.device
        self.max_capacity = self.capacity = self.Pp + 2 * T + _room(T)
        self.config = _arena_config(model, self.max_capacity)
        self.cache = StaticCache(config=self.config, max_cache_len=self.max_capacity)
        self._full = None  # (layer, full keys, full values) once allocated and narrowed by widen()
        self.mask = torch.zeros(self.M, self.max_capacity + 1, dtype=torch.long, device=device)
        self.prop = torch.zeros_like(self.mask)
        self.forward_passes = 0
        self.logits_to_keep = "logits_to_keep" in inspect.signature(model.forward).parameters
        self.cache_kw = cache_kwarg(model)
        if self.Pp > 0:
            self._prefill(prompt_ids[:, :self.Pp], prompt_mask[:, :self.Pp], num_chains)
            self.forward_passes += 1
        self.length = self.Pp
        self.column = torch.full((1,), self.Pp, dtype=torch.int64, device=device)

    def widen(self, limit: int) -> None:
        """Attend to the first ``Pp + 2 * limit + room(limit)`` columns from now on (never fewer).

        ``limit``: the largest length limit of any running move. The layers' K/V become views of
        that width (written in place as before); a CUDA graph is captured per width. A 1-token
        prompt allocates the cache in its first step: full width.
        """
        W = min(self.Pp + 2 * limit + _room(limit), self.max_capacity)
        if self._full is None:
            if not self.buffers() or self.length > self.Pp:
                return
            self._full = [(layer, layer.keys, layer.values) for layer in self.cache.layers]
        elif W <= self.capacity:
            return
        for layer, k, v in self._full:
            layer.keys, layer.values, layer.max_cache_len = k[:, :, :W], v[:, :, :W], W
        self.capacity = W

    def buffers(self) -> list[torch.Tensor]:
        """Every layer's K and V ``[M, H, capacity, D]`` (empty before the first forward pass)."""
        return [t for layer in self.cache.layers for t in (getattr(layer, "keys", None), getattr(layer, "values", None))
                if isinstance(t, torch.Tensor) and t.dim() == 4]

    def _forward(self, ids, mask, position_ids, cache_position, cache):
        kw = {"logits_to_keep": 1} if self.logits_to_keep else {}
        kw[self.cache_kw] = cache
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=position_ids,
                         cache_position=cache_position, use_cache=True, return_dict=True, **kw)
        return out.logits[:, -1]

    def _prefill(self, ids, mask, num_chains: int) -> None:
        """Prefill the ``B`` prompts once and copy each into its ``num_chains`` rows of the arena."""
        from transformers import DynamicCache

        pre = DynamicCache(config=self.config)
        self._forward(ids, mask, (mask.cumsum(1) - 1).clamp_min(0), torch.arange(ids.shape[1], device=ids.device), pre)
        kv = [(layer.keys, layer.values) for layer in pre.layers]
        heads, dims = [k.shape[1] for k, _ in kv], [k.shape[3] for k, _ in kv]
        if len(set(heads)) == 1 and len(set(dims)) == 1:  # ints: early 5.x releases take no per-layer lists
            heads, dims = heads[0], dims[0]
        self.cache.early_initialization(self.M, heads, dims, kv[0][0].dtype, ids.device)
        keep = mask.bool()[:, None, :, None]  # masked prompt padding: zero K/V so that no NaN can leak
        for layer, (k, v) in zip(self.cache.layers, kv):
            for dst, src in ((layer.keys, k), (layer.values, v)):
                dst[:, :, :self.Pp] = torch.where(keep, src, 0).repeat_interleave(num_chains, 0)
        self.mask[:, :self.Pp] = mask.repeat_interleave(num_chains, 0)

    def compact(self, cols: Sequence[torch.Tensor]) -> None:
        """Gather each row's live columns (committed or in its running proposal) to ``Pp ..``, in
        order, and renumber the column tables ``cols`` (int64 ``[M, T]``, -1 = none) in place."""
        n0 = self.length - self.Pp
        keep = (self.mask[:, self.Pp:self.length] | self.prop[:, self.Pp:self.length]).bool()  # [M, n0]
        counts = keep.sum(1, keepdim=True)
        W = int(counts.max())
        order = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)[:, :W]  # kept columns first, in order
        buffers = self.buffers()
        if len(buffers) != 2 * len(self.cache.layers):  # a transformers release with another StaticCache layout
            raise NotImplementedError("power_sample: cannot find the key/value tensors of this StaticCache")
        rows = torch.arange(self.M, device=keep.device)[:, None]
        for buf in buffers:
            buf[:, :, self.Pp:self.Pp + W] = buf[rows, :, self.Pp + order].permute(0, 2, 1, 3)
        filled = torch.arange(W, device=keep.device)[None, :] < counts
        for m in (self.mask, self.prop):
            moved = torch.where(filled, m[:, self.Pp:self.length].gather(1, order), 0)
            m[:, self.Pp:] = 0
            m[:, self.Pp:self.Pp + W] = moved
        new_col = torch.where(keep, self.Pp + keep.long().cumsum(1) - 1, -1)  # old column Pp + i -> new column
        for col in cols if n0 else ():
            old = (col - self.Pp).clamp(0, n0 - 1)
            col.copy_(torch.where(col >= self.Pp, new_col.gather(1, old), col))
        self.length = self.Pp + W
        self.column.fill_(self.length)

    def begin(self, rows: torch.Tensor, cut: torch.Tensor, active: torch.Tensor, col: torch.Tensor,
              length: torch.Tensor) -> None:
        """Start proposals on ``rows`` (bool ``[M]``): their proposal mask is the committed one without
        the columns of ``s_k``, ``k >= cut``, for the ``active`` ones."""
        k = torch.arange(col.shape[1], device=col.device)[None, :]
        drop = active[:, None] & (k >= cut[:, None]) & (k < length[:, None])
        fresh = self.mask.scatter(1, torch.where(drop, col, self.max_capacity), 0)
        self.prop.copy_(torch.where(rows[:, None], fresh, self.prop))

    def step(self, tokens: torch.Tensor, positions: torch.Tensor, live: torch.Tensor) -> torch.Tensor:
        """Feed one token per row (``[M]``) at ``positions`` (``[M]``) into column ``self.column``; returns
        the logits ``[M, V]`` and advances ``self.column`` (device work only: capturable)."""
        self.prop.index_copy_(1, self.column, live.long()[:, None])
        self.mask.index_fill_(1, self.column, 0)
        for layer in self.cache.layers:  # newer transformers: the layer's own write position and query offset
            n = getattr(layer, "cumulative_length", None)
            if isinstance(n, torch.Tensor):
                n.copy_(self.column.reshape(n.shape))
        # The mask over every attended column: causal masking hides those after self.column.
        logits = self._forward(tokens[:, None], self.prop[:, :self.capacity], positions[:, None], self.column,
                               self.cache)
        self.column += 1
        return logits

    def commit(self, accept: torch.Tensor, settled: torch.Tensor) -> None:
        """Accepted rows take the proposal mask; ``settled`` rows (bool ``[M]``, whose move ended)
        drop their proposal: it becomes their committed mask again."""
        self.mask.copy_(torch.where(accept[:, None], self.prop, self.mask))
        self.prop.copy_(torch.where(settled[:, None], self.mask, self.prop))


# ----------------------------------------------------------------------------- the cached sampler

class _Chains:
    """The ``M`` chains (cached path), each running its own sequence of moves.

    Move ``k`` of a chain is the growth move of block ``k // (1 + n_mcmc)`` when
    ``k % (1 + n_mcmc) == 0`` (cut at the current length, always kept), else an MH move. Chains do
    not wait for each other: a chain whose proposal is complete is decided and starts its next move
    in the same :meth:`step`, so a forward pass serves every chain that has a token to decode,
    whichever move it is in. Every random number is keyed by ``(seed, chain's move, offset, row)``,
    so each chain is the one :func:`power_sample_reference` computes move by move.

    :meth:`step` reads and writes only preallocated buffers and device counters: with
    ``cuda_graph`` it is captured once per attention width (after :data:`GRAPH_WARMUP_STEPS` eager
    steps) and replayed; the host looks once per step (all done? NaN? widest block? arena full?).
    """

    def __init__(self, model, prompt_ids, prompt_mask, num_chains, T, eos, pad, *, alpha, cut, cut_power, top_k, seed,
                 ends, n_mcmc, cuda_graph=False):
        device = prompt_ids.device
        M = self.M = prompt_ids.shape[0] * num_chains
        self.T, self.pad, self.alpha, self.top_k, self.seed = T, pad, alpha, top_k, seed
        self.cut_rule, self.cut_power, self.per_block = cut, cut_power, 1 + n_mcmc
        self.total_moves = len(ends) * self.per_block
        self.ends = torch.tensor(ends, dtype=torch.int64, device=device)
        self.eos = torch.tensor(eos, dtype=torch.int64, device=device)
        self.last_prompt = prompt_ids[:, -1].repeat_interleave(num_chains, 0)
        self.prompt_len = prompt_mask.sum(1).repeat_interleave(num_chains, 0)
        self.arena = _Arena(model, prompt_ids, prompt_mask, num_chains, T)
        i64, b = dict(dtype=torch.int64, device=device), dict(dtype=torch.bool, device=device)
        f = lambda: torch.zeros(M, T, dtype=torch.float32, device=device)  # noqa: E731
        # Committed chains.
        self.tokens = torch.full((M, T), pad, **i64)
        self.scores = _Scores(f(), f(), f(), torch.zeros(M, **i64))
        self.col = torch.full((M, T), -1, **i64)
        # Each chain's running move and its proposal.
        self.move = torch.full((M,), -1, **i64)  # -1: before the first move
        self.running = torch.ones(M, **b)  # a move is in progress (its proposal may be complete)
        self.cut, self.limit = torch.zeros(M, **i64), torch.zeros(M, **i64)
        self.p_act = torch.zeros(M, **b)  # the running proposal decodes (a growth move at the limit does not)
        self.p_tok, self.p_col = torch.full((M, T), pad, **i64), torch.full((M, T), -1, **i64)
        self.p_logp, self.p_logq, self.p_ent = f(), f(), f()
        self.p_pos, self.p_live = torch.zeros(M, **i64), torch.zeros(M, **b)
        self.rng_step = torch.zeros(M, **i64)  # move * T + token offset: keys each row's proposal noise
        self.nan = torch.zeros(M, **b)
        self.accepted = torch.zeros(M, len(ends), dtype=torch.float32, device=device)
        self.decoded = torch.zeros((), **i64)
        self.blocks = torch.arange(len(ends), device=device)
        self.cuda_graph, self.graphs, self.pool, self.eager_steps, self.width_steps = cuda_graph, {}, None, 0, 0
        self.stream_bases = torch.tensor([[rng.stream_base(seed, STREAM_ACCEPT)], [rng.stream_base(seed, STREAM_CUT)]],
                                         dtype=torch.int64, device=device)  # [2, 1], for _uniforms

    def ended(self) -> torch.Tensor:
        L = self.scores.length
        last = self.tokens.gather(1, (L - 1).clamp_min(0)[:, None])[:, 0]
        return (L > 0) & is_any_of(last, self.eos)

    # ------------------------------------------------------------------ device work (capturable)
    def decode_step(self) -> None:
        """One token for every live proposal row."""
        T, pos, live = self.T, self.p_pos, self.p_live
        prev = self.p_tok.gather(1, (pos - 1).clamp(0, T - 1)[:, None])[:, 0]
        feed = torch.where(live, torch.where(pos == 0, self.last_prompt, prev), self.pad)
        column = self.arena.column.expand(self.M).clone()
        logits = self.arena.step(feed, (self.prompt_len - 1 + pos).clamp_min(0), live)
        out = ops.twist_sample(logits, None, temperature=1.0 / self.alpha, top_k=self.top_k, seed=self.seed,
                               step=self.rng_step, validate=False)
        idx = pos.clamp_max(T - 1)[:, None]
        for buf, val in ((self.p_tok, out.token), (self.p_logp, out.logp), (self.p_logq, out.logq),
                         (self.p_ent, out.entropy), (self.p_col, column)):
            buf.scatter_(1, idx, torch.where(live, val.to(buf.dtype), buf.gather(1, idx)[:, 0])[:, None])
        self.decoded += live.sum()
        self.nan |= live & ~torch.isfinite(out.log_zpi)  # NaN / +inf logits (NaN), all -inf (-inf)
        done = is_any_of(out.token, self.eos) | (pos + 1 >= self.limit)
        pos += live.long()
        live &= ~done
        self.rng_step += 1

    def settle(self) -> None:
        """Chains whose proposal is complete: decide (MH ratio, or keep a growth), commit, start the next move."""
        T = self.T
        fin = self.running & ~self.p_live
        L = self.scores.length
        length = torch.where(self.p_act, self.p_pos, L)
        past = torch.arange(T, device=L.device)[None, :] >= length[:, None]
        new = _Scores(*(x.masked_fill(past, 0.0) for x in (self.p_logp, self.p_logq, self.p_ent)), length)
        mh = (self.move % self.per_block) != 0
        lw_old = _log_cut_weights(self.scores.ent, L, self.cut_rule, self.cut_power)
        lw_new = _log_cut_weights(new.ent, length, self.cut_rule, self.cut_power)
        log_a = _log_accept(self.scores, new, self.cut.clamp_max(T - 1), lw_old, lw_new,
                            alpha=self.alpha)  # used for MH moves only (their cut is < T)
        # This move's accept uniforms and the next move's cut uniforms, in one pass.
        u, u_cut = _uniforms(self.stream_bases, torch.stack([self.move, self.move + fin.long()]))
        accept = fin & (self.move >= 0) & (~mh | (torch.log(u) < log_a))
        block = self._block(self.move)
        self.accepted += (self.blocks[None, :] == block[:, None]) * (accept & mh).float()[:, None]
        a = accept[:, None]
        self.tokens.copy_(torch.where(a, self.p_tok.masked_fill(past, self.pad), self.tokens))
        for old, x in zip(self.scores[:3], new[:3]):
            old.copy_(torch.where(a, x, old))
        L.copy_(torch.where(accept, length, L))
        self.col.copy_(torch.where(a, self.p_col.masked_fill(past, -1), self.col))
        # The next move of every chain that settled.
        self.move += fin.long()
        start = fin & (self.move < self.total_moves)
        self.running.copy_(start | (self.running & ~fin))
        self.arena.commit(accept, fin & ~start)
        limit = self.ends[self._block(self.move)]
        growth = (self.move % self.per_block) == 0
        # The committed states' cut weights: the new state's where accepted (row-wise, the same numbers).
        c = _choose_cut(torch.where(a, lw_new, lw_old), u_cut)
        cut = torch.where(growth, L, c)
        active = start & torch.where(growth, ~self.ended() & (L < limit), True)
        self.arena.begin(start, cut, active, self.col, L)
        s = start[:, None]
        for buf, val in ((self.p_tok, self.tokens), (self.p_col, self.col), (self.p_logp, self.scores.logp),
                         (self.p_logq, self.scores.logq), (self.p_ent, self.scores.ent)):
            buf.copy_(torch.where(s, val, buf))
        for buf, val in ((self.cut, cut), (self.limit, limit), (self.p_pos, torch.where(active, cut, L)),
                         (self.p_act, active), (self.p_live, active), (self.rng_step, self.move * T)):
            buf.copy_(torch.where(start, val, buf))

    def _block(self, move: torch.Tensor) -> torch.Tensor:
        """int64 ``[M]``: the block of each move (clamped into range: -1 before the first, the total after the last)."""
        return torch.div(move.clamp_min(0), self.per_block, rounding_mode="floor").clamp_max(len(self.ends) - 1)

    def step(self) -> None:
        """One forward pass for every chain with a token to decode, then settle (twice when a move can
        have nothing to decode, a growth after EOS: it then settles at once instead of a step later)."""
        self.decode_step()
        self.settle()
        if self.eos.numel():  # without EOS every move decodes >= 1 token: the second pass would be a no-op
            self.settle()

    # ------------------------------------------------------------------ host
    def _run_step(self) -> None:
        graph = self.graphs.get(self.arena.capacity)
        if graph is not None:
            graph.replay()
        elif self.cuda_graph and self.eager_steps >= GRAPH_WARMUP_STEPS and self.width_steps >= 1:
            # One graph per attention width (one eager step at each new width first), one memory pool.
            torch.cuda.synchronize()
            graph = self.graphs[self.arena.capacity] = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                self.step()
            self.pool = self.pool or graph.pool()
            graph.replay()
        else:
            self.step()
            self.eager_steps += 1
            self.width_steps += 1
        self.arena.length += 1
        self.arena.forward_passes += 1

    @torch.no_grad()
    def run(self, bar=None) -> None:
        """Run every chain through all its moves."""
        self.settle()  # start move 0 (growth of block 0) everywhere
        self.settle()
        arena = self.arena
        while True:
            left, nan, widest, slowest = torch.stack([
                self.running.sum(), self.nan.sum(), torch.where(self.running, self.limit, 0).max(),
                torch.where(self.running, self.move, self.total_moves).min()]).tolist()
            if nan:
                _check_logits(self.nan, "proposals")
            if bar is not None and slowest > bar.n:  # moves every chain has completed
                bar.update(slowest - bar.n)
            if not left:
                return
            width = arena.capacity
            arena.widen(widest)
            if arena.capacity != width:
                self.width_steps = 0
            if arena.length + 1 > arena.capacity:
                arena.compact([self.col, self.p_col])
                if arena.length + 1 > arena.capacity:  # cannot happen: see _Arena
                    raise RuntimeError(f"power arena overflow: {arena.length} of {arena.capacity} columns live")
            self._run_step()


def _check_logits(bad_rows: torch.Tensor, during: str) -> None:
    """Raise if the model gave NaN, +inf or all -inf logits on some chain row (bool ``[M]``) while decoding ``during``."""
    if bool(bad_rows.any()):
        rows = torch.nonzero(bad_rows).flatten().tolist()[:8]
        raise FloatingPointError(f"NaN, +inf or all -inf logits from the model while decoding {during} "
                                 f"(chain rows {rows})")


def _progress(total: int, enabled: bool | str, desc: str):
    """A tqdm bar over ``total`` moves, or None; a string ``enabled`` replaces the label ``desc``."""
    if not enabled:
        return None
    from tqdm.auto import tqdm
    return tqdm(total=total, desc=enabled if isinstance(enabled, str) else desc, unit="move")


@in_eval_mode
@torch.no_grad()
@with_packed_decode_attention
def power_sample(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *, alpha: float = 4.0,
                 cut: str = "entropy", cut_power: float = 4.0, num_chains: int = 1, max_new_tokens: int = 256,
                 block_size: int | None = None, n_mcmc: int = 10, top_k: int = 0, seed: int = 0,
                 progress: bool | str = False, eos_token_id: int | Sequence[int] | None = None,
                 pad_token_id: int | None = None, cuda_graph: bool = False,
                 token_type_ids: torch.Tensor | None = None) -> PowerOutput:
    """Sample completions from ``p0^alpha`` by block-wise Metropolis-Hastings with KV reuse (SPEC §5).

    Drop-in next to ``model.generate``: ``input_ids`` ``[B, P]`` (or ``[P]``), padding via
    ``attention_mask`` ``[B, P]`` (left; right padding is left-aligned first; without a mask, tokens
    equal to the pad id mark padding when it is not an EOS id, as in ``generate``). ``num_chains``
    independent chains run per prompt, all ``M = B * num_chains`` of them batched in one forward
    pass per token. The model runs in eval mode (switched for the call, with a warning, if training).
    Full-attention decoders (Llama, Qwen2, GPT-2, Gemma, Phi3, ...), and sliding-window ones (Mistral,
    Gemma2/3) when the window holds the whole run (``P - 1 + 2.25 * max_new_tokens`` columns): the
    chains' tokens sit in shared arena columns, not at their positions, so a longer run, and models
    with linear-attention or chunked layers, raise ``NotImplementedError``; ``smc_generate`` runs those.

    Args:
        alpha: power of the target ``p0^alpha`` (> 0); the proposal is the model at temperature ``1/alpha``.
        cut: ``"entropy"`` (cut at entropy jumps) or ``"uniform"``.
        cut_power: ``beta`` of the entropy cut, ``w_t = max(H_t - H_{t-1}, 0) ** beta``.
        max_new_tokens: the final length limit ``T``.
        block_size: tokens added per block (default ``ceil(T / 16)``: 16 blocks); the last block may be shorter.
        n_mcmc: MH moves per chain after each block (0: plain temperature-``1/alpha`` sampling).
        top_k: restrict the proposal to its top-k tokens (0 = off). The acceptance ratio corrects for
            the reshaping, but completions with a token outside a top-k set are never proposed: the
            chains then target ``p0^alpha`` restricted to completions made of top-k tokens.
        seed: all randomness is a function of ``(seed, move, token offset, row)`` (``row = b * C + c``; the
            seed folded to 32 bits by :func:`~tsmc_kernels.rng.fold_seed`).
        progress: show a tqdm bar over moves (a string is its label).
        eos_token_id, pad_token_id: default from the model's generation config (the pad id also marks
            prompt padding when no attention_mask is given).
        token_type_ids: accepted so that ``**tok(...)`` works like ``generate(**tok(...))``; must be all 0.
        cuda_graph: capture the per-token step (model forward on the KV arena, sampling, the MH
            decisions of completed proposals, the start of the next moves) in a CUDA graph after
            two eager steps and replay it (CUDA only). The chains are the same as with
            ``cuda_graph=False``; the host still looks once per step (all done? arena full?).
    Returns:
        :class:`PowerOutput` (completions ``[B, num_chains, T']``, ``log_p0``, per-block ``acceptance``,
        ``tokens_decoded``).
    """
    num_chains, max_new_tokens, block_size, n_mcmc, top_k, seed = _int_args(num_chains, max_new_tokens, block_size,
                                                                            n_mcmc, top_k, seed)
    input_ids, attention_mask, eos, pad, ends = _setup(model, input_ids, attention_mask, alpha, cut, cut_power,
                                                       max_new_tokens, block_size, eos_token_id, pad_token_id,
                                                       token_type_ids)
    if cuda_graph and input_ids.device.type != "cuda":
        raise ValueError("cuda_graph=True needs the model and inputs on a CUDA device")
    chains = _Chains(model, input_ids, attention_mask, num_chains, max_new_tokens, eos, pad, alpha=float(alpha),
                     cut=cut, cut_power=cut_power, top_k=top_k, seed=seed, ends=ends, n_mcmc=n_mcmc,
                     cuda_graph=bool(cuda_graph))
    bar = _progress(len(ends) * (1 + n_mcmc), progress, "power-mh")
    chains.run(bar)
    if bar is not None:
        bar.close()
    return _output(input_ids, num_chains, chains.tokens, chains.scores, chains.accepted, n_mcmc, chains.decoded,
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


@in_eval_mode
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
    num_chains, max_new_tokens, block_size, n_mcmc, top_k, seed = _int_args(num_chains, max_new_tokens, block_size,
                                                                            n_mcmc, top_k, seed)
    input_ids, attention_mask, eos, pad, ends = _setup(model, input_ids, attention_mask, alpha, cut, cut_power,
                                                       max_new_tokens, block_size, eos_token_id, pad_token_id)
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
            nan_rows |= live & ~torch.isfinite(out.log_zpi)
            done = is_any_of(out.token, eos_t) | (pos + 1 >= limit)
            pos = pos + live.long()
            live = live & ~done
            j += 1
        _check_logits(nan_rows, f"proposal {move}")
        new_len = torch.where(active, pos, length)
        return tok.masked_fill(t_idx >= new_len[:, None], pad), new_len

    bar = _progress(len(ends) * (1 + n_mcmc), progress, "power-mh-ref")
    move = 0
    for b, limit in enumerate(ends):
        last = tokens.gather(1, (length - 1).clamp_min(0)[:, None])[:, 0]
        grow = ~((length > 0) & is_any_of(last, eos_t)) & (length < limit)
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
            log_a = _log_accept(old, new, c, log_w, _log_cut_weights(new.ent, new.length, cut, cut_power),
                                alpha=float(alpha))
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

