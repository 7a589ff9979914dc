"""MoCo v1/v2 (He et al., CVPR 2020, arXiv:1911.05722; Chen et al., arXiv:2003.04297) and the ssl-small
"improved baseline" for small students (Shi et al., arXiv:2107.14762: wide head, T=0.1, stronger aug).

Per step, for two views ``x_q, x_k`` of a batch of B images:

1. momentum update of the key encoder (before its forward): ``theta_k <- m theta_k + (1 - m) theta_q``;
2. ``q = normalize(f_q(x_q))`` (B, dim); ``k = normalize(f_k(x_k))`` (B, dim) with shuffle-BN;
3. loss = InfoNCE over logits ``[q.k, q queue^T] / T`` with the positive at index 0 (``kernels.info_nce``);
4. the all-gathered keys of every rank replace the oldest ``world * B`` entries of the queue.

The queue starts as K random unit vectors, as in the official code (``queue_init="random"``); a long run
forgets them, but for the first K / (keys per step) steps every negative is random, so the loss only pulls each
query towards its key and the embeddings contract (measured at short budgets, see the README).
``queue_init="empty"`` starts from zero rows and uses only the rows keys have been written to.

Shuffle-BN: under DDP the keys are computed on a batch shuffled across ranks (as in the official code); in
one process it is emulated by running the key encoder on ``shuffle_bn_splits`` random sub-batches and the
query encoder on the same number of sub-batches in order (SplitBatchNorm), so a key's BN statistics share only
about 1/S of their images with its query's (S = ``shuffle_bn_splits``: half at S=2, all at S=1 (no emulation);
an eighth in the official 8-GPU shuffle), and each BN batch is B/S images.

Symmetric loss (``symmetric=True``, ``--moco-symmetric``; the loss of MoCo's official CIFAR-10 demo): each
view is both query and key, ``loss = InfoNCE(q1, k2) + InfoNCE(q2, k1)`` (the sum, as in the demo: twice the
mean's gradient) against the same queue, and both views' keys are enqueued in one block, the same set as the
demo's (K must be a multiple of twice the global batch). MoCo v3 also sums both directions, but against
in-batch keys (no queue) and scaled by 2T; that is not what this computes. ~1.7x the compute per step; at short
budgets it learns faster per second.

The queue is stored as (K, dim) (rows are keys, the layout the fused kernel reads); checkpoints of the
official (dim, K) layout are transposed on load.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import dist as sdist
from ..heads import Encoder, build_head
from ..losses import info_nce
from ..momentum import ema_update_, frozen_copy
from ..queue import check_queue_batch, enqueue_keys
from .base import SSLMethod

QUEUE_INITS = ("random", "empty")


def _recheck_queue(module: nn.Module, incompatible_keys) -> None:
    """A loaded queue may be partly empty even if this model's was full: decide again at the next step."""
    module._queue_full = False


class MoCo(SSLMethod):
    """MoCo with a queue of negatives and a momentum key encoder.

    Args:
        backbone: pooled-feature backbone with ``.num_features``.
        dim: embedding size (``--moco-dim``, 128).
        K: queue length (``--moco-k``, 65536); must be a multiple of the global batch.
        m: key-encoder momentum (``--moco-m``, 0.999).
        T: softmax temperature (``--moco-t``, 0.07; 0.2 for MoCo v2, 0.1 for the improved baseline).
        mlp: head kind, see :mod:`smallssl.heads` (``none`` = MoCo v1, ``v2`` = MoCo v2, ``wide`` = ssl-small).
        shuffle_bn_splits: sub-batches that emulate shuffle-BN in a single process (1 = off).
        symmetric: both views serve as query and key (see the module docstring).
    """

    collapse_hint = ("For MoCo at short budgets: start from an empty queue (--moco-queue-init empty) and slow the key "
                     "encoder (--moco-m 0.99); a high acc1 with acc1_batch near chance (100/batch) means the pretext "
                     "task is solved by telling this step's keys from the queue's, not images apart")

    def __init__(self, backbone: nn.Module, dim: int = 128, K: int = 65536, m: float = 0.999, T: float = 0.07,
                 mlp: str = "none", shuffle_bn_splits: int = 2, symmetric: bool = False, queue_init: str = "random"):
        super().__init__()
        if K <= 0 or dim <= 0:
            raise ValueError(f"queue size K and dim must be positive, got K={K}, dim={dim}")
        if not 0.0 <= m < 1.0:
            raise ValueError(f"momentum m must be in [0, 1), got {m}")
        if T <= 0:
            raise ValueError(f"temperature T must be > 0, got {T}")
        if shuffle_bn_splits < 1:
            raise ValueError(f"shuffle_bn_splits must be >= 1, got {shuffle_bn_splits}")
        if queue_init not in QUEUE_INITS:
            raise ValueError(f"queue_init must be one of {', '.join(QUEUE_INITS)}, got {queue_init!r}")
        self.K, self.m, self.T, self.shuffle_bn_splits, self.symmetric = K, m, T, shuffle_bn_splits, symmetric
        self.encoder_q = Encoder(backbone, build_head(mlp, backbone.num_features, dim))
        self.encoder_k = frozen_copy(self.encoder_q)
        # random: unit vectors, as the official code (a long run forgets them); empty: zero rows, which the loss
        # leaves out until keys have been written there (see negatives())
        self.register_buffer("queue", F.normalize(torch.randn(K, dim), dim=1) if queue_init == "random"
                             else torch.zeros(K, dim))
        self._queue_full = False  # decided from the buffer at the next step, also after load_state_dict
        self.register_load_state_dict_post_hook(_recheck_queue)
        self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))

    def check_batch(self, global_batch: int) -> None:
        check_queue_batch(self.K, global_batch * (2 if self.symmetric else 1), "--moco-k")

    @torch.no_grad()
    def momentum_update(self) -> None:
        ema_update_(self.encoder_k, self.encoder_q, self.m)  # key encoder keeps its own BN statistics

    @torch.no_grad()
    def copy_query_to_key(self) -> None:
        self.encoder_k.load_state_dict(self.encoder_q.state_dict())

    def enqueue(self, keys: torch.Tensor) -> None:
        """Write ``keys`` (N, dim) at the queue pointer and advance it (mod K)."""
        enqueue_keys(self.queue, self.queue_ptr, keys)

    @torch.no_grad()
    def negatives(self) -> torch.Tensor:
        """A copy of the queue rows the loss uses (the enqueue after the loss must not change what it saw): all K,
        or, while an ``empty``-initialised queue is filling, only the rows keys were written to (a key is a unit
        vector, an unwritten row is exactly zero), so no step trains against random vectors."""
        if not self._queue_full:
            written = self.queue.ne(0).any(1)
            if bool(written.all()):
                self._queue_full = True
            else:
                return self.queue[written].clone()
        return self.queue.clone().detach()

    def _loss(self, q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if queue.shape[0] == 0:  # the first step of an empty queue: no negatives, nothing to learn
            return (q * k).sum() * 0.0, q.new_tensor(100.0)
        return info_nce(q, k, queue, self.T, return_accuracy=True)

    def _split_forward(self, enc: nn.Module, x: torch.Tensor, order: torch.Tensor | None) -> torch.Tensor:
        """Forward ``x`` in ``shuffle_bn_splits`` sub-batches (after permuting by ``order``), undo the order."""
        if order is not None:
            x = x[order]
        outs = [enc(c) for c in x.chunk(self.shuffle_bn_splits)] if self.shuffle_bn_splits > 1 else [enc(x)]
        out = torch.cat(outs)
        if order is not None:
            out = out[torch.argsort(order)]
        return out

    @torch.no_grad()
    def _keys(self, x_k: torch.Tensor) -> torch.Tensor:
        if sdist.get_world_size() > 1:
            # Shuffle the global batch across ranks (broadcast permutation from rank 0), forward, unshuffle.
            b = x_k.shape[0]
            world, rank = sdist.get_world_size(), sdist.get_rank()
            x_all = sdist.all_gather_cat(x_k)
            perm = sdist.broadcast(torch.randperm(x_all.shape[0], device=x_k.device), 0)
            k = self.encoder_k(x_all[perm[rank * b:(rank + 1) * b]])
            k_all = sdist.all_gather_cat(F.normalize(k, dim=1))
            k_all = k_all[torch.argsort(perm)]
            assert k_all.shape[0] == b * world
            return k_all[rank * b:(rank + 1) * b]
        order = torch.randperm(x_k.shape[0], device=x_k.device) if self.shuffle_bn_splits > 1 else None
        return F.normalize(self._split_forward(self.encoder_k, x_k, order), dim=1)

    def _queries(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised queries (B, dim) and the backbone features (B, D), in ``shuffle_bn_splits`` sub-batches."""
        splits = self.shuffle_bn_splits if sdist.get_world_size() == 1 else 1
        q, f = zip(*[self.encoder_q.embed(c) for c in (x.chunk(splits) if splits > 1 else [x])])
        return F.normalize(torch.cat(q).float(), dim=1), torch.cat(f)

    def forward(self, views: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """views: [x_q, x_k], each (B, 3, H, W). Returns loss and pretext top-1 (%)."""
        x_q, x_k = views[0], views[1]
        q, feat = self._queries(x_q)
        q2 = self._queries(x_k)[0] if self.symmetric else None
        with torch.no_grad():
            self.momentum_update()
            k = self._keys(x_k).float()
            k2 = self._keys(x_q).float() if self.symmetric else None
        queue = self.negatives()
        loss, acc1 = self._loss(q, k, queue)
        acc_batch = batch_top1(q.detach(), k)
        if self.symmetric:
            loss2, acc2 = self._loss(q2, k2, queue)
            acc_batch = 0.5 * (acc_batch + batch_top1(q2.detach(), k2))
            # MoCo's CIFAR-10 demo: the sum of both directions (not their mean). Both views' keys enter (and later
            # leave) the queue in the same step, so the queue holds the same set of keys as the demo's
            # cat([k1, k2]); the order inside the block only changes float summation order, and is kept as the
            # `make demo` recipe was measured with (view 2's keys first) so its figures reproduce bit for bit.
            loss, acc1 = loss + loss2, 0.5 * (acc1 + acc2)
            k = torch.cat([k, k2])
        self.enqueue(sdist.all_gather_cat(k))
        emb = [q.detach()] + ([q2.detach()] if self.symmetric else [])
        return {"loss": loss, "acc1": acc1, "acc1_batch": acc_batch, "emb": emb, "feat": feat.detach()}


@torch.no_grad()
def batch_top1(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Top-1 (%) of each query's own key among the batch's keys (B, dim) x (B, dim), no queue: a diagnostic.

    The loss ranks the positive against the *queue*, keys of earlier steps made by an earlier key encoder. When
    ``acc1`` is high but this is near chance (100/B), the pretext task is solved by telling this step's keys from
    older ones (a stale queue: fast key encoder, high lr), not one image from another, and nothing stops the
    embeddings of one batch from collapsing together."""
    target = torch.arange(q.shape[0], device=q.device)
    return (q.float() @ k.float().T).argmax(1).eq(target).float().mean() * 100
