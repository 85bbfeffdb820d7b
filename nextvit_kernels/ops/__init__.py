"""Functional fused ops of the Next-ViT inference graph (docs/design.md §4).

Each op lives in its own module with its PyTorch reference, its Triton kernel
and its launcher; ``_registry`` turns the launchers into ``torch.library`` ops.
"""
import importlib

from .conv_bn_relu import conv_bn_relu
from .e_mhsa import e_mhsa
from .head import head
from .mhca import mhca
from .mlp import mlp
from .patch_embed import patch_embed

__all__ = ["conv_bn_relu", "e_mhsa", "head", "mhca", "mlp", "patch_embed"]


def module(name: str):
    """The module of op ``name`` (its reference, kernels, ``bind`` and launcher); the
    package attributes of the same names are the public functions."""
    return importlib.import_module(f"{__name__}.{name}")
