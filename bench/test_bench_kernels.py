"""Microbenchmarks of the Triton kernels (SPEC §6) against naive PyTorch chains. Needs CUDA.

Run with ``bench/run_all.sh`` (writes ``bench/results/<device>.json``) or
``pytest bench/test_bench_kernels.py --benchmark-json=...``. Shapes follow the issue:

* twist_sample: M in {16, 64, 256, 1024}, V in {49152, 151936}, bf16 logits and twists, vs
  ``log_softmax + add + logsumexp + softmax + torch.multinomial``;
* reweight (normalise + resample + reset, one launch): B x N in {1x64, 8x64, 64x16}, vs
  ``logsumexp + cumsum + searchsorted`` with the resampling decision on the host (``.item()``);
* kv_gather: a Qwen2.5-1.5B-shaped KV cache (28 layers x K/V, 2 KV heads, head dim 128, bf16) at
  256..2048 tokens with half the particles dead, vs a DynamicCache-style ``index_select`` of every
  layer and the native CUDA gather ``ops._C.kv_gather_cuda_`` when it was built.

``extra_info`` of every entry: ``device_us`` (CUDA graph replay, no launch overhead), ``eager_us``
(events around eager calls), bytes moved, achieved GB/s (from ``device_us``, or ``eager_us`` for
chains that cannot be captured), fraction of the nominal HBM bandwidth and of the measured copy bandwidth; the
Triton entries also carry the naive chain's time and the speedup.
"""
from __future__ import annotations

import math

import pytest
import torch

from tsmc_kernels import ops, rng

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

SEED = rng.fold_seed(1234)


def _sync(fn):
    def run():
        fn()
        torch.cuda.synchronize()
    return run


# ----------------------------------------------------------------------------- twist_sample

def naive_twist_sample(logits, log_twist, gen):
    """The PyTorch chain the fused kernel replaces (fp32 temporaries, multinomial sampling)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    s = logp + log_twist.float() if log_twist is not None else logp
    log_zpi = torch.logsumexp(s, dim=-1)
    q = torch.softmax(s, dim=-1)
    tok = torch.multinomial(q, 1, generator=gen)
    logq = s.gather(1, tok)[:, 0] - log_zpi
    return tok[:, 0], logp.gather(1, tok)[:, 0], logq, log_zpi


def make_logits(M, V, kind):
    """``randn * 3`` logits, or LM-like ones (a few dozen tokens ~15 nats above a N(0, 2) bulk: the
    mass sits in a few vocabulary groups)."""
    x = torch.randn(M, V, device="cuda") * (3.0 if kind == "randn" else 2.0)
    if kind == "lm":
        hot = torch.randint(0, V, (M, 32), device="cuda")
        x.scatter_add_(1, hot, torch.full((M, 32), 15.0, device="cuda"))
    return x.to(torch.bfloat16)


@pytest.mark.benchmark(group="twist_sample")
@pytest.mark.parametrize("V", [49152, 151936])
@pytest.mark.parametrize("M", [16, 64, 256, 1024])
@pytest.mark.parametrize("variant", ["twist", "twist_lm_logits", "no_twist", "twist_T0.7_top50"])
@pytest.mark.parametrize("impl", ["triton", "naive"])
def test_twist_sample(benchmark, gpu, impl, variant, M, V):
    from tsmc_kernels.triton.twist_sample import twist_sample_triton

    if variant == "twist_T0.7_top50" and (impl == "naive" or M not in (64, 1024)):
        pytest.skip("top-k variant: Triton only, two sizes")
    if variant == "twist_lm_logits" and impl == "naive":
        pytest.skip("the naive chain does not depend on the logits' values")
    torch.manual_seed(0)
    logits = make_logits(M, V, "lm" if variant == "twist_lm_logits" else "randn")
    twist = torch.randn(M, V, device="cuda").to(torch.bfloat16) if variant != "no_twist" else None
    temperature, top_k = (0.7, 50) if variant == "twist_T0.7_top50" else (1.0, 0)
    step = torch.zeros((), dtype=torch.int64, device="cuda")
    gen = torch.Generator(device="cuda").manual_seed(0)
    nbytes = logits.numel() * logits.element_size() * (2 if twist is not None else 1) + M * (8 + 5 * 4)

    def kernel():
        return twist_sample_triton(logits, twist, temperature=temperature, top_k=top_k, seed=SEED, step=step)

    def naive():
        return naive_twist_sample(logits, twist, gen)

    fn = kernel if impl == "triton" else naive
    benchmark.pedantic(_sync(fn), rounds=10, warmup_rounds=2, iterations=1)
    info = {"impl": impl, "M": M, "V": V, "dtype": "bf16", "variant": variant, "eager_us": round(gpu.eager_us(fn), 2)}
    if impl == "triton":
        info["device_us"] = round(gpu.graph_us(kernel), 2)
        info.update(gpu.bandwidth(nbytes, info["device_us"]))
        if variant != "twist_T0.7_top50":
            naive_us = gpu.eager_us(naive)
            info["naive_eager_us"] = round(naive_us, 2)
            info["speedup_vs_naive_eager"] = round(naive_us / info["eager_us"], 2)
            info["speedup_vs_naive_device"] = round(naive_us / info["device_us"], 2)
        if top_k:
            info["note"] = "bytes_moved counts the inputs once; the top-k radix select reads x + log psi 4 more times"
    else:
        info.update(gpu.bandwidth(nbytes, info["eager_us"]))
        info["note"] = "GB/s relative to the fused kernel's input bytes; the chain moves several fp32 copies"
    benchmark.extra_info.update(info)


@pytest.mark.benchmark(group="twist_sample_tuning")
@pytest.mark.parametrize("block_v,num_warps", [(256, 1), (256, 2), (512, 2), (512, 4), (1024, 2), (1024, 4),
                                             (1024, 8)])
@pytest.mark.parametrize("M,V,splits", [(64, 151936, None), (256, 151936, None), (1024, 151936, None),
                                        (16, 151936, None), (16, 151936, 1)])
def test_twist_sample_configs(benchmark, gpu, block_v, num_warps, M, V, splits):
    """Tile / warp / split sweep on one shape: pick the defaults of ``twist_sample_triton`` from it."""
    from tsmc_kernels.triton.twist_sample import twist_sample_triton

    torch.manual_seed(0)
    logits = make_logits(M, V, "randn")
    twist = torch.randn(M, V, device="cuda").to(torch.bfloat16)
    step = torch.zeros((), dtype=torch.int64, device="cuda")

    def kernel():
        return twist_sample_triton(logits, twist, seed=SEED, step=step, block_v=block_v, num_warps=num_warps,
                                   num_splits=splits)

    benchmark.pedantic(_sync(kernel), rounds=10, warmup_rounds=2, iterations=1)
    info = {"impl": "triton", "M": M, "V": V, "block_v": block_v, "num_warps": num_warps,
            "num_splits": "auto" if splits is None else splits, "eager_us": round(gpu.eager_us(kernel), 2),
            "device_us": round(gpu.graph_us(kernel), 2)}
    info.update(gpu.bandwidth(2 * logits.numel() * 2 + M * 28, info["device_us"]))
    benchmark.extra_info.update(info)


@pytest.mark.benchmark(group="twist_sample_stages")
@pytest.mark.parametrize("num_stages,num_warps", [(1, 4), (2, 4), (3, 4), (4, 4), (3, 8)])
@pytest.mark.parametrize("twisted", [True, False])
@pytest.mark.parametrize("M", [64, 256, 1024])
def test_twist_sample_stages(benchmark, gpu, num_stages, num_warps, twisted, M):
    """Register prefetch of the next tile pair (``num_stages=1``, the default) against Triton's
    cp.async software pipeline (``num_stages >= 2``: more bytes in flight per program), V = 151936."""
    from tsmc_kernels.triton.twist_sample import twist_sample_triton

    torch.manual_seed(0)
    V = 151936
    logits = make_logits(M, V, "randn")
    twist = torch.randn(M, V, device="cuda").to(torch.bfloat16) if twisted else None
    step = torch.zeros((), dtype=torch.int64, device="cuda")

    def kernel():
        return twist_sample_triton(logits, twist, seed=SEED, step=step, num_warps=num_warps, num_stages=num_stages)

    benchmark.pedantic(_sync(kernel), rounds=10, warmup_rounds=2, iterations=1)
    info = {"impl": "triton", "M": M, "V": V, "twisted": twisted, "num_stages": num_stages, "num_warps": num_warps,
            "device_us": round(gpu.graph_us(kernel), 2)}
    info.update(gpu.bandwidth(logits.numel() * 2 * (2 if twisted else 1) + M * 28, info["device_us"]))
    benchmark.extra_info.update(info)


# ----------------------------------------------------------------------------- reweight

def naive_reweight(log_w, log_w_inc, ess_threshold, gen):
    """Normalise, ESS, host-side decision (``.item()``), systematic resampling with searchsorted."""
    B, N = log_w.shape
    lw = log_w + log_w_inc
    lse = torch.logsumexp(lw, dim=1, keepdim=True)
    norm = lw - lse
    w = norm.exp()
    ess = 1.0 / (w * w).sum(1)
    log_z_inc = lse[:, 0] - torch.logsumexp(log_w, dim=1)
    resample = ess < ess_threshold * N
    anc = torch.arange(N, device=lw.device).expand(B, N)
    if bool(resample.any().item()):
        cw = w.cumsum(1)
        u = (torch.arange(N, device=lw.device) + torch.rand(B, 1, device=lw.device, generator=gen)) / N
        anc = torch.where(resample[:, None], torch.searchsorted(cw, u).clamp_max(N - 1), anc)
        norm = torch.where(resample[:, None], torch.full_like(norm, -math.log(N)), norm)
    return norm, ess, log_z_inc, resample, anc


@pytest.mark.benchmark(group="reweight")
@pytest.mark.parametrize("B,N", [(1, 64), (8, 64), (64, 16)])
@pytest.mark.parametrize("impl", ["triton", "naive", "ops_unfused"])
def test_reweight(benchmark, gpu, impl, B, N):
    from tsmc_kernels.triton.weights import reweight_triton

    torch.manual_seed(0)
    log_w = torch.randn(B, N, device="cuda") * 2
    inc = torch.randn(B, N, device="cuda")
    step = torch.zeros((), dtype=torch.int64, device="cuda")
    gen = torch.Generator(device="cuda").manual_seed(0)
    nbytes = B * N * (4 + 4 + 4 + 8) + B * (4 + 4 + 1)

    def kernel():
        return reweight_triton(log_w, inc, ess_threshold=0.99, scheme="systematic", seed=SEED, step=step)

    def naive():
        return naive_reweight(log_w, inc, 0.99, gen)

    def unfused():  # normalise then resample: two Triton launches through ops
        norm = ops.normalize_log_weights(log_w, inc, ess_threshold=0.99, validate=False)
        return ops.resample(norm.log_w, norm.resample, seed=SEED, step=step, validate=False)

    fn = {"triton": kernel, "naive": naive, "ops_unfused": unfused}[impl]
    benchmark.pedantic(_sync(fn), rounds=20, warmup_rounds=3, iterations=1)
    info = {"impl": impl, "B": B, "N": N, "eager_us": round(gpu.eager_us(fn), 2)}
    if impl != "naive":
        info["device_us"] = round(gpu.graph_us(fn), 2)
        info.update(gpu.bandwidth(nbytes, info["device_us"]))
    else:
        info.update(gpu.bandwidth(nbytes, info["eager_us"]))
        info["note"] = "includes a host synchronisation (.item()) per call"
    if impl == "triton":
        naive_us = gpu.eager_us(naive)
        info["naive_eager_us"] = round(naive_us, 2)
        info["speedup_vs_naive_eager"] = round(naive_us / info["eager_us"], 2)
    benchmark.extra_info.update(info)


@pytest.mark.benchmark(group="reweight_tuning")
@pytest.mark.parametrize("num_warps", [1, 2, 4, 8])
@pytest.mark.parametrize("B,N", [(1, 64), (8, 64), (8, 256)])
def test_reweight_configs(benchmark, gpu, num_warps, B, N):
    """Warps per prompt's program of the fused reweight: pick ``weights._launch``'s default from it."""
    from tsmc_kernels.triton.weights import reweight_triton

    torch.manual_seed(0)
    log_w = torch.randn(B, N, device="cuda") * 2
    inc = torch.randn(B, N, device="cuda")
    step = torch.zeros((), dtype=torch.int64, device="cuda")

    def kernel():
        return reweight_triton(log_w, inc, ess_threshold=0.99, scheme="systematic", seed=SEED, step=step,
                               num_warps=num_warps)

    benchmark.pedantic(_sync(kernel), rounds=20, warmup_rounds=3, iterations=1)
    benchmark.extra_info.update({"impl": "triton", "B": B, "N": N, "num_warps": num_warps,
                                 "eager_us": round(gpu.eager_us(kernel), 2), "device_us": round(gpu.graph_us(kernel), 2)})


# ----------------------------------------------------------------------------- kv_gather

LAYERS, KV_HEADS, HEAD_DIM = 28, 2, 128


def qwen_kv_cache(M, L):
    return [torch.randn(M, KV_HEADS, L, HEAD_DIM, device="cuda", dtype=torch.bfloat16) for _ in range(2 * LAYERS)]


def half_dead_ancestors(M):
    """Particles M/2.. are dead and receive copies of survivors 0..M/2-1 (permutation property)."""
    a = torch.arange(M, device="cuda")
    a[M // 2:] = torch.arange(M - M // 2, device="cuda") % (M // 2)
    return a


@pytest.mark.benchmark(group="kv_gather")
@pytest.mark.parametrize("M,L", [(64, 256), (64, 1024), (64, 2048), (256, 2048)])
@pytest.mark.parametrize("impl", ["triton", "triton_identity", "native_cuda", "native_cuda_identity", "index_select"])
def test_kv_gather(benchmark, gpu, impl, M, L):
    from tsmc_kernels.triton.kv_gather import kv_gather_triton_

    if impl.startswith("native_cuda") and not ops.native_available(cuda=True):
        pytest.skip("tsmc_kernels._C was built without CUDA")
    torch.manual_seed(0)
    cache = qwen_kv_cache(M, L)
    anc = torch.arange(M, device="cuda") if impl.endswith("identity") else half_dead_ancestors(M)
    row_bytes = KV_HEADS * L * HEAD_DIM * 2
    dead = int((anc != torch.arange(M, device="cuda")).sum())
    nbytes = 2 * dead * row_bytes * len(cache)

    def kernel():
        kv_gather_triton_(cache, anc)

    def native():
        ops._C.kv_gather_cuda_(cache, anc)

    def naive():  # DynamicCache.reorder_cache: index_select of every layer's K and V
        for i in range(len(cache)):
            cache[i] = cache[i].index_select(0, anc)

    fn = {"triton": kernel, "triton_identity": kernel, "native_cuda": native, "native_cuda_identity": native,
          "index_select": naive}[impl]
    benchmark.pedantic(_sync(fn), rounds=10, warmup_rounds=2, iterations=1)
    info = {"impl": impl, "M": M, "L": L, "layers": LAYERS, "dead_rows": dead,
            "cache_bytes": row_bytes * M * len(cache), "eager_us": round(gpu.eager_us(fn, iters=10))}
    info["device_us"] = round(gpu.graph_us(fn, iters=5) if impl != "index_select" else info["eager_us"], 2)
    info.update(gpu.bandwidth(nbytes, info["device_us"]))
    if impl == "index_select":
        info["actual_bytes_moved"] = 2 * M * row_bytes * len(cache)
        info["note"] = "achieved_GBps is the useful (dead-row) bytes per second; it moves the whole cache"
    if impl == "triton":
        naive_us = gpu.eager_us(naive, iters=5)
        info["index_select_eager_us"] = round(naive_us, 2)
        info["speedup_vs_index_select"] = round(naive_us / info["device_us"], 2)
    benchmark.extra_info.update(info)
