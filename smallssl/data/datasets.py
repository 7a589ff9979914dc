"""Datasets and samplers for pretraining.

* :class:`SafeImageFolder`: ImageFolder whose unreadable images raise an error naming the file, or are
  skipped (returned as ``None`` and counted by :func:`collate_skip_bad`).
* :class:`SeededViews`: per-sample augmentation seeded by ``(seed, epoch, index)`` so a run resumed in the
  middle of an epoch sees exactly the views it would have seen, whatever the number of workers.
* :class:`ResumableSampler`: a distributed sampler that can start at an iteration inside an epoch.
"""

from __future__ import annotations

import math
import os
import random
import sys
from collections.abc import Iterator
from typing import Callable

import torch
from PIL import Image, ImageFile
from torch.utils.data import Dataset, Sampler
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS


class CorruptImageError(RuntimeError):
    """An image file could not be decoded."""


def _pil_loader(path: str) -> Image.Image:
    with open(path, "rb") as f:
        img = Image.open(f)
        img.load()
        return img.convert("RGB")


class SafeImageFolder(ImageFolder):
    """ImageFolder with clear errors: a missing directory or an unreadable image names the path."""

    SKIP_HINT = "Remove or replace it, or pass --skip-bad-images to skip unreadable files."

    def __init__(self, root: str, transform: Callable | None = None, skip_bad: bool = False,
                 bad_image_hint: str = SKIP_HINT):
        if not os.path.isdir(root):
            raise FileNotFoundError(f"dataset directory {root!r} does not exist; expected an ImageFolder tree "
                                    f"{root}/<class>/<image>")
        try:
            super().__init__(root, transform=transform, loader=_pil_loader)
        except FileNotFoundError as e:
            raise FileNotFoundError(_no_images_message(root, e)) from e
        self.skip_bad, self.bad_image_hint = skip_bad, bad_image_hint

    def __getitem__(self, index: int):
        path, target = self.samples[index]
        try:
            img = self.loader(path)
        except (OSError, ValueError, Image.DecompressionBombError) as e:
            if self.skip_bad:
                print(f"=> warning: skipping unreadable image {path!r} ({type(e).__name__}: {e})", file=sys.stderr,
                      flush=True)
                return None
            raise CorruptImageError(f"cannot read image {path!r} ({type(e).__name__}: {e}). "
                                    f"{self.bad_image_hint}") from e
        if self.transform is not None:
            img = self.transform(img)
        return img, target


def _no_images_message(root: str, e: Exception) -> str:
    """Which class folders are empty (ImageFolder refuses a tree with any), or that the whole tree is."""
    classes = sorted(d.name for d in os.scandir(root) if d.is_dir())
    ext = tuple(x.lower() for x in IMG_EXTENSIONS)
    empty = [c for c in classes if not any(f.lower().endswith(ext) for _, _, files in os.walk(os.path.join(root, c))
                                          for f in files)]
    if classes and len(empty) < len(classes):
        shown = ", ".join(empty[:5]) + (f" (+{len(empty) - 5} more)" if len(empty) > 5 else "")
        return (f"class folder(s) {shown} under {root!r} hold no images (extensions {', '.join(IMG_EXTENSIONS)}); "
                f"every class folder needs at least one: remove the empty folder(s) or add their images")
    return f"no images found under {root!r} ({e}); expected {root}/<class>/<image>"


def collate_skip_bad(batch: list):
    """Collate the readable samples, refilling the batch to its size by repeating readable ones (a queue or
    a DDP all-gather needs a constant batch). Returns ``(views, targets, n_skipped)``."""
    good = [b for b in batch if b is not None]
    n_bad = len(batch) - len(good)
    if not good:
        raise CorruptImageError(f"every image of a batch of {len(batch)} was unreadable; check the dataset")
    good += [good[i % len(good)] for i in range(n_bad)]
    views, targets = torch.utils.data.default_collate(good)
    return views, targets, n_bad


def _mix_seed(*parts: int) -> int:
    h = 0x9E3779B97F4A7C15
    for p in parts:
        h = (h ^ (int(p) + 0x9E3779B97F4A7C15 + (h << 6) + (h >> 2))) & 0xFFFFFFFFFFFFFFFF
    return h % (2**63 - 1)


class SeededViews(Dataset):
    """Wrap a dataset so the random augmentation of sample ``i`` in epoch ``e`` depends only on (seed, e, i).

    The process RNG state is restored afterwards, so the main process (``num_workers=0``) is not perturbed.
    Call :meth:`set_epoch` before building each epoch's iterator (workers copy the dataset then).
    """

    def __init__(self, dataset: Dataset, seed: int = 0):
        self.dataset, self.seed, self.epoch = dataset, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        s = _mix_seed(self.seed, self.epoch, index)
        if torch.utils.data.get_worker_info() is not None:  # a loader worker: nothing to restore, skip the cost
            torch.manual_seed(s)
            random.seed(s)
            return self.dataset[index]
        py_state = random.getstate()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(s)
            random.seed(s)
            try:
                return self.dataset[index]
            finally:
                random.setstate(py_state)


class ResumableSampler(Sampler[int]):
    """Shuffled, rank-sharded, epoch-seeded sampler that can skip the first ``start_iter`` batches.

    Like DistributedSampler with ``drop_last=True`` at the batch level: every rank gets
    ``num_batches * batch_size`` indices, so all ranks run the same number of steps.
    """

    def __init__(self, n: int, batch_size: int, rank: int = 0, world_size: int = 1, seed: int = 0,
                 shuffle: bool = True):
        self.n, self.batch_size, self.rank, self.world_size = n, batch_size, rank, world_size
        self.seed, self.shuffle, self.epoch, self.start_iter = seed, shuffle, 0, 0
        self.num_batches = n // (batch_size * world_size)
        if self.num_batches == 0:
            raise ValueError(f"dataset of {n} images is smaller than one global batch "
                             f"({batch_size} x {world_size} processes); lower --batch-size")

    def set_epoch(self, epoch: int, start_iter: int = 0) -> None:
        self.epoch, self.start_iter = epoch, start_iter

    def __len__(self) -> int:
        return (self.num_batches - self.start_iter) * self.batch_size

    def __iter__(self) -> Iterator[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(_mix_seed(self.seed, self.epoch))
            order = torch.randperm(self.n, generator=g).tolist()
        else:
            order = list(range(self.n))
        per_rank = self.num_batches * self.batch_size
        mine = order[self.rank * per_rank:(self.rank + 1) * per_rank]
        return iter(mine[self.start_iter * self.batch_size:])


def fixed_subset(n: int, size: int | None, seed: int = 0) -> list[int] | None:
    """A seeded random subset of ``size`` indices out of ``n`` (None = all)."""
    if size is None or size >= n:
        return None
    if size <= 0:
        raise ValueError(f"subset size must be positive, got {size}")
    g = torch.Generator().manual_seed(seed)
    return sorted(torch.randperm(n, generator=g)[:size].tolist())


def steps_per_epoch(n: int, batch_size: int, world_size: int) -> int:
    return math.floor(n / (batch_size * world_size))


ImageFile.LOAD_TRUNCATED_IMAGES = False  # truncated files are errors, not silently grey images


class ViewLoader:
    """The PIL path with the interface of :class:`~smallssl.data.memdata.BatchViews`: ``set_epoch(epoch,
    start_iter)`` then iterate ``(views, targets, n_bad)`` batches of a :class:`SeededViews` dataset in the order
    of a :class:`ResumableSampler`, decoded and augmented in ``workers`` DataLoader processes."""

    def __init__(self, dataset: SeededViews, sampler: ResumableSampler, batch_size: int, workers: int = 0,
                 pin_memory: bool = False, seed: int = 0):
        self.dataset, self.sampler, self.batch_size = dataset, sampler, batch_size
        self.workers, self.pin_memory, self.seed, self.epoch = workers, pin_memory, seed, 0

    @property
    def num_batches(self) -> int:
        return self.sampler.num_batches

    def set_epoch(self, epoch: int, start_iter: int = 0) -> None:
        self.epoch = epoch
        self.sampler.set_epoch(epoch, start_iter)
        self.dataset.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.sampler) // self.batch_size

    def __iter__(self):
        return iter(torch.utils.data.DataLoader(
            self.dataset, batch_size=self.batch_size, sampler=self.sampler, num_workers=self.workers,
            collate_fn=collate_skip_bad, pin_memory=self.pin_memory, drop_last=True,
            # its own generator: the DataLoader's per-iterator base seed must not consume the global RNG, or a
            # resumed run would diverge from an uninterrupted one
            generator=torch.Generator().manual_seed(self.seed + self.epoch)))
