"""Images/s of full training steps (forward, backward, optimiser, momentum update, enqueue) on in-memory data.

    python -m experiments.bench_train -a resnet18 --batch-size 64 --image-size 32
    python -m experiments.bench_train -a mobilenetv3_small --batch-size 32 --image-size 224 --steps 5

Data is a fixed random batch already on the device, so the figure measures the model step, not decoding.
Any flag of main_moco.py after ``--`` is passed through (e.g. ``-- --method simclr --mlp wide``).
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

import main_moco
from smallssl.errors import run_cli
from smallssl.optim import build_optimizer, param_groups


def bench(arch: str, batch_size: int, image_size: int, steps: int, warmup: int, device: str, amp: str,
          channels_last: bool, extra: list[str]) -> dict:
    args = main_moco.get_args_parser().parse_args(
        ["unused", "-a", arch, "--moco-k", str(max(4096 // batch_size, 1) * batch_size), *extra])
    args.image_size = image_size
    dev = torch.device(device)
    model = main_moco.build_method(args, main_moco.build_backbone(args))
    mf = torch.channels_last if channels_last else torch.contiguous_format
    model.to(dev, memory_format=torch.channels_last if channels_last else torch.preserve_format)
    opt = build_optimizer("sgd", param_groups(model, 1e-4), lr=0.03)
    scaler = torch.amp.GradScaler("cuda", enabled=amp == "fp16")
    # the views the method trains on: two for the two-view methods, SwAV's multi-crop sizes for swav
    sizes = main_moco.swav_size_crops(args) if args.method == "swav" else [image_size]
    counts = args.nmb_crops if args.method == "swav" else [1 if args.method == "seed" else 2]
    views = [torch.randn(batch_size, 3, s, s, device=dev).contiguous(memory_format=mf)
             for s, n in zip(sizes, counts) for _ in range(n)]
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)
    model.train()
    it = iter(range(10**9))

    def step() -> None:  # the trainer's own step (main_moco.train_step), hooks and all
        main_moco.train_step(model, model, views, opt, scaler, next(it), 10**9, amp_dtype)

    for _ in range(warmup):
        step()
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    if dev.type == "cuda":
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    mem = torch.cuda.max_memory_allocated() / 2**20 if dev.type == "cuda" else float("nan")
    return {"arch": arch, "method": args.method, "batch": batch_size, "size": image_size, "device": device,
            "amp": amp, "img_per_s": steps * batch_size / dt, "ms_per_step": 1000 * dt / steps, "peak_mb": mem}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-a", "--arch", default="resnet18")
    p.add_argument("-b", "--batch-size", type=int, default=64)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--amp", default="none", choices=["none", "bf16", "fp16"])
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads on CPU")
    p.add_argument("extra", nargs=argparse.REMAINDER, help="-- then main_moco.py flags")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    extra = a.extra[1:] if a.extra[:1] == ["--"] else a.extra
    r = bench(a.arch, a.batch_size, a.image_size, a.steps, a.warmup, a.device, a.amp, a.channels_last, extra)
    print("| arch | method | batch | image size | device | amp | img/s | ms/step | peak MB |")
    print("|---|---|---|---|---|---|---|---|---|")
    print(f"| {r['arch']} | {r['method']} | {r['batch']} | {r['size']} | {r['device']} (threads "
          f"{torch.get_num_threads()}) | {r['amp']} | {r['img_per_s']:.1f} | {r['ms_per_step']:.1f} | "
          f"{r['peak_mb']:.0f} |")


if __name__ == "__main__":
    sys.exit(run_cli(main))
