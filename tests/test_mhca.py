"""ops.mhca: the fused Triton kernel and the reference against a float64 oracle."""
import importlib

import pytest
import torch

from nextvit_kernels import ops
from _util import assert_close, force_split, rand_like_dtype

mod = importlib.import_module("nextvit_kernels.ops.mhca")

CL = torch.channels_last


def make(b, c, h, w, c_out, dtype, device="cpu", proj_4d=False):
    """Inputs rounded to ``dtype`` and their float64 copies (on CPU)."""
    x, x64 = rand_like_dtype(b, c, h, w, dtype=dtype, device=device)
    cw, cw64 = rand_like_dtype(c, 32, 3, 3, dtype=dtype, device=device, scale=(9 * 32) ** -0.5)
    cb, cb64 = rand_like_dtype(c, dtype=dtype, device=device, scale=0.5)
    pw_shape = (c_out, c, 1, 1) if proj_4d else (c_out, c)
    pw, pw64 = rand_like_dtype(*pw_shape, dtype=dtype, device=device, scale=c ** -0.5)
    return (x, cw, cb, pw), (x64, cw64, cb64, pw64)


def oracle(args64, residual):
    return mod.reference(*args64, residual=residual)


# (B, C, H, W, C_out, residual): 1x1 maps, odd / non-square sizes, C 32..256 (96, 160),
# C_out != C without residual, and C_out > 256 (N split, conv recomputed per N block).
CASES = [
    (1, 32, 1, 1, 32, True),
    (2, 64, 5, 7, 64, True),
    (3, 96, 4, 3, 96, True),
    (1, 160, 6, 5, 160, True),
    (2, 128, 3, 3, 128, False),
    (1, 256, 3, 2, 256, True),
    (1, 64, 2, 5, 48, False),
    (1, 32, 3, 3, 300, False),
    (1, 384, 2, 3, 384, True),
]


# _config picks split below SPLIT_BELOW_PIXELS, so without forcing these small cases would
# never reach the fused kernel.
@pytest.mark.parametrize("split", [False, True], ids=["fused", "split"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("b,c,h,w,c_out,residual", CASES)
def test_triton_matches_float64(b, c, h, w, c_out, residual, dtype, split, monkeypatch):
    force_split(monkeypatch, mod, split)
    args, args64 = make(b, c, h, w, c_out, dtype)
    x = args[0].contiguous(memory_format=CL)
    out = ops.mhca(x, *args[1:], residual=residual, impl="triton")
    assert out.dtype == dtype
    assert out.is_contiguous(memory_format=CL)
    assert_close(out, oracle(args64, residual), dtype, what=f"mhca {dtype} {(b, c, h, w, c_out)}")


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_triton_any_input_layout_and_4d_proj(layout):
    args, args64 = make(2, 64, 3, 5, 64, torch.float32, proj_4d=True)
    x = args[0] if layout == "nchw" else args[0].contiguous(memory_format=CL)
    out = ops.mhca(x, *args[1:], impl="triton")
    assert out.is_contiguous(memory_format=CL)
    assert_close(out, oracle(args64, True), torch.float32)


@pytest.mark.parametrize("split", [False, True], ids=["fused", "split"])
def test_registered_op_reads_strided_input(split, monkeypatch):
    # The fused kernel reads x through its strides and split mode makes it channels_last,
    # so the raw op also takes NCHW input.
    force_split(monkeypatch, mod, split)
    args, args64 = make(1, 64, 3, 4, 64, torch.float32)
    out = mod._mhca_op(args[0].contiguous(), *args[1:], True)
    assert_close(out, oracle(args64, True), torch.float32)


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("residual", [True, False])
def test_reference_matches_float64(layout, residual):
    c_out = 64 if residual else 96
    args, args64 = make(2, 64, 5, 3, c_out, torch.float32)
    x = args[0] if layout == "nchw" else args[0].contiguous(memory_format=CL)
    out = ops.mhca(x, *args[1:], residual=residual, impl="reference")
    assert out.is_contiguous(memory_format=CL)
    assert_close(out, oracle(args64, residual), torch.float32)
    auto = ops.mhca(x, *args[1:], residual=residual)  # CPU tensor -> reference
    assert torch.equal(auto, out)


def _bad(**kw):
    x = torch.randn(1, 64, 3, 3)
    args = dict(x=x, conv_w=torch.randn(64, 32, 3, 3), conv_b=torch.randn(64), proj_w=torch.randn(64, 64))
    opts = {}
    for k, v in kw.items():
        (args if k in args else opts)[k] = v
    return ops.mhca(args["x"], args["conv_w"], args["conv_b"], args["proj_w"], **opts)


@pytest.mark.parametrize("kw,match", [
    (dict(x=torch.randn(64, 3, 3)), "4-D"),
    (dict(x=torch.randn(1, 64, 3, 3).to(torch.int32)), "dtype"),
    (dict(x=torch.randn(1, 48, 3, 3), conv_w=torch.randn(48, 32, 3, 3), conv_b=torch.randn(48),
          proj_w=torch.randn(48, 48)), "multiple of 32"),
    (dict(conv_w=torch.randn(64, 64, 3, 3)), r"conv_w has shape \[64, 64, 3, 3\], expected \[64, 32, 3, 3\]"),
    (dict(conv_w=torch.randn(64, 32, 1, 1)), "conv_w has shape"),
    (dict(conv_b=torch.randn(32)), "conv_b has shape"),
    (dict(proj_w=torch.randn(64, 32)), "proj_w has shape"),
    (dict(proj_w=torch.randn(64, 64, 3, 3)), "1x1 weight"),
    (dict(proj_w=torch.randn(96, 64)), "residual=True needs proj_w with 64 output channels"),
    (dict(conv_w=torch.randn(64, 32, 3, 3).half()), "conv_w has dtype"),
    (dict(proj_w=torch.randn(64, 64).double()), "proj_w has dtype"),
    (dict(impl="cuda"), "impl must be one of"),
    (dict(conv_b=torch.randn(64, device="meta")), "conv_b is on meta"),
])
def test_value_errors(kw, match):
    with pytest.raises(ValueError, match=match):
        _bad(**kw)


def test_opcheck_and_compile():
    args, args64 = make(1, 32, 3, 3, 32, torch.float32)
    x = args[0].contiguous(memory_format=CL)
    torch.library.opcheck(torch.ops.nextvit.mhca.default, (x, *args[1:], True))
    f = torch.compile(lambda t: torch.ops.nextvit.mhca(t, *args[1:], True), fullgraph=True)
    out = f(x)
    assert out.is_contiguous(memory_format=CL)
    assert_close(out, oracle(args64, True), torch.float32)


def test_config_rules():
    # Fused: BLOCK_N covers C_out up to 256 (conv computed once); wider outputs split N in 256s.
    for c in (64, 96, 128, 192, 256):
        cfg = mod._config(c, c, 2, 1 << 20)["fused"]
        assert cfg["BLOCK_N"] >= c and cfg["BLOCK_N"] <= 256
    for c in (384, 512, 768, 1024):
        assert mod._config(c, c, 2, 1 << 20)["fused"]["BLOCK_N"] == 256
    # Split below SPLIT_BELOW_PIXELS pixels (Next-ViT-S at batch 1: every stage); above, fused
    # only where one N block holds C_out exactly (a power of two <= 256: no conv recomputed,
    # nothing padded), split for the other Next-ViT widths.
    for c in (64, 96, 128, 192, 256, 384, 768):
        for m in (49, 196, 784, 3136, mod.SPLIT_BELOW_PIXELS - 1):
            assert mod._config(c, c, 2, m)["split"], (c, m)
        for m in (mod.SPLIT_BELOW_PIXELS, 256 * 196):
            assert mod._config(c, c, 2, m)["split"] == (c not in (64, 128, 256)), (c, m)


# ----------------------------------------------------------------------------- GPU
# Next-ViT-S at 224: NCB widths with their map sizes, and the NTB mhca widths (c_ca).
STAGE_SHAPES = [(96, 56), (192, 28), (256, 28), (384, 14), (512, 14), (768, 7), (1024, 7),
                (64, 28), (128, 14), (256, 7)]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("c,hw", STAGE_SHAPES)
def test_gpu_stage_shapes(c, hw, dtype):
    args, args64 = make(2, c, hw, hw, c, dtype, device="cuda")
    out = ops.mhca(args[0].contiguous(memory_format=CL), *args[1:])  # auto -> triton on CUDA
    assert out.is_contiguous(memory_format=CL)
    assert_close(out, oracle(args64, True), dtype, what=f"mhca {dtype} C={c} {hw}x{hw}")


@pytest.mark.gpu
@pytest.mark.parametrize("split", [False, True], ids=["fused", "split"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("c,hw", [(192, 28), (384, 14), (768, 7)])
def test_gpu_both_modes_at_batch_1_and_32(c, hw, dtype, split, monkeypatch):
    force_split(monkeypatch, mod, split)
    for b in (1, 32):
        args, args64 = make(b, c, hw, hw, c, dtype, device="cuda")
        assert_close(ops.mhca(args[0], *args[1:]), oracle(args64, True), dtype, what=f"b={b}")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("b,c,h,w,c_out,residual", CASES)
def test_gpu_small_cases(b, c, h, w, c_out, residual, dtype):
    args, args64 = make(b, c, h, w, c_out, dtype, device="cuda")
    out = ops.mhca(args[0], *args[1:], residual=residual, impl="triton")
    assert_close(out, oracle(args64, residual), dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("b", [1, 8], ids=["split", "fused"])  # 784 and 6272 pixels
def test_gpu_cuda_graph_capture(b):
    dtype = torch.float16
    args, _ = make(b, 192, 28, 28, 192, dtype, device="cuda")
    static_x = args[0].contiguous(memory_format=CL)
    ops.mhca(static_x, *args[1:])  # compile outside the capture
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        static_out = ops.mhca(static_x, *args[1:])
    new_x, new_x64 = rand_like_dtype(b, 192, 28, 28, dtype=dtype, device="cuda")
    static_x.copy_(new_x)
    g.replay()
    torch.cuda.synchronize()
    rest64 = [a.double().cpu() for a in args[1:]]
    assert_close(static_out, mod.reference(new_x64, *rest64, residual=True), dtype)


@pytest.mark.gpu
def test_gpu_compile_fullgraph():
    args, args64 = make(2, 96, 14, 14, 96, torch.float16, device="cuda")
    f = torch.compile(lambda t: ops.mhca(t, *args[1:]), fullgraph=True)
    assert_close(f(args[0]), oracle(args64, True), torch.float16)
