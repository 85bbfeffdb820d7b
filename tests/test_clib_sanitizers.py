"""The C library's own code under ASan + UBSan while it computes.

The stand-in suites load the C library into the Python process, so in the main run nothing
watches the library's host code (shape-class lookup, argument checks, parameter marshalling,
workspace offsets, the whole-model runtime). Here a copy of the library is built with
-fsanitize=address,undefined, and a child pytest runs a selection of those suites against it,
with the sanitizer runtimes preloaded (a Python executable is not linked with them):
- every ``nvk_*`` entry point in every shape class and its refusals of bad arguments
  (test_clib_cpu), leaving out the large probe-range ends, whose cost is the interpreter's and
  not more host code;
- the stand-in's refusals (test_cpu_driver);
- the whole-model runtime's bad files and calls, its counted forward and a numeric forward
  (test_runtime);
- every TensorRT plugin's enqueue in fp16 (test_trt_numerics, TensorRT 11's headers: the library
  calls are the same for both majors).
The child must pass with no sanitizer report. The numbers themselves are checked in the main run.
"""
import os
import re
import shutil
import subprocess
import sys
import tempfile

import pytest

from _util import C_LIBRARY_AOT_ARGS, ROOT, SANITIZE, interpreted, sanitizing_c_compiler

FLAGS = " ".join(SANITIZE)
SELECTION = [
    ("tests/test_clib_cpu.py", "not 37x111 and not 35x117 and not 29x71"),
    ("tests/test_cpu_driver.py", None),
    ("tests/test_runtime.py", "bad_files or bad_calls or forward_launches or tiny_fp16"),
    ("tests/test_trt_numerics.py", "float16 and trt11"),
]
REPORT = re.compile(r"ERROR: AddressSanitizer|runtime error:|LeakSanitizer|SUMMARY: UndefinedBehaviorSanitizer")


def _runtime(cc, name):
    r = subprocess.run([cc, f"-print-file-name={name}"], capture_output=True, text=True)
    path = r.stdout.strip()
    return path if r.returncode == 0 and os.path.isabs(path) and os.path.exists(path) else None


@pytest.fixture(scope="module")
def sanitized_library():
    """(build dir, the sanitizer runtimes to preload)."""
    from nextvit_kernels import aot
    cc = sanitizing_c_compiler()
    preload = [_runtime(cc, "libasan.so"), _runtime(cc, "libubsan.so")]
    if None in preload:
        pytest.skip(f"{cc} names no shared libasan.so / libubsan.so to preload")
    if shutil.which("cmake") is None or shutil.which("ninja") is None:
        pytest.skip("cmake and ninja build the C library")
    build = tempfile.mkdtemp(prefix="nvk_sanitized_")
    aot.build_library(build, aot_args=C_LIBRARY_AOT_ARGS, python_module=False,
                      cmake_args=["-DNEXTVIT_TRT=OFF", "-DNEXTVIT_BUILD_EXAMPLES=OFF", "-DCMAKE_BUILD_TYPE=Debug",
                                  f"-DCMAKE_C_FLAGS={FLAGS}", f"-DCMAKE_SHARED_LINKER_FLAGS={FLAGS}"],
                      env=dict(os.environ, PYTHONPATH=ROOT))
    yield build, preload
    shutil.rmtree(build, ignore_errors=True)


@interpreted()
@pytest.mark.parametrize("suite,select", SELECTION, ids=[os.path.basename(s)[:-3] for s, _ in SELECTION])
def test_stand_in_suite_under_asan_and_ubsan(sanitized_library, suite, select, tmp_path):
    build, preload = sanitized_library
    # Reports go to files: pytest's capture of fd 2 is lost when a sanitizer ends the process.
    logs = tmp_path / "reports"
    logs.mkdir()
    env = dict(os.environ, NEXTVIT_CLIB=build, LD_PRELOAD=" ".join(preload),
               # CPython and torch keep their allocations to exit; the library's leaks are the
               # loader fuzz's business (test_runtime), where the process is the library's own.
               ASAN_OPTIONS=f"detect_leaks=0:halt_on_error=1:abort_on_error=0:log_path={logs}/asan",
               UBSAN_OPTIONS=f"print_stacktrace=1:halt_on_error=1:log_path={logs}/ubsan")
    cmd = [sys.executable, "-m", "pytest", suite, "-q", "-p", "no:cacheprovider", "-m", "not gpu", "-rs"]
    if select:
        cmd += ["-k", select]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    reports = "".join(f.read_text(errors="replace") for f in sorted(logs.iterdir()))
    assert not reports, reports[:8000]
    out = r.stdout + r.stderr
    report = REPORT.search(out)
    assert report is None, out[max(0, report.start() - 2000):report.start() + 6000]
    assert r.returncode == 0, out[-6000:]
    summary = out.strip().splitlines()[-1]
    assert re.search(r"\d+ passed", summary) and "skipped" not in summary, out[-3000:]
    print(summary)
