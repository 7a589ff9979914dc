"""Run logging: args + git SHA at start, one JSON line per epoch (``log.jsonl``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time


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
    """Writes ``run.json`` (args, SHA, command) once and appends ``log.jsonl``; silent on ranks > 0."""

    def __init__(self, out_dir: str | None, args: dict, enabled: bool = True):
        self.out_dir, self.enabled = out_dir, enabled and out_dir is not None
        self.sha = git_sha()
        if self.enabled:
            os.makedirs(out_dir, exist_ok=True)
            meta = {"git_sha": self.sha, "argv": sys.argv, "args": args, "start_time": time.time()}
            with open(os.path.join(out_dir, "run.json"), "a") as f:  # one line per (re)start
                f.write(json.dumps(meta, default=str) + "\n")

    def drop_epochs_from(self, epoch: int) -> None:
        """Forget logged epochs >= ``epoch`` (they are re-run after resuming from an earlier checkpoint)."""
        path = os.path.join(self.out_dir, "log.jsonl") if self.enabled else None
        if not path or not os.path.exists(path):
            return
        kept = [r for r in read_jsonl(path) if r.get("epoch", -1) < epoch]
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            f.writelines(json.dumps(r, default=float) + "\n" for r in kept)
        os.replace(tmp, path)

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(os.path.join(self.out_dir, "log.jsonl"), "a") as f:
            f.write(json.dumps(record, default=float) + "\n")


def read_jsonl(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
