"""BYOL (Grill et al., "Bootstrap Your Own Latent: A New Approach to Self-Supervised Learning",
NeurIPS 2020, arXiv:2006.07733).

Per step, for two views ``x1, x2``: the online network (encoder + projector, ``encoder_q``, then the
``predictor``) predicts the target network's (``encoder_k``, no gradient) projection of the other view:
``loss = byol_loss(q(x1), z'(x2)) + byol_loss(q(x2), z'(x1))`` with ``byol_loss = mean(2 - 2 cos)``
(the symmetrised loss of eq. 2). After the optimiser step the target follows the online weights by an
exponential moving average, ``xi <- tau xi + (1 - tau) theta``, with the cosine schedule
``tau_k = 1 - (1 - tau_base) (cos(pi k / K) + 1) / 2`` from ``tau_base`` (0.996) at step 0 to 1 at the end
(:func:`smallssl.momentum.cosine_momentum`; the trainer calls :meth:`after_step`).

Paper defaults: ResNet-50, projector and predictor Linear(., 4096)-BN-ReLU-Linear(4096, 256), batch 4096,
LARS lr 0.2 x B/256, weight decay 1.5e-6, tau_base 0.996, 1000 epochs (300-epoch results in the paper
use tau_base 0.99), asymmetric augmentation (blur 1.0 / 0.1, solarize 0 / 0.2; main_moco.py `--byol-aug asym`,
the default, builds those two views). Buffers (BN running
statistics) are copied, not averaged, into the target.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ..heads import Encoder, mlp
from ..losses import byol_loss
from ..momentum import cosine_momentum, ema_update_, frozen_copy
from .base import SSLMethod


class BYOL(SSLMethod):
    """BYOL: online encoder + projector + predictor, EMA target (``encoder_k``).

    Args:
        backbone: pooled-feature backbone with ``.num_features``.
        dim: projection / prediction size (``--byol-dim``, 256).
        hidden_dim: hidden size of projector and predictor (``--byol-hidden``, 4096).
        base_momentum: tau_base of the cosine EMA schedule (``--byol-m``, 0.996); must be in [0, 1].
    """

    def __init__(self, backbone: nn.Module, dim: int = 256, hidden_dim: int = 4096, base_momentum: float = 0.996):
        super().__init__()
        if dim <= 0 or hidden_dim <= 0:
            raise ValueError(f"dim and hidden_dim must be positive, got dim={dim}, hidden_dim={hidden_dim}")
        if not 0.0 <= base_momentum <= 1.0:
            raise ValueError(f"base_momentum must be in [0, 1] (BYOL uses 0.996), got {base_momentum}")
        self.base_momentum = base_momentum
        self.momentum = base_momentum  # the tau used by the last EMA update (logged)
        self.encoder_q = Encoder(backbone, mlp(backbone.num_features, hidden_dim, dim, num_layers=2, bn=True))
        self.predictor = mlp(dim, hidden_dim, dim, num_layers=2, bn=True)
        self.encoder_k = frozen_copy(self.encoder_q)

    @torch.no_grad()
    def copy_query_to_key(self) -> None:
        self.encoder_k.load_state_dict(self.encoder_q.state_dict())

    @torch.no_grad()
    def ema_update(self, tau: float) -> None:
        """``xi <- tau xi + (1 - tau) theta`` for parameters; buffers (BN statistics) are copied."""
        ema_update_(self.encoder_k, self.encoder_q, tau, copy_buffers=True)

    def after_step(self, step: int, total_steps: int) -> None:
        """Called by the trainer after optimizer step ``step`` (0-based) of ``total_steps``."""
        self.momentum = cosine_momentum(step, total_steps, self.base_momentum)
        self.ema_update(self.momentum)

    def forward(self, views: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """views: [x1, x2], each (B, 3, H, W). Returns the symmetrised loss (in [0, 8]) and the EMA tau."""
        if len(views) != 2:
            raise ValueError(f"BYOL takes exactly 2 views, got {len(views)}")
        x1, x2 = views
        (z1o, feat), z2o = self.encoder_q.embed(x1), self.encoder_q(x2)  # online projections (B, dim)
        p1, p2 = self.predictor(z1o), self.predictor(z2o)  # (B, dim) each
        with torch.no_grad():
            z1, z2 = self.encoder_k(x1), self.encoder_k(x2)
        loss = byol_loss(p1, z2.detach()) + byol_loss(p2, z1.detach())
        return {"loss": loss, "tau": torch.tensor(self.momentum), "emb": [z1o.detach(), z2o.detach()],
                "feat": feat.detach()}
