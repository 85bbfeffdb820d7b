"""Fused Next-ViT PatchEmbed: [2x2 ceil-mode average pool] + 1x1 conv + bias (docs/design.md §1, §4).

stride 2: ``AvgPool2d(2, 2, ceil_mode=True, count_include_pad=False)`` is folded into the
GEMM's A-tile load (each output pixel averages its 1, 2 or 4 in-bounds input pixels), then
the 1x1 conv with the folded BatchNorm as weight and bias. stride 1: 1x1 conv + bias.
"""
import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor

from . import _common
from ._registry import register

_OP = "patch_embed"
STRIDES = (1, 2)


# ----------------------------------------------------------------------------------------
# Reference
# ----------------------------------------------------------------------------------------
def reference(x: Tensor, w: Tensor, b: Tensor, stride: int) -> Tensor:
    """Plain PyTorch in the inputs' dtype; w [O, I] or [O, I, 1, 1]. Returns channels_last."""
    if stride == 2:
        x = F.avg_pool2d(x, 2, 2, ceil_mode=True, count_include_pad=False)
    y = F.conv2d(x, w.reshape(w.shape[0], -1)[:, :, None, None], b)
    return y.contiguous(memory_format=torch.channels_last)


# ----------------------------------------------------------------------------------------
# Kernel
# ----------------------------------------------------------------------------------------
@triton.jit
def _patch_embed_kernel(
    x_ptr, w_ptr, b_ptr, out_ptr,
    M, H, W, OH, OW, CIN, COUT,
    STRIDE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """One program: BLOCK_M output pixels x BLOCK_N output channels, K loop over CIN.

    x [B, H, W, CIN] and out [B, OH, OW, COUT] in NHWC, weight [COUT, CIN] row-major.
    With STRIDE 2, A[m, k] is the mean of x over the in-bounds pixels of the 2x2 window
    at (2*oh, 2*ow), computed in fp32 and rounded to the input dtype (what eager pooling
    stores) before the dot.
    """
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_mask = offs_m < M
    n_mask = offs_n < COUT

    if STRIDE == 2:
        ow = offs_m % OW
        t = offs_m // OW
        oh = t % OH
        bi = t // OH
        ih = 2 * oh
        iw = 2 * ow
        has_h = (ih + 1) < H  # the window's second row is inside the image
        has_w = (iw + 1) < W
        p00 = ((bi.to(tl.int64) * H + ih) * W + iw) * CIN
        p01 = p00 + CIN
        p10 = p00 + W * CIN
        p11 = p10 + CIN
        count = (1 + has_h.to(tl.int32)) * (1 + has_w.to(tl.int32))
        count = count.to(tl.float32)
        m_h = m_mask & has_h
        m_w = m_mask & has_w
        m_hw = m_h & has_w
    else:
        p00 = offs_m.to(tl.int64) * CIN

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, CIN, BLOCK_K):
        ks = k0 + offs_k
        k_mask = ks < CIN
        a = tl.load(x_ptr + p00[:, None] + ks[None, :], mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        if STRIDE == 2:
            a = a.to(tl.float32)
            a += tl.load(x_ptr + p01[:, None] + ks[None, :], mask=m_w[:, None] & k_mask[None, :],
                         other=0.0).to(tl.float32)
            a += tl.load(x_ptr + p10[:, None] + ks[None, :], mask=m_h[:, None] & k_mask[None, :],
                         other=0.0).to(tl.float32)
            a += tl.load(x_ptr + p11[:, None] + ks[None, :], mask=m_hw[:, None] & k_mask[None, :],
                         other=0.0).to(tl.float32)
            a = (a / count[:, None]).to(x_ptr.dtype.element_ty)
        w = tl.load(w_ptr + offs_n[None, :] * CIN + ks[:, None],
                    mask=k_mask[:, None] & n_mask[None, :], other=0.0)
        acc = tl.dot(a, w, acc, input_precision=DOT_PRECISION)

    acc += tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + offs_m.to(tl.int64)[:, None] * COUT + offs_n[None, :],
             acc.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


def _config(c_in: int, c_out: int, stride: int, dtype: torch.dtype) -> dict:
    """Compile-time parameters from the shapes (pure Python, enumerable by an AOT tool).

    Untuned (no GPU this session). Output channels up to 128 in one tile, so every input
    tile (4 gathered pixels at stride 2) is re-read at most ceil(COUT / 128) times.
    """
    fp32 = dtype == torch.float32
    block_n = max(16, min(triton.next_power_of_2(c_out), 64 if fp32 else 128))
    block_m = 64 if fp32 else 128
    block_k = 64 if c_in % 64 == 0 and not fp32 else 32
    num_warps = 8 if block_m * block_n >= 128 * 128 else 4
    return dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
                DOT_PRECISION="ieee" if fp32 else "tf32", num_warps=num_warps,
                num_stages=2 if stride == 2 else 3)


# ----------------------------------------------------------------------------------------
# Launcher (torch.ops.nextvit.patch_embed)
# ----------------------------------------------------------------------------------------
def _patch_embed_fake(x: Tensor, w: Tensor, b: Tensor, stride: int) -> Tensor:
    bsz, _, h, wd = x.shape
    return _common.fake_output(x, bsz, w.shape[0], _common.pooled_size(h, stride), _common.pooled_size(wd, stride))


def bind(x_shape, w: Tensor, b: Tensor, *, stride: int):
    """Everything that depends only on the shapes, done once: returns ``(run, out_shape)``
    with ``run(x, x2=None) -> out`` for a channels_last x of ``x_shape`` (x2 unused)."""
    bsz, c_in, h, wd = x_shape
    w, b = w.reshape(w.shape[0], -1).contiguous(), b.contiguous()
    c_out = w.shape[0]
    oh, ow = _common.pooled_size(h, stride), _common.pooled_size(wd, stride)
    m = bsz * oh * ow
    cfg = _config(c_in, c_out, stride, w.dtype)
    kernel = _patch_embed_kernel[(triton.cdiv(m, cfg["BLOCK_M"]), triton.cdiv(c_out, cfg["BLOCK_N"]))]
    kw = dict(STRIDE=stride, **cfg)

    def run(x: Tensor, x2=None) -> Tensor:
        out = _common.new_output(x, bsz, c_out, oh, ow)
        kernel(x, w, b, out, m, h, wd, oh, ow, c_in, c_out, **kw)
        return out

    return run, (bsz, c_out, oh, ow)


@register(_OP, fake=_patch_embed_fake)
def _patch_embed_triton(x: Tensor, w: Tensor, b: Tensor, stride: int) -> Tensor:
    """x [B, CIN, H, W], w [COUT, CIN], b [COUT], stride 1 or 2."""
    x = _common.to_channels_last(x)
    run, _ = bind(x.shape, w, b, stride=stride)
    with _common.on_device(x):
        return run(x)


# ----------------------------------------------------------------------------------------
# Public function
# ----------------------------------------------------------------------------------------
def patch_embed(x: Tensor, w: Tensor, b: Tensor, *, stride: int, impl: str = "auto") -> Tensor:
    """stride 2: ceil-mode 2x2 average pool (padding not counted), then 1x1 conv + bias;
    stride 1: 1x1 conv + bias. x [B, CIN, H, W] (any memory format), w [COUT, CIN] or
    [COUT, CIN, 1, 1], b [COUT]. Returns [B, COUT, ceil(H/stride), ceil(W/stride)],
    channels_last."""
    if isinstance(stride, bool) or stride not in STRIDES:
        raise ValueError(f"{_OP}: stride must be 1 or 2, got {stride!r}")
    _common.check_activation(_OP, "x", x)
    w = _common.as_matrix(_OP, "w", w, x, None, x.shape[1])
    b = _common.check_param(_OP, "b", b, x, (w.shape[0],))
    x = _common.to_channels_last(x)
    if _common.resolve_impl(_OP, impl, x) == "reference":
        return reference(x, w, b, stride)
    return _patch_embed_triton(x, w, b, int(stride))
