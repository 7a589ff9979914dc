"""SEED checkpoint -> MoCo checkpoint, for ssl-small's ``--resume converted_... --restart`` (seed 004).

The small-models paper trains its improved baselines by restarting MoCo from a SEED-distilled student.
:func:`distill_ckpt2moco_ckpt` (the name of ssl-small's ``util.py`` helper) rewrites a SEED checkpoint so
that MoCo's ``--restart`` finds the student where it looks for the query encoder:

* ``module.student.*`` (official SEED) -> ``module.encoder_q.*``; ``module.encoder_q.*`` (smallssl's own
  SEED checkpoints) is kept as is;
* ``module.teacher.*`` (and any other non-student tensor) is dropped;
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

from .io import CheckpointError, atomic_save, load_checkpoint_file
from .report import state_dict_of

STUDENT_PREFIXES = ("student.", "encoder_q.")
QUEUE_KEYS = ("queue", "queue_ptr")


def converted_path(path: str) -> str:
    """``<dir>/converted_<suffix after the last '-' of the file name>`` (ssl-small's naming)."""
    name = os.path.basename(path)
    return os.path.join(os.path.dirname(path), f"converted_{name.split('-')[-1]}")


def convert_state(state: dict, keep_queue: bool = False) -> tuple[dict, dict[str, list[str]]]:
    """Rename a SEED state dict to MoCo's layout. Returns (new state, {"renamed"|"kept"|"dropped": keys})."""
    out: dict = {}
    log: dict[str, list[str]] = {"renamed": [], "kept": [], "dropped": []}
    for k, v in state.items():
        name = k[len("module."):] if k.startswith("module.") else k
        if name.startswith("student."):
            out["module.encoder_q." + name[len("student."):]] = v
            log["renamed"].append(k)
        elif name.startswith("encoder_q."):
            out["module." + name] = v
            log["kept"].append(k)
        elif name in QUEUE_KEYS and keep_queue:
            out["module." + name] = v
            log["kept"].append(k)
        else:  # teacher.*, queue without keep_queue, anything else
            log["dropped"].append(k)
    if not (log["renamed"] or log["kept"]):
        raise CheckpointError("no student weights (module.student.* or module.encoder_q.*) in the checkpoint")
    return out, log


def distill_ckpt2moco_ckpt(path: str, out: str | None = None, keep_queue: bool = False, verbose: bool = True) -> str:
    """Convert the SEED checkpoint ``path`` into a MoCo checkpoint; returns the output path.

    ``out`` defaults to :func:`converted_path` (``converted_<suffix>`` next to the input). The input is never
    overwritten. See the module docstring for what is renamed, kept and dropped.
    """
    ckpt = load_checkpoint_file(path)
    state, log = convert_state(state_dict_of(ckpt), keep_queue=keep_queue)
    out = out or converted_path(path)
    if os.path.abspath(out) == os.path.abspath(path):
        raise ValueError(f"output {out!r} would overwrite the input; pass another OUT")
    result = {"epoch": ckpt.get("epoch", 0), "arch": ckpt.get("arch"), "method": "moco", "state_dict": state,
              "converted_from": os.path.abspath(path), "kept_teacher_queue": keep_queue}
    atomic_save(result, out)
    if verbose:
        dropped_teacher = sum(1 for k in log["dropped"] if "teacher" in k)
        print(f"=> {path} -> {out}: {len(log['renamed'])} student tensors renamed to module.encoder_q.*, "
              f"{len(log['kept'])} kept, {len(log['dropped'])} dropped ({dropped_teacher} teacher); "
              f"teacher queue {'kept' if keep_queue else 'dropped (pass --keep-queue to keep it)'}")
    return out
