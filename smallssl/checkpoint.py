"""Checkpoints: atomic saves, retention, exact resume, and loading foreign layouts with a report.

Schema written by ``main_moco.py`` (the MoCo one, plus what an exact resume needs)::

    {"epoch": int,                      # epochs completed
     "arch": str, "method": str,
     "state_dict": {"module.encoder_q.backbone.*", "module.encoder_q.head.*",
                    "module.encoder_k.*", "module.queue", "module.queue_ptr", ...},
     "optimizer": optimizer.state_dict(),
     "scaler": GradScaler state or None, "step": global step, "rng": rng states, "args": vars(args)}

Loading accepts that schema, the official MoCo / ssl-small one (``module.encoder_q.conv1.weight``),
SEED (``module.student.*``), and plain timm / torchvision state dicts: :func:`load_backbone` finds the
prefix under which the checkpoint holds the backbone and reports loaded / missing / unexpected keys.
A checkpoint that does not fit the architecture raises :class:`CheckpointMismatchError`.
"""

from __future__ import annotations

import glob
import os
import re
import tempfile
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch
import torch.nn as nn

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


def state_dict_of(ckpt: Mapping) -> dict[str, torch.Tensor]:
    """The tensor dict inside a checkpoint: ``state_dict`` / ``model`` / ``teacher`` / the dict itself."""
    for key in ("state_dict", "model", "model_state", "teacher", "student"):
        value = ckpt.get(key)
        if isinstance(value, Mapping) and any(isinstance(v, torch.Tensor) for v in value.values()):
            return dict(value)
    if any(isinstance(v, torch.Tensor) for v in ckpt.values()):
        return {k: v for k, v in ckpt.items() if isinstance(v, torch.Tensor)}
    raise CheckpointError(f"no state dict found in checkpoint (top-level keys: {sorted(ckpt)[:10]})")


def _candidate_prefixes(keys) -> set[str]:
    prefixes = {""}
    for k in keys:
        parts = k.split(".")
        for i in range(1, len(parts)):
            prefixes.add(".".join(parts[:i]) + ".")
    return prefixes


def find_prefix(state: Mapping[str, torch.Tensor], model_keys, prefer: tuple[str, ...] = ()) -> str:
    """The prefix ``p`` maximising ``#{k : k = p + m, m in model_keys}``; ties go to ``prefer`` order."""
    model_keys = set(model_keys)
    best, best_n = "", -1
    ordered = list(prefer) + sorted(_candidate_prefixes(state), key=len)
    for p in ordered:
        n = sum(1 for k in state if k.startswith(p) and k[len(p):] in model_keys)
        if n > best_n:
            best, best_n = p, n
    return best


@dataclass
class LoadReport:
    source: str
    prefix: str
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)

    def summary(self) -> str:
        lines = [f"=> loaded {len(self.loaded)} tensors from {self.source!r} (prefix {self.prefix!r}); "
                 f"missing {len(self.missing)}, shape-mismatched {len(self.mismatched)}, "
                 f"unused {len(self.unexpected)}"]
        for name, items in (("missing", self.missing), ("mismatched", self.mismatched),
                            ("unused", self.unexpected)):
            if items:
                shown = ", ".join(items[:8]) + (f", ... (+{len(items) - 8})" if len(items) > 8 else "")
                lines.append(f"   {name}: {shown}")
        return "\n".join(lines)


def _is_optional(key: str) -> bool:
    return key.endswith("num_batches_tracked")


def load_state_with_report(module: nn.Module, state: Mapping[str, torch.Tensor], source: str = "<state>",
                           prefix: str | None = None, strict: bool = True,
                           prefer: tuple[str, ...] = ()) -> LoadReport:
    """Load the tensors of ``state`` under ``prefix`` (found automatically when None) into ``module``.

    ``strict``: raise :class:`CheckpointMismatchError` if any model tensor is missing or has another shape
    (BatchNorm's ``num_batches_tracked`` may be absent). Non-strict drops mismatches and reports them.
    """
    target = module.state_dict()
    if prefix is None:
        prefix = find_prefix(state, target.keys(), prefer)
    report = LoadReport(source=source, prefix=prefix)
    to_load = {}
    for k, v in state.items():
        if not k.startswith(prefix):
            continue
        name = k[len(prefix):]
        if name not in target:
            report.unexpected.append(k)
        elif tuple(v.shape) != tuple(target[name].shape):
            report.mismatched.append(f"{name} {tuple(v.shape)} vs model {tuple(target[name].shape)}")
        else:
            to_load[name] = v
    report.loaded = sorted(to_load)
    report.missing = sorted(k for k in target if k not in to_load and not _is_optional(k)
                            and not any(m.startswith(k + " ") for m in report.mismatched))
    # Extra tensors inside a module the model also has (e.g. layer1.2.* of a ResNet-34 loaded into a
    # ResNet-18) mean another architecture; extra top-level modules (fc, head, classifier) are just heads.
    roots = {k.split(".")[0] for k in target}
    foreign = [k for k in report.unexpected if k[len(prefix):].split(".")[0] in roots]
    if strict and (report.missing or report.mismatched or not report.loaded or foreign):
        raise CheckpointMismatchError(
            f"checkpoint {source!r} does not fit this model: {len(report.loaded)} tensors match, "
            f"{len(report.missing)} missing, {len(report.mismatched)} with another shape, {len(foreign)} extra "
            f"inside the model's modules ({', '.join(foreign[:3])}).\n{report.summary()}\n"
            "Check -a/--arch (and --small-input) against the architecture the checkpoint was trained with."
        )
    module.load_state_dict(to_load, strict=False)
    return report


def load_backbone(backbone: nn.Module, path_or_ckpt: str | Mapping, strict: bool = True,
                  verbose: bool = True) -> LoadReport:
    """Load a backbone from any supported checkpoint layout (smallssl, MoCo, ssl-small, SEED, timm, torchvision).

    Query encoder / student weights are preferred over key encoder / teacher ones.
    """
    if isinstance(path_or_ckpt, str):
        source, ckpt = path_or_ckpt, load_checkpoint_file(path_or_ckpt)
    else:
        source, ckpt = "<dict>", path_or_ckpt
    if "classy_state_dict" in ckpt or ckpt.get("type") == "slice_list":  # VISSL / SEER (consolidated or sliced)
        from .vissl import load_vissl_trunk

        return load_vissl_trunk(backbone, path_or_ckpt, strict=strict, verbose=verbose)
    state = state_dict_of(ckpt)
    prefer = ("module.encoder_q.backbone.", "encoder_q.backbone.", "module.encoder_q.", "encoder_q.",
              "module.student.backbone.", "module.student.", "student.", "module.backbone.", "backbone.",
              "module.", "")
    report = load_state_with_report(backbone, state, source=source, strict=strict, prefer=prefer)
    if verbose:
        print(report.summary())
    return report


def _strip_module(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}


def restart_load(method: nn.Module, ckpt: Mapping, source: str = "<dict>", verbose: bool = True) -> list[LoadReport]:
    """ssl-small's ``--restart``: load weights only, from any supported layout, into a fresh method.

    * the (student / query) backbone must fit completely, else :class:`CheckpointMismatchError`;
    * the projection head (``encoder_q.head`` here, ``encoder_q.fc`` in MoCo/ssl-small, ``student.head`` /
      ``student.fc`` in SEED) is loaded where shapes match, mismatches are dropped and reported;
    * remaining tensors with the same name and shape (e.g. ``queue``, ``queue_ptr``) are loaded; an official
      (dim, K) queue is transposed to smallssl's (K, dim); a SEED checkpoint's (teacher) queue is not carried;
    * the query encoder is copied to the key encoder (``method.copy_query_to_key()``) when there is one.
    """
    state = _strip_module(state_dict_of(ckpt))
    reports = []
    backbone = method.backbone
    reports.append(load_state_with_report(
        backbone, state, source=source, strict=True,
        prefer=("encoder_q.backbone.", "encoder_q.", "student.backbone.", "student.", "backbone.", "")))
    head = getattr(getattr(method, "encoder_q", None), "head", None)
    if head is not None:
        head_prefixes = ("encoder_q.head.", "encoder_q.fc.", "student.head.", "student.fc.")
        prefix = next((p for p in head_prefixes if any(k.startswith(p) for k in state)), None)
        if prefix is not None:
            reports.append(load_state_with_report(head, state, source=source + " [head]", prefix=prefix,
                                                  strict=False))
    own = method.state_dict()
    extra = {}
    skipped = []
    # A SEED checkpoint's queue holds *teacher* embeddings: not MoCo keys (convert with --keep-queue to force it).
    carry = () if ckpt.get("method") == "seed" else ("queue", "queue_ptr")
    for name in carry:
        if name in state and name in own:
            v = state[name]
            if v.shape != own[name].shape and v.ndim == 2 and v.T.shape == own[name].shape:
                v = v.T.contiguous()
            (extra.__setitem__(name, v) if v.shape == own[name].shape else skipped.append(name))
    if extra:
        method.load_state_dict(extra, strict=False)
    if hasattr(method, "copy_query_to_key"):
        method.copy_query_to_key()
    if verbose:
        for r in reports:
            print(r.summary())
        print(f"=> also loaded: {sorted(extra) or 'nothing else'}; skipped (shape): {skipped or 'none'}; "
              f"key encoder {'copied from query encoder' if hasattr(method, 'copy_query_to_key') else 'n/a'}")
    return reports


def distill_ckpt2moco_ckpt(path: str, out: str | None = None, keep_queue: bool = False) -> str:
    """SEED checkpoint -> MoCo checkpoint (lazy re-export of :func:`smallssl.seed_convert.distill_ckpt2moco_ckpt`)."""
    from .seed_convert import distill_ckpt2moco_ckpt as convert  # lazy: seed_convert imports this module

    return convert(path, out, keep_queue)
