"""pytest-xdist workers of two kinds: sanitized ones for the tests that load C code, plain ones for
the rest (tests/conftest.py calls this module).

The C suites load the C library, the CPU driver stand-in and the TensorRT numeric harness into the
test process. Under pytest-xdist on a machine without a GPU, about half of the workers start with
the ASan and UBSan runtimes preloaded (a Python executable is not linked with them), and those
load copies of the C code built with ``_builds.SANITIZE``: each C suite then runs once, watched,
on every shape class. The other workers stay plain, because ASan makes torch's large allocations
slow (the model and ONNX tests ran 2.5x longer under it) and they load no C code under test. The
scheduler hands the C suites (``SANITIZED_MODULES``) only to sanitized workers, everything else
to any worker, two tests at a time and the slow ones first. A sanitizer report ends its worker
(xdist names the test it was running), fails the run and is printed at its end.
NEXTVIT_SANITIZE=0 makes every worker plain; a run without -n is plain.
"""
import json
import os
import shlex
import stat
import sys
import tempfile

import _util

# The test modules whose tests load C code under test into the test process (or run children
# that do): they run on sanitized workers only. In a split run a plain worker refuses to load
# the C library for a module not listed here (_util.c_library_with).
SANITIZED_MODULES = ("test_clib_cpu.py", "test_cpu_driver.py", "test_cpu_driver_hosted.py", "test_runtime.py",
                     "test_trt_numerics.py", "test_clib_sanitizers.py")
KIND_ENV = _util.WORKER_KIND_ENV
_RESTORE = "NEXTVIT_SANITIZER_RESTORE"  # the environment before the preload, for a worker's children


def is_controller(config) -> bool:
    return (not hasattr(config, "workerinput") and bool(getattr(config.option, "numprocesses", 0))
            and getattr(config.option, "dist", "no") != "no")


def configure_controller(config) -> None:
    """Before the workers start: their share of the cores, the chunk size, and their kinds."""
    n = config.option.numprocesses
    # Each worker's share of the cores for torch's and NumPy's BLAS / OpenMP pools: more threads
    # than cores spin-wait against the other workers (a 2-core run took 2.6x longer per test).
    share = str(max(1, (os.cpu_count() or 1) // n))
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(var, share)
    # Tests take from milliseconds to a minute: two at a time, so that no worker holds a queue of
    # minutes while another idles at the end.
    if getattr(config.option, "maxschedchunk", 0) is None:
        config.option.maxschedchunk = 2
    import torch
    if os.environ.get("NEXTVIT_SANITIZE") == "0" or torch.cuda.is_available():
        return  # the CUDA driver does not run under ASan's default shadow layout
    runtimes = _util.sanitizer_runtimes()
    if runtimes is None:
        return
    reports = tempfile.mkdtemp(prefix="nvk_sanitizer_reports_")
    env = {k: v for k, v in _util.sanitizer_env(os.environ, runtimes, reports).items() if os.environ.get(k) != v}
    env[_RESTORE] = json.dumps({k: os.environ.get(k) for k in env})
    env[KIND_ENV] = "sanitized"
    wrapper = os.path.join(reports, "sanitized-python")
    with open(wrapper, "w") as f:
        f.write("#!/bin/sh\n# a pytest-xdist worker with the sanitizer runtimes preloaded (tests/_workers.py)\n")
        f.write("".join(f"export {k}={shlex.quote(v)}\n" for k, v in env.items()))
        f.write(f'exec {shlex.quote(sys.executable)} "$@"\n')
    os.chmod(wrapper, os.stat(wrapper).st_mode | stat.S_IXUSR)
    sanitized = (n + 1) // 2
    config.option.tx = [f"popen//python={wrapper}"] * sanitized + ["popen"] * (n - sanitized)
    os.environ[_util.SANITIZER_RUNTIMES_ENV] = os.pathsep.join(runtimes)
    os.environ[_util.SANITIZER_REPORTS_ENV] = reports
    os.environ[KIND_ENV] = "plain"  # what the plain workers inherit; the wrapper overrides it
    config._nvk_sanitizer = (reports, wrapper)


def enter_worker() -> None:
    """At a worker's start (conftest import). In a sanitized one: its children get the environment
    without the preload (a compiler or CMake under ASan's interceptors is slow and not what is
    tested; children that load sanitized code ask for it with ``_util.child_env``), UBSan writes
    its reports where ASan does, and the stand-in is built sanitized."""
    if os.environ.get(KIND_ENV) == "plain" and os.environ.get("PYTEST_XDIST_WORKER"):
        from nextvit_kernels import testing

        def refuse(extra_cflags=()):
            raise RuntimeError("a plain worker of a split run does not drive C code under test: add the module "
                               "to tests/_workers.py SANITIZED_MODULES, whose tests run on sanitized workers")

        testing.driver_library = refuse
        return
    restore = os.environ.pop(_RESTORE, None)
    if restore is None or not os.environ.get("PYTEST_XDIST_WORKER"):
        return
    for k, v in json.loads(restore).items():
        if k == KIND_ENV:
            continue
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    if not _util.sanitized():
        raise RuntimeError("the worker was started with the sanitizer runtimes preloaded, but ASan is not loaded")
    # UBSan beside ASan reads no log_path from its options (its reports would go to fd 2, which
    # pytest's capture loses when the report ends the process): set it in UBSan's own runtime.
    import ctypes
    reports = os.environ[_util.SANITIZER_REPORTS_ENV]
    for runtime in os.environ[_util.SANITIZER_RUNTIMES_ENV].split(os.pathsep):
        if "ubsan" in os.path.basename(runtime):
            ctypes.CDLL(runtime).__sanitizer_set_report_path(os.path.join(reports, "ubsan").encode())
    from nextvit_kernels import testing
    plain = testing.driver_library

    def sanitized_driver_library(extra_cflags=()):
        return plain(tuple(dict.fromkeys([*_util.SANITIZE, *extra_cflags])))

    testing.driver_library = sanitized_driver_library


def make_scheduler(config, log):
    if getattr(config, "_nvk_sanitizer", None) is None:
        return None
    from xdist.scheduler import LoadScheduling

    wrapper = config._nvk_sanitizer[1]

    class SplitScheduling(LoadScheduling):
        """LoadScheduling, but a test of ``SANITIZED_MODULES`` goes to a sanitized worker only (and
        those take them first); a plain worker with nothing left that it may run shuts down."""

        def _fits(self, node, index):
            return self._sanitized(node) or not self._needs_sanitizer(index)

        def _sanitized(self, node):
            return node.gateway.spec.python == wrapper

        def _needs_sanitizer(self, index):
            path = self.collection[index].split("::", 1)[0]
            return os.path.basename(path) in SANITIZED_MODULES

        def check_schedule(self, node, duration=0):
            if node.shutting_down:
                return
            if self.pending and not any(self._fits(node, i) for i in self.pending):
                if not self.node2pending[node]:
                    node.shutdown()
                return
            super().check_schedule(node, duration)

        def _send_tests(self, node, num):
            fits = [i for i in self.pending if self._fits(node, i)]
            if self._sanitized(node):
                fits.sort(key=lambda i: not self._needs_sanitizer(i))  # stable: slow ones still first
            chosen = fits[:num]
            if chosen:
                taken = set(chosen)
                self.pending[:] = [i for i in self.pending if i not in taken]
                self.node2pending[node].extend(chosen)
                node.send_runtest_some(chosen)

    return SplitScheduling(config, log)


def reports(config) -> list:
    """The sanitizer reports the workers of a split run (and their children) wrote."""
    if getattr(config, "_nvk_sanitizer", None) is None:
        return []
    folder = config._nvk_sanitizer[0]
    return sorted(os.path.join(folder, f) for f in os.listdir(folder) if f != "sanitized-python")


def summarize(terminalreporter, config) -> None:
    if getattr(config, "_nvk_sanitizer", None) is None:
        return
    found = reports(config)
    n = sum(spec.startswith("popen//python=") for spec in config.option.tx)
    terminalreporter.write_line(f"{n} of {len(config.option.tx)} workers sanitized (ASan + UBSan preloaded); "
                                f"{len(found)} sanitizer report(s)")
    for path in found:
        with open(path, errors="replace") as f:
            terminalreporter.write_line(f"---- {path}\n{f.read()[-20000:]}", red=True)
