"""Shared set-up of the microbenchmarks (pytest-benchmark). Everything but the ``cpu_bench`` ones
(``test_bench_cpu.py``) skips without CUDA.

Timing conventions (used by ``bench/test_bench_kernels.py``):

* ``device_us``: GPU time per call from a CUDA graph holding ``iters`` back-to-back calls,
  timed with CUDA events (no host launch overhead; the right number for bytes/s);
* ``eager_us``: CUDA events around ``iters`` eager calls (host launch overhead included when the
  host is slower than the GPU, which on the lent H100 it often is);
* pytest-benchmark's own statistics time ``call(); torch.cuda.synchronize()`` from the host.

Bandwidth is reported against the device's nominal HBM bandwidth (:func:`nominal_gbs`: 3000 GB/s
on the H100, which is what its copy reached, 4800 GB/s on the H200) and against the copy
bandwidth measured in the same session (``torch.Tensor.copy_`` of 1 GiB).

With ``BENCH_JSONL=path`` every benchmark appends one JSON line (name, median seconds, its
``extra_info``) to ``path`` as soon as it ends: pytest-benchmark writes its own JSON only when the
whole session ends, so a run cut short by a time limit would otherwise leave nothing.
"""
from __future__ import annotations

import json
import os
import statistics

import pytest
import torch

NOMINAL_GBS = {"H100": 3000.0, "H200": 4800.0}  # by a name fragment of torch.cuda.get_device_name()


def nominal_gbs(device_name: str) -> float:
    """The HBM bandwidth results are quoted against (3000 GB/s for a GPU not listed)."""
    return next((gbs for key, gbs in NOMINAL_GBS.items() if key in device_name), 3000.0)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="benchmarks need a CUDA GPU")
    for item in items:
        if "bench" in str(item.fspath) and item.get_closest_marker("cpu_bench") is None:
            item.add_marker(skip)


class GpuTimer:
    """CUDA-event timers; every method synchronises before it returns."""

    def __init__(self, copy_gbs: float, nominal_gbs: float = 3000.0):
        self.copy_gbs, self.nominal_gbs = copy_gbs, nominal_gbs

    @staticmethod
    def eager_us(fn, iters: int = 50, warmup: int = 5, reps: int = 5) -> float:
        for _ in range(warmup):
            fn()
        torch.cuda.synchronize()
        times = []
        for _ in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(iters):
                fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) * 1e3 / iters)
        return statistics.median(times)

    @staticmethod
    def graph_us(fn, iters: int = 20, warmup: int = 3, reps: int = 5) -> float:
        """Per-call GPU time of ``fn`` replayed from a CUDA graph (``fn`` must be capturable)."""
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(warmup):
                fn()
        torch.cuda.current_stream().wait_stream(s)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(iters):
                fn()
        graph.replay()
        torch.cuda.synchronize()
        times = []
        for _ in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            graph.replay()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) * 1e3 / iters)
        del graph
        return statistics.median(times)

    def bandwidth(self, nbytes: int, us: float) -> dict:
        gbs = nbytes / (us * 1e-6) / 1e9 if us > 0 else float("nan")
        return {"bytes_moved": int(nbytes), "achieved_GBps": round(gbs, 1),
                "nominal_GBps": self.nominal_gbs, "frac_of_nominal_bw": round(gbs / self.nominal_gbs, 3),
                "frac_of_measured_copy_bw": round(gbs / self.copy_gbs, 3),
                "measured_copy_GBps": round(self.copy_gbs, 1)}


def _measure_copy_gbs() -> float:
    n = 1 << 30
    a = torch.empty(n, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    us = GpuTimer.eager_us(lambda: b.copy_(a), iters=10, warmup=2, reps=3)
    del a, b
    torch.cuda.empty_cache()
    return 2 * n / (us * 1e-6) / 1e9  # read + write


@pytest.fixture(scope="session")
def gpu():
    if not torch.cuda.is_available():
        pytest.skip("benchmarks need a CUDA GPU")
    torch.backends.cuda.matmul.allow_tf32 = True
    return GpuTimer(_measure_copy_gbs(), nominal_gbs(torch.cuda.get_device_name()))


@pytest.fixture(autouse=True)
def _free_cuda_memory():
    yield
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@pytest.fixture(autouse=True)
def _stream_result(request):
    """Append this benchmark's result to ``$BENCH_JSONL`` when it ends (see the module docstring)."""
    yield
    path = os.environ.get("BENCH_JSONL")
    bench = request.node.funcargs.get("benchmark")
    if not path or bench is None or bench.stats is None:
        return
    row = {"name": request.node.nodeid.split("::")[-1], "tag": os.environ.get("BENCH_TAG", ""),
           "median_s": bench.stats.stats.median, **bench.extra_info}
    with open(path, "a") as f:
        f.write(json.dumps(row, default=str) + "\n")
