"""Reader of the static augmented sets written by ``python -m experiments.sample-augs``.

Layout (Shi et al. 2021, arXiv:2107.14762, ssl-small's static sets): ``DIR/<class>/<image>-0.jpeg`` is the
original image, ``<image>-1.jpeg`` and ``<image>-2.jpeg`` two augmented views (already cropped to the training
resolution). Masked variants
(ssl-small's ``--dataset-mode``) use other view numbers, see :data:`VIEW_SETS`.
"""

from __future__ import annotations

import os
from typing import Callable

import torchvision.transforms as T
from PIL import Image
from torch.utils.data import Dataset

from smallssl.data.transforms import IMAGENET_MEAN, IMAGENET_STD, eval_transform

VIEW_SETS = {"normal": (0, 1, 2), "g-mask": (0, 3, 4), "rand-g-mask": (0, 5, 6), "avg-mask": (0, 7, 8),
             "rand-avg-mask": (0, 9, 10)}
EXTS = (".jpeg", ".jpg", ".png")


class StaticViews(Dataset):
    """``([original, view_a, view_b], class_index)`` for every image stem, classes and stems sorted.

    The original gets the eval transform (resize + centre crop to ``image_size``); the views are resized
    and centre-cropped to ``image_size`` too (a no-op for views written at that size).
    ``per_class``: keep the first ``per_class`` stems of each class (ssl-small's ``-s``).
    """

    def __init__(self, root: str, image_size: int, mode: str = "normal", per_class: int | None = None):
        if mode not in VIEW_SETS:
            raise ValueError(f"mode must be one of {sorted(VIEW_SETS)}, got {mode!r}")
        if not os.path.isdir(root):
            raise ValueError(f"static augmented set {root!r} is not a directory")
        self.views = VIEW_SETS[mode]
        self.classes = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
        self.samples: list[tuple[list[str], int]] = []
        for ci, cls in enumerate(self.classes):
            files = {}
            for f in os.listdir(os.path.join(root, cls)):
                stem, ext = os.path.splitext(f)
                if ext.lower() in EXTS and "-" in stem:
                    name, view = stem.rsplit("-", 1)
                    files[(name, view)] = os.path.join(root, cls, f)
            names = sorted({n for n, v in files if v == "0"})[:per_class]
            for name in names:
                missing = [v for v in self.views if (name, str(v)) not in files]
                if missing:
                    raise ValueError(f"{cls}/{name}: views {missing} missing for mode {mode!r}")
                self.samples.append(([files[(name, str(v))] for v in self.views], ci))
        if not self.samples:
            raise ValueError(f"no '<image>-0.<ext>' files under {root!r}; was it written by sample-augs?")
        self.original_tf: Callable = eval_transform(image_size)
        self.view_tf: Callable = T.Compose([T.Resize(image_size), T.CenterCrop(image_size), T.ToTensor(),
                                            T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        paths, label = self.samples[i]
        images = []
        for n, p in enumerate(paths):
            with Image.open(p) as im:
                im = im.convert("RGB")  # greyscale originals become 3-channel
                images.append((self.original_tf if n == 0 else self.view_tf)(im))
        return images, label

    @property
    def targets(self) -> list[int]:
        return [label for _, label in self.samples]
