"""Run logging: args + git SHA at start, one JSON line per epoch (``log.jsonl``), optional TensorBoard events."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
import warnings


def git_sha() -> str:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    if sha.returncode != 0:
        return "unknown"
    return sha.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


class RunLogger:
    """Writes ``run.json`` (args, SHA, command) once and appends ``log.jsonl``; silent on ranks > 0.

    ``tensorboard=True`` also writes every finite numeric field of each record that has a ``step`` as a TensorBoard
    scalar at that step, into ``out_dir`` (``tensorboard --logdir`` on the parent shows one run per directory).
    Per-epoch summaries (records with ``time_s`` or ``"kind": "epoch"``) go under ``epoch/<key>`` so they do not
    zigzag into the per-step curves of the same key. Needs the ``tb`` extra (``pip install -e .[tb]``).
    """

    def __init__(self, out_dir: str | None, args: dict, enabled: bool = True, tensorboard: bool = False):
        self.out_dir, self.enabled = out_dir, enabled and out_dir is not None
        self.tensorboard, self._tb = tensorboard and self.enabled, None
        if self.tensorboard:
            try:
                import tensorboard  # noqa: F401  (torch.utils.tensorboard imports it lazily, too late to say why)
            except ImportError:
                raise ValueError("tensorboard=True (--tensorboard) needs the tensorboard package: "
                                 "pip install -e .[tb]") from None
        self.sha = git_sha()
        if self.enabled:
            os.makedirs(out_dir, exist_ok=True)
            meta = {"git_sha": self.sha, "argv": sys.argv, "args": args, "start_time": time.time()}
            with open(os.path.join(out_dir, "run.json"), "a") as f:  # one line per (re)start
                f.write(json.dumps(meta, default=str) + "\n")

    def start(self, epoch: int, step: int) -> None:
        """Make the logs match the checkpoint a run continues from: keep the epoch records before ``epoch`` and
        the step records before ``step``; what is cut (epochs an earlier run logged and this one trains again,
        or everything when starting from scratch) is appended to ``log.jsonl.1`` / ``steps.jsonl.1``."""
        if not self.enabled:
            return
        for name, keep in (("log.jsonl", lambda r: r.get("epoch", -1) < epoch),
                           ("steps.jsonl", lambda r: r.get("step", -1) < step)):
            path = os.path.join(self.out_dir, name)
            if not os.path.exists(path):
                continue
            records = read_jsonl(path)
            kept, cut = [r for r in records if keep(r)], [r for r in records if not keep(r)]
            if cut:
                with open(path + ".1", "a") as f:
                    f.writelines(json.dumps(r, default=float) + "\n" for r in cut)
            tmp = path + ".tmp"
            with open(tmp, "w") as f:
                f.writelines(json.dumps(r, default=float) + "\n" for r in kept)
            os.replace(tmp, path)

    def log_step(self, record: dict) -> None:
        """A per-print-step record (``step`` plus loss, lr, diagnostics...) into ``steps.jsonl``."""
        if not self.enabled:
            return
        with open(os.path.join(self.out_dir, "steps.jsonl"), "a") as f:
            f.write(json.dumps(record, default=float) + "\n")
        if self.tensorboard:
            self._log_tensorboard(record)

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(os.path.join(self.out_dir, "log.jsonl"), "a") as f:
            f.write(json.dumps(record, default=float) + "\n")
        if self.tensorboard:
            self._log_tensorboard(record)

    def _log_tensorboard(self, record: dict) -> None:
        step = record.get("step")
        if isinstance(step, bool) or not isinstance(step, (int, float)):
            return
        if self._tb is None:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step: a resumed run hides the events the earlier run wrote from this step on (they are re-run)
            self._tb = SummaryWriter(log_dir=self.out_dir, purge_step=int(step))
        summary = record.get("kind") == "epoch" or "time_s" in record
        for key, value in record.items():
            if key == "step" or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            if math.isfinite(value):
                self._tb.add_scalar(f"epoch/{key}" if summary else key, value, global_step=int(step))
        if summary:
            self._tb.flush()

    def close(self) -> None:
        """Flush and close the TensorBoard writer (no-op without one)."""
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def read_jsonl(path: str) -> list[dict]:
    """The JSON objects of a JSON-lines file. A line that does not parse (a partial last line after a kill, or a
    line being written while we read) or is not an object is dropped with a warning naming the file and line."""
    if not os.path.exists(path):
        return []
    records = []
    with open(path) as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                warnings.warn(f"{path}:{i}: skipped a malformed line ({e.msg}), e.g. a partial write", stacklevel=2)
                continue
            if isinstance(rec, dict):
                records.append(rec)
            else:
                warnings.warn(f"{path}:{i}: skipped a line that is not a JSON object", stacklevel=2)
    return records
