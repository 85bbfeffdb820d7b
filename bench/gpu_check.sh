#!/usr/bin/env bash
# One device call that does the GPU checks still owed, sized for a 15-minute
# device budget (one call <= 600 s, leaving room for a rerun). Each phase has
# its own time limit and writes under $OUT (or bench/results without it), so a
# slow phase cannot take the others' results with it.
#   device run: bash bench/gpu_check.sh        (timeout_s ~ 580)
# Phases, most important first; PHASES="e2e ops tests" selects.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PHASES=${PHASES:-"e2e ops tests"}
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,memory.total --format=csv | tee "$OUT/gpu.txt"
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/gpu.txt"
for phase in $PHASES; do
  case $phase in
    e2e)   timeout 230 python -m nextvit_kernels.bench --preset targets --iters 30 --out "$OUT" 2>&1 | tee "$OUT/e2e.log" ;;
    ops)   timeout 150 python bench/ops_bench.py --dtype fp16 --batch 256 --stop-after-s 120 --compile-deadline-s 80 --out "$OUT" 2>&1 | tee "$OUT/ops.log" ;;
    tests) timeout 170 python -m pytest tests -m gpu -q -p no:cacheprovider --timeout 120 -k "not 10000 and not large" 2>&1 | tee "$OUT/gpu_tests.log" ;;
  esac
  echo "phase $phase: exit ${PIPESTATUS[0]}"
done
