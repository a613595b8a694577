"""Static instruction counts of the Triton ``twist_sample`` kernel for an H100 (``sm_90``), no GPU needed.

Compiles the kernel ahead of time (as ``tests/test_triton_compile.py`` does; needs Triton's NVIDIA
backend with its bundled ``ptxas`` / ``nvdisasm``) and reads the SASS of its main loop: the
instructions per vocabulary element, and how many are MUFU (``ex2`` / ``lg2`` / ``rcp``) ops. With
noise drawn for (almost) every tile, as on real LM logits, the loop is bound by instruction issue
(4 warp instructions per SM per cycle), so this count predicts its speed on compute before a GPU
measures it. Run: ``python bench/sass_profile.py`` (a few seconds per variant).
"""
import collections
import os
import re

os.environ.pop("TRITON_INTERPRET", None)  # compile for real: under the interpreter helpers are plain Python
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # the counts assume FMA fusion (Triton 3.10 turns it off)

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from tsmc_kernels.triton import twist_sample as ts  # noqa: E402

BLOCK, NUM_WARPS = 1024, 8  # the kernel's GPU defaults
OUTS = {"token_ptr": "*i64", "logp_ptr": "*fp32", "logq_ptr": "*fp32", "lzpi_ptr": "*fp32", "lpsi_ptr": "*fp32",
        "ent_ptr": "*fp32"}


def compile_sass(dtype: str, twist: bool) -> str:
    sig = {"logits_ptr": dtype, "stride_l": "i32", "twist_ptr": dtype, "stride_t": "i32", "thr_ptr": "*fp32",
           "step_ptr": "*i64", "step_stride": "i32", "key_base": "i32", "inv_temp": "fp32", "V": "i32",
           "tiles_per_split": "i32", "part_f_ptr": "*fp64", "part_i_ptr": "*i32", **OUTS}
    consts = dict(HAS_TWIST=twist, TEMPERED=False, TOPK=False, SAME_R=True, SPLIT=False, BLOCK=BLOCK)
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(sig)
             if sig[n].startswith("*") or n.startswith("stride") or n == "V"}
    sig = dict(sig, **{k: "constexpr" for k in consts})
    k = triton.compile(ASTSource(ts._twist_sample_kernel, sig, consts, attrs), target=GPUTarget("cuda", 90, 32),
                       options={"num_warps": NUM_WARPS})
    return k.asm["sass"]


def main_loop(sass: str) -> list[str]:
    """Opcodes from the first label that a later branch jumps back to, up to that branch."""
    rows = []  # (label or None, opcode, branch target or None)
    for line in sass.splitlines():
        if "\t" not in line:
            rows.append((line.strip().rstrip(":"), None, None))
            continue
        toks = line.split("\t", 1)[1].split()
        toks = toks[1:] if toks and toks[0].startswith("@") else toks
        target = re.sub(r"[;,].*", "", toks[1]) if toks and toks[0].startswith("BRA") and len(toks) > 1 else None
        rows.append((None, toks[0] if toks else "?", target))
    seen = {}
    for i, (label, _, target) in enumerate(rows):
        if label:
            seen[label] = i
        elif target in seen:
            return [op for _, op, _ in rows[seen[target] + 1:i + 1] if op]
    raise RuntimeError("no backward branch found in the SASS")


def main():
    per_iter = 2 * BLOCK // (32 * NUM_WARPS)  # elements per thread per loop iteration (a tile pair)
    for dtype in ("*bf16", "*fp32"):
        for twist in (False, True):
            ops = main_loop(compile_sass(dtype, twist))
            kinds = collections.Counter(op.split(".")[0] for op in ops)
            print(f"{dtype[1:]:5s} twist={twist!s:5s}: {len(ops) / per_iter:5.1f} instructions / element, "
                  f"{kinds['MUFU'] / per_iter:.1f} MUFU; most common {kinds.most_common(6)}")


if __name__ == "__main__":
    main()
