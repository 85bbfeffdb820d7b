"""Tests of ops.e_mhsa (fused E-MHSA with folded BatchNorms)."""
import importlib

import pytest
import torch

from nextvit_kernels import ops
from _util import assert_close, force_split, rand_like_dtype

mod = importlib.import_module("nextvit_kernels.ops.e_mhsa")

CPU_DTYPES = [torch.float32, torch.float16]


def make_case(b, c, h, w, cout=None, dtype=torch.float32, device="cpu", channels_last=True):
    """x and folded weights rounded to ``dtype`` (scaled so softmax is neither flat
    nor one-hot), plus float64 CPU copies for the oracle."""
    cout = c if cout is None else cout
    x, x64 = rand_like_dtype(b, c, h, w, dtype=dtype, device=device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    shapes = [(c, c), (c,), (c, c), (c,), (c, c), (c,), (cout, c), (cout,)]
    params, params64 = [], []
    for i, s in enumerate(shapes):
        scale = (1.5 if i < 4 else 1.0) / c ** 0.5 if len(s) == 2 else 0.2
        p, p64 = rand_like_dtype(*s, dtype=dtype, device=device, scale=scale)
        params.append(p)
        params64.append(p64)
    return x, params, x64, params64


def run_case(b, c, h, w, sr, cout, residual, channels_last, dtype, device="cpu", impl="triton"):
    x, params, x64, params64 = make_case(b, c, h, w, cout, dtype, device, channels_last)
    out = ops.e_mhsa(x, *params, sr_ratio=sr, residual=residual, impl=impl)
    ref = mod.reference(x64, *params64, sr, 32, residual)
    assert out.dtype == dtype and out.device == x.device
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert_close(out, ref, dtype, what=f"e_mhsa {impl} {dtype} B{b} C{c} {h}x{w} sr{sr} Cout{cout}")
    return out


# (B, C, H, W, sr, Cout, residual, channels_last)
CASES = [
    (1, 32, 4, 4, 1, None, True, True),        # square, Nk = 16, one key tile
    (2, 64, 5, 7, 2, None, True, False),       # non-square, N=35 -> Nk 8 (3 tokens dropped), NCHW in
    (3, 96, 8, 8, 4, None, True, True),        # divisible: 64 tokens -> 4 keys
    (2, 64, 9, 8, 8, None, True, False),       # sr 8: 72 tokens -> 1 key (8 dropped)
    (1, 192, 12, 12, 1, None, True, True),     # 144 keys > one 64-key tile: online softmax
    (2, 32, 18, 17, 2, None, True, False),     # pooling + online softmax: 306 tokens -> 76 keys (2 dropped)
    (1, 160, 16, 16, 8, None, True, True),     # 4 keys
    (2, 128, 6, 11, 2, None, True, True),      # 66 tokens -> 16 keys (2 dropped)
    (2, 64, 7, 5, 2, 40, False, True),         # Cout < C, no residual
    (1, 32, 10, 13, 1, 96, False, False),      # Cout > C, 130 keys (online)
    (1, 32, 3, 5, 1, 288, False, True),        # Cout > 256: split mode by default
    (2, 288, 3, 4, 2, None, True, True),       # C = Cout = 288 (9 heads), residual: split by default
    (3, 32, 1, 1, 1, None, True, True),        # 1x1 map: one token, one key
    (2, 64, 3, 3, 3, None, True, False),       # sr 3: exactly one 9-token window
]


@pytest.mark.parametrize("split", [False, True], ids=["fused", "split"])
@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=["fp32", "fp16"])
@pytest.mark.parametrize("case", CASES, ids=[f"B{c[0]}-C{c[1]}-{c[2]}x{c[3]}-sr{c[4]}-co{c[5]}" for c in CASES])
def test_triton_matches_float64(case, dtype, split, monkeypatch):
    force_split(monkeypatch, mod, split)
    b, c, h, w, sr, cout, residual, cl = case
    run_case(b, c, h, w, sr, cout, residual, cl, dtype)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=["fp32", "fp16"])
def test_reference_impl(channels_last, dtype):
    run_case(2, 64, 6, 5, 2, None, True, channels_last, dtype, impl="reference")
    run_case(1, 32, 5, 4, 1, 48, False, channels_last, dtype, impl="reference")


def test_auto_on_cpu_is_reference():
    x, params, x64, params64 = make_case(1, 32, 4, 4)
    out = ops.e_mhsa(x, *params, sr_ratio=2)
    assert_close(out, mod.reference(x64, *params64, 2, 32, True), torch.float32)


def test_4d_weights_and_head_dim_64():
    x, params, x64, params64 = make_case(2, 128, 5, 6)
    for i in (0, 2, 4, 6):
        params[i] = params[i][:, :, None, None]
    out = ops.e_mhsa(x, *params, sr_ratio=2, head_dim=64, impl="triton")
    assert_close(out, mod.reference(x64, *params64, 2, 64, True), torch.float32)


@pytest.mark.parametrize("sr,h,w,cout", [(1, 5, 7, 64), (2, 7, 6, 48), (4, 9, 9, 80)])
def test_reference_matches_timm(sr, h, w, cout):
    """The oracle against timm's EfficientAttention (float64, eval-mode BatchNorm
    with random statistics folded into k and v here)."""
    nextvit = pytest.importorskip("timm.models.nextvit")
    c, b = 64, 2
    m = nextvit.EfficientAttention(c, out_dim=cout, sr_ratio=sr).double().eval()
    with torch.no_grad():
        for lin in (m.q, m.k, m.v, m.proj):
            lin.weight.normal_(0, 1.5 / c ** 0.5)
            lin.bias.normal_(0, 0.2)
        if m.norm is not None:
            m.norm.weight.uniform_(0.5, 1.5)
            m.norm.bias.normal_(0, 0.2)
            m.norm.running_mean.normal_(0, 0.3)
            m.norm.running_var.uniform_(0.5, 2.0)
    x = torch.randn(b, c, h, w, dtype=torch.float64)
    tokens = x.flatten(2).transpose(1, 2)
    with torch.no_grad():
        expect = m(tokens)  # [B, N, Cout]
    k_w, k_b = m.k.weight.detach(), m.k.bias.detach()
    v_w, v_b = m.v.weight.detach(), m.v.bias.detach()
    if m.norm is not None:
        n = m.norm
        s = n.weight / torch.sqrt(n.running_var + n.eps)
        t = n.bias - n.running_mean * s
        k_w, k_b = k_w * s[None, :], k_w @ t + k_b
        v_w, v_b = v_w * s[None, :], v_w @ t + v_b
    got = mod.reference(x, m.q.weight.detach(), m.q.bias.detach(), k_w, k_b, v_w, v_b,
                        m.proj.weight.detach(), m.proj.bias.detach(), sr, 32, False)
    got = got.flatten(2).transpose(1, 2)
    torch.testing.assert_close(got, expect, rtol=1e-10, atol=1e-10)
    # and with the residual
    res = mod.reference(x, m.q.weight.detach(), m.q.bias.detach(), k_w, k_b, v_w, v_b,
                        m.proj.weight.detach(), m.proj.bias.detach(), sr, 32, True) if cout == c else None
    if res is not None:
        torch.testing.assert_close(res.flatten(2).transpose(1, 2), expect + tokens, rtol=1e-10, atol=1e-10)


def _good(c=64, cout=None, dtype=torch.float32):
    x, params, _, _ = make_case(1, c, 4, 4, cout, dtype)
    return x, params


@pytest.mark.parametrize("mutate,kwargs,match", [
    (lambda x, p: (x[:, :, :1, :1], p), dict(sr_ratio=2), "fewer than one pooling window"),
    (lambda x, p: (x[:, :, :2, :3], p), dict(sr_ratio=3), "fewer than one pooling window"),
    (lambda x, p: (x, p), dict(sr_ratio=0), "sr_ratio must be"),
    (lambda x, p: (x, p), dict(sr_ratio=1.5), "sr_ratio must be"),
    (lambda x, p: (x[:, :48], [q[:48, :48] if q.dim() == 2 else q[:48] for q in p]), dict(sr_ratio=1),
     "not a multiple of 32"),
    (lambda x, p: (x, p), dict(sr_ratio=1, head_dim=24), "head_dim must be"),
    (lambda x, p: (x, [p[0][:, :32]] + p[1:]), dict(sr_ratio=1), r"q_w has shape \[64, 32\], expected \[64, 64\]"),
    (lambda x, p: (x, p[:3] + [p[3][:32]] + p[4:]), dict(sr_ratio=1), r"k_b has shape \[32\], expected \[64\]"),
    (lambda x, p: (x, p[:4] + [p[4].t()[:, :32]] + p[5:]), dict(sr_ratio=1), "v_w has shape"),
    (lambda x, p: (x, p[:6] + [p[6][:, :32]] + p[7:]), dict(sr_ratio=1), "proj_w has shape"),
    (lambda x, p: (x, p[:7] + [p[7][:16]]), dict(sr_ratio=1), r"proj_b has shape \[16\], expected \[64\]"),
    (lambda x, p: (x, p[:6] + [p[6][:32], p[7][:32]]), dict(sr_ratio=1), "residual=True needs"),
    (lambda x, p: (x, [p[0].half()] + p[1:]), dict(sr_ratio=1), "q_w has dtype torch.float16"),
    (lambda x, p: (x, p[:5] + [p[5].to("meta")] + p[6:]), dict(sr_ratio=1), "v_b is on meta"),
    (lambda x, p: (x[0], p), dict(sr_ratio=1), "must be 4-D"),
    (lambda x, p: (x.double(), [q.double() for q in p]), dict(sr_ratio=1), "dtype torch.float64"),
    (lambda x, p: (x, p), dict(sr_ratio=1, impl="cuda"), "impl must be one of"),
])
def test_errors(mutate, kwargs, match):
    x, params = mutate(*_good())
    with pytest.raises(ValueError, match=match):
        ops.e_mhsa(x, *params, **kwargs)


def test_opcheck_registered_op():
    x, params, _, _ = make_case(1, 32, 3, 3)
    torch.library.opcheck(torch.ops.nextvit.e_mhsa.default, (x, *params, 1, 32, True),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


def test_torch_compile_fullgraph_cpu():
    x, params, x64, params64 = make_case(1, 32, 3, 4)

    def f(x, *p):
        return torch.ops.nextvit.e_mhsa(x, *p, 2, 32, True)

    out = torch.compile(f, fullgraph=True)(x, *params)
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert_close(out, mod.reference(x64, *params64, 2, 32, True), torch.float32)


# ---------------------------------------------------------------------------
# GPU tests (skipped without CUDA)
# ---------------------------------------------------------------------------
ALL_DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# Next-ViT-S E-MHSA shapes: (C, H at 224, sr) -> Nk 49 at 224 and 144 at 384 in every stage.
STAGES = [(192, 28, 4), (384, 14, 2), (768, 7, 1), (96, 56, 8)]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("case", CASES, ids=[f"B{c[0]}-C{c[1]}-{c[2]}x{c[3]}-sr{c[4]}-co{c[5]}" for c in CASES])
def test_gpu_small_cases(case, dtype):
    b, c, h, w, sr, cout, residual, cl = case
    run_case(b, c, h, w, sr, cout, residual, cl, dtype, device="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("res", [224, 384])
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("stage", STAGES, ids=[f"C{s[0]}-sr{s[2]}" for s in STAGES])
def test_gpu_stage_shapes(stage, dtype, res):
    c, h224, sr = stage
    h = h224 * res // 224
    assert (h * h) // (sr * sr) == (49 if res == 224 else 144)
    run_case(2, c, h, h, sr, None, True, True, dtype, device="cuda")
    run_case(1, c, h, h, sr, c // 3, False, False, dtype, device="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("split", [False, True], ids=["fused", "split"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("stage", STAGES[:3], ids=[f"C{s[0]}-sr{s[2]}" for s in STAGES[:3]])
def test_gpu_both_modes(stage, dtype, split, monkeypatch):
    force_split(monkeypatch, mod, split)
    c, h, sr = stage
    for b in (1, 16):
        run_case(b, c, h, h, sr, None, True, True, dtype, device="cuda")


@pytest.mark.gpu
def test_gpu_impl_reference_and_auto():
    x, params, x64, params64 = make_case(2, 192, 28, 28, dtype=torch.float16, device="cuda")
    ref = mod.reference(x64, *params64, 4, 32, True)
    assert_close(ops.e_mhsa(x, *params, sr_ratio=4), ref, torch.float16)  # auto -> triton
    assert_close(ops.e_mhsa(x, *params, sr_ratio=4, impl="reference"), ref, torch.float16)


@pytest.mark.gpu
@pytest.mark.parametrize("c,hw,sr", [(192, 28, 4), (384, 14, 2)], ids=["fused", "split"])
def test_gpu_cuda_graph_capture(c, hw, sr):
    x, params, _, _ = make_case(2, c, hw, hw, dtype=torch.float16, device="cuda")
    static_x = x.clone()
    ops.e_mhsa(static_x, *params, sr_ratio=sr)  # compile outside the capture
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        static_out = ops.e_mhsa(static_x, *params, sr_ratio=sr)
    new_x, _ = rand_like_dtype(*x.shape, dtype=torch.float16, device="cuda")
    static_x.copy_(new_x)
    g.replay()
    torch.cuda.synchronize()
    expect = ops.e_mhsa(static_x, *params, sr_ratio=sr)
    torch.testing.assert_close(static_out, expect, rtol=0, atol=0)


@pytest.mark.gpu
def test_gpu_torch_compile_fullgraph():
    x, params, x64, params64 = make_case(2, 384, 14, 14, dtype=torch.float16, device="cuda")

    def f(x, *p):
        return torch.ops.nextvit.e_mhsa(x, *p, 2, 32, True)

    out = torch.compile(f, fullgraph=True)(x, *params)
    assert_close(out, mod.reference(x64, *params64, 2, 32, True), torch.float16)

