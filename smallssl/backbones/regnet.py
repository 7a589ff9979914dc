"""RegNetY trunks built from RegNet design parameters, including the SEER configurations.

RegNet (Radosavovic et al., "Designing Network Design Spaces", CVPR 2020) describes a network by six numbers:
depth ``d``, initial width ``w_0``, slope ``w_a``, width multiplier ``w_m``, group width ``g`` and bottleneck
ratio ``b``. Block ``j`` gets the continuous width ``u_j = w_0 + w_a * j``, which is quantized in log space
(``w_j = w_0 * w_m ** round(log(u_j / w_0) / log(w_m))``, then to a multiple of 8); consecutive blocks of equal
width form a stage (stride 2 in its first block). RegNetY adds squeeze-and-excitation (ratio 0.25 of the
block's *input* width) to the residual bottleneck block (1x1 -> grouped 3x3 -> SE -> 1x1).

SEER (Goyal et al. 2021, arXiv:2103.01988; 2022, arXiv:2202.08360) trains RegNetY-32GF ... RegNetY-10B with
SwAV. The design parameters below are the ones of VISSL's SEER configs and classy-vision's named RegNets
(also used by timm's ``regnety_320/640/1280/2560``); ``tests/backbones/test_regnet.py`` checks the final widths
against the VISSL head configs (3712, 4920, 7392, 10444, 28280) and the trunk parameter counts against the model
card.

Module layout (state-dict keys)::

    stem.conv, stem.bn                                  3x3 stride-2 conv (stride 1 with small_input) + BN + ReLU
    stages.{s}.{i}.proj, .proj_bn                       1x1 strided projection shortcut (first block of a stage)
    stages.{s}.{i}.conv_a, .bn_a                        1x1, width_in -> w_b
    stages.{s}.{i}.conv_b, .bn_b                        3x3 grouped (w_b / g groups), stride in the first block
    stages.{s}.{i}.se.reduce, .se.expand                SE: w_b -> round(0.25 * width_in) -> w_b (with biases)
    stages.{s}.{i}.conv_c, .bn_c                        1x1, w_b -> width_out

:mod:`smallssl.checkpoints.vissl` maps these names from and to VISSL's ``_feature_blocks.*`` layout.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ._registry import register_backbone


@dataclass(frozen=True)
class RegNetParams:
    """RegNet design parameters (Radosavovic et al. 2020, Sec. 3.3). ``w_0`` must be a multiple of 8."""

    depth: int
    w_0: int
    w_a: float
    w_m: float
    group_width: int
    bottleneck_ratio: float = 1.0
    se_ratio: float = 0.25
    stem_width: int = 32

    def __post_init__(self) -> None:
        if self.depth < 1 or self.w_0 <= 0 or self.w_0 % 8 or self.w_a < 0 or self.w_m <= 1:
            raise ValueError(f"invalid RegNet parameters {self}: need depth >= 1, w_0 > 0 and a multiple of 8, "
                             "w_a >= 0, w_m > 1")

    def stages(self) -> list[tuple[int, int, int]]:
        """Per-stage ``(width_out, depth, group_width)`` after quantization and width/group compatibility.

        Follows pycls / classy-vision: widths quantized to multiples of 8 in log space, the group width capped
        by the bottleneck width, then the bottleneck width rounded to a multiple of the group width.
        """
        quant = 8
        widths = []
        for j in range(self.depth):
            u = self.w_0 + self.w_a * j
            k = round(math.log(u / self.w_0) / math.log(self.w_m))
            widths.append(int(round(self.w_0 * self.w_m ** k / quant) * quant))
        stages: list[list[int]] = []  # [width, depth]
        for w in widths:
            if stages and stages[-1][0] == w:
                stages[-1][1] += 1
            else:
                stages.append([w, 1])
        out = []
        for w, d in stages:
            w_bot = int(w * self.bottleneck_ratio)
            g = min(self.group_width, w_bot)
            w_bot = int(round(w_bot / g) * g)
            out.append((int(w_bot / self.bottleneck_ratio), d, g))
        return out


# Design parameters. SEER: VISSL configs (benchmark/.../models/regnet{32Gf,64Gf_3,128Gf,256Gf_1,10B}.yaml);
# classic RegNetY: classy-vision / pycls model zoo. tests/backbones/test_regnet.py checks the trunk parameter counts.
REGNET_CONFIGS: dict[str, RegNetParams] = {
    "regnety_tiny": RegNetParams(depth=4, w_0=8, w_a=8.0, w_m=2.0, group_width=8, stem_width=16),
    "regnety_400mf": RegNetParams(depth=16, w_0=48, w_a=27.89, w_m=2.09, group_width=8),
    "regnety_800mf": RegNetParams(depth=14, w_0=56, w_a=38.84, w_m=2.4, group_width=16),
    "regnety_1.6gf": RegNetParams(depth=27, w_0=48, w_a=20.71, w_m=2.65, group_width=24),
    "regnety_32gf": RegNetParams(depth=20, w_0=232, w_a=115.89, w_m=2.53, group_width=232),
    "regnety_64gf": RegNetParams(depth=20, w_0=352, w_a=147.48, w_m=2.4, group_width=328),
    # classy-vision's regnet_y_64gf as it stood before classy-vision changed that config in June 2021 (final width
    # 2976): not the published SEER 64GF checkpoint (that one is the config above, width 4920), but its trunk + SwAV
    # MLP is the model card's 250M. Classy-vision's current regnet_y_256gf has no preset here.
    "regnety_64gf_classy": RegNetParams(depth=20, w_0=368, w_a=102.79, w_m=2.05, group_width=496),
    "regnety_128gf": RegNetParams(depth=27, w_0=456, w_a=160.83, w_m=2.52, group_width=264),
    "regnety_256gf": RegNetParams(depth=27, w_0=640, w_a=230.83, w_m=2.53, group_width=373),
    "regnety_10b": RegNetParams(depth=27, w_0=1744, w_a=620.83, w_m=2.52, group_width=1010),
}


# Too large to instantiate on a 2-core CI machine: build these under ``torch.device("meta")`` in registry tests.
LARGE_CONFIGS = frozenset({"regnety_32gf", "regnety_64gf", "regnety_64gf_classy", "regnety_128gf", "regnety_256gf",
                           "regnety_10b"})


class SqueezeExcite(nn.Module):
    """SE (Hu et al. 2018): ``x * sigmoid(W_2 relu(W_1 avgpool(x)))``; ``(B, C, H, W) -> (B, C, H, W)``."""

    def __init__(self, channels: int, reduced: int):
        super().__init__()
        self.reduce = nn.Conv2d(channels, reduced, 1, bias=True)
        self.expand = nn.Conv2d(reduced, channels, 1, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = F.adaptive_avg_pool2d(x, 1)
        return x * torch.sigmoid(self.expand(F.relu(self.reduce(s), inplace=True)))


class RegNetBlock(nn.Module):
    """Residual bottleneck block with SE (the "Y" block): ``relu(shortcut(x) + bn_c(conv_c(se(b(a(x))))))``.

    ``(B, width_in, H, W) -> (B, width_out, H / stride, W / stride)``.
    """

    def __init__(self, width_in: int, width_out: int, stride: int, group_width: int, bottleneck_ratio: float,
                 se_ratio: float | None, bn_eps: float = 1e-5, bn_momentum: float = 0.1):
        super().__init__()
        w_b = int(round(width_out * bottleneck_ratio))
        groups = w_b // group_width
        self.has_proj = width_in != width_out or stride != 1
        if self.has_proj:
            self.proj = nn.Conv2d(width_in, width_out, 1, stride=stride, bias=False)
            self.proj_bn = nn.BatchNorm2d(width_out, eps=bn_eps, momentum=bn_momentum)
        self.conv_a = nn.Conv2d(width_in, w_b, 1, bias=False)
        self.bn_a = nn.BatchNorm2d(w_b, eps=bn_eps, momentum=bn_momentum)
        self.conv_b = nn.Conv2d(w_b, w_b, 3, stride=stride, padding=1, groups=groups, bias=False)
        self.bn_b = nn.BatchNorm2d(w_b, eps=bn_eps, momentum=bn_momentum)
        # SE width is relative to the block *input* width (pycls / classy-vision convention).
        self.se = SqueezeExcite(w_b, int(round(se_ratio * width_in))) if se_ratio else None
        self.conv_c = nn.Conv2d(w_b, width_out, 1, bias=False)
        self.bn_c = nn.BatchNorm2d(width_out, eps=bn_eps, momentum=bn_momentum)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = self.proj_bn(self.proj(x)) if self.has_proj else x
        y = F.relu(self.bn_a(self.conv_a(x)), inplace=True)
        y = F.relu(self.bn_b(self.conv_b(y)), inplace=True)
        if self.se is not None:
            y = self.se(y)
        y = self.bn_c(self.conv_c(y))
        return F.relu(shortcut + y, inplace=True)


class Stem(nn.Module):
    """3x3 conv (stride 2, or 1 for 32x32 inputs) + BN + ReLU: ``(B, 3, H, W) -> (B, stem_width, H/s, W/s)``."""

    def __init__(self, width: int, stride: int, bn_eps: float = 1e-5, bn_momentum: float = 0.1):
        super().__init__()
        self.conv = nn.Conv2d(3, width, 3, stride=stride, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(width, eps=bn_eps, momentum=bn_momentum)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)), inplace=True)


class RegNet(nn.Module):
    """RegNetY trunk: stem, stages of :class:`RegNetBlock`, global average pool.

    Args:
        params: design parameters (see :data:`REGNET_CONFIGS`).
        small_input: CIFAR stem (stride 1) so 32x32 inputs keep their resolution.
        activation_checkpointing: recompute each stage in the backward pass (training only) instead of storing
            its activations; the SEER 10B run checkpoints groups of blocks the same way.
        bn_eps, bn_momentum: BatchNorm settings (VISSL / classy defaults 1e-5, 0.1).

    ``forward``: ``(B, 3, H, W) -> (B, num_features)``; ``forward_features``: ``-> (B, num_features, H/32, W/32)``.
    """

    def __init__(self, params: RegNetParams, small_input: bool = False, activation_checkpointing: bool = False,
                 bn_eps: float = 1e-5, bn_momentum: float = 0.1):
        super().__init__()
        self.params = params
        self.activation_checkpointing = activation_checkpointing
        self.stem = Stem(params.stem_width, 1 if small_input else 2, bn_eps, bn_momentum)
        width = params.stem_width
        stages = []
        for width_out, depth, group_width in params.stages():
            blocks = [RegNetBlock(width if i == 0 else width_out, width_out, 2 if i == 0 else 1, group_width,
                                  params.bottleneck_ratio, params.se_ratio, bn_eps, bn_momentum)
                      for i in range(depth)]
            stages.append(nn.Sequential(*blocks))
            width = width_out
        self.stages = nn.ModuleList(stages)
        self.num_features = width
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """pycls / classy-vision init: conv ~ N(0, sqrt(2 / fan_out)), BN gamma 1 beta 0 (no-op on meta)."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def blocks(self) -> list[RegNetBlock]:
        """All residual blocks in order (the units that FSDP shards one by one)."""
        return [b for stage in self.stages for b in stage]

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for stage in self.stages:
            if self.activation_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(stage, x, use_reentrant=False)
            else:
                x = stage(x)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # mean over H, W = global average pool; not a view (FSDP2 warns about views returned by a root module).
        return self.forward_features(x).mean(dim=(2, 3))


def regnet(name: str, small_input: bool = False, **kwargs) -> RegNet:
    """Build a RegNet from :data:`REGNET_CONFIGS`; ``ValueError`` naming the valid configs otherwise."""
    if name not in REGNET_CONFIGS:
        raise ValueError(f"unknown RegNet config {name!r}; choose one of {', '.join(REGNET_CONFIGS)}")
    return RegNet(REGNET_CONFIGS[name], small_input=small_input, **kwargs)


def _register(name: str) -> None:
    def build(small_input: bool = False, **kwargs) -> RegNet:
        return regnet(name, small_input=small_input, **kwargs)

    build.__name__ = name.replace(".", "_")
    build.__doc__ = f"RegNetY ``{name}``: {REGNET_CONFIGS[name]}."
    register_backbone(name)(build)


for _name in REGNET_CONFIGS:
    _register(_name)
