"""ops.mlp: fused fc1 -> ReLU -> fc2 (+ residual), single input or two-pointer concat."""
import importlib

import pytest
import torch

from nextvit_kernels import ops
from _util import assert_close, force_split, rand_like_dtype

mlp_mod = importlib.import_module("nextvit_kernels.ops.mlp")

CPU_DTYPES = [torch.float32, torch.float16]


def make_case(b, c1, c2, hidden, c_out, h, w, dtype, device="cpu"):
    """Inputs rounded to dtype and their float64 copies: (x, x2, w1, b1, w2, b2), (same in f64)."""
    cu = c1 + c2
    x, x64 = rand_like_dtype(b, c1, h, w, dtype=dtype, device=device)
    x2, x2_64 = rand_like_dtype(b, c2, h, w, dtype=dtype, device=device) if c2 else (None, None)
    w1, w1_64 = rand_like_dtype(hidden, cu, dtype=dtype, device=device, scale=cu ** -0.5)
    b1, b1_64 = rand_like_dtype(hidden, dtype=dtype, device=device, scale=0.5)
    w2, w2_64 = rand_like_dtype(c_out, hidden, dtype=dtype, device=device, scale=hidden ** -0.5)
    b2, b2_64 = rand_like_dtype(c_out, dtype=dtype, device=device, scale=0.5)
    return (x, x2, w1, b1, w2, b2), (x64, x2_64, w1_64, b1_64, w2_64, b2_64)


def oracle(t64, residual=True):
    x, x2, w1, b1, w2, b2 = t64
    return mlp_mod.reference(x, w1, b1, w2, b2, x2=x2, residual=residual)


def run(t, impl, residual=True):
    x, x2, w1, b1, w2, b2 = t
    return ops.mlp(x, w1, b1, w2, b2, x2=x2, residual=residual, impl=impl)


# (batch, C1, C2, hidden, C_out or None for C1 + C2 (residual), H, W)
CASES = [
    (1, 32, 0, 96, None, 1, 1),       # 1x1 map, hidden 96 (not a power of two)
    (2, 64, 0, 288, None, 5, 7),      # NCB-like C -> 3C shape, odd non-square map
    (3, 96, 0, 288, None, 3, 2),      # stage-0 channel count, BLOCK_K 32 path
    (1, 256, 0, 96, None, 2, 3),      # widest channels of the issue
    (2, 64, 32, 128, None, 3, 5),     # two-pointer concat, NTB-like
    (1, 40, 24, 96, None, 2, 2),      # C1 not a multiple of 32: K chunks masked per input
    (2, 32, 0, 64, 320, 3, 3),        # residual off, COUT > 256: several N blocks
    (1, 64, 32, 96, 48, 1, 3),        # residual off with concat, COUT != C1 + C2
    (2, 288, 0, 96, None, 3, 1),      # COUT > 256: split mode (fc1 to scratch, then fc2)
    (1, 256, 64, 160, None, 2, 3),    # split mode with the two-pointer concat and residual
]


@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
def test_triton_matches_float64(case, dtype):
    b, c1, c2, hidden, c_out, h, w = case
    residual = c_out is None
    c_out = c1 + c2 if residual else c_out
    t, t64 = make_case(b, c1, c2, hidden, c_out, h, w, dtype)
    out = run(t, "triton", residual)
    assert out.dtype == dtype
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert_close(out, oracle(t64, residual), dtype)


@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
@pytest.mark.parametrize("case", [CASES[1], CASES[4], CASES[7]], ids=lambda c: "-".join(map(str, c)))
def test_reference_matches_float64(case, dtype):
    b, c1, c2, hidden, c_out, h, w = case
    residual = c_out is None
    c_out = c1 + c2 if residual else c_out
    t, t64 = make_case(b, c1, c2, hidden, c_out, h, w, dtype)
    out = run(t, "reference", residual)
    assert out.dtype == dtype
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert_close(out, oracle(t64, residual), dtype)


# Shapes where the two modes differ in how the work is cut: narrow (fused by default) and
# wide (split by default), with and without concat, hidden not a multiple of any tile.
MODE_CASES = [(2, 64, 0, 96, None, 3, 3), (1, 64, 32, 160, None, 2, 5), (1, 288, 0, 96, None, 2, 2),
              (2, 256, 64, 96, 320, 1, 3)]


@pytest.mark.parametrize("split", [False, True], ids=["fused", "split"])
@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
@pytest.mark.parametrize("case", MODE_CASES, ids=lambda c: "-".join(map(str, c)))
def test_both_modes_match_float64(case, dtype, split, monkeypatch):
    force_split(monkeypatch, mlp_mod, split)
    b, c1, c2, hidden, c_out, h, w = case
    residual = c_out is None
    c_out = c1 + c2 if residual else c_out
    t, t64 = make_case(b, c1, c2, hidden, c_out, h, w, dtype)
    assert_close(run(t, "triton", residual), oracle(t64, residual), dtype)


def test_config_picks_split_above_128_outputs():
    # Fused only where one N block of at most 128 holds every output channel (the H200 sweep:
    # split won at 192 and 256 outputs, fused at 96); split fc2 reuses that one-block tile up
    # to 256 outputs, 128 x 128 tiles above.
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        for c1, c2, hid, co in [(96, 0, 288, 96), (192, 0, 576, 192), (192, 64, 512, 256), (384, 0, 1152, 384),
                                (384, 128, 1024, 512), (768, 0, 2304, 768), (768, 256, 2048, 1024)]:
            cfg = mlp_mod._config(c1, c2, hid, co, dtype)
            assert cfg["split"] == (co > 128), (c1, c2, hid, co, dtype)
            if co <= 256 and dtype != torch.float32:  # one N block: fc1 never recomputed in fused mode
                assert cfg["mlp"]["BLOCK_N"] >= co


@pytest.mark.parametrize("impl", ["triton", "reference"])
@pytest.mark.parametrize("layout", ["nchw", "channels_last", "channel_slice"])
def test_input_layouts_and_4d_weights(layout, impl):
    dtype = torch.float32
    t, t64 = make_case(2, 64, 32, 96, 96, 3, 5, dtype)
    x, x2, w1, b1, w2, b2 = t
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
        x2 = x2.contiguous(memory_format=torch.channels_last)
    elif layout == "channel_slice":  # non-contiguous views of wider tensors
        x = torch.cat([x, torch.zeros_like(x)], dim=1)[:, :64]
        x2 = torch.cat([torch.zeros_like(x2), x2], dim=1).contiguous(memory_format=torch.channels_last)[:, 32:]
    out = ops.mlp(x, w1[:, :, None, None], b1, w2[:, :, None, None], b2, x2=x2, impl=impl)
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert_close(out, oracle(t64), dtype)


def test_auto_on_cpu_is_reference():
    t, t64 = make_case(1, 32, 0, 64, 32, 2, 2, torch.float32)
    out = run(t, "auto")
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert_close(out, oracle(t64), torch.float32)


def _good(dtype=torch.float32):
    return make_case(2, 64, 32, 96, 96, 3, 3, dtype)[0]


def test_value_errors():
    x, x2, w1, b1, w2, b2 = _good()

    def call(**kw):
        args = dict(x=x, fc1_w=w1, fc1_b=b1, fc2_w=w2, fc2_b=b2, x2=x2, residual=True, impl="reference")
        args.update(kw)
        a = [args.pop(k) for k in ("x", "fc1_w", "fc1_b", "fc2_w", "fc2_b")]
        return ops.mlp(*a, **args)

    with pytest.raises(ValueError, match="4-D"):
        call(x=x[0])
    with pytest.raises(ValueError, match="dtype"):
        call(x=x.to(torch.int32))
    with pytest.raises(ValueError, match="batch and spatial"):
        call(x2=x2[:1])
    with pytest.raises(ValueError, match="batch and spatial"):
        call(x2=x2[:, :, :2])
    with pytest.raises(ValueError, match="batch and spatial"):
        call(x2=x2[:, :, :, :1])
    with pytest.raises(ValueError, match="x2 has dtype"):
        call(x2=x2.half())
    with pytest.raises(ValueError, match=r"x2 is on meta"):
        call(x2=x2.to("meta"))
    with pytest.raises(ValueError, match=r"fc1_w has shape \[96, 64\], expected \[\*, 96\]"):
        call(fc1_w=w1[:, :64])  # concat channels are 64 + 32
    with pytest.raises(ValueError, match=r"fc1_w has shape"):
        call(fc1_w=w1[:, :, None, None].expand(-1, -1, 3, 3))
    with pytest.raises(ValueError, match=r"fc1_b has shape \[95\], expected \[96\]"):
        call(fc1_b=b1[:95])
    with pytest.raises(ValueError, match=r"fc2_w has shape \[96, 95\], expected \[96, 96\]"):
        call(fc2_w=w2[:, :95])
    with pytest.raises(ValueError, match=r"fc2_w has shape \[48, 96\], expected \[96, 96\]"):
        call(fc2_w=w2[:48])  # residual needs COUT == C1 + C2
    with pytest.raises(ValueError, match=r"fc2_b has shape \[48\], expected \[96\]"):
        call(fc2_b=b2[:48])
    with pytest.raises(ValueError, match=r"fc2_b has dtype torch.float16"):
        call(fc2_b=b2.half())
    with pytest.raises(ValueError, match=r"fc1_w is on meta"):
        call(fc1_w=w1.to("meta"))
    with pytest.raises(ValueError, match="impl must be one of"):
        call(impl="cuda")
    # residual off: any COUT is fine
    assert call(fc2_w=w2[:48], fc2_b=b2[:48], residual=False).shape == (2, 48, 3, 3)


def test_registered_op_opcheck():
    x, x2, w1, b1, w2, b2 = make_case(1, 32, 16, 32, 48, 2, 3, torch.float32)[0]
    x, x2 = x.contiguous(memory_format=torch.channels_last), x2.contiguous(memory_format=torch.channels_last)
    torch.library.opcheck(torch.ops.nextvit.mlp.default, (x, x2, w1, b1, w2, b2, True),
                          test_utils=("test_schema", "test_faketensor"))
    torch.library.opcheck(torch.ops.nextvit.mlp.default, (x, None, w1[:, :32], b1, w2[:, :32][:32], b2[:32], False),
                          test_utils=("test_schema", "test_faketensor"))


# ------------------------------------------------------------------------------------------
# GPU
# ------------------------------------------------------------------------------------------
# Next-ViT-S at 224: (C1, C2, hidden, H) for every MLP shape (NCB: C -> 3C -> C; NTB concat).
STAGE_SHAPES = [
    (96, 0, 288, 56), (192, 0, 576, 28), (384, 0, 1152, 14), (768, 0, 2304, 7),
    (192, 64, 512, 28), (384, 128, 1024, 14), (768, 256, 2048, 7),
]
GPU_DTYPES = [torch.float16, torch.bfloat16, torch.float32]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=str)
@pytest.mark.parametrize("shape", STAGE_SHAPES, ids=lambda s: "-".join(map(str, s)))
def test_gpu_stage_shapes(shape, dtype):
    c1, c2, hidden, hw = shape
    t, t64 = make_case(2, c1, c2, hidden, c1 + c2, hw, hw, dtype, device="cuda")
    out = run(t, "triton")
    assert out.is_cuda and out.is_contiguous(memory_format=torch.channels_last)
    assert_close(out, oracle(t64), dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
def test_gpu_small_cases(case, dtype):
    b, c1, c2, hidden, c_out, h, w = case
    residual = c_out is None
    c_out = c1 + c2 if residual else c_out
    t, t64 = make_case(b, c1, c2, hidden, c_out, h, w, dtype, device="cuda")
    assert_close(run(t, "triton", residual), oracle(t64, residual), dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("split", [False, True], ids=["fused", "split"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(192, 64, 512, 28), (384, 0, 1152, 14), (768, 256, 2048, 7)],
                         ids=lambda s: "-".join(map(str, s)))
def test_gpu_both_modes(shape, dtype, split, monkeypatch):
    force_split(monkeypatch, mlp_mod, split)
    c1, c2, hidden, hw = shape
    t, t64 = make_case(3, c1, c2, hidden, c1 + c2, hw, hw, dtype, device="cuda")
    assert_close(run(t, "triton"), oracle(t64), dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(192, 64, 512, 256), (384, 128, 1024, 512)], ids=["fused", "split"])
def test_gpu_cuda_graph_capture(shape):
    dtype = torch.float16
    c1, c2, hidden, c_out = shape
    t, _ = make_case(2, c1, c2, hidden, c_out, 28, 28, dtype, device="cuda")
    x, x2, w1, b1, w2, b2 = t
    run(t, "triton")  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = ops.mlp(x, w1, b1, w2, b2, x2=x2, impl="triton")
    x.copy_(torch.randn_like(x))
    x2.copy_(torch.randn_like(x2))
    graph.replay()
    torch.cuda.synchronize()
    ref = mlp_mod.reference(*(a.double() for a in (x, w1, b1, w2, b2)), x2=x2.double())
    assert_close(out, ref, dtype)


@pytest.mark.gpu
def test_gpu_torch_compile_fullgraph():
    dtype = torch.float16
    t, t64 = make_case(2, 64, 32, 192, 96, 7, 7, dtype, device="cuda")
    x, x2, w1, b1, w2, b2 = t
    fn = torch.compile(lambda a, a2: ops.mlp(a, w1, b1, w2, b2, x2=a2, impl="triton"), fullgraph=True)
    assert_close(fn(x, x2), oracle(t64), dtype)
