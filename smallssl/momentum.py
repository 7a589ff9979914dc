"""Momentum (EMA) encoders: MoCo's key encoder, BYOL's target network, frozen SEED teachers.

MoCo v3 passes the momentum into the update (the loop owns the schedule); here the method owns it, since MoCo
keeps it constant and BYOL follows :func:`cosine_momentum` over the global step.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn as nn


def freeze_(module: nn.Module) -> nn.Module:
    """No gradients for any parameter of ``module`` (in place); returns it."""
    for p in module.parameters():
        p.requires_grad = False
    return module


def frozen_copy(module: nn.Module) -> nn.Module:
    """A deep copy of ``module`` without gradients: the initial momentum / target encoder."""
    return freeze_(copy.deepcopy(module))


@torch.no_grad()
def ema_update_(target: nn.Module, online: nn.Module, m: float, copy_buffers: bool = False) -> None:
    """``theta_target <- m theta_target + (1 - m) theta_online`` for every parameter, in place.

    ``copy_buffers``: also copy the online buffers (BN running statistics) into the target, as BYOL does; MoCo's
    key encoder keeps its own statistics.
    """
    t_params = list(target.parameters())
    torch._foreach_mul_(t_params, m)
    torch._foreach_add_(t_params, [p.detach() for p in online.parameters()], alpha=1.0 - m)
    if copy_buffers:
        for bt, bo in zip(target.buffers(), online.buffers()):
            bt.copy_(bo)


def cosine_momentum(step: int, total_steps: int, base: float) -> float:
    """BYOL's target momentum: 1 - (1 - base) (cos(pi k / K) + 1) / 2, from base to 1."""
    return 1.0 - (1.0 - base) * (math.cos(math.pi * step / max(total_steps, 1)) + 1.0) / 2.0
