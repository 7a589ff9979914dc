"""EfficientNet-B0 as the small-models paper's students were trained (lukemelas' EfficientNet-PyTorch names).

EfficientNet (Tan & Le, "EfficientNet: Rethinking Model Scaling for CNNs", ICML 2019, Table 1): a 3x3 stem, 16
MBConv blocks in 7 stages (1x1 expand by 6 -> kxk depthwise -> squeeze-and-excite -> 1x1 linear projection,
residual with stochastic depth when the shape is kept), a 1x1 conv to 1280, global pool. Swish activations.

ssl-small and SEED use lukemelas' EfficientNet-PyTorch (TensorFlow's reference model ported to PyTorch); its
checkpoints load into a network with its names and give its features when these details match:

* BatchNorm eps 1e-3 and momentum 0.01 (TensorFlow's decay 0.99);
* TensorFlow "SAME" padding: total ``max((ceil(H / s) - 1) * s + k - H, 0)``, the smaller half on the top / left.
  It is computed here from each input's size; lukemelas' ``from_name`` precomputes it for a 224x224 input. The two
  agree whenever every stride-2 layer sees an even size, i.e. for any side that is a multiple of 32 (16 with
  ``small_input``): 32, 64, 96, 224, ...;
* SE on the expanded width with ``max(1, int(0.25 * C_in))`` squeezed channels (of the block *input*), conv
  layers with bias, Swish inside, sigmoid gate;
* stochastic depth ("drop connect") on residual blocks in ``train()`` with rate ``0.2 * i / 16`` for block ``i``,
  and Dropout(0.2) on the pooled features (the peer applies it before its ``fc`` head).

State-dict layout (equal to the peer's, minus its classifier: ``_fc`` upstream, ``fc`` in SEED's copy, renamed so
that MoCo's builder can replace it by the projection head)::

    _conv_stem, _bn0                                    3x3 stride-2 conv (stride 1 with small_input) + BN
    _blocks.{i}._expand_conv, ._bn0                     1x1 expansion (absent in block 0, expansion 1)
    _blocks.{i}._depthwise_conv, ._bn1                  kxk depthwise, stride in a stage's first block
    _blocks.{i}._se_reduce, ._se_expand                 SE 1x1 convs with bias
    _blocks.{i}._project_conv, ._bn2                    1x1 linear projection
    _conv_head, _bn1                                    1x1 conv 320 -> 1280

``forward``: ``(B, 3, H, W) -> (B, 1280)``; ``forward_features``: ``-> (B, 1280, H / 32, W / 32)``.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ._registry import register_backbone

# (kernel, repeats, stride, expansion, input width, output width): the paper's Table 1 (B0).
B0_STAGES = [
    (3, 1, 1, 1, 32, 16),
    (3, 2, 2, 6, 16, 24),
    (5, 2, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (5, 3, 1, 6, 80, 112),
    (5, 4, 2, 6, 112, 192),
    (3, 1, 1, 6, 192, 320),
]
BN_EPS, BN_MOMENTUM = 1e-3, 0.01  # TensorFlow's epsilon and decay 0.99 in PyTorch's convention
SE_RATIO = 0.25


def same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TensorFlow "SAME" padding of one side ``(before, after)`` so that the output has ``ceil(size / stride)``."""
    total = max((math.ceil(size / stride) - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


class SameConv2d(nn.Conv2d):
    """``nn.Conv2d`` with TensorFlow "SAME" padding computed from the input: ``(B, C, H, W) -> (B, C', H/s, W/s)``."""

    def __init__(self, c_in: int, c_out: int, kernel: int, stride: int = 1, groups: int = 1, bias: bool = False):
        super().__init__(c_in, c_out, kernel, stride, padding=0, groups=groups, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        top, bottom = same_padding(x.shape[-2], self.kernel_size[0], self.stride[0])
        left, right = same_padding(x.shape[-1], self.kernel_size[1], self.stride[1])
        if top or bottom or left or right:
            x = F.pad(x, (left, right, top, bottom))
        return super().forward(x)


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=BN_EPS, momentum=BN_MOMENTUM)


def drop_connect(x: torch.Tensor, rate: float, training: bool) -> torch.Tensor:
    """Stochastic depth: zero whole samples of the residual branch with probability ``rate``, rescale the rest."""
    if not training or rate == 0.0:
        return x
    keep = 1.0 - rate
    mask = torch.floor(keep + torch.rand(x.shape[0], 1, 1, 1, dtype=x.dtype, device=x.device))
    return x / keep * mask


class MBConvBlock(nn.Module):
    """MBConv with SE: ``(B, C_in, H, W) -> (B, C_out, H / stride, W / stride)``; residual when shapes match."""

    def __init__(self, c_in: int, c_out: int, kernel: int, stride: int, expansion: int, drop_connect_rate: float):
        super().__init__()
        c_exp = c_in * expansion
        self.expand = expansion != 1
        if self.expand:
            self._expand_conv = SameConv2d(c_in, c_exp, 1)
            self._bn0 = _bn(c_exp)
        self._depthwise_conv = SameConv2d(c_exp, c_exp, kernel, stride, groups=c_exp)
        self._bn1 = _bn(c_exp)
        squeezed = max(1, int(c_in * SE_RATIO))
        self._se_reduce = SameConv2d(c_exp, squeezed, 1, bias=True)
        self._se_expand = SameConv2d(squeezed, c_exp, 1, bias=True)
        self._project_conv = SameConv2d(c_exp, c_out, 1)
        self._bn2 = _bn(c_out)
        self.residual = stride == 1 and c_in == c_out
        self.drop_connect_rate = drop_connect_rate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.silu(self._bn0(self._expand_conv(x))) if self.expand else x  # silu = Swish: y * sigmoid(y)
        y = F.silu(self._bn1(self._depthwise_conv(y)))
        gate = self._se_expand(F.silu(self._se_reduce(y.mean(dim=(2, 3), keepdim=True))))  # (B, C_exp, 1, 1)
        y = self._bn2(self._project_conv(torch.sigmoid(gate) * y))
        if self.residual:
            y = drop_connect(y, self.drop_connect_rate, self.training) + x
        return y


class EfficientNetB0(nn.Module):
    """EfficientNet-B0 trunk in lukemelas' layout (see the module docstring).

    Args:
        small_input: CIFAR stem: the stem conv has stride 1, so 32x32 inputs end at 2x2 instead of 1x1.
        drop_rate: dropout on the pooled features in ``train()`` (the peer's 0.2).
        drop_connect_rate: stochastic-depth rate of the last block (the peer's 0.2), linear in the block index.
    """

    def __init__(self, small_input: bool = False, drop_rate: float = 0.2, drop_connect_rate: float = 0.2):
        super().__init__()
        self._conv_stem = SameConv2d(3, 32, 3, 1 if small_input else 2)
        self._bn0 = _bn(32)
        n_blocks = sum(repeats for _, repeats, *_ in B0_STAGES)
        blocks = []
        for kernel, repeats, stride, expansion, c_in, c_out in B0_STAGES:
            for r in range(repeats):
                # The peer scales the rate by i / n_blocks (not i / (n_blocks - 1)): block 0 never drops.
                rate = drop_connect_rate * len(blocks) / n_blocks
                blocks.append(MBConvBlock(c_in if r == 0 else c_out, c_out, kernel, stride if r == 0 else 1,
                                          expansion, rate))
        self._blocks = nn.ModuleList(blocks)
        self.num_features = 1280
        self._conv_head = SameConv2d(B0_STAGES[-1][-1], self.num_features, 1)
        self._bn1 = _bn(self.num_features)
        self._dropout = nn.Dropout(drop_rate)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W) -> (B, 1280, H / 32, W / 32)``: the map before the global pool."""
        x = F.silu(self._bn0(self._conv_stem(x)))
        for block in self._blocks:
            x = block(x)
        return F.silu(self._bn1(self._conv_head(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W) -> (B, 1280)``."""
        return self._dropout(self.forward_features(x).mean(dim=(2, 3)))


@register_backbone("efficientnet_b0")
def efficientnet_b0(small_input: bool = False, **kwargs) -> EfficientNetB0:
    """EfficientNet-B0 as ssl-small / SEED train it (timm's is ``timm_efficientnet_b0``)."""
    return EfficientNetB0(small_input=small_input, **kwargs)
