"""The Next-ViT architecture as data: the variants, their stage layout, and what an input must be.

The lowest layer of the package (it imports nothing of it): the model builds its modules from
these tables, the command-line tools read the variant names from here, and the inference engine
checks inputs with the same ``check_input`` as the module graph.
"""
from typing import Dict, List, Sequence, Tuple

HEAD_DIM = 32
STEM_CHS = (64, 32, 64)
SR_RATIOS = (8, 4, 2, 1)
STRIDES = (1, 2, 2, 2)
VARIANTS: Dict[str, dict] = {
    "nextvit_small": dict(depths=(3, 4, 10, 3), path_dropout=0.1),
    "nextvit_base": dict(depths=(3, 4, 20, 3), path_dropout=0.2),
    "nextvit_large": dict(depths=(3, 4, 30, 3), path_dropout=0.2),
}
# The short names every command-line tool takes (s, b, l).
SHORT_NAMES = {"s": "nextvit_small", "b": "nextvit_base", "l": "nextvit_large"}
NCB, NTB = "NCB", "NTB"


def variant_of(depths: Sequence[int]) -> str:
    """The published variant with these stage depths, else ``"custom"``."""
    for name, cfg in VARIANTS.items():
        if tuple(cfg["depths"]) == tuple(depths):
            return name
    return "custom"


def stage_layout(depths: Sequence[int]) -> Tuple[List[List[int]], List[List[str]]]:
    """Each stage's block output widths and block kinds (``NCB``/``NTB``), as published: the
    third stage repeats four convolution blocks and one transformer block."""
    widths = [[96] * depths[0],
              [192] * (depths[1] - 1) + [256],
              [384, 384, 384, 384, 512] * (depths[2] // 5),
              [768] * (depths[3] - 1) + [1024]]
    kinds = [[NCB] * depths[0],
             [NCB] * (depths[1] - 1) + [NTB],
             [NCB, NCB, NCB, NCB, NTB] * (depths[2] // 5),
             [NCB] * (depths[3] - 1) + [NTB]]
    return widths, kinds


def stage_sizes(h: int, w: int) -> List[tuple]:
    """Spatial size of each stage's output (strides 4, 8, 16, 32) for an h x w input:
    every stride-2 step (3x3 conv, padding 1, or ceil-mode 2x2 pooling) maps n -> ceil(n/2)."""
    sizes = []
    for i in range(5):
        h, w = -(-h // 2), -(-w // 2)
        if i >= 1:
            sizes.append((h, w))
    return sizes


def check_input(x, like, sr_ratios: Sequence[int], attention_stages: Sequence[bool]) -> None:
    """Raises ValueError naming what is wrong with ``x`` for a model whose weights are ``like``
    (a parameter: its dtype and device) and whose stages pool attention keys by ``sr_ratios``
    (``attention_stages[i]``: stage i has a transformer block)."""
    import torch  # here: the command-line tools read this module where torch may be missing

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
    if x.dtype != like.dtype or x.device != like.device:
        raise ValueError(f"input is {x.dtype} on {x.device} but the model is {like.dtype} on {like.device}: "
                         f"convert one of them (x.to(device, dtype) or model.to(...))")
    h, w = x.shape[2:]
    for stage, ((sh, sw), sr, attention) in enumerate(zip(stage_sizes(h, w), sr_ratios, attention_stages)):
        if attention and sr > 1 and sh * sw < sr * sr:
            raise ValueError(
                f"input {h}x{w} is too small: stage {stage} is {sh}x{sw} = {sh * sw} tokens, fewer than one "
                f"{sr}x{sr} = {sr * sr}-token attention pooling window (25x25 is the smallest square input)"
            )
