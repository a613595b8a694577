"""tsmc_kernels: twisted SMC and power-distribution MH for Hugging Face causal LMs.

Kernels live in :mod:`tsmc_kernels.ops` (public API) with their PyTorch definition in
:mod:`tsmc_kernels.reference`.
"""
from . import ops, reference, rng  # noqa: F401

__version__ = "0.1.0"
from .sampler import SMCOutput, ZeroWeightWarning, smc_generate  # noqa: E402,F401
from .power import PowerOutput, power_sample, power_sample_reference  # noqa: E402,F401
