"""One factor at a time from the short-budget MoCo baseline that falls below random init (Caltech-101, 64 px).

The baseline is :data:`experiments.compare_peers.BASELINE` (the first ``make demo`` recipe at 64 px, batch 128: the
summed symmetric loss at lr 0.01 / wd 1e-3 cosine, i.e. the average at lr 0.02 / wd 5e-4; K=512, m=0.9, T=0.2,
MoCo v2 head, ResNet-18 ImageNet stem, ``--batch-aug``). Each row adds the flags of one entry of
:data:`ABLATIONS` and trains for the same measured wall clock (``--budget-s``; steps from
:func:`experiments.compare_peers.calibrate`), with the online kNN every ``--knn-every`` epochs on a class-balanced
subset; then the final DINO kNN (k=20, T=0.07) of the backbone on the whole train (bank) and val (queries) splits.
Per row: steps, final loss beside the loss of the uniform solution (ln(K+1) per direction), pretext top-1 in the
first and last epoch, the embedding std / effective rank of the last print step, the online kNN curve.

    python -m experiments.ablate_moco --budget-s 180 --out runs/ablate --only random baseline t0.1 splits1

Prints a Markdown table and writes ``OUT/results.json`` (one JSON object per row, commands included).
"""

from __future__ import annotations

import argparse
import math
import os
import shlex
import sys

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

import main_moco  # noqa: E402
from experiments.compare_peers import (  # noqa: E402
    BASELINE,
    eval_sets,
    knn_of,
    moco_collapse_loss,
    record,
    resolve_data,
    score_smallssl,
)
from smallssl.backbones import create_backbone  # noqa: E402
from smallssl.errors import run_cli  # noqa: E402

# name -> (what changes, flags appended to BASELINE; argparse keeps the last value of a repeated flag)
ABLATIONS: dict[str, tuple[str, list[str]]] = {
    "baseline": ("the baseline", []),
    "t0.1": ("T 0.2 -> 0.1", ["--moco-t", "0.1"]),
    "splits1": ("--shuffle-bn-splits 2 -> 1 (no single-process shuffle-BN emulation)", ["--shuffle-bn-splits", "1"]),
    "k4096": ("K 512 -> 4096 with m 0.9 -> 0.99", ["--moco-k", "4096", "--moco-m", "0.99"]),
    "m0.99": ("m 0.9 -> 0.99 (K stays 512)", ["--moco-m", "0.99"]),
    "lr0.03": ("lr 0.01 -> 0.03 (summed symmetric loss: the average at lr 0.06, MoCo's CIFAR demo)", ["--lr", "0.03"]),
    "head2048": ("head v2 (512 hidden) -> wide_bn (2048 hidden + BN)", ["--mlp", "wide_bn"]),
    "head1024": ("head v2 (512 hidden) -> wide (1024 hidden, no BN)", ["--mlp", "wide"]),
    "small-input": ("ImageNet stem -> CIFAR stem (3x3 stride 1, no max-pool)", ["--small-input"]),
    "empty-queue": ("queue of K random vectors -> empty (only keys written so far)", ["--moco-queue-init", "empty"]),
    "m0.99+empty": ("m 0.99 and the empty queue together", ["--moco-m", "0.99", "--moco-queue-init", "empty"]),
    "recipe": ("m 0.99, the empty queue and the wide_bn head together (the short-budget recipe)",
               ["--moco-m", "0.99", "--moco-queue-init", "empty", "--mlp", "wide_bn"]),
    "t0.1+splits1": ("T 0.1 and --shuffle-bn-splits 1 together", ["--moco-t", "0.1", "--shuffle-bn-splits", "1"]),
}


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("ablate_moco", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default="caltech101",
                   help="ImageFolder root with train/ and val/, or a dataset name of ../shared/data (caltech101, "
                        "cifar10, cifar100) unpacked into the cache")
    p.add_argument("--only", nargs="+", default=["random", *ABLATIONS], choices=["random", "random-small", *ABLATIONS],
                   help="rows to run, in this order (random / random-small: random init, ImageNet / CIFAR stem)")
    p.add_argument("--extra", default="", help="flags appended to every trained row (after the ablation's)")
    p.add_argument("--out", default="runs/ablate_moco")
    p.add_argument("--budget-s", default=180.0, type=float, help="training wall-clock seconds per row")
    p.add_argument("--steps", default=0, type=int, help="exactly N steps per row instead of --budget-s")
    p.add_argument("--calib-steps", default=2, type=int, help="timed steps of the step-time measurement")
    p.add_argument("--knn-every", default=0.5, type=float, help="online kNN every E epochs (0 = only the final)")
    p.add_argument("--knn-bank-per-class", default=20, type=int, help="online kNN bank per class (final kNN: all)")
    p.add_argument("--knn-val-per-class", default=10, type=int)
    p.add_argument("--print-freq", default=5, type=int)
    p.add_argument("--threads", default=2, type=int)
    p.add_argument("--seed", default=0, type=int)
    return p


def ablation_flags(name: str, extra: str = "") -> list[str]:
    """BASELINE + the ablation's flags + ``extra``."""
    if name not in ABLATIONS:
        raise ValueError(f"unknown ablation {name!r}; choose from {', '.join(ABLATIONS)}")
    return [*BASELINE, *ABLATIONS[name][1], *shlex.split(extra)]


def per_direction(loss: float | None, flags: list[str]) -> float | None:
    """The loss of one direction (the summed symmetric MoCo loss adds up two InfoNCE terms)."""
    a = main_moco.get_args_parser().parse_args(["unused", *flags])
    return None if loss is None else loss * math.log(a.moco_k + 1) / moco_collapse_loss(flags)


def table(rows: list[dict]) -> str:
    """Markdown: one row per ablation (losses per direction, so each compares with ln(K+1))."""
    lines = ["| run | steps | train s | loss, 1st epoch -> final (per direction) | ln(K+1) | final / ln(K+1) | "
             "pretext top-1, 1st -> last epoch | emb std (ref) / emb rank / feat rank, 1st -> last record | "
             "online kNN (step: top-1) | kNN top-1 | mean class top-1 |", "|---" * 11 + "|"]
    for r in rows:
        if "loss" not in r:
            lines.append(f"| {r['run']} | 0 | - | - | - | - | - | - | - | {r['top1']:.2f} | {r['class_top1']:.2f} |")
            continue
        diag = " -> ".join(f"{d.get('emb_std', float('nan')):.3f} ({d.get('emb_std_ref', float('nan')):.3f}) / "
                           f"{d.get('emb_rank', float('nan')):.1f} / {d.get('feat_rank', float('nan')):.1f}"
                           for d in (r.get("first_diag", {}), r.get("last_diag", {})))
        curve = ", ".join(f"{s}: {v:.1f}" for s, v in r.get("knn_curve", []))
        mark = " **collapsed**" if r.get("collapsed") else ""
        if r.get("collapse_warnings"):  # the trainer's own warning (embedding std / rank), first step it fired
            mark += f" (warned at step {r['collapse_warnings'][0][0]})"
        lines.append(f"| {r['run']} | {r['steps']} | {r['train_s']:.0f} | {r['loss_dir_first']:.3f} -> "
                     f"{r['loss_dir']:.3f}{mark} | {r['ln_k1']:.3f} | {r['loss_dir'] / r['ln_k1']:.3f} | "
                     f"{r['first_epoch_acc1']:.1f} -> {r['acc1']:.1f} | {diag} | {curve} | {r['top1']:.2f} | "
                     f"{r['class_top1']:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    args = get_args_parser().parse_args(argv)
    if args.budget_s <= 0 and args.steps <= 0:
        raise ValueError("give a training budget: --budget-s S > 0 or --steps N > 0")
    torch.set_num_threads(args.threads)
    data = resolve_data(args.data)
    base = main_moco.get_args_parser().parse_args(["unused", *BASELINE, *shlex.split(args.extra)])
    os.makedirs(args.out, exist_ok=True)
    sets = eval_sets(data, base.image_size)
    rows: list[dict] = []
    for name in args.only:
        if name in ("random", "random-small"):
            torch.manual_seed(args.seed)
            small = name == "random-small"
            row = {"run": f"random init ({base.arch}, {'CIFAR' if small else 'ImageNet'} stem)",
                   **knn_of(create_backbone(base.arch, small_input=small).eval(), sets)}
        else:
            flags = ablation_flags(name, args.extra)
            row = score_smallssl(flags, data, os.path.join(args.out, name), sets, steps=args.steps,
                                 budget_s=args.budget_s, calib_steps=args.calib_steps, calib_warmup=1, seed=args.seed,
                                 print_freq=args.print_freq, knn_every=args.knn_every,
                                 knn_bank_per_class=args.knn_bank_per_class, knn_val_per_class=args.knn_val_per_class)
            k = main_moco.get_args_parser().parse_args(["unused", *flags]).moco_k
            row = {"run": f"{name}: {ABLATIONS[name][0]}", "ablation": name, **row,
                   "loss_dir": per_direction(row["loss"], flags),
                   "loss_dir_first": per_direction(row["first_epoch_loss"], flags), "ln_k1": math.log(k + 1)}
        record(rows, row, args.out)
    print("\n" + table(rows))
    return rows


if __name__ == "__main__":
    sys.exit(run_cli(main))
