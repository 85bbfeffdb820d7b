"""One model, many threads: every caller gets its own result (README "Threads").

CPU: the CUDA-graph policy with a stand-in graph whose replay really goes through one shared
input and output buffer, as a CUDA graph's does; the bound programs with each op's launch
replaced by a cheap deterministic function of its input and folded weights (the interpreter
takes ~9 s for one tiny forward); and a weight swap in one thread while others call.
GPU-marked: the real graphs on the default stream and on per-thread streams, and cuda_graph().
"""
import threading
import time

import pytest
import torch

import nextvit_kernels as nk
from nextvit_kernels import engine, fused, graphs, ops
from _util import in_threads, randomize_

TINY = dict(depths=(1, 1, 5, 1), num_classes=10)
THREADS, CALLS = 8, 200


# ------------------------------------------------------------------ graph policy (CPU)
class _SharedBufferGraph:
    """Stands in for graphs._Graph as a CUDA graph behaves: one static input and one static
    output buffer, a replay that computes from the static input, and release freeing both.
    The pauses are where another thread runs while the GPU would be working."""

    def __init__(self, x, fn):
        self.fn = fn
        self.static_in = x.clone()
        time.sleep(0)  # a capture takes milliseconds: other threads reach the cache meanwhile
        self.static_out = fn(self.static_in)

    def replay(self, x):
        self.static_in.copy_(x)
        time.sleep(0)
        self.static_out.copy_(self.fn(self.static_in))
        time.sleep(0)
        return self.static_out.clone()

    def release(self):
        self.static_in = self.static_out = None


def test_graph_cache_threads_get_their_own_results(monkeypatch):
    """8 threads x 200 calls, three signatures through two graphs (so graphs are evicted and
    captured again while others replay): each result is its own input's."""
    monkeypatch.setattr(graphs.GraphCache, "make_graph", staticmethod(_SharedBufferGraph))
    cache = graphs.GraphCache(max_graphs=2)
    shapes = [(2, 3), (4,), (3, 2, 2)]

    def fn(x):
        return x * 2 + 1

    def body(t):
        shape = shapes[t % len(shapes)]
        for i in range(CALLS):
            x = torch.full(shape, float(t * 1000 + i))
            out = cache.run(shape, x, fn)
            assert torch.equal(out, fn(x)), f"call {i} got {out.flatten()[0].item()}, expected {fn(x).flatten()[0]}"

    assert in_threads(THREADS, body) == []
    assert not cache.failed  # a graph released under a replaying thread would land here
    assert len(cache) == 2


def test_closed_graph_cache_captures_nothing(monkeypatch):
    """A thread still holding a dropped plan runs its forwards without graphs."""
    monkeypatch.setattr(graphs.GraphCache, "make_graph", staticmethod(_SharedBufferGraph))
    m = nk.NextViT(**TINY).eval()
    m.fused_plan(torch.device("cpu"), torch.float32)
    st = m.engine.state
    m.invalidate_fused()
    x = torch.ones(3)
    for _ in range(3):
        assert torch.equal(st.graph_cache(8).run("k", x, lambda t: t + 1), x + 1)
    assert len(st.graphs) == 0


# ---------------------------------------------------- bound programs, launches stubbed
def _stub_bind(bind):
    """An op's ``bind`` whose ``run`` is a cheap deterministic function of the input (per
    image) and of the weights it was bound with, in place of the kernels; the real ``bind``
    still computes shapes and launch configurations."""
    def stub(x_shape, *tensors, **kwargs):
        _, out_shape = bind(x_shape, *tensors, **kwargs)
        c = float(sum(t.double().mean() for t in tensors))

        def run(x, x2=None):
            v = x.mean(dim=(1, 2, 3)) + (0 if x2 is None else x2.mean(dim=(1, 2, 3))) + c
            if len(out_shape) == 2:  # the head: [B, classes]
                return v[:, None] + torch.arange(out_shape[1])
            return v.view(-1, 1, 1, 1).expand(out_shape)

        return run, out_shape

    return stub


@pytest.fixture
def stub_launches(monkeypatch):
    for name in ("conv_bn_relu", "patch_embed", "mhca", "mlp", "e_mhsa", "head"):
        mod = ops.module(name)
        monkeypatch.setattr(mod, "bind", _stub_bind(mod.bind))


def _distinct_input(t, shape=(1, 3, 32, 32)):
    g = torch.Generator().manual_seed(t)
    return torch.randn(shape, generator=g) + t


class _YieldingDict(dict):
    """A plan's program cache that lets other threads run between a lookup and what follows
    it, where a thread switch can land in a real run (rarely: the test makes it the rule)."""

    def get(self, *args):
        out = super().get(*args)
        time.sleep(0)
        return out

    def pop(self, *args):
        time.sleep(0)
        return super().pop(*args)


def test_bound_programs_threads_get_their_own_results(stub_launches, monkeypatch):
    """8 threads x 200 calls in four input shapes, with room for two bound programs: programs
    are dropped and bound again concurrently, and each result is its own input's."""
    monkeypatch.setattr(engine, "MAX_PROGRAMS", 2)
    m = randomize_(nk.NextViT(**TINY, kernels="triton"), gain=0.7).eval().requires_grad_(False)
    shapes = [(1, 3, 32, 32), (2, 3, 32, 32), (1, 3, 40, 32), (1, 3, 32, 40)]
    xs = [_distinct_input(t, shapes[t % len(shapes)]) for t in range(THREADS)]
    refs = [m(x) for x in xs]
    m.engine.state.programs = _YieldingDict(m.engine.state.programs)
    assert len({r[0, 0].item() for r in refs}) == THREADS  # the inputs are told apart

    def body(t):
        for i in range(CALLS):
            out = m(xs[t])
            assert torch.equal(out, refs[t]), f"call {i}: another input's result"

    assert in_threads(THREADS, body) == []


def test_weight_swap_while_threads_call(stub_launches):
    """One thread swaps between two sets of weights with load_state_dict, pausing part way
    through as a slow load does; the others call meanwhile. Each result is that of the old or
    of the new weights, never of a mix, and after the last swap the new weights' result."""
    m = nk.NextViT(**TINY, kernels="triton").eval().requires_grad_(False)
    sds = []
    for seed in (1, 2):
        randomize_(m, gain=0.7, generator=torch.Generator().manual_seed(seed))
        sds.append({k: v.clone() for k, v in m.state_dict().items()})
    readers = THREADS - 1
    xs = [_distinct_input(t) for t in range(readers)]
    refs = []
    for sd in sds:
        m.load_state_dict(sd)
        refs.append([m(x) for x in xs])
    pause = m.features[1].register_load_state_dict_pre_hook(lambda *args: time.sleep(0.2))
    swaps, done = 4, threading.Event()
    seen = [set() for _ in range(readers)]

    def body(t):
        if t == readers:  # the writer
            try:
                for k in range(1, swaps + 1):
                    m.load_state_dict(sds[k % 2])
                    time.sleep(0.05)
            finally:
                done.set()
            return
        calls = 0
        while not done.is_set() or calls < 10:
            out = m(xs[t])
            which = [w for w in (0, 1) if torch.equal(out, refs[w][t])]
            assert which, f"call {calls}: neither the old nor the new weights' result"
            seen[t].add(which[0])
            calls += 1

    try:
        assert in_threads(THREADS, body) == []
    finally:
        pause.remove()
    assert set().union(*seen) == {0, 1}  # the swaps happened while the readers ran
    final = swaps % 2
    assert all(torch.equal(m(x), refs[final][t]) for t, x in enumerate(xs))


def test_fold_sees_a_write_that_lands_while_it_reads(monkeypatch):
    """A weight written while fold reads the weights (by a thread that does not hold
    weights_lock) leaves the plan stale, so the next forward folds again, instead of
    a plan marked current with the old value folded in."""
    m = nk.NextViT(**TINY, kernels="reference").eval()
    real = fused._mlp_step

    def mlp_step_then_write(*args):
        with torch.no_grad():
            m.proj_head[0].bias.add_(1.0)  # folded later in the same fold
        return real(*args)

    monkeypatch.setattr(fused, "_mlp_step", mlp_step_then_write)
    plan = fused.fold(m, "cpu", torch.float32)
    monkeypatch.undo()
    assert not plan.is_current()
    assert fused.fold(m, "cpu", torch.float32).is_current()


def test_weights_lock_survives_pickle_and_deepcopy():
    import copy
    import io

    m = nk.NextViT(**TINY).eval()
    buf = io.BytesIO()
    torch.save(m, buf)
    buf.seek(0)
    for other in (torch.load(buf, weights_only=False), copy.deepcopy(m)):
        assert other.weights_lock is not m.weights_lock
        with other.weights_lock:
            other.load_state_dict(m.state_dict())  # re-entrant: load_state_dict takes it too


# ------------------------------------------------------------------------ GPU
gpu = pytest.mark.gpu


def _gpu_model(**kw):
    return randomize_(nk.nextvit_small(**kw), gain=0.7).eval().cuda().half()


def _gpu_inputs(t, batch):
    return _distinct_input(t, (batch, 3, 224, 224)).cuda().half()


def _call_in_threads(per_thread_streams, fn, xs, refs, calls):
    """``fn(xs[t])`` ``calls`` times in one thread per input, on the current stream or on one
    stream per thread; every result is compared with ``refs[t]``."""
    def body(t):
        stream = torch.cuda.Stream() if per_thread_streams else torch.cuda.current_stream()
        stream.wait_stream(torch.cuda.default_stream())
        with torch.inference_mode(), torch.cuda.stream(stream):
            outs = [fn(xs[t]) for _ in range(calls)]
        stream.synchronize()
        bad = [i for i, o in enumerate(outs) if not torch.equal(o, refs[t])]
        assert not bad, f"calls {bad[:5]}... got another input's result"

    return in_threads(len(xs), body)


@gpu
@pytest.mark.parametrize("per_thread_streams", [False, True], ids=["default-stream", "thread-streams"])
@pytest.mark.parametrize("max_graphs", [8, 1])
def test_gpu_threads_share_one_model_with_auto_graphs(per_thread_streams, max_graphs):
    """8 threads, batch 1 and 8, automatic graphs (max_graphs=1: the two signatures evict each
    other's graph while threads replay it)."""
    m = _gpu_model(max_cuda_graphs=max_graphs)
    xs = [_gpu_inputs(t, 1 if t % 2 else 8) for t in range(THREADS)]
    with torch.inference_mode():
        m.cuda_graphs = "off"
        refs = [m(x) for x in xs]
        m.cuda_graphs = "auto"
    assert _call_in_threads(per_thread_streams, m, xs, refs, 20) == []
    assert len(m.engine.state.graphs) == min(2, max_graphs) and not m.engine.state.graphs.failed


@gpu
@pytest.mark.parametrize("per_thread_streams", [False, True], ids=["default-stream", "thread-streams"])
def test_gpu_threads_share_one_cuda_graph(per_thread_streams):
    """One cuda_graph() wrapper called from 8 threads with clone=True; its warm-up captured no
    automatic graph and left cuda_graphs alone."""
    m = _gpu_model()
    xs = [_gpu_inputs(t, 2) for t in range(THREADS)]
    with torch.inference_mode():
        m.cuda_graphs = "off"
        refs = [m(x) for x in xs]
        m.cuda_graphs = "auto"
        graphed = m.cuda_graph(xs[0])
    assert m.cuda_graphs == "auto" and not m.engine.state.graphs
    assert _call_in_threads(per_thread_streams, lambda x: graphed(x, clone=True), xs, refs, 20) == []
