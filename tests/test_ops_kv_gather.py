"""ops.kv_gather_ (SPEC §2, §6.4): in-place row gather, only rows with a[i] != i, any dtype/layout.

Data are random bytes (so floats include NaN and Inf with arbitrary payloads) and every check
compares exact bytes against a separate, untouched source copy. Ancestors are real resampling
outputs (reference.resample on random weights), so they have the permutation property. Fresh
random inputs every run (the seed is printed; set TSMC_TEST_SEED to replay one).
"""
import pytest
import torch

from tsmc_kernels import ops, reference

from conftest import (assert_gathered, check_cuda_gather, check_gather_aliasing_views, check_gather_on_views,
                      random_ancestors, random_data, row_bytes)

BACKENDS = ["reference"] + (["native"] if ops.native_available() else [])
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.int64, torch.int32, torch.int8,
          torch.uint8, torch.bool]


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch):
    monkeypatch.setenv("TSMC_BACKEND", request.param)
    return request.param


@pytest.mark.parametrize("dtype", DTYPES)
def test_equals_index_select(gen, backend, dtype):
    B, N = int(torch.randint(1, 5, (1,), generator=gen)), int(torch.randint(1, 12, (1,), generator=gen))
    M = B * N
    anc = random_ancestors(gen, B, N)
    flat = reference.flat_ancestors(anc)
    for shape in [(M, 3, 5, 8), (M, 17), (M,), (M, 2, 1, 3)]:  # [M, H, L, D], [M, T], masks, odd row bytes
        t = random_data(gen, shape, dtype)
        src = t.clone()
        ops.kv_gather_([t], anc)
        assert_gathered(t, src, flat)


def test_nan_payloads_survive(gen, backend):
    """Signalling/quiet NaNs with payloads and -0.0 are copied (moved rows) and kept (other rows) bit-exactly."""
    B, N = 2, 8
    anc = random_ancestors(gen, B, N)
    flat = reference.flat_ancestors(anc)
    for dtype, pattern in [(torch.float32, [0x7F800001, 0xFFC12345, 0x80000000, 0x7FBFFFFF]),
                           (torch.float16, [0x7C01, 0xFE55, 0x8000, 0x7D00]),
                           (torch.bfloat16, [0x7F81, 0xFFC3, 0x8000, 0x7FA0])]:
        bits = torch.tensor(pattern, dtype=torch.int64)
        int_dtype = torch.int32 if dtype == torch.float32 else torch.int16
        raw = bits[torch.randint(0, 4, (B * N, 6), generator=gen)] + torch.arange(B * N)[:, None]
        t = raw.to(int_dtype).view(dtype)
        src = t.clone()
        ops.kv_gather_([t], anc)
        assert_gathered(t, src, flat)


def test_flat_and_2d_ancestors_agree(gen, backend):
    B, N = 3, 7
    anc = random_ancestors(gen, B, N)
    t1 = random_data(gen, (B * N, 4, 6), torch.float32)
    t2, src = t1.clone(), t1.clone()
    ops.kv_gather_([t1], anc)
    ops.kv_gather_([t2], reference.flat_ancestors(anc))
    assert torch.equal(row_bytes(t1), row_bytes(t2))
    assert_gathered(t1, src, reference.flat_ancestors(anc))
    # int32 ancestors are accepted too.
    t3 = src.clone()
    ops.kv_gather_([t3], anc.int())
    assert torch.equal(row_bytes(t3), row_bytes(t1))


def test_identity_changes_nothing(gen, backend):
    B, N = 4, 6
    ts = [random_data(gen, (B * N, 2, 3, 4), torch.bfloat16), random_data(gen, (B * N, 9), torch.int64)]
    srcs = [t.clone() for t in ts]
    ops.kv_gather_(ts, torch.arange(N).expand(B, N))
    ops.kv_gather_(ts, torch.arange(B * N))
    for t, s in zip(ts, srcs):
        assert torch.equal(row_bytes(t), row_bytes(s))
    ops.kv_gather_([], torch.arange(B * N))  # no tensors: no-op


def test_whole_cache_in_one_call(gen, backend):
    """Every layer's K and V, a token buffer and an attention mask, mixed dtypes, one call."""
    B, N, layers = 3, 5, 4
    M = B * N
    anc = random_ancestors(gen, B, N, scheme="multinomial")
    flat = reference.flat_ancestors(anc)
    ts = [random_data(gen, (M, 2, 11, 8), torch.bfloat16) for _ in range(2 * layers)]
    ts += [random_data(gen, (M, 11), torch.int64), random_data(gen, (M, 11), torch.bool)]
    srcs = [t.clone() for t in ts]
    ops.kv_gather_(ts, anc)
    for t, s in zip(ts, srcs):
        assert_gathered(t, s, flat)


def test_non_contiguous_and_views(gen, backend):
    """Strided dim 0, rows that are not contiguous, permuted layouts; nothing outside the view."""
    check_gather_on_views(ops.kv_gather_, gen, 2, 6)


def test_aliasing_k_and_v_views(gen, backend):
    check_gather_aliasing_views(ops.kv_gather_, gen, 3, 4)


# ----------------------------------------------------------------------------- bad input

def test_bad_input_raises_naming_the_argument():
    B, N = 2, 3
    t = torch.zeros(B * N, 4)
    good = torch.arange(N).expand(B, N)
    with pytest.raises(ValueError, match="out of range"):
        ops.kv_gather_([t], torch.tensor([[0, 1, 3], [0, 1, 2]]))  # 3 >= N
    with pytest.raises(ValueError, match="out of range"):
        ops.kv_gather_([t], torch.tensor([0, 1, 2, 3, 4, -1]))
    with pytest.raises(ValueError, match="out of range"):
        ops.kv_gather_([t], torch.tensor([0, 1, 2, 3, 4, 6]))
    with pytest.raises(ValueError, match="permutation property"):
        ops.kv_gather_([t], torch.tensor([[1, 2, 2], [0, 1, 2]]))  # row 1 is read and overwritten
    with pytest.raises(ValueError, match=r"tensors\[1\]"):
        ops.kv_gather_([t, torch.zeros(B * N + 1, 4)], good)
    with pytest.raises(ValueError, match=r"tensors\[0\]"):
        ops.kv_gather_([torch.zeros(())], good)
    with pytest.raises(ValueError, match=r"tensors\[0\].*meta"):
        ops.kv_gather_([torch.zeros(B * N, 4, device="meta")], good)
    with pytest.raises(TypeError, match="ancestors"):
        ops.kv_gather_([t], good.float())
    with pytest.raises(ValueError, match="ancestors"):
        ops.kv_gather_([t], good.reshape(1, B, N))
    with pytest.raises(TypeError, match=r"tensors\[0\]"):
        ops.kv_gather_([t.numpy()], good)
    with pytest.raises(TypeError, match="ancestors"):
        ops.kv_gather_([t], [0, 1, 2, 3, 4, 5])


# ----------------------------------------------------------------------------- GPU

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.int8, torch.bool])
def test_cuda_equals_reference(gen, cuda_device, dtype):
    """ops.kv_gather_ on CUDA (native CUDA kernel or Triton) == the reference, bitwise."""
    # rows: 16-byte aligned, odd sizes, over 16 KiB
    check_cuda_gather(ops.kv_gather_, gen, cuda_device, dtype, [(2, 33, 64), (3, 1, 5), (77,), (), (2, 40, 128)])


@pytest.mark.gpu
@pytest.mark.parametrize("backend_name", ["native", "triton"])
def test_cuda_completion_columns_only(gen, cuda_device, monkeypatch, backend_name):
    """The sampler's gather: every layer's K and V from column P on (rows with gaps), on CUDA."""
    monkeypatch.setenv("TSMC_BACKEND", backend_name)
    B, N, P = 2, 8, 5
    anc = random_ancestors(gen, B, N)
    kv = [random_data(gen, (B * N, 2, 19, 64), torch.bfloat16, cuda_device) for _ in range(2 * 28)]
    src = [t.clone() for t in kv]
    ops.kv_gather_([t[:, :, P:] for t in kv], anc.to(cuda_device))
    flat = reference.flat_ancestors(anc)
    for t, s in zip(kv, src):
        want = s.cpu().clone()
        want[:, :, P:] = want[:, :, P:].index_select(0, flat)
        assert torch.equal(row_bytes(t.cpu()), row_bytes(want))


@pytest.mark.parametrize("make", [
    lambda b: b[:, :, 3:],                 # a KV cache from column P = 3 on: H pieces
    lambda b: b[:, :, 3:, :5],             # and part of the head dim: H * L' pieces
    lambda b: b.permute(0, 2, 1, 3),       # dense rows in another order: kept whole
    lambda b: b[:, :, 2:].transpose(2, 3),  # gaps and a transpose
    lambda b: b[:, 1],                     # dense already
])
def test_dense_row_pieces_cover_the_view_once(gen, make):
    """Every element of the view in exactly one piece, every piece with dense rows (what the
    kernels copy as blocks)."""
    base = torch.zeros(6, 2, 9, 8, dtype=torch.int64)
    view = make(base)
    pieces = reference.dense_row_pieces(view)
    for p in pieces:
        assert reference.rows_dense(p)
        p.add_(1)  # count how often each element is covered
    assert bool((view == 1).all()) and int(base.sum()) == view.numel()


def test_gapped_views_reach_the_kernel_as_dense_pieces(gen, monkeypatch):
    """The op hands the kernel dense-row pieces (a sliced KV cache is not copied row by row)."""
    seen = []
    kernel = reference.kv_gather_
    monkeypatch.setenv("TSMC_BACKEND", "reference")
    monkeypatch.setattr(reference, "kv_gather_", lambda ts, a: (seen.extend(ts), kernel(ts, a)))
    B, N = 2, 4
    anc = random_ancestors(gen, B, N)
    k = random_data(gen, (B * N, 2, 9, 8), torch.bfloat16)
    src = k.clone()
    ops.kv_gather_([k[:, :, 3:], k[:, :, :3]], anc)
    assert len(seen) == 4 and all(reference.rows_dense(t) for t in seen)
    assert_gathered(k, src, reference.flat_ancestors(anc))


def test_compiles_with_dynamic_shapes(gen, backend):
    """A cache that grows every step recompiles with symbolic sizes: the gather (views with gaps
    included) must trace without a graph break and still copy exactly the moved rows."""
    a = random_ancestors(gen, 1, 4)
    flat = reference.flat_ancestors(a)
    f = torch.compile(lambda k, a: ops.kv_gather_([k, k[:, :, 2:]], a), fullgraph=True, backend="eager", dynamic=True)
    for L in (5, 6, 9):
        k = random_data(gen, (4, 2, L, 3), torch.float32)
        src = k.clone()
        f(k, a)
        assert_gathered(k, src, flat)
