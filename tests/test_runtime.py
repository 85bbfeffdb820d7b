"""The whole-model C runtime on the CPU: model files, nvk_model_* through the CPU driver stand-in
(every launch runs the Triton kernel under the interpreter), its Python front, the C example and a
loader fuzz under AddressSanitizer + UBSan.

Models: NextViT-S and a tiny NextViT (depths 1, 1, 5, 1: the same channel counts, so the kernels
compiled for S cover it) with random weights from timm's Next-ViT, the independent oracle.
"""
import copy
import json
import re
import os
import struct
import subprocess
import sys
import threading

import numpy as np
import pytest
import torch

import nextvit_kernels as nk
from nextvit_kernels import fused, model_file, runtime, testing
from _util import c_compiler, c_library_with, child_env, images, randomize_, rel_err, SANITIZE, sanitized, sanitizing_c_compiler

timm = pytest.importorskip("timm")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = (1, 1, 5, 1)
GAIN = 0.7
MODEL_API = ("nvk_model_forward", "nvk_manifest")


@pytest.fixture(scope="module")
def lib():
    return c_library_with(*MODEL_API)


def _pair(depths, **kw):
    """(ours, timm's) with the same random weights."""
    from timm.models.nextvit import NextViT as TimmNextViT
    t = randomize_(TimmNextViT(in_chans=3, depths=depths), gain=GAIN).eval()
    m = nk.NextViT(depths=depths, **kw).eval()
    res = nk.load_checkpoint(m, t.state_dict(), strict=not kw)
    assert res.format == "timm"
    return m, t


@pytest.fixture(scope="module")
def tiny():
    return _pair(TINY)


class HostArray:
    """A host buffer behind __cuda_array_interface__: what a CuPy array is to the runtime."""

    def __init__(self, a):
        self.a = np.ascontiguousarray(a)

    @property
    def __cuda_array_interface__(self):
        return dict(shape=self.a.shape, typestr=self.a.dtype.str, data=(self.a.ctypes.data, False), strides=None,
                    version=3)


# ------------------------------------------------------------------ the file
def test_model_file_round_trip_and_safetensors(tiny, tmp_path):
    m, _ = tiny
    path = nk.save_runtime(m, str(tmp_path / "tiny.nvk"), dtype=torch.float16)
    plan, meta = model_file.load_plan(path)
    folded = model_file.fold_for_runtime(m, torch.float16)
    assert meta["variant"] == "custom" and meta["dtype"] == "fp16" and meta["abi_version"] == "1"
    assert len(plan.steps) == len(folded.steps) == 30
    for a, b in zip(plan.steps, folded.steps):
        assert (a.op, a.kwargs, a.from_branch, a.to_branch, a.x2_branch, a.stage_end) == \
            (b.op, b.kwargs, b.from_branch, b.to_branch, b.x2_branch, b.stage_end)
        assert all(torch.equal(x, y) for x, y in zip(a.tensors, b.tensors))
    assert all(torch.equal(x, y) for x, y in zip(plan.head, folded.head))
    # anyone can read it with the safetensors package
    from safetensors import safe_open
    with safe_open(path, "pt") as f:
        keys = set(f.keys())
        assert {"__nvk_plan__", "steps.0.w", "steps.0.b", "head.w", "head.b"} <= keys
        assert torch.equal(f.get_tensor("steps.6.fc1_w"), folded.steps[6].tensors[0])
        steps = json.loads(f.metadata()["plan"])["steps"]
    assert steps[6]["op"] == "mlp" and steps[6]["key"] == dict(c1=96, c2=0, hidden=288, c_out=96, residual=1)
    # the table must agree with the JSON plan
    data = bytearray(open(path, "rb").read())
    (hl,) = struct.unpack_from("<Q", data)
    struct.pack_into("<q", data, 8 + hl + 8 * (16 + 5), 95)  # step 0's key: c_in 3 -> 95
    with pytest.raises(ValueError, match="does not match its JSON plan"):
        model_file.load_plan(bytes(data))


# ------------------------------------------------------------------ numerics through the stand-in
@pytest.fixture(scope="module")
def tiny32(tiny, lib):
    """The tiny model's fp32 logits on 2 x 3 x 33 x 40 images, through each front, and timm's."""
    m, t = tiny
    x = images(2, 33, 40)
    with torch.no_grad():
        ref = t(x)
    data = model_file.plan_bytes(model_file.fold_for_runtime(m, torch.float32))
    out = {}
    with testing.cpu_driver(library=lib) as drv:
        rt = runtime.Model(data)
        out["runtime, torch CPU tensor"] = rt(x)
        host = rt(_registered(drv, HostArray(x.numpy())))  # out: a DeviceArray in stand-in memory
        out["runtime, __cuda_array_interface__"] = torch.from_numpy(host.to_host())
        out["C through ctypes"] = _raw_forward(drv, rt, x)
        out["counters"] = drv.counters()
    return ref, out


_KEEP = []  # host arrays registered for the module's life


def _registered(drv, arr):
    drv.register(arr.a.ctypes.data, arr.a.nbytes)
    _KEEP.append(arr)
    return arr


def _raw_forward(drv, rt, x):
    """nvk_model_forward called directly, the workspace exactly the reported size with a poisoned,
    unregistered guard after it (the stand-in refuses an access there)."""
    b, _, h, w = x.shape
    lib = rt._lib
    n = lib.model_workspace_size(rt._handle, b, h, w, 0)
    assert n > 0, lib.last_error()
    ws = torch.full((n + 4096,), 0x5A, dtype=torch.uint8)
    out = torch.full((b, rt.n_classes), float("nan"))
    with drv.registered(x, out, (ws.data_ptr(), n)):
        drv.reset_counters()
        st = lib.model_forward(rt._handle, x.data_ptr(), runtime.NCHW, out.data_ptr(), ws.data_ptr(), n, b, h, w, None)
        assert st == 0, lib.last_error()
        c = drv.counters()
        assert drv.reach(ws.data_ptr()) <= n
    assert (ws[n:] == 0x5A).all(), "the forward wrote past its workspace"
    assert c["allocs"] == c["frees"] == c["copies"] == c["syncs"] == 0, c  # load is the only place that allocates
    return out


@pytest.mark.slow
def test_tiny_fp32_every_front_matches_timm(tiny32):
    ref, out = tiny32
    assert (ref[0] - ref[1]).abs().max() > 1e-2 * ref.abs().max(), "logits do not depend on the input: test is void"
    first = out["runtime, torch CPU tensor"]
    assert first.shape == ref.shape and torch.isfinite(first).all()
    assert rel_err(first, ref) < 1e-4, rel_err(first, ref)
    for name in ("runtime, __cuda_array_interface__", "C through ctypes"):
        assert torch.equal(out[name], first), name  # the same kernels on the same bytes


def _low_precision_case(pair, b, h, w, dtype, channels_last, lib):
    m, t = pair
    x = images(b, h, w)
    with torch.no_grad():
        ref = t(x)
        eager = copy.deepcopy(m).to(dtype)(x.to(dtype)).float()  # the module graph in that dtype: the error to expect
    data = model_file.plan_bytes(model_file.fold_for_runtime(m, dtype))
    xin = x.to(dtype)
    if channels_last:
        xin = xin.contiguous(memory_format=torch.channels_last)  # NHWC memory
    with testing.cpu_driver(library=lib):
        out = runtime.Model(data)(xin)
    assert out.dtype == dtype and torch.isfinite(out).all()
    assert rel_err(out.float(), ref) <= 2 * rel_err(eager, ref) + 1e-3, (rel_err(out.float(), ref), rel_err(eager, ref))


def test_tiny_fp16_nhwc_64x64_within_twice_eager_error(tiny, lib):
    _low_precision_case(tiny, 1, 64, 64, torch.float16, True, lib)


@pytest.mark.slow
def test_small_fp16_odd_size_within_twice_eager_error(lib):
    _low_precision_case(_pair((3, 4, 10, 3)), 1, 33, 40, torch.float16, False, lib)


@pytest.mark.slow
def test_features_of_a_backbone_with_stage_norms(lib):
    m, _ = _pair(TINY, with_extra_norm=True)
    with torch.no_grad():
        for bn in m.extra_norm_list:  # the stage norms must do something
            bn.weight.uniform_(0.5, 1.5), bn.bias.normal_(0, 0.2)
            bn.running_mean.normal_(0, 0.2), bn.running_var.uniform_(0.5, 1.5)
        x = images(1, 37, 30)
        ref = m.forward_features(x)
    data = model_file.plan_bytes(model_file.fold_for_runtime(m, torch.float32))
    with testing.cpu_driver(library=lib):
        rt = runtime.Model(data)
        assert rt.has_stage_norms and rt.feature_channels == (96, 256, 512, 1024)
        feats = rt.forward_features(x)
    for i, (a, r) in enumerate(zip(feats, ref)):
        assert a.shape == r.shape and a.is_contiguous(memory_format=torch.channels_last), i
        assert rel_err(a, r) < 1e-4, (i, rel_err(a, r))


@pytest.mark.slow
def test_threads_with_separate_workspaces_get_their_own_result(tiny, lib):
    """Two threads on one model: the stand-in interleaves their launches kernel by kernel (as one GPU
    stream would), so a shared workspace would mix them; each result must be its own input's."""
    m, t = tiny
    data = model_file.plan_bytes(model_file.fold_for_runtime(m, torch.float32))
    xs = [images(1, 25, 27), images(1, 25, 27) * -2]
    with torch.no_grad():
        refs = [t(x) for x in xs]
    got, errors = [None] * len(xs), []
    with testing.cpu_driver(library=lib):
        rt = runtime.Model(data)

        def work(i):
            try:
                got[i] = rt(xs[i])
            except Exception as e:  # noqa: BLE001
                errors.append(e)
        threads = [threading.Thread(target=work, args=(i,)) for i in range(len(xs))]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
    assert not errors, errors
    assert rel_err(refs[0], refs[1]) > 100 * 1e-4, "the two inputs give nearly the same logits: a swap would pass"
    for g, r in zip(got, refs):
        assert rel_err(g, r) < 1e-4, rel_err(g, r)


# ------------------------------------------------------------------ counting mode: the plan's shape
@pytest.fixture(scope="module")
def tiny16_path(tiny, tmp_path_factory):
    return nk.save_runtime(tiny[0], str(tmp_path_factory.mktemp("nvk") / "tiny16.nvk"), dtype=torch.float16)


def test_forward_launches_the_plan_and_allocates_nothing(tiny, tiny16_path, lib):
    plan = model_file.fold_for_runtime(tiny[0], torch.float16)
    with testing.cpu_driver(execute=False, library=lib) as drv:
        live = drv.counters()["live_allocs"]  # models of earlier tests stay with the stand-in
        rt = runtime.Model(tiny16_path)
        assert rt.weight_bytes == 2 * sum(t.numel() for t in [*plan.head] + [t for s in plan.steps for t in s.tensors])
        for b, h, w in ((1, 224, 224), (3, 97, 131)):
            x = torch.zeros(b, 3, h, w, dtype=torch.float16)
            rt(x)  # the workspace is cached per shape from here on
            drv.reset_counters()
            out = rt(x)
            c = drv.counters()
            assert c["launches"] == plan.launches(b, h, w), (b, h, w, c)
            assert c["allocs"] == c["copies"] == c["syncs"] == 0, c
            assert out.shape == (b, 1000)
        assert [rt.output_shape(2, 97, 131, s) for s in range(4)] == \
            [(2, 25, 33, 96), (2, 13, 17, 256), (2, 7, 9, 512), (2, 4, 5, 1024)]
        workspaces = len(rt._local.ws)
        rt.close()
        assert drv.counters()["live_allocs"] == live, "nvk_model_free left device memory behind"
        assert workspaces == 2


@pytest.mark.slow
def test_kernels_runtime_holds_the_folded_weights_once(tiny, lib):
    """NextViT(kernels="runtime"): the folded weights live once, in the C runtime's device memory
    (the stand-in counts its bytes), none in torch tensors; the logits are the module graph's; the
    old spelling kernels="clib" still works, with a DeprecationWarning; invalidating frees it all."""
    m = copy.deepcopy(tiny[0])
    x = images(1, 32, 32)
    with torch.no_grad():
        ref = m(x)  # CPU under "auto": the module graph
    with pytest.warns(DeprecationWarning, match="kernels='clib' is now spelled kernels='runtime'"):
        m.kernels = "clib"
    assert m.kernels == "runtime"
    with testing.cpu_driver(library=lib) as drv, torch.no_grad():
        live = drv.counters()["live_bytes"]
        assert m.fused_path(x) == "runtime"
        out = m(x)
        st = m.engine.state
        folded = model_file.fold_for_runtime(m, torch.float32)
        weight_bytes = 4 * sum(t.numel() for t in [*folded.head] + [t for s in folded.steps for t in s.tensors])
        assert isinstance(st.runtime, runtime.Model) and st.runtime.weight_bytes == weight_bytes
        assert drv.counters()["live_bytes"] - live == weight_bytes  # one copy, the runtime's
        assert st.plan is None and not st.programs  # no folded copy in torch tensors
        m.invalidate_fused()
        del st
        assert drv.counters()["live_bytes"] == live
    assert rel_err(out, ref) < 1e-4, rel_err(out, ref)


@pytest.mark.slow
def test_accelerated_timm_models_run_the_c_runtime(lib):
    """nextvit_kernels.accelerate(timm model, kernels="runtime"): a classifier's logits and a
    backbone's feature maps equal the same objects' own forward before it, each forward one C call
    with exactly the plan's launches through the stand-in, and no folded copy in torch tensors."""
    from timm.models.nextvit import NextViT as TimmNextViT

    x = images(1, 32, 32)
    for model in (TimmNextViT(in_chans=3, depths=TINY),  # 1000 classes: the head shape the library holds
                  timm.create_model("nextvit_small", depths=TINY, features_only=True, out_indices=(1, 3))):
        model = randomize_(model, gain=GAIN).eval()
        with torch.no_grad():
            want = model(x)
        nk.accelerate(model, kernels="runtime")
        with testing.cpu_driver(library=lib) as drv, torch.no_grad():
            drv.reset_counters()
            got = model(x)
            launches = drv.counters()["launches"]
            st = model._nvk.engine.state
            assert isinstance(st.runtime, runtime.Model) and st.plan is None and not st.programs
            plan = fused.fold(model._nvk.layout, "cpu", torch.float32)
            nk.restore(model)  # frees the runtime while the stand-in is there
        features = isinstance(want, list)
        assert launches == plan.launches(1, 32, 32) - features  # a backbone has no head
        for g, w in zip(got, want) if features else [(got, want)]:
            assert g.shape == w.shape and rel_err(g, w) < 1e-4, rel_err(g, w)


def test_kernels_runtime_never_imports_triton(lib):
    """The engine's C path in a fresh process: fold on the host, write the model file in memory,
    load it and run a forward (the counting stand-in), with neither Triton nor the op kernels
    imported at the end."""
    launches = model_file.fold_for_runtime(nk.NextViT(depths=TINY), torch.float16).launches(1, 64, 64)
    code = ("import sys, torch\n"
            "import nextvit_kernels as nk\n"
            "from nextvit_kernels import testing\n"
            f"m = nk.NextViT(depths={TINY}, kernels='runtime').eval().half()\n"
            f"with testing.cpu_driver(execute=False, library={lib!r}) as drv, torch.no_grad():\n"
            "    out = m(torch.zeros(1, 3, 64, 64, dtype=torch.float16))\n"
            "    assert m.fused_path(torch.zeros(1, 3, 64, 64, dtype=torch.float16)) == 'runtime'\n"
            f"    assert out.shape == (1, 1000) and drv.counters()['launches'] == {launches}, drv.counters()\n"
            "bad = sorted(n for n in sys.modules if n.split('.')[0] == 'triton' or n.startswith('nextvit_kernels.ops'))\n"
            "assert not bad, bad\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                       env=child_env(dict(os.environ, PYTHONPATH=ROOT)))
    assert r.returncode == 0, r.stderr[-3000:]


# ------------------------------------------------------------------ bad input
def _table_patch(data, *changes):
    """The file with plan-table entries changed: (index, value) pairs."""
    d = bytearray(data)
    (hl,) = struct.unpack_from("<Q", d)
    for index, value in zip(changes[::2], changes[1::2]):
        struct.pack_into("<q", d, 8 + hl + 8 * index, value)
    return bytes(d)


def _load_error(data, lib):
    with pytest.raises(runtime.ModelError) as e:
        runtime.Model(data, library=lib)
    return e.value


@pytest.fixture(scope="module")
def tiny16(tiny16_path):
    return open(tiny16_path, "rb").read()


def test_bad_files_are_refused_with_a_message(tiny16, lib):
    with testing.cpu_driver(execute=False, library=lib) as drv:
        live = drv.counters()["live_allocs"]
        n_steps = 30
        tensor0 = 16 + 12 * n_steps + 4
        cases = [
            (tiny16[:7], 1, "too short"),
            (tiny16[:4096], 1, "does not fit the file"),
            (tiny16[:len(tiny16) - 1], 1, "runs past the end"),
            (b"\x08\x00\x00\x00\x00\x00\x00\x00[       " + tiny16[16:], 1, "not a safetensors file"),
            (_table_patch(tiny16, 0, 12345), 1, "not a nextvit_kernels model file"),
            (_table_patch(tiny16, 1, 2), 2, "format version 2; this library reads version 1"),
            (_table_patch(tiny16, 2, 7), 2, "needs library ABI 7"),
            (_table_patch(tiny16, 3, 0), 1, "has dtype 1, the file's dtype is 0"),
            (_table_patch(tiny16, tensor0 + 6, 1, tensor0 + 7, 9), 1, r"tensor 0 \(w\) has shape \[64, 3, 1, 9\]"),
            (_table_patch(tiny16, tensor0 + 6, 1), 1, "tensor 0: 3456 bytes for 576 elements"),
            (_table_patch(tiny16, tensor0, 0), 1, "inside the plan"),
            (_table_patch(tiny16, 16 + 12 + 5, 33), 1, "key .* = .33, 32, 1. with 64 channels flowing in"),
            (_table_patch(tiny16, 16 + 4, 3), 1, r"step 0 \(conv_bn_relu\): tensors"),
        ]
        for data, status, message in cases:
            err = _load_error(data, lib)
            assert err.status == status, (message, err)
            assert re.search(message, str(err)), (message, str(err))
        drv.fail_alloc_after(50)  # the upload fails half-way: what it allocated is freed
        err = _load_error(tiny16, lib)
        drv.fail_alloc_after(None)
        assert err.status == 3 and "cuMemAlloc" in str(err), err
        assert drv.counters()["live_allocs"] == live, "a failed load left device memory behind"


def test_bad_calls_are_refused_with_a_message(tiny16, lib):
    from nextvit_kernels.model import NextViT
    with testing.cpu_driver(execute=False, library=lib) as drv:
        rt = runtime.Model(tiny16)
        with pytest.raises(runtime.ModelError, match="too small: step .* fewer than one 4x4 pooling window"):
            rt.workspace_size(1, 16, 16)
        with pytest.raises(ValueError, match="the model file is float16, the input is float32"):
            rt(torch.zeros(1, 3, 32, 32))
        with pytest.raises(ValueError, match=r"expected \[B, 3, H, W\]"):
            rt(torch.zeros(1, 4, 32, 32, dtype=torch.float16))
        L = rt._lib
        n = rt.workspace_size(1, 32, 32)
        x = torch.zeros(1, 3, 32, 32, dtype=torch.float16)
        out = torch.zeros(1, 1000, dtype=torch.float16)
        ws = torch.zeros(n, dtype=torch.uint8)
        with drv.registered(x, out, ws):
            for args, message in [((0, out.data_ptr(), ws.data_ptr(), n), "nvk_model_forward: x is NULL"),
                                  ((x.data_ptr(), 0, ws.data_ptr(), n), "out is NULL"),
                                  ((x.data_ptr() + 2, out.data_ptr(), ws.data_ptr(), n), "not 16-byte aligned"),
                                  ((x.data_ptr(), out.data_ptr(), ws.data_ptr(), n - 1), "the workspace has"),
                                  ((x.data_ptr(), out.data_ptr(), 0, n), "workspace is NULL")]:
                xp, op, wp, nb = args
                assert L.model_forward(rt._handle, xp, runtime.NCHW, op, wp, nb, 1, 32, 32, None) == 1
                assert message in L.last_error(), (message, L.last_error())
            assert L.model_forward(rt._handle, x.data_ptr(), 7, out.data_ptr(), ws.data_ptr(), n, 1, 32, 32, None) == 1
            assert "layout 7" in L.last_error()
            stray = torch.zeros(1, 1000, dtype=torch.float16)  # not known to the "driver"
            assert L.model_forward(rt._handle, x.data_ptr(), 0, stray.data_ptr(), ws.data_ptr(), n, 1, 32, 32, None) == 1
            assert "not memory the CUDA driver knows" in L.last_error()
        # a head of 10 classes was compiled for no variant
        m10 = NextViT(depths=TINY, num_classes=10).eval()
        err = _load_error(model_file.plan_bytes(model_file.fold_for_runtime(m10, torch.float16)), lib)
        assert err.status == 2 and "no kernel was compiled ahead of time" in str(err) and "(1024, 10)" in str(err)


def test_runtime_imports_and_runs_without_torch(tiny16_path, lib):
    """nextvit_kernels.runtime with torch blocked from import: CAI host arrays under the counting stand-in."""
    code = f"""
import sys
class Block:
    def find_module(self, name, path=None):
        return self if name == "torch" or name.startswith("torch.") else None
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("torch is blocked in this test")
sys.meta_path.insert(0, Block())
import numpy as np
from nextvit_kernels import runtime, testing
assert "torch" not in sys.modules
class HostArray:
    def __init__(self, a): self.a = a
    @property
    def __cuda_array_interface__(self):
        return dict(shape=self.a.shape, typestr=self.a.dtype.str, data=(self.a.ctypes.data, False), strides=None, version=3)
with testing.cpu_driver(execute=False, library={lib!r}) as drv:
    m = runtime.Model({tiny16_path!r})
    x = np.zeros((2, 224, 224, 3), dtype=np.float16)          # NHWC
    drv.register(x.ctypes.data, x.nbytes)
    out = m(HostArray(x))
    assert isinstance(out, runtime.DeviceArray) and out.shape == (2, 1000), out.shape
    assert out.to_host().shape == (2, 1000)
    feats = m.forward_features(HostArray(x))
    assert [f.shape for f in feats] == [(2, 56, 56, 96), (2, 28, 28, 256), (2, 14, 14, 512), (2, 7, 7, 1024)]
assert "torch" not in sys.modules
print("ok", drv.counters()["launches"])
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                       env=child_env(dict(os.environ, PYTHONPATH=ROOT)))
    assert r.returncode == 0 and r.stdout.startswith("ok"), r.stderr[-3000:]


# ------------------------------------------------------------------ the C example and the loader fuzz
def test_c_example_runs_under_the_counting_stand_in(tiny16_path, lib, tmp_path):
    exe = tmp_path / "nvk_classify"
    libdir = os.path.dirname(lib)
    # a sanitized worker's library is built with ASan: so is the program that links it (leaks counted)
    flags = list(SANITIZE) if sanitized() else []
    r = subprocess.run([c_compiler(), "-std=c11", "-O2", *flags, "-Wall", "-Wextra", "-Werror", "-I", os.path.join(ROOT, "csrc", "include"),
                        os.path.join(ROOT, "csrc", "examples", "classify.c"), "-o", str(exe), "-L", libdir,
                        "-lnextvit_kernels", f"-Wl,-rpath,{libdir}", "-ldl", "-lm"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    # counted, not computed: TRITON_INTERPRET=1 (set where there is no GPU) would make the stand-in
    # host Python to run the launches (nextvit_kernels.testing, hosted execute mode)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["NEXTVIT_CUDA_DRIVER"] = testing.driver_library()
    ppm = tmp_path / "cat.ppm"
    ppm.write_bytes(b"P6\n# a comment\n40 33\n255\n" + np.random.randint(0, 256, 33 * 40 * 3, dtype=np.uint8).tobytes())
    for args in (["--random", "--iters", "5"], [str(ppm), "--iters", "3"], ["--random", "--batch", "2", "--size", "64x48"]):
        r = subprocess.run([str(exe), tiny16_path, *args], capture_output=True, text=True, env=env, timeout=120)
        assert r.returncode == 0, r.stderr
        lines = r.stdout.splitlines()
        assert lines[0].startswith(f"model {tiny16_path}: 30 fused ops, fp16")
        assert lines[2].startswith("top-5:") and len(lines[2].split("(")) == 6, lines[2]
        assert lines[3].endswith(" ms per forward (mean of %s)" % (args[-1] if "--iters" in args else "20"))
    ppm.write_bytes(b"P6\n40 33\n255\n" + b"\0" * 100)  # truncated pixels
    r = subprocess.run([str(exe), tiny16_path, str(ppm)], capture_output=True, text=True, env=env)
    assert r.returncode == 1 and "cannot read the image" in r.stderr
    r = subprocess.run([str(exe), tiny16_path + ".missing", "--random"], capture_output=True, text=True, env=env)
    assert r.returncode == 1 and "cannot open" in r.stderr


@pytest.mark.slow
def test_loader_fuzz_under_asan_and_ubsan(tiny16_path, lib, tmp_path):
    """Every prefix up to the end of the plan table (and a spread of longer ones), and 1500 single-byte
    changes of the bytes the library reads, through nvk_model_load_memory built with
    -fsanitize=address,undefined (the stand-in too): an error with a message or a model that runs."""
    from nextvit_kernels import _library, aot
    cc = sanitizing_c_compiler()
    flags = list(SANITIZE)
    manifest = json.loads(_library.open_path(lib).manifest())
    table = tmp_path / "table.c"
    aot.emit_c(manifest, str(tmp_path), str(table), images=False)  # the shape classes; no kernel images needed
    exe = tmp_path / "fuzz"
    src = os.path.join(ROOT, "csrc")
    r = subprocess.run([cc, "-std=c11", *flags, "-I", os.path.join(src, "include"), "-I", os.path.join(src, "src"),
                        os.path.join(src, "tests", "model_load_fuzz.c"), os.path.join(src, "src", "nextvit_kernels.c"),
                        os.path.join(src, "src", "nvk_model.c"), str(table), "-o", str(exe), "-ldl", "-lpthread", "-lm"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # counted (see the C example's test)
    env.update(NEXTVIT_CUDA_DRIVER=testing.driver_library(flags), ASAN_OPTIONS="detect_leaks=1:abort_on_error=0",
               UBSAN_OPTIONS="print_stacktrace=1")
    r = subprocess.run([str(exe), tiny16_path, "1500"], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    assert "0 failures" in r.stdout, r.stdout
    print(r.stdout.strip())


def test_export_cli_writes_the_checkpoints_model_file(tmp_path):
    """python -m nextvit_kernels.aot --export: the folded weights of the checkpoint it was given."""
    t = randomize_(timm.create_model("nextvit_small"), gain=GAIN).eval()
    ckpt = tmp_path / "s.pth"
    torch.save(t.state_dict(), ckpt)
    out = tmp_path / "s.nvk"
    r = subprocess.run([sys.executable, "-m", "nextvit_kernels.aot", "--export", str(out), "--variant", "small",
                        "--checkpoint", str(ckpt), "--dtype", "bf16"], capture_output=True, text=True, timeout=600,
                       env=dict(os.environ, PYTHONPATH=ROOT))
    assert r.returncode == 0, r.stderr
    assert "timm format" in r.stderr and "nextvit_small, bf16" in r.stderr
    plan, meta = model_file.load_plan(str(out))
    m = nk.nextvit_small()
    nk.load_checkpoint(m, t.state_dict())
    ref = model_file.fold_for_runtime(m, torch.bfloat16)
    assert meta["variant"] == "nextvit_small" and plan.dtype == torch.bfloat16
    assert all(torch.equal(a, b) for s, q in zip(plan.steps, ref.steps) for a, b in zip(s.tensors, q.tensors))


# ------------------------------------------------------------------ on a GPU
@pytest.fixture(scope="module")
def gpu_small():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    m, _ = _pair((3, 4, 10, 3))
    return m.cuda().half()


def _rel_to(out, ref):
    return ((out.float() - ref.float()).abs().max() / ref.float().abs().max()).item()


@pytest.mark.gpu
def test_gpu_runtime_matches_the_triton_path(gpu_small, lib, tmp_path):
    m = gpu_small
    path = nk.save_runtime(m, str(tmp_path / "s.nvk"), dtype=torch.float16)
    x = images(2, 224, 224).cuda().half()
    with torch.inference_mode():
        m.kernels = "triton"
        ref = m(x)
        rt = runtime.Model(path, library=lib)
        out = rt(x)
        nhwc = rt(x.contiguous(memory_format=torch.channels_last))
        feats, ref_feats = rt.forward_features(x), m.forward_features(x)
    torch.cuda.synchronize()
    assert out.dtype == torch.float16 and torch.isfinite(out).all()
    assert _rel_to(out, ref) < 2e-2 and torch.equal(out, nhwc)
    for a, r in zip(feats, ref_feats):
        assert a.shape == r.shape and _rel_to(a, r) < 2e-2


@pytest.mark.gpu
def test_gpu_kernels_auto_runs_the_c_runtime_under_cuda_graphs(gpu_small, lib, monkeypatch):
    monkeypatch.setenv("NEXTVIT_CLIB", os.path.dirname(lib))
    m = gpu_small
    x = images(1, 224, 224).cuda().half()
    with torch.inference_mode():
        m.kernels = "triton"
        ref = m(x)
        m.kernels = "auto"
        first, second, third = m(x), m(x), m(x)  # eager, capture + replay, replay
        assert isinstance(m.engine.state.runtime, runtime.Model)
        m.kernels = "runtime"
        forced = m(x)
    torch.cuda.synchronize()
    assert _rel_to(first, ref) < 2e-2
    assert torch.equal(first, second) and torch.equal(first, third) and torch.equal(first, forced)


@pytest.mark.gpu
def test_gpu_kernels_runtime_keeps_one_copy_of_the_weights(gpu_small, lib, monkeypatch):
    """Under the C runtime torch's allocator holds no folded weights: after the first forward it
    holds the output and the runtime's workspace, and the runtime holds the folded weights."""
    monkeypatch.setenv("NEXTVIT_CLIB", os.path.dirname(lib))
    m = copy.deepcopy(gpu_small)
    m.kernels, m.cuda_graphs = "runtime", "off"
    x = images(1, 224, 224).cuda().half()
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    with torch.inference_mode():
        out = m(x)
    torch.cuda.synchronize()
    grown = torch.cuda.memory_allocated() - before
    st = m.engine.state
    folded = model_file.fold_for_runtime(m, torch.float16)
    weight_bytes = 2 * sum(t.numel() for t in [*folded.head] + [t for s in folded.steps for t in s.tensors])
    assert st.plan is None and st.runtime.weight_bytes == weight_bytes
    held = out.numel() * out.element_size() + st.runtime.workspace_size(1, 224, 224)
    assert grown <= held + (2 << 20), (grown, held, weight_bytes)  # (allocator rounding)


@pytest.mark.gpu
def test_gpu_runtime_in_a_cuda_graph_and_from_threads(gpu_small, lib, tmp_path):
    path = nk.save_runtime(gpu_small, str(tmp_path / "s.nvk"), dtype=torch.float16)
    rt = runtime.Model(path, library=lib)
    xs = [images(1, 224, 224).cuda().half() * (i + 1) for i in range(8)]
    with torch.inference_mode():
        refs = [rt(x) for x in xs]
        static_x = xs[0].clone()
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            rt(static_x)
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            static_out = rt(static_x)
        for x, r in zip(xs, refs):
            static_x.copy_(x)
            g.replay()
            assert torch.equal(static_out, r)
        got = [None] * len(xs)

        def work(i):
            with torch.inference_mode(), torch.cuda.stream(torch.cuda.Stream()):
                got[i] = rt(xs[i])
                torch.cuda.current_stream().synchronize()
        from _util import in_threads
        assert not in_threads(len(xs), work)
    for g_, r in zip(got, refs):
        assert torch.equal(g_, r)


@pytest.mark.gpu
def test_gpu_cupy_front(gpu_small, lib, tmp_path):
    cp = pytest.importorskip("cupy")
    path = nk.save_runtime(gpu_small, str(tmp_path / "s.nvk"), dtype=torch.float16)
    rt = runtime.Model(path, library=lib)
    x = images(2, 224, 224).half()
    with torch.inference_mode():
        ref = rt(x.cuda())
    out = rt(cp.asarray(x.numpy()))
    assert isinstance(out, cp.ndarray) and out.dtype == cp.float16
    cp.cuda.get_current_stream().synchronize()
    assert np.array_equal(cp.asnumpy(out), ref.cpu().numpy())
    nhwc = rt(cp.ascontiguousarray(cp.asarray(x.numpy()).transpose(0, 2, 3, 1)))
    assert np.array_equal(cp.asnumpy(nhwc), ref.cpu().numpy())


def test_no_device_load_checks_the_file_and_uploads_nothing(tiny16, lib):
    """nvk_model_load(..., NVK_NO_DEVICE = -1): what a server does before placing a model."""
    with testing.cpu_driver(execute=False, library=lib) as drv:
        before = drv.counters()
        m = runtime.Model(tiny16, device=-1, library=lib)
        after = drv.counters()
        assert (after["allocs"], after["copies"], after["live_bytes"]) == (before["allocs"], before["copies"],
                                                                             before["live_bytes"])
        assert m.weight_bytes == 0 and m.n_classes == 1000
        on_device = runtime.Model(tiny16, library=lib)
        c = m._lib
        size = c.model_workspace_size(m._handle, 3, 64, 48, 0)
        assert size > 0 and size == c.model_workspace_size(on_device._handle, 3, 64, 48, 0)
        x, out = torch.zeros(1, 3, 64, 64, dtype=torch.float16), torch.zeros(1, 1000, dtype=torch.float16)
        ws = torch.zeros(size, dtype=torch.uint8)
        with drv.registered(x, out, ws):
            st = c.model_forward(m._handle, x.data_ptr(), runtime.NCHW, out.data_ptr(), ws.data_ptr(), size, 1, 64, 64,
                                 None)
        assert st == 1 and "NVK_NO_DEVICE" in c.last_error(), c.last_error()
        # a damaged file is refused the same way as on a device
        for data in (tiny16[:4096], _table_patch(tiny16, 3, 0)):
            a = _load_error(data, lib)
            with pytest.raises(runtime.ModelError) as e:
                runtime.Model(data, device=-1, library=lib)
            b = e.value
            assert (a.status, str(a).split(": ", 1)[-1]) == (b.status, str(b).split(": ", 1)[-1])
        on_device.close()
        m.close()
