#!/usr/bin/env bash
# One device call that does the GPU checks still owed, sized for a 15-minute
# device budget (one call <= 600 s, leaving room for a rerun). Each phase has
# its own time limit, so a slow phase cannot take the others' results with it.
# Without $OUT the files go to bench/results. With $OUT (a device call) they go to
# a temporary folder packed into $OUT/gpu_check.tar.gz after every phase: a device
# call returns at most 8 files, and a phase killed at its limit keeps what the
# phases before it wrote. Unpack it into bench/results/ to commit.
#   bash bench/gpu_library.sh                  (here, first: the C library by the GPU machine's Triton)
#   device run: bash bench/gpu_check.sh        (timeout_s ~ 580; carry build/gpu-lib/libnextvit_kernels.so)
# Phases, most important first; PHASES="warm e2e ops tests" selects. Limits sum to 570 s, set from
# the first H200 run (2026-12-04): warm and tests hit their 80 s and 75 s there (the whole GPU
# suite took 117 s), clib, profile and host used 46, 10 and 9 s, serve cannot run on those machines.
set -u
cd "$(dirname "$0")/.."
if [ -n "${OUT:-}" ]; then PACK="$OUT/gpu_check.tar.gz"; OUT=$(mktemp -d); else PACK=; OUT=bench/results; fi
mkdir -p "$OUT"
pack() { [ -z "$PACK" ] || tar czf "$PACK" -C "$OUT" .; }
export PYTHONUNBUFFERED=1
# The device machine has no install of this package: the bench scripts import it from the checkout.
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# The C library built by bench/gpu_library.sh with the GPU machine's Triton, where it was carried.
if [ -z "${NEXTVIT_CLIB:-}" ] && [ -f build/gpu-lib/libnextvit_kernels.so ]; then
  export NEXTVIT_CLIB="$PWD/build/gpu-lib/libnextvit_kernels.so"
fi
PY=${PY:-python3}  # the GPU machines' python with torch is python3
PHASES=${PHASES:-"warm e2e clib profile host serve ops tests"}
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,memory.total --format=csv | tee "$OUT/gpu.txt"
$PY -c "import sys, torch, triton, numpy, timm; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, 'numpy', numpy.__version__, 'timm', timm.__version__)" | tee -a "$OUT/gpu.txt"
nvidia-smi >> "$OUT/gpu.txt" 2>&1
for phase in $PHASES; do
  start=$SECONDS
  case $phase in
    # Compiles the kernels the e2e preset uses in 8 processes at once (Triton compiles serially per
    # process): each forward split into 8 parts; S covers B and L (same channel widths).
    warm)  timeout 100 $PY bench/warm_cache.py --variants s --dtype fp16 --batch 1,256 -j 8 2>&1 | tee "$OUT/warm.log" ;;
    e2e)   timeout 140 $PY -m nextvit_kernels.bench --preset targets --iters 30 --out "$OUT" 2>&1 | tee "$OUT/e2e.log" ;;
    # The whole-model C runtime: logits vs the Triton path, fresh process to first inference (C, JIT,
    # torch.compile; 25 s each at most), latency at batch 1 and 256. Needs the built C library.
    clib)  timeout 60 $PY bench/clib_bench.py --batch 1,256 --iters 30 --fresh-timeout 25 --out "$OUT" 2>&1 | tee "$OUT/clib.log" ;;
    # Per-step kernel times of NextViT-S at batch 1 and 256 (kernels already compiled by warm/e2e).
    profile) timeout 30 $PY bench/profile_plan.py --variant s --dtype fp16 --batch 1,256 --iters 5 --out "$OUT" 2>&1 | tee "$OUT/profile.log" ;;
    # model(x) with automatic CUDA graphs and without, cuda_graph() and the kernels' sum, S at batch 1 and 8.
    host)  timeout 20 $PY bench/host_overhead.py --variants s --batch 1,8 --iters 100 --out "$OUT" 2>&1 | tee "$OUT/host.log" ;;
    # Triton Inference Server with the native backend against the Python backend over runtime.Model
    # (S, fp16, 224^2): batch 1 and 8 at concurrency 1, 8, 32, 1.5 s per point. Needs tritonserver,
    # tritonclient and the built backend (nextvit_kernels/libtriton_nextvit.so or $NEXTVIT_TRITON_BACKEND).
    serve) timeout 30 $PY bench/serve_bench.py --batch 1,8 --concurrency 1,8,32 --duration 1.5 --warmup 0.5 --out "$OUT" 2>&1 | tee "$OUT/serve.log" ;;
    # The op suite (pytest-benchmark) at fp16, batch 256; JSON + table via ops_bench; compiles stop at 35 s, all at 50 s.
    ops)   timeout 70 $PY bench/ops_bench.py --out "$OUT" -- --bench-dtype fp16 --bench-batch 256 --bench-budget-s 50 --bench-compile-budget-s 35 2>&1 | tee "$OUT/ops.log" ;;
    # -n 8 / --timeout where pytest-xdist and pytest-timeout are installed (the GPU machines have both).
    # -v: each result is printed as it comes, so a run cut at its limit still names its failures.
    tests) par=$($PY -c "import xdist, pytest_timeout" 2>/dev/null && echo "-n 8 --timeout 70")
           timeout "${TESTS_LIMIT:-120}" $PY -m pytest tests -m gpu -v -rfE --tb=short -p no:cacheprovider $par \
             -k "not 10000" 2>&1 | grep -v "PytestBenchmarkWarning\|warner(" | tee "$OUT/gpu_tests.log" ;;
    # Not in the default list: the launch-configuration sweep (bench/tune.py), for a call of its own.
    tune)  timeout "${TUNE_LIMIT:-300}" $PY bench/tune.py ${TUNE_OPS:+--ops "$TUNE_OPS"} \
             --batch "${TUNE_BATCH:-1,256}" --budget-s "$(( ${TUNE_LIMIT:-300} - 15 ))" --out "$OUT" 2>&1 | tee "$OUT/tune.log" ;;
  esac
  echo "phase $phase: exit ${PIPESTATUS[0]} after $((SECONDS - start)) s" | tee -a "$OUT/phases.txt"
  pack
done
