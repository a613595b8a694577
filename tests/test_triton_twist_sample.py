"""Triton fused twist scoring + sampling (SPEC §6.1) against the fp64 PyTorch reference.

Runs the kernel under the Triton interpreter on CPU (``TRITON_INTERPRET=1``, set by conftest)
and, when a GPU is present, compiled on CUDA. Fresh random inputs every run (the seed is printed;
set TSMC_TEST_SEED to replay one). The interpreter is slow (~15 ms per program), so shapes are small.
"""
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scipy import stats

from tsmc_kernels import reference, rng
from tsmc_kernels.triton.twist_sample import twist_sample_triton

from conftest import bad_rows, check_bad_rows, fresh_seed, requires_cuda

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy log(0) etc. in the interpreter

ATOL = 1e-5
FIELDS = ("logp", "logq", "log_zpi", "log_psi", "entropy")


def exact_proposal(logits, log_twist, temperature, top_k):
    """fp64 log q over the whole vocabulary (written independently of the reference)."""
    x = logits.double()
    logp0 = torch.log_softmax(x, dim=-1)
    s = logp0 + (log_twist.double() if log_twist is not None else 0.0)
    r = s / temperature
    if 0 < top_k < x.shape[1]:
        kth = torch.topk(r, top_k, dim=-1).values[:, -1:]
        r = r.masked_fill(r < kth, -math.inf)
    return torch.log_softmax(r, dim=-1)


def gumbel_scores(logits, log_twist, temperature, top_k, seed, step):
    """fp64 scores of the reference's two-level draw (``reference.gumbel_max``): ``(group_score
    [M, n_groups]`` = log mass + group noise, ``token_score [M, V]`` = log q + token noise, ``logq)``."""
    logq = exact_proposal(logits, log_twist, temperature, top_k)
    M, V = logq.shape
    G = rng.TOKEN_GROUP
    n_groups = -(-V // G)
    rows = torch.arange(M)
    mass = torch.logsumexp(torch.nn.functional.pad(logq, (0, n_groups * G - V), value=-math.inf)
                           .view(M, n_groups, G), dim=-1)
    gg = rng.gumbel(rng.row_key(seed, step, rng.STREAM_TOKEN_GROUP, rows)[:, None], torch.arange(n_groups)[None, :])
    g = rng.gumbel(rng.row_key(seed, step, rng.STREAM_TOKEN, rows)[:, None], torch.arange(V)[None, :])
    return mass + gg, torch.where(torch.isneginf(logq), logq, logq + g), logq


def check_near_tie(group_score, token_score, m, ref_token, token):
    """A token other than the reference's is only allowed at an fp32-level near-tie of the draw: of
    the two groups' scores, or (same group) of the two tokens' scores."""
    G = rng.TOKEN_GROUP
    if ref_token // G != token // G:
        a, b = float(group_score[m, ref_token // G]), float(group_score[m, token // G])
    else:
        a, b = float(token_score[m, ref_token]), float(token_score[m, token])
    assert math.isfinite(b) and abs(a - b) <= 1e-5 * max(1.0, abs(a)), (m, ref_token, token, a, b)


def run_kernel(logits, log_twist=None, *, temperature=1.0, top_k=0, seed=0, step=0, **kw):
    dev = logits.device
    step_t = torch.tensor(step, dtype=torch.int64, device=dev)
    out = twist_sample_triton(logits, log_twist, temperature=temperature, top_k=top_k, seed=rng.fold_seed(seed),
                              step=step_t, **kw)
    return [t.cpu() for t in out]


def check_against_reference(logits, log_twist=None, *, temperature=1.0, top_k=0, seed=0, step=0, atol=ATOL,
                            max_mismatch=0.02, **kw):
    """Deterministic outputs within ``atol`` of the reference; tokens equal up to fp32 near-ties."""
    out = run_kernel(logits, log_twist, temperature=temperature, top_k=top_k, seed=seed, step=step, **kw)
    lc, tc = logits.cpu(), (log_twist.cpu() if log_twist is not None else None)
    ref = reference.twist_sample(lc, tc, temperature=temperature, top_k=top_k, seed=seed, step=step)
    token = out[0]
    assert token.dtype == torch.int64 and token.shape == ref.token.shape
    assert all(t.dtype == torch.float32 for t in out[1:])
    group_score, token_score, logq = gumbel_scores(lc, tc, temperature, top_k, seed, step)
    M = token.shape[0]
    differ = (token != ref.token).nonzero().flatten()
    assert len(differ) <= max(1, int(max_mismatch * M)), f"{len(differ)} / {M} tokens differ from the reference"
    for m in differ.tolist():
        check_near_tie(group_score, token_score, m, int(ref.token[m]), int(token[m]))
    # Values of the kernel's own token must equal the reference's values for that token.
    same = token == ref.token
    for name, k_val, r_val in zip(FIELDS, out[1:], ref[1:]):
        if name in ("logp", "logq", "log_psi"):
            k_val, r_val = k_val[same], r_val[same]
        torch.testing.assert_close(k_val, r_val, atol=atol, rtol=1e-6, equal_nan=True, msg=lambda s: f"{name}: {s}")
    # The sampled token's logq equals the exact proposal's logq at that token (all rows).
    lq_tok = logq.gather(1, token[:, None])[:, 0].float()
    dead = torch.isneginf(ref.logq)
    lq_tok = torch.where(dead, torch.full_like(lq_tok, -math.inf), lq_tok)
    torch.testing.assert_close(out[2], lq_tok, atol=atol, rtol=1e-6, equal_nan=True)
    return out, ref


def make_inputs(gen, M, V, *, dtype=torch.float32, twist=True, scale=3.0, device="cpu"):
    x = (torch.randn(M, V, generator=gen, dtype=torch.float64) * scale).to(dtype)
    t = (torch.randn(M, V, generator=gen, dtype=torch.float64)).to(dtype) if twist else None
    return x.to(device), (t.to(device) if t is not None else None)


# ----------------------------------------------------------------------------- agreement

@pytest.mark.parametrize("M,V", [(1, 1), (3, 37), (16, 300), (5, 1000)])
@pytest.mark.parametrize("twist", [False, True])
def test_matches_reference_fp32(gen, M, V, twist):
    x, t = make_inputs(gen, M, V, twist=twist)
    check_against_reference(x, t, seed=int(torch.randint(0, 2**40, (1,), generator=gen)), step=3)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_matches_reference_half_inputs(gen, dtype):
    # The reference reads the same half values (cast to fp64), so the same tolerance holds.
    x, t = make_inputs(gen, 8, 257, dtype=dtype)
    check_against_reference(x, t, temperature=0.8, seed=11, step=5)


@pytest.mark.parametrize("temperature,top_k", [(0.5, 0), (1.7, 0), (1.0, 5), (0.7, 1), (1.3, 40)])
def test_temperature_and_top_k(gen, temperature, top_k):
    x, t = make_inputs(gen, 6, 97)
    out, ref = check_against_reference(x, t, temperature=temperature, top_k=top_k, seed=5, step=2)
    if top_k:
        # The chosen token lies in the top-k of log p0 + log psi.
        s = x.double() + t.double()
        kth = torch.topk(s, top_k, dim=-1).values[:, -1]
        assert bool((s.gather(1, out[0][:, None])[:, 0] >= kth).all())


@pytest.mark.parametrize("splits", [1, 2, 3, 4])
def test_split_vocabulary_same_result(gen, splits):
    # Four vocabulary groups; a split takes whole groups (here 8 tiles of 256 each).
    x, t = make_inputs(gen, 3, 3 * rng.TOKEN_GROUP + 300)
    base = run_kernel(x, t, temperature=0.9, seed=9, step=1, num_splits=1, block_v=256)
    out, _ = check_against_reference(x, t, temperature=0.9, seed=9, step=1, num_splits=splits, block_v=256)
    assert torch.equal(out[0], base[0])
    for a, b in zip(out[1:], base[1:]):
        torch.testing.assert_close(a, b, atol=2e-6, rtol=1e-6)


@pytest.mark.parametrize("twist,temperature,top_k,splits,block_v", [
    (True, 1.0, 0, 1, None), (False, 1.0, 0, 1, None), (True, 0.8, 7, 2, 256), (False, 1.3, 0, 3, 512)])
def test_pipelined_loop_same_result(gen, twist, temperature, top_k, splits, block_v):
    """``num_stages >= 2`` (Triton's software pipeline instead of the register prefetch) runs the
    same per-pair work: identical outputs, and the reference's."""
    x, t = make_inputs(gen, 3, 2 * rng.TOKEN_GROUP + 700, twist=twist)
    x[1, :900] = -math.inf
    kw = dict(temperature=temperature, top_k=top_k, seed=5, step=2, num_splits=splits, block_v=block_v)
    base = run_kernel(x, t, **kw)
    out, _ = check_against_reference(x, t, num_stages=3, **kw)
    for a, b in zip(out, base):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="num_stages"):
        twist_sample_triton(x, t, num_stages=0)


@pytest.mark.parametrize("splits", [1, 3])
def test_peaked_logits_winner_in_any_group(gen, splits):
    # LM-like rows: a few tokens far above the rest, in any of the three groups; the winner of
    # row 0 sits in the last tile of the last group, of row 1 in the first tile of the first.
    M, V = 6, 2 * rng.TOKEN_GROUP + 600
    x, t = make_inputs(gen, M, V, scale=1.0)
    for m in range(M):
        hot = torch.randint(0, V, (3,), generator=gen)
        x[m, hot] += 25.0
    x[0, V - 1] += 40.0
    x[1, 0] += 40.0
    out, ref = check_against_reference(x, t, seed=21, step=2, num_splits=splits, block_v=512, max_mismatch=0.0)
    assert out[0][0] == V - 1 and out[0][1] == 0


@pytest.mark.parametrize("splits", [None, 1, 2, 3])
@pytest.mark.parametrize("temperature,top_k", [(1.0, 0), (0.6, 0), (1.0, 3000)])
def test_dead_groups_and_splits(gen, splits, temperature, top_k):
    """Whole groups without a finite entry (first, middle, last), rows with a single live group,
    and rows whose only live entries straddle a group boundary."""
    G = rng.TOKEN_GROUP
    M, V = 5, 3 * G + 77
    x, t = make_inputs(gen, M, V)
    x[0, :G] = -math.inf
    x[1, G:2 * G] = -math.inf
    x[2, 3 * G:] = -math.inf
    x[3, :] = -math.inf
    x[3, 2 * G + 5: 2 * G + 9] = 0.0
    t[4, :] = -math.inf
    t[4, G - 2: G + 2] = 0.0
    out, _ = check_against_reference(x, t, temperature=temperature, top_k=top_k, seed=fresh_seed(), step=4,
                                     num_splits=splits, block_v=256)
    assert 2 * G + 5 <= int(out[0][3]) < 2 * G + 9 and G - 2 <= int(out[0][4]) < G + 2


def test_large_vocab_single_row(gen):
    x, t = make_inputs(gen, 1, 262144, dtype=torch.bfloat16)
    check_against_reference(x, t, seed=123, step=77)


def test_step_is_read_from_device_tensor(gen):
    x, t = make_inputs(gen, 4, 50)
    tokens = []
    for step in (0, 1, 2**32 + 1, 2**40 + 7):  # the key uses step mod 2**32
        out, ref = check_against_reference(x, t, seed=3, step=step)
        tokens.append(out[0])
    assert torch.equal(tokens[1], tokens[2])  # same step mod 2**32


@pytest.mark.parametrize("splits", [1, 3])
def test_per_row_steps(gen, splits):
    # One step per row (power_sample's chains are at different moves): row m's noise is keyed by
    # (seed, step[m], m), exactly as in a call with the scalar step[m].
    M, V = 5, 70
    x, t = make_inputs(gen, M, V)
    steps = [int(s) for s in torch.randint(0, 2**31, (M,), generator=gen)]
    out, _ = check_against_reference(x, t, seed=11, step=steps, num_splits=splits)
    for m in range(M):
        assert out[0][m] == run_kernel(x, t, seed=11, step=steps[m], num_splits=splits)[0][m]


def test_deterministic_and_batch_layout_invariant(gen):
    # Row m's noise depends on (seed, step, m) only: a row gives the same token in any batch.
    x, t = make_inputs(gen, 6, 80)
    a = run_kernel(x, t, seed=42, step=9)
    b = run_kernel(x, t, seed=42, step=9)
    assert all(torch.equal(p, q) for p, q in zip(a, b))
    sub = run_kernel(x[:3], t[:3], seed=42, step=9)
    assert torch.equal(sub[0], a[0][:3])


def test_non_contiguous_rows(gen):
    x, t = make_inputs(gen, 4, 130)
    xs = torch.randn(4, 260, generator=gen)[:, ::2]  # column stride 2: copied by the wrapper
    xs.copy_(x)
    big = torch.randn(8, 130, generator=gen)
    big[::2] = t  # row stride 260
    check_against_reference(xs, big[::2], seed=1, step=1)


def test_outputs_every_row_written(gen, monkeypatch):
    x, t = make_inputs(gen, 5, rng.TOKEN_GROUP + 40)
    real_empty = torch.empty

    def poisoned_empty(*args, **kwargs):
        out = real_empty(*args, **kwargs)
        return out.fill_(float("nan")) if out.is_floating_point() else out.fill_(-7)

    monkeypatch.setattr(torch, "empty", poisoned_empty)
    out = run_kernel(x, t, seed=4, step=4, num_splits=2, block_v=256)  # two groups: two splits
    monkeypatch.undo()
    assert bool((out[0] >= 0).all())
    for v in out[1:]:
        assert bool(torch.isfinite(v).all())
    check_against_reference(x, t, seed=4, step=4)


# ----------------------------------------------------------------------------- -inf and NaN

def test_neg_inf_patterns(gen):
    M, V = 8, 60
    x, t = make_inputs(gen, M, V)
    x[0] = -math.inf  # whole row of logits dead
    x[1, :55] = -math.inf  # only 5 tokens possible
    t[2] = -math.inf  # twist kills everything: no finite proposal entry
    t[3, ::2] = -math.inf  # twist masks half
    x[4, 1:] = -math.inf  # a single possible token
    t[5, :] = 0.0
    x[5, :] = 0.0  # all ties: uniform proposal
    out, ref = check_against_reference(x, t, seed=8, step=8)
    assert out[0][0] == 0 and math.isinf(out[2][0]) and out[2][0] < 0
    assert out[0][2] == 0 and out[2][2] == -math.inf and out[3][2] == -math.inf
    assert out[0][4] == 0 and abs(float(out[2][4])) < 1e-6 and abs(float(out[5][4])) < 1e-6
    assert bool(torch.isfinite(x[1, out[0][1]])) and bool(torch.isfinite(t[3, out[0][3]]))
    assert float(out[5][0]) == 0.0  # entropy of a dead row
    torch.testing.assert_close(out[5][5], torch.tensor(math.log(V), dtype=torch.float32), atol=1e-5, rtol=0)


def test_top_k_larger_than_finite_entries(gen):
    x, t = make_inputs(gen, 3, 30)
    x[:, 3:] = -math.inf
    check_against_reference(x, t, top_k=10, seed=2, step=2)
    check_against_reference(x, t, top_k=2, temperature=0.6, seed=2, step=2)


@pytest.mark.parametrize("block_v", [None, 8])
def test_nan_rows_are_flagged(gen, block_v):
    x, t = make_inputs(gen, 6, 33)
    x[1, 7] = float("nan")
    t[2, 20] = float("nan")
    x[4, 30] = math.inf
    x[5, 3] = x[5, 11] = math.inf
    out = run_kernel(x, t, seed=1, step=1, block_v=block_v)
    ref = reference.twist_sample(x, t, seed=1, step=1)
    assert math.isnan(out[3][1]) and math.isnan(ref.log_zpi[1])
    assert math.isnan(out[3][2]) and math.isnan(ref.log_zpi[2])
    for m in (1, 4, 5):  # NaN / +inf logits poison the row: token 0, NaN values
        assert out[0][m] == 0 and all(math.isnan(out[k][m]) for k in (1, 2, 3, 5)), [o[m] for o in out]
    for m in (0, 3):  # clean rows unaffected
        assert out[0][m] == ref.token[m]
        assert abs(float(out[3][m] - ref.log_zpi[m])) < ATOL


@pytest.mark.parametrize("num_splits,block_v", [(1, None), (3, 512)])
@pytest.mark.parametrize("twist", [True, False])
@pytest.mark.parametrize("temperature,top_k", [(1.0, 0), (0.8, 5)])
def test_bad_rows_convention_in_every_launch(gen, num_splits, block_v, twist, temperature, top_k):
    """The bad-row convention (token 0, NaN fields) also when a row is split over programs: the
    flags then travel through the partials to the combine kernel."""
    x, t, expect_nan = bad_rows(gen, V=2 * rng.TOKEN_GROUP + 40, twist=twist)  # three groups
    out = run_kernel(x, t, temperature=temperature, top_k=top_k, seed=fresh_seed(), step=3,
                     num_splits=num_splits, block_v=block_v)
    check_bad_rows(reference.TwistSampleOutput(*out), x, t, expect_nan)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("twist", [False, True])
def test_rows_masked_with_finfo_min(gen, dtype, twist):
    """Masks written as ``finfo.min`` (not ``-inf``) before the live entries: with several masked
    entries per lane the entropy's rescaling ``(m - m') * s`` overflowed to ``inf`` (NaN entropy)."""
    V, block = 300, 16
    x, t = make_inputs(gen, 4, V, dtype=dtype, twist=twist)
    x[:, : 5 * block] = torch.finfo(dtype).min  # 5 masked entries in every lane before a live one
    x[1, 200:] = torch.finfo(dtype).min
    # (A row masked everywhere is out of reach: fp32 r + g at 3e38 cannot hold the noise.)
    if not twist:  # (with a twist, fp32 x + tw at 2e31 cannot hold tw: log Zpi is off for any kernel)
        x[3, 250] = 2e31  # huge but finite: v - m must not overflow (an earlier floor of -FLT_MAX did)
    check_against_reference(x, t, seed=9, step=1, block_v=block, num_splits=1)
    check_against_reference(x[:2], t[:2] if twist else None, temperature=0.7, top_k=7, seed=9, step=1,
                            block_v=block)


# ----------------------------------------------------------------------------- statistics

def chi_square_p(counts: torch.Tensor, probs: torch.Tensor, min_expected: float = 5.0) -> float:
    """Chi-square goodness-of-fit p-value, pooling cells with small expected counts."""
    n = int(counts.sum())
    exp = probs.double() * n
    order = torch.argsort(exp, descending=True)
    obs_c, exp_c, acc_o, acc_e = [], [], 0.0, 0.0
    for i in order.tolist():
        acc_o += float(counts[i])
        acc_e += float(exp[i])
        if acc_e >= min_expected:
            obs_c.append(acc_o)
            exp_c.append(acc_e)
            acc_o = acc_e = 0.0
    if acc_e > 0 or acc_o > 0:
        if exp_c:
            obs_c[-1] += acc_o
            exp_c[-1] += acc_e
        else:
            return 1.0
    if len(exp_c) < 2:
        return 1.0 if sum(obs_c) == n else 0.0
    return float(stats.chisquare(obs_c, exp_c).pvalue)


@pytest.mark.slow
@pytest.mark.parametrize("temperature,top_k", [(1.0, 0), (0.7, 4)])
def test_token_frequencies_match_proposal(gen, temperature, top_k):
    V, M = 6, 400
    x = torch.randn(1, V, generator=gen) * 1.5
    t = torch.randn(1, V, generator=gen)
    xs, ts = x.expand(M, V).contiguous(), t.expand(M, V).contiguous()
    seed = int(torch.randint(0, 2**31, (1,), generator=gen))
    out = run_kernel(xs, ts, temperature=temperature, top_k=top_k, seed=seed, step=0)
    q = exact_proposal(x, t, temperature, top_k).exp()[0]
    counts = torch.bincount(out[0], minlength=V)
    assert int(counts[q == 0].sum()) == 0, "sampled a token outside the top-k"
    p = chi_square_p(counts, q)
    assert p > 1e-4, f"chi-square p={p:.2e}, counts={counts.tolist()}, q={q.tolist()}"


# ----------------------------------------------------------------------------- property tests

@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(M=st.integers(1, 4), V=st.integers(1, 150), dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
       twist=st.booleans(), p_dead_x=st.sampled_from([0.0, 0.3, 0.9, 1.0]), p_dead_t=st.sampled_from([0.0, 0.5]),
       temperature=st.sampled_from([1.0, 0.6, 2.0]), top_k=st.integers(0, 6), splits=st.sampled_from([None, 1, 2, 3]),
       data_seed=st.integers(0, 2**31 - 1), seed=st.integers(0, 2**40), step=st.integers(0, 2**33))
def test_property_matches_reference(M, V, dtype, twist, p_dead_x, p_dead_t, temperature, top_k, splits, data_seed,
                                    seed, step):
    g = torch.Generator().manual_seed(data_seed)
    x, t = make_inputs(g, M, V, dtype=dtype, twist=twist)
    x = x.masked_fill(torch.rand(M, V, generator=g) < p_dead_x, -math.inf)
    if t is not None:
        t = t.masked_fill(torch.rand(M, V, generator=g) < p_dead_t, -math.inf)
    check_against_reference(x, t, temperature=temperature, top_k=top_k, seed=seed, step=step,
                            num_splits=splits, block_v=32 if splits else None, max_mismatch=0.0)


# ----------------------------------------------------------------------------- CUDA

@requires_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("M,V", [(1, 151936), (8, 49152), (300, 1000), (2, 262144)])
def test_cuda_matches_reference(gen, cuda_device, dtype, M, V):
    x, t = make_inputs(gen, M, V, dtype=dtype, device=cuda_device)
    check_against_reference(x, t, seed=77, step=4)
    check_against_reference(x, None, temperature=0.7, top_k=50, seed=77, step=4)


@requires_cuda
@pytest.mark.gpu
def test_cuda_neg_inf_and_splits(gen, cuda_device):
    x, t = make_inputs(gen, 6, 5000, device=cuda_device)
    x[0] = -math.inf
    t[1] = -math.inf
    x[2, 10:] = -math.inf
    for splits in (1, 4, 9):
        check_against_reference(x, t, seed=3, step=3, num_splits=splits)


@requires_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("num_stages", [2, 3, 4])
def test_cuda_pipelined_loop(gen, cuda_device, num_stages):
    x, t = make_inputs(gen, 300, 151936, dtype=torch.bfloat16, device=cuda_device)
    x[0] = -math.inf
    x[1, 5000:] = -math.inf
    base = run_kernel(x, t, seed=8, step=1)
    out, _ = check_against_reference(x, t, seed=8, step=1, num_stages=num_stages)
    for a, b in zip(out, base):
        assert torch.equal(a, b)
    for splits in (1, 4):
        check_against_reference(x[:6], None, temperature=0.7, top_k=50, seed=8, step=1, num_splits=splits,
                                num_stages=num_stages)


@requires_cuda
@pytest.mark.gpu
def test_cuda_token_frequencies(gen, cuda_device):
    V, M = 8, 20000
    x = torch.randn(1, V, generator=gen) * 1.5
    t = torch.randn(1, V, generator=gen)
    xs, ts = x.expand(M, V).contiguous().to(cuda_device), t.expand(M, V).contiguous().to(cuda_device)
    out = run_kernel(xs, ts, temperature=0.8, top_k=5, seed=int(torch.randint(0, 2**31, (1,), generator=gen)))
    q = exact_proposal(x, t, 0.8, 5).exp()[0]
    counts = torch.bincount(out[0], minlength=V)
    assert int(counts[q == 0].sum()) == 0
    assert chi_square_p(counts, q) > 1e-4


@requires_cuda
@pytest.mark.gpu
def test_cuda_graph_capture_and_replay(gen, cuda_device):
    """The kernel reads ``step`` from a device counter: one capture, many replays, no host sync."""
    M, V = 16, 4096
    x, t = make_inputs(gen, M, V, device=cuda_device)
    step = torch.zeros((), dtype=torch.int64, device=cuda_device)
    seed = rng.fold_seed(2024)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):  # warm-up (compilation) outside the capture
        twist_sample_triton(x, t, temperature=0.9, top_k=0, seed=seed, step=step)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = twist_sample_triton(x, t, temperature=0.9, top_k=0, seed=seed, step=step)
        step.add_(1)
    for k in range(4):
        graph.replay()
        torch.cuda.synchronize()
        ref = reference.twist_sample(x.cpu(), t.cpu(), temperature=0.9, seed=2024, step=k)
        assert int(step) == k + 1
        assert (out[0].cpu() == ref.token).float().mean() >= 0.99
        torch.testing.assert_close(out[3].cpu(), ref.log_zpi, atol=ATOL, rtol=1e-6)
