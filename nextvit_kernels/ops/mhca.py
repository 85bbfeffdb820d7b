"""MHCA: multi-head convolutional attention of Next-ViT (DESIGN.md §1, §3).

    y = [x +] proj(relu(grouped_conv3x3(x, conv_w, groups=C//32, padding=1) + conv_b))

with BatchNorm already folded into ``conv_w`` / ``conv_b``. One Triton kernel
does the whole block: a program owns BLOCK_M output pixels (NHWC rows) and a
BLOCK_N slice of output channels and walks the C//32 heads; per head the
grouped conv is 9 taps of [BLOCK_M, 32] x [32, 32] tensor-core dots on shifted
(border-masked) neighbour rows, then bias + ReLU, a cast to the input dtype
(as eager PyTorch would store the hidden activation) and one
[BLOCK_M, 32] x [32, BLOCK_N] dot into the projection accumulator. The hidden
activation never leaves the chip; the residual is added in the epilogue.
"""
import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from . import _common
from ._registry import register

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


# --------------------------------------------------------------------------- kernel
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
    HD: tl.constexpr = 32
    pid = tl.program_id(0)
    num_n = tl.cdiv(C_OUT, BLOCK_N)
    # N blocks of the same pixel tile are neighbours in launch order, so the
    # recomputed conv (C_OUT > BLOCK_N) reads its x tile from L2.
    pid_m = pid // num_n
    pid_n = pid % num_n

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < M
    w_i = offs_m % W
    t = offs_m // W
    h_i = t % H
    b_i = t // H
    img = b_i.to(tl.int64) * sxb           # 64-bit image base: B*H*W*C may pass 2**31

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < C_OUT
    offs_k = tl.arange(0, HD)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for g in range(0, C // HD):
        c0 = g * HD
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
        hidden = tl.maximum(conv + bias[None, :], 0.0).to(x_ptr.dtype.element_ty)
        # P[j, n] = proj_w[n, c0 + j]
        p_ptrs = pw_ptr + (offs_n * spw0)[None, :] + ((c0 + offs_k) * spw1)[:, None]
        p = tl.load(p_ptrs, mask=mask_n[None, :], other=0.0)
        acc = tl.dot(hidden, p, acc, input_precision=DOT_PRECISION)

    mask_out = mask_m[:, None] & mask_n[None, :]
    if RESIDUAL:
        r_ptrs = x_ptr + (img + h_i * sxh + w_i * sxw)[:, None] + (offs_n * sxc)[None, :]
        acc += tl.load(r_ptrs, mask=mask_out, other=0.0).to(tl.float32)
    o_ptrs = out_ptr + (b_i.to(tl.int64) * sob + h_i * soh + w_i * sow)[:, None] + (offs_n * soc)[None, :]
    tl.store(o_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask_out)


def _config(c: int, c_out: int, elem_size: int) -> dict:
    """Fixed launch configuration from the shapes (pure Python, enumerable by the AOT tool).

    BLOCK_N covers all output channels when C_OUT <= 256, so the grouped conv is computed
    once per pixel. Above 256 the accumulator would not fit in registers, so N is split
    into 256-wide blocks and every N block recomputes the conv for its pixels: conv FLOPs
    grow by cdiv(C_OUT, 256) (~576·C per pixel each time, vs 2·C·C_OUT for the projection);
    256 beats 128 for every Next-ViT width (fewer recomputes, little masked waste).
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
    return dict(BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps, num_stages=num_stages)


# --------------------------------------------------------------------------- launcher
def _fake(x: torch.Tensor, conv_w: torch.Tensor, conv_b: torch.Tensor, proj_w: torch.Tensor,
          residual: bool) -> torch.Tensor:
    b, _, h, w = x.shape
    return _common.fake_output(x, b, proj_w.shape[0], h, w)


@register(OP, fake=_fake)
def _mhca_op(x: torch.Tensor, conv_w: torch.Tensor, conv_b: torch.Tensor, proj_w: torch.Tensor,
             residual: bool) -> torch.Tensor:
    b, c, h, w = x.shape
    c_out = proj_w.shape[0]
    out = _common.new_output(x, b, c_out, h, w)
    cfg = _config(c, c_out, x.element_size())
    m = b * h * w
    grid = (triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(c_out, cfg["BLOCK_N"]),)
    _mhca_kernel[grid](
        x, conv_w, conv_b, proj_w, out,
        m, h, w, c, c_out,
        x.stride(0), x.stride(1), x.stride(2), x.stride(3),
        conv_w.stride(0), conv_w.stride(1), conv_w.stride(2), conv_w.stride(3),
        conv_b.stride(0),
        proj_w.stride(0), proj_w.stride(1),   # [O, I] or an [O, I, 1, 1] view: same two strides
        out.stride(0), out.stride(1), out.stride(2), out.stride(3),
        RESIDUAL=residual,
        BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"],
        DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    return out


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
