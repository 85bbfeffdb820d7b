#!/usr/bin/env python
"""Per-op microbenchmark of the fused Next-ViT kernels (DESIGN.md §3, §4, §7).

For every fused op at the Next-ViT-S stage shapes (224x224 input), each batch and dtype:
median time of the fused op, achieved TB/s and TFLOP/s, % of its roofline floor, and
the speed-up over (a) the eager op sequence it replaces (BatchNorm NOT folded, cuDNN
convs, channels_last) and (b) ``torch.compile`` of that same eager module, all measured
in the same run. The fused output is checked against the eager output before timing.

    python bench/ops_bench.py [--ops mhca,mlp,...] [--batch 64,256] [--dtype fp16,bf16]
                              [--no-compile] [--out DIR] [--smoke] [--list]

``--smoke`` proves the script end to end on a machine without a GPU: CPU, tiny shapes,
float32, the Triton kernels under TRITON_INTERPRET=1, a 1-iteration timer, no
torch.compile. See bench/README.md.
"""
import argparse
import datetime
import json
import math
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# ---------------------------------------------------------------------------------------
# Roofline ceilings (DESIGN.md §4, measured on an H100 80GB HBM3). The floor of an op is
# max(bytes / DRAM_BYTES_PER_S, flops / TENSOR_FLOPS_PER_S) seconds, where bytes is the
# minimal DRAM traffic (inputs + weights read once, output written once) and flops is
# 2 x the MACs of the fused op (no recomputation counted). These are H100 numbers on
# every card (an H200 has more bandwidth: its % of floor is against H100 ceilings).
# ---------------------------------------------------------------------------------------
CEILING_CARD = "NVIDIA H100 80GB HBM3"
DRAM_BYTES_PER_S = 2.98e12     # device copy, read + write
TENSOR_FLOPS_PER_S = 753e12    # fp16 dense GEMM (bf16 has the same tensor-core rate)

ALL_OPS = ("mhca", "mlp", "patch_embed", "conv_bn_relu", "e_mhsa")
DTYPE_NAMES = {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32"}
# Max |fused - eager| / max |eager| allowed before a row is marked FAIL.
TOLERANCE = {"fp16": 2e-2, "bf16": 5e-2, "fp32": 1e-4}
HEAD_DIM = 32
BN_EPS = 1e-5


def log(msg=""):
    print(msg, flush=True)


# ---------------------------------------------------------------------------------------
# Op table. Each spec: its shapes (full sweep and --smoke), a label, the bytes/flops of
# the fused op, and a builder that returns (eager module, eager args, fused callable,
# fused-output -> eager-layout converter). Builders live further down; they need torch.
# Shapes: hw = input height = width. "@" in labels is the input resolution.
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


def _mlp_shape(c1, c2, hid, cout, hw):
    return dict(c1=c1, c2=c2, hid=hid, cout=cout, hw=hw)


def _conv_shape(cin, cout, stride, hw):
    return dict(cin=cin, cout=cout, stride=stride, hw=hw)


OP_SPECS = {
    "mhca": dict(
        shapes=[dict(c=96, hw=56), dict(c=192, hw=28), dict(c=256, hw=28),
                dict(c=384, hw=14), dict(c=512, hw=14), dict(c=768, hw=7)],
        smoke=[dict(c=32, hw=7), dict(c=64, hw=5)],
        label=_label_mhca, cost=_cost_mhca,
        eager="grouped conv3x3 -> BN -> ReLU -> conv1x1 -> + x"),
    "mlp": dict(
        shapes=[_mlp_shape(96, 0, 288, 96, 56), _mlp_shape(192, 0, 576, 192, 28),
                _mlp_shape(384, 0, 1152, 384, 14), _mlp_shape(768, 0, 2304, 768, 7),
                _mlp_shape(192, 64, 512, 256, 28), _mlp_shape(384, 128, 1024, 512, 14)],
        smoke=[_mlp_shape(32, 0, 96, 32, 7), _mlp_shape(32, 16, 96, 48, 5)],
        label=_label_mlp, cost=_cost_mlp,
        eager="[cat ->] BN -> conv1x1+b -> ReLU -> conv1x1+b -> + u"),
    "patch_embed": dict(
        shapes=[_conv_shape(64, 96, 1, 56), _conv_shape(96, 192, 2, 56),
                _conv_shape(256, 384, 2, 28), _conv_shape(512, 768, 2, 14)],
        smoke=[_conv_shape(16, 32, 1, 7), _conv_shape(32, 48, 2, 7)],
        label=_label_pe, cost=_cost_patch_embed,
        eager="[AvgPool2d(2,2,ceil) ->] conv1x1 -> BN"),
    "conv_bn_relu": dict(
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
}


def floor_seconds(nbytes, flops):
    return max(nbytes / DRAM_BYTES_PER_S, flops / TENSOR_FLOPS_PER_S)


# ---------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------
def _csv(kind, allowed=None, conv=str):
    def parse(text):
        items = [t.strip() for t in text.split(",") if t.strip()]
        if not items:
            raise argparse.ArgumentTypeError(f"empty {kind} list")
        out = []
        for t in items:
            if allowed is not None and t not in allowed:
                raise argparse.ArgumentTypeError(f"unknown {kind} {t!r}; choose from {','.join(allowed)}")
            try:
                out.append(conv(t))
            except ValueError:
                raise argparse.ArgumentTypeError(f"bad {kind} {t!r}")
        return out
    return parse


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description="Per-op microbenchmark of the fused Next-ViT kernels vs eager and torch.compile.")
    p.add_argument("--ops", type=_csv("op", ALL_OPS), default=list(ALL_OPS),
                   help=f"comma list from {','.join(ALL_OPS)} (default: all)")
    p.add_argument("--batch", type=_csv("batch", conv=int), default=[64, 256],
                   help="comma list of batch sizes (default 64,256)")
    p.add_argument("--dtype", type=_csv("dtype", ("fp16", "bf16")), default=["fp16", "bf16"],
                   help="comma list from fp16,bf16 (default fp16,bf16)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--no-compile", dest="compile", action="store_false", default=None,
                   help="skip the torch.compile baseline")
    g.add_argument("--compile", dest="compile", action="store_true",
                   help="force the torch.compile baseline (on by default on a GPU, off with --smoke; "
                        "with --smoke it exercises the compile path on the CPU, which needs a C++ compiler)")
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results",
                   help="folder for the JSON / Markdown / PNG results (default bench/results)")
    p.add_argument("--smoke", action="store_true",
                   help="CPU, tiny shapes, batch 1, float32, TRITON_INTERPRET=1, 1-iteration timer, no compile")
    p.add_argument("--list", action="store_true",
                   help="print the rows (shapes, bytes, flops, floor) and exit; needs no GPU")
    p.add_argument("--warmup-ms", type=float, default=20.0,
                   help="do_bench warm-up time per measurement (default 20)")
    p.add_argument("--rep-ms", type=float, default=60.0,
                   help="do_bench measuring time per measurement (default 60)")
    p.add_argument("--compile-deadline-s", type=float, default=300.0,
                   help="rows that start more than this many seconds into the sweep skip torch.compile "
                        "(recorded as skipped), so slow compiles cannot eat a tight GPU budget; "
                        "0 = never skip (default 300)")
    p.add_argument("--stop-after-s", type=float, default=480.0,
                   help="start no new row after this many seconds of sweep; the rows not run are listed "
                        "and the reports are still written (default 480, well under a 600 s command limit; "
                        "0 = no limit)")
    p.add_argument("--replot", type=Path, metavar="JSON",
                   help="only redraw the PNG chart from a results JSON (no GPU, no torch needed; for when "
                        "the GPU machine had no matplotlib)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def plan_rows(args):
    """Sweep order: dtype, batch, op, shape (the most useful numbers come first if cut)."""
    rows = []
    dtypes = ["fp32"] if args.smoke else args.dtype
    batches = [1] if args.smoke else args.batch
    for dt in dtypes:
        for b in batches:
            for op in args.ops:
                spec = OP_SPECS[op]
                for s in (spec["smoke"] if args.smoke else spec["shapes"]):
                    rows.append(dict(op=op, shape=dict(s), label=spec["label"](s), batch=b, dtype=dt))
    return rows


def attach_costs(row):
    esize = {"fp16": 2, "bf16": 2, "fp32": 4}[row["dtype"]]
    nbytes, flops = OP_SPECS[row["op"]]["cost"](row["shape"], row["batch"], esize)
    row.update(bytes=nbytes, flops=flops, floor_ms=floor_seconds(nbytes, flops) * 1e3)
    return row


# ---------------------------------------------------------------------------------------
# Everything below needs torch (imported in main() after TRITON_INTERPRET is settled).
# ---------------------------------------------------------------------------------------
torch = nn = F = ops = _common = None


def _import_torch_stack(smoke):
    global torch, nn, F, ops, _common
    if smoke:
        # The interpreter must be chosen before triton is first imported.
        if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
            log("warning: triton was imported before TRITON_INTERPRET=1 could be set")
        os.environ["TRITON_INTERPRET"] = "1"
    import torch as _torch
    import torch._dynamo  # noqa: F401  (torch._dynamo.reset between compiles)
    import torch.nn as _nn
    import torch.nn.functional as _F
    torch, nn, F = _torch, _nn, _F
    if not smoke:
        if not torch.cuda.is_available():
            log("ops_bench: no CUDA GPU found. This benchmark needs an NVIDIA GPU (H100 reference).\n"
                "To check the script's logic on this machine, run the CPU smoke test:\n"
                "    python bench/ops_bench.py --smoke\n"
                "(tiny shapes, float32, Triton kernels under TRITON_INTERPRET=1; timings meaningless).")
            sys.exit(2)
        if os.environ.get("TRITON_INTERPRET", "0") == "1":
            log("ops_bench: TRITON_INTERPRET=1 is set; unset it to time the compiled kernels on the GPU.")
            sys.exit(2)
    sys.path.insert(0, str(REPO))
    try:
        from nextvit_kernels import ops as _ops
        from nextvit_kernels.ops import _common as _c
    except Exception as e:  # a half-edited op module breaks the package import
        log(f"ops_bench: cannot import nextvit_kernels.ops: {type(e).__name__}: {e}")
        sys.exit(3)
    ops, _common = _ops, _c


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


M = {}  # filled by _make_modules() in main()


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


def build_mhca(s, b, dev, dtype):
    m = M["MHCAEager"](s["c"])
    _randomize_bn(m)
    cw, cb, pw = _cast(m.folded(), dev, dtype)
    x = _act(b, s["c"], s["hw"], s["hw"], dev, dtype)
    return (_prepare(m, dev, dtype), (x,),
            lambda: ops.mhca(x, cw, cb, pw, residual=True, impl="triton"), _same)


def build_mlp(s, b, dev, dtype):
    m = M["MlpEager"](s["c1"] + s["c2"], s["hid"], s["cout"])
    _randomize_bn(m)
    w1, b1, w2, b2 = _cast(m.folded(), dev, dtype)
    x = _act(b, s["c1"], s["hw"], s["hw"], dev, dtype)
    x2 = _act(b, s["c2"], s["hw"], s["hw"], dev, dtype) if s["c2"] else None
    args = (x,) if x2 is None else (x, x2)
    return (_prepare(m, dev, dtype), args,
            lambda: ops.mlp(x, w1, b1, w2, b2, x2=x2, residual=True, impl="triton"), _same)


def _build_strided(eager_name, op):
    """PatchEmbed and the stem conv: same inputs (cin, cout, stride), different eager module and op."""
    def build(s, b, dev, dtype):
        m = M[eager_name](s["cin"], s["cout"], s["stride"])
        _randomize_bn(m)
        w, bias = _cast(m.folded(), dev, dtype)
        x = _act(b, s["cin"], s["hw"], s["hw"], dev, dtype)
        return (_prepare(m, dev, dtype), (x,),
                lambda: getattr(ops, op)(x, w, bias, stride=s["stride"], impl="triton"), _same)
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

    def fused():
        return ops.e_mhsa(x, qw, qb, kw, kb, vw, vb, pw, pb, sr_ratio=sr, head_dim=HEAD_DIM,
                          residual=True, impl="triton")

    def as_tokens(out):
        return out.permute(0, 2, 3, 1).reshape(b, hw * hw, out.shape[1])

    return _prepare(m, dev, dtype), (tokens,), fused, as_tokens


BUILDERS = dict(mhca=build_mhca, mlp=build_mlp, patch_embed=build_patch_embed,
                conv_bn_relu=build_conv_bn_relu, e_mhsa=build_e_mhsa)


# ----------------------------------------------------------------------------- timing
def make_timer(smoke, warmup_ms, rep_ms):
    if smoke:
        def timer(fn):  # one call, wall clock: proves the plumbing, means nothing
            t = time.perf_counter()
            fn()
            ms = (time.perf_counter() - t) * 1e3
            return dict(ms=ms, p20=ms, p80=ms)
        return timer

    import triton.testing

    def timer(fn):
        # Median over runs of at least rep_ms, L2 flushed before each run, after warm-up.
        q = triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, quantiles=[0.5, 0.2, 0.8])
        q = list(q) if isinstance(q, (list, tuple)) else [q, q, q]
        return dict(ms=float(q[0]), p20=float(q[1]), p80=float(q[2]))
    return timer


def _sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize()


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


def run_row(row, dev, timer, use_compile):
    """Builds one case, checks, times fused / eager / compiled. Never raises."""
    dtype = getattr(torch, DTYPE_NAMES[row["dtype"]])
    row.update(status="FAIL", rel_err=None, tol=TOLERANCE[row["dtype"]], error=None,
               fused=None, eager=None, compiled=None, compile_s=None, compile_error=None,
               compile_rel_err=None, fused_first_call_s=None)
    torch.manual_seed(row.pop("seed", 0))
    try:
        eager, args, fused, as_ref = BUILDERS[row["op"]](row["shape"], row["batch"], dev, dtype)
    except Exception as e:
        row["error"] = "build: " + _err(e)
        return row

    def eager_fn():
        return eager(*args)

    ref = None
    try:
        ref = eager_fn()
        _sync(dev)
    except Exception as e:
        row["error"] = "eager: " + _err(e)

    # Correctness guard: outputs start as NaN so unwritten elements fail the check.
    fused_ok = False
    try:
        _common.POISON_OUTPUTS = True
        t = time.perf_counter()
        out = fused()
        _sync(dev)
        row["fused_first_call_s"] = round(time.perf_counter() - t, 3)
        _common.POISON_OUTPUTS = False
        fused_ok = True
        if ref is not None:
            err = rel_error(as_ref(out), ref)
            row["rel_err"] = err
            if err <= row["tol"]:
                row["status"] = "ok"
            elif math.isinf(err):
                row["error"] = "check: fused output has NaN/inf elements (unwritten or overflow)"
            else:
                row["error"] = f"check: max|fused-eager|/max|eager| = {err:.3g} > tol {row['tol']:g}"
        del out
    except Exception as e:
        row["error"] = "fused: " + _err(e)
    finally:
        _common.POISON_OUTPUTS = False

    for key, fn in (("fused", fused if fused_ok else None), ("eager", eager_fn if ref is not None else None)):
        if fn is None:
            continue
        try:
            row[key] = timer(fn)
        except Exception as e:
            row["error"] = (row["error"] + "; " if row["error"] else "") + f"timing {key}: " + _err(e)

    if use_compile is True and ref is not None:
        try:
            torch._dynamo.reset()  # fresh, static-shape compile for this shape
            compiled = torch.compile(eager, dynamic=False)
            t = time.perf_counter()
            cout = compiled(*args)
            _sync(dev)
            row["compile_s"] = round(time.perf_counter() - t, 2)
            row["compile_rel_err"] = rel_error(cout, ref)
            del cout
            for _ in range(2):
                compiled(*args)
            row["compiled"] = timer(lambda: compiled(*args))
        except Exception as e:
            row["compile_error"] = _err(e)
        finally:
            compiled = None
            try:
                torch._dynamo.reset()
            except Exception:
                pass
    elif isinstance(use_compile, str):
        row["compile_error"] = use_compile  # why it was skipped
    return row  # the case's tensors and modules die with this frame


def derive(row):
    """Achieved rates, % of floor and speed-ups from the medians."""
    f = row.get("fused")
    fm = f["ms"] if f else None
    row["fused_ms"] = fm
    row["eager_ms"] = row["eager"]["ms"] if row.get("eager") else None
    row["compile_ms"] = row["compiled"]["ms"] if row.get("compiled") else None
    if fm:
        row["tbps"] = row["bytes"] / (fm * 1e-3) / 1e12
        row["tflops"] = row["flops"] / (fm * 1e-3) / 1e12
        row["pct_floor"] = 100.0 * row["floor_ms"] / fm
    else:
        row["tbps"] = row["tflops"] = row["pct_floor"] = None
    row["eager_pct_floor"] = 100.0 * row["floor_ms"] / row["eager_ms"] if row["eager_ms"] else None
    row["speedup_eager"] = row["eager_ms"] / fm if fm and row["eager_ms"] else None
    row["speedup_compile"] = row["compile_ms"] / fm if fm and row["compile_ms"] else None
    return row


# ----------------------------------------------------------------------------- environment
def environment(smoke, dev):
    import triton
    env = dict(
        date=datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        python=platform.python_version(), torch=torch.__version__, triton=triton.__version__,
        host_cpu=platform.processor() or platform.machine(), smoke=smoke,
    )
    try:
        import timm
        env["timm"] = timm.__version__
    except Exception:
        env["timm"] = None
    try:
        rev = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        env["commit"] = (rev + ("-dirty" if dirty else "")) or None
    except Exception:
        env["commit"] = None
    if smoke:
        env.update(card="CPU (smoke: TRITON_INTERPRET=1, float32)", card_slug="cpu-smoke",
                   driver=None, cuda=None, cudnn=None)
    else:
        props = torch.cuda.get_device_properties(dev)
        env.update(card=props.name, card_slug=re.sub(r"[^a-z0-9]+", "-", props.name.lower()).strip("-"),
                   sm_count=props.multi_processor_count, capability=f"{props.major}.{props.minor}",
                   memory_gib=round(props.total_memory / 2**30, 1),
                   cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version(),
                   cudnn_benchmark=torch.backends.cudnn.benchmark, driver=None)
        try:  # CUDA driver API version (e.g. 13000), known to torch even without nvidia-smi
            env["cuda_driver_api"] = int(torch._C._cuda_getDriverVersion())
        except Exception:
            env["cuda_driver_api"] = None
        try:
            r = subprocess.run(["nvidia-smi", "--query-gpu=driver_version,clocks.max.sm,clocks.max.mem",
                                "--format=csv,noheader"], capture_output=True, text=True, timeout=20)
            first = r.stdout.strip().splitlines()[0] if r.stdout.strip() else ""
            parts = [p.strip() for p in first.split(",")]
            if parts and parts[0]:
                env["driver"] = parts[0]
                env["max_clocks_sm_mem"] = ", ".join(parts[1:]) or None
        except Exception as e:
            env["driver"] = f"unknown (nvidia-smi: {type(e).__name__})"
    card = env["card"]
    if smoke:
        env["ceiling_note"] = "smoke run: CPU interpreter timings, floors and speed-ups are meaningless"
    elif "H100" in card:
        env["ceiling_note"] = f"ceilings measured on {CEILING_CARD} (DESIGN.md §4)"
    elif "H200" in card:
        env["ceiling_note"] = (f"H200 detected: the ceilings are the H100's ({CEILING_CARD}); the H200's "
                               "HBM3e is faster, so % of floor here is against H100 ceilings")
    else:
        env["ceiling_note"] = f"{card} is not an H100: the ceilings are the H100's ({CEILING_CARD})"
    return env


# ----------------------------------------------------------------------------- reports
COLUMNS = [  # (header, key, format)
    ("op", "op", "{}"), ("shape", "label", "{}"), ("B", "batch", "{}"), ("dtype", "dtype", "{}"),
    ("check", "status", "{}"), ("fused ms", "fused_ms", "{:.4f}"), ("TB/s", "tbps", "{:.2f}"),
    ("TFLOP/s", "tflops", "{:.1f}"), ("% floor", "pct_floor", "{:.0f}"),
    ("eager ms", "eager_ms", "{:.4f}"), ("compile ms", "compile_ms", "{:.4f}"),
    ("x eager", "speedup_eager", "{:.2f}"), ("x compile", "speedup_compile", "{:.2f}"),
]


def _cells(row):
    out = []
    for _, key, fmt in COLUMNS:
        v = row.get(key)
        out.append("-" if v is None else fmt.format(v))
    return out


def text_table(rows):
    heads = [h for h, _, _ in COLUMNS]
    body = [_cells(r) for r in rows]
    widths = [max(len(x) for x in col) for col in zip(heads, *body)] if body else [len(h) for h in heads]
    line = lambda cells: "  ".join(c.rjust(w) if i >= 4 else c.ljust(w)
                                   for i, (c, w) in enumerate(zip(cells, widths)))
    return "\n".join([line(heads), line(["-" * w for w in widths])] + [line(c) for c in body])


def markdown(meta, rows):
    env = meta["env"]
    lines = [f"# Fused op microbenchmark: {env['card']}", ""]
    facts = [("card", env["card"]), ("driver", env.get("driver")),
             ("CUDA driver API", env.get("cuda_driver_api")), ("CUDA", env.get("cuda")),
             ("cuDNN", env.get("cudnn")), ("torch", env["torch"]), ("triton", env["triton"]),
             ("timm", env.get("timm")), ("commit", env.get("commit")), ("date", env["date"])]
    lines.append("- " + ", ".join(f"{k} {v}" for k, v in facts if v is not None))
    lines.append(f"- ceilings: {DRAM_BYTES_PER_S / 1e12:.2f} TB/s DRAM, {TENSOR_FLOPS_PER_S / 1e12:.0f} "
                 f"TFLOP/s tensor cores; {env['ceiling_note']}")
    lines.append("- floor = max(bytes / DRAM, flops / tensor); bytes = inputs + weights read once + "
                 "output written once; flops = 2 x MACs of the fused op; % floor = floor / median")
    lines.append(f"- timing: {meta['timer']}; channels_last; batch {meta['args']['batch']}, "
                 f"dtype {meta['args']['dtype']}")
    lines.append("- eager = the unfused op sequence (BN modules in eval mode, cuDNN convs, "
                 f"cudnn.benchmark {env.get('cudnn_benchmark')}); compile = torch.compile(eager module), "
                 "default mode, static shapes, one compile per row; "
                 "x eager / x compile = baseline median / fused median")
    lines.append(f"- e_mhsa eager: {meta.get('e_mhsa_eager') or 'not run'}")
    lines.append(f"- check: max|fused - eager| / max|eager| <= {TOLERANCE} per dtype, "
                 "fused outputs poisoned with NaN first")
    lines.append(f"- sweep wall time: {meta.get('wall_s', 0):.0f} s" + (" (incomplete)" if not meta.get("done") else "")
                 + (f"; stopped early: {meta['stopped']}" if meta.get("stopped") else ""))
    lines.append("")
    lines.append("| " + " | ".join(h for h, _, _ in COLUMNS) + " |")
    lines.append("|" + "|".join("---" if i < 5 else "---:" for i in range(len(COLUMNS))) + "|")
    for r in rows:
        lines.append("| " + " | ".join(_cells(r)) + " |")
    notes = [r for r in rows if r.get("error") or r.get("compile_error")]
    if notes:
        lines += ["", "## Errors and skips", ""]
        for r in notes:
            msg = "; ".join(x for x in (r.get("error"), r.get("compile_error") and
                                         "compile: " + r["compile_error"]) if x)
            lines.append(f"- {r['op']} {r['label']} B{r['batch']} {r['dtype']}: {msg}")
    if meta.get("not_run"):
        lines += ["", f"## Not run ({meta.get('stopped')})", ""] + [f"- {x}" for x in meta["not_run"]]
    lines.append("")
    return "\n".join(lines)


def _json_safe(v):
    """Strict JSON: non-finite floats become strings ("inf"), tuples lists."""
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    if isinstance(v, dict):
        return {str(k): _json_safe(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_json_safe(x) for x in v]
    return v


def write_results(base, meta, rows):
    text = json.dumps(_json_safe(dict(meta=meta, rows=rows)), indent=1, default=str, allow_nan=False)
    base.with_suffix(".json").write_text(text)
    base.with_suffix(".md").write_text(markdown(meta, rows))


def plot(base, rows, env):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except Exception as e:
        log(f"plot skipped: matplotlib is not available ({type(e).__name__}); later, where it is: "
            "python bench/ops_bench.py --replot <results .json>")
        return None
    groups = []
    for r in rows:
        key = (r["dtype"], r["batch"])
        if key not in groups:
            groups.append(key)
    if not groups:
        return None
    n = max(sum(1 for r in rows if (r["dtype"], r["batch"]) == g) for g in groups)
    fig, axes = plt.subplots(len(groups), 1, figsize=(max(8.0, 0.55 * n + 2), 3.6 * len(groups)),
                             squeeze=False)
    nan = float("nan")
    for ax, (dt, b) in zip(axes[:, 0], groups):
        sel = [r for r in rows if (r["dtype"], r["batch"]) == (dt, b)]
        xs = list(range(len(sel)))
        se = [r["speedup_eager"] or nan for r in sel]
        sc = [r["speedup_compile"] or nan for r in sel]
        bars = [ax.bar([x - 0.2 for x in xs], se, 0.4, label="vs eager"),
                ax.bar([x + 0.2 for x in xs], sc, 0.4, label="vs torch.compile")]
        ax.axhline(1.0, color="k", lw=0.8)
        valid = [v for v in se + sc if v == v and v > 0]
        if valid:
            ax.set_yscale("log")
            ax.set_ylim(min(min(valid), 1.0) / 1.5, max(max(valid), 1.0) * 1.8)
            ax.yaxis.set_major_locator(matplotlib.ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
            ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
            ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        for b_ in bars:
            try:
                ax.bar_label(b_, fmt="%.2f", fontsize=6)
            except Exception:
                pass
        ax.set_xticks(xs)
        ax.set_xticklabels([f"{r['op']}\n{r['label']}" + ("\nFAIL" if r["status"] != "ok" else "")
                            for r in sel], fontsize=7, rotation=60, ha="right")
        ax.set_ylabel("speed-up (x)")
        ax.set_title(f"{env['card']} - {dt}, batch {b}", fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    path = base.with_suffix(".png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _fmt_progress(r):
    parts = [f"{r['status']}" + (f" (err {r['rel_err']:.2e})" if r.get("rel_err") is not None else "")]
    for key, name in (("fused_ms", "fused"), ("eager_ms", "eager"), ("compile_ms", "compile")):
        if r.get(key) is not None:
            parts.append(f"{name} {r[key]:.4f} ms")
    if r.get("pct_floor") is not None:
        parts.append(f"{r['pct_floor']:.0f}% floor")
    if r.get("speedup_eager"):
        parts.append(f"x{r['speedup_eager']:.2f} eager")
    if r.get("speedup_compile"):
        parts.append(f"x{r['speedup_compile']:.2f} compile")
    if r.get("fused_first_call_s") is not None:
        parts.append(f"first fused call {r['fused_first_call_s']:.1f} s")
    if r.get("compile_s") is not None:
        parts.append(f"compiled in {r['compile_s']:.1f} s")
    if r.get("error"):
        parts.append(f"[{r['error']}]")
    if r.get("compile_error"):
        parts.append(f"[compile: {r['compile_error']}]")
    return ", ".join(parts)


# ----------------------------------------------------------------------------- main
def main(argv=None):
    args = parse_args(argv)
    if args.replot:
        data = json.loads(args.replot.read_text())
        png = plot(args.replot.with_suffix(""), data["rows"], data["meta"]["env"])
        if png:
            log(f"wrote {png}")
        return 0 if png else 1
    rows = [attach_costs(r) for r in plan_rows(args)]
    if args.list:
        for i, r in enumerate(rows, 1):
            log(f"{i:3d} {r['op']:13s} {r['label']:24s} B{r['batch']:<4d} {r['dtype']}  "
                f"{r['bytes'] / 1e6:9.2f} MB  {r['flops'] / 1e9:9.2f} GFLOP  floor {r['floor_ms'] * 1e3:9.2f} us")
        log(f"{len(rows)} rows")
        return 0

    _import_torch_stack(args.smoke)
    M.update(_make_modules())
    dev = torch.device("cpu") if args.smoke else torch.device("cuda", torch.cuda.current_device())
    use_compile = (not args.smoke) if args.compile is None else args.compile
    if not args.smoke:
        torch.backends.cudnn.benchmark = True  # the strongest eager baseline
    env = environment(args.smoke, dev)
    timer = make_timer(args.smoke, args.warmup_ms, args.rep_ms)
    timer_desc = ("1 call, wall clock (smoke)" if args.smoke else
                  f"triton.testing.do_bench median (L2 flushed each run), warmup {args.warmup_ms:g} ms, "
                  f"rep {args.rep_ms:g} ms")
    if args.smoke:
        log("smoke mode: CPU, batch 1, float32, tiny shapes, TRITON_INTERPRET=1, 1-iteration timer"
            + (", torch.compile forced on" if use_compile else ", no torch.compile")
            + " (--batch / --dtype are ignored)")

    args.out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M")
    base = args.out / f"ops-{env['card_slug']}-{stamp}"
    k = 2
    while base.with_suffix(".json").exists():
        base = args.out / f"ops-{env['card_slug']}-{stamp}-{k}"
        k += 1
    meta = dict(env=env, timer=timer_desc, done=False, wall_s=0.0,
                ceilings=dict(card=CEILING_CARD, dram_bytes_per_s=DRAM_BYTES_PER_S,
                              tensor_flops_per_s=TENSOR_FLOPS_PER_S),
                tolerance=TOLERANCE, eager_sequences={op: OP_SPECS[op]["eager"] for op in args.ops},
                args=dict(ops=args.ops, batch=[1] if args.smoke else args.batch,
                          dtype=["fp32"] if args.smoke else args.dtype, compile=use_compile,
                          compile_deadline_s=args.compile_deadline_s, smoke=args.smoke))
    log(f"card: {env['card']} | driver {env.get('driver')} (CUDA driver API {env.get('cuda_driver_api')})"
        f" | torch {env['torch']} | triton {env['triton']} | CUDA {env.get('cuda')} | cuDNN {env.get('cudnn')}"
        f" | timm {env.get('timm')} | commit {env.get('commit')}")
    log(f"note: {env['ceiling_note']}")
    log(f"{len(rows)} rows; results -> {base}.{{json,md,png}}")

    done = []
    t0 = time.perf_counter()
    with torch.no_grad():
        for i, row in enumerate(rows, 1):
            elapsed = time.perf_counter() - t0
            if args.stop_after_s and elapsed > args.stop_after_s:
                meta["not_run"] = [f"{r['op']} {r['label']} B{r['batch']} {r['dtype']}" for r in rows[i - 1:]]
                meta["stopped"] = f"--stop-after-s {args.stop_after_s:g} reached after {elapsed:.0f} s"
                log(f"stopping: {meta['stopped']}; {len(meta['not_run'])} rows not run")
                break
            row_compile = use_compile
            if use_compile and args.compile_deadline_s and elapsed > args.compile_deadline_s:
                row_compile = f"skipped: sweep past --compile-deadline-s {args.compile_deadline_s:g}"
            row["seed"] = args.seed + i
            tag = f"[{i}/{len(rows)} {elapsed:6.1f}s] {row['op']} {row['label']} B{row['batch']} {row['dtype']}"
            log(f"{tag} ...")
            derive(run_row(row, dev, timer, row_compile))
            log(f"{tag}: {_fmt_progress(row)}")
            done.append(row)
            meta["wall_s"] = time.perf_counter() - t0
            meta["e_mhsa_eager"] = M.get("e_mhsa_source")
            write_results(base, meta, done)  # after every row: a killed run keeps its rows
            errors = (row.get("error") or "") + " " + (row.get("compile_error") or "")
            broken = [m for m in CUDA_FATAL if m in errors]
            if broken and dev.type == "cuda":
                # A sticky CUDA error poisons the context: every later row would fail too.
                meta["not_run"] = [f"{r['op']} {r['label']} B{r['batch']} {r['dtype']}" for r in rows[i:]]
                meta["stopped"] = f"CUDA context broken ({broken[0]}) at {tag}"
                log(f"stopping: {meta['stopped']}")
                break
            if dev.type == "cuda":
                try:
                    torch.cuda.empty_cache()
                except Exception as e:
                    log(f"torch.cuda.empty_cache failed: {_err(e)}")
    meta.update(done=True, wall_s=time.perf_counter() - t0)
    write_results(base, meta, done)

    log("")
    log(text_table(done))
    log("")
    png = plot(base, done, env)
    fails = [r for r in done if r["status"] != "ok"]
    log(f"wrote {base}.json, {base}.md" + (f", {png}" if png else ""))
    log(f"{len(done)} rows in {meta['wall_s']:.0f} s; {len(done) - len(fails)} ok, {len(fails)} FAIL"
        + (f"; {len(meta['not_run'])} not run ({meta['stopped']})" if meta.get("not_run") else ""))
    for r in fails:
        log(f"  FAIL {r['op']} {r['label']} B{r['batch']} {r['dtype']}: {r['error']}")
    return 1 if fails or meta.get("not_run") else 0


if __name__ == "__main__":
    sys.exit(main())
