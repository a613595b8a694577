"""CPU kernels (they run without a GPU too): the C++ ``twist_sample`` against the PyTorch reference
it replaces on the CPU. SmolLM2's vocabulary (V = 49152), fp32 logits spread like an LM's
(``randn * 8``: most entries far below the maximum), M rows in {8, 64}, with and without a twist.
``extra_info``: ``native_ms``, ``reference_ms`` (median of 5 calls) and ``speedup``.
"""
import statistics
import time

import pytest
import torch

from tsmc_kernels import ops, reference, rng

pytestmark = pytest.mark.cpu_bench


def _median_ms(fn, reps: int = 5) -> float:
    fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1e3 * statistics.median(times)


@pytest.mark.benchmark(group="twist_sample_cpu")
@pytest.mark.parametrize("twist", [False, True], ids=["no_twist", "twist"])
@pytest.mark.parametrize("M", [8, 64])
def test_twist_sample_cpu(benchmark, M, twist):
    if not ops.native_available():
        pytest.skip("tsmc_kernels._C is not built")
    g = torch.Generator().manual_seed(0)
    V = 49152
    logits = torch.randn(M, V, generator=g) * 8
    log_twist = torch.randn(M, V, generator=g) if twist else None
    step = torch.zeros((), dtype=torch.int64)
    native = lambda: ops._C.twist_sample(logits, log_twist, 1.0, 0, rng.fold_seed(1), step, None)  # noqa: E731
    ref = lambda: reference.twist_sample(logits, log_twist, seed=1, step=0)  # noqa: E731
    assert torch.equal(native()[0], ref().token)
    benchmark.pedantic(native, rounds=5, warmup_rounds=1, iterations=1)
    native_ms, reference_ms = _median_ms(native), _median_ms(ref, reps=3)
    benchmark.extra_info.update(dict(M=M, V=V, twist=twist, threads=torch.get_num_threads(),
                                     native_ms=round(native_ms, 2), reference_ms=round(reference_ms, 1),
                                     speedup=round(reference_ms / native_ms, 1)))
