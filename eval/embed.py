"""Embed every image under a folder: ``python -m eval.embed IMAGES -a ARCH --pretrained CKPT --out emb``.

No labels are needed: the folder is walked recursively (sorted, so the order is reproducible) and every
file with an image extension is embedded with the eval transform (resize + centre crop + ImageNet
normalisation) by the backbone in eval mode. Files that cannot be decoded are listed and skipped. Writes

* ``emb.npy``: float32 (N, D) pooled backbone features, one row per embedded image, *not* normalised
  (:mod:`eval.similar` compares them by cosine similarity);
* ``emb.files.txt``: the N image paths, relative to IMAGES, one per line, in row order;
* ``emb.json``: arch, checkpoint, small_input, image size, transform, image normalisation, feature
  normalisation, the IMAGES root, and the skipped files with their errors.

The SEER model card names the use: finding similar images (``python -m eval.similar emb --query IMG``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from typing import Any, Callable

import numpy as np
import torch
import torch.nn as nn
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from eval import cli
from eval.features import build_model, device_for, resolve_image_size
from smallssl.backbones import default_small_input
from smallssl.data.transforms import IMAGENET_MEAN, IMAGENET_STD, eval_transform
from smallssl.errors import run_cli

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")


def list_images(root: str) -> list[str]:
    """Paths (relative to ``root``) of every file with an image extension under ``root``, recursively, sorted."""
    if not os.path.isdir(root):
        raise FileNotFoundError(f"images {root!r}: no such directory. Pass a folder of images (searched recursively)")
    found = []
    for dirpath, dirnames, files in os.walk(root):
        dirnames.sort()
        found += [os.path.relpath(os.path.join(dirpath, f), root) for f in sorted(files)
                  if f.lower().endswith(IMAGE_EXTS) and "\n" not in f]
    return found


class ImageFiles(Dataset):
    """``(image (3, S, S), index, error)`` per file; an unreadable file gives a zero image and its error text
    (an empty error means the image was read), so a bad file never stops a worker."""

    def __init__(self, root: str, files: Sequence[str], transform: Callable, image_size: int):
        self.root, self.files, self.transform, self.size = root, list(files), transform, image_size

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        try:
            with Image.open(os.path.join(self.root, self.files[i])) as im:
                return self.transform(im.convert("RGB")), i, ""
        except Exception as e:  # noqa: BLE001 - any decoder error means "unreadable": list it and go on
            return torch.zeros(3, self.size, self.size), i, f"{type(e).__name__}: {e}"


def _progress(iterable, total: int, enabled: bool):
    if not enabled:
        return iterable
    try:
        from tqdm import tqdm
    except ImportError:
        return iterable
    return tqdm(iterable, total=total, unit="batch", desc="embed", dynamic_ncols=True, file=sys.stderr)


@torch.no_grad()
def embed_images(model: nn.Module, root: str, files: Sequence[str], image_size: int, batch_size: int = 256,
                 workers: int = 0, device: torch.device | str = "cpu",
                 progress: bool = False) -> tuple[torch.Tensor, list[str], list[tuple[str, str]]]:
    """Embed ``root/<file>`` for each file with the eval transform at ``image_size``.

    Returns features (N_ok, D) float32 on CPU, the N_ok embedded files (input order), and the skipped
    ``(file, error)`` pairs.
    """
    ds = ImageFiles(root, files, eval_transform(image_size), image_size)
    loader = DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=workers)
    model.eval()
    feats, kept, skipped = [], [], []
    for images, idx, errors in _progress(loader, len(loader), progress):
        ok = torch.tensor([not e for e in errors], dtype=torch.bool)
        skipped += [(ds.files[int(i)], e) for i, e in zip(idx, errors) if e]
        if ok.any():
            feats.append(model(images[ok].to(device, non_blocking=True)).float().cpu())
            kept += [ds.files[int(i)] for i in idx[ok]]
    width = getattr(model, "num_features", 0)
    return (torch.cat(feats) if feats else torch.zeros(0, width)), kept, skipped


def output_paths(prefix: str) -> dict[str, str]:
    """``<prefix>.npy``, ``<prefix>.files.txt``, ``<prefix>.json`` (a trailing ``.npy`` on the prefix is dropped)."""
    prefix = prefix[:-4] if prefix.endswith(".npy") else prefix
    return {"npy": f"{prefix}.npy", "files": f"{prefix}.files.txt", "json": f"{prefix}.json"}


def save_embeddings(prefix: str, feats: torch.Tensor, files: Sequence[str], meta: dict[str, Any]) -> dict[str, str]:
    """Write the three files of :func:`output_paths` (each atomically: temp file + rename)."""
    paths = output_paths(prefix)
    os.makedirs(os.path.dirname(os.path.abspath(paths["npy"])), exist_ok=True)
    tmp = {k: f"{p}.tmp{os.getpid()}" for k, p in paths.items()}
    with open(tmp["npy"], "wb") as f:
        np.save(f, feats.numpy().astype(np.float32))
    with open(tmp["files"], "w") as f:
        f.writelines(f"{p}\n" for p in files)
    with open(tmp["json"], "w") as f:
        json.dump(meta, f, indent=1)
    for k in paths:
        os.replace(tmp[k], paths[k])
    return paths


def load_embeddings(prefix: str) -> tuple[np.ndarray, list[str], dict[str, Any]]:
    """(features (N, D) float32, N relative paths, metadata) written by :func:`save_embeddings`."""
    paths = output_paths(prefix)
    for p in paths.values():
        if not os.path.isfile(p):
            raise FileNotFoundError(f"embeddings {prefix!r}: {p} is missing. Write them with "
                                    "python -m eval.embed IMAGES --out PREFIX")
    emb = np.load(paths["npy"])
    with open(paths["files"]) as f:
        files = f.read().splitlines()
    with open(paths["json"]) as f:
        meta = json.load(f)
    if emb.ndim != 2 or emb.shape[0] != len(files):
        raise ValueError(f"embeddings {prefix!r}: {emb.shape[0]} rows but {len(files)} files. Rewrite them with "
                         "python -m eval.embed")
    return emb, files, meta


def get_args_parser() -> cli.ArgumentParser:
    p = cli.ArgumentParser("python -m eval.embed", description="embed every image under a folder (recursively)")
    p.add_argument("images", metavar="IMAGES", help="folder of images (searched recursively; no labels needed)")
    p.add_argument("-a", "--arch", default="resnet18", help="backbone name (smallssl registry or timm)")
    p.add_argument("--pretrained", default="", help="checkpoint; empty = random init")
    p.add_argument("--out", required=True, help="output prefix: writes PREFIX.npy, PREFIX.files.txt, PREFIX.json")
    p.add_argument("-b", "--batch-size", default=256, type=cli.positive_int)
    p.add_argument("-j", "--workers", default=min(8, os.cpu_count() or 1), type=int, help="data loading workers")
    p.add_argument("--image-size", default=None, type=cli.positive_int,
                   help="eval resolution (default: native size for images <= 64 px, else 224)")
    p.add_argument("--small-input", default=None, action=argparse.BooleanOptionalAction,
                   help="CIFAR stem (default: on when image size <= 64)")
    p.add_argument("--seed", default=0, type=int, help="seed of a random-init backbone")
    p.add_argument("--gpu", default=None, type=int, help="CUDA device index (default: cuda:0 if available)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = get_args_parser().parse_args(argv)
    root = os.path.abspath(args.images)
    files = list_images(root)
    if not files:
        raise ValueError(f"images {args.images!r}: no file with an image extension ({', '.join(IMAGE_EXTS)}) under "
                         "it. Check the path")
    size = resolve_image_size(args.image_size, root)
    small_input = default_small_input(size) if args.small_input is None else args.small_input
    device = device_for(args.gpu)
    model = build_model(args.arch, args.pretrained, small_input, size, args.seed).to(device)
    print(f"=> embedding {len(files)} images under {root} at {size} px on {device}", flush=True)
    t0 = time.time()
    feats, kept, skipped = embed_images(model, root, files, size, args.batch_size, args.workers, device,
                                        progress=not args.no_progress)
    seconds = time.time() - t0
    for f, e in skipped:
        print(f"   skipped unreadable {f}: {e}")
    if not kept:
        raise ValueError(f"images {args.images!r}: none of the {len(files)} files could be read. Check the files")
    meta = {"arch": args.arch, "checkpoint": os.path.abspath(args.pretrained) if args.pretrained else None,
            "random_init_seed": None if args.pretrained else args.seed, "small_input": small_input,
            "image_size": size, "transform": repr(eval_transform(size)),
            "image_normalisation": {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)},
            "feature_normalisation": "none (raw pooled backbone features; eval.similar uses cosine similarity)",
            "root": root, "num_images": len(kept), "dim": int(feats.shape[1]),
            "skipped": [{"file": f, "error": e} for f, e in skipped], "seconds": round(seconds, 2)}
    paths = save_embeddings(args.out, feats, kept, meta)
    print(f"=> {len(kept)} embeddings ({feats.shape[1]}-d, {len(skipped)} unreadable files skipped) in {seconds:.1f}s "
          f"({len(files) / max(seconds, 1e-9):.0f} images/s) -> {paths['npy']}, {paths['files']}, {paths['json']}")
    return {"num_images": len(kept), "skipped": len(skipped), "dim": int(feats.shape[1]), "seconds": seconds,
            **paths}


if __name__ == "__main__":
    sys.exit(run_cli(main))
