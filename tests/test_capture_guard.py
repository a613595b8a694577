"""The CPU stand-ins for CUDA-graph capture must themselves catch what capture refuses."""
import pytest
import torch

from conftest import _HostSyncGuard


@pytest.mark.parametrize("bad", [
    lambda x: x[0].item(),
    lambda x: bool(x[0] > 0),
    lambda x: int(x.argmax()),
    lambda x: x + torch.tensor([1.0]),
    lambda x: x[x > 0],
    lambda x: x.nonzero(),
    lambda x: torch.isin(x, x[:2]),
    lambda x: torch.arange(3).repeat_interleave(x[:3].long().abs()),
    lambda x: x.unique(),
])
def test_guard_refuses_host_syncs(bad):
    x = torch.randn(8)
    with pytest.raises(AssertionError, match="CUDA graph"):
        with _HostSyncGuard():
            bad(x)


def test_guard_lets_device_work_through():
    x = torch.randn(8)
    with _HostSyncGuard():
        y = torch.where(x > 0, x, torch.zeros_like(x)).cumsum(0)
        y.index_copy_(0, torch.arange(2), x[:2] * 2.0)
        x.repeat_interleave(2, output_size=16)
        torch.full((3,), 2.0).add_(x[:3])


@pytest.fixture
def interpreter_launches_exempt(monkeypatch):
    """Triton's interpreter copies arguments to numpy to run a kernel on the CPU; on a GPU that
    is a kernel launch, which capture records. Exempt the launch itself from the guard."""
    from tsmc_kernels.triton._common import is_interpreter

    if not is_interpreter():
        pytest.skip("Triton runs compiled kernels here (a GPU machine): the GPU tests capture for real")
    interp = pytest.importorskip("triton.runtime.interpreter")
    from torch.utils._python_dispatch import _disable_current_modes

    call = interp.GridExecutor.__call__

    def launch(self, *args, **kwargs):
        with _disable_current_modes():
            return call(self, *args, **kwargs)
    monkeypatch.setattr(interp.GridExecutor, "__call__", launch)


def _step_inputs(gen):
    M, V, B, N = 8, 50, 2, 4
    return dict(logits=torch.randn(M, V, generator=gen), twist=torch.randn(M, V, generator=gen),
                log_w=torch.randn(B, N, generator=gen), inc=torch.randn(B, N, generator=gen),
                kv=[torch.randn(M, 2, 5, 4, generator=gen) for _ in range(3)],
                anc=torch.tensor([[0, 0, 2, 3], [1, 1, 2, 2]]), step=torch.zeros((), dtype=torch.int64),
                steps=torch.arange(M))


def test_triton_wrappers_are_capture_safe(gen, interpreter_launches_exempt):
    """The host code of every Triton wrapper (what runs on the CPU while a CUDA graph records its
    launches) after one warm-up call: Python-int and tensor steps, per-row steps, all schemes' paths."""
    from tsmc_kernels.triton.kv_gather import kv_gather_triton_
    from tsmc_kernels.triton.twist_sample import twist_sample_triton
    from tsmc_kernels.triton.weights import normalize_triton, resample_triton, reweight_triton

    x = _step_inputs(gen)

    def calls():
        twist_sample_triton(x["logits"], x["twist"], temperature=0.5, top_k=3, seed=1, step=x["step"])
        twist_sample_triton(x["logits"], None, temperature=1.0, top_k=0, seed=1, step=x["steps"])
        twist_sample_triton(x["logits"], None, seed=1, step=3)
        normalize_triton(x["log_w"], x["inc"], ess_threshold=0.5)
        for scheme in ("systematic", "stratified", "multinomial"):
            resample_triton(x["log_w"], torch.ones(2, dtype=torch.bool), scheme=scheme, seed=1, step=x["step"])
            reweight_triton(x["log_w"], x["inc"], ess_threshold=0.5, scheme=scheme, seed=1, step=2)
        kv_gather_triton_(x["kv"], x["anc"])
    calls()  # the warm-up before a capture (compiles kernels, builds the gather's pointer table)
    with _HostSyncGuard():
        calls()


def test_ops_are_capture_safe(gen):
    """The public ops' own host code with ``validate=False`` (validation reads values: it is
    skipped while capturing), Python-int and tensor steps."""
    from tsmc_kernels import ops

    x = _step_inputs(gen)
    with _HostSyncGuard():
        for step in (5, x["step"]):
            ops.twist_sample(x["logits"], x["twist"], top_k=2, seed=3, step=step, validate=False)
            ops.reweight(x["log_w"], x["inc"], seed=3, step=step, validate=False)
            ops.resample(x["log_w"], seed=3, step=step, validate=False)
        ops.twist_sample(x["logits"], None, seed=3, step=x["steps"], validate=False)
        ops.normalize_log_weights(x["log_w"], x["inc"], validate=False)
        ops.kv_gather_(x["kv"], x["anc"], validate=False)
