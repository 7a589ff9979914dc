"""Optimisers and learning-rate schedules (per iteration)."""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn as nn


def param_groups(model: nn.Module, weight_decay: float, exclude_bias_and_norm: bool = False) -> list[dict]:
    """Trainable parameters; optionally biases and norm weights (ndim <= 1) in a group with wd 0 and no LARS."""
    decay, no_decay = [], []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        (no_decay if exclude_bias_and_norm and p.ndim <= 1 else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0, "lars": False})  # smallssl.lars.LARS: no trust ratio
    return groups


def build_optimizer(name: str, groups: list[dict], lr: float, momentum: float = 0.9,
                    weight_decay: float = 1e-4) -> torch.optim.Optimizer:
    """``sgd`` (MoCo), ``lars`` (SwAV/SEER/BYOL, see smallssl.lars) or ``adamw``."""
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay)
    if name == "lars":
        from .lars import LARS

        return LARS(groups, lr=lr, momentum=momentum, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {name!r}; choose sgd, lars or adamw")


def lr_at(epoch: float, base_lr: float, epochs: int, cos: bool = True, schedule: Sequence[int] = (120, 160),
          warmup_epochs: float = 0.0, final_lr: float = 0.0) -> float:
    """Learning rate at fractional ``epoch``: linear warm-up, then half-cosine to ``final_lr`` or step decay x0.1."""
    if warmup_epochs > 0 and epoch < warmup_epochs:
        return base_lr * epoch / warmup_epochs
    if cos:
        span = max(epochs - warmup_epochs, 1e-8)
        progress = min(max((epoch - warmup_epochs) / span, 0.0), 1.0)
        return final_lr + (base_lr - final_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))
    return base_lr * 0.1 ** sum(1 for milestone in schedule if epoch >= milestone)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for g in optimizer.param_groups:
        g["lr"] = lr * g.get("lr_scale", 1.0)


def cosine_momentum(step: int, total_steps: int, base: float) -> float:
    """BYOL's target momentum: 1 - (1 - base) (cos(pi k / K) + 1) / 2, from base to 1."""
    return 1.0 - (1.0 - base) * (math.cos(math.pi * step / max(total_steps, 1)) + 1.0) / 2.0
