"""``accelerate(model)``: the fused engine under a timm Next-ViT, in place (docs/design.md §10).

People build Next-ViT with timm: ``timm.create_model("nextvit_small.bd_in1k", pretrained=True)``,
or ``features_only=True`` as a detection or segmentation backbone. ``accelerate(model)`` makes
that object run the fused kernels in eval mode without rebuilding it or converting its weights:

- **what changes:** the object's class becomes a subclass of its timm class (``isinstance`` still
  holds) whose forwards ask an ``engine.Engine`` first, and the object holds that engine. Its
  parameters, buffers, hooks and ``state_dict`` are untouched, and every forward the engine
  declines (training, autograd, a CPU tensor under ``kernels="auto"``) is timm's own code.
- **what is folded:** the engine folds the model's own tensors through a view that shows timm's
  modules under the published names ``fused.fold`` reads (``_Layout``). The view is made again at
  every eager folding, so timm's own rewrites (``reparameterize``, ``reset_classifier``) are seen
  with the weight change that comes with them.
- **what is checked first, before any change** (``_check``; a refusal leaves the model as it was):
  that timm's code for every forward the fused graph replaces is one this module was checked
  against (``KNOWN_CODE``: a fingerprint of each method's syntax tree, robust to comments and
  formatting; ``python -m nextvit_kernels.timm_patch --fingerprint FILE...`` prints them for a
  timm release's sources), and that every module, block by block, is what the published layout
  (``blocks``, ``config.stage_layout``) builds for the same hyper-parameters.

A classifier's head runs fused (with the final BatchNorm folded in) when it is timm's average pool
and Linear; any other head (``num_classes=0``, another pooling) runs the fused body, then timm's
own norm and head. ``forward_head`` alone stays timm's: with the norm already applied there is
nothing to fold, and eager's pooling and GEMM beat the head kernel on the H200 (bench/results).
"""
import ast
import hashlib
import inspect
import itertools
import textwrap
import warnings
import weakref
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

from . import config, fused, graphs
from .blocks import NCB, NTB, ConvBNReLU
from .engine import Engine, check_settings, renamed

# The methods whose code the fused graph stands in for (module path, class, method), and their
# fingerprints in every timm release from 1.0.3 to 1.0.31 (PyPI has no 1.0.4 to 1.0.6). One method
# has two: 1.0.31 changed FeatureDictNet._collect's gradient-checkpointing branch only. A new
# fingerprint is added after reading the new code, never to make a refusal go away.
_NV, _FEAT = "timm.models.nextvit", "timm.models._features"
KNOWN_CODE: Dict[Tuple[str, str, str], Tuple[str, ...]] = {
    (_NV, "ConvNormAct", "forward"): ('b38c9552c4299beb',),
    (_NV, "PatchEmbed", "forward"): ('d9a7efbc2c63fc0b',),
    (_NV, "ConvAttention", "forward"): ('2b162328c3298564',),
    (_NV, "NextConvBlock", "forward"): ('6902eaf10171e8f4',),
    (_NV, "EfficientAttention", "forward"): ('06fa4733aac027bf',),
    (_NV, "NextTransformerBlock", "forward"): ('7350e5452fe417e3',),
    (_NV, "NextStage", "forward"): ('fd0e2ed2118c9892',),
    (_NV, "NextViT", "forward"): ('9c4503da7e82603d',),
    (_NV, "NextViT", "forward_features"): ('c934c99af59668fe',),
    (_NV, "NextViT", "forward_head"): ('600f004eb8c2586d',),
    (_NV, "NextViT", "forward_intermediates"): ('25cef0c688436456',),
    ("timm.layers.mlp", "ConvMlp", "forward"): ('48d28dd5e25c814b',),
    ("timm.layers.classifier", "ClassifierHead", "forward"): ('49a8c58be08a9c3f',),
    ("timm.layers.adaptive_avgmax_pool", "SelectAdaptivePool2d", "forward"): ('01fd9a8d30923c6e',),
    # (forward_intermediates came in 1.0.16: an older release has none, and its model gets none)
    (_FEAT, "FeatureDictNet", "_collect"): ('675ef9de8173fdc1', '415514b335daf083'),
    (_FEAT, "FeatureListNet", "forward"): ('35c7b4982adc8851',),
}

_OPTIONAL = {(_NV, "NextViT", "forward_intermediates")}
_ACCELERATED: Dict[type, type] = {}  # timm class -> its accelerated subclass


# ------------------------------------------------------------------ code fingerprints
def _tree(node) -> tuple:
    """A syntax tree as nested tuples without positions, docstrings, empty fields or the fields a
    newer Python adds empty (``type_params``): the same code gives the same tree on 3.9 to 3.13."""
    if isinstance(node, list):
        return tuple(_tree(n) for n in node)
    if not isinstance(node, ast.AST):
        return node
    fields = []
    for name, value in ast.iter_fields(node):
        if name == "body" and isinstance(value, list) and value and isinstance(value[0], ast.Expr) \
                and isinstance(value[0].value, ast.Constant) and isinstance(value[0].value.value, str):
            value = value[1:]  # the docstring
        if value is None or value == [] or name in ("type_comment", "kind"):
            continue
        fields.append((name, _tree(value)))
    return (type(node).__name__, tuple(fields))


def fingerprint(func_node: ast.AST) -> str:
    return hashlib.sha1(repr(_tree(func_node)).encode()).hexdigest()[:16]


def _method_node(cls, name: str) -> ast.AST:
    return ast.parse(textwrap.dedent(inspect.getsource(getattr(cls, name)))).body[0]


def _changed_code() -> List[str]:
    """The checked methods whose installed code is none of the known ones."""
    import importlib

    changed = []
    for (module, cls, meth), known in KNOWN_CODE.items():
        try:
            owner = getattr(importlib.import_module(module), cls)
            if (module, cls, meth) in _OPTIONAL and not hasattr(owner, meth):
                continue
            node = _method_node(owner, meth)
        except (ImportError, AttributeError, OSError, TypeError, SyntaxError):
            changed.append(f"{cls}.{meth} (not found)")
            continue
        if fingerprint(node) not in known:
            changed.append(f"{cls}.{meth}")
    return changed


# ------------------------------------------------------------------ the layout view
class _PatchEmbed(nn.Module):
    """timm's PatchEmbed under the published names (its stride is its pooling)."""

    def __init__(self, pe):
        super().__init__()
        self.conv, self.norm = pe.conv, pe.norm
        self.stride = 2 if isinstance(pe.pool, nn.AvgPool2d) else 1


class _Mlp(nn.Module):
    def __init__(self, mlp):
        super().__init__()
        self.conv1, self.conv2 = mlp.fc1, mlp.fc2


class _Block(nn.Module):
    """A timm NextConvBlock / NextTransformerBlock under the published names of its parts."""

    def __init__(self, blk):
        super().__init__()
        for name in ("mhca", "norm", "e_mhsa", "norm1", "norm2"):
            if hasattr(blk, name):
                setattr(self, name, getattr(blk, name))
        self.patch_embed = _PatchEmbed(blk.patch_embed)
        if hasattr(blk, "projection"):
            self.projection = _PatchEmbed(blk.projection)
        self.mlp = _Mlp(blk.mlp)


class _Layout(nn.Module):
    """A timm Next-ViT as ``fused.fold`` reads a NextViT: its own modules, published names."""

    def __init__(self, parts: "_Parts"):
        super().__init__()
        self.stem = nn.ModuleList(parts.stem)
        self.features = nn.ModuleList(_Block(b) for s in parts.stages for b in s.blocks)
        self.stage_out_idx = [n - 1 for n in itertools.accumulate(parts.depths)]
        self.norm = parts.norm
        self.proj_head = nn.ModuleList([parts.head.fc]) if parts.fused_head else None
        self.extra_norm_list = None


# ------------------------------------------------------------------ what the model is
@dataclass
class _Parts:
    stem: list
    stages: list
    norm: Optional[nn.Module]
    head: Optional[nn.Module]
    fused_head: bool
    depths: Tuple[int, ...]
    sr_ratios: Tuple[int, ...]
    attention: Tuple[bool, ...]
    out_stages: Tuple[int, ...]  # the stage outputs a features_only model returns


def _timm_classes():
    try:
        from timm.models._features import FeatureListNet
        from timm.models.nextvit import NextViT
    except ImportError as err:
        raise ValueError(f"accelerate() patches timm's Next-ViT, and timm cannot be imported ({err})") from err
    return NextViT, FeatureListNet


def _base_class(model) -> type:
    cls = type(model)
    return cls.__bases__[-1] if cls in _ACCELERATED.values() else cls


def fused_head(head) -> bool:
    """Whether a timm ClassifierHead is the average pool and Linear that the head kernel computes."""
    from timm.layers import ClassifierHead

    gp = getattr(head, "global_pool", None)
    return (type(head) is ClassifierHead and isinstance(head.fc, nn.Linear) and isinstance(head.flatten, nn.Identity)
            and isinstance(gp.pool, nn.AdaptiveAvgPool2d) and gp.pool.output_size in (1, (1, 1))
            and isinstance(gp.flatten, nn.Flatten))


def _parts(model) -> _Parts:
    TimmNextViT, FeatureListNet = _timm_classes()
    cls = _base_class(model)
    if cls is TimmNextViT:
        stem, stages, norm, head = list(model.stem), list(model.stages), model.norm, model.head
        out_stages = ()
        if len(stages) != 4:
            raise ValueError(f"the model has {len(stages)} stages, not 4 (pruned by prune_intermediate_layers?): the "
                             "fused engine runs the four stages of the published model")
    elif cls is FeatureListNet:
        names = list(model.keys())
        want = [f"stem_{i}" for i in range(4)] + [f"stages_{i}" for i in range(len(names) - 4)]
        if names != want or not 1 <= len(names) - 4 <= 4:
            raise ValueError(f"this features_only model's modules are {names}, not a Next-ViT's stem_0..3, stages_0..3")
        if str(getattr(model.output_fmt, "value", model.output_fmt)) != "NCHW":
            raise ValueError(f"output_fmt={model.output_fmt}: the fused engine returns NCHW feature maps")
        taps = {k for k in model.return_layers if k.startswith("stages_")}
        if taps != set(model.return_layers):
            raise ValueError(f"return layers {sorted(model.return_layers)}: only stage outputs can be returned")
        out_stages = tuple(sorted(int(k[len("stages_"):]) for k in taps))
        if len(names) - 4 != 4:
            raise ValueError(f"out_indices {out_stages} end at stage {out_stages[-1]}, so timm kept only "
                             f"{len(names) - 4} of the 4 stages: the fused engine (and the C runtime) runs all "
                             "four; build the backbone with out_indices that include 3 and drop the maps not used")
        stem, stages, norm, head = [model[n] for n in want[:4]], [model[n] for n in want[4:]], None, None
    else:
        ours = " (nextvit_kernels' own NextViT runs the fused engine itself)" if cls.__module__.startswith(
            __package__) else ""
        raise ValueError("accelerate() takes a timm Next-ViT (timm.create_model('nextvit_small', ...)) or a "
                         f"features_only model built from one; got {cls.__module__}.{cls.__qualname__}{ours}")
    depths = tuple(len(s.blocks) for s in stages)
    sr = tuple(next((b.e_mhsa.sr_ratio for b in s.blocks if hasattr(b, "e_mhsa")), config.SR_RATIOS[i])
               for i, s in enumerate(stages))
    attention = tuple(any(hasattr(b, "e_mhsa") for b in s.blocks) for s in stages)
    return _Parts(stem, stages, norm, head, head is not None and fused_head(head), depths, sr, attention, out_stages)


# ------------------------------------------------------------------ the structure check
_NO_OPS = (nn.Identity, nn.Dropout)  # and DropPath (timm's and ours): nothing in eval
_POOL_ATTRS = ("kernel_size", "stride", "padding", "ceil_mode", "count_include_pad")
_ATTN_ATTRS = ("sr_ratio", "head_dim", "num_heads", "dim", "out_dim")
_RENAMES = (("mlp.fc1", "mlp.conv1"), ("mlp.fc2", "mlp.conv2"), ("patch_embed.pool", "patch_embed.avgpool"),
            ("projection.pool", "projection.avgpool"))


def _is_no_op(m) -> bool:
    return isinstance(m, _NO_OPS) or type(m).__name__ == "DropPath"


def _signature(m) -> str:
    if isinstance(m, nn.ReLU):
        return "ReLU"  # in place or not: the same values
    if isinstance(m, (nn.AvgPool1d, nn.AvgPool2d)):
        return f"{type(m).__name__}{tuple(getattr(m, a, None) for a in _POOL_ATTRS)}"
    return f"{type(m).__name__}({m.extra_repr()})"


def _leaves(module: nn.Module, renames=()) -> Dict[str, str]:
    out = {}
    for name, m in module.named_modules():
        if next(m.children(), None) is None and not _is_no_op(m):
            for old, new in renames:
                name = new + name[len(old):] if name.startswith(old) else name
            out[name] = _signature(m)
    return out


def _compare(where: str, theirs: nn.Module, ours: nn.Module) -> None:
    got, want = _leaves(theirs, _RENAMES), _leaves(ours)
    for name in sorted(set(got) | set(want)):
        if got.get(name) != want.get(name):
            raise ValueError(f"{where}{'.' + name if name else ''} is {got.get(name, 'missing')} where the published "
                             f"Next-ViT has {want.get(name, 'nothing')}")
    for a in _ATTN_ATTRS:
        if hasattr(theirs, "e_mhsa") and getattr(theirs.e_mhsa, a, None) != getattr(ours.e_mhsa, a, None):
            raise ValueError(f"{where}.e_mhsa.{a} is {getattr(theirs.e_mhsa, a, None)} where the published "
                             f"Next-ViT has {getattr(ours.e_mhsa, a, None)}")


def _check_structure(p: _Parts) -> None:
    """Each module against what the published layout builds for the same hyper-parameters (built
    on the meta device: no memory, no initialisation)."""
    stem_chs = tuple(c.conv.out_channels for c in p.stem[:3])
    ntb = next((b for s in p.stages for b in s.blocks if hasattr(b, "e_mhsa")), None)
    mix = getattr(ntb, "mix_block_ratio", 0.75)
    widths, kinds = config.stage_layout(p.depths)
    sep = "_" if p.out_stages else "."  # a features_only model's module names: stem_0, stages_1
    with torch.device("meta"):
        for i, (conv, (c_in, c_out, stride)) in enumerate(zip(p.stem, [(3, stem_chs[0], 2), (stem_chs[0], stem_chs[1], 1),
                                                                        (stem_chs[1], stem_chs[2], 1),
                                                                        (stem_chs[2], stem_chs[2], 2)])):
            _compare(f"stem{sep}{i}", conv, ConvBNReLU(c_in, c_out, 3, stride))
        c_in = stem_chs[2]
        for s, stage in enumerate(p.stages):
            if len(stage.blocks) != len(kinds[s]):
                raise ValueError(f"stage {s} has {len(stage.blocks)} blocks where the published layout for depths "
                                 f"{p.depths} has {len(kinds[s])}")
            stride = 2 if isinstance(stage.blocks[0].patch_embed.pool, nn.AvgPool2d) else 1
            for b, (blk, kind, c_out) in enumerate(zip(stage.blocks, kinds[s], widths[s])):
                st = stride if b == 0 else 1
                ref = (NCB(c_in, c_out, st) if kind == config.NCB else
                       NTB(c_in, c_out, 0.0, st, sr_ratio=p.sr_ratios[s], mix_block_ratio=mix))
                if getattr(blk, "is_fused", False):
                    ref.merge_bn()  # timm's reparameterize() folded the same BatchNorms
                _compare(f"stages{sep}{s}.blocks.{b}", blk, ref)
                c_in = c_out
    if p.norm is not None and not isinstance(p.norm, nn.Identity):
        _compare("norm", p.norm, nn.BatchNorm2d(c_in))


def _check(model) -> _Parts:
    """What ``model`` is, or a ValueError saying why it cannot be accelerated."""
    try:
        return _checked(model)
    except (AttributeError, IndexError, TypeError) as err:  # a part missing where timm builds one
        raise ValueError(f"the model's modules are not the Next-ViT that timm builds ({type(err).__name__}: "
                         f"{err})") from err


def _checked(model) -> _Parts:
    p = _parts(model)
    changed = _changed_code()
    if changed:
        import timm

        raise ValueError(f"timm {timm.__version__}'s Next-ViT code differs from the timm releases accelerate() was "
                         f"checked against (1.0.3 to 1.0.31) in {', '.join(changed)}: the fused graph might not "
                         "compute what it computes; use nextvit_kernels.NextViT with load_checkpoint instead")
    if p.stem[0].conv.in_channels != 3:
        raise ValueError(f"the model takes {p.stem[0].conv.in_channels}-channel images: the fused stem takes 3")
    conv = p.stages[0].blocks[0].mhca.group_conv3x3
    if conv.in_channels // conv.groups != config.HEAD_DIM:
        raise ValueError(f"head_dim={conv.in_channels // conv.groups}: the fused kernels take the published "
                         f"{config.HEAD_DIM}-channel heads")
    _check_structure(p)
    return p


# ------------------------------------------------------------------ the patched classes
class _State:
    """What an accelerated model holds: its engine, the layout view it folds and what it returns."""

    def __init__(self, model, parts: _Parts, engine: Engine):
        self.engine, self.parts = engine, parts
        self.layout = _Layout(parts)
        _watch(model, self)


# Module, parameter or buffer assignments in an accelerated model's modules drop its folding.
# The engine sees in-place writes by the tensors' versions, not a replaced module or parameter,
# and timm replaces both: reparameterize() swaps each merged BatchNorm for an Identity after
# changing the weights through .data (which no version counts), reset_classifier() makes a new fc.
_WATCHED: "weakref.WeakKeyDictionary[nn.Module, weakref.WeakSet]" = weakref.WeakKeyDictionary()
_HOOKS: list = []


def _on_registration(module, name, value):
    for st in list(_WATCHED.get(module, ())):
        st.engine.invalidate()


def _watch(model, st: _State) -> None:
    if not _HOOKS:  # once per process; a lookup per registration anywhere (module construction) after
        from torch.nn.modules import module as torch_module

        _HOOKS.extend(register(_on_registration) for register in (
            torch_module.register_module_module_registration_hook,
            torch_module.register_module_parameter_registration_hook,
            torch_module.register_module_buffer_registration_hook))
    for m in model.modules():
        _WATCHED.setdefault(m, weakref.WeakSet()).add(st)


def _fold(model, device, dtype):
    st = model._nvk
    if not torch.compiler.is_compiling():
        # Checked and viewed again: the modules may have been replaced since (see _WATCHED). A
        # traced fold (rare: the eager call before it folds) reuses the view.
        st.parts = _check(model)
        st.layout = _Layout(st.parts)
        _watch(model, st)  # the modules that replaced others
    st.layout.training = model.training  # (the flag only: train() would reach timm's modules)
    return fused.fold(st.layout, device, dtype)


class _Accelerated:
    """What both patched classes share: the engine's settings travel with a copy or a pickle."""

    def _fused(self, x, features: bool):
        """The engine's forward, or None for timm's: always in training, whatever ``kernels`` says
        (a timm model trains as it did; NextViT(kernels="triton") refuses to)."""
        return None if self.training else self._nvk.engine.forward(self, x, features=features)

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_nvk"] = state["_nvk"].engine.settings()
        return state

    def __setstate__(self, state):
        settings = state.pop("_nvk")
        super().__setstate__(state)
        try:
            parts = _check(self)
        except ValueError as err:  # e.g. unpickled under another timm: the model loads, unaccelerated
            self.__class__ = _base_class(self)
            warnings.warn(f"this Next-ViT was pickled accelerated and loads as timm's own: {err}", RuntimeWarning)
            return
        _attach(self, parts, settings)


class _Classifier(_Accelerated):
    def forward(self, x):
        if fused_head(self.head):
            out = self._fused(x, False)
            return super().forward(x) if out is None else out
        return self.forward_head(self.forward_features(x))

    def forward_features(self, x):
        feats = self._fused(x, True)
        return super().forward_features(x) if feats is None else self.norm(feats[-1])


class _Intermediates(_Accelerated):
    """timm's NextViT.forward_intermediates (1.0.16 on), from the fused stage outputs."""

    def forward_intermediates(self, x, indices=None, norm: bool = False, stop_early: bool = False,
                              output_fmt: str = "NCHW", intermediates_only: bool = False):
        feats = self._fused(x, True) if output_fmt == "NCHW" else None
        if feats is None:
            return super().forward_intermediates(x, indices, norm=norm, stop_early=stop_early, output_fmt=output_fmt,
                                                 intermediates_only=intermediates_only)
        from timm.models._features import feature_take_indices

        take, max_index = feature_take_indices(len(self.stages), indices)
        last = len(self.stages) - 1
        inter = [self.norm(f) if i == last and norm else f for i, f in enumerate(feats) if i in take]
        if intermediates_only:
            return inter
        end = max_index if stop_early else last
        return (self.norm(feats[end]) if end == last else feats[end]), inter


class _Features(_Accelerated):
    def forward(self, x):
        feats = self._fused(x, True)
        return super().forward(x) if feats is None else [feats[i] for i in self._nvk.parts.out_stages]


def _accelerated_class(base: type) -> type:
    cls = _ACCELERATED.get(base)
    if cls is None:
        TimmNextViT, _ = _timm_classes()
        mixins = (_Features,) if base is not TimmNextViT else (
            (_Classifier, _Intermediates) if hasattr(base, "forward_intermediates") else (_Classifier,))
        name = f"Accelerated{base.__name__}"
        cls = type(name, (*mixins, base), {"__module__": __name__, "__qualname__": name})
        _ACCELERATED[base] = cls
    return cls


def __getattr__(name):
    # A pickled accelerated model names its class here: made on first use, as timm is optional.
    for base in _timm_classes():
        if name == f"Accelerated{base.__name__}":
            return _accelerated_class(base)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _attach(model, parts: _Parts, settings: dict) -> None:
    engine = Engine(parts.sr_ratios, parts.attention, fold=_fold, **settings)
    model.__dict__["_nvk"] = _State(model, parts, engine)
    model.__class__ = _accelerated_class(_base_class(model))


# ------------------------------------------------------------------ the API
def accelerate(model, kernels: str = "auto", cuda_graphs: str = "auto",
               max_cuda_graphs: int = graphs.DEFAULT_MAX_GRAPHS):
    """Makes a timm Next-ViT (``timm.create_model("nextvit_small", ...)``, any variant, head or not,
    reparameterized or not) or a ``features_only`` model built from one run the fused engine in
    eval mode, in place, and returns the same object.

    ``kernels`` and ``cuda_graphs`` mean what they mean for ``nextvit_kernels.NextViT`` (README,
    "Using it"): ``"auto"`` runs the C runtime on CUDA where it is built, else the Triton kernels,
    and timm's own forward on a CPU tensor; ``"runtime"`` the whole-model C runtime; ``"triton"``
    the Triton kernels; ``"reference"`` timm's forward. Training, autograd, ``state_dict`` and
    every timm method behave as before; a weight change is folded again on the next forward.
    Calling it again changes the settings. Raises ValueError, before any change, for a model it
    cannot accelerate. ``restore(model)`` undoes it."""
    if isinstance(getattr(model, "__dict__", {}).get("_nvk"), _State):
        eng = model._nvk.engine
        kernels = renamed(kernels)
        check_settings(kernels, cuda_graphs)
        with eng.lock:
            eng.kernels, eng.cuda_graphs, eng.max_cuda_graphs = kernels, cuda_graphs, max_cuda_graphs
            eng.invalidate()
        return model
    kernels = renamed(kernels)
    check_settings(kernels, cuda_graphs)
    _attach(model, _check(model), dict(kernels=kernels, cuda_graphs=cuda_graphs, max_cuda_graphs=max_cuda_graphs))
    return model


def restore(model):
    """Undoes ``accelerate(model)``: the object is its timm class again, with nothing of ours left
    (the folded weights, bound programs, CUDA graphs and C runtime are freed). Returns it."""
    st = getattr(model, "__dict__", {}).get("_nvk")
    if not isinstance(st, _State):
        raise ValueError(f"restore(): this {type(model).__name__} was not accelerated")
    st.engine.invalidate()
    for m in model.modules():
        _WATCHED.get(m, set()).discard(st)
    model.__class__ = _base_class(model)
    del model.__dict__["_nvk"]
    return model


def is_accelerated(model) -> bool:
    return isinstance(getattr(model, "__dict__", {}).get("_nvk"), _State)


# ------------------------------------------------------------------ fingerprints of a release
def _fingerprints_of(paths: List[str]) -> Dict[Tuple[str, str], str]:
    """(class, method) -> fingerprint of every checked method defined in these source files."""
    wanted = {(c, m) for _, c, m in KNOWN_CODE}
    found = {}
    for path in paths:
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read())
        for node in tree.body:
            if isinstance(node, ast.ClassDef):
                for fn in node.body:
                    if isinstance(fn, ast.FunctionDef) and (node.name, fn.name) in wanted:
                        found[(node.name, fn.name)] = fingerprint(fn)
    return found


def main(argv=None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m nextvit_kernels.timm_patch",
                                 description="Fingerprints of the timm methods accelerate() checks.")
    ap.add_argument("--fingerprint", nargs="+", metavar="FILE", required=True,
                    help="timm source files (models/nextvit.py, layers/mlp.py, layers/classifier.py, ...)")
    a = ap.parse_args(argv)
    for (cls, meth), fp in sorted(_fingerprints_of(a.fingerprint).items()):
        known = any(fp in v for (_, c, m), v in KNOWN_CODE.items() if (c, m) == (cls, meth))
        print(f"{cls}.{meth} {fp}{'' if known else '  (new)'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
