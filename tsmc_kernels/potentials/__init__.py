"""Potentials ``log phi`` on finished (or partial) completions; see :mod:`.base` for the protocol.

* :mod:`.base`: ``Potential``, composition ``p1 * p2``, ``from_reward`` / ``indicator`` (text rewards).
* :mod:`.text`: ``RegexPotential``, ``RegexPrefixPotential`` (format kept so far: an intermediate
  potential), ``TextRewardPotential`` / ``text_reward`` (any ``text -> float``), ``tempered``.
* :mod:`.toxicity`: ``ToxicityPotential`` (alt-profanity-check, ``p(offensive)^beta`` or indicator).
* :mod:`.sentiment`: ``SentimentPotential`` (VADER compound, ``exp(beta * score)`` or indicator).
* :mod:`.infill`: ``InfillPotential`` (``p0(suffix | prompt, completion)^beta``).

The classifier packages are imported only when a toxicity/sentiment potential is built.
"""
from .base import Potential, ProductPotential, RewardPotential, as_potential, from_reward, indicator  # noqa: F401
from .infill import InfillPotential  # noqa: F401
from .sentiment import SentimentPotential  # noqa: F401
from .text import (RegexPotential, RegexPrefixPotential, TemperedPotential, TextRewardPotential,  # noqa: F401
                   tempered, text_reward)
from .toxicity import ToxicityPotential  # noqa: F401
