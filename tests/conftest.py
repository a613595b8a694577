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


@pytest.fixture
def gen():
    """A generator with a fresh seed per test (printed; ``TSMC_TEST_SEED=...`` replays a failure)."""
    seed = int(os.environ.get("TSMC_TEST_SEED", int.from_bytes(os.urandom(4), "little")))
    print(f"TSMC_TEST_SEED={seed}")
    return torch.Generator().manual_seed(seed)


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
