"""The published Next-ViT layers and blocks (NCB, NTB and their parts), module for
module, and the BatchNorm affine algebra that ``merge_bn`` and the fused graph share.

Module and parameter names are the published ones. This module holds no Triton:
``model`` assembles these blocks into ``NextViT``; ``fused`` folds them into kernels.
"""
from typing import Optional

import torch
from torch import nn

NORM_EPS = 1e-5

def _make_divisible(v, divisor, min_value=None):
    min_value = min_value or divisor
    new_v = max(min_value, int(v + divisor / 2) // divisor * divisor)
    if new_v < 0.9 * v:  # never round down by more than 10%
        new_v += divisor
    return new_v


class DropPath(nn.Module):
    """Stochastic depth per sample (training only)."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        self.p = p

    def forward(self, x):
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
        return x * mask / keep


def _bn(c):
    return nn.BatchNorm2d(c, eps=NORM_EPS)


def bn_scale_shift(bn):
    """The affine map y = s*x + t of an eval-mode BatchNorm, in float64; None for a
    folded one (``nn.Identity``)."""
    if isinstance(bn, nn.Identity):
        return None
    s = bn.weight.double() / torch.sqrt(bn.running_var.double() + bn.eps)
    return s, bn.bias.double() - bn.running_mean.double() * s


def compose_affine(a, b):
    """The affine map ``a`` then ``b`` (either may be None, the identity)."""
    if a is None:
        return b
    if b is None:
        return a
    return a[0] * b[0], b[0] * a[1] + b[1]


def affine_then_linear(w: torch.Tensor, b: Optional[torch.Tensor], aff):
    """Folds an affine map x -> s*x + t applied before a linear / 1x1 conv with
    weight ``w`` and bias ``b`` (None: zero): W' = W*s[None, :], b' = W@t + b.
    Returns float64 [O, I] and [O]."""
    w = w.double().reshape(w.shape[0], -1)
    b = b.double() if b is not None else torch.zeros(w.shape[0], dtype=torch.float64, device=w.device)
    if aff is None:
        return w, b
    s, t = aff
    return w * s[None, :], w @ t + b


@torch.no_grad()
def merge_pre_bn(layer: nn.Module, aff):
    """Folds ``aff`` (see bn_scale_shift) into ``layer``'s weight and bias in place."""
    w, b = affine_then_linear(layer.weight, layer.bias, aff)
    layer.weight.copy_(w.reshape(layer.weight.shape).to(layer.weight.dtype))
    if layer.bias is None:
        layer.bias = nn.Parameter(b.to(layer.weight.dtype))
    else:
        layer.bias.copy_(b.to(layer.bias.dtype))


class ConvBNReLU(nn.Module):
    def __init__(self, in_channels, out_channels, kernel_size, stride, groups=1):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size=kernel_size, stride=stride,
                              padding=1, groups=groups, bias=False)
        self.norm = _bn(out_channels)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x):
        return self.act(self.norm(self.conv(x)))


class PatchEmbed(nn.Module):
    def __init__(self, in_channels, out_channels, stride=1):
        super().__init__()
        self.stride = stride
        if stride == 2:
            self.avgpool = nn.AvgPool2d((2, 2), stride=2, ceil_mode=True, count_include_pad=False)
            self.conv = nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=1, bias=False)
            self.norm = _bn(out_channels)
        elif in_channels != out_channels:
            self.avgpool = nn.Identity()
            self.conv = nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=1, bias=False)
            self.norm = _bn(out_channels)
        else:
            self.avgpool = nn.Identity()
            self.conv = nn.Identity()
            self.norm = nn.Identity()

    def forward(self, x):
        return self.norm(self.conv(self.avgpool(x)))


class MHCA(nn.Module):
    """Multi-head convolutional attention."""

    def __init__(self, out_channels, head_dim):
        super().__init__()
        self.group_conv3x3 = nn.Conv2d(out_channels, out_channels, kernel_size=3, stride=1, padding=1,
                                       groups=out_channels // head_dim, bias=False)
        self.norm = _bn(out_channels)
        self.act = nn.ReLU(inplace=True)
        self.projection = nn.Conv2d(out_channels, out_channels, kernel_size=1, bias=False)

    def forward(self, x):
        return self.projection(self.act(self.norm(self.group_conv3x3(x))))


class Mlp(nn.Module):
    def __init__(self, in_features, out_features=None, mlp_ratio=None, drop=0.0, bias=True):
        super().__init__()
        out_features = out_features or in_features
        hidden_dim = _make_divisible(in_features * mlp_ratio, 32)
        self.conv1 = nn.Conv2d(in_features, hidden_dim, kernel_size=1, bias=bias)
        self.act = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(hidden_dim, out_features, kernel_size=1, bias=bias)
        self.drop = nn.Dropout(drop)

    def forward(self, x):
        x = self.drop(self.act(self.conv1(x)))
        return self.drop(self.conv2(x))


class NCB(nn.Module):
    """Next Convolution Block."""

    def __init__(self, in_channels, out_channels, stride=1, path_dropout=0.0, drop=0.0, head_dim=32, mlp_ratio=3):
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        assert out_channels % head_dim == 0
        self.patch_embed = PatchEmbed(in_channels, out_channels, stride)
        self.mhca = MHCA(out_channels, head_dim)
        self.attention_path_dropout = DropPath(path_dropout)
        self.norm = _bn(out_channels)
        self.mlp = Mlp(out_channels, mlp_ratio=mlp_ratio, drop=drop, bias=True)
        self.mlp_path_dropout = DropPath(path_dropout)
        self.is_bn_merged = False

    @torch.no_grad()
    def merge_bn(self):
        if not self.is_bn_merged:
            merge_pre_bn(self.mlp.conv1, bn_scale_shift(self.norm))
            self.norm = nn.Identity()
            self.is_bn_merged = True

    def forward(self, x):
        x = self.patch_embed(x)
        x = x + self.attention_path_dropout(self.mhca(x))
        x = x + self.mlp_path_dropout(self.mlp(self.norm(x)))
        return x


class E_MHSA(nn.Module):
    """Efficient multi-head self-attention over (B, N, C) tokens; keys and
    values come from 1-D average pooling of sr² consecutive tokens."""

    def __init__(self, dim, out_dim=None, head_dim=32, qkv_bias=True, qk_scale=None,
                 attn_drop=0.0, proj_drop=0.0, sr_ratio=1):
        super().__init__()
        self.dim = dim
        self.out_dim = out_dim if out_dim is not None else dim
        self.num_heads = self.dim // head_dim
        self.head_dim = head_dim
        self.scale = qk_scale or head_dim ** -0.5
        self.q = nn.Linear(dim, self.dim, bias=qkv_bias)
        self.k = nn.Linear(dim, self.dim, bias=qkv_bias)
        self.v = nn.Linear(dim, self.dim, bias=qkv_bias)
        self.proj = nn.Linear(self.dim, self.out_dim)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj_drop = nn.Dropout(proj_drop)
        self.sr_ratio = sr_ratio
        self.N_ratio = sr_ratio ** 2
        if sr_ratio > 1:
            self.sr = nn.AvgPool1d(kernel_size=self.N_ratio, stride=self.N_ratio)
            self.norm = nn.BatchNorm1d(dim, eps=NORM_EPS)
        self.is_bn_merged = False

    @torch.no_grad()
    def merge_bn(self, pre_norm):
        """Folds the block's norm1 (before q, k, v) and, with sr > 1, the pooled
        tokens' BatchNorm (after the linear pooling, so the two maps compose)."""
        if self.is_bn_merged:
            return
        pre = bn_scale_shift(pre_norm)
        kv = compose_affine(pre, bn_scale_shift(self.norm)) if self.sr_ratio > 1 else pre
        merge_pre_bn(self.q, pre)
        merge_pre_bn(self.k, kv)
        merge_pre_bn(self.v, kv)
        if self.sr_ratio > 1:
            self.norm = nn.Identity()
        self.is_bn_merged = True

    def forward(self, x):
        B, N, C = x.shape
        q = self.q(x).reshape(B, N, self.num_heads, C // self.num_heads).permute(0, 2, 1, 3)
        if self.sr_ratio > 1:
            x_ = self.norm(self.sr(x.transpose(1, 2))).transpose(1, 2)
        else:
            x_ = x
        k = self.k(x_).reshape(B, -1, self.num_heads, C // self.num_heads).permute(0, 2, 3, 1)
        v = self.v(x_).reshape(B, -1, self.num_heads, C // self.num_heads).permute(0, 2, 1, 3)
        attn = (q @ k) * self.scale
        attn = self.attn_drop(attn.softmax(dim=-1))
        x = (attn @ v).transpose(1, 2).reshape(B, N, C)
        return self.proj_drop(self.proj(x))


class NTB(nn.Module):
    """Next Transformer Block."""

    def __init__(self, in_channels, out_channels, path_dropout, stride=1, sr_ratio=1, mlp_ratio=2,
                 head_dim=32, mix_block_ratio=0.75, attn_drop=0.0, drop=0.0):
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.mix_block_ratio = mix_block_ratio
        self.mhsa_out_channels = _make_divisible(int(out_channels * mix_block_ratio), 32)
        self.mhca_out_channels = out_channels - self.mhsa_out_channels
        self.patch_embed = PatchEmbed(in_channels, self.mhsa_out_channels, stride)
        self.norm1 = _bn(self.mhsa_out_channels)
        self.e_mhsa = E_MHSA(self.mhsa_out_channels, head_dim=head_dim, sr_ratio=sr_ratio,
                             attn_drop=attn_drop, proj_drop=drop)
        self.mhsa_path_dropout = DropPath(path_dropout * mix_block_ratio)
        self.projection = PatchEmbed(self.mhsa_out_channels, self.mhca_out_channels, stride=1)
        self.mhca = MHCA(self.mhca_out_channels, head_dim=head_dim)
        self.mhca_path_dropout = DropPath(path_dropout * (1 - mix_block_ratio))
        self.norm2 = _bn(out_channels)
        self.mlp = Mlp(out_channels, mlp_ratio=mlp_ratio, drop=drop)
        self.mlp_path_dropout = DropPath(path_dropout)
        self.is_bn_merged = False

    @torch.no_grad()
    def merge_bn(self):
        if not self.is_bn_merged:
            self.e_mhsa.merge_bn(self.norm1)
            self.norm1 = nn.Identity()
            merge_pre_bn(self.mlp.conv1, bn_scale_shift(self.norm2))
            self.norm2 = nn.Identity()
            self.is_bn_merged = True

    def forward(self, x):
        x = self.patch_embed(x)
        B, C, H, W = x.shape
        out = self.norm1(x).flatten(2).transpose(1, 2)  # b (h w) c
        out = self.mhsa_path_dropout(self.e_mhsa(out))
        x = x + out.transpose(1, 2).reshape(B, C, H, W)
        out = self.projection(x)
        out = out + self.mhca_path_dropout(self.mhca(out))
        x = torch.cat([x, out], dim=1)
        x = x + self.mlp_path_dropout(self.mlp(self.norm2(x)))
        return x
