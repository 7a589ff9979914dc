"""Helpers shared by the method tests (a tiny backbone, small constructor arguments, random views) and a method
that exists only in the test suite, ``ContractExample``: ``conftest.py`` registers it in ``METHODS``."""

import torch
import torch.nn as nn
import torch.nn.functional as F

from smallssl.heads import Encoder, mlp
from smallssl.losses import negative_cosine
from smallssl.methods.base import SSLMethod


class TinyBackbone(nn.Module):
    """conv-BN-ReLU-pool: pooled (B, 8) features, enough to exercise every method at 16 x 16."""

    num_features = 8

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, stride=2, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x))).mean((2, 3))


class ContractExample(SSLMethod):
    """The smallest method the contract allows: a projector, and the negative cosine between the two views'
    projections with a stop-gradient on the second (SimSiam without its predictor). Not a useful method."""

    def __init__(self, backbone: nn.Module, dim: int = 16):
        super().__init__()
        self.encoder_q = Encoder(backbone, mlp(backbone.num_features, 32, dim, num_layers=2, bn=True))

    def forward(self, views: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        (z1, feat), z2 = self.encoder_q.embed(views[0]), self.encoder_q(views[1])
        loss = negative_cosine(z1, z2.detach())
        return {"loss": loss, "emb": [z1.detach(), z2.detach()], "feat": feat.detach()}



def tiny_kwargs(name: str) -> dict:
    """Small constructor arguments per method; a method added later without an entry is built with defaults."""
    table = {
        "moco": lambda: dict(dim=16, K=64, mlp="v2"),
        "seed": lambda: dict(teacher=Encoder(TinyBackbone(), nn.Linear(8, 16)), dim=16, K=64),
        "simclr": lambda: dict(dim=16, hidden_dim=32),
        "byol": lambda: dict(dim=16, hidden_dim=32),
        "simsiam": lambda: dict(dim=32, pred_dim=8, proj_layers=2),
        "barlow": lambda: dict(projector=(32, 32)),
        "swav": lambda: dict(dim=16, hidden_dim=32, n_prototypes=10),
    }
    return table[name]() if name in table else {}


def views(b: int = 8, seed: int = 0, n: int = 2) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, 3, 16, 16, generator=g) for _ in range(n)]
