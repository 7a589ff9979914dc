"""Write a static augmented set (Shi et al. 2021, arXiv:2107.14762): originals plus two augmented views.

``python -m experiments.sample-augs SRC DST --aug=moco --images-per-class=50 [-j 4] [--seed 0]``

For the first ``images-per-class`` images (sorted by name) of every class folder of ``SRC`` it writes
``DST/<class>/<name>-0.jpeg`` (the original, re-encoded), ``<name>-1.jpeg`` and ``<name>-2.jpeg`` (two
views of the augmentation), and ``DST/manifest.json`` listing every file written and the settings.
Each image's views come from its own seed ``hash(seed, class, name)``, so the output is identical for
any ``-j`` and across runs (ssl-small used unseeded global RNGs and unsorted ``os.listdir``).

Augmentations (PIL in, PIL out; no normalisation): ``moco`` = MoCo v2 as in ssl-small's sample-augs:
RandomResizedCrop(size, scale=(0.2, 1)), ColorJitter(0.4, 0.4, 0.4, 0.1) with p=0.8, RandomGrayscale(0.2),
GaussianBlur(sigma in [0.1, 2]) with p=0.5, horizontal flip. ``moco-v1``: RandomResizedCrop(0.2, 1),
RandomGrayscale(0.2), ColorJitter(0.4, 0.4, 0.4, 0.4), flip.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from multiprocessing import get_all_start_methods, get_context
from typing import Callable

import torch
import torchvision.transforms as T
from PIL import Image

from smallssl.errors import run_cli

AUGS = ("moco", "moco-v1")
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm", ".tif", ".tiff")


def build_augmentation(name: str, size: int) -> Callable[[Image.Image], Image.Image]:
    """PIL -> PIL augmentation ``name`` at output side ``size``."""
    if name == "moco":
        blur_kernel = max(3, int(0.1 * size)) | 1  # odd, ~10% of the side as in SimCLR
        return T.Compose([T.RandomResizedCrop(size, scale=(0.2, 1.0)),
                          T.RandomApply([T.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
                          T.RandomGrayscale(p=0.2),
                          T.RandomApply([T.GaussianBlur(blur_kernel, sigma=(0.1, 2.0))], p=0.5),
                          T.RandomHorizontalFlip()])
    if name == "moco-v1":
        return T.Compose([T.RandomResizedCrop(size, scale=(0.2, 1.0)), T.RandomGrayscale(p=0.2),
                          T.ColorJitter(0.4, 0.4, 0.4, 0.4), T.RandomHorizontalFlip()])
    raise ValueError(f"aug must be one of {AUGS}, got {name!r}")


def image_seed(seed: int, cls: str, name: str) -> int:
    """A 63-bit seed from (seed, class, image name): independent of worker count and order."""
    return int.from_bytes(hashlib.sha256(f"{seed}/{cls}/{name}".encode()).digest()[:8], "little") >> 1


def list_tasks(src: str, images_per_class: int | None) -> list[tuple[str, str]]:
    """(class, image path) for the first ``images_per_class`` images of each sorted class folder."""
    classes = sorted(d for d in os.listdir(src) if os.path.isdir(os.path.join(src, d)))
    if not classes:
        raise ValueError(f"{src!r} has no class folders (expected SRC/<class>/<image>)")
    tasks = []
    for cls in classes:
        files = sorted(f for f in os.listdir(os.path.join(src, cls)) if f.lower().endswith(IMAGE_EXTS))
        tasks += [(cls, os.path.join(src, cls, f)) for f in files[:images_per_class]]
    return tasks


def _process(task: tuple[str, str, str, str, int, int, int]) -> dict:
    cls, path, dst, aug, size, seed, quality = task
    torch.set_num_threads(1)
    name = os.path.splitext(os.path.basename(path))[0]
    with Image.open(path) as im:
        image = im.convert("RGB")
    side = size or (max(image.size) if max(image.size) <= 64 else 224)
    transform = build_augmentation(aug, side)
    torch.manual_seed(image_seed(seed, cls, name))  # torchvision transforms draw from torch's RNG
    out_dir = os.path.join(dst, cls)
    outputs = []
    for view, img in enumerate([image, transform(image), transform(image)]):
        out = os.path.join(out_dir, f"{name}-{view}.jpeg")
        img.save(out, format="JPEG", quality=quality)
        outputs.append(os.path.relpath(out, dst))
    return {"class": cls, "source": path, "outputs": outputs}


def sample_augs(src: str, dst: str, aug: str = "moco", images_per_class: int | None = 50, seed: int = 0,
                workers: int = 1, size: int | None = None, quality: int = 95) -> dict:
    """Write the static set and its manifest; returns the manifest dict."""
    build_augmentation(aug, 32)  # validate the name before any work
    tasks = list_tasks(src, images_per_class)
    for cls in sorted({c for c, _ in tasks}):
        os.makedirs(os.path.join(dst, cls), exist_ok=True)
    jobs = [(c, p, dst, aug, size or 0, seed, quality) for c, p in tasks]
    if workers > 1:
        # fork is fast and safe here (workers only run PIL + torchvision CPU ops); spawn elsewhere.
        method = "fork" if "fork" in get_all_start_methods() else "spawn"
        with get_context(method).Pool(workers) as pool:
            records = pool.map(_process, jobs, chunksize=max(1, len(jobs) // (4 * workers)))
    else:
        records = [_process(j) for j in jobs]
    manifest = {"src": os.path.abspath(src), "aug": aug, "images_per_class": images_per_class, "seed": seed,
                "size": size or "native if <= 64 px else 224", "jpeg_quality": quality,
                "views": {"0": "original", "1": "augmented view 1", "2": "augmented view 2"},
                "num_classes": len({r["class"] for r in records}), "num_images": len(records), "files": records}
    with open(os.path.join(dst, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=1)
    return manifest


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser("python -m experiments.sample-augs", description=__doc__.split("\n")[0])
    p.add_argument("data", metavar="SRC", help="class folders of images (e.g. imagenet/train)")
    p.add_argument("savedir", metavar="DST", help="output directory")
    p.add_argument("--aug", default="moco", choices=AUGS)
    p.add_argument("--images-per-class", default=50, type=int)
    p.add_argument("--seed", default=0, type=int)
    p.add_argument("-j", "--workers", default=1, type=int)
    p.add_argument("--size", default=None, type=int, help="view side (default: native if <= 64 px, else 224)")
    p.add_argument("--quality", default=95, type=int, help="JPEG quality")
    args = p.parse_args(argv)
    m = sample_augs(args.data, args.savedir, args.aug, args.images_per_class, args.seed, args.workers,
                    args.size, args.quality)
    print(f"=> wrote {m['num_images']} images x 3 files over {m['num_classes']} classes to {args.savedir} "
          f"(aug={args.aug}, seed={args.seed}); manifest: {os.path.join(args.savedir, 'manifest.json')}")
    return m


if __name__ == "__main__":
    sys.exit(run_cli(main))
