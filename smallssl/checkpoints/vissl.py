"""VISSL / SEER checkpoints <-> smallssl RegNet: key mapping, import with a report, export for round trips.

The published SEER checkpoints (Goyal et al. 2021) use VISSL's layout::

    {"type": "consolidated" | "slice_list" (absent in older files),
     "classy_state_dict": {"base_model": {"model": {"trunk": {...}, "heads": {...}}}}, ...}

Trunk keys (VISSL ``regnet`` trunk, a wrapper of classy-vision's RegNet; the ``regnet_fsdp`` trunk of the 10B
model inserts ``block{m}-part{g}.`` groups, and FSDP / checkpoint wrappers may add ``_fsdp_wrapped_module.``,
``_fpw_module.`` or ``_checkpoint_wrapped_module.``)::

    _feature_blocks.conv1.stem.0.weight            -> stem.conv.weight
    _feature_blocks.conv1.stem.1.*                 -> stem.bn.*
    _feature_blocks.res{s+2}.block{s+1}-{i}.X      -> stages.{s}.{i}.Y      (s = 0-based stage, i = block)
    _feature_blocks.res{s+2}.block{s+1}-part{g}.block{s+1}-{i}.X -> stages.{s}.{i}.Y   (regnet_fsdp)

with ``X -> Y``: ``proj -> proj``, ``bn -> proj_bn``, ``f.a.0/1 -> conv_a/bn_a``, ``f.b.0/1 -> conv_b/bn_b``,
``f.se.excitation.0/2 -> se.reduce/se.expand``, ``f.c -> conv_c``, ``f.final_bn -> bn_c``. Heads (SwAV
projection MLP and prototypes, ``0.projection_head.*``, ``0.prototypes0.weight``) are kept apart and reported as
unused by :func:`load_vissl_trunk`.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from typing import Any, Callable

import torch
import torch.nn as nn

from .io import CheckpointError, atomic_save
from .report import LoadReport
from .sliced import CONSOLIDATED, SLICE_LIST, LazyStateDict, SlicedCheckpoint, load_tensors

TRUNK_PATH = ("classy_state_dict", "base_model", "model", "trunk")
HEADS_PATH = ("classy_state_dict", "base_model", "model", "heads")
LAYOUTS = ("regnet", "regnet_fsdp", "resnet")

_WRAPPER_TOKENS = {"_fsdp_wrapped_module", "_fpw_module", "_checkpoint_wrapped_module"}
_STEM_RE = re.compile(r"^_feature_blocks\.conv1\.stem\.([01])\.(.+)$")
_BLOCK_RE = re.compile(r"^_feature_blocks\.res(\d+)\.(?:block(\d+)-part(\d+)\.)?block(\d+)-(\d+)\.(.+)$")
# (VISSL / classy-vision suffix, smallssl suffix) inside a residual block.
_BLOCK_SUFFIXES = (
    ("proj.", "proj."), ("bn.", "proj_bn."),
    ("f.a.0.", "conv_a."), ("f.a.1.", "bn_a."), ("f.b.0.", "conv_b."), ("f.b.1.", "bn_b."),
    ("f.se.excitation.0.", "se.reduce."), ("f.se.excitation.2.", "se.expand."),
    ("f.c.", "conv_c."), ("f.final_bn.", "bn_c."),
)
_OUR_BLOCK_RE = re.compile(r"^stages\.(\d+)\.(\d+)\.(.+)$")


def _clean(key: str) -> str:
    parts = [p for p in key.split(".") if p not in _WRAPPER_TOKENS]
    while parts and parts[0] in ("module", "trunk"):
        parts = parts[1:]
    return ".".join(parts)


def vissl_to_smallssl_key(key: str) -> str | None:
    """smallssl RegNet name of a VISSL trunk key, or None when it is not a RegNet trunk tensor."""
    key = _clean(key)
    m = _STEM_RE.match(key)
    if m:
        return f"stem.{'conv' if m.group(1) == '0' else 'bn'}.{m.group(2)}"
    m = _BLOCK_RE.match(key)
    if not m:
        return None
    res, part_stage, stage, block, rest = int(m.group(1)), m.group(2), int(m.group(4)), int(m.group(5)), m.group(6)
    if res != stage + 1 or (part_stage is not None and int(part_stage) != stage):
        return None  # inconsistent stage numbering: not a layout we know
    for theirs, ours in _BLOCK_SUFFIXES:
        if rest.startswith(theirs):
            return f"stages.{stage - 1}.{block}.{ours}{rest[len(theirs):]}"
    return None


def vissl_resnet_key(key: str) -> str | None:
    """torchvision name of a VISSL ResNe(X)t trunk key (model zoo: ``_feature_blocks.layer1.0.conv1.weight``)."""
    key = _clean(key)
    return key[len("_feature_blocks."):] if key.startswith("_feature_blocks.") else None


def trunk_rename(model: nn.Module, keys) -> tuple[str, Callable[[str], str | None]]:
    """``(name, rename)`` of the trunk layout (``regnet`` or ``resnet``) under which most model tensors are found."""
    target = set(model.state_dict().keys())
    keys = list(keys)
    scored = [(sum(1 for k in keys if rename(k) in target), name, rename)
              for name, rename in (("regnet", vissl_to_smallssl_key), ("resnet", vissl_resnet_key))]
    _, name, rename = max(scored, key=lambda t: t[0])
    return name, rename


def smallssl_to_vissl_key(key: str, layout: str = "regnet",
                          stage_checkpoints: Sequence[Sequence[int]] | None = None) -> str:
    """VISSL trunk key of a smallssl RegNet tensor name (inverse of :func:`vissl_to_smallssl_key`).

    ``layout="regnet_fsdp"`` groups blocks as VISSL's FSDP trunk does: ``stage_checkpoints[s]`` lists the block
    indices where a new group starts in stage ``s`` (SEER 10B: ``[[2], [7], [9, 17], []]``).
    """
    if layout not in LAYOUTS:
        raise ValueError(f"unknown VISSL layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
    if layout == "resnet":  # VISSL's ResNe(X)t trunk keeps torchvision's names under _feature_blocks.
        return "_feature_blocks." + key
    if key.startswith("stem.conv."):
        return "_feature_blocks.conv1.stem.0." + key[len("stem.conv."):]
    if key.startswith("stem.bn."):
        return "_feature_blocks.conv1.stem.1." + key[len("stem.bn."):]
    m = _OUR_BLOCK_RE.match(key)
    if not m:
        raise ValueError(f"{key!r} is not a smallssl RegNet tensor name (stem.* / stages.S.I.*)")
    s, i, rest = int(m.group(1)), int(m.group(2)), m.group(3)
    for theirs, ours in _BLOCK_SUFFIXES:
        if rest.startswith(ours):
            rest = theirs + rest[len(ours):]
            break
    else:
        raise ValueError(f"{key!r}: unknown block tensor {rest!r}")
    group = ""
    if layout == "regnet_fsdp":
        delims = list(stage_checkpoints[s]) if stage_checkpoints and s < len(stage_checkpoints) else []
        group = f"block{s + 1}-part{sum(1 for d in delims if d <= i)}."
    return f"_feature_blocks.res{s + 2}.{group}block{s + 1}-{i}.{rest}"


def _node(obj: Any, path: Sequence[str]) -> Any:
    for k in path:
        if not isinstance(obj, Mapping) or k not in obj:
            return None
        obj = obj[k]
    return obj


def open_vissl(path_or_ckpt: str | Mapping) -> tuple[Mapping[str, torch.Tensor], Mapping[str, torch.Tensor], str]:
    """``(trunk, heads, source)`` of a VISSL checkpoint: a path (consolidated or sliced index) or a loaded dict.

    A sliced checkpoint gives :class:`~smallssl.checkpoints.sliced.LazyStateDict` views (nothing read yet); a
    consolidated file is memory-mapped. A flat dict of ``_feature_blocks.*`` tensors is accepted as a bare trunk.
    """
    source = path_or_ckpt if isinstance(path_or_ckpt, str) else "<dict>"
    if isinstance(path_or_ckpt, str):
        if not os.path.isfile(path_or_ckpt):
            raise CheckpointError(f"checkpoint {path_or_ckpt!r} does not exist")
        try:
            ckpt = torch.load(path_or_ckpt, map_location="cpu", mmap=True, weights_only=False)
        except Exception as e:  # torch raises many types for truncated / foreign files
            raise CheckpointError(f"checkpoint {path_or_ckpt!r} could not be read ({type(e).__name__}: {e})") from e
        if isinstance(ckpt, Mapping) and ckpt.get("type") == SLICE_LIST:
            sliced = SlicedCheckpoint(path_or_ckpt)
            heads = sliced.state_dict(HEADS_PATH) if isinstance(_node(ckpt, HEADS_PATH), Mapping) else {}
            return sliced.state_dict(TRUNK_PATH), heads, source
    else:
        ckpt = path_or_ckpt
    trunk = _node(ckpt, TRUNK_PATH)
    if trunk is None and isinstance(ckpt, Mapping) and any(_clean(str(k)).startswith("_feature_blocks.")
                                                           for k in ckpt):
        trunk = ckpt
    if not isinstance(trunk, Mapping):
        top = sorted(ckpt)[:10] if isinstance(ckpt, Mapping) else type(ckpt).__name__
        raise CheckpointError(f"{source!r} is not a VISSL checkpoint: no classy_state_dict/base_model/model/trunk "
                              f"(top-level keys: {top})")
    heads = _node(ckpt, HEADS_PATH) or {}
    return trunk, heads, source


def load_vissl_trunk(model: nn.Module, path_or_ckpt: str | Mapping, strict: bool = True,
                     device: torch.device | str | None = None, verbose: bool = True) -> LoadReport:
    """Load a VISSL / SEER trunk: RegNet into a smallssl :class:`~smallssl.backbones.regnet.RegNet`, or a
    model-zoo ResNet (``_feature_blocks.`` + torchvision names) into a torchvision ResNet backbone.

    Works for consolidated and sliced checkpoints and for models built on the meta device (tensors are
    materialised on ``device``, one at a time). Head tensors are listed as unused (``heads.*``). ``strict``
    raises :class:`~smallssl.checkpoints.CheckpointMismatchError` when a trunk tensor is missing or has
    another shape (e.g. the wrong ``regnety_*`` config).
    """
    trunk, heads, source = open_vissl(path_or_ckpt)
    _, rename = trunk_rename(model, trunk.keys())
    report = load_tensors(model, trunk, source_name=source, strict=strict, device=device, rename=rename)
    report.unexpected += [f"heads.{k}" for k in heads]
    if verbose:
        print(report.summary())
    return report


def to_vissl_checkpoint(trunk_state: Mapping[str, torch.Tensor], heads: Mapping[str, torch.Tensor] | None = None,
                        layout: str = "regnet", stage_checkpoints: Sequence[Sequence[int]] | None = None,
                        **extra: Any) -> dict:
    """A VISSL-layout consolidated checkpoint dict from smallssl RegNet tensors (and optional VISSL heads)."""
    trunk = {smallssl_to_vissl_key(k, layout, stage_checkpoints): v for k, v in trunk_state.items()}
    return {"type": CONSOLIDATED, **extra,
            "classy_state_dict": {"base_model": {"model": {"trunk": trunk, "heads": dict(heads or {})}}}}


def save_vissl_checkpoint(path: str, trunk_state: Mapping[str, torch.Tensor],
                          heads: Mapping[str, torch.Tensor] | None = None, layout: str = "regnet",
                          stage_checkpoints: Sequence[Sequence[int]] | None = None) -> str:
    atomic_save(to_vissl_checkpoint(trunk_state, heads, layout, stage_checkpoints), path)
    return path


def _rename_for(keys) -> Callable[[str], str | None]:
    """The trunk rename (RegNet or ResNet model zoo) that maps most of ``keys``, without a model."""
    keys = list(keys)
    regnet = sum(1 for k in keys if vissl_to_smallssl_key(k) is not None)
    return vissl_to_smallssl_key if regnet >= sum(1 for k in keys if vissl_resnet_key(k) is not None) / 2 \
        else vissl_resnet_key


def vissl_to_smallssl_state(trunk: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """``({smallssl name: tensor}, [unmapped VISSL keys])``; tensors are read one by one from lazy sources.
    RegNet trunks get smallssl's RegNet names, ResNe(X)t trunks torchvision's."""
    out, unmapped = {}, []
    rename = _rename_for(trunk.keys())
    for k in trunk:
        m = rename(k)
        if m is None:
            unmapped.append(k)
        else:
            out[m] = trunk[k]
    return out, unmapped


def rename_sliced(index_in: str, index_out: str) -> str:
    """Write a smallssl-named sliced index for a VISSL sliced checkpoint, reusing its slice files (no copy).

    The new index holds ``{"state_dict": {smallssl name: path}, "vissl_heads": {...}}``; paths are made relative
    to ``index_out``'s folder. Trunk keys that do not map are dropped (and printed).
    """
    trunk, heads, _ = open_vissl(index_in)
    if not isinstance(trunk, LazyStateDict):
        raise ValueError(f"{index_in!r} is not a sliced checkpoint (use vissl_to_smallssl_state for consolidated)")
    out_dir = os.path.dirname(os.path.abspath(index_out))
    index: dict = {"type": SLICE_LIST, "state_dict": {}, "vissl_heads": {}, "slice_meta": {}}
    for section, src, rename in (("state_dict", trunk, _rename_for(trunk.keys())), ("vissl_heads", heads, lambda k: k)):
        for k in src:
            name = rename(k)
            if name is None:
                print(f"=> dropping unmapped trunk key {k!r}")
                continue
            index[section][name] = os.path.relpath(src.path(k), out_dir)
            shape = src.shape(k)
            index["slice_meta"][f"{section}/{name}"] = {"shape": list(shape)} if shape is not None else {}
    atomic_save(index, index_out)
    return index_out
