"""Command-line glue shared by the eval entry points (``eval.knn``, ``eval.linear``, ``eval.instdisc``,
``eval.stats-dist``, ``eval.embed``, ``main_transfer.py``, ``experiments.tsne``).

:func:`model_from_args` is the one place where the shared flags become keyword arguments: it returns an
:class:`EvalModel` (the network, its device, resolution and cache identity); every other helper takes that
record, not ``args``, and returns values instead of writing into ``args``. The library underneath is
:mod:`eval.features`.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass, field
from typing import Any, NoReturn

import torch
import torch.nn as nn

from eval.features import (  # noqa: F401
    build_model,
    device_for,
    extract_features,
    folder_features,
    resolve_data,
    resolve_image_size,
    split_dir,
)
from eval.static_views import StaticViews
from smallssl import dist
from smallssl.backbones import default_small_input
from smallssl.data.cache import default_cache_dir
from smallssl.errors import EXIT_USAGE


class ArgumentParser(argparse.ArgumentParser):
    """argparse with the toolkit's one-line error style: ``error: <what>: <why>. <what to do>``, exit 2."""

    def error(self, message: str) -> NoReturn:
        print(f"error: {message}. Run '{self.prog} --help' for usage", file=sys.stderr)
        sys.exit(EXIT_USAGE)


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (``-k 0`` is an error, not "use the default")."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be >= 1")
    return value


def common_parser() -> argparse.ArgumentParser:
    """Flags shared by the eval CLIs (use as ``parents=[common_parser()]``): model, checkpoint, loading."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("data", metavar="DIR", help="ImageFolder root (train/, val/) or cifar10|cifar100|caltech101")
    p.add_argument("-a", "--arch", default="resnet18", help="backbone name (smallssl registry or timm)")
    p.add_argument("--pretrained", default="", help="checkpoint (smallssl, MoCo, ssl-small, SEED, timm, "
                   "torchvision); empty = random init")
    p.add_argument("-b", "--batch-size", default=256, type=positive_int)
    p.add_argument("-j", "--workers", default=0, type=int, help="data loading workers")
    p.add_argument("--image-size", default=None, type=positive_int,
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


def init_distributed() -> bool:
    """Join the ``torchrun`` process group (gloo on CPU, NCCL with CUDA) when WORLD_SIZE > 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 or dist.is_dist():
        return dist.is_dist()
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend, int(os.environ["RANK"]), world)
    return True


def static_set_dir(path: str) -> str:
    """``path`` when it is a directory (a static augmented set), else a one-line error saying how to make one."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"static augmented set {path!r}: no such directory. Write one with "
                                "python -m experiments.sample-augs SRC DST")
    return path


@dataclass(frozen=True)
class EvalModel:
    """A backbone ready for feature extraction, with what identifies it in the feature cache."""

    model: nn.Module
    device: torch.device
    image_size: int
    small_input: bool
    identity: dict[str, Any] = field(default_factory=dict)  # arch, checkpoint, small_input, seed of random init
    batch_size: int = 256
    workers: int = 0
    cache_dir: str | None = None

    def features_kwargs(self) -> dict[str, Any]:
        return dict(identity=self.identity, batch_size=self.batch_size, workers=self.workers, device=self.device,
                    cache_dir=self.cache_dir)


def model_from_args(args: argparse.Namespace, folder: str, image_size: int | None = None) -> EvalModel:
    """The common flags -> an :class:`EvalModel` on its device (the only helper that reads ``args``).

    ``folder`` is probed for the native image size when neither ``image_size`` nor ``--image-size`` is given.
    """
    device = device_for(args.gpu)
    size = resolve_image_size(image_size or args.image_size, folder)
    small_input = default_small_input(size) if args.small_input is None else args.small_input
    model = build_model(args.arch, args.pretrained, small_input, size, args.seed, verbose=dist.is_main_process())
    identity = dict(pretrained=args.pretrained or None, arch=args.arch, small_input=small_input,
                    seed=None if args.pretrained else args.seed)
    return EvalModel(model.to(device), device, size, small_input, identity, args.batch_size, args.workers,
                     None if args.no_cache else args.feature_cache)


def split_features(em: EvalModel, folder: str, per_class: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(features (N, D), labels (N,)) of ImageFolder ``folder`` with the eval transform, cached; every rank."""
    return folder_features(em.model, folder, em.image_size, per_class=per_class, **em.features_kwargs())


def bank_features(em: EvalModel, folder: str) -> tuple[torch.Tensor, torch.Tensor, int]:
    """This rank's contiguous block of ``folder``: features (n_local, D), labels (n_local,), global offset."""
    x, y, offset = folder_features(em.model, folder, em.image_size, shard=True, **em.features_kwargs())
    return x, y, int(offset)


def static_view_features(em: EvalModel, root: str, view_set: str,
                         per_class: int | None = None) -> tuple[torch.Tensor, ...]:
    """Embed every image of the static augmented set ``root`` in its three views (see :mod:`eval.static_views`):
    returns ``(original (N, D), view 1 (N, D), view 2 (N, D), labels (N,))``."""
    dataset = StaticViews(root, em.image_size, view_set, per_class)
    if dist.is_main_process():
        print(f"=> iterating through the dataset ({len(dataset)} images, {len(dataset.classes)} classes)...")
    return extract_features(em.model, dataset, em.batch_size, em.workers, em.device, views=3)
