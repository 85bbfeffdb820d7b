"""ops.conv_bn_relu: the implicit-GEMM Triton kernel and the reference against a float64 oracle."""
import importlib

import pytest
import torch

from nextvit_kernels import ops
from _util import assert_close, rand_like_dtype

mod = importlib.import_module("nextvit_kernels.ops.conv_bn_relu")

CL = torch.channels_last


def make(b, c_in, c_out, h, w, dtype, device="cpu"):
    x, x64 = rand_like_dtype(b, c_in, h, w, dtype=dtype, device=device)
    wt, wt64 = rand_like_dtype(c_out, c_in, 3, 3, dtype=dtype, device=device, scale=(9 * c_in) ** -0.5)
    bias, bias64 = rand_like_dtype(c_out, dtype=dtype, device=device, scale=0.5)
    return (x, wt, bias), (x64, wt64, bias64)


# (B, C_in, C_out, H, W, stride): the stem's channel sets, odd / non-square / 1x1 maps,
# both K orders (flat for 9*C_in <= 64, tap loop above) and masked C_in / C_out tails.
CASES = [
    (2, 3, 64, 9, 7, 2),      # stem conv 1
    (1, 64, 32, 7, 9, 1),     # stem conv 2
    (1, 32, 64, 5, 6, 1),     # stem conv 3
    (2, 64, 64, 8, 7, 2),     # stem conv 4
    (1, 3, 64, 1, 1, 2),
    (3, 3, 64, 2, 1, 1),
    (1, 7, 17, 3, 5, 2),      # flat K = 63
    (1, 8, 16, 4, 4, 1),      # tap loop with C_in < BLOCK_K
    (1, 100, 150, 3, 4, 2),   # two K chunks and two N blocks, both masked
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("b,c_in,c_out,h,w,stride", CASES)
def test_triton_matches_float64(b, c_in, c_out, h, w, stride, dtype):
    args, args64 = make(b, c_in, c_out, h, w, dtype)
    x = args[0].contiguous(memory_format=CL)
    out = ops.conv_bn_relu(x, *args[1:], stride=stride, impl="triton")
    ho, wo = (h + 2 - 3) // stride + 1, (w + 2 - 3) // stride + 1
    assert out.shape == (b, c_out, ho, wo)
    assert out.dtype == dtype
    assert out.is_contiguous(memory_format=CL)
    assert_close(out, mod.reference(*args64, stride), dtype, what=f"conv_bn_relu {dtype} {(b, c_in, c_out, h, w, stride)}")


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("c_in", [3, 32])
def test_triton_any_input_layout(layout, c_in):
    args, args64 = make(2, c_in, 24, 5, 7, torch.float32)
    x = args[0] if layout == "nchw" else args[0].contiguous(memory_format=CL)
    out = ops.conv_bn_relu(x, *args[1:], stride=2, impl="triton")
    assert out.is_contiguous(memory_format=CL)
    assert_close(out, mod.reference(*args64, 2), torch.float32)


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("stride", [1, 2])
def test_reference_matches_float64(layout, stride):
    args, args64 = make(2, 3, 16, 7, 9, torch.float32)
    x = args[0] if layout == "nchw" else args[0].contiguous(memory_format=CL)
    out = ops.conv_bn_relu(x, *args[1:], stride=stride, impl="reference")
    assert out.is_contiguous(memory_format=CL)
    assert out.shape == (2, 16, (7 - 1) // stride + 1, (9 - 1) // stride + 1)
    assert_close(out, mod.reference(*args64, stride), torch.float32)
    assert torch.equal(ops.conv_bn_relu(x, *args[1:], stride=stride), out)  # CPU auto -> reference


def _bad(**kw):
    args = dict(x=torch.randn(1, 3, 5, 5), w=torch.randn(8, 3, 3, 3), b=torch.randn(8))
    opts = dict(stride=1)
    for k, v in kw.items():
        (args if k in args else opts)[k] = v
    return ops.conv_bn_relu(args["x"], args["w"], args["b"], **opts)


@pytest.mark.parametrize("kw,match", [
    (dict(stride=3), "stride must be 1 or 2"),
    (dict(stride=0), "stride must be 1 or 2"),
    (dict(stride=2.0), "stride must be 1 or 2"),
    (dict(x=torch.randn(3, 5, 5)), "4-D"),
    (dict(x=torch.randn(1, 3, 5, 5).to(torch.int64)), "dtype"),
    (dict(w=torch.randn(8, 4, 3, 3)), r"w has shape \[8, 4, 3, 3\], expected \[\*, 3, 3, 3\]"),
    (dict(w=torch.randn(8, 3, 5, 5)), "w has shape"),
    (dict(w=torch.randn(8, 3)), "w has shape"),
    (dict(b=torch.randn(9)), r"b has shape \[9\], expected \[8\]"),
    (dict(w=torch.randn(8, 3, 3, 3).half()), "w has dtype"),
    (dict(b=torch.randn(8).double()), "b has dtype"),
    (dict(impl="fast"), "impl must be one of"),
    (dict(w=torch.randn(8, 3, 3, 3, device="meta")), "w is on meta"),
])
def test_value_errors(kw, match):
    with pytest.raises(ValueError, match=match):
        _bad(**kw)


def test_stride_is_keyword_only():
    with pytest.raises(TypeError):
        ops.conv_bn_relu(torch.randn(1, 3, 5, 5), torch.randn(8, 3, 3, 3), torch.randn(8), 1)


def test_opcheck_and_compile():
    args, args64 = make(1, 3, 16, 5, 4, torch.float32)
    x = args[0].contiguous(memory_format=CL)
    torch.library.opcheck(torch.ops.nextvit.conv_bn_relu.default, (x, *args[1:], 2))
    f = torch.compile(lambda t: torch.ops.nextvit.conv_bn_relu(t, *args[1:], 2), fullgraph=True)
    out = f(x)
    assert out.shape == (1, 16, 3, 2)
    assert_close(out, mod.reference(*args64, 2), torch.float32)


# ----------------------------------------------------------------------------- GPU
# The Next-ViT stem at 224: (C_in, C_out, input size, stride).
STEM = [(3, 64, 224, 2), (64, 32, 112, 1), (32, 64, 112, 1), (64, 64, 112, 2)]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("c_in,c_out,hw,stride", STEM)
def test_gpu_stem_shapes(c_in, c_out, hw, stride, dtype):
    args, args64 = make(2, c_in, c_out, hw, hw, dtype, device="cuda")
    out = ops.conv_bn_relu(args[0].contiguous(memory_format=CL), *args[1:], stride=stride)
    assert out.is_contiguous(memory_format=CL)
    assert_close(out, mod.reference(*args64, stride), dtype, what=f"stem {dtype} {(c_in, c_out, hw, stride)}")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("b,c_in,c_out,h,w,stride", CASES)
def test_gpu_small_cases(b, c_in, c_out, h, w, stride, dtype):
    args, args64 = make(b, c_in, c_out, h, w, dtype, device="cuda")
    out = ops.conv_bn_relu(args[0], *args[1:], stride=stride, impl="triton")
    assert_close(out, mod.reference(*args64, stride), dtype)


@pytest.mark.gpu
def test_gpu_cuda_graph_capture():
    dtype = torch.float16
    args, _ = make(2, 3, 64, 224, 224, dtype, device="cuda")
    static_x = args[0].contiguous(memory_format=CL)
    ops.conv_bn_relu(static_x, *args[1:], stride=2)  # compile outside the capture
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        static_out = ops.conv_bn_relu(static_x, *args[1:], stride=2)
    new_x, new_x64 = rand_like_dtype(2, 3, 224, 224, dtype=dtype, device="cuda")
    static_x.copy_(new_x)
    g.replay()
    torch.cuda.synchronize()
    rest64 = [a.double().cpu() for a in args[1:]]
    assert_close(static_out, mod.reference(new_x64, *rest64, 2), dtype)


@pytest.mark.gpu
def test_gpu_compile_fullgraph():
    args, args64 = make(2, 32, 64, 28, 28, torch.float16, device="cuda")
    f = torch.compile(lambda t: ops.conv_bn_relu(t, *args[1:], stride=1), fullgraph=True)
    assert_close(f(args[0]), mod.reference(*args64, 1), torch.float16)
