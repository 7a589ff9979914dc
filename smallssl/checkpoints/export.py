"""Export any smallssl checkpoint (also files of earlier versions) to a peer's layout:
``python -m smallssl.convert export IN OUT --to moco|sslsmall|seed|swav|timm|torchvision``.

New checkpoints are already written in their method's peer layout (:mod:`.native`); this converts older files
(``module.encoder_q.backbone.*``) and crosses layouts (a SwAV run's backbone for MoCo's ``main_lincls.py``).

Targets and the loader that reads them::

    moco, sslsmall   {"state_dict": module.encoder_q.<names> + module.encoder_q.fc.* (+ encoder_k, queue (dim, K))}
                     MoCo's main_lincls.py / ssl-small's util.load_model: strip module.encoder_q., drop fc
    seed             {"state_dict": module.student.* (+ module.teacher.*, queue)}: SEED's main_lincls.py
    swav             {"state_dict": module.<names> + module.projection_head.* + module.prototypes.weight}:
                     SwAV's eval_linear.py (``k.replace("module.", "")``, load_state_dict(strict=False))
    timm, torchvision  the bare backbone state dict {<names>: tensor}: ``model.load_state_dict(sd, strict=False)``
                     (torchvision: missing fc.weight / fc.bias only), timm's ``load_checkpoint``
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from .io import CheckpointError
from .native import HEAD_NAME, LAYOUT_KEY, TRANSPOSED_QUEUE, strip_module, to_native
from .report import state_dict_of

EXPORT_TARGETS = ("moco", "sslsmall", "seed", "swav", "timm", "torchvision")
_SWAV_OWN = ("projection_head.", "prototypes.")
_SWAV_EXTRA = ("queue", "queue_count", "queue_ptr")


def memory_names(state: Mapping[str, torch.Tensor], layout: str | None = None) -> tuple[dict[str, torch.Tensor], str]:
    """A checkpoint's tensors under the methods' in-memory names (``encoder_q.backbone.*`` ...), without a model.

    Needs no model because every layout names its head module (``fc`` / ``projection_head``) and the backbones
    have no top-level module of that name; the queue comes back as (K, dim).
    """
    names = strip_module(state)
    if layout is None:
        layout = _guess_layout(names)
    out: dict[str, torch.Tensor] = {}
    head = HEAD_NAME.get(layout)
    for name, k in names.items():
        v = state[k]
        if layout == "smallssl" or name in _SWAV_EXTRA or name.startswith(("predictor.", "prototypes.")):
            new = name
        elif layout == "swav":
            new = _encoder_name("encoder_q.", name, head)
        else:
            role = name.split(".")[0] + "."
            ours = {"student.": "encoder_q.", "encoder_q.": "encoder_q.", "encoder_k.": "encoder_k.",
                    "teacher.": "teacher."}.get(role)
            new = name if ours is None else _encoder_name(ours, name[len(role):], head)
        if new == "queue" and TRANSPOSED_QUEUE.get(layout) and v.ndim == 2:
            v = v.T.contiguous()
        out[new] = v
    return out, layout


def _encoder_name(ours: str, rest: str, head: str) -> str:
    if rest.startswith(head + "."):
        inner = rest[len(head) + 1:]
        return ours + "head." + ("0." + inner if inner in ("weight", "bias") else inner)
    return ours + "backbone." + rest


def _guess_layout(names: Mapping[str, str]) -> str:
    keys = list(names)
    if any(k.startswith(("encoder_q.backbone.", "encoder_q.head.")) for k in keys):
        return "smallssl"
    if any(k.startswith("student.") for k in keys):
        return "seed"
    if any(k.startswith("encoder_q.") for k in keys):
        return "moco"
    return "swav"


def export_checkpoint(ckpt: Mapping, to: str) -> dict:
    """The checkpoint ``ckpt`` (any layout smallssl reads except VISSL) in the layout ``to`` (see module doc)."""
    if to not in EXPORT_TARGETS:
        raise ValueError(f"unknown export target {to!r}; choose one of {', '.join(EXPORT_TARGETS)}")
    mem, layout = memory_names(state_dict_of(ckpt), ckpt.get(LAYOUT_KEY))
    seed_file = layout == "seed" or any(k.startswith("teacher.") for k in mem)
    backbone = {k[len("encoder_q.backbone."):]: v for k, v in mem.items() if k.startswith("encoder_q.backbone.")}
    if not backbone:
        raise CheckpointError(f"no query encoder / student backbone found (read as layout {layout!r}; keys like "
                              f"{sorted(mem)[:3]})")
    if to in ("timm", "torchvision"):
        return dict(backbone)
    meta = {k: ckpt[k] for k in ("epoch", "arch") if k in ckpt}
    if to == "seed":
        if not seed_file:
            raise CheckpointError("--to seed needs a SEED checkpoint (a student and its teacher)")
        return {**meta, "method": "seed", LAYOUT_KEY: "seed", "state_dict": to_native(mem, "seed")}
    if to in ("moco", "sslsmall"):
        keep = {k: v for k, v in mem.items() if not k.startswith("teacher.")
                and not (seed_file and k in ("queue", "queue_ptr"))}  # a SEED queue holds teacher embeddings
        return {**meta, "method": "moco", LAYOUT_KEY: "moco", "state_dict": to_native(keep, "moco")}
    keep = {k: v for k, v in mem.items() if k.startswith(("encoder_q.", "prototypes."))}
    return {**meta, LAYOUT_KEY: "swav", "state_dict": to_native(keep, "swav")}
