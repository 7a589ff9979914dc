"""Checkpoints: writing, resuming, and reading every layout smallssl interoperates with.

Layers (each imports only those above it): :mod:`.io` (names, atomic save, errors) -> :mod:`.report`
(prefix finding, loaded / missing report) -> :mod:`.sliced`, :mod:`.vissl` (VISSL / SEER formats) ->
:mod:`.load` (the one place where a layout is detected) -> :mod:`.teacher` (SEED teachers); :mod:`.resume`
(exact resume of the trainer's state) -> :mod:`.sharded` (FSDP2 DCP directories); :mod:`.seed2moco`
(SEED -> MoCo conversion). ``python -m smallssl.convert`` is the command line over them.
"""

from .io import (
                 CKPT_PATTERN,
                 CheckpointError,
                 CheckpointMismatchError,
                 atomic_save,
                 latest_checkpoint,
                 list_checkpoints,
                 load_checkpoint_file,
                 save_checkpoint,
)
from .load import BACKBONE_PREFIXES, is_vissl, load_backbone, restart_load
from .report import LoadReport, find_prefix, load_state_with_report, state_dict_of
from .resume import LAST_CKPT, SHARDED_LAST, SHARDED_PATTERN, resolve_resume, resume_exact, training_state
from .teacher import build_teacher, load_teacher

__all__ = [
    "CKPT_PATTERN", "CheckpointError", "CheckpointMismatchError", "atomic_save", "latest_checkpoint",
    "list_checkpoints", "load_checkpoint_file", "save_checkpoint", "BACKBONE_PREFIXES", "is_vissl", "load_backbone",
    "restart_load", "LoadReport", "find_prefix", "load_state_with_report", "state_dict_of", "LAST_CKPT",
    "SHARDED_LAST", "SHARDED_PATTERN", "resolve_resume", "resume_exact", "training_state", "build_teacher",
    "load_teacher",
]
