"""experiments.launch: grid expansion, naming and validation (fast), and sweeps on a real local Slurm.

The `slurm` tests start a one-node Slurm with scripts/slurm_local.sh (root + apt; skipped with the reason
otherwise, or failed when SMALLSSL_REQUIRE_SLURM=1) and submit every job up front so that they share the
two CPU cores: a 2-point grid of tiny MoCo runs, and a pair of identical 2-task DDP (gloo) runs, one of
which gets `scancel --signal=USR2` mid-training, is requeued and must end with bit-identical weights.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from experiments import launch as L
from experiments import sweep as S

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "slurm_local.sh"
TINY = REPO / "experiments" / "sweeps" / "tiny_moco.py"
IMPROVED = REPO / "experiments" / "sweeps" / "improved_baseline.py"


def _write_sweep(path: Path, base: list[str], grid: dict, slurm: dict | None = None) -> Path:
    path.write_text(f"BASE = {base!r}\nGRID = {grid!r}\nSLURM = {slurm or {}!r}\n")
    return path


# ------------------------------------------------------------------------------------------------ fast tests
def test_expand_grid_is_the_ordered_cartesian_product():
    pts = S.expand_grid({"-a": ["resnet18", "deit_tiny"], "--lr": [0.1, 0.2, 0.3]})
    assert len(pts) == 6
    assert pts[0] == {"-a": "resnet18", "--lr": 0.1}
    assert pts[1] == {"-a": "resnet18", "--lr": 0.2}  # last flag varies fastest
    assert pts[5] == {"-a": "deit_tiny", "--lr": 0.3}
    assert S.expand_grid({}) == [{}]
    with pytest.raises(S.SweepError, match="lr"):
        S.expand_grid({"lr": [1]})  # not a flag
    with pytest.raises(S.SweepError, match="non-empty list"):
        S.expand_grid({"--lr": []})


def test_flag_argv_and_point_names():
    assert S.flag_argv("--cos", True) == ["--cos"]
    assert S.flag_argv("--cos", False) == [] and S.flag_argv("--gpu", None) == []
    assert S.flag_argv("--schedule", [120, 160]) == ["--schedule", "120", "160"]
    assert S.flag_argv("--lr", 0.03) == ["--lr", "0.03"]
    assert S.point_name({"-a": "resnet18", "--lr": 0.03}) == "a=resnet18,lr=0.03"
    assert S.point_name({"--cos": True, "--aug-plus": False}) == "cos=on,aug-plus=off"
    assert S.point_name({"--schedule": [120, 160]}) == "schedule=120-160"
    assert S.point_name({"--resume": "/a b/c.pth"}) == "resume=_a_b_c.pth"
    assert S.point_name({}) == "base"


def test_build_points_argv_parses_to_the_overrides(tmp_path):
    sweep = S.Sweep("s", ["DATA", "-a", "resnet18", "--lr", "0.5"], {"--lr": [0.1, 0.2], "--cos": [True, False]})
    points = S.build_points(sweep, tmp_path)
    assert [p.name for p in points] == ["lr=0.1,cos=on", "lr=0.1,cos=off", "lr=0.2,cos=on", "lr=0.2,cos=off"]
    for p in points:
        args = S.validate_argv(p.argv)
        assert args.lr == p.overrides["--lr"]  # the grid value wins over BASE
        assert args.cos is p.overrides["--cos"]
        assert args.ckpt_dir == str(tmp_path / p.name) == p.out_dir


@pytest.mark.parametrize("base,grid,needle", [
    (["DATA"], {"--not-a-flag": [1]}, "--not-a-flag"),
    (["DATA", "--bogus-option", "3"], {}, "--bogus-option"),
    (["DATA"], {"--lr": ["fast"]}, "--lr"),  # bad value, named by argparse
    (["DATA"], {"--method": ["nope"]}, "--method"),
    (["DATA", "--ckpt-dir", "x"], {}, "--ckpt-dir"),  # the launcher owns it
])
def test_invalid_points_are_rejected_with_the_flag_named(tmp_path, base, grid, needle):
    with pytest.raises(S.SweepError, match=needle):
        S.build_points(S.Sweep("bad", base, grid), tmp_path)


def test_bad_sweep_fails_before_any_submission(tmp_path, monkeypatch, capsys):
    import submitit

    def no_executor(*a, **k):
        raise AssertionError("an executor was created: something would have been submitted")

    monkeypatch.setattr(submitit, "AutoExecutor", no_executor)
    sweep = _write_sweep(tmp_path / "bad.py", ["DATA", "--epochs", "1"], {"--lr": [0.1], "--warp-speed": [9]})
    root = tmp_path / "out"
    rc = L.cli([str(sweep), "--cluster", "slurm", "--output-root", str(root)])
    assert rc == 2
    err = capsys.readouterr().err
    assert "--warp-speed" in err and "unknown flag" in err
    assert not root.exists()  # no submitit folder, no manifest
    # the first point is valid; the error names the point that is not
    assert "warp-speed=9" in err


def test_bad_sweep_from_the_command_line(tmp_path):
    sweep = _write_sweep(tmp_path / "bad.py", ["DATA"], {"--moco-kk": [64]})
    r = subprocess.run([sys.executable, "-m", "experiments.launch", str(sweep), "--output-root", str(tmp_path / "o")],
                       cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr
    assert "--moco-kk" in r.stderr
    assert not (tmp_path / "o").exists()


def test_executor_parameters_merge_and_tasks_per_gpu():
    sweep = S.Sweep("s", ["DATA"], {}, {"gpus_per_node": 4, "timeout_min": 30, "partition": "a100"})
    p = L.executor_parameters(sweep, {"nodes": 2, "timeout_min": None})
    assert p["gpus_per_node"] == 4 and p["tasks_per_node"] == 4  # one process per GPU
    assert p["nodes"] == 2 and p["timeout_min"] == 30 and p["slurm_partition"] == "a100"
    assert L.executor_parameters(S.Sweep("c", ["DATA"]), {"tasks_per_node": 2})["tasks_per_node"] == 2
    assert L.executor_parameters(S.Sweep("c", ["DATA"]))["tasks_per_node"] == 1
    with pytest.raises(S.SweepError, match="gpus"):
        L.executor_parameters(S.Sweep("s", ["DATA"], {}, {"gpus": 8}))


def test_resume_args_auto_and_first_start_restart(tmp_path):
    out = tmp_path / "run"
    job = L.SweepJob(["DATA", "--ckpt-dir", str(out)])
    assert job.resume_args().resume == "auto"
    seed_ckpt = str(tmp_path / "seed.pth.tar")
    job = L.SweepJob(["DATA", "--resume", seed_ckpt, "--restart", "--ckpt-dir", str(out)])
    a = job.resume_args()
    assert (a.resume, a.restart) == (seed_ckpt, True)  # first start: restart from the given weights
    out.mkdir()
    (out / "checkpoint_last.pth.tar").write_bytes(b"")
    a = job.resume_args()
    assert (a.resume, a.restart) == ("auto", False)  # requeued: resume this run exactly


def test_checkpoint_only_requests_a_stop_and_resubmits_the_same_point(tmp_path):
    from smallssl import preempt

    preempt.clear()
    job = L.SweepJob(["DATA", "--ckpt-dir", str(tmp_path / "run")], "p", threads=3)
    delayed = job.checkpoint()
    try:
        assert preempt.stop_requested()  # the training loop saves at its next step boundary
    finally:
        preempt.clear()
    new = delayed.function
    assert isinstance(new, L.SweepJob) and (new.argv, new.name, new.threads) == (job.argv, "p", 3)
    assert not (tmp_path / "run").exists()  # nothing saved inside the signal handler


def test_requeue_hands_over_to_submitit_on_rank0_only():
    from submitit.core.job_environment import SignalHandler

    class FakeHandler(SignalHandler):  # records instead of checkpoint + scontrol requeue + exit
        def __init__(self):
            self.calls = []

        def checkpoint_and_try_requeue(self, signum, frame=None):
            self.calls.append(signum)

    job = L.SweepJob(["DATA"], rank_wait_s=0.0)
    h0, h1 = FakeHandler(), FakeHandler()
    job._requeue(h0.checkpoint_and_try_requeue, rank=0)
    job._requeue(h1.checkpoint_and_try_requeue, rank=1)
    other = []
    job._requeue(lambda signum, frame: other.append(signum), rank=0)  # someone else's handler: not called
    job._requeue(L.signal.SIG_DFL, rank=0)
    assert (h0.calls, h1.calls, other) == ([L.signal.SIGUSR2], [], [])


def test_collect_table_from_logs(tmp_path, capsys):
    sweep = _write_sweep(tmp_path / "s.py", ["DATA", "--epochs", "2"], {"--lr": [0.1, 0.2, 0.3]})
    root = tmp_path / "out"
    done, preempted = root / "lr=0.1", root / "lr=0.2"
    for d in (done, preempted):
        d.mkdir(parents=True)
    (done / "log.jsonl").write_text(json.dumps({"epoch": 0, "loss": 5.0, "img_per_s": 10.0}) + "\n"
                                    + json.dumps({"epoch": 1, "loss": 4.25, "img_per_s": 12.5, "knn_top1": 61.5}))
    (done / "checkpoint_0002.pth.tar").write_bytes(b"")
    (preempted / "log.jsonl").write_text(json.dumps({"epoch": 0, "loss": 6.125, "img_per_s": 3.0}) + "\n")
    (preempted / "checkpoint_last.pth.tar").write_bytes(b"")
    assert L.cli([str(sweep), "--collect", "--output-root", str(root)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0] == "| point | epochs | loss | kNN | img/s | state | job |"
    assert lines[2] == "| lr=0.1 | 2/2 | 4.2500 | 61.50 | 12.5 | finished | - |"
    assert lines[3] == "| lr=0.2 | 1/2 | 6.1250 | - | 3.0 | preempted | - |"
    assert lines[4] == "| lr=0.3 | 0/2 | - | - | - | pending | - |"


def test_sweep_files_dry_run(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SMALLSSL_TINY_DATA", str(tmp_path / "tiny"))
    assert L.launch(TINY, dry_run=True, output_root=str(tmp_path / "o")) == []
    out = capsys.readouterr().out
    assert "moco-t=0.07:" in out and "moco-t=0.2:" in out
    assert len(list((tmp_path / "tiny" / "train").glob("*/*.png"))) == 32
    sweep = S.load_sweep(IMPROVED)
    points = S.build_points(sweep, tmp_path / "ib")
    archs = [S.validate_argv(p.argv).arch for p in points]
    assert archs == ["resnet18", "mobilenetv3_large", "mobilenetv3_small", "efficientnet_b0", "deit_tiny"]
    a = S.validate_argv(points[0].argv)
    # ssl-small's improved baseline (the paper's command, architecture aside)
    assert (a.lr, a.batch_size, a.epochs, a.mlp, a.moco_t, a.moco_k) == (0.06, 512, 800, "wide", 0.1, 65536)
    assert (a.aug_plus, a.cj, a.grey_scale, a.gaussian_blur, a.cos) == (True, 1.0, 0.5, 0.5, True)
    params = L.executor_parameters(sweep)
    assert params["tasks_per_node"] == params["gpus_per_node"] == 8


# ------------------------------------------------------------------------------------------ real Slurm tests
def _skip_or_fail(reason: str):
    if os.environ.get("SMALLSSL_REQUIRE_SLURM") == "1":
        pytest.fail(f"SMALLSSL_REQUIRE_SLURM=1 but {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def local_slurm():
    """A running one-node Slurm (scripts/slurm_local.sh); stopped at the end if this session started it."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        _skip_or_fail("the local Slurm needs root (scripts/slurm_local.sh installs packages and runs daemons)")
    if shutil.which("sbatch") is None and shutil.which("apt-get") is None:
        _skip_or_fail("Slurm is not installed and there is no apt-get to install it")
    state = os.environ.get("SMALLSSL_SLURM_DIR", "/tmp/smallssl-slurm")
    was_running = subprocess.run(["bash", str(SCRIPT), "status"], capture_output=True).returncode == 0
    try:
        r = subprocess.run(["bash", str(SCRIPT), "start"], capture_output=True, text=True, timeout=900)
    except subprocess.TimeoutExpired:
        _skip_or_fail("scripts/slurm_local.sh start took more than 15 minutes")
    if r.returncode != 0:
        _skip_or_fail(f"scripts/slurm_local.sh start failed: {(r.stdout + r.stderr).strip()[-600:]}")
    old_conf = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = os.path.join(state, "etc", "slurm.conf")
    yield state
    if not was_running:
        subprocess.run(["bash", str(SCRIPT), "stop"], capture_output=True, timeout=120)
    if old_conf is None:
        os.environ.pop("SLURM_CONF", None)
    else:
        os.environ["SLURM_CONF"] = old_conf


@pytest.fixture(scope="module")
def slurm_jobs(local_slurm, tmp_path_factory, monkeypatch_module):
    """Submit every Slurm test's jobs at once (each sweep with its own output root and submitit folder)."""
    tmp = tmp_path_factory.mktemp("slurm")
    monkeypatch_module.setenv("SMALLSSL_TINY_DATA", str(tmp / "tiny"))
    tiny = S.load_sweep(TINY)  # creates the 2 x 16 synthetic 16x16 PNGs
    jobs = {}
    # a pair of identical 3-epoch 2-task DDP runs (print-freq changes nothing); the second one gets USR2
    base = [a for a in tiny.base] + ["--epochs", "3"]
    pair = S.Sweep("requeue", base, {"--print-freq": [100, 101]}, {**tiny.slurm, "tasks_per_node": 2})
    jobs["requeue"] = (tmp / "requeue", L.launch(pair, cluster="slurm", output_root=str(tmp / "requeue")))
    jobs["grid"] = (tmp / "grid", L.launch(tiny, cluster="slurm", output_root=str(tmp / "grid")))
    yield jobs
    for _, js in jobs.values():  # a failed test leaves no job behind (finished ones are left to end by themselves)
        for j in js:
            if not j.paths.result_pickle.exists() and not j.done():
                j.cancel(check=False)


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


def _state_dict(path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)["state_dict"]


@pytest.mark.slurm
def test_usr2_requeues_and_resumes_to_identical_weights(slurm_jobs):
    root, (ref, victim) = slurm_jobs["requeue"]
    marker = root / "print-freq=101" / "launcher.jsonl"  # a line per rank once its USR2 handler is installed
    deadline = time.time() + 180
    while not marker.exists() or len(marker.read_text().splitlines()) < 2:
        assert time.time() < deadline, "the job never started"
        assert not victim.done(), victim.stderr()
        time.sleep(0.05)
    subprocess.run(["scancel", "--signal=USR2", str(victim.job_id)], check=True, timeout=60)
    r_ref, r_victim = ref.results(), victim.results()  # one result per task
    assert [r["status"] for r in r_ref + r_victim] == ["finished"] * 4
    assert [r["restart_count"] for r in r_ref] == [0, 0]
    assert [r["restart_count"] for r in r_victim] == [1, 1], f"not requeued (signal too late?):\n{victim.stdout()}"
    starts = [json.loads(x) for x in marker.read_text().splitlines()]
    assert sorted((s["restart_count"], s["rank"]) for s in starts) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    out = victim.stdout()
    assert "stop requested: saved" in out and "=> resumed" in out and "checkpoint_last.pth.tar" in out
    a = _state_dict(root / "print-freq=100" / "checkpoint_0003.pth.tar")
    b = _state_dict(root / "print-freq=101" / "checkpoint_0003.pth.tar")
    assert a.keys() == b.keys() and "module.queue" in a
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, f"{len(differ)} tensors differ after requeue, e.g. {differ[:3]}"
    assert not (root / "print-freq=101" / "checkpoint_last.pth.tar").exists()  # removed at the next epoch end


@pytest.mark.slurm
def test_grid_of_two_finishes_and_collect_shows_both(slurm_jobs, capsys):
    root, jobs = slurm_jobs["grid"]
    results = [j.result() for j in jobs]
    assert len({j.job_id.split("_")[0] for j in jobs}) == 1  # one job array
    assert [r["status"] for r in results] == ["finished", "finished"]
    assert [r["point"] for r in results] == ["moco-t=0.07", "moco-t=0.2"]
    args = [S.validate_argv(p["argv"]) for p in json.loads((root / "launch.json").read_text())["points"]]
    assert [a.moco_t for a in args] == [0.07, 0.2]
    capsys.readouterr()
    assert L.cli([str(TINY), "--collect", "--output-root", str(root)]) == 0
    table = capsys.readouterr().out
    for r, j in zip(results, jobs):
        last = json.loads((root / r["point"] / "log.jsonl").read_text().splitlines()[-1])
        assert last["loss"] == pytest.approx(r["loss"])
        row = next(line for line in table.splitlines() if line.startswith(f"| {r['point']} |"))
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[1] == "2/2" and cells[2] == f"{last['loss']:.4f}" and cells[4] == f"{last['img_per_s']:.1f}"
        assert cells[5] == "finished" and cells[6] == j.job_id


@pytest.mark.slurm
def test_two_task_job_trains_with_ddp_and_ranks_agree(slurm_jobs):
    root, jobs = slurm_jobs["requeue"]  # both jobs of the requeue pair are 2-task DDP jobs
    for job, name in zip(jobs, ["print-freq=100", "print-freq=101"]):
        results = job.results()  # one per task
        assert [r["rank"] for r in results] == [0, 1]
        assert all(r["world_size"] == 2 and r["status"] == "finished" and r["epoch"] == 3 for r in results)
        log = [json.loads(x) for x in (root / name / "log.jsonl").read_text().splitlines()]
        assert [rec["epoch"] for rec in log] == [0, 1, 2]
        # all-gathered parameter and queue sums are equal on both ranks after every epoch (main_moco checks)
        assert all(rec["replicas_in_sync"] is True for rec in log)
        assert [rec["step"] for rec in log] == [4, 8, 12]  # 32 images / (4 per rank x 2 ranks)
        ckpt = torch.load(root / name / "checkpoint_0003.pth.tar", map_location="cpu", weights_only=False)
        assert ckpt["step"] == 12 and int(ckpt["state_dict"]["module.queue_ptr"]) == (12 * 8) % 64
