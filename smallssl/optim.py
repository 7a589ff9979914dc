"""Optimisers and learning-rate schedules (per iteration)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn as nn

from .lars import LARS
from .methods.base import SSLMethod


def param_groups(model: nn.Module, weight_decay: float, exclude_bias_and_norm: bool = False) -> list[dict]:
    """Trainable parameters; optionally biases and norm weights (ndim <= 1) in a group with wd 0 and no LARS.

    An :class:`~smallssl.methods.base.SSLMethod` may define ``param_group_options()`` returning
    ``[(parameters, options), ...]``: those parameters
    get groups of their own carrying ``options`` (``lr_scale``: multiplies the scheduled lr; ``fixed_lr``:
    stays at the base lr), e.g. SimSiam's fixed predictor lr and Barlow Twins' bias/BN lr.
    """
    special = model.param_group_options() if isinstance(model, SSLMethod) else []
    owner = {id(p): i for i, (params, _) in enumerate(special) for p in params}
    buckets: dict[tuple[int, bool], list] = {}
    for p in model.parameters():
        if not p.requires_grad:
            continue
        key = (owner.get(id(p), -1), exclude_bias_and_norm and p.ndim <= 1)
        buckets.setdefault(key, []).append(p)
    groups = []
    for (i, no_decay), params in sorted(buckets.items()):
        g = {"params": params, "weight_decay": 0.0 if no_decay else weight_decay}
        if no_decay:
            g["lars"] = False  # smallssl.lars.LARS: no trust ratio
        if i >= 0:
            g.update(special[i][1])
        groups.append(g)
    return groups


OPTIMIZERS = ("sgd", "lars", "lars-exclude-bn", "adamw")


def excludes_bias_and_norm(name: str) -> bool:
    """Whether ``--optimizer name`` keeps biases and norm weights out of LARC and weight decay (pass it to
    :func:`param_groups`): only ``lars-exclude-bn`` (SimCLR / BYOL / VISSL's ``exclude_bias_and_norm``)."""
    return name == "lars-exclude-bn"


def build_optimizer(name: str, groups: list[dict], lr: float, momentum: float = 0.9,
                    weight_decay: float = 1e-4) -> torch.optim.Optimizer:
    """``sgd`` (MoCo), ``lars`` / ``lars-exclude-bn`` (:class:`~smallssl.lars.LARS`) or ``adamw``.

    ``lars`` is SwAV / SEER's usage, ``LARC(SGD(model.parameters(), weight_decay=wd), trust_coefficient=1e-3,
    clip=False)``: LARC and weight decay on every parameter, biases and BatchNorm included, when ``groups`` come
    from :func:`param_groups` without the exclusion. ``lars-exclude-bn`` is the same optimizer for groups built
    with ``exclude_bias_and_norm=True`` (SimCLR / BYOL style: 1-d tensors get neither). Barlow Twins' own LARS
    differs again (trust ratio ``eta ||w|| / ||g + wd w||``, no eps): not provided.
    """
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay)
    if name in ("lars", "lars-exclude-bn"):
        return LARS(groups, lr=lr, momentum=momentum, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}")


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


def lr_schedule(base_lr: float, epochs: int, steps_per_epoch: int, cos: bool = True,
                schedule: Sequence[int] = (120, 160), warmup_epochs: float = 0.0) -> list[float]:
    """The lr of every iteration, precomputed (DINO's schedule arrays): ``[epoch * steps_per_epoch + i]`` is
    :func:`lr_at` at ``epoch + i / steps_per_epoch``."""
    return [lr_at(e + i / steps_per_epoch, base_lr, epochs, cos=cos, schedule=schedule, warmup_epochs=warmup_epochs)
            for e in range(epochs) for i in range(steps_per_epoch)]


def set_lr(optimizer: torch.optim.Optimizer, lr: float, base_lr: float | None = None) -> None:
    """Scheduled ``lr`` times each group's ``lr_scale``; groups marked ``fixed_lr`` get ``base_lr``."""
    for g in optimizer.param_groups:
        if g.get("fixed_lr") and base_lr is not None:
            g["lr"] = base_lr * g.get("lr_scale", 1.0)
        else:
            g["lr"] = lr * g.get("lr_scale", 1.0)
