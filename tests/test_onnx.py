"""ONNX export (nextvit_kernels.onnx_export): the standard graph runs in onnxruntime with the
model's logits; the plugin graph carries one node per fused op with the attributes of the
PLUGINS table (tests/test_trt_contract.py checks the nodes against the creators of the built
TensorRT plugin library)."""
import copy
from collections import Counter

import pytest
import torch

import nextvit_kernels as nk
from nextvit_kernels import fused
from nextvit_kernels.onnx_export import (PLUGIN_DOMAIN, PLUGIN_NAMESPACE, PLUGIN_VERSION, PLUGINS,
                                         plugin_node_counts)
from _util import images, randomize_, rel_err

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
from onnx import TensorProto, numpy_helper  # noqa: E402

GAIN = 0.7  # see test_model.py
ONNX_DTYPE = {torch.float32: TensorProto.FLOAT, torch.float16: TensorProto.FLOAT16,
              torch.bfloat16: TensorProto.BFLOAT16}


@pytest.fixture(scope="module")
def small():
    torch.manual_seed(1234)
    return randomize_(nk.nextvit_small(), gain=GAIN).eval()


def _session(model_proto):
    return ort.InferenceSession(model_proto.SerializeToString(), providers=["CPUExecutionProvider"])


def _run(model_proto, x):
    return torch.from_numpy(_session(model_proto).run(["logits"], {"input": x.numpy()})[0])


@torch.no_grad()
def _check(model, model_proto, x, tol=1e-4):
    ref = model(x)
    if x.shape[0] > 1:
        assert (ref[0] - ref[1]).abs().max() > 1e-2 * ref.abs().max(), "logits do not depend on the input: void test"
    out = _run(model_proto, x)
    assert out.shape == ref.shape
    assert torch.isfinite(out).all()
    assert rel_err(out, ref) < tol, rel_err(out, ref)
    return out


# ------------------------------------------------------------------ standard graph in onnxruntime
@pytest.mark.parametrize("size", [(224, 224), (200, 232)])
def test_standard_matches_model(small, size, tmp_path):
    path = tmp_path / "m.onnx"
    mp = nk.export_onnx(small, path, input_shape=(2, 3) + size, dtype=torch.float32, plugins=False)
    assert path.exists()
    loaded = onnx.load(str(path))
    onnx.checker.check_model(loaded, full_check=True)
    assert [i.name for i in mp.graph.input] == ["input"] and [o.name for o in mp.graph.output] == ["logits"]
    ops = Counter(n.op_type for n in mp.graph.node)
    assert "BatchNormalization" not in ops
    assert ops["AveragePool"] == sum(1 for s in fused.fold(small, "cpu", torch.float32).steps
                                     if s.op == "patch_embed" and s.kwargs["stride"] == 2)
    for n in mp.graph.node:
        if n.op_type == "AveragePool":
            a = {x.name: onnx.helper.get_attribute_value(x) for x in n.attribute}
            assert a["ceil_mode"] == 1 and a["count_include_pad"] == 0
    _check(small, loaded, images(2, *size))


def test_dynamic_batch(small):
    mp = nk.export_onnx(small, None, input_shape=(1, 3, 160, 192), dtype=torch.float32, plugins=False,
                        dynamic_batch=True)
    assert mp.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    assert mp.graph.output[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    for b in (1, 3):
        _check(small, mp, images(b, 160, 192))


def test_merged_and_unmerged_export_the_same_graph(small):
    merged = copy.deepcopy(small).merge_bn()
    assert merged.is_bn_merged and not small.is_bn_merged
    x = images(2, 224, 224)
    a = nk.export_onnx(small, None, input_shape=(2, 3, 224, 224), dtype=torch.float32, plugins=False)
    b = nk.export_onnx(merged, None, input_shape=(2, 3, 224, 224), dtype=torch.float32, plugins=False)
    assert [n.op_type for n in a.graph.node] == [n.op_type for n in b.graph.node]
    ya, yb = _check(small, a, x), _check(merged, b, x)
    assert rel_err(ya, yb) < 1e-5


def test_standard_fp16_builds(small):
    mp = nk.export_onnx(small, None, input_shape=(1, 3, 224, 224), dtype=torch.float16, plugins=False)
    assert all(t.data_type == TensorProto.FLOAT16 for t in mp.graph.initializer if t.data_type != TensorProto.INT64
               and not t.name.endswith(".scale"))
    assert mp.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT16
    x = images(1, 224, 224)
    try:
        sess = _session(mp)
    except Exception as e:  # pragma: no cover - depends on the onnxruntime build
        if "NOT_IMPLEMENTED" in str(e):
            pytest.skip(f"onnxruntime CPU has no fp16 kernel for an op of the graph: {e}")
        raise
    out = torch.from_numpy(sess.run(["logits"], {"input": x.half().numpy()})[0]).float()
    with torch.no_grad():
        ref = small(x)
    assert torch.isfinite(out).all() and rel_err(out, ref) < 2e-2


def test_standard_bf16_needs_opset_22(small):
    with pytest.raises(ValueError, match="opset >= 22"):
        nk.export_onnx(small, None, dtype=torch.bfloat16, plugins=False)
    mp = nk.export_onnx(small, None, dtype=torch.bfloat16, plugins=False, opset=22)
    assert mp.graph.input[0].type.tensor_type.elem_type == TensorProto.BFLOAT16


def test_errors(small):
    with pytest.raises(ValueError, match="dtype"):
        nk.export_onnx(small, None, dtype=torch.float64)
    with pytest.raises(ValueError, match="input_shape"):
        nk.export_onnx(small, None, input_shape=(1, 4, 224, 224))
    with pytest.raises(ValueError, match="too small"):
        nk.export_onnx(small, None, input_shape=(1, 3, 16, 16))
    m = copy.deepcopy(small).train()
    with pytest.raises(ValueError, match="eval"):
        nk.export_onnx(m, None)


# ------------------------------------------------------------------ plugin graph structure
def _attrs(node):
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


@pytest.mark.parametrize("dtype,dynamic", [(torch.float16, True), (torch.bfloat16, False), (torch.float32, True)])
def test_plugin_graph_structure(small, dtype, dynamic):
    shape = (2, 3, 224, 224)
    mp = nk.export_onnx(small, None, input_shape=shape, dtype=dtype, plugins=True, dynamic_batch=dynamic)
    onnx.checker.check_model(mp)
    plan = fused.fold(small, "cpu", dtype)
    domains = {o.domain: o.version for o in mp.opset_import}
    assert domains[""] == 17 and domains[PLUGIN_DOMAIN] == 1

    nodes = list(mp.graph.node)
    assert nodes[0].op_type == "Transpose" and list(_attrs(nodes[0])["perm"]) == [0, 2, 3, 1]
    assert nodes[0].input[0] == "input"
    plugin_nodes = nodes[1:]
    counts = Counter(n.op_type for n in plugin_nodes)
    assert counts == plugin_node_counts(plan)
    assert counts["NextViTEMHSA"] == 4 and counts["NextViTHead"] == 1
    assert len(plugin_nodes) == len(plan.steps) + 1
    assert plugin_nodes[-1].output[0] == "logits"

    inits = {t.name: t for t in mp.graph.initializer}
    by_name = {s.name: op for op, s in PLUGINS.items()}
    steps = list(plan.steps) + [None]
    for node, step in zip(plugin_nodes, steps):
        op = by_name[node.op_type]
        spec = PLUGINS[op]
        assert node.domain == PLUGIN_DOMAIN
        a = _attrs(node)
        assert a.pop("plugin_version") == PLUGIN_VERSION.encode()
        assert a.pop("plugin_namespace") == PLUGIN_NAMESPACE.encode()
        assert set(a) == set(spec.fields), (node.op_type, a)
        assert all(isinstance(v, int) for v in a.values())
        tensors = list(plan.head) if step is None else step.tensors
        if step is not None:
            assert step.op == op
            for k in ("stride", "sr_ratio", "head_dim"):
                if k in spec.fields:
                    assert a[k] == step.kwargs.get(k, 32)
            if "residual" in spec.fields:
                assert a["residual"] == 1
            if op == "mlp":
                assert a["has_x2"] == int(step.x2_branch)
        n_act = 2 if a.get("has_x2") else 1
        assert len(node.input) == n_act + len(tensors)
        for name, t in zip(node.input[n_act:], tensors):
            init = inits[name]
            assert tuple(init.dims) == tuple(t.shape), (node.name, name)
            assert init.data_type == ONNX_DTYPE[dtype]
        # weights round-trip bit-exactly (bf16 stored as raw bits)
        w = inits[node.input[n_act]]
        if dtype == torch.bfloat16:
            got = torch.frombuffer(bytearray(w.raw_data), dtype=torch.int16).view(torch.bfloat16).reshape(tuple(w.dims))
        else:
            got = torch.from_numpy(numpy_helper.to_array(w).copy())
        assert torch.equal(got, tensors[0])

    # symbolic / static batch everywhere, NHWC value_info
    batch = "batch" if dynamic else None
    for vi in list(mp.graph.value_info) + list(mp.graph.input) + list(mp.graph.output):
        d0 = vi.type.tensor_type.shape.dim[0]
        assert (d0.dim_param == batch) if dynamic else (d0.dim_value == shape[0]), vi.name
        assert vi.type.tensor_type.elem_type == ONNX_DTYPE[dtype]
    vis = {vi.name: [d.dim_value for d in vi.type.tensor_type.shape.dim[1:]] for vi in mp.graph.value_info}
    assert vis[plugin_nodes[3].output[0]] == [56, 56, 64]   # after the stem, NHWC
    assert [d.dim_value for d in mp.graph.output[0].type.tensor_type.shape.dim[1:]] == [1000]
