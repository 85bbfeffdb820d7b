"""nextvit_kernels: fused GPU kernels for the Next-ViT vision model.

``NextViT`` is a drop-in for the published model (same module and parameter
names); ``load_checkpoint`` reads the published, timm and backbone formats.
"""
from .checkpoint import LoadResult, load_checkpoint
from .model import NextViT, nextvit_base, nextvit_large, nextvit_small
from .onnx_export import export_onnx

__version__ = "0.1.0"
__all__ = ["NextViT", "nextvit_small", "nextvit_base", "nextvit_large", "load_checkpoint", "LoadResult", "export_onnx"]
