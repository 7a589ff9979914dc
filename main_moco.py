#!/usr/bin/env python
"""Self-supervised pretraining: MoCo v2 / ssl-small improved baseline (and the other ``--method``s).

Compatible with the command lines of facebookresearch/moco and of the small-models paper (seed 004), e.g.::

    python main_moco.py DATA -a mobilenetv3_small --lr 0.06 --batch-size 512 -j 64 --epochs 800 \
        --dist-url 'env://' --multiprocessing-distributed --world-size 1 --rank 0 \
        --mlp wide --moco-t 0.1 --moco-k 65536 --aug-plus --cj 1. --grey-scale 0.5 --gaussian-blur 0.5 \
        --cos --ckpt-dir CKPT --resume converted_seed.pth.tar --restart

Reads top to bottom: get_args_parser -> main (validation, process launch) -> main_worker (build, resume)
-> train_one_epoch. Runs single-process, as N spawned processes (gloo on CPU / NCCL on GPU), or under
torchrun / Slurm (RANK, WORLD_SIZE, LOCAL_RANK in the environment).
"""

from __future__ import annotations

import argparse
import math
import os
import random
import sys
import time

import torch
import torch.multiprocessing as mp
import torch.nn as nn
from torch.multiprocessing.spawn import ProcessException

from smallssl import dist as sdist
from smallssl import preempt
from smallssl.backbones import BACKBONES, create_backbone
from smallssl.checkpoints import (CheckpointError, atomic_save, build_teacher, latest_checkpoint,
                                  load_checkpoint_file, restart_load, save_checkpoint)
from smallssl.data.cache import default_cache_dir
from smallssl.data import (CorruptImageError, ResumableSampler, SafeImageFolder, SeededViews, collate_skip_bad,
                           fixed_subset, pretrain_transform, two_crops)
from smallssl.heads import HEADS
from smallssl.logging import RunLogger
from smallssl.methods import METHODS
from smallssl.queue import check_queue_batch
from smallssl.optim import build_optimizer, lr_at, param_groups, set_lr
from smallssl.checkpoints.resume import (LAST_CKPT, SHARDED_LAST, SHARDED_PATTERN, all_rng_states, resolve_resume,
                                         resume_exact, training_state)
from smallssl.checkpoints.sharded import resume_sharded, save_sharded_checkpoint



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
    p.add_argument("--optimizer", default="sgd", choices=["sgd", "lars", "adamw"])
    p.add_argument("-p", "--print-freq", default=10, type=int)
    p.add_argument("--seed", default=0, type=int)
    # checkpoints
    p.add_argument("--ckpt-dir", default="checkpoints", help="where checkpoint_NNNN.pth.tar and log.jsonl go")
    p.add_argument("--resume", default="", help="checkpoint to resume exactly, or 'auto' for the latest in --ckpt-dir")
    p.add_argument("--restart", action="store_true",
                   help="with --resume: load weights only, start at epoch 0 without optimizer state, drop "
                        "shape-mismatched keys, copy the query encoder to the key encoder (ssl-small)")
    p.add_argument("--save-freq", default=1, type=int, help="save every N epochs (and at the end)")
    p.add_argument("--keep-last", default=0, type=int, help="keep only the N newest checkpoints (0 = all)")
    # distributed
    p.add_argument("--world-size", default=-1, type=int, help="number of nodes (MoCo semantics)")
    p.add_argument("--rank", default=-1, type=int, help="node rank (MoCo semantics)")
    p.add_argument("--dist-url", default="env://", type=str)
    p.add_argument("--dist-backend", default="auto", choices=["auto", "nccl", "gloo"])
    p.add_argument("--multiprocessing-distributed", action="store_true",
                   help="spawn one process per GPU (or --nproc-per-node on CPU) and train with DDP")
    p.add_argument("--nproc-per-node", default=None, type=int, help="processes per node (default: #GPUs, or 1)")
    p.add_argument("--gpu", default=None, type=int, help="GPU id for single-process training")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--amp", default="none", choices=["none", "bf16", "fp16"])
    p.add_argument("--channels-last", action="store_true")
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
    # MoCo
    g = p.add_argument_group("moco")
    g.add_argument("--moco-dim", default=128, type=int)
    g.add_argument("--moco-k", default=65536, type=int, help="queue size; multiple of the global batch")
    g.add_argument("--moco-m", default=0.999, type=float)
    g.add_argument("--moco-t", default=0.07, type=float)
    g.add_argument("--moco-symmetric", action="store_true",
                   help="symmetric loss: each view is query and key, both keys enqueued (MoCo's CIFAR demo, v3)")
    g.add_argument("--mlp", nargs="?", const="v2", default="none", choices=HEADS,
                   help="projection head: bare --mlp = MoCo v2 2-layer MLP; or wide|simple|deep")
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
    # SimCLR / BYOL / SimSiam / Barlow Twins (issue 8); paper defaults, see each smallssl/methods/<name>.py
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
    # SwAV / SEER (issue 6; Caron et al. 2020, Goyal et al. 2021). SwAV ImageNet: --optimizer lars
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
    # Large models and large batches (issue 6)
    g = p.add_argument_group("scale")
    g.add_argument("--lr-per-256", default=None, type=float,
                   help="set --lr to this x global batch / 256 (linear scaling; SEER model card: 0.3)")
    g.add_argument("--fsdp", action="store_true",
                   help="FSDP2 (fully_shard per residual block) instead of DDP; checkpoints become "
                        "torch.distributed.checkpoint directories CKPT_DIR/checkpoint_NNNN/ (--resume DIR or auto)")
    g.add_argument("--activation-checkpointing", action="store_true",
                   help="recompute each RegNet stage in the backward pass (regnety_* backbones)")
    return p


def build_method(args: argparse.Namespace, backbone: nn.Module) -> nn.Module:
    """The only place where command-line arguments become method keyword arguments."""
    if args.method == "moco":
        return METHODS["moco"](backbone, dim=args.moco_dim, K=args.moco_k, m=args.moco_m, T=args.moco_t,
                               mlp=args.mlp, shuffle_bn_splits=args.shuffle_bn_splits, symmetric=args.moco_symmetric)
    if args.method == "simclr":
        return METHODS["simclr"](backbone, dim=args.simclr_dim, hidden_dim=args.simclr_hidden,
                                 temperature=args.simclr_t)
    if args.method == "byol":
        return METHODS["byol"](backbone, dim=args.byol_dim, hidden_dim=args.byol_hidden, base_momentum=args.byol_m)
    if args.method == "simsiam":
        return METHODS["simsiam"](backbone, dim=args.simsiam_dim, pred_dim=args.simsiam_pred_dim,
                                  proj_layers=args.simsiam_proj_layers, fix_pred_lr=args.simsiam_fix_pred_lr)
    if args.method == "barlow":
        from smallssl.methods.barlow import parse_sizes

        return METHODS["barlow"](backbone, projector=parse_sizes(args.barlow_proj), lambd=args.barlow_lambda,
                                 bias_lr_scale=args.barlow_bias_lr_scale)
    if args.method == "seed":
        small_input = args.image_size <= 64 if args.small_input is None else args.small_input
        teacher = build_teacher(args.teacher_arch, args.teacher_ckpt, small_input=args.teacher_small_input,
                                default_small_input=small_input, proj=args.teacher_proj, dim=args.seed_dim,
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
        from smallssl.data import multicrop_transform

        return multicrop_transform(swav_size_crops(args), args.nmb_crops, args.min_scale_crops, args.max_scale_crops,
                                   cj=args.cj, grey_scale=args.grey_scale, gaussian_blur=args.gaussian_blur)
    if args.method == "seed":  # SEED: student and teacher see the same single view
        from smallssl.data import MultiViewTransform

        return MultiViewTransform([pretrain_transform(args.image_size, aug_plus=args.aug_plus, cj=args.cj,
                                                      grey_scale=args.grey_scale, gaussian_blur=args.gaussian_blur,
                                                      min_scale=args.min_crop_scale)])
    if args.method == "byol" and args.byol_aug == "asym":
        from smallssl.data import MultiViewTransform

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
    from smallssl.data.batch_aug import BatchAugment

    from smallssl.data import blur_prob, jitter_params

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


# --------------------------------------------------------------------------------------- process layout
def _env_distributed() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def _procs_per_node(args) -> int:
    if _env_distributed():
        # torchrun sets LOCAL_WORLD_SIZE; Slurm sets SLURM_NTASKS_PER_NODE (e.g. "2" or "2(x3)"); else one node.
        local = os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("SLURM_NTASKS_PER_NODE", "").split("(")[0]
        return int(local) if local and int(local) > 0 else int(os.environ["WORLD_SIZE"])
    if args.multiprocessing_distributed:
        if args.nproc_per_node:
            return args.nproc_per_node
        return torch.cuda.device_count() if _use_cuda(args) else 1
    return 1


def _use_cuda(args) -> bool:
    if args.device == "cpu":
        return False
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda but no CUDA GPU is visible; use --device cpu")
    return torch.cuda.is_available()


def global_batch_size(args) -> int:
    per_proc = args.batch_size // _procs_per_node(args)
    if _env_distributed():
        return per_proc * int(os.environ["WORLD_SIZE"])
    return per_proc * _procs_per_node(args) * max(args.world_size, 1)


def validate_args(args) -> None:
    """Fail before any process starts, naming what is wrong and what to do."""
    train_dir = os.path.join(args.data, "train")
    if not os.path.isdir(train_dir):
        raise FileNotFoundError(f"training images not found: {train_dir!r} does not exist. Pass the dataset root "
                                "that contains train/<class>/<image> (e.g. an unpacked ../shared/data tarball).")
    create_backbone_check(args.arch)
    for flag, value, low in (("--print-freq", args.print_freq, 1), ("--save-freq", args.save_freq, 1),
                             ("--epochs", args.epochs, 1), ("--workers", args.workers, 0),
                             ("--keep-last", args.keep_last, 0), ("--nproc-per-node", args.nproc_per_node or 1, 1),
                             ("--shuffle-bn-splits", args.shuffle_bn_splits, 1)):
        if value < low:
            raise ValueError(f"{flag} must be >= {low}, got {value}")
    nproc = _procs_per_node(args)
    if args.batch_size < nproc or args.batch_size % nproc:
        raise ValueError(f"--batch-size {args.batch_size} (per node) must be a positive multiple of the "
                         f"{nproc} processes per node")
    if args.method == "moco":
        check_queue_batch(args.moco_k, global_batch_size(args) * (2 if args.moco_symmetric else 1), "--moco-k")
    if args.method == "seed":
        if not args.teacher_ckpt or not os.path.isfile(args.teacher_ckpt):
            raise FileNotFoundError(f"--method seed needs --teacher-ckpt FILE (got {args.teacher_ckpt!r})")
        check_queue_batch(args.seed_k, global_batch_size(args), "--seed-k")
    if args.restart and not args.resume:
        raise ValueError("--restart needs --resume CHECKPOINT (the weights to restart from)")
    if args.resume and args.resume != "auto" and not os.path.isfile(args.resume) and not (
            args.fsdp and os.path.isdir(args.resume)):
        raise FileNotFoundError(f"--resume {args.resume!r}: no such checkpoint file"
                                + (" or sharded checkpoint directory" if args.fsdp else ""))
    _validate_scale_args(args)
    if args.batch_aug and args.method not in BATCH_AUG_METHODS:
        raise ValueError(f"--batch-aug supports the two-view methods {', '.join(BATCH_AUG_METHODS)}; "
                         f"--method {args.method} needs the PIL pipeline (drop --batch-aug)")
    if args.batch_aug and args.skip_bad_images:
        raise ValueError("--batch-aug decodes every image up front and stops at an unreadable one; "
                         "drop --skip-bad-images or fix the dataset")
    if args.amp == "fp16" and not _use_cuda(args):
        raise ValueError("--amp fp16 needs a CUDA GPU; use --amp bf16 on CPU")


def create_backbone_check(arch: str) -> None:
    if arch in BACKBONES:
        return
    try:
        import timm
    except ImportError:
        timm = None
    if timm is None or arch not in timm.list_models():
        raise ValueError(f"unknown architecture {arch!r}. Registered: {', '.join(sorted(BACKBONES))}; "
                         "any timm model name also works (see timm.list_models()).")


def main(args: argparse.Namespace) -> dict:
    """Validate, then run in this process or spawn one per device. Returns rank 0's final status."""
    validate_args(args)
    if args.multiprocessing_distributed and not _env_distributed():
        nproc = _procs_per_node(args)
        world = nproc * max(args.world_size, 1)
        if args.dist_url == "env://":
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(sdist.free_port()))
        ctx = mp.get_context("spawn")
        result_q = ctx.SimpleQueue()
        mp.start_processes(_spawned_worker, nprocs=nproc, args=(nproc, world, args, result_q), start_method="spawn")
        return result_q.get() if not result_q.empty() else {}
    if _env_distributed():
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local = int(os.environ.get("LOCAL_RANK", rank % _procs_per_node(args)))
        return main_worker(local, rank, world, args)
    return main_worker(0, 0, 1, args)


def _spawned_worker(local_rank: int, nproc: int, world: int, args, result_q) -> None:
    rank = max(args.rank, 0) * nproc + local_rank
    try:
        out = main_worker(local_rank, rank, world, args)
    except (ValueError, FileNotFoundError, CheckpointError, CorruptImageError, NonFiniteLossError) as e:
        print(f"error (rank {rank}): {e}", file=sys.stderr)
        sys.exit(2)
    if rank == 0:
        result_q.put(out)


# ------------------------------------------------------------------------------------------------ worker
def main_worker(local_rank: int, rank: int, world: int, args: argparse.Namespace) -> dict:
    cuda = _use_cuda(args)
    device = torch.device(f"cuda:{args.gpu if args.gpu is not None and world == 1 else local_rank}") if cuda \
        else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if world > 1:
        backend = args.dist_backend if args.dist_backend != "auto" else ("nccl" if cuda else "gloo")
        sdist.init_process_group(backend, rank, world, args.dist_url)
    try:
        return _train(args, device, rank, world)
    finally:
        if world > 1 and sdist.is_dist():
            torch.distributed.destroy_process_group()


def _train(args, device: torch.device, rank: int, world: int) -> dict:
    is_main = rank == 0
    nproc = _procs_per_node(args) if world > 1 else 1
    batch = args.batch_size // nproc
    workers = (args.workers + nproc - 1) // nproc
    if args.lr_per_256 is not None:  # linear scaling rule (Goyal et al. 2017); SEER: 0.3 per 256 images
        args.lr = args.lr_per_256 * batch * world / 256
    torch.manual_seed(args.seed)  # same on every rank: identical init and queue
    random.seed(args.seed)

    small_input = args.image_size <= 64 if args.small_input is None else args.small_input
    backbone = create_backbone(args.arch, small_input=small_input)
    method = build_method(args, backbone)
    if hasattr(method, "check_batch"):
        method.check_batch(batch * world)
    method.to(device)
    if args.channels_last:
        method.to(memory_format=torch.channels_last)
    if args.activation_checkpointing or args.fsdp:
        _setup_fsdp(method, args)  # issue 6: before the optimizer, which must see the sharded parameters

    optimizer = build_optimizer(args.optimizer, param_groups(method, args.weight_decay,
                                                             exclude_bias_and_norm=args.optimizer == "lars"),
                                lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay)
    scaler = torch.amp.GradScaler("cuda") if args.amp == "fp16" else None

    if args.batch_aug:
        from smallssl.data.memdata import load_images

        images, labels, _ = load_images(os.path.join(args.data, "train"), args.image_size, workers=args.workers,
                                        cache_dir=os.path.join(default_cache_dir(), "mem"), verbose=is_main)
        subset = fixed_subset(len(images), args.subset, seed=args.seed)
        if subset is not None:
            images, labels = images[subset], labels[subset]
        dataset = images
    else:
        transform = build_transform(args)
        dataset = SafeImageFolder(os.path.join(args.data, "train"), transform, skip_bad=args.skip_bad_images)
        subset = fixed_subset(len(dataset), args.subset, seed=args.seed)
        if subset is not None:
            dataset = torch.utils.data.Subset(dataset, subset)
        dataset = SeededViews(dataset, seed=args.seed)
    sampler = ResumableSampler(len(dataset), batch, rank, world, seed=args.seed)
    ident = dict(arch=args.arch, method_name=args.method, global_batch=batch * world, dataset_len=len(dataset))

    start_epoch, start_iter, step = args.start_epoch, 0, 0
    resume_path = resolve_resume(args.resume, args.ckpt_dir, sharded=args.fsdp)
    if resume_path and args.fsdp:  # a sharded (DCP) checkpoint directory
        start_epoch, start_iter, step = resume_sharded(method, optimizer, resume_path, **ident)
    elif resume_path and args.restart:
        if is_main:
            print(f"=> restarting from {resume_path!r} (weights only, epoch 0)")
        restart_load(method, load_checkpoint_file(resume_path), source=resume_path, verbose=is_main)
    elif resume_path:
        start_epoch, start_iter, step = resume_exact(method, optimizer, scaler, load_checkpoint_file(resume_path),
                                                     resume_path, **ident)
    if resume_path and not args.restart and is_main:
        print(f"=> resumed {resume_path!r} at epoch {start_epoch}, iteration {start_iter} (step {step})")

    model = method
    if world > 1 and not args.fsdp:
        model = nn.parallel.DistributedDataParallel(method, device_ids=[device.index] if device.type == "cuda"
                                                    else None, broadcast_buffers=False)
    logger = RunLogger(args.ckpt_dir, vars(args), enabled=is_main)
    if resume_path and not args.restart:
        logger.drop_epochs_from(start_epoch)  # epochs after the checkpoint are trained (and logged) again
    if is_main:
        print(f"=> {args.method} / {args.arch}: {len(dataset)} images, {sampler.num_batches} steps/epoch, "
              f"batch {batch} x {world} process(es), device {device}, git {logger.sha}")

    def save(epoch: int, it: int, name: str | None = None) -> str:
        """Collective (every rank calls it): an epoch checkpoint, or ``name`` (the preemption one)."""
        meta = dict(arch=args.arch, method=args.method, global_batch=ident["global_batch"],
                    dataset_len=ident["dataset_len"], args=vars(args))
        if args.fsdp:
            return save_sharded_checkpoint(method, optimizer, args.ckpt_dir, name or SHARDED_PATTERN.format(
                epoch=epoch), epoch=epoch, it=it, step=step, meta=meta, keep_last=args.keep_last)
        rngs = all_rng_states()
        path = os.path.join(args.ckpt_dir, name) if name else None
        if is_main:
            state = training_state(method, optimizer, scaler, rngs, epoch=epoch, it=it, step=step, arch=args.arch,
                                   method_name=args.method, global_batch=ident["global_batch"],
                                   dataset_len=ident["dataset_len"], args=vars(args))
            if name:
                atomic_save(state, path)
            else:
                path = save_checkpoint(state, args.ckpt_dir, epoch, args.keep_last)
                stale = os.path.join(args.ckpt_dir, LAST_CKPT)
                if os.path.exists(stale):
                    os.remove(stale)
        sdist.barrier()
        return path

    status = {"status": "finished", "epoch": start_epoch, "checkpoint": None}
    for epoch in range(start_epoch, args.epochs):
        sampler.set_epoch(epoch, start_iter)
        if hasattr(method, "set_epoch"):  # e.g. SwAV's queue starts at an epoch
            method.set_epoch(epoch)
        if args.batch_aug:
            from smallssl.data.memdata import BatchViews

            loader = BatchViews(images, labels, sampler, batch, build_batch_augs(args), seed=args.seed, rank=rank,
                                device=device)
        else:
            dataset.set_epoch(epoch)
            loader = torch.utils.data.DataLoader(
                dataset, batch_size=batch, sampler=sampler, num_workers=workers, collate_fn=collate_skip_bad,
                pin_memory=device.type == "cuda", drop_last=True,
                # own generator: its per-iterator base seed must not consume the global RNG, or a resumed run
                # diverges (issue 7)
                generator=torch.Generator().manual_seed(args.seed + epoch))
        stats, step, stopped_at = train_one_epoch(model, method, loader, optimizer, scaler, epoch, start_iter,
                                                  step, sampler.num_batches, device, args, is_main)
        start_iter = 0
        if stopped_at is not None:  # preempted: iteration-level checkpoint, then return
            path = save(epoch, stopped_at, SHARDED_LAST if args.fsdp else LAST_CKPT)
            if is_main:
                print(f"=> stop requested: saved {path} at epoch {epoch}, iteration {stopped_at}")
            return {"status": "preempted", "epoch": epoch, "iter": stopped_at, "checkpoint": path}
        stats.update(epoch=epoch, step=step)
        if world > 1 and not args.fsdp:  # FSDP holds one sharded copy: nothing to compare
            stats["replicas_in_sync"] = _replicas_in_sync(method, device)
        logger.log(stats)
        if is_main:
            print(f"=> epoch {epoch}: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                                  for k, v in stats.items()))
        if (epoch + 1) % args.save_freq == 0 or epoch + 1 == args.epochs:
            status["checkpoint"] = save(epoch + 1, 0)
        status.update(epoch=epoch + 1, **{k: v for k, v in stats.items() if k in ("loss", "acc1")})
        sdist.barrier()
    return status


def train_one_epoch(model, method, loader, optimizer, scaler, epoch: int, start_iter: int, step: int,
                    steps_per_epoch: int, device: torch.device, args, is_main: bool):
    """One epoch from iteration ``start_iter``. Returns (stats, global step, stopped_at or None)."""
    from tqdm import tqdm

    model.train()
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.amp)
    sums: dict[str, float] = {}
    n_steps, n_images, n_skipped, t0 = 0, 0, 0, time.time()
    lr = args.lr
    bar = tqdm(total=steps_per_epoch, initial=start_iter, desc=f"epoch {epoch}", disable=not is_main
               or args.no_progress, dynamic_ncols=True, leave=False,
               mininterval=0.1 if sys.stderr.isatty() else 30.0)  # logs/CI: a line every 30 s, not per step
    for i, (views, _, n_bad) in enumerate(loader, start=start_iter):
        n_skipped += n_bad
        lr = lr_at(epoch + i / steps_per_epoch, args.lr, args.epochs, cos=args.cos, schedule=args.schedule,
                   warmup_epochs=args.warmup_epochs)
        set_lr(optimizer, lr, base_lr=args.lr)
        mf = torch.channels_last if args.channels_last else torch.contiguous_format
        views = [v.to(device, non_blocking=True).contiguous(memory_format=mf) for v in views]
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            out = model(views)
        loss = out["loss"]
        # one collective per step: any rank's non-finite loss stops every rank before the update (a rank that
        # went on would enqueue NaN keys everywhere), and any rank's stop request stops all at this boundary
        nonfinite, stop = sdist.any_rank(not torch.isfinite(loss.detach()), preempt.stop_requested(), device=device)
        if nonfinite:
            last = latest_checkpoint(args.ckpt_dir) if args.ckpt_dir else None
            raise NonFiniteLossError(
                f"loss is {loss.item()} (on rank {sdist.get_rank()} or another) at epoch {epoch}, iteration {i} "
                f"(global step {step}); stopping before "
                f"the update. Last good checkpoint: {last or 'none yet'}. Lower --lr, try --amp none, or check "
                "the data; resume with --resume.")
        optimizer.zero_grad(set_to_none=True)
        (scaler.scale(loss) if scaler is not None else loss).backward()
        if hasattr(method, "before_optimizer_step"):  # e.g. SwAV drops its prototypes' gradient at first
            method.before_optimizer_step(step=step)
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        if hasattr(method, "after_step"):
            method.after_step(step=step, total_steps=args.epochs * steps_per_epoch)
        step += 1
        n_steps += 1
        n_images += views[0].shape[0] * sdist.get_world_size()
        for k, v in out.items():  # every scalar the method reports (loss, acc1, std, tau, ...) is averaged
            if (isinstance(v, torch.Tensor) and v.numel() == 1) or isinstance(v, (int, float)):
                sums[k] = sums.get(k, 0.0) + float(v.detach() if isinstance(v, torch.Tensor) else v)
        if is_main and i % args.print_freq == 0:
            bar.set_postfix(loss=f"{float(loss.detach()):.4f}", acc1=f"{float(out.get('acc1', 0)):.1f}", lr=f"{lr:.3g}")
        bar.update(1)
        if stop and i + 1 < steps_per_epoch:
            bar.close()
            return {}, step, i + 1
    bar.close()
    elapsed = time.time() - t0
    stats = {k: v / max(n_steps, 1) for k, v in sums.items()}
    stats.update(lr=lr, img_per_s=n_images / max(elapsed, 1e-9), time_s=elapsed, skipped_images=n_skipped)
    return stats, step, None


@torch.no_grad()
def _replicas_in_sync(method: nn.Module, device: torch.device) -> bool:
    """True when every rank holds the same parameters and buffers (queue included); raises otherwise."""
    # BN running stats are per rank (broadcast_buffers=False, as in official MoCo): not compared (issue 7)
    sums = torch.stack([t.detach().double().sum() for k, t in method.state_dict().items()
                        if t.is_floating_point() and not k.endswith(("running_mean", "running_var"))])
    gathered = sdist.all_gather_cat(sums.to(device)[None])
    if not torch.equal(gathered.min(0).values, gathered.max(0).values):
        raise RuntimeError("replicas diverged across ranks (parameters or queue differ); this is a bug")
    return True


# ------------------------------------------------------------------ FSDP2 and sharded checkpoints (issue 6)
def _validate_scale_args(args) -> None:
    if args.lr_per_256 is not None and args.lr_per_256 <= 0:
        raise ValueError(f"--lr-per-256 must be > 0, got {args.lr_per_256}")
    if args.method == "swav":
        from smallssl.data import multicrop_transform

        multicrop_transform(swav_size_crops(args), args.nmb_crops, args.min_scale_crops, args.max_scale_crops)
        if max(args.crops_for_assign) >= sum(args.nmb_crops):
            raise ValueError(f"--crops-for-assign {args.crops_for_assign} must index the {sum(args.nmb_crops)} "
                             f"crops of --nmb-crops {args.nmb_crops}")
    if not args.fsdp:
        return
    supported = sorted(k for k, v in METHODS.items() if getattr(v, "supports_fsdp", False))
    if args.method not in supported:
        raise ValueError(f"--fsdp is not supported by --method {args.method}; methods with FSDP: "
                         f"{', '.join(supported)} (use DDP: drop --fsdp)")
    if not (args.multiprocessing_distributed or _env_distributed()):
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
    from smallssl.fsdp import enable_activation_checkpointing, fsdp_wrap

    if args.activation_checkpointing:
        enable_activation_checkpointing(method)
    if args.fsdp:
        fsdp_wrap(method, param_dtype=torch.bfloat16 if args.amp == "bf16" else None, reduce_dtype=torch.float32)


def cli(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    try:
        result = main(args)
    except (ValueError, FileNotFoundError, CheckpointError, CorruptImageError, NonFiniteLossError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except ProcessException as e:  # a spawned rank failed; with exit code 2 it already printed a clear error
        if getattr(e, "exit_code", None) != 2:
            print(f"error: a training process failed ({e})", file=sys.stderr)
        return 2
    if result.get("loss") is not None and not math.isfinite(result["loss"]):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(cli())
