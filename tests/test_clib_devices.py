"""The device rules of the C library and of its Python front end (clib.py), on the CPU.

Python side: every tensor of a call must be on the input's device, checked before anything
needs CUDA; the call runs on the input's device with that device's current stream.

C side: csrc/src/nextvit_kernels.c (with nvk_model.c) is compiled here with a two-op shape-class table (one head kernel,
an MLP class that runs split into a workspace) and dlopens a fake ``libcuda.so.1`` built
from STUB below: three devices with one context each, a per-thread context stack, stream
handles 0x1000 * (device + 1), device pointers (device + 1) << 40 | offset. The fake driver
records pushes, pops, module loads per device and every launch (with the device current at
launch, and launches of a stream from another context, which a real driver refuses). Each
test runs in a fresh interpreter (the library keeps its driver and contexts per process) that
imports neither torch nor the package, so a real driver is never loaded."""
import contextlib
import os
import shutil
import subprocess
import sys
import textwrap
import types

import pytest
import torch

from nextvit_kernels import clib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

STUB = r"""
#include <stddef.h>
#include <stdint.h>
typedef int CUresult;
typedef struct { int dev; } ctx_t;
static ctx_t ctxs[3] = {{0}, {1}, {2}};
static ctx_t* stack[16];
static int depth;
int stub_pushes, stub_pops, stub_launches, stub_launch_dev = -1, stub_wrong_ctx, stub_fail_launch;
int stub_loads[3];
uintptr_t stub_launch_stream;

static int stream_dev(uintptr_t s) { return s >= 0x1000 && s <= 0x3000 && s % 0x1000 == 0 ? (int)(s / 0x1000) - 1 : -1; }
void stub_reset(int current) { /* -1: no context current */
  depth = 0;
  if (current >= 0) stack[depth++] = &ctxs[current];
  stub_pushes = stub_pops = stub_launches = stub_wrong_ctx = stub_fail_launch = 0;
  stub_launch_dev = -1;
}
int stub_current(void) { return depth ? stack[depth - 1]->dev : -1; }
int stub_depth(void) { return depth; }

CUresult cuInit(unsigned f) { (void)f; return 0; }
CUresult cuDriverGetVersion(int* v) { *v = 12080; return 0; }
CUresult cuCtxGetCurrent(void** c) { *c = depth ? stack[depth - 1] : NULL; return 0; }
CUresult cuCtxSetCurrent(void* c) {
  if (!c) { if (depth) --depth; return 0; }
  if (depth) stack[depth - 1] = c; else stack[depth++] = c;
  return 0;
}
CUresult cuCtxGetDevice(int* d) { if (!depth) return 201; *d = stack[depth - 1]->dev; return 0; }
CUresult cuCtxPushCurrent_v2(void* c) { if (depth == 16) return 1; stack[depth++] = c; ++stub_pushes; return 0; }
CUresult cuCtxPopCurrent_v2(void** c) { if (!depth) return 201; *c = stack[--depth]; ++stub_pops; return 0; }
CUresult cuStreamGetCtx(void* s, void** c) {
  if ((uintptr_t)s <= 2) { *c = depth ? stack[depth - 1] : NULL; return 0; }
  int d = stream_dev((uintptr_t)s);
  if (d < 0) return 400;
  *c = &ctxs[d];
  return 0;
}
CUresult cuDeviceGet(int* d, int ordinal) { *d = ordinal; return 0; }
CUresult cuDevicePrimaryCtxRetain(void** c, int d) { *c = &ctxs[d]; return 0; }
CUresult cuDeviceGetAttribute(int* v, int attr, int d) {
  (void)d;
  *v = attr == 75 ? 9 : attr == 76 ? 0 : attr == 97 ? 232448 : 0;
  return 0;
}
CUresult cuModuleLoadData(void** m, const void* image) {
  if (!depth) return 201;
  ++stub_loads[stack[depth - 1]->dev];
  *m = (void*)image;
  return 0;
}
CUresult cuModuleGetFunction(void** f, void* m, const char* name) { (void)m; *f = (void*)name; return 0; }
CUresult cuFuncSetAttribute(void* f, int a, int v) { (void)f; (void)a; (void)v; return 0; }
CUresult cuFuncGetAttribute(int* v, int a, void* f) { (void)a; (void)f; *v = 0; return 0; }
CUresult cuLaunchKernel(void* f, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by, unsigned bz,
                        unsigned shared, void* s, void** params, void** extra) {
  (void)f; (void)gx; (void)gy; (void)gz; (void)bx; (void)by; (void)bz; (void)shared; (void)params; (void)extra;
  if (!depth) return 201;
  if (stub_fail_launch) return 700;
  int d = stream_dev((uintptr_t)s);
  if ((uintptr_t)s > 2 && d != stack[depth - 1]->dev) { ++stub_wrong_ctx; return 400; }
  ++stub_launches;
  stub_launch_dev = stack[depth - 1]->dev;
  stub_launch_stream = (uintptr_t)s;
  return 0;
}
CUresult cuPointerGetAttribute(void* data, int attr, unsigned long long p) {
  if (attr != 9 || p < (1ull << 40) || p >= (4ull << 40)) return 1;
  *(int*)data = (int)(p >> 40) - 1;
  return 0;
}
CUresult cuGetErrorString(CUresult r, const char** s) {
  *s = r == 1 ? "CUDA_ERROR_INVALID_VALUE" : r == 700 ? "CUDA_ERROR_ILLEGAL_ADDRESS" : "stub error";
  return 0;
}
/* the whole-model runtime's (not used here) */
CUresult cuMemAlloc_v2(unsigned long long* p, size_t n) { (void)p; (void)n; return 2; }
CUresult cuMemFree_v2(unsigned long long p) { (void)p; return 1; }
CUresult cuMemcpyHtoD_v2(unsigned long long d, const void* s, size_t n) { (void)d; (void)s; (void)n; return 1; }
"""

# head: fp16, (c, n_classes) = (64, 10); mlp: fp16, (c1, c2, hidden, c_out, residual) =
# (64, 0, 128, 512, 0), two kernels (fc1 into the workspace, then fc2). Argument counts: what
# nvk_head / nvk_mlp build (the library checks them against n_full).
TABLE = r"""
#include "nvk_table.h"
static const unsigned char img[] = "not a cubin";
#define K(id, op, n) {id, id, op, 1, 4, n, 2, n, (1ull << n) - 1, img, sizeof img, 0, img, sizeof img, 0, "ptx"}
const nvk_kernel_t nvk_kernels[] = {K("head", NVK_OP_HEAD, 14), K("mlp_fc1", NVK_OP_MLP, 9), K("mlp_fc2", NVK_OP_MLP, 13)};
const int nvk_num_kernels = 3;
const nvk_shape_class_t nvk_shape_classes[] = {
    {NVK_OP_HEAD, 1, {64, 10}, 0, -1, {0}, 1, {16}},
    {NVK_OP_MLP, 1, {64, 0, 128, 512, 0}, 0, -1, {1, 2}, 2, {64, 256, 64, 64}},
};
const int nvk_num_shape_classes = 2;
const char nvk_aot_info[] = "stub table of the CPU tests";
const char nvk_manifest_json[] = "{}";
"""

PRELUDE = r"""
import ctypes, sys
cu = ctypes.CDLL("libcuda.so.1")  # the fake driver (LD_LIBRARY_PATH): the object the library dlopens
lib = ctypes.CDLL(sys.argv[1])
VP, I = ctypes.c_void_p, ctypes.c_int
lib.nvk_head.argtypes = [VP] * 4 + [I] * 6 + [VP]
lib.nvk_mlp.argtypes = [VP] * 8 + [I] * 9 + [VP]
lib.nvk_load.argtypes = [VP]
lib.nvk_last_error.restype = ctypes.c_char_p

def n(name):
    return ctypes.c_int.in_dll(cu, name).value

def loads(dev):
    return (ctypes.c_int * 3).in_dll(cu, "stub_loads")[dev]

def ptr(dev, i=0):
    return ((dev + 1) << 40) + 256 * i

def stream(dev):
    return 0x1000 * (dev + 1)

def err():
    return lib.nvk_last_error().decode()

def head(devs, s):  # devs: devices of x, w, b, out
    return lib.nvk_head(*[ptr(d, i) for i, d in enumerate(devs)], 2, 7, 7, 64, 10, 1, s)

def mlp(devs, s):  # devs: devices of x, fc1_w, fc1_b, fc2_w, fc2_b, out, workspace (x2: NULL)
    ps = [ptr(d, i) for i, d in enumerate(devs)]
    return lib.nvk_mlp(ps[0], None, *ps[1:], 2, 7, 7, 64, 0, 128, 512, 0, 1, s)

def check(status, want, current, depth, launches=None):
    assert status == want, (status, err())
    assert cu.stub_current() == current, ("current context's device", cu.stub_current(), current)
    assert cu.stub_depth() == depth, ("context stack depth", cu.stub_depth(), depth)
    assert n("stub_pushes") == n("stub_pops"), (n("stub_pushes"), n("stub_pops"))
    assert n("stub_wrong_ctx") == 0, "a stream was launched in another device's context"
    if launches is not None:
        assert n("stub_launches") == launches, (n("stub_launches"), launches)
"""


@pytest.fixture(scope="module")
def stub_build(tmp_path_factory):
    cc = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler (cc/gcc) to build the library against the fake driver")
    d = tmp_path_factory.mktemp("nvk_stub")
    (d / "stub.c").write_text(STUB)
    (d / "table.c").write_text(TABLE)
    drv = d / "driver"
    drv.mkdir()
    warn = ["-std=c11", "-Wall", "-Wextra", "-O1", "-fPIC", "-shared"]
    r = subprocess.run([cc, *warn, "-Wl,-soname,libcuda.so.1", str(d / "stub.c"), "-o", str(drv / "libcuda.so.1")],
                       capture_output=True, text=True)
    assert r.returncode == 0 and not r.stderr, r.stderr
    so = d / "libnvk_stub_test.so"
    # as CMakeLists.txt builds the library: hidden visibility, no undefined symbols
    r = subprocess.run([cc, *warn, "-fvisibility=hidden", "-Wl,--no-undefined",
                        "-I", os.path.join(ROOT, "csrc", "include"), "-I", os.path.join(ROOT, "csrc", "src"),
                        os.path.join(ROOT, "csrc", "src", "nextvit_kernels.c"),
                        os.path.join(ROOT, "csrc", "src", "nvk_model.c"), str(d / "table.c"),
                        "-o", str(so), "-ldl", "-lpthread", "-lm"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert not r.stderr, f"compiler warnings:\n{r.stderr}"
    return str(so), str(drv)


def _run(stub_build, body):
    so, drv = stub_build
    env = dict(os.environ, LD_LIBRARY_PATH=os.pathsep.join([drv, os.environ.get("LD_LIBRARY_PATH", "")]))
    code = PRELUDE + textwrap.dedent(body)
    r = subprocess.run([sys.executable, "-c", code, so], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr[-4000:]


def test_launches_in_the_streams_context_and_restores_the_callers(stub_build):
    _run(stub_build, """
        # device 0 current, everything on device 1: the stream's context is pushed, then popped
        cu.stub_reset(0)
        check(head([1, 1, 1, 1], stream(1)), 0, current=0, depth=1, launches=1)
        assert n("stub_launch_dev") == 1 and n("stub_pushes") == 1
        assert loads(1) == 3 and loads(0) == 0, "the kernels load in the stream's context"
        # the stream's context already current: nothing pushed; modules not loaded again
        cu.stub_reset(1)
        check(head([1, 1, 1, 1], stream(1)), 0, current=1, depth=1, launches=1)
        assert n("stub_pushes") == 0 and loads(1) == 3
        # no context current: the stream's for the call, none afterwards
        cu.stub_reset(-1)
        check(head([2, 2, 2, 2], stream(2)), 0, current=-1, depth=0, launches=1)
        assert n("stub_launch_dev") == 2
        # a split op: both kernels in the stream's context, one push for the call
        cu.stub_reset(0)
        check(mlp([1, 1, 1, 1, 1, 1, 1], stream(1)), 0, current=0, depth=1, launches=2)
        assert n("stub_launch_dev") == 1 and n("stub_pushes") == 1
        # nvk_load(stream): the stream's context, caller's restored
        cu.stub_reset(0)
        check(lib.nvk_load(stream(2)), 0, current=0, depth=1, launches=0)
        assert loads(2) == 3
        # NULL / legacy default stream: the current context, no push
        cu.stub_reset(1)
        check(head([1, 1, 1, 1], None), 0, current=1, depth=1, launches=1)
        check(head([1, 1, 1, 1], 1), 0, current=1, depth=1, launches=2)
        assert n("stub_launch_dev") == 1 and n("stub_pushes") == 0 and n("stub_launch_stream") == 1
        # NULL stream and no context: device 0's primary context, left current (as the runtime does)
        cu.stub_reset(-1)
        check(head([0, 0, 0, 0], None), 0, current=0, depth=1, launches=1)
        assert loads(0) == 3
        """)


def test_refuses_pointers_of_another_device(stub_build):
    _run(stub_build, """
        cu.stub_reset(0)
        check(head([0, 1, 0, 0], stream(0)), 1, current=0, depth=1, launches=0)
        assert err() == "nvk_head: w is on device 1 but the stream belongs to device 0", err()
        # the refused call pops the stream's context it pushed
        check(head([0, 1, 1, 1], stream(1)), 1, current=0, depth=1, launches=0)
        assert err() == "nvk_head: x is on device 0 but the stream belongs to device 1", err()
        assert n("stub_pushes") == 1
        cu.stub_reset(1)
        check(head([1, 1, 1, 0], None), 1, current=1, depth=1, launches=0)
        assert err() == ("nvk_head: out is on device 0 but the default stream runs in the current context, "
                         "on device 1"), err()
        # a pointer the driver does not know (host memory)
        check(lib.nvk_head(ptr(1), ptr(1, 1), 1 << 20, ptr(1, 2), 2, 7, 7, 64, 10, 1, stream(1)), 1, current=1,
              depth=1, launches=0)
        assert err().startswith("nvk_head: b = 0x100000 is not memory the CUDA driver knows") and \\
            "CUDA_ERROR_INVALID_VALUE" in err(), err()
        # every pointer is checked: the workspace, the weights
        cu.stub_reset(0)
        check(mlp([1, 1, 1, 1, 1, 1, 2], stream(1)), 1, current=0, depth=1, launches=0)
        assert err() == "nvk_mlp: workspace is on device 2 but the stream belongs to device 1", err()
        check(mlp([1, 1, 1, 0, 1, 1, 1], stream(1)), 1, current=0, depth=1, launches=0)
        assert err() == "nvk_mlp: fc2_w is on device 0 but the stream belongs to device 1", err()
        # a message is cleared by the next successful call
        check(head([1, 1, 1, 1], stream(1)), 0, current=0, depth=1, launches=1)
        assert err() == ""
        """)


def test_pops_the_context_when_a_launch_fails(stub_build):
    _run(stub_build, """
        cu.stub_reset(0)
        ctypes.c_int.in_dll(cu, "stub_fail_launch").value = 1
        check(mlp([1, 1, 1, 1, 1, 1, 1], stream(1)), 3, current=0, depth=1, launches=0)
        assert err().startswith("cuLaunchKernel failed: CUDA error 700 (CUDA_ERROR_ILLEGAL_ADDRESS)"), err()
        assert n("stub_pushes") == 1
        """)


def _t(*shape, device="cpu"):
    return torch.randn(*shape, device=device)


# valid CPU arguments of every clib function (shapes only: nothing is launched)
CALLS = {
    "conv_bn_relu": lambda: dict(x=_t(1, 8, 4, 4), w=_t(16, 8, 3, 3), b=_t(16), stride=1),
    "patch_embed": lambda: dict(x=_t(1, 8, 4, 4), w=_t(16, 8), b=_t(16), stride=2),
    "mhca": lambda: dict(x=_t(1, 32, 4, 4), conv_w=_t(32, 32, 3, 3), conv_b=_t(32), proj_w=_t(32, 32, 1, 1)),
    "mlp": lambda: dict(x=_t(1, 8, 4, 4), x2=_t(1, 4, 4, 4), fc1_w=_t(16, 12), fc1_b=_t(16), fc2_w=_t(12, 16),
                        fc2_b=_t(12)),
    "e_mhsa": lambda: dict(x=_t(1, 32, 4, 4), q_w=_t(32, 32), q_b=_t(32), k_w=_t(32, 32), k_b=_t(32),
                           v_w=_t(32, 32), v_b=_t(32), proj_w=_t(32, 32), proj_b=_t(32), sr_ratio=2, head_dim=32),
    "head": lambda: dict(x=_t(1, 8, 4, 4), w=_t(10, 8), b=_t(10)),
}
TENSOR_ARGS = [(op, name) for op, f in CALLS.items() for name, v in f().items()
               if isinstance(v, torch.Tensor) and name != "x"]


@pytest.mark.parametrize("op,name", TENSOR_ARGS, ids=[f"{o}-{n}" for o, n in TENSOR_ARGS])
def test_python_refuses_a_tensor_on_another_device(op, name):
    kw = CALLS[op]()
    kw[name] = kw[name].to("meta")
    with pytest.raises(ValueError, match=rf"^{op}: {name} is on meta but the input is on cpu$"):
        getattr(clib, op)(**kw)


@pytest.mark.parametrize("op", list(CALLS))
def test_python_checks_every_device_before_needing_cuda(op):
    """All on one (non-CUDA) device: the only complaint is the device type, raised before the
    library is loaded (its absence would be a RuntimeError)."""
    with pytest.raises(ValueError, match=rf"^{op}: the C library needs CUDA tensors, got cpu$"):
        getattr(clib, op)(**CALLS[op]())


@pytest.mark.parametrize("stream,current,switch", [(0, 0, True), (0, 1, False), (0xabc0, 0, False)])
def test_python_launches_on_the_inputs_device(monkeypatch, stream, current, switch):
    """_launch passes torch's current stream of the input's device (cuda:1 here); with the
    default (NULL) stream, which the library runs in the current context, it makes that device
    current for the call."""
    events = []

    def current_stream(device):
        events.append(("current_stream", device))
        return types.SimpleNamespace(cuda_stream=stream)

    @contextlib.contextmanager
    def device(d):
        events.append(("enter", d))
        yield
        events.append(("exit", d))

    monkeypatch.setattr(torch.cuda, "current_stream", current_stream)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: current)
    monkeypatch.setattr(torch.cuda, "device", device)
    x = types.SimpleNamespace(device=torch.device("cuda", 1))
    clib._launch("mlp", lambda *args: events.append(("call", args)) or 0, x, 11, 22)
    dev = torch.device("cuda", 1)
    call = ("call", (11, 22, stream))
    want = [("current_stream", dev)] + ([("enter", dev), call, ("exit", dev)] if switch else [call])
    assert events == want


def test_python_front_end_loads_the_library(stub_build):
    """clib.load() / version() over ctypes on the library built here (fresh interpreter)."""
    so, drv = stub_build
    code = ("from nextvit_kernels import clib\n"
            "assert clib.available(), clib._load_error\n"
            "from nextvit_kernels import _library\n"
            "assert isinstance(clib.load(), _library.CtypesLib)\n"
            "assert 'stub table of the CPU tests' in clib.version(), clib.version()\n")
    env = dict(os.environ, PYTHONPATH=ROOT, NEXTVIT_CLIB=so)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
