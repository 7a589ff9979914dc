"""smallssl's MoCo beside lightly's MoCo v2: same images, same backbone, same wall clock, the same kNN code.

Rows of the table, each scored by DINO's weighted kNN (cosine, k=20, T=0.07; :func:`eval.knn.dino_knn` on
:func:`eval.features.extract_features` of the backbone in eval mode; bank = the whole train split, queries = the
whole val split, both decoded once at ``--image-size`` by :func:`smallssl.data.memdata.load_images`):

- **random init**: ``-a`` at random init (seed ``--seed``), for reference.
- **smallssl**: ``main_moco.main`` with ``--smallssl-flags`` (default: the first ``make demo`` recipe at 64 px,
  batch 128). Its steps come from a measured step time (:func:`calibrate`: ``experiments.bench_train`` plus the
  batched augmentation), so that the cosine schedule spans about ``--budget-s`` seconds of training (measured: the
  steps may miss it by ~10%; its ``train_s`` is the real figure, online kNN time excluded).
- **lightly**: lightly's MoCo v2 (``lightly.loss.NTXentLoss`` with a memory bank, ``MoCoProjectionHead``,
  ``update_momentum``, ``MoCoV2Transform``), written against lightly's API after its own examples, on the same
  backbone (:func:`smallssl.backbones.create_backbone`) and the same decoded images; it trains with a constant lr
  for as many seconds as the smallssl row really trained (``--budget-s`` without that row), or exactly
  ``--steps``.

``--data`` takes a folder or a dataset name of ``../shared/data`` (unpacked into the cache); ``--per-class T V``
uses the first T train / V val images of every class (a symlinked, class-balanced subset, e.g. CIFAR-10 at 64 px);
``--image-size`` replaces the smallssl flags' size for all rows. ``--steps N`` replaces the wall-clock budget by
N steps for both (equal steps). Needs ``pip install lightly``
for the lightly row (``--peers random smallssl`` runs without it). Caltech-101 at 64 px, 180 s each::

    python -m experiments.compare_peers --budget-s 180 --out runs/peers

Prints one Markdown table and writes ``OUT/results.json``. A row whose final loss is within 2% of the loss of
the uniform solution (every logit equal: ln(K+1) per direction) is marked collapsed.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import shlex
import sys
import time

import torch
import torch.nn as nn

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

import main_moco  # noqa: E402
from eval.features import build_model, extract_features  # noqa: E402
from eval.knn import dino_knn  # noqa: E402
from experiments.bench_train import bench  # noqa: E402
from smallssl.backbones import create_backbone  # noqa: E402
from smallssl.data.batch_aug import BatchAugment  # noqa: E402
from smallssl.data.cache import balanced_subset, default_cache_dir, prepare_dataset  # noqa: E402
from smallssl.data.memdata import NormalizedImages, load_images  # noqa: E402
from smallssl.diagnostics import collapse_value, is_collapsed_loss  # noqa: E402
from smallssl.errors import run_cli  # noqa: E402
from smallssl.logging import read_jsonl  # noqa: E402

# The first `make demo` recipe (tuned on CIFAR-10 at 32 px) as a new user runs it at 64 px with batch 128: the short-
# budget baseline that falls below random init on Caltech-101 at 64 px. The symmetric loss is the sum of both
# directions, so lr 0.01 / wd 1e-3 here make the same SGD updates as the average at lr 0.02 / wd 5e-4.
BASELINE = ["-a", "resnet18", "--no-small-input", "--image-size", "64", "-b", "128", "--batch-aug", "--lr", "0.01",
            "--cos", "--wd", "1e-3", "--mlp", "--moco-dim", "128", "--moco-t", "0.2", "--moco-m", "0.9",
            "--moco-k", "512", "--moco-symmetric", "--aug-plus", "--gaussian-blur", "0", "--min-crop-scale", "0.2"]
KNN_K, KNN_T = 20, 0.07


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("compare_peers", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default="caltech101",
                   help="ImageFolder root with train/ and val/, or a dataset name of ../shared/data (caltech101, "
                        "cifar10, cifar100) unpacked into the cache")
    p.add_argument("--per-class", nargs=2, type=int, default=None, metavar=("TRAIN", "VAL"),
                   help="use the first TRAIN / VAL images of every class (a class-balanced subset, symlinked)")
    p.add_argument("--image-size", type=int, default=None,
                   help="replaces --image-size of the smallssl flags (shared with lightly and the kNN)")
    p.add_argument("--peers", nargs="+", default=["random", "smallssl", "lightly"],
                   choices=["random", "smallssl", "lightly"])
    p.add_argument("--out", default="runs/compare_peers")
    p.add_argument("--budget-s", default=180.0, type=float, help="training wall-clock seconds per trained row")
    p.add_argument("--steps", default=0, type=int, help="train exactly N steps per row instead of --budget-s")
    p.add_argument("--smallssl-flags", default=shlex.join(BASELINE),
                   help="main_moco.py flags of the smallssl row (-a, -b and --image-size are shared with lightly)")
    p.add_argument("--lightly-k", default=4096, type=int, help="memory bank size (lightly's MoCo examples: 4096)")
    p.add_argument("--lightly-m", default=0.99, type=float, help="key-encoder momentum (constant)")
    p.add_argument("--lightly-t", default=0.1, type=float, help="NTXentLoss temperature")
    p.add_argument("--lightly-hidden", default=2048, type=int, help="MoCoProjectionHead hidden width")
    p.add_argument("--lightly-lr", default=0.03, type=float, help="constant SGD lr")
    p.add_argument("--lightly-wd", default=5e-4, type=float)
    p.add_argument("--lightly-blur", default=0.5, type=float, help="MoCoV2Transform gaussian_blur probability")
    p.add_argument("-j", "--workers", default=2, type=int, help="DataLoader workers of the lightly row")
    p.add_argument("--print-freq", default=5, type=int, help="steps between the smallssl row's steps.jsonl records")
    p.add_argument("--knn-every", default=0.0, type=float, help="online kNN of the smallssl row every E epochs")
    p.add_argument("--knn-bank-per-class", default=20, type=int, help="online kNN bank (the final kNN uses all)")
    p.add_argument("--knn-val-per-class", default=10, type=int)
    p.add_argument("--threads", default=2, type=int)
    p.add_argument("--seed", default=0, type=int)
    return p


def resolve_data(data: str, per_class: list[int] | None = None) -> str:
    """An existing directory as is, else a dataset name unpacked by :func:`prepare_dataset`; then the
    class-balanced ``per_class`` = (train, val) subset of it when given."""
    root = data if os.path.isdir(data) else prepare_dataset(data)
    return balanced_subset(root, *per_class) if per_class else root


# ------------------------------------------------------------------------------------------ budget
def plan_budget(steps: int, batch: int, n_train: int) -> tuple[int, int]:
    """(epochs, subset) that give ``steps`` steps of ``batch`` images from ``n_train`` images: one pass over a fixed
    subset when it fits, else the fewest passes over ``steps // epochs * batch`` images (a few steps fewer)."""
    if steps < 1 or batch < 1 or n_train < batch:
        raise ValueError(f"need steps >= 1 and 1 <= batch <= n_train, got steps={steps}, batch={batch}, "
                         f"n_train={n_train}")
    epochs = -(-steps * batch // n_train)
    return epochs, steps // epochs * batch


def calibrate(flags: list[str], budget_s: float, steps: int = 3, warmup: int = 2) -> tuple[int, float]:
    """(steps that fit ``budget_s`` seconds, measured seconds per step): the trainer's own step on random data
    (:func:`experiments.bench_train.bench`, ``warmup`` + ``steps`` steps) plus the batched augmentation."""
    a = main_moco.get_args_parser().parse_args(["unused", *flags])
    r = bench(a.arch, a.batch_size, a.image_size, steps=steps, warmup=warmup, device="cpu", amp="none",
              channels_last=False, extra=flags)
    x = torch.randint(0, 256, (a.batch_size, 3, a.image_size, a.image_size), dtype=torch.uint8)
    aug, t0 = BatchAugment(size=a.image_size), time.perf_counter()
    for _ in range(steps):
        aug(x), aug(x)
    per_step = r["ms_per_step"] / 1000 + (time.perf_counter() - t0) / steps
    return max(1, int(budget_s / per_step)), per_step


# ------------------------------------------------------------------------------------------ evaluation
def eval_sets(data: str, image_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """[(train uint8 images (N, 3, S, S), labels (N,)), (val images, labels)], decoded once and cached."""
    return [load_images(os.path.join(data, split), image_size, verbose=False,
                        cache_dir=os.path.join(default_cache_dir(), "mem"))[:2] for split in ("train", "val")]


def mean_class_top1(train: torch.Tensor, train_y: torch.Tensor, test: torch.Tensor, test_y: torch.Tensor,
                    k: int = KNN_K, temperature: float = KNN_T) -> float:
    """Mean over classes of the DINO kNN top-1 (%) of each class's queries (for imbalanced sets: Caltech-101)."""
    accs = [dino_knn(train, train_y, test[test_y == c], test_y[test_y == c], k=k, temperature=temperature)["top1"]
            for c in torch.unique(test_y).tolist()]
    return sum(accs) / len(accs)


def knn_of(backbone: nn.Module, sets: list[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, float]:
    """DINO kNN (k=20, T=0.07) of ``backbone`` (eval mode) with the train set as bank and the val set as queries."""
    (xtr, ytr), (xte, yte) = (extract_features(backbone, NormalizedImages(x, y), batch_size=256, device="cpu")
                              for x, y in sets)
    res = dino_knn(xtr, ytr, xte, yte, k=KNN_K, temperature=KNN_T)
    return {"top1": res["top1"], "top5": res["top5"], "class_top1": mean_class_top1(xtr, ytr, xte, yte)}


# ------------------------------------------------------------------------------------------ smallssl
class _ConstantBackbone(nn.Module):
    """(B, 3, H, W) -> (B, 4) ones: every image gets the same feature (the collapsed solution)."""

    num_features = 4

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.new_ones(x.shape[0], self.num_features)


@torch.no_grad()
def symmetric_loss_scale(symmetric: bool) -> float:
    """What smallssl's MoCo loss is at collapse, in units of ln(K+1): measured on :class:`MoCo` itself with equal
    embeddings and a queue holding that embedding (every logit equal), so it follows whether the symmetric loss
    sums or averages its two directions (1 for the asymmetric loss)."""
    from smallssl.methods import METHODS

    torch.manual_seed(0)
    K = 4
    moco = METHODS["moco"](_ConstantBackbone(), dim=3, K=K, m=0.9, T=0.2, mlp="none", shuffle_bn_splits=1,
                           symmetric=symmetric)
    x = torch.zeros(2, 3, 2, 2)
    moco.queue.copy_(moco._queries(x)[0][:1].expand(K, -1))
    return float(moco([x, x])["loss"]) / math.log(K + 1)


def moco_collapse_loss(flags: list[str]) -> float:
    """The loss ``main_moco`` reports when every logit is equal: :func:`smallssl.diagnostics.collapse_value`
    (ln(K+1) per direction, twice that for the summed symmetric loss; :func:`symmetric_loss_scale` measures it)."""
    a = main_moco.get_args_parser().parse_args(["unused", *flags])
    return collapse_value("moco", K=a.moco_k, symmetric=a.moco_symmetric)


def run_smallssl(flags: list[str], data: str, out_dir: str, steps: int, n_train: int, *, seed: int = 0,
                 print_freq: int = 5, knn_every: float = 0.0, knn_bank_per_class: int | None = None,
                 knn_val_per_class: int | None = None) -> dict:
    """Train ``main_moco.main`` for ``steps`` steps (cosine over exactly those); returns the run's figures."""
    a = main_moco.get_args_parser().parse_args(["unused", *flags])
    epochs, subset = plan_budget(steps, a.batch_size, n_train)
    argv = [data, *flags, "--subset", str(subset), "--epochs", str(epochs), "-j", "2", "--device", "cpu",
            "--seed", str(seed), "--no-progress", "--print-freq", str(print_freq), "--ckpt-dir", out_dir]
    if knn_every:
        argv += ["--knn-every", str(knn_every)]
        argv += ["--knn-bank-per-class", str(knn_bank_per_class)] if knn_bank_per_class else []
        argv += ["--knn-val-per-class", str(knn_val_per_class)] if knn_val_per_class else []
    t0 = time.time()
    status = main_moco.main(main_moco.get_args_parser().parse_args(argv))
    wall = time.time() - t0
    epochs_log = read_jsonl(os.path.join(out_dir, "log.jsonl"))
    step_log = read_jsonl(os.path.join(out_dir, "steps.jsonl"))
    diag = [r for r in step_log if "emb_std" in r]
    loss = epochs_log[-1]["loss"]
    collapse = moco_collapse_loss(flags)
    knn_s = sum(r.get("knn_time_s", 0.0) for r in step_log if "knn_top1" in r)  # the epochs' time_s includes it
    row = {"steps": int(sum(r["steps"] for r in epochs_log)),
           "train_s": sum(r["time_s"] for r in epochs_log) - knn_s, "online_knn_s": knn_s,
           "wall_s": wall, "loss": loss, "acc1": epochs_log[-1].get("acc1"), "collapse_loss": collapse,
           "collapsed": is_collapsed_loss(loss, collapse),
           "first_epoch_loss": epochs_log[0]["loss"], "first_epoch_acc1": epochs_log[0].get("acc1"),
           "knn_curve": [(r["step"], r["knn_top1"]) for r in step_log if "knn_top1" in r],
           "collapse_warnings": [(r["step"], r["collapse_warning"]) for r in step_log if "collapse_warning" in r],
           "loss_curve": [(r["step"], r["loss"], r.get("acc1")) for r in step_log if "loss" in r],
           **{f"{which}_diag": {k: rec[k] for k in ("step", "emb_std", "emb_std_ref", "emb_rank", "feat_rank")
                                  if k in rec} for which, rec in (("first", diag[0] if diag else {}),
                                                                  ("last", diag[-1] if diag else {}))},
           "checkpoint": status["checkpoint"], "command": "python main_moco.py " + shlex.join(argv)}
    return row


def score_smallssl(flags: list[str], data: str, out_dir: str, sets: list[tuple[torch.Tensor, torch.Tensor]], *,
                   steps: int, budget_s: float, calib_steps: int = 3, calib_warmup: int = 2, seed: int = 0,
                   **run_kwargs) -> dict:
    """:func:`run_smallssl` for ``steps`` steps (or the steps :func:`calibrate` fits in ``budget_s`` when 0), then
    the kNN of its backbone on ``sets``: the row's figures with ``calibrated_s_per_step``."""
    steps, per_step = (steps, None) if steps > 0 else calibrate(flags, budget_s, steps=calib_steps,
                                                                warmup=calib_warmup)
    print(f"=> {out_dir}: {steps} steps" + (f" ({per_step:.2f} s/step measured)" if per_step else ""), flush=True)
    row = run_smallssl(flags, data, out_dir, steps, len(sets[0][1]), seed=seed, **run_kwargs)
    a = main_moco.get_args_parser().parse_args(["unused", *flags])
    model = build_model(a.arch, pretrained=row["checkpoint"], small_input=main_moco.small_input(a), seed=seed,
                        verbose=False)
    return {"calibrated_s_per_step": per_step, **row, **knn_of(model, sets)}


def record(rows: list[dict], row: dict, out_dir: str) -> None:
    """Append ``row``, print it as JSON and rewrite ``out_dir/results.json`` (so a stopped run keeps its rows)."""
    rows.append(row)
    print(json.dumps(row), flush=True)
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump(rows, f, indent=1)


# ------------------------------------------------------------------------------------------ lightly
class _PILViews(torch.utils.data.Dataset):
    """The decoded uint8 images as PIL images through a two-view transform (lightly's ``MoCoV2Transform``)."""

    def __init__(self, images: torch.Tensor, transform):
        self.images, self.transform = images, transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        from torchvision.transforms.functional import to_pil_image

        return self.transform(to_pil_image(self.images[i]))


class LightlyMoCo(nn.Module):
    """MoCo v2 from lightly's building blocks: backbone + ``MoCoProjectionHead(D, hidden, 128)``, a momentum copy
    of both (``deactivate_requires_grad``), NTXentLoss(T) with a memory bank of ``K`` keys (rows (K, 128))."""

    def __init__(self, backbone: nn.Module, K: int = 4096, T: float = 0.1, hidden: int = 2048, dim: int = 128):
        super().__init__()
        from lightly.loss import NTXentLoss
        from lightly.models.modules import MoCoProjectionHead
        from lightly.models.utils import deactivate_requires_grad

        self.backbone = backbone
        self.projection_head = MoCoProjectionHead(backbone.num_features, hidden, dim)
        self.backbone_momentum = copy.deepcopy(backbone)
        self.projection_head_momentum = copy.deepcopy(self.projection_head)
        deactivate_requires_grad(self.backbone_momentum)
        deactivate_requires_grad(self.projection_head_momentum)
        self.criterion = NTXentLoss(temperature=T, memory_bank_size=(K, dim))

    def forward(self, x_q: torch.Tensor, x_k: torch.Tensor, m: float) -> torch.Tensor:
        """x_q, x_k: (B, 3, H, W) views. Momentum update, then the InfoNCE loss of queries vs keys + bank."""
        from lightly.models.utils import update_momentum

        update_momentum(self.backbone, self.backbone_momentum, m=m)
        update_momentum(self.projection_head, self.projection_head_momentum, m=m)
        query = self.projection_head(self.backbone(x_q))
        key = self.projection_head_momentum(self.backbone_momentum(x_k)).detach()
        return self.criterion(query, key)


def run_lightly(images: torch.Tensor, *, arch: str, small_input: bool, image_size: int, batch_size: int,
                budget_s: float, steps: int = 0, K: int = 4096, m: float = 0.99, T: float = 0.1,
                hidden: int = 2048, lr: float = 0.03, wd: float = 5e-4, blur: float = 0.5, workers: int = 2,
                seed: int = 0) -> tuple[dict, nn.Module]:
    """Train lightly's MoCo v2 on ``images`` (N, 3, S, S) uint8 for ``budget_s`` seconds (or ``steps`` steps when
    > 0). Returns (figures, the trained backbone)."""
    from lightly.transforms.moco_transform import MoCoV2Transform

    torch.manual_seed(seed)
    model = LightlyMoCo(create_backbone(arch, small_input=small_input), K=K, T=T, hidden=hidden)
    transform = MoCoV2Transform(input_size=image_size, gaussian_blur=blur)
    loader = torch.utils.data.DataLoader(_PILViews(images, transform), batch_size=batch_size, shuffle=True,
                                         drop_last=True, num_workers=workers, persistent_workers=workers > 0,
                                         generator=torch.Generator().manual_seed(seed))
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=wd)
    model.train()
    n, t_train, losses, epoch_losses = 0, 0.0, [], []
    done = False
    while not done:
        epoch_losses = []
        t0 = time.perf_counter()
        for x_q, x_k in loader:  # the loader's wait counts: it is this pipeline's cost
            loss = model(x_q, x_k, m)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            n += 1
            epoch_losses.append(float(loss.detach()))
            now = time.perf_counter()
            t_train, t0 = t_train + now - t0, now
            done = (n >= steps) if steps > 0 else (t_train >= budget_s)
            if done:
                break
        losses.append(sum(epoch_losses) / max(len(epoch_losses), 1))
    collapse = math.log(K + 1)
    row = {"steps": n, "train_s": t_train, "loss": losses[-1], "first_epoch_loss": losses[0], "acc1": None,
           "collapse_loss": collapse, "collapsed": is_collapsed_loss(losses[-1], collapse),
           "command": f"run_lightly(K={K}, m={m}, T={T}, hidden={hidden}, lr={lr} constant, wd={wd}, blur={blur}, "
                      f"workers={workers})"}
    return row, model.backbone.eval()


# ------------------------------------------------------------------------------------------ table
def markdown_table(rows: list[dict]) -> str:
    """One Markdown row per run: steps, wall clock, final (last-epoch mean) loss vs the collapse loss, kNN."""
    lines = ["| run | steps | train s | final loss | collapse loss | pretext top-1 | kNN top-1 | kNN top-5 | "
             "mean class top-1 |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        loss = "-" if r.get("loss") is None else f"{r['loss']:.4g}" + (" **collapsed**" if r.get("collapsed") else "")
        coll = "-" if r.get("collapse_loss") is None else f"{r['collapse_loss']:.4g}"
        acc = "-" if r.get("acc1") is None else f"{r['acc1']:.1f}"
        lines.append(f"| {r['run']} | {r.get('steps', 0)} | {r.get('train_s', 0.0):.0f} | {loss} | {coll} | {acc} | "
                     f"{r['top1']:.2f} | {r['top5']:.2f} | {r['class_top1']:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    args = get_args_parser().parse_args(argv)
    if args.budget_s <= 0 and args.steps <= 0:
        raise ValueError("give a training budget: --budget-s S > 0 or --steps N > 0")
    torch.set_num_threads(args.threads)
    data = resolve_data(args.data, args.per_class)
    flags = shlex.split(args.smallssl_flags) + (["--image-size", str(args.image_size)] if args.image_size else [])
    a = main_moco.get_args_parser().parse_args(["unused", *flags])
    small = main_moco.small_input(a)
    os.makedirs(args.out, exist_ok=True)
    sets = eval_sets(data, a.image_size)
    rows: list[dict] = []
    if "random" in args.peers:
        torch.manual_seed(args.seed)
        record(rows, {"run": f"random init ({a.arch})",
                      **knn_of(create_backbone(a.arch, small_input=small).eval(), sets)}, args.out)
    # lightly trains for the seconds the smallssl row really trained (its steps come from a measured step time,
    # which may miss --budget-s by ~10%), or --budget-s without that row
    lightly_s = args.budget_s
    if "smallssl" in args.peers:
        row = score_smallssl(flags, data, os.path.join(args.out, "smallssl"), sets, steps=args.steps,
                             budget_s=args.budget_s, seed=args.seed, print_freq=args.print_freq,
                             knn_every=args.knn_every, knn_bank_per_class=args.knn_bank_per_class,
                             knn_val_per_class=args.knn_val_per_class)
        record(rows, {"run": "smallssl MoCo", **row}, args.out)
        lightly_s = row["train_s"]
    if "lightly" in args.peers:
        row, backbone = run_lightly(sets[0][0], arch=a.arch, small_input=small, image_size=a.image_size,
                                    batch_size=a.batch_size, budget_s=lightly_s, steps=args.steps,
                                    K=args.lightly_k, m=args.lightly_m, T=args.lightly_t, hidden=args.lightly_hidden,
                                    lr=args.lightly_lr, wd=args.lightly_wd, blur=args.lightly_blur,
                                    workers=args.workers, seed=args.seed)
        import lightly

        record(rows, {"run": f"lightly {lightly.__version__} MoCo v2", **row, **knn_of(backbone, sets)}, args.out)
    print("\n" + markdown_table(rows))
    return rows


if __name__ == "__main__":
    sys.exit(run_cli(main))
