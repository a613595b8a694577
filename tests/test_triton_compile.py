"""The Triton kernels compile for an H100 (sm_90) even on a machine without a GPU, and pass the
check that Triton makes at every compiled launch.

CPU CI runs the kernels in the interpreter, which accepts code the compiler would reject; this
test compiles a representative set of variants ahead of time for ``cuda:90`` (LLVM + the bundled
``ptxas``, no driver needed) in a subprocess without ``TRITON_INTERPRET``. Skipped when Triton's
NVIDIA backend or its ``ptxas`` is missing.
"""
import os
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent('''
    import math
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from tsmc_kernels import rng
    from tsmc_kernels.triton import kv_gather as kv, topk as tk, twist_sample as ts, weights as w

    target = GPUTarget("cuda", 90, 32)

    def compile_(fn, sig, consts, num_warps):
        names = list(sig)
        attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names)
                 if sig[n].startswith("*") or n.startswith("stride") or n == "V"}
        sig = dict(sig, **{k: "constexpr" for k in consts})
        k = triton.compile(ASTSource(fn, sig, consts, attrs), target=target, options={"num_warps": num_warps})
        assert "ld.global" in k.asm["ptx"]
        print("compiled", fn.__name__, consts)
        return k

    out = {"token_ptr": "*i64", "logp_ptr": "*fp32", "logq_ptr": "*fp32", "lzpi_ptr": "*fp32", "lpsi_ptr": "*fp32",
           "ent_ptr": "*fp32"}
    for dt, tw, temp, topk, split in [("*bf16", True, True, True, True), ("*fp32", False, False, False, False)]:
        sig = {"logits_ptr": dt, "stride_l": "i32", "twist_ptr": dt, "stride_t": "i32", "thr_ptr": "*fp32",
               "step_ptr": "*i64", "step_stride": "i32", "key_base": "i32", "group_key_base": "i32",
               "inv_temp": "fp32", "V": "i32", "tiles_per_split": "i32",
               "part_f_ptr": "*fp64", "part_i_ptr": "*i32", **out}
        for block in (1024, 256):  # a pair per group (the default), and four
            same_r = not (temp or topk)
            for stages in (1, 3):  # register prefetch (the default); Triton's software pipeline
                k = compile_(ts._twist_sample_kernel, sig, dict(
                    HAS_TWIST=tw, TEMPERED=temp, TOPK=topk, SAME_R=same_r, BASE_PAIRS=same_r and not tw, SPLIT=split,
                    BLOCK=block, TILES_PER_GROUP=rng.TOKEN_GROUP // block, STAGES=stages), 4)
                assert ("cp.async" in k.asm["ptx"]) == (stages > 1), "the tiles are not streamed by cp.async"
    sig = {"logits_ptr": "*fp16", "stride_l": "i32", "twist_ptr": "*fp16", "stride_t": "i32", "thr_ptr": "*fp32",
           "step_ptr": "*i64", "step_stride": "i32", "key_base": "i32", "inv_temp": "fp32", "V": "i32",
           "nsplit": "i32", "part_f_ptr": "*fp64", "part_i_ptr": "*i32", **out}
    compile_(ts._twist_combine_kernel, sig, dict(HAS_TWIST=True, TEMPERED=True, TOPK=True, BLOCK_S=64, BLOCK=1024,
             TILES_PER_GROUP=rng.TOKEN_GROUP // 1024), 8)
    sig = {"lw_ptr": "*fp32", "stride_lw": "i32", "inc_ptr": "*fp32", "stride_inc": "i32", "mask_ptr": "*i1",
           "step_ptr": "*i64", "key_base": "i32", "ess_thr_n": "fp32", "N": "i32", "out_w_ptr": "*fp32",
           "ess_ptr": "*fp32", "lz_ptr": "*fp32", "flag_ptr": "*i1", "anc_ptr": "*i64", "pos_ptr": "*fp64",
           "cw_ptr": "*fp64", "ext_ptr": "*i32"}
    for mode, scheme, block in [(2, 2, 128), (1, 1, 4096)]:
        compile_(w._weights_kernel, sig, dict(MODE=mode, HAS_INC=mode == 2, ALWAYS=False, SCHEME=scheme, BLOCK=block,
                 LOG=int(math.log2(block)) + 1), 4)
    for dt, p, tw in [("*bf16", 0, True), ("*bf16", 1, False), ("*fp32", 3, True)]:
        sig = {"logits_ptr": dt, "stride_l": "i32", "twist_ptr": dt, "stride_t": "i32", "V": "i32", "k": "i32",
               "tiles_per_split": "i32", "hist_in": "*i32", "hist_out": "*i32", "state_in": "*i64",
               "state_out": "*i64"}
        compile_(tk._radix_pass_kernel, sig, dict(PASS=p, HAS_TWIST=tw, BLOCK=2048), 4)
    for passes in (2, 4):
        sig = {"k": "i32", "nsplit": "i32", "hist_in": "*i32", "state_in": "*i64", "thr_ptr": "*fp32"}
        compile_(tk._radix_finish_kernel, sig, dict(PASSES=passes), 1)
    compile_(kv._kv_gather_kernel, {"anc_ptr": "*i64", "table_ptr": "*i64", "M": "i64"}, dict(BLOCK=1024), 4)
    print("ALL OK")
''')


def _nvidia_backend_available() -> bool:
    try:
        import triton.backends as tb
        from triton.backends.nvidia import compiler as nv  # noqa: F401
    except Exception:  # noqa: BLE001
        return False
    ptxas = os.path.join(os.path.dirname(tb.__file__), "nvidia", "bin", "ptxas")
    return os.path.exists(ptxas) or bool(os.environ.get("TRITON_PTXAS_PATH"))


@pytest.mark.slow
@pytest.mark.skipif(not _nvidia_backend_available(), reason="Triton's NVIDIA backend / ptxas is not installed")
def test_kernels_compile_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    res = subprocess.run([sys.executable, "-c", SCRIPT], env=env, cwd=root, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0 and "ALL OK" in res.stdout, res.stdout[-3000:] + res.stderr[-6000:]


GLOBALS_SCRIPT = textwrap.dedent('''
    from triton.runtime.jit import JITFunction
    from tsmc_kernels.triton import _common, kv_gather, topk, twist_sample, weights

    bad, n = [], 0
    for mod in (_common, kv_gather, topk, twist_sample, weights):
        for name, fn in vars(mod).items():
            if isinstance(fn, JITFunction):
                fn.cache_key  # Triton's dependency finder: fills used_global_vals, as the first launch does
                n += 1
                for (g, _), (val, globs) in fn.used_global_vals.items():
                    if globs.get(g) != val:  # the comparison JITFunction.run makes before every launch
                        bad.append(f"{mod.__name__}.{name}: global {g} = {val!r}")
    assert n >= 10, n
    print("BAD" if bad else "ALL OK", bad)
''')


def test_globals_pass_the_launch_check():
    """Compiled (not interpreted) Triton compares every global a kernel uses with the value it was
    compiled with before each launch; a global that is not equal to itself (``tl.constexpr(nan)``)
    makes every launch raise "Global variable ... has changed". The interpreter skips this check,
    so CPU CI would never see it: this runs Triton's own dependency finder without the interpreter."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    res = subprocess.run([sys.executable, "-c", GLOBALS_SCRIPT], env=env, cwd=root, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0 and "ALL OK" in res.stdout, res.stdout[-3000:] + res.stderr[-3000:]
