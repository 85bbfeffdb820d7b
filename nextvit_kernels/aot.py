"""Ahead-of-time compilation of every Triton kernel the fused Next-ViT uses (docs/design.md §6, §7).

    python -m nextvit_kernels.aot --arch sm_80,sm_90 --out DIR [--dtypes fp16,bf16,fp32]
        [--variants s,b,l] [--resolutions 224,384] [-j N] [--emit-c FILE] [--from-manifest]
    python -m nextvit_kernels.aot --export MODEL.nvk --variant s [--checkpoint CKPT] [--dtype fp16]
        (a model file for the whole-model C runtime: nextvit_kernels.model_file)

Works without a GPU: ``triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))``.

What it does:
1. builds each model variant (random weights), ``fused.fold``s it and walks the plan's steps
   with the spatial sizes of every requested resolution, collecting a *shape key* per step
   (the non-spatial inputs of the op's ``_config``: channels, hidden, stride, sr_ratio, ...);
2. for each (op, dtype, key) calls the op module's ``_config`` exactly as its launcher does.
   Ops whose ``_config`` also depends on a spatial quantity (E-MHSA: the number of key
   tokens; head: H*W; MHCA: the pixels B*H*W) are probed over that quantity: every *probe
   class* (a maximal range of values with the same configuration) becomes its own shape
   class, so any batch and resolution is covered, not only the requested ones;
3. dedupes the (kernel, dtype, constexprs, specialization, warps, stages) variants and
   compiles each for every arch in a process pool; writes ``kernels/<id>.<arch>.cubin`` and
   ``.ptx`` and ``manifest.json`` (kernels + shape-class table);
4. with ``--emit-c FILE``, writes the C source the C library embeds (``.incbin`` of the
   cubins/PTX + the shape-class table).

Specialization (what the compiled code assumes, and the C library guarantees / checks):
- every pointer argument is 16-byte aligned (``tt.divisibility=16``, as the JIT sees for
  fresh allocations); the C library returns NVK_ERR_INVALID for misaligned pointers;
- an integer argument whose value is fixed by the shape key (channel counts, contiguous
  weight strides, the NHWC channel stride 1) is specialized like the JIT would: ``== 1``
  becomes a constexpr (not passed), a multiple of 16 gets ``tt.divisibility=16``;
- integer arguments that depend on batch / height / width are *not* specialized (no
  ``== 1``, no divisibility), except a product with a key value that is a multiple of 16
  for *every* shape (row strides W*C with C % 16 == 0): the kernels are valid for any
  runtime spatial shape. They are i32 (the C side checks that
  they fit), floats fp32, exactly as the JIT launcher passes them.
"""
import concurrent.futures as cf
import hashlib
import importlib
import json
import multiprocessing as mp
import os
import re
import sys
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch
import triton

from .plan import (CONST_LEN, DTYPE_ID, DTYPES, KEY_LEN, KEY_NAMES, MAX_KERNELS, OP_ID, OPS, spatial_sizes,
                   step_keys)

MANIFEST_VERSION = 1
TRITON_PTR = {"fp32": "*fp32", "fp16": "*fp16", "bf16": "*bf16"}
# Spatial samples used to tell shape-key-fixed integer arguments from runtime ones.
# (1, 1, 1) first: a value divisible by 16 there is a multiple of 16 made of shape-key values.
_SAMPLES = ((1, 1, 1), (1, 3, 5), (1, 17, 19), (2, 23, 29), (3, 41, 37), (5, 7, 11))
PROBE_MAX = 1 << 16   # probe classes are searched up to this value; the last one is open


def _mod(name):
    return importlib.import_module(f"nextvit_kernels.ops.{name}")


_JIT = {}


def _kernel(op: str, name: str):
    """The op's @triton.jit function. Under TRITON_INTERPRET=1 the decorator returns an
    interpreter wrapper; rebuild a real JITFunction from its Python function then."""
    if (op, name) not in _JIT:
        obj = getattr(_mod(op), name)
        if not isinstance(obj, triton.runtime.JITFunction):
            obj = triton.runtime.JITFunction(obj.fn)
        _JIT[(op, name)] = obj
    return _JIT[(op, name)]


# --------------------------------------------------------------------------- per-op specs
@dataclass
class KernelCall:
    """One kernel launch of an op: which @triton.jit function, its constexprs, warps, stages,
    and a function giving the runtime arguments (name, value) in the launcher's order for a
    spatial sample (batch, h, w)."""
    kernel: str                    # attribute name in the op module
    constexprs: dict
    num_warps: int
    num_stages: int
    args: Callable[[int, int, int], List[Tuple[str, object]]]


@dataclass
class OpSpec:
    const_names: Tuple[str, ...]   # launch constants the C side needs (grid, workspace)
    probe: Optional[str]           # spatial quantity _config depends on, or None
    calls: Callable                # (key: dict, dtype, probe_value) -> (list[KernelCall], consts)


def _nhwc(b, c, h, w):
    """Strides of a logical [B, C, H, W] channels_last tensor: (sb, sc, sh, sw)."""
    return h * w * c, 1, w * c, c


def _nchw(b, c, h, w):
    """Strides of a contiguous NCHW [B, C, H, W] tensor (the whole-model runtime's image input)."""
    return c * h * w, h * w, w, 1


def _conv_calls(key, dtype, _probe):
    m = _mod("conv_bn_relu")
    ci, co, s = key["c_in"], key["c_out"], key["stride"]
    cfg = m._config(ci, co, torch.empty((), dtype=dtype).element_size())
    x_strides = _nchw if key.get("nchw") else _nhwc

    def args(b, h, w):
        ho, wo = m.out_size(h, s), m.out_size(w, s)
        return ([("x_ptr", "p"), ("w_ptr", "p"), ("b_ptr", "p"), ("out_ptr", "p"),
                 ("M", b * ho * wo), ("H", h), ("W", w), ("HO", ho), ("WO", wo),
                 ("C_IN", ci), ("C_OUT", co)]
                + list(zip(("sxb", "sxc", "sxh", "sxw"), x_strides(b, ci, h, w)))
                + list(zip(("sw0", "sw1", "sw2", "sw3"), (ci * 9, 9, 3, 1)))
                + [("sbias", 1)]
                + list(zip(("sob", "soc", "soh", "sow"), _nhwc(b, co, ho, wo))))

    const = dict(STRIDE=s, FLAT_K=cfg["FLAT_K"], BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"],
                 BLOCK_K=cfg["BLOCK_K"], DOT_PRECISION="ieee" if dtype == torch.float32 else "tf32")
    return ([KernelCall("_conv_bn_relu_kernel", const, cfg["num_warps"], cfg["num_stages"], args)],
            dict(BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"]))


def _patch_embed_calls(key, dtype, _probe):
    m = _mod("patch_embed")
    ci, co, s = key["c_in"], key["c_out"], key["stride"]
    cfg = dict(m._config(ci, co, s, dtype))
    warps, stages = cfg.pop("num_warps"), cfg.pop("num_stages")

    def args(b, h, w):
        oh, ow = -(-h // s), -(-w // s)
        return [("x_ptr", "p"), ("w_ptr", "p"), ("b_ptr", "p"), ("out_ptr", "p"),
                ("M", b * oh * ow), ("H", h), ("W", w), ("OH", oh), ("OW", ow),
                ("CIN", ci), ("COUT", co)]

    return ([KernelCall("_patch_embed_kernel", dict(STRIDE=s, **cfg), warps, stages, args)],
            dict(BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"]))


def _mlp_kernel_args(c1, c2, hid, co):
    """Runtime arguments of mlp._mlp_kernel, in its launchers' order (the MLP's own fc2, and
    gemm_from_scratch for the split ops, where c1 = hid = C and c2 = 0)."""
    def args(b, h, w):
        return [("x_ptr", "p"), ("x2_ptr", "p"), ("w1_ptr", "p"), ("b1_ptr", "p"), ("w2_ptr", "p"),
                ("b2_ptr", "p"), ("h_ptr", "p"), ("out_ptr", "p"),
                ("M", b * h * w), ("C1", c1), ("C2", c2), ("HID", hid), ("COUT", co)]
    return args


def _scratch_gemm_call(cfg, c, co, residual, has_bias):
    """The KernelCall of mlp.gemm_from_scratch: _mlp_kernel reading a [rows, c] scratch."""
    g = dict(cfg)
    warps, stages = g.pop("num_warps"), g.pop("num_stages")
    return KernelCall("_mlp_kernel", dict(HAS_X2=False, RESIDUAL=residual, H_IN_MEMORY=True, HAS_B2=has_bias, **g),
                      warps, stages, _mlp_kernel_args(c, 0, c, co))


def _mhca_calls(key, dtype, m_pixels):
    m = _mod("mhca")
    c, co, res = key["c"], key["c_out"], bool(key["residual"])
    cfg = m._config(c, co, torch.empty((), dtype=dtype).element_size(), m_pixels)
    f, cv = dict(cfg["fused"]), dict(cfg["conv"])
    prec = "ieee" if dtype == torch.float32 else "tf32"
    x_strides = lambda b, h, w: list(zip(("sxb", "sxc", "sxh", "sxw"), _nhwc(b, c, h, w)))  # noqa: E731
    cw_strides = list(zip(("scw0", "scw1", "scw2", "scw3"), (32 * 9, 9, 3, 1))) + [("scb", 1)]

    def fused_args(b, h, w):
        return ([("x_ptr", "p"), ("cw_ptr", "p"), ("cb_ptr", "p"), ("pw_ptr", "p"), ("out_ptr", "p"),
                 ("M", b * h * w), ("H", h), ("W", w), ("C", c), ("C_OUT", co)]
                + x_strides(b, h, w) + cw_strides + [("spw0", c), ("spw1", 1)]
                + list(zip(("sob", "soc", "soh", "sow"), _nhwc(b, co, h, w))))

    def conv_args(b, h, w):
        return ([("x_ptr", "p"), ("cw_ptr", "p"), ("cb_ptr", "p"), ("h_ptr", "p"),
                 ("M", b * h * w), ("H", h), ("W", w), ("C", c)] + x_strides(b, h, w) + cw_strides)

    if cfg["split"]:
        cw_warps, cw_stages = cv.pop("num_warps"), cv.pop("num_stages")
        calls = [KernelCall("_mhca_conv_kernel", cv, cw_warps, cw_stages, conv_args),
                 _scratch_gemm_call(cfg["proj"], c, co, res, has_bias=False)]
    else:
        const = dict(RESIDUAL=res, BLOCK_M=f["BLOCK_M"], BLOCK_N=f["BLOCK_N"], DOT_PRECISION=prec)
        calls = [KernelCall("_mhca_kernel", const, f["num_warps"], f["num_stages"], fused_args)]
    return calls, dict(BLOCK_M=f["BLOCK_M"], BLOCK_N=f["BLOCK_N"], CONV_BLOCK_M=cfg["conv"]["BLOCK_M"],
                       PROJ_BLOCK_M=cfg["proj"]["BLOCK_M"], PROJ_BLOCK_N=cfg["proj"]["BLOCK_N"])


def _mlp_calls(key, dtype, _probe):
    m = _mod("mlp")
    c1, c2, hid, co, res = key["c1"], key["c2"], key["hidden"], key["c_out"], bool(key["residual"])
    cfg = m._config(c1, c2, hid, co, dtype)
    split = cfg["split"]
    f, g = dict(cfg["fc1"]), dict(cfg["mlp"])
    f_warps, f_stages = f.pop("num_warps"), f.pop("num_stages")
    g_warps, g_stages = g.pop("num_warps"), g.pop("num_stages")
    inputs = [("x_ptr", "p"), ("x2_ptr", "p"), ("w1_ptr", "p"), ("b1_ptr", "p")]

    def fc1_args(b, h, w):
        return inputs + [("h_ptr", "p"), ("M", b * h * w), ("C1", c1), ("C2", c2), ("HID", hid)]

    calls = [KernelCall("_mlp_kernel", dict(HAS_X2=c2 > 0, RESIDUAL=res, H_IN_MEMORY=split, HAS_B2=True, **g),
                        g_warps, g_stages, _mlp_kernel_args(c1, c2, hid, co))]
    if split:  # fc1 into the workspace first (the C side: two kernels <=> split)
        calls.insert(0, KernelCall("_fc1_kernel", dict(HAS_X2=c2 > 0, **f), f_warps, f_stages, fc1_args))
    return calls, dict(BLOCK_M=g["BLOCK_M"], BLOCK_N=g["BLOCK_N"], FC1_BLOCK_M=f["BLOCK_M"],
                       FC1_BLOCK_H=f["BLOCK_H"])


def _e_mhsa_calls(key, dtype, n_keys):
    m = _mod("e_mhsa")
    c, co, sr, hd, res = key["c"], key["c_out"], key["sr_ratio"], key["head_dim"], bool(key["residual"])
    r = sr * sr
    # n_tokens is not used by _config; pass the smallest consistent value.
    cfg = m._config(n_keys * r, c, co, n_keys, hd, sr)
    kvc, atc = dict(cfg["kv"]), dict(cfg["attn"])
    prec = "ieee" if dtype == torch.float32 else "tf32"
    kv_warps = kvc.pop("num_warps")
    at_warps = atc.pop("num_warps")

    def kv_args(b, h, w):
        n = h * w
        nk = n // r
        return [("x_ptr", "p"), ("pool_ptr", "p"), ("kw_ptr", "p"), ("kb_ptr", "p"), ("vw_ptr", "p"),
                ("vb_ptr", "p"), ("kv_ptr", "p"), ("N", n), ("C", c), ("NK", nk), ("R", r),
                ("ROWS", b * nk)]

    def attn_args(b, h, w):
        n = h * w
        return [("x_ptr", "p"), ("kv_ptr", "p"), ("qw_ptr", "p"), ("qb_ptr", "p"), ("pw_ptr", "p"),
                ("pb_ptr", "p"), ("out_ptr", "p"), ("N", n), ("C", c), ("COUT", co), ("NK", n // r),
                ("N_HEADS", c // hd), ("scale", float(hd) ** -0.5)]

    def heads_args(b, h, w):
        n = h * w
        return [("x_ptr", "p"), ("kv_ptr", "p"), ("qw_ptr", "p"), ("qb_ptr", "p"), ("o_ptr", "p"),
                ("N", n), ("C", c), ("NK", n // r), ("scale", float(hd) ** -0.5)]

    # The launcher passes no num_stages to these: Triton's default, as the JIT uses it.
    from triton.backends.nvidia.compiler import CUDAOptions
    stages = CUDAOptions.__dataclass_fields__["num_stages"].default
    calls = [KernelCall("_kv_kernel", dict(DOT_PREC=prec, **kvc), kv_warps, stages, kv_args)]
    hc = dict(cfg["heads"])
    h_warps = hc.pop("num_warps")
    if cfg["split"]:
        calls += [KernelCall("_attn_heads_kernel", dict(HEAD_DIM=hd, DOT_PREC=prec, **hc), h_warps, stages,
                             heads_args),
                  _scratch_gemm_call(dict(cfg["proj"], DOT_PRECISION=prec), c, co, res, has_bias=True)]
    else:
        calls.append(KernelCall("_attn_kernel", dict(HEAD_DIM=hd, RESIDUAL=res, DOT_PREC=prec, **atc),
                                at_warps, stages, attn_args))
    return calls, dict(KV_BLOCK_NK=kvc["BLOCK_NK"], BLOCK_M=atc["BLOCK_M"], BLOCK_CO=atc["BLOCK_CO"],
                       HEADS_BLOCK_M=hc["BLOCK_M"], PROJ_BLOCK_M=cfg["proj"]["BLOCK_M"],
                       PROJ_BLOCK_N=cfg["proj"]["BLOCK_N"])


def _head_calls(key, dtype, hw):
    m = _mod("head")
    c, n = key["c"], key["n_classes"]
    cfg = m._config(hw, c, n)

    def args(b, h, w):
        return [("x_ptr", "p"), ("w_ptr", "p"), ("b_ptr", "p"), ("out_ptr", "p"),
                ("HW", h * w), ("C", c), ("N", n), ("sxb", h * w * c), ("sxc", 1), ("sxhw", c),
                ("swn", c), ("swc", 1), ("sob", n), ("son", 1)]

    const = dict(BLOCK_HW=cfg["BLOCK_HW"], BLOCK_K=cfg["BLOCK_K"], BLOCK_N=cfg["BLOCK_N"])
    return ([KernelCall("_head_kernel", const, cfg["num_warps"], cfg["num_stages"], args)],
            dict(BLOCK_N=cfg["BLOCK_N"]))


SPECS: Dict[str, OpSpec] = {
    # (each op's shape key: plan.KEY_NAMES)
    "conv_bn_relu": OpSpec(("BLOCK_M", "BLOCK_N"), None, _conv_calls),
    "patch_embed": OpSpec(("BLOCK_M", "BLOCK_N"), None, _patch_embed_calls),
    "mhca": OpSpec(("BLOCK_M", "BLOCK_N", "CONV_BLOCK_M", "PROJ_BLOCK_M", "PROJ_BLOCK_N"), "pixels", _mhca_calls),
    "mlp": OpSpec(("BLOCK_M", "BLOCK_N", "FC1_BLOCK_M", "FC1_BLOCK_H"), None, _mlp_calls),
    "e_mhsa": OpSpec(("KV_BLOCK_NK", "BLOCK_M", "BLOCK_CO", "HEADS_BLOCK_M", "PROJ_BLOCK_M", "PROJ_BLOCK_N"),
                     "n_keys", _e_mhsa_calls),
    "head": OpSpec(("BLOCK_N",), "hw", _head_calls),
}


# --------------------------------------------------------------------------- plan walking
_PLANS = {}


def _plan(variant: str):
    """The fused plan of a variant; only its shapes are used, so the (slow) random
    weight init is skipped."""
    if variant not in _PLANS:
        from unittest import mock
        from . import fused, model as model_mod
        with mock.patch.object(torch.nn.init, "trunc_normal_", lambda t, *a, **k: t):
            net = getattr(model_mod, variant)().eval()
        _PLANS[variant] = fused.fold(net, "cpu", torch.float32)
    return _PLANS[variant]


def plan_keys(variant: str, resolution: int):
    """[(op, key dict, probe value or None)] for every step of the fused plan of ``variant``
    at ``resolution`` x ``resolution`` (probe: E-MHSA key tokens, head H*W, MHCA pixels at batch 1),
    the stem conv also with an NCHW input (the whole-model runtime reads images either way)."""
    plan = _plan(variant)
    sizes, (h_out, w_out) = spatial_sizes(plan, resolution, resolution)
    out = []
    for i, ((op, key), (h, w)) in enumerate(zip(step_keys(plan), sizes)):
        probe = h * w if op == "mhca" else (h * w) // key["sr_ratio"] ** 2 if op == "e_mhsa" else None
        out.append((op, key, probe))
        if i == 0:
            out.append((op, dict(key, nchw=1), None))
    hw_, hb = plan.head
    out.append(("head", dict(c=hw_.shape[1], n_classes=hw_.shape[0]), h_out * w_out))
    # the stage norms of a detection/segmentation backbone run as 1x1 convs (nvk_model.c)
    for s, (op, key) in zip(plan.steps, step_keys(plan)):
        if s.stage_end >= 0:
            out.append(("patch_embed", dict(c_in=key["c_out"], c_out=key["c_out"], stride=1), None))
    return out


def probe_classes(op: str, key: dict, dtype) -> List[Tuple[int, int]]:
    """Maximal ranges [lo, hi] of the op's spatial probe value with one configuration
    (hi = -1: open-ended). Derived from ``_config`` only."""
    spec = SPECS[op]
    if spec.probe is None:
        return [(0, -1)]

    def sig(v):
        calls, consts = spec.calls(key, dtype, v)
        return json.dumps([[c.kernel, c.constexprs, c.num_warps, c.num_stages] for c in calls] + [consts],
                          sort_keys=True)

    ranges = []
    lo, cur = 1, sig(1)
    v = 2
    while v <= PROBE_MAX:
        s = sig(v)
        if s != cur:
            ranges.append((lo, v - 1))
            lo, cur = v, s
        # configurations only change at powers of two / small thresholds: step finely below
        # 4096, then by doubling.
        v = v + 1 if v < 4096 else v * 2
    ranges.append((lo, -1))
    return ranges


# --------------------------------------------------------------------------- specialization
def specialize(call: KernelCall, dtype_name: str, fn) -> Tuple[dict, dict, dict, List[str], List[dict]]:
    """-> (signature, constexprs (incl. specialized ints), attrs, passed runtime arg names,
    full runtime arg list [{name, type, passed, fixed_value}])."""
    samples = [call.args(*s) for s in _SAMPLES]
    names = [n for n, _ in samples[0]]
    for smp in samples[1:]:
        assert [n for n, _ in smp] == names
    expected = [a for a in fn.arg_names if a not in call.constexprs]
    if names != expected:
        raise RuntimeError(f"{fn.__name__}: runtime argument list {names} does not match the kernel's {expected}")
    sig, const, attrs = {}, dict(call.constexprs), {}
    full = []
    for i, n in enumerate(names):
        vals = [smp[i][1] for smp in samples]
        idx = fn.arg_names.index(n)
        if vals[0] == "p":
            sig[n] = TRITON_PTR[dtype_name]
            attrs[(idx,)] = [["tt.divisibility", 16]]
            full.append(dict(name=n, type="ptr", passed=True))
        elif isinstance(vals[0], float):
            sig[n] = "fp32"
            full.append(dict(name=n, type="f32", passed=True))
        else:
            fixed = all(v == vals[0] for v in vals)
            if fixed and vals[0] == 1:
                sig[n] = "constexpr"
                const[n] = 1
                full.append(dict(name=n, type="i32", passed=False, value=1))
                continue
            sig[n] = "i32"
            # multiple of 16 for every spatial sample: a product with a key value (e.g. the row
            # stride W*C with C % 16 == 0), so a multiple of 16 for every runtime shape too.
            div16 = all(v % 16 == 0 for v in vals)
            if div16:
                attrs[(idx,)] = [["tt.divisibility", 16]]
            full.append(dict(name=n, type="i32", passed=True, fixed=fixed, div16=div16))
    for n in call.constexprs:
        sig[n] = "constexpr"
    sig = {n: sig[n] for n in fn.arg_names}
    passed = [f["name"] for f in full if f["passed"]]
    return sig, const, attrs, passed, full


def _variant_id(op, kernel, dtype_name, sig, const, attrs, warps, stages):
    blob = json.dumps([op, kernel, dtype_name, sig, sorted((k, str(v)) for k, v in const.items()),
                       sorted((str(k), v) for k, v in attrs.items()), warps, stages], sort_keys=True)
    return f"{kernel.strip('_')}_{dtype_name}_{hashlib.sha1(blob.encode()).hexdigest()[:10]}"


# --------------------------------------------------------------------------- compiling
def _compile_one(job):
    """Worker: compile one variant for one arch; writes cubin + ptx, returns metadata."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    op, kernel, vid, sig, const, attrs, warps, stages, cc, outdir = job
    fn = _kernel(op, kernel)
    attrs = {tuple(k): v for k, v in attrs}
    t0 = time.time()
    src = ASTSource(fn, sig, const, attrs)
    k = triton.compile(src, target=GPUTarget("cuda", cc, 32),
                       options=dict(num_warps=warps, num_stages=stages))
    md = k.metadata
    md = md._asdict() if hasattr(md, "_asdict") else dict(md.__dict__)
    ptx = k.asm["ptx"]
    cubin = k.asm["cubin"]
    base = os.path.join(outdir, "kernels", f"{vid}.sm{cc}")
    with open(base + ".cubin", "wb") as f:
        f.write(cubin)
    with open(base + ".ptx", "w") as f:
        f.write(ptx)
    # Parameters of the .entry: user params + hidden ones Triton appends (scratch pointers).
    m = re.search(r"\.entry\s+(\S+)\s*\((.*?)\)", ptx, re.S)
    symbol = m.group(1)
    n_params = len(re.findall(r"\.param\s", m.group(2)))
    return dict(
        id=vid, cc=cc, symbol=symbol, n_entry_params=n_params, shared=int(md.get("shared", 0)),
        global_scratch_size=int(md.get("global_scratch_size", 0) or 0),
        global_scratch_align=int(md.get("global_scratch_align", 1) or 1),
        profile_scratch_size=int(md.get("profile_scratch_size", 0) or 0),
        profile_scratch_align=int(md.get("profile_scratch_align", 1) or 1),
        tmem_size=int(md.get("tmem_size", 0) or 0), num_ctas=int(md.get("num_ctas", 1)),
        launch_cooperative_grid=bool(md.get("launch_cooperative_grid", False)),
        launch_pdl=bool(md.get("launch_pdl", False)),
        cubin=os.path.relpath(base + ".cubin", outdir), ptx=os.path.relpath(base + ".ptx", outdir),
        cubin_bytes=len(cubin), seconds=round(time.time() - t0, 2), triton_version=triton.__version__)


def collect(variants, resolutions, dtypes):
    """-> (kernels: {vid: info}, classes: [shape class rows])."""
    keys = {}   # (op, key tuple) -> key dict
    needed = set()  # (op, key tuple, probe value)
    for v in variants:
        for r in resolutions:
            for op, key, probe in plan_keys(v, r):
                kt = tuple(key[n] for n in KEY_NAMES[op])
                keys[(op, kt)] = key
                needed.add((op, kt, probe))
    kernels, classes = {}, []
    for (op, kt), key in sorted(keys.items()):
        spec = SPECS[op]
        for dname in dtypes:
            dtype = DTYPES[dname]
            for lo, hi in probe_classes(op, key, dtype):
                calls, consts = spec.calls(key, dtype, lo)
                ids = []
                for call in calls:
                    fn = _kernel(op, call.kernel)
                    sig, const, attrs, passed, full = specialize(call, dname, fn)
                    vid = _variant_id(op, call.kernel, dname, sig, const, attrs, call.num_warps, call.num_stages)
                    if vid not in kernels:
                        kernels[vid] = dict(
                            id=vid, op=op, kernel=call.kernel, dtype=dname, signature=sig,
                            constexprs={k: v for k, v in const.items()},
                            attrs=[[list(k), v] for k, v in attrs.items()],
                            num_warps=call.num_warps, num_stages=call.num_stages,
                            params=full, passed_params=passed, archs={})
                    ids.append(vid)
                classes.append(dict(op=op, dtype=dname, key=dict(key), key_tuple=list(kt),
                                    probe=spec.probe, probe_lo=lo, probe_hi=hi, kernels=ids,
                                    consts={n: consts[n] for n in spec.const_names}))
    # completeness: every (op, key, probe value) the plans use is covered for every dtype
    for op, kt, probe in needed:
        for dname in dtypes:
            assert any(c["op"] == op and c["dtype"] == dname and tuple(c["key_tuple"]) == kt
                       and (probe is None or (c["probe_lo"] <= probe and (c["probe_hi"] < 0 or probe <= c["probe_hi"])))
                       for c in classes), (op, kt, probe, dname)
    return kernels, classes


def _parse_arch(a: str) -> int:
    """``sm_90`` / ``sm90`` / ``90`` -> 90; ValueError below sm_80 (the kernels need Ampere)."""
    cc = int(a.strip().lower().replace("sm_", "").replace("sm", ""))
    if cc < 80:
        raise ValueError("the kernels need sm_80 or newer")
    return cc


def main(argv=None):
    from . import cli
    p = cli.parser(__doc__.split("\n\n")[0] + "\n\nWorks without a GPU. The C library embeds sm_80 and sm_90 "
                   "images (and the sm_80 PTX for newer cards).", prog="python -m nextvit_kernels.aot")
    p.add_argument("--arch", type=cli.csv("arch", conv=_parse_arch), default="sm_80,sm_90",
                   help="comma list of CUDA architectures to compile for (sm_80 or newer)")
    p.add_argument("--out", help="output folder: manifest.json and kernels/ (required unless --export)")
    p.add_argument("--dtypes", type=cli.dtypes, default="fp16,bf16,fp32",
                   help=f"comma list of {', '.join(DTYPES)}")
    p.add_argument("--variants", type=cli.variants, default="s,b,l",
                   help="comma list of model variants s, b, l (or small, nextvit_small, ...)")
    p.add_argument("--resolutions", type=cli.csv("resolution", conv=cli.positive_int), default="224,384",
                   help="comma list of input sizes whose fused plans are walked (the probe classes cover any batch and size)")
    p.add_argument("-j", "--jobs", type=cli.positive_int, default=os.cpu_count() or 1, help="compile processes")
    p.add_argument("--emit-c", metavar="FILE", help="also write the C source the C library embeds")
    p.add_argument("--from-manifest", action="store_true",
                   help="compile nothing: emit C (--emit-c) from an existing OUT/manifest.json")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress lines")
    e = p.add_argument_group("model file (--export)")
    e.add_argument("--export", metavar="MODEL.nvk", help="write a model file for the C runtime instead of compiling")
    e.add_argument("--variant", type=cli.variant, default="s", help="model variant s, b or l")
    e.add_argument("--checkpoint", help="weights (any format load_checkpoint takes); default: random init")
    e.add_argument("--dtype", choices=cli.DTYPES, default="fp16", help="dtype of the folded weights")
    e.add_argument("--backbone", action="store_true",
                   help="a detection/segmentation backbone (stage norms, features only)")
    a = p.parse_args(argv)
    if a.export:
        cli.not_used(p, argv, ("arch", "out", "dtypes", "variants", "resolutions", "jobs", "emit_c", "from_manifest"),
                     "with --export")
        return export(a.export, a.variant, a.checkpoint, a.dtype, a.backbone, quiet=a.quiet)
    cli.not_used(p, argv, ("variant", "checkpoint", "dtype", "backbone"), "without --export")
    if not a.out:
        p.error("--out is required (or --export MODEL.nvk)")
    out = os.path.abspath(a.out)
    if a.from_manifest:
        if not a.emit_c:
            p.error("--from-manifest only emits C: give --emit-c FILE")
        path = os.path.join(out, "manifest.json")
        if not os.path.exists(path):
            p.error(f"--from-manifest: no {path}")
        cli.not_used(p, argv, ("arch", "dtypes", "variants", "resolutions", "jobs"), "with --from-manifest")
        with open(path) as f:
            manifest = json.load(f)
    else:
        if a.emit_c and not {80, 90} & set(a.arch):
            p.error("--emit-c embeds sm_80 and sm_90 images: --arch needs at least one of them")
        variants = [cli.VARIANTS[v] for v in dict.fromkeys(a.variants)]
        manifest = build(out, list(dict.fromkeys(a.arch)), list(dict.fromkeys(a.dtypes)), variants,
                         list(dict.fromkeys(a.resolutions)), a.jobs, quiet=a.quiet)
    if a.emit_c:
        emit_c(manifest, out, a.emit_c)
    return 0


def export(path, variant="s", checkpoint=None, dtype="fp16", backbone=False, quiet=False) -> int:
    """Writes the model file of a variant (with a checkpoint's weights) for the C runtime."""
    from . import cli, model as model_mod, model_file
    from .checkpoint import load_checkpoint
    net = getattr(model_mod, cli.VARIANTS[variant])(with_extra_norm=backbone)
    if checkpoint:
        res = load_checkpoint(net, checkpoint, strict=not backbone)
        if not quiet:
            print(f"aot: loaded {checkpoint} ({res.format} format)", file=sys.stderr)
    elif not quiet:
        print("aot: no --checkpoint: random weights (a file to test with, not to classify)", file=sys.stderr)
    model_file.save_runtime(net, path, dtype=DTYPES[dtype])
    if not quiet:
        print(f"aot: wrote {path} ({os.path.getsize(path) / 1e6:.1f} MB, {cli.VARIANTS[variant]}, {dtype})",
              file=sys.stderr)
    return 0


def build(out, archs, dtypes, variants, resolutions, jobs=None, quiet=False):
    t0 = time.time()
    os.makedirs(os.path.join(out, "kernels"), exist_ok=True)
    kernels, classes = collect(variants, resolutions, dtypes)
    jobs_list = [(k["op"], k["kernel"], k["id"], k["signature"],
                  {n: v for n, v in k["constexprs"].items()},
                  [[tuple(x[0]), x[1]] for x in k["attrs"]], k["num_warps"], k["num_stages"], cc, out)
                 for k in kernels.values() for cc in archs]
    n = len(jobs_list)
    if not quiet:
        print(f"aot: {len(kernels)} kernel variants x {len(archs)} archs = {n} compiles, "
              f"{len(classes)} shape classes, {jobs or os.cpu_count()} workers", file=sys.stderr, flush=True)
    results = []
    interp = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    if interp:
        # The interpreter patches triton.language in this process: compile in fresh
        # processes without it.
        os.environ.pop("TRITON_INTERPRET")
        ctx = mp.get_context("spawn")
    else:
        ctx = mp.get_context("fork") if sys.platform.startswith("linux") else mp.get_context()
    with cf.ProcessPoolExecutor(max_workers=jobs or os.cpu_count(), mp_context=ctx) as ex:
        futs = {ex.submit(_compile_one, j): j for j in jobs_list}
        for i, f in enumerate(cf.as_completed(futs), 1):
            r = f.result()
            results.append(r)
            if not quiet:
                print(f"aot: [{i}/{n}] {r['id']} sm_{r['cc']} {r['seconds']:.1f}s "
                      f"(elapsed {time.time() - t0:.0f}s)", file=sys.stderr, flush=True)
    if interp:
        os.environ["TRITON_INTERPRET"] = "1"
    for r in results:
        k = kernels[r["id"]]
        user = len(k["passed_params"])
        hidden_n = r["n_entry_params"] - user
        if hidden_n < 0:
            raise RuntimeError(f"{r['id']}: .entry has {r['n_entry_params']} params, fewer than {user}")
        hidden = []
        # Triton >= 3.3 appends global_scratch, then (>= 3.5) profile_scratch pointers.
        names = ["global_scratch", "profile_scratch"][:hidden_n] + \
            [f"hidden_{i}" for i in range(max(0, hidden_n - 2))]
        for hn in names:
            size = r.get(f"{hn}_size", 0)
            hidden.append(dict(name=hn, type="ptr", size=size, align=r.get(f"{hn}_align", 1)))
            if size:
                raise RuntimeError(f"{r['id']} sm_{r['cc']}: {hn} needs {size} bytes per program; "
                                   "the C library only supports kernels without scratch")
        if r["num_ctas"] != 1 or r["launch_cooperative_grid"] or r["launch_pdl"] or r["tmem_size"]:
            raise RuntimeError(f"{r['id']}: unsupported launch attributes {r}")
        k["archs"][f"sm_{r['cc']}"] = dict(
            symbol=r["symbol"], shared=r["shared"], cubin=r["cubin"], ptx=r["ptx"],
            cubin_bytes=r["cubin_bytes"], hidden_params=hidden, n_entry_params=r["n_entry_params"],
            triton_version=r["triton_version"])
    manifest = dict(
        version=MANIFEST_VERSION, triton_version=triton.__version__, torch_version=torch.__version__,
        archs=[f"sm_{cc}" for cc in archs], dtypes=list(dtypes), variants=list(variants),
        resolutions=list(resolutions), ops=list(OPS),
        key_names={op: list(KEY_NAMES[op]) for op in SPECS},
        const_names={op: list(s.const_names) for op, s in SPECS.items()},
        probe={op: s.probe for op, s in SPECS.items()},
        specialization=("pointers 16-byte aligned (tt.divisibility=16); integer args fixed by the shape "
                        "key: ==1 -> constexpr, %16==0 -> tt.divisibility=16; spatial integer args "
                        "unspecialized i32"),
        kernels=sorted(kernels.values(), key=lambda k: k["id"]), shape_classes=classes,
        build_seconds=round(time.time() - t0, 1))
    with open(os.path.join(out, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=1)
    if not quiet:
        print(f"aot: wrote {out}/manifest.json in {time.time() - t0:.0f}s", file=sys.stderr, flush=True)
    return manifest


# --------------------------------------------------------------------------- C source
def embedded_manifest(manifest: dict, out: str) -> str:
    """The manifest the C library embeds (``nvk_manifest()``), with the SHA-1 of every image it
    embeds: a cuModuleLoadData image names no variant (every variant of a kernel has the same
    .entry name), its hash does (nextvit_kernels.testing decodes launches by it)."""
    m = json.loads(json.dumps(manifest))
    for k in m["kernels"]:
        for info in k["archs"].values():
            for kind in ("cubin", "ptx"):
                with open(os.path.join(out, info[kind]), "rb") as f:
                    info[f"{kind}_sha1"] = hashlib.sha1(f.read()).hexdigest()
    return json.dumps(m, separators=(",", ":"), sort_keys=True)


def _c_str(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def emit_c(manifest: dict, out: str, path: str, images: bool = True) -> None:
    """Writes the C source embedded in libnextvit_kernels.so: every cubin (sm_80, sm_90)
    and the sm_80 PTX (the forward-compatible fallback; sm_90a PTX is not) as read-only
    byte arrays (assembler ``.incbin``: instant to build, unlike megabytes of hex
    literals), the kernel table and the shape-class table (types in csrc/src/nvk_table.h).
    ``images=False``: the tables only, no image (every launch then fails with "no image"): what
    the C tests of the loader build from a manifest whose images are not on disk."""
    out = os.path.abspath(out)
    missing = [a for a in ("sm_80", "sm_90") if a not in manifest["archs"]]
    for k in manifest["kernels"]:
        for a in manifest["archs"]:
            if a not in k["archs"]:
                raise RuntimeError(f"manifest: {k['id']} was not compiled for {a}")
    lines = ["/* Generated by python -m nextvit_kernels.aot --emit-c: do not edit. */",
             '#include "nvk_table.h"', ""]
    blobs = []

    def blob(relpath, nul):
        if not images:
            return "0", 0
        full = os.path.join(out, relpath)
        if '"' in full or "\n" in full:
            raise RuntimeError(f"unsupported character in path {full!r}")
        name = f"nvk_blob_{len(blobs)}"
        blobs.append((name, full, nul))
        return name, os.path.getsize(full) + (1 if nul else 0)

    kid = {}
    rows = []
    for i, k in enumerate(manifest["kernels"]):
        kid[k["id"]] = i
        fields = {}
        for a, slot in (("sm_80", "80"), ("sm_90", "90")):
            if a in k["archs"]:
                name, size = blob(k["archs"][a]["cubin"], False)
                fields[f"cubin{slot}"] = (name, size, k["archs"][a]["shared"])
        ptx = None
        if "sm_80" in k["archs"] and images:
            ptx, _ = blob(k["archs"]["sm_80"]["ptx"], True)
        any_arch = next(iter(k["archs"].values()))
        n_user = len(k["passed_params"])
        n_hidden = len(any_arch["hidden_params"])
        for a, info in k["archs"].items():
            if info["n_entry_params"] != n_user + n_hidden or len(info["hidden_params"]) != n_hidden:
                raise RuntimeError(f"{k['id']} {a}: inconsistent parameter count")
            if any(h["size"] for h in info["hidden_params"]):
                raise RuntimeError(f"{k['id']} {a}: kernels with scratch memory are not supported")
        mask = 0
        for j, prm in enumerate(k["params"]):
            if prm["passed"]:
                mask |= 1 << j
        c80 = fields.get("cubin80", ("0", 0, 0))
        c90 = fields.get("cubin90", ("0", 0, 0))
        rows.append(
            f"  {{{_c_str(k['id'])}, {_c_str(any_arch['symbol'])}, {OP_ID[k['op']]}, {DTYPE_ID[k['dtype']]}, "
            f"{k['num_warps']}, {n_user}, {n_hidden}, {len(k['params'])}, {mask:#x}ull, "
            f"{c80[0]}, {c80[1]}u, {c80[2]}u, {c90[0]}, {c90[1]}u, {c90[2]}u, "
            f"{'(const char*)' + ptx if ptx else '0'}}},")
    # the manifest itself, NUL-terminated (nvk_manifest())
    man_path = path + ".manifest.json"
    with open(man_path + ".tmp", "w") as f:
        f.write(embedded_manifest(manifest, out) if images else json.dumps(manifest))
    os.replace(man_path + ".tmp", man_path)
    if '"' in man_path or "\n" in man_path:
        raise RuntimeError(f"unsupported character in path {man_path!r}")
    blobs.append(("nvk_manifest_json", os.path.abspath(man_path), True))
    # the .incbin blobs
    asm = ['__asm__(".section .rodata\\n"']
    for name, full, nul in blobs:
        asm.append(f'        ".balign 64\\n.globl {name}\\n.hidden {name}\\n.type {name}, @object\\n{name}:\\n"')
        asm.append(f'        ".incbin \\"{full}\\"\\n"' + ('\n        ".byte 0\\n"' if nul else ""))
    asm.append('        ".text\\n");')
    lines += [f"extern const unsigned char {name}[];" for name, _, _ in blobs if name != "nvk_manifest_json"]
    lines += [""] + asm + [""]
    lines.append("const nvk_kernel_t nvk_kernels[] = {\n" + "\n".join(rows) + "\n};")
    lines.append(f"const int nvk_num_kernels = {len(rows)};")
    crow = []
    for c in manifest["shape_classes"]:
        key = list(c["key_tuple"]) + [0] * (KEY_LEN - len(c["key_tuple"]))
        consts = [c["consts"][n] for n in manifest["const_names"][c["op"]]]
        consts += [0] * (CONST_LEN - len(consts))
        ks = [kid[x] for x in c["kernels"]] + [-1] * (MAX_KERNELS - len(c["kernels"]))
        crow.append(f"  {{{OP_ID[c['op']]}, {DTYPE_ID[c['dtype']]}, {{{', '.join(map(str, key))}}}, "
                    f"{c['probe_lo']}ll, {c['probe_hi']}ll, {{{', '.join(map(str, ks))}}}, {len(c['kernels'])}, "
                    f"{{{', '.join(map(str, consts))}}}}},")
    lines.append("const nvk_shape_class_t nvk_shape_classes[] = {\n" + "\n".join(crow) + "\n};")
    lines.append(f"const int nvk_num_shape_classes = {len(crow)};")
    info = (f"triton {manifest['triton_version']}; archs {','.join(manifest['archs'])}; dtypes "
            f"{','.join(manifest['dtypes'])}; variants {','.join(manifest['variants'])}; "
            f"{len(rows)} kernels, {len(crow)} shape classes" + (f"; missing {missing}" if missing else ""))
    lines.append(f"const char nvk_aot_info[] = {_c_str(info)};")
    tmp = path + ".tmp"
    os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
    with open(tmp, "w") as f:
        f.write("\n".join(lines) + "\n")
    os.replace(tmp, path)


# --------------------------------------------------------------------------- building the C library
def build_library(build_dir: str, aot_dir: Optional[str] = None, aot_args=(),
                  source_dir: Optional[str] = None, env=None, quiet: bool = True, cmake_args=()) -> str:
    """Configures and builds libnextvit_kernels.so with CMake + Ninja into
    ``build_dir``, embedding ``aot_dir`` (compiled first when it has no manifest.json); ``cmake_args``
    are added to the configure step (e.g. ``-DCMAKE_C_FLAGS=...``).
    Returns the build directory. Used by the tests; ``pip install .`` does the same in setup.py."""
    import shutil
    import subprocess
    src = source_dir or os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cmake = shutil.which("cmake")
    if cmake is None or shutil.which("ninja") is None:
        raise RuntimeError("building the C library needs cmake and ninja on PATH")
    cfg = [cmake, "-S", src, "-B", build_dir, "-G", "Ninja", f"-DPython3_EXECUTABLE={sys.executable}"]
    if aot_dir:
        cfg.append(f"-DNEXTVIT_AOT_DIR={os.path.abspath(aot_dir)}")
    if aot_args:
        cfg.append("-DNEXTVIT_AOT_ARGS=" + ";".join(aot_args))
    cfg += list(cmake_args)
    for cmd in (cfg, [cmake, "--build", build_dir]):
        r = subprocess.run(cmd, capture_output=quiet, text=True, env=env)
        if r.returncode:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{r.stdout}\n{r.stderr}")
    return build_dir


if __name__ == "__main__":
    sys.exit(main())
