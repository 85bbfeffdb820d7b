"""Building the TensorRT plugins (csrc/trt) and their CPU harnesses for the tests: one build per
TensorRT major whose public headers are listed in NEXTVIT_TRT_INCLUDE_DIRS (os.pathsep-separated
include directories, one per major; unset: the 10.16 and 11.1 headers under third_party/tensorrt),
from the headers alone (no libnvinfer, no CUDA runtime). Shared by tests/test_trt_contract.py
(plugins on a recording stub of the C library) and tests/test_trt_numerics.py (on the real one)."""
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TRT_DIR = ROOT / "csrc" / "trt"
ENV = "NEXTVIT_TRT_INCLUDE_DIRS"
BUILD_TIMEOUT = 600


def major(include: Path) -> int:
    m = re.search(r"^#define\s+(?:NV_TENSORRT_MAJOR|TRT_MAJOR_ENTERPRISE)\s+(\d+)",
                  (include / "NvInferVersion.h").read_text(), re.M)
    assert m, f"no TensorRT major in {include / 'NvInferVersion.h'}"
    return int(m.group(1))


def header_sets():
    """One pytest param per TensorRT major listed in NEXTVIT_TRT_INCLUDE_DIRS, else per header
    set under third_party/tensorrt (a skip where there is none)."""
    dirs = [Path(p) for p in os.environ.get(ENV, "").split(os.pathsep) if p]
    if not dirs:
        dirs = sorted((ROOT / "third_party" / "tensorrt").glob("*/include"))
    if not dirs:
        return [pytest.param(None, id="no-headers", marks=pytest.mark.skip(
            reason=f"no TensorRT headers: {ENV} is not set and third_party/tensorrt has none; list the "
                   f"TensorRT include directories (one per major, '{os.pathsep}'-separated)"))]
    params = []
    for d in dirs:
        if not (d / "NvInferVersion.h").is_file():
            params.append(pytest.param(None, id=d.name, marks=pytest.mark.skip(
                reason=f"{ENV} lists {d}, which has no NvInferVersion.h")))
        else:
            params.append(pytest.param(d, id=f"trt{major(d)}"))
    return params


def _cuda_include():
    """cuda_runtime_api.h for the TensorRT headers: the one Triton ships, else CMake searches."""
    try:
        import triton
    except ImportError:
        return None
    inc = Path(triton.__file__).parent / "backends" / "nvidia" / "include"
    return inc if (inc / "cuda_runtime_api.h").is_file() else None


def run(cmd, **kw):
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=BUILD_TIMEOUT, **kw)


def configure_and_build(include: Path, build: Path, extra=()):
    """``cmake -S csrc/trt -DNEXTVIT_TRT_TESTS=ON`` against the headers in ``include`` into
    ``build`` (``extra``: more cache entries); returns the build's output."""
    if shutil.which("cmake") is None:
        pytest.skip("cmake is missing: it builds the TensorRT plugins and their test harnesses")
    cmd = ["cmake", "-S", TRT_DIR, "-B", build, "-DNEXTVIT_TRT=ON", "-DNEXTVIT_TRT_TESTS=ON",
           f"-DTENSORRT_INCLUDE_DIR={include}", *extra]
    if shutil.which("ninja"):
        cmd += ["-G", "Ninja"]
    cuda = _cuda_include()
    if cuda is not None:
        cmd.append(f"-DNEXTVIT_CUDA_INCLUDE_DIR={cuda}")
    cfg = run(cmd)
    assert cfg.returncode == 0, cfg.stdout + cfg.stderr
    out = run(["cmake", "--build", build, "-j", "2"])
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout + out.stderr
