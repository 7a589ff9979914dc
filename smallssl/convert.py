"""Checkpoint conversions: ``python -m smallssl.convert <subcommand> ...``.

Subcommands (``SUBCOMMANDS``; add one with :func:`register_subcommand`)::

    vissl2smallssl      VISSL / SEER checkpoint (consolidated or sliced) -> smallssl layout, with a report
    smallssl2vissl      smallssl RegNet checkpoint -> VISSL layout (regnet or regnet_fsdp keys)
    consolidated2sliced one file -> one file per tensor + index (memory-mapped, tensor by tensor)
    sliced2consolidated index + slices -> one file
    dcp2consolidated    torch.distributed.checkpoint directory (FSDP2 sharded) -> one file
    dcp2sliced          torch.distributed.checkpoint directory -> sliced, one tensor in memory at a time
    seed2moco           SEED checkpoint -> MoCo (student -> encoder_q, teacher dropped, --keep-queue)
    export              any smallssl checkpoint (also older files) -> --to moco|sslsmall|seed|swav|timm|torchvision
    onnx                a checkpoint's backbone -> ONNX (pooled features, dynamic batch), checked with onnxruntime

Examples::

    python -m smallssl.convert vissl2smallssl seer_regnet32gf_model_iteration244000.torch seer32.pth.tar \\
        --arch regnety_32gf
    python -m smallssl.convert consolidated2sliced model_iteration124500_conso.torch seer10b/index.torch
    python -m smallssl.convert vissl2smallssl seer10b/index.torch seer10b_smallssl/index.torch --arch regnety_10b
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Callable

import torch

from .checkpoints.io import atomic_save, load_checkpoint_file
from .checkpoints.report import state_dict_of
from .checkpoints.sliced import SLICE_LIST, consolidated_to_sliced, sliced_to_consolidated
from .errors import run_cli

SUBCOMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], None]]] = {}


def register_subcommand(name: str, help: str, add_args: Callable[[argparse.ArgumentParser], None]
                        ) -> Callable[[Callable[[argparse.Namespace], None]], Callable[[argparse.Namespace], None]]:
    """Decorator: ``@register_subcommand("seed2moco", "help", add_args)`` on a ``run(args)`` function."""
    def deco(run: Callable[[argparse.Namespace], None]) -> Callable[[argparse.Namespace], None]:
        if name in SUBCOMMANDS:
            raise ValueError(f"convert subcommand {name!r} registered twice")
        SUBCOMMANDS[name] = (help, add_args, run)
        return run
    return deco


def _io(p: argparse.ArgumentParser) -> None:
    p.add_argument("input", help="input checkpoint (file, sliced index, or DCP directory)")
    p.add_argument("output", help="output path")


def _is_sliced(path: str) -> bool:
    if not os.path.isfile(path):
        return False
    obj = torch.load(path, map_location="cpu", mmap=True, weights_only=False)
    return isinstance(obj, dict) and obj.get("type") == SLICE_LIST


def _check_arch(arch: str | None, source, rename) -> None:
    """Compare names and shapes of ``source`` (renamed) with ``arch`` built on the meta device; exit if unfit.

    Reads no tensor data: sliced sources give shapes from their index, consolidated ones are memory-mapped.
    """
    if not arch:
        return
    from .backbones import create_backbone
    from .checkpoints.report import LoadReport
    from .checkpoints.sliced import LazyStateDict

    with torch.device("meta"):
        target = {k: tuple(v.shape) for k, v in create_backbone(arch).state_dict().items()}
    report = LoadReport(source="checkpoint", prefix="")
    for k in source:
        name = rename(k)
        if name is None or name not in target:
            report.unexpected.append(k)
            continue
        shape = source.shape(k) if isinstance(source, LazyStateDict) else tuple(source[k].shape)
        if shape is not None and tuple(shape) != target[name]:
            report.mismatched.append(f"{name} {tuple(shape)} vs model {target[name]}")
        else:
            report.loaded.append(name)
    report.missing = sorted(n for n in set(target) - set(report.loaded) - {m.split(" ")[0] for m in report.mismatched}
                            if not n.endswith("num_batches_tracked"))
    print(f"=> --arch {arch}: " + report.summary().lstrip("=> "))
    if report.missing or report.mismatched:
        raise ValueError(f"checkpoint does not fit --arch {arch}: check -a against the architecture it was "
                         "trained with")


def _vissl_args(p: argparse.ArgumentParser) -> None:
    _io(p)
    p.add_argument("--arch", default=None, help="check the trunk against this smallssl backbone (e.g. regnety_32gf)")


@register_subcommand("vissl2smallssl", "VISSL/SEER checkpoint -> smallssl (raw RegNet keys + vissl_heads)",
                     _vissl_args)
def _vissl2smallssl(args: argparse.Namespace) -> None:
    from .checkpoints.vissl import open_vissl, rename_sliced, vissl_to_smallssl_key, vissl_to_smallssl_state

    if _is_sliced(args.input):
        trunk, _, _ = open_vissl(args.input)
        _check_arch(args.arch, trunk, vissl_to_smallssl_key)
        rename_sliced(args.input, args.output)
        print(f"=> wrote sliced smallssl index {args.output} (slices shared with {args.input})")
        return
    trunk, heads, _ = open_vissl(args.input)
    state, unmapped = vissl_to_smallssl_state(trunk)
    if unmapped:
        print(f"=> {len(unmapped)} trunk keys not mapped: {unmapped[:8]}")
    _check_arch(args.arch, state, lambda k: k)
    # Tensors are memory-mapped from the input: torch.save streams them, nothing is copied up front.
    atomic_save({"arch": args.arch, "state_dict": state, "vissl_heads": dict(heads),
                 "source": os.path.abspath(args.input)}, args.output)
    print(f"=> wrote {args.output}: {len(state)} trunk tensors, {len(heads)} head tensors")


def _to_vissl_args(p: argparse.ArgumentParser) -> None:
    _io(p)
    p.add_argument("--layout", default="regnet", choices=["regnet", "regnet_fsdp", "resnet"],
                   help="VISSL trunk: RegNet (SEER), RegNet with FSDP groups (SEER 10B), or ResNe(X)t (model zoo)")
    p.add_argument("--prefix", default=None, help="prefix of the RegNet keys in the input (default: found)")
    p.add_argument("--stage-checkpoints", default="", help="regnet_fsdp groups, e.g. '2;7;9,17;' (SEER 10B)")


@register_subcommand("smallssl2vissl", "smallssl RegNet checkpoint -> VISSL layout", _to_vissl_args)
def _smallssl2vissl(args: argparse.Namespace) -> None:
    from .checkpoints.vissl import save_vissl_checkpoint

    state = state_dict_of(load_checkpoint_file(args.input))
    prefix = args.prefix
    first = "conv1.weight" if args.layout == "resnet" else "stem.conv.weight"
    if prefix is None:
        cands = sorted({k[:k.index(first)] for k in state if k.endswith(first) and "teacher." not in k
                        and "encoder_k." not in k}, key=len)
        if not cands:
            raise ValueError(f"{args.input}: no {'ResNet' if args.layout == 'resnet' else 'RegNet'} ({first}) found")
        prefix = next((c for c in cands if "encoder_q" in c or "student" in c), cands[0])
    head_roots = ("fc.", "head.", "projection_head.", "prototypes.")  # a MoCo / SwAV head is not trunk
    trunk = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)
             and not k[len(prefix):].startswith(head_roots)
             and k[len(prefix):] not in ("queue", "queue_ptr", "queue_count")}
    stages = [[int(x) for x in s.split(",") if x] for s in args.stage_checkpoints.split(";")] \
        if args.stage_checkpoints else None
    save_vissl_checkpoint(args.output, trunk, layout=args.layout, stage_checkpoints=stages)
    print(f"=> wrote {args.output}: {len(trunk)} trunk tensors (prefix {prefix!r}, layout {args.layout})")


def _slice_args(p: argparse.ArgumentParser) -> None:
    _io(p)
    p.add_argument("--keep-optimizer", action="store_true", help="also slice optimizer / scaler state")


@register_subcommand("consolidated2sliced", "one checkpoint file -> one file per tensor + index", _slice_args)
def _consolidated2sliced(args: argparse.Namespace) -> None:
    consolidated_to_sliced(args.input, args.output, drop_keys=() if args.keep_optimizer else ("optimizer", "scaler"))
    print(f"=> wrote sliced index {args.output}")


@register_subcommand("sliced2consolidated", "sliced checkpoint -> one file", _io)
def _sliced2consolidated(args: argparse.Namespace) -> None:
    sliced_to_consolidated(args.input, args.output)
    print(f"=> wrote {args.output}")


def _dcp_args(p: argparse.ArgumentParser) -> None:
    _io(p)
    p.add_argument("--no-optimizer", action="store_true", help="leave the optimizer state out")


@register_subcommand("dcp2consolidated", "FSDP2 sharded (torch.distributed.checkpoint) -> one file", _dcp_args)
def _dcp2consolidated(args: argparse.Namespace) -> None:
    from .checkpoints.sharded import dcp_to_consolidated

    dcp_to_consolidated(args.input, args.output, include_optimizer=not args.no_optimizer)
    print(f"=> wrote {args.output}")


@register_subcommand("dcp2sliced", "FSDP2 sharded -> sliced (model tensors), one tensor at a time", _io)
def _dcp2sliced(args: argparse.Namespace) -> None:
    from .checkpoints.sharded import dcp_to_sliced

    dcp_to_sliced(args.input, args.output)
    print(f"=> wrote sliced index {args.output}")


def _seed2moco_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("input", help="SEED checkpoint (smallssl or official: module.student.* / module.teacher.*)")
    p.add_argument("output", nargs="?", default=None, help="default: converted_<suffix> next to the input")
    p.add_argument("--keep-queue", action="store_true", help="keep the queue of teacher embeddings for MoCo")


@register_subcommand("seed2moco", "SEED checkpoint -> MoCo checkpoint for --resume ... --restart", _seed2moco_args)
def _seed2moco(args: argparse.Namespace) -> None:
    from .checkpoints.seed2moco import distill_ckpt2moco_ckpt

    distill_ckpt2moco_ckpt(args.input, args.output, keep_queue=args.keep_queue)


def _export_args(p: argparse.ArgumentParser) -> None:
    from .checkpoints.export import EXPORT_TARGETS

    _io(p)
    p.add_argument("--to", required=True, choices=EXPORT_TARGETS,
                   help="layout of the output (moco = sslsmall: MoCo's main_lincls.py; timm / torchvision: the bare "
                        "backbone state dict)")


@register_subcommand("export", "smallssl checkpoint -> a peer's layout (MoCo, ssl-small, SEED, SwAV, timm, "
                     "torchvision)", _export_args)
def _export(args: argparse.Namespace) -> None:
    from .checkpoints.export import export_checkpoint

    if os.path.abspath(args.input) == os.path.abspath(args.output):
        raise ValueError(f"output {args.output!r} would overwrite the input: pass another OUTPUT")
    out = export_checkpoint(load_checkpoint_file(args.input), args.to)
    atomic_save(out, args.output)
    n = len(out.get("state_dict", out))
    print(f"=> wrote {args.output}: {n} tensors in the {args.to} layout")


def _onnx_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("input", metavar="CKPT", help="any checkpoint load_backbone reads ('' = random init)")
    p.add_argument("output", metavar="OUT.onnx")
    p.add_argument("-a", "--arch", required=True, help="backbone architecture (as for training)")
    p.add_argument("--image-size", default=224, type=int, help="input side of the exported graph (batch is dynamic)")
    p.add_argument("--small-input", action=argparse.BooleanOptionalAction, default=None,
                   help="CIFAR stem (default: as main_moco.py, on for --image-size <= 64)")
    p.add_argument("--opset", default=17, type=int)
    p.add_argument("--latency", action="store_true", help="also measure onnxruntime's CPU latency at batch 1")


@register_subcommand("onnx", "a checkpoint's backbone (pooled features) -> ONNX, checked with onnxruntime",
                     _onnx_args)
def _onnx(args: argparse.Namespace) -> None:
    from .backbones import check_arch, create_backbone, default_small_input
    from .checkpoints.load import load_backbone
    from .onnx_export import export_onnx, measure_latency

    check_arch(args.arch)
    small = default_small_input(args.image_size) if args.small_input is None else args.small_input
    backbone = create_backbone(args.arch, small_input=small)
    if args.input:
        load_backbone(backbone, args.input, arch=args.arch)
    info = export_onnx(backbone, args.output, args.image_size, opset=args.opset)
    print(f"=> wrote {args.output}: " + ", ".join(f"{k} {v}" for k, v in info.items()))
    if args.latency:
        lat = measure_latency(args.output, args.image_size, batch=1)
        print(f"=> onnxruntime CPU latency, batch 1: median {lat['median']:.1f} ms, min {lat['min']:.1f} ms, "
              f"p90 {lat['p90']:.1f} ms ({lat['img_per_s']:.1f} img/s)")


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m smallssl.convert", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="{" + ",".join(SUBCOMMANDS) + "}")
    for name, (help_, add_args, run) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_)
        add_args(p)
        p.set_defaults(func=run)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = get_parser().parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    sys.exit(run_cli(main, sys.argv[1:]))
