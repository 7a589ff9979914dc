"""Pure loss functions (no state, no I/O). Fused Triton versions live in ``kernels/`` beside references."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def info_nce(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, temperature: float) -> torch.Tensor:
    """MoCo's InfoNCE (He et al., 2020): ``CE([q.k, q queue^T] / T, 0)`` averaged over the batch.

    q, k: (B, D) L2-normalised; queue: (K, D) negatives (no gradient). Dispatches to ``kernels.info_nce``
    (Triton on CUDA, chunked reference elsewhere).
    """
    import kernels

    fused = getattr(kernels, "info_nce", None)
    if callable(fused):
        return fused(q, k, queue, temperature)
    logits = torch.cat([(q * k).sum(1, keepdim=True), q @ queue.T], dim=1) / temperature  # B x (1+K)
    return F.cross_entropy(logits.float(), torch.zeros(q.shape[0], dtype=torch.long, device=q.device))


@torch.no_grad()
def info_nce_top1(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, chunk: int = 16384) -> torch.Tensor:
    """Pretext top-1 (%): fraction of rows whose positive logit beats every queue logit; (B,D),(B,D),(K,D)."""
    pos = (q * k).sum(1).float()
    best = torch.full_like(pos, -float("inf"))
    for i in range(0, queue.shape[0], chunk):
        best = torch.maximum(best, (q @ queue[i:i + chunk].T).float().amax(1))
    return (pos > best).float().mean() * 100


def l2_normalize(x: torch.Tensor, dim: int = 1) -> torch.Tensor:
    return F.normalize(x, dim=dim)
