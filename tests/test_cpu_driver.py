"""The CPU stand-in of the CUDA driver itself (``nextvit_kernels.testing``): every launch it cannot
decode or that a GPU would refuse fails with a message naming the kernel and touches no memory it
was not given; its counting mode runs nothing; the C library picks the image of the device's
compute capability; nothing loads the stand-in unasked; and without it the C library is unchanged.

The refusals are provoked two ways: through the C library (pointers it may be given), and with
launches built by hand through the stand-in's own driver entry points, from the image and entry
name the C library itself launched for a head call (so this works with any library on a clean
clone, no AOT output needed) and the kernel's parameter list in the embedded manifest."""
import ctypes
import os
import re
import subprocess
import sys

import pytest
import torch

from nextvit_kernels import clib, testing
from _util import assert_close, cpu_driver_library, interpreted, rand_like_dtype, record_launches

LIBRARY, MANIFEST = cpu_driver_library()
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KERNELS = {k["id"]: k for k in MANIFEST["kernels"]}
HEAD = next(r for r in MANIFEST["shape_classes"] if r["op"] == "head" and r["dtype"] == "fp32")
HEAD_KERNEL = KERNELS[HEAD["kernels"][0]]
SM90_LIMIT = 232448  # 227 KB: sm_90's dynamic shared memory per block with the opt-in


def _head_inputs(batch=1):
    c, n = HEAD["key"]["c"], HEAD["key"]["n_classes"]
    h, w = 3, max(3, -(-HEAD["probe_lo"] // 3))  # inside the first probe class
    x, x64 = rand_like_dtype(batch, c, h, w, dtype=torch.float32)
    wt, w64 = rand_like_dtype(n, c, dtype=torch.float32, scale=c ** -0.5)
    b, b64 = rand_like_dtype(n, dtype=torch.float32, scale=0.1)
    x = x.contiguous(memory_format=torch.channels_last)
    out = torch.full((batch, n), float("nan"))
    return (x, wt, b, out), torch.nn.functional.linear(x64.mean(dim=(2, 3)), w64, b64)


def _message(d, rc):
    s = ctypes.c_char_p()
    d.cuGetErrorString(rc, ctypes.byref(s))
    return s.value.decode()


class HandLaunch:
    """A launch of the head kernel made by hand through the stand-in's cuModuleLoadData,
    cuModuleGetFunction, cuFuncSetAttribute and cuLaunchKernel; valid as built, each refusal case
    changes one thing."""

    def __init__(self, drv, launched):
        (self.x, self.w, self.b, self.out), self.ref = _head_inputs()
        self.image, self.symbol = launched["image"], launched["name"]
        self.grid, self.block, self.shared = launched["grid"], launched["block"], launched["shared"]
        self.attr = None  # cuFuncSetAttribute(MAX_DYNAMIC_SHARED_SIZE_BYTES) before the launch
        ptrs = dict(x_ptr=self.x, w_ptr=self.w, b_ptr=self.b, out_ptr=self.out)
        bsz, c, h, w = self.x.shape
        n = self.w.shape[0]
        ints = dict(HW=h * w, C=c, N=n, sxb=h * w * c, sxhw=c, swn=c, sob=n)
        self.params = []  # (name, ctypes type, value) in the kernel's order, hidden scratch last
        for p in HEAD_KERNEL["params"]:
            if p["passed"]:
                self.params.append((p["name"], ctypes.c_uint64, ptrs[p["name"]].data_ptr()) if p["type"] == "ptr"
                                   else (p["name"], ctypes.c_int32, ints[p["name"]]))
        for hp in HEAD_KERNEL["archs"]["sm_90"]["hidden_params"]:
            self.params.append((hp["name"], ctypes.c_uint64, 0))
        self.buffers = [self.x, self.w, self.b, self.out]  # registered for the launch
        self.d = drv._lib
        self.d.cuModuleLoadData.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.c_void_p]
        self.d.cuModuleGetFunction.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.c_void_p, ctypes.c_char_p]
        self.d.cuFuncSetAttribute.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int]
        self.d.cuLaunchKernel.argtypes = ([ctypes.c_void_p] + [ctypes.c_uint] * 7
                                          + [ctypes.c_void_p, ctypes.POINTER(ctypes.c_void_p), ctypes.c_void_p])
        self.d.cuGetErrorString.argtypes = [ctypes.c_int, ctypes.POINTER(ctypes.c_char_p)]

    def set(self, name, value):
        self.params = [(n, t, value if n == name else v) for n, t, v in self.params]

    def __call__(self, drv):
        """-> (CUresult, its message)."""
        mod, fn = ctypes.c_void_p(), ctypes.c_void_p()
        assert self.d.cuModuleLoadData(ctypes.byref(mod), self.image) == 0
        assert self.d.cuModuleGetFunction(ctypes.byref(fn), mod, self.symbol.encode()) == 0
        if self.attr is not None:
            rc = self.d.cuFuncSetAttribute(fn, 8, self.attr)
            if rc:
                return rc, _message(self.d, rc)
        values = [t(v) for _, t, v in self.params]
        arr = (ctypes.c_void_p * (len(values) + 1))(*[ctypes.addressof(v) for v in values], None)
        with drv.registered(*self.buffers):
            rc = self.d.cuLaunchKernel(fn, *self.grid, *self.block, self.shared, None, arr, None)
        return rc, _message(self.d, rc)


@pytest.fixture(scope="class")
def stand_in():
    mp = pytest.MonkeyPatch()
    seen = record_launches(mp)
    try:
        with testing.cpu_driver(library=LIBRARY) as drv:
            (x, w, b, _), _ = _head_inputs()
            clib.head(x, w, b)  # the C library loads the modules and launches the head kernel once
            assert len(seen) == 1 and drv.errors == []
            yield drv, seen[0]
    finally:
        mp.undo()


@pytest.fixture
def hand(stand_in):
    drv, launched = stand_in
    drv.reset_counters()
    return HandLaunch(drv, launched)


def _unknown_image(L):
    L.keep = ctypes.create_string_buffer(b"// a PTX module no manifest knows\n")
    L.image = ctypes.addressof(L.keep)


def _short_buffer(tensor_of):
    """Registers a tensor 16 bytes short: the kernel's last access through it is refused."""
    def f(L):
        t = tensor_of(L)
        L.buffers = [(t.data_ptr(), t.numel() * t.element_size() - 16) if u is t else u for u in L.buffers]
        L.short = t
    return f


def _not_divisible(L):
    """The first integer the kernel was compiled to assume a multiple of 16, one more."""
    name, value = next((n, v) for n, t, v in L.params
                       if any(p["name"] == n and p.get("div16") for p in HEAD_KERNEL["params"]))
    L.set(name, value + 1)


def _bits(t):
    return t.view(torch.int32).clone()  # NaN == NaN, bit for bit


# (id, change to the valid launch, what the message says: every one also names the kernel)
REFUSALS = [
    ("unknown-image", _unknown_image, r"unknown kernel image"),
    ("unknown-entry", lambda L: setattr(L, "symbol", "nvk_no_such_entry"),
     r"launched as entry 'nvk_no_such_entry', the image's entry is"),
    ("parameter-short", lambda L: setattr(L, "params", L.params[:-1]), r"kernel parameters given, the kernel takes"),
    ("parameter-extra", lambda L: L.params.append(("extra", ctypes.c_int32, 0)),
     r"kernel parameters given, the kernel takes"),
    ("pointer-outside-buffers", lambda L: L.set("x_ptr", L.unknown.data_ptr()),
     r"argument x_ptr = 0x[0-9a-f]+ is not in any buffer the stand-in knows"),
    ("pointer-unaligned", lambda L: L.set("x_ptr", L.x.data_ptr() + 8), r"argument x_ptr = 0x[0-9a-f]+ is not 16-byte aligned"),
    ("int-not-divisible", _not_divisible, r"is not a multiple of 16, which the compiled kernel assumes"),
    ("hidden-scratch-not-null", lambda L: L.set("global_scratch", L.x.data_ptr()), r"hidden parameter .* is not NULL"),
    ("block", lambda L: setattr(L, "block", (L.block[0] + 32, 1, 1)), r"block \(\d+, 1, 1\), the kernel was compiled for"),
    ("grid-y-over-65535", lambda L: setattr(L, "grid", (1, 65536, 1)), r"grid \(1, 65536, 1\) outside CUDA's limits"),
    ("grid-x-zero", lambda L: setattr(L, "grid", (0, 1, 1)), r"grid \(0, 1, 1\) outside CUDA's limits"),
    ("shared-over-sm90", lambda L: setattr(L, "shared", SM90_LIMIT + 1),
     rf"{SM90_LIMIT + 1} bytes of dynamic shared memory, above sm_90's {SM90_LIMIT} per block"),
    ("shared-over-the-attribute", lambda L: setattr(L, "shared", 49152 + 16),
     r"49168 bytes of dynamic shared memory, above the 49152 that cuFuncSetAttribute allowed"),
    ("attribute-over-sm90", lambda L: setattr(L, "attr", SM90_LIMIT + 1),
     rf"cuFuncSetAttribute\(\w+\): {SM90_LIMIT + 1} bytes of dynamic shared memory, above sm_90's"),
    ("shared-not-the-images", lambda L: (setattr(L, "attr", 60000), setattr(L, "shared", 60000)),
     r"60000 bytes of dynamic shared memory, the image needs \d+"),
    ("load-past-a-buffer", _short_buffer(lambda L: L.x), r"load of 4 bytes at 0x[0-9a-f]+, \+\d+ from argument x_ptr"),
    ("store-past-a-buffer", _short_buffer(lambda L: L.out),
     r"store of 4 bytes at 0x[0-9a-f]+, \+\d+ from argument out_ptr, whose buffer ends at"),
]


@interpreted()
class TestRefusals:
    def test_the_hand_made_launch_is_valid(self, stand_in, hand):
        """The baseline the refusal cases change one thing of: it runs and computes the head."""
        drv, _ = stand_in
        rc, msg = hand(drv)
        assert rc == 0, msg
        assert drv.errors == []
        assert_close(hand.out, hand.ref, torch.float32)

    @pytest.mark.parametrize("change,match", [r[1:] for r in REFUSALS], ids=[r[0] for r in REFUSALS])
    def test_refused_with_the_kernels_name_and_memory_untouched(self, stand_in, hand, change, match):
        drv, _ = stand_in
        hand.unknown = torch.zeros(64)  # memory the stand-in was never given
        change(hand)
        tensors = (hand.x, hand.w, hand.b, hand.out, hand.unknown)
        before = [_bits(t) for t in tensors]
        rc, msg = hand(drv)
        assert rc != 0, f"launch not refused ({match})"
        assert re.search(match, msg), msg
        assert hand.symbol in msg or HEAD_KERNEL["id"] in msg, f"the message does not name the kernel: {msg}"
        for t, t0 in zip(tensors, before):
            if t is hand.out and getattr(hand, "short", None) is t:
                # programs before the refused store wrote their classes; the 16 bytes past the
                # registered extent were never given
                assert torch.equal(_bits(t).flatten()[-4:], t0.flatten()[-4:]), "bytes past a buffer were written"
            else:
                assert torch.equal(_bits(t), t0), "a refused launch changed memory"

    @pytest.mark.parametrize("case,status,match", [
        pytest.param("pointer-unknown", 1, r"^nvk_head: x = 0x[0-9a-f]+ is not memory the CUDA driver knows",
                     id="pointer-unknown"),
        pytest.param("pointer-unaligned", 1, r"^nvk_head: x = 0x[0-9a-f]+ is not 16-byte aligned", id="pointer-unaligned"),
        pytest.param("store-past-a-buffer", 3, rf"^cuLaunchKernel failed: CUDA error 1 \(CUDA_ERROR_INVALID_VALUE: CPU "
                     rf"stand-in: kernel {HEAD_KERNEL['id']} .*: store of 4 bytes", id="store-past-a-buffer"),
    ])
    def test_the_c_library_reports_the_refusal(self, stand_in, case, status, match):
        """Through nvk_head: the library refuses what it checks itself (a pointer the driver does
        not know, a misaligned one: NVK_ERR_INVALID, nothing launched); what only the launch can
        tell fails as NVK_ERR_CUDA with the stand-in's message."""
        drv, _ = stand_in
        drv.reset_counters()
        (x, w, b, out), _ = _head_inputs()
        bsz, c, h, wd = x.shape
        ptrs = [x.data_ptr() + (8 if case == "pointer-unaligned" else 0), w.data_ptr(), b.data_ptr(), out.data_ptr()]
        spans = {"pointer-unknown": [w, b, out], "pointer-unaligned": [x, w, b, out],
                 "store-past-a-buffer": [x, w, b, (out.data_ptr(), out.numel() * 4 - 16)]}[case]
        lib = drv.library
        with drv.registered(*spans):
            st = lib.head(*ptrs, bsz, h, wd, c, w.shape[0], clib._DT[torch.float32], 0)
        msg = lib.last_error()
        assert st == status and re.search(match, msg), (st, msg)
        launched = case == "store-past-a-buffer"
        assert drv.counters()["launches"] == launched
        assert len(drv.errors) == launched and all(e in msg for e in drv.errors), (drv.errors, msg)
        assert torch.isnan(out.flatten()[-4:]).all(), "bytes past a buffer were written"


def test_counting_mode_runs_nothing(monkeypatch):
    """execute=False: launches are checked and counted (from zero in each activation: the
    stand-in stays loaded between them), no kernel runs, outputs stay as they were."""
    (hx, hw, hb, _), _ = _head_inputs()
    with testing.cpu_driver(execute=False, library=LIBRARY):
        clib.head(hx, hw, hb)  # counted by that activation only
    seen = record_launches(monkeypatch)
    split = next(r for r in MANIFEST["shape_classes"] if r["op"] == "mlp" and len(r["kernels"]) == 2)
    k = split["key"]
    dt = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[split["dtype"]]
    x = torch.randn(2, k["c1"], 3, 5, dtype=dt).contiguous(memory_format=torch.channels_last)
    x2 = torch.randn(2, k["c2"], 3, 5, dtype=dt).contiguous(memory_format=torch.channels_last) if k["c2"] else None
    w1, b1 = torch.randn(k["hidden"], k["c1"] + k["c2"], dtype=dt), torch.randn(k["hidden"], dtype=dt)
    w2, b2 = torch.randn(k["c_out"], k["hidden"], dtype=dt), torch.randn(k["c_out"], dtype=dt)
    with testing.cpu_driver(execute=False, library=LIBRARY) as drv:
        out = clib.mlp(x, w1, b1, w2, b2, x2=x2, residual=bool(k["residual"]))
        counters = drv.counters()
    assert counters["launches"] == 2 and counters["allocs"] == counters["syncs"] == 0, counters
    assert seen == [] and drv.errors == []
    assert torch.isnan(out).all(), "a kernel ran in counting mode"


def test_activations_do_not_fill_the_module_table():
    """Each activation loads every module of the library again, and the stand-in holds 4096
    (MAX_MODULES, cpu_driver.c): more activations than 4096 / modules per load must still work."""
    (x, w, b, _), _ = _head_inputs()
    for _ in range(4096 // len(MANIFEST["kernels"]) + 2):
        with testing.cpu_driver(execute=False, library=LIBRARY) as drv:
            clib.head(x, w, b)
            assert drv.counters()["launches"] == 1


@interpreted()
@pytest.mark.parametrize("cc,arch,kind", [(80, "sm_80", "cubin"), (86, "sm_80", "cubin"), (90, "sm_90", "cubin"),
                                          (100, "sm_80", "ptx")])
def test_image_of_the_devices_compute_capability(monkeypatch, cc, arch, kind):
    """sm_90 cubin on 9.0, sm_80 cubin on every 8.x, the sm_80 PTX elsewhere (csrc/README.md)."""
    seen = record_launches(monkeypatch)
    (x, w, b, _), ref = _head_inputs(batch=2)
    with testing.cpu_driver(library=LIBRARY, compute_capability=cc) as drv:
        out = clib.head(x, w, b)
        assert drv.errors == []
    assert len(seen) == 1
    assert seen[0]["sha1"] == HEAD_KERNEL["archs"][arch][f"{kind}_sha1"]
    assert seen[0]["shared"] == HEAD_KERNEL["archs"][arch]["shared"]
    assert_close(out, ref, torch.float32)


def test_below_sm80_is_refused_by_the_library():
    (x, w, b, _), _ = _head_inputs()
    with testing.cpu_driver(execute=False, library=LIBRARY, compute_capability=75) as drv:
        with pytest.raises(clib.CLibError, match=r"NVK_ERR_UNSUPPORTED: GPU compute capability 7\.5: the kernels need "
                                                 r"sm_80 or newer"):
            clib.head(x, w, b)
        assert drv.counters()["launches"] == 0


def test_importing_the_package_does_not_load_the_stand_in():
    code = ("import os, sys, nextvit_kernels, nextvit_kernels.clib, nextvit_kernels.ops\n"
            "maps = open('/proc/self/maps').read()\n"
            "assert 'libnvk_cpu_driver' not in maps, 'the stand-in is loaded'\n"
            "assert 'nextvit_kernels.testing' not in sys.modules\n"
            "assert 'NEXTVIT_CUDA_DRIVER' not in os.environ\n"
            "import nextvit_kernels.testing\n"  # importing it builds or loads nothing either
            "assert 'libnvk_cpu_driver' not in open('/proc/self/maps').read()\n")
    env = {k: v for k, v in os.environ.items() if k != testing.DRIVER_ENV}
    env["PYTHONPATH"] = os.pathsep.join([ROOT, env.get("PYTHONPATH", "")])
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]


def test_without_the_stand_in_the_library_is_unchanged():
    """After cpu_driver the library opens the real driver again: here, without one, every call
    returns NVK_ERR_NO_DRIVER, and the variable naming the stand-in is gone."""
    if torch.cuda.is_available():
        pytest.skip("a GPU driver is present: the no-driver path cannot be checked here")
    try:
        ctypes.CDLL("libcuda.so.1")
        pytest.skip("libcuda.so.1 loads here: the no-driver path cannot be checked")
    except OSError:
        pass
    before = os.environ.get(testing.DRIVER_ENV)
    (x, w, b, out), _ = _head_inputs()
    with testing.cpu_driver(library=LIBRARY) as drv:
        lib = drv.library
        clib.head(x, w, b)
    assert os.environ.get(testing.DRIVER_ENV) == before
    bsz, c, h, wd = x.shape
    st = lib.head(x.data_ptr(), w.data_ptr(), b.data_ptr(), out.data_ptr(), bsz, h, wd, c, w.shape[0], 0, 0)
    assert st == 4 and lib.last_error().startswith("no CUDA driver: dlopen(libcuda.so.1) failed"), lib.last_error()
    assert torch.isnan(out).all()


# ------------------------------------------------------------------ entry points a server needs
class Driver:
    """The stand-in's driver entry points through ctypes, device 0's primary context current."""

    def __init__(self):
        d = self.d = ctypes.CDLL(testing.driver_library())
        P, U, VP, SZ = ctypes.POINTER, ctypes.c_uint64, ctypes.c_void_p, ctypes.c_size_t
        sigs = {"cuDevicePrimaryCtxRetain": [P(VP), ctypes.c_int], "cuCtxSetCurrent": [VP],
                "cuDevicePrimaryCtxRelease": [ctypes.c_int], "cuDevicePrimaryCtxRelease_v2": [ctypes.c_int],
                "cuMemAlloc_v2": [P(U), SZ], "cuMemFree_v2": [U], "cuMemcpyHtoD_v2": [U, VP, SZ],
                "cuMemcpyDtoHAsync_v2": [VP, U, SZ, VP], "cuMemcpyDtoDAsync_v2": [U, U, SZ, VP],
                "cuMemsetD8Async": [U, ctypes.c_ubyte, SZ, VP], "cuStreamCreate": [P(VP), ctypes.c_uint],
                "cuStreamDestroy_v2": [VP], "cuStreamSynchronize": [VP],
                "cuGetErrorString": [ctypes.c_int, P(ctypes.c_char_p)], "nvkcpu_counters": [P(ctypes.c_longlong)]}
        for name, args in sigs.items():
            getattr(d, name).argtypes = args
        ctx = ctypes.c_void_p()
        assert d.cuInit(0) == 0 and d.cuDevicePrimaryCtxRetain(ctypes.byref(ctx), 0) == 0
        assert d.cuCtxSetCurrent(ctx) == 0

    def ok(self, rc):
        assert rc == 0, _message(self.d, rc)

    def refused(self, rc, code, match):
        msg = _message(self.d, rc)
        assert rc == code and re.search(match, msg), (rc, msg)

    def stream(self):
        s = ctypes.c_void_p()
        self.ok(self.d.cuStreamCreate(ctypes.byref(s), 0))
        return s.value

    def alloc(self, n):
        p = ctypes.c_uint64()
        self.ok(self.d.cuMemAlloc_v2(ctypes.byref(p), n))
        return p.value

    def counters(self):
        out = (ctypes.c_longlong * len(testing.COUNTERS))()
        self.d.nvkcpu_counters(out)
        return dict(zip(testing.COUNTERS, out))


def test_streams_are_reused_after_destroy():
    """A server creates and destroys streams at every model load: far more than the 1024 the
    stand-in holds at once over a process's life; a destroyed handle is refused until reused."""
    drv = Driver()
    d = drv.d
    for _ in range(3000):
        drv.ok(d.cuStreamDestroy_v2(drv.stream()))
    live = [drv.stream() for _ in range(5)]
    assert len(set(live)) == 5
    drv.ok(d.cuStreamDestroy_v2(live[2]))
    drv.refused(d.cuStreamSynchronize(live[2]), 400, r"cuStreamSynchronize: 0x[0-9a-f]+ is not a stream")
    drv.refused(d.cuStreamDestroy_v2(live[2]), 400, r"cuStreamDestroy: 0x[0-9a-f]+ is not a created stream")
    live[2] = drv.stream()  # the lowest free slot: the one just destroyed
    drv.ok(d.cuStreamSynchronize(live[2]))
    more = []
    s = ctypes.c_void_p()
    while (rc := d.cuStreamCreate(ctypes.byref(s), 0)) == 0 and len(more) < 2000:
        more.append(s.value)
    drv.refused(rc, 2, r"cuStreamCreate: more than 1024 streams alive")
    for s in live + more:
        drv.ok(d.cuStreamDestroy_v2(s))


def test_async_copies_and_memset_check_their_buffers():
    """cuMemcpyDtoHAsync_v2, cuMemcpyDtoDAsync_v2 and cuMemsetD8Async copy like their synchronous
    kin, with the same direction checks (a device side must lie in one known buffer, a host side is
    not checked), and count as copies / memsets only when done."""
    drv = Driver()
    d = drv.d
    a, b, s = drv.alloc(64), drv.alloc(64), drv.stream()
    host = (ctypes.c_ubyte * 64)(*range(64))
    back = (ctypes.c_ubyte * 64)()
    before = drv.counters()
    drv.ok(d.cuMemcpyHtoD_v2(a, host, 64))
    drv.ok(d.cuMemcpyDtoDAsync_v2(b, a, 64, s))
    drv.ok(d.cuMemsetD8Async(a + 8, 0xEE, 16, None))
    drv.ok(d.cuMemcpyDtoHAsync_v2(back, b, 64, s))
    assert list(back) == list(range(64))
    drv.ok(d.cuMemcpyDtoHAsync_v2(back, a, 64, s))
    assert list(back) == list(range(8)) + [0xEE] * 16 + list(range(24, 64))
    after = drv.counters()
    assert (after["copies"] - before["copies"], after["memsets"] - before["memsets"]) == (4, 1), (before, after)
    host_ptr = ctypes.addressof(host)
    drv.refused(d.cuMemcpyDtoDAsync_v2(b, a + 1, 64, s), 1, r"cuMemcpyDtoDAsync: 64 bytes at source 0x")
    drv.refused(d.cuMemcpyDtoDAsync_v2(host_ptr, a, 64, s), 1, r"cuMemcpyDtoDAsync: 64 bytes at destination 0x")
    drv.refused(d.cuMemcpyDtoHAsync_v2(back, host_ptr, 64, s), 1, r"cuMemcpyDtoHAsync: 64 bytes at source 0x")
    drv.refused(d.cuMemsetD8Async(a + 60, 0, 8, s), 1, r"cuMemsetD8Async: 8 bytes at 0x[0-9a-f]+ are not inside")
    drv.refused(d.cuMemcpyDtoHAsync_v2(back, a, 64, 0x5000 + 4000), 400, r"cuMemcpyDtoHAsync: 0x[0-9a-f]+ is not a stream")
    drv.ok(d.cuStreamDestroy_v2(s))
    drv.refused(d.cuMemsetD8Async(a, 0, 8, s), 400, r"cuMemsetD8Async: 0x[0-9a-f]+ is not a stream")
    assert drv.counters() == after, "a refused copy was counted"
    drv.ok(d.cuMemFree_v2(a))
    drv.ok(d.cuMemFree_v2(b))


def test_primary_context_release_pairs_with_retain():
    """Both names libcuda exports (cuda.h 11+ calls the _v2 one); a release without a retain is refused."""
    drv = Driver()  # one retain
    d = drv.d
    ctx = ctypes.c_void_p()
    drv.ok(d.cuDevicePrimaryCtxRetain(ctypes.byref(ctx), 0))
    drv.ok(d.cuDevicePrimaryCtxRelease(0))
    drv.ok(d.cuDevicePrimaryCtxRelease_v2(0))
    drv.refused(d.cuDevicePrimaryCtxRelease_v2(1), 101, r"cuDevicePrimaryCtxRelease: device 1")
    for _ in range(100000):  # the retains of everything else in this process (the C library's)
        rc = d.cuDevicePrimaryCtxRelease_v2(0)
        if rc:
            break
    drv.refused(rc, 201, r"cuDevicePrimaryCtxRelease: device 0's primary context is not retained")
    drv.ok(d.cuDevicePrimaryCtxRetain(ctypes.byref(ctx), 0))  # the context is the same and usable again
    drv.ok(d.cuCtxSetCurrent(ctx))
    drv.ok(d.cuStreamDestroy_v2(drv.stream()))
