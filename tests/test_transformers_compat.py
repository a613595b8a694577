"""Every forward pass the package makes passes the KV cache under the keyword the model takes.

transformers 5.24 renamed ``past_key_values`` to ``cache`` (the old name warns, and goes in 5.40);
earlier 5.x releases know only ``past_key_values``. :func:`tsmc_kernels.sampler.inputs.cache_kwarg`
picks one. With the old name on 5.24 each call site below emits a FutureWarning: this test fails then.
"""
import warnings

import pytest
import torch

from tsmc_kernels import power_sample, smc_generate
from tsmc_kernels.models import tiny_random_model
from tsmc_kernels.potentials.infill import InfillPotential
from tsmc_kernels.sampler.inputs import cache_kwarg
from tsmc_kernels.twist import MLPTwistHead, ModelTwistHead
from tsmc_kernels.twist.losses import teacher_force

V = 6


def _cache_warnings(fn) -> list[str]:
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        fn()
    return [str(w.message) for w in seen if "past_key_values" in str(w.message) or "cache_params" in str(w.message)]


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_no_deprecated_cache_keyword(arch):
    model = tiny_random_model(V, arch=arch, seed=0)
    ids = torch.tensor([[0, 1, 2], [3, 3, 1]])
    mask = torch.tensor([[1, 1, 1], [0, 1, 1]])
    head = MLPTwistHead.for_model(model)
    model_head = ModelTwistHead.from_model(model, num_layers=1)
    infill = InfillPotential(model, ids, torch.tensor([1, 2]), attention_mask=mask)

    def run():
        for cache in ("dynamic", "static"):
            smc_generate(model, ids, mask, num_particles=3, max_new_tokens=3, twist=head, cache=cache, seed=0,
                         potential=infill)
        with model_head.bind(ids, mask, 3):
            smc_generate(model, ids, mask, num_particles=3, max_new_tokens=3, twist=model_head, seed=0)
        power_sample(model, ids, mask, num_chains=2, max_new_tokens=4, block_size=2, n_mcmc=2, seed=0)
        teacher_force(model, ids, mask, torch.randint(0, V, (2, 3, 3)), torch.full((2, 3), 3))

    assert _cache_warnings(run) == []
    assert cache_kwarg(model) in ("cache", "past_key_values")
