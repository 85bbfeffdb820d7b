"""The whole model: NextViT-S/B/L at 224x224 (the documented batch sizes 1 and 256), one group
per variant, batch and dtype, with

- ``triton``: ``model(x)`` on the Triton kernels without CUDA graphs (``cuda_graphs="off"``: the
  bound programs, launched from Python each call); ``triton_auto``: ``model(x)`` as it runs by
  default on a GPU (automatic CUDA graphs, output copied out); ``triton_graph``: the zero-copy
  fixed-shape replay of ``model.cuda_graph`` (the last two GPU only);
- ``reference``: the same fused plan on the ops' PyTorch references;
- ``eager``: the model's module graph with its BatchNorms merged (``merge_bn``, the deploy mode),
  i.e. eager PyTorch; ``compile``: ``torch.compile`` of that module (GPU only).

Bytes, FLOPs and the floor of a forward are the sums over its op calls (ops_bench's cost model).
On a CPU: a tiny NextViT (depths 1,1,5,1, 10 classes) at 32x32, batch 1.
"""
import pytest
import torch
import torch._dynamo

import nextvit_kernels as nk
import ops_bench as ob
import profile_plan
from nextvit_kernels import cli, fused

IMPLS = ("triton", "triton_auto", "triton_graph", "reference", "eager", "compile")
_MODEL = {}  # the last built model: its benchmarks run one after the other


def plan_calls(model, res):
    """(op, ops_bench shape dict) of every op call of one fused forward at res x res, batch 1:
    the plan run on meta tensors through profile_plan's recording backend."""
    plan = fused.fold(model, "meta", torch.float32)
    rec = profile_plan.Recorder(torch, ob.ops, cuda=False, impl="reference")
    with torch.no_grad():
        fused.run(plan, torch.empty(1, 3, res, res, device="meta"), impl="reference", backend=rec)
    return [(op, profile_plan.describe(op, args, kwargs)[1]) for op, args, kwargs, _, _ in rec.calls]


def model_cost(calls, batch, dtype):
    total = dict(bytes=0, flops=0, floor_ms=0.0)
    for op, shape in calls:
        for k, v in ob.costs(op, shape, batch, dtype).items():
            total[k] += v
    return total


def pytest_generate_tests(metafunc):
    s = metafunc.config._nextvit
    params = [(v, b, dt) for dt in s.dtypes for v in s.variants for b in s.model_batches]
    metafunc.parametrize("case", params, ids=[f"{v}:B{b}:{dt}" for v, b, dt in params])
    metafunc.parametrize("impl", IMPLS)


def _randomize_bn(model):
    with torch.no_grad():  # random statistics, so that no BatchNorm folds to an identity
        for m in model.modules():
            if isinstance(m, (torch.nn.BatchNorm2d, torch.nn.BatchNorm1d)):
                m.running_var.uniform_(0.5, 1.5)
                m.running_mean.normal_(0, 0.1)


def _built(case, settings):
    if _MODEL.get("key") != case:
        _MODEL.clear()
        variant, batch, dtype = case
        dev = torch.device("cuda" if settings.gpu else "cpu")
        torch.manual_seed(0)
        m = (nk.NextViT(depths=(1, 1, 5, 1), num_classes=10) if variant == "tiny"
             else getattr(nk, cli.VARIANTS[variant])())
        _randomize_bn(m.eval())
        calls = plan_calls(m, settings.res)
        m = m.merge_bn().to(dev, getattr(torch, ob.DTYPE_NAMES[dtype]), memory_format=torch.channels_last)
        m.kernels = "reference"  # forward() runs the module graph: the eager baseline
        x = torch.randn(batch, 3, settings.res, settings.res, device=dev).to(m.proj_head[0].weight.dtype)
        x = x.contiguous(memory_format=torch.channels_last)
        with torch.no_grad():
            ref = m(x)
        if dev.type == "cuda":
            torch.cuda.empty_cache()
        _MODEL.update(key=case, model=m, x=x, ref=ref, cost=model_cost(calls, batch, dtype), steps=len(calls))
    return _MODEL


@torch.no_grad()
def test_model(measure, settings, case, impl):
    variant, batch, dtype = case
    if not settings.gpu and impl in ("triton_auto", "triton_graph", "compile"):
        pytest.skip({"triton_auto": "CUDA graphs need a GPU", "triton_graph": "CUDA graphs need a GPU",
                     "compile": "torch.compile of the whole model on a CPU takes minutes; CPU mode compiles "
                                "one op case (test_bench_ops)"}[impl])
    b = _built(case, settings)
    m, x = b["model"], b["x"]
    if impl in ("triton", "triton_auto"):
        graphs = "off" if impl == "triton" else "auto"

        def fn():
            m.kernels, m.cuda_graphs = "triton", graphs
            try:
                return m(x)
            finally:
                m.kernels, m.cuda_graphs = "reference", "auto"
    elif impl == "reference":
        plan = m.fused_plan(x.device, x.dtype)
        fn = lambda: fused.run(plan, x, impl=impl)
    elif impl == "triton_graph":
        m.kernels = "triton"
        try:
            graphed = m.cuda_graph(x)
        finally:
            m.kernels = "reference"
        fn = lambda: graphed(x)
    elif impl == "eager":
        fn = lambda: m(x)
    else:
        why = settings.skip_reason(compile_row=True)
        if why:
            pytest.skip(why)
        torch._dynamo.reset()
        compiled = torch.compile(m)
        fn = lambda: compiled(x)
    measure(fn, group=f"model {variant} B{batch} {dtype} {settings.res}x{settings.res}",
            info=dict(kind="model", variant=variant, batch=batch, dtype=dtype, res=settings.res, impl=impl,
                      op_calls=b["steps"]),
            check=None if impl == "eager" else (lambda out: ob.rel_error(out, b["ref"])),
            tol=ob.TOLERANCE[dtype], cost=b["cost"], compile_row=impl == "compile")
