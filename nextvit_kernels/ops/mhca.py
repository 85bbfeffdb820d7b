"""MHCA: multi-head convolutional attention of Next-ViT (docs/design.md §1, §4).

    y = [x +] proj(relu(grouped_conv3x3(x, conv_w, groups=C//32, padding=1) + conv_b))

with BatchNorm already folded into ``conv_w`` / ``conv_b``. Fused mode (the usual
one) is one Triton kernel: a program owns BLOCK_M output pixels (NHWC rows) and a
BLOCK_N slice of output channels and walks the C//32 heads; per head the grouped
conv is 9 taps of [BLOCK_M, 32] x [32, 32] tensor-core dots on shifted
(border-masked) neighbour rows, then bias + ReLU, a cast to the input dtype (as
eager PyTorch would store the hidden activation) and one [BLOCK_M, 32] x
[32, BLOCK_N] dot into the projection accumulator. The hidden activation never
leaves the chip; the residual is added in the epilogue. Split mode, for small
pixel counts (see ``_config``), runs the per-head conv as its own kernel over
(pixel tile, head) programs into a scratch, then the projection + residual GEMM.
"""
import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from . import _common
from ._registry import register
from .mlp import _mlp_kernel, bind_gemm_from_scratch  # noqa: F401  (aot.py compiles _mlp_kernel as this op's 2nd GEMM)

OP = "mhca"
HEAD_DIM = 32


# --------------------------------------------------------------------------- reference
def reference(x: torch.Tensor, conv_w: torch.Tensor, conv_b: torch.Tensor, proj_w: torch.Tensor,
              residual: bool = True) -> torch.Tensor:
    """Plain PyTorch in the input dtype's math (float64 in, float64 out)."""
    c = x.shape[1]
    h = F.relu(F.conv2d(x, conv_w, conv_b, padding=1, groups=c // HEAD_DIM))
    pw = proj_w.reshape(proj_w.shape[0], proj_w.shape[1], 1, 1)
    y = F.conv2d(h, pw)
    if residual:
        y = y + x
    return _common.to_channels_last(y)


# --------------------------------------------------------------------------- kernels
@triton.jit
def _head_conv(x_ptr, cw_ptr, cb_ptr, img, h_i, w_i, mask_m, c0, H, W,
               sxc, sxh, sxw, scw0, scw1, scw2, scw3, scb,
               BLOCK_M: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """relu(grouped conv3x3 + bias) of one head (channels c0 .. c0+31) for BLOCK_M pixels
    (image base ``img``, row ``h_i``, column ``w_i``): 9 taps of [BLOCK_M, 32] x [32, 32]
    dots on border-masked neighbour rows, accumulated in fp32, rounded to the input dtype
    (as eager PyTorch stores the hidden activation)."""
    HD: tl.constexpr = 32
    offs_k = tl.arange(0, HD)
    conv = tl.zeros((BLOCK_M, HD), dtype=tl.float32)
    for tap in tl.static_range(9):
        kh = tap // 3
        kw = tap % 3
        hh = h_i + (kh - 1)
        ww = w_i + (kw - 1)
        valid = mask_m & (hh >= 0) & (hh < H) & (ww >= 0) & (ww < W)
        a_ptrs = x_ptr + (img + hh * sxh + ww * sxw)[:, None] + ((c0 + offs_k) * sxc)[None, :]
        a = tl.load(a_ptrs, mask=valid[:, None], other=0.0)
        # B[k_in, j_out] = conv_w[c0 + j_out, k_in, kh, kw], read in its given layout.
        wb_ptrs = cw_ptr + ((c0 + offs_k) * scw0)[None, :] + (offs_k * scw1)[:, None] + (kh * scw2 + kw * scw3)
        wb = tl.load(wb_ptrs)
        conv = tl.dot(a, wb, conv, input_precision=DOT_PRECISION)
    bias = tl.load(cb_ptr + (c0 + offs_k) * scb).to(tl.float32)
    # NaN in, NaN out, as torch.relu (the default max returns the non-NaN operand on a GPU)
    return tl.maximum(conv + bias[None, :], 0.0, propagate_nan=tl.PropagateNan.ALL).to(x_ptr.dtype.element_ty)


@triton.jit
def _pixels(offs_m, H, W):
    """(image index as int64, row, column) of flat pixel indices b*H*W + h*W + w; int64 so
    that image base offsets (B*H*W*C may pass 2**31) do not overflow."""
    w_i = offs_m % W
    t = offs_m // W
    return (t // H).to(tl.int64), t % H, w_i


@triton.jit
def _mhca_kernel(
    x_ptr, cw_ptr, cb_ptr, pw_ptr, out_ptr,
    M, H, W, C, C_OUT,
    sxb, sxc, sxh, sxw,            # x strides (elements) for logical [B, C, H, W]
    scw0, scw1, scw2, scw3,        # conv_w [C, 32, 3, 3] strides
    scb,                           # conv_b stride
    spw0, spw1,                    # proj_w [C_OUT, C] strides
    sob, soc, soh, sow,            # out strides for logical [B, C_OUT, H, W]
    RESIDUAL: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Fused mode: a program owns BLOCK_M pixels x BLOCK_N output channels and walks the
    heads; per head _head_conv, then one [BLOCK_M, 32] x [32, BLOCK_N] dot into the
    projection accumulator; the residual is added in the epilogue."""
    HD: tl.constexpr = 32
    pid = tl.program_id(0)
    num_n = tl.cdiv(C_OUT, BLOCK_N)
    # N blocks of the same pixel tile are neighbours in launch order, so the
    # recomputed conv (C_OUT > BLOCK_N) reads its x tile from L2.
    pid_m = pid // num_n
    pid_n = pid % num_n

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < M
    b_i, h_i, w_i = _pixels(offs_m, H, W)
    img = b_i * sxb
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < C_OUT
    offs_k = tl.arange(0, HD)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for g in range(0, C // HD):
        c0 = g * HD
        hidden = _head_conv(x_ptr, cw_ptr, cb_ptr, img, h_i, w_i, mask_m, c0, H, W,
                            sxc, sxh, sxw, scw0, scw1, scw2, scw3, scb, BLOCK_M, DOT_PRECISION)
        # P[j, n] = proj_w[n, c0 + j]
        p_ptrs = pw_ptr + (offs_n * spw0)[None, :] + ((c0 + offs_k) * spw1)[:, None]
        p = tl.load(p_ptrs, mask=mask_n[None, :], other=0.0)
        acc = tl.dot(hidden, p, acc, input_precision=DOT_PRECISION)

    mask_out = mask_m[:, None] & mask_n[None, :]
    if RESIDUAL:
        r_ptrs = x_ptr + (img + h_i * sxh + w_i * sxw)[:, None] + (offs_n * sxc)[None, :]
        acc += tl.load(r_ptrs, mask=mask_out, other=0.0).to(tl.float32)
    o_ptrs = out_ptr + (b_i * sob + h_i * soh + w_i * sow)[:, None] + (offs_n * soc)[None, :]
    tl.store(o_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask_out)


@triton.jit
def _mhca_conv_kernel(
    x_ptr, cw_ptr, cb_ptr, h_ptr,
    M, H, W, C,
    sxb, sxc, sxh, sxw,
    scw0, scw1, scw2, scw3,
    scb,
    BLOCK_M: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Split mode, first half: program (pixel tile, head) writes _head_conv's [BLOCK_M, 32]
    into the scratch h_ptr [M, C] (row-major). The projection and the residual are then
    one GEMM (ops.mlp's _mlp_kernel reading h from memory)."""
    HD: tl.constexpr = 32
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    c0 = tl.program_id(1) * HD
    mask_m = offs_m < M
    b_i, h_i, w_i = _pixels(offs_m, H, W)
    img = b_i * sxb
    hidden = _head_conv(x_ptr, cw_ptr, cb_ptr, img, h_i, w_i, mask_m, c0, H, W,
                        sxc, sxh, sxw, scw0, scw1, scw2, scw3, scb, BLOCK_M, DOT_PRECISION)
    offs_k = tl.arange(0, HD)
    tl.store(h_ptr + offs_m.to(tl.int64)[:, None] * C + (c0 + offs_k)[None, :], hidden, mask=mask_m[:, None])


# Below this many pixels (B*H*W) the op runs split: at batch 1 the fused grid is a handful of
# programs (Next-ViT-S stage 2: 196 pixels -> 4 pixel tiles x 2 N blocks = 8 programs on 132
# SMs), each walking every head in sequence (12 x 10 dependent dots at C=384), so latency is a
# serial chain. Split spreads the conv over (pixel tile, head) programs (48 there) and leaves
# a K=C GEMM. From a latency model, not measured: bench/tune.py's batch-1 times on the H200
# (0.08-0.25 ms per call against 10-15 us of kernel in the profile) carry each call's host
# work, so they cannot decide it. Above it the fused kernel saves writing and reading the
# [M, C] hidden activation where it pays (see _config).
# A power of two minus one so that the AOT tool's probe classes split exactly here.
SPLIT_BELOW_PIXELS = 4096


def _config(c: int, c_out: int, elem_size: int, m: int) -> dict:
    """Launch configuration from the shapes and the pixel count m = B*H*W (pure Python,
    enumerable by the AOT tool): {"split": bool, "fused": {...} (_mhca_kernel), "conv":
    {...} (_mhca_conv_kernel) and "proj": {...} (mlp._mlp_kernel), the latter two used
    when split}.

    Fused: BLOCK_N covers all output channels when C_OUT <= 256, so the grouped conv is
    computed once per pixel. Above 256 the accumulator would not fit in registers, so N is
    split into 256-wide blocks and every N block recomputes the conv for its pixels: conv
    FLOPs grow by cdiv(C_OUT, 256) (~576·C per pixel each time, vs 2·C·C_OUT for the
    projection).

    Split (the conv into a scratch, then the projection GEMM) below SPLIT_BELOW_PIXELS, and
    wherever the fused kernel would recompute the conv or pad its N block: C_OUT above 256 or
    not a power of two. Measured on an H200 (Triton 3.6, fp16, batch 256, bench/tune.py), split
    against fused: C96 @56 0.585 / 0.791 ms, C192 @28 0.387 / 0.653, C384 @14 0.280 / 0.607,
    C768 @7 0.190 / 0.507; the powers of two stay fused: C128 @14 0.175 / 0.128, C256 @7
    0.177 / 0.137, C64 @28 0.196 / 0.222 (within that shape's run-to-run spread).
    """
    if c_out <= 256:
        block_n = max(16, triton.next_power_of_2(c_out))
    else:
        block_n = 256
    # 8 warps everywhere: at 128 x 64 (the C=64 NTB branch) 4 warps need 255 registers and
    # spill 16 bytes, 8 warps need 187 and do not (ptxas -v, sm_90a, Triton 3.6, fp16).
    block_m, num_warps = (64, 8) if block_n >= 256 else (128, 8)
    # The head loop's loads (9 x-tiles + 9 weight tiles + the proj slice) are what the
    # software pipeliner would buffer; one buffer is ~80 KB in fp16 at these tiles, so
    # allow one iteration of prefetch in 16-bit and none in fp32 (the checking path).
    num_stages = 2 if elem_size <= 2 else 1
    fused = dict(BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps, num_stages=num_stages)
    prec = "ieee" if elem_size == 4 else "tf32"
    small = m < SPLIT_BELOW_PIXELS
    split = small or block_n != c_out
    # Small tiles (many programs) on few pixels; on many, 128-pixel conv tiles with 8 warps
    # (H200, batch 256: C96 0.585 vs 0.661 ms with 64 x 4, C192 0.387 vs 0.425, C768 0.190 vs
    # 0.265) and the usual 128 x 128 GEMM tile.
    tile, warps = (64, 4) if small else (128, 8)
    conv = dict(BLOCK_M=tile, DOT_PRECISION=prec, num_warps=warps, num_stages=1)
    proj = dict(BLOCK_M=tile, BLOCK_N=tile, BLOCK_H=32 if elem_size == 4 else 64, BLOCK_K=32,
                DOT_PRECISION=prec, num_warps=warps, num_stages=3)
    return dict(split=split, fused=fused, conv=conv, proj=proj)


# --------------------------------------------------------------------------- launcher
def _fake(x: torch.Tensor, conv_w: torch.Tensor, conv_b: torch.Tensor, proj_w: torch.Tensor,
          residual: bool) -> torch.Tensor:
    b, _, h, w = x.shape
    return _common.fake_output(x, b, proj_w.shape[0], h, w)


def bind(x_shape, conv_w: torch.Tensor, conv_b: torch.Tensor, proj_w: torch.Tensor, *, residual: bool = True):
    """Everything that depends only on the shapes, done once: returns ``(run, out_shape)``
    with ``run(x, x2=None) -> out`` for a channels_last x of ``x_shape`` (x2 unused)."""
    b, c, h, w = x_shape
    c_out = proj_w.shape[0]
    proj_w = proj_w.reshape(c_out, c).contiguous()
    m = b * h * w
    cfg = _config(c, c_out, conv_w.element_size(), m)
    prec = "ieee" if conv_w.dtype == torch.float32 else "tf32"
    x_strides = _common.channels_last_strides(b, c, h, w)
    cw_strides = conv_w.stride()
    out_strides = _common.channels_last_strides(b, c_out, h, w)
    if cfg["split"]:
        f = cfg["conv"]
        conv = _mhca_conv_kernel[(triton.cdiv(m, f["BLOCK_M"]), c // HEAD_DIM)]
        proj = bind_gemm_from_scratch(m, c, c_out, False, residual, cfg["proj"])

        def run(x: torch.Tensor, x2=None) -> torch.Tensor:
            out = _common.new_output(x, b, c_out, h, w)
            hid = _common.new_scratch(x, m, c)
            conv(x, conv_w, conv_b, hid, m, h, w, c, *x_strides, *cw_strides, conv_b.stride(0), **f)
            proj(x, hid, proj_w, None, out)
            return out

        return run, (b, c_out, h, w)
    f = cfg["fused"]
    fused = _mhca_kernel[(triton.cdiv(m, f["BLOCK_M"]) * triton.cdiv(c_out, f["BLOCK_N"]),)]
    kw = dict(RESIDUAL=residual, DOT_PRECISION=prec, **f)

    def run(x: torch.Tensor, x2=None) -> torch.Tensor:
        out = _common.new_output(x, b, c_out, h, w)
        fused(x, conv_w, conv_b, proj_w, out, m, h, w, c, c_out, *x_strides, *cw_strides, conv_b.stride(0),
              proj_w.stride(0), proj_w.stride(1), *out_strides, **kw)
        return out

    return run, (b, c_out, h, w)


@register(OP, fake=_fake)
def _mhca_op(x: torch.Tensor, conv_w: torch.Tensor, conv_b: torch.Tensor, proj_w: torch.Tensor,
             residual: bool) -> torch.Tensor:
    x = _common.to_channels_last(x)
    run, _ = bind(x.shape, conv_w, conv_b, proj_w, residual=residual)
    with _common.on_device(x):
        return run(x)


# --------------------------------------------------------------------------- public
def mhca(x: torch.Tensor, conv_w: torch.Tensor, conv_b: torch.Tensor, proj_w: torch.Tensor, *,
         residual: bool = True, impl: str = "auto") -> torch.Tensor:
    """Fused MHCA block. x: [B, C, H, W] (any memory format), C a multiple of 32;
    conv_w [C, 32, 3, 3], conv_b [C] (BN folded); proj_w [C_out, C] or [C_out, C, 1, 1]
    (C_out == C when residual). Returns [B, C_out, H, W] in channels_last."""
    _common.check_activation(OP, "x", x, multiple_of=HEAD_DIM)
    c = x.shape[1]
    conv_w = _common.check_param(OP, "conv_w", conv_w, x, (c, HEAD_DIM, 3, 3))
    conv_b = _common.check_param(OP, "conv_b", conv_b, x, (c,))
    proj_w = _common.as_matrix(OP, "proj_w", proj_w, x, in_features=c)
    if not isinstance(residual, bool):
        raise ValueError(f"{OP}: residual must be a bool, got {type(residual).__name__}")
    if residual and proj_w.shape[0] != c:
        raise ValueError(
            f"{OP}: residual=True needs proj_w with {c} output channels (as many as x), "
            f"got {proj_w.shape[0]}"
        )
    x = _common.to_channels_last(x)
    impl = _common.resolve_impl(OP, impl, x)
    if impl == "reference":
        return reference(x, conv_w, conv_b, proj_w, residual)
    return _mhca_op(x, conv_w, conv_b, proj_w, residual)
