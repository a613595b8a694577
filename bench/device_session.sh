#!/usr/bin/env bash
# One call of the lent-GPU `run` tool per phase (each fits its 10-minute limit on the slow-host H100):
#
#   bench/device_session.sh tests     # install (builds the CUDA gather), GPU tests, all tests on CUDA
#   bench/device_session.sh kernels   # kernel microbenchmarks -> bench/results/<device>.json
#   bench/device_session.sh smc       # smc_generate throughput, N = 64, 256 new tokens (graph vs eager);
#                                     # SMC_FILTER="16] or 256]" for the other N in a second call
#   bench/device_session.sh power     # power_sample vs model.generate, batched problems
#
# Worth one extra call when time allows: TSMC_PACKED_GQA=0 bench/device_session.sh smc (or power)
# measures what the packed grouped-query decode attention (tsmc_kernels/sampler/attention.py) saves
# over HF's sdpa, which repeats K/V per query head whenever a mask is passed (transformers <= 5.17).
#
# Logs and result files are copied to $OUT (the tool brings them back); commit the JSON files
# under bench/results/. Phases after `tests` reuse the installed package while the machine is warm
# (they reinstall it otherwise). Never changes GPU settings.
set -uo pipefail
cd "$(dirname "$0")/.."
PHASE=${1:?usage: bench/device_session.sh tests|kernels|smc|power}
OUT=${OUT:-/tmp/tsmc_out}
mkdir -p "$OUT" bench/results
PY=${PYTHON:-python3}
log() { echo "== $* ($(date +%T))"; }

if ! "$PY" -c "import tsmc_kernels, sys; sys.exit(0 if tsmc_kernels.__file__.startswith('$PWD') else 1)" 2>/dev/null; then
  log install
  TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} "$PY" -m pip install -q --no-deps --no-build-isolation -e . \
    >"$OUT/install.log" 2>&1 || { tail -30 "$OUT/install.log"; exit 1; }
fi
"$PY" - <<'EOF' | tee "$OUT/versions.txt"
import torch, triton, transformers
from tsmc_kernels import ops
print(torch.cuda.get_device_name(0), torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__,
      "transformers", transformers.__version__, "native cuda gather", ops.native_available(cuda=True))
EOF

case "$PHASE" in
  tests)
    log "gpu tests"
    TRITON_INTERPRET=0 timeout 200 "$PY" -m pytest -q -p no:cacheprovider -m gpu tests -x -rs 2>&1 | tee "$OUT/gpu_tests.log" | tail -40
    log "all tests on the device"
    TRITON_INTERPRET=0 timeout 330 "$PY" -m pytest -q -p no:cacheprovider tests -rs 2>&1 | tee "$OUT/all_tests.log" | tail -25
    ;;
  kernels)
    log "kernel benchmarks"
    BENCH_PATHS=bench/test_bench_kernels.py timeout 560 bench/run_all.sh 2>&1 | tee "$OUT/kernels.log" | tail -80
    cp bench/results/*.json "$OUT/" 2>/dev/null
    ;;
  smc)
    log "smc benchmarks"
    BENCH_PATHS=bench/test_bench_smc.py BENCH_SMC_NEW_TOKENS=${BENCH_SMC_NEW_TOKENS:-256} timeout 560 bench/run_all.sh \
      -k "${SMC_FILTER:-64]}" 2>&1 | tee "$OUT/smc.log" | tail -40
    for f in bench/results/*.json; do cp "$f" "$OUT/smc-$(basename "$f")"; done
    ;;
  power)
    log "power benchmark"
    timeout 560 "$PY" bench/test_bench_power.py ${POWER_ARGS:---blocks 4 --block-size 64 --n-mcmc 4 --chains 1 8 --problems 8 --reference-blocks 1 --cuda-graph} \
      --json bench/results/power-h100.json 2>&1 | tee "$OUT/power.log" | tail -40
    cp bench/results/power-h100.json "$OUT/" 2>/dev/null
    ;;
  *) echo "unknown phase $PHASE" >&2; exit 2 ;;
esac
log done
