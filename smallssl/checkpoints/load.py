"""The one place where a checkpoint's layout is detected: backbone loading and ssl-small's ``--restart``.

Accepted layouts: smallssl (``module.encoder_q.backbone.*``), official MoCo / ssl-small
(``module.encoder_q.<torchvision names>``), SEED (``module.student.*``), SwAV (``module.<torchvision>``),
VISSL / SEER (consolidated or sliced, through :mod:`.vissl`), and plain timm / torchvision state dicts.
:func:`load_backbone` finds the prefix under which the checkpoint holds the backbone and reports loaded /
missing / unexpected keys; a checkpoint that does not fit raises :class:`CheckpointMismatchError`.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn as nn

from .io import load_checkpoint_file
from .report import LoadReport, load_state_with_report, state_dict_of
from .vissl import load_vissl_trunk

# Where a backbone may sit, most specific first: query encoder / student before key encoder / teacher.
BACKBONE_PREFIXES = ("module.encoder_q.backbone.", "encoder_q.backbone.", "module.encoder_q.", "encoder_q.",
                     "module.student.backbone.", "module.student.", "student.", "module.backbone.", "backbone.",
                     "module.", "")


def is_vissl(ckpt: Mapping) -> bool:
    """A VISSL / SEER checkpoint: consolidated (``classy_state_dict``) or a sliced index."""
    return "classy_state_dict" in ckpt or ckpt.get("type") == "slice_list"


def load_backbone(backbone: nn.Module, path_or_ckpt: str | Mapping, strict: bool = True,
                  verbose: bool = True) -> LoadReport:
    """Load a backbone from any supported checkpoint layout (smallssl, MoCo, ssl-small, SEED, timm, torchvision).

    Query encoder / student weights are preferred over key encoder / teacher ones.
    """
    if isinstance(path_or_ckpt, str):
        source, ckpt = path_or_ckpt, load_checkpoint_file(path_or_ckpt)
    else:
        source, ckpt = "<dict>", path_or_ckpt
    if is_vissl(ckpt):
        return load_vissl_trunk(backbone, path_or_ckpt, strict=strict, verbose=verbose)
    state = state_dict_of(ckpt)
    report = load_state_with_report(backbone, state, source=source, strict=strict, prefer=BACKBONE_PREFIXES)
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
            if v.shape == own[name].shape:
                extra[name] = v
            else:
                skipped.append(name)
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
