"""Text potentials: regular expressions, arbitrary text reward functions, and tempering.

Every potential here reads the decoded completion (``needs_text = True``) and follows the protocol
of :mod:`.base`: ``potential(completion_ids [M, T'], texts=[M str], prompt_index=[M]) -> log phi [M]``.

* :class:`RegexPotential` ``(pattern, flags, how="search"|"match"|"fullmatch", negate=False)``:
  ``phi = 1`` if the text matches (or, with ``negate``, does not), else ``0`` (or ``exp(-penalty)``).
  A *forbidden* pattern (``negate=True``, ``how="search"``) is monotone in the prefix: once a partial
  text contains it, every continuation does, so it is a safe intermediate potential.
* :class:`RegexPrefixPotential` ``(pattern, flags)``: ``phi = 1`` while the partial text can still be
  completed into a full match of ``pattern`` (partial matching of the ``regex`` package), else ``0``.
  The intermediate companion of ``RegexPotential(pattern, how="fullmatch")``: it kills particles
  as soon as they leave the format instead of at EOS.
* :class:`TextRewardPotential` ``(fn, mode="exp"|"indicator", beta, threshold)``: any text reward,
  ``fn(text) -> float`` (or ``fn(texts) -> list`` with ``batched=True``); ``phi = exp(beta * r)`` or
  ``1[r > threshold]``. :func:`text_reward` is the short name.
* :class:`TemperedPotential` / :func:`tempered` ``(potential, beta)``: ``phi^beta``, e.g. a classifier
  score on partial text as an intermediate potential that only nudges the particles.

**Intermediate potentials.** ``smc_generate(..., intermediate_potential=p, intermediate_every=k)``
(and/or ``intermediate_delimiters=[token ids]``) calls ``p`` on the partial completions of the
active particles every ``k`` tokens; the value is a non-learned twist ``psi_t`` (SPEC §2), so any
positive function keeps SMC exact — a good one only lowers the variance. Partial texts may end
in the middle of a multi-byte character (decoded as ``"\\ufffd"``); :class:`RegexPrefixPotential`
drops such a trailing replacement character before matching. The classifier potentials
(:class:`~.toxicity.ToxicityPotential`, :class:`~.sentiment.SentimentPotential`) work on partial
text as they are ("a running classifier score").
"""
from __future__ import annotations

import math
import re
from typing import Callable, Sequence

import torch

from .base import Potential, RewardPotential, as_potential

__all__ = ["RegexPotential", "RegexPrefixPotential", "TextRewardPotential", "text_reward", "TemperedPotential",
           "tempered", "check_texts"]

_HOW = ("search", "match", "fullmatch")


def check_texts(texts, m: int, name: str) -> list[str]:
    """Validate the ``texts`` a potential received: a sequence of ``m`` strings. Returns them as a list.

    Raises:
        ValueError: naming the potential, if ``texts`` is None, has the wrong length, or holds a non-string.
    """
    if texts is None:
        raise ValueError(f"potential {name!r} needs decoded text: pass texts= (or a tokenizer to the sampler)")
    if isinstance(texts, str):
        raise ValueError(f"potential {name!r}: texts must be a list of strings, one per row, got a single str")
    texts = list(texts)
    if len(texts) != m:
        raise ValueError(f"potential {name!r}: got {len(texts)} texts for {m} rows")
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise ValueError(f"potential {name!r}: texts[{i}] is {type(t).__name__}, not str "
                             "(the completion could not be decoded?)")
    return texts


def _check_penalty(penalty: float, name: str) -> float:
    penalty = float(penalty)
    if not penalty > 0 or math.isnan(penalty):
        raise ValueError(f"potential {name!r}: penalty must be > 0 (log phi = -penalty on failure), got {penalty}")
    return penalty


class RegexPotential(Potential):
    """``phi = 1`` where ``pattern`` matches the completion text, else ``exp(-penalty)`` (0 by default).

    Args:
        pattern: a regular expression (``str`` or compiled ``re.Pattern``).
        flags: ``re`` flags (e.g. ``re.DOTALL``), for a string pattern.
        how: ``"search"`` (anywhere), ``"match"`` (at the start) or ``"fullmatch"`` (the whole text).
        negate: score the opposite (the pattern must *not* match): a forbidden pattern.
        penalty: ``log phi = -penalty`` on failure (``inf``: a hard constraint, ``phi = 0``).
        name: for error messages (default: the pattern).
    """

    needs_text = True

    def __init__(self, pattern, flags: int = 0, *, how: str = "search", negate: bool = False,
                 penalty: float = math.inf, name: str | None = None):
        src = pattern.pattern if isinstance(pattern, re.Pattern) else pattern
        self.name = name or f"regex({'not ' if negate else ''}{how} {src!r})"
        if how not in _HOW:
            raise ValueError(f"potential {self.name!r}: how must be one of {_HOW}, got {how!r}")
        if not isinstance(src, str):
            raise TypeError(f"potential {self.name!r}: pattern must be a str or re.Pattern, got {type(pattern).__name__}")
        try:
            self.pattern = pattern if isinstance(pattern, re.Pattern) else re.compile(pattern, flags)
        except re.error as exc:
            raise ValueError(f"potential {self.name!r}: invalid regular expression or flags: {exc}") from exc
        self.how, self.negate = how, bool(negate)
        self.penalty = _check_penalty(penalty, self.name)

    def matches(self, texts: Sequence[str]) -> torch.Tensor:
        """bool ``[M]``: whether each text satisfies the potential (after ``negate``)."""
        fn = getattr(self.pattern, self.how)
        ok = [fn(t) is not None for t in check_texts(texts, len(texts), self.name)]
        return torch.tensor(ok, dtype=torch.bool) ^ self.negate

    def log_phi(self, completion_ids, texts, prompt_index):
        ok = self.matches(check_texts(texts, completion_ids.shape[0], self.name))
        return torch.where(ok, 0.0, -self.penalty).float()


def _regex_flags(regex, flags: int) -> int:
    """Translate ``re`` flags to the ``regex`` module's (``ASCII`` has a different value there)."""
    out, rest = 0, int(flags)
    for flag in ("IGNORECASE", "LOCALE", "MULTILINE", "DOTALL", "UNICODE", "VERBOSE", "ASCII"):
        bit = int(getattr(re, flag))
        if rest & bit:
            out |= int(getattr(regex, flag))
            rest &= ~bit
    if rest:
        raise ValueError(f"unsupported re flags {rest:#x}")
    return out


class RegexPrefixPotential(Potential):
    """``phi = 1`` while the (partial) text is a prefix of some full match of ``pattern``, else 0.

    Uses the partial matching of the ``regex`` package (a dependency of ``transformers``). Meant as
    ``intermediate_potential``; pair it with ``RegexPotential(pattern, how="fullmatch")`` as the
    final potential (a prefix of a match is not a match).

    Args:
        pattern: a regular expression (``str``), in the syntax of ``re`` (``regex`` accepts it).
        flags: ``re`` flags (``re.IGNORECASE | re.DOTALL`` ...), translated to the ``regex`` module's.
        penalty: ``log phi = -penalty`` on a violation (``inf``: kill the particle).
        strip: remove leading/trailing whitespace before matching (a model often starts with a space).
        name: for error messages.
    """

    needs_text = True

    def __init__(self, pattern: str, flags: int = 0, *, penalty: float = math.inf, strip: bool = False,
                 name: str | None = None):
        self.name = name or f"regex-prefix({pattern!r})"
        try:
            import regex
        except ImportError as exc:  # pragma: no cover - transformers depends on regex
            raise ImportError(f"potential {self.name!r} needs the 'regex' package: pip install regex") from exc
        if not isinstance(pattern, str):
            raise TypeError(f"potential {self.name!r}: pattern must be a str, got {type(pattern).__name__}")
        try:
            self.pattern = regex.compile(pattern, _regex_flags(regex, flags))
        except (regex.error, ValueError) as exc:
            raise ValueError(f"potential {self.name!r}: invalid regular expression or flags: {exc}") from exc
        self.penalty = _check_penalty(penalty, self.name)
        self.strip = strip

    def viable(self, texts: Sequence[str]) -> torch.Tensor:
        """bool ``[M]``: whether each text can still be extended into a full match."""
        out = []
        for t in check_texts(texts, len(texts), self.name):
            t = t.rstrip("\ufffd")  # an incomplete multi-byte character at the cut
            if self.strip:
                t = t.strip()
            out.append(self.pattern.fullmatch(t, partial=True) is not None)
        return torch.tensor(out, dtype=torch.bool)

    def log_phi(self, completion_ids, texts, prompt_index):
        ok = self.viable(check_texts(texts, completion_ids.shape[0], self.name))
        return torch.where(ok, 0.0, -self.penalty).float()


class TextRewardPotential(RewardPotential):
    """A potential from an arbitrary text reward: ``phi = exp(beta * r)`` or ``1[r > threshold]``.

    Args:
        fn: ``fn(text) -> float`` (default), or with ``batched=True`` ``fn(texts) -> sequence [M]``;
            with ``with_prompt_index=True`` it also gets the prompt index (``fn(text, b)`` /
            ``fn(texts, prompt_index)``), for per-prompt targets.
        mode: ``"exp"`` or ``"indicator"``. beta: inverse temperature. threshold: for ``"indicator"``.
        name: for error messages (default: the function's name).
    Raises (at call time):
        ValueError naming the potential if ``fn`` returns the wrong number of rewards, NaN, or a
        value that is not a number.
    """

    def __init__(self, fn: Callable, *, batched: bool = False, with_prompt_index: bool = False, mode: str = "exp",
                 beta: float = 1.0, threshold: float = 0.0, name: str | None = None):
        if not callable(fn):
            raise TypeError(f"reward function must be callable, got {type(fn).__name__}")
        super().__init__(fn, mode=mode, beta=beta, threshold=threshold, name=name)
        self.batched, self.with_prompt_index = batched, with_prompt_index

    def rewards(self, texts: Sequence[str], prompt_index: torch.Tensor) -> torch.Tensor:
        texts = check_texts(texts, len(texts), self.name)
        if self.batched:
            r = self.reward_fn(texts, prompt_index) if self.with_prompt_index else self.reward_fn(texts)
        elif self.with_prompt_index:
            r = [self.reward_fn(t, int(b)) for t, b in zip(texts, prompt_index.tolist())]
        else:
            r = [self.reward_fn(t) for t in texts]
        return self.checked_rewards(r, texts)

    def log_phi(self, completion_ids, texts, prompt_index):
        return super().log_phi(completion_ids, check_texts(texts, completion_ids.shape[0], self.name), prompt_index)


def text_reward(fn: Callable, *, batched: bool = False, with_prompt_index: bool = False, mode: str = "exp",
                beta: float = 1.0, threshold: float = 0.0, name: str | None = None) -> TextRewardPotential:
    """Shorthand for :class:`TextRewardPotential`."""
    return TextRewardPotential(fn, batched=batched, with_prompt_index=with_prompt_index, mode=mode, beta=beta,
                               threshold=threshold, name=name)


class TemperedPotential(Potential):
    """``phi^beta`` of another potential (``log phi * beta``; ``beta = 0`` gives ``phi = 1`` everywhere).

    Args:
        potential: a :class:`Potential` or plain callable. beta: ``>= 0`` (a negative power would
            turn ``phi = 0`` into ``+inf``).
    """

    def __init__(self, potential, beta: float):
        self.inner = as_potential(potential)
        beta = float(beta)
        if not beta >= 0 or math.isinf(beta):
            raise ValueError(f"tempered potential {self.inner.name!r}: beta must be finite and >= 0, got {beta}")
        self.beta = beta
        self.needs_text = self.inner.needs_text
        self.name = f"({self.inner.name})^{beta:g}"

    def log_phi(self, completion_ids, texts, prompt_index):
        lp = self.inner(completion_ids, texts=texts, prompt_index=prompt_index)
        if self.beta == 0:
            return torch.zeros_like(lp)
        return lp * self.beta


def tempered(potential, beta: float) -> TemperedPotential:
    """``phi^beta`` (see :class:`TemperedPotential`)."""
    return TemperedPotential(potential, beta)
