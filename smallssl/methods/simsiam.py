"""SimSiam (Chen & He, "Exploring Simple Siamese Representation Learning", CVPR 2021, arXiv:2011.10566).

Per step, for two views ``x1, x2``: ``z_v = f(x_v)`` (encoder + projector, ``encoder_q``) and
``p_v = h(z_v)`` (predictor); ``loss = D(p1, z2) / 2 + D(p2, z1) / 2`` with
``D(p, z) = -cos(p, stopgrad(z))`` (:func:`smallssl.losses.negative_cosine`). One network, no momentum
encoder, no negatives: the stop-gradient and the predictor prevent collapse.

Collapse detection (paper section 4.1): ``std`` is the per-dimension standard deviation over the batch of
``z / ||z||``, averaged over dimensions. It is about 1 / sqrt(dim) for well-spread outputs (0.022 for
dim 2048) and goes to 0 when the outputs collapse to a constant.

Paper defaults (ImageNet): ResNet-50, projector 3 x (Linear-BN), ReLU between, hidden = backbone width,
output 2048 with affine-free BN; predictor Linear(2048, 512)-BN-ReLU-Linear(512, 2048); SGD lr 0.05 x
B/256, momentum 0.9, weight decay 1e-4, batch 512, cosine decay, predictor lr kept fixed (section 4.3 /
``--fix-pred-lr`` of the official code: here ``fix_pred_lr``, on by default, through
:meth:`SimSiam.param_group_options`). CIFAR-10 (appendix D): ResNet-18 with the CIFAR stem, 2-layer
projector, lr 0.03 x B/256, weight decay 5e-4.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..heads import Encoder, mlp
from ..losses import negative_cosine
from .base import SSLMethod


@torch.no_grad()
def normalized_std(z: torch.Tensor) -> torch.Tensor:
    """Mean over dimensions of the batch std of ``normalize(z)``; z (B, D). ~1/sqrt(D) healthy, 0 collapsed."""
    return F.normalize(z.float(), dim=1).std(dim=0).mean()


class SimSiam(SSLMethod):
    """SimSiam: encoder + projector (``encoder_q``), predictor, stop-gradient on the target branch.

    Args:
        backbone: pooled-feature backbone with ``.num_features``.
        dim: projector output size (``--simsiam-dim``, 2048); the projector's hidden size equals ``dim``.
        pred_dim: predictor bottleneck (``--simsiam-pred-dim``, 512).
        proj_layers: projector depth (``--simsiam-proj-layers``, 3 for ImageNet, 2 for CIFAR in the paper).
        fix_pred_lr: keep the predictor at the base learning rate while the rest follows the schedule.
    """

    def __init__(self, backbone: nn.Module, dim: int = 2048, pred_dim: int = 512, proj_layers: int = 3,
                 fix_pred_lr: bool = True):
        super().__init__()
        if dim <= 0 or pred_dim <= 0:
            raise ValueError(f"dim and pred_dim must be positive, got dim={dim}, pred_dim={pred_dim}")
        if proj_layers < 1:
            raise ValueError(f"proj_layers must be >= 1 (paper: 3 for ImageNet, 2 for CIFAR), got {proj_layers}")
        projector = mlp(backbone.num_features, dim, dim, num_layers=proj_layers, bn=True, last_bn=True)
        self.encoder_q = Encoder(backbone, projector)
        self.predictor = mlp(dim, pred_dim, dim, num_layers=2, bn=True)
        self.fix_pred_lr = fix_pred_lr

    def param_group_options(self) -> list[tuple[list[nn.Parameter], dict]]:
        """The predictor's own optimiser group, held at the base lr (:func:`smallssl.optim.param_groups`)."""
        return [(list(self.predictor.parameters()), {"fixed_lr": True})] if self.fix_pred_lr else []

    def forward(self, views: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """views: [x1, x2], each (B, 3, H, W). Returns the loss (in [-1, 1]) and ``std`` (collapse monitor)."""
        if len(views) != 2:
            raise ValueError(f"SimSiam takes exactly 2 views, got {len(views)}")
        (z1, feat), z2 = self.encoder_q.embed(views[0]), self.encoder_q(views[1])  # (B, dim) each
        p1, p2 = self.predictor(z1), self.predictor(z2)
        loss = 0.5 * negative_cosine(p1, z2) + 0.5 * negative_cosine(p2, z1)  # stop-gradient inside
        return {"loss": loss, "std": normalized_std(z1), "emb": [z1.detach(), z2.detach()], "feat": feat.detach()}
