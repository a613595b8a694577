"""Sentiment potential: VADER's compound score as ``phi`` (the paper's review-sentiment task).

The default scorer is VADER (``pip install vaderSentiment``): a lexicon and rules, offline, giving a
``compound`` score in ``[-1, 1]`` (``>= 0.05`` positive, ``<= -0.05`` negative by VADER's own
convention). It is imported when the potential is built, not when this module is imported.

``SentimentPotential("positive", mode="exp", beta=1.0)``: ``log phi = beta * score`` with
``score = compound`` (``-compound`` for ``"negative"``); ``mode="indicator"``:
``phi = 1[score > threshold]``. ``scorer=`` takes any ``text -> compound`` callable. Works on
partial text too, as an intermediate potential.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch

from .base import Potential
from .text import check_texts

__all__ = ["SentimentPotential", "vader_scorer"]

_MODES = ("exp", "indicator")
_POLARITIES = ("positive", "negative")


def vader_scorer() -> Callable[[str], float]:
    """VADER's ``text -> compound score`` in ``[-1, 1]``, imported on demand.

    Raises:
        ImportError: naming the pip package if it is not installed.
    """
    try:
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer
    except ImportError as exc:
        raise ImportError("the sentiment potential needs the offline scorer 'vaderSentiment': "
                          "pip install vaderSentiment  (or pass scorer=your_fn)") from exc
    analyzer = SentimentIntensityAnalyzer()

    def compound(text: str) -> float:
        return analyzer.polarity_scores(text)["compound"]

    return compound


class SentimentPotential(Potential):
    """``phi = exp(beta * score)`` or ``1[score > threshold]``, ``score = ±compound`` for the polarity.

    Args:
        polarity: ``"positive"`` (score = compound) or ``"negative"`` (score = -compound).
        mode: ``"exp"`` or ``"indicator"``.
        beta: inverse temperature for ``"exp"`` (finite; 0 gives ``phi = 1``).
        threshold: for ``"indicator"``, in ``[-1, 1)`` (0.5: clearly of that polarity).
        scorer: ``fn(text) -> compound in [-1, 1]``; default VADER.
        name: for error messages.
    """

    needs_text = True

    def __init__(self, polarity: str = "positive", *, mode: str = "exp", beta: float = 1.0, threshold: float = 0.5,
                 scorer: Callable[[str], float] | None = None, name: str | None = None):
        self.name = name or f"sentiment({polarity})"
        if polarity not in _POLARITIES:
            raise ValueError(f"potential {self.name!r}: polarity must be one of {_POLARITIES}, got {polarity!r}")
        if mode not in _MODES:
            raise ValueError(f"potential {self.name!r}: mode must be one of {_MODES}, got {mode!r}")
        beta, threshold = float(beta), float(threshold)
        if not math.isfinite(beta):
            raise ValueError(f"potential {self.name!r}: beta must be finite, got {beta}")
        if not -1 <= threshold < 1:
            raise ValueError(f"potential {self.name!r}: threshold must be in [-1, 1), got {threshold}")
        if scorer is not None and not callable(scorer):
            raise TypeError(f"potential {self.name!r}: scorer must be callable, got {type(scorer).__name__}")
        self.polarity, self.mode, self.beta, self.threshold = polarity, mode, beta, threshold
        self.scorer = scorer if scorer is not None else vader_scorer()

    def compound(self, texts: Sequence[str]) -> torch.Tensor:
        """float64 ``[M]``: the scorer's compound score of each text (validated to lie in ``[-1, 1]``)."""
        texts = check_texts(texts, len(texts), self.name)
        vals = []
        for i, t in enumerate(texts):
            v = self.scorer(t)
            try:
                v = float(v)
            except (TypeError, ValueError) as exc:
                raise ValueError(f"potential {self.name!r}: the scorer returned {v!r}, not a number, for row {i}") \
                    from exc
            if not -1 <= v <= 1:  # also catches NaN
                raise ValueError(f"potential {self.name!r}: the scorer returned {v} (not in [-1, 1]) for row {i} "
                                 f"(text {t[:60]!r})")
            vals.append(v)
        return torch.tensor(vals, dtype=torch.float64)

    def scores(self, texts: Sequence[str]) -> torch.Tensor:
        """float64 ``[M]``: the signed score for the chosen polarity (``compound`` or ``-compound``)."""
        c = self.compound(texts)
        return c if self.polarity == "positive" else -c

    def log_phi(self, completion_ids, texts, prompt_index):
        s = self.scores(check_texts(texts, completion_ids.shape[0], self.name))
        if self.mode == "indicator":
            return torch.where(s > self.threshold, 0.0, -math.inf).float()
        return (self.beta * s).float()
