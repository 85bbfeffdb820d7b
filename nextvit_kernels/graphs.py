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

The cache belongs to one folding of the model's weights (``engine.Folded``): a weight, device
or dtype change makes a new folding and releases the old one's graphs with it.

Threads: a graph has one input and one output buffer, so its calls are serialised by a lock
held from the copy-in to the copy-out (the copy-out is enqueued before the lock is let go, and
the next call's copy-in waits for it on the GPU). Calls of other signatures, and calls that run
without a graph, do not wait for it. Lookups, captures and evictions hold the cache's lock; an
evicted or released graph is freed only once the call replaying it has finished (host and GPU),
and a caller that finds its graph freed meanwhile runs without it.
"""
import contextlib
import threading
import warnings
from collections import OrderedDict
from typing import Callable, Hashable

import torch

DEFAULT_MAX_GRAPHS = 8
_MAX_SEEN = 1024  # signatures remembered as seen once (a dynamic-shape workload never fills the graphs)


def signature(x: torch.Tensor, features: bool) -> tuple:
    return (tuple(x.shape), x.stride(), x.dtype, x.device, features)


_thread = threading.local()


@contextlib.contextmanager
def suspended():
    """No automatic graph is captured or replayed by this thread inside: for a caller that
    captures a graph of its own (``cuda_graph()``'s warm-up), without touching the model's
    ``cuda_graphs``, which other threads read."""
    before = getattr(_thread, "suspended", False)
    _thread.suspended = True
    try:
        yield
    finally:
        _thread.suspended = before


def capture_allowed(x: torch.Tensor) -> bool:
    """False where a graph must not be captured or replayed: CPU tensors, while the caller
    is capturing a graph of its own (ours would nest), and inside ``suspended()``."""
    return x.is_cuda and not getattr(_thread, "suspended", False) and not torch.cuda.is_current_stream_capturing()


def _clone(out):
    if isinstance(out, torch.Tensor):
        return out.clone()
    return [o.clone() for o in out]


class _Graph:
    """One captured forward: its static input, its outputs and the event that marks the
    end of the last replay's copy-out. Not thread-safe by itself: see ``_Slot``."""

    def __init__(self, x: torch.Tensor, fn: Callable):
        self.static_in = torch.empty_strided(x.shape, x.stride(), dtype=x.dtype, device=x.device)
        self.static_in.copy_(x)
        self.graph = torch.cuda.CUDAGraph()
        # thread_local: CUDA calls of the caller's other threads do not invalidate the capture.
        with torch.cuda.graph(self.graph, capture_error_mode="thread_local"):
            self.static_out = fn(self.static_in)
        self.done = torch.cuda.Event()
        self.done.record()

    def replay(self, x: torch.Tensor, clone: bool = True):
        """The outputs for ``x``: fresh tensors, or with ``clone=False`` the graph's own output
        buffers, which the next replay overwrites."""
        stream = torch.cuda.current_stream(x.device)
        stream.wait_event(self.done)
        self.static_in.copy_(x)
        self.graph.replay()
        out = _clone(self.static_out) if clone else self.static_out
        self.done.record(stream)
        return out

    def release(self):
        # The memory pool goes with the graph: the GPU must be done with the last replay's copy-out.
        self.done.synchronize()
        self.graph.reset()
        self.static_in = self.static_out = None


class _Slot:
    """A graph and the lock that makes one call's copy-in, replay and copy-out a unit: every
    call of the graph goes through its one input and output buffer."""

    __slots__ = ("graph", "lock")

    def __init__(self, graph):
        self.graph, self.lock = graph, threading.Lock()

    def replay(self, x: torch.Tensor, clone: bool = True):
        """The graph's outputs for ``x``, or None when the graph was released (evicted, or its
        plan dropped) after the caller found it: the caller then runs without it."""
        with self.lock:
            if self.graph is None:
                return None
            return self.graph.replay(x) if clone else self.graph.replay(x, clone=False)

    def release(self):
        with self.lock:  # waits for the call replaying it, if any
            graph, self.graph = self.graph, None
            if graph is not None:
                graph.release()


class GraphCache:
    def __init__(self, max_graphs: int = DEFAULT_MAX_GRAPHS):
        self.max_graphs = max_graphs
        self.graphs: "OrderedDict[Hashable, _Slot]" = OrderedDict()
        self.seen: "OrderedDict[Hashable, None]" = OrderedDict()
        self.failed = set()
        self.closed = False  # set when the plan is dropped: a caller still holding it captures nothing
        self._lock = threading.Lock()

    def __len__(self):
        return len(self.graphs)

    def run(self, key: Hashable, x: torch.Tensor, fn: Callable):
        """``fn(x)`` (a fused forward), through a graph for ``key`` where one is or can be
        captured."""
        with self._lock:
            slot = self.graphs.get(key)
            if slot is not None:
                self.graphs.move_to_end(key)
            else:
                slot = self._new_slot(key, x, fn)
        out = None
        if slot is not None:
            try:
                out = slot.replay(x)
            except Exception as err:  # noqa: BLE001 - any graph error falls back, see module docstring
                with self._lock:
                    self._fail(key, slot, "replay", err)
        return fn(x) if out is None else out

    def clear(self):
        with self._lock:
            slots = list(self.graphs.values())
            self.graphs.clear()
            self.seen.clear()
            self.failed.clear()
        for slot in slots:
            slot.release()

    def close(self):
        """Releases every graph and captures no more."""
        self.closed = True
        self.clear()

    # ------------------------------------------------------------------ internals
    def _new_slot(self, key, x, fn):
        """For a ``key`` without a graph: its graph captured now if this is its second sight,
        else None (the call runs without one). Called holding the lock."""
        if self.closed or key in self.failed or self.max_graphs < 1:
            return None
        if key not in self.seen:
            self._note_seen(key)  # first sight: the call compiles the kernels, captures nothing
            return None
        return self._capture(key, x, fn)

    def _note_seen(self, key):
        self.seen[key] = None
        if len(self.seen) > _MAX_SEEN:
            self.seen.popitem(last=False)

    def _capture(self, key, x, fn):
        while len(self.graphs) >= self.max_graphs:
            _, old = self.graphs.popitem(last=False)
            old.release()  # before the capture: its memory pool is what the new graph may need
        try:
            g = self.make_graph(x, fn)
        except Exception as err:  # noqa: BLE001
            self._fail(key, None, "capture", err)
            return None
        self.seen.pop(key, None)
        slot = self.graphs[key] = _Slot(g)
        return slot

    make_graph = staticmethod(_Graph)  # tests replace it to exercise the policy without a GPU

    def _fail(self, key, slot, what, err):
        if slot is not None and self.graphs.get(key) is slot:
            del self.graphs[key]
        self.failed.add(key)
        warnings.warn(
            f"nextvit_kernels: CUDA graph {what} failed for input {key[0]} ({type(err).__name__}: {err}); "
            "this input signature runs without a graph from now on. Set model.cuda_graphs = 'off' "
            "to run every input without graphs.", RuntimeWarning, stacklevel=4)
