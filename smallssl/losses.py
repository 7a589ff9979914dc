"""Pure loss functions (no state, no I/O), and the one library module that imports ``kernels``.

Methods take every loss from here; InfoNCE, NT-Xent, SEED's distillation and Sinkhorn are the fused kernels of
``kernels/`` (Triton on CUDA, a chunked PyTorch path elsewhere; ``SMALLSSL_TRITON=0`` turns Triton off), whose
files also hold the references (``kernels.info_nce.info_nce_reference`` ...).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels.info_nce import info_nce as _info_nce
from kernels.nt_xent import nt_xent
from kernels.seed_distill import seed_distill as _seed_distill
from kernels.sinkhorn import sinkhorn

__all__ = ["barlow_twins_loss", "barlow_twins_loss_from_c", "batch_standardize", "byol_loss", "cross_correlation",
           "info_nce", "info_nce_top1", "negative_cosine", "nt_xent", "seed_distill", "sinkhorn",
           "soft_cross_entropy", "swav_loss"]


def info_nce(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, temperature: float,
             return_accuracy: bool = False):
    """MoCo's InfoNCE (He et al., 2020): ``CE([q.k, q queue^T] / T, 0)`` averaged over the batch.

    q, k: (B, D) L2-normalised; queue: (K, D) negatives (no gradient). ``kernels.info_nce`` (fused Triton on
    CUDA, chunked PyTorch elsewhere). ``return_accuracy``: also the pretext top-1 (%).
    """
    return _info_nce(q, k, queue, temperature, return_accuracy=return_accuracy)


@torch.no_grad()
def info_nce_top1(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, chunk: int = 16384) -> torch.Tensor:
    """Pretext top-1 (%): fraction of rows whose positive logit beats every queue logit; (B,D),(B,D),(K,D)."""
    pos = (q * k).sum(1).float()
    best = torch.full_like(pos, -float("inf"))
    for i in range(0, queue.shape[0], chunk):
        best = torch.maximum(best, (q @ queue[i:i + chunk].T).float().amax(1))
    return (pos > best).float().mean() * 100


# ------------------------------------------------------------------------ BYOL / SimSiam / Barlow Twins
def byol_loss(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """BYOL's regression loss (Grill et al., NeurIPS 2020, eq. 2): ``mean_b (2 - 2 cos(p_b, z_b))``.

    p: (B, D) online predictions; z: (B, D) target projections (the caller detaches them). Equals the mean
    squared distance of the L2-normalised vectors; 0 when aligned, 4 when opposite. Computed in fp32.
    """
    return (2.0 - 2.0 * F.cosine_similarity(p.float(), z.float(), dim=1)).mean()


def negative_cosine(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """SimSiam's ``D(p, z) = -mean_b cos(p_b, stopgrad(z_b))`` (Chen & He, CVPR 2021, eq. 1); (B, D), (B, D).

    The stop-gradient is part of the definition: no gradient flows into ``z``.
    """
    return -F.cosine_similarity(p.float(), z.detach().float(), dim=1).mean()


def batch_standardize(z: torch.Tensor, eps: float = 1e-5, reduce_sum=None, n_total: int | None = None) -> torch.Tensor:
    """Standardise each column of z (B, D) over the batch, as train-mode ``BatchNorm1d(D, affine=False)``.

    Mean and biased variance over the (global) batch; ``reduce_sum`` (a callable summing a tensor over
    ranks, with autograd) and ``n_total`` (the global batch) make the statistics global, like SyncBN.
    """
    z = z.float()
    n = n_total if n_total is not None else z.shape[0]
    s = z.sum(0)
    s = reduce_sum(s) if reduce_sum is not None else s
    mean = s / n
    sq = ((z - mean) ** 2).sum(0)
    sq = reduce_sum(sq) if reduce_sum is not None else sq
    return (z - mean) / torch.sqrt(sq / n + eps)


def cross_correlation(z1: torch.Tensor, z2: torch.Tensor, eps: float = 1e-5, reduce_sum=None,
                      n_total: int | None = None) -> torch.Tensor:
    """Barlow Twins' cross-correlation ``C = bn(z1)^T bn(z2) / N`` (D, D) of two (B, D) batches of embeddings.

    Each view is standardised along the batch (:func:`batch_standardize`), so ``C_ii`` is the correlation
    of unit i across views. With ``reduce_sum`` (autograd all-reduce) and ``n_total`` the statistics and the
    sum over samples cover the global batch, as the paper's code (``all_reduce(c)``).
    """
    a = batch_standardize(z1, eps, reduce_sum, n_total)
    b = batch_standardize(z2, eps, reduce_sum, n_total)
    n = n_total if n_total is not None else z1.shape[0]
    c = a.T @ b / n  # D x D
    return reduce_sum(c) if reduce_sum is not None else c


def barlow_twins_loss_from_c(c: torch.Tensor, lambd: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``sum_i (1 - C_ii)^2 + lambd * sum_{i != j} C_ij^2`` (Zbontar et al., ICML 2021, eq. 1).

    c: (D, D) cross-correlation. Returns (loss, on-diagonal term, off-diagonal term without lambd).
    """
    diag = torch.diagonal(c)
    on = (1.0 - diag).pow(2).sum()
    off = c.pow(2).sum() - diag.pow(2).sum()
    return on + lambd * off, on, off


def barlow_twins_loss(z1: torch.Tensor, z2: torch.Tensor, lambd: float = 5e-3, eps: float = 1e-5) -> torch.Tensor:
    """Single-process Barlow Twins loss of two (B, D) batches of projector outputs (see the two helpers)."""
    return barlow_twins_loss_from_c(cross_correlation(z1, z2, eps), lambd)[0]


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
    ``kernels.seed_distill`` (fused; its reference is ``kernels.seed_distill.seed_distill_reference``).
    """
    return _seed_distill(s, t, queue, student_temperature, teacher_temperature)


# ------------------------------------------------------------------------------------------------- SwAV
def swav_loss(scores_per_crop: list[torch.Tensor], codes: list[torch.Tensor], temperature: float = 0.1,
              crops_for_assign: list[int] | None = None) -> torch.Tensor:
    """SwAV's swapped prediction (Caron et al., NeurIPS 2020, arXiv:2006.09882, eq. 1-2).

    scores_per_crop: V tensors (B, K) of prototype scores ``z_v . c_k`` (normalised embeddings and
    prototypes); codes: one (B, K) code matrix per assigned crop (rows sum to 1, no gradient), computed from
    crop ``crops_for_assign[i]`` (default ``0 .. len(codes) - 1``, the large crops). For each assigned crop
    ``s`` the codes ``q_s`` are predicted from every other crop ``v != s``::

        loss = mean_s mean_{v != s} mean_b  -sum_k q_s[b, k] log softmax(scores_v[b] / T)_k

    Computed in fp32. Returns a scalar.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    n_crops = len(scores_per_crop)
    assign = list(range(len(codes))) if crops_for_assign is None else list(crops_for_assign)
    if len(assign) != len(codes) or not assign or n_crops < 2 or any(not 0 <= c < n_crops for c in assign):
        raise ValueError(f"need >= 2 crops and one code matrix per assigned crop in 0..{n_crops - 1}; got "
                         f"{n_crops} crops, {len(codes)} codes, crops_for_assign={assign}")
    log_p = [torch.log_softmax(s.float() / temperature, dim=1) for s in scores_per_crop]
    total = scores_per_crop[0].new_zeros((), dtype=torch.float32)
    for q, s in zip(codes, assign):
        q = q.detach().float()
        sub = sum(-(q * log_p[v]).sum(1).mean() for v in range(n_crops) if v != s)
        total = total + sub / (n_crops - 1)
    return total / len(assign)
