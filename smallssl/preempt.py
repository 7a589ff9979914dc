"""Cooperative stop requests (Slurm preemption / timeout).

A signal handler or submitit's ``checkpoint()`` only *requests* a stop; the training loop checks
:func:`stop_requested` at each step boundary (agreed across ranks), writes an iteration-level checkpoint
and returns. Nothing collective ever runs inside a signal handler.
"""

from __future__ import annotations

import signal
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
