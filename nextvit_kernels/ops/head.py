"""Classifier head: global average pool + Linear (the final BatchNorm folded into
the Linear beforehand: it is a per-channel affine map, and so is the mean).

    y[b, n] = sum_c w[n, c] * mean_{h,w} x[b, c, h, w] + bias[n]

One kernel: a program owns one image and BLOCK_N classes; it pools BLOCK_K
channels at a time (the [H*W, BLOCK_K] slab of an NHWC image is contiguous rows)
and multiplies them into the class accumulator. Pooling is recomputed per class
block; the 7x7x1024 map of one image is ~100 KB and stays in L2.
"""
import torch
import triton
import triton.language as tl

from . import _common
from ._registry import register

OP = "head"


# --------------------------------------------------------------------------- reference
def reference(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.linear(x.mean(dim=(2, 3)), w, b)


# --------------------------------------------------------------------------- kernel
@triton.jit
def _head_kernel(
    x_ptr, w_ptr, b_ptr, out_ptr,
    HW, C, N,
    sxb, sxc, sxhw,                # x strides: image, channel, pixel (NHWC: pixel rows)
    swn, swc, sob, son,
    BLOCK_HW: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_b = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    offs_p = tl.arange(0, BLOCK_HW)
    img = x_ptr + pid_b.to(tl.int64) * sxb
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for k0 in range(0, C, BLOCK_K):
        kk = k0 + offs_k
        mask_k = kk < C
        pooled = tl.zeros((BLOCK_K,), dtype=tl.float32)
        for p0 in range(0, HW, BLOCK_HW):
            pp = p0 + offs_p
            tile = tl.load(img + (pp * sxhw)[:, None] + (kk * sxc)[None, :],
                           mask=(pp < HW)[:, None] & mask_k[None, :], other=0.0)
            pooled += tl.sum(tile.to(tl.float32), axis=0)
        pooled = pooled / HW
        wt = tl.load(w_ptr + (offs_n * swn)[:, None] + (kk * swc)[None, :],
                     mask=mask_n[:, None] & mask_k[None, :], other=0.0)
        acc += tl.sum(wt.to(tl.float32) * pooled[None, :], axis=1)
    acc += tl.load(b_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    tl.store(out_ptr + pid_b.to(tl.int64) * sob + offs_n * son, acc.to(out_ptr.dtype.element_ty), mask=mask_n)


def _config(hw: int, c: int, n: int) -> dict:
    """Fixed launch configuration from the shapes (pure Python, enumerable by the AOT tool)."""
    return dict(BLOCK_HW=min(64, max(16, triton.next_power_of_2(hw))), BLOCK_K=64,
                BLOCK_N=min(128, max(16, triton.next_power_of_2(n))), num_warps=4, num_stages=1)


# --------------------------------------------------------------------------- launcher
def _fake(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.empty((x.shape[0], w.shape[0]), device=x.device, dtype=x.dtype)


def bind(x_shape, w: torch.Tensor, b: torch.Tensor):
    """Everything that depends only on the shapes, done once: returns ``(run, out_shape)``
    with ``run(x, x2=None) -> out`` for a channels_last x of ``x_shape`` (x2 unused)."""
    bsz, c, h, wd = x_shape
    w, b = w.reshape(w.shape[0], -1).contiguous(), b.contiguous()
    n = w.shape[0]
    cfg = _config(h * wd, c, n)
    kernel = _head_kernel[(bsz, triton.cdiv(n, cfg["BLOCK_N"]))]
    x_strides = _common.channels_last_strides(bsz, c, h, wd)
    # channels_last: the pixel stride is stride(3) == C
    shapes = (h * wd, c, n, x_strides[0], x_strides[1], x_strides[3], w.stride(0), w.stride(1), n, 1)

    def run(x: torch.Tensor, x2=None) -> torch.Tensor:
        out = torch.empty((bsz, n), device=x.device, dtype=x.dtype)
        if _common.POISON_OUTPUTS:
            out.fill_(float("nan"))
        kernel(x, w, b, out, *shapes, **cfg)
        return out

    return run, (bsz, n)


@register(OP, fake=_fake)
def _head_op(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    x = _common.to_channels_last(x)
    run, _ = bind(x.shape, w, b)
    with _common.on_device(x):
        return run(x)


# --------------------------------------------------------------------------- public
def head(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, *, impl: str = "auto") -> torch.Tensor:
    """Global average pool + Linear. x: [B, C, H, W] (any memory format), w [N, C], b [N].
    Returns [B, N]."""
    _common.check_activation(OP, "x", x)
    c = x.shape[1]
    w = _common.as_matrix(OP, "w", w, x, in_features=c)
    b = _common.check_param(OP, "b", b, x, (w.shape[0],))
    x = _common.to_channels_last(x)
    if _common.resolve_impl(OP, impl, x) == "reference":
        return reference(x, w, b)
    return _head_op(x, w, b)
