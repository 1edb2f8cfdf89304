#!/usr/bin/env bash
# One prepared check of kernels/ on a lent GPU, within a time budget, results under $OUT:
#
#     bash bench/gpu_check.sh [--budget SECONDS] [--smoke]      # from anywhere; default budget 400 s
#
# 1. Carried wheels: if .whl/ holds wheels (e.g. numpy 2.4, because numba-cuda 0.30 cannot compile
#    with numpy 2.5), install them into /tmp/site (no network) and put it first on PYTHONPATH.
# 2. bench/kernels_gpu.py runs the sections of bench/gpu_sections.py, each in its own subprocess with
#    its own deadline: env, baselines (cuBLAS, unfused CuPy, torch SDPA), matmul, train, flash, the
#    kernel tests, T = 16384. Every kernel result is checked against float64 before it is timed.
# Output ($OUT, default bench/gpu_results): results.json, summary.txt, sections.log.
# Exit 0 only if every section ran and every result was right; 2 for a bad option.
# --smoke: the same harness on the CPU (CUDA simulator, NumPy for CuPy, tiny sizes), as CI runs it.
# Environment: PYTHON (default python3), GPU_CHECK_WHEEL_DIR (default .whl; under --smoke only if
# set), GPU_CHECK_SITE (default /tmp/site), GPU_CHECK_PLANT_WRONG (see bench/gpu_sections.py),
# GPU_CHECK_SECTIONS (e.g. baselines,flash,long: a rerun of some sections; env always runs).
set -u
cd "$(dirname "$0")/.."
START=$(date +%s)
BUDGET=400
SMOKE=""
while [ $# -gt 0 ]; do
    case $1 in
        --budget) BUDGET=${2-}; shift 2 2>/dev/null || shift ;;
        --smoke) SMOKE=--smoke; shift ;;
        -h|--help) awk 'NR > 1 && !/^#/ {exit} NR > 1 {sub(/^# ?/, ""); print}' "$0"; exit 0 ;;
        *) echo "gpu_check.sh: unknown option '$1' (use --budget SECONDS, --smoke)" >&2; exit 2 ;;
    esac
done
if ! [[ $BUDGET =~ ^[0-9]+$ ]] || [ "$BUDGET" -lt 30 ]; then
    echo "gpu_check.sh: --budget must be a whole number of seconds >= 30, got '$BUDGET'" >&2
    exit 2
fi
PY=${PYTHON:-python3}
OUT=${OUT:-bench/gpu_results}
mkdir -p "$OUT"
export PYTHONPATH=.

# Carried wheels: installed without network, dependencies or bytecode; the versions actually imported
# are what the env section records.
WHEEL_DIR=${GPU_CHECK_WHEEL_DIR:-}
[ -z "$SMOKE" ] && WHEEL_DIR=${WHEEL_DIR:-.whl}
SITE=${GPU_CHECK_SITE:-/tmp/site}
WHEELS="none (no $WHEEL_DIR/*.whl)"
[ -z "$WHEEL_DIR" ] && WHEELS="not used (--smoke without GPU_CHECK_WHEEL_DIR)"
if [ -n "$WHEEL_DIR" ] && compgen -G "$WHEEL_DIR/*.whl" > /dev/null; then
    NAMES=$(cd "$WHEEL_DIR" && echo *.whl)
    PIP_LIMIT=$(( BUDGET / 4 < 120 ? BUDGET / 4 : 120 ))     # the sections keep at least 3/4 of the budget
    if PIP_LOG=$(timeout "$PIP_LIMIT" "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
            --upgrade --target "$SITE" "$WHEEL_DIR"/*.whl 2>&1); then
        export PYTHONPATH="$SITE:."
        WHEELS="installed into $SITE: $NAMES"
    else
        WHEELS="FAILED to install $NAMES: $(echo "$PIP_LOG" | tail -n 1)"
    fi
fi
echo "carried wheels: $WHEELS"
export GPU_CHECK_WHEELS="$WHEELS"

if [ -n "$SMOKE" ]; then export NUMBA_ENABLE_CUDASIM=1; else export NUMBA_ENABLE_CUDASIM=0; fi
unset CUPY_TF32                              # cuBLAS in true FP32: the fair baseline for CUDA-core kernels
export NUMBA_CUDA_ARRAY_INTERFACE_SYNC=0     # one stream: no host sync per CuPy argument at each launch

LEFT=$(( BUDGET - ($(date +%s) - START) ))
"$PY" bench/kernels_gpu.py --out "$OUT" --budget "$LEFT" $SMOKE ${GPU_CHECK_SECTIONS:+--sections "$GPU_CHECK_SECTIONS"}
rc=$?
if [ ! -s "$OUT/results.json" ]; then
    echo "gpu_check.sh: bench/kernels_gpu.py wrote no results (exit $rc); carried wheels: $WHEELS" | tee "$OUT/summary.txt"
    [ $rc -eq 0 ] && rc=1
fi
[ -s "$OUT/summary.txt" ] && cat "$OUT/summary.txt"
exit $rc
