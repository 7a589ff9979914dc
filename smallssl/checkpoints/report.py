"""Loading tensors into a module with a report: where the weights are (prefix), what loaded, what did not.

Imports nothing from the package except :mod:`.io`'s errors.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from .io import CheckpointError, CheckpointMismatchError


def is_lazy(state: Mapping) -> bool:
    """A mapping that reads each tensor from disk on access (sliced or sharded checkpoints): it has
    ``shape(key)``; code that would read every tensor (``dict(state)``) must not touch it."""
    return callable(getattr(state, "shape", None)) and not isinstance(state, dict)


def shape_of(state: Mapping, key: str) -> tuple[int, ...]:
    """``state[key]``'s shape without reading the tensor when ``state`` is lazy and knows it."""
    if is_lazy(state):
        shape = state.shape(key)
        if shape is not None:
            return tuple(shape)
    return tuple(state[key].shape)


def state_dict_of(ckpt: Mapping) -> Mapping[str, torch.Tensor]:
    """The tensor dict inside a checkpoint: ``state_dict`` / ``model`` / ``teacher`` / the dict itself
    (a lazy mapping is returned as is, nothing read)."""
    for key in ("state_dict", "model", "model_state", "teacher", "student"):
        value = ckpt.get(key)
        if isinstance(value, Mapping) and is_lazy(value):
            return value
        if isinstance(value, Mapping) and any(isinstance(v, torch.Tensor) for v in value.values()):
            return dict(value)
    if any(isinstance(v, torch.Tensor) for v in ckpt.values()):
        return {k: v for k, v in ckpt.items() if isinstance(v, torch.Tensor)}
    raise CheckpointError(f"no state dict found in checkpoint (top-level keys: {sorted(ckpt)[:10]})")


def _candidate_prefixes(keys) -> set[str]:
    prefixes = {""}
    for k in keys:
        parts = k.split(".")
        for i in range(1, len(parts)):
            prefixes.add(".".join(parts[:i]) + ".")
    return prefixes


# Modules that hold another network than the one being trained or evaluated (SEED's teacher, MoCo / BYOL's
# key / target encoder): a backbone is never taken from under them unless the caller names the prefix.
OTHER_NETWORKS = ("teacher", "encoder_k", "momentum_encoder", "target_encoder")


def excluded(prefix: str, exclude: tuple[str, ...] = OTHER_NETWORKS) -> bool:
    return any(part in exclude for part in prefix.split(".")[:-1])


def find_prefix(state: Mapping[str, torch.Tensor], model_keys, prefer: tuple[str, ...] = (),
                exclude: tuple[str, ...] = ()) -> str:
    """The prefix ``p`` maximising ``#{k : k = p + m, m in model_keys}``; ties go to ``prefer`` order.

    ``exclude``: module names (e.g. :data:`OTHER_NETWORKS`) a prefix may not contain."""
    model_keys = set(model_keys)
    best, best_n = "", -1
    ordered = list(prefer) + sorted(_candidate_prefixes(state), key=len)
    for p in ordered:
        if exclude and excluded(p, exclude):
            continue
        n = sum(1 for k in state if k.startswith(p) and k[len(p):] in model_keys)
        if n > best_n:
            best, best_n = p, n
    return best


@dataclass
class LoadReport:
    source: str
    prefix: str
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)

    def summary(self) -> str:
        lines = [f"=> loaded {len(self.loaded)} tensors from {self.source!r} (prefix {self.prefix!r}); "
                 f"missing {len(self.missing)}, shape-mismatched {len(self.mismatched)}, "
                 f"unused {len(self.unexpected)}"]
        for name, items in (("missing", self.missing), ("mismatched", self.mismatched),
                            ("unused", self.unexpected)):
            if items:
                shown = ", ".join(items[:8]) + (f", ... (+{len(items) - 8})" if len(items) > 8 else "")
                lines.append(f"   {name}: {shown}")
        return "\n".join(lines)


def _is_optional(key: str) -> bool:
    return key.endswith("num_batches_tracked")


DEFAULT_HINT = "Check -a/--arch (and --small-input) against the architecture the checkpoint was trained with."


def load_state_with_report(module: nn.Module, state: Mapping[str, torch.Tensor], source: str = "<state>",
                           prefix: str | None = None, strict: bool = True,
                           prefer: tuple[str, ...] = (), exclude: tuple[str, ...] = (),
                           hint: str = DEFAULT_HINT) -> LoadReport:
    """Load the tensors of ``state`` under ``prefix`` (found automatically when None) into ``module``.

    ``strict``: raise :class:`CheckpointMismatchError` if any model tensor is missing or has another shape
    (BatchNorm's ``num_batches_tracked`` may be absent). Non-strict drops mismatches and reports them.
    A lazy ``state`` (sliced / sharded checkpoint) is checked from its shapes and copied one tensor at a time.
    ``exclude`` restricts the automatic prefix (:func:`find_prefix`); ``hint`` ends the error message.
    """
    target = module.state_dict()
    lazy = is_lazy(state)
    if prefix is None:
        prefix = find_prefix(state, target.keys(), prefer, exclude)
    report = LoadReport(source=source, prefix=prefix)
    to_load = {}
    for k in state:  # keys only: a lazy state is not read here
        if not k.startswith(prefix):
            continue
        name = k[len(prefix):]
        if name not in target:
            report.unexpected.append(k)
        elif shape_of(state, k) != tuple(target[name].shape):
            report.mismatched.append(f"{name} {shape_of(state, k)} vs model {tuple(target[name].shape)}")
        else:
            to_load[name] = k if lazy else state[k]
    report.loaded = sorted(to_load)
    report.missing = sorted(k for k in target if k not in to_load and not _is_optional(k)
                            and not any(m.startswith(k + " ") for m in report.mismatched))
    # Extra tensors inside a module the model also has (e.g. layer1.2.* of a ResNet-34 loaded into a
    # ResNet-18) mean another architecture; extra top-level modules (fc, head, classifier) are just heads.
    roots = {k.split(".")[0] for k in target}
    foreign = [k for k in report.unexpected if k[len(prefix):].split(".")[0] in roots]
    if strict and (report.missing or report.mismatched or not report.loaded or foreign):
        raise CheckpointMismatchError(
            f"checkpoint {source!r} does not fit this model: {len(report.loaded)} tensors match, "
            f"{len(report.missing)} missing, {len(report.mismatched)} with another shape, {len(foreign)} extra "
            f"inside the model's modules ({', '.join(foreign[:3])}).\n{report.summary()}\n{hint}"
        )
    if lazy:  # one tensor in memory at a time: read, copy into the module's own storage, drop
        with torch.no_grad():
            for name, k in to_load.items():
                target[name].copy_(state[k])
    else:
        module.load_state_dict(to_load, strict=False)
    return report
