"""ConvBNReLU of the Next-ViT stem (docs/design.md §1, §4): dense 3x3 conv, padding 1,
stride 1 or 2, + bias, ReLU, with BatchNorm already folded into ``w`` / ``b``.

One Triton implicit-GEMM kernel: a program owns BLOCK_M output pixels (NHWC
rows) x BLOCK_N output channels and reduces over K = 9 taps x C_in.
Two K orders, picked by the shapes:
- taps: a runtime loop over (tap, C_in chunk of BLOCK_K) with one contiguous
  [BLOCK_M, BLOCK_K] channel slice of a shifted neighbour per step (C_in >= 8);
- flat: for tiny C_in (the stem's 3 input channels) the whole K = 9·C_in is
  one gathered [BLOCK_M, BLOCK_K] tile (k -> tap = k // C_in, channel = k % C_in),
  so 27 useful K values fill one 32-wide dot instead of nine 16-wide dots that
  would be 13/16 padding.
"""
import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from . import _common
from ._registry import register

OP = "conv_bn_relu"
STRIDES = (1, 2)
FLAT_K_MAX = 64  # use the flat K order when 9 * C_in <= this


def out_size(n: int, stride: int) -> int:
    """3x3 conv, padding 1: floor((n + 2 - 3) / stride) + 1."""
    return (n - 1) // stride + 1


# --------------------------------------------------------------------------- reference
def reference(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, stride: int) -> torch.Tensor:
    """Plain PyTorch in the input dtype's math (float64 in, float64 out)."""
    return _common.to_channels_last(F.relu(F.conv2d(x, w, b, stride=stride, padding=1)))


# --------------------------------------------------------------------------- kernel
@triton.jit
def _conv_bn_relu_kernel(
    x_ptr, w_ptr, b_ptr, out_ptr,
    M, H, W, HO, WO, C_IN, C_OUT,
    sxb, sxc, sxh, sxw,            # x strides for logical [B, C_IN, H, W]
    sw0, sw1, sw2, sw3,            # w [C_OUT, C_IN, 3, 3] strides
    sbias,
    sob, soc, soh, sow,            # out strides for logical [B, C_OUT, HO, WO]
    STRIDE: tl.constexpr,
    FLAT_K: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    pid = tl.program_id(0)
    num_n = tl.cdiv(C_OUT, BLOCK_N)
    pid_m = pid // num_n
    pid_n = pid % num_n

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < M
    wo = offs_m % WO
    t = offs_m // WO
    ho = t % HO
    b_i = t // HO
    img = b_i.to(tl.int64) * sxb
    h0 = ho * STRIDE - 1
    w0 = wo * STRIDE - 1

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < C_OUT
    offs_k = tl.arange(0, BLOCK_K)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if FLAT_K:
        # k = tap * C_IN + ci over all 9 * C_IN <= BLOCK_K values at once.
        k_total = 9 * C_IN
        mask_k = offs_k < k_total
        tap = offs_k // C_IN
        ci = offs_k % C_IN
        kh = tap // 3
        kw = tap % 3
        hh = h0[:, None] + kh[None, :]
        ww = w0[:, None] + kw[None, :]
        valid = (mask_m[:, None] & mask_k[None, :]
                 & (hh >= 0) & (hh < H) & (ww >= 0) & (ww < W))
        a_ptrs = x_ptr + img[:, None] + hh * sxh + ww * sxw + (ci * sxc)[None, :]
        a = tl.load(a_ptrs, mask=valid, other=0.0)
        wb_ptrs = w_ptr + (offs_n * sw0)[None, :] + (ci * sw1 + kh * sw2 + kw * sw3)[:, None]
        wb = tl.load(wb_ptrs, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        acc = tl.dot(a, wb, acc, input_precision=DOT_PRECISION)
    else:
        k_chunks = tl.cdiv(C_IN, BLOCK_K)
        for it in range(0, 9 * k_chunks):
            tap = it // k_chunks
            k0 = (it % k_chunks) * BLOCK_K
            kh = tap // 3
            kw = tap % 3
            hh = h0 + kh
            ww = w0 + kw
            valid = mask_m & (hh >= 0) & (hh < H) & (ww >= 0) & (ww < W)
            ci = k0 + offs_k
            mask_k = ci < C_IN
            a_ptrs = x_ptr + (img + hh * sxh + ww * sxw)[:, None] + (ci * sxc)[None, :]
            a = tl.load(a_ptrs, mask=valid[:, None] & mask_k[None, :], other=0.0)
            wb_ptrs = w_ptr + (offs_n * sw0)[None, :] + (ci * sw1)[:, None] + (kh * sw2 + kw * sw3)
            wb = tl.load(wb_ptrs, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
            acc = tl.dot(a, wb, acc, input_precision=DOT_PRECISION)

    bias = tl.load(b_ptr + offs_n * sbias, mask=mask_n, other=0.0).to(tl.float32)
    y = tl.maximum(acc + bias[None, :], 0.0, propagate_nan=tl.PropagateNan.ALL)  # NaN in, NaN out, as torch.relu
    o_ptrs = out_ptr + (b_i.to(tl.int64) * sob + ho * soh + wo * sow)[:, None] + (offs_n * soc)[None, :]
    tl.store(o_ptrs, y.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


def _config(c_in: int, c_out: int, elem_size: int) -> dict:
    """Fixed launch configuration from the shapes (pure Python, enumerable by the AOT tool).
    BLOCK_K / BLOCK_N are >= 16 (tl.dot minimum) and masked past C_in / C_out."""
    flat = 9 * c_in <= FLAT_K_MAX
    if flat:
        block_k = max(16, triton.next_power_of_2(9 * c_in))
    else:
        block_k = min(64, max(16, triton.next_power_of_2(c_in)))
    block_n = min(128, max(16, triton.next_power_of_2(c_out)))
    block_m = 128
    num_warps = 8 if block_n >= 128 else 4
    # flat K has no loop to pipeline; the tap loop prefetches one step in 16-bit.
    num_stages = 1 if (flat or elem_size > 2) else 3
    return dict(FLAT_K=flat, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
                num_warps=num_warps, num_stages=num_stages)


# --------------------------------------------------------------------------- launcher
def _fake(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, stride: int) -> torch.Tensor:
    bsz, _, h, wd = x.shape
    return _common.fake_output(x, bsz, w.shape[0], out_size(h, stride), out_size(wd, stride))


def bind(x_shape, w: torch.Tensor, b: torch.Tensor, *, stride: int):
    """Everything that depends only on the shapes, done once: returns ``(run, out_shape)``
    with ``run(x, x2=None) -> out`` for a channels_last x of ``x_shape`` (x2 unused)."""
    bsz, c_in, h, wd = x_shape
    c_out = w.shape[0]
    ho, wo = out_size(h, stride), out_size(wd, stride)
    cfg = _config(c_in, c_out, w.element_size())
    m = bsz * ho * wo
    kernel = _conv_bn_relu_kernel[(triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(c_out, cfg["BLOCK_N"]),)]
    shapes = (m, h, wd, ho, wo, c_in, c_out, *_common.channels_last_strides(bsz, c_in, h, wd), *w.stride(),
              b.stride(0), *_common.channels_last_strides(bsz, c_out, ho, wo))
    kw = dict(STRIDE=stride, DOT_PRECISION="ieee" if w.dtype == torch.float32 else "tf32", **cfg)

    def run(x: torch.Tensor, x2=None) -> torch.Tensor:
        out = _common.new_output(x, bsz, c_out, ho, wo)
        kernel(x, w, b, out, *shapes, **kw)
        return out

    return run, (bsz, c_out, ho, wo)


@register(OP, fake=_fake)
def _conv_bn_relu_op(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, stride: int) -> torch.Tensor:
    x = _common.to_channels_last(x)
    run, _ = bind(x.shape, w, b, stride=stride)
    with _common.on_device(x):
        return run(x)


# --------------------------------------------------------------------------- public
def conv_bn_relu(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, *, stride: int,
                 impl: str = "auto") -> torch.Tensor:
    """relu(conv3x3(x, w, padding=1, stride) + b). x: [B, C_in, H, W] (any memory format);
    w [C_out, C_in, 3, 3], b [C_out]; stride 1 or 2. Returns
    [B, C_out, (H-1)//stride+1, (W-1)//stride+1] in channels_last."""
    _common.check_activation(OP, "x", x)
    if isinstance(stride, bool) or not isinstance(stride, int) or stride not in STRIDES:
        raise ValueError(f"{OP}: stride must be 1 or 2, got {stride!r}")
    c_in = x.shape[1]
    w = _common.check_param(OP, "w", w, x, (None, c_in, 3, 3))
    b = _common.check_param(OP, "b", b, x, (w.shape[0],))
    x = _common.to_channels_last(x)
    impl = _common.resolve_impl(OP, impl, x)
    if impl == "reference":
        return reference(x, w, b, stride)
    return _conv_bn_relu_op(x, w, b, stride)
