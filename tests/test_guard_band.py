"""Out-of-bounds reads, which the Triton interpreter lets pass silently (DESIGN §5).

Every input and weight is a view into a larger buffer whose other elements are
NaN, so a kernel that reads past (or before) any of its tensors and uses the
value produces NaN, and assert_close reports it. On a GPU the same read could
fault or silently read a neighbour's data.
"""
import importlib

import pytest
import torch

from nextvit_kernels import ops
from _util import assert_close, force_split

GUARD = 4096  # elements of NaN on each side


def banded(t: torch.Tensor) -> torch.Tensor:
    """The same values, stored inside NaN guard bands (same memory format)."""
    cl = t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()
    flat = t.permute(0, 2, 3, 1).reshape(-1) if cl else t.reshape(-1)
    buf = torch.full((flat.numel() + 2 * GUARD,), float("nan"), dtype=t.dtype)
    buf[GUARD:GUARD + flat.numel()] = flat
    inner = buf[GUARD:GUARD + flat.numel()]
    if cl:
        b, c, h, w = t.shape
        return inner.view(b, h, w, c).permute(0, 3, 1, 2)
    return inner.view(t.shape)


def rnd(*shape, scale=1.0):
    return torch.randn(*shape, dtype=torch.float64) * scale


def x_cl(b, c, h, w):
    return rnd(b, c, h, w).contiguous(memory_format=torch.channels_last)


CASES = {
    "conv_bn_relu_stem": lambda: (ops.conv_bn_relu, "conv_bn_relu",
                                  [x_cl(2, 3, 7, 9), rnd(64, 3, 3, 3, scale=0.3), rnd(64)], dict(stride=2)),
    "conv_bn_relu_s1": lambda: (ops.conv_bn_relu, "conv_bn_relu",
                                [x_cl(1, 40, 5, 6), rnd(24, 40, 3, 3, scale=0.1), rnd(24)], dict(stride=1)),
    "patch_embed_s2": lambda: (ops.patch_embed, "patch_embed",
                               [x_cl(2, 96, 5, 7), rnd(64, 96, scale=0.1), rnd(64)], dict(stride=2)),
    "patch_embed_s1": lambda: (ops.patch_embed, "patch_embed",
                               [x_cl(1, 64, 3, 3), rnd(96, 64, scale=0.1), rnd(96)], dict(stride=1)),
    "mhca": lambda: (ops.mhca, "mhca",  # few pixels: split mode (conv kernel -> scratch -> GEMM)
                     [x_cl(2, 96, 5, 4), rnd(96, 32, 3, 3, scale=0.1), rnd(96), rnd(96, 96, scale=0.1)], {}),
    "mhca_fused": lambda: (ops.mhca, "mhca",  # the same through the one-kernel mode (forced below)
                           [x_cl(2, 96, 5, 4), rnd(96, 32, 3, 3, scale=0.1), rnd(96), rnd(96, 96, scale=0.1)],
                           {}),
    "mlp": lambda: (ops.mlp, "mlp",
                    [x_cl(1, 64, 3, 5), rnd(288, 64, scale=0.1), rnd(288), rnd(64, 288, scale=0.05), rnd(64)], {}),
    "mlp_concat": lambda: (ops.mlp, "mlp",
                           [x_cl(2, 64, 2, 3), rnd(192, 96, scale=0.1), rnd(192), rnd(96, 192, scale=0.05),
                            rnd(96)], dict(x2=x_cl(2, 32, 2, 3))),
    "mlp_split": lambda: (ops.mlp, "mlp",  # Cout > 256: fc1 -> scratch -> fc2
                          [x_cl(1, 288, 2, 3), rnd(112, 288, scale=0.05), rnd(112), rnd(288, 112, scale=0.1),
                           rnd(288)], {}),
    "mlp_split_concat": lambda: (ops.mlp, "mlp",
                                 [x_cl(2, 256, 1, 3), rnd(144, 320, scale=0.05), rnd(144),
                                  rnd(320, 144, scale=0.1), rnd(320)], dict(x2=x_cl(2, 64, 1, 3))),
    "e_mhsa_sr2": lambda: (ops.e_mhsa, "e_mhsa",
                           [x_cl(2, 64, 5, 3)] + [rnd(64, 64, scale=0.1) if i % 2 == 0 else rnd(64) for i in range(8)],
                           dict(sr_ratio=2)),
    "e_mhsa_sr1_online": lambda: (ops.e_mhsa, "e_mhsa",
                                  [x_cl(1, 32, 9, 9)] + [rnd(32, 32, scale=0.2) if i % 2 == 0 else rnd(32)
                                                         for i in range(8)], dict(sr_ratio=1)),
    "e_mhsa_split": lambda: (ops.e_mhsa, "e_mhsa",  # Cout > 256: per-head attention -> scratch -> GEMM
                             [x_cl(2, 288, 3, 3)] + [rnd(288, 288, scale=0.05) if i % 2 == 0 else rnd(288)
                                                     for i in range(8)], dict(sr_ratio=2)),
    "head": lambda: (ops.head, "head", [x_cl(2, 160, 3, 3), rnd(17, 160, scale=0.1), rnd(17)], {}),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_no_out_of_bounds_reads(name, monkeypatch):
    fn, _, args64, kwargs64 = CASES[name]()
    if name == "mhca_fused":
        force_split(monkeypatch, importlib.import_module("nextvit_kernels.ops.mhca"), False)
    dtype = torch.float32
    args = [banded(a.to(dtype)) for a in args64]
    kwargs = {k: banded(v.to(dtype)) if isinstance(v, torch.Tensor) else v for k, v in kwargs64.items()}
    assert all(torch.isfinite(a).all() for a in args)
    out = fn(*args, **kwargs, impl="triton")
    # The fp32 reference on clean copies: what matters here is NaN leaking in.
    ref = fn(*[a.to(dtype) for a in args64],
             **{k: v.to(dtype) if isinstance(v, torch.Tensor) else v for k, v in kwargs64.items()},
             impl="reference")
    assert_close(out, ref, dtype, what=name)
