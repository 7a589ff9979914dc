"""SEED checkpoint -> MoCo checkpoint, for ssl-small's ``--resume converted_... --restart`` (Shi et al. 2021).

The small-models paper trains its improved baselines by restarting MoCo from a SEED-distilled student.
:func:`distill_ckpt2moco_ckpt` (the name of ssl-small's ``util.py`` helper) rewrites a SEED checkpoint so
that MoCo's ``--restart`` finds the student where it looks for the query encoder:

* ``module.student.*`` (official and smallssl SEED) -> ``module.encoder_q.*`` (MoCo's layout, head at ``fc``);
  earlier smallssl SEED files (``module.encoder_q.backbone.*`` / ``head.*``) are renamed to the same layout;
* ``module.teacher.*`` (and any other non-student tensor) is dropped; a file that is not SEED is an error;
* the queue of *teacher* embeddings (``module.queue``, ``module.queue_ptr``) is kept only with
  ``keep_queue=True`` (``--keep-queue``). ssl-small kept it implicitly, so MoCo started with a queue of
  teacher keys as negatives; without it MoCo starts from a fresh random queue;
* optimizer / scaler / rng states are dropped (``--restart`` does not use them); ``epoch`` and ``arch`` are
  kept, ``method`` becomes ``moco``, and ``converted_from`` records the input path.

Output name as in ssl-small: ``converted_<suffix>`` next to the input, where ``suffix`` is the part of the
file name after its last ``-`` (the whole name if it has none), e.g. ``seed-checkpoint_0200.pth.tar`` ->
``converted_checkpoint_0200.pth.tar``. Deviations from ssl-small: the student keys are renamed rather than
duplicated, and the teacher queue is an explicit choice.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import torch

from .io import CheckpointError, atomic_save, load_checkpoint_file
from .native import LAYOUT_KEY, native_names, strip_module
from .report import state_dict_of

QUEUE_KEYS = ("queue", "queue_ptr")


def converted_path(path: str) -> str:
    """``<dir>/converted_<suffix after the last '-' of the file name>`` (ssl-small's naming)."""
    name = os.path.basename(path)
    return os.path.join(os.path.dirname(path), f"converted_{name.split('-')[-1]}")


def is_seed(state: Mapping[str, torch.Tensor], method: str | None = None) -> bool:
    """A SEED checkpoint: ``student.*`` / ``teacher.*`` tensors (with or without ``module.``), or ``method`` seed."""
    names = strip_module(state)
    return method == "seed" or any(k.startswith(("student.", "teacher.")) for k in names)


def convert_state(state: Mapping[str, torch.Tensor], keep_queue: bool = False, method: str | None = None
                  ) -> tuple[dict, dict[str, list[str]]]:
    """Rename a SEED state dict to MoCo's layout. Returns (new state, {"renamed"|"kept"|"dropped": keys}).

    The student becomes ``module.encoder_q.<backbone names>`` + ``module.encoder_q.fc.*`` (MoCo's own layout,
    whatever SEED layout it came in: official / smallssl SEED ``student.*``, or earlier smallssl SEED files'
    ``encoder_q.backbone.*`` / ``encoder_q.head.*``). Raises :class:`CheckpointError` for a file that is not SEED.
    """
    names = strip_module(state)  # name without module. -> original key
    if not is_seed(state, method):
        raise CheckpointError("not a SEED checkpoint: it has no module.student.* / module.teacher.* tensors (keys "
                              f"like {sorted(names)[:3]}). A MoCo checkpoint needs no conversion: pass it to "
                              "--resume FILE --restart directly")
    out: dict = {}
    log: dict[str, list[str]] = {"renamed": [], "kept": [], "dropped": []}
    has_student = any(n.startswith("student.") for n in names)
    old_smallssl = any(n.startswith(("encoder_q.backbone.", "encoder_q.head.")) for n in names)
    old_names = native_names([n for n in names if n.startswith("encoder_q.")], "moco") if old_smallssl else {}
    for name, k in names.items():
        if name.startswith("student."):
            out["module.encoder_q." + name[len("student."):]] = state[k]
            log["renamed"].append(k)
        elif name.startswith("encoder_q.") and not has_student:  # ssl-small's converted files repeat the student
            out["module." + old_names.get(name, name)] = state[k]
            log["renamed" if name in old_names and old_names[name] != name else "kept"].append(k)
        elif name in QUEUE_KEYS and keep_queue:
            v = state[k]
            if name == "queue" and old_smallssl and v.ndim == 2:
                v = v.T.contiguous()  # earlier smallssl files kept (K, dim) rows; MoCo's layout is (dim, K)
            out["module." + name] = v
            log["kept"].append(k)
        else:  # teacher.*, the queue without keep_queue, duplicates, anything else
            log["dropped"].append(k)
    if not (log["renamed"] or log["kept"]):
        raise CheckpointError("no student weights (module.student.* or module.encoder_q.*) in the SEED checkpoint")
    return out, log


def distill_ckpt2moco_ckpt(path: str, out: str | None = None, keep_queue: bool = False, verbose: bool = True) -> str:
    """Convert the SEED checkpoint ``path`` into a MoCo checkpoint; returns the output path.

    ``out`` defaults to :func:`converted_path` (``converted_<suffix>`` next to the input). The input is never
    overwritten. See the module docstring for what is renamed, kept and dropped.
    """
    ckpt = load_checkpoint_file(path)
    state, log = convert_state(state_dict_of(ckpt), keep_queue=keep_queue, method=ckpt.get("method"))
    out = out or converted_path(path)
    if os.path.abspath(out) == os.path.abspath(path):
        raise ValueError(f"output {out!r} would overwrite the input; pass another OUT")
    result = {"epoch": ckpt.get("epoch", 0), "arch": ckpt.get("arch"), "method": "moco", LAYOUT_KEY: "moco",
              "state_dict": state,
              "converted_from": os.path.abspath(path), "kept_teacher_queue": keep_queue}
    atomic_save(result, out)
    if verbose:
        dropped_teacher = sum(1 for k in log["dropped"] if "teacher" in k)
        print(f"=> {path} -> {out}: {len(log['renamed'])} student tensors renamed to module.encoder_q.*, "
              f"{len(log['kept'])} kept, {len(log['dropped'])} dropped ({dropped_teacher} teacher); "
              f"teacher queue {'kept' if keep_queue else 'dropped (pass --keep-queue to keep it)'}")
    return out
