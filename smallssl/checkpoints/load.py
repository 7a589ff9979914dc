"""The one place where a checkpoint's layout is detected: backbone loading and ssl-small's ``--restart``.

Accepted layouts: smallssl's native ones (:mod:`.native`: MoCo's ``module.encoder_q.<names>`` + ``fc``, SEED's
``module.student.*``, SwAV's ``module.<names>``) and those of earlier smallssl versions
(``module.encoder_q.backbone.*``), official MoCo / ssl-small, SEED, SwAV, VISSL / SEER (consolidated or sliced,
RegNet or ResNet trunks, through :mod:`.vissl`), smallssl sliced indexes, FSDP2 sharded (DCP) directories, and
plain timm / torchvision state dicts. A backbone is never taken from another network of the file (a SEED
teacher, a key / target encoder): the teacher of a SEED file is not what ``-a resnet50`` evaluates.
:func:`load_backbone` reports loaded / missing / unexpected keys; a checkpoint that does not fit raises
:class:`CheckpointMismatchError` saying what would fit (another ``-a``, the teacher, the other implementation).
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import torch
import torch.nn as nn

from ..backbones import layout_hint
from ..heads import head_hint
from .io import CheckpointMismatchError, load_checkpoint_file
from .native import LAYOUT_KEY, from_native, native_names, query_head_of, strip_module
from .report import DEFAULT_HINT, OTHER_NETWORKS, LoadReport, excluded, load_state_with_report, shape_of, state_dict_of
from .sliced import SLICE_LIST, SlicedCheckpoint
from .vissl import load_vissl_trunk

# Where a backbone may sit, most specific first: query encoder / student before anything else.
BACKBONE_PREFIXES = ("module.encoder_q.backbone.", "encoder_q.backbone.", "module.encoder_q.", "encoder_q.",
                     "module.student.backbone.", "module.student.", "student.", "module.backbone.", "backbone.",
                     "module.", "")
_WRAPPERS = ("module.encoder_q.backbone.", "module.encoder_q.", "module.student.", "encoder_q.backbone.",
             "encoder_q.", "student.", "module.", "")


def is_vissl(ckpt: Mapping) -> bool:
    """A VISSL / SEER checkpoint (consolidated, or a sliced index of one): it has ``classy_state_dict``."""
    return "classy_state_dict" in ckpt


def open_checkpoint(path_or_ckpt: str | os.PathLike | Mapping) -> tuple[str, Mapping]:
    """``(source name, checkpoint dict)`` for a file, a sharded (DCP) directory, a sliced index or a dict.

    A smallssl sliced index (not VISSL's) becomes ``{"state_dict": <lazy tensors>, **its plain entries}``; a DCP
    directory is lazy too (:func:`.io.load_checkpoint_file`). A VISSL sliced index is returned as is (its trunk
    is read by :func:`.vissl.load_vissl_trunk` from the path).
    """
    if isinstance(path_or_ckpt, Mapping):
        return "<dict>", path_or_ckpt
    path = os.fspath(path_or_ckpt)
    ckpt = load_checkpoint_file(path)
    if ckpt.get("type") == SLICE_LIST and not is_vissl(ckpt):
        sliced = SlicedCheckpoint(path)
        parents = sliced.sliced_parents()
        lazy = sliced.state_dict(("state_dict",) if ("state_dict",) in parents else None)
        ckpt = {**{k: v for k, v in ckpt.items() if not isinstance(v, Mapping)}, "state_dict": lazy}
    return path, ckpt


def _strip_wrapper(keys) -> list[str]:
    """Backbone keys without the wrapper prefix (``module.encoder_q.`` ...), for :func:`layout_hint`."""
    keys = list(keys)
    for p in _WRAPPERS:
        inner = [k[len(p):] for k in keys if k.startswith(p) and not excluded(k[:len(p)])]
        if inner:
            return inner
    return keys


def other_network_hint(model: nn.Module, state: Mapping[str, torch.Tensor]) -> str:
    """A line naming the teacher / key encoder prefix under which ``model`` would fit, if one exists."""
    target = {k: tuple(v.shape) for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    prefixes = {k[:len(k) - len(m)] for k in state for m in target if k.endswith("." + m) or k == m}
    for p in sorted(prefixes, key=len):
        if not excluded(p, OTHER_NETWORKS):
            continue
        if all(p + m in state and shape_of(state, p + m) == s for m, s in target.items()):
            return (f"\nThe tensors that fit this backbone are under {p!r}: another network of the checkpoint (a SEED "
                    "teacher or a key / target encoder), which is never loaded as the network being evaluated. "
                    "Evaluate that network from its own checkpoint, or pass the student's -a.")
    return ""


def _mismatch_hint(arch: str | None, state: Mapping, base: str = DEFAULT_HINT) -> str:
    line = layout_hint(arch or "", _strip_wrapper(state.keys())) if arch is not None else None
    return f"{line}." if line else base


def load_backbone(backbone: nn.Module, path_or_ckpt: str | os.PathLike | Mapping, strict: bool = True,
                  verbose: bool = True, arch: str | None = None) -> LoadReport:
    """Load a backbone from any supported checkpoint (see the module docstring); returns the report.

    ``strict`` (default): every backbone tensor must be found with its shape, else
    :class:`CheckpointMismatchError`. Only the query encoder / student is used, never a teacher or key encoder.
    ``arch`` (the ``-a`` the backbone was built with) lets the error name the ``-a`` a file needs.
    """
    source, ckpt = open_checkpoint(path_or_ckpt)
    if is_vissl(ckpt):  # a sliced VISSL index is read from its path
        return load_vissl_trunk(backbone, ckpt if isinstance(path_or_ckpt, Mapping) else source, strict=strict,
                                verbose=verbose)
    state = state_dict_of(ckpt)
    try:
        report = load_state_with_report(backbone, state, source=source, strict=strict, prefer=BACKBONE_PREFIXES,
                                        exclude=OTHER_NETWORKS, hint=_mismatch_hint(arch, state))
    except CheckpointMismatchError as e:
        raise CheckpointMismatchError(f"{e}{other_network_hint(backbone, state)}") from None
    if verbose:
        print(report.summary())
    return report


def _file_prefix(layout: str, ours: str) -> str:
    """Where ``layout`` keeps the in-memory prefix ``ours`` (``encoder_q.backbone.`` -> ``module.student.``)."""
    return "module." + native_names([ours + "x"], layout)[ours + "x"][:-1]


def restart_load(method: nn.Module, ckpt: str | os.PathLike | Mapping, source: str = "<dict>", verbose: bool = True,
                 arch: str | None = None) -> list[LoadReport]:
    """ssl-small's ``--restart``: load weights only, from any supported layout, into a fresh method.

    * the query / student backbone must fit completely, else :class:`CheckpointMismatchError`;
    * the projection head (MoCo / ssl-small / SEED ``fc``, SwAV ``projection_head``, smallssl ``head``; MoCo v1's
      bare ``fc`` too) is loaded when it has exactly the model's tensors and shapes; otherwise it keeps its fresh
      initialisation and the report says which ``--mlp`` the checkpoint's head is (ssl-small's restart loaded
      the tensors that happened to match; a head half from the file, half random is not kept here);
    * other modules of the method (queue and pointer together, SwAV's queue and count, predictor, prototypes)
      are loaded only whole: a queue of another ``--moco-k`` is skipped with its pointer, the run starts from a
      fresh queue at position 0;
    * never loaded: a teacher, a key / target encoder (copied from the query encoder afterwards,
      ``method.copy_query_to_key()``), and the queue of a SEED file (official SEED, ssl-small's converted
      files, smallssl SEED): it holds teacher embeddings, not keys of this encoder
      (``python -m smallssl.convert seed2moco --keep-queue`` keeps it on purpose).
    """
    if not isinstance(ckpt, Mapping):
        source, ckpt = open_checkpoint(ckpt)
    own = method.state_dict()
    reports: list[LoadReport] = []
    if is_vissl(ckpt):
        reports.append(load_vissl_trunk(method.backbone, source if source != "<dict>" else ckpt, strict=True,
                                        verbose=verbose))
        method.copy_query_to_key()
        return reports
    raw = state_dict_of(ckpt)
    wanted = [k for k in own if not k.startswith(("teacher.", "encoder_k."))]
    state, layout, _ = from_native(raw, wanted, ckpt.get(LAYOUT_KEY))
    stripped = strip_module(raw)
    seed_file = (layout == "seed" or ckpt.get("method") == "seed"
                 or any(k.startswith(("student.", "teacher.")) for k in stripped))
    bb = "encoder_q.backbone."
    # The backbone is read from the raw file under its layout's prefix, so that extra tensors inside the
    # backbone's modules (layer1.2.* of a ResNet-34 restarted as a ResNet-18) are seen and refused.
    inner = _file_prefix(layout, bb)[len("module."):]
    prefix = ("module." + inner) if any(k.startswith("module." + inner) for k in raw) else inner
    hint = _mismatch_hint(arch, raw)
    if not any(k.startswith(prefix) for k in raw) or not len(_Sub(state, bb)):
        prefix = None  # nothing where the layout says: search the file (and report against it)
    try:
        rep = load_state_with_report(method.backbone, raw, source=source, strict=True, prefix=prefix,
                                     prefer=BACKBONE_PREFIXES, exclude=OTHER_NETWORKS, hint=hint)
    except CheckpointMismatchError as e:
        raise CheckpointMismatchError(f"{e}{other_network_hint(method.backbone, raw)}") from None
    reports.append(rep)
    notes = []
    head = getattr(getattr(method, "encoder_q", None), "head", None)
    head_state = query_head_of(raw, layout)  # the file's whole head (also tensors this --mlp lacks)
    if head is not None and head_state:
        ours = head.state_dict()
        if {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape) for k, v in head_state.items()}:
            r = load_state_with_report(head, head_state, source=source + " [head]", prefix="", strict=True)
            r.prefix = _file_prefix(layout, "encoder_q.head.")
            reports.append(r)
        else:
            notes.append("projection head NOT loaded (other tensors or shapes than this --mlp):"
                         + (head_hint(head_state, ours, prefix="") or " -")
                         + " It starts from its random initialisation.")
    loaded, skipped = _load_other_modules(method, own, state, seed_file)
    method.copy_query_to_key()  # the SSLMethod contract: a no-op without a key encoder
    if verbose:
        for r in reports:
            print(r.summary())
        for n in notes:
            print("=> " + n)
        print(f"=> also loaded: {loaded or 'nothing else'}; skipped: {'; '.join(skipped) or 'none'}; "
              "key encoder (if any) copied from the query encoder")
    return reports


class _Sub(Mapping):
    """The entries of ``state`` under ``prefix``, prefix removed (lazy if ``state`` is)."""

    def __init__(self, state: Mapping, prefix: str):
        self._state, self._prefix = state, prefix
        self._keys = [k[len(prefix):] for k in state if k.startswith(prefix)]

    def __getitem__(self, k: str):
        return self._state[self._prefix + k]

    def __iter__(self):
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def shape(self, k: str):
        return shape_of(self._state, self._prefix + k)


_QUEUE_GROUP = ("queue", "queue_ptr", "queue_count")


def _load_other_modules(method: nn.Module, own: Mapping, state: Mapping, seed_file: bool
                        ) -> tuple[list[str], list[str]]:
    """Restart's third part: every module outside the encoders, loaded whole or not at all."""
    groups: dict[str, list[str]] = {}
    for k in own:
        if k.startswith(("encoder_q.", "encoder_k.", "teacher.")):
            continue
        groups.setdefault("queue" if k in _QUEUE_GROUP else k.split(".")[0], []).append(k)
    extra, loaded, skipped = {}, [], []
    for group, keys in groups.items():
        present = [k for k in keys if k in state]
        if not present:
            continue
        if group == "queue" and (seed_file or "teacher" in {k.split(".")[0] for k in own}):
            skipped.append(f"{'+'.join(present)} (a SEED queue of teacher embeddings is never carried over)")
            continue
        bad = [f"{k} {shape_of(state, k)} vs model {tuple(own[k].shape)}" for k in present
               if shape_of(state, k) != tuple(own[k].shape)]
        # a queue without its pointer / count starts writing at 0: harmless; anything else must be whole
        complete = "queue" in present if group == "queue" else len(present) == len(keys)
        if bad or not complete:
            why = ", ".join(bad) if bad else f"the file lacks {sorted(set(keys) - set(present))}"
            skipped.append(f"{'+'.join(keys)} ({why}; starts fresh)")
            continue
        extra.update({k: state[k] for k in present})
        loaded += present
    if extra:
        method.load_state_dict(extra, strict=False)
    return loaded, skipped
