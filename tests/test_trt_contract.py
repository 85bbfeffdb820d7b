"""CPU contract test of the TensorRT plugins (csrc/trt) against NVIDIA's real TensorRT headers.

For every TensorRT major whose public headers are listed in NEXTVIT_TRT_INCLUDE_DIRS
(os.pathsep-separated include directories, one per major; unset: the 10.16 and 11.1 headers
under third_party/tensorrt), the
plugin library is built from the headers alone (no libnvinfer, no CUDA runtime) with -Wall
-Wextra, linked to a recording stub of the C library, and csrc/trt/tests/contract_harness.cpp
loads it as TensorRT does (dlopen, setLoggerFinder, getCreators) and drives every plugin.
Here: the build (no warnings from project files, the output named by major, nothing but the
entry points exported), the harness's checks, the static-registration variant, and the
creators' names / fields read from the loaded library against the nodes export_onnx writes.
"""
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TRT_DIR = ROOT / "csrc" / "trt"
ENV = "NEXTVIT_TRT_INCLUDE_DIRS"
ENTRY_POINTS = {"getCreators", "setLoggerFinder"}
BUILD_TIMEOUT = 600


def _major(include: Path) -> int:
    m = re.search(r"^#define\s+(?:NV_TENSORRT_MAJOR|TRT_MAJOR_ENTERPRISE)\s+(\d+)",
                  (include / "NvInferVersion.h").read_text(), re.M)
    assert m, f"no TensorRT major in {include / 'NvInferVersion.h'}"
    return int(m.group(1))


def _header_sets():
    """One pytest param per TensorRT major listed in NEXTVIT_TRT_INCLUDE_DIRS, else per header
    set under third_party/tensorrt (a skip where there is none)."""
    dirs = [Path(p) for p in os.environ.get(ENV, "").split(os.pathsep) if p]
    if not dirs:
        dirs = sorted((ROOT / "third_party" / "tensorrt").glob("*/include"))
    if not dirs:
        return [pytest.param(None, id="no-headers", marks=pytest.mark.skip(
            reason=f"no TensorRT headers: {ENV} is not set and third_party/tensorrt has none; list the "
                   f"TensorRT include directories (one per major, '{os.pathsep}'-separated)"))]
    params = []
    for d in dirs:
        if not (d / "NvInferVersion.h").is_file():
            params.append(pytest.param(None, id=d.name, marks=pytest.mark.skip(
                reason=f"{ENV} lists {d}, which has no NvInferVersion.h")))
        else:
            params.append(pytest.param(d, id=f"trt{_major(d)}"))
    return params


def _cuda_include():
    """cuda_runtime_api.h for the TensorRT headers: the one Triton ships, else CMake searches."""
    try:
        import triton
    except ImportError:
        return None
    inc = Path(triton.__file__).parent / "backends" / "nvidia" / "include"
    return inc if (inc / "cuda_runtime_api.h").is_file() else None


def _run(cmd, **kw):
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=BUILD_TIMEOUT, **kw)


def _configure_and_build(include: Path, build: Path, extra=()):
    if shutil.which("cmake") is None:
        pytest.skip("cmake is missing: it builds the plugins for the contract test")
    cmd = ["cmake", "-S", TRT_DIR, "-B", build, "-DNEXTVIT_TRT=ON", "-DNEXTVIT_TRT_TESTS=ON",
           f"-DTENSORRT_INCLUDE_DIR={include}", *extra]
    if shutil.which("ninja"):
        cmd += ["-G", "Ninja"]
    cuda = _cuda_include()
    if cuda is not None:
        cmd.append(f"-DNEXTVIT_CUDA_INCLUDE_DIR={cuda}")
    cfg = _run(cmd)
    assert cfg.returncode == 0, cfg.stdout + cfg.stderr
    out = _run(["cmake", "--build", build, "-j", "2"])
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout + out.stderr


class Build:
    def __init__(self, include: Path, build: Path, log: str):
        self.include = include
        self.major = _major(include)
        self.dir = build
        self.log = log
        self.lib = build / f"libnextvit_trt_plugins_trt{self.major}.so"
        self.static_lib = build / "tests" / f"libnextvit_trt_plugins_static_registration_trt{self.major}.so"
        self.harness = build / "tests" / "nextvit_trt_contract"

    def run(self, mode: str, lib: Path, env=None):
        return _run([self.harness, mode, lib], env=env)


@pytest.fixture(scope="module", params=_header_sets())
def build(request, tmp_path_factory):
    include = request.param
    bdir = tmp_path_factory.mktemp(f"trt{_major(include)}")
    return Build(include, bdir, _configure_and_build(include, bdir))


def test_builds_from_headers_without_warnings(build):
    project = [ln for ln in build.log.splitlines() if "warning:" in ln and str(ROOT) in ln]
    assert not project, "\n".join(project)
    # the major is in the file name and SONAME: a deployment cannot pick the other major's library
    assert build.lib.is_file(), sorted(p.name for p in build.dir.iterdir())
    dyn = _run(["readelf", "-d", build.lib]).stdout
    assert f"[libnextvit_trt_plugins_trt{build.major}.so]" in dyn, dyn
    needed = re.findall(r"\(NEEDED\).*\[(.*)\]", dyn)
    assert needed and not [n for n in needed if "nvinfer" in n or "cudart" in n], needed


def test_exports_only_the_entry_points(build):
    for lib in (build.lib, build.static_lib):
        out = _run(["nm", "-D", "--defined-only", lib])
        assert out.returncode == 0, out.stderr
        exported = {ln.split()[-1] for ln in out.stdout.splitlines() if ln.strip()}
        assert exported == ENTRY_POINTS, (lib.name, sorted(exported - ENTRY_POINTS))


def _harness_failures(out):
    return [ln for ln in out.stdout.splitlines() if not ln.startswith(("ok ", "note: "))
            and not ln.endswith(" failed checks")]


def test_contract(build):
    out = build.run("check", build.lib)
    assert out.returncode == 0 and not _harness_failures(out), "\n".join(_harness_failures(out)) + out.stderr
    passed = {ln[3:] for ln in out.stdout.splitlines() if ln.startswith("ok ")}
    # every plugin went through every group (a harness that skipped some would pass vacuously)
    creators = {c["name"] for c in json.loads(build.run("describe", build.lib).stdout)["creators"]}
    for name in creators:
        assert f"{name} field validation" in passed, name
        for aspect in ("getOutputShapes", "configurePlugin", "getWorkspaceSize", "enqueue",
                       "getFieldsToSerialize -> createPlugin(kRUNTIME)", "clone, attachToContext"):
            assert any(p.startswith(f"{name}[") and p.endswith(aspect) for p in passed), (name, aspect)
    assert "setLoggerFinder(nullptr) keeps the logger" in passed


def test_static_registration_uses_the_plugin_namespace(build):
    out = build.run("static", build.static_lib)
    assert out.returncode == 0 and "ok static registration" in out.stdout, out.stdout + out.stderr


@pytest.fixture(scope="module")
def onnx_plugin_nodes():
    """{op_type: node} of the plugin graph export_onnx writes for Next-ViT-S."""
    pytest.importorskip("onnx")
    import torch

    import nextvit_kernels as nk
    from nextvit_kernels.onnx_export import PLUGIN_DOMAIN
    torch.manual_seed(0)
    mp = nk.export_onnx(nk.nextvit_small().eval(), None, input_shape=(1, 3, 224, 224), dtype=torch.float16,
                        plugins=True)
    return {n.op_type: n for n in mp.graph.node if n.domain == PLUGIN_DOMAIN}


def test_creators_match_the_onnx_nodes(build, onnx_plugin_nodes):
    from onnx import AttributeProto

    described = json.loads(build.run("describe", build.lib).stdout)
    assert described["major"] == build.major
    creators = {c["name"]: c for c in described["creators"]}
    assert len(creators) == len(described["creators"])
    assert all(c["interface"] == "PLUGIN CREATOR_V3ONE" for c in described["creators"])
    assert set(creators) == set(onnx_plugin_nodes)
    for name, node in onnx_plugin_nodes.items():
        c = creators[name]
        attrs = {a.name: a for a in node.attribute}
        # the ONNX parser finds the creator by (op_type, plugin_version, plugin_namespace) ...
        assert attrs.pop("plugin_version").s.decode() == c["version"], name
        assert attrs.pop("plugin_namespace").s.decode() == c["namespace"], name
        # ... and hands the other attributes over as the creator's fields: int attributes as kINT32
        assert sorted(attrs) == sorted(f["name"] for f in c["fields"]), name
        for f in c["fields"]:
            assert (f["type"], f["length"]) == ("kINT32", 1), (name, f)
            assert attrs[f["name"]].type == AttributeProto.INT, (name, f["name"])


def test_contract_under_sanitizers(build, tmp_path_factory):
    """The same checks with AddressSanitizer + UBSan (use after free in clone / attachToContext,
    out-of-bounds field reads, overflow); heap allocations are not counted there."""
    flags = "-fsanitize=address,undefined -fno-sanitize-recover=undefined -fno-omit-frame-pointer"
    probe = _run(["c++", *flags.split(), "-x", "c++", "-", "-o", os.devnull], input="int main() { return 0; }\n")
    if probe.returncode != 0:
        pytest.skip("the C++ compiler cannot build with -fsanitize=address,undefined: " + probe.stderr[-300:])
    bdir = tmp_path_factory.mktemp(f"trt{build.major}-asan")
    asan = Build(build.include, bdir, _configure_and_build(build.include, bdir, [
        f"-DCMAKE_CXX_FLAGS={flags}", f"-DCMAKE_EXE_LINKER_FLAGS={flags}", f"-DCMAKE_SHARED_LINKER_FLAGS={flags}"]))
    env = dict(os.environ, ASAN_OPTIONS="detect_leaks=1:abort_on_error=0", UBSAN_OPTIONS="print_stacktrace=1")
    for mode, lib in (("check", asan.lib), ("static", asan.static_lib)):
        out = asan.run(mode, lib, env=env)
        assert out.returncode == 0 and not _harness_failures(out), mode + "\n" + out.stdout[-3000:] + out.stderr[-6000:]
