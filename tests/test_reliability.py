"""Nothing lost, nothing hung, every error one clear line: main_moco.py under concurrent runs, corrupt checkpoints,
signals, a full or read-only disk, a stopped DDP rank, and bad input."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

from smallssl.checkpoints import CheckpointError, atomic_save, load_checkpoint_file
from smallssl.checkpoints.lock import LockError, RunLock
from smallssl.logging import read_jsonl

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["-a", "resnet18", "--image-size", "16", "-b", "8", "-j", "0", "--moco-k", "32", "--moco-dim", "16",
        "--mlp", "--lr", "0.05", "--no-progress", "--seed", "3"]
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


def cmd(data, ckpt_dir, *extra):
    return [sys.executable, os.path.join(REPO, "main_moco.py"), str(data), *TINY, "--ckpt-dir", str(ckpt_dir),
            *[str(e) for e in extra]]


def run(data, ckpt_dir, *extra, timeout=300):
    return subprocess.run(cmd(data, ckpt_dir, *extra), capture_output=True, text=True, timeout=timeout, cwd=REPO,
                          env=ENV)


def state(path):
    return load_checkpoint_file(str(path))["state_dict"]


def assert_same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def one_error_line(stderr: str) -> str:
    lines = [x for x in stderr.strip().splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in stderr, stderr[-2000:]
    return lines[0]


# ----------------------------------------------------------------------------------------------- the lock
def test_lock_refuses_a_live_holder_and_takes_over_a_dead_one(tmp_path):
    with RunLock(str(tmp_path)) as held:
        assert held.held and json.load(open(tmp_path / ".lock"))["pid"] == os.getpid()
        other = subprocess.run([sys.executable, "-c", "import sys; from smallssl.checkpoints.lock import RunLock; "
                                f"RunLock({str(tmp_path)!r}).acquire()"], capture_output=True, text=True, cwd=REPO)
        assert other.returncode != 0 and "is in use" in other.stderr and f"pid {os.getpid()}" in other.stderr
    assert not (tmp_path / ".lock").exists()  # released
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    import socket

    (tmp_path / ".lock").write_text(json.dumps({"host": socket.gethostname(), "pid": dead.pid, "start_time": 0}))
    lock = RunLock(str(tmp_path)).acquire()
    assert lock.taken_over["pid"] == dead.pid
    lock.release()
    (tmp_path / ".lock").write_text(json.dumps({"host": "elsewhere", "pid": 1, "start_time": 0}))
    with pytest.raises(LockError, match="host 'elsewhere'.*--break-lock"):
        RunLock(str(tmp_path)).acquire()
    assert RunLock(str(tmp_path), force=True).acquire().taken_over["host"] == "elsewhere"


def test_two_runs_on_one_dir_the_second_is_refused(tiny_data, tmp_path):
    first = subprocess.Popen(cmd(tiny_data, tmp_path, "--epochs", "3"), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, cwd=REPO, env=ENV)
    for _ in range(600):  # the lock exists once the first run has started
        if (tmp_path / ".lock").exists() or first.poll() is not None:
            break
        time.sleep(0.1)
    second = run(tiny_data, tmp_path, "--epochs", "3", "--seed", "9")
    out, err = first.communicate(timeout=300)
    assert first.returncode == 0, err[-2000:]
    assert second.returncode == 2 and "is in use" in one_error_line(second.stderr)
    for e in (1, 2, 3):  # every checkpoint is the first run's (seed 3)
        assert load_checkpoint_file(str(tmp_path / f"checkpoint_{e:04d}.pth.tar"))["args"]["seed"] == 3
    assert [r["epoch"] for r in read_jsonl(str(tmp_path / "log.jsonl"))] == [0, 1, 2]
    assert not (tmp_path / ".lock").exists()


# ------------------------------------------------------------------------- verify before trusting a checkpoint
def test_corrupt_newest_checkpoint_falls_back_and_ends_identical(tiny_data, tmp_path):
    assert run(tiny_data, tmp_path / "a", "--epochs", "3").returncode == 0
    r = run(tiny_data, tmp_path / "b", "--epochs", "2")
    assert r.returncode == 0, r.stderr[-2000:]
    newest = tmp_path / "b" / "checkpoint_0002.pth.tar"
    newest.write_bytes(newest.read_bytes()[:1000])  # truncated, as by a full disk or a copy gone wrong
    (tmp_path / "b" / ".tmp_orphan.pth.tar").write_bytes(b"x" * 100)  # a kill during a save
    (tmp_path / "b" / "log.jsonl").open("a").write('{"epoch": 7, "lo')  # a partial last line
    r = run(tiny_data, tmp_path / "b", "--epochs", "3", "--resume", "auto")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "checkpoint_0002.pth.tar" in r.stdout and "moved aside" in r.stdout and "removed 1 orphan" in r.stdout
    assert (tmp_path / "b" / "checkpoint_0002.pth.tar.corrupt").exists()
    assert not (tmp_path / "b" / ".tmp_orphan.pth.tar").exists()
    assert "skipped a malformed line" in r.stderr
    assert_same(state(tmp_path / "a" / "checkpoint_0003.pth.tar"), state(tmp_path / "b" / "checkpoint_0003.pth.tar"))
    assert [x["epoch"] for x in read_jsonl(str(tmp_path / "b" / "log.jsonl"))] == [0, 1, 2]
    # an explicit --resume of a corrupt file is an error naming it, not a fallback
    r = run(tiny_data, tmp_path / "c", "--epochs", "3", "--resume", tmp_path / "b" / "checkpoint_0002.pth.tar.corrupt")
    assert r.returncode == 2 and "checkpoint_0002.pth.tar.corrupt" in one_error_line(r.stderr)


def test_checkpoints_get_the_umask_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        atomic_save({"x": torch.zeros(2)}, str(tmp_path / "c.pth.tar"))
    finally:
        os.umask(old)
    assert (os.stat(tmp_path / "c.pth.tar").st_mode & 0o777) == 0o644


# ------------------------------------------------------------------------------------------------ signals
def test_sigterm_saves_checkpoint_last_and_resume_is_exact(tiny_data, tmp_path):
    assert run(tiny_data, tmp_path / "ref", "--epochs", "4").returncode == 0
    p = subprocess.Popen(cmd(tiny_data, tmp_path / "b", "--epochs", "4"), stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, cwd=REPO, env=ENV)
    for line in p.stdout:  # once epoch 0 is done, the run is inside epoch 1
        if line.startswith("=> epoch 0:"):
            p.send_signal(signal.SIGTERM)
            break
    out, err = p.communicate(timeout=300)
    assert p.returncode == 3, err[-2000:]  # 3: stopped on request, checkpoint_last saved
    last = load_checkpoint_file(str(tmp_path / "b" / "checkpoint_last.pth.tar"))
    assert last["iter"] > 0 and "SIGTERM" in err
    r = run(tiny_data, tmp_path / "b", "--epochs", "4", "--resume", "auto")
    assert r.returncode == 0, r.stderr[-2000:]
    assert_same(state(tmp_path / "ref" / "checkpoint_0004.pth.tar"), state(tmp_path / "b" / "checkpoint_0004.pth.tar"))
    log = read_jsonl(str(tmp_path / "b" / "log.jsonl"))
    assert [x["epoch"] for x in log] == [0, 1, 2, 3]  # exactly one line per epoch
    resumed = [x for x in log if x.get("resumed_at_iter")]
    assert len(resumed) == 1 and resumed[0]["resumed_at_iter"] == last["iter"]
    assert resumed[0]["steps"] == 4 - last["iter"]  # its averages say which steps they cover


# --------------------------------------------------------------------------------------- disks that refuse
def _mount_tmpfs(path, options):
    os.makedirs(path, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({r.stderr.strip() or 'not root'}); CI runs this as root")


def test_disk_full_and_read_only_dir_are_one_clear_line(tiny_data, tmp_path):
    full = tmp_path / "full"
    _mount_tmpfs(full, "size=4m")
    try:
        atomic_save({"x": torch.zeros(1000)}, str(full / "small.pth.tar"))
        with pytest.raises(CheckpointError, match="no space left on device.*intact"):
            atomic_save({"x": torch.zeros(2_000_000)}, str(full / "small.pth.tar"))  # 8 MB into 4 MB
        assert torch.equal(torch.load(full / "small.pth.tar")["x"], torch.zeros(1000))  # previous one intact
        assert os.listdir(full) == ["small.pth.tar"]  # no temp file left
        r = run(tiny_data, full / "run", "--epochs", "1")
        assert r.returncode == 2 and "no space left on device" in one_error_line(r.stderr)
    finally:
        subprocess.run(["umount", str(full)])
    ro = tmp_path / "ro"
    _mount_tmpfs(ro, "ro,size=1m")
    try:
        r = run(tiny_data, ro, "--epochs", "1")
        assert r.returncode == 2 and "read-only file system" in one_error_line(r.stderr)
    finally:
        subprocess.run(["umount", str(ro)])


# ------------------------------------------------------------------------------------------- a stuck rank
def _children(pid):
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(x) for x in f.read().split()]


@pytest.mark.slow
def test_a_stopped_ddp_rank_ends_the_job_naming_it(tiny_data, tmp_path):
    p = subprocess.Popen(cmd(tiny_data, tmp_path, "--epochs", "50", "--multiprocessing-distributed",
                             "--nproc-per-node", "2", "--device", "cpu", "--dist-timeout", "15"),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO, env=ENV)
    stopped = []
    try:
        for line in p.stdout:
            if line.startswith("=> epoch 0:"):
                break
        workers = [c for c in _children(p.pid) if "spawn_main" in open(f"/proc/{c}/cmdline").read()]
        assert len(workers) == 2
        stopped = [workers[1]]  # spawned in rank order: this is rank 1
        os.kill(workers[1], signal.SIGSTOP)
        t0 = time.time()
        out, err = p.communicate(timeout=120)
        took = time.time() - t0
    finally:
        for pid in stopped:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if p.poll() is None:
            p.kill()
    assert p.returncode == 2, err[-3000:]
    m = re.search(r"timed out on rank (\d) after 15 s: rank\(s\) (\d) did not respond", err)
    assert m and {m.group(1), m.group(2)} == {"0", "1"}, err[-3000:]  # the waiting rank names the stopped one
    assert took < 15 + 60  # the timeout, the probe and the shutdown; not forever


# --------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("extra, expected", [
    (["-a", "resnet9000"], "unknown architecture 'resnet9000'"),
    (["--lr", "-0.03"], "--lr must be > 0, got -0.03"),
    (["--resume", "/nonexistent/ckpt.pth.tar"], "--resume '/nonexistent/ckpt.pth.tar'"),
])
def test_main_moco_bad_input_is_one_line_exit_2(tiny_data, tmp_path, extra, expected):
    r = run(tiny_data, tmp_path, "--epochs", "1", *extra)
    assert r.returncode == 2 and expected in one_error_line(r.stderr)


def test_empty_class_folder_and_skipped_images_are_named(tiny_data, tmp_path):
    os.makedirs(os.path.join(tiny_data, "train", "c9_empty"))
    r = run(tiny_data, tmp_path, "--epochs", "1")
    assert r.returncode == 2 and "c9_empty" in one_error_line(r.stderr) and "hold no images" in r.stderr
    os.rmdir(os.path.join(tiny_data, "train", "c9_empty"))
    bad = os.path.join(tiny_data, "train", "c0", "img0.png")
    open(bad, "wb").write(b"not a png")
    r = run(tiny_data, tmp_path / "b", "--epochs", "1", "--batch-aug")
    assert r.returncode == 2 and "img0.png" in one_error_line(r.stderr) and "drop --batch-aug" in r.stderr
    r = run(tiny_data, tmp_path / "c", "--epochs", "1", "--skip-bad-images")
    assert r.returncode == 0 and "skipping unreadable image" in r.stderr and "img0.png" in r.stderr
