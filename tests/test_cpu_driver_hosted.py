"""The CPU stand-in's hosted execute mode (``nextvit_kernels.testing``): a process that is not Python
(``test_cpu_driver_hosted.c``, a C program linking libnextvit_kernels.so, as an inference server's
backend does), started with ``testing.hosted_environment()``, gets computed results: the stand-in
embeds Python at the first launch and runs every launch under Triton's interpreter, from any
thread. Also: Python joined instead of embedded, the failures (a variable missing, the bootstrap's
import error) as the C call's message, and counting without TRITON_INTERPRET=1.

Everything runs in child processes; the module is in tests/_workers.py SANITIZED_MODULES because
those load the C library and the stand-in under test (built with ASan + UBSan on a sanitized worker,
and so is the program then)."""
import os
import struct
import subprocess
import sys

import pytest
import torch

import nextvit_kernels as nk
from nextvit_kernels import testing
from _util import SANITIZE, assert_close, c_compiler, child_env, cpu_driver_library, randomize_, sanitized

LIBRARY, MANIFEST = cpu_driver_library()
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HEAD = next(r for r in MANIFEST["shape_classes"] if r["op"] == "head" and r["dtype"] == "fp32")
POISON = struct.unpack("<f", b"\xa5" * 4)[0]  # what the stand-in's cuMemAlloc fills fresh memory with
TIMEOUT = 600


@pytest.fixture(scope="module")
def hosted_env():
    try:
        extra = testing.hosted_environment(LIBRARY)
    except RuntimeError as err:  # a Python without a shared libpython
        pytest.skip(str(err))
    return child_env(dict(os.environ, **extra))


@pytest.fixture(scope="module")
def program(tmp_path_factory):
    exe = tmp_path_factory.mktemp("hosted") / "hosted"
    libdir = os.path.dirname(LIBRARY)
    flags = list(SANITIZE) if sanitized() else []  # the library is built with ASan there: so is its program
    r = subprocess.run([c_compiler(), "-std=c11", "-O2", *flags, "-Wall", "-Wextra", "-Werror",
                        "-I", os.path.join(ROOT, "csrc", "include"), os.path.join(ROOT, "tests", "test_cpu_driver_hosted.c"),
                        "-o", str(exe), "-L", libdir, "-lnextvit_kernels", f"-Wl,-rpath,{libdir}", "-ldl", "-lpthread"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return str(exe)


def _outputs(stdout, threads, shape):
    lines = stdout.splitlines()
    assert [int(line.split()[0]) for line in lines] == list(range(threads)), stdout[-2000:]
    return [torch.tensor([float(v) for v in line.split()[1:]]).view(shape) for line in lines]


@pytest.fixture(scope="module")
def head_case(tmp_path_factory):
    """(argv after the program's "head", the float64 reference): fp32 head inputs in a file."""
    c, n = HEAD["key"]["c"], HEAD["key"]["n_classes"]
    b, h, w = 2, 3, max(3, -(-HEAD["probe_lo"] // 3))  # inside the first probe class
    x = torch.randn(b, h, w, c, dtype=torch.float64)  # NHWC
    wt, bias = torch.randn(n, c, dtype=torch.float64) * c ** -0.5, torch.randn(n, dtype=torch.float64) * 0.1
    path = tmp_path_factory.mktemp("head") / "head.f32"
    path.write_bytes(torch.cat([x.flatten(), wt.flatten(), bias]).float().numpy().tobytes())
    ref = torch.nn.functional.linear(x.float().double().mean(dim=(1, 2)), wt.float().double(), bias.float().double())
    return [str(path), str(b), str(h), str(w), str(c), str(n)], ref


def _head(program, env, case, threads, timeout=TIMEOUT):
    return subprocess.run([program, "head", *case[0], str(threads)], capture_output=True, text=True, env=env,
                          timeout=timeout)


def test_head_from_four_threads_is_computed(program, hosted_env, head_case):
    """Four threads launch at once, each on a stream of its own: every output is the head's."""
    r = _head(program, hosted_env, head_case, 4)
    assert r.returncode == 0, r.stderr[-4000:]
    for i, out in enumerate(_outputs(r.stdout, 4, head_case[1].shape)):
        assert_close(out, head_case[1], torch.float32, what=f"thread {i}:")


def test_without_triton_interpret_launches_are_counted(program, hosted_env, head_case):
    env = {k: v for k, v in hosted_env.items() if k != "TRITON_INTERPRET"}
    r = _head(program, env, head_case, 1)
    assert r.returncode == 0, r.stderr[-4000:]
    (out,) = _outputs(r.stdout, 1, head_case[1].shape)
    assert (out == POISON).all(), "a kernel ran without TRITON_INTERPRET=1"


def test_without_the_libpython_variable_the_call_fails_naming_it(program, hosted_env, head_case):
    env = {k: v for k, v in hosted_env.items() if k != testing.PYTHON_ENV}
    r = _head(program, env, head_case, 2, timeout=60)
    assert r.returncode == 1 and r.stdout == "", (r.stdout, r.stderr)
    assert "hosted: nvk_head: cuLaunchKernel failed: CUDA error 999 (CUDA_ERROR_UNKNOWN: CPU stand-in: " \
           "cuLaunchKernel(" in r.stderr, r.stderr
    assert f"set {testing.PYTHON_ENV} to the libpython to load" in r.stderr, r.stderr


def test_the_bootstraps_exception_is_the_calls_message(program, hosted_env, head_case, tmp_path):
    """A package that fails to import (planted first on the bootstrap's path): its exception text."""
    fake = tmp_path / "nextvit_kernels"
    fake.mkdir()
    (fake / "__init__.py").write_text("raise ImportError('planted by the test')\n")
    env = dict(hosted_env, **{testing.PYTHONPATH_ENV: os.pathsep.join([str(tmp_path), hosted_env[testing.PYTHONPATH_ENV]])})
    r = _head(program, env, head_case, 2, timeout=120)
    assert r.returncode == 1 and r.stdout == "", (r.stdout, r.stderr)
    assert "CPU stand-in: cuLaunchKernel(" in r.stderr and "the Python bootstrap of hosted execute mode failed: " \
           "ImportError: planted by the test" in r.stderr, r.stderr


JOINED = """
import ctypes, os, sys
import torch
from nextvit_kernels import _library
lib = _library.open_path(sys.argv[1])
d = ctypes.CDLL(os.environ["NEXTVIT_CUDA_DRIVER"])
d.cuMemAlloc_v2.argtypes = [ctypes.POINTER(ctypes.c_uint64), ctypes.c_size_t]
d.cuMemcpyHtoD_v2.argtypes = [ctypes.c_uint64, ctypes.c_void_p, ctypes.c_size_t]
d.cuMemcpyDtoH_v2.argtypes = [ctypes.c_void_p, ctypes.c_uint64, ctypes.c_size_t]
d.cuDevicePrimaryCtxRetain.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.c_int]
d.cuCtxSetCurrent.argtypes = [ctypes.c_void_p]
ctx = ctypes.c_void_p()
assert d.cuInit(0) == 0 and d.cuDevicePrimaryCtxRetain(ctypes.byref(ctx), 0) == 0 and d.cuCtxSetCurrent(ctx) == 0
def dev(t):
    p = ctypes.c_uint64()
    assert d.cuMemAlloc_v2(ctypes.byref(p), t.numel() * 4) == 0 and d.cuMemcpyHtoD_v2(p.value, t.data_ptr(), t.numel() * 4) == 0
    return p.value
b, h, w, c, n = (int(a) for a in sys.argv[2:])
x, wt, bias = torch.randn(b, h, w, c), torch.randn(n, c) * c ** -0.5, torch.randn(n) * 0.1
out = torch.zeros(b, n)
po = dev(out)
assert lib.head(dev(x), dev(wt), dev(bias), po, b, h, w, c, n, 0, None) == 0, lib.last_error()
assert d.cuMemcpyDtoH_v2(out.data_ptr(), po, out.numel() * 4) == 0
ref = torch.nn.functional.linear(x.double().mean(dim=(1, 2)), wt.double(), bias.double())
err = ((out - ref).abs().max() / ref.abs().max()).item()
assert err < 1e-5, err
assert "nextvit_kernels.testing" in sys.modules  # the bootstrap ran in this interpreter
print("ok")
"""


def test_a_python_process_is_joined_not_embedded(hosted_env, head_case):
    """Python calling the C library (here through ctypes) without cpu_driver, TRITON_INTERPRET=1 and
    the stand-in in its environment: the bootstrap runs in the process's own interpreter, no
    libpython variable needed."""
    env = {k: v for k, v in hosted_env.items() if k != testing.PYTHON_ENV}
    env["PYTHONPATH"] = os.pathsep.join([ROOT, env.get("PYTHONPATH", "")])
    r = subprocess.run([sys.executable, "-c", JOINED, LIBRARY, *head_case[0][1:]], capture_output=True, text=True,
                       env=env, timeout=TIMEOUT)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-4000:]


@pytest.mark.slow
def test_model_forward_from_two_threads_matches_pytorch(program, hosted_env, tmp_path):
    """The whole model through nvk_model_forward (a tiny NextViT with random weights, fp32, 64 x 64):
    every logit of both threads against the PyTorch model's."""
    torch.manual_seed(0)
    m = randomize_(nk.NextViT(depths=(1, 1, 5, 1)), gain=0.7).eval()
    path = nk.save_runtime(m, str(tmp_path / "tiny32.nvk"), dtype=torch.float32)
    x = torch.randn(1, 3, 64, 64)
    (tmp_path / "x.f32").write_bytes(x.numpy().tobytes())
    with torch.no_grad():
        ref = m(x)
    assert ref.abs().max() > 1e-3, "logits of this scale would pass any comparison: test is void"
    r = subprocess.run([program, "model", path, str(tmp_path / "x.f32"), "1", "64", "64", "2"], capture_output=True,
                       text=True, env=hosted_env, timeout=TIMEOUT)
    assert r.returncode == 0, r.stderr[-4000:]
    for i, out in enumerate(_outputs(r.stdout, 2, ref.shape)):
        assert_close(out, ref, torch.float32, what=f"thread {i}:")
