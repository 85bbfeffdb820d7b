"""The fused inference graph of docs/design.md §4 (folding: §3).

``fold(model, device, dtype)`` turns a NextViT (BatchNorms merged or not) into a
flat list of steps whose parameters have every BatchNorm folded in (in float64,
then cast once), and ``run(plan, x, impl)`` executes them with the ops of
``nextvit_kernels.ops`` in channels_last. The same plan drives the Triton path,
the reference path, ONNX export and the C library.
"""
import importlib
import operator
import threading
import time
import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, List, Optional, Tuple

import torch
from torch import nn

from . import ops
from .graphs import GraphCache
from .blocks import NCB, NTB, affine_then_linear, bn_scale_shift, compose_affine

if TYPE_CHECKING:
    from .model import NextViT

Tensor = torch.Tensor


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


@dataclass
class Step:
    """One fused op call: ``op`` names a function of ``nextvit_kernels.ops``,
    ``tensors`` are its weight arguments in order, ``kwargs`` its keyword
    arguments. In an NTB the MHCA branch (projection, MHCA) reads and writes a
    second tensor, which the concat-MLP then takes as ``x2``."""
    op: str
    tensors: List[Tensor]
    kwargs: dict = field(default_factory=dict)
    from_branch: bool = False  # input is the branch tensor instead of the main one
    to_branch: bool = False    # output becomes the branch tensor
    x2_branch: bool = False    # the branch tensor is passed as x2 (never concatenated)
    stage_end: int = -1        # index of the stage this step ends, else -1


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


# Guards binding into a plan's ``programs`` and making its ``graphs``: threads share a model's
# plan. One lock for every plan (binding a shape takes about a millisecond, once), as dynamo,
# which traces fold, cannot make one per plan.
_PLANS_LOCK = threading.Lock()


@dataclass
class Plan:
    device: torch.device
    dtype: torch.dtype
    steps: List[Step]
    head: Tuple[Tensor, Tensor]
    extra_norms: Optional[List[Tuple[Tensor, Tensor]]] = None
    source: List[Tensor] = field(default_factory=list)  # the model tensors it was folded from
    key: tuple = ()
    programs: dict = field(default_factory=dict)  # (shape, features) -> Program
    graphs: Optional[GraphCache] = None  # made on first use (eager only: dynamo traces fold)
    # The whole-model C runtime (runtime.Model) holding this plan, or why it cannot (NextViT, kernels
    # "auto" / "clib"), the input signatures checked for it, and those it failed on.
    clib: object = None
    clib_seen: set = field(default_factory=set)
    clib_failed: set = field(default_factory=set)

    def is_current(self) -> bool:
        return self.key == weights_key(self.source)

    def program(self, shape, features: bool = False) -> "Program":
        """The bound forward for inputs of ``shape`` (cached; the oldest of more than
        ``MAX_PROGRAMS`` shapes is dropped)."""
        key = (tuple(shape), features)
        prog = self.programs.get(key)
        if prog is None:
            with _PLANS_LOCK:
                prog = self.programs.get(key)  # bound by another thread while this one waited?
                if prog is None:
                    prog = Program(self, key[0], features)
                    if len(self.programs) >= MAX_PROGRAMS:
                        self.programs.pop(next(iter(self.programs)))
                    self.programs[key] = prog
        return prog

    def graph_cache(self, max_graphs: int) -> GraphCache:
        if self.graphs is None:
            with _PLANS_LOCK:
                if self.graphs is None:
                    self.graphs = GraphCache(max_graphs)
        self.graphs.max_graphs = max_graphs
        return self.graphs

    def release(self):
        """Frees what this plan holds beyond its weights: bound programs and CUDA graphs. A
        thread still running the plan finishes correctly, and captures no graph from then on."""
        with _PLANS_LOCK:
            if self.graphs is None:
                self.graphs = GraphCache()
            self.programs.clear()
            self.clib = None  # its weights are freed once no running forward holds it
        self.graphs.close()

    def launches(self, batch: int = 1, height: int = 224, width: int = 224) -> int:
        """Kernel launches of one forward at this input size: one per op, two for E-MHSA
        (K/V pooling, attention; three when wider than 256 outputs), for an MLP wider than
        256 outputs and for an MHCA on few pixels (their split modes, see the op modules),
        one for the head."""
        sizes, _ = spatial_sizes(self, height, width)
        return sum(_kernels(s, self.dtype, batch * h * w) for s, (h, w) in zip(self.steps, sizes)) + 1


def spatial_sizes(plan: "Plan", height: int, width: int):
    """The (H, W) each step's input has for an image of height x width, and the head's."""
    h, w = height, width
    sizes = []
    for s in plan.steps:
        sizes.append((h, w))
        st = s.kwargs.get("stride", 1)
        if s.op == "conv_bn_relu":  # 3x3, padding 1
            h, w = (h - 1) // st + 1, (w - 1) // st + 1
        elif s.op == "patch_embed" and not s.to_branch:  # ceil-mode pooling
            h, w = -(-h // st), -(-w // st)
    return sizes, (h, w)


def _kernels(step: Step, dtype: torch.dtype, pixels: int) -> int:
    if step.op == "e_mhsa":
        qw, _, _, _, _, _, pw, _ = step.tensors
        hd = step.kwargs.get("head_dim", 32)
        cfg = importlib.import_module(".ops.e_mhsa", __package__)._config(1, qw.shape[0], pw.shape[0], 1, hd,
                                                                          step.kwargs["sr_ratio"])
        return 3 if cfg["split"] else 2
    if step.op == "mlp":
        w1, _, w2, _ = step.tensors
        cfg = importlib.import_module(".ops.mlp", __package__)._config(w1.shape[1], 0, w1.shape[0], w2.shape[0], dtype)
        return 2 if cfg["split"] else 1
    if step.op == "mhca":
        cw, _, pw = step.tensors
        esize = torch.empty((), dtype=dtype).element_size()
        cfg = importlib.import_module(".ops.mhca", __package__)._config(cw.shape[0], pw.shape[0], esize, pixels)
        return 2 if cfg["split"] else 1
    return 1


def model_tensors(model: nn.Module) -> List[Tensor]:
    """What the folded plan is computed from: parameters and BatchNorm statistics
    (num_batches_tracked counts training steps and folds into nothing)."""
    return list(model.parameters()) + [b for n, b in model.named_buffers() if not n.endswith("num_batches_tracked")]


_version = operator.attrgetter("_version")


def weights_key(tensors: List[Tensor]) -> tuple:
    """Changes whenever one of ``tensors`` gets new storage (``.to()``, ``.half()``,
    ``.data =``) or is modified in place (optimizer steps, ``load_state_dict``, an EMA
    update): version counters only grow, so their sum grows with any in-place write.
    Two passes in C over the tensors (~60 ns a tensor), no Python per tensor."""
    if torch.compiler.is_compiling():
        return ()  # dynamo cannot trace the C passes; the next eager call folds once more
    return sum(map(_version, tensors)), sum(map(Tensor.data_ptr, tensors))


@torch.no_grad()
def fold(model: "NextViT", device=None, dtype=None) -> Plan:
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
        if isinstance(blk, NCB):
            steps.append(_mhca_step(blk.mhca))
            steps.append(_mlp_step(blk.mlp, blk.norm))
        elif isinstance(blk, NTB):
            steps.append(_e_mhsa_step(blk.e_mhsa, blk.norm1))
            proj = _patch_embed_steps(blk.projection, 1)[0]
            proj.to_branch = True
            mhca = _mhca_step(blk.mhca)
            mhca.from_branch = mhca.to_branch = True
            mlp = _mlp_step(blk.mlp, blk.norm2)
            mlp.x2_branch = True
            steps += [proj, mhca, mlp]
        else:
            raise ValueError(f"unknown block type {type(blk).__name__}")
        steps[-1].stage_end = stage_of_end.get(idx, -1)
    hw, hb = affine_then_linear(model.proj_head[0].weight, model.proj_head[0].bias, bn_scale_shift(model.norm))
    extra = None
    if model.extra_norm_list is not None:
        extra = [bn_scale_shift(bn) for bn in model.extra_norm_list]
        extra = [(s.to(device, dtype), t.to(device, dtype)) for s, t in extra]

    def cast(t):
        return t.to(device=device, dtype=dtype).contiguous()

    for s in steps:
        s.tensors = [cast(t) for t in s.tensors]
    return Plan(device, dtype, steps, (cast(hw), cast(hb)), extra, source, key)


# ------------------------------------------------------------------ running
MAX_PROGRAMS = 64
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
            run_op, out = ops.module(s.op).bind(branch if s.from_branch else main, *s.tensors, **kwargs)
            self.calls.append(_call(run_op, s, _stage_norm(plan, s, features)))
            if s.to_branch:
                branch = out
            else:
                main = out
        self.head, _ = ops.module("head").bind(main, *plan.head)
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


def run(plan: Plan, x: Tensor, impl: str = "auto", features: bool = False, backend=ops):
    """Executes the plan. Returns logits, or the per-stage feature maps with ``features``.

    ``backend`` provides one function per op with the signatures of
    ``nextvit_kernels.ops`` (the C library's Python binding provides the same)."""
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
