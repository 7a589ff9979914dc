"""timm models: a passthrough for any timm model name and short aliases for the ones the README uses.

``-a mobilenetv3_small`` / ``mobilenetv3_large`` / ``efficientnet_b0`` are the small-models paper's networks
(:mod:`.mobilenetv3`, :mod:`.efficientnet`); timm's implementations of the same architectures are registered as
``timm_mobilenetv3_small`` / ``timm_mobilenetv3_large`` / ``timm_efficientnet_b0`` and stay reachable under
timm's own names (``mobilenetv3_small_100``, ``tf_efficientnet_b0``, ...). timm's ``efficientnet_b0`` is the one
timm name that a registered backbone shadows.
"""

from __future__ import annotations

import torch.nn as nn

from ._registry import register_backbone


def timm_passthrough(timm_name: str, small_input: bool = False, **kwargs) -> nn.Module:
    """``timm.create_model(timm_name, num_classes=0)``: pooled features, ``num_features`` set by timm."""
    import timm  # optional dependency: only needed when a timm model is asked for

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


# alias -> timm model name
TIMM_ALIASES = {
    "timm_mobilenetv3_small": "mobilenetv3_small_100",
    "timm_mobilenetv3_large": "mobilenetv3_large_100",
    "timm_efficientnet_b0": "efficientnet_b0",
    "deit_tiny": "deit_tiny_patch16_224",
}


def _register_alias(alias: str, timm_name: str) -> None:
    def build(small_input: bool = False, **kwargs) -> nn.Module:
        return timm_passthrough(timm_name, small_input, **kwargs)

    build.__name__ = alias
    build.__doc__ = f"timm's ``{timm_name}`` (``num_classes=0``)."
    register_backbone(alias)(build)


for _alias, _timm_name in TIMM_ALIASES.items():
    _register_alias(_alias, _timm_name)
