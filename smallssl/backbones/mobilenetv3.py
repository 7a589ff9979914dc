"""MobileNetV3 as the small-models paper's students were trained (ssl-small / SEED's network and parameter names).

MobileNetV3 (Howard et al., "Searching for MobileNetV3", ICCV 2019, Tables 1 and 2): inverted-residual blocks
(1x1 expand -> kxk depthwise -> optional squeeze-and-excite -> 1x1 linear projection, residual when the shape is
kept), ReLU in the early blocks and h-swish ``x * relu6(x + 3) / 6`` in the late ones, then a 1x1 conv, a global
pool and a BN-free 1x1 "conv" (a Linear on the pooled vector) with h-swish.

ssl-small and SEED train these students with a version of d-li14's ``mobilenetv3.pytorch`` (last layer split off
as ``fc``, Dropout(0.2) before it). Its checkpoints only load into a network with the same names, and it differs
from the paper's Figure 4 (and from timm) in one place that changes the function: inside an *expanded* block, SE
sits between the depthwise BN and its activation (``dw -> BN -> SE -> act``); in the non-expanded first block it
comes after the activation. This module reproduces that network exactly:

* SE: ``x * hsigmoid(W_2 relu(W_1 avgpool(x)))`` with ``hsigmoid(z) = relu6(z + 3) / 6`` and Linear layers
  (bias) of width ``make_divisible(C // 4, 8)``;
* every width is rounded with TF-slim's :func:`make_divisible` (nearest multiple of 8, never down by > 10 %);
* BatchNorm with PyTorch's defaults (eps 1e-5, momentum 0.1); Dropout(0.2) after the last h-swish (active in
  ``train()``, as in the peer's pre-training).

State-dict layout: the peer's, minus its ``fc`` head (which MoCo / SEED replace by the projection); ``classifier.0``
keeps the peer's name because it is part of the feature extractor (the pooled 1024 / 1280 features)::

    features.0.{0,1}                      3x3 stride-2 conv + BN (+ h-swish); stride 1 with small_input
    features.{i}.conv.{0,1,3,4,7,8}       expanded block: pw conv, BN, dw conv, BN, pw-linear conv, BN
    features.{i}.conv.5.fc.{0,2}          its SE Linear layers (absent without SE)
    features.1.conv.{0,1,4,5}             the non-expanded first block: dw conv, BN, pw-linear conv, BN
    features.1.conv.3.fc.{0,2}            its SE (MobileNetV3-Small only)
    conv.{0,1}                            1x1 conv to 576 (small) / 960 (large) + BN (+ h-swish)
    classifier.0                          Linear 576 -> 1024 / 960 -> 1280 (+ h-swish, Dropout)

``forward``: ``(B, 3, H, W) -> (B, num_features)`` with ``num_features`` 1024 (small) / 1280 (large);
``forward_features``: ``-> (B, 576 | 960, H / 32, W / 32)`` (``H / 16`` with ``small_input``).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from ._registry import register_backbone

# (kernel, expansion width, output width, SE, h-swish, stride): the paper's Table 2 (Small) and Table 1 (Large).
SMALL_BLOCKS = [
    (3, 16, 16, True, False, 2),
    (3, 72, 24, False, False, 2),
    (3, 88, 24, False, False, 1),
    (5, 96, 40, True, True, 2),
    (5, 240, 40, True, True, 1),
    (5, 240, 40, True, True, 1),
    (5, 120, 48, True, True, 1),
    (5, 144, 48, True, True, 1),
    (5, 288, 96, True, True, 2),
    (5, 576, 96, True, True, 1),
    (5, 576, 96, True, True, 1),
]
LARGE_BLOCKS = [
    (3, 16, 16, False, False, 1),
    (3, 64, 24, False, False, 2),
    (3, 72, 24, False, False, 1),
    (5, 72, 40, True, False, 2),
    (5, 120, 40, True, False, 1),
    (5, 120, 40, True, False, 1),
    (3, 240, 80, False, True, 2),
    (3, 200, 80, False, True, 1),
    (3, 184, 80, False, True, 1),
    (3, 184, 80, False, True, 1),
    (3, 480, 112, True, True, 1),
    (3, 672, 112, True, True, 1),
    (5, 672, 160, True, True, 2),
    (5, 960, 160, True, True, 1),
    (5, 960, 160, True, True, 1),
]
# Width of the pooled Linear ("conv2d 1x1, NBN" in the paper's tables).
HEAD_WIDTH = {"small": 1024, "large": 1280}


def make_divisible(value: float, divisor: int = 8) -> int:
    """TF-slim channel rounding: nearest multiple of ``divisor`` (at least ``divisor``), never more than 10 % down."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * value else rounded


def _act(hswish: bool) -> nn.Module:
    # nn.Hardswish / nn.Hardsigmoid are exactly x * relu6(x + 3) / 6 and relu6(x + 3) / 6 (the peer's h_swish).
    return nn.Hardswish() if hswish else nn.ReLU(inplace=True)


class SqueezeExcite(nn.Module):
    """SE with a hard-sigmoid gate on Linear layers: ``(B, C, H, W) -> (B, C, H, W)``."""

    def __init__(self, channels: int):
        super().__init__()
        reduced = make_divisible(channels // 4, 8)
        # Indices 0 and 2 hold the weights, as in the peer's ``fc`` Sequential.
        self.fc = nn.Sequential(nn.Linear(channels, reduced), nn.ReLU(inplace=True), nn.Linear(reduced, channels),
                                nn.Hardsigmoid())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = self.fc(x.mean(dim=(2, 3)))  # (B, C)
        return x * gate[:, :, None, None]


class InvertedResidual(nn.Module):
    """MobileNetV3 block ``(B, C_in, H, W) -> (B, C_out, H / stride, W / stride)``; residual when shapes match."""

    def __init__(self, c_in: int, c_exp: int, c_out: int, kernel: int, stride: int, se: bool, hswish: bool):
        super().__init__()
        self.residual = stride == 1 and c_in == c_out
        dw = nn.Conv2d(c_exp, c_exp, kernel, stride, (kernel - 1) // 2, groups=c_exp, bias=False)
        se_layer = SqueezeExcite(c_exp) if se else nn.Identity()
        project = [nn.Conv2d(c_exp, c_out, 1, bias=False), nn.BatchNorm2d(c_out)]
        if c_in == c_exp:  # no expansion: dw -> BN -> act -> SE -> project
            layers = [dw, nn.BatchNorm2d(c_exp), _act(hswish), se_layer, *project]
        else:  # expand -> BN -> act -> dw -> BN -> SE -> act -> project (SE before the activation, see module doc)
            layers = [nn.Conv2d(c_in, c_exp, 1, bias=False), nn.BatchNorm2d(c_exp), _act(hswish),
                      dw, nn.BatchNorm2d(c_exp), se_layer, _act(hswish), *project]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.residual else self.conv(x)


class MobileNetV3(nn.Module):
    """MobileNetV3-Small / -Large trunk in ssl-small / SEED's layout (see the module docstring).

    Args:
        mode: ``"small"`` or ``"large"``.
        small_input: CIFAR stem: the first conv has stride 1, so 32x32 inputs end at 2x2 instead of 1x1.
        drop_rate: dropout on the pooled features in ``train()`` (the peer's 0.2).
    """

    def __init__(self, mode: str = "small", small_input: bool = False, drop_rate: float = 0.2):
        super().__init__()
        if mode not in HEAD_WIDTH:
            raise ValueError(f"unknown MobileNetV3 mode {mode!r}; choose 'small' or 'large'")
        blocks = SMALL_BLOCKS if mode == "small" else LARGE_BLOCKS
        c_in = make_divisible(16)
        layers: list[nn.Module] = [nn.Sequential(nn.Conv2d(3, c_in, 3, 1 if small_input else 2, 1, bias=False),
                                                 nn.BatchNorm2d(c_in), nn.Hardswish())]
        for kernel, c_exp, c_out, se, hswish, stride in blocks:
            c_exp, c_out = make_divisible(c_exp), make_divisible(c_out)
            layers.append(InvertedResidual(c_in, c_exp, c_out, kernel, stride, se, hswish))
            c_in = c_out
        self.features = nn.Sequential(*layers)
        c_last = blocks[-1][1]
        self.conv = nn.Sequential(nn.Conv2d(c_in, c_last, 1, bias=False), nn.BatchNorm2d(c_last), nn.Hardswish())
        self.num_features = HEAD_WIDTH[mode]
        self.classifier = nn.Sequential(nn.Linear(c_last, self.num_features), nn.Hardswish(), nn.Dropout(drop_rate))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The peer's init: conv ~ N(0, sqrt(2 / (k*k*C_out))), BN 1 / 0, Linear ~ N(0, 0.01) with zero bias."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / (m.kernel_size[0] * m.kernel_size[1] * m.out_channels)))
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0.0, 0.01)
                nn.init.zeros_(m.bias)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W) -> (B, 576 | 960, H / 32, W / 32)``: the map before the global pool."""
        return self.conv(self.features(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W) -> (B, num_features)``."""
        return self.classifier(self.forward_features(x).mean(dim=(2, 3)))


@register_backbone("mobilenetv3_small")
def mobilenetv3_small(small_input: bool = False, **kwargs) -> MobileNetV3:
    """MobileNetV3-Small as ssl-small / SEED train it (timm's is ``timm_mobilenetv3_small``)."""
    return MobileNetV3("small", small_input=small_input, **kwargs)


@register_backbone("mobilenetv3_large")
def mobilenetv3_large(small_input: bool = False, **kwargs) -> MobileNetV3:
    """MobileNetV3-Large as ssl-small / SEED train it (timm's is ``timm_mobilenetv3_large``)."""
    return MobileNetV3("large", small_input=small_input, **kwargs)
