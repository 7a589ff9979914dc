"""Checkpoint files: names, atomic saves with retention, reading with clear errors.

The one module that knows how checkpoint files are named and written; it imports nothing from the package.
Schema written by ``main_moco.py`` (MoCo's, plus what an exact resume needs; see :mod:`.resume`)::

    {"epoch": int,                      # epochs completed
     "arch": str, "method": str,
     "state_dict": {"module.encoder_q.backbone.*", "module.encoder_q.head.*",
                    "module.encoder_k.*", "module.queue", "module.queue_ptr", ...},
     "optimizer": optimizer.state_dict(),
     "scaler": GradScaler state or None, "step": global step, "rng": rng states, "args": vars(args)}
"""

from __future__ import annotations

import glob
import os
import re
import tempfile
from collections.abc import Mapping
from typing import Any

import torch

CKPT_PATTERN = "checkpoint_{epoch:04d}.pth.tar"
_CKPT_RE = re.compile(r"checkpoint_(\d+)\.pth\.tar$")


class CheckpointError(RuntimeError):
    """A checkpoint file is missing, unreadable or has no state dict."""


class CheckpointMismatchError(ValueError):
    """A checkpoint does not fit the model it is loaded into."""


# ----------------------------------------------------------------------------------------------- saving
def atomic_save(obj: Any, path: str) -> None:
    """``torch.save`` to a temp file in the same directory, fsync, then rename: never a half-written file."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp_", suffix=".pth.tar", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def list_checkpoints(ckpt_dir: str) -> list[str]:
    """``checkpoint_NNNN.pth.tar`` files in ``ckpt_dir``, oldest epoch first."""
    paths = [p for p in glob.glob(os.path.join(ckpt_dir, "checkpoint_*.pth.tar")) if _CKPT_RE.search(p)]
    return sorted(paths, key=lambda p: int(_CKPT_RE.search(p).group(1)))


def latest_checkpoint(ckpt_dir: str) -> str | None:
    paths = list_checkpoints(ckpt_dir)
    return paths[-1] if paths else None


def sharded_epochs(ckpt_dir: str) -> list[str]:
    """FSDP runs' sharded ``checkpoint_NNNN/`` directories in ``ckpt_dir``, oldest epoch first."""
    names = sorted(n for n in os.listdir(ckpt_dir) if re.fullmatch(r"checkpoint_\d{4}", n)) \
        if os.path.isdir(ckpt_dir) else []
    return [os.path.join(ckpt_dir, n) for n in names]


def save_checkpoint(state: dict, ckpt_dir: str, epoch: int, keep_last: int = 0) -> str:
    """Write ``ckpt_dir/checkpoint_{epoch:04d}.pth.tar`` atomically; keep only the last ``keep_last`` (0 = all).

    Pruning counts only checkpoints up to ``epoch``: files of later epochs (left by another run in a reused
    directory) are neither counted nor deleted, and the file just written is never removed.
    """
    path = os.path.join(ckpt_dir, CKPT_PATTERN.format(epoch=epoch))
    atomic_save(state, path)
    if keep_last > 0:
        upto = [p for p in list_checkpoints(ckpt_dir) if int(_CKPT_RE.search(p).group(1)) <= epoch]
        for old in upto[:-keep_last]:
            os.remove(old)
    return path


# ---------------------------------------------------------------------------------------------- loading
def load_checkpoint_file(path: str, map_location: str | torch.device = "cpu") -> dict:
    """Read a checkpoint; a missing or corrupt file raises :class:`CheckpointError` naming it."""
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path!r} does not exist")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as e:  # torch raises many types for truncated / foreign files
        raise CheckpointError(f"checkpoint {path!r} could not be read ({type(e).__name__}: {e}); "
                              "is it truncated or not a PyTorch file?") from e
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"checkpoint {path!r} holds a {type(obj).__name__}, not a dict")
    return dict(obj)
