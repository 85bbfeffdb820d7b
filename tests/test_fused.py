"""The fused inference graph (BatchNorms folded, fused ops) against the module graph."""
import os

import pytest
import torch

import nextvit_kernels as nk
from nextvit_kernels import fused
from nextvit_kernels.plan import spatial_sizes
from _util import images, randomize_, rel_err

GAIN = 0.7
# Every block kind (NCB with and without a stride-2 PatchEmbed, NTB at sr 4, 2, 1),
# small enough for the interpreter.
TINY = dict(depths=(1, 1, 5, 1), num_classes=10)


def _model(name="nextvit_small", **kw):
    m = nk.NextViT(**TINY, **kw) if name == "tiny" else getattr(nk, name)(**kw)
    return randomize_(m, gain=GAIN).eval()


# --------------------------------------------------------------- folding (CPU, fast)
@pytest.mark.parametrize("name", ["nextvit_small", "nextvit_base", "nextvit_large"])
def test_folded_plan_matches_module_graph(name):
    m = _model(name)
    x = images(2, 224, 224)
    plan = fused.fold(m, "cpu", torch.float32)
    with torch.no_grad():
        ref = m(x)
        out = fused.run(plan, x, impl="reference")
    assert rel_err(out, ref) < 1e-5


def test_folded_plan_merged_model_features_and_extra_norm():
    m = _model("nextvit_small", with_extra_norm=True)
    x = images(2, 97, 131)
    with torch.no_grad():
        ref_feats = m.forward_features(x)
        m.merge_bn()
        plan = fused.fold(m, "cpu", torch.float32)
        feats = fused.run(plan, x, impl="reference", features=True)
        assert rel_err(fused.run(plan, x, impl="reference"), m(x)) < 1e-5
    for a, b in zip(feats, ref_feats):
        assert a.shape == b.shape and a.is_contiguous(memory_format=torch.channels_last)
        assert rel_err(a, b) < 1e-5


def test_launch_count_nextvit_small():
    plan = fused.fold(nk.nextvit_small().eval(), "cpu", torch.float32)
    ops_used = {s.op for s in plan.steps}
    assert ops_used == {"conv_bn_relu", "patch_embed", "mhca", "mlp", "e_mhsa"}
    # DESIGN §3: about 60 fused ops (eager runs ~360): 62 for S, counting E-MHSA's two kernels.
    n_emhsa = sum(s.op == "e_mhsa" for s in plan.steps)
    assert len(plan.steps) + 1 + n_emhsa == 62, len(plan.steps)
    # MLPs wider than 128 output channels run as fc1 + fc2 (all but stage 0's 3), and the
    # E-MHSAs wider than 256 (stages 2 and 3) with an extra per-head attention kernel
    # (ops/mlp.py, ops/e_mhsa.py).
    n_split_mlp = sum(s.op == "mlp" and s.tensors[2].shape[0] > 128 for s in plan.steps)
    n_split_emhsa = sum(s.op == "e_mhsa" and s.tensors[6].shape[0] > 256 for s in plan.steps)
    assert (n_split_mlp, n_split_emhsa) == (17, 3)
    # Each MHCA is a conv kernel plus a projection GEMM (ops/mhca.py) on few pixels (< 4096),
    # and at any size when its width is not a power of two <= 256: 16 of the 20 (96, 192, 384,
    # 768); the NTB's 64-, 128- and 256-wide ones run fused on many pixels. All 20 split at
    # batch 1 and 2 (stage 0's 56x56 maps are 96 wide); at batch 64 the 7x7 C256 one is split too.
    n_mhca = sum(s.op == "mhca" for s in plan.steps)
    assert n_mhca == 20
    assert plan.launches(256, 224, 224) == 62 + 17 + 3 + 16
    assert plan.launches(1, 224, 224) == 62 + 17 + 3 + 20
    assert plan.launches(2, 224, 224) == 62 + 17 + 3 + 20
    assert plan.launches(64, 224, 224) == 62 + 17 + 3 + 17


def test_spatial_sizes_follow_the_model():
    m = nk.nextvit_small().eval()
    plan = fused.fold(m, "cpu", torch.float32)
    for hw in [(224, 224), (230, 190), (25, 25)]:
        sizes, out = spatial_sizes(plan, *hw)
        with torch.no_grad():
            last = m.forward_features(torch.zeros(1, 3, *hw))[-1]
        assert out == tuple(last.shape[2:]), (hw, out, last.shape)
        assert sizes[0] == hw


def test_plan_cache_is_rebuilt_when_weights_device_or_dtype_change():
    m = _model("tiny")
    p1 = m.fused_plan(torch.device("cpu"), torch.float32)
    assert m.fused_plan(torch.device("cpu"), torch.float32) is p1
    with torch.no_grad():
        m.features[0].mlp.conv2.bias.add_(1.0)
    p2 = m.fused_plan(torch.device("cpu"), torch.float32)
    assert p2 is not p1
    mlp2 = [s for s in p2.steps if s.op == "mlp"][0]
    mlp1 = [s for s in p1.steps if s.op == "mlp"][0]
    assert torch.allclose(mlp2.tensors[3], mlp1.tensors[3] + 1.0)
    m.load_state_dict(_model("tiny").state_dict())
    assert m.fused_plan(torch.device("cpu"), torch.float32) is not p2
    p3 = m.fused_plan(torch.device("cpu"), torch.float16)
    assert p3.dtype == torch.float16 and all(t.dtype == torch.float16 for s in p3.steps for t in s.tensors)


def test_kernels_argument():
    with pytest.raises(ValueError, match="kernels must be one of"):
        nk.nextvit_small(kernels="cuda")
    m = _model("tiny")
    m.kernels = "fast"
    with pytest.raises(ValueError, match="kernels must be one of"):
        m(images(1, 32, 32))
    m.kernels = "triton"
    m.train()
    with pytest.raises(ValueError, match="inference-only"):
        m(images(1, 32, 32))
    m.eval()
    m.kernels = "auto"
    assert m.fused_path(images(1, 32, 32)) is None  # CPU under auto: the module graph
    with pytest.raises(ValueError, match="model is torch.float32"):
        m.kernels = "triton"
        m(images(1, 32, 32, dtype=torch.float16))


# ----------------------------------------------------- Triton kernels under the interpreter
needs_interpreter = pytest.mark.skipif(
    torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") != "1",
    reason="CPU interpreter check (GPU runs cover this in test_fused_gpu)")


@pytest.mark.slow
@needs_interpreter
def test_fused_triton_interpreter_fp32():
    m = _model("tiny")
    x = images(2, 32, 40)
    with torch.no_grad():
        ref = m(x)
        ref_feats = m.forward_features(x)
        m.kernels = "triton"
        out = m(x)
    assert (ref[0] - ref[1]).abs().max() > 1e-2 * ref.abs().max()
    assert rel_err(out, ref) < 1e-3
    plan = m.fused_plan(torch.device("cpu"), torch.float32)
    with torch.no_grad():
        feats = fused.run(plan, x, impl="triton", features=True)
    for a, b in zip(feats, ref_feats):
        assert rel_err(a, b) < 1e-3


@needs_interpreter
def test_fused_triton_interpreter_fp16_error_vs_eager():
    m = _model("tiny")
    x = images(1, 32, 32)
    with torch.no_grad():
        ref = m(x)
        half = _model("tiny")
        half.load_state_dict(m.state_dict())
        half = half.half()
        eager16 = half(x.half())
        half.kernels = "triton"
        fused16 = half(x.half())
    eager_err, fused_err = rel_err(eager16, ref), rel_err(fused16, ref)
    assert fused_err <= 2 * eager_err + 1e-3, (fused_err, eager_err)


# ----------------------------------------------------------------------------- GPU
ALL = ["nextvit_small", "nextvit_base", "nextvit_large"]


@pytest.fixture
def no_tf32():
    prev = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = prev


@pytest.mark.gpu
@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("res", [224, 384])
def test_gpu_fused_matches_reference_fp32(name, res, no_tf32):
    m = _model(name).cuda()
    x = images(2, res, res, device="cuda")
    with torch.no_grad():
        m.kernels = "reference"
        ref = m(x)
        m.kernels = "auto"
        out = m(x)
        feats = m.forward_features(x)
        m.kernels = "reference"
        ref_feats = m.forward_features(x)
    assert rel_err(out, ref) < 1e-3
    for a, b in zip(feats, ref_feats):
        assert rel_err(a, b) < 1e-3


@pytest.mark.gpu
@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("res", [224, 384])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_fused_low_precision_within_twice_eager_error(name, res, dtype, no_tf32):
    m = _model(name).cuda()
    x = images(2, res, res, device="cuda")
    with torch.no_grad():
        m.kernels = "reference"
        ref = m(x)
        low = _model(name).cuda()
        low.load_state_dict(m.state_dict())
        low = low.to(dtype)
        low.kernels = "reference"
        eager = low(x.to(dtype))
        low.kernels = "auto"
        out = low(x.to(dtype))
    assert rel_err(out, ref) <= 2 * rel_err(eager, ref), (rel_err(out, ref), rel_err(eager, ref))


@pytest.mark.gpu
def test_gpu_cuda_graph_and_compile():
    m = _model("nextvit_small").cuda().half()
    x = images(4, 224, 224, dtype=torch.float16, device="cuda")
    with torch.no_grad():
        eager = m(x).clone()
        graphed = m.cuda_graph(x)
        x2 = images(4, 224, 224, dtype=torch.float16, device="cuda")
        assert torch.equal(graphed(x2), m(x2))
        assert torch.equal(graphed(x), eager)
        with pytest.raises(ValueError, match="captured for"):
            graphed(x[:2])
        compiled = torch.compile(m, fullgraph=True)
        assert rel_err(compiled(x), eager) < 1e-2


@pytest.mark.gpu
def test_gpu_memory_flat_over_10000_forwards():
    m = _model("nextvit_small").cuda().half()
    x = images(1, 64, 64, dtype=torch.float16, device="cuda")
    with torch.no_grad():
        for _ in range(5):
            m(x)
        torch.cuda.synchronize()
        start = torch.cuda.memory_allocated()
        for _ in range(10_000):
            m(x)
        torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() == start


@pytest.mark.gpu
def test_gpu_two_streams():
    m = _model("nextvit_small").cuda().half()
    xs = [images(8, 224, 224, dtype=torch.float16, device="cuda") for _ in range(2)]
    with torch.no_grad():
        expect = [m(x).clone() for x in xs]
        streams = [torch.cuda.Stream() for _ in xs]
        outs = [None, None]
        torch.cuda.synchronize()
        for _ in range(3):
            for i, (s, x) in enumerate(zip(streams, xs)):
                with torch.cuda.stream(s):
                    outs[i] = m(x)
        torch.cuda.synchronize()
    for o, e in zip(outs, expect):
        assert torch.equal(o, e)


@pytest.mark.gpu
def test_gpu_peak_memory_not_above_eager():
    m = _model("nextvit_small").cuda().half()
    x = images(256, 224, 224, dtype=torch.float16, device="cuda")
    peaks = {}
    with torch.no_grad():
        for k in ("reference", "auto"):
            m.kernels = k
            m(x)  # warm-up: plan, kernels compiled
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            m(x)
            torch.cuda.synchronize()
            peaks[k] = torch.cuda.max_memory_allocated() - base
    # The folded plan (one copy of the weights, ~63 MB in fp16) is allocated before `base`.
    assert peaks["auto"] <= peaks["reference"], peaks


@pytest.mark.slow
def test_fold_and_run_trace_in_one_graph():
    """Dynamo traces the plan lookup/fold and the executor without graph breaks, with or
    without a cached plan (the GPU test compiles the real kernels)."""
    m = _model("tiny")
    x = images(1, 32, 32)

    def f(inp):
        return fused.run(m.fused_plan(inp.device, inp.dtype), inp, impl="reference")

    with torch.no_grad():
        ref = m(x)
        for cached in (True, False):
            if not cached:
                m.engine.state = None
            torch._dynamo.reset()
            out = torch.compile(f, fullgraph=True, backend="eager")(x)
            assert rel_err(out, ref) < 1e-5
        assert isinstance(m.engine.state.plan.steps[0].tensors[0], torch.Tensor)
        assert rel_err(f(x), ref) < 1e-5
