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
from .io import CheckpointMismatchError, latest_checkpoint, sharded_epochs
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
    """The MoCo-schema checkpoint dict (``state_dict`` keys prefixed ``module.``) plus resume extras."""
    return {"epoch": epoch, "iter": it, "step": step, "arch": arch, "method": method_name,
            "state_dict": {"module." + k: v for k, v in method.state_dict().items()},
            "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict() if scaler else None,
            "rng": rngs, "global_batch": global_batch, "dataset_len": dataset_len, "args": args}


def _step_of(path: str) -> int:
    return int(torch.load(path, map_location="cpu", mmap=True, weights_only=False).get("step", 0))


def resolve_resume(resume: str, ckpt_dir: str, sharded: bool = False) -> str | None:
    """``--resume``: a path as given, or for ``auto`` the newest checkpoint in ``ckpt_dir`` (None if none)."""
    if resume != "auto":
        return resume or None
    if sharded:
        last = os.path.join(ckpt_dir, SHARDED_LAST)
        epochs = sharded_epochs(ckpt_dir)
        found = last if os.path.isdir(last) else (epochs[-1] if epochs else None)
    else:
        candidates = [p for p in (latest_checkpoint(ckpt_dir), os.path.join(ckpt_dir, LAST_CKPT))
                      if p and os.path.isfile(p)]
        found = max(candidates, key=_step_of) if candidates else None
    if found is None:
        print(f"=> --resume auto: no checkpoint in {ckpt_dir!r}, starting from scratch")
    return found


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


def resume_exact(method: nn.Module, optimizer, scaler, ckpt: dict, path: str, *, arch: str, method_name: str,
                 global_batch: int, dataset_len: int) -> tuple[int, int, int]:
    """Load everything of a :func:`training_state` checkpoint; returns ``(epoch, iter, step)``."""
    _check_identity(ckpt, path, arch, method_name, global_batch, dataset_len)
    state = {k.removeprefix("module."): v for k, v in state_dict_of(ckpt).items()}
    try:
        method.load_state_dict(state)
    except RuntimeError as e:
        raise CheckpointMismatchError(f"--resume {path!r} does not fit this model ({e}). Use --restart to load "
                                      "the matching weights only.") from e
    if "optimizer" in ckpt:
        try:
            optimizer.load_state_dict(ckpt["optimizer"])
        except (ValueError, KeyError) as e:
            raise CheckpointMismatchError(f"--resume {path!r}: its optimizer state does not fit ({e}); was it "
                                          "trained with another --optimizer?") from e
    if scaler is not None and ckpt.get("scaler"):
        scaler.load_state_dict(ckpt["scaler"])
    if ckpt.get("rng"):
        set_rng_state(ckpt["rng"])
    return int(ckpt.get("epoch", 0)), int(ckpt.get("iter", 0)), int(ckpt.get("step", 0))
