"""Backbone registry.

Every backbone is a function ``fn(small_input: bool = False, **kwargs) -> nn.Module`` registered with
:func:`register_backbone`. The module it returns has ``.num_features`` and maps ``(B, 3, H, W)`` images to
pooled ``(B, num_features)`` features. ``small_input=True`` swaps the stem for a CIFAR-style one (no early
downsampling) so 32x32 images keep spatial resolution.

Any name not in the registry is tried as a timm model name (``timm.create_model(name, num_classes=0)``).
"""

from __future__ import annotations

from typing import Callable

import torch.nn as nn

BACKBONES: dict[str, Callable[..., nn.Module]] = {}


def register_backbone(name: str) -> Callable:
    def deco(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in BACKBONES:
            raise ValueError(f"backbone {name!r} registered twice")
        BACKBONES[name] = fn
        return fn

    return deco


def list_backbones() -> list[str]:
    return sorted(BACKBONES)


def _timm_names() -> set[str]:
    try:
        import timm
    except ImportError:
        return set()
    return set(timm.list_models())


def create_backbone(name: str, small_input: bool = False, **kwargs) -> nn.Module:
    """Build backbone ``name``; raise ``ValueError`` naming the valid choices when it is unknown."""
    if name in BACKBONES:
        model = BACKBONES[name](small_input=small_input, **kwargs)
    elif name in _timm_names():
        from .timm_backbones import timm_passthrough

        model = timm_passthrough(name, small_input=small_input, **kwargs)
    else:
        raise ValueError(
            f"unknown architecture {name!r}. Registered: {', '.join(list_backbones())}; "
            "any timm model name also works (see timm.list_models())."
        )
    if not hasattr(model, "num_features"):
        raise TypeError(f"backbone {name!r} does not define num_features")
    return model


# Registration side effects: one import per model family.
from . import resnet, timm_backbones  # noqa: E402,F401

try:  # RegNet / SEER trunks (added by the SwAV issue); optional until then.
    from . import regnet  # noqa: F401
except ImportError:  # pragma: no cover
    pass
