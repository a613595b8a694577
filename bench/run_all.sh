#!/usr/bin/env bash
# Run every microbenchmark in bench/ and write bench/results/<device>.json
# (pytest-benchmark's JSON plus a "tsmc" block: device name, capability, torch / triton / CUDA
# versions, git commit). Extra arguments go to pytest, e.g. `bench/run_all.sh -k twist_sample`;
# BENCH_PATHS=bench/test_bench_kernels.py runs one file; BENCH_TAG=smc writes <device>-smc.json.
# On a machine without CUDA only the CPU benchmarks (test_bench_cpu.py) run; results go to cpu[-TAG].json.
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ -n "${PYTHON:-}" ]]; then PY="$PYTHON"; elif [[ -x .venv/bin/python ]]; then PY=.venv/bin/python; else PY=python3; fi

DEVICE=$("$PY" -c "import torch; print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'cpu')")
SAFE=$(printf '%s' "$DEVICE" | tr -c 'A-Za-z0-9._-' '_')
mkdir -p bench/results
OUT="bench/results/${SAFE}${BENCH_TAG:+-$BENCH_TAG}.json"
TMP="bench/results/.${SAFE}${BENCH_TAG:+-$BENCH_TAG}.partial.json"

set +e
"$PY" -m pytest -q -p no:cacheprovider ${BENCH_PATHS:-bench} --benchmark-json="$TMP" --benchmark-columns=min,median,max,rounds "$@"
STATUS=$?
set -e

if [[ ! -s "$TMP" ]]; then
  echo "no benchmark results (device: $DEVICE); nothing written" >&2
  exit "$STATUS"
fi

"$PY" - "$TMP" "$OUT" <<'PYEOF'
import json, subprocess, sys, datetime
import torch, triton
src, dst = sys.argv[1], sys.argv[2]
data = json.load(open(src))
meta = {
    "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
    "capability": ".".join(map(str, torch.cuda.get_device_capability(0))) if torch.cuda.is_available() else None,
    "torch": torch.__version__, "triton": triton.__version__, "cuda": torch.version.cuda,
    "written": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
}
try:
    meta["git_commit"] = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
except OSError:
    pass
try:
    from tsmc_kernels import ops
    meta["native_cuda_gather"] = ops.native_available(cuda=True)
except Exception as exc:  # noqa: BLE001
    meta["native_cuda_gather"] = f"unavailable: {exc}"
data["tsmc"] = meta
json.dump(data, open(dst, "w"), indent=1)
print(f"wrote {dst}")
rows = []
for b in data.get("benchmarks", []):
    e = b.get("extra_info", {})
    rows.append((b.get("group") or "", b["name"], e.get("device_us", ""), e.get("eager_us", ""),
                 e.get("achieved_GBps", ""), e.get("frac_of_nominal_bw", e.get("frac_of_3000GBps", "")),
                 e.get("speedup_vs_naive_eager", e.get("speedup_vs_index_select", ""))))
if rows:
    print(f"{'group':12} {'name':62} {'device_us':>10} {'eager_us':>10} {'GB/s':>8} {'frac':>6} {'speedup':>8}")
    for r in rows:
        print(f"{r[0]:12} {r[1][:62]:62} {r[2]!s:>10} {r[3]!s:>10} {r[4]!s:>8} {r[5]!s:>6} {r[6]!s:>8}")
PYEOF
rm -f "$TMP"
exit "$STATUS"
