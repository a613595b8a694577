"""Decode attention for grouped-query models without repeating K/V (an HF attention function).

Both samplers decode one token per row against a KV cache with an explicit attention mask (left
padding, a static cache's unused slots, the power-MH arena's dead columns). With a mask, HF's
``sdpa`` attention (transformers <= 5.17, and any version under ``torch.compile``) first repeats
every K/V head for the ``G`` query heads that share it (``repeat_kv``), so each decode step writes
and reads ``G`` copies of the whole cache: 6x the K/V traffic on Qwen2.5-1.5B (12 query heads,
2 K/V heads). For one query token the repeat is unnecessary: query ``[B, Hq, 1, D]`` is viewed as
``[B, Hkv, G, D]`` (``G`` query "positions" per K/V head, all at the same position, so the mask
``[B, 1, 1, S]`` broadcasts over them) and attended against K/V ``[B, Hkv, S, D]`` as they are.
The result is the same attention, computed in another order.

:func:`packed_decode_attention` switches a model that uses ``sdpa`` to this function for the
length of a sampler call and restores it afterwards; prefill and every case it does not cover go
to HF's own ``sdpa`` function. ``TSMC_PACKED_GQA=0`` turns it off (to compare).
"""
from __future__ import annotations

import contextlib
import functools
import os

import torch

NAME = "tsmc_packed_sdpa"
_registered = False


def packed_sdpa_attention(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                          attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                          is_causal: bool | None = None, **kwargs):
    """HF attention-function signature. query ``[B, Hq, q, D]``, key/value ``[B, Hkv, S, D]``,
    attention_mask ``[B, 1, q, S]`` (bool or additive) or None. Returns ``(out [B, q, Hq, D], None)``.

    One query token of a grouped-query layer: packed as above. Anything else (prefill, dropout,
    position bias, attention sinks, soft-capping, per-head masks): HF's ``sdpa_attention_forward``.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    B, Hq, q_len, D = query.shape
    Hkv = key.shape[1]
    G = Hq // Hkv if Hkv else 0
    plain = (q_len == 1 and G > 1 and Hq == G * Hkv and not dropout and value.shape[1] == Hkv
             and key.shape[-1] == D and value.shape[-1] == D
             and (attention_mask is None or (attention_mask.dim() == 4 and attention_mask.shape[1] == 1))
             and not any(kwargs.get(k) is not None for k in ("position_bias", "s_aux", "sinks", "softcap", "cache"))
             and not kwargs.get("output_attentions", False))
    if not plain:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    if attention_mask is not None and attention_mask.shape[-1] != key.shape[-2]:
        attention_mask = attention_mask[..., :key.shape[-2]]
    # Query head h = k * G + g reads K/V head k (HF's repeat_kv order).
    out = torch.nn.functional.scaled_dot_product_attention(query.reshape(B, Hkv, G, D), key, value,
                                                           attn_mask=attention_mask, scale=scaling)
    return out.reshape(B, Hq, 1, D).transpose(1, 2).contiguous(), None


def _register() -> None:
    global _registered
    if not _registered:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

        AttentionInterface.register(NAME, packed_sdpa_attention)
        AttentionMaskInterface.register(NAME, sdpa_mask)
        _registered = True


def _configs(model) -> list:
    """Every distinct config of the model and its sub-models (and their sub-configs)."""
    from transformers import PreTrainedModel

    found, todo = {}, [m.config for m in model.modules() if isinstance(m, PreTrainedModel)]
    while todo:
        cfg = todo.pop()
        if cfg is None or id(cfg) in found:
            continue
        found[id(cfg)] = cfg
        todo += [getattr(cfg, k, None) for k in getattr(cfg, "sub_configs", {})]
    return list(found.values())


@contextlib.contextmanager
def packed_decode_attention(model):
    """Within the block, every config of ``model`` that uses ``"sdpa"`` uses :func:`packed_sdpa_attention`.

    No effect on other attention implementations, or with ``TSMC_PACKED_GQA=0``. The model is
    restored on exit (also on error).
    """
    if os.environ.get("TSMC_PACKED_GQA", "1") == "0":
        yield
        return
    switched = [c for c in _configs(model) if getattr(c, "_attn_implementation_internal", None) == "sdpa"]
    if switched:
        _register()
    for cfg in switched:
        cfg._attn_implementation_internal = NAME
    try:
        yield
    finally:
        for cfg in switched:
            cfg._attn_implementation_internal = "sdpa"


def with_packed_decode_attention(sampler):
    """Decorator: run ``sampler(model, ...)`` inside :func:`packed_decode_attention` ``(model)``."""
    @functools.wraps(sampler)
    def wrapped(model, *args, **kwargs):
        with packed_decode_attention(model):
            return sampler(model, *args, **kwargs)
    return wrapped
