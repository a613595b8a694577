"""ops.twist_sample (SPEC §6.1): the reference sampler's statistics, backend dispatch, torch.compile.

The reference is the oracle of every backend, so its token frequencies are checked against the
exact twisted proposal ``q ∝ (p0 psi)^(1/T)`` (restricted to the top-k) with a chi-square test,
and a deliberately broken sampler must fail the same test (the test has power). Fresh random
inputs every run (the seed is printed; set TSMC_TEST_SEED to replay one).
"""
import math

import pytest
import torch
from scipy import stats

from tsmc_kernels import ops, reference, rng

from conftest import INTERPRETED, bad_rows, check_bad_rows, cpu_backends, fresh_seed, requires_cuda

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")

CPU_BACKENDS = cpu_backends()


def exact_q(logits, log_twist, temperature, top_k):
    """Exact proposal probabilities, fp64, straight from the definition in SPEC §2."""
    p0 = torch.softmax(logits.double(), -1)
    w = p0 * (log_twist.double().exp() if log_twist is not None else 1.0)
    w = w ** (1.0 / temperature)
    if 0 < top_k < w.shape[-1]:
        kth = torch.topk(w, top_k, dim=-1).values[..., -1:]
        w = torch.where(w >= kth, w, torch.zeros_like(w))
    return w / w.sum(-1, keepdim=True)


def chi_square_p(tokens, q):
    """Chi-square p-value of token counts against probabilities ``q`` (cells with small expectation pooled)."""
    V = q.shape[0]
    counts = torch.bincount(tokens, minlength=V).double()
    n = counts.sum()
    if bool((counts[q == 0] > 0).any()):
        return 0.0  # a token with probability 0 was drawn
    exp = q * n
    keep = exp >= 5
    obs = torch.cat([counts[keep], counts[~keep].sum()[None]])
    ex = torch.cat([exp[keep], exp[~keep].sum()[None]])
    obs, ex = obs[ex > 0], ex[ex > 0]
    if obs.numel() < 2:
        return 1.0
    return float(stats.chisquare(obs.numpy(), ex.numpy()).pvalue)


CONFIGS = [  # (V, temperature, top_k, twist scale)
    (5, 1.0, 0, 1.0),
    (12, 0.6, 0, 1.5),
    (12, 1.0, 4, 1.0),
    (30, 1.8, 10, 2.0),
]


def draw_reference(x, t, M, temperature, top_k, seed, sampler=reference.twist_sample):
    V = x.shape[-1]
    xs = x.expand(M, V)
    ts = t.expand(M, V) if t is not None else None
    return sampler(xs, ts, temperature=temperature, top_k=top_k, seed=seed, step=0)


@pytest.mark.parametrize("V,temperature,top_k,scale", CONFIGS)
def test_reference_frequencies_match_exact_proposal(gen, V, temperature, top_k, scale):
    x = torch.randn(1, V, generator=gen, dtype=torch.float64) * 2
    t = torch.randn(1, V, generator=gen, dtype=torch.float64) * scale
    seed = int(torch.randint(0, 2**62, (1,), generator=gen))
    out = draw_reference(x, t, 20000, temperature, top_k, seed)
    q = exact_q(x, t, temperature, top_k)[0]
    p = chi_square_p(out.token, q)
    assert p > 1e-4, f"p={p:.3g}"
    # Scores of the drawn tokens are the exact ones.
    torch.testing.assert_close(out.logq.double(), q.log()[out.token], atol=1e-5, rtol=0)
    lse0 = torch.logsumexp(x[0], -1)
    torch.testing.assert_close(out.log_zpi.double(), torch.logsumexp(x[0] - lse0 + t[0], -1).expand(20000),
                               atol=1e-5, rtol=0)


def grouped_row(gen):
    """``[1, V]`` logits over four vocabulary groups of the two-level draw (V = 3 * 2048 + 10): six
    hot tokens at group edges and inside, and a bulk whose mass differs between groups (the last
    group is short); ``cells`` maps every token to a hot token's cell or its group's bulk cell."""
    G = rng.TOKEN_GROUP
    V = 3 * G + 10
    x = torch.randn(1, V, generator=gen, dtype=torch.float64) * 0.5 - 1.0
    x[0, G:2 * G] -= 1.5  # a lighter group
    hot = torch.tensor([5, G - 1, G, 2 * G + 7, 3 * G + 3, 3 * G + 9])
    x[0, hot] = 5.5 + torch.randn(6, generator=gen, dtype=torch.float64)
    cells = torch.arange(V) // G + len(hot)
    cells[hot] = torch.arange(len(hot))
    return x, cells


@pytest.mark.parametrize("backend", [b for b in CPU_BACKENDS if b != "triton"], indirect=True)
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_frequencies_across_vocabulary_groups(gen, backend, temperature):
    """Both levels of the draw (which group, which token in it) against the exact proposal. (The
    interpreted Triton kernel is too slow for this many rows; it matches the reference token by
    token on such rows in test_triton_twist_sample.py.)"""
    x, cells = grouped_row(gen)
    t = torch.randn(1, x.shape[1], generator=gen, dtype=torch.float64) * 0.3
    M = 4000
    out = ops.twist_sample(x.float().expand(M, -1), t.float().expand(M, -1), temperature=temperature,
                           seed=fresh_seed(), step=1)
    q = exact_q(x, t, temperature, 0)[0]
    n_cells = int(cells.max()) + 1
    q_cells = torch.zeros(n_cells, dtype=torch.float64).index_add_(0, cells, q)
    p = chi_square_p(cells[out.token], q_cells)
    assert p > 1e-4, f"p={p:.3g}, counts={torch.bincount(cells[out.token], minlength=n_cells).tolist()}"


def test_group_mass_by_max_fails_the_grouped_check(gen, monkeypatch):
    """The test above has power: a draw that ranks groups by their best score instead of their
    log mass (``_logsumexp`` of the grouped ``[M, groups, 2048]`` view replaced by a max) fails it."""
    x, cells = grouped_row(gen)
    q = exact_q(x, None, 1.0, 0)[0]
    q_cells = torch.zeros(int(cells.max()) + 1, dtype=torch.float64).index_add_(0, cells, q)
    seed = fresh_seed()
    good = reference.twist_sample(x.expand(4000, -1), None, seed=seed, step=1).token
    real = reference._logsumexp
    monkeypatch.setattr(reference, "_logsumexp", lambda v, dim=-1: v.amax(dim) if v.dim() == 3 else real(v, dim))
    bad = reference.twist_sample(x.expand(4000, -1), None, seed=seed, step=1).token
    assert chi_square_p(cells[good], q_cells) > 1e-4
    assert chi_square_p(cells[bad], q_cells) < 1e-6


def _ignore_twist(logits, log_twist, **kw):
    return reference.twist_sample(logits, None, **kw)


def _ignore_temperature(logits, log_twist, *, temperature, **kw):
    return reference.twist_sample(logits, log_twist, temperature=1.0, **kw)


@pytest.mark.parametrize("broken", [_ignore_twist, _ignore_temperature])
def test_broken_sampler_fails_the_same_check(gen, broken):
    V, temperature = 8, 0.5
    x = torch.randn(1, V, generator=gen, dtype=torch.float64)
    t = torch.randn(1, V, generator=gen, dtype=torch.float64) * 2
    seed = int(torch.randint(0, 2**62, (1,), generator=gen))
    q = exact_q(x, t, temperature, 0)[0]
    good = draw_reference(x, t, 20000, temperature, 0, seed)
    bad = draw_reference(x, t, 20000, temperature, 0, seed, sampler=broken)
    assert chi_square_p(good.token, q) > 1e-4
    assert chi_square_p(bad.token, q) < 1e-6


def test_reference_top_k_never_samples_outside(gen):
    V = 50
    x = torch.randn(64, V, generator=gen)
    t = torch.randn(64, V, generator=gen)
    out = reference.twist_sample(x, t, top_k=3, seed=1, step=2)
    s = x.double() + t.double()
    kth = torch.topk(s, 3, dim=-1).values[:, -1]
    assert bool((s.gather(1, out.token[:, None])[:, 0] >= kth).all())


# ----------------------------------------------------------------------------- ops dispatch

def _assert_matches(out, ref, atol=1e-5):
    same = out.token == ref.token
    assert float(same.float().mean()) >= 0.95
    for name in ("log_zpi", "entropy"):
        torch.testing.assert_close(getattr(out, name), getattr(ref, name), atol=atol, rtol=1e-6, equal_nan=True)
    for name in ("logp", "logq", "log_psi"):
        torch.testing.assert_close(getattr(out, name)[same], getattr(ref, name)[same], atol=atol, rtol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ops_matches_reference(gen, backend, dtype):
    M, V = 6, 90
    x = (torch.randn(M, V, generator=gen) * 3).to(dtype)
    t = torch.randn(M, V, generator=gen).to(dtype)
    x[0, 10:] = -math.inf
    seed = 2**40 + 17  # folded to 32 bits by ops
    for kw in (dict(), dict(temperature=0.7, top_k=5)):
        out = ops.twist_sample(x, t, seed=seed, step=3, **kw)
        assert isinstance(out, reference.TwistSampleOutput)
        ref = reference.twist_sample(x, t, seed=seed, step=3, **kw)
        _assert_matches(out, ref)
    out = ops.twist_sample(x, None, seed=seed, step=torch.tensor(3))
    _assert_matches(out, reference.twist_sample(x, None, seed=seed, step=3))
    assert bool((out.log_psi == 0).all())
    steps = torch.randint(0, 2**40, (M,), generator=gen)  # one step per row
    out = ops.twist_sample(x, t, seed=seed, step=steps)
    _assert_matches(out, reference.twist_sample(x, t, seed=seed, step=steps))
    for m in (0, M - 1):
        assert out.token[m] == ops.twist_sample(x, t, seed=seed, step=int(steps[m])).token[m]


def test_ops_bad_rows_follow_one_convention(gen, backend):
    """Every backend (and the reference) gives rows with NaN / +inf logits or twists the documented
    outputs, for sampling and for scoring given tokens."""
    x, t, expect_nan = bad_rows(gen)
    out = ops.twist_sample(x, t, temperature=0.9, seed=fresh_seed(), step=2)
    check_bad_rows(out, x, t, expect_nan)
    ref = reference.twist_sample(x, t, temperature=0.9, seed=0, step=0)
    check_bad_rows(ref, x, t, expect_nan)
    tokens = torch.randint(0, x.shape[1], (8,), generator=gen)
    check_bad_rows(ops.twist_score(x, t, tokens, top_k=5), x, t, expect_nan, tokens)


@requires_cuda
@pytest.mark.gpu
def test_ops_cuda_bad_rows(gen, cuda_device):
    """V = 16384: the default launch splits each of the 8 rows over several programs."""
    for twist in (True, False):
        x, t, expect_nan = bad_rows(gen, V=16384, device=cuda_device, twist=twist)
        out = ops.twist_sample(x, t, temperature=0.9, seed=fresh_seed(), step=2)
        check_bad_rows(type(out)(*[o.cpu() for o in out]), x.cpu(), t.cpu() if twist else None, expect_nan)


def test_ops_backends_agree(gen, monkeypatch):
    if not INTERPRETED:
        pytest.skip("the Triton backend runs CPU tensors only under TRITON_INTERPRET=1")
    x = torch.randn(4, 64, generator=gen) * 2
    t = torch.randn(4, 64, generator=gen)
    outs = {}
    for b in CPU_BACKENDS:
        monkeypatch.setenv("TSMC_BACKEND", b)
        outs[b] = ops.twist_sample(x, t, temperature=1.2, seed=5, step=6)
    for b in CPU_BACKENDS[1:]:
        _assert_matches(outs[b], outs["reference"])


def test_ops_validates_arguments():
    x = torch.randn(2, 5)
    with pytest.raises(ValueError, match="log_twist"):
        ops.twist_sample(x, torch.randn(2, 6))
    with pytest.raises(ValueError, match="temperature"):
        ops.twist_sample(x, temperature=0.0)
    with pytest.raises(ValueError, match="top_k"):
        ops.twist_sample(x, top_k=-1)
    for bad in (-1, 2 ** 63):
        with pytest.raises(ValueError, match=r"step must be in \[0, 2\*\*63\)"):
            ops.twist_sample(x, step=bad)
    with pytest.raises(ValueError, match=r"integer tensor \[2\]"):
        ops.twist_sample(x, step=torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="top_k"):
        ops.twist_score(x, None, torch.tensor([0, 1]), top_k=-1)
    for bad in (5, -1):
        with pytest.raises(ValueError, match=r"tokens must be in \[0, 5\)"):
            ops.twist_score(x, None, torch.tensor([0, bad]))
    ops.twist_score(x, None, torch.tensor([0, 4]))
    # Not silently truncated: a float or bool top_k / step is a type error.
    for kw in (dict(top_k=2.7), dict(top_k=True), dict(step=1.5)):
        with pytest.raises(TypeError, match=f"{next(iter(kw))} must be an int"):
            ops.twist_sample(x, **kw)
    with pytest.raises(TypeError, match="log_twist must have dtype"):
        ops.twist_score(x, torch.zeros(2, 5, dtype=torch.int64), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="temperature"):
        ops.twist_score(x, None, torch.tensor([0, 1]), temperature=float("nan"))
    with pytest.raises(ValueError, match="temperature must be a finite number"):  # -inf / inf = NaN at -inf logits
        ops.twist_sample(x, temperature=math.inf)
    with pytest.raises(ValueError, match="temperature must be >= 1e-30"):  # x / T overflows fp32 (Triton: token 0)
        ops.twist_sample(x, temperature=1e-38)
    ops.twist_sample(x, temperature=1e-30)


def test_ops_under_torch_compile_fullgraph(gen, monkeypatch):
    monkeypatch.setenv("TSMC_BACKEND", "reference")
    x = torch.randn(3, 40, generator=gen)
    t = torch.randn(3, 40, generator=gen)

    def step_fn(logits, log_twist, step):
        out = ops.twist_sample(logits, log_twist, temperature=0.9, top_k=7, seed=123, step=step, validate=False)
        return out.token, out.logq + out.log_zpi, out.entropy

    compiled = torch.compile(step_fn, fullgraph=True, backend="aot_eager")
    step = torch.tensor(4)
    got = compiled(x, t, step)
    want = step_fn(x, t, step)
    assert torch.equal(got[0], want[0])
    torch.testing.assert_close(got[1], want[1])
    torch.testing.assert_close(got[2], want[2])


@pytest.mark.slow
def test_ops_under_torch_compile_inductor(gen, monkeypatch):
    monkeypatch.setenv("TSMC_BACKEND", "reference")
    x = torch.randn(2, 30, generator=gen)
    t = torch.randn(2, 30, generator=gen)

    @torch.compile(fullgraph=True)
    def step_fn(logits, log_twist, step):
        out = ops.twist_sample(logits, log_twist, seed=7, step=step)
        return out.token, out.logp * 2

    got = step_fn(x, t, torch.tensor(1))
    ref = reference.twist_sample(x, t, seed=7, step=1)
    assert torch.equal(got[0], ref.token)
    torch.testing.assert_close(got[1], ref.logp * 2)


# ----------------------------------------------------------------------------- CUDA

@requires_cuda
@pytest.mark.gpu
def test_ops_cuda_dispatches_to_triton(gen, cuda_device, monkeypatch):
    monkeypatch.delenv("TSMC_BACKEND", raising=False)
    assert ops.backend_for(cuda_device, "twist_sample") == "triton"
    x = (torch.randn(32, 1000, generator=gen) * 3).to(cuda_device, torch.bfloat16)
    t = torch.randn(32, 1000, generator=gen).to(cuda_device, torch.bfloat16)
    out = ops.twist_sample(x, t, temperature=0.8, top_k=20, seed=9, step=torch.tensor(2, device=cuda_device))
    ref = reference.twist_sample(x.cpu(), t.cpu(), temperature=0.8, top_k=20, seed=9, step=2)
    _assert_matches(type(ref)(*[o.cpu() for o in out]), ref)


@requires_cuda
@pytest.mark.gpu
def test_ops_cuda_reference_frequencies(gen, cuda_device):
    """The Triton sampler on CUDA passes the same chi-square test as the reference."""
    V, M = 10, 50000
    x = torch.randn(1, V, generator=gen, dtype=torch.float64)
    t = torch.randn(1, V, generator=gen, dtype=torch.float64)
    out = ops.twist_sample(x.float().expand(M, V).contiguous().to(cuda_device),
                           t.float().expand(M, V).contiguous().to(cuda_device), temperature=0.7, top_k=6,
                           seed=int(torch.randint(0, 2**62, (1,), generator=gen)))
    assert chi_square_p(out.token.cpu(), exact_q(x, t, 0.7, 6)[0]) > 1e-4
