"""Unpack the real image sets of ``../shared/data`` into a cache directory (never into the repo).

The tarballs (``cifar10.tar.gz``, ``cifar100-small.tar.gz``, ``caltech101.tar.gz``) each unpack to an
ImageFolder tree ``<name>/{train,val}/<class>/<image>``. :func:`prepare_dataset` unpacks one once into
``${SMALLSSL_CACHE:-~/.cache/smallssl}`` and returns the root holding ``train/`` and ``val/``.

Where the tarballs are looked for, in order: the ``data_dir`` argument, ``$SMALLSSL_DATA``, then
``<repo>/../shared/data`` (the repo being the directory above this package).
"""

from __future__ import annotations

import os
import re
import socket
import tarfile
import tempfile

from ..checkpoints.lock import pid_alive

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Short names the CLIs accept -> tarball stem (the directory it unpacks to).
ALIASES = {"cifar10": "cifar10", "cifar100": "cifar100-small", "cifar100-small": "cifar100-small",
           "caltech101": "caltech101"}


def default_data_dir() -> str:
    """``$SMALLSSL_DATA`` or ``<repo>/../shared/data``."""
    return os.environ.get("SMALLSSL_DATA") or os.path.normpath(os.path.join(REPO_ROOT, "..", "shared", "data"))


def default_cache_dir() -> str:
    """``$SMALLSSL_CACHE`` or ``~/.cache/smallssl``."""
    return os.environ.get("SMALLSSL_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "smallssl")


def tarball_path(name: str, data_dir: str | None = None) -> str:
    """Path of ``<data_dir>/<stem>.tar.gz`` for dataset ``name`` (may not exist)."""
    stem = ALIASES.get(name, name)
    return os.path.join(data_dir or default_data_dir(), f"{stem}.tar.gz")


def dataset_available(name: str, data_dir: str | None = None) -> bool:
    """True when the tarball of ``name`` exists (tests skip on False)."""
    return os.path.isfile(tarball_path(name, data_dir))


def _safe_members(tar: tarfile.TarFile, dest: str):
    dest = os.path.realpath(dest)
    for m in tar.getmembers():
        target = os.path.realpath(os.path.join(dest, m.name))
        if not (target == dest or target.startswith(dest + os.sep)) or m.issym() or m.islnk():
            raise ValueError(f"refusing unsafe tar member {m.name!r}")
        yield m


def prepare_dataset(name: str, cache_dir: str | None = None, data_dir: str | None = None) -> str:
    """Unpack dataset ``name`` (once) and return its ImageFolder root containing ``train/`` and ``val/``.

    ``name``: ``cifar10``, ``cifar100`` (= ``cifar100-small``), ``caltech101`` or any ``<stem>`` with a
    ``<stem>.tar.gz`` in the data dir. The unpack goes to a temp dir and is renamed into place, so two
    processes racing never see a half-unpacked tree; a ``.complete`` marker tells a finished unpack.
    """
    stem = ALIASES.get(name, name)
    cache_dir = cache_dir or default_cache_dir()
    root = os.path.join(cache_dir, stem)
    marker = os.path.join(root, ".complete")
    if os.path.isfile(marker):
        return root
    tar_path = tarball_path(stem, data_dir)
    if not os.path.isfile(tar_path):
        raise FileNotFoundError(
            f"dataset {name!r}: no tarball at {tar_path!r}. Known names: {', '.join(sorted(ALIASES))}; "
            "set SMALLSSL_DATA to the directory holding <name>.tar.gz.")
    os.makedirs(cache_dir, exist_ok=True)
    _remove_dead_unpacks(cache_dir, stem)
    tmp = tempfile.mkdtemp(prefix=f".unpack_{stem}@{socket.gethostname()}@{os.getpid()}@", dir=cache_dir)
    try:
        with tarfile.open(tar_path, "r:gz") as tar:
            tar.extractall(tmp, members=_safe_members(tar, tmp))
        unpacked = os.path.join(tmp, stem)
        if not os.path.isdir(os.path.join(unpacked, "train")):
            raise ValueError(f"{tar_path!r} does not unpack to {stem}/train/; got {os.listdir(tmp)}")
        open(os.path.join(unpacked, ".complete"), "w").close()
        if os.path.isdir(root) and not os.path.isfile(marker):
            _rmtree(root)  # a stale partial tree from an interrupted older unpack
        try:
            os.replace(unpacked, root)
        except OSError:
            if not os.path.isfile(marker):  # lost a race to another process only if it finished
                raise
    finally:
        _rmtree(tmp)
    return root


def _remove_dead_unpacks(cache_dir: str, stem: str) -> None:
    """Delete partial ``.unpack_<stem>@<host>@<pid>@*`` trees whose unpacking process (on this host) is gone,
    and those of the older ``.unpack_<stem>_XXXXXXXX`` form; a live process's unpack is left alone."""
    host = socket.gethostname()
    for name in os.listdir(cache_dir):
        parts = name.split("@")
        if len(parts) == 4 and parts[0] == f".unpack_{stem}":
            if parts[1] != host or not parts[2].isdigit() or pid_alive(int(parts[2])):
                continue
        elif not re.fullmatch(rf"\.unpack_{re.escape(stem)}_[a-z0-9_]{{8}}", name):
            continue
        print(f"=> removing {os.path.join(cache_dir, name)!r}: an interrupted unpack of {stem}", flush=True)
        _rmtree(os.path.join(cache_dir, name))


def _rmtree(path: str) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


def balanced_subset(root: str, train_per_class: int, val_per_class: int, cache_dir: str | None = None) -> str:
    """An ImageFolder root holding the first ``train_per_class`` / ``val_per_class`` files (sorted by name) of
    every class of ``root``'s ``train/`` / ``val/``, as symlinks under ``<cache>/<name>-<T>x<V>/`` (made once,
    atomically, like :func:`prepare_dataset`). For a class-balanced subset of a large set (e.g. CIFAR-10 at 64 px
    in a short comparison); a class with fewer files keeps them all."""
    if train_per_class < 1 or val_per_class < 1:
        raise ValueError(f"per-class sizes must be >= 1, got train {train_per_class}, val {val_per_class}")
    root = os.path.abspath(root)
    cache_dir = cache_dir or default_cache_dir()
    out = os.path.join(cache_dir, f"{os.path.basename(root.rstrip(os.sep))}-{train_per_class}x{val_per_class}")
    if os.path.isfile(os.path.join(out, ".complete")):
        return out
    os.makedirs(cache_dir, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".subset_{os.path.basename(out)}@{socket.gethostname()}@{os.getpid()}@",
                           dir=cache_dir)
    try:
        for split, n in (("train", train_per_class), ("val", val_per_class)):
            src = os.path.join(root, split)
            if not os.path.isdir(src):
                raise FileNotFoundError(f"{src!r} is not a directory: a subset needs <root>/train and <root>/val")
            for cls in sorted(d for d in os.listdir(src) if os.path.isdir(os.path.join(src, d))):
                os.makedirs(os.path.join(tmp, split, cls))
                for f in sorted(os.listdir(os.path.join(src, cls)))[:n]:
                    os.symlink(os.path.join(src, cls, f), os.path.join(tmp, split, cls, f))
        open(os.path.join(tmp, ".complete"), "w").close()
        if os.path.isdir(out) and not os.path.isfile(os.path.join(out, ".complete")):
            _rmtree(out)  # left by an interrupted older run
        try:
            os.replace(tmp, out)
        except OSError:
            if not os.path.isfile(os.path.join(out, ".complete")):
                raise
    finally:
        _rmtree(tmp)
    return out
