"""Infilling potential: ``phi(s) = p0(o | c, s)^beta`` for a given suffix ``o`` (the paper's infilling task).

The target ``sigma(s) ∝ p0(s | c) p0(o | c, s)`` is the posterior over the middle ``s`` of a text
whose beginning ``c`` (the prompt) and end ``o`` (the suffix) are known.

``InfillPotential(model, prompt_ids, suffix)`` scores the finished particles in **one batched
forward pass** over ``prompt + completion + suffix`` (left-padded, so every suffix sits in the last
positions and only the last ``K + 1`` logits are computed). It needs the prompts (as passed to the
sampler, one per ``prompt_index``) because the potential protocol hands it completion ids only.

:meth:`InfillPotential.log_phi_cached` scores the same rows from the sampler's KV cache instead:
it copies the finished rows' cache (prompt + completion so far), and runs only
``[last completion token, o_1 .. o_{K-1}]`` on top of it, with no prompt re-prefill. The sampler
calls it when the potential sets ``uses_cache = True`` (see the method for the exact hook).

Notes:
    * ``s`` is the completion as generated, cut after its first EOS (the EOS included: a particle
      that stopped is scored on ``p0(o | c, s, EOS)``). To infill a span of fixed length, pass
      ``eos_token_id=[]`` both to :func:`~tsmc_kernels.smc_generate` and to the potential.
    * A text suffix is tokenized on its own (``add_special_tokens=False``): start it with a space
      if it continues a word-separated sentence, as the tokenizer would in context.
    * An empty suffix raises ``ValueError`` (``phi`` would be 1: nothing to condition on).
"""
from __future__ import annotations

import inspect
import math
from typing import Sequence

import torch

from ..sampler.inputs import cache_kwarg, eos_ids, model_vocab
from .base import Potential

__all__ = ["InfillPotential"]


def _as_id_list(x, what: str, name: str, tokenizer=None) -> list[torch.Tensor]:
    """A list of 1-D int64 CPU tensors from ids / list of ids / 2-D tensor / str / list of str."""
    def encode(s: str) -> torch.Tensor:
        if tokenizer is None:
            raise ValueError(f"potential {name!r}: {what} given as text needs tokenizer=")
        try:
            ids = tokenizer(s, add_special_tokens=False)["input_ids"]
        except Exception as exc:  # noqa: BLE001 - re-raise naming the potential
            raise ValueError(f"potential {name!r}: could not tokenize the {what} {s[:60]!r}: {exc}") from exc
        return torch.as_tensor(ids, dtype=torch.int64).reshape(-1)

    if isinstance(x, str):
        return [encode(x)]
    if isinstance(x, torch.Tensor):
        if x.dtype.is_floating_point or x.dtype == torch.bool:
            raise TypeError(f"potential {name!r}: {what} must be integer token ids, got {x.dtype}")
        if x.dim() == 1:
            return [x.to("cpu", torch.int64)]
        if x.dim() == 2:
            return [r.to("cpu", torch.int64) for r in x]
        raise ValueError(f"potential {name!r}: {what} must be 1-D or 2-D ids, got shape {tuple(x.shape)}")
    if isinstance(x, (list, tuple)):
        if len(x) and all(isinstance(v, int) for v in x):
            return [torch.tensor(x, dtype=torch.int64)]
        out = []
        for v in x:
            if isinstance(v, str):
                out.append(encode(v))
            elif isinstance(v, torch.Tensor) and v.dim() == 1 and not v.dtype.is_floating_point:
                out.append(v.to("cpu", torch.int64))
            elif isinstance(v, (list, tuple)) and all(isinstance(i, int) for i in v):
                out.append(torch.tensor(list(v), dtype=torch.int64))
            else:
                raise TypeError(f"potential {name!r}: cannot read {what} element of type {type(v).__name__}")
        return out
    raise TypeError(f"potential {name!r}: {what} must be token ids, a str or a list of them, got {type(x).__name__}")


class InfillPotential(Potential):
    """``log phi(s) = beta * log p0(o | c_b, s)`` for prompt ``c_b = prompts[prompt_index]``.

    Args:
        model: the HF causal LM (the base model ``p0`` of the sampler).
        prompt_ids: the sampler's prompts: ``[B, P]`` ids (with ``attention_mask`` for left padding),
            a 1-D tensor (one prompt), a list of id lists / 1-D tensors, or a list of ``str`` (needs
            ``tokenizer``; must tokenize to the ids given to the sampler).
        suffix: ``o``: ids (1-D tensor / list of int) or a ``str`` (needs ``tokenizer``), shared by all
            prompts; or one per prompt (a list of ``B`` of those, or a ``[B, K]`` tensor).
        attention_mask: ``[B, P]`` for ``prompt_ids`` given as a padded tensor.
        tokenizer: to encode text prompts/suffixes.
        eos_token_id: where a completion ends (cut after its first EOS); default the model's
            generation config, ``[]`` for none. Use the same value as the sampler.
        beta: tempering, ``phi = p0(o | c, s)^beta`` (``>= 0``).
        max_batch_rows: split the forward pass into chunks of at most this many rows (memory).
        name: for error messages.
    Raises:
        ValueError naming the potential for an empty suffix, an empty prompt, a prompt index out of
        range, or ids outside the vocabulary.
    """

    needs_text = False
    uses_cache = True  # can score from the sampler's KV cache (log_phi_cached)

    def __init__(self, model, prompt_ids, suffix, *, attention_mask: torch.Tensor | None = None, tokenizer=None,
                 eos_token_id: int | Sequence[int] | None = None, beta: float = 1.0,
                 max_batch_rows: int | None = None, name: str = "infill"):
        self.name = name
        self.model = model
        self._cache_kw = cache_kwarg(model)
        prompts = _as_id_list(prompt_ids, "prompt", name, tokenizer)
        if attention_mask is not None:
            if not isinstance(prompt_ids, torch.Tensor):
                raise ValueError(f"potential {name!r}: attention_mask goes with a [B, P] prompt_ids tensor")
            mask = attention_mask.reshape(len(prompts), -1).to("cpu").bool()
            if mask.shape[1] != prompts[0].shape[0]:
                raise ValueError(f"potential {name!r}: attention_mask shape {tuple(attention_mask.shape)} does not "
                                 f"match prompt_ids {tuple(prompt_ids.shape)}")
            prompts = [p[m] for p, m in zip(prompts, mask)]
        if not prompts or any(p.numel() == 0 for p in prompts):
            raise ValueError(f"potential {name!r}: every prompt needs at least one token")
        suffixes = _as_id_list(suffix, "suffix", name, tokenizer)
        if not suffixes or any(s.numel() == 0 for s in suffixes):
            raise ValueError(f"potential {name!r}: the suffix is empty (nothing to infill towards)")
        if len(suffixes) not in (1, len(prompts)):
            raise ValueError(f"potential {name!r}: got {len(suffixes)} suffixes for {len(prompts)} prompts "
                             "(give one shared suffix or one per prompt)")
        vocab = model_vocab(model)
        for what, seqs in (("prompt", prompts), ("suffix", suffixes)):
            for s in seqs:
                if vocab is not None and bool(((s < 0) | (s >= vocab)).any()):
                    raise ValueError(f"potential {name!r}: {what} ids outside the model's vocabulary [0, {vocab})")
        beta = float(beta)
        if not beta >= 0 or math.isinf(beta):
            raise ValueError(f"potential {name!r}: beta must be finite and >= 0, got {beta}")
        if max_batch_rows is not None and max_batch_rows < 1:
            raise ValueError(f"potential {name!r}: max_batch_rows must be >= 1, got {max_batch_rows}")
        self.prompts, self.suffixes = prompts, suffixes
        self.eos = eos_ids(model, eos_token_id)
        self.beta, self.max_batch_rows, self.vocab = beta, max_batch_rows, vocab
        self._logits_to_keep = "logits_to_keep" in inspect.signature(model.forward).parameters

    # ------------------------------------------------------------------ helpers
    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _suffix(self, b: int) -> torch.Tensor:
        return self.suffixes[b if len(self.suffixes) > 1 else 0]

    def _check_rows(self, completion_ids: torch.Tensor, prompt_index: torch.Tensor):
        if not isinstance(completion_ids, torch.Tensor) or completion_ids.dim() != 2:
            raise ValueError(f"potential {self.name!r}: completion_ids must be a [R, T] tensor")
        if completion_ids.dtype.is_floating_point or completion_ids.dtype == torch.bool:
            raise TypeError(f"potential {self.name!r}: completion_ids must be integer ids, got {completion_ids.dtype}")
        if self.vocab is not None and completion_ids.numel() and \
                bool(((completion_ids < 0) | (completion_ids >= self.vocab)).any()):
            raise ValueError(f"potential {self.name!r}: completion ids outside the model's vocabulary [0, {self.vocab})")
        pi = prompt_index.reshape(-1).to("cpu", torch.int64)
        if pi.shape[0] != completion_ids.shape[0]:
            raise ValueError(f"potential {self.name!r}: prompt_index has {pi.shape[0]} rows, completions "
                             f"{completion_ids.shape[0]}")
        if pi.numel() and (int(pi.min()) < 0 or int(pi.max()) >= len(self.prompts)):
            raise ValueError(f"potential {self.name!r}: prompt_index {int(pi.max())} out of range for "
                             f"{len(self.prompts)} prompt(s) given to the potential")
        return pi

    def completion_lengths(self, completion_ids: torch.Tensor) -> torch.Tensor:
        """int64 ``[R]``: tokens of each completion up to and including its first EOS (all if none)."""
        R, T = completion_ids.shape
        if not self.eos or T == 0:
            return torch.full((R,), T, dtype=torch.int64)
        ids = completion_ids.to("cpu")
        is_eos = torch.isin(ids, torch.tensor(self.eos, dtype=ids.dtype))
        first = torch.where(is_eos.any(1), is_eos.int().argmax(1) + 1, torch.full((R,), T))
        return first.to(torch.int64)

    def _forward_logits(self, **kw) -> torch.Tensor:
        return self.model(use_cache=kw.pop("use_cache", False), return_dict=True, **kw).logits

    # ------------------------------------------------------------------ full forward
    @torch.no_grad()
    def suffix_log_prob(self, completion_ids: torch.Tensor, prompt_index: torch.Tensor | None = None) -> torch.Tensor:
        """float32 ``[R]``: ``log p0(o_b | c_b, s_r)`` by one batched forward over prompt + completion + suffix."""
        if prompt_index is None:
            prompt_index = torch.zeros(completion_ids.shape[0], dtype=torch.int64)
        pi = self._check_rows(completion_ids, prompt_index)
        R = completion_ids.shape[0]
        out = torch.empty(R, dtype=torch.float32)
        if R == 0:
            return out.to(completion_ids.device)
        lengths = self.completion_lengths(completion_ids).tolist()
        comp = completion_ids.to("cpu", torch.int64)
        step = self.max_batch_rows or R
        for lo in range(0, R, step):
            rows = range(lo, min(R, lo + step))
            seqs, ks = [], []
            for r in rows:
                b = int(pi[r])
                o = self._suffix(b)
                seqs.append(torch.cat([self.prompts[b], comp[r, : lengths[r]], o]))
                ks.append(o.numel())
            out[lo: lo + len(seqs)] = self._score_left_padded(seqs, ks)
        return out.to(completion_ids.device)

    def _score_left_padded(self, seqs: list[torch.Tensor], ks: list[int]) -> torch.Tensor:
        """Sum of the log-probs of the last ``ks[i]`` tokens of each sequence, one forward (left padding)."""
        device, n = self.device, len(seqs)
        L, K = max(s.numel() for s in seqs), max(ks)
        ids = torch.zeros(n, L, dtype=torch.int64)
        mask = torch.zeros(n, L, dtype=torch.int64)
        for i, s in enumerate(seqs):
            ids[i, L - s.numel():] = s
            mask[i, L - s.numel():] = 1
        ids, mask = ids.to(device), mask.to(device)
        pos = (mask.cumsum(1) - 1).clamp_min(0)
        kw = dict(input_ids=ids, attention_mask=mask, position_ids=pos)
        if self._logits_to_keep:
            kw["logits_to_keep"] = K + 1
        logits = self._forward_logits(**kw)[:, -(K + 1):-1].float()  # [n, K, V], position j predicts j + 1
        targets = ids[:, L - K:]
        lp = torch.log_softmax(logits, -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        ks_t = torch.tensor(ks, device=device)
        valid = torch.arange(K, device=device).unsqueeze(0) >= (K - ks_t).unsqueeze(1)
        return torch.where(valid, lp, torch.zeros_like(lp)).sum(1).cpu()

    def log_phi(self, completion_ids, texts, prompt_index):
        lp = self.suffix_log_prob(completion_ids, prompt_index)
        return lp * self.beta if self.beta != 0 else torch.zeros_like(lp)

    # ------------------------------------------------------------------ from the sampler's KV cache
    @torch.no_grad()
    def log_phi_cached(self, lm, rows: torch.Tensor, completion_ids: torch.Tensor,
                       prompt_index: torch.Tensor) -> torch.Tensor:
        """``log phi`` of rows that just finished, from the sampler's KV cache (no prompt re-prefill).

        The hook in :func:`~tsmc_kernels.smc_generate`: at step ``t``, after sampling token ``s_t``
        and *before* ``lm.step``, for the terminal rows ``idx``::

            if getattr(phi_fn, "uses_cache", False) and hasattr(phi_fn, "log_phi_cached"):
                new = phi_fn.log_phi_cached(lm, idx, tokens[idx, : t + 1], idx // N)
                new = check_log_phi(new, idx.numel(), phi_fn.name)

        Args:
            lm: the sampler's :class:`~tsmc_kernels.sampler.lm.ParticleLM`, holding ``c + s_<t`` for every
                row (``lm.t == t``); it is not modified (the rows' cache is copied).
            rows: int64 ``[R]`` the rows of ``lm`` to score. completion_ids: ``[R, t + 1]`` their
                completions, the last token just sampled (an EOS or the length limit's token).
            prompt_index: ``[R]`` (``rows // N``).
        Returns:
            float32 ``[R]``, equal to :meth:`log_phi` up to floating-point error. Falls back to the
            full forward for ``cache="none"``, when the sampler drives another model than the
            potential's, and for models with sliding-window layers.
        """
        from transformers import DynamicCache

        pi = self._check_rows(completion_ids, prompt_index)
        R, T1 = completion_ids.shape
        if R == 0:
            return torch.zeros(0, dtype=torch.float32, device=completion_ids.device)
        t = T1 - 1
        layer_types = getattr(self.model.config, "layer_types", None) or []
        if lm.cache_mode == "none" or lm.model is not self.model or any(k != "full_attention" for k in layer_types):
            return self.log_phi(completion_ids, None, prompt_index)  # no usable cache: the full forward
        if lm.t != t:
            raise ValueError(f"potential {self.name!r}: the cache holds {lm.t} completion tokens but the completions "
                             f"have {T1} (call it after sampling token t and before lm.step)")
        if bool((self.completion_lengths(completion_ids) != T1).any()):
            raise ValueError(f"potential {self.name!r}: log_phi_cached scores rows that just finished (no EOS "
                             "before the last token)")
        device = self.device
        rows = rows.to(device)
        for b in pi.unique().tolist():  # the sampler's prompt must be the potential's prompt
            got = lm.prompt_ids[b][lm.prompt_mask[b].bool()].cpu()
            if got.numel() != self.prompts[b].numel() or bool((got != self.prompts[b]).any()):
                raise ValueError(f"potential {self.name!r}: prompt {b} of the sampler differs from the potential's")
        L = lm.P + t  # cache length (prompt incl. padding + t completion tokens)
        kv = lm.cache_tensors()
        layers = [(kv[i][rows, :, :L], kv[i + 1][rows, :, :L]) for i in range(0, len(kv), 2)]
        cache = DynamicCache(ddp_cache_data=layers, config=self.model.config)
        ks = [self._suffix(int(b)).numel() for b in pi]
        K = max(ks)
        # Inputs [s_t, o_1 .. o_{K-1}] (right-padded: causal attention, later pads do not matter);
        # logits at position j predict o_{j+1}.
        inp = torch.zeros(R, K, dtype=torch.int64)
        tgt = torch.zeros(R, K, dtype=torch.int64)
        inp[:, 0] = completion_ids[:, t].cpu()
        for r, b in enumerate(pi.tolist()):
            o = self._suffix(b)
            inp[r, 1: o.numel()] = o[:-1]
            tgt[r, : o.numel()] = o
        inp, tgt = inp.to(device), tgt.to(device)
        mask = torch.cat([lm.mask[rows, :L], torch.ones(R, K, dtype=lm.mask.dtype, device=device)], 1)
        pos = (lm.prompt_len[rows] + t).unsqueeze(1) + torch.arange(K, device=device)
        logits = self._forward_logits(input_ids=inp, attention_mask=mask, position_ids=pos,
                                      cache_position=torch.arange(L, L + K, device=device), use_cache=True,
                                      **{self._cache_kw: cache}).float()
        lp = torch.log_softmax(logits, -1).gather(-1, tgt.unsqueeze(-1)).squeeze(-1)
        valid = torch.arange(K, device=device).unsqueeze(0) < torch.tensor(ks, device=device).unsqueeze(1)
        out = torch.where(valid, lp, torch.zeros_like(lp)).sum(1).to(completion_ids.device)
        return out * self.beta if self.beta != 0 else torch.zeros_like(out)
