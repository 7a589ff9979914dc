"""Transfer learning: linear probe or fine-tuning on CIFAR-10, CIFAR-100, Caltech-101 or any ImageFolder.

``python main_transfer.py DATA -a ARCH --pretrained CKPT --dataset cifar10|cifar100|caltech101|folder
[--finetune]`` (Shi et al. 2021, arXiv:2107.14762, sec. 5: ssl-small's command line; its distributed flags
are accepted and ignored). Protocol: the backbone's features are L2-normalised and fed to one linear layer.
Linear (default): backbone frozen, BN in eval mode. ``--finetune``: the backbone is trained too, in train
mode (``model.train()``; ssl-small's fine-tuning never switched it on). Reports top-1 and mean per-class
accuracy (Caltech-101 is imbalanced: airplanes and motorbikes are ~28% of it).

DATA: an ImageFolder root with ``train/`` and ``val/``; for cifar10 / cifar100 also torchvision's layout
(``cifar-10-batches-py`` / ``cifar-100-python`` inside DATA); an empty or missing DATA with a named dataset
unpacks ``../shared/data/<dataset>.tar.gz`` into the cache (:func:`smallssl.data.cache.prepare_dataset`), and
DATA may be the dataset name itself (``main_transfer.py cifar10``). Bad input ends with one ``error:`` line.
"""

from __future__ import annotations

import argparse
import difflib
import os
import sys

import torch
import torchvision.transforms as T
from torch.utils.data import DataLoader
from torchvision.datasets import CIFAR10, CIFAR100, ImageFolder

from eval import cli
from eval.linear import Classifier, add_optim_args, linear_probe_features, train_classifier
from smallssl.backbones.small_map_conv import use_matmul_weight_grad
from smallssl.data.cache import prepare_dataset
from smallssl.data.transforms import IMAGENET_MEAN, IMAGENET_STD, eval_transform
from smallssl.errors import run_cli

DATASETS = ("cifar10", "cifar100", "caltech101", "folder")
NAMED = DATASETS[:-1]


def resolve_root(data: str, dataset: str) -> tuple[str, str]:
    """(directory holding the data, dataset name): DATA as a directory, or a dataset name unpacked from the
    shared tarballs. A bare name as DATA (``main_transfer.py cifar10``) means ``--dataset cifar10``."""
    if dataset not in DATASETS:
        raise ValueError(f"--dataset {dataset!r}: unknown dataset. Choose one of {', '.join(DATASETS)}")
    if data and os.path.isdir(data):
        return data, dataset
    if dataset == "folder" and data in NAMED:
        dataset = data
    if dataset != "folder":
        return prepare_dataset(dataset), dataset
    close = difflib.get_close_matches(data, NAMED, n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    raise ValueError(f"data {data!r}: no such directory and not a dataset name ({', '.join(NAMED)}). {hint}"
                     "Pass an ImageFolder root with train/ and val/, or a dataset name")


def build_datasets(root: str, dataset: str, train_tf, val_tf):
    """(train, val, num_classes) from torchvision's CIFAR layout or an ImageFolder tree."""
    tv = {"cifar10": (CIFAR10, "cifar-10-batches-py"), "cifar100": (CIFAR100, "cifar-100-python")}.get(dataset)
    if tv and os.path.isdir(os.path.join(root, tv[1])):
        cls, _ = tv
        train, val = cls(root, train=True, transform=train_tf), cls(root, train=False, transform=val_tf)
        return train, val, len(train.classes)
    for split in ("train", "val"):
        if not os.path.isdir(os.path.join(root, split)):
            raise ValueError(f"{root!r} has no {split}/ (expected an ImageFolder tree"
                             + (f" or torchvision's {tv[1]}/" if tv else "") + ")")
    train = ImageFolder(os.path.join(root, "train"), train_tf)
    val = ImageFolder(os.path.join(root, "val"), val_tf)
    if train.classes != val.classes:
        raise ValueError("train/ and val/ have different class folders")
    return train, val, len(train.classes)


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = cli.ArgumentParser("main_transfer.py", parents=[cli.common_parser()], add_help=add_help,
                           description="linear probe / fine-tuning transfer with L2-normalised features")
    p.add_argument("--dataset", default="folder", choices=DATASETS)
    p.add_argument("--finetune", action="store_true", help="train the backbone too (in train mode)")
    add_optim_args(p, lr=None, epochs=100, schedule=[60, 80], wd=0.0)
    p.add_argument("--precompute", action="store_true",
                   help="linear only: train on features extracted once, without augmentation (fast on CPU)")
    for flag in ("--dist-url", "--dist-backend", "--world-size", "--rank"):
        p.add_argument(flag, default=None, help="accepted for ssl-small compatibility; ignored")
    p.add_argument("--multiprocessing-distributed", action="store_true", help="ignored (compatibility)")
    return p


def main(args: argparse.Namespace) -> dict[str, float]:
    if args.lr is not None and args.lr <= 0:
        raise ValueError(f"--lr {args.lr:g}: the learning rate must be > 0. Leave it out for the default "
                         "(10 linear, 0.01 fine-tuning)")
    root, dataset = resolve_root(args.data, args.dataset)
    probe_dir = os.path.join(root, "train") if os.path.isdir(os.path.join(root, "train")) else None
    image_size = args.image_size
    if image_size is None and probe_dir is None:
        image_size = 32  # torchvision CIFAR layout
    em = cli.model_from_args(args, probe_dir or root, image_size)
    size = em.image_size
    lr = args.lr if args.lr is not None else (0.01 if args.finetune else 10.0)
    optim_kw = dict(epochs=args.epochs, lr=lr, momentum=args.momentum, weight_decay=args.weight_decay,
                    schedule=tuple(args.schedule), cos=args.cos)
    train_tf = T.Compose([T.RandomResizedCrop(size), T.RandomHorizontalFlip(), T.ToTensor(),
                          T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    torch.manual_seed(args.seed)
    if args.precompute and not args.finetune:
        if probe_dir is None:
            raise ValueError(f"--precompute: {root!r} is not an ImageFolder tree (train/, val/). Leave out "
                             "--precompute or unpack the dataset as an ImageFolder")
        xtr, ytr = cli.split_features(em, probe_dir)
        xte, yte = cli.split_features(em, os.path.join(root, "val"))
        res = linear_probe_features(xtr, ytr, xte, yte, batch_size=args.batch_size, normalize=True, seed=args.seed,
                                    log=print, **optim_kw)
        aug = "precomputed features, no augmentation"
    else:
        train, val, num_classes = build_datasets(root, dataset, train_tf, eval_transform(size))
        if args.finetune:  # the backbone trains: on CPU, tiny maps take the matmul weight gradient (as main_moco)
            use_matmul_weight_grad(em.model)
        model = Classifier(em.model, num_classes, normalize=True, frozen=not args.finetune).to(em.device)
        g = torch.Generator().manual_seed(args.seed)
        tl = DataLoader(train, args.batch_size, shuffle=True, num_workers=args.workers, generator=g)
        vl = DataLoader(val, args.batch_size, num_workers=args.workers)
        res = train_classifier(model, tl, vl, num_classes, device=em.device, **optim_kw)
        aug = "RandomResizedCrop+flip"
    mode = "finetune (backbone in train mode)" if args.finetune else "linear (frozen backbone, BN eval)"
    sched = "cos" if args.cos else f"steps{args.schedule}"
    print(f"[transfer dataset={dataset} {mode} features=l2-normalised {aug} lr={lr:g} "
          f"wd={args.weight_decay:g} epochs={args.epochs} sched={sched} split=train->val] "
          f"top1={res['top1']:.2f}% mean-per-class={res['mean_per_class']:.2f}%")
    return res


def cli_main(argv: list[str] | None = None) -> dict[str, float]:
    """Parse ``argv`` and run :func:`main` (what ``python main_transfer.py`` does)."""
    return main(get_args_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(run_cli(cli_main))
