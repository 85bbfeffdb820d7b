"""nextvit_kernels: fused GPU kernels for the Next-ViT vision model.

``NextViT`` is a drop-in for the published model (same module and parameter
names); ``load_checkpoint`` reads the published, timm and backbone formats;
``save_runtime`` writes a model file for the C runtime (``nextvit_kernels.runtime``);
``accelerate`` makes a timm Next-ViT run the fused engine in place, ``restore`` undoes it.
"""
import importlib

__version__ = "0.1.0"

# Every name is imported on first use: ``nextvit_kernels.runtime`` must import where torch is
# not installed, and Triton must not be imported before a user sets TRITON_INTERPRET.
_LAZY = {
    "NextViT": "model", "nextvit_small": "model", "nextvit_base": "model", "nextvit_large": "model",
    "load_checkpoint": "checkpoint", "LoadResult": "checkpoint",
    "export_onnx": "onnx_export", "save_runtime": "model_file",
    "accelerate": "timm_patch", "restore": "timm_patch",
}


def __getattr__(name):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'nextvit_kernels' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{module}", __name__), name)


def __dir__():
    return sorted(list(globals()) + list(_LAZY))


__all__ = ["NextViT", "nextvit_small", "nextvit_base", "nextvit_large", "load_checkpoint", "LoadResult", "export_onnx",
           "save_runtime", "accelerate", "restore"]
