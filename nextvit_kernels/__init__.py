"""nextvit_kernels: fused GPU kernels for the Next-ViT vision model.

``NextViT`` is a drop-in for the published model (same module and parameter
names); ``load_checkpoint`` reads the published, timm and backbone formats.
"""
from .checkpoint import LoadResult, load_checkpoint
from .model import NextViT, nextvit_base, nextvit_large, nextvit_small

__version__ = "0.1.0"


def __getattr__(name):
    # Imported on first use: the export pulls in the fused graph, and with it Triton, which
    # must not be imported before a user sets TRITON_INTERPRET.
    if name == "export_onnx":
        from .onnx_export import export_onnx

        return export_onnx
    raise AttributeError(f"module 'nextvit_kernels' has no attribute {name!r}")
__all__ = ["NextViT", "nextvit_small", "nextvit_base", "nextvit_large", "load_checkpoint", "LoadResult", "export_onnx"]
