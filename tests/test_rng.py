"""Counter-based random numbers (``tsmc_kernels/rng.py``, ``csrc/rng.h``, ``triton/_common.py``).

Known answers, the full 32-bit resolution of the uniforms, the reach of the Gumbel noise and its fp32
Triton evaluation at the extremes, and that every ``twist_sample`` backend proposes a token as far
below its row's best as the noise allows. ``mix32`` is a bijection of 32-bit words, so a test can
choose the step (or counter) that puts any bit pattern at a chosen (row, token): the extremes are
reached without drawing 2**32 numbers. With 24-bit uniforms (noise at most 17.33) the deep-token
tests fail.
"""
import math

import pytest
import torch
import triton
import triton.language as tl

from tsmc_kernels import ops, rng
from tsmc_kernels.triton import _common

from conftest import INTERPRETED, requires_cuda

M32 = 0xFFFFFFFF
G_TOP = 33 * math.log(2)  # the largest noise: u = 1 - 2**-33 gives -log(-log u) = 22.87
G_BOTTOM = -math.log(33 * math.log(2))  # the smallest: u = 2**-33 gives -3.13


def mix32_inverse(x: int) -> int:
    """The inverse of ``rng.mix32`` on one 32-bit word."""
    x ^= x >> 16
    x = (x * pow(0x846CA68B, -1, 1 << 32)) & M32
    x ^= (x >> 15) ^ (x >> 30)
    x = (x * pow(0x7FEB352D, -1, 1 << 32)) & M32
    return x ^ (x >> 16)


def counter_for(key: int, bits: int) -> int:
    """The counter in ``[0, 2**32)`` whose hash under ``key`` is ``bits``."""
    return ((mix32_inverse(bits) ^ key) * pow(rng._COUNTER_MUL, -1, 1 << 32)) & M32


def step_for(seed: int, stream: int, row: int, counter: int, bits: int) -> int:
    """The step in ``[0, 2**32)`` whose key for ``(seed, stream, row)`` hashes ``counter`` to ``bits``."""
    key = mix32_inverse(bits) ^ ((counter * rng._COUNTER_MUL) & M32)
    return mix32_inverse(mix32_inverse(key) ^ row) ^ rng.stream_base(seed, stream)


def uniform_at(key: int, counter: int) -> float:
    return float(rng.uniform(torch.tensor([key]), torch.tensor([counter])))


def test_known_answers():
    """The values tests/cpp/test_core.cpp checks in C++ (bit-identical backends)."""
    k = int(rng.row_key(0, 0, rng.STREAM_RESAMPLE, torch.tensor([0])))
    assert k == 0xB7446A20
    assert [uniform_at(k, c) for c in (0, 1, 1000)] == [float.fromhex(h) for h in
                                                      ("0x1.c2840ffcp-3", "0x1.b31d613dp-1", "0x1.eec5fad8p-4")]
    k = int(rng.row_key((1 << 40) + 5, (1 << 33) + 1, rng.STREAM_TOKEN, torch.tensor([99])))
    assert k == 0xDC945191
    assert uniform_at(k, 1000) == float.fromhex("0x1.eb576b5p-5")


def test_inverse_helpers(gen):
    words = torch.randint(0, 1 << 32, (200,), generator=gen).tolist()
    assert all(mix32_inverse(rng.mix32(w)) == w for w in words)
    key, bits = words[0], words[1]
    assert int(rng.mix32(key ^ ((counter_for(key, bits) * rng._COUNTER_MUL) & M32))) == bits
    seed, row = words[2], 5
    step = step_for(seed, rng.STREAM_TOKEN, row, 7, bits)
    k = int(rng.row_key(seed, step, rng.STREAM_TOKEN, torch.tensor([row])))
    assert int(rng.mix32(k ^ ((7 * rng._COUNTER_MUL) & M32))) == bits


@pytest.mark.parametrize("bits", [0, 1, 255, 1 << 24, (1 << 31) + 77, M32 - 1, M32])
def test_uniform_has_32_bit_resolution(gen, bits):
    key = int(torch.randint(0, 1 << 32, (1,), generator=gen))
    assert uniform_at(key, counter_for(key, bits)) == (bits + 0.5) * 2.0 ** -32


def test_gumbel_reach(gen):
    key = int(torch.randint(0, 1 << 32, (1,), generator=gen))
    counters = torch.tensor([counter_for(key, 0), counter_for(key, M32)])
    g = rng.gumbel(torch.tensor([key]), counters)
    torch.testing.assert_close(g, torch.tensor([G_BOTTOM, G_TOP], dtype=torch.float64), rtol=0, atol=1e-9)


@triton.jit
def _noise_kernel(counter_ptr, key_base, step_ptr, row, g_ptr, u_ptr, n, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    mask = offs < n
    counter = tl.load(counter_ptr + offs, mask=mask, other=0)
    key = _common.row_key(key_base, step_ptr, tl.full((), row, tl.int64))
    tl.store(g_ptr + offs, _common.gumbel_f32(key, counter), mask=mask)
    tl.store(u_ptr + offs, _common.uniform_f64(key, counter), mask=mask)


def _triton_devices():
    devices = ["cpu"] if INTERPRETED else []
    if torch.cuda.is_available() and not INTERPRETED:
        devices.append(pytest.param("cuda", marks=pytest.mark.gpu))
    return devices


@pytest.mark.parametrize("device", _triton_devices())
def test_triton_noise_matches_reference_at_the_extremes(gen, device):
    """``gumbel_f32`` within 4e-7 (CUDA's ``lg2.approx``: 1.5e-6) plus two fp32 ulps of ``g`` of the
    fp64 noise (the fp32 result itself rounds by half an ulp, 1e-6 at ``g >= 16``) and
    ``uniform_f64`` bit-identical, at the edges of both branches and at random words."""
    seed = int(torch.randint(0, 1 << 40, (1,), generator=gen))
    step, row = int(torch.randint(0, 1 << 32, (1,), generator=gen)), 3
    key = int(rng.row_key(seed, step, rng.STREAM_TOKEN, torch.tensor([row])))
    edges = [0, 1, 2, (1 << 24) - 1, 1 << 24, (1 << 31) - 1, 1 << 31, (1 << 31) + 1, M32 - (1 << 24), M32 - 2,
             M32 - 1, M32]
    words = edges + torch.randint(0, 1 << 32, (500,), generator=gen).tolist()
    counters = torch.tensor([counter_for(key, w) for w in words], dtype=torch.int64)
    n = counters.numel()
    g = torch.full((n,), float("nan"), dtype=torch.float32, device=device)
    u = torch.full((n,), float("nan"), dtype=torch.float64, device=device)
    step_t = torch.tensor([step], dtype=torch.int64, device=device)
    _noise_kernel[(1,)](counters.to(device), _common.host_key_base(rng.fold_seed(seed), rng.STREAM_TOKEN), step_t,
                        row, g, u, n, BLOCK=triton.next_power_of_2(n))
    ref_u = (torch.tensor(words, dtype=torch.float64) + 0.5) * 2.0 ** -32
    assert torch.equal(u.cpu(), ref_u)
    ref_g = rng.gumbel(torch.tensor([key]), counters)
    assert torch.equal(ref_g, -torch.log(-torch.log(ref_u)))
    ulp = torch.nextafter(ref_g.float().abs(), torch.tensor(math.inf)).double() - ref_g.float().abs().double()
    err = (g.cpu().double() - ref_g).abs()
    base = 4e-7 if device == "cpu" else 1.5e-6  # CUDA's __logf: ~3.6e-7 absolute per log, two logs, 1/E >= 1.44
    assert bool((err <= base + 2 * ulp).all()), (float(err.max()), words[int((err - 2 * ulp).argmax())])
    # twist_sample skips the group noise of a group that cannot lead with this bound on it.
    from tsmc_kernels.triton.twist_sample import _GUMBEL_MAX
    assert float(g.max()) < _GUMBEL_MAX.value


def deep_token_row(gen, V, deep, margin, device="cpu"):
    """Logits ``[1, V]``: token 0 at logit 0, token ``deep`` ``22.87 - g_0 - margin`` nats lower with
    the largest noise there is (22.87: the step is chosen for it), every other entry ``-inf``. In token
    0's group the token noise decides; alone in a later group the group noise does (``g_0`` is then
    group 0's). Returns ``(logits, seed, step, the token the draw must give)``."""
    seed = int(torch.randint(0, 1 << 40, (1,), generator=gen))
    group = deep // rng.TOKEN_GROUP
    stream, counter = (rng.STREAM_TOKEN, deep) if group == 0 else (rng.STREAM_TOKEN_GROUP, group)
    step = step_for(seed, stream, 0, counter, M32)
    g0 = float(rng.gumbel(rng.row_key(seed, step, stream, torch.tensor([0])), torch.tensor([0])))
    logits = torch.full((1, V), -math.inf, device=device)
    logits[0, 0] = 0.0
    logits[0, deep] = -(G_TOP - g0 - margin)
    return logits, seed, step, (deep if margin > 0 else 0)


@pytest.mark.parametrize("deep", [1500, 19000])
@pytest.mark.parametrize("margin", [0.25, -0.25])
def test_deep_token_is_proposed_where_the_noise_reaches(gen, backend, deep, margin):
    """The deep token of :func:`deep_token_row` wins exactly when its gap is below 22.87 - g_0 (~20 to
    ~26 nats, beyond the reach of 24-bit noise), inside token 0's group and in a group of its own."""
    logits, seed, step, expect = deep_token_row(gen, 20000, deep, margin)
    assert int(ops.twist_sample(logits, None, seed=seed, step=step).token[0]) == expect, backend


@requires_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("deep", [1500, (1 << 17) - 5])
@pytest.mark.parametrize("margin", [0.25, -0.25])
def test_deep_token_is_proposed_on_cuda(gen, cuda_device, deep, margin):
    logits, seed, step, expect = deep_token_row(gen, 1 << 17, deep, margin, cuda_device)
    assert int(ops.twist_sample(logits, None, seed=seed, step=step).token[0]) == expect
