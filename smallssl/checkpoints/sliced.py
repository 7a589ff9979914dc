"""Sliced checkpoints: one file per tensor plus an index, loadable one tensor at a time.

VISSL's idea for the SEER 10B model (Goyal et al. 2021): a consolidated 10B checkpoint (~36 GB) cannot be loaded and
then copied into a model without holding it twice, so it is split into one file per parameter. A model built on
the meta device (or sharded with FSDP) is then filled tensor by tensor, and only one tensor is ever read at once.

Format (compatible with VISSL's ``SlicedCheckpointLoader``, so either side can read the other's files)::

    index.torch:   the checkpoint's nested dict with every tensor replaced by the absolute path of its slice
                   file (as VISSL writes it; a relative path is read relative to the index), plus
                   "type": "slice_list",
                   "slice_meta": {"<key path>": {"shape": [...], "dtype": "torch.float32"}}
    index_layers/<sha1(key path)>.torch:  {"type": "slice", "weight": tensor}

Key paths join the nested keys with "/" (``"state_dict/module.encoder_q.backbone.stem.conv.weight"``,
``"classy_state_dict/base_model/model/trunk/_feature_blocks.conv1.stem.0.weight"``). VISSL writes no
``slice_meta``; such indexes are read too (their slices are the string leaves of ``trunk`` / ``heads``).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator, Mapping
from typing import Any, Callable

import torch
import torch.nn as nn

from .io import CheckpointError, CheckpointMismatchError, atomic_save
from .report import LoadReport

# CheckpointError, CheckpointMismatchError, LoadReport, atomic_save

SLICE_LIST, SLICE, CONSOLIDATED = "slice_list", "slice", "consolidated"
_VISSL_SLICED_PARENTS = (("classy_state_dict", "base_model", "model", "trunk"),
                         ("classy_state_dict", "base_model", "model", "heads"))


def layers_dir(index_path: str) -> str:
    """Folder holding the slice files of ``index_path`` (VISSL's naming: ``<index stem>_layers``)."""
    return os.path.splitext(index_path)[0] + "_layers"


def _walk(obj: Any, path: tuple = ()) -> Iterator[tuple[tuple, Any]]:
    if isinstance(obj, Mapping):
        for k, v in obj.items():
            yield from _walk(v, path + (k,))
    else:
        yield path, obj


def set_path(root: dict, path: tuple, value: Any) -> None:
    """``root[path[0]][path[1]]... = value``, creating dicts; every path element is a dict key (optimizer state
    is keyed by int). DCP paths index lists instead: see ``sharded._set_dcp_path``."""
    node = root
    for k in path[:-1]:
        node = node.setdefault(k, {})
    node[path[-1]] = value


def _key(path: tuple) -> str:
    return "/".join(str(k) for k in path)


def write_sliced(ckpt: Mapping, index_path: str, drop_keys: tuple[str, ...] = ("optimizer", "scaler")) -> str:
    """Write ``ckpt`` (nested dicts of tensors and plain values) as a sliced checkpoint; returns ``index_path``.

    ``drop_keys``: top-level entries left out (optimizer state is not needed to evaluate or distil a model).
    Tensors are saved one at a time, so a checkpoint opened with ``torch.load(..., mmap=True)`` is never
    fully resident in memory.
    """
    folder = layers_dir(index_path)
    os.makedirs(folder, exist_ok=True)
    index: dict = {}
    meta: dict[str, dict] = {}
    for path, value in _walk({k: v for k, v in ckpt.items() if k not in drop_keys}):
        if not path:
            continue
        if isinstance(value, torch.Tensor):
            key = _key(path)
            name = hashlib.sha1(key.encode()).hexdigest() + ".torch"
            atomic_save({"type": SLICE, "weight": value.detach().contiguous()}, os.path.join(folder, name))
            # Absolute, as VISSL writes them: VISSL's loader opens the path as stored, from any working directory
            # (smallssl's reader also finds the slices after the index and its folder moved together).
            set_path(index, path, os.path.abspath(os.path.join(folder, name)))
            meta[key] = {"shape": list(value.shape), "dtype": str(value.dtype)}
        else:
            set_path(index, path, value)
    index["type"] = SLICE_LIST
    index["slice_meta"] = meta
    atomic_save(index, index_path)
    return index_path


class LazyStateDict(Mapping):
    """Read-only ``Mapping[str, Tensor]`` whose values are read from their slice file on each access.

    Nothing is cached: ``sd[k]`` reads one file (memory-mapped) and the caller owns the only reference.
    ``load_count`` counts the file reads (tests use it to check one read per tensor).
    """

    def __init__(self, files: dict[str, str], base_dir: str, meta: dict[str, dict] | None = None,
                 index_path: str = ""):
        self._files, self._base, self._meta, self._index_path = files, base_dir, meta or {}, index_path
        self.load_count = 0

    def __getitem__(self, key: str) -> torch.Tensor:
        return self.load(key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._files)

    def __len__(self) -> int:
        return len(self._files)

    def path(self, key: str) -> str:
        p = self._files[key]
        if not os.path.isabs(p):
            p = os.path.join(self._base, p)
        if not os.path.exists(p) and self._index_path:  # index moved with its folder (VISSL writes absolute paths)
            p = os.path.join(layers_dir(self._index_path), os.path.basename(p))
        return p

    def shape(self, key: str) -> tuple[int, ...] | None:
        m = self._meta.get(key)
        return tuple(m["shape"]) if m and "shape" in m else None

    def load(self, key: str) -> torch.Tensor:
        p = self.path(key)
        try:
            obj = torch.load(p, map_location="cpu", mmap=True, weights_only=True)
        except (OSError, RuntimeError) as e:
            raise CheckpointError(f"slice {p!r} for {key!r} could not be read ({e})") from e
        if not isinstance(obj, Mapping) or obj.get("type") != SLICE:
            raise CheckpointError(f"{p!r} is not a slice file (expected a dict with type 'slice')")
        self.load_count += 1
        return obj["weight"]


class SlicedCheckpoint:
    """A sliced checkpoint index. ``state_dict(path)`` gives a :class:`LazyStateDict` for one nested dict."""

    def __init__(self, index_path: str):
        if not os.path.isfile(index_path):
            raise CheckpointError(f"sliced checkpoint index {index_path!r} does not exist")
        self.index_path = index_path
        self.index = torch.load(index_path, map_location="cpu", weights_only=False)
        if not isinstance(self.index, Mapping) or self.index.get("type") != SLICE_LIST:
            raise CheckpointError(f"{index_path!r} is not a sliced checkpoint index (type != 'slice_list')")
        self.meta: dict[str, dict] = dict(self.index.get("slice_meta") or {})
        if not self.meta:  # VISSL index: every string leaf under trunk / heads is a slice
            for parent in _VISSL_SLICED_PARENTS:
                node = self._node(parent)
                if isinstance(node, Mapping):
                    for k in node:
                        self.meta[_key(parent + (k,))] = {}

    def _node(self, path: tuple) -> Any:
        node = self.index
        for k in path:
            if not isinstance(node, Mapping) or k not in node:
                return None
            node = node[k]
        return node

    def sliced_parents(self) -> list[tuple]:
        """Paths of the nested dicts that hold slices, e.g. ``[("state_dict",)]``."""
        parents: list[tuple] = []
        for key in self.meta:
            parent = tuple(key.split("/")[:-1])
            if parent not in parents and isinstance(self._node(parent), Mapping):
                parents.append(parent)
        return parents

    def state_dict(self, path: tuple | None = None) -> LazyStateDict:
        """Lazy tensors of the nested dict at ``path`` (default: the only / the largest sliced dict)."""
        if path is None:
            parents = self.sliced_parents()
            if not parents:
                raise CheckpointError(f"sliced checkpoint {self.index_path!r} holds no slices")
            path = max(parents, key=lambda p: len(self._node(p)))
        node = self._node(tuple(path))
        if not isinstance(node, Mapping):
            raise CheckpointError(f"no dict at {path} in {self.index_path!r}; sliced dicts: {self.sliced_parents()}")
        files = {k: v for k, v in node.items() if _key(tuple(path) + (k,)) in self.meta}
        meta = {k: self.meta[_key(tuple(path) + (k,))] for k in files}
        return LazyStateDict(files, os.path.dirname(os.path.abspath(self.index_path)), meta, self.index_path)

    def to_consolidated(self) -> dict:
        """The full checkpoint in memory (every slice read once), with ``type`` set to ``consolidated``."""
        out: dict = {}
        for path, value in _walk({k: v for k, v in self.index.items() if k not in ("type", "slice_meta")}):
            if _key(path) in self.meta:
                parent = path[:-1]
                value = self.state_dict(parent)[path[-1]].clone()
            set_path(out, path, value)
        out["type"] = CONSOLIDATED
        return out


def sliced_to_consolidated(index_path: str, out_path: str) -> str:
    atomic_save(SlicedCheckpoint(index_path).to_consolidated(), out_path)
    return out_path


def consolidated_to_sliced(ckpt_path: str, index_path: str, drop_keys: tuple[str, ...] = ("optimizer", "scaler")
                           ) -> str:
    """Slice a consolidated checkpoint file; it is memory-mapped, so it is not read into memory at once."""
    try:
        ckpt = torch.load(ckpt_path, map_location="cpu", mmap=True, weights_only=False)
    except Exception as e:  # torch raises many types for truncated / foreign files
        raise CheckpointError(f"checkpoint {ckpt_path!r} could not be read ({type(e).__name__}: {e})") from e
    return write_sliced(ckpt, index_path, drop_keys)


# ------------------------------------------------------------------------------------------ lazy loading
def _targets(model: nn.Module) -> Iterator[tuple[str, nn.Module, str, bool]]:
    """``(full name, owning module, local name, is_parameter)`` for every parameter and persistent buffer."""
    seen: set[int] = set()
    for mod_name, mod in model.named_modules(remove_duplicate=False):
        prefix = mod_name + "." if mod_name else ""
        for name, p in mod._parameters.items():
            if p is not None and id(p) not in seen:
                seen.add(id(p))
                yield prefix + name, mod, name, True
        for name, b in mod._buffers.items():
            if b is not None and name not in mod._non_persistent_buffers_set:
                yield prefix + name, mod, name, False


def load_tensors(model: nn.Module, source: Mapping[str, torch.Tensor], source_name: str = "<state>",
                 strict: bool = True, device: torch.device | str | None = None,
                 rename: Callable[[str], str | None] | None = None) -> LoadReport:
    """Copy ``source`` into ``model`` one tensor at a time; meta tensors are materialised on ``device``.

    ``source`` may be a plain dict or a :class:`LazyStateDict` (then each slice is read when its turn comes and
    dropped after the copy, so at most one source tensor is alive). ``rename(source_key) -> model key or None``
    maps foreign names (None = not a model tensor, reported as unused). ``strict`` raises
    :class:`CheckpointMismatchError` before reading anything if a model tensor has no source (BatchNorm's
    ``num_batches_tracked`` may be absent: it is set to 0), and on the first shape mismatch.
    """
    name_map: dict[str, str] = {}
    unexpected = []
    for k in source:
        m = rename(k) if rename else k
        if m is None:
            unexpected.append(k)
        else:
            name_map[m] = k
    targets = list(_targets(model))
    target_names = {t[0] for t in targets}
    unexpected += [name_map.pop(m) for m in list(name_map) if m not in target_names]
    missing = sorted(t[0] for t in targets if t[0] not in name_map and not t[0].endswith("num_batches_tracked"))
    report = LoadReport(source=source_name, prefix="", missing=missing, unexpected=sorted(unexpected))
    if strict and (missing or not name_map):
        raise CheckpointMismatchError(f"checkpoint {source_name!r} does not fit this model: {len(name_map)} tensors "
                                      f"match, {len(missing)} missing.\n{report.summary()}")
    for full, mod, local, is_param in targets:
        current = mod._parameters[local] if is_param else mod._buffers[local]
        if full not in name_map:
            if current.is_meta and full.endswith("num_batches_tracked"):
                mod._buffers[local] = torch.zeros((), dtype=current.dtype, device=device or "cpu")
            continue
        value = source[name_map[full]]
        if tuple(value.shape) != tuple(current.shape):
            report.mismatched.append(f"{full} {tuple(value.shape)} vs model {tuple(current.shape)}")
            if strict:
                raise CheckpointMismatchError(f"checkpoint {source_name!r}: shape mismatch {report.mismatched[-1]}")
            continue
        if current.is_meta:
            new = value.to(device=device or "cpu", dtype=current.dtype, copy=True)
            if is_param:
                mod._parameters[local] = nn.Parameter(new, requires_grad=current.requires_grad)
            else:
                mod._buffers[local] = new
        else:
            with torch.no_grad():
                current.copy_(value)
        report.loaded.append(full)
        del value
    return report
