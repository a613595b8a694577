"""Toxicity potential: an offline offensive-language classifier as ``phi`` (the paper's red-teaming task).

The default classifier is ``alt-profanity-check`` (``pip install alt-profanity-check``): a linear
SVM on tf-idf features, calibrated to ``p(offensive | text)``, no network, ~1 ms for a batch. It
is imported when the potential is built, not when this module is imported.

``ToxicityPotential(mode="prob", beta=1.0)``: ``log phi = beta * log p(offensive | text)``
(``phi = p^beta``); ``mode="indicator"``: ``phi = 1[p > threshold]``. ``target="clean"`` scores
``1 - p`` instead (sample harmless text). ``classifier=`` takes any ``texts -> probabilities``
callable (another model, or a stub in tests). Works on partial text too, as an intermediate potential.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch

from .base import Potential
from .text import check_texts

__all__ = ["ToxicityPotential", "profanity_classifier"]

_MODES = ("prob", "indicator")
_TARGETS = ("offensive", "clean")


def profanity_classifier() -> Callable[[list[str]], Sequence[float]]:
    """``alt-profanity-check``'s ``predict_prob`` (``texts -> p(offensive)``), imported on demand.

    Raises:
        ImportError: naming the pip package if it is not installed.
    """
    try:
        from profanity_check import predict_prob
    except ImportError as exc:
        raise ImportError("the toxicity potential needs the offline classifier 'alt-profanity-check': "
                          "pip install alt-profanity-check  (or pass classifier=your_fn)") from exc
    return predict_prob


class ToxicityPotential(Potential):
    """``phi`` from ``p = p(offensive | text)``: ``p^beta`` or ``1[p > threshold]``.

    Args:
        mode: ``"prob"`` (``log phi = beta * log p``) or ``"indicator"`` (``p > threshold``).
        beta: tempering exponent, ``>= 0`` (``beta = 0``: ``phi = 1``).
        threshold: for ``"indicator"``, in ``[0, 1)``.
        target: ``"offensive"`` (score ``p``) or ``"clean"`` (score ``1 - p``).
        classifier: ``fn(list[str]) -> [M]`` probabilities in ``[0, 1]``; default alt-profanity-check.
        name: for error messages.
    """

    needs_text = True

    def __init__(self, *, mode: str = "prob", beta: float = 1.0, threshold: float = 0.5, target: str = "offensive",
                 classifier: Callable | None = None, name: str | None = None):
        self.name = name or ("toxicity" if target == "offensive" else "non-toxicity")
        if mode not in _MODES:
            raise ValueError(f"potential {self.name!r}: mode must be one of {_MODES}, got {mode!r}")
        if target not in _TARGETS:
            raise ValueError(f"potential {self.name!r}: target must be one of {_TARGETS}, got {target!r}")
        beta, threshold = float(beta), float(threshold)
        if not beta >= 0 or math.isinf(beta):
            raise ValueError(f"potential {self.name!r}: beta must be finite and >= 0, got {beta}")
        if not 0 <= threshold < 1:
            raise ValueError(f"potential {self.name!r}: threshold must be in [0, 1), got {threshold}")
        if classifier is not None and not callable(classifier):
            raise TypeError(f"potential {self.name!r}: classifier must be callable, got {type(classifier).__name__}")
        self.mode, self.beta, self.threshold, self.target = mode, beta, threshold, target
        self.classifier = classifier if classifier is not None else profanity_classifier()

    def probabilities(self, texts: Sequence[str]) -> torch.Tensor:
        """float64 ``[M]``: ``p(offensive | text)`` from the classifier (validated)."""
        texts = check_texts(texts, len(texts), self.name)
        if not texts:
            return torch.zeros(0, dtype=torch.float64)
        try:
            p = torch.as_tensor(self.classifier(texts), dtype=torch.float64).reshape(-1)
        except (TypeError, ValueError, RuntimeError) as exc:
            raise ValueError(f"potential {self.name!r}: the classifier did not return numbers: {exc}") from exc
        if p.shape[0] != len(texts):
            raise ValueError(f"potential {self.name!r}: the classifier returned {p.shape[0]} scores for "
                             f"{len(texts)} texts")
        bad = torch.nonzero(~((p >= 0) & (p <= 1))).flatten()  # also catches NaN
        if bad.numel():
            i = int(bad[0])
            raise ValueError(f"potential {self.name!r}: the classifier returned {float(p[i])} (not a probability in "
                             f"[0, 1]) for row {i} (text {texts[i][:60]!r})")
        return p

    def scores(self, texts: Sequence[str]) -> torch.Tensor:
        """float64 ``[M]``: the probability of the target class (``p`` or ``1 - p``)."""
        p = self.probabilities(texts)
        return p if self.target == "offensive" else 1.0 - p

    def log_phi(self, completion_ids, texts, prompt_index):
        s = self.scores(check_texts(texts, completion_ids.shape[0], self.name))
        if self.mode == "indicator":
            return torch.where(s > self.threshold, 0.0, -math.inf).float()
        if self.beta == 0:
            return torch.zeros(s.shape[0], dtype=torch.float32)
        return (self.beta * torch.log(s)).float()
