"""Drive a Hugging Face causal LM one token at a time for ``M = B * N`` particle rows.

:class:`ParticleLM` owns the KV cache and the attention mask of all particles. Prompt ``b``'s
particles are rows ``b*N .. b*N+N-1``; since resampling only moves particles *within* a prompt,
the prompt part of the mask and every row's position are the same for all of a prompt's
particles and never need gathering: only the KV cache (and the caller's per-row buffers) move.

Cache modes: ``"dynamic"`` (HF ``DynamicCache``; the prompt is prefilled once per prompt and
repeated N times), ``"static"`` (HF ``StaticCache`` sized for prompt + ``max_new_tokens``, the
layout CUDA graphs need) and ``"none"`` (recompute the whole sequence every step: the oracle
for the cached paths).
"""
from __future__ import annotations

import inspect

import torch

from .. import ops
from .inputs import cache_kwarg, check_positions

CACHE_MODES = ("dynamic", "static", "none")


def _kv_layer_types() -> tuple:
    """HF cache layer classes that hold exactly a ``keys`` and a ``values`` tensor ``[M, H, L, D]``."""
    from transformers import cache_utils

    names = ("DynamicLayer", "StaticLayer", "DynamicSlidingWindowLayer", "StaticSlidingWindowLayer")
    return tuple(getattr(cache_utils, n) for n in names if hasattr(cache_utils, n))


class ParticleLM:
    """Batched decoding state for ``M = B * N`` particles.

    Args:
        model: an HF causal LM. input_ids: int64 ``[B, P]`` (left padding allowed).
        attention_mask: ``[B, P]`` (1 = token, 0 = padding) or None.
        num_particles: N. max_new_tokens: T (sizes the buffers).
        cache: one of :data:`CACHE_MODES`. need_hidden: also return the last hidden state.
        compile_decode: run the one-token decode forward through ``torch.compile`` (``cache="static"``
            only: its shapes never change, so it compiles once per call shape; the prefill stays eager).
    """

    def __init__(self, model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, *, num_particles: int,
                 max_new_tokens: int, cache: str = "dynamic", need_hidden: bool = False, compile_decode: bool = False):
        if cache not in CACHE_MODES:
            raise ValueError(f"cache must be one of {CACHE_MODES}, got {cache!r}")
        if compile_decode and cache != "static":
            raise ValueError(f"compile_decode=True needs fixed shapes: cache='static' (or cuda_graph=True), "
                             f"got cache={cache!r}")
        self.model, self.cache_mode, self.need_hidden = model, cache, need_hidden
        device = input_ids.device
        B, P = input_ids.shape
        N, T = num_particles, max_new_tokens
        self.B, self.N, self.M, self.P, self.T = B, N, B * N, P, T
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        mask = attention_mask.to(device=device, dtype=torch.long)
        self.prompt_ids = input_ids
        self.prompt_mask = mask
        # Full mask for the longest possible sequence; the forward reads a prefix of it.
        self.mask = torch.cat([mask.repeat_interleave(N, 0), torch.ones(B * N, T, dtype=torch.long, device=device)], 1)
        self.prompt_len = mask.sum(1).repeat_interleave(N, 0)  # [M] real prompt tokens per row
        self.t = 0  # tokens appended so far
        self.positions = self.prompt_len.unsqueeze(1).clone()  # [M, 1] position of the next token (static)
        self.cache_position = torch.full((1,), P, dtype=torch.long, device=device)  # its cache slot
        self.cache = None
        self.all_ids = None  # [M, P + T] for cache="none"
        params = inspect.signature(model.forward).parameters
        self._logits_to_keep = "logits_to_keep" in params
        self._cache_kw = cache_kwarg(model)
        # Fusing norms, rotary, residuals and activations cuts the decode step's ~45 kernels per
        # layer: under CUDA-graph replay the step is bound by their count, not by bytes.
        self._decode_model = torch.compile(model, dynamic=False) if compile_decode else model
        check_positions(model, input_ids, attention_mask, T, "too long for a static cache" if cache == "static" else
                        "a completion would run past them")

    # ------------------------------------------------------------------ forward passes
    def _forward(self, ids, mask, position_ids, cache_position, keep_last: bool, decode: bool = False):
        kw = dict(input_ids=ids, attention_mask=mask, position_ids=position_ids, use_cache=self.cache_mode != "none",
                  output_hidden_states=self.need_hidden, return_dict=True)
        if self.cache_mode != "none":
            kw[self._cache_kw] = self.cache
            kw["cache_position"] = cache_position
        if keep_last and self._logits_to_keep:
            kw["logits_to_keep"] = 1
        out = (self._decode_model if decode else self.model)(**kw)
        hidden = out.hidden_states[-1][:, -1] if self.need_hidden else None
        return out.logits[:, -1], hidden

    def _positions(self, mask: torch.Tensor) -> torch.Tensor:
        return (mask.cumsum(1) - 1).clamp_min(0)

    @torch.no_grad()
    def prefill(self):
        """Run the prompt. Returns ``(logits [M, V], hidden [M, H] or None)`` for the first new token."""
        from transformers import DynamicCache, StaticCache

        N, P = self.N, self.P
        device = self.prompt_ids.device
        cache_position = torch.arange(P, device=device)
        if self.cache_mode == "dynamic":
            self.cache = DynamicCache(config=self.model.config)
        elif self.cache_mode == "static":
            self.cache = StaticCache(config=self.model.config, max_cache_len=P + self.T)
        if self.cache_mode == "dynamic" and all(hasattr(layer, "batch_repeat_interleave") for layer in self.cache.layers):
            # Once per prompt, then repeated N times (layers of other kinds, e.g. linear attention, cannot repeat).
            logits, hidden = self._forward(self.prompt_ids, self.prompt_mask, self._positions(self.prompt_mask),
                                           cache_position, True)
            self.cache.batch_repeat_interleave(N)
            logits = logits.repeat_interleave(N, 0)
            hidden = hidden.repeat_interleave(N, 0) if hidden is not None else None
        else:
            ids = self.prompt_ids.repeat_interleave(N, 0)
            mask = self.prompt_mask.repeat_interleave(N, 0)
            if self.cache_mode == "none":
                self.all_ids = torch.cat([ids, torch.zeros(self.M, self.T, dtype=ids.dtype, device=device)], 1)
            logits, hidden = self._forward(ids, mask, self._positions(mask), cache_position, True)
        return logits, hidden

    @torch.no_grad()
    def step(self, tokens: torch.Tensor):
        """Append ``tokens`` (int64 ``[M]``) and return ``(logits [M, V], hidden [M, H] or None)`` after them.

        With ``cache="static"`` it launches device work only (CUDA-graph capturable).
        """
        P, t = self.P, self.t
        L = P + t + 1
        if self.cache_mode == "static":
            # Device-side positions and the full-length mask (causal masking hides the future
            # slots): nothing depends on the Python counter, so a CUDA graph can replay this.
            out = self._forward(tokens.unsqueeze(1), self.mask, self.positions, self.cache_position, False, decode=True)
            self.positions += 1
            self.cache_position += 1
        elif self.cache_mode == "none":
            self.all_ids[:, P + t] = tokens
            mask = self.mask[:, :L]
            out = self._forward(self.all_ids[:, :L], mask, self._positions(mask), None, True)
        else:  # dynamic: a device slot counter too (torch.tensor([P + t]) would be a blocking copy)
            position_ids = (self.prompt_len + t).unsqueeze(1)
            out = self._forward(tokens.unsqueeze(1), self.mask[:, :L], position_ids, self.cache_position, False)
            self.cache_position += 1
        self.t += 1
        return out

    # ------------------------------------------------------------------ resampling
    def cache_tensors(self) -> list[torch.Tensor]:
        """Every tensor holding per-row model state: each layer's K and V (then the tensors of other
        layer kinds, such as linear attention's convolution and recurrent states), or the token buffer."""
        return [t for _, t in self._row_tensors()]

    def completion_state(self) -> list[torch.Tensor]:
        """The per-row model state that resampling must move: :meth:`cache_tensors` from column ``P``
        on where a column is a position (full-attention layers, the token buffer), whole otherwise.

        A prompt's particles share their first ``P`` columns (the prompt, prefilled alike for all of
        them), and resampling moves particles only within a prompt, so those columns never need
        copying: half the gather's bytes when the prompt is as long as the completion.
        """
        P = self.P
        return [t if not positional else t[:, P:] if t.dim() == 2 else t[:, :, P:] for positional, t in self._row_tensors()]

    def other_layers(self) -> list[str]:
        """Names of the cache's layer kinds that are not plain K/V attention caches (e.g. linear attention)."""
        if self.cache is None:
            return []
        return sorted({type(layer).__name__ for layer in self.cache.layers if type(layer) not in _kv_layer_types()})

    def _row_tensors(self) -> list[tuple[bool, torch.Tensor]]:
        """``(positional, tensor)`` for every per-row state tensor; positional: column ``i`` holds position ``i``."""
        if self.cache_mode == "none":
            return [(True, self.all_ids)]
        from transformers.cache_utils import DynamicLayer, StaticLayer

        M, kv_types, out = self.M, _kv_layer_types(), []
        for layer in self.cache.layers:
            if type(layer) in kv_types:
                names, positional = ("keys", "values"), type(layer) in (DynamicLayer, StaticLayer)
            else:  # any per-row tensor the layer holds, also inside dicts / lists (state index -> tensor)
                names, positional = list(vars(layer)), False
            for name in names:
                v = getattr(layer, name, None)
                items = v.values() if isinstance(v, dict) else v if isinstance(v, (list, tuple)) else (v,)
                out += [(positional, t) for t in items if isinstance(t, torch.Tensor) and t.dim() > 0 and t.shape[0] == M]
        return out

    def gather_(self, ancestors: torch.Tensor, extra: list[torch.Tensor] = ()) -> None:
        """Apply ``ancestors`` (``[B, N]`` or flat ``[M]``) in place to the cache and to ``extra`` tensors."""
        ops.kv_gather_(self.completion_state() + list(extra), ancestors, validate=False)
