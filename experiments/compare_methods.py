"""Equal-budget comparison of the pretraining methods on CIFAR-10: kNN after training.

Every method trains a ResNet-18 through ``main_moco.main`` with the same batch, learning-rate schedule
shape (cosine to 0), weight decay and augmentation (MoCo v2 without blur, ``--batch-aug``); only the method
and its own flags differ. Two budgets:

- ``--budget-s S`` (equal wall clock, the default): each method's step time is measured first
  (:func:`experiments.bench_train.bench` plus the batched augmentation of two views), and the method trains
  ``S / step_time`` steps as one epoch over that many images (``--subset steps x batch``); the cosine
  schedule spans exactly its budget. The measured training wall time is reported beside it.
- ``--budget-s 0``: equal steps (``--subset`` images, ``--epochs``) for every method.

Then each backbone (and a random-init one) is scored by DINO's weighted kNN (cosine, k=20, T=0.07;
:func:`eval.knn.dino_knn`) on the whole train split as the bank and the whole val split as the queries
(``--bank-per-class`` / ``--val-per-class`` take class-balanced subsets instead).

    python -m experiments.compare_methods --budget-s 300 --no-small-input --out runs/compare

Prints a Markdown table and writes ``OUT/results.json`` (the README's table comes from this command).
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
from eval.features import build_model, extract_features, subsample_per_class  # noqa: E402
from eval.knn import dino_knn  # noqa: E402
from experiments.compare_peers import calibrate, plan_budget  # noqa: E402
from smallssl.data.cache import default_cache_dir, prepare_dataset  # noqa: E402
from smallssl.data.memdata import NormalizedImages, load_images  # noqa: E402
from smallssl.diagnostics import collapse_value, is_collapsed_loss  # noqa: E402
from smallssl.errors import run_cli  # noqa: E402

# Method flags for a ResNet-18 on CIFAR (the papers' CIFAR settings where they give them; small projectors).
METHOD_FLAGS: dict[str, list[str]] = {
    "moco": ["--mlp", "--moco-dim", "128", "--moco-t", "0.2", "--moco-m", "0.99", "--moco-k", "4096"],
    "simclr": ["--simclr-t", "0.5", "--simclr-dim", "128"],
    "byol": ["--byol-m", "0.99", "--byol-dim", "256", "--byol-hidden", "4096"],
    "simsiam": ["--simsiam-dim", "2048", "--simsiam-pred-dim", "512", "--simsiam-proj-layers", "2"],
    "barlow": ["--barlow-proj", "2048-2048-2048", "--barlow-lambda", "5e-3"],
    # the first `make demo` recipe (tuned for short CPU budgets: symmetric loss, small fresh queue, low lr;
    # today's demo adds m 0.99, the empty initial queue and the wide_bn head)
    "moco-demo": ["--method", "moco", "--mlp", "--moco-dim", "128", "--moco-t", "0.2", "--moco-m", "0.9",
                  "--moco-k", "512", "--moco-symmetric", "--lr", "0.01", "--wd", "1e-3"],
}
AUG = ["--aug-plus", "--gaussian-blur", "0", "--batch-aug"]


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("compare_methods", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=None, help="ImageFolder root with train/ and val/ (default: cached CIFAR-10)")
    p.add_argument("--methods", nargs="+", default=list(METHOD_FLAGS), choices=list(METHOD_FLAGS))
    p.add_argument("--out", default="runs/compare_methods")
    p.add_argument("--budget-s", default=300.0, type=float,
                   help="training wall-clock seconds per method (0: equal steps from --subset and --epochs)")
    p.add_argument("--subset", default=1024, type=int, help="training images with --budget-s 0")
    p.add_argument("--epochs", default=1, type=int, help="epochs with --budget-s 0")
    p.add_argument("-b", "--batch-size", default=128, type=int)
    p.add_argument("--lr", default=0.06, type=float, help="shared lr (lightly's CIFAR-10 benchmark: 0.06 x b/256)")
    p.add_argument("--wd", default=5e-4, type=float)
    p.add_argument("--image-size", default=32, type=int)
    p.add_argument("--small-input", default=True, action=argparse.BooleanOptionalAction,
                   help="CIFAR stem (default); --no-small-input keeps the ImageNet stem (~12x cheaper at 32 px)")
    p.add_argument("-a", "--arch", default="resnet18")
    p.add_argument("--bank-per-class", default=None, type=int, help="kNN bank: images per class (default all)")
    p.add_argument("--val-per-class", default=None, type=int, help="kNN queries: images per class (default all)")
    p.add_argument("--threads", default=2, type=int)
    p.add_argument("--seed", default=0, type=int)
    return p


def method_flags(args, method: str) -> list[str]:
    """``--method NAME`` plus the entry's flags (an entry's own ``--method``/``--lr`` come later and win)."""
    flags = ["--method", method.split("-")[0], *METHOD_FLAGS[method]]
    if method == "moco":  # the queue must be a multiple of the batch
        flags[flags.index("--moco-k") + 1] = str(max(args.batch_size, 4096 // args.batch_size * args.batch_size))
    return flags


def budget_steps(args, method: str) -> tuple[int, float]:
    """(steps that fit ``args.budget_s``, measured seconds per step incl. augmenting two views)."""
    stem = "--small-input" if args.small_input else "--no-small-input"
    return calibrate(["-a", args.arch, "-b", str(args.batch_size), "--image-size", str(args.image_size), stem,
                      *method_flags(args, method)], args.budget_s)


def train_command(args, method: str, ckpt_dir: str, data: str, subset: int, epochs: int) -> list[str]:
    return [data, "-a", args.arch, "--image-size", str(args.image_size), "--subset",
            str(subset), "--epochs", str(epochs), "-b", str(args.batch_size), "--lr", str(args.lr),
            "--wd", str(args.wd), "--cos", *AUG, "-j", "2", "--device", "cpu", "--seed", str(args.seed),
            "--no-progress", "--print-freq", "1000", "--ckpt-dir", ckpt_dir,
            "--small-input" if args.small_input else "--no-small-input", *method_flags(args, method)]


def eval_sets(args, data: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The kNN bank (train) and queries (val) as in-memory uint8 images and labels, read once per run."""
    sets = []
    for split, per_class in (("train", args.bank_per_class), ("val", args.val_per_class)):
        x, y, _ = load_images(os.path.join(data, split), args.image_size, verbose=False,
                              cache_dir=os.path.join(default_cache_dir(), "mem"))
        keep = subsample_per_class(y.tolist(), per_class)
        sets.append((x[keep], y[keep]))
    return sets


def knn_eval(args, sets: list[tuple[torch.Tensor, torch.Tensor]], ckpt: str | None) -> dict[str, float]:
    """DINO weighted kNN (k=20, T=0.07) of the backbone in ``ckpt`` (random init from ``args.seed`` if None)."""
    model = build_model(args.arch, pretrained=ckpt, small_input=args.small_input, image_size=args.image_size,
                        seed=args.seed, verbose=False)
    (xtr, ytr), (xte, yte) = (extract_features(model, NormalizedImages(x, y), batch_size=500, device="cpu")
                              for x, y in sets)
    return dino_knn(xtr, ytr, xte, yte, k=20, temperature=0.07)


def main(argv: list[str] | None = None) -> list[dict]:
    args = get_args_parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    data = args.data or prepare_dataset("cifar10")
    os.makedirs(args.out, exist_ok=True)
    rows = []
    t0 = time.time()
    sets = eval_sets(args, data)
    n_train = len(load_images(os.path.join(data, "train"), args.image_size, verbose=False,
                              cache_dir=os.path.join(default_cache_dir(), "mem"))[1])
    res = knn_eval(args, sets, None)
    rows.append({"method": "random init", "train_s": 0.0, "steps": 0, "loss": None, **res,
                 "eval_s": time.time() - t0, "command": "(no training)"})
    print(json.dumps(rows[-1]), flush=True)
    for method in args.methods:
        ckpt_dir = os.path.join(args.out, method)
        subset, epochs, per_step = args.subset, args.epochs, None
        if args.budget_s > 0:
            steps, per_step = budget_steps(args, method)
            epochs, subset = plan_budget(steps, args.batch_size, n_train)  # several passes when the set is small
            print(f"=> {method}: {per_step * 1000:.0f} ms/step measured -> {steps} steps in {args.budget_s:.0f} s",
                  flush=True)
        argv_m = train_command(args, method, ckpt_dir, data, subset, epochs)
        t0 = time.time()
        run_args = main_moco.get_args_parser().parse_args(argv_m)
        status = main_moco.main(run_args)
        train_s = time.time() - t0
        ckpt = status["checkpoint"]
        step = int(torch.load(ckpt, map_location="cpu", weights_only=False)["step"])
        t0 = time.time()
        res = knn_eval(args, sets, ckpt)
        value = collapse_value(run_args.method, K=run_args.moco_k, symmetric=run_args.moco_symmetric,
                               batch_size=run_args.batch_size,
                               dim=int(run_args.barlow_proj.split("-")[-1]))
        rows.append({"method": method, "train_s": train_s, "steps": step, "loss": status.get("loss"), **res,
                     "collapse_loss": value, "collapsed": is_collapsed_loss(status.get("loss"), value),
                     "calibrated_s_per_step": per_step,
                     "eval_s": time.time() - t0, "command": "python main_moco.py " + " ".join(argv_m)})
        print(json.dumps(rows[-1]), flush=True)
        with open(os.path.join(args.out, "results.json"), "w") as f:
            json.dump(rows, f, indent=1)
    print("\n| method | steps | final loss | train wall (s) | kNN top-1 (%) | kNN top-5 (%) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        loss = "-" if r["loss"] is None else f"{r['loss']:.4g}"
        if r.get("collapsed"):  # within 2% of the loss every collapsed run reports (e.g. ln(K+1) for MoCo)
            loss += f" **collapsed** (~{r['collapse_loss']:.4g})"
        print(f"| {r['method']} | {r['steps']} | {loss} | {r['train_s']:.0f} | {r['top1']:.2f} | {r['top5']:.2f} |")
    return rows


if __name__ == "__main__":
    sys.exit(run_cli(main))
