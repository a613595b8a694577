"""Triton KV-cache gather (SPEC §6.4): all tensors in one launch, only rows with a[i] != i.

Random bytes (floats include NaN/Inf payloads), compared bit-exactly with ``index_select`` and
with the untouched source; ancestors come from real resampling steps (permutation property).
Runs under the Triton interpreter on CPU and compiled on CUDA when present. Fresh random inputs
every run (the seed is printed; set TSMC_TEST_SEED to replay one).
"""

import pytest
import torch

from tsmc_kernels import ops, reference
from tsmc_kernels.triton import kv_gather as kvg
from tsmc_kernels.triton.kv_gather import kv_gather_triton_

from conftest import (INTERPRETED, assert_gathered, check_cuda_gather, check_gather_aliasing_views,
                      check_gather_on_views, check_gather_skips_out_of_range, random_ancestors, random_data,
                      requires_cuda, row_bytes)

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.int64, torch.int32, torch.int8,
          torch.bool]


def test_all_dtypes_and_shapes_in_one_call(gen):
    B, N = 2, 6
    M = B * N
    anc = random_ancestors(gen, B, N)
    flat = reference.flat_ancestors(anc)
    assert bool((flat != torch.arange(M)).any())
    ts = []
    for dtype in DTYPES:
        for shape in [(M, 2, 3, 4), (M, 5), (M,)]:  # 8/4/2/1-byte words, odd row sizes
            ts.append(random_data(gen, shape, dtype))
    srcs = [t.clone() for t in ts]
    kv_gather_triton_(ts, anc)
    for t, s in zip(ts, srcs):
        assert_gathered(t, s, flat)


def test_nan_payloads_and_flat_ancestors(gen):
    B, N = 2, 5
    anc = random_ancestors(gen, B, N)
    flat = reference.flat_ancestors(anc)
    bits = torch.tensor([0x7F800001, 0xFFC12345, 0x80000000, 0x7FBFFFFF], dtype=torch.int64)
    t = (bits[torch.randint(0, 4, (B * N, 7), generator=gen)] + torch.arange(B * N)[:, None]).to(torch.int32)
    t = t.view(torch.float32)
    src = t.clone()
    kv_gather_triton_([t], flat)
    assert_gathered(t, src, flat)


def test_rows_larger_than_a_chunk(gen, monkeypatch):
    monkeypatch.setattr(kvg, "CHUNK_BYTES", 256)
    kvg.clear_table_cache()
    B, N = 2, 4
    anc = random_ancestors(gen, B, N, p_dead=0.6)
    flat = reference.flat_ancestors(anc)
    ts = [random_data(gen, (B * N, 3, 70), torch.bfloat16), random_data(gen, (B * N, 999), torch.int8)]
    srcs = [t.clone() for t in ts]
    kv_gather_triton_(ts, anc, block=64)
    for t, s in zip(ts, srcs):
        assert_gathered(t, s, flat)
    kvg.clear_table_cache()


@pytest.mark.parametrize("row_groups", [1, 2, 5, None])
def test_row_groups_walk_every_row(gen, monkeypatch, row_groups):
    """A program walks rows ``g, g + G, ...``: any number of groups moves every row once."""
    monkeypatch.setattr(kvg, "CHUNK_BYTES", 64)
    kvg.clear_table_cache()
    B, N = 2, 7
    anc = random_ancestors(gen, B, N, p_dead=0.6)
    ts = [random_data(gen, (B * N, 300), torch.int16), random_data(gen, (B * N, 3), torch.float32)]
    srcs = [t.clone() for t in ts]
    kv_gather_triton_(ts, anc, row_groups=row_groups)
    for t, s in zip(ts, srcs):
        assert_gathered(t, s, reference.flat_ancestors(anc))
    kvg.clear_table_cache()


def test_identity_changes_nothing_and_table_is_cached(gen):
    B, N = 3, 4
    ts = [random_data(gen, (B * N, 2, 3, 4), torch.bfloat16), random_data(gen, (B * N, 9), torch.int64)]
    srcs = [t.clone() for t in ts]
    kvg.clear_table_cache()
    kv_gather_triton_(ts, torch.arange(N).expand(B, N))
    kv_gather_triton_(ts, torch.arange(B * N))
    assert len(kvg._cache) == 1  # one layout, one table
    for t, s in zip(ts, srcs):
        assert torch.equal(row_bytes(t), row_bytes(s))
    kv_gather_triton_([], torch.arange(B * N))
    kv_gather_triton_([torch.empty(B * N, 0)], torch.arange(B * N))


def test_strided_permuted_and_non_contiguous_views(gen):
    check_gather_on_views(kv_gather_triton_, gen, 2, 4)


def test_aliasing_k_and_v_views(gen):
    check_gather_aliasing_views(kv_gather_triton_, gen, 2, 4)


def test_cache_eviction_keeps_limit(gen, monkeypatch):
    monkeypatch.setattr(kvg, "_CACHE_SIZE", 2)
    kvg.clear_table_cache()
    for n in range(4):
        t = torch.zeros(4, n + 1)
        kv_gather_triton_([t], torch.arange(4))
    assert len(kvg._cache) == 2
    kvg.clear_table_cache()


def test_bad_input():
    t = torch.zeros(6, 4)
    with pytest.raises(ValueError, match=r"tensors\[1\]"):
        kv_gather_triton_([t, torch.zeros(7, 4)], torch.arange(6))
    with pytest.raises(TypeError, match=r"tensors\[0\]"):
        kv_gather_triton_([t.numpy()], torch.arange(6))


def test_out_of_range_ancestors_copy_nothing(gen):
    check_gather_skips_out_of_range(kv_gather_triton_, gen)


def test_ops_triton_backend(gen, monkeypatch):
    if not INTERPRETED:
        pytest.skip("the Triton backend runs CPU tensors only under TRITON_INTERPRET=1")
    monkeypatch.setenv("TSMC_BACKEND", "triton")
    B, N = 2, 5
    anc = random_ancestors(gen, B, N, scheme="multinomial")
    ts = [random_data(gen, (B * N, 2, 4, 8), torch.bfloat16) for _ in range(4)] + [random_data(gen, (B * N, 6),
                                                                                                 torch.bool)]
    srcs = [t.clone() for t in ts]
    ops.kv_gather_(ts, anc)
    for t, s in zip(ts, srcs):
        assert_gathered(t, s, reference.flat_ancestors(anc))


# ----------------------------------------------------------------------------- CUDA

@requires_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.int8, torch.bool])
def test_cuda_equals_reference(gen, cuda_device, dtype):
    check_cuda_gather(kv_gather_triton_, gen, cuda_device, dtype,
                      [(2, 33, 64), (3, 1, 5), (77,), (), (2, 40, 128), (2, 1000, 128)])


@requires_cuda
@pytest.mark.gpu
def test_cuda_out_of_range_ancestors_copy_nothing(gen, cuda_device):
    check_gather_skips_out_of_range(kv_gather_triton_, gen, cuda_device)


@requires_cuda
@pytest.mark.gpu
def test_cuda_graph_capture_and_replay(gen, cuda_device):
    """Gather inside a captured graph: ancestors change in place between replays."""
    B, N = 2, 8
    M = B * N
    k = random_data(gen, (M, 2, 16, 64), torch.bfloat16, cuda_device)
    tok = random_data(gen, (M, 16), torch.int64, cuda_device)
    anc_buf = torch.arange(M, device=cuda_device)
    kvg.clear_table_cache()
    graph = torch.cuda.CUDAGraph()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        kv_gather_triton_([k, tok], anc_buf)  # compile outside the capture (identity: no copy)
    torch.cuda.current_stream().wait_stream(s)
    n_tables = len(kvg._cache)
    with torch.cuda.graph(graph):
        kv_gather_triton_([k, tok], anc_buf)  # reuses the table cached by the warm-up call
    assert len(kvg._cache) == n_tables
    for _ in range(3):
        anc = reference.flat_ancestors(random_ancestors(gen, B, N))
        src_k, src_t = k.clone(), tok.clone()
        anc_buf.copy_(anc)
        graph.replay()
        torch.cuda.synchronize()
        assert_gathered(k, src_k, anc)
        assert_gathered(tok, src_t, anc)
