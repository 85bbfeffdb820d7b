"""Functional fused ops of the Next-ViT inference graph (docs/design.md §4).

Each op lives in its own module with its PyTorch reference, its Triton kernel
and its launcher; ``_registry`` turns the launchers into ``torch.library`` ops.
"""
from .conv_bn_relu import conv_bn_relu
from .e_mhsa import e_mhsa
from .head import head
from .mhca import mhca
from .mlp import mlp
from .patch_embed import patch_embed

__all__ = ["conv_bn_relu", "e_mhsa", "head", "mhca", "mlp", "patch_embed"]
