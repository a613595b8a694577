"""Static instruction counts of the Triton ``twist_sample`` kernel for an H100 (``sm_90``), no GPU needed.

Compiles the kernel ahead of time (as ``tests/test_triton_compile.py`` does; needs Triton's NVIDIA
backend with its bundled ``ptxas`` / ``nvdisasm``) and reads the SASS of its main loop: the
instructions per vocabulary element on the loop's common path (the longest forward branch left
out: since 2026-12-05 the group noise of a group too light to take the lead, the common case on LM
rows, ~2 instructions per element; before, the token draw of a group that took the lead), and how
many are MUFU (``ex2`` / ``lg2`` / ``rcp``) ops. Divided into the SM's issue rate (4 warp instructions per cycle) this bounds the
loop's speed on compute before a GPU measures it. Run: ``python bench/sass_profile.py`` (a few seconds per variant); ``NUM_WARPS=8`` / ``STAGES=3``
profile other launch options, ``VERBOSE=1`` lists every opcode.
"""
import collections
import os
import re

os.environ.pop("TRITON_INTERPRET", None)  # compile for real: under the interpreter helpers are plain Python
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # the counts assume FMA fusion (Triton 3.10 turns it off)

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from tsmc_kernels import rng  # noqa: E402
from tsmc_kernels.triton import twist_sample as ts  # noqa: E402

BLOCK = 1024  # the kernel's GPU default tile
NUM_WARPS = int(os.environ.get("NUM_WARPS", "4"))  # its default warps at that tile (H200 sweep); 8 before
STAGES = int(os.environ.get("STAGES", "1"))  # num_stages: 1 = register prefetch (default), >= 2 = cp.async pipeline
OUTS = {"token_ptr": "*i64", "logp_ptr": "*fp32", "logq_ptr": "*fp32", "lzpi_ptr": "*fp32", "lpsi_ptr": "*fp32",
        "ent_ptr": "*fp32"}


def compile_sass(dtype: str, twist: bool) -> str:
    sig = {"logits_ptr": dtype, "stride_l": "i32", "twist_ptr": dtype, "stride_t": "i32", "thr_ptr": "*fp32",
           "step_ptr": "*i64", "step_stride": "i32", "key_base": "i32", "group_key_base": "i32", "inv_temp": "fp32",
           "V": "i32", "tiles_per_split": "i32", "part_f_ptr": "*fp64", "part_i_ptr": "*i32", **OUTS}
    consts = dict(HAS_TWIST=twist, TEMPERED=False, TOPK=False, SAME_R=True, BASE_PAIRS=not twist, SPLIT=False,
                  BLOCK=BLOCK, TILES_PER_GROUP=rng.TOKEN_GROUP // BLOCK, STAGES=STAGES)
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(sig)
             if sig[n].startswith("*") or n.startswith("stride") or n == "V"}
    sig = dict(sig, **{k: "constexpr" for k in consts})
    k = triton.compile(ASTSource(ts._twist_sample_kernel, sig, consts, attrs), target=GPUTarget("cuda", 90, 32),
                       options={"num_warps": NUM_WARPS})
    return k.asm["sass"]


def _rows(sass: str):
    """``(label or None, opcode or None, branch target or None)`` per SASS line."""
    rows = []
    for line in sass.splitlines():
        if "\t" not in line:
            rows.append((line.strip().rstrip(":"), None, None))
            continue
        toks = line.split("\t", 1)[1].split()
        toks = toks[1:] if toks and toks[0].startswith("@") else toks
        target = re.sub(r"[;,].*", "", toks[1]) if toks and toks[0].startswith("BRA") and len(toks) > 1 else None
        rows.append((None, toks[0] if toks else "?", target))
    return rows


def main_loop(sass: str) -> list[str]:
    """Opcodes of the vocabulary loop's common path: the outermost loop (the backward branch that
    spans the most lines) without the longest forward branch inside it, which jumps over the token
    draw of a group that takes the lead (a few groups per row)."""
    rows = _rows(sass)
    where = {label: i for i, (label, _, _) in enumerate(rows) if label}
    loops = [(where[t], i) for i, (_, _, t) in enumerate(rows) if t in where and where[t] < i]
    if not loops:
        raise RuntimeError("no backward branch found in the SASS")
    start, end = max(loops, key=lambda se: se[1] - se[0])
    skips = [(i, where[t]) for i, (_, _, t) in enumerate(rows[start:end], start)
             if t in where and i < where[t] <= end]
    body = set(range(start + 1, end + 1))
    if skips:
        i, j = max(skips, key=lambda ij: ij[1] - ij[0])
        body -= set(range(i + 1, j))
    return [rows[k][1] for k in sorted(body) if rows[k][1]]


def main():
    per_iter = 2 * BLOCK // (32 * NUM_WARPS)  # elements per thread per loop iteration (a tile pair)
    for dtype in ("*bf16", "*fp32"):
        for twist in (False, True):
            ops = main_loop(compile_sass(dtype, twist))
            kinds = collections.Counter(op.split(".")[0] for op in ops)
            print(f"{dtype[1:]:5s} twist={twist!s:5s}: {len(ops) / per_iter:5.1f} instructions / element, "
                  f"{kinds['MUFU'] / per_iter:.1f} MUFU; most common {kinds.most_common(6)}")
            if os.environ.get("VERBOSE"):
                print("   ", sorted(((n / per_iter, k) for k, n in kinds.items()), reverse=True))


if __name__ == "__main__":
    main()
