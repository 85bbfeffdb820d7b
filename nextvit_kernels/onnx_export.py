"""ONNX export of the BatchNorm-folded Next-ViT graph (docs/design.md §1, §4, §7).

``export_onnx(model, path)`` builds the graph directly with ``onnx.helper`` from
``fused.fold(model, "cpu", dtype)``, so merged and unmerged models give the same
graph and no BatchNorm is left (none is skipped either, the published export's
pitfall). The graph input is ``input`` [B, 3, H, W] (NCHW, like the PyTorch
model) and the output ``logits`` [B, num_classes], both in the export dtype.
The logits follow ``NextViT.forward``: the detection backbone's
``extra_norm_list`` only touches ``forward_features`` and is not part of it.

Two flavours:

* ``plugins=False``: standard ONNX operators in NCHW (Conv, Relu, AveragePool
  with ceil_mode=1 / count_include_pad=0, Add, Concat, MatMul, Softmax,
  ReduceMean, Reshape/Transpose/Slice for the E-MHSA 1-D token pooling, where
  the trailing N mod sr² tokens are dropped, GlobalAveragePool + Gemm for the
  head). onnxruntime runs it; TensorRT builds its own kernels from it.
  For fp16/bf16 the attention softmax is computed in float32 (Cast around it),
  as the PyTorch reference does.
* ``plugins=True``: one custom node per fused op (``plan.Plan`` step) and one
  for the head, in the ``nextvit`` domain, each carrying ``plugin_version``
  ("1"), ``plugin_namespace`` ("nextvit") and its int fields as attributes, with
  the folded weights as initializers on its extra inputs (in the Plan's shapes).
  TensorRT's ONNX parser maps such a node to the IPluginV3 creator of the same
  name / version / namespace (``csrc/trt``) and passes the attributes as
  PluginFields of the same names. Plugin tensors are NHWC, the kernels' layout:
  one standard ``Transpose`` NCHW->NHWC follows the graph input (the plugins
  therefore all take and produce NHWC; the head plugin produces [B, classes]).
  An NTB's concat-MLP takes the branch tensor as a second activation input
  (``has_x2=1``), so the concat is never materialized.

``PLUGINS`` is the single table of plugin names, inputs and fields;
tests/test_trt_contract.py checks the nodes against the creators of the built plugin library.
"""
from collections import Counter
from dataclasses import dataclass
from typing import Dict, Sequence, Tuple

import torch

from . import fused
from .plan import Plan, Step

__all__ = ["export_onnx", "PLUGINS", "PLUGIN_VERSION", "PLUGIN_NAMESPACE", "PLUGIN_DOMAIN", "PluginSpec",
           "plugin_node_counts"]

PLUGIN_VERSION = "1"
PLUGIN_NAMESPACE = "nextvit"
PLUGIN_DOMAIN = "nextvit"  # ONNX domain of the custom nodes (declared in opset_import)
PLUGIN_DOMAIN_VERSION = 1


@dataclass(frozen=True)
class PluginSpec:
    """A TensorRT plugin as the ONNX graph uses it. ``inputs``: the node's inputs in
    order (activations first; ``x2`` only when ``has_x2``), ``fields``: int32
    PluginFields, which are also the node's int attributes."""
    name: str
    inputs: Tuple[str, ...]
    fields: Tuple[str, ...]


PLUGINS: Dict[str, PluginSpec] = {
    "conv_bn_relu": PluginSpec("NextViTConvBnRelu", ("x", "w", "b"), ("stride",)),
    "patch_embed": PluginSpec("NextViTPatchEmbed", ("x", "w", "b"), ("stride",)),
    "mhca": PluginSpec("NextViTMHCA", ("x", "conv_w", "conv_b", "proj_w"), ("residual",)),
    "mlp": PluginSpec("NextViTMLP", ("x", "x2", "fc1_w", "fc1_b", "fc2_w", "fc2_b"), ("residual", "has_x2")),
    "e_mhsa": PluginSpec("NextViTEMHSA", ("x", "q_w", "q_b", "k_w", "k_b", "v_w", "v_b", "proj_w", "proj_b"),
                         ("sr_ratio", "head_dim", "residual")),
    "head": PluginSpec("NextViTHead", ("x", "w", "b"), ()),
}

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _onnx():
    try:
        import onnx
        from onnx import TensorProto, helper
    except ImportError as e:  # pragma: no cover - onnx is an optional dependency
        raise ImportError("export_onnx needs the 'onnx' package (pip install onnx)") from e
    return onnx, TensorProto, helper


def _onnx_dtype(dtype: torch.dtype) -> int:
    _, TensorProto, _ = _onnx()
    return {torch.float32: TensorProto.FLOAT, torch.float16: TensorProto.FLOAT16,
            torch.bfloat16: TensorProto.BFLOAT16}[dtype]


def _tensor_proto(name: str, t: torch.Tensor):
    """A TensorProto with raw little-endian data; bf16 keeps its exact bits."""
    _, TensorProto, helper = _onnx()
    t = t.detach().to("cpu").contiguous()
    if t.dtype == torch.bfloat16:
        raw = t.view(torch.int16).numpy().tobytes()
        dt = TensorProto.BFLOAT16
    elif t.dtype == torch.int64:
        raw = t.numpy().tobytes()
        dt = TensorProto.INT64
    else:
        raw = t.numpy().tobytes()
        dt = _onnx_dtype(t.dtype)
    return helper.make_tensor(name, dt, list(t.shape), raw, raw=True)


def plugin_node_counts(plan: "Plan") -> Counter:
    """Plugin op_type -> node count the plugin graph of ``plan`` has (one per step, one head)."""
    c = Counter(PLUGINS[s.op].name for s in plan.steps)
    c[PLUGINS["head"].name] += 1
    return c


class _Builder:
    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype
        self.nodes = []
        self.inits = []
        self.value_info = []
        self._names = Counter()

    def name(self, base: str) -> str:
        self._names[base] += 1
        n = self._names[base]
        return base if n == 1 else f"{base}_{n - 1}"

    def init(self, name: str, t: torch.Tensor) -> str:
        name = self.name(name)
        self.inits.append(_tensor_proto(name, t))
        return name

    def i64(self, name: str, values: Sequence[int]) -> str:
        return self.init(name, torch.tensor(list(values), dtype=torch.int64))

    def node(self, op: str, inputs: Sequence[str], prefix: str, domain: str = "", n_out: int = 1, **attrs):
        _, _, helper = _onnx()
        outs = [self.name(f"{prefix}/{op}" + ("" if n_out == 1 else f"_{i}")) for i in range(n_out)]
        self.nodes.append(helper.make_node(op, list(inputs), outs, name=self.name(f"{prefix}/{op}_node"),
                                           domain=domain, **attrs))
        return outs[0] if n_out == 1 else outs


# ------------------------------------------------------------------ shapes
def _conv_out(n: int, stride: int) -> int:
    return (n - 1) // stride + 1


def _pool_out(n: int, stride: int) -> int:
    return -(-n // stride)


# ------------------------------------------------------------------ standard graph (NCHW)
class _Standard:
    def __init__(self, b: _Builder, opset: int):
        self.b = b
        self.opset = opset

    def conv(self, x, w, bias, prefix, k=1, stride=1, group=1):
        b = self.b
        inputs = [x, b.init(f"{prefix}.weight", w if w.dim() == 4 else w[:, :, None, None])]
        if bias is not None:
            inputs.append(b.init(f"{prefix}.bias", bias))
        pad = k // 2
        return b.node("Conv", inputs, prefix, kernel_shape=[k, k], strides=[stride, stride],
                      pads=[pad, pad, pad, pad], group=group, dilations=[1, 1])

    def reduce_mean(self, x, axes, prefix, keepdims=0):
        if self.opset >= 18:
            return self.b.node("ReduceMean", [x, self.b.i64(f"{prefix}.axes", axes)], prefix, keepdims=keepdims)
        return self.b.node("ReduceMean", [x], prefix, axes=list(axes), keepdims=keepdims)

    def linear(self, t, w, bias, prefix):
        """t [B, N, I] @ w[O, I]^T + bias -> [B, N, O] (weight stored transposed)."""
        b = self.b
        y = b.node("MatMul", [t, b.init(f"{prefix}.weight_t", w.t().contiguous())], prefix)
        return b.node("Add", [y, b.init(f"{prefix}.bias", bias)], prefix)

    # ---- ops, each (x, [x2], tensors, kwargs, shape) -> out
    def conv_bn_relu(self, x, t, kw, prefix):
        w, bias = t
        return self.b.node("Relu", [self.conv(x, w, bias, prefix, k=3, stride=kw["stride"])], prefix)

    def patch_embed(self, x, t, kw, prefix):
        w, bias = t
        if kw["stride"] == 2:
            x = self.b.node("AveragePool", [x], prefix, kernel_shape=[2, 2], strides=[2, 2], ceil_mode=1,
                            count_include_pad=0, pads=[0, 0, 0, 0])
        return self.conv(x, w, bias, prefix)

    def mhca(self, x, t, kw, prefix):
        cw, cb, pw = t
        groups = cw.shape[0] // cw.shape[1]
        h = self.b.node("Relu", [self.conv(x, cw, cb, prefix + ".group_conv3x3", k=3, group=groups)], prefix)
        y = self.conv(h, pw, None, prefix + ".projection")
        return self.b.node("Add", [y, x], prefix) if kw.get("residual", True) else y

    def mlp(self, x, x2, t, kw, prefix):
        w1, b1, w2, b2 = t
        u = x if x2 is None else self.b.node("Concat", [x, x2], prefix, axis=1)
        h = self.b.node("Relu", [self.conv(u, w1, b1, prefix + ".conv1")], prefix)
        y = self.conv(h, w2, b2, prefix + ".conv2")
        return self.b.node("Add", [y, u], prefix) if kw.get("residual", True) else y

    def e_mhsa(self, x, t, kw, shape, prefix):
        b = self.b
        qw, qb, kw_, kb, vw, vb, pw, pb = t
        _, h, w = shape
        c = qw.shape[1]
        cout = pw.shape[0]
        n = h * w
        sr = kw["sr_ratio"]
        hd = kw.get("head_dim", 32)
        heads = c // hd
        tok = b.node("Transpose", [b.node("Reshape", [x, b.i64(f"{prefix}.shape_bcn", [0, c, n])], prefix)],
                     prefix, perm=[0, 2, 1])                                              # [B, N, C]
        q = self.linear(tok, qw, qb, prefix + ".q")
        if sr > 1:
            r = sr * sr
            nk = n // r
            kv = tok
            if nk * r != n:  # trailing N mod sr^2 tokens are dropped
                kv = b.node("Slice", [tok, b.i64(f"{prefix}.slice_starts", [0]),
                                      b.i64(f"{prefix}.slice_ends", [nk * r]), b.i64(f"{prefix}.slice_axes", [1])],
                            prefix)
            kv = b.node("Reshape", [kv, b.i64(f"{prefix}.shape_pool", [0, nk, r, c])], prefix)
            kv = self.reduce_mean(kv, [2], prefix + ".pool")                             # [B, Nk, C]
        else:
            nk, kv = n, tok
        k = self.linear(kv, kw_, kb, prefix + ".k")
        v = self.linear(kv, vw, vb, prefix + ".v")
        qh = b.node("Transpose", [b.node("Reshape", [q, b.i64(f"{prefix}.shape_q", [0, n, heads, hd])], prefix)],
                    prefix, perm=[0, 2, 1, 3])                                            # [B, h, N, d]
        kh = b.node("Transpose", [b.node("Reshape", [k, b.i64(f"{prefix}.shape_k", [0, nk, heads, hd])], prefix)],
                    prefix, perm=[0, 2, 3, 1])                                            # [B, h, d, Nk]
        vh = b.node("Transpose", [b.node("Reshape", [v, b.i64(f"{prefix}.shape_v", [0, nk, heads, hd])], prefix)],
                    prefix, perm=[0, 2, 1, 3])                                            # [B, h, Nk, d]
        s = b.node("MatMul", [qh, kh], prefix)
        scale = torch.tensor(float(hd) ** -0.5, dtype=torch.float32)
        if b.dtype == torch.float32:
            s = b.node("Mul", [s, b.init(f"{prefix}.scale", scale)], prefix)
            a = b.node("Softmax", [s], prefix, axis=-1)
        else:  # the softmax in float32, as the reference computes it
            _, TensorProto, _ = _onnx()
            s = b.node("Cast", [s], prefix, to=TensorProto.FLOAT)
            s = b.node("Mul", [s, b.init(f"{prefix}.scale", scale)], prefix)
            a = b.node("Cast", [b.node("Softmax", [s], prefix, axis=-1)], prefix, to=_onnx_dtype(b.dtype))
        o = b.node("MatMul", [a, vh], prefix)                                             # [B, h, N, d]
        o = b.node("Reshape", [b.node("Transpose", [o], prefix, perm=[0, 2, 1, 3]),
                               b.i64(f"{prefix}.shape_o", [0, n, c])], prefix)            # [B, N, C]
        y = self.linear(o, pw, pb, prefix + ".proj")
        if kw.get("residual", True):
            y = b.node("Add", [y, tok], prefix)
        y = b.node("Transpose", [y], prefix, perm=[0, 2, 1])
        return b.node("Reshape", [y, b.i64(f"{prefix}.shape_out", [0, cout, h, w])], prefix)

    def head(self, x, t, prefix):
        w, bias = t
        b = self.b
        p = b.node("Flatten", [b.node("GlobalAveragePool", [x], prefix)], prefix, axis=1)
        return b.node("Gemm", [p, b.init(f"{prefix}.weight", w), b.init(f"{prefix}.bias", bias)], prefix,
                      transB=1, alpha=1.0, beta=1.0)


def _step_out_shape(step: "Step", shape: Tuple[int, int, int]) -> Tuple[int, int, int]:
    c, h, w = shape
    if step.op == "conv_bn_relu":
        s = step.kwargs["stride"]
        return step.tensors[0].shape[0], _conv_out(h, s), _conv_out(w, s)
    if step.op == "patch_embed":
        s = step.kwargs["stride"]
        return step.tensors[0].shape[0], _pool_out(h, s), _pool_out(w, s)
    if step.op == "mhca":
        return step.tensors[2].shape[0], h, w
    if step.op == "mlp":
        return step.tensors[2].shape[0], h, w
    if step.op == "e_mhsa":
        return step.tensors[6].shape[0], h, w
    raise ValueError(f"unknown step op {step.op!r}")


def _check_args(model, input_shape, dtype, opset, plugins):
    if dtype not in _DTYPES:
        raise ValueError(f"export_onnx: dtype must be one of torch.float32, torch.float16, torch.bfloat16, got {dtype}")
    if len(input_shape) != 4 or input_shape[1] != 3 or any(int(d) <= 0 for d in input_shape):
        raise ValueError(f"export_onnx: input_shape must be (B, 3, H, W) with positive sizes, got {tuple(input_shape)}")
    if opset < 13:
        raise ValueError(f"export_onnx: opset must be >= 13, got {opset}")
    if not plugins and dtype == torch.bfloat16 and opset < 22:
        raise ValueError("export_onnx: a standard bfloat16 graph needs opset >= 22 (Conv and AveragePool accept "
                         f"bfloat16 from opset 22 on), got opset {opset}; pass opset=22")
    if model.training:
        raise ValueError("export_onnx: the graph uses BatchNorm running statistics: call model.eval() first")
    model.check_input(torch.empty(tuple(int(d) for d in input_shape)))


@torch.no_grad()
def export_onnx(model, path=None, *, input_shape=(1, 3, 224, 224), dtype=torch.float16, plugins: bool = True,
                dynamic_batch: bool = False, opset: int = 17):
    """Exports ``model`` (an eval NextViT, BatchNorms merged or not) to ONNX.

    path: where to save it (``str`` / path-like), or None to only return it.
    input_shape: (B, 3, H, W); H and W are fixed in the graph, B too unless
    ``dynamic_batch`` (then the batch dim is the symbol ``batch``).
    dtype: float16 / bfloat16 / float32 for the weights, the graph input and the
    logits. plugins: custom TensorRT plugin nodes (NHWC) instead of standard ops.
    Returns the ``onnx.ModelProto`` (checked with ``onnx.checker``).
    """
    onnx, TensorProto, helper = _onnx()
    _check_args(model, input_shape, dtype, opset, plugins)
    plan = fused.fold(model, "cpu", dtype)
    bsz, _, h, w = (int(d) for d in input_shape)
    batch = "batch" if dynamic_batch else bsz
    odt = _onnx_dtype(dtype)
    b = _Builder(dtype)

    x = "input"
    shape = (3, h, w)
    branch = branch_shape = None  # the NTB MHCA branch tensor and its (C, H, W)
    if plugins:
        x = b.node("Transpose", [x], "to_nhwc", perm=[0, 2, 3, 1])
        b.value_info.append(helper.make_tensor_value_info(x, odt, [batch, h, w, 3]))
        for i, s in enumerate(plan.steps):
            spec = PLUGINS[s.op]
            prefix = f"s{i}.{s.op}"
            src = branch if s.from_branch else x
            in_shape = branch_shape if s.from_branch else shape
            acts = [src] + ([branch] if s.x2_branch else [])
            weight_names = [n for n in spec.inputs if n not in ("x", "x2")]
            assert len(weight_names) == len(s.tensors), (s.op, weight_names, [t.shape for t in s.tensors])
            ins = acts + [b.init(f"{prefix}.{n}", t) for n, t in zip(weight_names, s.tensors)]
            attrs = _plugin_attrs(s)
            y = b.node(spec.name, ins, prefix, domain=PLUGIN_DOMAIN, plugin_version=PLUGIN_VERSION,
                       plugin_namespace=PLUGIN_NAMESPACE, **attrs)
            out_shape = _step_out_shape(s, in_shape)
            c_, h_, w_ = out_shape
            b.value_info.append(helper.make_tensor_value_info(y, odt, [batch, h_, w_, c_]))
            if s.to_branch:
                branch, branch_shape = y, out_shape
            else:
                x, shape = y, out_shape
        spec = PLUGINS["head"]
        hw_, hb_ = plan.head
        logits = b.node(spec.name, [x, b.init("head.w", hw_), b.init("head.b", hb_)], "head",
                        domain=PLUGIN_DOMAIN, plugin_version=PLUGIN_VERSION, plugin_namespace=PLUGIN_NAMESPACE)
    else:
        std = _Standard(b, opset)
        for i, s in enumerate(plan.steps):
            prefix = f"s{i}.{s.op}"
            src = branch if s.from_branch else x
            in_shape = branch_shape if s.from_branch else shape
            if s.op == "mlp":
                y = std.mlp(src, branch if s.x2_branch else None, s.tensors, s.kwargs, prefix)
            elif s.op == "e_mhsa":
                y = std.e_mhsa(src, s.tensors, s.kwargs, in_shape, prefix)
            else:
                y = getattr(std, s.op)(src, s.tensors, s.kwargs, prefix)
            out_shape = _step_out_shape(s, in_shape)
            if s.to_branch:
                branch, branch_shape = y, out_shape
            else:
                x, shape = y, out_shape
        logits = std.head(x, plan.head, "head")
    # name the graph output "logits"
    b.nodes[-1].output[0] = "logits"
    n_classes = plan.head[0].shape[0]

    graph = helper.make_graph(
        b.nodes, "nextvit" + ("_trt_plugins" if plugins else ""),
        [helper.make_tensor_value_info("input", odt, [batch, 3, h, w])],
        [helper.make_tensor_value_info("logits", odt, [batch, n_classes])],
        initializer=b.inits, value_info=b.value_info)
    opsets = [helper.make_opsetid("", opset)]
    ir_version = helper.find_min_ir_version_for(list(opsets))
    if plugins:
        opsets.append(helper.make_opsetid(PLUGIN_DOMAIN, PLUGIN_DOMAIN_VERSION))
    m = helper.make_model(graph, opset_imports=opsets, producer_name="nextvit_kernels",
                          doc_string=("Next-ViT, BatchNorms folded; " + ("TensorRT plugin nodes (NHWC), namespace "
                                      f"'{PLUGIN_NAMESPACE}', version '{PLUGIN_VERSION}'" if plugins
                                      else "standard ONNX operators (NCHW)")))
    m.ir_version = ir_version
    onnx.checker.check_model(m, full_check=not plugins)
    if path is not None:
        onnx.save(m, str(path))
    del logits
    return m


def _plugin_attrs(step: "Step") -> Dict[str, int]:
    kw = step.kwargs
    if step.op in ("conv_bn_relu", "patch_embed"):
        a = {"stride": int(kw["stride"])}
    elif step.op == "mhca":
        a = {"residual": int(bool(kw.get("residual", True)))}
    elif step.op == "mlp":
        a = {"residual": int(bool(kw.get("residual", True))), "has_x2": int(step.x2_branch)}
    elif step.op == "e_mhsa":
        a = {"sr_ratio": int(kw["sr_ratio"]), "head_dim": int(kw.get("head_dim", 32)),
             "residual": int(bool(kw.get("residual", True)))}
    else:
        raise ValueError(f"unknown step op {step.op!r}")
    assert tuple(a) == PLUGINS[step.op].fields, (step.op, tuple(a))
    return a
