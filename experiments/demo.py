"""``make demo``: MoCo v2 on CIFAR-10, then weighted kNN of the pretrained encoder vs the same net at random init.

    python -m experiments.demo                 # default budget (see README for time and figures)
    python -m experiments.demo --epochs 20     # longer budget

Data: ``../shared/data/cifar10.tar.gz`` unpacked to ``$SMALLSSL_CACHE`` (default ``~/.cache/smallssl``); where
the tarball is absent it falls back to torchvision's CIFAR-10 (``download=True``, needs the internet),
converted to the same ImageFolder layout. kNN: DINO protocol (cosine, k=20, T=0.07), bank = train split,
queries = val split, BN in eval mode, one network for bank and queries.
"""

from __future__ import annotations

import argparse
import os
import time

import torch

import main_moco
from eval.features import build_model, extract_features
from eval.knn import dino_knn
from smallssl.data import SafeImageFolder, eval_transform
from smallssl.datasets_cache import dataset_available, default_cache_dir, prepare_dataset

# The default recipe: chosen to pass random init fastest on a 2-core CPU (see README "Demo").
# Short runs need a fast key encoder (m=0.99, as in MoCo's CIFAR demo) or the queue holds stale keys.
RECIPE = ["-a", "resnet18", "--no-small-input", "--image-size", "32", "--lr", "0.06", "--cos",
          "--mlp", "--moco-t", "0.1", "--moco-m", "0.99", "--moco-dim", "128", "--aug-plus", "--gaussian-blur", "0",
          "--min-crop-scale", "0.2", "--print-freq", "20"]


def cifar10_root(cache: str) -> str:
    if dataset_available("cifar10"):
        return prepare_dataset("cifar10", cache_dir=cache)
    return _torchvision_cifar10(cache)


def _torchvision_cifar10(cache: str) -> str:
    """ImageFolder copy of torchvision's CIFAR-10 (downloads it: only where the internet is reachable)."""
    import torchvision

    root = os.path.join(cache, "cifar10-torchvision")
    if os.path.exists(os.path.join(root, ".complete")):
        return root
    for split, train in (("train", True), ("val", False)):
        try:
            ds = torchvision.datasets.CIFAR10(os.path.join(cache, "raw"), train=train, download=True)
        except Exception as e:  # network errors come in many types
            raise FileNotFoundError("CIFAR-10 not found: ../shared/data/cifar10.tar.gz is absent (set "
                                    f"SMALLSSL_DATA to its folder) and the download failed ({e})") from e
        for i, (img, label) in enumerate(ds):
            d = os.path.join(root, split, ds.classes[label])
            os.makedirs(d, exist_ok=True)
            img.save(os.path.join(d, f"{i:05d}.png"))
    open(os.path.join(root, ".complete"), "w").close()
    return root


def knn_eval(arch: str, ckpt: str | None, data: str, image_size: int, small_input: bool, batch: int,
             workers: int) -> dict[str, float]:
    model = build_model(arch, ckpt, small_input=small_input, image_size=image_size, seed=0, verbose=False)
    tf = eval_transform(image_size)
    train = SafeImageFolder(os.path.join(data, "train"), tf)
    val = SafeImageFolder(os.path.join(data, "val"), tf)
    f_train, y_train = extract_features(model, train, batch_size=batch, workers=workers)
    f_val, y_val = extract_features(model, val, batch_size=batch, workers=workers)
    return dino_knn(f_train, y_train, f_val, y_val, k=20, temperature=0.07)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=3, help="pretraining epochs over the 50k CIFAR-10 images")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--moco-k", type=int, default=4096)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--out", default=os.path.join(default_cache_dir(), "demo-run"), help="checkpoint dir")
    p.add_argument("--cache", default=None, help="dataset cache dir (default $SMALLSSL_CACHE or ~/.cache/smallssl)")
    p.add_argument("--skip-train", action="store_true", help="only evaluate the newest checkpoint in --out")
    a = p.parse_args(argv)
    cache = a.cache or default_cache_dir()
    t0 = time.time()
    data = cifar10_root(cache)
    ckpt = os.path.join(a.out, f"checkpoint_{a.epochs:04d}.pth.tar")
    if not a.skip_train:
        args = main_moco.get_args_parser().parse_args(
            [data, *RECIPE, "--epochs", str(a.epochs), "-b", str(a.batch_size), "--moco-k", str(a.moco_k),
             "-j", str(a.workers), "--ckpt-dir", a.out, "--resume", "auto"])
        print(f"=> pretraining: python main_moco.py {data} {' '.join(RECIPE)} --epochs {a.epochs} "
              f"-b {a.batch_size} --moco-k {a.moco_k} -j {a.workers} --ckpt-dir {a.out}")
        main_moco.main(args)
    t_train = time.time() - t0
    print("=> kNN (dino protocol: cosine, weighted, k=20, T=0.07; bank cifar10/train, queries cifar10/val)")
    res_rand = knn_eval("resnet18", None, data, 32, False, 512, a.workers)
    res_pre = knn_eval("resnet18", ckpt, data, 32, False, 512, a.workers)
    total = time.time() - t0
    print("\n| encoder | kNN top-1 | kNN top-5 |\n|---|---|---|")
    print(f"| resnet18 random init | {res_rand['top1']:.2f} | {res_rand['top5']:.2f} |")
    print(f"| resnet18 MoCo v2, {a.epochs} epochs | {res_pre['top1']:.2f} | {res_pre['top5']:.2f} |")
    delta = res_pre["top1"] - res_rand["top1"]
    print(f"\n=> pretrained - random init = {delta:+.2f} points; pretraining {t_train / 60:.1f} min, "
          f"total {total / 60:.1f} min, torch threads {torch.get_num_threads()}")
    return {"random": res_rand["top1"], "pretrained": res_pre["top1"], "minutes": total / 60}


if __name__ == "__main__":
    main()
