#!/usr/bin/env bash
# Builds the C library that a device call of bench/gpu_check.sh carries, here on the CPU, with the
# GPU machine's Triton (default 3.6.0) rather than this machine's: kernels AOT-compiled by another
# Triton version are not the JIT path's kernels (the first H200 run carried a Triton 3.8 build:
# E-MHSA's last bits differed from the JIT's, and the C runtime ran 29.9 ms at batch 256 against
# the JIT path's 21.9 ms, which this build lets the next run attribute or rule out).
#   bash bench/gpu_library.sh             # -> build/gpu-lib/libnextvit_kernels.so (sm_90 only)
#   device run carry: ["build/gpu-lib/libnextvit_kernels.so"]  (gpu_check.sh sets NEXTVIT_CLIB to it)
# The install's own library beside the package is left alone.
# The venv (build/gpu-triton-venv) sees this machine's torch through --system-site-packages;
# only Triton is replaced. Takes a few minutes (the AOT compile of S/B/L, three dtypes).
set -euo pipefail
cd "$(dirname "$0")/.."
TRITON_VERSION=${TRITON_VERSION:-3.6.0}
ARCH=${ARCH:-sm_90}
VENV=build/gpu-triton-venv
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv --system-site-packages "$VENV"
fi
"$VENV/bin/python" -m pip install -q "triton==$TRITON_VERSION"
PY="$VENV/bin/python"
got=$("$PY" -c "import triton; print(triton.__version__)")
[ "$got" = "$TRITON_VERSION" ] || { echo "gpu_library: the venv has Triton $got, not $TRITON_VERSION" >&2; exit 1; }
OUT_AOT=build/gpu-aot-triton$TRITON_VERSION
rm -rf "$OUT_AOT" build/gpu-lib
echo "gpu_library: AOT compile with Triton $TRITON_VERSION for $ARCH ..."
env -u TRITON_INTERPRET PYTHONPATH="$PWD" "$PY" -m nextvit_kernels.aot --out "$OUT_AOT" --arch "$ARCH" \
  --dtypes fp16,bf16,fp32 --variants s,b,l --resolutions 224,384 -j "$(nproc)"
PYTHONPATH="$PWD" "$PY" -c "
import sys
from nextvit_kernels import aot
aot.build_library('build/gpu-lib', aot_dir=sys.argv[1], cmake_args=['-DNEXTVIT_TRT=OFF', '-DNEXTVIT_TRITON=OFF'])
" "$OUT_AOT"
NEXTVIT_CLIB="$PWD/build/gpu-lib/libnextvit_kernels.so" PYTHONPATH="$PWD" "$PY" -c \
  "from nextvit_kernels import _library; print('gpu_library:', _library.open_default().version())"
