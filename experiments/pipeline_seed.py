#!/usr/bin/env python
"""Teacher -> SEED -> convert -> MoCo restart -> kNN, in one command (ssl-small's improved-baseline chain).

Stages (each a ``main_moco.main`` run in this process, so every flag behaves as on the command line):

1. ``teacher``: MoCo v2 pretraining of the big model (``--teacher-arch``, ResNet-18);
2. ``seed``: SEED distillation of the teacher into the small student (``--student-arch``, MobileNetV3-small);
3. ``convert``: :func:`smallssl.checkpoints.seed2moco.distill_ckpt2moco_ckpt` (student -> ``encoder_q``, teacher
   dropped);
4. ``restart``: MoCo (ssl-small improved baseline) ``--resume converted_... --restart`` for ``--restart-epochs``;
5. ``moco-only``: the same student trained with MoCo alone, for the SEED budget and for SEED + restart's;
6. kNN (DINO protocol: cosine, k=20, T=0.07) of every model and a random-init student; one table.

Examples::

    python -m experiments.pipeline_seed --tiny                     # synthetic data, ~1 min on 2 CPU cores
    python -m experiments.pipeline_seed --data cifar10 --subset 5000 --teacher-epochs 4 --seed-epochs 2 \\
        --restart-epochs 1 --out /tmp/seed_pipeline

Student stages share one recipe (``--mlp wide --moco-t 0.1``, MoCo v2 augmentation, cosine) so that SEED and
MoCo-only differ only in the loss. Learning rates follow SEED / MoCo: ``lr = base * batch / 256``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

from smallssl.errors import run_cli

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)


def make_synthetic_dataset(root: str, classes: int = 4, train_per_class: int = 16, val_per_class: int = 8,
                           size: int = 16, seed: int = 0) -> str:
    """ImageFolder ``root/{train,val}/<class>/<i>.png`` of noisy class-coloured squares with a class stripe."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    colours = rng.uniform(40, 215, size=(classes, 3))
    for split, n in (("train", train_per_class), ("val", val_per_class)):
        for c in range(classes):
            d = os.path.join(root, split, f"class{c}")
            os.makedirs(d, exist_ok=True)
            for i in range(n):
                img = colours[c] + rng.normal(0, 25, size=(size, size, 3))
                img[(c * size) // classes:(c * size) // classes + max(1, size // classes), :, :] = 255
                Image.fromarray(img.clip(0, 255).astype("uint8")).save(os.path.join(d, f"{i}.png"))
    return root


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("python -m experiments.pipeline_seed", description=__doc__.split("\n")[0])
    p.add_argument("--data", default="", help="ImageFolder root with train/ and val/, or cifar10 / cifar100 / ...")
    p.add_argument("--tiny", action="store_true", help="synthetic 4-class 16px dataset and tiny budgets (a test)")
    p.add_argument("--out", default="pipeline_seed_out", help="checkpoints, logs and results.json go here")
    p.add_argument("--teacher-arch", default="resnet18")
    p.add_argument("--student-arch", default="mobilenetv3_small")
    p.add_argument("--teacher-small-input", action=argparse.BooleanOptionalAction, default=None,
                   help="teacher CIFAR stem (default: on for images <= 64 px); --no-teacher-small-input keeps the "
                        "ImageNet stem (~12x cheaper for a ResNet-18 at 32 px); SEED reads it from the checkpoint")
    p.add_argument("--teacher-epochs", default=4, type=int)
    p.add_argument("--seed-epochs", default=2, type=int)
    p.add_argument("--restart-epochs", default=1, type=int)
    p.add_argument("-b", "--batch-size", default=256, type=int)
    p.add_argument("--teacher-lr", default=0.06, type=float, help="teacher MoCo lr at batch 256 (scaled by b/256)")
    p.add_argument("--student-lr", default=0.06, type=float, help="SEED / MoCo student lr at batch 256 (scaled)")
    p.add_argument("--queue", default=4096, type=int, help="queue size of every stage (multiple of -b)")
    p.add_argument("--image-size", default=None, type=int, help="default: 32 (16 with --tiny)")
    p.add_argument("--subset", default=None, type=int, help="train on a fixed random subset of N images")
    p.add_argument("--knn-train-per-class", default=None, type=int, help="kNN bank: N images per class")
    p.add_argument("--knn-val-per-class", default=None, type=int, help="kNN queries: N images per class")
    p.add_argument("--knn-k", default=20, type=int)
    p.add_argument("--skip-long-baseline", action="store_true",
                   help="no MoCo-only run with the SEED + restart budget")
    p.add_argument("-j", "--workers", default=2, type=int)
    p.add_argument("--threads", default=1, type=int,
                   help="torch intra-op threads (1: on a shared CPU, 2 spinning OpenMP threads ran 15x slower)")
    p.add_argument("--seed", default=0, type=int)
    return p


def _train(argv: list[str]) -> tuple[dict, float]:
    import main_moco

    t0 = time.time()
    status = main_moco.main(main_moco.get_args_parser().parse_args(argv))
    if status.get("status") != "finished" or not status.get("checkpoint"):
        raise RuntimeError(f"stage {argv} did not finish: {status}")
    return status, time.time() - t0


def _knn(arch: str, ckpt: str | None, root: str, image_size: int, args, small_input: bool | None = None
         ) -> dict[str, float]:
    from torch.utils.data import Subset
    from torchvision.datasets import ImageFolder

    from eval.features import build_model, eval_transform, extract_features, subsample_per_class
    from eval.knn import dino_knn

    model = build_model(arch, ckpt, small_input=small_input, image_size=image_size, seed=args.seed, verbose=False)
    feats = []
    for split, per_class in (("train", args.knn_train_per_class), ("val", args.knn_val_per_class)):
        ds = ImageFolder(os.path.join(root, split), eval_transform(image_size))
        if per_class is not None:
            ds = Subset(ds, subsample_per_class(ds.targets, per_class))
        feats.append(extract_features(model, ds, batch_size=256, workers=args.workers, device="cpu"))
    (xtr, ytr), (xte, yte) = feats
    return dino_knn(xtr, ytr, xte, yte, k=min(args.knn_k, len(ytr)))


def run(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    out = os.path.abspath(args.out)
    if args.tiny:
        root = make_synthetic_dataset(os.path.join(out, "data"), train_per_class=8, val_per_class=4, seed=args.seed)
        size = args.image_size or 16
        args.batch_size, args.queue = 16, 64
        args.teacher_epochs, args.seed_epochs, args.restart_epochs = 2, 2, 1
        args.workers, args.skip_long_baseline = 0, True
    else:
        if not args.data:
            raise ValueError("pass --data DIR (or a dataset name such as cifar10), or --tiny")
        from eval.features import resolve_data

        root = resolve_data(args.data)
        size = args.image_size or 32
    b = args.batch_size
    common = [root, "-b", str(b), "-j", str(args.workers), "--image-size", str(size), "--device", "cpu",
              "--no-progress", "--print-freq", "100000", "--seed", str(args.seed), "--cos", "--aug-plus"]
    if args.subset:
        common += ["--subset", str(args.subset)]
    q = ["--moco-k", str(args.queue)]
    student_recipe = ["-a", args.student_arch, "--mlp", "wide", "--moco-t", "0.1", "--lr",
                      str(args.student_lr * b / 256)]
    rows: list[dict] = []

    def record(name, arch, ckpt, steps, wall, small_input=None):
        rows.append({"model": name, "arch": arch, "checkpoint": ckpt, "train_steps": steps, "train_s": wall,
                     "small_input": small_input})

    stem = [] if args.teacher_small_input is None else \
        ["--small-input" if args.teacher_small_input else "--no-small-input"]
    st, wall = _train(common + stem + ["-a", args.teacher_arch, "--method", "moco", "--mlp", "--moco-t", "0.2", *q,
                                       "--lr", str(args.teacher_lr * b / 256), "--epochs", str(args.teacher_epochs),
                                       "--ckpt-dir", os.path.join(out, "teacher")])
    teacher_ckpt, teacher_steps = st["checkpoint"], _steps(st["checkpoint"])
    record("teacher (MoCo)", args.teacher_arch, teacher_ckpt, teacher_steps, wall, args.teacher_small_input)

    def warm(epochs: int) -> list[str]:  # SEED's 5 warm-up epochs of 200, shrunk for short runs; same for MoCo-only
        return ["--warmup-epochs", f"{min(5.0, 0.1 * epochs):g}"]

    st, wall = _train(common + student_recipe + ["--method", "seed", "--teacher-ckpt", teacher_ckpt,
                                                 "--teacher-arch", args.teacher_arch, "--seed-k", str(args.queue),
                                                 "--epochs", str(args.seed_epochs), *warm(args.seed_epochs),
                                                 "--ckpt-dir", os.path.join(out, "seed")])
    seed_ckpt, seed_steps, seed_wall = st["checkpoint"], _steps(st["checkpoint"]), wall
    record("SEED student", args.student_arch, seed_ckpt, seed_steps, seed_wall)

    from smallssl.checkpoints.seed2moco import distill_ckpt2moco_ckpt

    converted = distill_ckpt2moco_ckpt(seed_ckpt)
    st, wall = _train(common + student_recipe + ["--method", "moco", *q, "--epochs", str(args.restart_epochs),
                                                 "--resume", converted, "--restart",
                                                 "--ckpt-dir", os.path.join(out, "restart")])
    record("SEED + MoCo restart", args.student_arch, st["checkpoint"], seed_steps + _steps(st["checkpoint"]),
           seed_wall + wall)

    budgets = [args.seed_epochs] + ([] if args.skip_long_baseline or not args.restart_epochs
                                    else [args.seed_epochs + args.restart_epochs])
    for epochs in budgets:
        st, wall = _train(common + student_recipe + ["--method", "moco", *q, "--epochs", str(epochs), *warm(epochs),
                                                     "--ckpt-dir", os.path.join(out, f"moco_only_{epochs}ep")])
        record(f"MoCo-only student ({epochs} ep)", args.student_arch, st["checkpoint"], _steps(st["checkpoint"]),
               wall)
    record("random init student", args.student_arch, None, 0, 0.0)

    for row in rows:
        t0 = time.time()
        row.update({f"knn_{k}": v for k, v in _knn(row["arch"], row["checkpoint"], root, size, args,
                                                              row["small_input"]).items()})
        row["knn_s"] = time.time() - t0
    print_table(rows)
    result = {"rows": rows, "data": root, "image_size": size, "batch_size": b}
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(result, f, indent=1)
    return result


def _steps(ckpt: str) -> int:
    from smallssl.checkpoints import load_checkpoint_file

    return int(load_checkpoint_file(ckpt).get("step", 0))


def print_table(rows: list[dict]) -> None:
    print("\n| model | arch | train steps | train wall (s) | kNN top-1 (%) | kNN top-5 (%) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['arch']} | {r['train_steps']} | {r['train_s']:.0f} | {r['knn_top1']:.2f} | "
              f"{r['knn_top5']:.2f} |")
    print("kNN: DINO protocol (L2-normalised backbone features, cosine, weighted vote, k=20, T=0.07)")


def main(argv: list[str] | None = None) -> dict:
    return run(get_args_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(run_cli(main))
