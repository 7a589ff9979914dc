#!/usr/bin/env python
"""Self-supervised pretraining: MoCo v2 / ssl-small improved baseline (and the other ``--method``s).

Compatible with the command lines of facebookresearch/moco and of the small-models paper (ssl-small, Shi et al.
2021, arXiv:2107.14762), e.g.::

    python main_moco.py DATA -a mobilenetv3_small --lr 0.06 --batch-size 512 -j 64 --epochs 800 \
        --dist-url 'env://' --multiprocessing-distributed --world-size 1 --rank 0 \
        --mlp wide --moco-t 0.1 --moco-k 65536 --aug-plus --cj 1. --grey-scale 0.5 --gaussian-blur 0.5 \
        --cos --ckpt-dir CKPT --resume converted_seed.pth.tar --restart

Reads top to bottom: get_args_parser -> main (validation, the run lock, process launch) -> main_worker (device,
process group, signals) -> train (build, resume, the epoch loop) -> train_one_epoch -> train_step; then the
per-method glue (build_method, the views, validation). Runs single-process, as N spawned processes (gloo on CPU /
NCCL on GPU), or under torchrun / Slurm (RANK, WORLD_SIZE, LOCAL_RANK in the environment).

Exit codes: 0 done, 2 bad input or an expected failure (one ``error:`` line), 3 stopped by SIGTERM / SIGUSR2
after saving ``checkpoint_last`` (resume with ``--resume auto``), 1 a non-finite final loss.
"""

from __future__ import annotations

import argparse
import math
import os
import random
import sys
import threading
import time
from dataclasses import dataclass

import torch
import torch.nn as nn
from tqdm import tqdm

from eval.online import OnlineKNN
from smallssl import dist as sdist
from smallssl import preempt
from smallssl.backbones import BACKBONES, check_arch, create_backbone, default_small_input
from smallssl.backbones.small_map_conv import use_matmul_weight_grad
from smallssl.checkpoints import build_teacher, latest_checkpoint
from smallssl.checkpoints.io import remove_orphan_temps
from smallssl.checkpoints.lock import RunLock
from smallssl.checkpoints.trainer import resume_training, save_training_checkpoint
from smallssl.curves import write_curves
from smallssl.data import (
    MultiViewTransform,
    ResumableSampler,
    SafeImageFolder,
    SeededViews,
    blur_prob,
    fixed_subset,
    jitter_params,
    multicrop_transform,
    pretrain_transform,
    two_crops,
)
from smallssl.data.batch_aug import BatchAugment
from smallssl.data.cache import default_cache_dir
from smallssl.data.datasets import ViewLoader
from smallssl.data.memdata import BatchViews, load_images
from smallssl.diagnostics import CollapseMonitor
from smallssl.errors import EXIT_PREEMPTED, run_cli
from smallssl.fsdp import enable_activation_checkpointing, fsdp_wrap, gather_into
from smallssl.heads import HEADS
from smallssl.logging import RunLogger
from smallssl.methods import METHODS
from smallssl.methods.barlow import parse_sizes
from smallssl.optim import OPTIMIZERS, build_optimizer, excludes_bias_and_norm, lr_schedule, param_groups, set_lr
from smallssl.queue import check_queue_batch


class NonFiniteLossError(RuntimeError):
    pass


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("smallssl pretraining", add_help=add_help)
    p.add_argument("data", metavar="DIR", help="dataset root; images are read from DIR/train/<class>/<img>")
    p.add_argument("-a", "--arch", default="resnet50",
                   help=f"backbone: {', '.join(sorted(BACKBONES))} or any timm model name")
    p.add_argument("--method", default="moco", choices=sorted(METHODS))
    p.add_argument("-j", "--workers", default=8, type=int, help="data-loading workers per node")
    p.add_argument("--epochs", default=200, type=int)
    p.add_argument("--start-epoch", default=0, type=int, help="ignored when resuming (taken from checkpoint)")
    p.add_argument("-b", "--batch-size", default=256, type=int,
                   help="total batch size per node, split across its processes")
    p.add_argument("--lr", "--learning-rate", default=0.03, type=float, dest="lr")
    p.add_argument("--schedule", default=[120, 160], nargs="*", type=int, help="step-decay epochs (without --cos)")
    p.add_argument("--cos", action="store_true", help="cosine learning-rate schedule")
    p.add_argument("--warmup-epochs", default=0.0, type=float)
    p.add_argument("--momentum", default=0.9, type=float)
    p.add_argument("--wd", "--weight-decay", default=1e-4, type=float, dest="weight_decay")
    p.add_argument("--optimizer", default="sgd", choices=OPTIMIZERS,
                   help="lars = SwAV/SEER's LARC on every parameter; lars-exclude-bn = SimCLR/BYOL's LARS without "
                        "biases and norm weights (no LARS adaptation, no weight decay for them)")
    p.add_argument("-p", "--print-freq", default=10, type=int,
                   help="log the step values (steps.jsonl, progress bar, collapse check) after every N steps and at "
                        "the end of each epoch")
    p.add_argument("--seed", default=0, type=int)
    # checkpoints
    p.add_argument("--ckpt-dir", default="checkpoints", help="where checkpoint_NNNN.pth.tar and log.jsonl go")
    p.add_argument("--resume", default="", help="checkpoint to resume exactly, or 'auto' for the latest in --ckpt-dir")
    p.add_argument("--restart", action="store_true",
                   help="with --resume: load weights only, start at epoch 0 without optimizer state, drop "
                        "shape-mismatched keys, copy the query encoder to the key encoder (ssl-small)")
    p.add_argument("--save-freq", default=1, type=int, help="save every N epochs (and at the end)")
    p.add_argument("--keep-last", default=0, type=int, help="keep only the N newest checkpoints (0 = all)")
    p.add_argument("--break-lock", action="store_true",
                   help="take over --ckpt-dir even if its .lock names another run (e.g. one on another host "
                        "that is known to be gone)")
    # distributed
    p.add_argument("--world-size", default=-1, type=int, help="number of nodes (MoCo semantics)")
    p.add_argument("--rank", default=-1, type=int, help="node rank (MoCo semantics)")
    p.add_argument("--dist-url", default="env://", type=str)
    p.add_argument("--dist-backend", default="auto", choices=["auto", "nccl", "gloo"])
    p.add_argument("--multiprocessing-distributed", action="store_true",
                   help="spawn one process per GPU (or --nproc-per-node on CPU) and train with DDP")
    p.add_argument("--nproc-per-node", default=None, type=int, help="processes per node (default: #GPUs, or 1)")
    p.add_argument("--dist-timeout", default=1800.0, type=float,
                   help="seconds any collective may wait for the other ranks before the job stops with a message "
                        "naming the rank that did not respond (a stopped or hung process)")
    p.add_argument("--gpu", default=None, type=int, help="GPU id for single-process training")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--amp", default="none", choices=["none", "bf16", "fp16"])
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--conv-wgrad", default="auto", choices=["auto", "native"],
                   help="auto: on CPU, convolutions whose output map is <= 2x2 take their weight gradient as an "
                        "im2col matmul (oneDNN's is up to ~10x slower there; smallssl.backbones.small_map_conv); "
                        "native: always torch's own")
    p.add_argument("--tf32", action=argparse.BooleanOptionalAction, default=True,
                   help="on CUDA, fp32 matmuls (and the fused loss kernels) use TF32 tensor cores (~8x the fp32 "
                        "rate on A100/H100, 10-bit mantissa inputs); --no-tf32 keeps full fp32")
    # data
    p.add_argument("--image-size", default=224, type=int, help="crop size (32 for CIFAR)")
    p.add_argument("--small-input", action=argparse.BooleanOptionalAction, default=None,
                   help="CIFAR stem (3x3 stride-1 conv, no max-pool); default: on when --image-size <= 64. "
                        "--no-small-input keeps the ImageNet stem (16x fewer FLOPs at 32px)")
    p.add_argument("--aug-plus", action="store_true", help="MoCo v2 augmentation (blur, stronger jitter)")
    p.add_argument("--cj", default=None, type=float, help="colour-jitter strength c: ColorJitter(.8c,.8c,.8c,.4c)")
    p.add_argument("--grey-scale", default=None, type=float, help="grayscale probability (default 0.2)")
    p.add_argument("--gaussian-blur", default=None, type=float, help="blur probability (default 0.5 with --aug-plus)")
    p.add_argument("--min-crop-scale", default=0.2, type=float)
    p.add_argument("--batch-aug", action="store_true",
                   help="decode the training set once into memory (cached under $SMALLSSL_CACHE/mem) and augment "
                        "whole batches with tensor ops on the training device (smallssl.data.batch_aug) instead of "
                        "PIL per image in DataLoader workers; for small images (CIFAR). Same augmentation "
                        "flags; colour jitter runs before the grey-scale step in both v1 and v2 modes")
    p.add_argument("--subset", default=None, type=int, help="train on a fixed random subset of N images")
    p.add_argument("--skip-bad-images", action="store_true",
                   help="skip unreadable images (replaced by other images of the batch) instead of stopping")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bars")
    # seeing what training learns while it runs
    g = p.add_argument_group("monitoring")
    g.add_argument("--knn-every", default=0.0, type=float,
                   help="online DINO kNN (k=--knn-k, T=--knn-t) of the query backbone every E epochs (fractions "
                        "allowed) and at the end; 0 = off. Results in log.jsonl / steps.jsonl and the progress bar")
    g.add_argument("--knn-data", default=None,
                   help="ImageFolder root with train/ (the bank) and val/ (the queries); default: DATA")
    g.add_argument("--knn-bank-per-class", default=None, type=int, help="first N bank images per class (default all)")
    g.add_argument("--knn-val-per-class", default=None, type=int, help="first M query images per class (default all)")
    g.add_argument("--knn-k", default=20, type=int)
    g.add_argument("--knn-t", default=0.07, type=float)
    g.add_argument("--tensorboard", action="store_true", help="also write TensorBoard events to --ckpt-dir (extra: tb)")
    # MoCo
    g = p.add_argument_group("moco")
    g.add_argument("--moco-dim", default=128, type=int)
    g.add_argument("--moco-k", default=65536, type=int, help="queue size; multiple of the global batch")
    g.add_argument("--moco-queue-init", default="random", choices=["random", "empty"],
                   help="random: unit vectors, as the official code; empty: the loss uses only the keys written so "
                        "far (no step trains against random vectors; matters at short budgets)")
    g.add_argument("--moco-m", default=0.999, type=float)
    g.add_argument("--moco-t", default=0.07, type=float)
    g.add_argument("--moco-symmetric", action="store_true",
                   help="symmetric loss: each view is query and key, the sum of both directions, both keys "
                        "enqueued (MoCo's CIFAR-10 demo)")
    g.add_argument("--mlp", nargs="?", const="v2", default="none", choices=HEADS,
                   help="projection head, ssl-small's names: bare --mlp = simple = MoCo v2 (Linear(d,d)-ReLU-"
                        "Linear(d,dim)), wide = Linear(d,2d)-ReLU-Linear(2d,dim), deep, dropout; smallssl's earlier "
                        "wide/simple are wide_bn/narrow")
    g.add_argument("--shuffle-bn-splits", default=2, type=int,
                   help="single-process shuffle-BN emulation: key/query sub-batches (1 = off)")
    # SEED (Fang et al., ICLR 2021): distil a frozen teacher into -a ARCH. Recipe: --lr 0.03*B/256 (pass the
    # scaled value yourself, e.g. --lr 0.06 for -b 512), --warmup-epochs 5 --cos, --mlp for the student head.
    g = p.add_argument_group("seed")
    g.add_argument("--teacher-ckpt", default="", help="teacher checkpoint: smallssl (MoCo/SwAV), official MoCo / "
                   "ssl-small, SwAV, VISSL/SEER, or a torchvision / timm state dict")
    g.add_argument("--teacher-arch", default=None, help="teacher backbone (default: the checkpoint's 'arch')")
    g.add_argument("--teacher-small-input", action=argparse.BooleanOptionalAction, default=None,
                   help="teacher CIFAR stem (default: as the teacher checkpoint was trained, else as the student)")
    g.add_argument("--teacher-proj", default="auto", choices=["auto", "head", "none", "random"],
                   help="teacher embedding: auto = checkpoint projection head if any, else backbone feature; "
                        "random = fixed random projection of the backbone feature to --seed-dim")
    g.add_argument("--seed-dim", "--teacher-dim", default=128, type=int, dest="seed_dim",
                   help="embedding width of student head and teacher (must match the teacher's)")
    g.add_argument("--seed-k", default=65536, type=int, help="queue of teacher embeddings; multiple of global batch")
    g.add_argument("--seed-t", default=0.2, type=float, help="student temperature")
    g.add_argument("--seed-teacher-t", default=1e-4, type=float, help="teacher temperature (fp32 logits)")
    # SimCLR / BYOL / SimSiam / Barlow Twins: paper defaults, see each smallssl/methods/<name>.py
    g = p.add_argument_group("simclr")
    g.add_argument("--simclr-t", default=0.5, type=float, help="NT-Xent temperature (0.5 CIFAR, 0.1 ImageNet)")
    g.add_argument("--simclr-dim", default=128, type=int, help="projection output size")
    g.add_argument("--simclr-hidden", default=None, type=int, help="projection hidden size (default: backbone width)")
    g = p.add_argument_group("byol")
    g.add_argument("--byol-m", default=0.996, type=float, help="base EMA momentum, cosine-scheduled to 1")
    g.add_argument("--byol-dim", default=256, type=int, help="projector / predictor output size")
    g.add_argument("--byol-hidden", default=4096, type=int, help="projector / predictor hidden size")
    g.add_argument("--byol-aug", default="asym", choices=["asym", "same"],
                   help="asym (paper): view 1 blur p 1.0, view 2 blur p 0.1 + solarize p 0.2 (an explicit "
                        "--gaussian-blur P sets both blurs to P); same: both views as the other methods")
    g = p.add_argument_group("simsiam")
    g.add_argument("--simsiam-dim", default=2048, type=int, help="projector output (and hidden) size")
    g.add_argument("--simsiam-pred-dim", default=512, type=int, help="predictor bottleneck size")
    g.add_argument("--simsiam-proj-layers", default=3, type=int, help="projector depth (3 ImageNet, 2 CIFAR)")
    g.add_argument("--simsiam-no-fix-pred-lr", dest="simsiam_fix_pred_lr", action="store_false",
                   help="let the predictor follow the lr schedule (default: fixed at the base lr, as the paper)")
    g = p.add_argument_group("barlow")
    g.add_argument("--barlow-bias-lr-scale", default=0.024, type=float,
                   help="lr factor of biases and norm weights (paper: 0.0048 / 0.2)")
    g.add_argument("--barlow-lambda", default=5e-3, type=float, help="off-diagonal (redundancy) weight")
    g.add_argument("--barlow-proj", default="8192-8192-8192",
                   help="projector widths, dash-separated (e.g. 2048-2048 for small backbones)")
    # SwAV / SEER (Caron et al. 2020, Goyal et al. 2021). SwAV ImageNet: --optimizer lars
    # --lr-per-256 0.3 (scaled to the global batch) --wd 1e-6 --warmup-epochs 10 --cos, multi-crop 2x224 + 6x96.
    # SEER: --swav-prototypes 16000 --swav-epsilon 0.03 --swav-iters 10 --swav-dim 256 --wd 1e-5.
    g = p.add_argument_group("swav")
    g.add_argument("--swav-dim", default=128, type=int, help="embedding size (SEER 256)")
    g.add_argument("--swav-hidden", default=2048, type=int, help="projection hidden size (0 = linear head)")
    g.add_argument("--swav-head-bn", action=argparse.BooleanOptionalAction, default=True,
                   help="BatchNorm in the projection head")
    g.add_argument("--swav-prototypes", default=3000, type=int, help="number of prototypes K (SEER 16000)")
    g.add_argument("--swav-t", default=0.1, type=float, help="softmax temperature")
    g.add_argument("--swav-epsilon", default=0.05, type=float, help="Sinkhorn entropy regulariser (SEER 0.03)")
    g.add_argument("--swav-iters", default=3, type=int, help="Sinkhorn iterations (SEER 10)")
    g.add_argument("--swav-queue-length", default=0, type=int,
                   help="global queue of embeddings for Sinkhorn (0 = none; SwAV 3840 for batch 256)")
    g.add_argument("--swav-queue-start", default=15, type=int, help="first epoch that fills the queue")
    g.add_argument("--freeze-prototypes-iters", default=313, type=int,
                   help="steps during which the prototypes get no update")
    g.add_argument("--crops-for-assign", default=[0, 1], nargs="+", type=int, help="crops whose codes are computed")
    g.add_argument("--nmb-crops", default=[2, 6], nargs="+", type=int, help="crops per size group")
    g.add_argument("--size-crops", default=None, nargs="+", type=int,
                   help="crop side per group (default: --image-size, then 96/224 of it)")
    g.add_argument("--min-scale-crops", default=[0.14, 0.05], nargs="+", type=float)
    g.add_argument("--max-scale-crops", default=[1.0, 0.14], nargs="+", type=float)
    # Large models and large batches (SEER)
    g = p.add_argument_group("scale")
    g.add_argument("--lr-per-256", default=None, type=float,
                   help="set --lr to this x global batch / 256 (linear scaling; SEER model card: 0.3)")
    g.add_argument("--fsdp", action="store_true",
                   help="FSDP2 (fully_shard per residual block) instead of DDP; checkpoints become "
                        "torch.distributed.checkpoint directories CKPT_DIR/checkpoint_NNNN/ (--resume DIR or auto)")
    g.add_argument("--activation-checkpointing", action="store_true",
                   help="recompute each RegNet stage in the backward pass (regnety_* backbones)")
    return p


def main(args: argparse.Namespace) -> dict:
    """Validate, take the checkpoint directory's lock, then run in this process or spawn one per device.
    Returns rank 0's final status (``status``: finished / preempted, ``epoch``, ``checkpoint``, ...)."""
    validate_args(args)
    cuda = sdist.use_cuda(args.device)
    nproc = sdist.procs_per_node(args.multiprocessing_distributed, args.nproc_per_node, cuda)
    spawning = args.multiprocessing_distributed and not sdist.env_distributed()
    owner = spawning or int(os.environ.get("RANK", 0)) == 0  # the one process that holds the lock
    lock = RunLock(args.ckpt_dir, force=args.break_lock) if owner else None
    if lock is not None:
        lock.acquire()
        if lock.taken_over:
            print(f"=> took over the stale lock of pid {lock.taken_over.get('pid')} on "
                  f"{lock.taken_over.get('host')} ({'--break-lock' if args.break_lock else 'that process is gone'})")
        removed = remove_orphan_temps(args.ckpt_dir)
        if removed:
            print(f"=> removed {removed} orphan temp file(s) of interrupted checkpoint saves in {args.ckpt_dir!r}")
    try:
        if spawning:
            world = nproc * max(args.world_size, 1)
            if args.dist_url == "env://":
                os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
                os.environ.setdefault("MASTER_PORT", str(sdist.free_port()))
            return sdist.spawn(_spawned_worker, nproc, (nproc, world, args))
        if sdist.env_distributed():
            rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
            return main_worker(int(os.environ.get("LOCAL_RANK", rank % nproc)), rank, world, args)
        return main_worker(0, 0, 1, args)
    finally:
        if lock is not None:
            lock.release()


def _spawned_worker(local_rank: int, nproc: int, world: int, args, result_q) -> None:
    rank = max(args.rank, 0) * nproc + local_rank
    try:
        out = main_worker(local_rank, rank, world, args)
    except Exception as e:  # noqa: BLE001 - expected failures: one line, exit 2; bugs keep their traceback
        from smallssl.errors import report

        if report(e, prefix=f"error (rank {rank})"):
            sys.exit(2)
        raise
    if rank == 0:
        result_q.put(out)


def main_worker(local_rank: int, rank: int, world: int, args: argparse.Namespace) -> dict:
    cuda = sdist.use_cuda(args.device)
    device = torch.device(f"cuda:{args.gpu if args.gpu is not None and world == 1 else local_rank}") if cuda \
        else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = args.tf32
    main_thread = threading.current_thread() is threading.main_thread()
    handlers = preempt.install_stop_handlers() if main_thread else {}  # SIGTERM / SIGUSR2: save, then exit 3
    if world > 1:
        backend = args.dist_backend if args.dist_backend != "auto" else ("nccl" if cuda else "gloo")
        sdist.init_process_group(backend, rank, world, args.dist_url, timeout_s=args.dist_timeout)
    try:
        return train(args, device, rank, world)
    except RuntimeError as e:
        if world > 1 and sdist.is_timeout(e):
            raise sdist.CollectiveTimeoutError(sdist.describe_timeout(e, args.dist_timeout)) from e
        raise
    finally:
        preempt.restore_handlers(handlers)
        if world > 1 and sdist.is_dist():
            torch.distributed.destroy_process_group()


@dataclass
class Loop:
    """What the epoch loop needs besides the model and data: resolved once in :func:`train`."""
    device: torch.device
    steps_per_epoch: int
    total_steps: int
    base_lr: float
    amp_dtype: torch.dtype | None = None
    memory_format: torch.memory_format = torch.contiguous_format
    print_freq: int = 10
    progress: bool = True
    ckpt_dir: str | None = None
    logger: RunLogger | None = None  # per-print-step records (steps.jsonl) on rank 0
    monitor: CollapseMonitor | None = None  # collapse diagnostics of the embeddings the loss sees
    knn: OnlineKNN | None = None
    knn_model: nn.Module | None = None  # --fsdp: an unsharded backbone the kNN gathers the weights into
    knn_every: int = 0  # steps between online kNN evaluations (0 = off)
    last_knn: dict | None = None


def train(args, device: torch.device, rank: int, world: int) -> dict:
    """Build method, optimizer and data; resume; run the epochs, saving checkpoints. Returns the final status."""
    is_main = rank == 0
    nproc = sdist.procs_per_node(args.multiprocessing_distributed, args.nproc_per_node, device.type == "cuda") \
        if world > 1 else 1
    batch, workers = args.batch_size // nproc, (args.workers + nproc - 1) // nproc
    # linear scaling rule (Goyal et al. 2017); SEER: 0.3 per 256 images
    lr = args.lr if args.lr_per_256 is None else args.lr_per_256 * batch * world / 256
    torch.manual_seed(args.seed)  # same on every rank: identical init and queue
    random.seed(args.seed)

    method = build_method(args, build_backbone(args))
    method.check_batch(batch * world)
    method.to(device, memory_format=torch.channels_last if args.channels_last else torch.preserve_format)
    if args.activation_checkpointing or args.fsdp:
        _setup_fsdp(method, args)  # before the optimizer, which must see the sharded parameters
    optimizer = build_optimizer(args.optimizer, param_groups(method, args.weight_decay,
                                                             exclude_bias_and_norm=excludes_bias_and_norm(args.optimizer)),
                                lr=lr, momentum=args.momentum, weight_decay=args.weight_decay)
    scaler = torch.amp.GradScaler("cuda", enabled=args.amp == "fp16")  # one code path: a no-op unless fp16
    ckpt_scaler = scaler if scaler.is_enabled() else None
    loader = build_loader(args, batch, workers, rank, world, device)
    meta = dict(arch=args.arch, method=args.method, global_batch=batch * world, dataset_len=loader.dataset_len,
                args={**vars(args), "lr": lr})
    mode = "sharded" if args.fsdp else ("restart" if args.restart else "exact")
    start_epoch, start_iter, step, resumed = resume_training(
        method, optimizer, ckpt_scaler, args.resume, args.ckpt_dir, mode=mode, meta=meta,
        verbose=is_main)
    if mode == "restart" or not resumed:
        start_epoch = args.start_epoch
    model = method if world == 1 or args.fsdp else nn.parallel.DistributedDataParallel(
        method, device_ids=[device.index] if device.type == "cuda" else None, broadcast_buffers=False)
    logger = RunLogger(args.ckpt_dir, vars(args), enabled=is_main, tensorboard=args.tensorboard)
    logger.start(start_epoch, step)  # logs match the checkpoint: later epochs / steps are trained again
    if is_main:
        print(f"=> {args.method} / {args.arch}: {loader.dataset_len} images, {loader.num_batches} steps/epoch, "
              f"batch {batch} x {world} process(es), device {device}, git {logger.sha}")
    loop = Loop(device=device, steps_per_epoch=loader.num_batches, total_steps=args.epochs * loader.num_batches,
                base_lr=lr, amp_dtype={"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.amp),
                memory_format=torch.channels_last if args.channels_last else torch.contiguous_format,
                print_freq=args.print_freq, progress=is_main and not args.no_progress, ckpt_dir=args.ckpt_dir,
                logger=logger, monitor=CollapseMonitor(hint=method.collapse_hint),
                knn=build_online_knn(args, device, is_main),
                knn_model=build_knn_replica(args, device),
                knn_every=max(1, round(args.knn_every * loader.num_batches)) if args.knn_every else 0)
    lrs = lr_schedule(lr, args.epochs, loader.num_batches, cos=args.cos, schedule=args.schedule,
                      warmup_epochs=args.warmup_epochs)

    def save(epoch: int, it: int, last: bool = False) -> str:
        path = save_training_checkpoint(method, optimizer, ckpt_scaler, args.ckpt_dir, epoch=epoch, it=it, step=step,
                                        meta=meta, sharded=args.fsdp, keep_last=args.keep_last, last=last)
        if is_main:  # the curves so far, beside the checkpoint (nothing without matplotlib)
            write_curves(args.ckpt_dir, os.path.join(args.ckpt_dir, "curves.png"))
        return path

    status = {"status": "finished", "epoch": start_epoch, "checkpoint": None}
    # before the first step of a fresh run (or a --restart): the reference of the weights training starts from
    if loop.knn is not None and (not resumed or mode == "restart") and start_epoch < args.epochs:  # both at step 0
        online_knn(method, loop, 0, start_epoch)  # on the same protocol and images as the later ones
        loop.last_knn = None  # not an epoch's figure
    for epoch in range(start_epoch, args.epochs):
        loader.set_epoch(epoch, start_iter)
        method.set_epoch(epoch)
        stats, step, stopped_at = train_one_epoch(model, method, loader, optimizer, scaler, lrs,
                                                  (epoch, start_iter, step), loop)
        if stopped_at is not None:  # stop requested: iteration-level checkpoint, then return
            path = save(epoch, stopped_at, last=True)
            if is_main:
                print(f"=> stop requested: saved {path} at epoch {epoch}, iteration {stopped_at}")
            return {"status": "preempted", "epoch": epoch, "iter": stopped_at, "checkpoint": path}
        stats.update(epoch=epoch, step=step)
        if start_iter:  # resumed inside this epoch: its averages cover only the steps after the resume
            stats["resumed_at_iter"] = start_iter
        if world > 1 and not args.fsdp:  # FSDP holds one sharded copy: nothing to compare
            stats["replicas_in_sync"] = sdist.replicas_in_sync(method, device)
        stats.update(epoch_knn(method, loop, step, epoch, final=epoch + 1 == args.epochs))
        logger.log(stats)
        if is_main:
            print(f"=> epoch {epoch}: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                                  for k, v in stats.items()))
        if (epoch + 1) % args.save_freq == 0 or epoch + 1 == args.epochs:
            status["checkpoint"] = save(epoch + 1, 0)
        status.update(epoch=epoch + 1, **{k: v for k, v in stats.items() if k in ("loss", "acc1")})
        start_iter = 0
    return status


def train_one_epoch(model: nn.Module, method: nn.Module, loader, optimizer, scaler, lrs: list[float],
                    start: tuple[int, int, int], loop: Loop) -> tuple[dict, int, int | None]:
    """One epoch from ``start = (epoch, first iteration, global step)``; returns (stats, global step, the iteration
    a stop was requested after, or None). ``lrs[epoch * steps_per_epoch + i]`` is iteration i's lr."""
    epoch, start_iter, step = start
    model.train()
    sums: dict[str, float] = {}
    n_steps, n_images, n_skipped, t0, lr = 0, 0, 0, time.time(), loop.base_lr
    bar = tqdm(total=loop.steps_per_epoch, initial=start_iter, desc=f"epoch {epoch}", disable=not loop.progress,
               dynamic_ncols=True, leave=False,
               mininterval=0.1 if sys.stderr.isatty() else 30.0)  # logs/CI: a line every 30 s, not per step
    for i, (views, _, n_bad) in enumerate(loader, start=start_iter):
        n_skipped += n_bad
        lr = lrs[epoch * loop.steps_per_epoch + i]
        set_lr(optimizer, lr, base_lr=loop.base_lr)
        views = [v.to(loop.device, non_blocking=True).contiguous(memory_format=loop.memory_format) for v in views]
        try:
            out, stop = train_step(model, method, views, optimizer, scaler, step, loop.total_steps, loop.amp_dtype)
        except NonFiniteLossError as e:
            last = latest_checkpoint(loop.ckpt_dir) if loop.ckpt_dir else None
            raise NonFiniteLossError(f"{e} at epoch {epoch}, iteration {i} (global step {step}); stopping before the "
                                     f"update. Last good checkpoint: {last or 'none yet'}. Lower --lr, try --amp "
                                     "none, or check the data; resume with --resume.") from None
        step, n_steps, n_images = step + 1, n_steps + 1, n_images + views[0].shape[0] * sdist.get_world_size()
        for k, v in _scalars(out).items():  # every scalar the method reports (loss, acc1, std, tau...) is averaged
            sums[k] = sums.get(k, 0.0) + v
        print_now = (i + 1) % loop.print_freq == 0 or i + 1 == loop.steps_per_epoch  # after N steps, at epoch end
        observe(method, loop, out, step, epoch, lr, bar, print_now=print_now)
        bar.update(1)
        if stop and i + 1 < loop.steps_per_epoch:
            bar.close()
            return {}, step, i + 1
    bar.close()
    elapsed = time.time() - t0
    stats = {k: v / max(n_steps, 1) for k, v in sums.items()}
    stats.update(lr=lr, img_per_s=n_images / max(elapsed, 1e-9), time_s=elapsed, skipped_images=n_skipped,
                 steps=n_steps)
    return stats, step, None


def observe(method: nn.Module, loop: Loop, out: dict, step: int, epoch: int, lr: float, bar, print_now: bool) -> None:
    """What training shows while it runs: every step feeds the collapse monitor; every print step writes a
    ``steps.jsonl`` record (loss, lr, embedding std / effective rank / alignment / uniformity) and warns once per
    collapse episode; every ``--knn-every`` the online kNN runs (all ranks)."""
    if loop.monitor is not None and "emb" in out:
        loop.monitor.update(out["emb"], out.get("feat"))
    if print_now:
        record = {"step": step, "epoch": epoch, "lr": lr, **_scalars(out)}
        if loop.monitor is not None and "emb" in out:
            record.update(loop.monitor.stats())
            warning = loop.monitor.check(step)
            if warning and loop.logger is not None and loop.logger.enabled:
                tqdm.write(f"=> {warning}", file=sys.stderr)
                record["collapse_warning"] = warning
        if loop.logger is not None:
            loop.logger.log_step(record)
        if loop.progress:
            bar.set_postfix(loss=f"{record['loss']:.4f}", acc1=f"{record.get('acc1', 0):.1f}", lr=f"{lr:.3g}",
                            **({"knn": f"{loop.last_knn['knn_top1']:.1f}"} if loop.last_knn else {}))
    if loop.knn is not None and loop.knn_every and step % loop.knn_every == 0:
        online_knn(method, loop, step, epoch)


def online_knn(method: nn.Module, loop: Loop, step: int, epoch: int) -> dict:
    """Run the online kNN on the query backbone now (collective); log it; remember it for the epoch record."""
    # FSDP2: the backbone's parameters are shards, usable only inside the root's forward; evaluate a full replica
    backbone = method.backbone if loop.knn_model is None else gather_into(method.backbone, loop.knn_model)
    res = {**loop.knn.evaluate(backbone), "knn_protocol": "dino", "knn_step": step}
    if loop.logger is not None:
        loop.logger.log_step({"step": step, "epoch": epoch, **res})
    if loop.progress or (loop.logger is not None and loop.logger.enabled):
        tqdm.write(f"=> kNN top-1 {res['knn_top1']:.2f} top-5 {res['knn_top5']:.2f} at step {step} "
                   f"({res['knn_time_s']:.1f} s)")
    loop.last_knn = res
    return res


def epoch_knn(method: nn.Module, loop: Loop, step: int, epoch: int, final: bool) -> dict:
    """The kNN fields of an epoch's record: the latest evaluation inside it, and one at the end of training."""
    if loop.knn is not None and final and (loop.last_knn is None or loop.last_knn["knn_step"] != step):
        online_knn(method, loop, step, epoch)
    res, loop.last_knn = loop.last_knn or {}, None
    return res


def _scalars(out: dict) -> dict[str, float]:
    """The scalar entries of a method's output (loss, acc1, tau, ...) as floats."""
    return {k: float(v.detach() if isinstance(v, torch.Tensor) else v) for k, v in out.items()
            if (isinstance(v, torch.Tensor) and v.numel() == 1) or isinstance(v, (int, float))}


def train_step(model: nn.Module, method: nn.Module, views: list[torch.Tensor], optimizer, scaler, step: int,
               total_steps: int, amp_dtype: torch.dtype | None = None) -> tuple[dict, bool]:
    """One optimisation step in the order of the method contract (:mod:`smallssl.methods.base`). Returns the
    method's outputs and whether any rank asked to stop. ``experiments.bench_train`` / ``bench_swav`` time this."""
    with torch.autocast(views[0].device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        out = model(views)
    loss = out["loss"]
    # one collective per step: any rank's non-finite loss stops every rank before the update (a rank that
    # went on would enqueue NaN keys everywhere), and any rank's stop request stops all at this boundary
    nonfinite, stop = sdist.any_rank(not torch.isfinite(loss.detach()), preempt.stop_requested(),
                                     device=views[0].device)
    if nonfinite:
        raise NonFiniteLossError(f"loss is {loss.item()} (on rank {sdist.get_rank()} or another)")
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    method.before_optimizer_step(step=step)
    scaler.step(optimizer)
    scaler.update()
    method.after_step(step=step, total_steps=total_steps)
    return out, stop


# ------------------------------------------------------------------------------------------ per-method glue
def build_online_knn(args: argparse.Namespace, device: torch.device, verbose: bool) -> OnlineKNN | None:
    """``--knn-every``: the labelled images of the online kNN (decoded once, cached like ``--batch-aug``)."""
    if not args.knn_every:
        return None
    return OnlineKNN(args.knn_data or args.data, args.image_size, bank_per_class=args.knn_bank_per_class,
                     val_per_class=args.knn_val_per_class, k=args.knn_k, T=args.knn_t, device=device,
                     cache_dir=os.path.join(default_cache_dir(), "mem"), workers=min(args.workers, 4), verbose=verbose)


def build_knn_replica(args: argparse.Namespace, device: torch.device) -> nn.Module | None:
    """Under ``--fsdp`` with ``--knn-every``: an unsharded backbone for the online kNN (built under a forked RNG,
    so that training draws the same random numbers as without it)."""
    if not (args.fsdp and args.knn_every):
        return None
    with torch.random.fork_rng(devices=[]):
        return build_backbone(args).to(device)


def small_input(args: argparse.Namespace) -> bool:
    """``--small-input``, or by default the CIFAR stem for images of at most 64 px."""
    return default_small_input(args.image_size) if args.small_input is None else args.small_input


def build_backbone(args: argparse.Namespace) -> nn.Module:
    """``-a`` with the stem ``small_input`` picks; ``--conv-wgrad auto`` switches its convolutions to the CPU
    small-map weight gradient (a no-op for CUDA tensors, same parameters and state_dict)."""
    backbone = create_backbone(args.arch, small_input=small_input(args))
    if args.conv_wgrad == "auto":
        use_matmul_weight_grad(backbone)
    return backbone


def build_method(args: argparse.Namespace, backbone: nn.Module) -> nn.Module:
    """The only place where command-line arguments become method keyword arguments."""
    if args.method == "moco":
        return METHODS["moco"](backbone, dim=args.moco_dim, K=args.moco_k, m=args.moco_m, T=args.moco_t,
                               mlp=args.mlp, shuffle_bn_splits=args.shuffle_bn_splits, symmetric=args.moco_symmetric,
                               queue_init=args.moco_queue_init)
    if args.method == "simclr":
        return METHODS["simclr"](backbone, dim=args.simclr_dim, hidden_dim=args.simclr_hidden,
                                 temperature=args.simclr_t)
    if args.method == "byol":
        return METHODS["byol"](backbone, dim=args.byol_dim, hidden_dim=args.byol_hidden, base_momentum=args.byol_m)
    if args.method == "simsiam":
        return METHODS["simsiam"](backbone, dim=args.simsiam_dim, pred_dim=args.simsiam_pred_dim,
                                  proj_layers=args.simsiam_proj_layers, fix_pred_lr=args.simsiam_fix_pred_lr)
    if args.method == "barlow":
        return METHODS["barlow"](backbone, projector=parse_sizes(args.barlow_proj), lambd=args.barlow_lambda,
                                 bias_lr_scale=args.barlow_bias_lr_scale)
    if args.method == "seed":
        teacher = build_teacher(args.teacher_arch, args.teacher_ckpt, small_input=args.teacher_small_input,
                                default_small_input=small_input(args), proj=args.teacher_proj, dim=args.seed_dim,
                                seed=args.seed, verbose=sdist.get_rank() == 0)
        return METHODS["seed"](backbone, teacher=teacher, dim=args.seed_dim, K=args.seed_k, T=args.seed_t,
                               teacher_T=args.seed_teacher_t, mlp=args.mlp)
    if args.method == "swav":
        return METHODS["swav"](backbone, dim=args.swav_dim, hidden_dim=args.swav_hidden, head_bn=args.swav_head_bn,
                               n_prototypes=args.swav_prototypes, temperature=args.swav_t, epsilon=args.swav_epsilon,
                               sinkhorn_iters=args.swav_iters, crops_for_assign=args.crops_for_assign,
                               queue_length=args.swav_queue_length, queue_start_epoch=args.swav_queue_start,
                               freeze_prototypes_iters=args.freeze_prototypes_iters)
    raise ValueError(f"no builder for method {args.method!r}; known: {', '.join(sorted(METHODS))}")


def build_transform(args: argparse.Namespace):
    """The views each method trains on (a callable image -> list of tensors)."""
    if args.method == "swav":  # multi-crop, views grouped by size, large first
        return multicrop_transform(swav_size_crops(args), args.nmb_crops, args.min_scale_crops, args.max_scale_crops,
                                   cj=args.cj, grey_scale=args.grey_scale, gaussian_blur=args.gaussian_blur)
    if args.method == "seed":  # SEED: student and teacher see the same single view
        return MultiViewTransform([pretrain_transform(args.image_size, aug_plus=args.aug_plus, cj=args.cj,
                                                      grey_scale=args.grey_scale, gaussian_blur=args.gaussian_blur,
                                                      min_scale=args.min_crop_scale)])
    if args.method == "byol" and args.byol_aug == "asym":
        return MultiViewTransform([pretrain_transform(args.image_size, aug_plus=args.aug_plus, cj=args.cj,
                                                      grey_scale=args.grey_scale, gaussian_blur=blur,
                                                      solarize=solarize, min_scale=args.min_crop_scale)
                                   for blur, solarize in byol_view_probs(args)])
    return two_crops(pretrain_transform(args.image_size, aug_plus=args.aug_plus, cj=args.cj,
                                        grey_scale=args.grey_scale, gaussian_blur=args.gaussian_blur,
                                        min_scale=args.min_crop_scale))


def byol_view_probs(args: argparse.Namespace) -> list[tuple[float, float]]:
    """(blur p, solarize p) of BYOL's two asymmetric views (paper table 6): (1.0, 0.0) and (0.1, 0.2)."""
    if args.gaussian_blur is not None:
        return [(args.gaussian_blur, 0.0), (args.gaussian_blur, 0.2)]
    return [(1.0, 0.0), (0.1, 0.2)]


BATCH_AUG_METHODS = ("moco", "simclr", "byol", "simsiam", "barlow")


def build_batch_augs(args: argparse.Namespace) -> list:
    """The two views of :func:`build_transform` as :class:`smallssl.data.batch_aug.BatchAugment` (``--batch-aug``)."""
    jitter, jitter_p = jitter_params(args.aug_plus, args.cj)
    blur = blur_prob(args.aug_plus, args.gaussian_blur)
    common = dict(size=args.image_size, scale=(args.min_crop_scale, 1.0), jitter=jitter, jitter_p=jitter_p,
                  grey_p=0.2 if args.grey_scale is None else args.grey_scale)
    if args.method == "byol" and args.byol_aug == "asym":
        return [BatchAugment(blur_p=b, solarize_p=s, **common) for b, s in byol_view_probs(args)]
    return [BatchAugment(blur_p=blur, **common)] * 2


def swav_size_crops(args: argparse.Namespace) -> list[int]:
    """``--size-crops``, or by default ``--image-size`` for the first group and 96/224 of it for the others."""
    if args.size_crops is not None:
        return list(args.size_crops)
    return [args.image_size] + [max(8, round(args.image_size * 96 / 224))] * (len(args.nmb_crops) - 1)


def build_loader(args: argparse.Namespace, batch: int, workers: int, rank: int, world: int, device: torch.device):
    """The data path, chosen once: in-memory images + batched tensor augmentation (``--batch-aug``) or the PIL
    loader; both have ``set_epoch(epoch, start_iter)``, ``num_batches``, ``dataset_len`` and yield
    ``(views, targets, n_bad)``."""
    train_dir = os.path.join(args.data, "train")
    if args.batch_aug:
        images, labels, _ = load_images(train_dir, args.image_size, workers=args.workers,
                                        cache_dir=os.path.join(default_cache_dir(), "mem"), verbose=rank == 0)
        subset = fixed_subset(len(images), args.subset, seed=args.seed)
        if subset is not None:
            images, labels = images[subset], labels[subset]
        sampler = ResumableSampler(len(images), batch, rank, world, seed=args.seed)
        loader = BatchViews(images, labels, sampler, batch, build_batch_augs(args), seed=args.seed, rank=rank,
                            device=device)
        loader.dataset_len = len(images)
    else:
        dataset = SafeImageFolder(train_dir, build_transform(args), skip_bad=args.skip_bad_images)
        subset = fixed_subset(len(dataset), args.subset, seed=args.seed)
        if subset is not None:
            dataset = torch.utils.data.Subset(dataset, subset)
        sampler = ResumableSampler(len(dataset), batch, rank, world, seed=args.seed)
        loader = ViewLoader(SeededViews(dataset, seed=args.seed), sampler, batch, workers=workers,
                            pin_memory=device.type == "cuda", seed=args.seed)
        loader.dataset_len = len(dataset)
    return loader


def global_batch_size(args: argparse.Namespace, nproc: int) -> int:
    """Images per step over all processes (``--batch-size`` is per node, split across its processes)."""
    return args.batch_size // nproc * sdist.world_size_of(nproc, args.world_size)


def validate_args(args) -> None:
    """Fail before any process starts, naming what is wrong and what to do."""
    train_dir = os.path.join(args.data, "train")
    if not os.path.isdir(train_dir):
        raise FileNotFoundError(f"training images not found: {train_dir!r} does not exist. Pass the dataset root "
                                "that contains train/<class>/<image> (e.g. an unpacked ../shared/data tarball).")
    check_arch(args.arch)
    for flag, value in (("--lr", args.lr), ("--moco-t", args.moco_t), ("--seed-t", args.seed_t), ("--simclr-t",
                        args.simclr_t), ("--swav-t", args.swav_t), ("--dist-timeout", args.dist_timeout)):
        if not value > 0:
            raise ValueError(f"{flag} must be > 0, got {value}")
    if args.weight_decay < 0:
        raise ValueError(f"--wd must be >= 0, got {args.weight_decay}")
    if args.knn_every < 0 or args.knn_k < 1 or args.knn_t <= 0:
        raise ValueError(f"--knn-every must be >= 0, --knn-k >= 1 and --knn-t > 0 (got {args.knn_every}, "
                         f"{args.knn_k}, {args.knn_t})")
    for flag, value, low in (("--print-freq", args.print_freq, 1), ("--save-freq", args.save_freq, 1),
                             ("--epochs", args.epochs, 1), ("--workers", args.workers, 0),
                             ("--keep-last", args.keep_last, 0), ("--nproc-per-node", args.nproc_per_node or 1, 1),
                             ("--shuffle-bn-splits", args.shuffle_bn_splits, 1)):
        if value < low:
            raise ValueError(f"{flag} must be >= {low}, got {value}")
    nproc = sdist.procs_per_node(args.multiprocessing_distributed, args.nproc_per_node, sdist.use_cuda(args.device))
    if args.batch_size < nproc or args.batch_size % nproc:
        raise ValueError(f"--batch-size {args.batch_size} (per node) must be a positive multiple of the "
                         f"{nproc} processes per node")
    if args.method == "moco":
        check_queue_batch(args.moco_k, global_batch_size(args, nproc) * (2 if args.moco_symmetric else 1),
                          "--moco-k")
    if args.method == "seed":
        if not args.teacher_ckpt or not os.path.isfile(args.teacher_ckpt):
            raise FileNotFoundError(f"--method seed needs --teacher-ckpt FILE (got {args.teacher_ckpt!r})")
        check_queue_batch(args.seed_k, global_batch_size(args, nproc), "--seed-k")
    if args.restart and not args.resume:
        raise ValueError("--restart needs --resume CHECKPOINT (the weights to restart from)")
    if args.resume and args.resume != "auto" and not os.path.isfile(args.resume) and not (
            (args.fsdp or args.restart) and os.path.isdir(args.resume)):
        raise FileNotFoundError(f"--resume {args.resume!r}: no such checkpoint file"
                                + (" or sharded checkpoint directory" if args.fsdp or args.restart else ""))
    _validate_scale_args(args)
    if args.batch_aug and args.method not in BATCH_AUG_METHODS:
        raise ValueError(f"--batch-aug supports the two-view methods {', '.join(BATCH_AUG_METHODS)}; "
                         f"--method {args.method} needs the PIL pipeline (drop --batch-aug)")
    if args.batch_aug and args.skip_bad_images:
        raise ValueError("--batch-aug decodes every image up front and cannot skip unreadable ones: drop "
                         "--batch-aug to use the PIL loader with --skip-bad-images, or remove the bad files")
    if args.amp == "fp16" and not sdist.use_cuda(args.device):
        raise ValueError("--amp fp16 needs a CUDA GPU; use --amp bf16 on CPU")


def _validate_scale_args(args) -> None:
    if args.lr_per_256 is not None and args.lr_per_256 <= 0:
        raise ValueError(f"--lr-per-256 must be > 0, got {args.lr_per_256}")
    if args.method == "swav":
        multicrop_transform(swav_size_crops(args), args.nmb_crops, args.min_scale_crops, args.max_scale_crops)
        if max(args.crops_for_assign) >= sum(args.nmb_crops):
            raise ValueError(f"--crops-for-assign {args.crops_for_assign} must index the {sum(args.nmb_crops)} "
                             f"crops of --nmb-crops {args.nmb_crops}")
    if not args.fsdp:
        return
    supported = sorted(k for k, v in METHODS.items() if v.supports_fsdp)
    if args.method not in supported:
        raise ValueError(f"--fsdp is not supported by --method {args.method}; methods with FSDP: "
                         f"{', '.join(supported)} (use DDP: drop --fsdp)")
    if not (args.multiprocessing_distributed or sdist.env_distributed()):
        raise ValueError("--fsdp shards over processes: add --multiprocessing-distributed (--nproc-per-node N) "
                         "or launch with torchrun")
    if args.restart:
        raise ValueError("--restart with --fsdp is not supported: restart without --fsdp, or convert the "
                         "checkpoint (python -m smallssl.convert) and resume a sharded run")
    if args.amp == "fp16":
        raise ValueError("--fsdp computes in bf16 (--amp bf16) or fp32 (--amp none), not fp16")


def _setup_fsdp(method: nn.Module, args) -> None:
    """Activation checkpointing per RegNet stage, then FSDP2 per residual block (bf16 compute with --amp bf16,
    fp32 gradient reduction), in place."""
    if args.activation_checkpointing:
        enable_activation_checkpointing(method)
    if args.fsdp:
        fsdp_wrap(method, param_dtype=torch.bfloat16 if args.amp == "bf16" else None, reduce_dtype=torch.float32)


def cli(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    result: dict = {}
    code = run_cli(lambda: result.update(main(args) or {}))
    if code:
        return code
    if result.get("status") == "preempted":
        return EXIT_PREEMPTED
    if result.get("loss") is not None and not math.isfinite(result["loss"]):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(cli())
