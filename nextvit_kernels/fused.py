"""Folding and walking the fused inference graph of docs/design.md §4 (folding: §3).

``fold(model, device, dtype)`` turns a NextViT module (BatchNorms merged or not; or a view of a
timm Next-ViT with the same layout, ``timm_patch``) into a
``plan.Plan``: a flat list of steps whose parameters have every BatchNorm folded in (in
float64, then cast once). ``run(plan, x, impl)`` executes a plan with the ops of
``nextvit_kernels.ops`` (or any backend with their signatures) in channels_last, and
``Program`` is the same walk with every op bound once for one input shape. Which of them runs
an input, and when a plan is folded again, is the engine's business (``engine.py``).

The ops (and with them Triton) are imported on the first walk, not here: folding a model for
the C runtime compiles nothing.
"""
import time
import warnings
from typing import List, Tuple

import torch
from torch import nn

from .blocks import affine_then_linear, bn_scale_shift, compose_affine
from .plan import Plan, Step, model_tensors, weights_key

Tensor = torch.Tensor


def _ops():
    from . import ops  # (an import statement, not importlib: dynamo traces this under torch.compile)
    return ops


# ------------------------------------------------------------------ folding
def _conv_then_bn(conv: nn.Conv2d, bn) -> Tuple[Tensor, Tensor]:
    """BN after a conv: W' = W*s[:, None..], b' = s*b + t (float64)."""
    w = conv.weight.double()
    b = conv.bias.double() if conv.bias is not None else torch.zeros(w.shape[0], dtype=torch.float64,
                                                                      device=w.device)
    aff = bn_scale_shift(bn)
    if aff is None:
        return w, b
    s, t = aff
    return w * s.view(-1, *([1] * (w.dim() - 1))), s * b + t


def _patch_embed_steps(pe, stride) -> List[Step]:
    if isinstance(pe.conv, nn.Identity):
        return []
    w, b = _conv_then_bn(pe.conv, pe.norm)
    return [Step("patch_embed", [w.reshape(w.shape[0], w.shape[1]), b], {"stride": stride})]


def _mhca_step(m) -> Step:
    cw, cb = _conv_then_bn(m.group_conv3x3, m.norm)
    pw = m.projection.weight.double()
    return Step("mhca", [cw, cb, pw.reshape(pw.shape[0], pw.shape[1])])


def _mlp_step(mlp, pre_norm) -> Step:
    w1, b1 = affine_then_linear(mlp.conv1.weight, mlp.conv1.bias, bn_scale_shift(pre_norm))
    w2 = mlp.conv2.weight.double()
    return Step("mlp", [w1, b1, w2.reshape(w2.shape[0], w2.shape[1]), mlp.conv2.bias.double()])


def _e_mhsa_step(a, pre_norm) -> Step:
    pre = bn_scale_shift(pre_norm)
    kv_aff = compose_affine(pre, bn_scale_shift(a.norm)) if a.sr_ratio > 1 else pre
    qw, qb = affine_then_linear(a.q.weight, a.q.bias, pre)
    kw, kb = affine_then_linear(a.k.weight, a.k.bias, kv_aff)
    vw, vb = affine_then_linear(a.v.weight, a.v.bias, kv_aff)
    return Step("e_mhsa", [qw, qb, kw, kb, vw, vb, a.proj.weight.double(), a.proj.bias.double()],
                {"sr_ratio": a.sr_ratio, "head_dim": a.head_dim})


@torch.no_grad()
def fold(model: nn.Module, device=None, dtype=None) -> Plan:
    """The plan of ``model`` (a NextViT, in eval mode) on ``device`` in ``dtype`` (default: the
    model's own). Only the published layout is read (``stem``, ``features``, ``stage_out_idx``,
    ``norm``, ``proj_head``, ``extra_norm_list`` and the blocks' parts), so a module that has it
    folds too; ``proj_head`` None folds a plan without a head (it runs features only)."""
    if model.training:
        raise ValueError("the fused graph uses BatchNorm running statistics: call model.eval() first")
    p = next(model.parameters())
    device = torch.device(device) if device is not None else p.device
    dtype = dtype or p.dtype
    # The key is taken before the weights are read: a write that lands while they are read
    # (another thread's) then makes the plan stale at once, rather than marking it current with
    # the old values folded in.
    source = model_tensors(model)
    key = weights_key(source)
    steps: List[Step] = []
    for conv_bn in model.stem:
        w, b = _conv_then_bn(conv_bn.conv, conv_bn.norm)
        steps.append(Step("conv_bn_relu", [w, b], {"stride": conv_bn.conv.stride[0]}))
    stage_of_end = {idx: s for s, idx in enumerate(model.stage_out_idx)}
    for idx, blk in enumerate(model.features):
        stride = blk.patch_embed.stride
        steps += _patch_embed_steps(blk.patch_embed, stride)
        if hasattr(blk, "e_mhsa"):  # an NTB (by its parts: a view of another layout has no NTB class)
            steps.append(_e_mhsa_step(blk.e_mhsa, blk.norm1))
            proj = _patch_embed_steps(blk.projection, 1)[0]
            proj.to_branch = True
            mhca = _mhca_step(blk.mhca)
            mhca.from_branch = mhca.to_branch = True
            mlp = _mlp_step(blk.mlp, blk.norm2)
            mlp.x2_branch = True
            steps += [proj, mhca, mlp]
        elif hasattr(blk, "mhca"):  # an NCB
            steps.append(_mhca_step(blk.mhca))
            steps.append(_mlp_step(blk.mlp, blk.norm))
        else:
            raise ValueError(f"unknown block type {type(blk).__name__}")
        steps[-1].stage_end = stage_of_end.get(idx, -1)
    head = None
    if model.proj_head is not None:
        head = affine_then_linear(model.proj_head[0].weight, model.proj_head[0].bias, bn_scale_shift(model.norm))
    extra = None
    if model.extra_norm_list is not None:
        extra = [bn_scale_shift(bn) for bn in model.extra_norm_list]
        extra = [(s.to(device, dtype), t.to(device, dtype)) for s, t in extra]

    def cast(t):
        return t.to(device=device, dtype=dtype).contiguous()

    for s in steps:
        s.tensors = [cast(t) for t in s.tensors]
    return Plan(device, dtype, steps, None if head is None else tuple(map(cast, head)), extra, source, key)


# ------------------------------------------------------------------ running
COMPILE_NOTICE_S = 1.0  # a first launch slower than this compiled a kernel
_compile_noticed = False


def _stage_norm(plan: Plan, step: Step, features: bool):
    """The extra BatchNorm's (scale, shift) as [1, C, 1, 1] views where ``step`` ends a stage
    of a features forward of a backbone that has them, else None."""
    if features and step.stage_end >= 0 and plan.extra_norms is not None:
        return tuple(t.view(1, -1, 1, 1) for t in plan.extra_norms[step.stage_end])
    return None


def _call(fn, step: Step, norm) -> tuple:
    """One entry of what ``_walk`` runs: ``fn(input, x2)`` and where its tensors come from and go."""
    return fn, step.from_branch, step.to_branch, step.x2_branch, step.stage_end >= 0, norm


def _walk(x: Tensor, calls, features: bool, head, on_step=None):
    """The dataflow of a plan: each call reads the main tensor or the NTB branch (and the branch
    as x2 for the concat-MLP), writes one of them; stage ends are collected for ``features``."""
    x = x.contiguous(memory_format=torch.channels_last)
    branch = None
    outs = []
    for fn, from_branch, to_branch, x2_branch, stage_end, norm in calls:
        y = fn(branch if from_branch else x, branch if x2_branch else None)
        if on_step is not None:
            on_step()
        if to_branch:
            branch = y
            continue
        x = y
        if features and stage_end:
            if norm is not None:  # applied in line, as the published detection backbone does
                x = torch.addcmul(norm[1], x, norm[0])
            outs.append(x)
    return outs if features else head(x)


class Program:
    """The forward for one input shape with every op bound once (``ops.<op>.bind``: grids,
    strides, launch configurations, scratch sizes), so a call only allocates outputs and
    launches kernels: no custom-op dispatch and no per-op checks. Inputs are checked once,
    by the caller, against the shape the program was bound for. Used in eager mode; under
    tracing (``torch.compile``, export) ``run`` goes through the registered ops."""

    def __init__(self, plan: Plan, shape, features: bool):
        self.shape, self.features = tuple(shape), features
        self.calls = []
        main, branch = self.shape, None
        for s in plan.steps:
            kwargs = dict(s.kwargs)
            if s.x2_branch:
                kwargs["x2_channels"] = branch[1]
            run_op, out = _ops().module(s.op).bind(branch if s.from_branch else main, *s.tensors, **kwargs)
            self.calls.append(_call(run_op, s, _stage_norm(plan, s, features)))
            if s.to_branch:
                branch = out
            else:
                main = out
        # A features forward ends at the stage outputs: a backbone's plan has no head to bind.
        self.head = None if features else _ops().module("head").bind(main, *plan.head)[0]
        self.compiled = False

    def __call__(self, x: Tensor):
        if not self.compiled and x.is_cuda:
            return self._first_call(x)
        return self._run(x, None)

    def _run(self, x: Tensor, on_step):
        return _walk(x, self.calls, self.features, self.head, on_step)

    def _first_call(self, x: Tensor):
        """The first call on a GPU JIT-compiles the kernels not yet in Triton's on-disk cache
        (seconds each): say so as soon as one compile is seen, once per process."""
        last = [time.perf_counter()]

        def on_step():
            global _compile_noticed
            now = time.perf_counter()
            if not _compile_noticed and now - last[0] > COMPILE_NOTICE_S:
                _compile_noticed = True
                warnings.warn(
                    f"nextvit_kernels: compiling the fused kernels for this input shape (up to "
                    f"{len(self.calls) + 1} ops, a few seconds each). Triton caches them on disk, so "
                    "this happens once per machine and kernel configuration.", stacklevel=6)
            last[0] = now

        out = self._run(x, on_step)
        self.compiled = True
        return out


def run(plan: Plan, x: Tensor, impl: str = "auto", features: bool = False, backend=None):
    """Executes the plan. Returns logits, or the per-stage feature maps with ``features``.

    ``backend`` provides one function per op with the signatures of
    ``nextvit_kernels.ops`` (the default; the C library's per-op binding ``nextvit_kernels.clib``
    provides the same)."""
    backend = _ops() if backend is None else backend
    calls = [_call(_backend_op(backend, s, impl), s, _stage_norm(plan, s, features)) for s in plan.steps]
    return _walk(x, calls, features, lambda h: backend.head(h, *plan.head, impl=impl))


def _backend_op(backend, step: Step, impl: str):
    fn = getattr(backend, step.op)

    def call(inp, x2=None):
        kwargs = dict(step.kwargs, impl=impl)
        if step.x2_branch:
            kwargs["x2"] = x2
        return fn(inp, *step.tensors, **kwargs)

    return call
