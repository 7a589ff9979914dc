"""Barlow Twins (Zbontar, Jing, Misra, LeCun, Deny, "Barlow Twins: Self-Supervised Learning via Redundancy
Reduction", ICML 2021, arXiv:2103.03230).

Per step, for two views ``x1, x2``: ``z_v = g(f(x_v))`` (B, D) (encoder + projector, ``encoder_q``), each
view standardised along the batch (BN without affine), the cross-correlation ``C = bn(z1)^T bn(z2) / N``
(D, D) over the global batch of N images, and
``loss = sum_i (1 - C_ii)^2 + lambda sum_{i != j} C_ij^2`` (:mod:`smallssl.losses`).

Under DDP the batch statistics and ``C`` are summed over ranks with an autograd all-reduce (the paper's code
sums ``C`` with ``all_reduce`` and uses SyncBN), so every rank computes the loss of the global batch. The
all-reduce's backward sums the ranks' gradients and DDP averages them, which gives exactly the gradient of
the global loss (the paper's non-differentiable ``all_reduce`` gives it divided by the world size).

Paper defaults: ResNet-50, projector 8192-8192-8192 (Linear-BN-ReLU, Linear-BN-ReLU, Linear, no biases),
lambda 5e-3 (0.0051 in the code), batch 2048, LARS lr 0.2 for weights / 0.0048 for biases and BN,
weight decay 1.5e-6, 1000 epochs. Small backbones use smaller projectors, e.g. ``--barlow-proj 2048-2048``.
The bias/BN learning rate is ``bias_lr_scale`` (0.0048 / 0.2 = 0.024) times the scheduled one, through
:meth:`BarlowTwins.param_group_options`; with ``--optimizer lars`` biases and norm weights are also excluded
from LARS adaptation and weight decay, as in the paper.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn

from .. import dist as sdist
from ..heads import Encoder
from ..losses import barlow_twins_loss_from_c, cross_correlation
from .base import SSLMethod


def parse_sizes(text: str) -> tuple[int, ...]:
    """``"8192-8192-8192"`` -> (8192, 8192, 8192); the layer widths of the projector, last = embedding size."""
    try:
        sizes = tuple(int(s) for s in text.split("-"))
    except ValueError:
        sizes = ()
    if not sizes or min(sizes) <= 0:
        raise ValueError(f"projector sizes must be dash-separated positive ints like 8192-8192-8192, got {text!r}")
    return sizes


def barlow_projector(in_dim: int, sizes: Sequence[int]) -> nn.Sequential:
    """(Linear-BN-ReLU) for every size but the last, then Linear; bias-free as in the paper's code."""
    layers: list[nn.Module] = []
    d = in_dim
    for h in sizes[:-1]:
        layers += [nn.Linear(d, h, bias=False), nn.BatchNorm1d(h), nn.ReLU(inplace=True)]
        d = h
    layers.append(nn.Linear(d, sizes[-1], bias=False))
    return nn.Sequential(*layers)


class BarlowTwins(SSLMethod):
    """Barlow Twins: encoder + projector (``encoder_q``) shared by both views, cross-correlation to identity.

    Args:
        backbone: pooled-feature backbone with ``.num_features``.
        projector: layer widths (``--barlow-proj``, 8192-8192-8192); the last is the embedding size D.
        lambd: weight of the off-diagonal (redundancy) term (``--barlow-lambda``, 5e-3).
        eps: variance epsilon of the per-view batch standardisation (BatchNorm1d's 1e-5).
        bias_lr_scale: learning-rate factor of biases and norm weights (``--barlow-bias-lr-scale``, 0.024).
    """

    def __init__(self, backbone: nn.Module, projector: Sequence[int] = (8192, 8192, 8192), lambd: float = 5e-3,
                 eps: float = 1e-5, bias_lr_scale: float = 0.024):
        super().__init__()
        projector = tuple(projector)
        if not projector or min(projector) <= 0:
            raise ValueError(f"projector sizes must be positive ints, e.g. (8192, 8192, 8192); got {projector}")
        if lambd < 0:
            raise ValueError(f"lambd must be >= 0 (paper: 5e-3), got {lambd}")
        if eps <= 0:
            raise ValueError(f"eps must be > 0, got {eps}")
        if bias_lr_scale <= 0:
            raise ValueError(f"bias_lr_scale must be > 0 (paper: 0.0048 / 0.2 = 0.024), got {bias_lr_scale}")
        self.lambd, self.eps, self.bias_lr_scale = lambd, eps, bias_lr_scale
        self.encoder_q = Encoder(backbone, barlow_projector(backbone.num_features, projector))

    def param_group_options(self) -> list[tuple[list[nn.Parameter], dict]]:
        """Biases and norm weights (ndim <= 1) at ``bias_lr_scale`` x the lr (:func:`smallssl.optim.param_groups`)."""
        small = [p for p in self.parameters() if p.requires_grad and p.ndim <= 1]
        return [(small, {"lr_scale": self.bias_lr_scale})] if self.bias_lr_scale != 1.0 else []

    def check_batch(self, global_batch: int) -> None:
        if global_batch < 2:
            raise ValueError(f"Barlow Twins standardises along the batch and needs a global batch >= 2, got "
                             f"{global_batch}")

    def forward(self, views: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """views: [x1, x2], each (B, 3, H, W). Returns loss, its on-diagonal and (unweighted) off-diagonal terms."""
        if len(views) != 2:
            raise ValueError(f"Barlow Twins takes exactly 2 views, got {len(views)}")
        (z1, feat), z2 = self.encoder_q.embed(views[0]), self.encoder_q(views[1])  # (B, D) each
        world = sdist.get_world_size()
        reduce = sdist.all_reduce_sum_with_grad if world > 1 else None
        c = cross_correlation(z1, z2, self.eps, reduce_sum=reduce, n_total=z1.shape[0] * world)  # D x D
        loss, on, off = barlow_twins_loss_from_c(c, self.lambd)
        return {"loss": loss, "on_diag": on.detach(), "off_diag": off.detach(), "emb": [z1.detach(), z2.detach()],
                "feat": feat.detach()}
