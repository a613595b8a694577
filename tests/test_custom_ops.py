"""Every ``tsmc::`` custom op passes ``torch.library.opcheck``: its schema (what it mutates), its
fake (meta) kernel against the real one, and its tracing by AOT autograd, the contract that makes
the ops work under ``torch.compile`` and in CUDA graphs (SPEC §6). Fresh random inputs each run."""
import os

import pytest
import torch

from tsmc_kernels import ops, reference

from conftest import random_ancestors, requires_cuda

BACKENDS = ["reference"] + (["native"] if ops.native_available() else []) + \
    (["triton"] if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0") else [])  # Triton's interpreter on CPU


def op_cases(gen, device):
    M, V, B, N = 6, 50, 2, 4
    logits = torch.randn(M, V, generator=gen).to(device)
    twist = torch.randn(M, V, generator=gen).to(device)
    tokens = torch.randint(0, V, (M,), generator=gen).to(device)
    step = torch.tensor(int(torch.randint(0, 100, (1,), generator=gen)), device=device)
    log_w, inc = torch.randn(B, N, generator=gen).to(device), torch.randn(B, N, generator=gen).to(device)
    mask = torch.tensor([True, False], device=device)
    anc = random_ancestors(gen, B, N).to(device)
    kv = [torch.randn(B * N, 3, 5, generator=gen).to(device), torch.randn(B * N, 7, generator=gen).to(device)]
    t = torch.ops.tsmc
    return {
        "twist_sample": (t.twist_sample.default, (logits, twist, 0.8, 5, 123, step)),
        "twist_sample_no_twist": (t.twist_sample.default, (logits.bfloat16(), None, 1.0, 0, 7, step)),
        "twist_score": (t.twist_score.default, (logits, twist, tokens, 1.0, 0)),
        "normalize_log_weights": (t.normalize_log_weights.default, (log_w, inc, 0.5)),
        "resample": (t.resample.default, (log_w, mask, "systematic", 11, step, False)),
        "reweight": (t.reweight.default, (log_w, inc, 0.9, "systematic", 11, step, False)),
        "kv_gather_": (t.kv_gather_.default, (kv, anc)),
    }


NAMES = list(op_cases(torch.Generator().manual_seed(0), "cpu"))


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck_cpu(gen, name, backend, monkeypatch):
    monkeypatch.setenv("TSMC_BACKEND", backend)
    op, args = op_cases(gen, "cpu")[name]
    torch.library.opcheck(op, args)


@requires_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("name", NAMES)
def test_opcheck_cuda(gen, name, monkeypatch):
    monkeypatch.delenv("TSMC_BACKEND", raising=False)  # the CUDA defaults: Triton, the CUDA C++ gather
    op, args = op_cases(gen, "cuda")[name]
    torch.library.opcheck(op, args)


def test_a_wrong_fake_kernel_fails_opcheck(gen):
    """The check can fail: a fake kernel whose output shape differs from the real op's is caught."""
    lib = torch.library.Library("tsmc_test", "DEF")
    lib.define("bad(Tensor x) -> Tensor")
    lib.impl("bad", lambda x: reference.normalize_log_weights(x).log_w, "CPU")
    torch.library.register_fake("tsmc_test::bad", lambda x: x.new_empty(x.shape[0]), lib=lib)
    with pytest.raises(Exception, match="(?i)shape|size|mismatch"):
        torch.library.opcheck(torch.ops.tsmc_test.bad.default, (torch.randn(2, 3, generator=gen),))
