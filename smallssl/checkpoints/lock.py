"""One training run per checkpoint directory: an advisory lock file ``CKPT_DIR/.lock``.

The file holds the holder's host, pid, start time and command. It is created with ``O_CREAT | O_EXCL``, which is
atomic on local file systems and on NFS v3 and later; so two runs started together on one directory cannot both
take it. A lock whose holder is a dead process on this host is stale: it is taken over, and the run says so. A
lock held from another host cannot be checked for liveness from here: the run is refused, naming the holder
(unless it is an earlier run of the same Slurm job: a requeued job takes its own lock over);
``--break-lock`` takes it over (use it only when that run is known to be gone). The lock is removed when the run
ends (also on an error or a stop signal); after a ``kill -9`` it stays and is taken over as stale by the next run
on the same host.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time


class LockError(RuntimeError):
    """Another run holds the checkpoint directory."""


LOCK_NAME = ".lock"


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this host (also when another user owns it)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _read(path: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}  # unreadable or half-written (a holder killed while writing it): treated as stale below


class RunLock:
    """``with RunLock(ckpt_dir): ...`` or ``acquire()`` / ``release()``; ``force`` takes over any holder."""

    def __init__(self, ckpt_dir: str, force: bool = False):
        self.path = os.path.join(ckpt_dir, LOCK_NAME)
        self.force = force
        self.me = {"host": socket.gethostname(), "pid": os.getpid(), "start_time": time.time(),
                   "argv": " ".join(sys.argv)[:500], "slurm_job": os.environ.get("SLURM_JOB_ID")}
        self.held = False
        self.taken_over: dict | None = None

    def _create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            json.dump(self.me, f)
            f.flush()
            os.fsync(f.fileno())
        return True

    def acquire(self) -> RunLock:
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        for _ in range(3):  # a takeover races with other starters: retry the atomic create
            if self._create():
                self.held = True
                return self
            holder = _read(self.path)
            same_host = holder.get("host") == self.me["host"]
            pid = int(holder.get("pid", -1))
            requeued = holder.get("slurm_job") is not None and holder.get("slurm_job") == self.me["slurm_job"]
            stale = not holder or requeued or (same_host and (pid == os.getpid() or not pid_alive(pid)))
            if not (stale or self.force):
                since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("start_time", 0)))
                where = "this host" if same_host else f"host {holder.get('host')!r}"
                raise LockError(
                    f"--ckpt-dir {os.path.dirname(self.path)!r} is in use: pid {holder.get('pid')} on {where} "
                    f"started {since} holds {self.path!r} ({holder.get('argv', '?')[:120]}). Two runs writing one "
                    "directory overwrite each other's checkpoints. Use another --ckpt-dir, wait for that run, or "
                    "pass --break-lock if it is known to be gone")
            self.taken_over = holder
            try:
                os.remove(self.path)
            except FileNotFoundError:
                pass
        raise LockError(f"could not take the lock {self.path!r}: other runs keep taking it. Start one run at a time")

    def release(self) -> None:
        if self.held and _read(self.path).get("pid") == self.me["pid"]:
            try:
                os.remove(self.path)
            except FileNotFoundError:
                pass
        self.held = False

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
