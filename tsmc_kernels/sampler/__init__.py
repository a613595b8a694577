"""Samplers that drive a Hugging Face model: SMC / twisted SMC."""
from .output import SMCOutput, ZeroWeightWarning  # noqa: F401
from .smc import smc_generate  # noqa: F401
