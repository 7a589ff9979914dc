"""The trainer's two checkpoint calls: :func:`save_training_checkpoint` and :func:`resume_training`.

``meta`` is one dict describing the run: ``arch``, ``method``, ``global_batch``, ``dataset_len`` and ``args``
(what the run was started with). Plain runs (one process or DDP) write ``checkpoint_NNNN.pth.tar`` from rank 0;
FSDP runs write DCP directories ``checkpoint_NNNN/`` collectively. A stop request writes the iteration-level
``checkpoint_last`` instead; the next epoch checkpoint removes it.
"""

from __future__ import annotations

import os

import torch.nn as nn

from .. import dist as sdist
from .io import atomic_save, save_checkpoint
from .load import restart_load
from .resume import LAST_CKPT, SHARDED_LAST, SHARDED_PATTERN, all_rng_states, find_resume, resume_exact, training_state
from .sharded import resume_sharded, save_sharded_checkpoint

RESUME_MODES = ("exact", "restart", "sharded")


def save_training_checkpoint(method: nn.Module, optimizer, scaler, ckpt_dir: str, *, epoch: int, it: int, step: int,
                             meta: dict, sharded: bool = False, keep_last: int = 0, last: bool = False) -> str:
    """Collective (every rank calls it). An epoch checkpoint, or with ``last`` the iteration-level one a stop
    request writes. Returns its path. ``scaler``: a GradScaler, or None when fp16 is off."""
    if sharded:
        name = SHARDED_LAST if last else SHARDED_PATTERN.format(epoch=epoch)
        return save_sharded_checkpoint(method, optimizer, ckpt_dir, name, epoch=epoch, it=it, step=step, meta=meta,
                                       keep_last=keep_last)
    rngs = all_rng_states()  # collective: every rank's generators
    path = os.path.join(ckpt_dir, LAST_CKPT)
    if sdist.is_main_process():
        state = training_state(method, optimizer, scaler, rngs, epoch=epoch, it=it, step=step, arch=meta["arch"],
                               method_name=meta["method"], global_batch=meta["global_batch"],
                               dataset_len=meta["dataset_len"], args=meta["args"])
        if last:
            atomic_save(state, path)
        else:
            stale, path = path, save_checkpoint(state, ckpt_dir, epoch, keep_last)
            if os.path.exists(stale):
                os.remove(stale)
    sdist.barrier()
    return path


def resume_training(method: nn.Module, optimizer, scaler, resume: str, ckpt_dir: str, *, mode: str, meta: dict,
                    verbose: bool = True) -> tuple[int, int, int, str | None]:
    """``--resume`` (a path or ``auto``): ``(epoch, iteration, step, path)`` to continue from.

    ``mode``: ``exact`` (everything: weights, optimizer, scaler, RNG, position), ``restart`` (ssl-small's
    ``--restart``: weights that fit, from epoch 0) or ``sharded`` (an FSDP run's DCP directory, collectively).
    ``auto`` takes the newest checkpoint that loads (see :func:`.resume.find_resume`); with no checkpoint, or an
    empty ``resume``, the run starts from scratch at ``(0, 0, 0, None)``.
    """
    if mode not in RESUME_MODES:
        raise ValueError(f"unknown resume mode {mode!r}; choose one of {', '.join(RESUME_MODES)}")
    path, ckpt = find_resume(resume, ckpt_dir, sharded=mode == "sharded", rename=sdist.is_main_process())
    sdist.barrier()  # rank 0 may have moved a corrupt file aside while the others looked
    if path is None:
        return 0, 0, 0, None
    ident = dict(arch=meta["arch"], method_name=meta["method"], global_batch=meta["global_batch"],
                 dataset_len=meta["dataset_len"])
    if mode == "restart":
        if verbose:
            print(f"=> restarting from {path!r} (weights only, epoch 0)")
        restart_load(method, ckpt if ckpt is not None else path, source=path, verbose=verbose, arch=meta["arch"])
        return 0, 0, 0, path
    if mode == "sharded":
        epoch, it, step = resume_sharded(method, optimizer, path, **ident)
    else:
        epoch, it, step = resume_exact(method, optimizer, scaler, ckpt, path, **ident)
    if verbose:
        print(f"=> resumed {path!r} at epoch {epoch}, iteration {it} (step {step})")
    return epoch, it, step, path
