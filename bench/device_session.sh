#!/usr/bin/env bash
# The GPU checks and benchmarks of the open issues (3, 4, 7), for the lent device (H100 or H200).
#
#   bench/device_session.sh            # = all: ONE `run` call for the whole lease; timeout_s=600
#   bench/device_session.sh tests      # install, GPU tests, then the whole suite on CUDA
#   bench/device_session.sh kernels    # kernel microbenchmarks (issue 3), the tile sweep included
#   bench/device_session.sh smc        # smc_generate throughput (issue 4): B x N = 1x64 and 8x64 (SMC_FILTER)
#   bench/device_session.sh power      # power_sample vs model.generate proposals (issue 7; POWER_ARGS)
#   bench/device_session.sh retry      # ~5 minutes: twist tests, SMC 1 x 64 (64 tokens), power, split-path kernels
#
# A lease is 15 minutes of device time with the machine's start (a minute or more) in it, so `all`
# runs every phase in one call under one clock of BUDGET_S seconds (default 540), what no GPU has
# measured yet first (2026-12-05): install (builds the CUDA gather), the GPU tests of the kernels
# changed since the H200 run (top-k radix select, pipelined twist_sample, row-group KV gather),
# their benchmarks (num_stages sweep, top-50, KV gather incl. identity), SMC at N = 16 / 256 and
# B = 8 (64 new tokens), the compiled decode (compile_decode=True) at 1 x 64; then, with the time
# left, the other GPU tests, the kernel grid, SMC at 1 x 64 with 128 tokens, the kernel tile
# sweep, power MH and the whole suite on CUDA. Each phase has a cap and is skipped when the clock
# cannot fit its minimum; a phase that fails or times out does not stop the next.
#
# Under $OUT (what the tool brings back; at most 8 files): session.log (all output), summary.txt
# (versions, then one line per phase: rc and seconds), results.jsonl (one line per benchmark, written
# as each ends, so a phase cut short keeps what it measured) and results.tgz (bench/results/*.json:
# <device>-kernels.json, <device>-smc.json, <device>-power.json, ...; commit them and fill the README
# tables). Never changes GPU settings.
set -uo pipefail
cd "$(dirname "$0")/.."
PHASE=${1:-all}
OUT=${OUT:-/tmp/tsmc_out}
mkdir -p "$OUT" bench/results
PY=${PYTHON:-python3}
BUDGET_S=${BUDGET_S:-$([[ $PHASE == all ]] && echo 540 || echo 570)}
T0=$(date +%s)
SUMMARY="$OUT/summary.txt"
export PY PYTHON=$PY OUT PYTHONUNBUFFERED=1 TRITON_INTERPRET=0 BENCH_JSONL="$OUT/results.jsonl"
: >"$SUMMARY"

log() { echo "== $* (+$(( $(date +%s) - T0 )) s)"; }

# phase NAME CAP MIN 'COMMAND': run the shell COMMAND (it sees the functions exported below) under
# `timeout min(CAP, seconds left)`; skipped when fewer than MIN seconds are left.
phase() {
  local name=$1 cap=$2 min=$3 cmd=$4 left t rc
  left=$(( BUDGET_S - ($(date +%s) - T0) ))
  (( left < cap )) && cap=$left
  if (( cap < min )); then
    log "skip $name ($left s left, needs $min)"; echo "$name skipped ($left s left)" >>"$SUMMARY"; return 0
  fi
  log "$name (at most $cap s)"
  t=$(date +%s)
  timeout "$cap" bash -o pipefail -c "$cmd"
  rc=$?
  echo "$name rc=$rc $(( $(date +%s) - t )) s$( ((rc == 124)) && echo ' (timed out)')" >>"$SUMMARY"
  tar czf "$OUT/results.tgz" bench/results/*.json 2>/dev/null
  return 0
}

install() {
  # Checked from / : from the repo root `import tsmc_kernels` would find the checkout whether or not
  # it is installed, and the built extension (git-ignored) never travels with the tree.
  if (cd / && "$PY" -c "import sys, tsmc_kernels, tsmc_kernels.ops as o
sys.exit(not (tsmc_kernels.__file__.startswith('$PWD') and o.native_available(cuda=True)))") 2>/dev/null; then
    echo "already installed from $PWD, with the CUDA extension"
  else
    # setup.py builds the CUDA gather only where it finds nvcc (PATH or CUDA_HOME).
    CUDA_HOME=${CUDA_HOME:-/usr/local/cuda} PIP_BREAK_SYSTEM_PACKAGES=1 \
      TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-8} \
      "$PY" -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | tail -30
  fi
  "$PY" - <<'EOF' | tee -a "$OUT/summary.txt"
import torch, triton, transformers
from tsmc_kernels import ops
print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA device", "torch", torch.__version__, "cuda", torch.version.cuda, "triton",
      triton.__version__, "transformers", transformers.__version__, "native cuda gather", ops.native_available(cuda=True))
EOF
}

# The kernels' tests first (issue 3), then the samplers' (pytest sorts the files of one run, so two
# runs); -v names each test as it ends, so a run cut short by its cap still says what passed.
KERNEL_TESTS="tests/test_triton_twist_sample.py tests/test_triton_kv_gather.py tests/test_native.py tests/test_rng.py
  tests/test_ops_twist_sample.py tests/test_ops_kv_gather.py tests/test_custom_ops.py tests/test_triton_weights.py"
gpu_tests() {
  local rc=0 f ignore=()
  for f in $KERNEL_TESTS; do ignore+=("--ignore=$f"); done
  # shellcheck disable=SC2086
  "$PY" -m pytest -v -p no:cacheprovider -m gpu $KERNEL_TESTS -rs || rc=$?
  "$PY" -m pytest -v -p no:cacheprovider -m gpu tests "${ignore[@]}" -rs || rc=$?
  return $rc
}
all_tests() { "$PY" -m pytest -q -p no:cacheprovider tests -rs; }

# bench TAG FILE PYTEST-ARGS...: bench/run_all.sh on FILE, results to bench/results/<device>-TAG.json
bench() { local tag=$1 file=$2; shift 2; BENCH_TAG=$tag BENCH_PATHS=$file bench/run_all.sh "$@"; }
kernels() { bench "${KTAG:-kernels}" bench/test_bench_kernels.py "$@"; }
smc() { BENCH_SMC_NEW_TOKENS=${BENCH_SMC_NEW_TOKENS:-128} bench "${STAG:-smc}" bench/test_bench_smc.py "$@"; }

power() {
  local dev
  dev=$("$PY" -c "import torch; print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'cpu')")
  dev=$(printf '%s' "$dev" | tr -c 'A-Za-z0-9._-' '_')  # the name run_all.sh gives the other results
  # shellcheck disable=SC2086
  "$PY" bench/test_bench_power.py ${POWER_ARGS:---blocks 2 --block-size 64 --n-mcmc 2 --chains 1 8 --problems 4 \
    --reference-blocks 1 --cuda-graph} --json "bench/results/$dev-power.json"
}

export KERNEL_TESTS
export -f install gpu_tests all_tests bench kernels smc power

run_phase() {
  case "$1" in
    all)
      phase install 240 30 install
      phase gpu-tests-new 120 20 '"$PY" -m pytest -v -p no:cacheprovider -m gpu tests/test_triton_topk.py tests/test_triton_twist_sample.py tests/test_triton_kv_gather.py tests/test_ops_kv_gather.py -rs'
      phase kernels-new 110 30 'KTAG=kernels-new kernels -k "stages or top50 or test_kv_gather"'
      phase smc-n-b 200 60 'STAG=smc-n16-n256-b8 BENCH_SMC_NEW_TOKENS=64 smc -k "(1-16] or 1-256] or 8-16] or 8-64]) and not compiled and not naive"'
      phase smc-compiled 130 80 'STAG=smc-compiled smc -k "1-64] and compiled"'
      phase gpu-tests 150 30 gpu_tests
      phase kernels 150 40 'kernels -k "not configs and not stages"'
      phase smc-1x64 200 60 'smc -k "1-64] and not compiled"'
      phase kernel-tuning 90 40 'KTAG=kernel-tuning kernels -k configs'
      phase power 140 60 power
      phase smc-unpacked-gqa 60 40 'TSMC_PACKED_GQA=0 STAG=smc-unpacked-gqa smc -k "1-64] and graph and not twisted and not compiled"'
      phase all-tests 330 120 all_tests
      ;;
    retry)  # a short second lease after a fix: the fixed path's tests, then what the fix unblocked
      phase install 120 30 install
      phase gpu-tests-twist 60 20 '"$PY" -m pytest -v -p no:cacheprovider -m gpu -x tests/test_triton_twist_sample.py tests/test_rng.py tests/test_ops_twist_sample.py -rs'
      phase smc-1x64 150 60 'BENCH_SMC_NEW_TOKENS=64 smc -k "1-64] and not compiled"'
      phase power 90 40 power
      phase kernels-split 45 20 'KTAG=kernels-split kernels -k "(test_twist_sample and triton and not 1024 and not lm_logits and not top50) or (reweight and triton)"'
      ;;
    tests) phase install 240 30 install; phase gpu-tests 200 30 gpu_tests; phase all-tests 330 60 all_tests ;;
    kernels) phase install 240 30 install; phase kernels 560 30 kernels ;;
    smc) phase install 240 30 install; phase smc 560 30 "smc -k \"${SMC_FILTER:-64]}\"" ;;
    power) phase install 240 30 install; phase power 560 30 power ;;
    *) echo "unknown phase $1 (all|retry|tests|kernels|smc|power)" >&2; return 2 ;;
  esac
}

run_phase "$PHASE" 2>&1 | tee "$OUT/session.log"
log done
echo "---- summary"
cat "$SUMMARY"
