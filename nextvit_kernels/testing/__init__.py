"""Testing aids: a CPU stand-in for the CUDA driver, so that the C library and everything built on
it run for real on a machine without a GPU.

    import os; os.environ["TRITON_INTERPRET"] = "1"       # before nextvit_kernels' kernels are imported
    from nextvit_kernels import clib, testing
    with testing.cpu_driver() as drv:                      # the installed C library, or library=PATH
        y = clib.mlp(x, w1, b1, w2, b2)                    # CPU tensors stand for device tensors
        print(drv.counters())                              # launches, allocations, copies, syncs

How it works. ``cpu_driver.c`` (compiled on first use with the system's C compiler) implements the
driver entry points the C library calls, on host memory: one sm_90 device, streams that run work
at once, ``cuMemAlloc`` as guarded host allocations. The C library opens it instead of
``libcuda.so.1`` because ``$NEXTVIT_CUDA_DRIVER`` names it (read when the library opens its driver;
``nvk_reset_driver`` makes it open one again), so nothing else in the process, torch included, sees
it. Every pointer the library asks about, copies to or launches with must lie in a buffer the
stand-in knows: its own allocations, what ``CpuDriver.registered`` registers, and, under the
context, the tensors of every ``nextvit_kernels.clib`` call.

``execute=True``: each launch runs the same Triton kernel under Triton's interpreter, decoded with
the manifest the library embeds; every load and store is checked against the launch's buffers
(``_interpret``), and a launch that cannot be decoded (unknown image, parameter count, pointer
outside every known buffer, misaligned pointer, grid, block or shared memory beyond CUDA's limits)
fails with a message naming the kernel: the C call returns ``NVK_ERR_CUDA`` with that message, and
``CpuDriver.errors`` lists it. ``execute=False``: launches are checked and counted, nothing runs
(host-time measurements of the C paths). What this cannot check: the cubins themselves (they are
never executed; the interpreter runs the Triton source they were compiled from).

Hosted execute mode: a process that is not Python (a C program, an inference server loading a
backend that links the C library) gets computed launches too. Start it with the variables of
``hosted_environment()``:

    env = dict(os.environ, **testing.hosted_environment())   # library=PATH: that C library
    subprocess.run(["./my_server", ...], env=env)

``$NEXTVIT_CUDA_DRIVER`` names the stand-in and ``TRITON_INTERPRET=1`` asks for execution: with no
callback installed, the stand-in's first launch loads the libpython that
``$NEXTVIT_CPU_DRIVER_PYTHON`` names (or joins the process's own Python), adds each directory of
``$NEXTVIT_CPU_DRIVER_PYTHONPATH`` (this process's ``sys.path``) with ``site.addsitedir``, so that
a venv's .pth files and editable installs work, and calls ``_host``, which installs the callback
above; the manifest is the one of the C library that made that launch (``$NEXTVIT_CLIB`` or the
installed library where it cannot be told). Launches from any thread then run under the
interpreter, each taking the GIL. A bootstrap that fails (a variable missing, an import error)
fails every launch with its reason (``cuGetErrorString``), never a silent count; without
``TRITON_INTERPRET=1`` launches are counted as before. A Python process's ``cpu_driver`` decides
on its own (``execute=False`` counts whatever ``TRITON_INTERPRET`` says). The embedded Python finds
its standard library from libpython's built-in prefix (set ``PYTHONHOME`` for a relocated one).
"""
import contextlib
import ctypes
import hashlib
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import threading
from typing import Dict, List, Optional

__all__ = ["cpu_driver", "CpuDriver", "driver_library", "hosted_environment", "DRIVER_ENV", "PYTHON_ENV", "REPORT_ENV",
           "PYTHONPATH_ENV"]

DRIVER_ENV = "NEXTVIT_CUDA_DRIVER"  # read by the C library when it opens its CUDA driver
# read by the stand-in's hosted execute mode (cpu_driver.c): the libpython to embed, and the
# directories its bootstrap adds to sys.path
PYTHON_ENV = "NEXTVIT_CPU_DRIVER_PYTHON"
# a file the stand-in writes its counters to (JSON, COUNTERS' names) when its process exits: what a
# server process allocated and freed, which nothing in it can be asked for
REPORT_ENV = "NEXTVIT_CPU_DRIVER_REPORT"
PYTHONPATH_ENV = "NEXTVIT_CPU_DRIVER_PYTHONPATH"
_SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cpu_driver.c")
_CFLAGS = ["-O2", "-g", "-std=c11", "-shared", "-fPIC", "-Wall", "-Wextra", "-Werror", "-pthread"]
_LIBS = ["-ldl"]  # dlopen / dladdr of the hosted mode live in libdl before glibc 2.34
_LAUNCH_CB = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p, *([ctypes.c_uint] * 7),
                              ctypes.c_void_p, ctypes.POINTER(ctypes.c_void_p), ctypes.c_int)
COUNTERS = ("launches", "allocs", "frees", "copies", "syncs", "live_allocs", "live_bytes", "memsets")


def _cache_dir() -> str:
    d = os.environ.get("NEXTVIT_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "nextvit_kernels")
    os.makedirs(d, exist_ok=True)
    return d


def driver_library(extra_cflags=()) -> str:
    """The stand-in's shared library, compiled from ``cpu_driver.c`` on first use (cached by source
    and flags; ``$CC`` or ``cc``). ``extra_cflags``, or ``$NEXTVIT_CPU_DRIVER_CFLAGS``, add flags,
    e.g. ``-fsanitize=address,undefined`` for a sanitizer build of a C test."""
    flags = _CFLAGS + list(extra_cflags) + os.environ.get("NEXTVIT_CPU_DRIVER_CFLAGS", "").split()
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise RuntimeError("the CPU driver stand-in needs a C compiler (cc or $CC) to build cpu_driver.c")
    with open(_SOURCE, "rb") as f:
        key = hashlib.sha1(f.read() + " ".join([cc] + flags + _LIBS).encode()).hexdigest()[:16]
    path = os.path.join(_cache_dir(), f"libnvk_cpu_driver-{key}.so")
    if not os.path.exists(path):
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=os.path.dirname(path))
        os.close(fd)
        r = subprocess.run([cc, *flags, "-o", tmp, _SOURCE, *_LIBS], capture_output=True, text=True)
        if r.returncode:
            os.unlink(tmp)
            raise RuntimeError(f"building the CPU driver stand-in failed:\n{' '.join([cc, *flags])}\n{r.stderr}")
        os.replace(tmp, path)  # atomic: concurrent test processes may build it too
    return path


class CpuDriver:
    """The stand-in while ``cpu_driver`` is active: its buffer registry, counters and the errors
    of refused launches."""

    def __init__(self, lib: ctypes.CDLL, path: str, execute: bool):
        self._lib, self.path, self.execute = lib, path, execute
        lib.nvkcpu_register.argtypes = lib.nvkcpu_unregister.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        lib.nvkcpu_find.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.POINTER(ctypes.c_size_t),
                                    ctypes.POINTER(ctypes.c_size_t)]
        lib.nvkcpu_set_error.argtypes = [ctypes.c_int, ctypes.c_char_p]
        lib.nvkcpu_counters.argtypes = [ctypes.POINTER(ctypes.c_longlong)]
        lib.nvkcpu_fail_alloc_after.argtypes = [ctypes.c_longlong]
        lib.nvkcpu_set_launch_callback.argtypes = [ctypes.c_void_p]
        lib.cuGetErrorString.argtypes = [ctypes.c_int, ctypes.POINTER(ctypes.c_char_p)]
        self.library = None  # the C library (ctypes) cpu_driver drives
        self.errors: List[str] = []
        self._touched = {}  # buffer start -> end of the furthest byte a launch accessed in it
        self._errors_lock = threading.Lock()
        self._callback = None

    # -------------------------------------------------------------- buffers
    def register(self, ptr: int, nbytes: int) -> None:
        """Makes [ptr, ptr + nbytes) known, as device memory the C library may be given."""
        if self._lib.nvkcpu_register(ptr, nbytes):
            raise ValueError(self._message(1))

    def unregister(self, ptr: int, nbytes: int) -> None:
        if self._lib.nvkcpu_unregister(ptr, nbytes):
            raise ValueError(self._message(1))

    @contextlib.contextmanager
    def registered(self, *objs):
        """Registers, for the block, each tensor's extent (or (ptr, nbytes) pair, or object with
        ``__cuda_array_interface__``); None is skipped."""
        spans = [s for s in map(_span, objs) if s is not None]
        done = []
        try:
            for s in spans:
                self.register(*s)
                done.append(s)
            yield
        finally:
            for s in reversed(done):
                self.unregister(*s)

    def find(self, ptr: int, nbytes: int = 1):
        """(start, size) of the innermost known buffer holding [ptr, ptr + nbytes), else None."""
        start, size = ctypes.c_size_t(), ctypes.c_size_t()
        if self._lib.nvkcpu_find(ptr, nbytes, ctypes.byref(start), ctypes.byref(size)):
            return start.value, size.value
        return None

    # -------------------------------------------------------------- counters, faults
    def counters(self) -> dict:
        """Launches, cuMemAlloc / cuMemFree calls, copies, synchronizations and memsets since the
        last ``reset_counters``, and the cuMemAlloc allocations alive now and their bytes."""
        out = (ctypes.c_longlong * len(COUNTERS))()
        self._lib.nvkcpu_counters(out)
        return dict(zip(COUNTERS, out))

    def reset_counters(self) -> None:
        """Zeroes the counters and forgets the errors and the reach of past launches."""
        self._lib.nvkcpu_reset_counters()
        with self._errors_lock:
            self.errors.clear()
            self._touched.clear()

    def reach(self, ptr: int) -> int:
        """Bytes from ``ptr`` to the end of the furthest byte the launches since the last
        ``reset_counters`` accessed in the buffer that starts at ``ptr`` or holds it (0: none);
        ``execute=True`` only. E.g. how much of a workspace the kernels really used."""
        with self._errors_lock:
            start = ptr if ptr in self._touched else None
        if start is None:  # ptr inside a buffer that is still known
            buf = self.find(ptr)
            if buf is None:
                return 0
            start = buf[0]
        with self._errors_lock:
            end = self._touched.get(start, ptr)
        return max(0, end - ptr)

    def _touch(self, buffer: int, end: int) -> None:
        with self._errors_lock:
            self._touched[buffer] = max(self._touched.get(buffer, end), end)

    def fail_alloc_after(self, n: Optional[int]) -> None:
        """Lets ``n`` more cuMemAlloc calls succeed, then fails every one (None: never fail)."""
        self._lib.nvkcpu_fail_alloc_after(-1 if n is None else n)

    def _message(self, code: int) -> str:
        s = ctypes.c_char_p()
        self._lib.cuGetErrorString(code, ctypes.byref(s))
        return s.value.decode(errors="replace")

    # -------------------------------------------------------------- execute mode
    def _install(self, manifest_json: str) -> None:
        from . import _interpret
        from ..ops import _interpreter
        _interpreter.patch()  # Triton < 3.8 with NumPy >= 2.4; launches from several threads
        _interpret.install_checks()
        ex = _interpret.Executor(manifest_json, self.find, self._touch)

        def on_launch(name, image, gx, gy, gz, bx, by, bz, shared, stream, params, n):
            try:
                ex.launch(name.decode(), image, (gx, gy, gz), (bx, by, bz), shared, params, n)
                return 0
            except Exception as err:  # noqa: BLE001 - a C caller is on the stack: report, never raise
                msg = str(err) if isinstance(err, _interpret.LaunchError) else f"{type(err).__name__}: {err}"
                with self._errors_lock:
                    self.errors.append(msg)
                self._lib.nvkcpu_set_error(1, msg.encode(errors="replace"))
                return 1  # CUDA_ERROR_INVALID_VALUE
        self._callback = _LAUNCH_CB(on_launch)
        self._lib.nvkcpu_set_launch_callback(ctypes.cast(self._callback, ctypes.c_void_p))

    def _uninstall(self) -> None:
        self._lib.nvkcpu_set_launch_callback(None)
        self._callback = None


def _span(obj):
    if obj is None:
        return None
    if isinstance(obj, tuple):
        return obj
    cai = getattr(obj, "__cuda_array_interface__", None)
    if cai is not None:
        n = 1
        for d in cai["shape"]:
            n *= d
        if cai.get("strides") is not None:
            raise ValueError("registered arrays must be contiguous")
        import numpy as np
        return cai["data"][0], n * np.dtype(cai["typestr"]).itemsize
    n = obj.numel() * obj.element_size()  # a torch tensor: its extent, not its storage's
    return (obj.data_ptr(), n) if n else None


def _require_interpreter():
    import triton
    from .. import ops
    if not isinstance(ops.module("mlp")._mlp_kernel, triton.runtime.interpreter.InterpretedFunction):
        raise RuntimeError("cpu_driver(execute=True) runs the kernels under Triton's interpreter: set "
                           "TRITON_INTERPRET=1 before nextvit_kernels' kernels are first imported (or use "
                           "execute=False to count launches only)")


_active: Optional[CpuDriver] = None
_active_lock = threading.Lock()


@contextlib.contextmanager
def cpu_driver(execute: bool = True, library: Optional[str] = None, compute_capability: int = 90):
    """Makes the C library of this process launch through the CPU stand-in for the block: the
    installed one (``$NEXTVIT_CLIB`` or next to the package), or the ``libnextvit_kernels.so`` at
    ``library``. Within it ``nextvit_kernels.clib`` and ``nextvit_kernels.runtime`` take host memory
    where they take device memory. Yields the ``CpuDriver`` (``.library``: the C library it drives,
    ctypes). ``compute_capability`` is the device's (90: the sm_90 cubins are loaded; 80: the sm_80
    ones). Not re-entrant; no C call may be in flight when it starts or ends."""
    global _active
    from .. import _library
    with _active_lock:
        if _active is not None:
            raise RuntimeError("cpu_driver is already active")
        path = driver_library()
        drv = CpuDriver(ctypes.CDLL(path), path, execute)
        lib = _library.open_default() if library is None else _library.open_path(library)
        drv.library = lib
        if execute:
            _require_interpreter()
            drv._install(lib.manifest())
        else:
            drv._uninstall()  # counts from now on, TRITON_INTERPRET=1 or not (no hosted mode)
        drv._lib.nvkcpu_set_compute_capability(int(compute_capability))
        old_env = os.environ.get(DRIVER_ENV)
        os.environ[DRIVER_ENV] = path
        lib.reset_driver()
        # The stand-in stays loaded between activations: each starts with an empty module table
        # (the C library has just forgotten its handles) and counts from zero, as its errors do.
        drv._lib.nvkcpu_reset_modules()
        drv.reset_counters()
        _library.host, _library.host_lib = drv, lib
        _active = drv
    try:
        yield drv
    finally:
        with _active_lock:
            _library.host = _library.host_lib = None
            if old_env is None:
                os.environ.pop(DRIVER_ENV, None)
            else:
                os.environ[DRIVER_ENV] = old_env
            lib.reset_driver()
            drv._uninstall()
            _active = None


# ------------------------------------------------------------------ hosted execute mode
_hosted: List[CpuDriver] = []  # what _host installed: its ctypes callback must stay alive


def _libpython() -> str:
    """The shared libpython of this interpreter: the one mapped into this process, else the one
    sysconfig names; RuntimeError when Python is not built with --enable-shared."""
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                fields = line.split(None, 5)
                path = fields[5].strip() if len(fields) == 6 else ""
                if os.path.basename(path).startswith("libpython3") and ".so" in path and os.path.exists(path):
                    return path
    except OSError:
        pass
    libdir, multiarch = sysconfig.get_config_var("LIBDIR") or "", sysconfig.get_config_var("MULTIARCH") or ""
    if sysconfig.get_config_var("Py_ENABLE_SHARED"):
        for d in (libdir, os.path.join(libdir, multiarch), sysconfig.get_config_var("LIBPL") or ""):
            for name in (sysconfig.get_config_var("INSTSONAME"), sysconfig.get_config_var("LDLIBRARY")):
                if d and name and os.path.exists(os.path.join(d, name)):
                    return os.path.join(d, name)
    raise RuntimeError(f"the stand-in's hosted execute mode embeds Python, and {sys.executable} has no shared "
                       f"libpython to embed (Py_ENABLE_SHARED={sysconfig.get_config_var('Py_ENABLE_SHARED')}, "
                       f"LIBDIR={libdir}): use a Python built with --enable-shared")


def hosted_environment(library: Optional[str] = None) -> Dict[str, str]:
    """The environment variables a process that is not this Python one (a C program, an inference
    server) needs for the C library's launches to be computed through the stand-in, each under
    Triton's interpreter (the module docstring's hosted execute mode): the stand-in
    (``$NEXTVIT_CUDA_DRIVER``), ``TRITON_INTERPRET=1``, this interpreter's libpython
    (``$NEXTVIT_CPU_DRIVER_PYTHON``) and ``sys.path`` with this package's own directory first
    (``$NEXTVIT_CPU_DRIVER_PYTHONPATH``); with ``library``, ``$NEXTVIT_CLIB`` naming it, the manifest's
    source when the launching library cannot be told. Builds the stand-in if needed."""
    package_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    paths = []
    for p in [package_root, *sys.path]:
        p = os.path.abspath(p or os.getcwd())
        if p not in paths and os.path.exists(p):
            paths.append(p)
    env = {DRIVER_ENV: driver_library(), "TRITON_INTERPRET": "1", PYTHON_ENV: _libpython(),
           PYTHONPATH_ENV: os.pathsep.join(paths)}
    if library is not None:
        from .. import _library
        path = os.path.join(library, _library.NAME) if os.path.isdir(library) else library
        if not os.path.exists(path):  # now, not at the first launch of the other process
            raise RuntimeError(f"no C library at {path}")
        env["NEXTVIT_CLIB"] = os.path.abspath(path)
    return env


def _host(driver: str, library: Optional[str]) -> None:
    """The hosted mode's bootstrap (cpu_driver.c runs it at the first launch of a process that
    Python's cpu_driver does not manage): installs the execute-mode callback into the stand-in at
    ``driver``, with the manifest of the C library at ``library`` (None: ``$NEXTVIT_CLIB`` or the
    installed one)."""
    from .. import _library
    try:  # the copy the launches go through, already loaded: RTLD_NOLOAD returns its handle
        lib = ctypes.CDLL(driver, mode=os.RTLD_NOW | os.RTLD_NOLOAD)
    except OSError as err:
        raise RuntimeError(f"the stand-in {driver} is not loaded in this process: {err}") from None
    drv = CpuDriver(lib, driver, True)
    drv.library = _library.open_path(library) if library else _library.open_default()
    _require_interpreter()
    drv._install(drv.library.manifest())
    _hosted.append(drv)

