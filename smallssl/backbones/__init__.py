"""Backbones: build one by name.

Every backbone is a function ``fn(small_input: bool = False, **kwargs) -> nn.Module`` registered with
:func:`register_backbone` (in the leaf module :mod:`._registry`). The module it returns has ``.num_features`` and
maps ``(B, 3, H, W)`` images to pooled ``(B, num_features)`` features. ``small_input=True`` swaps the stem for a
CIFAR-style one (no early downsampling) so 32x32 images keep spatial resolution; :func:`default_small_input` is
the rule that picks it from the image size.

Families: torchvision ResNets (:mod:`.resnet`), RegNetY / SEER (:mod:`.regnet`), the small-models paper's
MobileNetV3 and EfficientNet-B0 in ssl-small / SEED's layouts (:mod:`.mobilenetv3`, :mod:`.efficientnet`; these
are what ``mobilenetv3_small``, ``mobilenetv3_large`` and ``efficientnet_b0`` mean), and timm
(:mod:`.timm_backbones`: ``timm_mobilenetv3_small`` ... aliases). Any name not registered is tried as a timm model
name (``timm.create_model(name, num_classes=0)``). :func:`layout_hint` tells which ``-a`` a checkpoint needs.
"""

from __future__ import annotations

from functools import cache

import torch.nn as nn

from . import efficientnet, mobilenetv3, regnet, resnet, timm_backbones
from ._registry import BACKBONES, register_backbone
from .layouts import PAPER_ARCHS, layout_hint
from .timm_backbones import timm_passthrough

__all__ = ["BACKBONES", "PAPER_ARCHS", "check_arch", "create_backbone", "default_small_input", "is_known",
           "layout_hint", "list_backbones", "register_backbone"]

# The model families; importing them fills BACKBONES.
FAMILIES = (resnet, regnet, mobilenetv3, efficientnet, timm_backbones)

SMALL_INPUT_MAX_SIDE = 64  # images this small (CIFAR, STL at 64, Tiny-ImageNet) get the CIFAR stem by default


def default_small_input(image_size: int) -> bool:
    """Whether ``image_size``-pixel inputs get the CIFAR stem (stride-1 first conv) when the user does not say."""
    return image_size <= SMALL_INPUT_MAX_SIDE


def list_backbones() -> list[str]:
    """The registered names, sorted (any timm model name works too)."""
    return sorted(BACKBONES)


@cache
def _is_timm_model(name: str) -> bool:
    try:
        import timm  # optional at import time: the registered families do not need it
    except ImportError:
        return False
    return timm.is_model(name)  # also accepts pretrained tags ("vit_small_patch16_224.dino")


def is_known(arch: str) -> bool:
    """True when ``arch`` is registered or a timm model name."""
    return arch in BACKBONES or _is_timm_model(arch)


def check_arch(arch: str) -> None:
    """Raise ``ValueError`` naming the registered backbones when ``arch`` is neither registered nor a timm name."""
    if not is_known(arch):
        raise ValueError(f"unknown architecture {arch!r}. Registered: {', '.join(list_backbones())}; "
                         "any timm model name also works (see timm.list_models()).")


def create_backbone(name: str, small_input: bool = False, **kwargs) -> nn.Module:
    """Build backbone ``name`` with pooled ``(B, num_features)`` output; ``ValueError`` when it is unknown."""
    check_arch(name)
    if name in BACKBONES:
        model = BACKBONES[name](small_input=small_input, **kwargs)
    else:
        model = timm_passthrough(name, small_input=small_input, **kwargs)
    if not hasattr(model, "num_features"):
        raise TypeError(f"backbone {name!r} does not define num_features; set it to the pooled feature width")
    return model
