"""The method contract: what the trainer (``main_moco.py``) calls on every method, and when.

A method is an ``nn.Module`` built as ``cls(backbone, **kwargs)`` whose ``forward(views)`` (views: list of
(B, 3, H, W) tensors) returns ``{"loss": scalar, **logs}`` (every other scalar is averaged into the epoch log).
It keeps its trainable query encoder as ``self.encoder_q`` (an :class:`~smallssl.heads.Encoder`: backbone + head)
and may override the hooks below; the trainer calls every hook on every method, so the defaults do nothing.
Optional: ``forward`` may also return ``"emb"`` (list of (B, d) embeddings the loss saw, detached) and
``"feat"`` ((B, F) backbone features, detached) for the trainer's collapse diagnostics.

One training step, as the trainer runs it::

    out = method(views); out["loss"].backward()
    method.before_optimizer_step(step); optimizer.step(); method.after_step(step, total_steps)
"""

from __future__ import annotations

from typing import ClassVar

import torch.nn as nn

from ..diagnostics import DEFAULT_COLLAPSE_HINT


class SSLMethod(nn.Module):
    """Base class of every self-supervised method (see the module docstring for the step order)."""

    #: True when nothing touches parameters outside forward / the optimizer / these hooks, so that
    #: ``--fsdp`` (FSDP2 ``fully_shard``) may shard them.
    supports_fsdp: ClassVar[bool] = False

    #: What the collapse warning (:class:`smallssl.diagnostics.CollapseMonitor`) tells users of this method to
    #: change; methods with a measured cause override it.
    collapse_hint: ClassVar[str] = DEFAULT_COLLAPSE_HINT

    @property
    def backbone(self) -> nn.Module:
        """The backbone being trained (pooled features, ``.num_features``): what evaluation and export use."""
        return self.encoder_q.backbone

    def check_batch(self, global_batch: int) -> None:
        """Called once before training with the global batch size; raise ``ValueError`` if it cannot work
        (e.g. a queue length that is not a multiple of it)."""

    def set_epoch(self, epoch: int) -> None:
        """Called at the start of every epoch (0-based), also when resuming inside one."""

    def before_optimizer_step(self, step: int) -> None:
        """Called after ``backward`` and before ``optimizer.step()`` at global step ``step`` (0-based), e.g. to
        drop a gradient (SwAV's frozen prototypes)."""

    def after_step(self, step: int, total_steps: int) -> None:
        """Called after ``optimizer.step()`` of global step ``step`` of ``total_steps`` (e.g. an EMA update)."""

    def param_group_options(self) -> list[tuple[list[nn.Parameter], dict]]:
        """Parameters that need their own optimizer options: ``[(params, {"lr_scale": 0.02, ...}), ...]``."""
        return []

    def copy_query_to_key(self) -> None:
        """ssl-small's ``--restart``: after loading weights into ``encoder_q``, make any momentum / target
        encoder equal to it. Methods without one do nothing."""
