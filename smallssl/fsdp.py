"""FSDP2 (``torch.distributed.fsdp.fully_shard``) for SEER-size trunks, and sharded checkpoints with DCP.

SEER (Goyal et al. 2021) trains RegNetY-10B with FSDP: every residual block is a sharding unit, so a process only holds
one block's full parameters at a time, computes in reduced precision and reduces gradients in fp32; activation
checkpointing per group of blocks trades compute for memory. Here:

- :func:`fsdp_wrap`: ``fully_shard`` each block (``RegNet.blocks()`` or the modules given), then the root, with a
  ``MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)`` (``param_dtype=None`` keeps fp32, e.g. for gloo
  backends without bf16 collectives).
- :func:`enable_activation_checkpointing`: recompute each RegNet stage in the backward pass.
- :func:`gather_into`: the full weights of a sharded submodule copied into a plain replica (the online kNN's model).

Sharded (DCP) checkpoints of such runs live in :mod:`smallssl.checkpoints.sharded`.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn

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


def gather_into(sharded: nn.Module, replica: nn.Module) -> nn.Module:
    """Copy the full state of ``sharded`` (a submodule of an FSDP2 model) into ``replica``, an unsharded module of
    the same architecture, and return it. Collective: every rank calls it at the same point. Sharded parameters are
    all-gathered (``DTensor.full_tensor``, in ``state_dict`` order, so every rank issues the same collectives);
    buffers, which FSDP2 leaves per rank (BN running statistics), are rank 0's, so every rank evaluates one
    network. Holds one full copy of ``sharded`` per rank: meant for a trunk that fits a device, not SEER-10B."""
    from torch.distributed.tensor import DTensor

    state = {}
    for k, v in sharded.state_dict().items():
        if isinstance(v, DTensor):
            v = v.full_tensor()
        elif dist.is_initialized() and dist.get_world_size() > 1 and torch.is_tensor(v):
            v = v.detach().clone()
            dist.broadcast(v, src=0)
        state[k] = v
    replica.load_state_dict(state)
    return replica
