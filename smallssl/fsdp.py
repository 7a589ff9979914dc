"""FSDP2 (``torch.distributed.fsdp.fully_shard``) for SEER-size trunks, and sharded checkpoints with DCP.

SEER trains RegNetY-10B with FSDP (seed 001): every residual block is a sharding unit, so a process only holds
one block's full parameters at a time, computes in reduced precision and reduces gradients in fp32; activation
checkpointing per group of blocks trades compute for memory. Here:

- :func:`fsdp_wrap`: ``fully_shard`` each block (``RegNet.blocks()`` or the modules given), then the root, with a
  ``MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)`` (``param_dtype=None`` keeps fp32, e.g. for gloo
  backends without bf16 collectives).
- :func:`enable_activation_checkpointing`: recompute each RegNet stage in the backward pass.
- :func:`save_sharded` / :func:`load_sharded`: ``torch.distributed.checkpoint`` (DCP) of model + optimizer +
  plain values; every rank writes its own shards, and a run can resume on another world size.
- :func:`dcp_to_consolidated` / :func:`dcp_to_sliced`: offline conversion without a process group
  (``python -m smallssl.convert dcp2consolidated | dcp2sliced``); ``dcp_to_sliced`` reads one tensor at a time.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable, Mapping
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn as nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from .checkpoint import CheckpointError, atomic_save
from .sliced import write_sliced

MODEL_KEY, OPTIM_KEY, EXTRA_KEY = "model", "optimizer", "extra"


def default_fsdp_units(model: nn.Module) -> list[nn.Module]:
    """The blocks to shard one by one: RegNet residual blocks, torchvision ResNet blocks, timm/ViT ``blocks``."""
    from torchvision.models.resnet import BasicBlock, Bottleneck

    from .backbones.regnet import RegNetBlock

    units = [m for m in model.modules() if isinstance(m, (RegNetBlock, BasicBlock, Bottleneck))]
    if not units:
        for m in model.modules():
            if isinstance(getattr(m, "blocks", None), (nn.Sequential, nn.ModuleList)):
                units += list(m.blocks)
    return units


def fsdp_wrap(model: nn.Module, units: Iterable[nn.Module] | None = None, mesh: Any = None,
              param_dtype: torch.dtype | None = torch.bfloat16, reduce_dtype: torch.dtype | None = torch.float32,
              reshard_after_forward: bool = True, sync_bn: bool = False) -> nn.Module:
    """Shard ``model`` with FSDP2: each unit (default :func:`default_fsdp_units`) then the root. In place.

    Args:
        units: modules that become one FSDP unit each (their parameters are all-gathered together).
        mesh: a 1-D ``DeviceMesh``; default: all ranks of the default process group.
        param_dtype: compute dtype of the all-gathered parameters (SEER: half precision); None = fp32.
        reduce_dtype: dtype of the gradient reduce-scatter (fp32 as in SEER's fp32 reduction).
        reshard_after_forward: free gathered parameters after forward (ZeRO-3); False keeps them (ZeRO-2).
        sync_bn: convert BatchNorm to SyncBatchNorm first (SEER does; PyTorch supports it on GPUs only, so it is
            not exercised by the CPU tests). Without it each rank keeps its own BN running statistics;
            :func:`save_sharded` then stores rank 0's, as DDP does.

    Needs an initialised process group (``torch.distributed.init_process_group``), also at world size 1.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("fsdp_wrap needs an initialised process group (torch.distributed.init_process_group)")
    if sync_bn:
        for name, child in list(model.named_children()):
            setattr(model, name, nn.SyncBatchNorm.convert_sync_batchnorm(child))
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    units = list(default_fsdp_units(model) if units is None else units)
    if not units:
        raise ValueError(f"no FSDP units found in {type(model).__name__}; pass units=[...] explicitly")
    if param_dtype not in (None, torch.float32):
        # BatchNorm stays fp32 (as VISSL's fsdp_auto_wrap_bn): its running statistics are fp32 and low-precision
        # batch statistics are inaccurate. Inputs are not cast, so BN runs in mixed type (bf16 in, fp32 affine).
        bn_policy = MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=torch.float32,
                                         cast_forward_inputs=False)
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine:
                fully_shard(m, mesh=mesh, mp_policy=bn_policy, reshard_after_forward=reshard_after_forward)
    for unit in units:
        fully_shard(unit, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    return model


def enable_activation_checkpointing(model: nn.Module, enabled: bool = True) -> int:
    """Turn per-stage activation checkpointing on/off in every RegNet inside ``model``; returns how many."""
    from .backbones.regnet import RegNet

    nets = [m for m in model.modules() if isinstance(m, RegNet)]
    if not nets:
        raise ValueError(f"{type(model).__name__} holds no smallssl RegNet; activation checkpointing is per "
                         "RegNet stage (choose a regnety_* architecture)")
    for m in nets:
        m.activation_checkpointing = enabled
    return len(nets)


# ----------------------------------------------------------------------------------------- checkpoints
def broadcast_buffers(model: nn.Module, src: int = 0) -> None:
    """Collective: copy rank ``src``'s buffers (BN running statistics, not sharded by FSDP) to every rank."""
    for b in model.buffers():
        if b is not None and not hasattr(b, "placements"):  # plain tensors; DTensors are already consistent
            dist.broadcast(b, src)


def save_sharded(ckpt_dir: str, model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
                 extra: Mapping[str, Any] | None = None) -> str:
    """Collective: every rank writes its shards of model / optimizer state (plus ``extra``) to ``ckpt_dir``.

    ``extra`` holds plain values (epoch, step, args, RNG states ...); rank 0's copy is stored. Buffers are not
    sharded and differ across ranks without SyncBN: rank 0's are broadcast first, so that the checkpoint is
    well defined and all ranks continue from the same state (DDP's ``broadcast_buffers`` semantics).
    """
    broadcast_buffers(model)
    if optimizer is not None:
        model_sd, optim_sd = get_state_dict(model, optimizer)
        state = {MODEL_KEY: model_sd, OPTIM_KEY: optim_sd}
    else:
        state = {MODEL_KEY: get_state_dict(model, [])[0]}
    if extra:
        state[EXTRA_KEY] = dict(extra)
    dcp.save(state, checkpoint_id=ckpt_dir)
    return ckpt_dir


def load_sharded(ckpt_dir: str, model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
                 strict: bool = True) -> dict:
    """Collective inverse of :func:`save_sharded` (into an already sharded model); returns ``extra``."""
    if not os.path.isdir(ckpt_dir):
        raise CheckpointError(f"sharded checkpoint {ckpt_dir!r} does not exist")
    optims = [optimizer] if optimizer is not None else []
    model_sd, optim_sd = get_state_dict(model, optims)
    state: dict = {MODEL_KEY: model_sd}
    if optimizer is not None:
        state[OPTIM_KEY] = optim_sd
    meta = dcp.FileSystemReader(ckpt_dir).read_metadata()
    has_extra = any(k.startswith(EXTRA_KEY + ".") for k in meta.state_dict_metadata)
    if has_extra:
        state[EXTRA_KEY] = {k[len(EXTRA_KEY) + 1:]: None for k in meta.state_dict_metadata
                            if k.startswith(EXTRA_KEY + ".") and k.count(".") == 1}
    dcp.load(state, checkpoint_id=ckpt_dir)
    set_state_dict(model, optims, model_state_dict=state[MODEL_KEY],
                   optim_state_dict=state.get(OPTIM_KEY, {}), options=StateDictOptions(strict=strict))
    return dict(state.get(EXTRA_KEY, {}))


def _dcp_entries(ckpt_dir: str) -> tuple[dict, dict]:
    """``(tensor metadata by flat key, nested path by flat key)`` of a DCP checkpoint."""
    if not os.path.isdir(ckpt_dir):
        raise CheckpointError(f"sharded checkpoint {ckpt_dir!r} does not exist")
    meta = dcp.FileSystemReader(ckpt_dir).read_metadata()
    paths = dict(meta.planner_data or {})
    return dict(meta.state_dict_metadata), paths


def _load_one(ckpt_dir: str, key: str, md: Any) -> Any:
    """Read one entry of a DCP checkpoint (the full tensor, assembled from all shards) without a process group."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    if isinstance(md, TensorStorageMetadata):
        holder = {key: torch.empty(md.size, dtype=md.properties.dtype)}
    else:
        holder = {key: None}
    with warnings.catch_warnings():  # "torch.distributed is ... uninitialized": intended (offline conversion)
        warnings.filterwarnings("ignore", message=".*single process.*")
        dcp.load(holder, checkpoint_id=ckpt_dir, no_dist=True)
    return holder[key]


def iter_dcp(ckpt_dir: str):
    """Yield ``(nested path tuple, value)`` for every entry of a DCP checkpoint, one full tensor at a time."""
    entries, paths = _dcp_entries(ckpt_dir)
    for key, md in entries.items():
        path = tuple(paths.get(key, (key,)))
        yield path, _load_one(ckpt_dir, key, md)


def _set(root: dict, path: tuple, value: Any) -> None:
    """``root[path[0]][path[1]]... = value``; integer path elements index lists (optimizer param_groups)."""
    node: Any = root
    for k, nxt in zip(path[:-1], path[1:]):
        empty = [] if isinstance(nxt, int) else {}
        if isinstance(node, list):
            node.extend([None] * (k + 1 - len(node)))
            if node[k] is None:
                node[k] = empty
        else:
            node.setdefault(k, empty)
        node = node[k]
    if isinstance(node, list):
        node.extend([None] * (path[-1] + 1 - len(node)))
    node[path[-1]] = value


def _smallssl_layout(nested: dict) -> dict:
    """DCP's ``{"model", "optimizer", "extra"}`` -> smallssl's ``{"state_dict", "optimizer", **extra}``."""
    out = dict(nested.get(EXTRA_KEY, {}))
    out["state_dict"] = nested.get(MODEL_KEY, {})
    if OPTIM_KEY in nested:
        out["optimizer"] = nested[OPTIM_KEY]
    out["type"] = "consolidated"
    return out


def dcp_to_consolidated(ckpt_dir: str, out_path: str, include_optimizer: bool = True) -> str:
    """Write a sharded DCP checkpoint as one ``torch.save`` file: ``{"state_dict", "optimizer", **extra}``."""
    nested: dict = {}
    for path, value in iter_dcp(ckpt_dir):
        if path[0] == OPTIM_KEY and not include_optimizer:
            continue
        _set(nested, path, value)
    atomic_save(_smallssl_layout(nested), out_path)
    return out_path


def dcp_to_sliced(ckpt_dir: str, index_path: str) -> str:
    """Sharded DCP checkpoint -> sliced checkpoint (model tensors only), never holding more than one tensor."""
    entries, paths = _dcp_entries(ckpt_dir)
    model_keys = {k: tuple(paths.get(k, (k,))) for k in entries if tuple(paths.get(k, (k,)))[0] == MODEL_KEY}
    extra = {tuple(paths.get(k, (k,)))[-1]: _load_one(ckpt_dir, k, entries[k]) for k in entries
             if tuple(paths.get(k, (k,)))[0] == EXTRA_KEY}

    class _LazyModel(Mapping):  # a state dict whose tensors are read from the DCP files on access
        def __getitem__(self, name: str) -> torch.Tensor:
            return _load_one(ckpt_dir, name_to_key[name], entries[name_to_key[name]])

        def __iter__(self):
            return iter(name_to_key)

        def __len__(self) -> int:
            return len(name_to_key)

    name_to_key = {".".join(str(p) for p in path[1:]): k for k, path in model_keys.items()}
    # write_sliced walks Mapping.items(), which reads one tensor per step.
    return write_sliced({**extra, "state_dict": _LazyModel()}, index_path)
