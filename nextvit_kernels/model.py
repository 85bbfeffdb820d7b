"""Reference Next-ViT: the published model, module for module (docs/design.md §1).

Module and parameter names are the published ones, so a published state_dict
loads with plain ``load_state_dict``. The forward here is plain PyTorch (it is
what training runs and what the fused path is checked against); in eval mode on
CUDA it runs the fused graph of ``fused`` instead.
"""
import contextlib
import threading
import warnings
from typing import List, Optional

import torch
from torch import nn

from . import _library
from .blocks import NCB, NTB, ConvBNReLU, _bn

KERNELS = ("auto", "triton", "clib", "reference")
CUDA_GRAPHS = ("auto", "off")
HEAD_DIM = 32
STEM_CHS = (64, 32, 64)
SR_RATIOS = (8, 4, 2, 1)
STRIDES = (1, 2, 2, 2)
VARIANTS = {
    "nextvit_small": dict(depths=(3, 4, 10, 3), path_dropout=0.1),
    "nextvit_base": dict(depths=(3, 4, 20, 3), path_dropout=0.2),
    "nextvit_large": dict(depths=(3, 4, 30, 3), path_dropout=0.2),
}


def stage_sizes(h: int, w: int) -> List[tuple]:
    """Spatial size of each stage's output (strides 4, 8, 16, 32) for an h x w input:
    every stride-2 step (3x3 conv, padding 1, or ceil-mode 2x2 pooling) maps n -> ceil(n/2)."""
    sizes = []
    for i in range(5):
        h, w = -(-h // 2), -(-w // 2)
        if i >= 1:
            sizes.append((h, w))
    return sizes


class NextViT(nn.Module):
    def __init__(self, stem_chs=STEM_CHS, depths=(3, 4, 10, 3), path_dropout=0.1, attn_drop=0.0, drop=0.0,
                 num_classes=1000, strides=STRIDES, sr_ratios=SR_RATIOS, head_dim=HEAD_DIM, mix_block_ratio=0.75,
                 use_checkpoint=False, with_extra_norm=False, kernels="auto", cuda_graphs="auto",
                 max_cuda_graphs=8):
        super().__init__()
        # Held while the folded plan is rebuilt and while the weights are rewritten by
        # load_state_dict, merge_bn and .to(): a fused forward in another thread then folds all
        # of a write or none of it. Hold it to make your own in-place writes atomic likewise.
        self.weights_lock = threading.RLock()
        self.use_checkpoint = use_checkpoint
        self.depths = tuple(depths)
        self.sr_ratios = tuple(sr_ratios)
        self.strides = tuple(strides)
        if kernels not in KERNELS:
            raise ValueError(f"kernels must be one of {KERNELS}, got {kernels!r}")
        self.kernels = kernels
        if cuda_graphs not in CUDA_GRAPHS:
            raise ValueError(f"cuda_graphs must be one of {CUDA_GRAPHS}, got {cuda_graphs!r}")
        self.cuda_graphs = cuda_graphs
        self.max_cuda_graphs = max_cuda_graphs
        self._fused_plan = None
        self._grad_warned = False
        # load_state_dict writes the weights in place: the version check would see it, but
        # releasing the plan here also frees its CUDA graphs at once.
        self.register_load_state_dict_post_hook(_invalidate_after_load)
        self.stage_out_channels = [[96] * (depths[0]),
                                   [192] * (depths[1] - 1) + [256],
                                   [384, 384, 384, 384, 512] * (depths[2] // 5),
                                   [768] * (depths[3] - 1) + [1024]]
        self.stage_block_types = [[NCB] * depths[0],
                                  [NCB] * (depths[1] - 1) + [NTB],
                                  [NCB, NCB, NCB, NCB, NTB] * (depths[2] // 5),
                                  [NCB] * (depths[3] - 1) + [NTB]]
        self.stem = nn.Sequential(
            ConvBNReLU(3, stem_chs[0], kernel_size=3, stride=2),
            ConvBNReLU(stem_chs[0], stem_chs[1], kernel_size=3, stride=1),
            ConvBNReLU(stem_chs[1], stem_chs[2], kernel_size=3, stride=1),
            ConvBNReLU(stem_chs[2], stem_chs[2], kernel_size=3, stride=2),
        )
        input_channel = stem_chs[-1]
        features = []
        idx = 0
        dpr = [x.item() for x in torch.linspace(0, path_dropout, sum(depths))]
        for stage_id in range(len(depths)):
            for block_id in range(depths[stage_id]):
                stride = 2 if strides[stage_id] == 2 and block_id == 0 else 1
                output_channel = self.stage_out_channels[stage_id][block_id]
                if self.stage_block_types[stage_id][block_id] is NCB:
                    layer = NCB(input_channel, output_channel, stride=stride, path_dropout=dpr[idx + block_id],
                                drop=drop, head_dim=head_dim)
                else:
                    layer = NTB(input_channel, output_channel, path_dropout=dpr[idx + block_id], stride=stride,
                                sr_ratio=sr_ratios[stage_id], head_dim=head_dim, mix_block_ratio=mix_block_ratio,
                                attn_drop=attn_drop, drop=drop)
                features.append(layer)
                input_channel = output_channel
            idx += depths[stage_id]
        self.features = nn.Sequential(*features)
        self.extra_norm_list = None
        if with_extra_norm:
            self.extra_norm_list = nn.Sequential(*[_bn(c[-1]) for c in self.stage_out_channels])
        self.norm = _bn(output_channel)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.proj_head = nn.Sequential(nn.Linear(output_channel, num_classes))
        self.stage_out_idx = [sum(depths[:i + 1]) - 1 for i in range(len(depths))]
        self._initialize_weights()

    def _initialize_weights(self):
        for m in self.modules():
            if isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d)):
                nn.init.constant_(m.weight, 1.0)
                nn.init.constant_(m.bias, 0)
            elif isinstance(m, (nn.Linear, nn.Conv2d)):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.constant_(m.bias, 0)

    # ----------------------------------------------------------------- deploy
    @torch.no_grad()
    def merge_bn(self):
        """Folds the BatchNorms that precede a linear map, as the published deploy
        mode does. The folded BatchNorms become ``nn.Identity``, so the merged
        ``state_dict()`` has no BatchNorm keys for them and ``load_checkpoint``
        recognises it: no BatchNorm is ever applied twice."""
        with self.weights_lock:
            self.eval()
            for m in self.features:
                m.merge_bn()
            self.invalidate_fused()  # modules were replaced: fold again
        return self

    @property
    def is_bn_merged(self) -> bool:
        flags = [m.is_bn_merged for m in self.features]
        return all(flags)

    # ---------------------------------------------------------------- forward
    def check_input(self, x):
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"NextViT expects a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 4:
            raise ValueError(f"NextViT expects a 4-D [B, 3, H, W] tensor, got shape {tuple(x.shape)}")
        if x.shape[1] != 3:
            hint = (": it looks like NHWC [B, H, W, 3]; pass x.permute(0, 3, 1, 2) (keeping channels_last memory "
                    "is fine)" if x.shape[3] == 3 else "")
            raise ValueError(f"NextViT expects 3 input channels, got {x.shape[1]} (shape {tuple(x.shape)}){hint}")
        if x.shape[0] == 0:
            raise ValueError("NextViT got an empty batch")
        if not x.is_floating_point():
            raise ValueError(f"NextViT expects a floating-point tensor, got {x.dtype}")
        p = next(self.parameters())
        if x.dtype != p.dtype or x.device != p.device:
            raise ValueError(f"input is {x.dtype} on {x.device} but the model is {p.dtype} on {p.device}: "
                             f"convert one of them (x.to(device, dtype) or model.to(...))")
        h, w = x.shape[2:]
        for stage, ((sh, sw), sr) in enumerate(zip(stage_sizes(h, w), self.sr_ratios)):
            has_attention = NTB in self.stage_block_types[stage]
            if has_attention and sr > 1 and sh * sw < sr * sr:
                raise ValueError(
                    f"input {h}x{w} is too small: stage {stage} is {sh}x{sw} = {sh * sw} tokens, fewer than one "
                    f"{sr}x{sr} = {sr * sr}-token attention pooling window (25x25 is the smallest square input)"
                )

    def _run_features(self, x, collect: bool):
        outputs = []
        x = self.stem(x)
        stage_id = 0
        for idx, layer in enumerate(self.features):
            if self.use_checkpoint and self.training:
                x = torch.utils.checkpoint.checkpoint(layer, x, use_reentrant=False)
            else:
                x = layer(x)
            if idx == self.stage_out_idx[stage_id]:
                if collect:
                    if self.extra_norm_list is not None:
                        # As in the published detection backbone: the norm is applied in line.
                        x = self.extra_norm_list[stage_id](x)
                    outputs.append(x)
                stage_id += 1
        return outputs if collect else x

    # ------------------------------------------------------------ fused path
    def fused_impl(self, x) -> Optional[str]:
        """The ops ``impl`` the fused graph runs with for ``x``, or None when the
        module graph runs (training, CPU under "auto", kernels="reference", or a
        forward whose result autograd needs: the fused ops have no backward)."""
        if self.kernels not in KERNELS:
            raise ValueError(f"kernels must be one of {KERNELS}, got {self.kernels!r}")
        if self.cuda_graphs not in CUDA_GRAPHS:
            raise ValueError(f"cuda_graphs must be one of {CUDA_GRAPHS}, got {self.cuda_graphs!r}")
        if self.kernels == "reference" or not isinstance(x, torch.Tensor):
            return None  # (check_input rejects a non-tensor)
        forced = self.kernels in ("triton", "clib")
        if self.training:
            if forced:
                raise ValueError(f"kernels={self.kernels!r} is inference-only (BatchNorms are folded): call "
                                 "model.eval(), or use kernels='auto' to train with the PyTorch reference path")
            return None
        if self.kernels == "auto" and not x.is_cuda:
            return None
        if self.kernels == "clib" and not x.is_cuda and _library.host is None:
            raise ValueError("kernels='clib' runs the C library on CUDA tensors (on a CPU only under "
                             "nextvit_kernels.testing.cpu_driver())")
        if torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in self.parameters())):
            self.check_input(x)  # a bad input is reported as such first
            how = ("run it under torch.inference_mode() or torch.no_grad(), or call "
                   "model.requires_grad_(False)")
            if forced:
                raise ValueError(f"kernels={self.kernels!r} has no backward, and autograd needs this forward: {how}, "
                                 "or use kernels='auto' (reference path when gradients are needed)")
            if not self._grad_warned:
                self._grad_warned = True
                warnings.warn(f"NextViT: autograd needs this forward, so it runs the PyTorch reference path; "
                              f"for the fused kernels {how}.", stacklevel=3)
            return None
        return "triton"

    def invalidate_fused(self):
        """Drops the folded plan with its bound programs and CUDA graphs; the next fused
        forward folds again. ``.to()``, ``load_state_dict``/``load_checkpoint`` and
        ``merge_bn`` call it; in-place weight updates are seen without it."""
        with self._plan_lock():
            plan, self._fused_plan = getattr(self, "_fused_plan", None), None
        if plan is not None:
            plan.release()

    def _plan_lock(self):
        # Dynamo cannot trace a lock; a traced fold is single-threaded.
        return contextlib.nullcontext() if torch.compiler.is_compiling() else self.weights_lock

    def _apply(self, fn, *args, **kwargs):
        with self.weights_lock:
            self.invalidate_fused()
            return super()._apply(fn, *args, **kwargs)

    def load_state_dict(self, *args, **kwargs):
        with self.weights_lock:  # its post hook releases the plan; the lock keeps folds out meanwhile
            return super().load_state_dict(*args, **kwargs)

    def __getstate__(self):
        # The plan holds bound launchers and CUDA graphs: neither pickles nor deep-copies,
        # and a copy folds its own anyway; nor does a lock.
        state = self.__dict__.copy()
        state["_fused_plan"] = None
        del state["weights_lock"]
        return state

    def __setstate__(self, state):
        super().__setstate__(state)
        self.weights_lock = threading.RLock()

    def fused_plan(self, device, dtype):
        """The BatchNorm-folded parameters of the fused graph for ``device``/``dtype``,
        cached and rebuilt when a weight, the device or the dtype changes. (A module
        or Parameter replaced by assignment is not seen: call ``invalidate_fused()``.)"""
        from . import fused

        plan = self._fused_plan
        if plan is not None and torch.compiler.is_compiling():
            return plan  # validated by the eager call that built it; dynamo guards on it
        if _stale(plan, device, dtype):
            # One thread folds; the others that found the plan stale wait for its plan. The new
            # plan is published whole, and a forward holding the old one finishes with it.
            with self._plan_lock():
                plan = self._fused_plan
                if _stale(plan, device, dtype):
                    self.invalidate_fused()
                    plan = fused.fold(self, device, dtype)
                    self._fused_plan = plan
        return plan

    def _run_fused(self, x, impl, features):
        from . import fused

        if _tracing(x):
            if self.kernels == "clib":
                raise ValueError("kernels='clib' (one C call per forward) cannot be traced by torch.compile or "
                                 "export: use kernels='auto', which traces the registered Triton ops")
            self.check_input(x)
            return fused.run(self.fused_plan(x.device, x.dtype), x, impl, features=features)
        plan = self._fused_plan
        if plan is None or plan.device != x.device or plan.dtype != x.dtype:
            self.check_input(x)  # before folding for x's device and dtype: they must be the model's
        plan = self.fused_plan(x.device, x.dtype)
        prog = self._clib_forward(plan, x, features)
        if prog is None:
            prog = plan.programs.get((tuple(x.shape), features))
        if prog is None:  # a new shape: checked once, then bound once
            self.check_input(x)
            prog = plan.program(x.shape, features)
        if not x.is_cuda:
            return prog(x)
        if x.device.index != torch.cuda.current_device():
            with torch.cuda.device(x.device):  # Triton launches on the current device
                return self._launch(plan, prog, x, features)
        return self._launch(plan, prog, x, features)

    def _clib_forward(self, plan, x, features):
        """The whole-model C runtime's forward for ``x``'s signature (one C call), or None where the
        Triton path runs: kernels="triton", no C library built, or under kernels="auto" a model or
        signature the C runtime failed on (warned once each)."""
        if self.kernels not in ("auto", "clib") or (self.kernels == "auto" and not x.is_cuda):
            return None
        sig = (tuple(x.shape), x.stride(), features)
        if sig in plan.clib_failed:
            return None
        rt = plan.clib
        if rt is None:
            with self._plan_lock():  # one thread uploads the plan
                rt = plan.clib
                if rt is None:
                    rt = plan.clib = self._load_clib(plan, x)
        if not isinstance(rt, runtime_module().Model):
            return None
        if sig not in plan.clib_seen:  # checked once per signature, as the Triton path binds a shape once
            self.check_input(x)
            plan.clib_seen.add(sig)
        forward = rt.forward_features if features else rt

        def run(inp):
            try:
                return forward(inp)
            except (runtime_module().ModelError, ValueError) as err:
                if self.kernels == "clib":
                    raise
                plan.clib_failed.add(sig)
                warnings.warn(f"nextvit_kernels: the C runtime failed for input {sig[0]} ({err}); this input "
                              "signature runs the Triton JIT path from now on", RuntimeWarning, stacklevel=5)
                return plan.program(inp.shape, features)(inp)
        return run

    def _load_clib(self, plan, x):
        """The plan on the C runtime (runtime.Model), or the error that prevents it (kernels="auto":
        the Triton path runs; a library that is not built is not worth a warning)."""
        from . import model_file
        rt_mod = runtime_module()
        try:
            return rt_mod.Model(model_file.plan_bytes(plan), device=x.device.index or 0)
        except RuntimeError as err:
            if self.kernels == "clib":
                raise RuntimeError(f"kernels='clib': the C runtime cannot run this model: {err}") from err
            if not str(err).startswith("the nextvit_kernels C library is not built"):
                warnings.warn(f"nextvit_kernels: the C runtime is not used for this model ({err}); the Triton "
                              "JIT path runs", RuntimeWarning, stacklevel=5)
            return err

    def _launch(self, plan, prog, x, features):
        from . import graphs

        if self.cuda_graphs == "auto" and graphs.capture_allowed(x):
            return plan.graph_cache(self.max_cuda_graphs).run(graphs.signature(x, features), x, prog)
        return prog(x)

    def cuda_graph(self, example: torch.Tensor, warmup: int = 3):
        """Captures the fused forward for ``example``'s shape, dtype and device in a
        CUDA graph and returns a callable that replays it (see ``GraphedForward``)."""
        return GraphedForward(self, example, warmup)

    def forward_features(self, x) -> List[torch.Tensor]:
        """Per-stage feature maps (strides 4, 8, 16, 32; channels 96, 256, 512, 1024)."""
        impl = self.fused_impl(x)
        if impl is not None:
            return self._run_fused(x, impl, features=True)
        self.check_input(x)
        return self._run_features(x, collect=True)

    def forward(self, x):
        impl = self.fused_impl(x)
        if impl is not None:
            return self._run_fused(x, impl, features=False)
        self.check_input(x)
        x = self._run_features(x, collect=False)
        x = self.avgpool(self.norm(x)).flatten(1)
        return self.proj_head(x)


def _invalidate_after_load(module, incompatible_keys):
    module.invalidate_fused()


def runtime_module():
    from . import runtime
    return runtime


def _stale(plan, device, dtype) -> bool:
    return plan is None or plan.device != device or plan.dtype != dtype or not plan.is_current()


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

    def __init__(self, model: "NextViT", example: torch.Tensor, warmup: int = 3):
        from . import graphs

        if not example.is_cuda:
            raise ValueError("cuda_graph needs a CUDA input")
        if model.training:
            raise ValueError("cuda_graph captures inference: call model.eval() first")
        self.model = model
        example = example.detach()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        # This graph is the only one wanted: no automatic graph during the warm-up.
        with torch.no_grad(), graphs.suspended():
            with torch.cuda.stream(stream):
                for _ in range(warmup):  # builds the folded plan and compiles the kernels
                    model(example)
            torch.cuda.current_stream().wait_stream(stream)
            self._graph = graphs._Graph(example, model)
        # The graph reads the folded weights of the plan it was captured with: keep them alive
        # if the model refolds (a weight change, or .to()) while this graph is still called.
        self._plan = model._fused_plan
        self._slot = graphs._Slot(self._graph)
        self.static_in, self.static_out = self._graph.static_in, self._graph.static_out

    def __call__(self, x: torch.Tensor, clone: bool = False) -> torch.Tensor:
        if x.shape != self.static_in.shape or x.dtype != self.static_in.dtype or x.device != self.static_in.device:
            raise ValueError(f"this graph was captured for {tuple(self.static_in.shape)} {self.static_in.dtype} on "
                             f"{self.static_in.device}, got {tuple(x.shape)} {x.dtype} on {x.device}")
        return self._slot.replay(x, clone=clone)


def _build(name, **kwargs):
    cfg = dict(VARIANTS[name])
    cfg.update(kwargs)
    return NextViT(**cfg)


def nextvit_small(**kwargs) -> NextViT:
    return _build("nextvit_small", **kwargs)


def nextvit_base(**kwargs) -> NextViT:
    return _build("nextvit_base", **kwargs)


def nextvit_large(**kwargs) -> NextViT:
    return _build("nextvit_large", **kwargs)
