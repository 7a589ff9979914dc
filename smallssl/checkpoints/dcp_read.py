"""Reading FSDP2 sharded checkpoints (``torch.distributed.checkpoint`` directories) without a process group.

A leaf module (it imports nothing from the package), so that :func:`.io.load_checkpoint_file` can open a DCP
directory wherever a checkpoint file is accepted. :class:`LazyDCPState` is a read-only mapping of the model's
tensors that reads one full tensor (assembled from every rank's shards) per access: a large model is loaded
tensor by tensor, never consolidated in memory (the same contract as :class:`.sliced.LazyStateDict`).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator, Mapping
from typing import Any

import torch
import torch.distributed.checkpoint as dcp

MODEL_KEY, OPTIM_KEY, EXTRA_KEY = "model", "optimizer", "extra"


def is_dcp_dir(path: str) -> bool:
    """A directory written by ``torch.distributed.checkpoint`` (it holds a ``.metadata`` file)."""
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, ".metadata"))


def dcp_entries(ckpt_dir: str) -> tuple[dict, dict]:
    """``(tensor / object metadata by flat key, nested path tuple by flat key)`` of a DCP checkpoint."""
    if not os.path.isdir(ckpt_dir):
        raise FileNotFoundError(f"sharded checkpoint {ckpt_dir!r} does not exist")
    meta = dcp.FileSystemReader(ckpt_dir).read_metadata()
    return dict(meta.state_dict_metadata), dict(meta.planner_data or {})


def load_entry(ckpt_dir: str, key: str, md: Any) -> Any:
    """One entry of a DCP checkpoint (a full tensor, assembled from all shards, or a plain object)."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    if isinstance(md, TensorStorageMetadata):
        holder = {key: torch.empty(md.size, dtype=md.properties.dtype)}
    else:
        holder = {key: None}
    with warnings.catch_warnings():  # "torch.distributed is ... uninitialized": intended (offline read)
        warnings.filterwarnings("ignore", message=".*single process.*")
        dcp.load(holder, checkpoint_id=ckpt_dir, no_dist=True)
    return holder[key]


class LazyDCPState(Mapping):
    """The model tensors of a DCP checkpoint by state-dict name (``encoder_q.backbone.conv1.weight``), read on
    access; ``shape(name)`` comes from the metadata without reading. ``load_count`` counts tensor reads."""

    def __init__(self, ckpt_dir: str):
        self.ckpt_dir = ckpt_dir
        entries, paths = dcp_entries(ckpt_dir)
        self._md: dict[str, Any] = {}
        self._key: dict[str, str] = {}
        for k, md in entries.items():
            path = tuple(paths.get(k, (k,)))
            if path[0] == MODEL_KEY and len(path) > 1:
                name = ".".join(str(p) for p in path[1:])
                self._key[name], self._md[name] = k, md
        self.load_count = 0

    def __getitem__(self, name: str) -> torch.Tensor:
        self.load_count += 1
        return load_entry(self.ckpt_dir, self._key[name], self._md[name])

    def __iter__(self) -> Iterator[str]:
        return iter(self._key)

    def __len__(self) -> int:
        return len(self._key)

    def shape(self, name: str) -> tuple[int, ...] | None:
        size = getattr(self._md[name], "size", None)
        return tuple(size) if size is not None else None


def open_dcp(ckpt_dir: str) -> dict:
    """A DCP directory as a checkpoint dict: ``{"state_dict": LazyDCPState, "type": "sharded", **extra}``
    (``extra``: epoch, arch, method, args ... as the trainer saved them; small, read at once)."""
    entries, paths = dcp_entries(ckpt_dir)
    out: dict = {}
    for k, md in entries.items():
        path = tuple(paths.get(k, (k,)))
        if path[0] == EXTRA_KEY and len(path) == 2:
            out[str(path[1])] = load_entry(ckpt_dir, k, md)
    out["state_dict"] = LazyDCPState(ckpt_dir)
    out["type"] = "sharded"
    out["sharded_from"] = os.path.abspath(ckpt_dir)
    return out
