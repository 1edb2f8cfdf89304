#!/usr/bin/env bash
# One prepared GPU check for kernels/: the kernel tests on the real GPU (no simulator), then the GPU
# benchmarks, in under 6 minutes, everything written to one folder.
#
#     bash bench/gpu_check.sh            # from the repository root
#
# Needs python3 with numpy, numba (+ numba-cuda), cupy; torch and pytest are used when present.
# Nothing is installed and nothing is downloaded. Output: $OUT if set, else bench/gpu_results:
#   00_env.log  10_kernel_tests.log  20_benchmarks.log  summary.txt
# Each step has its own time limit; a failing step is recorded and the next one still runs.
set -u
cd "$(dirname "$0")/.."
RESULTS="${OUT:-bench/gpu_results}"
mkdir -p "$RESULTS"
export PYTHONPATH=.
export NUMBA_ENABLE_CUDASIM=0          # the real GPU: tests/conftest.py only defaults it to the simulator
unset CUPY_TF32                        # cuBLAS in true FP32, the fair baseline for CUDA-core kernels
SUMMARY="$RESULTS/summary.txt"
: > "$SUMMARY"
START=$(date +%s)

step() {  # step NAME SECONDS COMMAND...: run with a time limit, log to NAME.log, note the outcome
    local name=$1 limit=$2
    shift 2
    local t0=$(date +%s)
    echo "=== $name (limit ${limit}s): $*" > "$RESULTS/$name.log"
    timeout -k 10 "$limit" "$@" >> "$RESULTS/$name.log" 2>&1
    local rc=$?
    local outcome="ok"
    if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then outcome="TIMED OUT"; elif [ $rc -ne 0 ]; then outcome="FAILED (exit $rc)"; fi
    tail -n 60 "$RESULTS/$name.log"
    printf '%-18s %-20s %4ss\n' "$name" "$outcome" "$(( $(date +%s) - t0 ))" >> "$SUMMARY"
}

step 00_env 20 bash -c 'date -u; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv;
    python3 -c "import sys, numpy, numba, cupy; print(sys.version); print(\"numpy\", numpy.__version__,
    \"numba\", numba.__version__, \"cupy\", cupy.__version__)"; python3 -c "import torch; print(\"torch\", torch.__version__)";
    python3 -c "import pytest; print(\"pytest\", pytest.__version__)"; true'

if python3 -c "import pytest" 2>/dev/null; then
    # --noconftest: the conftest's only jobs are hypothesis profiles and the simulator default
    step 10_kernel_tests 110 python3 -m pytest -q -p no:cacheprovider --noconftest tests/test_kernels.py
else
    echo "pytest is not installed: skipping the kernel tests (kernels_gpu.py still checks the kernels" \
         "against cuBLAS and the unfused attention before timing)" | tee "$RESULTS/10_kernel_tests.log"
    printf '%-18s %-20s\n' 10_kernel_tests "SKIPPED (no pytest)" >> "$SUMMARY"
fi

step 20_benchmarks 220 python3 bench/kernels_gpu.py --budget 160

echo "=== summary ($(( $(date +%s) - START ))s total), logs in $RESULTS" | tee -a "$SUMMARY"
cat "$SUMMARY"
