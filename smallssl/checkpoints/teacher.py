"""SEED teachers: a frozen backbone + projection from any checkpoint layout smallssl reads.

Teachers (:func:`build_teacher`) come from any layout :func:`load_teacher` recognises: smallssl checkpoints
(MoCo / SwAV: ``module.encoder_q.backbone.*`` + ``module.encoder_q.head.*``), official MoCo / ssl-small
(``module.encoder_q.<torchvision>`` + ``module.encoder_q.fc.*``), official SwAV (``module.<torchvision>`` +
``module.projection_head.*``), VISSL / SEER (``classy_state_dict/.../trunk`` + ``heads``, through
:mod:`.vissl`), and raw torchvision / timm state dicts (backbone only, no projection head).

Teacher projection (``proj``): ``auto`` = the checkpoint's projection head if it has one, else the backbone
feature itself; ``head`` = require the head; ``none`` = the backbone feature; ``random`` = a fixed random
Gaussian projection ``W`` (dim, D) / sqrt(dim) of the backbone feature, drawn from ``seed`` and stored in
the checkpoint (``teacher.head.weight``). A random projection approximately preserves inner products
(Johnson-Lindenstrauss), so it keeps the teacher's similarity structure when the backbone feature's width
differs from the student's embedding dim. A teacher whose embedding width differs from ``dim`` raises
``ValueError`` naming these choices; it is never truncated or padded silently.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping

import torch
import torch.nn as nn

from ..backbones import create_backbone, default_small_input
from ..heads import Encoder
from . import vissl
from .io import CheckpointMismatchError
from .load import BACKBONE_PREFIXES, is_vissl, open_checkpoint, other_network_hint
from .report import OTHER_NETWORKS, LoadReport, load_state_with_report, state_dict_of

TEACHER_PROJ = ("auto", "head", "none", "random")


class RandomProjection(nn.Module):
    """Fixed ``x @ W^T`` with ``W ~ N(0, 1/out_dim)`` (out_dim, in_dim), seeded; a buffer, never trained."""

    def __init__(self, in_dim: int, out_dim: int, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("weight", torch.randn(out_dim, in_dim, generator=g) / out_dim ** 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight.T.to(x.dtype)


def teacher_dim(teacher: nn.Module) -> int | None:
    """Output width of an :class:`Encoder`-like teacher (from its head applied to zero features), else None."""
    backbone, head = getattr(teacher, "backbone", None), getattr(teacher, "head", None)
    if backbone is None or head is None or not hasattr(backbone, "num_features"):
        return None
    p = next(iter(list(head.parameters()) + list(head.buffers())), None)
    x = torch.zeros(2, backbone.num_features, device=p.device if p is not None else "cpu")
    was = head.training
    head.eval()
    with torch.no_grad():
        out = head(x).shape[1]
    head.train(was)
    return int(out)


def head_from_state(state: Mapping[str, torch.Tensor]) -> nn.Module:
    """Rebuild a projection head from its tensors (keys relative to the head, e.g. ``0.weight``).

    ``weight`` / ``bias`` alone: one ``Linear`` (MoCo v1 ``fc``). Indexed keys (``0.weight``, ``1.running_mean``,
    ...): an ``nn.Sequential`` with ``Linear`` for 2-d weights, ``BatchNorm1d`` where running statistics are
    present and ``ReLU`` at every index without tensors (MoCo v2 ``fc.0/fc.2``, ssl-small ``wide``, SwAV
    ``projection_head.0/1/3``, smallssl heads). Raises ``ValueError`` for other layouts.
    """
    if "weight" in state and state["weight"].ndim == 2:  # keys stay "weight" / "bias"
        return nn.Linear(state["weight"].shape[1], state["weight"].shape[0], bias="bias" in state)
    layers: dict[int, dict[str, torch.Tensor]] = {}
    for k, v in state.items():
        m = re.match(r"^(\d+)\.(.+)$", k)
        if m is None:
            raise ValueError(f"cannot rebuild a projection head from key {k!r} (expected 'N.weight' style keys)")
        layers.setdefault(int(m.group(1)), {})[m.group(2)] = v
    if not layers:
        raise ValueError("empty projection head state")
    modules: list[nn.Module] = []
    for i in range(max(layers) + 1):
        sd = layers.get(i)
        if sd is None:
            modules.append(nn.ReLU(inplace=True))
        elif "running_mean" in sd:
            modules.append(nn.BatchNorm1d(sd["running_mean"].shape[0], affine="weight" in sd))
        elif "weight" in sd and sd["weight"].ndim == 2:
            modules.append(nn.Linear(sd["weight"].shape[1], sd["weight"].shape[0], bias="bias" in sd))
        else:
            raise ValueError(f"cannot rebuild head layer {i} from tensors {sorted(sd)}")
    return nn.Sequential(*modules)


def _head_prefixes(backbone_prefix: str) -> list[str]:
    """Where a checkpoint keeps the projection head, given where it keeps the backbone."""
    if backbone_prefix.endswith("backbone."):
        base = backbone_prefix[:-len("backbone.")]
        return [base + "head.", base + "projection_head."]
    if backbone_prefix.endswith(("encoder_q.", "student.")):  # official MoCo / ssl-small / SEED
        return [backbone_prefix + "fc.", backbone_prefix + "head.", backbone_prefix + "classifier."]
    # bare / "module." state dicts: only SwAV's projection head; a torchvision or timm ``fc`` / ``classifier``
    # is an ImageNet classifier, never a self-supervised projection.
    return [backbone_prefix + "projection_head."]


TEACHER_HINT = ("Check --teacher-arch and the teacher's stem against the network the teacher checkpoint holds: "
                "--teacher-small-input for a CIFAR (3x3 stride-1) stem, --no-teacher-small-input for an ImageNet one.")


def load_teacher(backbone: nn.Module, path_or_ckpt: str | Mapping, verbose: bool = True, source: str | None = None,
                 hint: str = TEACHER_HINT) -> tuple[dict[str, torch.Tensor] | None, list[LoadReport]]:
    """Load a teacher backbone (strictly) from any supported layout; return (head tensors or None, reports).

    The head tensors have keys relative to the head (``0.weight``); None when the checkpoint has no
    projection head (torchvision / timm state dicts). Each load prints its :class:`LoadReport` summary.
    """
    opened, ckpt = open_checkpoint(path_or_ckpt)
    source = source or opened
    if is_vissl(ckpt):
        where = path_or_ckpt if not isinstance(path_or_ckpt, Mapping) else ckpt
        report = vissl.load_vissl_trunk(backbone, where, strict=True, verbose=verbose)
        _, heads, _ = vissl.open_vissl(where)
        head = _first_head(dict(heads), ["0.projection_head.", "projection_head."])
        return head, [report]
    state = state_dict_of(ckpt)
    try:
        report = load_state_with_report(backbone, state, source=source, strict=True, prefer=BACKBONE_PREFIXES,
                                        exclude=OTHER_NETWORKS, hint=hint)
    except CheckpointMismatchError as e:
        raise CheckpointMismatchError(f"{e}{other_network_hint(backbone, state)}") from None
    report.source = source + " [teacher backbone]"
    if verbose:
        print(report.summary())
    head = _first_head(state, _head_prefixes(report.prefix))
    return head, [report]


def _first_head(state: Mapping[str, torch.Tensor], prefixes: list[str]) -> dict[str, torch.Tensor] | None:
    for p in prefixes:
        sub = {k[len(p):]: state[k] for k in state if k.startswith(p)}  # reads only the head (lazy files)
        if sub:
            return sub
    return None


def build_teacher(arch: str | None, ckpt: str | Mapping, small_input: bool | None = None, proj: str = "auto",
                  dim: int = 128, seed: int = 0, verbose: bool = True, default_small_input: bool = False) -> Encoder:
    """A frozen teacher ``Encoder(backbone, projection)`` in eval mode; see the module docstring for ``proj``.

    ``arch`` None takes the ``arch`` entry of a smallssl / MoCo checkpoint. ``small_input`` (CIFAR stem) None
    takes the stem the checkpoint was trained with (its ``args``: ``small_input``, else ``image_size <= 64``),
    else ``default_small_input`` (the student's): a teacher may use another stem than its student.
    """
    if proj not in TEACHER_PROJ:
        raise ValueError(f"unknown teacher projection {proj!r}; choose one of {', '.join(TEACHER_PROJ)}")
    if isinstance(ckpt, (str, os.PathLike)):
        ckpt = os.fspath(ckpt)
        if not os.path.exists(ckpt):
            raise FileNotFoundError(f"--teacher-ckpt {ckpt!r}: no such file or sharded checkpoint directory")
        _, loaded = open_checkpoint(ckpt)
    else:
        loaded = ckpt
    arch = arch or loaded.get("arch")
    if not arch:
        raise ValueError("the teacher checkpoint names no architecture: pass --teacher-arch")
    if small_input is None:
        small_input = _trained_small_input(loaded, default_small_input)
    backbone = create_backbone(arch, small_input=small_input)
    # A VISSL sliced index must be read from its path; everything else from the opened dict.
    source = ckpt if isinstance(ckpt, str) else "<dict>"
    head_state, reports = load_teacher(backbone, ckpt if is_vissl(loaded) and isinstance(ckpt, str) else loaded,
                                       verbose=verbose, source=source)
    if proj == "head" and head_state is None:
        raise CheckpointMismatchError("--teacher-proj head: the teacher checkpoint has no projection head "
                                      f"(choices: {', '.join(TEACHER_PROJ)})")
    if proj == "random":
        head: nn.Module = RandomProjection(backbone.num_features, dim, seed=seed)
        why = f"fixed random projection {backbone.num_features} -> {dim} (seed {seed})"
    elif proj in ("auto", "head") and head_state is not None:
        head = head_from_state(head_state)
        head_state = dict(head_state.items())  # a few small tensors (read once, also from lazy files)
        rep = load_state_with_report(head, head_state, source=f"{source} [teacher head]", prefix="", strict=True)
        if verbose:
            print(rep.summary())
        why = f"checkpoint projection head ({len(head_state)} tensors)"
    else:
        head = nn.Identity()
        why = f"backbone feature ({backbone.num_features}-d, no projection)"
    teacher = Encoder(backbone, head)
    for p in teacher.parameters():
        p.requires_grad = False
    if verbose:
        print(f"=> teacher {arch} ({'CIFAR' if small_input else 'ImageNet'} stem): embedding = {why}")
    return teacher.eval()


def _trained_small_input(ckpt: Mapping, default: bool) -> bool:
    """The stem a smallssl checkpoint was trained with (from its saved ``args``), else ``default``."""
    a = ckpt.get("args")
    if not isinstance(a, Mapping):
        return default
    if a.get("small_input") is not None:
        return bool(a["small_input"])
    if a.get("image_size") is not None:
        return default_small_input(int(a["image_size"]))
    return default
