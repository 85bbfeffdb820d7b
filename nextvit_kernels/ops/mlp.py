"""Fused Next-ViT MLP: ``u + fc2(relu(fc1(u)))`` (docs/design.md §1, §4).

``u`` is ``x`` (NCB Mlp, C -> 3C -> C) or the channel concat of ``x`` and ``x2`` (NTB
concat-MLP, C1 + C2 -> 2C -> C); BatchNorm is already folded into fc1. The concat is
never materialized: the kernels read the first C1 channels of a pixel through ``x`` and
the next C2 through ``x2``. Up to 256 output channels it is one kernel and the hidden
activation stays on chip; wider outputs run as two GEMM kernels through an [M, HID]
scratch instead of recomputing fc1 per output block (see ``_config``).
"""
from typing import Optional

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor

from . import _common
from ._registry import register

_OP = "mlp"


# ----------------------------------------------------------------------------------------
# Reference
# ----------------------------------------------------------------------------------------
def reference(x: Tensor, fc1_w: Tensor, fc1_b: Tensor, fc2_w: Tensor, fc2_b: Tensor,
              x2: Optional[Tensor] = None, residual: bool = True) -> Tensor:
    """Plain PyTorch, in the inputs' dtype (float64 in, float64 math). Weights [O, I] or
    [O, I, 1, 1]. Returns a channels_last tensor."""
    u = x if x2 is None else torch.cat([x, x2], dim=1)
    w1 = fc1_w.reshape(fc1_w.shape[0], -1)[:, :, None, None]
    w2 = fc2_w.reshape(fc2_w.shape[0], -1)[:, :, None, None]
    y = F.conv2d(F.relu(F.conv2d(u, w1, fc1_b)), w2, fc2_b)
    if residual:
        y = y + u
    return y.contiguous(memory_format=torch.channels_last)


# ----------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------
@triton.jit
def _hidden_tile(x_rows, x2_rows, w1_ptr, b1_ptr, offs_h, m_mask, C1, C2, HID,
                 HAS_X2: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr,
                 BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """h = relu(u @ w1[offs_h]^T + b1[offs_h]) for BLOCK_M rows, accumulated in fp32 and
    rounded to the input dtype (what feeds fc2's tensor-core dot either way).

    The K loop over u is split in two loops, one per input pointer, so a K chunk never
    straddles x and x2 whatever C1 is (masks handle C1 or C2 not a multiple of BLOCK_K).
    Masked hidden columns come out as relu(0 + 0) = 0.
    """
    offs_k = tl.arange(0, BLOCK_K)
    h_mask = offs_h < HID
    cu = C1 + C2
    hacc = tl.zeros((BLOCK_M, BLOCK_H), dtype=tl.float32)
    for k0 in range(0, C1, BLOCK_K):
        ks = k0 + offs_k
        k_mask = ks < C1
        a = tl.load(x_rows + ks[None, :], mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        w = tl.load(w1_ptr + offs_h[None, :] * cu + ks[:, None],
                    mask=k_mask[:, None] & h_mask[None, :], other=0.0)
        hacc = tl.dot(a, w, hacc, input_precision=DOT_PRECISION)
    if HAS_X2:
        for k0 in range(0, C2, BLOCK_K):
            ks = k0 + offs_k
            k_mask = ks < C2
            a = tl.load(x2_rows + ks[None, :], mask=m_mask[:, None] & k_mask[None, :], other=0.0)
            w = tl.load(w1_ptr + offs_h[None, :] * cu + (C1 + ks)[:, None],
                        mask=k_mask[:, None] & h_mask[None, :], other=0.0)
            hacc = tl.dot(a, w, hacc, input_precision=DOT_PRECISION)
    b1 = tl.load(b1_ptr + offs_h, mask=h_mask, other=0.0).to(tl.float32)
    # NaN in, NaN out, as torch.relu (the default max returns the non-NaN operand on a GPU)
    return tl.maximum(hacc + b1[None, :], 0.0, propagate_nan=tl.PropagateNan.ALL).to(x_rows.dtype.element_ty)


@triton.jit
def _fc1_kernel(
    x_ptr, x2_ptr, w1_ptr, b1_ptr, h_ptr,
    M, C1, C2, HID,
    HAS_X2: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Split mode, first half: one program writes h [BLOCK_M, BLOCK_H] of relu(fc1(u)) to
    the scratch h_ptr [M, HID] (row-major)."""
    pid_m = tl.program_id(0)
    pid_h = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_h = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    m_mask = offs_m < M
    rows = offs_m.to(tl.int64)
    h = _hidden_tile(x_ptr + rows[:, None] * C1, x2_ptr + rows[:, None] * C2, w1_ptr, b1_ptr,
                     offs_h, m_mask, C1, C2, HID, HAS_X2, BLOCK_M, BLOCK_H, BLOCK_K, DOT_PRECISION)
    tl.store(h_ptr + rows[:, None] * HID + offs_h[None, :], h,
             mask=m_mask[:, None] & (offs_h < HID)[None, :])


@triton.jit
def _mlp_kernel(
    x_ptr, x2_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr, h_ptr, out_ptr,
    M, C1, C2, HID, COUT,
    HAS_X2: tl.constexpr, RESIDUAL: tl.constexpr, H_IN_MEMORY: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr, HAS_B2: tl.constexpr,
):
    """One program: BLOCK_M pixels (rows of the NHWC activations) x BLOCK_N output channels.

    x [M, C1], x2 [M, C2] (a dummy equal to x when not HAS_X2), fc1 weight [HID, C1 + C2],
    fc2 weight [COUT, HID], out [M, COUT]; all row-major. For each BLOCK_H slice of the
    hidden layer, h is computed on chip (fused mode) or, with H_IN_MEMORY, read from the
    [M, HID] scratch _fc1_kernel wrote (split mode; h_ptr is a dummy otherwise); then
    acc += h @ w2[n_block, slice]^T. Epilogue: + fc2 bias (HAS_B2), + u (RESIDUAL), store.
    """
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_hb = tl.arange(0, BLOCK_H)
    m_mask = offs_m < M
    n_mask = offs_n < COUT
    rows = offs_m.to(tl.int64)
    x_rows = x_ptr + rows[:, None] * C1
    x2_rows = x2_ptr + rows[:, None] * C2

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for h0 in range(0, HID, BLOCK_H):
        offs_h = h0 + offs_hb
        h_mask = offs_h < HID
        if H_IN_MEMORY:
            h = tl.load(h_ptr + rows[:, None] * HID + offs_h[None, :],
                        mask=m_mask[:, None] & h_mask[None, :], other=0.0)
        else:
            h = _hidden_tile(x_rows, x2_rows, w1_ptr, b1_ptr, offs_h, m_mask, C1, C2, HID,
                             HAS_X2, BLOCK_M, BLOCK_H, BLOCK_K, DOT_PRECISION)
        w2 = tl.load(w2_ptr + offs_n[None, :] * HID + offs_h[:, None],
                     mask=h_mask[:, None] & n_mask[None, :], other=0.0)
        acc = tl.dot(h, w2, acc, input_precision=DOT_PRECISION)

    if HAS_B2:  # False when MHCA's split mode reuses this as its (bias-free) projection GEMM
        acc += tl.load(b2_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    if RESIDUAL:
        # COUT == C1 + C2: channel n of u is x[:, n] for n < C1, else x2[:, n - C1].
        r = tl.load(x_rows + offs_n[None, :], mask=m_mask[:, None] & (offs_n < C1)[None, :], other=0.0)
        acc += r.to(tl.float32)
        if HAS_X2:
            in_x2 = (offs_n >= C1) & n_mask
            r2 = tl.load(x2_rows + (offs_n - C1)[None, :], mask=m_mask[:, None] & in_x2[None, :], other=0.0)
            acc += r2.to(tl.float32)
    tl.store(out_ptr + rows[:, None] * COUT + offs_n[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=m_mask[:, None] & n_mask[None, :])


# Two modes, picked per shape by _config:
# - fused: one _mlp_kernel launch, h never leaves the chip. Its fp32 accumulator
#   [BLOCK_M, BLOCK_N] lives in registers for the whole hidden loop next to the
#   [BLOCK_M, BLOCK_H] hidden tile: 64 x 256 fp32 at 8 warps is 64 registers a thread,
#   64 x 512 would be 128 and 64 x 1024 cannot fit (BLOCK_M < 64 drops Hopper's wgmma,
#   whose M is 64 a warpgroup). Offline ptxas (Triton 3.8, sm_90a, fp16): 64x256 tiles
#   use 175-204 registers with no spills; 64x512 and 128x256 hit 255 and spill.
#   So an output wider than 256 would need several N blocks, each recomputing fc1 for its
#   rows, and a 256-wide block already costs the 128-row tile.
# - split: _fc1_kernel writes h to an [M, HID] scratch, then _mlp_kernel with H_IN_MEMORY
#   reads it back: no FLOP is recomputed; the price is writing and reading h once, and each
#   half is a GEMM with full 128 x 128 tiles.
# Measured on an H200 (Triton 3.6, fp16, batch 256, bench/tune.py), split against fused:
# 192-576-192 @28 0.562 / 0.671 ms, 192+64-512-256 @28 0.656 / 0.806 (the fused kernel at
# BLOCK_N 256 runs 64-row tiles), while 96-288-96 @56 stays fused, 0.743 against 0.771 split.
# So the fused kernel runs only where one N block of at most 128 holds every output channel.
_MAX_FUSED_N = 128
_MAX_BLOCK_N = 256  # the widest fp32 accumulator that fits in registers (above)


def _config(c1: int, c2: int, hidden: int, c_out: int, dtype: torch.dtype) -> dict:
    """Launch parameters from the shapes (pure Python, enumerable by an AOT tool):
    {"split": bool, "fc1": {...} (_fc1_kernel, used when split), "mlp": {...} (_mlp_kernel)}.
    """
    fp32 = dtype == torch.float32
    prec = "ieee" if fp32 else "tf32"
    # 64-wide K chunks when both inputs split evenly into them (192, 256, 384, ...),
    # 32 otherwise (96): less masked work than padding 96 to 128.
    block_k = 64 if c1 % 64 == 0 and c2 % 64 == 0 and not fp32 else 32
    split = c_out > _MAX_FUSED_N
    # fp32 (checks only) runs on FMA units: keep its register tiles small.
    fc1 = dict(BLOCK_M=64 if fp32 else 128, BLOCK_H=64 if fp32 else 128, BLOCK_K=block_k,
               DOT_PRECISION=prec, num_warps=4 if fp32 else 8, num_stages=3)
    if c_out > _MAX_BLOCK_N:
        # fc2 alone: a plain GEMM over K = HID, 128 x 128 tiles (384, 512, 768, 1024 all
        # divide by 128: no padded N).
        mlp = dict(BLOCK_M=64 if fp32 else 128, BLOCK_N=64 if fp32 else 128, BLOCK_H=32 if fp32 else 64,
                   BLOCK_K=block_k, DOT_PRECISION=prec, num_warps=4 if fp32 else 8, num_stages=3)
    else:
        # One N block holds every output channel (fp32: at most 128): the fused kernel, or fc2
        # after the scratch for 129..256 outputs, with the 64 x 256 tile that was measured so.
        block_n = max(16, min(triton.next_power_of_2(c_out), 128 if fp32 else _MAX_BLOCK_N))
        block_m = 128 if block_n <= 128 and not fp32 else 64
        mlp = dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_H=32 if fp32 else 64, BLOCK_K=block_k,
                   DOT_PRECISION=prec, num_warps=8 if block_m * block_n >= 128 * 128 else 4, num_stages=2)
    return dict(split=split, fc1=fc1, mlp=mlp)


# ----------------------------------------------------------------------------------------
# Launchers (torch.ops.nextvit.mlp, and the scratch GEMM the other split ops share)
# ----------------------------------------------------------------------------------------
def bind_gemm_from_scratch(m: int, c: int, c_out: int, has_bias: bool, residual: bool, cfg: dict):
    """The second kernel of the ops that run split (MHCA's projection, E-MHSA's output
    projection): returns ``launch(x, h, w, bias, out)`` computing out = h @ w^T (+ bias)
    (+ x when residual), rows = pixels/tokens. x: the op's channels_last input [B, C, H, W]
    (C == h's width), h: [m, c] scratch, w: [c_out, c] contiguous, bias [c_out] or None,
    out: channels_last [B, c_out, H, W]; cfg: _mlp_kernel's launch parameters."""
    kernel = _mlp_kernel[(triton.cdiv(m, cfg["BLOCK_M"]), triton.cdiv(c_out, cfg["BLOCK_N"]))]
    kw = dict(HAS_X2=False, RESIDUAL=residual, H_IN_MEMORY=True, HAS_B2=has_bias, **cfg)

    def launch(x, h, w, bias, out):
        # x2 and the fc1 weight/bias are not read with H_IN_MEMORY and no HAS_X2: dummies.
        kernel(x, x, w, w, w, w if bias is None else bias, h, out, m, c, 0, c, c_out, **kw)

    return launch


def _fake(x: Tensor, x2: Optional[Tensor], fc1_w: Tensor, fc1_b: Tensor, fc2_w: Tensor,
          fc2_b: Tensor, residual: bool) -> Tensor:
    b, _, h, w = x.shape
    return _common.fake_output(x, b, fc2_w.shape[0], h, w)


def bind(x_shape, fc1_w: Tensor, fc1_b: Tensor, fc2_w: Tensor, fc2_b: Tensor, *,
         x2_channels: int = 0, residual: bool = True):
    """Everything that depends only on the shapes, done once: returns ``(run, out_shape)``
    with ``run(x, x2=None) -> out`` for channels_last x of ``x_shape`` (and x2 with
    ``x2_channels`` channels, the NTB concat-MLP), weights as ``mlp`` takes them, 2-D."""
    b, c1, h, w = x_shape
    fc1_w, fc1_b, fc2_w, fc2_b = (t.contiguous() for t in (fc1_w, fc1_b, fc2_w, fc2_b))
    hidden, c_out = fc1_w.shape[0], fc2_w.shape[0]
    m, c2 = b * h * w, x2_channels
    cfg = _config(c1, c2, hidden, c_out, fc1_w.dtype)
    split, has_x2 = cfg["split"], c2 > 0
    f, g = cfg["fc1"], cfg["mlp"]
    fc1 = _fc1_kernel[(triton.cdiv(m, f["BLOCK_M"]), triton.cdiv(hidden, f["BLOCK_H"]))] if split else None
    fc1_kw = dict(HAS_X2=has_x2, **f)
    fc2 = _mlp_kernel[(triton.cdiv(m, g["BLOCK_M"]), triton.cdiv(c_out, g["BLOCK_N"]))]
    fc2_kw = dict(HAS_X2=has_x2, RESIDUAL=residual, H_IN_MEMORY=split, HAS_B2=True, **g)

    def run(x: Tensor, x2: Optional[Tensor] = None) -> Tensor:
        x2 = x if x2 is None else x2  # a dummy pointer without HAS_X2
        out = _common.new_output(x, b, c_out, h, w)
        h_buf = x  # dummy pointer in fused mode
        if split:
            h_buf = _common.new_scratch(x, m, hidden)
            fc1(x, x2, fc1_w, fc1_b, h_buf, m, c1, c2, hidden, **fc1_kw)
        fc2(x, x2, fc1_w, fc1_b, fc2_w, fc2_b, h_buf, out, m, c1, c2, hidden, c_out, **fc2_kw)
        return out

    return run, (b, c_out, h, w)


@register(_OP, fake=_fake)
def _mlp_triton(x: Tensor, x2: Optional[Tensor], fc1_w: Tensor, fc1_b: Tensor, fc2_w: Tensor,
                fc2_b: Tensor, residual: bool) -> Tensor:
    """x [B, C1, H, W], x2 [B, C2, H, W] or None, fc1_w [HID, C1 + C2], fc2_w [COUT, HID]."""
    x = _common.to_channels_last(x)
    if x2 is not None:
        x2 = _common.to_channels_last(x2)
    run, _ = bind(x.shape, fc1_w, fc1_b, fc2_w, fc2_b, x2_channels=0 if x2 is None else x2.shape[1],
                  residual=residual)
    with _common.on_device(x):
        return run(x, x2)


# ----------------------------------------------------------------------------------------
# Public function
# ----------------------------------------------------------------------------------------
def mlp(x: Tensor, fc1_w: Tensor, fc1_b: Tensor, fc2_w: Tensor, fc2_b: Tensor, *,
        x2: Optional[Tensor] = None, residual: bool = True, impl: str = "auto") -> Tensor:
    """``u + fc2(relu(fc1(u) + fc1_b)) + fc2_b`` with u = x or cat([x, x2], dim=1).

    x [B, C1, H, W] (any memory format), x2 [B, C2, H, W] or None; fc1_w [HID, C1 + C2]
    or [HID, C1 + C2, 1, 1]; fc1_b [HID]; fc2_w [COUT, HID] or [COUT, HID, 1, 1] with
    COUT == C1 + C2 when ``residual``; fc2_b [COUT]. Returns [B, COUT, H, W] channels_last.
    """
    _common.check_activation(_OP, "x", x)
    c_in = x.shape[1]
    if x2 is not None:
        _common.check_activation(_OP, "x2", x2)
        if x2.device != x.device:
            raise ValueError(f"{_OP}: x2 is on {x2.device} but x is on {x.device}")
        if x2.dtype != x.dtype:
            raise ValueError(f"{_OP}: x2 has dtype {x2.dtype} but x has {x.dtype}")
        if (x2.shape[0], x2.shape[2], x2.shape[3]) != (x.shape[0], x.shape[2], x.shape[3]):
            raise ValueError(
                f"{_OP}: x2 has shape {list(x2.shape)}; its batch and spatial size must match "
                f"x's {list(x.shape)} (only the channel count may differ)"
            )
        c_in += x2.shape[1]
    fc1_w = _common.as_matrix(_OP, "fc1_w", fc1_w, x, None, c_in)
    hidden = fc1_w.shape[0]
    fc1_b = _common.check_param(_OP, "fc1_b", fc1_b, x, (hidden,))
    fc2_w = _common.as_matrix(_OP, "fc2_w", fc2_w, x, c_in if residual else None, hidden)
    fc2_b = _common.check_param(_OP, "fc2_b", fc2_b, x, (fc2_w.shape[0],))
    x = _common.to_channels_last(x)
    if x2 is not None:
        x2 = _common.to_channels_last(x2)
    if _common.resolve_impl(_OP, impl, x) == "reference":
        return reference(x, fc1_w, fc1_b, fc2_w, fc2_b, x2=x2, residual=residual)
    return _mlp_triton(x, x2, fc1_w, fc1_b, fc2_w, fc2_b, bool(residual))
