"""Potentials ``log phi`` on finished (or partial) completions; see :mod:`.base` for the protocol.

* :mod:`.base`: ``Potential``, composition ``p1 * p2``, ``from_reward`` / ``indicator`` (text rewards).
* :mod:`.text`: ``RegexPotential``, ``RegexPrefixPotential`` (format kept so far: an intermediate
  potential), ``TextRewardPotential`` / ``text_reward`` (any ``text -> float``), ``tempered``.
* :mod:`.toxicity`: ``ToxicityPotential`` (alt-profanity-check, ``p(offensive)^beta`` or indicator).
* :mod:`.sentiment`: ``SentimentPotential`` (VADER compound, ``exp(beta * score)`` or indicator).
* :mod:`.infill`: ``InfillPotential`` (``p0(suffix | prompt, completion)^beta``).

The classifier packages are imported only when a toxicity/sentiment potential is built.
"""
from .base import Potential, ProductPotential, RewardPotential, as_potential, from_reward, indicator
from .infill import InfillPotential
from .sentiment import SentimentPotential
from .text import (RegexPotential, RegexPrefixPotential, TemperedPotential, TextRewardPotential,
                   tempered, text_reward)
from .toxicity import ToxicityPotential

__all__ = ["Potential", "ProductPotential", "RewardPotential", "as_potential", "from_reward", "indicator",
           "RegexPotential", "RegexPrefixPotential", "TextRewardPotential", "text_reward", "TemperedPotential",
           "tempered", "ToxicityPotential", "SentimentPotential", "InfillPotential"]
