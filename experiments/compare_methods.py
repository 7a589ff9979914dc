"""Equal-budget comparison of the pretraining methods on CIFAR-10 (issue 8): kNN after training.

Every method trains a ResNet-18 (CIFAR stem) through ``main_moco.main`` with the same data subset, batch,
epochs (so the same number of optimiser steps), learning-rate schedule and augmentation (MoCo v2); only
the method and its own flags differ. Then each backbone (and a random-init one) is scored by DINO's
weighted kNN (cosine, k=20, T=0.07; :func:`eval.knn.dino_knn`) with a fixed per-class-balanced train bank
and val set. Wall time per method is reported too (the machine is shared, so it is noisy).

    python experiments/compare_methods.py --subset 1024 --epochs 1 -b 64 --out runs/compare

Prints a Markdown table and writes ``OUT/results.json``. Small on purpose: see /work/notes/issue-8.md for
the figures and what they can and cannot show.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

import main_moco  # noqa: E402
from eval.features import build_model, eval_transform, extract_features, subsample_per_class  # noqa: E402
from eval.knn import dino_knn  # noqa: E402
from smallssl.data import SafeImageFolder  # noqa: E402
from smallssl.datasets_cache import prepare_dataset  # noqa: E402

# Method flags for a ResNet-18 on CIFAR (small projectors as in the papers' CIFAR runs / small-model setups).
METHOD_FLAGS: dict[str, list[str]] = {
    "moco": ["--mlp", "--moco-dim", "128", "--moco-t", "0.2", "--moco-m", "0.99", "--moco-k", "4096"],
    "simclr": ["--simclr-t", "0.5", "--simclr-dim", "128"],
    "byol": ["--byol-m", "0.99", "--byol-dim", "256", "--byol-hidden", "4096"],
    "simsiam": ["--simsiam-dim", "2048", "--simsiam-pred-dim", "512", "--simsiam-proj-layers", "2"],
    "barlow": ["--barlow-proj", "2048-2048-2048", "--barlow-lambda", "5e-3"],
}


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("compare_methods", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=None, help="ImageFolder root with train/ and val/ (default: cached CIFAR-10)")
    p.add_argument("--methods", nargs="+", default=list(METHOD_FLAGS), choices=list(METHOD_FLAGS))
    p.add_argument("--out", default="runs/compare_methods")
    p.add_argument("--subset", default=1024, type=int, help="training images (fixed random subset)")
    p.add_argument("--epochs", default=1, type=int)
    p.add_argument("-b", "--batch-size", default=64, type=int)
    p.add_argument("--lr", default=0.05, type=float)
    p.add_argument("--wd", default=5e-4, type=float)
    p.add_argument("--image-size", default=32, type=int)
    p.add_argument("--small-input", default=True, action=argparse.BooleanOptionalAction,
                   help="CIFAR stem (default); --no-small-input keeps the ImageNet stem (~12x cheaper at 32 px)")
    p.add_argument("-a", "--arch", default="resnet18")
    p.add_argument("--bank-per-class", default=100, type=int, help="kNN bank: images per class from train/")
    p.add_argument("--val-per-class", default=50, type=int, help="kNN queries: images per class from val/")
    p.add_argument("--threads", default=2, type=int)
    p.add_argument("--seed", default=0, type=int)
    return p


def train_command(args, method: str, ckpt_dir: str, data: str) -> list[str]:
    flags = list(METHOD_FLAGS[method])
    if method == "moco":  # the queue must be a multiple of the batch
        flags[flags.index("--moco-k") + 1] = str(max(args.batch_size, 4096 // args.batch_size * args.batch_size))
    return [data, "-a", args.arch, "--method", method, "--image-size", str(args.image_size), "--subset",
            str(args.subset), "--epochs", str(args.epochs), "-b", str(args.batch_size), "--lr", str(args.lr),
            "--wd", str(args.wd), "--cos", "--aug-plus", "-j", "1", "--device", "cpu", "--seed", str(args.seed),
            "--no-progress", "--print-freq", "1000", "--ckpt-dir", ckpt_dir,
            "--small-input" if args.small_input else "--no-small-input", *flags]


def knn_eval(args, data: str, ckpt: str | None) -> dict[str, float]:
    """DINO weighted kNN (k=20, T=0.07) of the backbone in ``ckpt`` (random init from ``args.seed`` if None)."""
    model = build_model(args.arch, pretrained=ckpt, small_input=args.small_input, image_size=args.image_size,
                        seed=args.seed, verbose=False)
    tf = eval_transform(args.image_size)
    out = {}
    feats = []
    for split, per_class in (("train", args.bank_per_class), ("val", args.val_per_class)):
        ds = SafeImageFolder(os.path.join(data, split), tf)
        sub = torch.utils.data.Subset(ds, subsample_per_class(ds.targets, per_class))
        feats.append(extract_features(model, sub, batch_size=128, workers=1, device="cpu"))
    (xtr, ytr), (xte, yte) = feats
    out.update(dino_knn(xtr, ytr, xte, yte, k=20, temperature=0.07))
    return out


def main(argv: list[str] | None = None) -> list[dict]:
    args = get_args_parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    data = args.data or prepare_dataset("cifar10")
    os.makedirs(args.out, exist_ok=True)
    rows = []
    t0 = time.time()
    res = knn_eval(args, data, None)
    rows.append({"method": "random init", "train_s": 0.0, "steps": 0, "loss": None, **res,
                 "eval_s": time.time() - t0, "command": "(no training)"})
    print(json.dumps(rows[-1]), flush=True)
    for method in args.methods:
        ckpt_dir = os.path.join(args.out, method)
        argv_m = train_command(args, method, ckpt_dir, data)
        t0 = time.time()
        status = main_moco.main(main_moco.get_args_parser().parse_args(argv_m))
        train_s = time.time() - t0
        ckpt = status["checkpoint"]
        step = int(torch.load(ckpt, map_location="cpu", weights_only=False)["step"])
        t0 = time.time()
        res = knn_eval(args, data, ckpt)
        rows.append({"method": method, "train_s": train_s, "steps": step, "loss": status.get("loss"), **res,
                     "eval_s": time.time() - t0, "command": "python main_moco.py " + " ".join(argv_m)})
        print(json.dumps(rows[-1]), flush=True)
        with open(os.path.join(args.out, "results.json"), "w") as f:
            json.dump(rows, f, indent=1)
    print("\n| method | steps | final loss | train wall (s) | kNN top-1 (%) | kNN top-5 (%) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        loss = "-" if r["loss"] is None else f"{r['loss']:.4g}"
        print(f"| {r['method']} | {r['steps']} | {loss} | {r['train_s']:.0f} | {r['top1']:.2f} | {r['top5']:.2f} |")
    return rows


if __name__ == "__main__":
    main()
