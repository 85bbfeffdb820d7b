"""Every fused op at the Next-ViT stage shapes, next to what it replaces.

One group per op shape, batch and dtype; in it the public op with ``impl="triton"`` (the
fused kernel), ``impl="reference"`` (its PyTorch reference: the same folded math, unfused),
the eager sequence of the unfolded model (BatchNorm modules, cuDNN convs) and
``torch.compile`` of that eager sequence. Every output is checked against eager first.
Shapes, costs and eager modules come from ops_bench; see bench/README.md.
"""
import pytest
import torch
import torch._dynamo

import ops_bench as ob

IMPLS = ("triton", "reference", "eager", "compile")
_CASE = {}  # the last built case: its four benchmarks run one after the other


def pytest_generate_tests(metafunc):
    s = metafunc.config._nextvit
    params = [(op, shape, label, b, dt) for dt in s.dtypes for b in s.batches
              for op, shape, label in ob.cases(tiny=not s.gpu)]
    metafunc.parametrize("case", params, ids=[f"{p[0]}:{p[2].replace(' ', '')}:B{p[3]}:{p[4]}" for p in params])
    metafunc.parametrize("impl", IMPLS)


def _built(case, dev):
    if _CASE.get("key") != case:
        _CASE.clear()
        if dev.type == "cuda":
            torch.cuda.empty_cache()
        op, shape, _, batch, dtype = case
        torch.manual_seed(0)
        with torch.no_grad():
            c = ob.build(op, shape, batch, dev, dtype)
            ref = c.eager(*c.args)
        _CASE.update(key=case, case=c, ref=ref)
    return _CASE["case"], _CASE["ref"]


@torch.no_grad()
def test_op(measure, settings, case, impl):
    op, shape, label, batch, dtype = case
    if impl == "compile" and not settings.gpu and case != _cpu_compile_case(settings):
        pytest.skip("CPU mode compiles one op case only (inductor's C++ build is slow); a GPU run compiles all")
    dev = torch.device("cuda") if settings.gpu else torch.device("cpu")
    c, ref = _built(case, dev)
    as_ref = lambda out: out
    if impl in ("triton", "reference"):
        fn, as_ref = c.call(impl), c.as_ref
    elif impl == "eager":
        fn = lambda: c.eager(*c.args)
    else:
        why = settings.skip_reason(compile_row=True)
        if why:
            pytest.skip(why)
        torch._dynamo.reset()  # a fresh, static-shape compile for this shape
        compiled = torch.compile(c.eager, dynamic=False)
        fn = lambda: compiled(*c.args)
    measure(fn, group=f"{op} {label} B{batch} {dtype}",
            info=dict(kind="op", op=op, label=label, shape=shape, batch=batch, dtype=dtype, impl=impl,
                      eager_sequence=ob.OP_SPECS[op]["eager"]
                      + (f" [{ob.M['e_mhsa_source']}]" if op == "e_mhsa" else "")),
            check=None if impl == "eager" else (lambda out: ob.rel_error(as_ref(out), ref)),
            tol=ob.TOLERANCE[dtype], cost=ob.costs(op, shape, batch, dtype), compile_row=impl == "compile")


def _cpu_compile_case(settings):
    """The op case CPU mode compiles: the cheapest stem conv."""
    op, shape, label = next(x for x in ob.cases(tiny=True) if x[0] == "conv_bn_relu")
    return (op, shape, label, settings.batches[0], settings.dtypes[0])
