"""The trainer's checkpoint state: what an exact resume needs, written and read back.

Plain (DDP / single process) runs write one ``.pth.tar`` in the MoCo schema from rank 0; FSDP2 runs write a
sharded ``torch.distributed.checkpoint`` directory collectively. Both carry ``epoch`` (epochs completed),
``iter`` (iterations done inside ``epoch``: non-zero only for a preemption save), ``step``, the RNG states of
every rank, and the global batch / dataset size that give ``iter`` its meaning.
"""

from __future__ import annotations

import os
import random

import torch
from torch import nn

from .. import dist as sdist
from ..heads import head_hint
from .io import CheckpointError, CheckpointMismatchError, list_checkpoints, load_checkpoint_file, sharded_epochs
from .native import LAYOUT_KEY, from_native, layout_for_method, query_head_of, to_native
from .report import state_dict_of

LAST_CKPT = "checkpoint_last.pth.tar"  # iteration-level checkpoint written on preemption
SHARDED_PATTERN = "checkpoint_{epoch:04d}"  # FSDP: one DCP directory per epoch
SHARDED_LAST = "checkpoint_last"


def rng_state() -> dict:
    """This process's RNG states (CPU, Python, and this rank's CUDA device)."""
    rng = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        rng["cuda"] = torch.cuda.get_rng_state()
    return rng


def all_rng_states() -> list[dict]:
    """Every rank's RNG states, rank order (collective under torch.distributed)."""
    if not sdist.is_dist():
        return [rng_state()]
    out: list = [None] * sdist.get_world_size()
    torch.distributed.all_gather_object(out, rng_state())
    return out


def set_rng_state(states: dict | list[dict]) -> None:
    """Restore this rank's entry of ``states`` (a list from :func:`all_rng_states`, or one dict)."""
    if isinstance(states, list):
        rank = sdist.get_rank()
        if len(states) != sdist.get_world_size():
            raise CheckpointMismatchError(f"checkpoint holds RNG states of {len(states)} processes, this run has "
                                          f"{sdist.get_world_size()}; resume with the same number of processes")
        states = states[rank]
    torch.set_rng_state(states["torch"])
    random.setstate(states["python"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state(states["cuda"])


def training_state(method: nn.Module, optimizer, scaler, rngs: list[dict], *, epoch: int, it: int, step: int,
                   arch: str, method_name: str, global_batch: int, dataset_len: int, args: dict) -> dict:
    """The checkpoint dict: ``state_dict`` in the method's peer layout (:mod:`.native`: MoCo's for MoCo,
    SimCLR, BYOL, SimSiam, Barlow Twins; SEED's; SwAV's), named in ``"layout"``, plus what an exact resume needs."""
    layout = layout_for_method(method_name)
    return {"epoch": epoch, "iter": it, "step": step, "arch": arch, "method": method_name,
            LAYOUT_KEY: layout, "state_dict": to_native(method.state_dict(), layout),
            "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict() if scaler else None,
            "rng": rngs, "global_batch": global_batch, "dataset_len": dataset_len, "args": args}


def _step_of(path: str) -> int:
    return int(torch.load(path, map_location="cpu", mmap=True, weights_only=False).get("step", 0))


def quarantine(path: str, why: BaseException | str, rename: bool = True) -> str | None:
    """Say that ``path`` does not load and move it aside to ``path.corrupt`` (``.corrupt.N`` if taken)."""
    target = None
    if rename and os.path.exists(path):
        target, n = path + ".corrupt", 1
        while os.path.exists(target):
            target, n = f"{path}.corrupt.{n}", n + 1
        os.replace(path, target)
    print(f"=> warning: checkpoint {path!r} does not load ({' '.join(str(why).split())[:300]}); "
          + (f"moved aside to {target!r}, trying the next one" if target else "trying the next one"), flush=True)
    return target


def _sharded_ok(path: str) -> bool:
    import torch.distributed.checkpoint as dcp

    try:
        dcp.FileSystemReader(path).read_metadata()
    except Exception:  # noqa: BLE001 - any failure to read the metadata means an unusable directory
        return False
    return True


def find_resume(resume: str, ckpt_dir: str, sharded: bool = False, rename: bool = True
                ) -> tuple[str | None, dict | None]:
    """``--resume``: ``(path, loaded checkpoint)`` for a path as given (a corrupt file is an error naming it), or
    for ``auto`` the newest checkpoint in ``ckpt_dir`` that loads, newest by global step (``(None, None)`` if none).

    ``auto`` verifies before it trusts: a checkpoint that does not load is named, moved aside to ``*.corrupt``
    (by the caller that has ``rename``, i.e. rank 0) and the next older one is tried. Sharded (FSDP) directories
    are checked by reading their DCP metadata and loaded later, collectively (the dict is None).
    """
    if resume != "auto":
        if not resume:
            return None, None
        return resume, (None if sharded else load_checkpoint_file(resume))
    if sharded:
        last = os.path.join(ckpt_dir, SHARDED_LAST)
        for path in ([last] if os.path.isdir(last) else []) + sharded_epochs(ckpt_dir)[::-1]:
            if _sharded_ok(path):
                return path, None
            quarantine(path, "unreadable torch.distributed.checkpoint metadata", rename)
        print(f"=> --resume auto: no checkpoint in {ckpt_dir!r}, starting from scratch")
        return None, None
    while True:
        last = os.path.join(ckpt_dir, LAST_CKPT)
        steps: dict[str, int] = {}
        for path in ([last] if os.path.isfile(last) else []) + list_checkpoints(ckpt_dir)[::-1]:
            try:
                steps[path] = _step_of(path)
            except Exception as e:  # noqa: BLE001 - torch raises many types for truncated / foreign files
                quarantine(path, e, rename)
                continue
            if path != last:
                break  # older epoch checkpoints are older than this one
        if not steps:
            print(f"=> --resume auto: no checkpoint in {ckpt_dir!r}, starting from scratch")
            return None, None
        best = max(steps, key=steps.get)
        try:
            return best, load_checkpoint_file(best)
        except CheckpointError as e:
            quarantine(best, e, rename)


def resolve_resume(resume: str, ckpt_dir: str, sharded: bool = False) -> str | None:
    """The path :func:`find_resume` settles on (None when starting from scratch)."""
    return find_resume(resume, ckpt_dir, sharded)[0]


def _check_identity(meta: dict, path: str, arch: str, method_name: str, global_batch: int,
                    dataset_len: int) -> None:
    if meta.get("arch") not in (None, arch) or meta.get("method", method_name) != method_name:
        raise CheckpointMismatchError(
            f"--resume {path!r} was trained with -a {meta.get('arch')} --method {meta.get('method', 'moco')}, "
            f"not -a {arch} --method {method_name}; pass the matching flags, or --restart to load what fits.")
    if int(meta.get("iter", 0)) > 0:  # a mid-epoch position only means something for the same sampler
        saved = (meta.get("global_batch", global_batch), meta.get("dataset_len", dataset_len))
        if saved != (global_batch, dataset_len):
            raise CheckpointMismatchError(
                f"--resume {path!r} stopped inside an epoch with global batch {saved[0]} over {saved[1]} images; "
                f"this run has {global_batch} over {dataset_len}. Resume with the same -b, processes and "
                "--subset, or resume from the last epoch checkpoint instead.")


def _optimizer_hint(saved: dict, optimizer) -> str:
    """Why a saved optimizer state does not fit, when the cause is known."""
    groups = saved.get("param_groups", []) if isinstance(saved, dict) else []
    if any(g.get("lars") is False for g in groups) and not any(g.get("lars") is False
                                                               for g in optimizer.param_groups):
        return (" It was written by a LARS run that excluded biases and norm weights from LARC and weight decay "
                "(SimCLR / BYOL style): resume it with --optimizer lars-exclude-bn.")
    return " Was it trained with another --optimizer?"


def resume_exact(method: nn.Module, optimizer, scaler, ckpt: dict, path: str, *, arch: str, method_name: str,
                 global_batch: int, dataset_len: int) -> tuple[int, int, int]:
    """Load everything of a :func:`training_state` checkpoint (any layout smallssl ever wrote); returns
    ``(epoch, iter, step)``. Bit-exact: tensors are renamed (and the queue transposed), never recomputed."""
    _check_identity(ckpt, path, arch, method_name, global_batch, dataset_len)
    if ckpt.get("type") == "sharded":
        raise CheckpointMismatchError(f"--resume {path!r} is a sharded (FSDP) checkpoint directory: resume it with "
                                      "--fsdp, or pass --restart to load its weights into this run")
    own = method.state_dict()
    state, layout, unused = from_native(state_dict_of(ckpt), own.keys(), ckpt.get(LAYOUT_KEY))
    missing = sorted(k for k in own if k not in state)
    mismatched = [f"{k} {tuple(state[k].shape)} vs model {tuple(own[k].shape)}" for k in state
                  if tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unused or mismatched:
        raise CheckpointMismatchError(
            f"--resume {path!r} does not fit this model (read as the {layout!r} layout): {len(missing)} missing "
            f"({', '.join(missing[:3])}), {len(unused)} unused ({', '.join(unused[:3])}), {len(mismatched)} with "
            f"another shape ({', '.join(mismatched[:2])}).{head_hint(query_head_of(state_dict_of(ckpt), layout), own)}"
            " Use --restart to load the matching weights only.")
    method.load_state_dict(state)
    if "optimizer" in ckpt:
        try:
            optimizer.load_state_dict(ckpt["optimizer"])
        except (ValueError, KeyError) as e:
            raise CheckpointMismatchError(f"--resume {path!r}: its optimizer state does not fit ({e})."
                                          + _optimizer_hint(ckpt["optimizer"], optimizer)) from e
    if scaler is not None and ckpt.get("scaler"):
        scaler.load_state_dict(ckpt["scaler"])
    if ckpt.get("rng"):
        set_rng_state(ckpt["rng"])
    return int(ckpt.get("epoch", 0)), int(ckpt.get("iter", 0)), int(ckpt.get("step", 0))
