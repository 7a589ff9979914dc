"""SimCLR (Chen, Kornblith, Norouzi, Hinton, "A Simple Framework for Contrastive Learning of Visual
Representations", ICML 2020, arXiv:2002.05709).

Per step, for two views ``x1, x2`` of a batch of B images: ``z_v = normalize(g(f(x_v)))`` (B, dim) and the
NT-Xent loss over the 2N embeddings of the *global* batch (N = world * B): each embedding's positive is the
other view of its image, the other 2N - 2 embeddings are its negatives (``losses.nt_xent``).

Paper defaults (ImageNet): ResNet-50, projection head Linear(2048, 2048)-BN-ReLU-Linear(2048, 128), batch
4096, LARS with lr 0.3 x B/256 (4.8), weight decay 1e-6, temperature 0.1, 10 warm-up epochs, cosine decay.
CIFAR-10 (appendix B.9): ResNet-50 with the CIFAR stem, batch 1024, temperature 0.5.

Under DDP the embeddings are all-gathered *with* gradient and every rank computes the same global loss;
the gather's backward sums the gradients of all ranks and DDP averages them, which gives exactly the
gradient of the global loss. (The official TPU code instead lets each core use its own rows as anchors
against the global negatives; the loss value is the same, the compute per rank is W times smaller.)
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import dist as sdist
from ..heads import Encoder, mlp
from ..losses import nt_xent
from .base import SSLMethod


@torch.no_grad()
def nt_xent_top1(z1: torch.Tensor, z2: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """Pretext top-1 (%): fraction of the 2N rows whose most similar other row is their positive."""
    z = torch.cat([z1, z2]).float()
    m, n = z.shape[0], z1.shape[0]
    hits = 0
    for a in range(0, m, chunk):
        s = z[a:a + chunk] @ z.T  # chunk x 2N
        rows = torch.arange(a, min(a + chunk, m), device=z.device)
        s[rows - a, rows] = -float("inf")
        hits += int((s.argmax(1) == (rows + n) % m).sum())
    return torch.tensor(100.0 * hits / m, device=z.device)


class SimCLR(SSLMethod):
    """SimCLR: a shared encoder, a projection head and NT-Xent over the global batch.

    Args:
        backbone: pooled-feature backbone with ``.num_features``.
        dim: projection output size (``--simclr-dim``, 128).
        hidden_dim: projection hidden size (``--simclr-hidden``; None = backbone width, 2048 for ResNet-50).
        temperature: NT-Xent temperature (``--simclr-t``, 0.5 as in the paper's CIFAR runs;
            0.1 for the paper's ImageNet runs).
    """

    def __init__(self, backbone: nn.Module, dim: int = 128, hidden_dim: int | None = None,
                 temperature: float = 0.5):
        super().__init__()
        if dim <= 0 or (hidden_dim is not None and hidden_dim <= 0):
            raise ValueError(f"dim and hidden_dim must be positive (hidden_dim None = backbone width), got "
                             f"dim={dim}, hidden_dim={hidden_dim}")
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0 (0.1-0.5 are usual), got {temperature}")
        self.temperature = temperature
        hidden = hidden_dim or backbone.num_features
        self.encoder_q = Encoder(backbone, mlp(backbone.num_features, hidden, dim, num_layers=2, bn=True))

    def forward(self, views: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """views: [x1, x2], each (B, 3, H, W). Returns the NT-Xent loss and the pretext top-1 (%)."""
        if len(views) != 2:
            raise ValueError(f"SimCLR takes exactly 2 views, got {len(views)}")
        b = views[0].shape[0]
        z, feat = self.encoder_q.embed(torch.cat(views))  # one pass: BN statistics over both views, as in the paper
        z = F.normalize(z.float(), dim=1)
        z1, z2 = sdist.all_gather_with_grad(z[:b]), sdist.all_gather_with_grad(z[b:])  # (W B, dim) each
        loss = nt_xent(z1, z2, self.temperature)
        return {"loss": loss, "acc1": nt_xent_top1(z1.detach(), z2.detach()), "emb": [z[:b].detach(), z[b:].detach()],
                "feat": feat[:b].detach()}
