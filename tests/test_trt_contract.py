"""CPU contract test of the TensorRT plugins (csrc/trt) against NVIDIA's real TensorRT headers.

For every TensorRT major whose public headers are listed in NEXTVIT_TRT_INCLUDE_DIRS
(os.pathsep-separated include directories, one per major; unset: the 10.16 and 11.1 headers
under third_party/tensorrt; see tests/_trt.py), the
plugin library is built from the headers alone (no libnvinfer, no CUDA runtime) with -Wall
-Wextra, linked to a recording stub of the C library, and csrc/trt/tests/contract_harness.cpp
loads it as TensorRT does (dlopen, setLoggerFinder, getCreators) and drives every plugin.
Here: the build (no warnings from project files, the output named by major, nothing but the
entry points exported), the harness's checks, how the library meets the host's plugin registry
(through a stand-in libnvinfer.so.<major>: registered on a bare dlopen, as Triton's TensorRT
backend and trtexec --staticPlugins load it, deregistered on dlclose; each creator registered
once through IPluginRegistry::loadLibrary's calls; nothing without a libnvinfer), and the
creators' names / fields read from the loaded library against the nodes export_onnx writes.
The build is one per major, made with AddressSanitizer + UBSan where the compiler can (use after
free in clone / attachToContext, out-of-bounds field reads, overflow, leaks), and kept on disk
(tests/_builds.py): every check runs once, on the sanitized build.
"""
import json
import os
import re
from pathlib import Path

import pytest

import _builds
from _trt import ROOT, header_sets, major, run

ENTRY_POINTS = {"getCreators", "setLoggerFinder"}


class Build:
    def __init__(self, include: Path, build: Path, log: str):
        self.include = include
        self.major = major(include)
        self.dir = build
        self.log = log
        self.lib = build / f"libnextvit_trt_plugins_trt{self.major}.so"
        self.fake_nvinfer = build / "tests" / "fake_nvinfer" / f"libnvinfer.so.{self.major}"
        self.harness = build / "tests" / "nextvit_trt_contract"

    def run(self, mode: str, lib: Path):
        # leaks counted where the build has ASan (heap allocations of clone / createPlugin / destroy)
        return run([self.harness, mode, lib], env=dict(os.environ, ASAN_OPTIONS="detect_leaks=1:abort_on_error=0",
                                                        UBSAN_OPTIONS="print_stacktrace=1"))


def _can_sanitize() -> bool:
    return not _builds.sanitizer_probe("c++", "c++")


@pytest.fixture(scope="module", params=header_sets())
def build(request):
    include = request.param
    bdir = _builds.trt_harness(include, sanitized=_can_sanitize())
    return Build(include, bdir, (bdir / "build.log").read_text())


def test_builds_from_headers_without_warnings(build):
    project = [ln for ln in build.log.splitlines() if "warning:" in ln and str(ROOT) in ln]
    assert not project, "\n".join(project)
    # the major is in the file name and SONAME: a deployment cannot pick the other major's library
    assert build.lib.is_file(), sorted(p.name for p in build.dir.iterdir())
    dyn = run(["readelf", "-d", build.lib]).stdout
    assert f"[libnextvit_trt_plugins_trt{build.major}.so]" in dyn, dyn
    needed = re.findall(r"\(NEEDED\).*\[(.*)\]", dyn)
    assert needed and not [n for n in needed if "nvinfer" in n or "cudart" in n], needed


def test_exports_only_the_entry_points(build):
    out = run(["nm", "-D", "--defined-only", build.lib])
    assert out.returncode == 0, out.stderr
    exported = {ln.split()[-1] for ln in out.stdout.splitlines() if ln.strip()}
    assert exported == ENTRY_POINTS, sorted(exported ^ ENTRY_POINTS)


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


# How the library meets the host's plugin registry: each way in a process of its own (what is
# loaded, and in which scope, is the point), with the harness's groups that must all pass.
REGISTRY_MODES = {
    "dlopen": ["dlopen: the host's libnvinfer is out of the global scope",
               "dlopen under a TensorRT of another major registers nothing",
               "dlopen registers every creator under namespace nextvit", "dlclose deregisters them"],
    "loadlibrary": ["loadLibrary: setLoggerFinder, getCreators, registerCreator each",
                    "a later getCreators leaves loadLibrary's registrations alone",
                    "deregisterLibrary: deregisterCreator each, dlclose; nothing deregistered twice"],
    "no-nvinfer": ["no libnvinfer: dlopen, getCreators, dlclose"],
}


def test_stand_in_libnvinfer_has_the_soname_the_library_looks_for(build):
    dyn = run(["readelf", "-d", build.fake_nvinfer]).stdout
    assert f"[libnvinfer.so.{build.major}]" in dyn, dyn


@pytest.mark.parametrize("mode", sorted(REGISTRY_MODES))
def test_plugin_registry(build, mode):
    out = build.run(mode, build.lib)
    assert out.returncode == 0 and not _harness_failures(out), out.stdout + out.stderr
    passed = {ln[3:] for ln in out.stdout.splitlines() if ln.startswith("ok ")}
    assert passed == set(REGISTRY_MODES[mode]), out.stdout
    # on stderr (no host logger at load / unload): the other major's refusal, and no failed
    # registration or deregistration
    own = [ln for ln in out.stderr.splitlines() if "[nextvit_trt_plugins]" in ln]
    mismatch = [ln for ln in own if "built against the TensorRT" in ln]
    assert own == mismatch, out.stderr
    assert bool(mismatch) == (mode == "dlopen"), out.stderr


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


def test_contract_under_sanitizers(build):
    """The harness and the plugin libraries it ran above are built with ASan + UBSan."""
    if not _can_sanitize():
        pytest.skip("the C++ compiler cannot build with -fsanitize=address,undefined: the checks ran unsanitized")
    for path in (build.harness, build.lib, build.fake_nvinfer):
        undefined = run(["nm", "-D", "--undefined-only", path]).stdout
        assert "__asan_report_load" in undefined and "__ubsan_handle" in undefined, path
