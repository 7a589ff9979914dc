"""Checkpoint files: names, atomic saves with retention, reading with clear errors.

The one module that knows how checkpoint files are named and written; within the package it imports only
the leaf :mod:`.dcp_read`. Schema written by ``main_moco.py`` (MoCo's, plus what an exact resume needs; see
:mod:`.resume`; key names per method in :mod:`.native`)::

    {"epoch": int,                      # epochs completed
     "arch": str, "method": str, "layout": "moco" | "seed" | "swav",
     "state_dict": {"module.encoder_q.<backbone names>", "module.encoder_q.fc.*",
                    "module.encoder_k.*", "module.queue" (dim, K), "module.queue_ptr", ...},
     "optimizer": optimizer.state_dict(),
     "scaler": GradScaler state or None, "step": global step, "rng": rng states, "args": vars(args)}
"""

from __future__ import annotations

import errno
import glob
import os
import re
import shutil
import tempfile
from collections.abc import Mapping
from typing import Any

import torch

from ..errors import os_error_in
from .dcp_read import is_dcp_dir, open_dcp

CKPT_PATTERN = "checkpoint_{epoch:04d}.pth.tar"
_CKPT_RE = re.compile(r"checkpoint_(\d+)\.pth\.tar$")


class CheckpointError(RuntimeError):
    """A checkpoint file is missing, unreadable or has no state dict."""


class CheckpointMismatchError(ValueError):
    """A checkpoint does not fit the model it is loaded into."""


# ----------------------------------------------------------------------------------------------- saving
TMP_PREFIX = ".tmp_"  # atomic_save's temp files: ckpt_dir/.tmp_XXXX.pth.tar until renamed


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_save(obj: Any, path: str) -> None:
    """``torch.save`` to a temp file in the same directory, fsync, then rename: never a half-written file.

    The file gets the process umask's permissions (0644 by default), like the run's logs; a full disk or a
    read-only / forbidden directory raises :class:`CheckpointError` saying so (the previous checkpoint is intact).
    """
    directory = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(directory, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX, suffix=".pth.tar", dir=directory)
    except OSError as e:
        raise CheckpointError(f"cannot write checkpoint {path!r}: {_os_reason(e)}") from e
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600: colleagues sharing the dir could not read it
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        os_err = os_error_in(e)
        if os_err is not None:
            raise CheckpointError(f"cannot write checkpoint {path!r}: {_os_reason(os_err)}; nothing was "
                                  "overwritten (earlier checkpoints are intact)") from e
        raise


def _os_reason(e: OSError) -> str:
    reasons = {errno.ENOSPC: "no space left on device. Free space or choose another --ckpt-dir, then resume "
                             "with --resume auto",
               errno.EDQUOT: "disk quota exceeded. Free space or choose another --ckpt-dir",
               errno.EROFS: "the directory is on a read-only file system. Choose a writable --ckpt-dir",
               errno.EACCES: "permission denied. Check the directory's permissions or choose another --ckpt-dir"}
    return reasons.get(e.errno, f"{e.strerror or e}")


def remove_orphan_temps(ckpt_dir: str) -> int:
    """Delete temp files that dead writers left in ``ckpt_dir`` (a kill during :func:`atomic_save`, or a
    sharded ``checkpoint_*.tmp`` directory); returns how many. Call it only while holding the directory's
    run lock (:mod:`.lock`), so that no live writer's temp file is touched."""
    if not os.path.isdir(ckpt_dir):
        return 0
    n = 0
    for name in os.listdir(ckpt_dir):
        path = os.path.join(ckpt_dir, name)
        if name.startswith(TMP_PREFIX) and name.endswith(".pth.tar") and os.path.isfile(path):
            os.remove(path)
            n += 1
        elif re.fullmatch(r"checkpoint_(\d{4}|last)\.(tmp|old)", name) and os.path.isdir(path):
            shutil.rmtree(path, ignore_errors=True)
            n += 1
    return n


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
    """Read a checkpoint; a missing or corrupt file raises :class:`CheckpointError` naming it.

    A sharded (FSDP2 DCP) directory gives ``{"state_dict": <lazy tensors>, "type": "sharded", **extra}``
    (:func:`.dcp_read.open_dcp`): its tensors are read one at a time when used.
    """
    path = os.fspath(path)
    if is_dcp_dir(path):
        try:
            return open_dcp(path)
        except Exception as e:  # DCP raises its own CheckpointException (a BaseException subclass) and others
            raise CheckpointError(f"sharded checkpoint {path!r} could not be read ({type(e).__name__}: {e})") from e
    if os.path.isdir(path):
        raise CheckpointError(f"checkpoint {path!r} is a directory but not a sharded (torch.distributed.checkpoint)"
                              " one: it has no .metadata file")
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
