"""The C code the tests load runs under ASan + UBSan (conftest.py's sanitized workers).

The stand-in suites (test_clib_cpu, test_cpu_driver, test_runtime, test_trt_numerics) load the C
library, the CPU driver stand-in and the TensorRT numeric harness into the test process. Under
pytest-xdist without a GPU, the workers are started with the ASan and UBSan runtimes preloaded
and those are built with ``_builds.SANITIZE``. Each suite then runs once, watched, on every shape
class: nothing watched the library's host code (shape-class lookup, argument checks, parameter
marshalling, workspace offsets, the whole-model runtime) in the plain run, and the sanitized run
computes and checks the same numbers. Here: that the workers really are sanitized, and that a
report in one fails the run, names the test and is printed.
"""
import ctypes
import os
import subprocess
import sys
import textwrap

import pytest

from _util import ROOT, SANITIZE, WORKER_KIND_ENV, c_compiler, c_library_with, sanitized, sanitizer_runtimes

# An out-of-bounds read and a signed overflow, in a library built with the tests' flags.
SEEDED = r"""
#include <stdlib.h>
int oob_read(int n) { int* a = malloc(n * sizeof(int)); for (int i = 0; i < n; ++i) a[i] = i;
                      int v = a[n]; free(a); return v; }
int overflow(int x) { return x + 1; }
"""


@pytest.fixture(scope="module")
def runtimes():
    found = sanitizer_runtimes()
    if found is None:
        pytest.skip("the C compiler cannot build with -fsanitize=address,undefined or names no shared runtimes")
    return found


@pytest.fixture(scope="module")
def seeded(runtimes, tmp_path_factory):
    d = tmp_path_factory.mktemp("seeded")
    (d / "seeded.c").write_text(SEEDED)
    so = d / "libseeded.so"
    r = subprocess.run([c_compiler(), *SANITIZE, "-shared", "-fPIC", str(d / "seeded.c"), "-o", str(so)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return str(so)


def _undefined(path):
    out = subprocess.run(["nm", "-D", "--undefined-only", path], capture_output=True, text=True, check=True).stdout
    return {ln.split()[-1] for ln in out.splitlines() if ln.strip()}


def test_workers_run_the_c_code_sanitized(runtimes):
    if not os.environ.get("PYTEST_XDIST_WORKER") or os.environ.get("NEXTVIT_SANITIZE") == "0":
        pytest.skip("sanitized workers come with pytest-xdist (-n), unless NEXTVIT_SANITIZE=0")
    assert os.environ.get(WORKER_KIND_ENV) == "sanitized", "a C suite scheduled on a plain worker"
    assert sanitized(), "a worker without the ASan runtime"
    assert "LD_PRELOAD" not in os.environ or "libasan" not in os.environ["LD_PRELOAD"], \
        "the worker's children would inherit the preload"
    from nextvit_kernels import testing
    for what, path in (("the C library", c_library_with("nvk_manifest")), ("the stand-in", testing.driver_library())):
        undefined = _undefined(path)
        assert any(s.startswith("__asan_report_load") for s in undefined), f"{what} ({path}) is not built with ASan"
        assert any(s.startswith("__ubsan_handle") for s in undefined), f"{what} ({path}) is not built with UBSan"
    assert ctypes.CDLL(None).__ubsan_handle_add_overflow_abort  # the UBSan runtime too


@pytest.mark.parametrize("call,report", [("oob_read(8)", "heap-buffer-overflow"),
                                         ("overflow(2147483647)", "signed integer overflow")])
@pytest.mark.slow
def test_a_report_fails_the_run_names_the_test_and_is_printed(seeded, call, report, tmp_path):
    """A pytest-xdist run (one worker, this conftest as a plugin) of one test that calls seeded code."""
    (tmp_path / "test_seeded.py").write_text(textwrap.dedent(f"""
        import ctypes
        def test_calls_the_seeded_code():
            ctypes.CDLL({seeded!r}).{call}
        """))
    # NEXTVIT_CLIB set: the worker does not load (or build) the sanitized C library at its start
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.join(ROOT, "tests"), ROOT]), NEXTVIT_CLIB=str(tmp_path))
    for k in [k for k in env if k.startswith("PYTEST_XDIST")] + ["LD_PRELOAD", "ASAN_OPTIONS", "UBSAN_OPTIONS",
                                                                  "NEXTVIT_SANITIZE", WORKER_KIND_ENV]:
        env.pop(k, None)
    r = subprocess.run([sys.executable, "-m", "pytest", "-p", "conftest", "-n", "1", "-p", "no:cacheprovider",
                        "--rootdir", str(tmp_path), str(tmp_path / "test_seeded.py")],
                       cwd=tmp_path, capture_output=True, text=True, env=env, timeout=300)
    out = r.stdout + r.stderr
    assert r.returncode == 1, out[-4000:]
    assert "crashed while running" in out and "test_calls_the_seeded_code" in out, out[-4000:]
    assert "1 sanitizer report(s)" in out and report in out, out[-4000:]
