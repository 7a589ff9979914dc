"""Online kNN: the DINO-protocol kNN accuracy of the encoder being trained, every few epochs, inside training.

``main_moco.py --knn-every E`` builds one :class:`OnlineKNN` and calls :meth:`OnlineKNN.evaluate` on the query
encoder's backbone. Labelled images (``DATA/train`` for the bank and ``DATA/val`` for the queries, or
``--knn-data``) are decoded once into memory at the training resolution (resize of the shorter side + centre
crop, ImageNet normalisation: the evaluation transform for images already that small), subsampled to the first
``bank_per_class`` / ``val_per_class`` images of each class. Under DDP every rank embeds its contiguous shard of
the bank and all the queries, and :func:`eval.knn.knn_eval_sharded` merges the per-rank top-k: no rank holds the
whole bank. The evaluation leaves training untouched: the backbone runs in eval mode (BatchNorm statistics are
not updated), without gradients, and every random generator is restored afterwards, so a resumed run stays
bit-identical to an uninterrupted one.
"""

from __future__ import annotations

import os
import time

import torch
import torch.nn as nn

from eval.features import shard_bounds, subsample_per_class
from eval.knn import knn_eval_sharded
from smallssl import dist as sdist
from smallssl.data.memdata import load_images
from smallssl.data.transforms import IMAGENET_MEAN, IMAGENET_STD


class OnlineKNN:
    """DINO kNN (cosine, k neighbours, temperature ``T``, weighted vote) of a backbone on fixed labelled images.

    Args:
        data_dir: an ImageFolder root with ``train/`` (the bank) and ``val/`` (the queries).
        image_size: the side images are decoded at (the training ``--image-size``).
        bank_per_class / val_per_class: the first N images of each class (None: all).
        k, T: DINO's kNN hyperparameters (20, 0.07).
        batch_size: images per forward pass.
        device: where the images are embedded.
        cache_dir: where the decoded images are cached (see :func:`smallssl.data.memdata.load_images`).
    """

    def __init__(self, data_dir: str, image_size: int, bank_per_class: int | None = None,
                 val_per_class: int | None = None, k: int = 20, T: float = 0.07, batch_size: int = 256,
                 device: torch.device | str = "cpu", cache_dir: str | None = None, workers: int = 2,
                 verbose: bool = True):
        for split in ("train", "val"):
            if not os.path.isdir(os.path.join(data_dir, split)):
                raise FileNotFoundError(f"online kNN needs {os.path.join(data_dir, split)!r}: pass --knn-data DIR "
                                        "with train/ and val/ ImageFolder trees (or drop --knn-every)")
        if k < 1 or T <= 0:
            raise ValueError(f"online kNN needs k >= 1 and T > 0, got k={k}, T={T}")
        self.k, self.T, self.batch_size, self.device = k, T, batch_size, torch.device(device)
        bank, bank_y, _ = load_images(os.path.join(data_dir, "train"), image_size, cache_dir=cache_dir,
                                      workers=workers, verbose=verbose)
        val, val_y, _ = load_images(os.path.join(data_dir, "val"), image_size, cache_dir=cache_dir, workers=workers,
                                    verbose=verbose)
        keep = subsample_per_class(bank_y.tolist(), bank_per_class)
        start, stop = shard_bounds(len(keep), sdist.get_rank(), sdist.get_world_size())
        self.bank_offset = start  # this rank's rows [start, stop) of the (subsampled) bank
        self.bank, self.bank_y = bank[keep[start:stop]], bank_y[keep[start:stop]]
        qkeep = subsample_per_class(val_y.tolist(), val_per_class)
        self.val, self.val_y = val[qkeep], val_y[qkeep]
        self.num_classes = int(max(bank_y.max(), val_y.max())) + 1
        self.bank_size = len(keep)
        self._mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
        self._std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)

    @torch.no_grad()
    def _embed(self, backbone: nn.Module, images: torch.Tensor) -> torch.Tensor:
        out = []
        mean, std = self._mean.to(self.device), self._std.to(self.device)
        for i in range(0, len(images), self.batch_size):
            x = images[i:i + self.batch_size].to(self.device).float().div_(255.0).sub_(mean).div_(std)
            out.append(backbone(x).float())
        if not out:
            return torch.empty(0, 0, device=self.device)
        return torch.cat(out)

    def evaluate(self, backbone: nn.Module) -> dict[str, float]:
        """Collective under DDP (every rank calls it at the same step). Returns ``knn_top1``, ``knn_top5``,
        ``knn_k`` (the k used), ``knn_bank`` / ``knn_queries`` (sizes) and ``knn_time_s``."""
        t0 = time.time()
        was_training = backbone.training
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            backbone.eval()
            try:
                bank = self._embed(backbone, self.bank)
                queries = self._embed(backbone, self.val)
            finally:
                backbone.train(was_training)
        if bank.numel() == 0:  # a rank with an empty shard still takes part in the merge
            bank = torch.empty(0, queries.shape[1], device=self.device)
        res = knn_eval_sharded(bank, self.bank_y, self.bank_offset, queries, self.val_y, k=self.k, T=self.T,
                               num_classes=self.num_classes, protocol="dino")
        return {"knn_top1": res["top1"], "knn_top5": res["top5"], "knn_k": res["k"],
                "knn_bank": float(self.bank_size), "knn_queries": float(len(self.val)),
                "knn_time_s": time.time() - t0}
