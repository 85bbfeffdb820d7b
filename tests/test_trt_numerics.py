"""Numerical test of the TensorRT plugins' enqueue on the CPU, for every TensorRT major's headers.

The plugin library is built against the real C library (tests/_trt.py, with
NEXTVIT_KERNELS_LIBRARY) together with csrc/trt/tests/numeric_harness.cpp, a shared library that
plays TensorRT for one plugin node: it loads the plugin library as IPluginRegistry::loadLibrary
does, creates the node from its fields, and takes it through getOutputDataTypes, getOutputShapes
(an IExprBuilder with symbolic B / H / W, evaluated at the run shape), supportsFormatCombination,
configurePlugin, getWorkspaceSize, the engine's createPlugin(kRUNTIME) from the serialized fields
and attachToContext, then onShapeChange and enqueue with our pointers. This process runs
``nextvit_kernels.testing.cpu_driver()``, so the C library's launches from inside enqueue run
the same Triton kernels under the interpreter, each load and store checked against the buffers
registered with the stand-in.

Per major, plugin, mode (strides, MLP with x2 and with more than 256 outputs, MHCA split on few
pixels and fused on >= 4096, E-MHSA with sr_ratio 4, 2, 1), fp32 and fp16, on tiny NHWC shapes
(odd H and W, batch 1 and 2) with the channel counts the library has kernels for (Next-ViT-S),
it checks:
- the output dims from getOutputShapes against the op reference's shape, and every output
  element (allocated with exactly those bytes, NaN-poisoned) against the op module's float64
  ``reference`` on the same rounded inputs (``_util.assert_close``);
- the workspace: exactly getWorkspaceSize bytes are registered, NaN-poisoned, with an
  unregistered guard after them that must stay untouched; with the profile's max at the run
  shape the size is what the launches reached (``drv.reach``) rounded up to the C library's
  256-byte granule, i.e. 0 for a node that needs none (but fused MHCA, whose size also covers
  the split mode of fewer pixels); with a larger profile it only covers the run (the stand-in
  refuses any access beyond it);
- the mode: the C library launched the kernels that mode has, and enqueue made no allocation,
  copy or synchronization (CUDA-graph capturable), logged nothing and returned 0.
What this cannot check: the cubins themselves and TensorRT's engine builder (see csrc/trt/README.md).
"""
import contextlib
import ctypes
from dataclasses import dataclass
from math import prod
from pathlib import Path
from typing import Dict, Optional, Tuple

import pytest
import torch

from nextvit_kernels import clib, ops, testing
from nextvit_kernels.onnx_export import PLUGINS
import _builds
from _trt import header_sets, major
from _util import assert_close, c_library_with, rand_like_dtype, sanitized

# What the stand-in needs of the C library (nextvit_kernels/testing/__init__.py).
STAND_IN_ENTRY_POINTS = ("nvk_reset_driver", "nvk_manifest")
ACTIVATIONS = ("x", "x2")  # NHWC inputs, first in every plugin's input order; the rest are weights
MAX_DIMS = 8  # nvinfer1::Dims::MAX_DIMS: dims per input in nvtrt_build's arrays
WORKSPACE_GRANULE = 256  # the C library rounds every workspace part up to this
GUARD = 4096  # poisoned bytes after the workspace that no launch may touch
DTYPES = (torch.float32, torch.float16)


@dataclass(frozen=True)
class Case:
    op: str                     # key of onnx_export.PLUGINS
    shapes: Dict[str, tuple]    # input name -> shape in the plugin's layout
    fields: Dict[str, int]
    launches: int               # kernels the C library launches in this mode
    profile_max: Optional[Tuple[int, int, int]] = None  # (B, H, W) the profile allows; None: the run shape
    # getWorkspaceSize also covers the split mode of fewer pixels than the run's, which this
    # profile never has: nvk_mhca_workspace_size covers every pixel count up to the max (it takes
    # no min), so it is more than the launches reach
    covers_fewer_pixels: bool = False

    @property
    def id(self):
        x = self.shapes["x"]
        parts = [PLUGINS[self.op].name, "x".join(map(str, x))]
        parts += [f"x2c{self.shapes['x2'][3]}"] if "x2" in self.shapes else []
        parts += [f"{k}{v}" for k, v in self.fields.items() if k not in ("residual", "has_x2")]
        parts += [f"cout{self.out_channels}"] if self.op != "head" else []
        parts += ["max" + "x".join(map(str, self.profile_max))] if self.profile_max else []
        return "-".join(parts)

    @property
    def out_channels(self):
        return self.shapes[{"mlp": "fc2_w", "mhca": "proj_w", "e_mhsa": "proj_w"}.get(self.op, "w")][0]

    def inputs(self):
        """(name, shape) in the plugin's input order (onnx_export.PLUGINS)."""
        return [(n, self.shapes[n]) for n in PLUGINS[self.op].inputs if n in self.shapes]


def _mhca(x, launches, profile_max=None):
    c = x[3]
    return Case("mhca", {"x": x, "conv_w": (c, 32, 3, 3), "conv_b": (c,), "proj_w": (c, c)}, {"residual": 1},
                launches, profile_max, covers_fewer_pixels=launches == 1)


def _mlp(x, c2, hidden, launches, profile_max=None):
    c = x[3] + c2
    shapes = {"x": x, "fc1_w": (hidden, c), "fc1_b": (hidden,), "fc2_w": (c, hidden), "fc2_b": (c,)}
    if c2:
        shapes["x2"] = (*x[:3], c2)
    return Case("mlp", shapes, {"residual": 1, "has_x2": int(c2 > 0)}, launches, profile_max)


def _e_mhsa(x, sr_ratio, launches, profile_max=None):
    c = x[3]
    shapes = {"x": x, **{n: (c, c) for n in ("q_w", "k_w", "v_w", "proj_w")},
              **{n: (c,) for n in ("q_b", "k_b", "v_b", "proj_b")}}
    return Case("e_mhsa", shapes, {"sr_ratio": sr_ratio, "head_dim": 32, "residual": 1}, launches, profile_max)


# Channel counts, hidden widths, sr_ratio / residual: shape classes of Next-ViT-S (every library
# the tests build or install has them); the spatial sizes are free.
CASES = [
    Case("conv_bn_relu", {"x": (2, 7, 9, 3), "w": (64, 3, 3, 3), "b": (64,)}, {"stride": 2}, 1),
    Case("conv_bn_relu", {"x": (1, 5, 7, 64), "w": (32, 64, 3, 3), "b": (32,)}, {"stride": 1}, 1),
    Case("patch_embed", {"x": (2, 5, 7, 64), "w": (96, 64), "b": (96,)}, {"stride": 1}, 1),
    Case("patch_embed", {"x": (1, 7, 5, 96), "w": (192, 96), "b": (192,)}, {"stride": 2}, 1),
    _mhca((2, 5, 7, 64), launches=2),                                # few pixels: conv -> workspace -> GEMM
    _mhca((2, 5, 7, 64), launches=2, profile_max=(2, 50, 50)),      # fused at the max, split at the run
    _mhca((1, 63, 67, 64), launches=1),                              # 4221 pixels: one fused kernel
    _mlp((2, 3, 5, 96), 0, 288, launches=1),                         # <= 128 outputs: one kernel
    _mlp((2, 3, 5, 384), 0, 1152, launches=2),                       # > 256 outputs: fc1 -> workspace -> fc2
    _mlp((2, 3, 5, 192), 64, 512, launches=2),                       # x2, 256 outputs (> 128): split
    _mlp((1, 3, 5, 384), 128, 1024, launches=2, profile_max=(2, 5, 7)),  # x2, > 256 outputs
    _e_mhsa((1, 5, 7, 192), 4, launches=2),                          # 35 tokens pooled to 2 keys
    _e_mhsa((2, 3, 5, 384), 2, launches=3, profile_max=(3, 6, 8)),   # > 256 outputs: per-head, then GEMM
    _e_mhsa((1, 3, 3, 768), 1, launches=3),
    Case("head", {"x": (2, 3, 5, 1024), "w": (1000, 1024), "b": (1000,)}, {}, 1),
]


# ------------------------------------------------------------------ the harness over ctypes
_VP, _I, _I32, _I64 = ctypes.c_void_p, ctypes.c_int, ctypes.c_int32, ctypes.c_int64
_SIGNATURES = {
    "nvtrt_open": ([ctypes.c_char_p], _VP),
    "nvtrt_symbol": ([_VP, ctypes.c_char_p], _VP),
    "nvtrt_build": ([_VP, ctypes.c_char_p, _I, ctypes.POINTER(ctypes.c_char_p), ctypes.POINTER(_I32), _I, _I,
                     ctypes.POINTER(_I32), ctypes.POINTER(_I64), ctypes.POINTER(_I64), _I, ctypes.POINTER(_I32),
                     ctypes.POINTER(_I64), ctypes.POINTER(ctypes.c_uint64), ctypes.POINTER(_VP)], _I),
    "nvtrt_enqueue": ([_VP, ctypes.POINTER(_VP), _VP, _VP, _VP], _I),
    "nvtrt_free": ([_VP], None),
    "nvtrt_log": ([], ctypes.c_char_p),
}


def _dims(shapes):
    flat = [d for s in shapes for d in (*s, *[0] * (MAX_DIMS - len(s)))]
    return (_I64 * len(flat))(*flat)


class Harness:
    """libnextvit_trt_numeric_trt<major>.so (csrc/trt/tests/numeric_harness.cpp) with the plugin
    library of the same build opened in it."""

    def __init__(self, build: Path, major_: int):
        self._lib = ctypes.CDLL(str(build / "tests" / f"libnextvit_trt_numeric_trt{major_}.so"))
        for name, (args, res) in _SIGNATURES.items():
            f = getattr(self._lib, name)
            f.argtypes, f.restype = args, res
        self.plugins = self._lib.nvtrt_open(str(build / f"libnextvit_trt_plugins_trt{major_}.so").encode())
        assert self.plugins, self.log()

    def log(self) -> str:
        return self._lib.nvtrt_log().decode(errors="replace")

    def symbol(self, name: str) -> Optional[int]:
        return self._lib.nvtrt_symbol(self.plugins, name.encode())

    @contextlib.contextmanager
    def node(self, plugin: str, fields: Dict[str, int], shapes, nb_activations: int, max_shapes, dtype):
        """Builds the node; yields (node, output shape, workspace bytes)."""
        names = (ctypes.c_char_p * max(1, len(fields)))(*(k.encode() for k in fields))
        values = (_I32 * max(1, len(fields)))(*fields.values())
        ranks = (_I32 * len(shapes))(*map(len, shapes))
        out_rank, out_dims = _I32(), (_I64 * MAX_DIMS)()
        ws, node = ctypes.c_uint64(), _VP()
        st = self._lib.nvtrt_build(self.plugins, plugin.encode(), len(fields), names, values, len(shapes),
                                   nb_activations, ranks, _dims(shapes), _dims(max_shapes), clib._DT[dtype],
                                   ctypes.byref(out_rank), out_dims, ctypes.byref(ws), ctypes.byref(node))
        assert st == 0 and node.value, f"building {plugin} failed:\n{self.log()}"
        try:
            yield node.value, tuple(out_dims[:out_rank.value]), ws.value
        finally:
            self._lib.nvtrt_free(node.value)

    def enqueue(self, node: int, inputs, output: int, workspace: int) -> int:
        ptrs = (_VP * len(inputs))(*inputs)
        return self._lib.nvtrt_enqueue(node, ptrs, output, workspace or None, None)


# ------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def c_library():
    return c_library_with(*STAND_IN_ENTRY_POINTS)


@pytest.fixture(scope="module")
def drv(c_library):
    with testing.cpu_driver(library=c_library) as d:
        yield d


@pytest.fixture(scope="module", params=header_sets())
def harness(request, c_library, drv):
    include = request.param
    # sanitized with the library in a sanitized worker (conftest.py); kept on disk (tests/_builds.py)
    build = _builds.trt_harness(include, library=c_library, sanitized=sanitized())
    h = Harness(build, major(include))
    # The plugins find their C library by SONAME: one loaded earlier under that name would take
    # the calls, bypassing the stand-in's library.
    driven = ctypes.cast(ctypes.CDLL(c_library).nvk_mhca, _VP).value
    assert h.symbol("nvk_mhca") == driven, "the plugins call another libnextvit_kernels.so than the stand-in drives"
    return h


# ------------------------------------------------------------------ the test
def _reference(case: Case, ref_inputs: Dict[str, torch.Tensor]) -> torch.Tensor:
    """The op module's float64 reference in the plugin's layout (NHWC, or [B, N] for the head)."""
    kwargs = {n: t.permute(0, 3, 1, 2) if n in ACTIVATIONS else t for n, t in ref_inputs.items()}
    kwargs.update({k: v for k, v in case.fields.items() if k != "has_x2"})  # has_x2: x2 passed or not
    out = ops.module(case.op).reference(**kwargs)
    return out.permute(0, 2, 3, 1) if out.dim() == 4 else out


def _profile_max(case: Case):
    bhw = case.profile_max
    return [(*bhw, s[3]) if n in ACTIVATIONS and bhw else s for n, s in case.inputs()]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_enqueue_matches_the_reference(harness, drv, case, dtype):
    inputs, ref_inputs = [], {}
    for name, shape in case.inputs():
        fan_in = prod(shape[1:]) if name not in ACTIVATIONS else 1
        t, t64 = rand_like_dtype(*shape, dtype=dtype, scale=fan_in ** -0.5)
        inputs.append(t)
        ref_inputs[name] = t64
    ref = _reference(case, ref_inputs)
    shapes = [s for _, s in case.inputs()]
    nb_act = sum(n in ACTIVATIONS for n, _ in case.inputs())
    with harness.node(PLUGINS[case.op].name, case.fields, shapes, nb_act, _profile_max(case), dtype) as (
            node, out_shape, ws):
        assert out_shape == tuple(ref.shape), f"getOutputShapes: {out_shape}, the reference: {tuple(ref.shape)}"
        out = torch.full(out_shape, float("nan"), dtype=dtype)
        scratch = torch.full((ws + GUARD,), 0xFF, dtype=torch.uint8)  # 0xFF..: NaN in fp16 and fp32
        ws_ptr = scratch.data_ptr() if ws else 0
        drv.reset_counters()
        with drv.registered(*inputs, out, (ws_ptr, ws) if ws else None):
            status = harness.enqueue(node, [t.data_ptr() for t in inputs], out.data_ptr(), ws_ptr)
        log = harness.log()
        reach = drv.reach(ws_ptr) if ws else 0
        counters = drv.counters()
    assert status == 0 and not drv.errors and not log, f"enqueue returned {status}; {drv.errors}; log:\n{log}"
    assert_close(out, ref, dtype, what=case.id)
    assert (counters["launches"], counters["allocs"], counters["copies"], counters["syncs"]) == (
        case.launches, 0, 0, 0), counters
    assert bool((scratch[ws:] == 0xFF).all()), "a launch wrote past the workspace"
    assert reach <= ws
    if case.profile_max is None and not case.covers_fewer_pixels:
        need = -(-reach // WORKSPACE_GRANULE) * WORKSPACE_GRANULE
        assert ws == need, f"getWorkspaceSize {ws} bytes; the launches reached {reach} (rounded: {need})"
