"""Triton normalise / resample / fused reweight (SPEC §6.2–6.3) against the PyTorch reference.

Ancestors must agree exactly with ``reference.resample`` (fp64 cumulative weights and positions,
the same counter-based uniforms), weights within 1e-6. Runs under the Triton interpreter on CPU
and compiled on CUDA when present. Fresh random inputs every run (the seed is printed; set
TSMC_TEST_SEED to replay one).
"""
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tsmc_kernels import ops, reference, rng
from tsmc_kernels.triton import weights as tw
from tsmc_kernels.triton.weights import normalize_triton, resample_triton, reweight_triton

from conftest import INTERPRETED, requires_cuda

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")

SCHEMES = ("systematic", "stratified", "multinomial")


def random_log_w(gen, B, N, *, p_dead=0.3, dead_prompts=(), dtype=torch.float32):
    scale = torch.rand(B, 1, generator=gen, dtype=torch.float64) * 5
    lw = torch.randn(B, N, generator=gen, dtype=torch.float64) * scale
    dead = torch.rand(B, N, generator=gen) < p_dead
    dead[torch.arange(B), torch.randint(0, N, (B,), generator=gen)] = False
    lw = lw.masked_fill(dead, -math.inf)
    for b in dead_prompts:
        lw[b] = -math.inf
    return lw.to(dtype)


def check_permutation(anc):
    B, N = anc.shape
    idx = torch.arange(N).expand(B, N)
    assert bool(((anc >= 0) & (anc < N)).all())
    has_child = torch.zeros(B, N, dtype=torch.bool).scatter_(1, anc, True)
    assert bool((anc[has_child] == idx[has_child]).all()), "a particle with offspring is not its own ancestor"


def reference_reweight(lw, inc, ess_threshold, scheme, seed, step):
    norm = reference.normalize_log_weights(lw, inc, ess_threshold=ess_threshold)
    anc = reference.resample(norm.log_w, norm.resample, scheme=scheme, seed=seed, step=step)
    N = lw.shape[1]
    new_w = torch.where(norm.resample[:, None], torch.full_like(norm.log_w, -math.log(N)), norm.log_w)
    return new_w, norm.ess, norm.log_z_inc, norm.resample, anc


def assert_weights_close(a, b):
    torch.testing.assert_close(a.cpu(), b.cpu(), atol=1e-6, rtol=1e-6, equal_nan=False)


def check_reweight(lw, inc, ess_threshold, scheme, seed, step):
    dev = lw.device
    out = reweight_triton(lw, inc, ess_threshold=ess_threshold, scheme=scheme, seed=rng.fold_seed(seed),
                          step=torch.tensor(step, device=dev))
    ref = reference_reweight(lw.cpu(), inc.cpu() if inc is not None else None, ess_threshold, scheme,
                             rng.fold_seed(seed), step)
    assert out[4].dtype == torch.int64 and out[3].dtype == torch.bool
    assert torch.equal(out[3].cpu(), ref[3])
    assert torch.equal(out[4].cpu(), ref[4]), (out[4], ref[4])
    for a, b in zip(out[:3], ref[:3]):
        assert_weights_close(a, b)
    check_permutation(out[4].cpu())
    assert not any(bool(torch.isnan(t).any()) for t in out[:3])
    return out


# ----------------------------------------------------------------------------- agreement

@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("B,N", [(1, 1), (3, 2), (8, 64), (2, 300), (24, 16)])
def test_reweight_matches_reference(gen, scheme, B, N):
    lw = random_log_w(gen, B, N, dead_prompts=(0,) if B > 2 else ())
    inc = random_log_w(gen, B, N, p_dead=0.1)
    check_reweight(lw, inc, 0.7, scheme, int(torch.randint(0, 2**40, (1,), generator=gen)), 5)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_resample_matches_reference(gen, scheme):
    B, N = 6, 50
    lw = random_log_w(gen, B, N, dead_prompts=(1,), dtype=torch.float64)
    mask = torch.rand(B, generator=gen) < 0.7
    mask[0] = True
    mask[1] = True  # resampling requested for an all-dead prompt: identity
    seed = rng.fold_seed(int(torch.randint(0, 2**40, (1,), generator=gen)))
    anc = resample_triton(lw, mask, scheme=scheme, seed=seed, step=torch.tensor(11))
    ref = reference.resample(lw, mask, scheme=scheme, seed=seed, step=11)
    assert torch.equal(anc, ref)
    check_permutation(anc)
    assert torch.equal(anc[~mask | torch.isneginf(lw).all(-1)], torch.arange(N).expand(B, N)[~mask | torch.isneginf(lw).all(-1)])


@pytest.mark.parametrize("ess_threshold", [0.0, 0.5, 1.0])
def test_normalize_matches_reference(gen, ess_threshold):
    B, N = 5, 33
    lw = random_log_w(gen, B, N, dead_prompts=(2,))
    inc = random_log_w(gen, B, N)
    out = normalize_triton(lw, inc, ess_threshold=ess_threshold)
    ref = reference.normalize_log_weights(lw, inc, ess_threshold=ess_threshold)
    for a, b in zip(out[:3], ref[:3]):
        assert_weights_close(a, b)
    assert torch.equal(out[3], ref.resample)
    assert float(out[1][2]) == 0.0 and out[2][2] == -math.inf and not bool(out[3][2])
    out2 = normalize_triton(lw, None, ess_threshold=ess_threshold)
    ref2 = reference.normalize_log_weights(lw, None, ess_threshold=ess_threshold)
    for a, b in zip(out2, ref2):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


def test_all_dead_prompts_no_nan(gen):
    B, N = 3, 8
    lw = torch.full((B, N), -math.inf)
    inc = torch.randn(B, N, generator=gen)
    for scheme in SCHEMES:
        out = check_reweight(lw, inc, 1.0, scheme, 1, 1)
        assert torch.equal(out[4], torch.arange(N).expand(B, N))
        assert not bool(out[3].any()) and bool((out[1] == 0).all()) and bool(torch.isneginf(out[2]).all())
    # Dead after adding the increment.
    out = check_reweight(torch.randn(B, N, generator=gen), torch.full((B, N), -math.inf), 1.0, "systematic", 2, 2)
    assert not bool(out[3].any())


def test_threshold_semantics(gen):
    B, N = 4, 16
    lw = random_log_w(gen, B, N)
    always = check_reweight(lw, None, 1.0, "systematic", 3, 3)
    assert bool(always[3].all())
    assert bool((always[0] == torch.tensor(-math.log(N), dtype=torch.float32)).all())
    never = check_reweight(lw, None, 0.0, "systematic", 3, 3)
    assert not bool(never[3].any()) and torch.equal(never[4], torch.arange(N).expand(B, N))


def test_step_and_seed_change_ancestors(gen):
    B, N = 2, 64
    lw = random_log_w(gen, B, N, p_dead=0.0)
    ancs = set()
    for step in (0, 1, 2**32):
        out = check_reweight(lw, None, 1.0, "stratified", 17, step)
        ancs.add(tuple(out[4].flatten().tolist()))
    assert len(ancs) == 2  # steps 0 and 2**32 coincide (step is taken mod 2**32)


def test_outputs_every_entry_written(gen, monkeypatch):
    B, N = 4, 10
    lw = random_log_w(gen, B, N, dead_prompts=(3,))
    real_empty = torch.empty

    def poisoned_empty(*args, **kwargs):
        out = real_empty(*args, **kwargs)
        if out.dtype == torch.bool:
            return out.fill_(True)
        return out.fill_(float("nan")) if out.is_floating_point() else out.fill_(-7)

    monkeypatch.setattr(torch, "empty", poisoned_empty)
    out = reweight_triton(lw, None, ess_threshold=0.5, seed=1, step=1)
    anc = resample_triton(lw, torch.tensor([True, False, True, True]), seed=1, step=1)
    norm = normalize_triton(lw, None, ess_threshold=0.5)
    monkeypatch.undo()
    assert bool((out[4] >= 0).all()) and bool((anc >= 0).all())
    assert not bool(torch.isnan(out[0]).any() | torch.isnan(norm[0]).any())
    ref = reference_reweight(lw, None, 0.5, "systematic", 1, 1)
    assert torch.equal(out[3], ref[3]) and torch.equal(out[4], ref[4])
    assert torch.equal(norm[3], ref[3])


def test_too_many_particles_falls_back(gen, monkeypatch):
    monkeypatch.setattr(tw, "MAX_N", 8)
    lw = random_log_w(gen, 2, 20)
    with pytest.warns(UserWarning, match="exceeds"):
        out = reweight_triton(lw, None, ess_threshold=1.0, seed=3, step=3)
    ref = reference_reweight(lw, None, 1.0, "systematic", 3, 3)
    assert torch.equal(out[4], ref[4])


def test_ops_triton_backend(gen, monkeypatch):
    if not INTERPRETED:
        pytest.skip("the Triton backend runs CPU tensors only under TRITON_INTERPRET=1")
    B, N = 3, 12
    lw = random_log_w(gen, B, N)
    inc = random_log_w(gen, B, N, p_dead=0.0)
    res = {}
    for b in ("reference", "triton"):
        monkeypatch.setenv("TSMC_BACKEND", b)
        res[b] = (ops.reweight(lw, inc, ess_threshold=0.8, seed=2**35 + 1, step=4),
                  ops.resample(lw, scheme="multinomial", seed=9, step=torch.tensor(2)),
                  ops.normalize_log_weights(lw, inc, ess_threshold=0.8))
    for a, b in zip(res["triton"][0], res["reference"][0]):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
    assert torch.equal(res["triton"][1], res["reference"][1])
    for a, b in zip(res["triton"][2], res["reference"][2]):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


# ----------------------------------------------------------------------------- property test

@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(B=st.integers(1, 4), N=st.integers(1, 40), scheme=st.sampled_from(SCHEMES),
       p_dead=st.sampled_from([0.0, 0.5, 0.95]), dead_prompt=st.booleans(), has_inc=st.booleans(),
       ess_threshold=st.sampled_from([0.0, 0.5, 0.99, 1.0]), dtype=st.sampled_from([torch.float32, torch.float64]),
       data_seed=st.integers(0, 2**31 - 1), seed=st.integers(0, 2**40), step=st.integers(0, 2**33))
def test_property_reweight(B, N, scheme, p_dead, dead_prompt, has_inc, ess_threshold, dtype, data_seed, seed, step):
    g = torch.Generator().manual_seed(data_seed)
    lw = random_log_w(g, B, N, p_dead=p_dead, dead_prompts=(0,) if dead_prompt else (), dtype=dtype)
    inc = random_log_w(g, B, N, p_dead=p_dead / 2, dtype=dtype) if has_inc else None
    check_reweight(lw, inc, ess_threshold, scheme, seed, step)


# ----------------------------------------------------------------------------- CUDA

# Every scheme at the common shapes and N = 2000 (a 2048 block); one scheme at N = 10000, whose
# 16384-wide fp64 block takes ~15 s per variant to compile (the device's time is short).
CUDA_SHAPES = ([(s, B, N) for s in SCHEMES for B, N in [(1, 64), (8, 64), (64, 16), (4, 2000)]]
               + [("systematic", 2, 10000)])


@requires_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("scheme,B,N", CUDA_SHAPES)
def test_cuda_reweight_matches_reference(gen, cuda_device, scheme, B, N):
    lw = random_log_w(gen, B, N, dead_prompts=(0,) if B > 2 else ()).to(cuda_device)
    inc = random_log_w(gen, B, N, p_dead=0.1).to(cuda_device)
    check_reweight(lw, inc, 0.9, scheme, 1234, 7)
    anc = resample_triton(lw, torch.ones(B, dtype=torch.bool, device=cuda_device), scheme=scheme, seed=5, step=5)
    assert torch.equal(anc.cpu(), reference.resample(lw.cpu(), torch.ones(B, dtype=torch.bool), scheme=scheme,
                                                     seed=5, step=5))


@requires_cuda
@pytest.mark.gpu
def test_cuda_graph_capture_and_replay(gen, cuda_device):
    """Reweight reads ``step`` from a device counter and never syncs: capture once, replay."""
    B, N = 8, 64
    lw = random_log_w(gen, B, N).to(cuda_device)
    inc = random_log_w(gen, B, N, p_dead=0.0).to(cuda_device)
    step = torch.zeros((), dtype=torch.int64, device=cuda_device)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        reweight_triton(lw, inc, ess_threshold=0.9, scheme="systematic", seed=77, step=step)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = reweight_triton(lw, inc, ess_threshold=0.9, scheme="systematic", seed=77, step=step)
        step.add_(1)
    for k in range(3):
        graph.replay()
        torch.cuda.synchronize()
        ref = reference_reweight(lw.cpu(), inc.cpu(), 0.9, "systematic", 77, k)
        assert torch.equal(out[4].cpu(), ref[4])
        torch.testing.assert_close(out[0].cpu(), ref[0], atol=1e-6, rtol=1e-6)
