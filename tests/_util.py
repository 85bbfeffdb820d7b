"""Helpers shared by the tests: comparisons, random weights, threads, the C library they run."""
import os
import shutil
import subprocess
import sys
import threading

import pytest
import torch

import _builds
from _builds import SANITIZE, sanitizer_runtimes  # noqa: F401 - the tests import them from here

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HEADER = os.path.join(ROOT, "csrc", "include", "nextvit_kernels.h")

# Relative to the largest reference magnitude; fp16/bf16 cover one rounding of
# each stored intermediate (eager PyTorch in those dtypes makes errors of the
# same order against a float64 reference).
TOL = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}


def assert_close(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, tol: float = None, what: str = ""):
    """Every element of ``out`` within tol·max|ref| (+ tol·|ref|) of ``ref``; no NaN/inf."""
    assert out.shape == ref.shape, f"{what} shape {tuple(out.shape)} != {tuple(ref.shape)}"
    tol = TOL[dtype] if tol is None else tol
    out64 = out.detach().to(torch.float64).cpu()
    ref64 = ref.detach().to(torch.float64).cpu()
    bad = ~torch.isfinite(out64)
    assert not bad.any(), f"{what} {int(bad.sum())} non-finite elements (unwritten?) e.g. at {bad.nonzero()[0].tolist()}"
    scale = max(ref64.abs().max().item(), 1e-6)
    err = (out64 - ref64).abs()
    limit = tol * scale + tol * ref64.abs()
    over = err > limit
    assert not over.any(), (
        f"{what} {int(over.sum())}/{err.numel()} elements off; max abs err {err.max().item():.3e}, "
        f"max |ref| {scale:.3e}, tol {tol:g}; first at {over.nonzero()[0].tolist()}"
    )


def force_split(monkeypatch, module, split: bool):
    """Makes an op with two modes (ops.mlp, ops.mhca, ops.e_mhsa: one kernel, or split into
    kernels through a scratch) run the given one whatever the shape, keeping the tiles its
    _config picks for the shape."""
    orig = module._config
    monkeypatch.setattr(module, "_config", lambda *a, **k: dict(orig(*a, **k), split=split))


def rand_like_dtype(*shape, dtype, device="cpu", scale=1.0):
    """Random values already rounded to ``dtype``, plus their float64 copy for the reference."""
    x = (torch.randn(*shape, dtype=torch.float64) * scale).to(dtype).to(device)
    return x, x.to(torch.float64).cpu()


def images(b, h, w, dtype=torch.float32, device="cpu") -> torch.Tensor:
    """``b`` random images, each of its own scale and offset: random-weight logits of same-statistics
    noise images are nearly equal, which would hide errors."""
    x = torch.randn(b, 3, h, w)
    x = x * torch.linspace(1, 3, b).view(b, 1, 1, 1) + torch.linspace(0, 1, b).view(b, 1, 1, 1)
    return x.to(device=device, dtype=dtype)


def rel_err(a, b) -> float:
    """max |a - b| / max |b|, in float64."""
    a, b = torch.as_tensor(a).double(), torch.as_tensor(b).double()
    return ((a - b).abs().max() / b.abs().max()).item()


@torch.no_grad()
def randomize_(model: torch.nn.Module, gain: float = 0.5, generator=None):
    """Random weights with a sane scale and random BatchNorm statistics, so a
    test cannot pass by BatchNorms being identities or weights being tiny."""
    g = generator
    for m in model.modules():
        if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
            fan_in = m.weight[0].numel()
            m.weight.copy_(torch.randn(m.weight.shape, generator=g) * gain / fan_in ** 0.5)
            if m.bias is not None:
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
        elif isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            c = m.num_features
            m.weight.copy_(torch.rand(c, generator=g) + 0.5)
            m.bias.copy_(torch.randn(c, generator=g) * 0.1)
            m.running_mean.copy_(torch.randn(c, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(c, generator=g) + 0.5)
    return model


def sanitized() -> bool:
    """Whether this process runs with the ASan + UBSan runtimes loaded: a pytest-xdist worker started
    with them preloaded (tests/_workers.py), where the C tests run sanitized builds."""
    import ctypes
    return hasattr(ctypes.CDLL(None), "__asan_init")


def sanitizer_env(env: dict, runtimes, reports: str) -> dict:
    """``env`` for a process that loads sanitized code into an uninstrumented executable (Python):
    the runtimes preloaded, reports written under ``reports`` (pytest's capture of fd 2 is lost when
    a sanitizer ends the process) and fatal. Leaks are not checked there: CPython and torch keep
    their allocations to exit (the loader fuzz and the C programs check leaks in processes of
    their own)."""
    env = dict(env)
    env["LD_PRELOAD"] = " ".join([*runtimes, *env.get("LD_PRELOAD", "").split()])
    env["ASAN_OPTIONS"] = f"detect_leaks=0:halt_on_error=1:abort_on_error=0:log_path={reports}/asan"
    env["UBSAN_OPTIONS"] = f"print_stacktrace=1:halt_on_error=1:log_path={reports}/ubsan"
    return env


SANITIZER_RUNTIMES_ENV = "NEXTVIT_SANITIZER_RUNTIMES"  # set for the workers: what they preload
SANITIZER_REPORTS_ENV = "NEXTVIT_SANITIZER_REPORTS"    # ... and where their reports go
WORKER_KIND_ENV = "NEXTVIT_WORKER_KIND"                # "sanitized" / "plain" in a worker of a split run


def child_env(env: dict = None) -> dict:
    """The environment of a child process that loads what this one runs (``c_library_with``'s
    library, the stand-in): in a sanitized worker, with the sanitizer runtimes preloaded."""
    env = dict(os.environ if env is None else env)
    if sanitized() and os.environ.get(SANITIZER_RUNTIMES_ENV):
        env = sanitizer_env(env, os.environ[SANITIZER_RUNTIMES_ENV].split(os.pathsep),
                            os.environ[SANITIZER_REPORTS_ENV])
    return env


# NEXTVIT_CLIB as the run started: an explicit choice of the C library the tests must not replace.
USER_CLIB = os.environ.get("NEXTVIT_CLIB")


def _use_c_library(build_dir) -> str:
    from nextvit_kernels import clib
    os.environ["NEXTVIT_CLIB"] = str(build_dir)
    clib._lib = None
    return os.path.join(str(build_dir), "libnextvit_kernels.so")


def build_c_library() -> str:
    """libnextvit_kernels.so built from this checkout (``_builds.c_library``: the install's kernels,
    cached on disk) and made the one ``clib.load()`` loads ($NEXTVIT_CLIB). Skips when cmake or
    ninja is missing."""
    if shutil.which("cmake") is None or shutil.which("ninja") is None:
        pytest.skip("the C library is not built and cmake/ninja are missing to build it")
    return _use_c_library(_builds.c_library())


def sanitized_c_library() -> str:
    """The library built with ``SANITIZE`` (``_builds.c_library(sanitized=True)``), for sanitized
    workers only. Not made $NEXTVIT_CLIB: the worker's children, Python without the preload, would
    inherit it; the tests give it to ``cpu_driver(library=...)``, which routes clib and runtime to it."""
    assert sanitized(), "a library built with ASan needs the ASan runtime loaded first"
    return str(_builds.c_library(sanitized=True) / "libnextvit_kernels.so")


def c_library_with(*symbols) -> str:
    """The C library the C tests run: in a sanitized worker the sanitized build (unless
    $NEXTVIT_CLIB names one; in a plain worker of that run the plain one), else the one
    ``clib.load()`` finds ($NEXTVIT_CLIB's, else the installed one) when it exports ``symbols``,
    else one built by ``build_c_library``. The
    installed one is probed in a fresh interpreter: one built from older sources, loaded here,
    would keep its SONAME for every later library that links libnextvit_kernels.so. A
    $NEXTVIT_CLIB without ``symbols`` fails the test (an explicit choice is not replaced)."""
    if sanitized() and not USER_CLIB:
        return sanitized_c_library()
    if os.environ.get(WORKER_KIND_ENV) == "plain" and not USER_CLIB:
        # a plain worker of a split run only collects the C suites (tests/_workers.py): the same
        # test ids as the sanitized workers, from the build of the same kernels
        return build_c_library()
    probe = ("import ctypes, sys\nfrom nextvit_kernels import clib\npath = clib.library_path()\n"
             "lib = ctypes.CDLL(path)\nfor s in sys.argv[1:]:\n    getattr(lib, s)\nprint(path)\n")
    r = subprocess.run([sys.executable, "-c", probe, *symbols], capture_output=True, text=True, timeout=300)
    if r.returncode == 0:
        return r.stdout.strip().splitlines()[-1]
    if os.environ.get("NEXTVIT_CLIB"):
        pytest.fail(f"NEXTVIT_CLIB={os.environ['NEXTVIT_CLIB']}: no C library exporting {', '.join(symbols)} "
                    f"there:\n{r.stderr[-2000:]}")
    return build_c_library()


def in_threads(n, body):
    """Runs ``body(i)`` for i < n in n threads started together, switching between them every
    few microseconds so that unlocked sections interleave; returns what they raised."""
    errors = []
    start = threading.Barrier(n)

    def run(i):
        start.wait()
        try:
            body(i)
        except BaseException as err:  # noqa: BLE001 - reported by the test
            errors.append(f"thread {i}: {type(err).__name__}: {err}")

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)
    try:
        threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(interval)
    return errors


_CPU_DRIVER_LIBRARY = {}


def cpu_driver_library():
    """The C library that the CPU driver stand-in tests (test_clib_cpu.py, test_cpu_driver.py) run:
    ``(path, manifest)``, ``path`` for ``testing.cpu_driver(library=...)`` (``c_library_with``: the
    installed one or ``$NEXTVIT_CLIB``'s when it is current, else one built once per process) and
    ``manifest`` the JSON it embeds. Called at collection time, since the cases are the library's
    shape classes: skips the calling module when nothing can be built."""
    import json

    from nextvit_kernels import _library
    if "found" not in _CPU_DRIVER_LIBRARY:
        try:
            path = c_library_with("nvk_manifest", "nvk_model_forward")
            _CPU_DRIVER_LIBRARY["found"] = (path, json.loads(_library.open_path(path).manifest()))
        except pytest.skip.Exception as skip:
            _CPU_DRIVER_LIBRARY["found"] = str(skip)
    found = _CPU_DRIVER_LIBRARY["found"]
    if isinstance(found, str):
        pytest.skip(found, allow_module_level=True)
    return found


def record_launches(monkeypatch):
    """The launches the CPU stand-in executes from now on (``cpu_driver(execute=True)``), as dicts:
    entry ``name``, ``image`` address, its ``sha1`` (which variant and arch: aot.embedded_manifest),
    ``grid``, ``block``, ``shared`` bytes."""
    from nextvit_kernels.testing import _interpret

    seen = []
    run = _interpret.Executor.launch

    def spy(self, name, image, grid, block, shared, *args):
        try:
            self.variant(image)  # hashes it
        except _interpret.LaunchError:
            pass  # refused by the launch itself, below
        seen.append(dict(name=name, image=image, sha1=self._images.get(image), grid=tuple(grid), block=tuple(block),
                         shared=shared))
        return run(self, name, image, grid, block, shared, *args)

    monkeypatch.setattr(_interpret.Executor, "launch", spy)
    return seen


def interpreted():
    """Skips a test that runs kernels under the stand-in where Triton's interpreter is off (a GPU
    machine: conftest sets TRITON_INTERPRET=1 only without one)."""
    import os

    import pytest

    return pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                              reason="cpu_driver(execute=True) runs kernels under TRITON_INTERPRET=1")


def c_compiler() -> str:
    """The C compiler an install would use (nvk_build.c_compiler); skips the test without one."""
    cc = _builds.find_c_compiler()
    if cc is None:
        pytest.skip("no C compiler")
    return cc


def sanitizing_c_compiler() -> str:
    """``c_compiler()`` once it has built a program with ``SANITIZE``; skips the test where it cannot."""
    cc = c_compiler()
    why = _builds.sanitizer_probe(cc)
    if why:
        pytest.skip("the C compiler cannot build with -fsanitize=address,undefined: " + why)
    return cc


def header_prototypes() -> dict:
    """Every NVK_API function of the public header: name -> (return type, [parameter declarations])."""
    import re
    with open(HEADER) as f:
        header = re.sub(r"/\*.*?\*/", "", f.read(), flags=re.S)
    return {m.group(2): (m.group(1).strip(), [p.strip() for p in m.group(3).split(",") if p.strip() not in ("", "void")])
            for m in re.finditer(r"NVK_API\s+([\w\s\*]+?)\s*(nvk_\w+)\(([^)]*)\);", header)}


def triton_backend(sanitized: bool = False):
    """(libtriton_nextvit.so, libnextvit_kernels.so) of the test build, for the serving tests;
    skips where no tritonserver, C compiler or nlohmann/json (the backend's build) is found."""
    from nextvit_kernels import serve
    try:
        serve.find_server()
    except FileNotFoundError as err:
        pytest.skip(f"no tritonserver: {err}")
    if _builds.find_c_compiler() is None:
        pytest.skip("the backend and the stand-in need a C compiler")
    d = _builds.c_library(sanitized=sanitized)
    backend = d / "csrc" / "triton" / "libtriton_nextvit.so"
    if not backend.exists():
        pytest.skip("the Triton backend was not built (pip install nlohmann-json)")
    return backend, d / "libnextvit_kernels.so"
