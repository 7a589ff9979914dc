"""The backbone registry: a leaf module (it imports no model family, so every family can import it).

A backbone is a function ``fn(small_input: bool = False, **kwargs) -> nn.Module`` registered under a name with
:func:`register_backbone`; :mod:`smallssl.backbones` builds it by name.
"""

from __future__ import annotations

from typing import Callable

import torch.nn as nn

BACKBONES: dict[str, Callable[..., nn.Module]] = {}


def register_backbone(name: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator: ``@register_backbone("resnet18")`` adds the function to :data:`BACKBONES` under ``name``."""

    def deco(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in BACKBONES:
            raise ValueError(f"backbone {name!r} registered twice; pick another name")
        BACKBONES[name] = fn
        return fn

    return deco
