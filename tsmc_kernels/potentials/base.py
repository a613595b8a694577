"""The potential protocol used by every sampler.

A potential maps finished completions to ``log phi`` (SPEC §1)::

    potential(completion_ids, *, texts=None, prompt_index=None) -> Tensor [M] (float, log phi)

* ``completion_ids``: int64 ``[M, T']`` token ids **without the prompt**, padded after EOS with
  the pad/EOS id.
* ``texts``: the decoded completions (``list[str]`` of length M), passed only when the potential
  sets ``needs_text = True`` (the sampler then needs a tokenizer and decodes only those rows).
* ``prompt_index``: int64 ``[M]``, which prompt each row belongs to (for per-prompt targets such as
  a gold answer).

Return ``-inf`` for ``phi = 0``; never NaN or ``+inf``. Plain callables taking ``completion_ids``
alone are accepted too (:func:`as_potential`). Potentials compose: ``p1 * p2`` is the product of
the potentials (the sum of the logs).
"""
from __future__ import annotations

import inspect
import math
from typing import Callable, Sequence

import torch


class Potential:
    """Base class. Subclasses implement :meth:`log_phi` and set ``needs_text`` if they read text."""

    needs_text: bool = False
    name: str = "potential"

    def log_phi(self, completion_ids: torch.Tensor, texts: Sequence[str] | None,
                prompt_index: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def __call__(self, completion_ids: torch.Tensor, *, texts: Sequence[str] | None = None,
                 prompt_index: torch.Tensor | None = None) -> torch.Tensor:
        if self.needs_text and texts is None:
            raise ValueError(f"potential {self.name!r} needs decoded text: pass texts= (or a tokenizer to the sampler)")
        if prompt_index is None:
            prompt_index = torch.zeros(completion_ids.shape[0], dtype=torch.int64, device=completion_ids.device)
        return check_log_phi(self.log_phi(completion_ids, texts, prompt_index), completion_ids.shape[0], self.name)

    def __mul__(self, other: "Potential") -> "Potential":
        return ProductPotential([self, as_potential(other)])

    def __rmul__(self, other) -> "Potential":  # a plain callable times a Potential
        return ProductPotential([as_potential(other), self])

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"


def check_log_phi(out: torch.Tensor, m: int, name: str) -> torch.Tensor:
    """Validate a potential's output: real numbers ``[m]`` (not bools: ``log phi``, not ``phi > 0``),
    no NaN, no ``+inf``. Returns it as fp32."""
    try:
        out = torch.as_tensor(out)
    except (TypeError, ValueError, RuntimeError):
        raise TypeError(f"potential {name!r} returned {type(out).__name__}, expected a tensor [{m}] of log phi") from None
    if out.dtype == torch.bool:
        raise TypeError(f"potential {name!r} returned bools: it must return log phi (0 where phi = 1, -inf where "
                        "phi = 0), e.g. torch.where(ok, 0.0, float('-inf'))")
    if out.dtype.is_complex:
        raise TypeError(f"potential {name!r} returned {out.dtype}, expected real log phi")
    if out.device.type == "meta":
        raise ValueError(f"potential {name!r} returned a meta tensor (no values)")
    out = out.float()
    if out.shape != (m,):
        raise ValueError(f"potential {name!r} returned shape {tuple(out.shape)}, expected [{m}] (one log phi per row)")
    if bool(torch.isnan(out).any()):
        raise ValueError(f"potential {name!r} returned NaN")
    if bool(torch.isposinf(out).any()):
        raise ValueError(f"potential {name!r} returned +inf")
    return out


class ProductPotential(Potential):
    """Product of potentials: ``log phi = sum_i log phi_i``."""

    def __init__(self, parts: Sequence[Potential]):
        flat = []
        for p in parts:
            flat.extend(p.parts if isinstance(p, ProductPotential) else [p])
        self.parts = flat
        self.needs_text = any(p.needs_text for p in flat)
        self.name = " * ".join(p.name for p in flat)

    def log_phi(self, completion_ids, texts, prompt_index):
        return sum(p(completion_ids, texts=texts, prompt_index=prompt_index).to(completion_ids.device)
                   for p in self.parts)


class CallablePotential(Potential):
    """Wraps a plain callable ``f(completion_ids, **maybe texts/prompt_index) -> [M]``.

    It gets decoded ``texts`` (so the sampler needs a tokenizer) when ``needs_text`` says so, else
    when ``f`` has a ``needs_text`` attribute that says so, else when ``f`` takes a ``texts``
    parameter without a default (it could not run on ``texts=None``).
    """

    def __init__(self, fn: Callable, needs_text: bool | None = None, name: str | None = None):
        self.fn = fn
        self.name = name or getattr(fn, "__name__", "potential")
        params = _params(fn)
        self._kw = {k for k in ("texts", "prompt_index") if k in params or "**" in params}
        if needs_text is None:
            needs_text = getattr(fn, "needs_text", None)
        self.needs_text = _requires_texts(fn) if needs_text is None else bool(needs_text)

    def log_phi(self, completion_ids, texts, prompt_index):
        kw = {}
        if "texts" in self._kw:
            kw["texts"] = texts
        if "prompt_index" in self._kw:
            kw["prompt_index"] = prompt_index
        return self.fn(completion_ids, **kw)


def _requires_texts(fn) -> bool:
    try:
        param = inspect.signature(fn).parameters.get("texts")
    except (TypeError, ValueError):
        return False
    return param is not None and param.default is inspect.Parameter.empty


def _params(fn) -> set:
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return {"**"}
    names = set(sig.parameters)
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in sig.parameters.values()):
        names.add("**")
    return names


def as_potential(p) -> Potential:
    """A :class:`Potential` from a Potential or a plain callable."""
    if isinstance(p, Potential):
        return p
    if callable(p):
        return CallablePotential(p)
    raise TypeError(f"potential must be callable, got {type(p).__name__}")


def positional_arity(fn) -> int:
    """How many positional arguments ``fn`` takes (a large number for ``*args`` or an unreadable signature)."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return 1 << 30
    if any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in params):
        return 1 << 30
    return sum(p.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD) for p in params)


class RewardPotential(Potential):
    """``log phi`` from a text reward ``reward_fn(texts, prompt_index) -> [M]`` (list or tensor;
    ``reward_fn(texts)`` when it takes one argument).

    ``mode="exp"``: ``log phi = beta * r`` (``phi = exp(beta r)``);
    ``mode="indicator"``: ``log phi = 0`` where ``r > threshold`` else ``-inf``.
    """

    needs_text = True

    def __init__(self, reward_fn: Callable, *, mode: str = "exp", beta: float = 1.0, threshold: float = 0.0,
                 name: str | None = None):
        if mode not in ("exp", "indicator"):
            raise ValueError(f"mode must be 'exp' or 'indicator', got {mode!r}")
        self.reward_fn, self.mode, self.beta, self.threshold = reward_fn, mode, beta, threshold
        self._with_index = positional_arity(reward_fn) >= 2
        self.name = name or getattr(reward_fn, "__name__", "reward")
        if math.isnan(float(beta)):
            raise ValueError(f"potential {self.name!r}: beta is NaN")

    def rewards(self, texts: Sequence[str], prompt_index: torch.Tensor) -> torch.Tensor:
        args = (list(texts), prompt_index) if self._with_index else (list(texts),)
        return self.checked_rewards(self.reward_fn(*args), texts)

    def checked_rewards(self, r, texts: Sequence[str]) -> torch.Tensor:
        """The reward function's output as fp64 ``[M]``; ``ValueError`` naming the potential for values
        that are not numbers, the wrong count, or NaN (an indicator would silently read it as 0)."""
        try:
            r = torch.as_tensor(r, dtype=torch.float64).reshape(-1)
        except (TypeError, ValueError, RuntimeError) as exc:
            raise ValueError(f"potential {self.name!r}: the reward function did not return numbers: {exc}") from exc
        if r.shape[0] != len(texts):
            raise ValueError(f"potential {self.name!r}: the reward function returned {r.shape[0]} rewards "
                             f"for {len(texts)} texts")
        bad = torch.nonzero(torch.isnan(r)).flatten()
        if bad.numel():
            i = int(bad[0])
            raise ValueError(f"potential {self.name!r}: the reward function returned NaN for row {i} "
                             f"(text {texts[i][:60]!r})")
        return r

    def log_phi(self, completion_ids, texts, prompt_index):
        r = self.rewards(texts, prompt_index)
        if self.mode == "exp":
            out = self.beta * r  # beta = 0 makes every phi 1, also where r = -inf (0 * -inf is NaN)
            return torch.where(r.isinf() & (self.beta == 0), torch.zeros_like(out), out).float()
        return torch.where(r > self.threshold, 0.0, -math.inf).float()


def from_reward(reward_fn: Callable, *, beta: float = 1.0, name: str | None = None) -> RewardPotential:
    """``phi = exp(beta * r)`` for a text reward ``reward_fn(texts, prompt_index)`` (or ``reward_fn(texts)``)."""
    return RewardPotential(reward_fn, mode="exp", beta=beta, name=name)


def indicator(reward_fn: Callable, *, threshold: float = 0.0, name: str | None = None) -> RewardPotential:
    """``phi = 1[r > threshold]`` for a text reward ``reward_fn(texts, prompt_index)`` (or ``reward_fn(texts)``)."""
    return RewardPotential(reward_fn, mode="indicator", threshold=threshold, name=name)
