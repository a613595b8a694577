"""Counter-based random numbers shared by every backend.

Every kernel that draws randomness (token sampling, resampling) derives it from a pure
function of ``(seed, step, stream, row, counter)``, never from global generator state. The
same arithmetic is written in PyTorch (here, the oracle), Triton (``triton/*.py``), C++
(``csrc/rng.h``) and CUDA, so all backends draw *identical* numbers and tests can compare
them exactly. Results therefore do not depend on how a kernel splits its work (tiles, programs,
backend, which other rows share the launch), but they do depend on ``row``: in the samplers a
prompt's rows follow from its index in the batch (``b * N + n``), so the same prompt at another
index draws other numbers (at index 0 it matches a run of it alone). A kernel that reads
``step`` from a device tensor can be captured once in a CUDA graph and replayed.

The hash is Chris Wellons' ``lowbias32`` on 32-bit words::

    mix32(x):  x ^= x >> 16; x *= 0x7FEB352D; x ^= x >> 15; x *= 0x846CA68B; x ^= x >> 16
    key   = mix32(mix32(mix32(seed32 ^ (stream * 0x9E3779B9)) ^ step32) ^ row32)
    bits  = mix32(key ^ (counter * 0x85EBCA6B))
    u     = (bits + 0.5) / 2**32                   # in [2**-33, 1 - 2**-33], exact in fp64 (compute
                                                   # it in fp64: in fp32 the top values round to 1.0)

with ``seed32 = (seed ^ (seed >> 32)) mod 2**32`` and ``step32``/``row32`` taken mod 2**32.

All 32 bits are used because the Gumbel-max sampler's accuracy rests on the uniform's tails: the
noise ``-log(-log u)`` lies in ``[-log(33 log 2), 33 log 2] = [-3.13, 22.87]``, so a token about 26
nats below the best of its group (a group 26 nats below the best group) can never be proposed, and
ones a little closer are proposed slightly too rarely. With 24-bit uniforms that reach was ~20 nats,
which over V = 262144 candidates moved up to 1.8e-3 of the proposal's mass per step; with 32 bits
at most ~7e-6, and the two-level draw compares only 2048 tokens (or at most 128 groups) at a time
(README, "Kernel API").
"""
from __future__ import annotations

import torch

MASK32 = 0xFFFFFFFF
STREAM_TOKEN = 1  # Gumbel noise for token sampling: row = particle row, counter = vocab id
STREAM_RESAMPLE = 2  # resampling uniforms: row = prompt index, counter = draw index
STREAM_TOKEN_GROUP = 3  # Gumbel noise for the vocabulary group: row = particle row, counter = group index
# Token sampling is a two-level Gumbel-max (reference.gumbel_max): first a group of TOKEN_GROUP
# consecutive vocabulary ids, then a token inside it. Part of the contract: every backend uses it.
TOKEN_GROUP = 2048

_GOLDEN = 0x9E3779B9
_COUNTER_MUL = 0x85EBCA6B


def fold_seed(seed: int) -> int:
    """Fold a non-negative Python int seed into 32 bits."""
    if seed < 0:
        raise ValueError(f"seed must be non-negative, got {seed}")
    return (seed ^ (seed >> 32)) & MASK32


def mix32(x):
    """lowbias32 on an int64 tensor (or a Python int) holding values in [0, 2**32)."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & MASK32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & MASK32
    return x ^ (x >> 16)


def stream_base(seed: int, stream: int) -> int:
    """The host-known part of every key of ``(seed, stream)``: ``mix32(seed32 ^ (stream * 0x9E3779B9))``."""
    return mix32(fold_seed(seed) ^ ((stream * _GOLDEN) & MASK32))


def row_key(seed: int, step, stream: int, row: torch.Tensor) -> torch.Tensor:
    """Per-row key. ``step`` is an int or an int64 tensor broadcastable to ``row``.

    The host-known parts are mixed as Python ints (``mix32`` works on both), so no tensor is made
    from host data: a CUDA graph can capture this (a host-to-device copy cannot be captured).
    """
    return keyed_row(stream_base(seed, stream), step, row)


def keyed_row(base, step, row: torch.Tensor) -> torch.Tensor:
    """:func:`row_key` from its :func:`stream_base` ``base`` (an int, or an int64 tensor broadcastable
    against ``step`` and ``row``: several streams at once)."""
    row = row.to(torch.int64) & MASK32
    if isinstance(step, int) and isinstance(base, int):
        k = mix32(base ^ (step & MASK32))
    else:  # a tensor (used in place when already on row's device) or a sequence of steps
        k = mix32((torch.as_tensor(step, dtype=torch.int64, device=row.device) & MASK32) ^ base)
    return mix32(k ^ row)


def uniform(key: torch.Tensor, counter: torch.Tensor, dtype=torch.float64) -> torch.Tensor:
    """Uniform in (0, 1) for every (key, counter) pair (broadcast): ``(bits + 0.5) / 2**32``, exact in
    fp64 (in fp32 values above ``1 - 2**-25`` round to 1.0)."""
    bits = mix32(key ^ ((counter.to(torch.int64) * _COUNTER_MUL) & MASK32))
    return (bits.to(dtype) + 0.5) * (2.0 ** -32)


def gumbel(key: torch.Tensor, counter: torch.Tensor, dtype=torch.float64) -> torch.Tensor:
    """Standard Gumbel noise ``-log(-log(u))`` for every (key, counter) pair."""
    return -torch.log(-torch.log(uniform(key, counter, dtype)))
