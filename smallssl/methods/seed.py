"""SEED: self-supervised distillation (Fang et al., ICLR 2021, arXiv:2101.04731).

A frozen, self-supervised teacher (backbone + its projection head, always in eval mode, no gradients)
embeds a batch ``x`` (B, 3, H, W) into L2-normalised ``t`` (B, dim); the student ``encoder_q`` (backbone +
MoCo-style head, ``--mlp``) embeds the same images into normalised ``s`` (B, dim). With a queue (K, dim)
of earlier teacher embeddings, the loss is the soft cross-entropy between the teacher's similarity
distribution ``softmax([t.t, t queue^T] / T_t)`` and the student's ``log_softmax([s.t, s queue^T] / T_s)``
(:func:`smallssl.losses.seed_distill`); then the all-gathered teacher embeddings replace the oldest
``world * B`` queue rows. The paper's recipe: K = 65536, T_s = 0.2, T_t = 1e-4, SGD with
lr = 0.03 * batch / 256, 5 warm-up epochs, cosine schedule, 200 epochs.

The frozen teacher comes from :func:`smallssl.checkpoints.teacher.build_teacher` (any checkpoint layout smallssl
reads, with the teacher projection ``--teacher-proj auto|head|none|random``; see that module).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import dist as sdist
from ..checkpoints.teacher import TEACHER_PROJ, teacher_dim
from ..heads import Encoder, build_head
from ..losses import info_nce_top1, seed_distill
from ..momentum import freeze_
from ..queue import check_queue_batch, enqueue_keys
from .base import SSLMethod


class SEED(SSLMethod):
    """SEED distillation of a frozen teacher into the student ``encoder_q``.

    Args:
        backbone: student backbone (pooled features, ``.num_features``).
        teacher: frozen module mapping images (B, 3, H, W) to (B, dim) embeddings, e.g. from
            :func:`build_teacher` (an :class:`~smallssl.heads.Encoder`); it is put in eval mode for good.
        dim: embedding width of student and teacher (128 for MoCo-v2 teachers).
        K: queue length (``--seed-k``, 65536); a multiple of the global batch.
        T: student temperature (``--seed-t``, 0.2).
        teacher_T: teacher temperature (``--seed-teacher-t``, 1e-4; logits in fp32).
        mlp: student head, see :mod:`smallssl.heads` (``--mlp``; SEED used the MoCo-v2 MLP).
    """

    def __init__(self, backbone: nn.Module, teacher: nn.Module | None = None, dim: int = 128, K: int = 65536,
                 T: float = 0.2, teacher_T: float = 1e-4, mlp: str = "v2"):
        super().__init__()
        if teacher is None:
            raise ValueError("SEED needs a teacher module (see smallssl.checkpoints.teacher.build_teacher; "
                             "main_moco.py: --teacher-arch ARCH --teacher-ckpt PATH)")
        if K <= 0 or dim <= 0:
            raise ValueError(f"queue size K and dim must be positive, got K={K}, dim={dim}")
        if T <= 0 or teacher_T <= 0:
            raise ValueError(f"temperatures must be > 0, got T={T}, teacher_T={teacher_T}")
        t_dim = teacher_dim(teacher)
        if t_dim is not None and t_dim != dim:
            raise ValueError(f"the teacher embeds into {t_dim} dims but the student head into {dim}: pass "
                             f"--seed-dim {t_dim}, or --teacher-proj random (fixed random projection to {dim}); "
                             f"teacher projection choices: {', '.join(TEACHER_PROJ)}")
        self.K, self.T, self.teacher_T = K, T, teacher_T
        self.encoder_q = Encoder(backbone, build_head(mlp, backbone.num_features, dim))
        self.teacher = freeze_(teacher)
        self.teacher.eval()
        self.register_buffer("queue", F.normalize(torch.randn(K, dim), dim=1))
        self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))

    def train(self, mode: bool = True) -> SEED:
        """Train the student only: the teacher keeps its BN running statistics (eval mode) for good."""
        super().train(mode)
        self.teacher.eval()
        return self

    def check_batch(self, global_batch: int) -> None:
        check_queue_batch(self.K, global_batch, "--seed-k")

    def enqueue(self, keys: torch.Tensor) -> None:
        """Write the teacher embeddings ``keys`` (N, dim) at the queue pointer and advance it (mod K)."""
        enqueue_keys(self.queue, self.queue_ptr, keys)

    @torch.no_grad()
    def teacher_embed(self, x: torch.Tensor) -> torch.Tensor:
        """L2-normalised fp32 teacher embeddings (B, dim) of images x (B, 3, H, W)."""
        self.teacher.eval()
        return F.normalize(self.teacher(x).float(), dim=1)

    def forward(self, views: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """views[0]: (B, 3, H, W), seen by student and teacher alike (as in SEED); further views are unused.

        Returns the loss, ``acc1`` (% of rows whose s.t beats every s.queue logit) and ``agree`` (% of rows
        where the student's and the teacher's most similar entry of [positive, queue] coincide).
        """
        x = views[0]
        s, feat = self.encoder_q.embed(x)
        s = F.normalize(s.float(), dim=1)
        t = self.teacher_embed(x)
        queue = self.queue.clone().detach()  # the enqueue below must not change what the loss saw
        loss = seed_distill(s, t, queue, self.T, self.teacher_T)
        with torch.no_grad():
            s_d = s.detach()
            acc1 = info_nce_top1(s_d, t, queue)
            best_s = torch.cat([(s_d * t).sum(1, keepdim=True), s_d @ queue.T], 1).argmax(1)
            best_t = torch.cat([(t * t).sum(1, keepdim=True), t @ queue.T], 1).argmax(1)
            agree = (best_s == best_t).float().mean() * 100
        self.enqueue(sdist.all_gather_cat(t))
        return {"loss": loss, "acc1": acc1, "agree": agree, "emb": [s.detach()], "feat": feat.detach()}
