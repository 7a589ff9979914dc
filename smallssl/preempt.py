"""Cooperative stop requests (SIGTERM / SIGUSR2 from Slurm, Kubernetes, ``timeout``; submitit preemption).

A signal handler or submitit's ``checkpoint()`` only *requests* a stop; the training loop checks
:func:`stop_requested` at each step boundary (agreed across ranks), writes an iteration-level checkpoint
and returns; ``main_moco.py`` then exits with :data:`smallssl.errors.EXIT_PREEMPTED` (3). A second signal
exits at once (checkpoints are written atomically, so none is ever half-written). Nothing collective ever
runs inside a signal handler.
"""

from __future__ import annotations

import os
import signal
import sys
import threading

_STOP = threading.Event()


def request_stop(*_args) -> None:
    _STOP.set()


def stop_requested() -> bool:
    return _STOP.is_set()


def clear() -> None:
    _STOP.clear()


def install_signal_handlers(names: tuple[str, ...] = ("SIGUSR2",)) -> None:
    """Route the named signals to :func:`request_stop` (main thread only)."""
    for name in names:
        sig = getattr(signal, name, None)
        if sig is None:
            raise ValueError(f"unknown signal {name!r}")
        signal.signal(sig, request_stop)


def _stop_or_exit(signum, _frame) -> None:
    if _STOP.is_set():  # second signal: the user (or the scheduler) means it
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
        return
    _STOP.set()
    print(f"=> {signal.Signals(signum).name}: saving an iteration-level checkpoint at the next step boundary "
          "(send it again to exit at once)", file=sys.stderr, flush=True)


def install_stop_handlers(names: tuple[str, ...] = ("SIGTERM", "SIGUSR2")) -> dict:
    """First signal: request a stop (checkpoint at the next step, then exit 3); second: exit at once.
    Returns the previous handlers, for :func:`restore_handlers`."""
    return {name: signal.signal(getattr(signal, name), _stop_or_exit) for name in names}


def restore_handlers(previous: dict) -> None:
    """Put back the handlers :func:`install_stop_handlers` replaced (e.g. submitit's, after a run returns)."""
    for name, handler in previous.items():
        signal.signal(getattr(signal, name), handler if handler is not None else signal.SIG_DFL)
