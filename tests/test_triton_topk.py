"""The radix-select top-k threshold of the Triton sampling kernel (:mod:`tsmc_kernels.triton.topk`).

Its contract is exact: the k-th largest of the fp32 scores ``x + log psi`` (NaN and ``+inf`` read
as ``-inf``, ``-0`` as ``+0``), i.e. ``torch.topk`` on those scores, bit for bit. Runs under the
Triton interpreter on CPU and, when a GPU is present, compiled on CUDA. Fresh random inputs each
run (TSMC_TEST_SEED replays one); the output is poisoned before the call.
"""
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tsmc_kernels.triton import topk as topk_mod
from tsmc_kernels.triton.topk import topk_threshold_triton

from conftest import requires_cuda

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def expected_threshold(logits, log_twist, k):
    """``torch.topk`` of the fp32 scores as the sampling kernel forms them (written independently)."""
    u = logits.float()
    u = u.masked_fill(u.isnan() | u.isposinf(), -math.inf)
    if log_twist is not None:
        tw = log_twist.float()
        u = (u + tw).masked_fill(tw.isnan() | tw.isposinf(), -math.inf)
    return torch.topk(u, k, dim=-1).values[:, -1] + 0.0  # -0 -> +0


def make_scores(gen, M, V, dtype, *, twist, p_dead=0.3, ties=False, device="cpu"):
    x = torch.randn(M, V, generator=gen) * 4
    if ties:  # few distinct values: the k-th largest sits inside a run of equal entries
        x = x.round()
    x = x.to(dtype)
    x[torch.rand(M, V, generator=gen) < p_dead] = -math.inf
    t = torch.randn(M, V, generator=gen).to(dtype) if twist else None
    return x.to(device), (t.to(device) if twist else None)


def check(x, t, k, **kw):
    real_empty = torch.empty

    def poisoned_empty(*args, **kwargs):  # every value of the output must be written
        out = real_empty(*args, **kwargs)
        return out.fill_(float("nan")) if out.is_floating_point() else out.fill_(-7)

    torch.empty = poisoned_empty
    try:
        got = topk_threshold_triton(x, t, k, **kw)
    finally:
        torch.empty = real_empty
    want = expected_threshold(x.cpu(), t.cpu() if t is not None else None, k)
    assert got.dtype == torch.float32 and got.shape == (x.shape[0],)
    assert torch.equal(got.cpu().view(torch.int32), want.view(torch.int32)), (k, got, want)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("twist", [False, True])
@pytest.mark.parametrize("ties", [False, True])
def test_matches_topk(gen, dtype, twist, ties):
    M, V = 3, 700
    x, t = make_scores(gen, M, V, dtype, twist=twist, ties=ties)
    x[0, 0] = -0.0
    for k in (1, 2, 50, V // 2, V - 1, V):
        check(x, t, k, block=64)


@pytest.mark.parametrize("splits", [1, 2, 5])
def test_split_vocabulary(gen, splits):
    x, t = make_scores(gen, 2, 3000, torch.bfloat16, twist=True)
    for k in (1, 37, 2999):
        check(x, t, k, num_splits=splits, block=128)


def test_pass_count_follows_the_significant_bits():
    assert topk_mod._passes(torch.empty(1, 1, dtype=torch.bfloat16), False) == 2
    assert topk_mod._passes(torch.empty(1, 1, dtype=torch.float16), False) == 3
    assert topk_mod._passes(torch.empty(1, 1, dtype=torch.bfloat16), True) == 4
    assert topk_mod._passes(torch.empty(1, 1, dtype=torch.float32), False) == 4


def test_bad_values(gen):
    """NaN / +inf read as -inf; rows of only -inf give -inf; fp64 inputs are rounded to fp32 first."""
    M, V = 6, 200
    x, t = make_scores(gen, M, V, torch.float32, twist=True)
    x[0, :5] = math.nan
    x[1, 3] = math.inf
    t[2, 7] = math.nan
    t[3, 9] = math.inf
    x[4] = -math.inf
    t[5, : V - 3] = -math.inf  # fewer finite entries than k
    for k in (1, 4, 10):
        check(x, t, k, block=32)
    check(x.double() + 1e-12, None, 3, block=32)


def test_negative_and_subnormal_scores(gen):
    """The key's sign handling: all-negative rows, subnormals and values around zero."""
    x = -torch.rand(4, 300, generator=gen) * 10
    x[1] = torch.randn(300, generator=gen) * 1e-40  # subnormal fp32
    x[2, ::3] = 0.0
    x[2, 1::3] = -0.0
    for k in (1, 3, 150, 300):
        check(x, None, k, block=64)


def test_bad_k_raises():
    x = torch.zeros(2, 5)
    for k in (0, 6):
        with pytest.raises(ValueError, match="top_k"):
            topk_threshold_triton(x, None, k)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(M=st.integers(1, 3), V=st.integers(1, 300), dtype=st.sampled_from(DTYPES), twist=st.booleans(),
       p_dead=st.sampled_from([0.0, 0.5, 0.95, 1.0]), ties=st.booleans(), k_frac=st.floats(0.0, 1.0),
       splits=st.sampled_from([None, 1, 3]), data_seed=st.integers(0, 2**31 - 1))
def test_property_matches_topk(M, V, dtype, twist, p_dead, ties, k_frac, splits, data_seed):
    g = torch.Generator().manual_seed(data_seed)
    x, t = make_scores(g, M, V, dtype, twist=twist, p_dead=p_dead, ties=ties)
    k = 1 + min(V - 1, int(k_frac * V))
    check(x, t, k, num_splits=splits, block=32)


# ----------------------------------------------------------------------------- CUDA

@requires_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M,V", [(1, 151936), (8, 49152), (300, 1000), (2, 262144)])
def test_cuda_matches_topk(gen, cuda_device, dtype, M, V):
    for twist in (False, True):
        x, t = make_scores(gen, M, V, dtype, twist=twist, ties=True, device=cuda_device)
        for k in (1, 50, V // 3, V):
            check(x, t, k)


@requires_cuda
@pytest.mark.gpu
def test_cuda_graph_capture(gen, cuda_device):
    x, t = make_scores(gen, 4, 20000, torch.bfloat16, twist=True, device=cuda_device)
    topk_threshold_triton(x, t, 50)  # compile outside the capture
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = topk_threshold_triton(x, t, 50)
    x.copy_(make_scores(gen, 4, 20000, torch.bfloat16, twist=False, device=cuda_device)[0])
    g.replay()
    torch.cuda.synchronize()
    assert torch.equal(out.cpu(), expected_threshold(x.cpu(), t.cpu(), 50))
