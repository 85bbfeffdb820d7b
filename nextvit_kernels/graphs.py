"""Automatic CUDA graphs for the fused forward.

At batch 1 a forward is ~100 kernel launches whose GPU work is well under a millisecond:
the host's launch cost dominates. ``GraphCache`` replays a captured CUDA graph per input
signature instead. Its rules:

- a signature (shape, strides, dtype, device, features) is captured the second time it is
  seen, so its kernels are compiled by then and a shape seen once costs nothing;
- at most ``max_graphs`` graphs are kept (least recently used evicted, its memory pool
  released);
- every output is a fresh tensor owned by the caller, copied out of the graph's memory;
- replay runs on the caller's current stream; a call on another stream waits until the
  previous call has finished reading the graph's input and output buffers;
- a capture or replay that fails is reported once as a warning and that signature runs
  without a graph from then on: the default path must never be what breaks a forward.

The cache belongs to one folded plan (``fused.Plan``): a weight, device or dtype change
builds a new plan and releases the old plan's graphs with it.
"""
import warnings
from collections import OrderedDict
from typing import Callable, Hashable

import torch

DEFAULT_MAX_GRAPHS = 8
_MAX_SEEN = 1024  # signatures remembered as seen once (a dynamic-shape workload never fills the graphs)


def signature(x: torch.Tensor, features: bool) -> tuple:
    return (tuple(x.shape), x.stride(), x.dtype, x.device, features)


def capture_allowed(x: torch.Tensor) -> bool:
    """False where a graph must not be captured or replayed: CPU tensors, and while the
    caller is capturing a graph of its own (ours would nest)."""
    return x.is_cuda and not torch.cuda.is_current_stream_capturing()


def _clone(out):
    if isinstance(out, torch.Tensor):
        return out.clone()
    return [o.clone() for o in out]


class _Graph:
    """One captured forward: its static input, its outputs and the event that marks the
    end of the last replay's copy-out."""

    def __init__(self, x: torch.Tensor, fn: Callable):
        self.static_in = torch.empty_strided(x.shape, x.stride(), dtype=x.dtype, device=x.device)
        self.static_in.copy_(x)
        self.graph = torch.cuda.CUDAGraph()
        # thread_local: CUDA calls of the caller's other threads do not invalidate the capture.
        with torch.cuda.graph(self.graph, capture_error_mode="thread_local"):
            self.static_out = fn(self.static_in)
        self.done = torch.cuda.Event()
        self.done.record()

    def replay(self, x: torch.Tensor):
        stream = torch.cuda.current_stream(x.device)
        stream.wait_event(self.done)
        self.static_in.copy_(x)
        self.graph.replay()
        out = _clone(self.static_out)
        self.done.record(stream)
        return out

    def release(self):
        self.graph.reset()
        self.static_in = self.static_out = None


class GraphCache:
    def __init__(self, max_graphs: int = DEFAULT_MAX_GRAPHS):
        self.max_graphs = max_graphs
        self.graphs: "OrderedDict[Hashable, _Graph]" = OrderedDict()
        self.seen: "OrderedDict[Hashable, None]" = OrderedDict()
        self.failed = set()

    def __len__(self):
        return len(self.graphs)

    def run(self, key: Hashable, x: torch.Tensor, fn: Callable):
        """``fn(x)`` (a fused forward), through a graph for ``key`` where one is or can be
        captured."""
        g = self.graphs.get(key)
        if g is None:
            if key in self.failed or self.max_graphs < 1:
                return fn(x)
            if key not in self.seen:
                self._note_seen(key)
                return fn(x)  # first sight: compiles the kernels, captures nothing
            g = self._capture(key, x, fn)
            if g is None:
                return fn(x)
        else:
            self.graphs.move_to_end(key)
        try:
            return g.replay(x)
        except Exception as err:  # noqa: BLE001 - any graph error falls back, see module docstring
            self._fail(key, "replay", err)
            return fn(x)

    def clear(self):
        for g in self.graphs.values():
            g.release()
        self.graphs.clear()
        self.seen.clear()
        self.failed.clear()

    # ------------------------------------------------------------------ internals
    def _note_seen(self, key):
        self.seen[key] = None
        if len(self.seen) > _MAX_SEEN:
            self.seen.popitem(last=False)

    def _capture(self, key, x, fn):
        while len(self.graphs) >= self.max_graphs:
            _, old = self.graphs.popitem(last=False)
            old.release()
        try:
            g = self.make_graph(x, fn)
        except Exception as err:  # noqa: BLE001
            self._fail(key, "capture", err)
            return None
        self.seen.pop(key, None)
        self.graphs[key] = g
        return g

    make_graph = staticmethod(_Graph)  # tests replace it to exercise the policy without a GPU

    def _fail(self, key, what, err):
        self.graphs.pop(key, None)
        self.failed.add(key)
        warnings.warn(
            f"nextvit_kernels: CUDA graph {what} failed for input {key[0]} ({type(err).__name__}: {err}); "
            "this input signature runs without a graph from now on. Set model.cuda_graphs = 'off' "
            "to run every input without graphs.", RuntimeWarning, stacklevel=4)
