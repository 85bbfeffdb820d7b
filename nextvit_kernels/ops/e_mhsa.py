"""E-MHSA (efficient multi-head self attention of Next-ViT's NTB), BatchNorms folded.

Semantics (docs/design.md §1): tokens t are the N = H*W positions of x in row-major
order (the rows of the NHWC tensor).  q = t @ q_w^T + q_b.  If sr_ratio > 1 the
key/value tokens are averages of sr^2 *consecutive* tokens (1-D pooling over the
flattened token axis, windows cross image rows, the trailing N % sr^2 tokens are
dropped; Nk = N // sr^2), else all N tokens; k = pooled @ k_w^T + k_b, v alike
(the pooled-token BatchNorm1d is folded into k_w/k_b and v_w/v_b by the caller).
Per head of ``head_dim`` channels: softmax(q k^T * head_dim^-0.5) v; then
out = o @ proj_w^T + proj_b (+ x when ``residual``).  Output [B, Cout, H, W],
channels_last.

Two kernels (docs/design.md §4, NTB row):
1. ``_kv_kernel``: pools the key/value tokens (fp32 sums, rounded to the input
   dtype like eager's AvgPool1d output) and projects them into one [B, Nk, 2C]
   scratch (k in channels [0, C), v in [C, 2C)).
2. ``_attn_kernel``: per (batch, BLOCK_M query tokens, BLOCK_CO output
   channels), for each head: q_h = t @ q_w[head]^T + q_b[head], scores over all
   key tokens, softmax, p @ v_h, then acc += o_h @ proj_w[co, head]^T; epilogue
   bias + residual.  Q, scores and the attention output never touch memory.
Outputs wider than 256 channels (split mode, see ``_config``) replace 2. by a
per-(query tile, head) attention kernel writing o to a scratch and the projection
GEMM of ops.mlp reading it: three kernels.
"""
import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from . import _common
from ._registry import register
from .mlp import _mlp_kernel, bind_gemm_from_scratch  # noqa: F401  (aot.py compiles _mlp_kernel as this op's 2nd GEMM)

OP = "e_mhsa"


# ---------------------------------------------------------------------------
# Reference (plain PyTorch; float64 in -> float64 math; independent of the kernels)
# ---------------------------------------------------------------------------
def reference(x, q_w, q_b, k_w, k_b, v_w, v_b, proj_w, proj_b, sr_ratio: int,
              head_dim: int = 32, residual: bool = True) -> torch.Tensor:
    B, C, H, W = x.shape
    N = H * W
    cout = proj_w.shape[0]
    heads = C // head_dim
    t = x.permute(0, 2, 3, 1).reshape(B, N, C)
    q = F.linear(t, q_w.reshape(C, C), q_b)
    if sr_ratio > 1:
        r = sr_ratio * sr_ratio
        kv_in = F.avg_pool1d(t.transpose(1, 2), kernel_size=r, stride=r).transpose(1, 2)
    else:
        kv_in = t
    k = F.linear(kv_in, k_w.reshape(C, C), k_b)
    v = F.linear(kv_in, v_w.reshape(C, C), v_b)
    q = q.reshape(B, N, heads, head_dim).transpose(1, 2)
    k = k.reshape(B, -1, heads, head_dim).transpose(1, 2)
    v = v.reshape(B, -1, heads, head_dim).transpose(1, 2)
    scores = (q @ k.transpose(-1, -2)) * head_dim ** -0.5
    if x.dtype == torch.float64:
        attn = scores.softmax(dim=-1)
    else:
        attn = scores.softmax(dim=-1, dtype=torch.float32).to(x.dtype)
    o = (attn @ v).transpose(1, 2).reshape(B, N, C)
    out = F.linear(o, proj_w.reshape(cout, C), proj_b)
    if residual:
        out = out + t
    out = out.reshape(B, H, W, cout).permute(0, 3, 1, 2)
    return _common.to_channels_last(out)


# ---------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------
@triton.jit
def _kv_kernel(x_ptr, pool_ptr, kw_ptr, kb_ptr, vw_ptr, vb_ptr, kv_ptr,
               N, C, NK, R, ROWS,
               POOL: tl.constexpr, BLOCK_NK: tl.constexpr, BLOCK_R: tl.constexpr,
               BLOCK_K: tl.constexpr, BLOCK_O: tl.constexpr, DOT_PREC: tl.constexpr):
    # Rows are the B*Nk key tokens of the whole batch flattened (row = b*Nk + j),
    # so one program's weight tiles serve BLOCK_NK rows even when Nk is small.
    dt = x_ptr.dtype.element_ty
    pid = tl.program_id(0)
    rows = (pid * BLOCK_NK + tl.arange(0, BLOCK_NK)).to(tl.int64)
    row_mask = rows < ROWS
    b = rows // NK
    j = rows - b * NK
    offs_kk = tl.arange(0, BLOCK_K)
    if POOL:
        # Phase 1: average the R = sr^2 consecutive tokens of each key row in
        # fp32, round to the input dtype (as eager AvgPool1d stores it) and park
        # the pooled tile in a small scratch: x is read exactly once here.
        tok0 = b * N + j * R  # first token of each window, [BLOCK_NK]
        offs_r = tl.arange(0, BLOCK_R)
        for k0 in range(0, C, BLOCK_K):
            offs_k = k0 + offs_kk
            k_mask = offs_k < C
            acc = tl.zeros((BLOCK_NK, BLOCK_K), dtype=tl.float32)
            for r0 in range(0, R, BLOCK_R):
                rr = r0 + offs_r
                tok = tok0[:, None, None] + rr[None, :, None]
                ptrs = x_ptr + tok * C + offs_k[None, None, :]
                mask = (row_mask[:, None, None] & (rr < R)[None, :, None]
                        & k_mask[None, None, :])
                vals = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
                acc += tl.sum(vals, axis=1)
            pooled = (acc / R).to(dt)
            tl.store(pool_ptr + rows[:, None] * C + offs_k[None, :], pooled,
                     mask=row_mask[:, None] & k_mask[None, :])
        # Make the pooled tile written by all threads visible to all threads.
        tl.debug_barrier()
        src = pool_ptr + rows * C  # [BLOCK_NK] row pointers
    else:
        src = x_ptr + (b * N + j) * C
    # Phase 2: k and v for BLOCK_O output channels at a time (the pooled rows
    # come back from L1/L2; they are BLOCK_NK x C elements).
    for o0 in range(0, C, BLOCK_O):
        offs_o = o0 + tl.arange(0, BLOCK_O)
        o_mask = offs_o < C
        acc_k = tl.zeros((BLOCK_NK, BLOCK_O), dtype=tl.float32)
        acc_v = tl.zeros((BLOCK_NK, BLOCK_O), dtype=tl.float32)
        for k0 in range(0, C, BLOCK_K):
            offs_k = k0 + offs_kk
            k_mask = offs_k < C
            a = tl.load(src[:, None] + offs_k[None, :],
                        mask=row_mask[:, None] & k_mask[None, :], other=0.0)
            w_off = offs_o[None, :] * C + offs_k[:, None]  # W^T tile [BLOCK_K, BLOCK_O]
            w_mask = k_mask[:, None] & o_mask[None, :]
            wk = tl.load(kw_ptr + w_off, mask=w_mask, other=0.0)
            wv = tl.load(vw_ptr + w_off, mask=w_mask, other=0.0)
            acc_k = tl.dot(a, wk, acc_k, input_precision=DOT_PREC)
            acc_v = tl.dot(a, wv, acc_v, input_precision=DOT_PREC)
        acc_k += tl.load(kb_ptr + offs_o, mask=o_mask, other=0.0).to(tl.float32)[None, :]
        acc_v += tl.load(vb_ptr + offs_o, mask=o_mask, other=0.0).to(tl.float32)[None, :]
        dst = kv_ptr + rows[:, None] * (2 * C) + offs_o[None, :]
        st_mask = row_mask[:, None] & o_mask[None, :]
        tl.store(dst, acc_k.to(dt), mask=st_mask)
        tl.store(dst + C, acc_v.to(dt), mask=st_mask)


@triton.jit
def _attend_head(x_base, kv_base, qw_ptr, qb_ptr, offs_m, m_mask, hc, C, NK, scale,
                 HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_K: tl.constexpr, ONE_TILE: tl.constexpr, DOT_PREC: tl.constexpr):
    """The attention output o_h [BLOCK_M, HEAD_DIM] (fp32) of the head at channel hc for
    the query tokens offs_m of one image: q_h = t @ q_w[head]^T + q_b[head] (rounded to the
    input dtype), scores over all NK keys, softmax, p @ v_h."""
    dt = x_base.dtype.element_ty
    offs_d = tl.arange(0, HEAD_DIM)
    offs_kk = tl.arange(0, BLOCK_K)
    offs_nn = tl.arange(0, BLOCK_N)
    q = tl.zeros((BLOCK_M, HEAD_DIM), dtype=tl.float32)
    for k0 in range(0, C, BLOCK_K):
        offs_k = k0 + offs_kk
        k_mask = offs_k < C
        a = tl.load(x_base + offs_m[:, None] * C + offs_k[None, :],
                    mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        w = tl.load(qw_ptr + (hc + offs_d)[None, :] * C + offs_k[:, None],
                    mask=k_mask[:, None], other=0.0)
        q = tl.dot(a, w, q, input_precision=DOT_PREC)
    q += tl.load(qb_ptr + hc + offs_d).to(tl.float32)[None, :]
    q_in = q.to(dt)
    if ONE_TILE:
        # All Nk keys fit one tile: plain masked softmax.
        n_mask = offs_nn < NK
        kt = tl.load(kv_base + offs_nn[None, :] * (2 * C) + hc + offs_d[:, None],
                     mask=n_mask[None, :], other=0.0)  # k_h^T [HEAD_DIM, BLOCK_N]
        s = tl.dot(q_in, kt, input_precision=DOT_PREC) * scale
        s = tl.where(n_mask[None, :], s, float("-inf"))
        m = tl.max(s, axis=1)
        m = tl.where(m == float("-inf"), 0.0, m)  # all-masked row guard
        p = tl.exp(s - m[:, None])
        l_i = tl.sum(p, axis=1)
        vh = tl.load(kv_base + offs_nn[:, None] * (2 * C) + C + hc + offs_d[None, :],
                     mask=n_mask[:, None], other=0.0)  # [BLOCK_N, HEAD_DIM]
        o = tl.dot(p.to(dt), vh, input_precision=DOT_PREC)
    else:
        # Online softmax over key tiles.
        m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
        l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
        o = tl.zeros((BLOCK_M, HEAD_DIM), dtype=tl.float32)
        for n0 in range(0, NK, BLOCK_N):
            offs_n = n0 + offs_nn
            n_mask = offs_n < NK
            kt = tl.load(kv_base + offs_n[None, :] * (2 * C) + hc + offs_d[:, None],
                         mask=n_mask[None, :], other=0.0)
            s = tl.dot(q_in, kt, input_precision=DOT_PREC) * scale
            s = tl.where(n_mask[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp(m_i - m_safe)
            p = tl.exp(s - m_safe[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            vh = tl.load(kv_base + offs_n[:, None] * (2 * C) + C + hc + offs_d[None, :],
                         mask=n_mask[:, None], other=0.0)
            o = o * alpha[:, None]
            o = tl.dot(p.to(dt), vh, o, input_precision=DOT_PREC)
            m_i = m_new
    return o / tl.where(l_i == 0.0, 1.0, l_i)[:, None]


@triton.jit
def _attn_kernel(x_ptr, kv_ptr, qw_ptr, qb_ptr, pw_ptr, pb_ptr, out_ptr,
                 N, C, COUT, NK, N_HEADS, scale,
                 HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_K: tl.constexpr, BLOCK_CO: tl.constexpr, ONE_TILE: tl.constexpr,
                 RESIDUAL: tl.constexpr, DOT_PREC: tl.constexpr):
    """Fused mode: per ((batch, BLOCK_M query tokens), BLOCK_CO output channels), for each head
    _attend_head, then acc += o_h @ proj_w[co, head]^T; epilogue bias + residual."""
    dt = x_ptr.dtype.element_ty
    # (batch, query tile) share grid x: grid y/z are limited to 65535, and the batch is not.
    n_tiles = tl.cdiv(N, BLOCK_M)
    pid = tl.program_id(0)
    pid_m = pid % n_tiles
    b = (pid // n_tiles).to(tl.int64)
    pid_co = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < N
    offs_co = pid_co * BLOCK_CO + tl.arange(0, BLOCK_CO)
    co_mask = offs_co < COUT
    offs_d = tl.arange(0, HEAD_DIM)
    x_base = x_ptr + b * N * C
    kv_base = kv_ptr + b * NK * (2 * C)
    acc = tl.zeros((BLOCK_M, BLOCK_CO), dtype=tl.float32)
    for h in range(0, N_HEADS):
        hc = h * HEAD_DIM
        o = _attend_head(x_base, kv_base, qw_ptr, qb_ptr, offs_m, m_mask, hc, C, NK, scale,
                         HEAD_DIM, BLOCK_M, BLOCK_N, BLOCK_K, ONE_TILE, DOT_PREC)
        # acc[BLOCK_M, BLOCK_CO] += o_h @ proj_w[co, head]^T
        pw = tl.load(pw_ptr + offs_co[None, :] * C + hc + offs_d[:, None],
                     mask=co_mask[None, :], other=0.0)  # [HEAD_DIM, BLOCK_CO]
        acc = tl.dot(o.to(dt), pw, acc, input_precision=DOT_PREC)
    acc += tl.load(pb_ptr + offs_co, mask=co_mask, other=0.0).to(tl.float32)[None, :]
    io_mask = m_mask[:, None] & co_mask[None, :]
    if RESIDUAL:
        # Cout == C here, so the residual tile has the output's indexing.
        res = tl.load(x_base + offs_m[:, None] * C + offs_co[None, :], mask=io_mask, other=0.0)
        acc += res.to(tl.float32)
    tl.store(out_ptr + b * N * COUT + offs_m[:, None] * COUT + offs_co[None, :],
             acc.to(dt), mask=io_mask)


@triton.jit
def _attn_heads_kernel(x_ptr, kv_ptr, qw_ptr, qb_ptr, o_ptr,
                       N, C, NK, scale,
                       HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                       BLOCK_K: tl.constexpr, ONE_TILE: tl.constexpr, DOT_PREC: tl.constexpr):
    """Split mode: program ((batch, query tile), head) writes o_h, rounded to the input dtype,
    into the scratch o_ptr [B*N, C]; the projection, its bias and the residual are then one
    GEMM (ops.mlp's _mlp_kernel reading o from memory)."""
    n_tiles = tl.cdiv(N, BLOCK_M)  # (batch, query tile) on grid x, as in _attn_kernel
    pid = tl.program_id(0)
    pid_m = pid % n_tiles
    b = (pid // n_tiles).to(tl.int64)
    hc = tl.program_id(1) * HEAD_DIM
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < N
    o = _attend_head(x_ptr + b * N * C, kv_ptr + b * NK * (2 * C), qw_ptr, qb_ptr, offs_m, m_mask, hc,
                     C, NK, scale, HEAD_DIM, BLOCK_M, BLOCK_N, BLOCK_K, ONE_TILE, DOT_PREC)
    offs_d = tl.arange(0, HEAD_DIM)
    tl.store(o_ptr + (b * N + offs_m)[:, None] * C + hc + offs_d[None, :],
             o.to(o_ptr.dtype.element_ty), mask=m_mask[:, None])


# ---------------------------------------------------------------------------
# Launch configuration (pure Python, enumerable by an AOT tool)
# ---------------------------------------------------------------------------
def _pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def _config(n_tokens: int, channels: int, out_channels: int, n_keys: int,
            head_dim: int, sr_ratio: int) -> dict:
    """Constexprs + num_warps of both kernels: {"kv": {...}, "attn": {...}}.

    Main kernel: BLOCK_M = 64 query tokens.  Its fp32 accumulator is
    [BLOCK_M, BLOCK_CO]; at Cout = 768 a full-width [64, 1024 (pow2)] tile would
    be 256 fp32 registers per thread at 8 warps (spills), so Cout is split into
    BLOCK_CO <= 256 slices across programs (grid axis 1), each recomputing q and
    the attention of its query tile.  [64, 256] fp32 is 64 registers/thread at
    8 warps.  Per query row the work is ~tiles*(C*C + 2*Nk*C) MACs for q and
    attention plus Cout*C for proj, so the widest slice that fits wins: stage 1
    (Cout 192 -> one 256 slice, no recompute), stage 2 (384 -> 2 slices),
    stage 3 (768 -> 3 slices).  BLOCK_M = 64 also matches Hopper's 64-row MMA.
    ptxas (sm_90a, Triton 3.8, fp16) for [64, 256] at 8 warps: 255 registers and
    ~250 bytes of spill; [64, 128] spills 4 bytes but recomputes q and the
    attention twice at stage 1 (~55% more MMA work): not yet timed on a GPU.
    Keys: Nk <= 64 (every stage at 224, Nk = 49) -> one key tile and a plain
    softmax; else 64-key tiles with an online softmax (Nk = 144 at 384).
    """
    C, cout, r = channels, out_channels, sr_ratio * sr_ratio
    block_k = 64 if C % 64 == 0 else (32 if C % 32 == 0 else 16)
    one_tile = n_keys <= 64
    block_n = max(16, _pow2(n_keys)) if one_tile else 64
    block_co = min(256, max(16, _pow2(cout)))
    attn = dict(BLOCK_M=64, BLOCK_N=block_n, BLOCK_K=block_k, BLOCK_CO=block_co,
                ONE_TILE=one_tile, num_warps=8 if block_co >= 128 else 4)
    # KV kernel: rows are the B*Nk key tokens of the whole batch, 64 per program
    # (32 when each pooled row reads >= 4 tokens, to spread the pooling reads
    # over more programs); the pooling step loads [BLOCK_NK, BLOCK_R, BLOCK_K].
    # Two [BLOCK_NK, BLOCK_O] fp32 accumulators (k and v) of 4096 elements each,
    # 8 warps: ptxas (sm_90a, fp16) shows no spills there, but ~1 KB at 4 warps
    # and ~390 bytes for [64, 128].
    block_nk = 32 if r >= 4 else 64
    block_r = max(1, min(_pow2(r), 4096 // (block_nk * block_k)))
    kv = dict(POOL=r > 1, BLOCK_NK=block_nk, BLOCK_R=block_r, BLOCK_K=block_k,
              BLOCK_O=min(4096 // block_nk, max(16, _pow2(C))), num_warps=8)
    # Split mode (Cout > 256, stages 2 and 3): one program per (query tile, head) writes o_h to
    # a [B*N, C] scratch, then the projection GEMM (+ bias, residual) reads it: q and the
    # attention are computed once instead of once per BLOCK_CO slice, and at batch 1 the heads
    # run in parallel instead of in sequence (stage 3: 24 heads, one program per 64 queries).
    # Roofline at batch 256: the recompute costs ~2x (stage 3) / ~1x (stage 2) the q projection
    # FLOPs, the scratch round trip ~13 / ~26 us of traffic. Not measured.
    heads = dict(BLOCK_M=64, BLOCK_N=block_n, BLOCK_K=block_k, ONE_TILE=one_tile, num_warps=4)
    proj = dict(BLOCK_M=128, BLOCK_N=128, BLOCK_H=64, BLOCK_K=32, num_warps=8, num_stages=2)
    return {"kv": kv, "attn": attn, "split": cout > 256, "heads": heads, "proj": proj}


# ---------------------------------------------------------------------------
# Launcher (registered as torch.ops.nextvit.e_mhsa)
# ---------------------------------------------------------------------------
def _fake(x, q_w, q_b, k_w, k_b, v_w, v_b, proj_w, proj_b, sr_ratio, head_dim, residual):
    return _common.fake_output(x, x.shape[0], proj_w.shape[0], x.shape[2], x.shape[3])


def bind(x_shape, q_w, q_b, k_w, k_b, v_w, v_b, proj_w, proj_b, *, sr_ratio: int, head_dim: int = 32,
         residual: bool = True):
    """Everything that depends only on the shapes, done once: returns ``(run, out_shape)``
    with ``run(x, x2=None) -> out`` for a channels_last x of ``x_shape`` (x2 unused)."""
    B, C, H, W = x_shape
    N = H * W
    q_w, q_b, k_w, k_b, v_w, v_b, proj_w, proj_b = (
        t.contiguous() for t in (q_w, q_b, k_w, k_b, v_w, v_b, proj_w, proj_b))
    cout = proj_w.shape[0]
    r = sr_ratio * sr_ratio
    nk = N // r
    cfg = _config(N, C, cout, nk, head_dim, sr_ratio)
    prec = "ieee" if q_w.dtype == torch.float32 else "tf32"
    scale = float(head_dim) ** -0.5
    rows = B * nk
    kvc = dict(cfg["kv"])
    kv_kernel = _kv_kernel[(triton.cdiv(rows, kvc["BLOCK_NK"]),)]
    kv_kw = dict(DOT_PREC=prec, **kvc)

    def keys_values(x):
        kv = _common.new_scratch(x, B, nk, 2 * C)
        pooled = _common.new_scratch(x, B, nk, C) if r > 1 else kv
        kv_kernel(x, pooled, k_w, k_b, v_w, v_b, kv, N, C, nk, r, rows, **kv_kw)
        return kv

    if cfg["split"]:
        hc = dict(cfg["heads"])
        heads = _attn_heads_kernel[(B * triton.cdiv(N, hc["BLOCK_M"]), C // head_dim)]
        heads_kw = dict(HEAD_DIM=head_dim, DOT_PREC=prec, **hc)
        proj = bind_gemm_from_scratch(B * N, C, cout, True, residual, dict(cfg["proj"], DOT_PRECISION=prec))

        def run(x: torch.Tensor, x2=None) -> torch.Tensor:
            kv = keys_values(x)
            out = _common.new_output(x, B, cout, H, W)
            o = _common.new_scratch(x, B * N, C)
            heads(x, kv, q_w, q_b, o, N, C, nk, scale, **heads_kw)
            proj(x, o, proj_w, proj_b, out)
            return out

        return run, (B, cout, H, W)
    atc = dict(cfg["attn"])
    attn = _attn_kernel[(B * triton.cdiv(N, atc["BLOCK_M"]), triton.cdiv(cout, atc["BLOCK_CO"]))]
    attn_kw = dict(HEAD_DIM=head_dim, RESIDUAL=residual, DOT_PREC=prec, **atc)

    def run(x: torch.Tensor, x2=None) -> torch.Tensor:
        kv = keys_values(x)
        out = _common.new_output(x, B, cout, H, W)
        attn(x, kv, q_w, q_b, proj_w, proj_b, out, N, C, cout, nk, C // head_dim, scale, **attn_kw)
        return out

    return run, (B, cout, H, W)


@register(OP, fake=_fake)
def _launch(x: torch.Tensor, q_w: torch.Tensor, q_b: torch.Tensor, k_w: torch.Tensor,
            k_b: torch.Tensor, v_w: torch.Tensor, v_b: torch.Tensor, proj_w: torch.Tensor,
            proj_b: torch.Tensor, sr_ratio: int, head_dim: int, residual: bool) -> torch.Tensor:
    x = _common.to_channels_last(x)
    run, _ = bind(x.shape, q_w, q_b, k_w, k_b, v_w, v_b, proj_w, proj_b, sr_ratio=sr_ratio,
                  head_dim=head_dim, residual=residual)
    with _common.on_device(x):
        return run(x)


# ---------------------------------------------------------------------------
# Public function
# ---------------------------------------------------------------------------
def e_mhsa(x, q_w, q_b, k_w, k_b, v_w, v_b, proj_w, proj_b, *, sr_ratio: int,
           head_dim: int = 32, residual: bool = True, impl: str = "auto") -> torch.Tensor:
    """Fused E-MHSA with folded BatchNorms; see the module docstring for the math.

    x: [B, C, H, W] in any memory format; q_w/k_w/v_w: [C, C] (or [C, C, 1, 1]);
    proj_w: [Cout, C]; biases [C] / [Cout].  Returns [B, Cout, H, W], channels_last.
    """
    if isinstance(head_dim, bool) or not isinstance(head_dim, int) or head_dim < 16 \
            or head_dim > 128 or head_dim & (head_dim - 1):
        raise ValueError(f"{OP}: head_dim must be a power of two in [16, 128], got {head_dim!r}")
    _common.check_activation(OP, "x", x, multiple_of=head_dim)
    if isinstance(sr_ratio, bool) or not isinstance(sr_ratio, int) or sr_ratio < 1:
        raise ValueError(f"{OP}: sr_ratio must be an int >= 1, got {sr_ratio!r}")
    B, C, H, W = x.shape
    r = sr_ratio * sr_ratio
    if H * W < r:
        raise ValueError(
            f"{OP}: the {H}x{W} map has {H * W} tokens, fewer than one pooling window of "
            f"sr_ratio^2 = {r} tokens (sr_ratio={sr_ratio})")
    q_w = _common.as_matrix(OP, "q_w", q_w, x, C, C)
    k_w = _common.as_matrix(OP, "k_w", k_w, x, C, C)
    v_w = _common.as_matrix(OP, "v_w", v_w, x, C, C)
    proj_w = _common.as_matrix(OP, "proj_w", proj_w, x, None, C)
    cout = proj_w.shape[0]
    q_b = _common.check_param(OP, "q_b", q_b, x, (C,))
    k_b = _common.check_param(OP, "k_b", k_b, x, (C,))
    v_b = _common.check_param(OP, "v_b", v_b, x, (C,))
    proj_b = _common.check_param(OP, "proj_b", proj_b, x, (cout,))
    if residual and cout != C:
        raise ValueError(
            f"{OP}: residual=True needs proj_w to map back to the {C} input channels, "
            f"but it has {cout} output channels")
    residual = bool(residual)
    x = _common.to_channels_last(x)
    impl = _common.resolve_impl(OP, impl, x)
    if impl == "reference":
        return reference(x, q_w, q_b, k_w, k_b, v_w, v_b, proj_w, proj_b, sr_ratio,
                         head_dim, residual)
    return torch.ops.nextvit.e_mhsa(x, q_w, q_b, k_w, k_b, v_w, v_b, proj_w, proj_b,
                                    sr_ratio, head_dim, residual)
