"""Images/s and peak memory per process of a SwAV training step (multi-crop forward, Sinkhorn, backward, LARS),
single process vs FSDP2 over N processes, with and without activation checkpointing.

    python -m experiments.bench_swav -a regnety_400mf -b 16 --size-crops 96 48 --nmb-crops 2 4 \\
        --modes plain ac fsdp fsdp_ac --steps 5
    python -m experiments.bench_swav -a regnety_400mf -b 64 --size-crops 160 96 --nmb-crops 2 4 --device cuda

Each mode runs in fresh processes (spawned; gloo on CPU, NCCL on GPU); data is a fixed random batch on the
device, so the figure measures the model step, not decoding. ``-b`` is the global batch (split over the FSDP
processes). Memory: CPU = peak resident set size of the process (``getrusage``; includes the ~0.5-0.7 GB of
imported libraries, so ``rss_setup_mb`` after building the model is printed too); GPU = peak allocated.
Any flag of main_moco.py after ``--`` is passed through (e.g. ``-- --swav-prototypes 16000 --amp bf16``).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time

import torch
import torch.multiprocessing as mp

from smallssl.errors import run_cli

MODES = ("plain", "ac", "fsdp", "fsdp_ac")


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _worker(rank: int, world: int, cfg: dict, port: int, out: str) -> None:
    import torch.distributed as dist

    import main_moco
    from smallssl.backbones import create_backbone, default_small_input
    from smallssl.fsdp import enable_activation_checkpointing, fsdp_wrap
    from smallssl.optim import build_optimizer, param_groups

    torch.set_num_threads(cfg["threads"])
    cuda = cfg["device"] == "cuda"
    dev = torch.device("cuda", rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(dev)
    fsdp = cfg["mode"].startswith("fsdp")
    if fsdp:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=world)
    args = main_moco.get_args_parser().parse_args(["unused", "--method", "swav", "-a", cfg["arch"], *cfg["extra"]])
    torch.manual_seed(0)
    small = default_small_input(max(cfg["size_crops"]))
    method = main_moco.build_method(args, create_backbone(cfg["arch"], small_input=small)).to(dev)
    if cfg["mode"].endswith("ac"):
        enable_activation_checkpointing(method)
    amp = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.amp)
    if fsdp:
        fsdp_wrap(method, param_dtype=amp if amp == torch.bfloat16 else None)
    opt = build_optimizer("lars", param_groups(method, 1e-6, exclude_bias_and_norm=True), lr=0.1, weight_decay=1e-6)
    b = cfg["batch"] // world
    g = torch.Generator().manual_seed(rank)
    views = [torch.randn(b, 3, s, s, generator=g).to(dev) for s, n in zip(cfg["size_crops"], cfg["nmb_crops"])
             for _ in range(n)]
    method.train()
    rss_setup = _rss_mb()

    scaler = torch.amp.GradScaler("cuda", enabled=False)  # SwAV trains in bf16 / fp32

    def step(i: int) -> None:  # the trainer's own step (main_moco.train_step), hooks and all
        main_moco.train_step(method, method, views, opt, scaler, i, 10**9, None if fsdp else amp)

    for i in range(cfg["warmup"]):
        step(i)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    if fsdp:
        dist.barrier()
    t0 = time.perf_counter()
    for i in range(cfg["steps"]):
        step(cfg["warmup"] + i)
    if cuda:
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    res = {"rank": rank, "s": dt, "rss_setup_mb": rss_setup,
           "peak_mb": torch.cuda.max_memory_allocated() / 2**20 if cuda
           else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    with open(os.path.join(out, f"{cfg['mode']}_{rank}.json"), "w") as f:
        json.dump(res, f)
    if fsdp:
        dist.destroy_process_group()


def bench(cfg: dict) -> list[dict]:
    from smallssl.dist import free_port

    rows = []
    with tempfile.TemporaryDirectory() as out:
        for mode in cfg["modes"]:
            world = cfg["nproc"] if mode.startswith("fsdp") else 1
            mp.start_processes(_worker, args=(world, {**cfg, "mode": mode}, free_port(), out), nprocs=world,
                               start_method="spawn")
            res = [json.load(open(os.path.join(out, f"{mode}_{r}.json"))) for r in range(world)]
            dt = max(r["s"] for r in res)
            rows.append({"mode": mode, "procs": world, "img_per_s": cfg["steps"] * cfg["batch"] / dt,
                         "ms_per_step": 1000 * dt / cfg["steps"], "peak_mb": max(r["peak_mb"] for r in res),
                         "rss_setup_mb": max(r["rss_setup_mb"] for r in res)})
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-a", "--arch", default="regnety_400mf")
    p.add_argument("-b", "--batch-size", type=int, default=16, help="global batch")
    p.add_argument("--size-crops", type=int, nargs="+", default=[96, 48])
    p.add_argument("--nmb-crops", type=int, nargs="+", default=[2, 4])
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    p.add_argument("--nproc", type=int, default=2, help="FSDP processes")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=1, help="torch threads per process (CPU)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    p.add_argument("extra", nargs=argparse.REMAINDER, help="-- then main_moco.py flags (swav group)")
    a = p.parse_args(argv)
    extra = a.extra[1:] if a.extra[:1] == ["--"] else a.extra
    if a.batch_size % a.nproc:
        raise ValueError(f"--batch-size {a.batch_size} must be a multiple of --nproc {a.nproc}")
    cfg = dict(arch=a.arch, batch=a.batch_size, size_crops=a.size_crops, nmb_crops=a.nmb_crops, modes=a.modes,
               nproc=a.nproc, steps=a.steps, warmup=a.warmup, threads=a.threads, device=a.device, extra=extra)
    rows = bench(cfg)
    crops = " + ".join(f"{n}x{s}" for n, s in zip(a.nmb_crops, a.size_crops))
    dev = torch.cuda.get_device_name() if a.device == "cuda" else f"CPU, {a.threads} thread(s)/process"
    print(f"SwAV step, {a.arch}, global batch {a.batch_size}, crops {crops}, {dev}, extra {' '.join(extra) or '-'}")
    print("| mode | processes | img/s | ms/step | peak MB / process | MB after setup |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['mode']} | {r['procs']} | {r['img_per_s']:.1f} | {r['ms_per_step']:.0f} | {r['peak_mb']:.0f} | "
              f"{r['rss_setup_mb']:.0f} |")
    return rows


if __name__ == "__main__":
    sys.exit(run_cli(main))
