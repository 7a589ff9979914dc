"""One error style for every command line: ``error: <what>: <why>. <what to do>`` on stderr, exit code 2.

Entry points wrap their ``main`` with :func:`run_cli`::

    if __name__ == "__main__":
        sys.exit(run_cli(main))

Expected failures (bad input, missing or unreadable files, checkpoints that do not fit, a full disk, a read-only
directory) print one line and return 2; no traceback unless ``SMALLSSL_DEBUG=1`` is set. Anything else is a bug
and keeps its traceback. Library code raises :class:`UserError` (or ``ValueError`` / ``FileNotFoundError``) with a
message that already says what, why and what to do.
"""

from __future__ import annotations

import errno
import os
import sys
import traceback
from typing import Any, Callable

EXIT_USAGE = 2  # bad input / expected failure (argparse uses 2 too)
EXIT_PREEMPTED = 3  # SIGTERM / SIGUSR2: an iteration-level checkpoint was saved; resume with --resume auto


class UserError(RuntimeError):
    """An expected failure whose message is complete (what, why, what to do)."""


class ReportedError(UserError):
    """An expected failure already reported on stderr (e.g. by a spawned rank): exit 2 without another line."""


# Expected failures raised by the library, by class name (so that this module imports nothing from smallssl).
EXPECTED = ("CheckpointError", "CheckpointMismatchError", "CorruptImageError", "NonFiniteLossError", "LockError",
            "CollectiveTimeoutError")


# errno -> (what it is, what to do)
_OS_ERRORS = {
    errno.ENOSPC: ("no space left on device", "free space or point the path at another disk"),
    errno.EDQUOT: ("disk quota exceeded", "free space or point the path at another disk"),
    errno.EROFS: ("read-only file system", "choose a writable directory"),
    errno.EACCES: ("permission denied", "check the permissions or choose another path"),
    errno.EPERM: ("operation not permitted", "check the permissions or choose another path"),
    errno.ENOENT: ("no such file or directory", "check the path"),
    errno.EISDIR: ("is a directory, expected a file", "pass a file"),
    errno.ENOTDIR: ("not a directory", "check the path"),
}


def os_error_in(e: BaseException) -> OSError | None:
    """The first OSError in ``e``'s cause / context chain (torch wraps ENOSPC in a RuntimeError)."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno is not None:
            return e
        e = e.__cause__ or e.__context__
    return None


def describe_os_error(e: OSError) -> str:
    """One line for an OSError: the path, what happened, and what to do."""
    what, todo = _OS_ERRORS.get(e.errno, (e.strerror or str(e), "check the path"))
    path = e.filename or "(unknown path)"
    return f"{path}: {what}. {todo.capitalize()}"


def format_error(e: BaseException) -> str | None:
    """The one-line message for an expected failure, or None for a bug (which keeps its traceback)."""
    os_err = os_error_in(e)
    if os_err is not None and os_err.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM):
        return describe_os_error(os_err)
    if isinstance(e, OSError) and e.errno is not None:
        return describe_os_error(e)
    if isinstance(e, (UserError, ValueError, OSError)) or type(e).__name__ in EXPECTED:  # OSError: our own message
        return " ".join(str(e).split())  # one line, even for multi-line messages (load reports)
    return None


def report(e: BaseException, prefix: str = "error") -> bool:
    """Print ``e`` as one line on stderr (with a traceback under ``SMALLSSL_DEBUG=1``); False for a bug."""
    msg = format_error(e)
    if msg is None:
        return False
    if isinstance(e, ReportedError):
        return True
    if os.environ.get("SMALLSSL_DEBUG") == "1":
        traceback.print_exception(type(e), e, e.__traceback__)
    print(f"{prefix}: {msg}", file=sys.stderr)
    return True


def run_cli(main: Callable[..., Any], *args: Any, **kwargs: Any) -> int:
    """Call ``main``; 0 on success (or its int result), 2 with one clear line for an expected failure."""
    try:
        result = main(*args, **kwargs)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except SystemExit:
        raise
    except Exception as e:  # noqa: BLE001 - expected failures are reported in one line, bugs re-raised
        if report(e):
            return EXIT_USAGE
        raise
    return result if isinstance(result, int) and not isinstance(result, bool) else 0
