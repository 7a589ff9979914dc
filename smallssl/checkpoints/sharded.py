"""Sharded checkpoints of FSDP2 runs: ``torch.distributed.checkpoint`` (DCP) directories.

- :func:`save_sharded` / :func:`load_sharded`: DCP of model + optimizer + plain values; every rank writes its own
  shards, and a run can resume on another world size.
- :func:`save_sharded_checkpoint` / :func:`resume_sharded`: the trainer's epoch and preemption checkpoints
  (``CKPT_DIR/checkpoint_NNNN/``, written to ``.tmp`` and swapped in).
- :func:`dcp_to_consolidated` / :func:`dcp_to_sliced`: offline conversion without a process group
  (``python -m smallssl.convert dcp2consolidated | dcp2sliced``); ``dcp_to_sliced`` reads one tensor at a time.
"""

from __future__ import annotations

import os
import pickle
import shutil
from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn as nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from .. import dist as sdist
from .dcp_read import EXTRA_KEY, MODEL_KEY, OPTIM_KEY, dcp_entries, load_entry
from .io import CheckpointError, CheckpointMismatchError, atomic_save, sharded_epochs
from .resume import SHARDED_LAST, _check_identity, all_rng_states, set_rng_state
from .sliced import write_sliced


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
    return dcp_entries(ckpt_dir)


_load_one = load_entry  # one full tensor (all shards) without a process group


def iter_dcp(ckpt_dir: str):
    """Yield ``(nested path tuple, value)`` for every entry of a DCP checkpoint, one full tensor at a time."""
    entries, paths = _dcp_entries(ckpt_dir)
    for key, md in entries.items():
        path = tuple(paths.get(key, (key,)))
        yield path, _load_one(ckpt_dir, key, md)


def _set_dcp_path(root: dict, path: tuple, value: Any) -> None:
    """``root[path[0]][path[1]]... = value``; integer path elements index lists: DCP flattens the optimizer's
    ``param_groups`` list to integer path elements (unlike :func:`.sliced.set_path`, where ints are dict keys)."""
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
        _set_dcp_path(nested, path, value)
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


@torch.no_grad()
def complete_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """Give every parameter that has had no gradient yet (SwAV's frozen prototypes) the state its first step
    would start from: a zero momentum buffer (SGD / LARS: ``0 * m + d = d``, bit-identical to no buffer) or
    AdamW's zero moments at step 0. DCP loads into a fully initialised optimizer and needs every key."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            if optimizer.state.get(p):
                continue
            if isinstance(optimizer, torch.optim.AdamW):
                optimizer.state[p] = {"step": torch.tensor(0.0), "exp_avg": torch.zeros_like(p),
                                      "exp_avg_sq": torch.zeros_like(p)}
            elif group.get("momentum", 0):
                optimizer.state[p] = {"momentum_buffer": torch.zeros_like(p)}


def save_sharded_checkpoint(method: nn.Module, optimizer, ckpt_dir: str, name: str, *, epoch: int, it: int,
                            step: int, meta: dict, keep_last: int = 0) -> str:
    """Collective: ``ckpt_dir/name/`` as a DCP checkpoint (model + optimizer shards, ``meta`` and every rank's
    RNG). Written to ``name.tmp`` and swapped in, so a complete checkpoint exists at every moment."""
    final = os.path.join(ckpt_dir, name)
    tmp, old = final + ".tmp", final + ".old"
    if sdist.is_main_process():
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    sdist.barrier()
    rngs = all_rng_states()
    complete_optimizer_state(optimizer)
    save_sharded(tmp, method, optimizer, extra={**meta, "epoch": epoch, "iter": it, "step": step,
                                                "rng": pickle.dumps(rngs)})
    sdist.barrier()
    if sdist.is_main_process():
        shutil.rmtree(old, ignore_errors=True)
        if os.path.isdir(final):
            os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
        if it == 0:
            shutil.rmtree(os.path.join(ckpt_dir, SHARDED_LAST), ignore_errors=True)
            if keep_last > 0:
                for stale in sharded_epochs(ckpt_dir)[:-keep_last]:
                    shutil.rmtree(stale)
        print(f"=> saved sharded checkpoint {final} (epoch {epoch}, iteration {it})")
    sdist.barrier()
    return final


def resume_sharded(method: nn.Module, optimizer, path: str, *, arch: str, method_name: str, global_batch: int,
                   dataset_len: int) -> tuple[int, int, int]:
    """Collective: load model + optimizer shards and the RNG states; returns ``(epoch, iter, step)``."""
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        extra = load_sharded(path, method, optimizer)
    except (RuntimeError, KeyError, ValueError, CheckpointException) as e:  # CheckpointException: BaseException
        raise CheckpointMismatchError(f"--resume {path!r} does not fit this model / optimizer ({e}); check -a, "
                                      "--method and --optimizer against the run that wrote it") from e
    _check_identity(extra, path, arch, method_name, global_batch, dataset_len)
    if extra.get("rng"):
        set_rng_state(pickle.loads(extra["rng"]))
    return int(extra.get("epoch", 0)), int(extra.get("iter", 0)), int(extra.get("step", 0))
