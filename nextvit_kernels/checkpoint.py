"""Loading every Next-ViT checkpoint format into the published module layout
(docs/design.md §2): official (bare or ``{"model": ...}``), timm (also its
reparameterized dicts without the folded BatchNorms), detection/segmentation
backbones (``backbone.`` prefix, ``extra_norm_list``, no head), and this
package's own merged ``state_dict()``."""
import os
import re
import warnings
from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Union

import torch

from .model import NextViT

FORMATS = ("official", "timm", "backbone")
# BatchNorms that merge_bn() folds away; a dict without any of them is merged.
_PRE_BN = re.compile(r"^features\.\d+\.(norm|norm1|norm2|e_mhsa\.norm)\.")
_HEAD = re.compile(r"^(norm|proj_head)\.")
_EXTRA_NORM = re.compile(r"^extra_norm_list\.")


@dataclass
class LoadResult:
    format: str
    merged: bool
    missing: List[str] = field(default_factory=list)
    unexpected: List[str] = field(default_factory=list)

    def __str__(self):
        return (f"loaded {self.format} checkpoint{' (BatchNorm-merged)' if self.merged else ''}: "
                f"{len(self.missing)} missing, {len(self.unexpected)} unexpected keys")


def _read(src) -> Mapping[str, torch.Tensor]:
    if isinstance(src, Mapping):
        return src
    if not isinstance(src, (str, os.PathLike)):
        raise ValueError(f"load_checkpoint: src must be a path or a dict, got {type(src).__name__}")
    path = os.fspath(src)
    if not os.path.exists(path):
        raise ValueError(f"load_checkpoint: no such file: {path}")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # published training checkpoints can pickle more than tensors
        warnings.warn(f"{path} is not a plain tensor checkpoint ({err.__class__.__name__}); "
                      "loading it with weights_only=False: only do this for files you trust")
        return torch.load(path, map_location="cpu", weights_only=False)


def _unwrap(obj) -> Dict[str, torch.Tensor]:
    for _ in range(3):
        if isinstance(obj, Mapping) and not any(isinstance(v, torch.Tensor) for v in obj.values()):
            for key in ("model", "state_dict", "model_ema"):
                if isinstance(obj.get(key), Mapping):
                    obj = obj[key]
                    break
            else:
                break
    if not isinstance(obj, Mapping) or not obj:
        raise ValueError("load_checkpoint: found no state_dict (expected a dict of tensors, "
                         "possibly wrapped as {'model': ...} or {'state_dict': ...})")
    return {k[len("module."):] if k.startswith("module.") else k: v
            for k, v in obj.items() if isinstance(v, torch.Tensor)}


def detect_format(sd: Mapping[str, torch.Tensor]) -> str:
    keys = list(sd)
    if any(k.startswith("backbone.") for k in keys):
        return "backbone"
    if any(k.startswith("stages.") for k in keys):
        return "timm"
    if any(k.startswith("features.") for k in keys) and any(k.startswith("stem.") for k in keys):
        return "official"
    raise ValueError("load_checkpoint: unknown checkpoint format; expected official (stem.*, features.*), "
                     f"timm (stages.*) or backbone (backbone.*) keys, got e.g. {keys[:5]}")


def _from_timm(sd, depths) -> Dict[str, torch.Tensor]:
    offsets = [sum(depths[:i]) for i in range(len(depths))]
    out = {}
    for k, v in sd.items():
        m = re.match(r"^stages\.(\d+)\.blocks\.(\d+)\.(.*)$", k)
        if m:
            s, b, rest = int(m.group(1)), int(m.group(2)), m.group(3)
            if s >= len(depths):
                raise ValueError(f"load_checkpoint: timm key {k} names stage {s}; the model has {len(depths)}")
            rest = re.sub(r"^mlp\.fc([12])\.", r"mlp.conv\1.", rest)
            k = f"features.{offsets[s] + b}.{rest}"
        elif k.startswith("head.fc."):
            k = "proj_head.0." + k[len("head.fc."):]
        out[k] = v
    return out


def to_official(sd: Mapping[str, torch.Tensor], depths):
    """Any accepted format -> (format name, official key layout, keys of other
    modules that were dropped: a detector's neck and heads)."""
    sd = _unwrap(sd)
    fmt = detect_format(sd)
    ignored = []
    if fmt == "backbone":
        ignored = [k for k in sd if not k.startswith("backbone.")]
        sd = {k[len("backbone."):]: v for k, v in sd.items() if k.startswith("backbone.")}
        if any(k.startswith("stages.") for k in sd):
            sd = _from_timm(sd, depths)
    elif fmt == "timm":
        sd = _from_timm(sd, depths)
    return fmt, sd, ignored


def load_checkpoint(model: NextViT, src: Union[str, os.PathLike, Mapping], strict: bool = True) -> LoadResult:
    """Loads ``src`` (a path or a dict, any format of docs/design.md §2) into ``model``.

    A dict without the foldable BatchNorms (timm's reparameterized dicts, or a
    merged model's ``state_dict()``) merges ``model`` first. With ``strict``,
    any key missing or unexpected beyond what the format implies (a backbone has
    no head; ``extra_norm_list`` is only used by a model built with it) raises;
    a shape mismatch always raises. Returns what was missing and unexpected.
    """
    if not isinstance(model, NextViT):
        raise ValueError(f"load_checkpoint: model must be a NextViT, got {type(model).__name__}")
    fmt, sd, ignored = to_official(_read(src), model.depths)

    has_pre_bn = any(_PRE_BN.match(k) for k in sd)
    model_keys = model.state_dict().keys()
    if not has_pre_bn and any(_PRE_BN.match(k) for k in model_keys):
        model.merge_bn()
    elif has_pre_bn and model.is_bn_merged:
        raise ValueError("load_checkpoint: the checkpoint has un-merged BatchNorms but the model is merged; "
                         "load it into a fresh model, then call merge_bn()")
    merged = not has_pre_bn

    target = model.state_dict()
    mismatched = [f"{k}: checkpoint {list(v.shape)} vs model {list(target[k].shape)}"
                  for k, v in sd.items() if k in target and v.shape != target[k].shape]
    if mismatched:
        raise ValueError("load_checkpoint: shape mismatch for " + "; ".join(mismatched[:10])
                         + (f" (+{len(mismatched) - 10} more)" if len(mismatched) > 10 else ""))

    missing = [k for k in target if k not in sd]
    unexpected = [k for k in sd if k not in target]
    tolerated_missing = [k for k in missing if k.endswith("num_batches_tracked")
                         or (fmt == "backbone" and _HEAD.match(k))]
    tolerated_unexpected = [k for k in unexpected if _EXTRA_NORM.match(k)]
    bad_missing = [k for k in missing if k not in tolerated_missing]
    bad_unexpected = [k for k in unexpected if k not in tolerated_unexpected]
    if strict and (bad_missing or bad_unexpected):
        partial = [k for k in bad_missing if _PRE_BN.match(k)]
        hint = (" (the checkpoint has some of the foldable BatchNorms but not all: "
                "a partly merged dict cannot be loaded)") if partial and has_pre_bn else ""
        raise ValueError(f"load_checkpoint: {fmt} checkpoint does not match the model{hint}: "
                         f"missing {bad_missing[:10]}{' ...' if len(bad_missing) > 10 else ''}, "
                         f"unexpected {bad_unexpected[:10]}{' ...' if len(bad_unexpected) > 10 else ''}")
    model.load_state_dict({k: v for k, v in sd.items() if k in target}, strict=False)
    return LoadResult(fmt, merged, missing, unexpected + ignored)
