"""Linear probe (He et al. 2020, MoCo ``main_lincls.py`` protocol) and the classifier training it shares with
``main_transfer.py``.

MoCo's protocol: frozen backbone with BN in eval mode, one linear layer (weights N(0, 0.01), bias 0), SGD
lr 30, momentum 0.9, weight decay 0, 100 epochs, lr x0.1 at epochs 60 and 80, RandomResizedCrop + flip for
training, resize + centre crop for validation; top-1 / top-5. ``--precompute`` trains on features
extracted once without augmentation (much faster on a CPU; a different protocol, and the result line
says so).
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision.transforms as T
from torch.utils.data import DataLoader, TensorDataset
from torchvision.datasets import ImageFolder

from eval import cli
from smallssl.data.transforms import IMAGENET_MEAN, IMAGENET_STD, eval_transform
from smallssl.errors import run_cli
from smallssl.optim import lr_at


class Classifier(nn.Module):
    """``fc(normalize?(backbone(x)))``; ``frozen`` keeps the backbone (and its BN) in eval mode, no grad."""

    def __init__(self, backbone: nn.Module, num_classes: int, normalize: bool = False, frozen: bool = True):
        super().__init__()
        self.backbone, self.normalize, self.frozen = backbone, normalize, frozen
        self.fc = nn.Linear(backbone.num_features, num_classes)
        nn.init.normal_(self.fc.weight, std=0.01)
        nn.init.zeros_(self.fc.bias)
        if frozen:
            self.backbone.requires_grad_(False)

    def train(self, mode: bool = True) -> Classifier:
        super().train(mode)
        if self.frozen:
            self.backbone.eval()  # frozen BN statistics, as in MoCo's linear protocol
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen):
            f = self.backbone(x)
        return self.fc(F.normalize(f, dim=1) if self.normalize else f)


def classification_metrics(logits: torch.Tensor, labels: torch.Tensor, num_classes: int) -> dict[str, float]:
    """top1, top5 and mean per-class accuracy (%) of (N, C) logits; classes absent from labels are skipped."""
    top = logits.topk(min(5, logits.shape[1]), dim=1).indices
    hit = top == labels.view(-1, 1)
    correct = hit[:, 0].float()
    per_class = [float(correct[labels == c].mean()) for c in range(num_classes) if (labels == c).any()]
    return {"top1": float(correct.mean()) * 100, "top5": float(hit.any(1).float().mean()) * 100,
            "mean_per_class": 100.0 * sum(per_class) / len(per_class)}


@torch.no_grad()
def evaluate(model: nn.Module, loader, num_classes: int, device) -> dict[str, float]:
    model.eval()
    logits, labels = [], []
    for x, y in loader:
        logits.append(model(x.to(device)).float().cpu())
        labels.append(y)
    return classification_metrics(torch.cat(logits), torch.cat(labels), num_classes)


def train_classifier(model: nn.Module, train_loader, val_loader, num_classes: int, *, epochs: int = 100,
                     lr: float = 30.0, momentum: float = 0.9, weight_decay: float = 0.0,
                     schedule: tuple[int, ...] = (60, 80), cos: bool = False, device: torch.device | str = "cpu",
                     log: Callable[[str], None] | None = print) -> dict[str, float]:
    """SGD on the trainable parameters of ``model`` (the fc only when frozen); returns final val metrics.

    Loaders yield (images (B, ...), labels (B,)); lr per epoch from :func:`smallssl.optim.lr_at` (steps x0.1 at
    ``schedule`` or half-cosine).
    """
    if epochs < 1 or lr <= 0:
        raise ValueError(f"epochs must be >= 1 and lr > 0, got {epochs}, {lr}")
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    for epoch in range(epochs):
        for g in opt.param_groups:
            g["lr"] = lr_at(epoch, lr, epochs, cos=cos, schedule=schedule)
        model.train()
        total, n = 0.0, 0
        for x, y in train_loader:
            loss = F.cross_entropy(model(x.to(device)), y.to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total, n = total + float(loss.detach()) * len(y), n + len(y)
        if log and (epoch + 1 == epochs or (epoch + 1) % max(1, epochs // 10) == 0):
            log(f"epoch {epoch + 1}/{epochs} lr {opt.param_groups[0]['lr']:.4g} train loss {total / max(n, 1):.4f}")
    return evaluate(model, val_loader, num_classes, device)


def linear_probe_features(xtr: torch.Tensor, ytr: torch.Tensor, xte: torch.Tensor, yte: torch.Tensor, *,
                          epochs: int = 100, lr: float = 30.0, batch_size: int = 256, normalize: bool = False,
                          momentum: float = 0.9, weight_decay: float = 0.0, schedule: tuple[int, ...] = (60, 80),
                          cos: bool = False, seed: int = 0,
                          log: Callable[[str], None] | None = None) -> dict[str, float]:
    """Linear classifier on precomputed features: train (N, D), test (Q, D); returns top1/top5/mean_per_class."""
    torch.manual_seed(seed)
    num_classes = int(max(ytr.max(), yte.max())) + 1
    ident = nn.Identity()
    ident.num_features = xtr.shape[1]
    model = Classifier(ident, num_classes, normalize=normalize, frozen=True)
    g = torch.Generator().manual_seed(seed)
    train_loader = DataLoader(TensorDataset(xtr, ytr), batch_size=batch_size, shuffle=True, generator=g)
    val_loader = DataLoader(TensorDataset(xte, yte), batch_size=1024)
    return train_classifier(model, train_loader, val_loader, num_classes, epochs=epochs, lr=lr, momentum=momentum,
                            weight_decay=weight_decay, schedule=schedule, cos=cos, device="cpu", log=log)


def add_optim_args(p: argparse.ArgumentParser, lr: float | None, epochs: int, schedule: list[int],
                   wd: float) -> None:
    p.add_argument("--lr", "--learning-rate", default=lr, type=float)
    p.add_argument("--epochs", default=epochs, type=cli.positive_int)
    p.add_argument("--schedule", default=schedule, nargs="*", type=int, help="epochs where lr is multiplied by 0.1")
    p.add_argument("--cos", action="store_true", help="cosine schedule instead of steps")
    p.add_argument("--momentum", default=0.9, type=float)
    p.add_argument("--wd", "--weight-decay", dest="weight_decay", default=wd, type=float)


def get_args_parser() -> argparse.ArgumentParser:
    p = cli.ArgumentParser("python -m eval.linear", parents=[cli.common_parser()],
                           description="MoCo linear protocol (frozen backbone)")
    add_optim_args(p, lr=30.0, epochs=100, schedule=[60, 80], wd=0.0)
    p.add_argument("--precompute", action="store_true",
                   help="train on features extracted once, without augmentation (fast; another protocol)")
    return p


def main(argv: list[str] | None = None) -> dict[str, float]:
    args = get_args_parser().parse_args(argv)
    if args.lr <= 0:
        raise ValueError(f"--lr {args.lr:g}: the learning rate must be > 0. MoCo's linear protocol uses 30")
    root = cli.resolve_data(args.data)
    train_dir, val_dir = cli.split_dir(root, "train"), cli.split_dir(root, "val")
    em = cli.model_from_args(args, train_dir)
    size = em.image_size
    num_classes = len([d for d in os.listdir(train_dir) if os.path.isdir(os.path.join(train_dir, d))])
    sched = "cos" if args.cos else f"steps{args.schedule}"
    optim_kw = dict(epochs=args.epochs, lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay,
                    schedule=tuple(args.schedule), cos=args.cos)
    if args.precompute:
        xtr, ytr = cli.split_features(em, train_dir)
        xte, yte = cli.split_features(em, val_dir)
        res = linear_probe_features(xtr, ytr, xte, yte, batch_size=args.batch_size, normalize=False, seed=args.seed,
                                    log=print, **optim_kw)
        proto = "precomputed features, no augmentation"
    else:
        torch.manual_seed(args.seed)
        model = Classifier(em.model, num_classes, normalize=False, frozen=True).to(em.device)
        train_tf = T.Compose([T.RandomResizedCrop(size), T.RandomHorizontalFlip(), T.ToTensor(),
                              T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
        tl = DataLoader(ImageFolder(train_dir, train_tf), args.batch_size, shuffle=True, num_workers=args.workers)
        vl = DataLoader(ImageFolder(val_dir, eval_transform(size)), args.batch_size, num_workers=args.workers)
        res = train_classifier(model, tl, vl, num_classes, device=em.device, **optim_kw)
        proto = "RandomResizedCrop+flip"
    print(f"[linear protocol=moco frozen-bn {proto} lr={args.lr:g} wd={args.weight_decay:g} epochs={args.epochs} "
          f"sched={sched} split=train->val] top1={res['top1']:.2f}% top5={res['top5']:.2f}% "
          f"mean-per-class={res['mean_per_class']:.2f}%")
    return res


if __name__ == "__main__":
    sys.exit(run_cli(main))
