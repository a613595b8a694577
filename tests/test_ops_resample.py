"""ops.resample (SPEC §2, §6.3): offspring counts, the ancestor permutation, unbiasedness.

Fresh random inputs every run (the seed is printed; set TSMC_TEST_SEED to replay one). Each
test runs on every CPU backend available: the PyTorch reference and the C++ extension.
"""
import math

import pytest
import torch
from scipy import stats

from tsmc_kernels import ops, reference

SCHEMES = reference.SCHEMES
BACKENDS = ["reference"] + (["native"] if ops.native_available() else [])


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch):
    monkeypatch.setenv("TSMC_BACKEND", request.param)
    return request.param


def rand_int(gen, lo, hi):
    return int(torch.randint(lo, hi, (1,), generator=gen))


def random_log_w(gen, B, N, p_dead=0.3, scale=None, dtype=torch.float64):
    """Random log weights with -inf entries, a random spread per prompt, at least one live entry."""
    scale = torch.rand(B, 1, generator=gen, dtype=torch.float64) * 6 if scale is None else scale
    lw = torch.randn(B, N, generator=gen, dtype=torch.float64) * scale
    dead = torch.rand(B, N, generator=gen) < p_dead
    dead[torch.arange(B), torch.randint(0, N, (B,), generator=gen)] = False
    return lw.masked_fill(dead, -math.inf).to(dtype)


def weights(log_w):
    """Normalised fp64 weights, computed directly."""
    lw = log_w.double()
    return torch.softmax(lw, dim=-1)


def offspring(anc):
    B, N = anc.shape
    return torch.zeros(B, N, dtype=torch.int64).scatter_add_(1, anc, torch.ones_like(anc))


def assert_permutation_property(anc, N):
    assert anc.dtype == torch.int64
    assert bool(((anc >= 0) & (anc < N)).all()), "ancestor out of range"
    has_child = offspring(anc) > 0
    idx = torch.arange(N).expand_as(anc)
    assert bool((anc[has_child] == idx[has_child]).all()), "a particle with offspring is not its own ancestor"


@pytest.mark.parametrize("scheme", SCHEMES)
def test_permutation_property(gen, backend, scheme):
    for _ in range(10):
        B, N = rand_int(gen, 1, 9), rand_int(gen, 1, 130)
        lw = random_log_w(gen, B, N)
        anc = ops.resample(lw, scheme=scheme, seed=rand_int(gen, 0, 2**31), step=rand_int(gen, 0, 1000))
        assert anc.shape == (B, N)
        assert_permutation_property(anc, N)
        counts = offspring(anc)
        assert bool((counts.sum(-1) == N).all())
        assert not bool(counts[torch.isneginf(lw)].any()), "a zero-weight particle got an offspring"


def test_systematic_counts_floor_or_ceil(gen, backend):
    for _ in range(20):
        B, N = rand_int(gen, 1, 17), rand_int(gen, 1, 300)
        lw = random_log_w(gen, B, N)
        counts = offspring(ops.resample(lw, scheme="systematic", seed=rand_int(gen, 0, 2**31), step=rand_int(gen, 0, 99)))
        nw = N * weights(lw)
        lo = torch.floor(nw * (1 - 1e-12))  # an ulp of slack at integer boundaries
        hi = torch.floor(nw * (1 + 1e-12)) + 1
        assert bool(((counts >= lo) & (counts <= hi)).all()), (counts, nw)
        assert bool((counts.sum(-1) == N).all())


def test_residual_counts_at_least_floor(gen, backend):
    B, N = 16, 64
    lw = random_log_w(gen, B, N)
    counts = offspring(ops.resample(lw, scheme="residual", seed=rand_int(gen, 0, 2**31)))
    assert bool((counts >= torch.floor(N * weights(lw) * (1 - 1e-12))).all())


@pytest.mark.parametrize("scheme", SCHEMES)
def test_identity_where_mask_false_or_dead(gen, backend, scheme):
    B, N = 6, 33
    lw = random_log_w(gen, B, N, p_dead=0.0, scale=torch.full((B, 1), 4.0, dtype=torch.float64))
    lw[2] = -math.inf  # dead prompt, masked in
    mask = torch.tensor([True, False, True, False, True, True])
    anc = ops.resample(lw, mask, scheme=scheme, seed=rand_int(gen, 0, 2**31), step=3)
    ident = torch.arange(N)
    for b in (1, 2, 3):
        assert torch.equal(anc[b], ident), f"prompt {b} should keep the identity"
    assert not all(torch.equal(anc[b], ident) for b in (0, 4, 5)), "spread weights never resampled"
    # Nothing resamples: identity everywhere.
    none = ops.resample(lw, torch.zeros(B, dtype=torch.bool), scheme=scheme, seed=1)
    assert torch.equal(none, ident.expand(B, N))


@pytest.mark.parametrize("scheme", SCHEMES)
def test_unbiased_offspring_frequencies(gen, backend, scheme):
    """E[counts] = N W: Pearson chi-square of the counts summed over many independent prompts.

    Prompt b draws from row b of the resampling stream, so one call with the same weights in S
    rows gives S independent resamplings; a few calls vary seed and step too. For multinomial
    the summed counts are Multinomial(S N, W) and the statistic is exactly chi-square(N-1); the
    other schemes have smaller variance, so the same threshold is conservative for them and still
    rejects any bias of order 1/sqrt(S).
    """
    N = rand_int(gen, 3, 13)
    lw = random_log_w(gen, 1, N, p_dead=0.2, scale=torch.full((1, 1), 1.5, dtype=torch.float64))
    S = 4000 if backend == "native" else 1200
    total = torch.zeros(N, dtype=torch.int64)
    for call in range(4):
        anc = ops.resample(lw.expand(S, N).contiguous(), scheme=scheme, seed=rand_int(gen, 0, 2**62), step=call)
        assert_permutation_property(anc, N)
        total += offspring(anc).sum(0)
    draws = 4 * S * N
    w = weights(lw)[0]
    live = w > 0
    assert int(total[~live].sum()) == 0, "zero-weight particles got offspring"
    expected = draws * w[live]
    chi2 = float(((total[live].double() - expected) ** 2 / expected).sum())
    dof = int(live.sum()) - 1
    if dof == 0:
        assert int(total[live].sum()) == draws
        return
    p = stats.chi2.sf(chi2, dof)
    assert p > 1e-6, f"{scheme}: counts {total.tolist()} vs expected {expected.tolist()} (chi2={chi2:.1f}, p={p:.2e})"


def test_multinomial_has_multinomial_variance(gen, backend):
    """Per-particle count variance of multinomial resampling is N W (1 - W) (not a low-variance scheme)."""
    N, S = 8, 4000
    lw = random_log_w(gen, 1, N, p_dead=0.0, scale=torch.full((1, 1), 0.5, dtype=torch.float64))
    counts = offspring(ops.resample(lw.expand(S, N).contiguous(), scheme="multinomial",
                                    seed=rand_int(gen, 0, 2**31))).double()
    w = weights(lw)[0]
    ratio = counts.var(0) / (N * w * (1 - w))
    assert bool(((ratio > 0.7) & (ratio < 1.4)).all()), ratio  # >= 7 standard errors of slack


@pytest.mark.parametrize("scheme", SCHEMES)
def test_deterministic_given_seed_and_step(gen, backend, scheme):
    B, N = 8, 64
    lw = random_log_w(gen, B, N, p_dead=0.1, scale=torch.full((B, 1), 2.0, dtype=torch.float64))
    seed = rand_int(gen, 0, 2**62)
    a = ops.resample(lw, scheme=scheme, seed=seed, step=5)
    assert torch.equal(a, ops.resample(lw, scheme=scheme, seed=seed, step=5))
    assert torch.equal(a, ops.resample(lw, scheme=scheme, seed=seed, step=torch.tensor(5)))
    assert not torch.equal(a, ops.resample(lw, scheme=scheme, seed=seed, step=6)), "same draws at another step"
    assert not torch.equal(a, ops.resample(lw, scheme=scheme, seed=seed + 1, step=5)), "same draws for another seed"
    # A prompt's draws do not depend on the other prompts (only on its row).
    sub = ops.resample(lw[:3], scheme=scheme, seed=seed, step=5)
    assert torch.equal(sub, a[:3])


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_ops_equals_reference(gen, backend, scheme, dtype):
    B, N = rand_int(gen, 1, 12), rand_int(gen, 1, 200)
    lw = random_log_w(gen, B, N, dtype=dtype)
    mask = torch.rand(B, generator=gen) < 0.7
    seed, step = rand_int(gen, 0, 2**62), rand_int(gen, 0, 2**40)
    expect = reference.resample(lw, mask, scheme=scheme, seed=seed, step=step)
    assert torch.equal(ops.resample(lw, mask, scheme=scheme, seed=seed, step=step), expect)


def test_reweight_cpu_matches_normalize_then_resample(gen, backend):
    B, N = 5, 40
    lw, inc = random_log_w(gen, B, N, p_dead=0.0), random_log_w(gen, B, N, p_dead=0.1)
    out = ops.reweight(lw, inc, ess_threshold=0.7, scheme="stratified", seed=11, step=2)
    norm = reference.normalize_log_weights(lw, inc, ess_threshold=0.7)
    assert torch.equal(out.resampled, norm.resample)
    assert torch.equal(out.ancestors, reference.resample(norm.log_w, norm.resample, scheme="stratified", seed=11, step=2))
    reset = torch.where(norm.resample[:, None], torch.full_like(norm.log_w, -math.log(N)), norm.log_w)
    torch.testing.assert_close(out.log_w, reset)


# ----------------------------------------------------------------------------- bad input

def test_bad_input_raises_naming_the_argument():
    lw = torch.zeros(2, 4)
    with pytest.raises(ValueError, match="log_w"):
        ops.resample(torch.zeros(4))
    with pytest.raises(ValueError, match="log_w"):
        ops.resample(torch.zeros(2, 3, 4))
    with pytest.raises(TypeError, match="log_w"):
        ops.resample(torch.zeros(2, 4, dtype=torch.int64))
    with pytest.raises(ValueError, match="resample_mask"):
        ops.resample(lw, torch.ones(3, dtype=torch.bool))
    with pytest.raises(TypeError, match="resample_mask"):
        ops.resample(lw, torch.ones(2))
    with pytest.raises(ValueError, match="NaN"):
        ops.resample(torch.tensor([[0.0, float("nan")]]))
    with pytest.raises(ValueError, match=r"\+inf"):
        ops.resample(torch.tensor([[0.0, float("inf")]]))
    with pytest.raises(ValueError, match="scheme"):
        ops.resample(lw, scheme="bogus")
    with pytest.raises(ValueError, match="resample_mask"):
        ops.resample(lw, torch.ones(2, dtype=torch.bool, device="meta"))
    with pytest.raises(ValueError, match="seed"):
        ops.resample(lw, seed=-1)
    with pytest.raises(ValueError, match="step"):
        ops.resample(lw, step=-1)
