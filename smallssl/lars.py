"""LARS / LARC: SGD with a layer-wise trust ratio (You et al. 2017, "Large Batch Training of Convolutional
Networks", arXiv:1708.03888), in the form of NVIDIA apex's ``LARC`` that SwAV and SEER use (trust 1e-3, no clip).

For each parameter tensor ``w`` with gradient ``g`` and weight decay ``wd`` (LARS tensors only)::

    local_lr = trust * ||w|| / (||g|| + wd * ||w|| + eps)       # when ||w|| > 0 and ||g|| > 0, else 1 (no decay)
    clip:      local_lr = min(local_lr / lr, 1)                 # LARC "clip" mode; SEER uses clip=False ("scale")
    d        = (g + wd * w) * local_lr
    buf      = momentum * buf + d        (buf = d at the first step)
    w       <- w - lr * (d + momentum * buf if nesterov else buf)

SwAV and SEER apply LARC and weight decay to every parameter, biases and BatchNorm included
(``--optimizer lars``). ``--optimizer lars-exclude-bn`` puts biases and normalisation weights (``ndim <= 1``) in a
group without trust ratio and without weight decay (plain SGD with momentum), as SimCLR / BYOL / VISSL's
``exclude_bias_and_norm`` do (:func:`lars_param_groups`, :func:`smallssl.optim.param_groups`).
Works on plain tensors and on FSDP2 ``DTensor`` shards (norms are global: no ``.item()`` in the step).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn as nn


class LARS(torch.optim.Optimizer):
    """SGD + momentum with LARC trust-ratio scaling.

    Args:
        params: parameters or param groups; a group with ``lars=False`` skips the trust ratio (plain SGD).
        lr: learning rate (SEER: 0.3 per 256 images, linear scaling with the batch).
        momentum: heavy-ball momentum (0.9).
        weight_decay: L2 coefficient added to the gradient before scaling (SEER 1e-5).
        trust_coefficient: ``trust`` above (1e-3 in SwAV / SEER).
        clip: LARC clip mode (``min(local_lr / lr, 1)``); False = scale mode as in SEER.
        eps: added to the denominator (1e-8).
        nesterov: Nesterov momentum.
    """

    def __init__(self, params: Iterable, lr: float, momentum: float = 0.9, weight_decay: float = 0.0,
                 trust_coefficient: float = 1e-3, clip: bool = False, eps: float = 1e-8, nesterov: bool = False):
        if lr < 0 or momentum < 0 or weight_decay < 0 or trust_coefficient <= 0 or eps < 0:
            raise ValueError(f"invalid LARS settings: lr={lr}, momentum={momentum}, weight_decay={weight_decay}, "
                             f"trust_coefficient={trust_coefficient}, eps={eps} (need lr, momentum, weight_decay, "
                             "eps >= 0 and trust_coefficient > 0)")
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, trust_coefficient=trust_coefficient,
                        clip=clip, eps=eps, nesterov=nesterov, lars=True)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, wd, mom = group["lr"], group["weight_decay"], group["momentum"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                if group["lars"]:
                    p_norm = torch.linalg.vector_norm(p)
                    g_norm = torch.linalg.vector_norm(g)
                    local_lr = group["trust_coefficient"] * p_norm / (g_norm + wd * p_norm + group["eps"])
                    if group["clip"]:
                        local_lr = torch.clamp(local_lr / lr, max=1.0)
                    scaled = g.add(p, alpha=wd) * local_lr
                    # apex LARC leaves the gradient untouched (and undecayed) when a norm is zero.
                    d = torch.where((p_norm > 0) & (g_norm > 0), scaled, g)
                else:
                    d = g.add(p, alpha=wd) if wd else g
                if mom:
                    state = self.state[p]
                    buf = state.get("momentum_buffer")
                    if buf is None:
                        buf = state["momentum_buffer"] = d.clone()
                    else:
                        buf.mul_(mom).add_(d)
                    d = d.add(buf, alpha=mom) if group["nesterov"] else buf
                p.add_(d, alpha=-lr)
        return loss


def lars_param_groups(model: nn.Module, weight_decay: float, exclude_bias_and_norm: bool = True) -> list[dict]:
    """Weights (LARS + weight decay) and, with ``exclude_bias_and_norm``, a second group of biases / norm
    weights (``ndim <= 1``) without either. ``exclude_bias_and_norm=False``: one group, SwAV / SEER's usage.
    (:func:`smallssl.optim.param_groups` does the same and also honours a method's own parameter groups.)"""
    params = [p for p in model.parameters() if p.requires_grad]
    if not exclude_bias_and_norm:
        return [{"params": params, "weight_decay": weight_decay}]
    return [{"params": [p for p in params if p.ndim > 1], "weight_decay": weight_decay},
            {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0, "lars": False}]
