"""Potentials ``log phi`` on finished (or partial) completions; see :mod:`.base`."""
from .base import Potential, as_potential, from_reward, indicator  # noqa: F401
