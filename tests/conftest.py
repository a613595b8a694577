"""Shared test set-up. Triton kernels run in the interpreter on machines without a GPU."""
import os

import torch

if not torch.cuda.is_available():
    # Must be set before any module decorates a Triton kernel.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")


@pytest.fixture
def cuda_device():
    if not HAS_CUDA:
        pytest.skip("needs a CUDA GPU")
    return torch.device("cuda")
