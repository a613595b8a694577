"""ops.normalize_log_weights (SPEC §2, §6.2) against a direct fp64 computation.

Fresh random inputs every run (the seed is printed; set TSMC_TEST_SEED to replay one).
"""
import math

import numpy as np
import pytest
import torch
from scipy.special import logsumexp

from tsmc_kernels import ops, reference


def random_log_w(gen, B, N, p_dead=0.2, scale=4.0):
    lw = torch.randn(B, N, generator=gen, dtype=torch.float64) * scale + torch.randn(B, 1, generator=gen) * 10
    lw[torch.rand(B, N, generator=gen) < p_dead] = -math.inf
    lw[torch.arange(B), torch.randint(0, N, (B,), generator=gen)] = 0.0  # at least one live entry
    return lw


def direct(lw, inc, thr):
    """The SPEC §2 quantities in numpy fp64, written independently of reference.py."""
    lw, inc = lw.double().numpy(), inc.double().numpy()
    new = lw + inc
    lse_new = logsumexp(new, axis=1)
    norm = new - lse_new[:, None]
    W = np.exp(norm)
    ess = W.sum(1) ** 2 / (W ** 2).sum(1)
    return norm, ess, lse_new - logsumexp(lw, axis=1), (ess < thr * lw.shape[1]) | (thr >= 1.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_matches_direct_fp64(gen, dtype):
    for _ in range(5):
        B, N = int(torch.randint(1, 20, (1,), generator=gen)), int(torch.randint(1, 300, (1,), generator=gen))
        lw, inc = random_log_w(gen, B, N), random_log_w(gen, B, N, p_dead=0.1)
        inc[torch.isneginf(inc) & (lw == 0.0)] = 0.0  # keep lw's forced live entry live: no all -inf prompt
        lw, inc = lw.to(dtype), inc.to(dtype)
        thr = float(torch.rand(1, generator=gen))
        out = ops.normalize_log_weights(lw, inc, ess_threshold=thr)
        norm, ess, lzi, rs = direct(lw, inc, thr)
        assert out.log_w.dtype == torch.float32 and out.ess.dtype == torch.float32
        assert out.log_z_inc.dtype == torch.float32 and out.resample.dtype == torch.bool
        np.testing.assert_allclose(out.log_w.numpy(), norm, rtol=1e-6, atol=1e-5)
        np.testing.assert_allclose(out.ess.numpy(), ess, rtol=1e-5)
        np.testing.assert_allclose(out.log_z_inc.numpy(), lzi, rtol=1e-6, atol=1e-5)
        clear = np.abs(ess - thr * N) > 1e-4 * N  # the flag is only meaningful away from the boundary
        assert np.array_equal(out.resample.numpy()[clear], rs[clear])
        assert bool(((out.ess >= 1 - 1e-5) & (out.ess <= N * (1 + 1e-5))).all())
        # Normalised: logsumexp over particles is 0.
        torch.testing.assert_close(torch.logsumexp(out.log_w.double(), -1), torch.zeros(B, dtype=torch.float64),
                                   atol=1e-5, rtol=0)


def test_no_increment_is_zero_increment(gen):
    lw = random_log_w(gen, 4, 17)
    a = ops.normalize_log_weights(lw, None, ess_threshold=0.5)
    b = ops.normalize_log_weights(lw, torch.zeros_like(lw), ess_threshold=0.5)
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    torch.testing.assert_close(a.log_z_inc, torch.zeros(4), atol=1e-6, rtol=0)


def test_dead_prompt_never_nan(gen):
    B, N = 4, 9
    lw, inc = random_log_w(gen, B, N), random_log_w(gen, B, N)
    inc[1] = -math.inf  # every particle of prompt 1 dies now
    lw[3] = -math.inf   # prompt 3 was already dead
    for thr in (0.0, 0.5, 1.0, 2.0):
        out = ops.normalize_log_weights(lw, inc, ess_threshold=thr)
        for t in out[:3]:
            assert not bool(torch.isnan(t).any())
        for b in (1, 3):
            assert bool(torch.isneginf(out.log_w[b]).all())
            assert float(out.ess[b]) == 0.0
            assert math.isinf(float(out.log_z_inc[b])) and float(out.log_z_inc[b]) < 0
            assert not bool(out.resample[b])
        assert bool(torch.isfinite(out.log_z_inc[[0, 2]]).all())


def test_threshold_one_always_zero_never(gen):
    B, N = 6, 32
    lw = (torch.randn(B, 1, generator=gen) * 10).expand(B, N).clone()  # uniform within each prompt: ESS = N
    lw[:3] = random_log_w(gen, 3, N, scale=5.0)           # degenerate prompts: small ESS
    assert bool(ops.normalize_log_weights(lw, ess_threshold=1.0).resample.all())
    assert not bool(ops.normalize_log_weights(lw, ess_threshold=0.0).resample.any())
    out = ops.normalize_log_weights(lw, ess_threshold=0.5)
    expect = out.ess < 0.5 * N
    assert torch.equal(out.resample, expect)
    torch.testing.assert_close(out.ess[3:], torch.full((3,), float(N)), rtol=1e-5, atol=0)


def test_log_zhat_telescopes_without_resampling(gen):
    """Sum over steps of log_z_inc = log mean_i prod_t w_t(i) when the weights start uniform."""
    B, N, T = 5, 24, 12
    incs = [torch.randn(B, N, generator=gen, dtype=torch.float64) * 0.7 - 0.3 for _ in range(T)]
    lw = torch.zeros(B, N)
    log_zhat = torch.zeros(B, dtype=torch.float64)
    for inc in incs:
        out = ops.normalize_log_weights(lw, inc.float(), ess_threshold=0.0)
        assert not bool(out.resample.any())
        log_zhat += out.log_z_inc.double()
        lw = out.log_w
    total = torch.stack(incs).float().double().sum(0)  # the fp32 increments actually fed in
    expect = torch.logsumexp(total, -1) - math.log(N)
    torch.testing.assert_close(log_zhat, expect, atol=1e-4, rtol=1e-5)
    # The final weights are the normalised cumulated increments.
    torch.testing.assert_close(lw.double(), total - torch.logsumexp(total, -1, keepdim=True), atol=1e-4, rtol=1e-5)


def test_reference_equals_ops(gen):
    lw, inc = random_log_w(gen, 7, 50), random_log_w(gen, 7, 50)
    a, b = ops.normalize_log_weights(lw, inc, ess_threshold=0.3), reference.normalize_log_weights(lw, inc, ess_threshold=0.3)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


def test_forced_backend_errors_say_what_to_set(monkeypatch):
    lw = torch.zeros(2, 4)
    monkeypatch.setenv("TSMC_BACKEND", "cuda")
    with pytest.raises(ValueError, match="TSMC_BACKEND must be reference, triton or native"):
        ops.normalize_log_weights(lw)
    monkeypatch.setenv("TSMC_BACKEND", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # CPU tensors in compiled Triton: not Triton's cryptic error
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        ops.normalize_log_weights(lw)


def test_bad_input_raises_naming_the_argument():
    lw = torch.zeros(2, 4)
    with pytest.raises(ValueError, match="log_w"):
        ops.normalize_log_weights(torch.zeros(4))
    with pytest.raises(TypeError, match="log_w"):
        ops.normalize_log_weights(torch.zeros(2, 4, dtype=torch.int32))
    with pytest.raises(ValueError, match="log_w_inc"):
        ops.normalize_log_weights(lw, torch.zeros(2, 5))
    with pytest.raises(ValueError, match="log_w_inc"):
        ops.normalize_log_weights(lw, torch.zeros(3, 4))
    with pytest.raises(ValueError, match="log_w_inc"):
        ops.normalize_log_weights(lw, torch.zeros(8))
    with pytest.raises(ValueError, match="log_w_inc.*NaN"):
        ops.normalize_log_weights(lw, torch.tensor([[0.0, 0.0, float("nan"), 0.0]] * 2))
    with pytest.raises(ValueError, match="log_w.*NaN"):
        ops.normalize_log_weights(torch.tensor([[0.0, float("nan")]]))
    with pytest.raises(ValueError, match=r"\+inf"):
        ops.normalize_log_weights(lw, torch.full((2, 4), math.inf))
    for bad in (-0.1, float("nan")):  # NaN would never resample
        with pytest.raises(ValueError, match="ess_threshold"):
            ops.normalize_log_weights(lw, ess_threshold=bad)
        with pytest.raises(ValueError, match="ess_threshold"):
            ops.reweight(lw, lw, ess_threshold=bad)
    with pytest.raises(ValueError, match="log_w_inc.*meta|meta.*log_w_inc"):
        ops.normalize_log_weights(lw, torch.zeros(2, 4, device="meta"))
    with pytest.raises(ValueError, match="log_w"):
        ops.normalize_log_weights(torch.zeros(2, 0))
