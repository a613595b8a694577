"""In-place KV-cache / buffer gather by ancestors (SPEC §6.4): every tensor in ONE launch.

Design: a **pointer table**. For each tensor the wrapper records (base address, row stride in
bytes, row length) and splits each row into chunks of at most ``CHUNK`` bytes; the table has one
int64 record per (tensor, chunk): ``[base, stride_bytes, chunk_start_bytes, chunk_bytes,
word_bytes]``. The kernel's grid is ``(table records, row groups)``; program ``(w, g)`` walks the
rows ``i = g, g + G, ...``: it reads ``a[i]`` and skips the row when ``a[i] == i`` (an identity
moves nothing and costs one load per row and program), otherwise it copies its chunk of row
``a[i]`` over row ``i``, casting the integer address to a pointer of the widest
word (8/4/2/1 bytes) that divides the tensor's address, row stride and row length (so any dtype
works, rows are moved as raw bytes). About 64 programs per SM in all (``G`` = that over the
records, at most ``M``): enough to fill the GPU, few enough that an identity (nothing resampled)
launches few programs; one per (row, chunk) cost 140 µs for nothing at 256 x 2048 tokens (H200). By the permutation property rows that are read are never
written, so the copy is race-free in place. Nothing synchronises with the host.

The table is built on the host from shapes and addresses only and cached per tensor layout (a
static cache reuses one table for every step); on CUDA it is uploaded from pinned memory with a
non-blocking copy, so building it does not synchronise either. A table cannot be built while a
CUDA graph is being captured: the warm-up call before the capture builds it (a clear error
otherwise); a table used inside a capture is never evicted from the cache, since the captured
kernel reads it at every replay.

Each row must be one gap-free block of memory (contiguous rows, or a permuted layout of a dense
row, any stride between rows). A tensor whose rows have gaps (e.g. a slice along L) is handled
correctly but slowly by ``t.copy_(t.index_select(0, a))`` (moves every row, still no host sync).
"""
from __future__ import annotations

import math
import threading
from collections import OrderedDict
from typing import Sequence

import torch
import triton
import triton.language as tl

from .. import reference
from ._common import helper, num_sms

__all__ = ["kv_gather_triton_", "CHUNK_BYTES"]

CHUNK_BYTES = 65536
_MAX_GROUPS = 65535  # CUDA grid dimension y limit
_PROGRAMS_PER_SM = 64
_CACHE_SIZE = 64
_cache: "OrderedDict[tuple, tuple]" = OrderedDict()  # layout -> (device table, pinned host copy)
_pinned_keys: set = set()  # tables used inside a CUDA-graph capture
_lock = threading.Lock()


@helper
def _copy_words(dst, src, n, BLOCK: tl.constexpr):
    lanes = tl.arange(0, BLOCK)
    for off in range(0, n, BLOCK):
        o = off + lanes
        m = o < n
        tl.store(dst + o, tl.load(src + o, mask=m), mask=m)


@triton.jit
def _kv_gather_kernel(anc_ptr, table_ptr, M, BLOCK: tl.constexpr):
    w = tl.program_id(0)
    rec = table_ptr + w.to(tl.int64) * 5
    base = tl.load(rec)
    stride = tl.load(rec + 1)
    start = tl.load(rec + 2)
    nbytes = tl.load(rec + 3)
    ws = tl.load(rec + 4)
    for i in range(tl.program_id(1), M, tl.num_programs(1)):
        a = tl.load(anc_ptr + i)
        i64 = tl.full((), 0, tl.int64) + i
        # An out-of-range ancestor (possible only unvalidated) copies nothing rather than read past the rows.
        if (a != i64) & (a >= 0) & (a < M):
            dst = base + i64 * stride + start
            src = base + a * stride + start
            if ws == 8:
                _copy_words(dst.to(tl.pointer_type(tl.int64)), src.to(tl.pointer_type(tl.int64)), nbytes // 8, BLOCK)
            elif ws == 4:
                _copy_words(dst.to(tl.pointer_type(tl.int32)), src.to(tl.pointer_type(tl.int32)), nbytes // 4, BLOCK)
            elif ws == 2:
                _copy_words(dst.to(tl.pointer_type(tl.int16)), src.to(tl.pointer_type(tl.int16)), nbytes // 2, BLOCK)
            else:
                _copy_words(dst.to(tl.pointer_type(tl.int8)), src.to(tl.pointer_type(tl.int8)), nbytes, BLOCK)


def _word_bytes(*values: int) -> int:
    g = 0
    for v in values:
        g = math.gcd(g, int(v))
    for ws in (8, 4, 2):
        if g % ws == 0:
            return ws
    return 1


def _build_table(layout: tuple, device: torch.device):
    records = []
    chunk = CHUNK_BYTES
    for base, stride_b, row_b, ws in layout:
        for start in range(0, row_b, chunk):
            records.append((base, stride_b, start, min(chunk, row_b - start), ws))
    table = torch.tensor(records, dtype=torch.int64).reshape(-1, 5)
    if device.type == "cpu":
        return table, None
    host = table.pin_memory()
    # The pinned copy is kept with the entry: a CUDA graph captured around this upload re-reads it.
    return host.to(device, non_blocking=True), host


def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def _table_for(layout: tuple, device: torch.device) -> torch.Tensor:
    key = (device.type, device.index, layout)
    with _lock:
        hit = _cache.get(key)
        if hit is not None:
            _cache.move_to_end(key)
            if _capturing(device):
                _pinned_keys.add(key)  # a captured graph reads this table at every replay: never evict it
            return hit[0]
        if _capturing(device):
            raise RuntimeError(
                "kv_gather_triton_: no pointer table for these tensors yet, and building one needs a "
                "host-to-device copy, which cannot happen while a CUDA graph is being captured. Call it once "
                "with the same tensors before the capture (the usual warm-up run does this).")
        table, host = _build_table(layout, device)
        _cache[key] = (table, host)
        for old in [k for k in _cache if k not in _pinned_keys][:max(0, len(_cache) - _CACHE_SIZE)]:
            del _cache[old]
        return table


def clear_table_cache() -> None:
    """Forget every cached pointer table, also those that captured CUDA graphs still read: call it
    only when no such graph will be replayed again."""
    with _lock:
        _cache.clear()
        _pinned_keys.clear()


def kv_gather_triton_(tensors: Sequence[torch.Tensor], ancestors: torch.Tensor, *, block: int | None = None,
                      row_groups: int | None = None) -> None:
    """In place ``t[i] = t[a[i]]`` for every tensor and every row with ``a[i] != i``, one launch.

    Args:
        tensors: tensors with ``M`` rows along dim 0 on the ancestors' device (K/V caches
            ``[M, H, L, D]``, token / position / mask buffers), any dtype.
        ancestors: int64 ``[M]`` global row indices (or ``[B, N]`` within-prompt indices) with
            the permutation property of SPEC §2.
        block, row_groups: words per copy iteration (default 1024 on CUDA) and programs per
            record (default: about 64 programs per SM in all, at most ``M``).
    """
    a = reference.flat_ancestors(ancestors).to(torch.int64).contiguous()
    M = a.numel()
    dev = a.device
    layout = []
    for k, t in enumerate(tensors):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"tensors[{k}] must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() < 1 or t.shape[0] != M:
            raise ValueError(f"tensors[{k}] has shape {tuple(t.shape)}; dim 0 must equal the {M} rows of ancestors")
        if t.device != dev:
            raise ValueError(f"tensors[{k}] is on {t.device} but ancestors are on {dev}")
        if t.numel() == 0:
            continue
        if not reference.rows_dense(t):
            t.copy_(t.index_select(0, a))  # correct for any layout, moves every row
            continue
        es = t.element_size()
        row_b = (t.numel() // M) * es
        stride_b = t.stride(0) * es if M > 1 else row_b
        base = t.data_ptr()
        layout.append((base, stride_b, row_b, _word_bytes(base, stride_b, row_b)))
    if not layout or M == 0:
        return
    table = _table_for(tuple(layout), dev)
    if block is None:
        block = 1024 if dev.type == "cuda" else 4096
    records = table.shape[0]
    if row_groups is None:
        row_groups = max(1, _PROGRAMS_PER_SM * num_sms(dev) // records)
    row_groups = max(1, min(int(row_groups), M, _MAX_GROUPS))
    _kv_gather_kernel[(records, row_groups)](a, table, M, BLOCK=block, num_warps=4)
