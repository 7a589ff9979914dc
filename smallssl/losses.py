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


# ------------------------------------------------------------------------------------------------- SEED
def soft_cross_entropy(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """``mean_b sum_j -softmax(teacher_logits)_bj * log_softmax(student_logits)_bj`` in fp32; (B, N), (B, N).

    The teacher side carries no gradient (it is detached). Already-scaled logits (divided by temperatures).
    """
    p_teacher = torch.softmax(teacher_logits.detach().float(), dim=1)
    return -(p_teacher * torch.log_softmax(student_logits.float(), dim=1)).sum(1).mean()


def seed_distill(s: torch.Tensor, t: torch.Tensor, queue: torch.Tensor, student_temperature: float = 0.2,
                 teacher_temperature: float = 1e-4) -> torch.Tensor:
    """SEED's distillation loss (Fang et al., ICLR 2021, arXiv:2101.04731, eq. 4-6).

    s: (B, D) L2-normalised student embeddings; t: (B, D) L2-normalised teacher embeddings of the same
    images (no gradient); queue: (K, D) normalised teacher embeddings of earlier batches. Over the
    1 + K entries ``[t_b, queue]`` the teacher's distribution ``softmax([t.t, t queue^T] / T_t)`` is the
    target of the student's ``log_softmax([s.t, s queue^T] / T_s)``. Logits are fp32: T_t = 1e-4 scales
    them to ~1e4. As T_t -> 0 the target becomes the one-hot of the teacher's argmax (the positive, since
    t.t = 1 is the largest similarity) and the loss becomes InfoNCE with the teacher embedding as key.
    Dispatches to ``kernels.seed_distill`` (same signature) when the kernels package provides it.
    """
    import kernels

    fused = getattr(kernels, "seed_distill", None)
    if callable(fused):
        return fused(s, t, queue, student_temperature, teacher_temperature)
    return seed_distill_reference(s, t, queue, student_temperature, teacher_temperature)


def seed_distill_reference(s: torch.Tensor, t: torch.Tensor, queue: torch.Tensor, student_temperature: float,
                           teacher_temperature: float) -> torch.Tensor:
    """Eager PyTorch version of :func:`seed_distill` (materialises the (B, 1 + K) logits)."""
    if student_temperature <= 0 or teacher_temperature <= 0:
        raise ValueError(f"temperatures must be > 0, got student {student_temperature}, teacher {teacher_temperature}")
    s, t, queue = s.float(), t.detach().float(), queue.detach().float()
    logits_s = torch.cat([(s * t).sum(1, keepdim=True), s @ queue.T], dim=1)  # B x (1+K)
    logits_t = torch.cat([(t * t).sum(1, keepdim=True), t @ queue.T], dim=1)  # B x (1+K)
    return soft_cross_entropy(logits_s / student_temperature, logits_t / teacher_temperature)
