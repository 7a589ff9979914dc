"""torchvision ResNets as backbones (keys match torchvision and the official MoCo checkpoints)."""

from __future__ import annotations

import torch.nn as nn
import torchvision

from ._registry import register_backbone


def _resnet(name: str, small_input: bool, **kwargs) -> nn.Module:
    model = getattr(torchvision.models, name)(weights=None, **kwargs)
    model.num_features = model.fc.in_features
    model.fc = nn.Identity()
    if small_input:
        # CIFAR stem (SimCLR appendix B.9): 3x3 stride-1 conv, no max-pool.
        model.conv1 = nn.Conv2d(3, model.conv1.out_channels, 3, 1, 1, bias=False)
        model.maxpool = nn.Identity()
    return model


@register_backbone("resnet18")
def resnet18(small_input: bool = False, **kwargs) -> nn.Module:
    return _resnet("resnet18", small_input, **kwargs)


@register_backbone("resnet34")
def resnet34(small_input: bool = False, **kwargs) -> nn.Module:
    return _resnet("resnet34", small_input, **kwargs)


@register_backbone("resnet50")
def resnet50(small_input: bool = False, **kwargs) -> nn.Module:
    return _resnet("resnet50", small_input, **kwargs)
