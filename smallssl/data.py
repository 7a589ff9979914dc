"""Datasets, augmentation presets and samplers for pretraining.

* :func:`pretrain_transform`: MoCo v1 augmentation by default, MoCo v2 (``aug_plus``), with ssl-small's
  strength knobs ``cj`` / ``grey_scale`` / ``gaussian_blur``.
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
from typing import Callable, Iterator, Sequence

import torch
import torchvision.transforms as T
from PIL import Image, ImageFile
from torch.utils.data import Dataset, Sampler
from torchvision.datasets import ImageFolder

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class CorruptImageError(RuntimeError):
    """An image file could not be decoded."""


# ------------------------------------------------------------------------------------------ transforms
def blur_kernel_size(image_size: int) -> int:
    """Odd Gaussian-blur kernel side, ~10% of the image side (as SimCLR)."""
    k = max(3, int(0.1 * image_size))  # ~10% of the side, as in SimCLR
    return k if k % 2 == 1 else k + 1


def jitter_params(aug_plus: bool = False, cj: float | None = None) -> tuple[tuple[float, ...], float]:
    """ColorJitter (brightness, contrast, saturation, hue) and the probability it is applied with: MoCo v1
    (0.4 x 4, always), MoCo v2 (0.4, 0.4, 0.4, 0.1; p 0.8) or ssl-small's ``cj=c`` (0.8c x 3, min(0.5, 0.4c); p 0.8)."""
    if cj is not None:
        return (0.8 * cj, 0.8 * cj, 0.8 * cj, min(0.5, 0.4 * cj)), 0.8
    if aug_plus:
        return (0.4, 0.4, 0.4, 0.1), 0.8
    return (0.4, 0.4, 0.4, 0.4), 1.0


def blur_prob(aug_plus: bool = False, gaussian_blur: float | None = None) -> float:
    """``gaussian_blur`` when given, else MoCo v2's 0.5 with ``aug_plus`` and none for v1."""
    return gaussian_blur if gaussian_blur is not None else (0.5 if aug_plus else 0.0)


def pretrain_transform(image_size: int = 224, aug_plus: bool = False, cj: float | None = None,
                       grey_scale: float | None = None, gaussian_blur: float | None = None,
                       min_scale: float = 0.2, max_scale: float = 1.0, solarize: float = 0.0) -> Callable:
    """One random view.

    - MoCo v1 (default): RandomResizedCrop(scale=(0.2, 1)), RandomGrayscale(0.2), ColorJitter(0.4 x 4), flip.
    - MoCo v2 (``aug_plus``): ColorJitter(0.4, 0.4, 0.4, 0.1) with p=0.8, RandomGrayscale(0.2),
      GaussianBlur(sigma in [0.1, 2]) with p=0.5, flip.
    - ssl-small knobs: ``cj=c`` sets ColorJitter(0.8c, 0.8c, 0.8c, min(0.5, 0.4c)) with p=0.8;
      ``grey_scale=p`` and ``gaussian_blur=p`` set those probabilities (blur applies with or without aug_plus).
    - ``solarize=p``: RandomSolarize(128, p) after the blur (BYOL's second view: 0.2).
    """
    for name, p in (("grey_scale", grey_scale), ("gaussian_blur", gaussian_blur), ("solarize", solarize)):
        if p is not None and not 0.0 <= p <= 1.0:
            raise ValueError(f"{name} is a probability in [0, 1], got {p}")
    if cj is not None and cj < 0:
        raise ValueError(f"cj (colour-jitter strength) must be >= 0, got {cj}")
    ops: list = [T.RandomResizedCrop(image_size, scale=(min_scale, max_scale))]
    jitter, jitter_p = jitter_params(aug_plus, cj)
    if aug_plus or cj is not None:
        ops += [T.RandomApply([T.ColorJitter(*jitter)], p=jitter_p),
                T.RandomGrayscale(p=0.2 if grey_scale is None else grey_scale)]
    else:
        ops += [T.RandomGrayscale(p=0.2 if grey_scale is None else grey_scale), T.ColorJitter(*jitter)]
    blur_p = blur_prob(aug_plus, gaussian_blur)
    if blur_p > 0:
        ops.append(T.RandomApply([T.GaussianBlur(blur_kernel_size(image_size), sigma=(0.1, 2.0))], p=blur_p))
    if solarize > 0:
        ops.append(T.RandomSolarize(128, p=solarize))
    ops += [T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    return T.Compose(ops)


def eval_transform(image_size: int = 224) -> Callable:
    """Resize (to 256/224 of the size for ImageNet-sized inputs) + centre crop + normalise."""
    resize = image_size if image_size <= 64 else int(round(image_size * 256 / 224))
    return T.Compose([T.Resize(resize), T.CenterCrop(image_size), T.ToTensor(),
                      T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


class MultiViewTransform:
    """Apply each transform of ``transforms`` to the image: ``[t(img) for t in transforms]``."""

    def __init__(self, transforms: Sequence[Callable]):
        self.transforms = list(transforms)

    def __call__(self, img):
        return [t(img) for t in self.transforms]


def two_crops(transform: Callable) -> MultiViewTransform:
    """MoCo's TwoCropsTransform: two independent views of one image."""
    return MultiViewTransform([transform, transform])


# -------------------------------------------------------------------------------------------- datasets
def _pil_loader(path: str) -> Image.Image:
    with open(path, "rb") as f:
        img = Image.open(f)
        img.load()
        return img.convert("RGB")


class SafeImageFolder(ImageFolder):
    """ImageFolder with clear errors: a missing directory or an unreadable image names the path."""

    def __init__(self, root: str, transform: Callable | None = None, skip_bad: bool = False):
        if not os.path.isdir(root):
            raise FileNotFoundError(f"dataset directory {root!r} does not exist; expected an ImageFolder tree "
                                    f"{root}/<class>/<image>")
        try:
            super().__init__(root, transform=transform, loader=_pil_loader)
        except FileNotFoundError as e:
            raise FileNotFoundError(f"no images found under {root!r} ({e}); expected {root}/<class>/<image>") from e
        self.skip_bad = skip_bad

    def __getitem__(self, index: int):
        path, target = self.samples[index]
        try:
            img = self.loader(path)
        except (OSError, ValueError, Image.DecompressionBombError) as e:
            if self.skip_bad:
                return None
            raise CorruptImageError(f"cannot read image {path!r} ({type(e).__name__}: {e}). Remove or replace "
                                    "it, or pass --skip-bad-images to skip unreadable files.") from e
        if self.transform is not None:
            img = self.transform(img)
        return img, target


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
