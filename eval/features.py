"""Feature extraction shared by every eval: build a backbone, load a checkpoint, embed a dataset (cached, sharded).

Library functions only (tensors and paths in, no argparse): :mod:`eval.cli` turns command-line flags into
these calls.

* :func:`build_model`: ``create_backbone(arch, small_input)`` + :func:`smallssl.checkpoints.load_backbone`
  (prints the loaded / missing report; a checkpoint that does not fit raises ``CheckpointMismatchError``).
  No checkpoint = random init from ``seed``: one network serves train and test features.
* :func:`extract_features`: model in **eval mode** (BN running statistics: ImageFolder yields samples in
  class order, so train-mode BN would normalise each batch by one class's statistics), no grad,
  optional sharding over ``torch.distributed`` ranks, results in dataset order on every rank.
* :func:`extract_shard`: this rank's contiguous block of a dataset only (a sharded kNN bank: no rank holds
  the whole bank).
* :func:`folder_features` / :func:`cached_features`: the same, stored under ``cache_dir`` keyed by
  (checkpoint path + mtime + size, arch, small_input, seed for random init, folder, transform, shard).
"""

from __future__ import annotations

import difflib
import hashlib
import os
from collections.abc import Sequence
from typing import Any, Callable

import torch
import torch.distributed as tdist
import torch.nn as nn
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Subset
from torchvision.datasets import ImageFolder

from eval.knn_search import comm_device
from smallssl import dist
from smallssl.backbones import create_backbone, default_small_input
from smallssl.checkpoints import load_backbone
from smallssl.data.cache import ALIASES, prepare_dataset
from smallssl.data.transforms import eval_transform

__all__ = ["resolve_data", "split_dir", "first_image_size", "resolve_image_size", "subsample_per_class",
           "build_model", "device_for", "extract_features", "extract_shard", "shard_bounds", "cache_key",
           "cached_features", "folder_features", "eval_transform"]


# --------------------------------------------------------------------------------------------- data
def resolve_data(data: str) -> str:
    """A directory is used as is; a known dataset name (``cifar10``...) is unpacked into the cache."""
    if os.path.isdir(data):
        return data
    if data in ALIASES:
        return prepare_dataset(data)
    close = difflib.get_close_matches(data, sorted(ALIASES), n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    raise ValueError(f"data {data!r}: no such directory and not a dataset name ({', '.join(sorted(ALIASES))}). "
                     f"{hint}Pass an ImageFolder root with train/ and val/, or one of those names")


def split_dir(root: str, split: str) -> str:
    path = os.path.join(root, split)
    if not os.path.isdir(path):
        raise ValueError(f"{root!r} has no {split}/ directory. Pass an ImageFolder tree with train/ and val/")
    return path


def first_image_size(folder: str) -> int:
    """Larger side of the first image under ``folder`` (used to pick the eval resolution)."""
    for dirpath, dirnames, files in os.walk(folder):
        dirnames.sort()
        for f in sorted(files):
            try:
                with Image.open(os.path.join(dirpath, f)) as im:
                    return max(im.size)
            except OSError:
                continue
    raise ValueError(f"{folder!r}: no readable image under it. Check the path")


def resolve_image_size(image_size: int | None, folder: str) -> int:
    """``image_size`` or, when None, the native size of small images (<= 64 px) and 224 otherwise."""
    if image_size is not None:
        return image_size
    native = first_image_size(folder)
    return native if default_small_input(native) else 224


def subsample_per_class(targets: Sequence[int], per_class: int | None) -> list[int]:
    """Indices of the first ``per_class`` samples of each class (all when None), in dataset order."""
    seen: dict[int, int] = {}
    keep = []
    for i, t in enumerate(targets):
        if per_class is None or seen.get(t, 0) < per_class:
            seen[t] = seen.get(t, 0) + 1
            keep.append(i)
    return keep


# -------------------------------------------------------------------------------------------- model
def build_model(arch: str, pretrained: str | None = None, small_input: bool | None = None,
                image_size: int = 224, seed: int = 0, strict: bool = True, verbose: bool = True) -> nn.Module:
    """Backbone ``arch`` in eval mode with weights from ``pretrained`` (random init from ``seed`` if empty).

    ``small_input=None`` picks the CIFAR stem when ``image_size <= 64``.
    """
    if small_input is None:
        small_input = default_small_input(image_size)
    if pretrained and not os.path.exists(pretrained):
        raise FileNotFoundError(f"checkpoint {pretrained!r}: no such file or directory. Check the path (a "
                                "checkpoint file, or a sharded checkpoint directory)")
    torch.manual_seed(seed)
    model = create_backbone(arch, small_input=small_input)
    if verbose:
        print(f"=> creating model '{arch}' (small_input={small_input})")
    if pretrained:
        if verbose:
            print(f"=> loading checkpoint '{pretrained}'")
        load_backbone(model, pretrained, strict=strict, verbose=verbose, arch=arch)
    elif verbose:
        print(f"=> no checkpoint: random init (seed {seed})")
    return model.eval()


def device_for(gpu: int | None = None) -> torch.device:
    """``cuda:<gpu>`` (default ``cuda:$LOCAL_RANK``) when CUDA is available, else the CPU."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", gpu if gpu is not None else int(os.environ.get("LOCAL_RANK", "0")))


# --------------------------------------------------------------------------------------- extraction
def shard_bounds(n: int, rank: int, world: int) -> tuple[int, int]:
    """Rows ``[start, stop)`` of rank ``rank``'s contiguous block when ``n`` rows are split over ``world``."""
    return n * rank // world, n * (rank + 1) // world


@torch.no_grad()
def _embed(model: nn.Module, dataset: Dataset, indices: Sequence[int], batch_size: int, workers: int,
           device: torch.device, views: int, progress: bool) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Features of ``dataset[indices]``: ``views`` tensors (n, D) float32 on CPU, labels (n,) int64."""
    was_training = model.training
    model.eval()  # BN running statistics, not the statistics of class-sorted batches
    loader = DataLoader(Subset(dataset, list(indices)), batch_size=batch_size, shuffle=False, num_workers=workers)
    feats: list[list[torch.Tensor]] = [[] for _ in range(views)]
    labels = []
    every = max(1, len(loader) // 10)
    for step, (images, target) in enumerate(loader):
        if progress and dist.is_main_process() and step % every == 0:
            print(f"   batch {step}/{len(loader)}", flush=True)
        images = images if views > 1 else [images]
        for v in range(views):
            feats[v].append(model(images[v].to(device, non_blocking=True)).float().cpu())
        labels.append(torch.as_tensor(target))
    model.train(was_training)
    out = [torch.cat(f) if f else torch.zeros(0, 0) for f in feats]
    return out, torch.cat(labels) if labels else torch.zeros(0, dtype=torch.long)


def extract_features(model: nn.Module, dataset: Dataset, batch_size: int = 256, workers: int = 0,
                     device: torch.device | str | None = None, views: int = 1,
                     progress: bool = False) -> tuple[torch.Tensor, ...]:
    """Features of every sample of ``dataset`` in dataset order.

    ``dataset[i]`` is ``(image, label)`` or, with ``views > 1``, ``([img_1, ..., img_v], label)``.
    Returns ``views`` tensors of shape (N, D) (float32, on CPU) followed by labels (N,) int64.
    Under ``torch.distributed`` each rank embeds the strided shard ``rank::world`` and the shards are
    all-gathered back into dataset order; every rank returns the full result.
    """
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device(device) if device is not None else next(model.parameters()).device
    n = len(dataset)
    out, y = _embed(model, dataset, range(rank, n, world), batch_size, workers, device, views, progress)
    if world > 1:
        out = [_gather_strided(f, n, world) for f in out]
        y = _gather_strided(y, n, world)
    return (*out, y)


def extract_shard(model: nn.Module, dataset: Dataset, batch_size: int = 256, workers: int = 0,
                  device: torch.device | str | None = None,
                  progress: bool = False) -> tuple[torch.Tensor, torch.Tensor, int]:
    """This rank's contiguous block of ``dataset``: features (n_local, D), labels (n_local,), offset.

    Rows ``offset .. offset + n_local - 1`` of the dataset (see :func:`shard_bounds`); nothing is gathered,
    so a kNN bank split this way is never whole on one rank. World size 1: the whole dataset, offset 0.
    """
    start, stop = shard_bounds(len(dataset), dist.get_rank(), dist.get_world_size())
    device = torch.device(device) if device is not None else next(model.parameters()).device
    (x,), y = _embed(model, dataset, range(start, stop), batch_size, workers, device, 1, progress)
    return x, y, start


def _gather_strided(x: torch.Tensor, n: int, world: int) -> torch.Tensor:
    """Inverse of the ``rank::world`` split: all-gather (padded to equal length) and interleave."""
    per = (n + world - 1) // world
    dev = comm_device()
    # Gather needs one trailing shape: a rank with an empty shard holds (0, 0) features.
    width = torch.tensor([x.shape[1] if x.dim() > 1 else 0], device=dev)
    tdist.all_reduce(width, op=tdist.ReduceOp.MAX)
    shape = (per, int(width)) if x.dim() > 1 else (per,)
    pad = torch.zeros(shape, dtype=x.dtype, device=dev)
    if x.numel():
        pad[: x.shape[0]] = x.to(dev)
    parts = [torch.empty_like(pad) for _ in range(world)]
    tdist.all_gather(parts, pad)
    full = torch.stack(parts, dim=1).reshape((per * world,) + tuple(pad.shape[1:]))  # row r*world+k = rank k
    return full[:n].cpu()


# -------------------------------------------------------------------------------------------- cache
def cache_key(**parts: Any) -> str:
    """sha1 of the sorted ``parts``; a checkpoint path adds its mtime and size so a rewrite invalidates."""
    ckpt = parts.get("pretrained")
    if ckpt:
        st = os.stat(ckpt)
        parts["pretrained"] = (os.path.abspath(ckpt), st.st_mtime_ns, st.st_size)
    text = repr(sorted(parts.items()))
    return hashlib.sha1(text.encode()).hexdigest()[:20]


def cached_features(key: str, compute: Callable[[], tuple[torch.Tensor, ...]], cache_dir: str | None,
                    write: bool | None = None) -> tuple[torch.Tensor, ...]:
    """``compute()`` or its stored result ``<cache_dir>/<key>.pt`` (``cache_dir=None`` disables).

    ``write``: whether this process stores a new result (default: rank 0 only, since every rank computes
    the same gathered features; a rank's own shard passes ``write=True``).
    """
    if not cache_dir:
        return compute()
    path = os.path.join(cache_dir, f"{key}.pt")
    hit = os.path.isfile(path)
    if write is None and dist.is_dist():  # gathered features: computing them is collective, so all ranks agree
        hit = not dist.any_rank(not hit, device=comm_device())[0]
    if hit:
        print(f"=> features from cache {path}")
        return tuple(torch.load(path))
    result = compute()
    if dist.is_main_process() if write is None else write:
        os.makedirs(cache_dir, exist_ok=True)
        tmp = f"{path}.tmp{os.getpid()}"
        torch.save(list(result), tmp)
        os.replace(tmp, path)
    return result


def folder_features(model: nn.Module, folder: str, image_size: int, *, identity: dict[str, Any],
                    batch_size: int = 256, workers: int = 0, device: torch.device | str | None = None,
                    cache_dir: str | None = None, per_class: int | None = None,
                    shard: bool = False) -> tuple[torch.Tensor, ...]:
    """Features of the ImageFolder ``folder`` with the eval transform at ``image_size``, cached.

    ``identity``: what makes the network what it is (arch, checkpoint, small_input, seed of a random init),
    part of the cache key. Returns (features (N, D), labels (N,)), or with ``shard=True`` this rank's block
    (features (n_local, D), labels (n_local,), offset (0-dim int64 tensor)) from :func:`extract_shard`.
    """
    rank, world = dist.get_rank(), dist.get_world_size()
    if shard and world == 1:  # the shard is the whole folder: share the unsharded cache entry
        x, y = folder_features(model, folder, image_size, identity=identity, batch_size=batch_size,
                               workers=workers, device=device, cache_dir=cache_dir, per_class=per_class)
        return x, y, torch.tensor(0)
    transform = eval_transform(image_size)
    key = cache_key(**identity, folder=os.path.abspath(folder), transform=repr(transform), per_class=per_class,
                    **({"shard": (rank, world)} if shard else {}))

    def compute() -> tuple[torch.Tensor, ...]:
        ds = ImageFolder(folder, transform)
        if per_class is not None:
            ds = Subset(ds, subsample_per_class(ds.targets, per_class))
        if dist.is_main_process():
            print(f"=> extracting features of {folder} ({len(ds)} images{', sharded' if shard else ''})",
                  flush=True)
        if shard:
            x, y, offset = extract_shard(model, ds, batch_size, workers, device, progress=True)
            return x, y, torch.tensor(offset)
        return extract_features(model, ds, batch_size, workers, device, progress=True)

    return cached_features(key, compute, cache_dir, write=True if shard else None)
