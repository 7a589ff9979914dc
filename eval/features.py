"""Shared by every eval CLI: build a backbone, load a checkpoint, extract features (cached, sharded).

* :func:`build_model`: ``create_backbone(arch, small_input)`` + :func:`smallssl.checkpoints.load_backbone`
  (prints the loaded / missing report; a checkpoint that does not fit raises ``CheckpointMismatchError``).
  No checkpoint = random init from ``seed``: one network serves train and test features.
* :func:`extract_features`: model in **eval mode** (BN running statistics: ImageFolder yields samples in
  class order, so train-mode BN would normalise each batch by one class's statistics), no grad,
  optional sharding over ``torch.distributed`` ranks, results in dataset order.
* :func:`cached_features`: the same, stored under ``cache_dir`` keyed by (checkpoint path + mtime + size,
  arch, small_input, seed for random init, data dir, transform).
"""

from __future__ import annotations

import argparse
import hashlib
import os
from typing import Callable, Sequence

import torch
import torch.distributed as tdist
import torch.nn as nn
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Subset
from torchvision.datasets import ImageFolder

from smallssl.backbones import create_backbone, default_small_input
from smallssl.checkpoints import load_backbone
from smallssl.data.cache import ALIASES, default_cache_dir, prepare_dataset
from smallssl.data.transforms import eval_transform


# --------------------------------------------------------------------------------------------- data
def resolve_data(data: str) -> str:
    """A directory is used as is; a known dataset name (``cifar10``...) is unpacked into the cache."""
    if os.path.isdir(data):
        return data
    if data in ALIASES:
        return prepare_dataset(data)
    raise ValueError(f"data {data!r} is neither a directory nor one of {', '.join(sorted(ALIASES))}")


def split_dir(root: str, split: str) -> str:
    path = os.path.join(root, split)
    if not os.path.isdir(path):
        raise ValueError(f"{root!r} has no {split}/ directory (expected an ImageFolder tree with train/ and val/)")
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
    raise ValueError(f"no readable image under {folder!r}")


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
    torch.manual_seed(seed)
    model = create_backbone(arch, small_input=small_input)
    if verbose:
        print(f"=> creating model '{arch}' (small_input={small_input})")
    if pretrained:
        if verbose:
            print(f"=> loading checkpoint '{pretrained}'")
        load_backbone(model, pretrained, strict=strict, verbose=verbose)
    elif verbose:
        print(f"=> no checkpoint: random init (seed {seed})")
    return model.eval()


# --------------------------------------------------------------------------------------- extraction
def _dist_info() -> tuple[int, int]:
    if tdist.is_available() and tdist.is_initialized():
        return tdist.get_rank(), tdist.get_world_size()
    return 0, 1


@torch.no_grad()
def extract_features(model: nn.Module, dataset: Dataset, batch_size: int = 256, workers: int = 0,
                     device: torch.device | str | None = None, views: int = 1,
                     progress: bool = False) -> tuple[torch.Tensor, ...]:
    """Features of every sample of ``dataset`` in dataset order.

    ``dataset[i]`` is ``(image, label)`` or, with ``views > 1``, ``([img_1, ..., img_v], label)``.
    Returns ``views`` tensors of shape (N, D) (float32, on CPU) followed by labels (N,) int64.
    Under ``torch.distributed`` each rank embeds the strided shard ``rank::world`` and the shards are
    all-gathered back into dataset order; every rank returns the full result.
    """
    rank, world = _dist_info()
    device = torch.device(device) if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()  # BN running statistics, not the statistics of class-sorted batches
    n = len(dataset)
    shard = list(range(rank, n, world))
    loader = DataLoader(Subset(dataset, shard), batch_size=batch_size, shuffle=False, num_workers=workers)
    feats: list[list[torch.Tensor]] = [[] for _ in range(views)]
    labels = []
    every = max(1, len(loader) // 10)
    for step, (images, target) in enumerate(loader):
        if progress and rank == 0 and step % every == 0:
            print(f"   batch {step}/{len(loader)}", flush=True)
        images = images if views > 1 else [images]
        for v in range(views):
            feats[v].append(model(images[v].to(device, non_blocking=True)).float().cpu())
        labels.append(torch.as_tensor(target))
    out = [torch.cat(f) if f else torch.zeros(0, 0) for f in feats]
    y = torch.cat(labels) if labels else torch.zeros(0, dtype=torch.long)
    model.train(was_training)
    if world > 1:
        out = [_gather_strided(f, n, world) for f in out]
        y = _gather_strided(y, n, world)
    return (*out, y)


def _gather_strided(x: torch.Tensor, n: int, world: int) -> torch.Tensor:
    """Inverse of the ``rank::world`` split: all-gather (padded to equal length) and interleave."""
    per = (n + world - 1) // world
    backend = tdist.get_backend()
    dev = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
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


def init_distributed_from_env() -> bool:
    """Join the ``torchrun`` process group (gloo on CPU, NCCL with CUDA) when WORLD_SIZE > 1."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or tdist.is_initialized():
        return tdist.is_initialized()
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    tdist.init_process_group(backend, init_method="env://")
    return True


# -------------------------------------------------------------------------------------------- cache
def cache_key(**parts) -> str:
    """sha1 of the sorted ``parts``; a checkpoint path adds its mtime and size so a rewrite invalidates."""
    ckpt = parts.get("pretrained")
    if ckpt:
        st = os.stat(ckpt)
        parts["pretrained"] = (os.path.abspath(ckpt), st.st_mtime_ns, st.st_size)
    text = repr(sorted(parts.items()))
    return hashlib.sha1(text.encode()).hexdigest()[:20]


def cached_features(key: str, compute: Callable[[], tuple[torch.Tensor, ...]],
                    cache_dir: str | None) -> tuple[torch.Tensor, ...]:
    """``compute()`` or its stored result ``<cache_dir>/<key>.pt`` (``cache_dir=None`` disables)."""
    if not cache_dir:
        return compute()
    path = os.path.join(cache_dir, f"{key}.pt")
    if os.path.isfile(path):
        print(f"=> features from cache {path}")
        return tuple(torch.load(path))
    result = compute()
    rank, _ = _dist_info()
    if rank == 0:
        os.makedirs(cache_dir, exist_ok=True)
        tmp = f"{path}.tmp{os.getpid()}"
        torch.save(list(result), tmp)
        os.replace(tmp, path)
    return result


def split_features(args: argparse.Namespace, model: nn.Module, folder: str, image_size: int,
                   per_class: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(features (N, D), labels (N,)) of ImageFolder ``folder`` with the eval transform, cached."""
    transform = eval_transform(image_size)
    key = cache_key(pretrained=args.pretrained or None, arch=args.arch, small_input=args.small_input,
                    seed=None if args.pretrained else args.seed, folder=os.path.abspath(folder),
                    transform=repr(transform), per_class=per_class)

    def compute():
        ds = ImageFolder(folder, transform)
        if per_class is not None:
            ds = Subset(ds, subsample_per_class(ds.targets, per_class))
        print(f"=> extracting features of {folder} ({len(ds)} images)", flush=True)
        return extract_features(model, ds, args.batch_size, args.workers, args.device, progress=True)

    return cached_features(key, compute, None if args.no_cache else args.feature_cache)


# ------------------------------------------------------------------------------------------- argparse
def common_parser() -> argparse.ArgumentParser:
    """Flags shared by the eval CLIs (use as ``parents=[common_parser()]``): model, checkpoint, loading."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("data", metavar="DIR", help="ImageFolder root (train/, val/) or cifar10|cifar100|caltech101")
    p.add_argument("-a", "--arch", default="resnet18", help="backbone name (smallssl registry or timm)")
    p.add_argument("--pretrained", default="", help="checkpoint (smallssl, MoCo, ssl-small, SEED, timm, "
                   "torchvision); empty = random init")
    p.add_argument("-b", "--batch-size", default=256, type=int)
    p.add_argument("-j", "--workers", default=0, type=int, help="data loading workers")
    p.add_argument("--image-size", default=None, type=int,
                   help="eval resolution (default: native size for images <= 64 px, else 224)")
    p.add_argument("--small-input", default=None, action=argparse.BooleanOptionalAction,
                   help="CIFAR stem (default: on when image size <= 64)")
    p.add_argument("--seed", default=0, type=int, help="seed of a random-init backbone")
    p.add_argument("--gpu", default=None, type=int, help="CUDA device index (default: cuda:LOCAL_RANK if "
                   "available, else CPU)")
    p.add_argument("--feature-cache", default=os.path.join(default_cache_dir(), "features"),
                   help="directory of cached features")
    p.add_argument("--no-cache", action="store_true", help="do not read or write cached features")
    return p


def setup_device(args: argparse.Namespace) -> None:
    """Set ``args.device`` from ``--gpu`` / LOCAL_RANK / availability."""
    if torch.cuda.is_available():
        idx = args.gpu if args.gpu is not None else int(os.environ.get("LOCAL_RANK", "0"))
        args.device = torch.device("cuda", idx)
    else:
        args.device = torch.device("cpu")


def model_from_args(args: argparse.Namespace, folder: str) -> tuple[nn.Module, int]:
    """Build the model from CLI args; returns (model on args.device, image size)."""
    setup_device(args)
    image_size = resolve_image_size(args.image_size, folder)
    if args.small_input is None:
        args.small_input = default_small_input(image_size)
    rank, _ = _dist_info()
    model = build_model(args.arch, args.pretrained, args.small_input, image_size, args.seed, verbose=rank == 0)
    return model.to(args.device), image_size
