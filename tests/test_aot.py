"""AOT compilation of every kernel the fused model uses + the C library build (CPU, no GPU).

The session fixture compiles every kernel variant of the S/B/L plans at 224 and 384 for
sm_80 and sm_90 (all three dtypes by default, the install's kernels: 1.5 to 4 minutes cold on a
2-core machine, seconds where Triton's cache has them; NEXTVIT_AOT_TEST_DTYPES=fp16 compiles
fewer; NEXTVIT_AOT_TEST_DIR=path reuses a finished AOT output), then builds the C library from it
with CMake + Ninja; both are kept on disk for the next run and shared by every test
(tests/_builds.py)."""
import ctypes
import json
import os
import shutil
import subprocess
import sys
import tempfile

import pytest
import torch

from nextvit_kernels import aot
import _builds
from _util import child_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DTYPES = os.environ.get("NEXTVIT_AOT_TEST_DTYPES", "fp16,bf16,fp32").split(",")
VARIANTS = ("nextvit_small", "nextvit_base", "nextvit_large")
RESOLUTIONS = (224, 384)
AOT_ARGS = ("--arch", "sm_80,sm_90", "--dtypes", ",".join(DTYPES), "--variants", ",".join(VARIANTS),
            "--resolutions", ",".join(map(str, RESOLUTIONS)))
EXPORTS = {"nvk_conv_bn_relu", "nvk_patch_embed", "nvk_mhca", "nvk_mlp", "nvk_e_mhsa", "nvk_head",
           "nvk_e_mhsa_workspace_size", "nvk_mlp_workspace_size", "nvk_mhca_workspace_size", "nvk_last_error", "nvk_version", "nvk_load",
           "nvk_manifest", "nvk_reset_driver", "nvk_model_load", "nvk_model_load_memory", "nvk_model_free",
           "nvk_model_get_info", "nvk_model_workspace_size", "nvk_model_output_shape", "nvk_model_forward",
           "nvk_model_forward_features"}


@pytest.fixture(scope="session")
def aot_dir():
    """The kernels of every plan (S/B/L at 224 and 384, sm_80 and sm_90): ``_builds.aot_output``, kept
    on disk by a key of their sources; NEXTVIT_AOT_TEST_DIR=path uses a finished AOT output instead."""
    reuse = os.environ.get("NEXTVIT_AOT_TEST_DIR")
    if reuse and os.path.exists(os.path.join(reuse, "manifest.json")):
        return reuse
    return str(_builds.aot_output(AOT_ARGS))


@pytest.fixture(scope="session")
def manifest(aot_dir):
    with open(os.path.join(aot_dir, "manifest.json")) as f:
        return json.load(f)


@pytest.fixture(scope="session")
def build_dir(aot_dir):
    """The library built by CMake + Ninja from ``aot_dir`` (``_builds.c_library``)."""
    missing = [t for t in ("cmake", "ninja") if shutil.which(t) is None]
    if missing:
        pytest.skip(f"{' and '.join(missing)} not found: cannot build the C library "
                    "(it needs no nvcc: the kernels come from Triton, libcuda is dlopen'ed)")
    # the shared build is of the install's kernels: other dtypes (or a given AOT output) build here,
    # without compiling the install's set only to compare folders
    if AOT_ARGS == _builds.AOT_ARGS and aot_dir == str(_builds.aot_output()):
        return str(_builds.c_library())
    return aot.build_library(tempfile.mkdtemp(prefix="nvk_build_"), aot_dir=aot_dir)


def test_every_plan_op_has_a_shape_class(manifest):
    classes = manifest["shape_classes"]
    assert set(manifest["archs"]) == {"sm_80", "sm_90"}
    for variant in VARIANTS:
        for res in RESOLUTIONS:
            for op, key, probe in aot.plan_keys(variant, res):
                kt = [key[n] for n in manifest["key_names"][op]]
                for dt in DTYPES:
                    hit = [c for c in classes if c["op"] == op and c["dtype"] == dt and c["key_tuple"] == kt
                           and (probe is None or (c["probe_lo"] <= probe and (c["probe_hi"] < 0 or probe <= c["probe_hi"])))]
                    assert len(hit) == 1, (variant, res, op, key, probe, dt, len(hit))
                    consts = hit[0]["consts"]
                    assert set(consts) == set(manifest["const_names"][op]) and all(v > 0 for v in consts.values())


def test_shape_classes_agree_with_config(manifest):
    """The table's launch constants are what each op's _config returns (the C side only looks them up)."""
    import importlib
    for c in manifest["shape_classes"]:
        dtype = aot.DTYPES[c["dtype"]]
        k = c["key"]
        if c["op"] == "mhca":
            for m in {c["probe_lo"], c["probe_hi"] if c["probe_hi"] > 0 else 4 * c["probe_lo"]}:
                cfg = importlib.import_module("nextvit_kernels.ops.mhca")._config(
                    k["c"], k["c_out"], torch.empty((), dtype=dtype).element_size(), m)
                assert c["consts"] == dict(BLOCK_M=cfg["fused"]["BLOCK_M"], BLOCK_N=cfg["fused"]["BLOCK_N"],
                                           CONV_BLOCK_M=cfg["conv"]["BLOCK_M"], PROJ_BLOCK_M=cfg["proj"]["BLOCK_M"],
                                           PROJ_BLOCK_N=cfg["proj"]["BLOCK_N"])
                assert len(c["kernels"]) == (2 if cfg["split"] else 1)
        elif c["op"] == "e_mhsa":
            for nk in {c["probe_lo"], c["probe_hi"] if c["probe_hi"] > 0 else 4 * c["probe_lo"]}:
                cfg = importlib.import_module("nextvit_kernels.ops.e_mhsa")._config(
                    nk * k["sr_ratio"] ** 2, k["c"], k["c_out"], nk, k["head_dim"], k["sr_ratio"])
                assert c["consts"]["BLOCK_CO"] == cfg["attn"]["BLOCK_CO"]
                assert c["consts"]["KV_BLOCK_NK"] == cfg["kv"]["BLOCK_NK"]
                assert c["consts"]["HEADS_BLOCK_M"] == cfg["heads"]["BLOCK_M"]
                assert len(c["kernels"]) == (3 if cfg["split"] else 2)
                kern = next(x for x in manifest["kernels"] if x["id"] == c["kernels"][1])
                attn = cfg["heads"] if cfg["split"] else cfg["attn"]
                assert kern["kernel"] == ("_attn_heads_kernel" if cfg["split"] else "_attn_kernel")
                assert kern["constexprs"]["BLOCK_N"] == attn["BLOCK_N"]
                assert kern["constexprs"]["ONE_TILE"] == attn["ONE_TILE"]


def test_kernels_compiled_for_both_archs(manifest, aot_dir):
    used = {k for c in manifest["shape_classes"] for k in c["kernels"]}
    assert used == {k["id"] for k in manifest["kernels"]}
    for k in manifest["kernels"]:
        assert set(k["archs"]) == {"sm_80", "sm_90"}, k["id"]
        for arch, info in k["archs"].items():
            for f in (info["cubin"], info["ptx"]):
                assert os.path.getsize(os.path.join(aot_dir, f)) > 1000, f
            with open(os.path.join(aot_dir, info["ptx"])) as fh:
                ptx = fh.read()
            assert f".target sm_{arch[3:]}" in ptx
            assert f".entry {info['symbol']}(" in ptx
            # Triton 3.x appends hidden scratch pointers; the C library passes NULL, which
            # is only valid while they need no memory.
            assert info["n_entry_params"] == len(k["passed_params"]) + len(info["hidden_params"])
            assert all(h["size"] == 0 for h in info["hidden_params"])
            assert info["shared"] <= 227 * 1024


def test_no_spatial_specialization(manifest):
    """Spatial integer args stay unspecialized i32 (valid for any runtime shape); pointers and
    shape-key-fixed ints carry exactly the specialization the C side guarantees."""
    spatial = {"M", "H", "W", "HO", "WO", "OH", "OW", "N", "NK", "ROWS", "HW"}
    for k in manifest["kernels"]:
        attrs = {tuple(a[0]): a[1] for a in k["attrs"]}
        names = list(k["signature"])
        for p in k["params"]:
            idx = (names.index(p["name"]),)
            if p["name"] in spatial:
                assert p["passed"] and k["signature"][p["name"]] == "i32" and idx not in attrs, (k["id"], p)
            if p["type"] == "ptr":
                assert attrs[idx] == [["tt.divisibility", 16]]
            if p["name"] in ("sxh", "sxb", "soh", "sob") and p["passed"]:
                # W*C-type strides: multiple of 16 for every shape iff the key channel count is
                assert p["div16"] == (idx in attrs)
        assert k["signature"].get("scale", "fp32") == "fp32"


def test_library_builds_and_exports(build_dir):
    so = os.path.join(build_dir, "libnextvit_kernels.so")
    assert os.path.exists(so)
    nm = subprocess.run(["nm", "-D", "--defined-only", so], capture_output=True, text=True, check=True).stdout
    exported = {line.split()[-1] for line in nm.splitlines() if line.split()[-1].startswith("nvk_")}
    assert exported == EXPORTS
    assert not [line for line in nm.splitlines() if "nvk_blob" in line]
    ldd = subprocess.run(["ldd", so], capture_output=True, text=True).stdout
    assert "libcuda" not in ldd and "libcudart" not in ldd


def _load(build_dir):
    lib = ctypes.CDLL(os.path.join(build_dir, "libnextvit_kernels.so"))
    lib.nvk_last_error.restype = lib.nvk_version.restype = ctypes.c_char_p
    lib.nvk_conv_bn_relu.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int] * 7 + [ctypes.c_void_p]
    return lib


def test_ctypes_load_and_errors_without_gpu(build_dir):
    """In a child process: a library loaded here would stay loaded under its SONAME, and the
    TensorRT plugins of a later test in this worker would bind to it instead of the stand-in's."""
    code = (f"import sys; sys.path[:0] = [{os.path.dirname(__file__)!r}, {ROOT!r}]\n"
            f"import test_aot; test_aot._ctypes_checks({build_dir!r}, no_driver={not torch.cuda.is_available()})")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=child_env())
    assert r.returncode == 0, r.stderr[-3000:]


def _ctypes_checks(build_dir, no_driver: bool):
    lib = _load(build_dir)
    assert b"nextvit_kernels" in lib.nvk_version()
    p = 1 << 20  # fake, aligned "device pointers": nothing is launched here
    # invalid arguments are reported before the driver is touched
    assert lib.nvk_conv_bn_relu(None, p, p, p, 1, 8, 8, 3, 64, 2, 1, None) == 1
    assert b"x is NULL" in lib.nvk_last_error()
    assert lib.nvk_conv_bn_relu(p + 2, p, p, p, 1, 8, 8, 3, 64, 2, 1, None) == 1
    assert b"aligned" in lib.nvk_last_error()
    assert lib.nvk_conv_bn_relu(p, p, p, p, 0, 8, 8, 3, 64, 2, 1, None) == 1
    assert lib.nvk_conv_bn_relu(p, p, p, p, 1, 8, 8, 3, 64, 2, 7, None) == 1
    assert b"dtype" in lib.nvk_last_error()
    assert lib.nvk_conv_bn_relu(p, p, p, p, 1, 8, 8, 5, 64, 2, 1, None) == 2
    assert b"no kernel was compiled" in lib.nvk_last_error()
    ews = lib.nvk_e_mhsa_workspace_size
    ews.restype, ews.argtypes = ctypes.c_size_t, [ctypes.c_int] * 9
    # stage 1 (c 192 <= 256: two kernels): k|v [2, 49, 384] + pooled [2, 49, 192], fp16
    assert ews(2, 28, 28, 192, 192, 4, 32, 1, 1) == 2 * 49 * 384 * 2 + 2 * 49 * 192 * 2
    # stage 2 (c 384 > 256: three kernels): k|v [2, 49, 768] + pooled [2, 49, 384] + o [2*196, 384]
    assert ews(2, 14, 14, 384, 384, 2, 32, 1, 1) == 150528 + 75264 + 2 * 196 * 384 * 2
    assert ews(2, 14, 14, 5 * 32, 5 * 32, 2, 32, 1, 1) == 0  # not compiled
    # MLP: the [B*H*W, hidden] scratch only where the shape class runs split (two kernels)
    ws = lib.nvk_mlp_workspace_size
    ws.restype, ws.argtypes = ctypes.c_size_t, [ctypes.c_int] * 9
    assert ws(2, 14, 14, 384, 0, 1152, 384, 1, 1) == 2 * 14 * 14 * 1152 * 2   # split, fp16
    assert ws(3, 7, 7, 768, 256, 2048, 1024, 1, 2) == -(-3 * 49 * 2048 * 2 // 256) * 256  # split, bf16
    assert ws(2, 28, 28, 192, 0, 576, 192, 1, 1) == 2 * 28 * 28 * 576 * 2     # split (> 128 outputs)
    assert ws(2, 56, 56, 96, 0, 288, 96, 1, 1) == 0                         # one kernel
    assert ws(2, 28, 28, 5, 0, 576, 5, 1, 1) == 0                           # not compiled
    lib.nvk_mlp.argtypes = [ctypes.c_void_p] * 8 + [ctypes.c_int] * 9 + [ctypes.c_void_p]
    mlp_args = [p, None] + [p] * 5 + [None, 2, 14, 14, 384, 0, 1152, 384, 1, 1, None]  # x2 NULL, ws NULL
    assert lib.nvk_mlp(*mlp_args) == 1                                       # split needs a workspace
    assert b"workspace is NULL" in lib.nvk_last_error()
    # MHCA: split (two kernels through the workspace) below 4096 pixels, and at any size for
    # widths other than a power of two up to 256; a power of two's size covers every call with at
    # most that many pixels
    mws = lib.nvk_mhca_workspace_size
    mws.restype, mws.argtypes = ctypes.c_size_t, [ctypes.c_int] * 7
    assert mws(1, 14, 14, 384, 384, 1, 1) == -(-196 * 384 * 2 // 256) * 256
    assert mws(256, 14, 14, 384, 384, 1, 1) == 256 * 196 * 384 * 2            # split at every size
    assert mws(256, 14, 14, 128, 128, 1, 1) == 4095 * 128 * 2                # capped at the split range
    assert mws(1, 7, 7, 5 * 32, 5 * 32, 1, 1) == 0                           # not compiled
    lib.nvk_mhca.argtypes = [ctypes.c_void_p] * 6 + [ctypes.c_int] * 7 + [ctypes.c_void_p]
    assert lib.nvk_mhca(p, p, p, p, p, None, 1, 14, 14, 384, 384, 1, 1, None) == 1
    assert b"workspace is NULL" in lib.nvk_last_error()
    if not no_driver:
        return  # a GPU is present: the no-driver path cannot be checked there
    st = lib.nvk_conv_bn_relu(p, p, p, p, 1, 8, 8, 3, 64, 2, 1, None)
    assert st == 4, lib.nvk_last_error()
    assert b"CUDA" in lib.nvk_last_error()
    assert lib.nvk_load(None) == 4, lib.nvk_last_error()
    assert b"CUDA" in lib.nvk_last_error()


def test_python_front_ends(build_dir):
    """clib.py over ctypes, in a fresh interpreter."""
    code = (
        "import sys, torch\n"
        "from nextvit_kernels import clib\n"
        "assert clib.available(), clib._load_error\n"
        "assert 'nextvit_kernels' in clib.version()\n"
        "try:\n"
        "    clib.conv_bn_relu(torch.zeros(1, 3, 8, 8), torch.zeros(64, 3, 3, 3), torch.zeros(64), stride=2)\n"
        "    raise SystemExit('no error for CPU tensors')\n"
        "except ValueError as e:\n"
        "    assert 'CUDA' in str(e)\n")
    env = dict(os.environ, PYTHONPATH=ROOT, NEXTVIT_CLIB=build_dir)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr[-3000:]


def test_clib_missing_message(tmp_path):
    env = dict(os.environ, PYTHONPATH=ROOT, NEXTVIT_CLIB=str(tmp_path))
    code = ("from nextvit_kernels import clib\n"
            "assert not clib.available()\n"
            "try:\n    clib.load()\nexcept RuntimeError as e:\n    assert 'not built' in str(e), e\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr[-3000:]


def test_ctypes_signatures_match_header():
    """_library.SIGNATURES (the ctypes binding) against the prototypes of nextvit_kernels.h."""
    import ctypes
    from nextvit_kernels import _library
    from _util import header_prototypes
    protos = header_prototypes()
    assert set(protos) == EXPORTS
    assert set(_library.SIGNATURES) == EXPORTS
    for name, (ret, params) in protos.items():
        want = [ctypes.c_char_p if p.startswith("const char*") else
                ctypes.c_void_p if "*" in p or "[" in p else
                ctypes.c_size_t if p.startswith("size_t") else ctypes.c_int for p in params]
        args, res = _library.SIGNATURES[name]
        assert args == want, (name, params)
        assert res == {"nvk_status": ctypes.c_int, "size_t": ctypes.c_size_t, "void": None,
                       "const char*": ctypes.c_char_p}[ret], (name, ret)
