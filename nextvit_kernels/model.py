"""Reference Next-ViT: the published model, module for module (docs/design.md §1).

Module and parameter names are the published ones, so a published state_dict
loads with plain ``load_state_dict``. The forward here is plain PyTorch (it is
what training runs and what the fused path is checked against); in eval mode on
CUDA its one call into the inference engine (``engine.py``) runs the fused graph
instead.
"""
import threading
import warnings
from typing import List, Optional

import torch
from torch import nn

from . import config
from .blocks import NCB, NTB, ConvBNReLU, _bn
from .config import HEAD_DIM, SR_RATIOS, STEM_CHS, STRIDES, VARIANTS
from .engine import Engine, GraphedForward

_BLOCKS = {config.NCB: NCB, config.NTB: NTB}


class NextViT(nn.Module):
    def __init__(self, stem_chs=STEM_CHS, depths=(3, 4, 10, 3), path_dropout=0.1, attn_drop=0.0, drop=0.0,
                 num_classes=1000, strides=STRIDES, sr_ratios=SR_RATIOS, head_dim=HEAD_DIM, mix_block_ratio=0.75,
                 use_checkpoint=False, with_extra_norm=False, kernels="auto", cuda_graphs="auto",
                 max_cuda_graphs=8):
        super().__init__()
        self.use_checkpoint = use_checkpoint
        self.depths = tuple(depths)
        self.sr_ratios = tuple(sr_ratios)
        self.strides = tuple(strides)
        widths, kinds = config.stage_layout(depths)
        self.stage_out_channels = widths
        self.stage_block_types = [[_BLOCKS[k] for k in stage] for stage in kinds]
        self.engine = Engine(self.sr_ratios, [config.NTB in stage for stage in kinds], kernels, cuda_graphs,
                             max_cuda_graphs)
        # load_state_dict writes the weights in place: the version check would see it, but
        # releasing the folding here also frees its CUDA graphs at once.
        self.register_load_state_dict_post_hook(_invalidate_after_load)
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
        with self.weights_lock:
            self.eval()
            for m in self.features:
                m.merge_bn()
            self.invalidate_fused()  # modules were replaced: fold again
        return self

    @property
    def is_bn_merged(self) -> bool:
        flags = [m.is_bn_merged for m in self.features]
        return all(flags)

    # ------------------------------------------------------- inference settings
    # The engine holds them; they stay attributes of the model, as published code sets them.
    @property
    def weights_lock(self) -> threading.RLock:
        """Held while the folded weights are rebuilt and while the weights are rewritten by
        load_state_dict, merge_bn and .to(): a fused forward in another thread then folds all
        of a write or none of it. Hold it to make your own in-place writes atomic likewise."""
        return self.engine.lock

    kernels = property(lambda self: self.engine.kernels, lambda self, v: setattr(self.engine, "kernels", v),
                       doc='"auto", "triton", "runtime" or "reference": see README, "Using it".')
    cuda_graphs = property(lambda self: self.engine.cuda_graphs,
                           lambda self, v: setattr(self.engine, "cuda_graphs", v))
    max_cuda_graphs = property(lambda self: self.engine.max_cuda_graphs,
                               lambda self, v: setattr(self.engine, "max_cuda_graphs", v))

    # ---------------------------------------------------------------- forward
    def check_input(self, x):
        self.engine.check_input(self, x)

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
    def fused_path(self, x) -> Optional[str]:
        """What runs ``x``: "runtime" (the whole-model C runtime), "triton" (the fused Triton
        kernels) or None (this module graph: training, CPU under "auto", kernels="reference", or
        a forward whose result autograd needs: the fused ops have no backward)."""
        return self.engine.path(self, x)

    def fused_impl(self, x) -> Optional[str]:
        warnings.warn("NextViT.fused_impl is now fused_path (which also tells the C runtime apart)",
                      DeprecationWarning, stacklevel=2)
        return self.fused_path(x)

    def invalidate_fused(self):
        """Drops the folded weights with their bound programs, CUDA graphs and C runtime; the next
        fused forward folds again. ``.to()``, ``load_state_dict``/``load_checkpoint`` and
        ``merge_bn`` call it; in-place weight updates are seen without it."""
        self.engine.invalidate()

    def _apply(self, fn, *args, **kwargs):
        with self.weights_lock:
            self.invalidate_fused()
            return super()._apply(fn, *args, **kwargs)

    def load_state_dict(self, *args, **kwargs):
        with self.weights_lock:  # its post hook releases the folding; the lock keeps folds out meanwhile
            return super().load_state_dict(*args, **kwargs)

    def __getstate__(self):
        # The engine holds bound launchers, CUDA graphs, the C runtime and a lock: none of them
        # pickles or deep-copies, and a copy folds its own anyway. Its settings travel.
        state = self.__dict__.copy()
        state["engine"] = (self.engine.sr_ratios, self.engine.attention_stages, self.engine.settings())
        return state

    def __setstate__(self, state):
        if "engine" in state:
            sr_ratios, attention, settings = state.pop("engine")
        else:  # pickled before the engine held the settings
            sr_ratios = state["sr_ratios"]
            attention = [NTB in stage for stage in state["stage_block_types"]]
            settings = {k: state.pop(k) for k in ("kernels", "cuda_graphs", "max_cuda_graphs") if k in state}
            for k in ("_fused_plan", "_grad_warned"):
                state.pop(k, None)
        super().__setstate__(state)
        self.engine = Engine(sr_ratios, attention, **settings)

    def fused_plan(self, device, dtype):
        """The BatchNorm-folded parameters of the fused graph for ``device``/``dtype``, cached and
        rebuilt when a weight, the device or the dtype changes. (A module or Parameter replaced by
        assignment is not seen: call ``invalidate_fused()``.)"""
        return self.engine.plan(self, device, dtype)

    def cuda_graph(self, example: torch.Tensor, warmup: int = 3) -> GraphedForward:
        """Captures the fused forward for ``example``'s shape, dtype and device in a
        CUDA graph and returns a callable that replays it (see ``GraphedForward``)."""
        return self.engine.cuda_graph(self, example, warmup)

    def forward_features(self, x) -> List[torch.Tensor]:
        """Per-stage feature maps (strides 4, 8, 16, 32; channels 96, 256, 512, 1024)."""
        out = self.engine.forward(self, x, features=True)
        if out is not None:
            return out
        self.check_input(x)
        return self._run_features(x, collect=True)

    def forward(self, x):
        out = self.engine.forward(self, x)
        if out is not None:
            return out
        self.check_input(x)
        x = self._run_features(x, collect=False)
        x = self.avgpool(self.norm(x)).flatten(1)
        return self.proj_head(x)


def _invalidate_after_load(module, incompatible_keys):
    module.invalidate_fused()


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
