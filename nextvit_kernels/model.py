"""Reference Next-ViT: the published model, module for module (docs/design.md §1).

Module and parameter names are the published ones, so a published state_dict
loads with plain ``load_state_dict``. The forward here is plain PyTorch (it is
what training runs and what the fused path is checked against).
"""
from typing import List, Optional

import torch
from torch import nn

NORM_EPS = 1e-5
KERNELS = ("auto", "triton", "reference")
HEAD_DIM = 32
STEM_CHS = (64, 32, 64)
SR_RATIOS = (8, 4, 2, 1)
STRIDES = (1, 2, 2, 2)
VARIANTS = {
    "nextvit_small": dict(depths=(3, 4, 10, 3), path_dropout=0.1),
    "nextvit_base": dict(depths=(3, 4, 20, 3), path_dropout=0.2),
    "nextvit_large": dict(depths=(3, 4, 30, 3), path_dropout=0.2),
}


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


def stage_sizes(h: int, w: int) -> List[tuple]:
    """Spatial size of each stage's output (strides 4, 8, 16, 32) for an h x w input:
    every stride-2 step (3x3 conv, padding 1, or ceil-mode 2x2 pooling) maps n -> ceil(n/2)."""
    sizes = []
    for i in range(5):
        h, w = -(-h // 2), -(-w // 2)
        if i >= 1:
            sizes.append((h, w))
    return sizes


class NextViT(nn.Module):
    def __init__(self, stem_chs=STEM_CHS, depths=(3, 4, 10, 3), path_dropout=0.1, attn_drop=0.0, drop=0.0,
                 num_classes=1000, strides=STRIDES, sr_ratios=SR_RATIOS, head_dim=HEAD_DIM, mix_block_ratio=0.75,
                 use_checkpoint=False, with_extra_norm=False, kernels="auto"):
        super().__init__()
        self.use_checkpoint = use_checkpoint
        self.depths = tuple(depths)
        self.sr_ratios = tuple(sr_ratios)
        self.strides = tuple(strides)
        if kernels not in KERNELS:
            raise ValueError(f"kernels must be one of {KERNELS}, got {kernels!r}")
        self.kernels = kernels
        self._fused_plan = None
        self.stage_out_channels = [[96] * (depths[0]),
                                   [192] * (depths[1] - 1) + [256],
                                   [384, 384, 384, 384, 512] * (depths[2] // 5),
                                   [768] * (depths[3] - 1) + [1024]]
        self.stage_block_types = [[NCB] * depths[0],
                                  [NCB] * (depths[1] - 1) + [NTB],
                                  [NCB, NCB, NCB, NCB, NTB] * (depths[2] // 5),
                                  [NCB] * (depths[3] - 1) + [NTB]]
        self.stem = nn.Sequential(
            ConvBNReLU(3, stem_chs[0], kernel_size=3, stride=2),
            ConvBNReLU(stem_chs[0], stem_chs[1], kernel_size=3, stride=1),
            ConvBNReLU(stem_chs[1], stem_chs[2], kernel_size=3, stride=1),
            ConvBNReLU(stem_chs[2], stem_chs[2], kernel_size=3, stride=2),
        )
        input_channel = stem_chs[-1]
        features = []
        idx = 0
        dpr = [x.item() for x in torch.linspace(0, path_dropout, sum(depths))]
        for stage_id in range(len(depths)):
            for block_id in range(depths[stage_id]):
                stride = 2 if strides[stage_id] == 2 and block_id == 0 else 1
                output_channel = self.stage_out_channels[stage_id][block_id]
                if self.stage_block_types[stage_id][block_id] is NCB:
                    layer = NCB(input_channel, output_channel, stride=stride, path_dropout=dpr[idx + block_id],
                                drop=drop, head_dim=head_dim)
                else:
                    layer = NTB(input_channel, output_channel, path_dropout=dpr[idx + block_id], stride=stride,
                                sr_ratio=sr_ratios[stage_id], head_dim=head_dim, mix_block_ratio=mix_block_ratio,
                                attn_drop=attn_drop, drop=drop)
                features.append(layer)
                input_channel = output_channel
            idx += depths[stage_id]
        self.features = nn.Sequential(*features)
        self.extra_norm_list = None
        if with_extra_norm:
            self.extra_norm_list = nn.Sequential(*[_bn(c[-1]) for c in self.stage_out_channels])
        self.norm = _bn(output_channel)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.proj_head = nn.Sequential(nn.Linear(output_channel, num_classes))
        self.stage_out_idx = [sum(depths[:i + 1]) - 1 for i in range(len(depths))]
        self._initialize_weights()

    def _initialize_weights(self):
        for m in self.modules():
            if isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d)):
                nn.init.constant_(m.weight, 1.0)
                nn.init.constant_(m.bias, 0)
            elif isinstance(m, (nn.Linear, nn.Conv2d)):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.constant_(m.bias, 0)

    # ----------------------------------------------------------------- deploy
    @torch.no_grad()
    def merge_bn(self):
        """Folds the BatchNorms that precede a linear map, as the published deploy
        mode does. The folded BatchNorms become ``nn.Identity``, so the merged
        ``state_dict()`` has no BatchNorm keys for them and ``load_checkpoint``
        recognises it: no BatchNorm is ever applied twice."""
        self.eval()
        for m in self.features:
            m.merge_bn()
        self._fused_plan = None  # modules were replaced: fold again
        return self

    @property
    def is_bn_merged(self) -> bool:
        flags = [m.is_bn_merged for m in self.features]
        return all(flags)

    # ---------------------------------------------------------------- forward
    def check_input(self, x):
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"NextViT expects a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 4:
            raise ValueError(f"NextViT expects a 4-D [B, 3, H, W] tensor, got shape {tuple(x.shape)}")
        if x.shape[1] != 3:
            raise ValueError(f"NextViT expects 3 input channels, got {x.shape[1]} (shape {tuple(x.shape)})")
        if x.shape[0] == 0:
            raise ValueError("NextViT got an empty batch")
        if not x.is_floating_point():
            raise ValueError(f"NextViT expects a floating-point tensor, got {x.dtype}")
        h, w = x.shape[2:]
        for stage, ((sh, sw), sr) in enumerate(zip(stage_sizes(h, w), self.sr_ratios)):
            has_attention = NTB in self.stage_block_types[stage]
            if has_attention and sr > 1 and sh * sw < sr * sr:
                raise ValueError(
                    f"input {h}x{w} is too small: stage {stage} is {sh}x{sw} = {sh * sw} tokens, fewer than one "
                    f"{sr}x{sr} = {sr * sr}-token attention pooling window (25x25 is the smallest square input)"
                )

    def _run_features(self, x, collect: bool):
        outputs = []
        x = self.stem(x)
        stage_id = 0
        for idx, layer in enumerate(self.features):
            if self.use_checkpoint and self.training:
                x = torch.utils.checkpoint.checkpoint(layer, x, use_reentrant=False)
            else:
                x = layer(x)
            if idx == self.stage_out_idx[stage_id]:
                if collect:
                    if self.extra_norm_list is not None:
                        # As in the published detection backbone: the norm is applied in line.
                        x = self.extra_norm_list[stage_id](x)
                    outputs.append(x)
                stage_id += 1
        return outputs if collect else x

    # ------------------------------------------------------------ fused path
    def fused_impl(self, x) -> Optional[str]:
        """The ops ``impl`` the fused graph runs with for ``x``, or None when the
        module graph runs (training, CPU under "auto", kernels="reference")."""
        if self.kernels not in KERNELS:
            raise ValueError(f"kernels must be one of {KERNELS}, got {self.kernels!r}")
        if self.kernels == "reference":
            return None
        if self.training:
            if self.kernels == "triton":
                raise ValueError("kernels='triton' is inference-only (BatchNorms are folded): call model.eval(), "
                                 "or use kernels='auto' to train with the PyTorch reference path")
            return None
        if self.kernels == "auto" and not x.is_cuda:
            return None
        return "triton"

    def fused_plan(self, device, dtype):
        """The BatchNorm-folded parameters of the fused graph for ``device``/``dtype``,
        cached and rebuilt when a weight, the device or the dtype changes. (A module
        or Parameter replaced by assignment is not seen: set ``_fused_plan = None``.)"""
        from . import fused

        plan = self._fused_plan
        if plan is not None and torch.compiler.is_compiling():
            return plan  # validated by the eager call that built it; dynamo guards on it
        if plan is None or plan.device != device or plan.dtype != dtype or not plan.is_current():
            plan = fused.fold(self, device, dtype)
            self._fused_plan = plan
        return plan

    def _run_fused(self, x, impl, features):
        from . import fused

        p = next(self.parameters())
        if x.dtype != p.dtype or x.device != p.device:
            raise ValueError(f"input is {x.dtype} on {x.device} but the model is {p.dtype} on {p.device}")
        return fused.run(self.fused_plan(x.device, x.dtype), x, impl, features=features)

    def cuda_graph(self, example: torch.Tensor, warmup: int = 3):
        """Captures the fused forward for ``example``'s shape, dtype and device in a
        CUDA graph and returns a callable that replays it (see ``GraphedForward``)."""
        return GraphedForward(self, example, warmup)

    def forward_features(self, x) -> List[torch.Tensor]:
        """Per-stage feature maps (strides 4, 8, 16, 32; channels 96, 256, 512, 1024)."""
        self.check_input(x)
        impl = self.fused_impl(x)
        if impl is not None:
            return self._run_fused(x, impl, features=True)
        return self._run_features(x, collect=True)

    def forward(self, x):
        self.check_input(x)
        impl = self.fused_impl(x)
        if impl is not None:
            return self._run_fused(x, impl, features=False)
        x = self._run_features(x, collect=False)
        x = self.avgpool(self.norm(x)).flatten(1)
        return self.proj_head(x)


class GraphedForward:
    """A NextViT forward captured in a CUDA graph for one input shape.

    ``graphed(x)`` copies ``x`` into the captured input buffer, replays the
    graph and returns the captured output buffer: the next call overwrites it
    (``.clone()`` to keep it). The weights are those of the capture: after
    changing them, capture again.
    """

    def __init__(self, model: "NextViT", example: torch.Tensor, warmup: int = 3):
        if not example.is_cuda:
            raise ValueError("cuda_graph needs a CUDA input")
        if model.training:
            raise ValueError("cuda_graph captures inference: call model.eval() first")
        self.model = model
        self.static_in = example.detach().clone()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.no_grad(), torch.cuda.stream(stream):
            for _ in range(warmup):  # builds the folded plan and compiles the kernels
                model(self.static_in)
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.no_grad(), torch.cuda.graph(self.graph):
            self.static_out = model(self.static_in)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape != self.static_in.shape or x.dtype != self.static_in.dtype or x.device != self.static_in.device:
            raise ValueError(f"this graph was captured for {tuple(self.static_in.shape)} {self.static_in.dtype} on "
                             f"{self.static_in.device}, got {tuple(x.shape)} {x.dtype} on {x.device}")
        self.static_in.copy_(x)
        self.graph.replay()
        return self.static_out


def _build(name, **kwargs):
    cfg = dict(VARIANTS[name])
    cfg.update(kwargs)
    return NextViT(**cfg)


def nextvit_small(**kwargs) -> NextViT:
    return _build("nextvit_small", **kwargs)


def nextvit_base(**kwargs) -> NextViT:
    return _build("nextvit_base", **kwargs)


def nextvit_large(**kwargs) -> NextViT:
    return _build("nextvit_large", **kwargs)
