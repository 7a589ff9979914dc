"""An ImageFolder decoded once into a uint8 tensor ``(N, 3, S, S)`` held in memory, cached on disk.

For small images (CIFAR at 32 px: 50k images = 150 MB) this removes decoding from every step; with
:mod:`smallssl.batch_aug` the whole data path becomes a few tensor ops per batch, in the training process,
and the CPU cores that DataLoader workers would take go to the model instead.

The cache file lives in ``cache_dir`` (never the dataset directory), named after the absolute root, the size
and the file list's fingerprint, and is written atomically; a changed dataset gets a new file.
"""

from __future__ import annotations

import hashlib
import os

import torch
from torchvision import transforms

from ..checkpoints.io import atomic_save
from .datasets import SafeImageFolder, _mix_seed
from .transforms import IMAGENET_MEAN, IMAGENET_STD


def _fingerprint(root: str, samples: list[tuple[str, int]], size: int) -> str:
    h = hashlib.sha1(f"{os.path.abspath(root)}|{size}|{len(samples)}".encode())
    for path, label in samples:
        h.update(f"{os.path.relpath(path, root)}:{label};".encode())
    return h.hexdigest()[:16]


def load_images(root: str, size: int, cache_dir: str | None = None, workers: int = 2,
                verbose: bool = True) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Decode ImageFolder ``root`` into ``(images uint8 (N, 3, size, size), labels int64 (N,), classes)``.

    Images are resized (shorter side) and centre-cropped to ``size``. An unreadable image raises
    :class:`smallssl.data.CorruptImageError` naming the file.
    """
    ds = SafeImageFolder(root, transforms.Compose([transforms.Resize(size), transforms.CenterCrop(size),
                                                   transforms.PILToTensor()]),
                         bad_image_hint="--batch-aug decodes every image up front and cannot skip one: remove or "
                                        "replace it (or drop --batch-aug and pass --skip-bad-images).")
    key = _fingerprint(root, ds.samples, size)
    path = os.path.join(cache_dir, f"images-{key}.pt") if cache_dir else None
    if path and os.path.exists(path):
        blob = torch.load(path, map_location="cpu", weights_only=True)
        return blob["images"], blob["labels"], list(ds.classes)
    # own generator: a loader without one draws its base seed from the global RNG, and a run that decoded
    # (cache miss) would then train differently from one that read the cache
    loader = torch.utils.data.DataLoader(ds, batch_size=500, num_workers=workers, shuffle=False,
                                         generator=torch.Generator().manual_seed(0))
    images = torch.empty(len(ds), 3, size, size, dtype=torch.uint8)
    labels = torch.empty(len(ds), dtype=torch.long)
    i = 0
    for x, y in loader:
        images[i:i + len(x)], labels[i:i + len(x)] = x, y
        i += len(x)
    if path:
        os.makedirs(cache_dir, exist_ok=True)
        atomic_save({"images": images, "labels": labels}, path)
        if verbose:
            print(f"=> decoded {len(ds)} images of {root} to {path}")
    return images, labels, list(ds.classes)


class BatchViews:
    """Batches of augmented views of in-memory images, in the order of a :class:`ResumableSampler`.

    Yields ``(views, targets, 0)`` like the DataLoader + ``collate_skip_bad`` path. The images of a batch go
    to ``device`` as uint8 and every view is augmented there by one :class:`BatchAugment` call, with a
    generator seeded by (seed, epoch, iteration, rank): a resumed run draws the same views.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, sampler, batch_size: int, augs: list,
                 seed: int = 0, rank: int = 0, device: torch.device | str = "cpu"):
        self.images, self.labels, self.sampler, self.batch_size = images, labels, sampler, batch_size
        self.augs, self.seed, self.rank, self.device = augs, seed, rank, torch.device(device)

    def __len__(self) -> int:
        return len(self.sampler) // self.batch_size

    @property
    def num_batches(self) -> int:
        """Steps of a full epoch (the sampler's)."""
        return self.sampler.num_batches

    def set_epoch(self, epoch: int, start_iter: int = 0) -> None:
        """Position the sampler (and so the views' seeds) at ``epoch``, iteration ``start_iter``."""
        self.sampler.set_epoch(epoch, start_iter)

    def __iter__(self):

        order = torch.tensor(list(self.sampler), dtype=torch.long)
        for j in range(len(order) // self.batch_size):
            it = self.sampler.start_iter + j
            idx = order[j * self.batch_size:(j + 1) * self.batch_size]
            g = torch.Generator(device=self.device).manual_seed(_mix_seed(self.seed, self.sampler.epoch, it, self.rank))
            x = self.images[idx].to(self.device, non_blocking=True)
            yield [aug(x, g) for aug in self.augs], self.labels[idx], 0


class NormalizedImages(torch.utils.data.Dataset):
    """``(normalised float image, label)`` pairs of in-memory uint8 images: the evaluation transform of
    :func:`smallssl.data.eval_transform` for images already at the evaluation size, without decoding."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor,
                 mean: tuple[float, ...] = IMAGENET_MEAN, std: tuple[float, ...] = IMAGENET_STD):
        self.images, self.labels = images, labels
        self.mean, self.std = torch.tensor(mean).view(3, 1, 1), torch.tensor(std).view(3, 1, 1)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        return (self.images[i].float() / 255.0 - self.mean) / self.std, int(self.labels[i])
