"""The inference engine: where a NextViT forward is decided and run.

One ``Engine`` per model. ``NextViT.forward`` makes one call into it, ``Engine.forward(module,
x, features)``, which either returns the output or None, meaning "run the module graph"
(training, a CPU input under ``kernels="auto"``, ``kernels="reference"``, a forward autograd
needs). Everything else about a fused forward lives here:

- which path runs an input (``path``): the whole-model C runtime (``kernels="runtime"``, and
  ``"auto"`` on CUDA when the C library is built), the Triton kernels (``"triton"``, and the
  fallback of ``"auto"``), or under tracing (``torch.compile``, export) the registered ops;
- the folded weights (``Folded``: one per device, dtype and weights version), refolded when a
  weight changes, released by ``invalidate``;
- bound programs per input shape (``fused.Program``), automatic CUDA graphs per input signature
  (``graphs.GraphCache``), explicit ones (``GraphedForward``);
- the C runtime, its per-signature fallback to the Triton path, and the locks.

One copy of the weights: where the C runtime runs, the model is folded on the host, written as
a model file in memory and uploaded by the runtime, which then owns the only folded copy on the
device; the Triton plan is folded onto the device only if some input falls back to it.

The engine takes the module as an argument: it holds no reference to the model, whose attributes
it reads only through its ``fold`` function (``fused.fold``; ``timm_patch`` gives one that folds a
timm Next-ViT), its parameters and buffers (for the weights version) and ``training``.
"""
import contextlib
import threading
import warnings
from typing import Callable, Optional, Sequence

import torch

from . import _library, config, fused, graphs, model_file, runtime
from .plan import Plan, model_tensors, weights_key

KERNELS = ("auto", "triton", "runtime", "reference")
# Old spellings still taken, with a DeprecationWarning: "clib" named the whole-model runtime,
# which was easy to mistake for the per-op binding ``nextvit_kernels.clib``.
RENAMED_KERNELS = {"clib": "runtime"}
CUDA_GRAPHS = ("auto", "off")
MAX_PROGRAMS = 64

# Guards binding into a Folded's ``programs`` and making its ``graphs``: threads share a model's
# folding. One lock for every folding (binding a shape takes about a millisecond, once), as dynamo,
# which traces the fold, cannot make one per folding.
_PLANS_LOCK = threading.Lock()


def renamed(kernels):
    """``kernels`` with an old spelling mapped to its new name, with a DeprecationWarning."""
    if kernels in RENAMED_KERNELS:
        new = RENAMED_KERNELS[kernels]
        warnings.warn(f"kernels={kernels!r} is now spelled kernels={new!r}", DeprecationWarning, stacklevel=4)
        return new
    return kernels


def check_settings(kernels, cuda_graphs) -> None:
    if kernels not in KERNELS:
        raise ValueError(f"kernels must be one of {KERNELS}, got {kernels!r}")
    if cuda_graphs not in CUDA_GRAPHS:
        raise ValueError(f"cuda_graphs must be one of {CUDA_GRAPHS}, got {cuda_graphs!r}")


class Folded:
    """One folding of a model: its device, dtype and the weights version it was taken at
    (``source``, ``key``), and what is made from it: the Triton plan (``plan``, folded onto the
    device on first need), the programs bound from it, its CUDA graphs, and the C runtime
    (``runtime``: a ``runtime.Model``, the error that prevents one, or None before the first try)
    with the input signatures checked for it and those it failed on."""

    def __init__(self, device: torch.device, dtype: torch.dtype, source, key):
        self.device, self.dtype, self.source, self.key = device, dtype, source, key
        self.plan: Optional[Plan] = None
        self.programs = {}  # (shape, features) -> fused.Program
        self.graphs: Optional[graphs.GraphCache] = None  # made on first use (eager only)
        self.runtime = None
        self.runtime_seen = set()
        self.runtime_failed = set()

    def is_current(self) -> bool:
        return self.key == weights_key(self.source)

    def program(self, shape, features: bool = False) -> fused.Program:
        """The bound forward for inputs of ``shape`` (cached; the oldest of more than
        ``MAX_PROGRAMS`` shapes is dropped). Needs ``plan``."""
        key = (tuple(shape), features)
        prog = self.programs.get(key)
        if prog is None:
            with _PLANS_LOCK:
                prog = self.programs.get(key)  # bound by another thread while this one waited?
                if prog is None:
                    prog = fused.Program(self.plan, key[0], features)
                    if len(self.programs) >= MAX_PROGRAMS:
                        self.programs.pop(next(iter(self.programs)))
                    self.programs[key] = prog
        return prog

    def graph_cache(self, max_graphs: int) -> graphs.GraphCache:
        if self.graphs is None:
            with _PLANS_LOCK:
                if self.graphs is None:
                    self.graphs = graphs.GraphCache(max_graphs)
        self.graphs.max_graphs = max_graphs
        return self.graphs

    def release(self):
        """Frees what this folding holds beyond its weights: bound programs, CUDA graphs, the C
        runtime. A thread still running it finishes correctly, and captures no graph from then on."""
        with _PLANS_LOCK:
            if self.graphs is None:
                self.graphs = graphs.GraphCache()
            self.programs.clear()
            self.runtime = None  # its weights are freed once no running forward holds it
        self.graphs.close()


class Engine:
    """The fused forward of one model: see the module docstring. ``sr_ratios`` and
    ``attention_stages`` describe the model's stages for input checks (``config.check_input``)."""

    def __init__(self, sr_ratios: Sequence[int], attention_stages: Sequence[bool], kernels: str = "auto",
                 cuda_graphs: str = "auto", max_cuda_graphs: int = graphs.DEFAULT_MAX_GRAPHS,
                 fold: Callable[..., Plan] = fused.fold):
        # Held while the folding is rebuilt and while the model rewrites its weights (the model's
        # ``weights_lock``): a fused forward in another thread then folds all of a write or none of it.
        self.lock = threading.RLock()
        self.sr_ratios, self.attention_stages = tuple(sr_ratios), tuple(attention_stages)
        self.kernels = kernels
        self.cuda_graphs = cuda_graphs
        check_settings(self.kernels, self.cuda_graphs)
        self.max_cuda_graphs = max_cuda_graphs
        self.fold = fold  # fold(module, device, dtype) -> Plan
        self.state: Optional[Folded] = None
        self._grad_warned = False

    # Users assign these on the model at any time; a bad value is reported by the next forward,
    # as it always has been.
    @property
    def kernels(self) -> str:
        return self._kernels

    @kernels.setter
    def kernels(self, value: str):
        self._kernels = renamed(value)

    def settings(self) -> dict:
        return dict(kernels=self.kernels, cuda_graphs=self.cuda_graphs, max_cuda_graphs=self.max_cuda_graphs)

    def check_input(self, module, x) -> None:
        config.check_input(x, next(module.parameters()), self.sr_ratios, self.attention_stages)

    # ------------------------------------------------------------------ which path
    def _wanted(self, module, x) -> Optional[str]:
        """The path the settings ask for ``x``, before the C runtime is tried: None (the module
        graph), "triton" or "runtime"."""
        check_settings(self.kernels, self.cuda_graphs)
        if self.kernels == "reference" or not isinstance(x, torch.Tensor):
            return None  # (check_input rejects a non-tensor)
        forced = self.kernels in ("triton", "runtime")
        if module.training:
            if forced:
                raise ValueError(f"kernels={self.kernels!r} is inference-only (BatchNorms are folded): call "
                                 "model.eval(), or use kernels='auto' to train with the PyTorch reference path")
            return None
        if self.kernels == "auto" and not x.is_cuda:
            return None
        if self.kernels == "runtime" and not x.is_cuda and _library.host is None:
            raise ValueError("kernels='runtime' runs the C library on CUDA tensors (on a CPU only under "
                             "nextvit_kernels.testing.cpu_driver())")
        if torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in module.parameters())):
            self.check_input(module, x)  # a bad input is reported as such first
            how = ("run it under torch.inference_mode() or torch.no_grad(), or call "
                   "model.requires_grad_(False)")
            if forced:
                raise ValueError(f"kernels={self.kernels!r} has no backward, and autograd needs this forward: {how}, "
                                 "or use kernels='auto' (reference path when gradients are needed)")
            if not self._grad_warned:
                self._grad_warned = True
                warnings.warn(f"NextViT: autograd needs this forward, so it runs the PyTorch reference path; "
                              f"for the fused kernels {how}.", stacklevel=4)
            return None
        return "triton" if self.kernels == "triton" else "runtime"

    def path(self, module, x, features: bool = False) -> Optional[str]:
        """What runs ``x``: "runtime" (the whole-model C runtime), "triton" (the fused Triton
        kernels; under torch.compile or export, their registered ops), or None (the module graph).
        Under ``kernels="auto"`` this loads the C runtime if it was not tried yet."""
        want = self._wanted(module, x)
        if want != "runtime":
            return want
        if _tracing(x):
            return "triton"  # the registered ops (kernels="runtime" refuses to be traced)
        st = self._current(module, x)
        return "runtime" if self._runtime_forward(module, st, x, features) is not None else "triton"

    # ------------------------------------------------------------------ the forward
    def forward(self, module, x, features: bool = False):
        """``module``'s fused forward of ``x`` (logits, or the stage features), or None where the
        module graph must run."""
        want = self._wanted(module, x)
        if want is None:
            return None
        if _tracing(x):
            if self.kernels == "runtime":
                raise ValueError("kernels='runtime' (one C call per forward) cannot be traced by torch.compile or "
                                 "export: use kernels='auto', which traces the registered Triton ops")
            self.check_input(module, x)
            return fused.run(self.plan(module, x.device, x.dtype), x, impl="triton", features=features)
        st = self._current(module, x)
        call = self._runtime_forward(module, st, x, features) if want == "runtime" else None
        if call is None:
            call = st.programs.get((tuple(x.shape), features))
        if call is None:  # a new shape: checked once, then bound once
            self.check_input(module, x)
            self._fold_plan(module, st)
            call = st.program(x.shape, features)
        if not x.is_cuda:
            return call(x)
        if x.device.index != torch.cuda.current_device():
            with torch.cuda.device(x.device):  # Triton launches on the current device
                return self._launch(st, call, x, features)
        return self._launch(st, call, x, features)

    def _launch(self, st: Folded, call, x, features):
        if self.cuda_graphs == "auto" and graphs.capture_allowed(x):
            return st.graph_cache(self.max_cuda_graphs).run(graphs.signature(x, features), x, call)
        return call(x)

    # ------------------------------------------------------------------ the folding
    def _plan_lock(self):
        # Dynamo cannot trace a lock; a traced fold is single-threaded.
        return contextlib.nullcontext() if torch.compiler.is_compiling() else self.lock

    def _current(self, module, x) -> Folded:
        st = self.state
        if st is None or st.device != x.device or st.dtype != x.dtype:
            self.check_input(module, x)  # before folding for x's device and dtype: they must be the model's
        return self.folded(module, x.device, x.dtype)

    def folded(self, module, device, dtype) -> Folded:
        """The folding of ``module`` for ``device``/``dtype``, cached and made anew when a weight,
        the device or the dtype changes. (A module or Parameter replaced by assignment is not seen:
        call ``invalidate()``.)"""
        st = self.state
        if st is not None and torch.compiler.is_compiling():
            return st  # validated by the eager call that made it; dynamo guards on it
        if _stale(st, device, dtype):
            # One thread makes it; the others that found it stale wait for it. The new folding is
            # published whole, and a forward holding the old one finishes with it.
            with self._plan_lock():
                st = self.state
                if _stale(st, device, dtype):
                    self.invalidate()
                    # The version is taken before any weight is read: a write that lands while they
                    # are read (another thread's) leaves this folding stale at once.
                    source = model_tensors(module)
                    st = self.state = Folded(torch.device(device), dtype, source, weights_key(source))
        return st

    def _fold_plan(self, module, st: Folded) -> Plan:
        """``st``'s Triton plan, folded onto its device on first need."""
        plan = st.plan
        if plan is None:
            with self._plan_lock():
                plan = st.plan
                if plan is None:
                    plan = st.plan = self.fold(module, st.device, st.dtype)
        return plan

    def plan(self, module, device, dtype) -> Plan:
        """The BatchNorm-folded plan of ``module`` on ``device`` in ``dtype`` (see ``folded``)."""
        return self._fold_plan(module, self.folded(module, device, dtype))

    def invalidate(self):
        """Drops the folding with its bound programs, CUDA graphs and C runtime; the next fused
        forward folds again."""
        with self._plan_lock():
            st, self.state = self.state, None
        if st is not None:
            st.release()

    # ------------------------------------------------------------------ the C runtime
    def _runtime_forward(self, module, st: Folded, x, features):
        """The C runtime's forward for ``x``'s signature (one C call), or None where the Triton
        path runs: no C library built, or under kernels="auto" a model or signature the runtime
        failed on (warned once each)."""
        sig = (tuple(x.shape), x.stride(), features)
        if sig in st.runtime_failed:
            return None
        rt = st.runtime
        if rt is None:
            with self._plan_lock():  # one thread uploads the model
                rt = st.runtime
                if rt is None:
                    rt = st.runtime = self._load_runtime(module, st, x)
        if not isinstance(rt, runtime.Model):
            return None
        if sig not in st.runtime_seen:  # checked once per signature, as the Triton path binds a shape once
            self.check_input(module, x)
            st.runtime_seen.add(sig)
        forward = rt.forward_features if features else rt

        def run(inp):
            try:
                return forward(inp)
            except (runtime.ModelError, ValueError) as err:
                if self.kernels == "runtime":
                    raise
                st.runtime_failed.add(sig)
                warnings.warn(f"nextvit_kernels: the C runtime failed for input {sig[0]} ({err}); this input "
                              "signature runs the Triton JIT path from now on", RuntimeWarning, stacklevel=6)
                self._fold_plan(module, st)
                return st.program(inp.shape, features)(inp)
        return run

    def _load_runtime(self, module, st: Folded, x):
        """``st`` on the C runtime (a runtime.Model owning the only folded copy on the device), or
        the error that prevents it (kernels="auto": the Triton path runs; a library that is not
        built is not worth a warning)."""
        try:
            if _library.host_lib is None:
                _library.open_default()  # a library that is not there is found before any folding
            # From the device plan when the Triton path already folded one, else folded on the host.
            plan = st.plan if st.plan is not None else self.fold(module, "cpu", st.dtype)
            return runtime.Model(model_file.plan_bytes(plan), device=x.device.index or 0)
        except RuntimeError as err:
            if self.kernels == "runtime":
                raise RuntimeError(f"kernels='runtime': the C runtime cannot run this model: {err}") from err
            if not str(err).startswith("the nextvit_kernels C library is not built"):
                warnings.warn(f"nextvit_kernels: the C runtime is not used for this model ({err}); the Triton "
                              "JIT path runs", RuntimeWarning, stacklevel=6)
            return err

    # ------------------------------------------------------------------ explicit CUDA graphs
    def cuda_graph(self, module, example: torch.Tensor, warmup: int = 3) -> "GraphedForward":
        return GraphedForward(self, module, example, warmup)


def _stale(st: Optional[Folded], device, dtype) -> bool:
    return st is None or st.device != device or st.dtype != dtype or not st.is_current()


def _tracing(x) -> bool:
    """True under torch.compile / export, TorchScript tracing, or a dispatch mode (FakeTensor,
    make_fx): the registered ops must run there, not the bound programs."""
    return (type(x) is not torch.Tensor or torch.compiler.is_compiling() or torch.jit.is_tracing()
            or torch._C._get_dispatch_mode(torch._C._TorchDispatchModeKey.FAKE) is not None
            or torch.utils._python_dispatch._get_current_dispatch_mode() is not None)


class GraphedForward:
    """A NextViT forward captured in a CUDA graph for one input shape.

    ``graphed(x)`` copies ``x`` into the captured input buffer, replays the
    graph and returns the captured output buffer: the next call overwrites it
    (``.clone()`` to keep it). ``graphed(x, clone=True)`` returns a copy made before
    the next call can replay: that is the way to share one ``graphed`` between threads
    (calls are serialised from copy-in to copy-out, across streams too). The weights are
    those of the capture: after changing them, capture again.
    """

    def __init__(self, engine: Engine, module, example: torch.Tensor, warmup: int = 3):
        if not example.is_cuda:
            raise ValueError("cuda_graph needs a CUDA input")
        if module.training:
            raise ValueError("cuda_graph captures inference: call model.eval() first")
        self.model = module
        example = example.detach()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        # This graph is the only one wanted: no automatic graph during the warm-up.
        with torch.no_grad(), graphs.suspended():
            with torch.cuda.stream(stream):
                for _ in range(warmup):  # folds the weights and compiles the kernels
                    module(example)
            torch.cuda.current_stream().wait_stream(stream)
            self._graph = graphs._Graph(example, module)
        # The graph reads the folded weights it was captured with: keep them alive if the model
        # refolds (a weight change, or .to()) while this graph is still called.
        self._folded = engine.state
        self._slot = graphs._Slot(self._graph)
        self.static_in, self.static_out = self._graph.static_in, self._graph.static_out

    def __call__(self, x: torch.Tensor, clone: bool = False) -> torch.Tensor:
        if x.shape != self.static_in.shape or x.dtype != self.static_in.dtype or x.device != self.static_in.device:
            raise ValueError(f"this graph was captured for {tuple(self.static_in.shape)} {self.static_in.dtype} on "
                             f"{self.static_in.device}, got {tuple(x.shape)} {x.dtype} on {x.device}")
        return self._slot.replay(x, clone=clone)
