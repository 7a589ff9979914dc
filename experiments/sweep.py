"""Sweep files and their grid points: pure expansion and validation, no submitit (``launch --dry-run`` and its tests
never import it). See :mod:`experiments.launch` for the file format and the submission.
"""

from __future__ import annotations

import argparse
import itertools
import os
import re
import runpy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import main_moco

MANAGED_FLAGS = ("--ckpt-dir",)  # set per point by the launcher
SLURM_KEYS = {"partition", "nodes", "gpus_per_node", "tasks_per_node", "cpus_per_task", "timeout_min", "mem_gb",
              "signal_delay_s", "array_parallelism", "setup", "name", "max_num_timeout", "additional_parameters"}


class SweepError(ValueError):
    """A sweep file or one of its grid points is invalid (raised before anything is submitted)."""


@dataclass
class Sweep:
    name: str
    base: list[str]
    grid: dict[str, list[Any]] = field(default_factory=dict)
    slurm: dict[str, Any] = field(default_factory=dict)
    output: str | None = None


@dataclass
class Point:
    name: str
    overrides: dict[str, Any]
    argv: list[str]  # full main_moco argv, --ckpt-dir included
    out_dir: str


# --------------------------------------------------------------------------------------------- sweep files
def load_sweep(path: str | os.PathLike) -> Sweep:
    """Execute a sweep file and read BASE, GRID, SLURM, OUTPUT from it."""
    path = Path(path)
    if not path.is_file():
        raise SweepError(f"sweep file {str(path)!r} not found")
    ns = runpy.run_path(str(path))
    if "BASE" not in ns:
        raise SweepError(f"{path}: a sweep file must define BASE (argv list for main_moco.py)")
    base, grid, slurm = ns["BASE"], ns.get("GRID", {}), ns.get("SLURM", {})
    if not isinstance(base, (list, tuple)) or not all(isinstance(a, str) for a in base):
        raise SweepError(f"{path}: BASE must be a list of strings, got {base!r}")
    if not isinstance(grid, dict):
        raise SweepError(f"{path}: GRID must be a dict flag -> list of values, got {type(grid).__name__}")
    if not isinstance(slurm, dict):
        raise SweepError(f"{path}: SLURM must be a dict, got {type(slurm).__name__}")
    return Sweep(name=path.stem, base=list(base), grid=dict(grid), slurm=dict(slurm), output=ns.get("OUTPUT"))


def expand_grid(grid: dict[str, list[Any]]) -> list[dict[str, Any]]:
    """Cartesian product of the grid, in GRID order (the last flag varies fastest); ``{}`` -> ``[{}]``."""
    for flag, values in grid.items():
        if not isinstance(flag, str) or not flag.startswith("-"):
            raise SweepError(f"GRID key {flag!r} is not a command-line flag (it must start with '-')")
        if not isinstance(values, (list, tuple)) or not values:
            raise SweepError(f"GRID[{flag!r}] must be a non-empty list of values, got {values!r}")
    flags = list(grid)
    return [dict(zip(flags, combo)) for combo in itertools.product(*(grid[f] for f in flags))]


def flag_argv(flag: str, value: Any) -> list[str]:
    """``True`` -> ``[flag]``; ``False``/``None`` -> ``[]``; list/tuple -> ``[flag, *values]``; else ``[flag, str]``."""
    if value is True:
        return [flag]
    if value is False or value is None:
        return []
    if isinstance(value, (list, tuple)):
        return [flag, *map(str, value)]
    return [flag, str(value)]


def point_name(overrides: dict[str, Any]) -> str:
    """Folder name from the overrides: ``{"-a": "resnet18", "--lr": 0.03}`` -> ``a=resnet18,lr=0.03``."""
    if not overrides:
        return "base"
    parts = []
    for flag, value in overrides.items():
        key = flag.lstrip("-")
        if value is True:
            val = "on"
        elif value is False or value is None:
            val = "off"
        elif isinstance(value, (list, tuple)):
            val = "-".join(map(str, value))
        else:
            val = str(value)
        parts.append(f"{key}={val}")
    return re.sub(r"[^A-Za-z0-9._=,+-]", "_", ",".join(parts))


def validate_argv(argv: list[str], where: str = "") -> argparse.Namespace:
    """Parse with main_moco's parser; raise SweepError naming an unknown flag or a bad value."""
    parser = main_moco.get_args_parser()

    def _error(message: str):
        raise SweepError(f"{where}: {message}" if where else message)

    parser.error = _error  # argparse would print usage and sys.exit(2)
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        flags = [u for u in unknown if u.startswith("-")] or unknown
        _error(f"unknown flag(s) for main_moco.py: {' '.join(flags)} (see python main_moco.py --help)")
    return args


def build_points(sweep: Sweep, output_root: str | os.PathLike) -> list[Point]:
    """Expand and validate every grid point (nothing is submitted here)."""
    for flag in MANAGED_FLAGS:
        if flag in sweep.base or flag in sweep.grid:
            raise SweepError(f"{sweep.name}: do not set {flag}; the launcher gives each point its own folder")
    points, seen = [], set()
    for overrides in expand_grid(sweep.grid):
        name = point_name(overrides)
        if name in seen:
            raise SweepError(f"{sweep.name}: two grid points share the folder name {name!r}")
        seen.add(name)
        out_dir = os.path.join(os.path.abspath(output_root), name)
        argv = list(sweep.base) + [a for f, v in overrides.items() for a in flag_argv(f, v)] + ["--ckpt-dir", out_dir]
        validate_argv(argv, where=f"{sweep.name} point {name!r}")
        points.append(Point(name, overrides, argv, out_dir))
    return points
