"""timm models: the small students of the paper plus a passthrough for any timm model name."""

from __future__ import annotations

import torch.nn as nn

from . import register_backbone


def timm_passthrough(timm_name: str, small_input: bool = False, **kwargs) -> nn.Module:
    """``timm.create_model(timm_name, num_classes=0)``: pooled features, ``num_features`` set by timm."""
    import timm

    if small_input and timm_name.startswith(("vit", "deit")):
        # 32x32 inputs: 4x4 patches keep 64 tokens instead of 4.
        kwargs.setdefault("img_size", 32)
        kwargs.setdefault("patch_size", 4)
    model = timm.create_model(timm_name, pretrained=False, num_classes=0, **kwargs)
    if small_input and not timm_name.startswith(("vit", "deit")):
        _stride1_stem(model)
    # MobileNetV3 / EfficientNet pool then apply conv_head: the pooled output is head_hidden_size wide.
    model.num_features = getattr(model, "head_hidden_size", None) or model.num_features
    return model


def _stride1_stem(model: nn.Module) -> None:
    """Make the first strided convolution stride 1 (CIFAR stem) for conv nets (MobileNet, EfficientNet)."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d) and m.stride != (1, 1):
            m.stride = (1, 1)
            return


@register_backbone("mobilenetv3_small")
def mobilenetv3_small(small_input: bool = False, **kwargs) -> nn.Module:
    return timm_passthrough("mobilenetv3_small_100", small_input, **kwargs)


@register_backbone("mobilenetv3_large")
def mobilenetv3_large(small_input: bool = False, **kwargs) -> nn.Module:
    return timm_passthrough("mobilenetv3_large_100", small_input, **kwargs)


@register_backbone("efficientnet_b0")
def efficientnet_b0(small_input: bool = False, **kwargs) -> nn.Module:
    return timm_passthrough("efficientnet_b0", small_input, **kwargs)


@register_backbone("deit_tiny")
def deit_tiny(small_input: bool = False, **kwargs) -> nn.Module:
    return timm_passthrough("deit_tiny_patch16_224", small_input, **kwargs)
