#!/usr/bin/env bash
# The prepared device check of issue 17 (FP8 experts), one run: the GPU tests at real sizes, the FP8-experts
# training curve of the debug flavour against bf16, and bench_kernels.py's table. Everything lands in $OUT
# (on the device machine the tool sets it; here benchmarks/out/gpu_check). Each part has its own time
# limit so the whole stays near 7 minutes and a rerun fits the device lease; a failing part does not stop
# the others, the exit status is the number of failed parts.
#
#   bash benchmarks/gpu_check.sh            # device machine, repository root (python3 with torch + triton)
#   bash benchmarks/gpu_check.sh --dry-run  # CPU: every part on tiny shapes, so it cannot fail for a silly reason
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/out/gpu_check}
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src:$PWD/protos/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY=${PY:-python3}
DRY=0
if [ "${1:-}" = "--dry-run" ]; then
  DRY=1
  PY=${PY_DRY:-.venv/bin/python}
fi
failed=0

part() {  # part NAME LIMIT_S COMMAND...: run, log to $OUT/NAME.log, report
  local name=$1 limit=$2
  shift 2
  local start=$SECONDS
  timeout --signal=KILL "$limit" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  echo "== $name: exit $rc after $((SECONDS - start)) s (log $OUT/$name.log)"
  if [ $rc -ne 0 ]; then
    failed=$((failed + 1))
    tail -n 25 "$OUT/$name.log"
  fi
}

if [ $DRY -eq 1 ]; then
  part tests 300 "$PY" -m pytest -q -x tests/kernels/test_moe_train.py tests/kernels/test_gemm.py -k "fp8_linear or e4m3 or moe_train or fp8_experts or grouped"
  part curve 300 "$PY" benchmarks/fp8_training_curve.py --dry-run --out "$OUT/fp8_training_curve.json"
  part bench 300 "$PY" benchmarks/bench_kernels.py --dry-run --out "$OUT/bench_kernels.json"
else
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm --format=csv >"$OUT/device.txt" 2>&1
  "$PY" -c "import torch, triton; print(torch.__version__, triton.__version__, torch.cuda.get_device_name())" >>"$OUT/device.txt" 2>&1
  # compiled kernels on the same tests as CI (real-size gpu tests included), FP8 model tests
  part tests 150 "$PY" -m pytest -q -p no:cacheprovider tests/kernels tests/model/test_fp8_training.py tests/model/test_fp8_linear.py -s
  part curve 170 "$PY" benchmarks/fp8_training_curve.py --steps 250 --out "$OUT/fp8_training_curve.json"
  part bench 170 "$PY" benchmarks/bench_kernels.py --repeats 3 --out "$OUT/bench_kernels.json"
fi
echo "gpu_check: $failed part(s) failed; files in $OUT"
grep -h -A12 "^ *steps |" "$OUT/curve.log" 2>/dev/null | head -n 14
grep -h -E "^(moe|gemm M=(64|128) )|^ {40,}" "$OUT/bench.log" 2>/dev/null | tail -n 40
exit $failed
