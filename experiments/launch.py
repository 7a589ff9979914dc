"""Run a sweep of ``main_moco.py`` trainings on Slurm (or locally) with submitit.

Usage (from the repository root)::

    python -m experiments.launch experiments/sweeps/tiny_moco.py --dry-run        # print the grid, submit nothing
    python -m experiments.launch experiments/sweeps/tiny_moco.py --cluster slurm   # one job array
    python -m experiments.launch experiments/sweeps/tiny_moco.py --collect         # markdown table of results

A sweep file is Python defining ``BASE`` (argv list for main_moco.py), ``GRID`` (dict flag -> list of values;
the cartesian product gives the points; ``True`` = bare flag, ``False``/``None`` = flag left out, a list/tuple
= several values) and optionally ``SLURM`` (executor defaults: partition, nodes, gpus_per_node, tasks_per_node,
cpus_per_task, timeout_min, mem_gb, signal_delay_s, array_parallelism, setup) and ``OUTPUT`` (root folder,
default ``runs/<sweep name>``). Every point is parsed with ``main_moco.get_args_parser()`` before anything is
submitted; an unknown flag or a bad value stops the launch with the flag named.

Each point trains in ``OUTPUT/<point name>`` (the name comes from its overrides, e.g. ``arch=resnet18,lr=0.03``)
with ``--resume auto``. Preemption and timeouts: Slurm sends SIGUSR2 (``--signal USR2@signal_delay_s``); the job
only *requests* a stop (:func:`smallssl.preempt.request_stop`), the training loop writes an iteration-level
``checkpoint_last.pth.tar`` at the next step boundary (agreed across ranks) and returns ``"preempted"``; then
rank 0 runs submitit's own requeue path (``checkpoint()`` -> ``scontrol requeue``) and the requeued job resumes
exactly. submitit's default handler would call ``checkpoint()`` inside the signal handler and exit at once,
before the loop could save; a collective save there would hang.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # main_moco.py lives at the repository root
    sys.path.insert(0, str(REPO))

import main_moco  # noqa: E402
from experiments.sweep import SLURM_KEYS, Point, Sweep, SweepError, build_points, load_sweep, validate_argv  # noqa: E402
from smallssl import preempt  # noqa: E402
from smallssl.checkpoints import LAST_CKPT, list_checkpoints  # noqa: E402


# ------------------------------------------------------------------------------------------- the job itself
class SweepJob:
    """submitit callable for one grid point: ``__call__`` trains, ``checkpoint()`` requeues.

    Inside a job, SIGUSR2 only requests a stop; when main() returns ``"preempted"`` (the loop saved
    ``checkpoint_last.pth.tar``), rank 0 hands over to submitit's handler, which calls :meth:`checkpoint`,
    dumps the new submission, runs ``scontrol requeue`` and exits. Other ranks wait to be stopped by the requeue.
    """

    def __init__(self, argv: list[str], name: str = "", threads: int | None = None, rank_wait_s: float = 120.0):
        self.argv, self.name, self.threads, self.rank_wait_s = list(argv), name, threads, rank_wait_s

    def resume_args(self) -> argparse.Namespace:
        """The point's args with ``--resume auto`` (a first-start ``--resume X --restart`` is kept until a
        checkpoint of this run exists)."""
        args = main_moco.get_args_parser().parse_args(self.argv)
        ckpt_dir = args.ckpt_dir
        has_own = bool(list_checkpoints(ckpt_dir)) or os.path.isfile(os.path.join(ckpt_dir, LAST_CKPT))
        if has_own or not args.resume:
            args.resume, args.restart = "auto", False
        return args

    def __call__(self) -> dict:
        import submitit
        import torch

        preempt.clear()
        old_threads = torch.get_num_threads()
        previous = signal.signal(signal.SIGUSR2, preempt.request_stop)  # replaces submitit's handler
        env = _job_env()
        info: dict[str, Any] = {"point": self.name, "rank": 0, "world_size": 1,
                                "restart_count": int(os.environ.get("SLURM_RESTART_COUNT", 0) or 0),
                                "job_id": None}
        try:
            if env is not None:
                submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
                info.update(rank=env.global_rank, world_size=env.num_tasks, job_id=env.job_id)
            threads = self.threads or int(os.environ.get("SLURM_CPUS_PER_TASK", 0) or 0)
            if threads:  # use the CPUs the job asked for, not all of the node's
                torch.set_num_threads(threads)
            args = self.resume_args()
            # every rank records that its USR2 handler is installed (a signal before that would kill the task)
            _append_json(os.path.join(args.ckpt_dir, "launcher.jsonl"), {**info, "time": time.time()})
            result = dict(main_moco.main(args) or {})
        finally:
            signal.signal(signal.SIGUSR2, previous if previous is not None else signal.SIG_DFL)
            torch.set_num_threads(old_threads)
        result.update(info)
        if result.get("status") == "preempted":
            self._requeue(previous, info["rank"])
        return result

    def _requeue(self, submitit_handler, rank: int) -> None:
        """After the iteration-level save: let submitit checkpoint + requeue (rank 0), or wait for it."""
        from submitit.core.job_environment import SignalHandler

        if not isinstance(getattr(submitit_handler, "__self__", None), SignalHandler):
            return  # not under submitit's signal handling (plain call, debug executor): nothing to requeue
        if rank != 0:
            # The requeue stops every task of the job; returning early would write a stale result file.
            time.sleep(self.rank_wait_s)
            return
        try:
            submitit_handler(signal.SIGUSR2, None)  # checkpoint() -> dump -> scontrol requeue -> sys.exit(-1)
        except subprocess.CalledProcessError:
            # scontrol refused: Slurm itself is already requeuing this job (partition preemption). Exit
            # without a result file so submitit keeps waiting for the requeued run.
            print("=> scontrol requeue refused; Slurm is requeuing this job itself", file=sys.stderr)
            sys.exit(-1)

    def checkpoint(self, *args: Any, **kwargs: Any):
        """Called by submitit (possibly inside a signal handler): never saves; the loop has saved or will."""
        import submitit

        preempt.request_stop()
        return submitit.helpers.DelayedSubmission(SweepJob(self.argv, self.name, self.threads, self.rank_wait_s))


def _job_env():
    """submitit's JobEnvironment inside a submitit job (slurm/local), else None."""
    if os.environ.get("SUBMITIT_EXECUTOR") not in ("slurm", "local"):
        return None
    import submitit

    return submitit.JobEnvironment()


def _append_json(path: str, record: dict) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


# ------------------------------------------------------------------------------------------------ submission
# SLURM key -> (submitit AutoExecutor parameter, type), for the keys that are passed on only when set
OPTIONAL_PARAMETERS = {"mem_gb": ("mem_gb", lambda v: v), "partition": ("slurm_partition", str),
                       "array_parallelism": ("slurm_array_parallelism", int), "setup": ("slurm_setup", list),
                       "max_num_timeout": ("slurm_max_num_timeout", int),
                       "additional_parameters": ("slurm_additional_parameters", dict)}


def executor_parameters(sweep: Sweep, cli: dict[str, Any] | None = None) -> dict[str, Any]:
    """Merge SLURM defaults with command-line overrides into submitit AutoExecutor parameters."""
    merged = {**sweep.slurm, **{k: v for k, v in (cli or {}).items() if v is not None}}
    unknown = set(merged) - SLURM_KEYS
    if unknown:
        raise SweepError(f"{sweep.name}: unknown SLURM key(s) {sorted(unknown)}; valid: {sorted(SLURM_KEYS)}")
    gpus = int(merged.get("gpus_per_node", 0) or 0)
    params: dict[str, Any] = {
        "name": merged.get("name", f"smallssl-{sweep.name}"),
        "nodes": int(merged.get("nodes", 1)),
        "gpus_per_node": gpus,
        "tasks_per_node": int(merged.get("tasks_per_node") or max(gpus, 1)),  # one process per GPU
        "cpus_per_task": int(merged.get("cpus_per_task", 1)),
        "timeout_min": int(merged.get("timeout_min", 60)),
        "slurm_signal_delay_s": int(merged.get("signal_delay_s", 90)),
    }
    for key, (name, cast) in OPTIONAL_PARAMETERS.items():  # passed on only when set (max_num_timeout: also 0)
        value = merged.get(key)
        if value or (key == "max_num_timeout" and value is not None):
            params[name] = cast(value)
    return params


def output_root_of(sweep: Sweep, output_root: str | None = None) -> str:
    return os.path.abspath(output_root or sweep.output or os.path.join("runs", sweep.name))


def launch(sweep: Sweep | str | os.PathLike, cluster: str | None = None, dry_run: bool = False,
           output_root: str | None = None, slurm: dict[str, Any] | None = None) -> list:
    """Validate every point, then submit one job array. Returns the submitit jobs ([] for a dry run)."""
    if not isinstance(sweep, Sweep):
        sweep = load_sweep(sweep)
    root = output_root_of(sweep, output_root)
    points = build_points(sweep, root)  # raises before anything is submitted
    params = executor_parameters(sweep, slurm)
    if dry_run:
        print(f"# sweep {sweep.name}: {len(points)} point(s) -> {root}")
        print(f"# executor: {json.dumps(params)}")
        for p in points:
            print(f"{p.name}: python main_moco.py {' '.join(p.argv)}")
        return []
    import submitit

    if cluster == "slurm" and shutil.which("sbatch") is None:
        raise SweepError("--cluster slurm but sbatch is not on PATH (start one with scripts/slurm_local.sh start)")
    # The job imports experiments.launch and main_moco: make the repository importable there.
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    executor = submitit.AutoExecutor(folder=os.path.join(root, "_submitit", "%j"), cluster=cluster)
    executor.update_parameters(**params)
    with executor.batch():  # one job array on Slurm
        jobs = [executor.submit(SweepJob(p.argv, p.name, threads=params["cpus_per_task"])) for p in points]
    _write_manifest(root, sweep, points, jobs, executor.cluster)
    for p, j in zip(points, jobs):
        print(f"submitted {p.name}: job {j.job_id}")
    return jobs


def _write_manifest(root: str, sweep: Sweep, points: list[Point], jobs: list, cluster: str) -> None:
    os.makedirs(root, exist_ok=True)
    manifest = {"sweep": sweep.name, "cluster": cluster, "time": time.time(),
                "points": [{"name": p.name, "overrides": {k: v for k, v in p.overrides.items()}, "argv": p.argv,
                            "out_dir": p.out_dir, "job_id": str(j.job_id)} for p, j in zip(points, jobs)]}
    with open(os.path.join(root, "launch.json"), "w") as f:
        json.dump(manifest, f, indent=1, default=str)


# ------------------------------------------------------------------------------------------------- results
def _slurm_states(job_ids: list[str]) -> dict[str, str]:
    """JobID -> State from sacct (empty when sacct is missing or fails)."""
    ids = [j for j in job_ids if j and j != "None"]
    if not ids or shutil.which("sacct") is None:
        return {}
    try:
        out = subprocess.run(["sacct", "-n", "-X", "-P", "-o", "JobID,State", "-j", ",".join(ids)],
                             capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return {}
    states = {}
    for line in out.stdout.splitlines():
        if "|" in line:
            jid, state = line.split("|", 1)
            states[jid.strip()] = state.split()[0] if state.strip() else "?"
    return states


def point_state(out_dir: str, epochs: int) -> str:
    """From the files of a run: finished | preempted (iteration checkpoint waiting) | running | pending."""
    if os.path.isfile(os.path.join(out_dir, f"checkpoint_{epochs:04d}.pth.tar")):
        return "finished"
    if os.path.isfile(os.path.join(out_dir, LAST_CKPT)):
        return "preempted"
    if any(os.path.isfile(os.path.join(out_dir, f)) for f in ("log.jsonl", "launcher.jsonl")):
        return "running"
    return "pending"


def _fmt(value: Any, digits: int) -> str:
    return "-" if value is None else f"{float(value):.{digits}f}"


def collect(sweep: Sweep | str | os.PathLike, output_root: str | None = None) -> str:
    """One markdown table over all grid points: epochs done, final loss, kNN (if logged), img/s, state, job."""
    from smallssl.logging import read_jsonl

    if not isinstance(sweep, Sweep):
        sweep = load_sweep(sweep)
    root = output_root_of(sweep, output_root)
    points = build_points(sweep, root)
    jobs: dict[str, str] = {}
    cluster = None
    manifest = os.path.join(root, "launch.json")
    if os.path.isfile(manifest):
        with open(manifest) as f:
            m = json.load(f)
        jobs, cluster = {p["name"]: p.get("job_id") for p in m.get("points", [])}, m.get("cluster")
    slurm_states = _slurm_states(list(jobs.values())) if cluster == "slurm" else {}
    rows = ["| point | epochs | loss | kNN | img/s | state | job |", "|---|---|---|---|---|---|---|"]
    for p in points:
        epochs = validate_argv(p.argv).epochs
        log = read_jsonl(os.path.join(p.out_dir, "log.jsonl"))
        last = log[-1] if log else {}
        knn = None
        for rec in reversed(log):
            keys = sorted(k for k in rec if k.lower().startswith("knn"))
            if keys:
                knn = rec[keys[0]]
                break
        state = point_state(p.out_dir, epochs)
        job = jobs.get(p.name) or "-"
        slurm_state = slurm_states.get(str(job))
        if state != "finished" and slurm_state and slurm_state not in ("RUNNING", "PENDING", "REQUEUED"):
            state = f"{state} ({slurm_state})"
        done = f"{last['epoch'] + 1}/{epochs}" if "epoch" in last else f"0/{epochs}"
        rows.append(f"| {p.name} | {done} | {_fmt(last.get('loss'), 4)} | {_fmt(knn, 2)} | "
                    f"{_fmt(last.get('img_per_s'), 1)} | {state} | {job} |")
    return "\n".join(rows)


# ----------------------------------------------------------------------------------------------------- CLI
def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("python -m experiments.launch", description=__doc__.split("\n")[0])
    p.add_argument("sweep", help="sweep file (experiments/sweeps/<name>.py) defining BASE, GRID, SLURM")
    p.add_argument("--cluster", default=None, choices=["slurm", "local", "debug"],
                   help="submitit executor (default: slurm when srun is on PATH, else local)")
    p.add_argument("--dry-run", action="store_true", help="validate and print every point; submit nothing")
    p.add_argument("--collect", action="store_true", help="print a markdown table of the points' results")
    p.add_argument("--output-root", default=None, help="folder of the point folders (default: OUTPUT or runs/NAME)")
    g = p.add_argument_group("slurm (override the sweep's SLURM dict)")
    g.add_argument("--partition", default=None)
    g.add_argument("--nodes", default=None, type=int)
    g.add_argument("--gpus-per-node", default=None, type=int)
    g.add_argument("--tasks-per-node", default=None, type=int, help="processes per node (default: GPUs, or 1)")
    g.add_argument("--cpus-per-task", default=None, type=int)
    g.add_argument("--timeout-min", default=None, type=int)
    g.add_argument("--mem-gb", default=None, type=float)
    return p


def cli(argv: list[str] | None = None) -> int:
    a = get_args_parser().parse_args(argv)
    overrides = {k: getattr(a, k) for k in ("partition", "nodes", "gpus_per_node", "tasks_per_node",
                                             "cpus_per_task", "timeout_min", "mem_gb")}
    try:
        if a.collect:
            print(collect(a.sweep, a.output_root))
            return 0
        jobs = launch(a.sweep, cluster=a.cluster, dry_run=a.dry_run, output_root=a.output_root, slurm=overrides)
    except SweepError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if jobs and a.cluster in ("local", "debug"):  # local jobs die with this process: wait for them
        failed = 0
        for j in jobs:
            try:
                print(f"{j.job_id}: {j.result()}")
            except Exception as e:  # noqa: BLE001 - report every failed point, then exit non-zero
                print(f"{j.job_id} failed: {e}", file=sys.stderr)
                failed += 1
        return 1 if failed else 0
    return 0


if __name__ == "__main__":
    sys.exit(cli())
