"""SwAV: swapping assignments between views (Caron et al., NeurIPS 2020, arXiv:2006.09882), as trained by SEER.

Per step, for ``V`` crops of a batch of B images (multi-crop, :func:`smallssl.data.multicrop_transform`; large crops
first):

1. the backbone runs once per group of consecutive crops of equal size (BN statistics over that group, as in
   SwAV's ``MultiPrismaticNet``), the projection head and L2 normalisation give ``z`` (V B, dim);
2. scores ``z C^T`` (V B, K) against K L2-normalised prototypes ``C`` (``nn.Linear(dim, K, bias=False)``);
3. for each crop in ``crops_for_assign`` (the 2 large ones) the codes ``q`` are Sinkhorn-Knopp assignments of
   its scores (``losses.sinkhorn``: equal partition of the global batch over the prototypes, entropy
   ``epsilon``, ``n_iters`` iterations; no gradient), optionally with a queue of earlier embeddings prepended;
4. swapped prediction (:func:`smallssl.losses.swav_loss`): ``q`` of crop s is predicted by the softmax of
   ``scores / T`` of every other crop.

Hooks of the method contract (:mod:`smallssl.methods.base`) that SwAV uses:

* ``set_epoch(epoch)``: the queue is filled from epoch ``queue_start_epoch`` on and used once full.
* ``before_optimizer_step(step)``: for ``step < freeze_prototypes_iters`` the prototypes' gradient is dropped
  (``grad = None``: no update, no momentum, no weight decay), as SwAV does for its first epoch (313 iterations).
* ``after_step(step, total_steps)``: the prototypes are L2-normalised in place (no grad) after every optimizer
  step. SwAV normalises them before each forward; normalising after each update (and at construction) gives
  the same weights at every forward, and under FSDP2 it changes the sharded fp32 master weights, not the
  gathered copy that a forward sees.

The queue is global: every rank stores all ranks' embeddings (all-gathered), and rank r uses its 1/world
slice, so over ranks Sinkhorn sees each queued embedding once, as with SwAV's per-rank queues; it is a
buffer, so checkpoints and resumes carry it. Checkpoint keys: ``encoder_q.backbone.*``, ``encoder_q.head.*``
(SwAV's ``projection_head`` layout: ``0`` Linear, ``1`` BN, ``3`` Linear), ``prototypes.weight``, ``queue``,
``queue_count``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import dist as sdist
from ..heads import Encoder
from ..losses import sinkhorn, swav_loss
from .base import SSLMethod


def swav_head(in_dim: int, hidden_dim: int = 2048, out_dim: int = 128, bn: bool = True) -> nn.Sequential:
    """SwAV's projection head: Linear-BN-ReLU-Linear (``hidden_dim`` 0: one Linear); swav checkpoint indices."""
    if hidden_dim <= 0:
        return nn.Sequential(nn.Linear(in_dim, out_dim))
    mid = nn.BatchNorm1d(hidden_dim) if bn else nn.Identity()
    return nn.Sequential(nn.Linear(in_dim, hidden_dim), mid, nn.ReLU(inplace=True), nn.Linear(hidden_dim, out_dim))


def size_groups(views: Sequence[torch.Tensor]) -> list[tuple[int, int]]:
    """``[(start, end)]`` of runs of consecutive views with equal spatial size (one backbone call per run)."""
    groups, start = [], 0
    for i in range(1, len(views) + 1):
        if i == len(views) or views[i].shape[-2:] != views[start].shape[-2:]:
            groups.append((start, i))
            start = i
    return groups


class SwAV(SSLMethod):
    """SwAV with multi-crop, Sinkhorn codes, optional queue and frozen-then-trained prototypes.

    Args:
        backbone: pooled-feature backbone with ``.num_features`` (SEER: ``regnety_*``).
        dim: embedding size (``--swav-dim``, 128; SEER 256).
        hidden_dim: projection hidden size (``--swav-hidden``, 2048; 0 = linear head).
        head_bn: BatchNorm in the projection head (``--swav-head-bn``, on).
        n_prototypes: K (``--swav-prototypes``, 3000; SEER 16000).
        temperature: T of the softmax over prototype scores (``--swav-t``, 0.1).
        epsilon: Sinkhorn entropy regularisation (``--swav-epsilon``, 0.05; SEER 0.03).
        sinkhorn_iters: Sinkhorn iterations (``--swav-iters``, 3; SEER 10).
        crops_for_assign: crops whose codes are computed (``--crops-for-assign``, (0, 1): the large crops).
        queue_length: global queue length (``--swav-queue-length``, 0 = none; SwAV 3840 for small batches);
            a multiple of the global batch.
        queue_start_epoch: first epoch that fills the queue (``--swav-queue-start``, 15).
        freeze_prototypes_iters: steps with frozen prototypes (``--freeze-prototypes-iters``, 313).
    """

    def __init__(self, backbone: nn.Module, dim: int = 128, hidden_dim: int = 2048, head_bn: bool = True,
                 n_prototypes: int = 3000, temperature: float = 0.1, epsilon: float = 0.05, sinkhorn_iters: int = 3,
                 crops_for_assign: Sequence[int] = (0, 1), queue_length: int = 0, queue_start_epoch: int = 15,
                 freeze_prototypes_iters: int = 313):
        super().__init__()
        if dim <= 0 or n_prototypes <= 0 or hidden_dim < 0:
            raise ValueError(f"need dim > 0, n_prototypes > 0, hidden_dim >= 0; got {dim}, {n_prototypes}, "
                             f"{hidden_dim}")
        if temperature <= 0 or epsilon <= 0 or sinkhorn_iters < 1:
            raise ValueError(f"need temperature > 0, epsilon > 0, sinkhorn_iters >= 1; got {temperature}, "
                             f"{epsilon}, {sinkhorn_iters}")
        crops_for_assign = tuple(int(c) for c in crops_for_assign)
        if not crops_for_assign or min(crops_for_assign) < 0 or len(set(crops_for_assign)) != len(crops_for_assign):
            raise ValueError(f"crops_for_assign must be distinct crop indices >= 0, got {crops_for_assign}")
        if queue_length < 0 or queue_start_epoch < 0 or freeze_prototypes_iters < 0:
            raise ValueError(f"queue_length, queue_start_epoch, freeze_prototypes_iters must be >= 0; got "
                             f"{queue_length}, {queue_start_epoch}, {freeze_prototypes_iters}")
        self.temperature, self.epsilon, self.sinkhorn_iters = temperature, epsilon, sinkhorn_iters
        self.crops_for_assign = crops_for_assign
        self.queue_length, self.queue_start_epoch = queue_length, queue_start_epoch
        self.freeze_prototypes_iters = freeze_prototypes_iters
        self.epoch = 0
        self.encoder_q = Encoder(backbone, swav_head(backbone.num_features, hidden_dim, dim, head_bn))
        self.prototypes = nn.Linear(dim, n_prototypes, bias=False)
        self.register_buffer("queue", torch.zeros(len(crops_for_assign), queue_length, dim))
        self.register_buffer("queue_count", torch.zeros((), dtype=torch.long))  # valid rows (<= queue_length)
        self.normalize_prototypes()

    supports_fsdp = True  # no parameter is touched outside forward / optimizer / the hooks

    # ------------------------------------------------------------------------------------- trainer hooks
    def check_batch(self, global_batch: int) -> None:
        if self.queue_length % global_batch:
            fit = max(global_batch, self.queue_length // global_batch * global_batch)
            raise ValueError(f"--swav-queue-length {self.queue_length} is not a multiple of the global batch size "
                             f"{global_batch}; use e.g. {fit}")

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def before_optimizer_step(self, step: int) -> None:
        """Drop the prototypes' gradient during the first ``freeze_prototypes_iters`` steps (SwAV)."""
        if step < self.freeze_prototypes_iters:
            self.prototypes.weight.grad = None

    def after_step(self, step: int = 0, total_steps: int = 0) -> None:
        self.normalize_prototypes()

    @torch.no_grad()
    def normalize_prototypes(self) -> None:
        """L2-normalise each prototype (row of ``prototypes.weight``) in place; works on FSDP2 row shards."""
        w = self.prototypes.weight
        local = w.to_local() if hasattr(w, "to_local") else w  # FSDP2 shards dim 0: whole rows per rank
        placements = getattr(w, "placements", None)
        if placements is not None and any(not (p.is_replicate() or (p.is_shard() and p.dim == 0))
                                          for p in placements):
            raise ValueError(f"prototypes must be replicated or sharded by rows, got placements {placements}")
        if local.numel():
            local.copy_(F.normalize(local, dim=1))

    # ------------------------------------------------------------------------------------------- forward
    @property
    def queue_in_use(self) -> bool:
        return self.queue_length > 0 and self.epoch >= self.queue_start_epoch

    def embed(self, views: Sequence[torch.Tensor]) -> torch.Tensor:
        """L2-normalised embeddings (V B, dim) of V crops (B, 3, H_v, W_v); one backbone call per size group."""
        feats = [self.encoder_q.backbone(torch.cat(list(views[a:b]))) for a, b in size_groups(views)]
        return F.normalize(self.encoder_q.head(torch.cat(feats)).float(), dim=1)

    @torch.no_grad()
    def _codes(self, scores: torch.Tensor, z: torch.Tensor, i: int) -> torch.Tensor:
        """Sinkhorn codes (B, K) for one assigned crop: its scores (B, K) and embeddings z (B, dim)."""
        b = scores.shape[0]
        s = scores.detach()
        if self.queue_in_use:
            world, rank = sdist.get_world_size(), sdist.get_rank()
            if int(self.queue_count) >= self.queue_length:  # used once full, as in SwAV
                part = self.queue_length // world
                mine = self.queue[i, rank * part:(rank + 1) * part]
                s = torch.cat([mine.to(z.dtype) @ self.prototypes.weight.to(z.dtype).T, s.to(z.dtype)])
            new = sdist.all_gather_cat(z.detach())  # newest first; older rows shift back
            n = new.shape[0]
            self.queue[i, n:] = self.queue[i, :-n].clone()
            self.queue[i, :n] = new.to(self.queue.dtype)
        return sinkhorn(s, self.epsilon, self.sinkhorn_iters)[-b:]

    def forward(self, views: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """views: V crops (B, 3, H_v, W_v), large first. Returns the loss and ``queue_used`` (0 or 1)."""
        n_crops = len(views)
        if n_crops < 2 or max(self.crops_for_assign) >= n_crops:
            raise ValueError(f"SwAV needs >= 2 crops and crops_for_assign {self.crops_for_assign} < {n_crops} "
                             "(check --nmb-crops / --crops-for-assign)")
        b = views[0].shape[0]
        z = self.embed(views)  # (V B, dim)
        scores = (z.to(self.prototypes.weight.dtype) @ self.prototypes.weight.T).float()  # (V B, K)
        used = float(self.queue_in_use and int(self.queue_count) >= self.queue_length)
        codes = [self._codes(scores[c * b:(c + 1) * b], z[c * b:(c + 1) * b], i)
                 for i, c in enumerate(self.crops_for_assign)]
        if self.queue_in_use:
            self.queue_count.fill_(min(int(self.queue_count) + b * sdist.get_world_size(), self.queue_length))
        loss = swav_loss(list(scores.split(b)), codes, self.temperature, self.crops_for_assign)
        emb = [z[c * b:(c + 1) * b].detach() for c in range(min(2, len(views)))]  # the large crops
        return {"loss": loss, "queue_used": torch.tensor(used), "emb": emb}
