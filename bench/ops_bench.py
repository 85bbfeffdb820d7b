#!/usr/bin/env python
"""The fused ops as benchmark cases, and a command that runs the benchmark suite on them.

This module is the one place that knows, per op: the Next-ViT stage shapes (the distinct
calls of the fused S/B/L plans at 224x224: S, B and L share their widths, so one set covers
all three, checked by tests/test_bench_scripts.py), tiny shapes for CPU runs, bytes moved,
FLOPs and the roofline floor, the eager PyTorch sequence the op replaces, and how to call it.
The pytest-benchmark suite (bench/test_bench_ops.py, bench/test_bench_model.py), the config
sweep (bench/tune.py) and the per-step profile (bench/profile_plan.py) all use it, and all time
with the same clock (``nextvit_kernels.harness``: ``EventClock``, ``flush_l2``, ``time_device``).

As a command it runs the op suite (``pytest bench/test_bench_ops.py --benchmark-only``), saves
the pytest-benchmark JSON under --out and prints one table row per op shape (fused, reference,
eager and torch.compile times, speed-ups, % of floor) from that JSON:

    python bench/ops_bench.py [--out DIR] [-- PYTEST ARGS ...]
    python bench/ops_bench.py --from-json FILE    # only print the table of a saved run
    python bench/ops_bench.py --list              # the cases with bytes / FLOPs / floor; no torch

See bench/README.md.
"""
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
from nextvit_kernels import harness  # noqa: E402  (imports no torch)

# ---------------------------------------------------------------------------------------
# Roofline ceilings (measured on an H100 80GB HBM3). The floor of an op is
# max(bytes / DRAM_BYTES_PER_S, flops / TENSOR_FLOPS_PER_S) seconds, where bytes is the
# minimal DRAM traffic (inputs + weights read once, output written once) and flops is
# 2 x the MACs of the fused op (no recomputation counted). These are H100 numbers on
# every card (an H200 has more bandwidth: its % of floor is against H100 ceilings).
# ---------------------------------------------------------------------------------------
CEILING_CARD = "NVIDIA H100 80GB HBM3"
DRAM_BYTES_PER_S = 2.98e12     # device copy, read + write
TENSOR_FLOPS_PER_S = 753e12    # fp16 dense GEMM (bf16 has the same tensor-core rate)

ALL_OPS = ("mhca", "mlp", "patch_embed", "conv_bn_relu", "e_mhsa", "head")
DTYPE_NAMES = {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32"}
ESIZE = {"fp16": 2, "bf16": 2, "fp32": 4}
# Max |out - eager| / max |eager| allowed before a benchmark fails its check.
TOLERANCE = {"fp16": 2e-2, "bf16": 5e-2, "fp32": 1e-4}
HEAD_DIM = 32
BN_EPS = 1e-5


def log(msg=""):
    print(msg, flush=True)


# ---------------------------------------------------------------------------------------
# Op table. Each spec: its shapes (stage shapes and tiny CPU ones), a label, the bytes/flops
# of the fused op and the eager sequence it replaces; builders (further down, they need
# torch) make the inputs, the eager module and the op call. hw = input height = width;
# "@" in labels is the input resolution.
# ---------------------------------------------------------------------------------------
def _macs_bytes(in_elems, w_elems, out_elems, macs, esize):
    return (in_elems + w_elems + out_elems) * esize, 2 * macs


def _cost_mhca(s, b, esize):
    c, hw = s["c"], s["hw"]
    m = b * hw * hw
    return _macs_bytes(m * c, c * HEAD_DIM * 9 + c + c * c, m * c,
                       m * (c * HEAD_DIM * 9 + c * c), esize)


def _cost_mlp(s, b, esize):
    cin, hid, cout, hw = s["c1"] + s["c2"], s["hid"], s["cout"], s["hw"]
    m = b * hw * hw
    return _macs_bytes(m * cin, hid * cin + hid + cout * hid + cout, m * cout,
                       m * (cin * hid + hid * cout), esize)


def _pool_out(n, stride):
    return -(-n // stride)


def _cost_patch_embed(s, b, esize):
    cin, cout, st, hw = s["cin"], s["cout"], s["stride"], s["hw"]
    mo = b * _pool_out(hw, st) ** 2
    return _macs_bytes(b * hw * hw * cin, cout * cin + cout, mo * cout, mo * cin * cout, esize)


def _conv_out(n, stride):
    return (n - 1) // stride + 1


def _cost_conv_bn_relu(s, b, esize):
    cin, cout, st, hw = s["cin"], s["cout"], s["stride"], s["hw"]
    mo = b * _conv_out(hw, st) ** 2
    return _macs_bytes(b * hw * hw * cin, cout * cin * 9 + cout, mo * cout,
                       mo * 9 * cin * cout, esize)


def _cost_e_mhsa(s, b, esize):
    c, hw, sr = s["c"], s["hw"], s["sr"]
    n = hw * hw
    nk = n // (sr * sr)
    # q: N*C*C, k and v: 2*Nk*C*C, scores and p@v: 2*N*Nk*C (over all heads), proj: N*C*C
    macs = b * (n * c * c + 2 * nk * c * c + 2 * n * nk * c + n * c * c)
    return _macs_bytes(b * n * c, 4 * c * c + 4 * c, b * n * c, macs, esize)


def _label_mhca(s):
    return f"C{s['c']} @{s['hw']}"


def _label_mlp(s):
    cin = f"{s['c1']}+{s['c2']}" if s["c2"] else f"{s['c1']}"
    return f"{cin}-{s['hid']}-{s['cout']} @{s['hw']}"


def _label_pe(s):
    return f"{s['cin']}-{s['cout']} s{s['stride']} @{s['hw']}"


def _label_e_mhsa(s):
    n = s["hw"] ** 2
    return f"C{s['c']} N{n} Nk{n // s['sr'] ** 2} sr{s['sr']}"




def _cost_head(s, b, esize):
    hw, c, n = s["hw"], s["c"], s["n"]
    return _macs_bytes(b * hw * hw * c, n * c + n, b * n, b * n * c, esize)


def _label_head(s):
    return f"{s['hw']}x{s['hw']}x{s['c']}->{s['n']}"


def _mlp_shape(c1, c2, hid, cout, hw):
    return dict(c1=c1, c2=c2, hid=hid, cout=cout, hw=hw)


def _conv_shape(cin, cout, stride, hw):
    return dict(cin=cin, cout=cout, stride=stride, hw=hw)


OP_SPECS = {
    "mhca": dict(  # NCBs on the block width; NTBs on their MHCA branch (64, 128, 256)
        shapes=[dict(c=96, hw=56), dict(c=192, hw=28), dict(c=64, hw=28), dict(c=384, hw=14),
                dict(c=128, hw=14), dict(c=768, hw=7), dict(c=256, hw=7)],
        smoke=[dict(c=32, hw=7), dict(c=64, hw=5)],
        label=_label_mhca, cost=_cost_mhca,
        eager="grouped conv3x3 -> BN -> ReLU -> conv1x1 -> + x"),
    "mlp": dict(  # NCB MLPs, then the NTBs' concat MLPs (E-MHSA out + MHCA branch)
        shapes=[_mlp_shape(96, 0, 288, 96, 56), _mlp_shape(192, 0, 576, 192, 28),
                _mlp_shape(384, 0, 1152, 384, 14), _mlp_shape(768, 0, 2304, 768, 7),
                _mlp_shape(192, 64, 512, 256, 28), _mlp_shape(384, 128, 1024, 512, 14),
                _mlp_shape(768, 256, 2048, 1024, 7)],
        smoke=[_mlp_shape(32, 0, 96, 32, 7), _mlp_shape(32, 16, 96, 48, 5)],
        label=_label_mlp, cost=_cost_mlp,
        eager="[cat ->] BN -> conv1x1+b -> ReLU -> conv1x1+b -> + u"),
    "patch_embed": dict(  # stage entries (stride 2), width changes and NTB projections (stride 1)
        shapes=[_conv_shape(64, 96, 1, 56), _conv_shape(96, 192, 2, 56), _conv_shape(192, 64, 1, 28),
                _conv_shape(256, 384, 2, 28), _conv_shape(384, 128, 1, 14), _conv_shape(512, 384, 1, 14),
                _conv_shape(512, 768, 2, 14), _conv_shape(768, 256, 1, 7)],
        smoke=[_conv_shape(16, 32, 1, 7), _conv_shape(32, 48, 2, 7)],
        label=_label_pe, cost=_cost_patch_embed,
        eager="[AvgPool2d(2,2,ceil) ->] conv1x1 -> BN"),
    "conv_bn_relu": dict(  # the stem
        shapes=[_conv_shape(3, 64, 2, 224), _conv_shape(64, 32, 1, 112),
                _conv_shape(32, 64, 1, 112), _conv_shape(64, 64, 2, 112)],
        smoke=[_conv_shape(3, 16, 2, 7), _conv_shape(16, 16, 1, 7)],
        label=_label_pe, cost=_cost_conv_bn_relu,
        eager="conv3x3 -> BN -> ReLU"),
    "e_mhsa": dict(
        shapes=[dict(c=192, hw=28, sr=4), dict(c=384, hw=14, sr=2), dict(c=768, hw=7, sr=1)],
        smoke=[dict(c=32, hw=7, sr=2), dict(c=64, hw=4, sr=1)],
        label=_label_e_mhsa, cost=_cost_e_mhsa,
        eager="q/k/v Linear + AvgPool1d + SDPA + proj Linear + residual (BN-folded)"),
    "head": dict(
        shapes=[dict(hw=7, c=1024, n=1000)], smoke=[dict(hw=3, c=32, n=20)],
        label=_label_head, cost=_cost_head,
        eager="global average pool -> Linear (BN folded)"),
}


def floor_seconds(nbytes, flops):
    return max(nbytes / DRAM_BYTES_PER_S, flops / TENSOR_FLOPS_PER_S)


def costs(op, shape, batch, dtype):
    """bytes, flops and floor_ms of one fused op call (dtype: fp16 / bf16 / fp32)."""
    nbytes, flops = OP_SPECS[op]["cost"](shape, batch, ESIZE[dtype])
    return dict(bytes=nbytes, flops=flops, floor_ms=floor_seconds(nbytes, flops) * 1e3)


def roofline(cost, ms):
    """Achieved TB/s, TFLOP/s and % of the floor of a call that took ``ms``."""
    s = ms * 1e-3
    return dict(tbps=cost["bytes"] / s / 1e12, tflops=cost["flops"] / s / 1e12,
                pct_floor=100.0 * cost["floor_ms"] / ms)


def cases(tiny):
    """Every (op, shape, label): the stage shapes, or the tiny CPU ones."""
    return [(op, dict(s), OP_SPECS[op]["label"](s)) for op in ALL_OPS
            for s in OP_SPECS[op]["smoke" if tiny else "shapes"]]


# ---------------------------------------------------------------------------------------
# Everything below needs torch (imported by _import_torch_stack once TRITON_INTERPRET is settled).
# ---------------------------------------------------------------------------------------
torch = nn = F = ops = _common = None


def _import_torch_stack(smoke):
    """Imports torch and the ops. ``smoke``: the CPU, with the Triton kernels interpreted
    (TRITON_INTERPRET=1 must be chosen before triton is first imported); otherwise a CUDA GPU
    is required and the process exits (code 2) with a one-line reason without one."""
    global torch, nn, F, ops, _common
    if smoke:
        if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
            log("warning: triton was imported before TRITON_INTERPRET=1 could be set")
        os.environ["TRITON_INTERPRET"] = "1"
    import torch as _torch
    import torch.nn as _nn
    import torch.nn.functional as _F
    torch, nn, F = _torch, _nn, _F
    if not smoke:
        if not torch.cuda.is_available():
            log("no CUDA GPU found: GPU timings need an NVIDIA GPU (H100 reference)")
            sys.exit(2)
        if os.environ.get("TRITON_INTERPRET", "0") == "1":
            log("TRITON_INTERPRET=1 is set; unset it to time the compiled kernels on the GPU")
            sys.exit(2)
    from nextvit_kernels import ops as _ops
    from nextvit_kernels.ops import _common as _c
    ops, _common = _ops, _c
    if not M:
        M.update(_make_modules())


# ----------------------------------------------------------------------------- eager modules
# What eager PyTorch runs when the BatchNorms are NOT folded (E-MHSA: BN-folded Linears,
# as in the brief). Each module can hand out the folded parameters the fused op takes.
def _bn_affine(bn):
    s = bn.weight.double() / torch.sqrt(bn.running_var.double() + bn.eps)
    return s, bn.bias.double() - bn.running_mean.double() * s


def _fold_after(conv_w, bn):
    """conv (no bias) -> BN  ==  conv with W*s, bias t."""
    s, t = _bn_affine(bn)
    return conv_w.double() * s.reshape(-1, *([1] * (conv_w.dim() - 1))), t


def _make_modules():
    class MHCAEager(nn.Module):
        def __init__(self, c):
            super().__init__()
            self.conv = nn.Conv2d(c, c, 3, padding=1, groups=c // HEAD_DIM, bias=False)
            self.norm = nn.BatchNorm2d(c, eps=BN_EPS)
            self.act = nn.ReLU()
            self.proj = nn.Conv2d(c, c, 1, bias=False)

        def forward(self, x):
            return x + self.proj(self.act(self.norm(self.conv(x))))

        def folded(self):
            w, b = _fold_after(self.conv.weight, self.norm)
            return w, b, self.proj.weight.double()[:, :, 0, 0]

    class MlpEager(nn.Module):
        def __init__(self, cin, hid, cout):
            super().__init__()
            self.norm = nn.BatchNorm2d(cin, eps=BN_EPS)
            self.fc1 = nn.Conv2d(cin, hid, 1, bias=True)
            self.act = nn.ReLU()
            self.fc2 = nn.Conv2d(hid, cout, 1, bias=True)

        def forward(self, x, x2=None):
            u = x if x2 is None else torch.cat([x, x2], dim=1)
            return u + self.fc2(self.act(self.fc1(self.norm(u))))

        def folded(self):
            s, t = _bn_affine(self.norm)
            w1 = self.fc1.weight.double()[:, :, 0, 0]
            return (w1 * s[None, :], w1 @ t + self.fc1.bias.double(),
                    self.fc2.weight.double()[:, :, 0, 0], self.fc2.bias.double())

    class PatchEmbedEager(nn.Module):
        def __init__(self, cin, cout, stride):
            super().__init__()
            self.pool = (nn.AvgPool2d(2, 2, ceil_mode=True, count_include_pad=False)
                         if stride == 2 else nn.Identity())
            self.conv = nn.Conv2d(cin, cout, 1, bias=False)
            self.norm = nn.BatchNorm2d(cout, eps=BN_EPS)

        def forward(self, x):
            return self.norm(self.conv(self.pool(x)))

        def folded(self):
            w, b = _fold_after(self.conv.weight, self.norm)
            return w[:, :, 0, 0], b

    class ConvBNReLUEager(nn.Module):
        def __init__(self, cin, cout, stride):
            super().__init__()
            self.conv = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
            self.norm = nn.BatchNorm2d(cout, eps=BN_EPS)
            self.act = nn.ReLU()

        def forward(self, x):
            return self.act(self.norm(self.conv(x)))

        def folded(self):
            return _fold_after(self.conv.weight, self.norm)

    class EfficientAttentionLocal(nn.Module):
        """timm.models.nextvit.EfficientAttention (SDPA path) without its BatchNorm1d."""

        def __init__(self, dim, head_dim, sr_ratio):
            super().__init__()
            self.num_heads, self.head_dim = dim // head_dim, head_dim
            self.q = nn.Linear(dim, dim)
            self.k = nn.Linear(dim, dim)
            self.v = nn.Linear(dim, dim)
            self.proj = nn.Linear(dim, dim)
            n = sr_ratio * sr_ratio
            self.sr = nn.AvgPool1d(kernel_size=n, stride=n) if sr_ratio > 1 else None

        def forward(self, x):
            B, N, C = x.shape
            q = self.q(x).reshape(B, N, self.num_heads, self.head_dim).permute(0, 2, 1, 3)
            if self.sr is not None:
                x = self.sr(x.transpose(1, 2)).transpose(1, 2)
            k = self.k(x).reshape(B, -1, self.num_heads, self.head_dim).transpose(1, 2)
            v = self.v(x).reshape(B, -1, self.num_heads, self.head_dim).transpose(1, 2)
            x = F.scaled_dot_product_attention(q, k, v)
            return self.proj(x.transpose(1, 2).reshape(B, N, C))

    def efficient_attention(dim, sr_ratio):
        """timm's module when timm is importable (its BN1d replaced by Identity: folded),
        else the local copy. Returns (module, source string)."""
        try:
            from timm.models.nextvit import EfficientAttention
            m = EfficientAttention(dim=dim, head_dim=HEAD_DIM, sr_ratio=sr_ratio)
            if getattr(m, "norm", None) is not None:
                m.norm = nn.Identity()
            m.fused_attn = True  # the SDPA path
            import timm
            return m, f"timm {timm.__version__} EfficientAttention (SDPA, BN folded)"
        except Exception as e:
            return (EfficientAttentionLocal(dim, HEAD_DIM, sr_ratio),
                    f"local EfficientAttention copy (SDPA; timm unavailable: {type(e).__name__})")

    class ResidualTokens(nn.Module):
        def __init__(self, attn):
            super().__init__()
            self.attn = attn

        def forward(self, t):
            return t + self.attn(t)

        def folded(self):
            a = self.attn
            return [p.double() for p in (a.q.weight, a.q.bias, a.k.weight, a.k.bias,
                                         a.v.weight, a.v.bias, a.proj.weight, a.proj.bias)]

    return dict(MHCAEager=MHCAEager, MlpEager=MlpEager, PatchEmbedEager=PatchEmbedEager,
                ConvBNReLUEager=ConvBNReLUEager, ResidualTokens=ResidualTokens,
                efficient_attention=efficient_attention)


M = {}  # filled by _make_modules() in _import_torch_stack()


def _randomize_bn(module):
    """Random eval-mode BatchNorm statistics so that no BN is an identity."""
    with torch.no_grad():
        for bn in module.modules():
            if isinstance(bn, nn.BatchNorm2d):
                bn.weight.uniform_(0.5, 1.5)
                bn.bias.uniform_(-0.5, 0.5)
                bn.running_mean.uniform_(-0.2, 0.2)
                bn.running_var.uniform_(0.5, 1.5)


def _prepare(module, dev, dtype):
    module.eval().requires_grad_(False)
    return module.to(device=dev, dtype=dtype, memory_format=torch.channels_last)


def _act(b, c, h, w, dev, dtype):
    return torch.empty((b, c, h, w), device=dev, dtype=dtype,
                       memory_format=torch.channels_last).normal_()


def _cast(tensors, dev, dtype):
    return [t.to(device=dev, dtype=dtype).contiguous() for t in tensors]


def _same(out):
    return out



class Case:
    """One op at one shape, batch and dtype: ``eager(*args)`` is the unfused PyTorch sequence,
    ``call(impl)`` a zero-argument callable of the public op (``impl`` "triton" or "reference"),
    ``as_ref(out)`` the op's output in the eager output's layout."""

    def __init__(self, eager, args, call, as_ref=_same):
        self.eager, self.args, self.call, self.as_ref = eager, args, call, as_ref


def build_mhca(s, b, dev, dtype):
    m = M["MHCAEager"](s["c"])
    _randomize_bn(m)
    cw, cb, pw = _cast(m.folded(), dev, dtype)
    x = _act(b, s["c"], s["hw"], s["hw"], dev, dtype)
    return Case(_prepare(m, dev, dtype), (x,),
                lambda impl: lambda: ops.mhca(x, cw, cb, pw, residual=True, impl=impl))


def build_mlp(s, b, dev, dtype):
    m = M["MlpEager"](s["c1"] + s["c2"], s["hid"], s["cout"])
    _randomize_bn(m)
    w1, b1, w2, b2 = _cast(m.folded(), dev, dtype)
    x = _act(b, s["c1"], s["hw"], s["hw"], dev, dtype)
    x2 = _act(b, s["c2"], s["hw"], s["hw"], dev, dtype) if s["c2"] else None
    return Case(_prepare(m, dev, dtype), (x,) if x2 is None else (x, x2),
                lambda impl: lambda: ops.mlp(x, w1, b1, w2, b2, x2=x2, residual=True, impl=impl))


def _build_strided(eager_name, op):
    """PatchEmbed and the stem conv: same inputs (cin, cout, stride), different eager module and op."""
    def build(s, b, dev, dtype):
        m = M[eager_name](s["cin"], s["cout"], s["stride"])
        _randomize_bn(m)
        w, bias = _cast(m.folded(), dev, dtype)
        x = _act(b, s["cin"], s["hw"], s["hw"], dev, dtype)
        return Case(_prepare(m, dev, dtype), (x,),
                    lambda impl: lambda: getattr(ops, op)(x, w, bias, stride=s["stride"], impl=impl))
    return build


build_patch_embed = _build_strided("PatchEmbedEager", "patch_embed")
build_conv_bn_relu = _build_strided("ConvBNReLUEager", "conv_bn_relu")


def build_e_mhsa(s, b, dev, dtype):
    c, hw, sr = s["c"], s["hw"], s["sr"]
    attn, source = M["efficient_attention"](c, sr)
    m = M["ResidualTokens"](attn)
    qw, qb, kw, kb, vw, vb, pw, pb = _cast(m.folded(), dev, dtype)
    x = _act(b, c, hw, hw, dev, dtype)
    tokens = x.permute(0, 2, 3, 1).reshape(b, hw * hw, c)  # a view of the NHWC buffer
    M["e_mhsa_source"] = source

    def call(impl):
        return lambda: ops.e_mhsa(x, qw, qb, kw, kb, vw, vb, pw, pb, sr_ratio=sr, head_dim=HEAD_DIM,
                                  residual=True, impl=impl)

    def as_tokens(out):
        return out.permute(0, 2, 3, 1).reshape(b, hw * hw, out.shape[1])

    return Case(_prepare(m, dev, dtype), (tokens,), call, as_tokens)


def build_head(s, b, dev, dtype):
    x = _act(b, s["c"], s["hw"], s["hw"], dev, dtype)
    w = (torch.randn(s["n"], s["c"], device=dev) / math.sqrt(s["c"])).to(dtype)
    bias = torch.randn(s["n"], device=dev).to(dtype)

    def eager(x):  # global average pool + Linear (the BatchNorm folded into w, bias)
        return F.linear(x.mean(dim=(2, 3)), w, bias)

    return Case(eager, (x,), lambda impl: lambda: ops.head(x, w, bias, impl=impl))


BUILDERS = dict(mhca=build_mhca, mlp=build_mlp, patch_embed=build_patch_embed,
                conv_bn_relu=build_conv_bn_relu, e_mhsa=build_e_mhsa, head=build_head)


def build(op, shape, batch, dev, dtype):
    """The Case of one op; dtype is "fp16" / "bf16" / "fp32" or a torch dtype."""
    if isinstance(dtype, str):
        dtype = getattr(torch, DTYPE_NAMES[dtype])
    return BUILDERS[op](shape, batch, dev, dtype)


def rel_error(out, ref):
    """max |out - ref| / max |ref| in float32; inf when out has non-finite elements."""
    if tuple(out.shape) != tuple(ref.shape):
        raise ValueError(f"output shape {tuple(out.shape)} != eager {tuple(ref.shape)}")
    o, r = out.float(), ref.float()
    if not torch.isfinite(o).all():
        return math.inf
    return ((o - r).abs().max() / r.abs().max().clamp_min(1e-6)).item()


def _err(e):
    text = f"{type(e).__name__}: {e}".strip().splitlines()
    return (text[0] if text else type(e).__name__)[:300]


# Error texts of CUDA failures after which the context is unusable.
CUDA_FATAL = ("illegal memory access", "unspecified launch failure", "misaligned address",
              "device-side assert", "illegal instruction", "CUDA error: an illegal")


def run_environment(smoke):
    """``harness.environment()`` with what these numbers need in order to be read: the card's
    file-name slug, the ceilings they are judged against, and a CPU smoke run named as such."""
    env = harness.environment(smoke=smoke)
    env["host_cpu"] = env["cpu"]  # the key op-suite results named the CPU by before the harness
    if smoke:
        return dict(env, card="CPU (smoke: TRITON_INTERPRET=1, float32)", card_slug="cpu-smoke",
                    ceiling_note="smoke run: CPU interpreter timings, floors and speed-ups are meaningless")
    card = env["card"] or "no GPU"
    env["card_slug"] = harness.slug(card)
    if "H100" in card:
        env["ceiling_note"] = f"ceilings measured on {CEILING_CARD}"
    elif "H200" in card:
        env["ceiling_note"] = (f"H200 detected: the ceilings are the H100's ({CEILING_CARD}); the H200's "
                               "HBM3e is faster, so % of floor here is against H100 ceilings")
    else:
        env["ceiling_note"] = f"{card} is not an H100: the ceilings are the H100's ({CEILING_CARD})"
    return env


# ----------------------------------------------------------------------------- the table
IMPLS = ("triton", "reference", "eager", "compile")
COLUMNS = [  # (header, key, format)
    ("op", "op", "{}"), ("shape", "label", "{}"), ("B", "batch", "{}"), ("dtype", "dtype", "{}"),
    ("check", "check", "{}"), ("fused ms", "triton", "{:.4f}"), ("TB/s", "tbps", "{:.2f}"),
    ("TFLOP/s", "tflops", "{:.1f}"), ("% floor", "pct_floor", "{:.0f}"),
    ("ref ms", "reference", "{:.4f}"), ("eager ms", "eager", "{:.4f}"), ("compile ms", "compile", "{:.4f}"),
    ("x eager", "x_eager", "{:.2f}"), ("x compile", "x_compile", "{:.2f}"),
    ("JIT s", "jit_s", "{:.1f}"), ("compile s", "compile_s", "{:.1f}"),
]


def table_rows(data):
    """One row per op case of a pytest-benchmark JSON (bench/test_bench_ops.py): the median
    of each implementation, the fused op's rates and % of floor, and the speed-ups."""
    rows = {}
    for bm in data["benchmarks"]:
        x = bm.get("extra_info", {})
        if x.get("kind") != "op":
            continue
        r = rows.setdefault(bm["group"], dict(op=x["op"], label=x["label"], batch=x["batch"],
                                              dtype=x["dtype"], check="ok"))
        r[x["impl"]] = bm["stats"]["median"] * 1e3
        if x.get("check") != "ok":
            r["check"] = "FAIL"
        if x["impl"] == "triton":
            r.update(tbps=x.get("tbps"), tflops=x.get("tflops"), pct_floor=x.get("pct_floor"),
                     jit_s=x.get("first_call_s"))
        elif x["impl"] == "compile":
            r["compile_s"] = x.get("first_call_s")
    for r in rows.values():
        if r.get("triton"):
            for base in ("eager", "compile"):
                r["x_" + base] = r[base] / r["triton"] if r.get(base) else None
    return list(rows.values())


def print_table(path):
    data = json.loads(Path(path).read_text())
    info = data.get("machine_info", {}).get("nextvit", {})
    log(f"{path}: {info.get('card', '?')}, torch {info.get('torch')}, triton {info.get('triton')}, "
        f"commit {data.get('commit_info', {}).get('id', '?')[:10]}")
    if info.get("mode") == "cpu":
        log("CPU run: tiny shapes, kernels under the Triton interpreter: the times mean nothing")
    rows = table_rows(data)
    log(harness.format_table(rows, COLUMNS) if rows else "no op benchmarks in this file")
    return rows


# ----------------------------------------------------------------------------- main
def parse_args(argv=None):
    from nextvit_kernels import cli
    p = cli.parser(__doc__.split("\n\n")[0] + "\n\nArguments after -- go to pytest, e.g. "
                   "-- --bench-dtype fp16,bf16 --bench-batch 64,256 -k mlp (see `pytest bench --help`, "
                   "section 'nextvit benchmarks').")
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results",
                   help="folder for the pytest-benchmark JSON (ops-<stamp>.json)")
    p.add_argument("--from-json", type=Path, metavar="FILE",
                   help="print the table of a saved pytest-benchmark JSON and exit (runs nothing)")
    p.add_argument("--list", action="store_true",
                   help="print the GPU cases (per batch 256, fp16) with bytes, FLOPs and floor, and exit")
    p.add_argument("pytest_args", nargs="*", metavar="-- PYTEST ARGS",
                   help="passed to pytest after the suite's own arguments")
    args = p.parse_args(argv)
    if args.from_json and not args.from_json.is_file():
        p.error(f"--from-json: no such file: {args.from_json}")
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.from_json:
        print_table(args.from_json)
        return 0
    if args.list:
        for i, (op, s, label) in enumerate(cases(tiny=False), 1):
            c = costs(op, s, 256, "fp16")
            log(f"{i:3d} {op:13s} {label:24s} {c['bytes'] / 1e6:9.2f} MB  {c['flops'] / 1e9:9.2f} GFLOP  "
                f"floor {c['floor_ms'] * 1e3:9.2f} us")
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"ops-{time.strftime('%Y%m%d-%H%M%S')}.json"
    cmd = [sys.executable, "-m", "pytest", str(REPO / "bench" / "test_bench_ops.py"), "--benchmark-only",
           "-p", "no:cacheprovider", "-q", f"--benchmark-json={path}"] + args.pytest_args
    log("running: " + " ".join(cmd))
    rc = subprocess.run(cmd, cwd=REPO).returncode
    if path.is_file():
        log("")
        print_table(path)
    else:
        log(f"no JSON written (pytest exit code {rc})")
    return rc


if __name__ == "__main__":
    sys.exit(main())
