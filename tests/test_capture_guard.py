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
