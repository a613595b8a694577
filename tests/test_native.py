"""The C++ extension tsmc_kernels._C directly: exact agreement with the reference, validation.

Hypothesis draws shapes, -inf patterns, ties, schemes, masks, seeds and steps (fresh examples
every run). The extension must be built (`pip install --no-build-isolation -e .`); only
TSMC_BUILD_EXT=0 makes these tests skip instead of fail.
"""
import math
import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tsmc_kernels import ops, reference, rng

from conftest import check_gather_skips_out_of_range, row_bytes

SKIP = os.environ.get("TSMC_BUILD_EXT") == "0"
pytestmark = pytest.mark.skipif(SKIP, reason="TSMC_BUILD_EXT=0: the C++ extension is not built")
HYP = settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture(scope="module")
def C():
    assert ops.native_available(), "tsmc_kernels._C did not load: build it with `pip install --no-build-isolation -e .`"
    return ops._C


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_cuda_source_compiles(tmp_path, arch):
    """csrc/kv_gather.cu builds with this machine's nvcc (no GPU needed): its argument table,
    512 tensors from CUDA 12.1 on, must fit the launch's parameter space (a static_assert)."""
    import shutil
    import subprocess

    if shutil.which("nvcc") is None:
        pytest.skip("nvcc not found")
    csrc = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "csrc")
    cmd = ["nvcc", "-std=c++17", "-O3", f"-arch={arch}", "-I", csrc, "-c", os.path.join(csrc, "kv_gather.cu"),
           "-o", str(tmp_path / "kv_gather.o")]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]


def test_extension_loaded():
    assert ops.native_available(), "tsmc_kernels._C did not load: build it with `pip install --no-build-isolation -e .`"
    assert isinstance(ops._C.with_cuda, bool)
    assert hasattr(ops._C, "kv_gather_cuda_") == ops._C.with_cuda
    for op in ("resample", "kv_gather", "twist_sample", "twist_score"):
        assert ops.backend_for(torch.device("cpu"), op) == "native"


# Log weights: finite values (with deliberate ties), -inf entries and all -inf rows.
_entry = st.one_of(st.floats(-30, 30, allow_nan=False), st.just(-math.inf), st.sampled_from([0.0, -1.0, 2.5]),
                   st.floats(-1e4, 1e4, allow_nan=False))


@st.composite
def weight_batches(draw):
    B = draw(st.integers(1, 6))
    N = draw(st.integers(1, 70))
    style = draw(st.sampled_from(["entries", "gaussian", "uniform", "one_live"]))
    if style == "entries":
        lw = torch.tensor(draw(st.lists(_entry, min_size=B * N, max_size=B * N)), dtype=torch.float64).reshape(B, N)
    else:
        g = torch.Generator().manual_seed(draw(st.integers(0, 2**32 - 1)))
        lw = torch.randn(B, N, generator=g, dtype=torch.float64) * draw(st.floats(0, 20))
        if style == "uniform":
            lw = lw[:, :1].expand(B, N).clone()
        elif style == "one_live":
            keep = torch.randint(0, N, (B,), generator=g)
            lw = torch.full((B, N), -math.inf, dtype=torch.float64)
            lw[torch.arange(B), keep] = 0.0
        dead = torch.rand(B, N, generator=g) < draw(st.floats(0, 1))
        lw = lw.masked_fill(dead, -math.inf)
    mask = torch.tensor(draw(st.lists(st.booleans(), min_size=B, max_size=B)))
    return lw, mask


@given(batch=weight_batches(), scheme=st.sampled_from(reference.SCHEMES), seed=st.integers(0, 2**63 - 1),
       step=st.integers(0, 2**40))
@HYP
def test_resample_equals_reference(C, batch, scheme, seed, step):
    lw, mask = batch
    expect = reference.resample(lw, mask, scheme=scheme, seed=seed, step=step)
    got = C.resample(lw, mask, scheme, seed, step)
    assert got.dtype == torch.int64 and got.shape == lw.shape and got.is_contiguous()
    assert torch.equal(got, expect), (lw, mask, scheme, seed, step)


@given(batch=weight_batches(), scheme=st.sampled_from(reference.SCHEMES), seed=st.integers(0, 2**32 - 1))
@HYP
def test_resample_counts_equal_reference_offspring_counts(C, batch, scheme, seed):
    lw, _ = batch
    live = ~torch.isneginf(torch.logsumexp(lw, -1))
    if not bool(live.any()):
        return
    lw = lw[live]
    anc = C.resample(lw, torch.ones(lw.shape[0], dtype=torch.bool), scheme, seed, 3)
    counts = torch.zeros_like(anc).scatter_add_(1, anc, torch.ones_like(anc))
    assert torch.equal(counts, reference.offspring_counts(lw, scheme=scheme, seed=seed, step=3))
    assert torch.equal(anc, reference.ancestors_from_counts(counts))


# ----------------------------------------------------------------------------- twist_sample / twist_score

def _native_twist_sample(C, x, t, temperature, top_k, seed, step, tokens=None):
    step_t = torch.as_tensor(step, dtype=torch.int64)
    return C.twist_sample(x, t, temperature, top_k, rng.fold_seed(seed), step_t, tokens)


@st.composite
def twist_rows(draw):
    M, V = draw(st.integers(1, 5)), draw(st.integers(1, 200))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**32 - 1)))
    dtype = draw(st.sampled_from([torch.float32, torch.bfloat16, torch.float16]))
    x = torch.randn(M, V, generator=g) * draw(st.sampled_from([0.5, 3.0, 10.0]))
    x = x.masked_fill(torch.rand(M, V, generator=g) < draw(st.sampled_from([0.0, 0.3, 0.95, 1.0])), -math.inf)
    if draw(st.booleans()):  # exact ties
        x = x.round()
    t = None
    if draw(st.booleans()):
        t = torch.randn(M, V, generator=g).masked_fill(torch.rand(M, V, generator=g) < draw(st.sampled_from([0.0, 0.5])),
                                                       -math.inf).to(dtype)
    return x.to(dtype), t


@given(rows=twist_rows(), temperature=st.sampled_from([1.0, 0.6, 2.5]), top_k=st.integers(0, 8),
       seed=st.integers(0, 2**63 - 1), step=st.integers(0, 2**40), per_row=st.booleans())
@HYP
def test_twist_sample_equals_reference(C, rows, temperature, top_k, seed, step, per_row):
    """fp64 like the reference, same noise: the same tokens (no near-tie allowance) and values."""
    x, t = rows
    steps = (torch.arange(x.shape[0]) * 7919 + step) if per_row else step
    got = _native_twist_sample(C, x, t, temperature, top_k, seed, steps)
    ref = reference.twist_sample(x, t, temperature=temperature, top_k=top_k, seed=seed, step=steps)
    assert got[0].dtype == torch.int64 and all(v.dtype == torch.float32 for v in got[1:])
    assert torch.equal(got[0], ref.token), (got[0], ref.token)
    for name, a, b in zip(reference.TwistSampleOutput._fields[1:], got[1:], ref[1:]):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6, equal_nan=True, msg=lambda m: f"{name}: {m}")
    tokens = torch.randint(0, x.shape[1], (x.shape[0],))
    got = _native_twist_sample(C, x, t, temperature, top_k, seed, steps, tokens)
    ref = reference.twist_score(x, t, tokens, temperature=temperature, top_k=top_k)
    assert torch.equal(got[0], tokens)
    for name, a, b in zip(reference.TwistSampleOutput._fields[1:], got[1:], ref[1:]):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6, equal_nan=True, msg=lambda m: f"score {name}: {m}")


def test_twist_sample_large_vocab_parallel(C):
    """Rows split over threads; realistic LM-like logits (most entries far below the max: the noise is skipped)."""
    g = torch.Generator().manual_seed(int.from_bytes(os.urandom(4), "little"))
    x = (torch.randn(6, 49152, generator=g) * 8).to(torch.bfloat16)
    t = torch.randn(6, 49152, generator=g)
    for tw, kw in ((None, {}), (t, dict(temperature=0.7, top_k=50))):
        got = _native_twist_sample(C, x, tw, kw.get("temperature", 1.0), kw.get("top_k", 0), 5, 3)
        ref = reference.twist_sample(x, tw, seed=5, step=3, **kw)
        assert torch.equal(got[0], ref.token)
        for a, b in zip(got[1:], ref[1:]):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-6)


def test_twist_sample_bad_rows(C):
    """NaN / +inf logits: token 0 and NaN values (log_psi the twist at token 0); a NaN / +inf twist:
    NaN logq and log Zpi, token 0; a row without a finite proposal entry: token 0, logq -inf."""
    x = torch.randn(5, 16)
    t = torch.randn(5, 16)
    x[0, 3] = float("nan")
    x[1, 9] = math.inf
    t[2, 4] = float("nan")
    t[3, 5] = math.inf
    t[4] = -math.inf
    tok, logp, logq, lzpi, lpsi, ent = _native_twist_sample(C, x, t, 1.0, 0, 1, 1)
    assert tok.tolist() == [0] * 5
    for m in (0, 1):
        assert all(math.isnan(v[m]) for v in (logp, logq, lzpi, ent)) and lpsi[m] == t[m, 0]
    for m in (2, 3):
        assert math.isnan(logq[m]) and math.isnan(lzpi[m]) and math.isfinite(logp[m]) and math.isfinite(ent[m])
    assert logq[4] == -math.inf and lzpi[4] == -math.inf and math.isfinite(logp[4])
    ref = reference.twist_sample(x[4:], t[4:], seed=1, step=1)
    for a, b in zip((tok, logp, logq, lzpi, lpsi, ent), ref):
        torch.testing.assert_close(a[4:], b, atol=1e-6, rtol=1e-6)


def test_twist_sample_validation(C):
    x = torch.randn(2, 5)
    st0 = torch.zeros((), dtype=torch.int64)
    with pytest.raises(ValueError, match="logits"):
        C.twist_sample(torch.randn(5), None, 1.0, 0, 0, st0, None)
    with pytest.raises(ValueError, match="log_twist"):
        C.twist_sample(x, torch.randn(2, 6), 1.0, 0, 0, st0, None)
    with pytest.raises(ValueError, match="temperature"):
        C.twist_sample(x, None, 0.0, 0, 0, st0, None)
    with pytest.raises(ValueError, match="top_k"):
        C.twist_sample(x, None, 1.0, -1, 0, st0, None)
    with pytest.raises(ValueError, match="step"):
        C.twist_sample(x, None, 1.0, 0, 0, torch.zeros(3, dtype=torch.int64), None)
    with pytest.raises(ValueError, match="tokens"):
        C.twist_sample(x, None, 1.0, 0, 0, st0, torch.tensor([0, 5]))
    with pytest.raises(ValueError, match="seed32"):
        C.twist_sample(x, None, 1.0, 0, 2**32, st0, None)
    with pytest.raises(ValueError, match="step must be on the CPU"):
        C.twist_sample(x, None, 1.0, 0, 0, st0.to("meta"), None)
    with pytest.raises(ValueError, match="tokens must be on the CPU"):
        C.twist_sample(x, None, 1.0, 0, 0, st0, torch.tensor([0, 1], device="meta"))
    # Strided rows are accepted (copied).
    wide = torch.randn(2, 10)[:, ::2]
    got = C.twist_sample(wide, None, 1.0, 0, 3, st0, None)
    assert torch.equal(got[0], reference.twist_sample(wide, None, seed=3, step=0).token)


def test_resample_many_prompts_parallel(C):
    """Large B exercises the parallel loop; each prompt must still equal the reference."""
    g = torch.Generator().manual_seed(int.from_bytes(os.urandom(4), "little"))
    B, N = 384, 48
    lw = torch.randn(B, N, generator=g, dtype=torch.float64) * 3
    lw[torch.rand(B, N, generator=g) < 0.2] = -math.inf
    mask = torch.rand(B, generator=g) < 0.9
    for scheme in reference.SCHEMES:
        assert torch.equal(C.resample(lw, mask, scheme, 77, 9), reference.resample(lw, mask, scheme=scheme, seed=77, step=9))


def test_resample_nan_row_gives_identity(C):
    lw = torch.tensor([[0.0, float("nan"), 1.0], [0.0, 1.0, 2.0]], dtype=torch.float64)
    for scheme in reference.SCHEMES:
        anc = C.resample(lw, torch.ones(2, dtype=torch.bool), scheme, 1, 1)
        assert torch.equal(anc[0], torch.arange(3))
        assert bool(((anc[1] >= 0) & (anc[1] < 3)).all())


def test_resample_validation(C):
    lw, mask = torch.zeros(2, 3, dtype=torch.float64), torch.ones(2, dtype=torch.bool)
    with pytest.raises(ValueError, match="scheme"):
        C.resample(lw, mask, "bogus", 0, 0)
    with pytest.raises(ValueError, match="log_w"):
        C.resample(torch.zeros(3, dtype=torch.float64), mask, "systematic", 0, 0)
    with pytest.raises(TypeError, match="log_w"):
        C.resample(lw.float(), mask, "systematic", 0, 0)
    with pytest.raises(ValueError, match="mask"):
        C.resample(lw, torch.ones(3, dtype=torch.bool), "systematic", 0, 0)
    with pytest.raises(TypeError, match="mask"):
        C.resample(lw, torch.ones(2), "systematic", 0, 0)
    with pytest.raises(ValueError, match="log_w"):
        C.resample(lw.to("meta"), mask, "systematic", 0, 0)
    with pytest.raises(ValueError, match="seed"):
        C.resample(lw, mask, "systematic", -1, 0)
    # Non-contiguous input is accepted (copied).
    wide = torch.randn(2, 6, dtype=torch.float64)
    assert torch.equal(C.resample(wide[:, ::2], mask, "multinomial", 5, 5),
                       reference.resample(wide[:, ::2], mask, scheme="multinomial", seed=5, step=5))
    assert C.resample(torch.zeros(0, 4, dtype=torch.float64), torch.ones(0, dtype=torch.bool), "residual", 0, 0).shape == (0, 4)


@st.composite
def gather_cases(draw):
    B, N = draw(st.integers(1, 5)), draw(st.integers(1, 9))
    seed = draw(st.integers(0, 2**32 - 1))
    g = torch.Generator().manual_seed(seed)
    lw = torch.randn(B, N, generator=g, dtype=torch.float64) * draw(st.floats(0, 8))
    lw[torch.rand(B, N, generator=g) < draw(st.floats(0, 0.9))] = -math.inf
    anc = reference.resample(lw, torch.rand(B, generator=g) < 0.8, scheme=draw(st.sampled_from(reference.SCHEMES)),
                             seed=seed)
    dtype = draw(st.sampled_from([torch.float32, torch.bfloat16, torch.float64, torch.int8, torch.int64, torch.uint8]))
    inner = tuple(draw(st.lists(st.integers(1, 6), min_size=0, max_size=3)))
    n = B * N * math.prod(inner) * torch.empty((), dtype=dtype).element_size()
    data = torch.randint(0, 256, (n,), generator=g, dtype=torch.uint8).view(dtype).reshape((B * N,) + inner)
    return anc, data, draw(st.booleans())


@given(case=gather_cases())
@HYP
def test_kv_gather_equals_reference(C, case):
    anc, data, flat = case
    expect = data.clone()
    reference.kv_gather_([expect], anc)
    C.kv_gather_([data], reference.flat_ancestors(anc) if flat else anc)
    as_bytes = lambda t: t.reshape(t.shape[0], -1).view(torch.uint8) if t.dim() > 1 else t.view(torch.uint8)  # noqa: E731
    assert torch.equal(as_bytes(data), as_bytes(expect))


def test_kv_gather_large_parallel(C):
    """Many moved rows and large rows (the parallel path)."""
    g = torch.Generator().manual_seed(int.from_bytes(os.urandom(4), "little"))
    B, N = 8, 32
    lw = torch.randn(B, N, generator=g, dtype=torch.float64) * 4
    anc = reference.resample(lw, torch.ones(B, dtype=torch.bool), scheme="multinomial", seed=3)
    ts = [torch.randn(B * N, 4, 32, 16, generator=g) for _ in range(6)]
    expect = [t.clone() for t in ts]
    reference.kv_gather_(expect, anc)
    C.kv_gather_(ts, anc)
    for t, e in zip(ts, expect):
        assert torch.equal(t.view(torch.int32), e.view(torch.int32))


def test_kv_gather_always_validates(C):
    """The C++ gather checks ancestors itself: even with validate=False nothing is silently wrong."""
    t = torch.arange(12.0).reshape(6, 2)
    before = t.clone()
    with pytest.raises(ValueError, match="out of range"):
        C.kv_gather_([t], torch.tensor([0, 1, 2, 3, 4, 6]))
    with pytest.raises(ValueError, match="out of range"):
        C.kv_gather_([t], torch.tensor([-1, 1, 2, 3, 4, 5]))
    with pytest.raises(ValueError, match="permutation property"):
        C.kv_gather_([t], torch.tensor([1, 2, 2, 3, 4, 5]))
    with pytest.raises(ValueError, match="permutation property"):
        ops.kv_gather_([t], torch.tensor([1, 2, 2, 3, 4, 5]), validate=False)
    assert torch.equal(t, before)  # nothing written before the error
    with pytest.raises(ValueError, match=r"tensors\[1\]"):
        C.kv_gather_([t, torch.zeros(5, 2)], torch.arange(6))
    with pytest.raises(ValueError, match=r"tensors\[0\].*meta"):
        C.kv_gather_([torch.zeros(6, 2, device="meta")], torch.arange(6))
    with pytest.raises(TypeError, match="ancestors"):
        C.kv_gather_([t], torch.arange(6.0))
    with pytest.raises(ValueError, match="ancestors"):
        C.kv_gather_([t], torch.zeros(1, 2, 3, dtype=torch.int64))
    with pytest.raises(ValueError, match="ancestors"):
        C.kv_gather_([t], torch.arange(6, device="meta"))


# ----------------------------------------------------------------------------- CUDA kernel

def _cuda_C(C):
    if not C.with_cuda:
        pytest.skip("tsmc_kernels._C was built without CUDA")
    return C


@pytest.mark.gpu
def test_cuda_kernel_skips_out_of_range_ancestors(C, cuda_device, gen):
    check_gather_skips_out_of_range(_cuda_C(C).kv_gather_cuda_, gen, cuda_device)


@pytest.mark.gpu
def test_cuda_kernel_equals_reference(C, cuda_device):
    C = _cuda_C(C)
    g = torch.Generator().manual_seed(int.from_bytes(os.urandom(4), "little"))
    B, N = 4, 16
    M = B * N
    lw = torch.randn(B, N, generator=g, dtype=torch.float64) * 3
    anc = reference.resample(lw, torch.tensor([True, True, False, True]), scheme="systematic", seed=5)
    flat = reference.flat_ancestors(anc)

    def rand(shape, dtype):
        n = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        return torch.randint(0, 256, (n,), generator=g, dtype=torch.uint8).view(dtype).reshape(shape)

    # 16-byte rows, 4-byte rows, odd rows, rows of several 16 KiB chunks, a misaligned base,
    # and more tensors than one launch takes (several launches).
    host = [rand((M, 2, 40, 128), torch.bfloat16), rand((M, 3), torch.float32), rand((M, 7), torch.int8),
            rand((M, 5, 3), torch.uint8), rand((M, 1, 3, 1000), torch.float32)]
    assert C.kv_gather_cuda_max_tensors >= 64
    host += [rand((M, 2, 8, 16), torch.float16) for _ in range(C.kv_gather_cuda_max_tensors + 6)]
    dev = [t.to(cuda_device) for t in host]
    misaligned_base = torch.zeros(M * 33 + 1, dtype=torch.uint8, device=cuda_device)
    host.append(rand((M, 33), torch.uint8))
    dev.append(misaligned_base[1:].view(M, 33))
    dev[-1].copy_(host[-1])
    expect = [t.index_select(0, flat) for t in host]
    C.kv_gather_cuda_(dev, flat.to(cuda_device))
    C.kv_gather_cuda_(dev[:3], anc.to(cuda_device))  # [B, N] form: applying it twice changes nothing
    torch.cuda.synchronize()
    for d, e in zip(dev, expect):
        assert torch.equal(d.cpu().reshape(M, -1).view(torch.uint8), e.reshape(M, -1).view(torch.uint8))
    # Non-contiguous rows take the fallback path and are still right.
    big = rand((M, 2, 9, 4), torch.float16)
    view = big.to(cuda_device)[:, :, :5]
    C.kv_gather_cuda_([view], flat.to(cuda_device))
    # Bitwise: random bits hold NaNs, which torch.equal never calls equal.
    assert torch.equal(row_bytes(view.cpu()), row_bytes(big[:, :, :5].index_select(0, flat)))


@pytest.mark.gpu
def test_cuda_kernel_graph_capture(C, cuda_device):
    """The gather captures in a CUDA graph and replays with new ancestors written into the same buffer."""
    C = _cuda_C(C)
    M = 32
    data = torch.randn(M, 4, 64, device=cuda_device)
    anc = torch.arange(M, device=cuda_device)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        C.kv_gather_cuda_([data], anc)  # warm-up
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        C.kv_gather_cuda_([data], anc)
    for trial in range(3):
        lw = torch.randn(4, 8, dtype=torch.float64) * 3
        new = reference.flat_ancestors(reference.resample(lw, torch.ones(4, dtype=torch.bool), seed=trial))
        anc.copy_(new)
        before = data.clone()
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(data, before.index_select(0, new.to(cuda_device)))
