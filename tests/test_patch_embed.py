"""ops.patch_embed: [ceil-mode 2x2 average pool fused into the A load] + 1x1 conv + bias."""
import importlib

import pytest
import torch

from nextvit_kernels import ops
from _util import assert_close, rand_like_dtype

pe_mod = importlib.import_module("nextvit_kernels.ops.patch_embed")

CPU_DTYPES = [torch.float32, torch.float16]


def make_case(b, c_in, c_out, h, w, dtype, device="cpu"):
    x, x64 = rand_like_dtype(b, c_in, h, w, dtype=dtype, device=device)
    wt, w64 = rand_like_dtype(c_out, c_in, dtype=dtype, device=device, scale=c_in ** -0.5)
    bias, b64 = rand_like_dtype(c_out, dtype=dtype, device=device, scale=0.5)
    return (x, wt, bias), (x64, w64, b64)


def oracle(t64, stride):
    return pe_mod.reference(*t64, stride)


# (batch, CIN, COUT, H, W, stride)
CASES = [
    (1, 32, 48, 1, 1, 2),     # 1x1 map: the window has one valid pixel
    (2, 64, 96, 5, 7, 2),     # odd, non-square: last row / column windows have 2 or 1 pixels
    (3, 96, 192, 3, 3, 2),    # ceil mode on 3x3 -> 2x2 (stage-1 channels)
    (1, 256, 320, 4, 2, 2),   # even map, wide COUT: several N blocks
    (2, 40, 64, 6, 3, 2),     # CIN not a multiple of 32 (masked K)
    (2, 64, 96, 4, 6, 1),     # stride 1 (stage-0 first block)
    (1, 192, 64, 3, 5, 1),    # stride 1, NTB projection c_sa -> c_ca
    (3, 32, 32, 1, 1, 1),
]


@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
def test_triton_matches_float64(case, dtype):
    b, c_in, c_out, h, w, stride = case
    t, t64 = make_case(b, c_in, c_out, h, w, dtype)
    out = ops.patch_embed(*t, stride=stride, impl="triton")
    assert out.shape == (b, c_out, -(-h // stride), -(-w // stride))
    assert out.dtype == dtype
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert_close(out, oracle(t64, stride), dtype)


@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
@pytest.mark.parametrize("case", [CASES[1], CASES[5]], ids=lambda c: "-".join(map(str, c)))
def test_reference_matches_float64(case, dtype):
    b, c_in, c_out, h, w, stride = case
    t, t64 = make_case(b, c_in, c_out, h, w, dtype)
    out = ops.patch_embed(*t, stride=stride, impl="reference")
    assert out.dtype == dtype
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert_close(out, oracle(t64, stride), dtype)


def test_pool_divides_by_valid_count():
    """Constant input, identity weight, zero bias: every output pixel equals the constant
    only if each border window divides by its own count of valid pixels."""
    x = torch.full((1, 32, 3, 5), 2.5)
    out = ops.patch_embed(x, torch.eye(32), torch.zeros(32), stride=2, impl="triton")
    assert out.shape == (1, 32, 2, 3)
    assert torch.equal(out, torch.full_like(out, 2.5))


@pytest.mark.parametrize("impl", ["triton", "reference"])
@pytest.mark.parametrize("layout", ["nchw", "channels_last", "channel_slice"])
def test_input_layouts_and_4d_weight(layout, impl):
    dtype = torch.float32
    (x, w, b), t64 = make_case(2, 64, 96, 5, 3, dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "channel_slice":
        x = torch.cat([torch.zeros_like(x), x], dim=1).contiguous(memory_format=torch.channels_last)[:, 64:]
    out = ops.patch_embed(x, w[:, :, None, None], b, stride=2, impl=impl)
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert_close(out, oracle(t64, 2), dtype)


def test_auto_on_cpu_is_reference():
    t, t64 = make_case(1, 32, 64, 3, 3, torch.float32)
    assert_close(ops.patch_embed(*t, stride=2), oracle(t64, 2), torch.float32)


def test_value_errors():
    (x, w, b), _ = make_case(2, 64, 96, 4, 4, torch.float32)
    for stride in (0, 3, 4, -1, True, "2", None):
        with pytest.raises(ValueError, match="stride must be 1 or 2"):
            ops.patch_embed(x, w, b, stride=stride)
    with pytest.raises(ValueError, match="4-D"):
        ops.patch_embed(x[0], w, b, stride=2)
    with pytest.raises(ValueError, match="dtype"):
        ops.patch_embed(x.to(torch.int64), w, b, stride=2)
    with pytest.raises(ValueError, match="empty"):
        ops.patch_embed(x[:0], w, b, stride=2)
    with pytest.raises(ValueError, match=r"w has shape \[96, 32\], expected \[\*, 64\]"):
        ops.patch_embed(x, w[:, :32], b, stride=2)
    with pytest.raises(ValueError, match=r"1x1 weight"):
        ops.patch_embed(x, w[:, :, None, None].expand(-1, -1, 2, 2), b, stride=2)
    with pytest.raises(ValueError, match=r"b has shape \[95\], expected \[96\]"):
        ops.patch_embed(x, w, b[:95], stride=2)
    with pytest.raises(ValueError, match=r"w has dtype torch.float16"):
        ops.patch_embed(x, w.half(), b, stride=2)
    with pytest.raises(ValueError, match=r"b has dtype torch.float64"):
        ops.patch_embed(x, w, b.double(), stride=1)
    with pytest.raises(ValueError, match=r"w is on meta"):
        ops.patch_embed(x, w.to("meta"), b, stride=2)
    with pytest.raises(ValueError, match="impl must be one of"):
        ops.patch_embed(x, w, b, stride=2, impl="gpu")


@pytest.mark.parametrize("stride", [1, 2])
def test_registered_op_opcheck(stride):
    (x, w, b), _ = make_case(1, 32, 48, 3, 5, torch.float32)
    x = x.contiguous(memory_format=torch.channels_last)
    torch.library.opcheck(torch.ops.nextvit.patch_embed.default, (x, w, b, stride),
                          test_utils=("test_schema", "test_faketensor"))


# ------------------------------------------------------------------------------------------
# GPU
# ------------------------------------------------------------------------------------------
# Next-ViT-S at 224: (CIN, COUT, H, stride)
STAGE_SHAPES = [
    (64, 96, 56, 1), (96, 192, 56, 2), (256, 384, 28, 2), (512, 768, 14, 2),
    (192, 64, 28, 1), (384, 128, 14, 1), (768, 256, 7, 1),
]
GPU_DTYPES = [torch.float16, torch.bfloat16, torch.float32]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=str)
@pytest.mark.parametrize("shape", STAGE_SHAPES, ids=lambda s: "-".join(map(str, s)))
def test_gpu_stage_shapes(shape, dtype):
    c_in, c_out, hw, stride = shape
    t, t64 = make_case(2, c_in, c_out, hw, hw, dtype, device="cuda")
    out = ops.patch_embed(*t, stride=stride, impl="triton")
    assert out.is_cuda and out.is_contiguous(memory_format=torch.channels_last)
    assert_close(out, oracle(t64, stride), dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
def test_gpu_small_cases(case, dtype):
    b, c_in, c_out, h, w, stride = case
    t, t64 = make_case(b, c_in, c_out, h, w, dtype, device="cuda")
    assert_close(ops.patch_embed(*t, stride=stride, impl="triton"), oracle(t64, stride), dtype)


@pytest.mark.gpu
def test_gpu_cuda_graph_capture():
    dtype = torch.float16
    (x, w, b), _ = make_case(2, 96, 192, 55, 55, dtype, device="cuda")
    ops.patch_embed(x, w, b, stride=2, impl="triton")  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = ops.patch_embed(x, w, b, stride=2, impl="triton")
    x.copy_(torch.randn_like(x))
    graph.replay()
    torch.cuda.synchronize()
    assert_close(out, pe_mod.reference(x.double(), w.double(), b.double(), 2), dtype)


@pytest.mark.gpu
def test_gpu_torch_compile_fullgraph():
    dtype = torch.float16
    t, t64 = make_case(2, 256, 384, 27, 27, dtype, device="cuda")
    x, w, b = t
    fn = torch.compile(lambda a: ops.patch_embed(a, w, b, stride=2, impl="triton"), fullgraph=True)
    assert_close(fn(x), oracle(t64, 2), dtype)
