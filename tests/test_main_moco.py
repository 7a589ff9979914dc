"""main_moco.py end to end on tiny data: schema, exact resume, preemption, restart, DDP, bad inputs."""

import json
import os
import subprocess
import sys

import pytest
import torch

import main_moco
from smallssl import preempt
from smallssl.checkpoints import load_checkpoint_file
from smallssl.data.cache import dataset_available, prepare_dataset

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["-a", "resnet18", "--image-size", "16", "-b", "8", "-j", "0", "--moco-k", "32", "--moco-dim", "16",
        "--mlp", "--lr", "0.05", "--no-progress", "--seed", "3"]


def run(argv):
    return main_moco.cli([str(a) for a in argv])


def weights(path):
    return {k: v for k, v in load_checkpoint_file(path)["state_dict"].items()}


def assert_same_state(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_two_epochs_equal_one_plus_resume(tiny_data, tmp_path):
    # step schedule (lr constant here): a 1-epoch run is the first half of a 2-epoch run
    assert run([tiny_data, *TINY, "--epochs", "2", "--ckpt-dir", tmp_path / "a"]) == 0
    assert run([tiny_data, *TINY, "--epochs", "1", "--ckpt-dir", tmp_path / "b"]) == 0
    assert run([tiny_data, *TINY, "--epochs", "2", "--ckpt-dir", tmp_path / "b",
                "--resume", tmp_path / "b" / "checkpoint_0001.pth.tar"]) == 0
    a, b = weights(tmp_path / "a" / "checkpoint_0002.pth.tar"), weights(tmp_path / "b" / "checkpoint_0002.pth.tar")
    assert_same_state(a, b)
    # MoCo schema
    ckpt = load_checkpoint_file(tmp_path / "a" / "checkpoint_0002.pth.tar")
    assert ckpt["epoch"] == 2 and ckpt["arch"] == "resnet18" and "optimizer" in ckpt
    for key in ("module.encoder_q.conv1.weight", "module.encoder_q.fc.0.weight", "module.encoder_k.conv1.weight",
                "module.queue", "module.queue_ptr"):  # MoCo's own names (smallssl.checkpoints.native)
        assert key in ckpt["state_dict"]
    assert ckpt["layout"] == "moco" and ckpt["state_dict"]["module.queue"].shape == (16, 32)  # (dim, K)
    # 32 images / batch 8 = 4 steps per epoch, 8 keys each: pointer at (8 * 8) % 32 = 0; log has 2 lines
    assert int(ckpt["state_dict"]["module.queue_ptr"]) == 0
    lines = [json.loads(x) for x in open(tmp_path / "a" / "log.jsonl")]
    assert [x["epoch"] for x in lines] == [0, 1] and all("img_per_s" in x and "acc1" in x for x in lines)
    assert json.loads(open(tmp_path / "a" / "run.json").readline())["git_sha"]


def test_preemption_mid_epoch_resumes_exactly(tiny_data, tmp_path, monkeypatch):
    assert run([tiny_data, *TINY, "--epochs", "2", "--cos", "--ckpt-dir", tmp_path / "a"]) == 0
    calls = {"n": 0}

    def stop_at_third_step():
        calls["n"] += 1
        return calls["n"] == 6  # epoch 1, after iteration 1
    monkeypatch.setattr(preempt, "stop_requested", stop_at_third_step)
    args = main_moco.get_args_parser().parse_args([tiny_data, *TINY, "--epochs", "2", "--cos", "--ckpt-dir",
                                                    str(tmp_path / "b")])
    out = main_moco.main(args)
    assert out["status"] == "preempted" and out["epoch"] == 1 and out["iter"] == 2
    monkeypatch.setattr(preempt, "stop_requested", lambda: False)
    assert run([tiny_data, *TINY, "--epochs", "2", "--cos", "--ckpt-dir", tmp_path / "b", "--resume", "auto"]) == 0
    assert not os.path.exists(tmp_path / "b" / "checkpoint_last.pth.tar")
    assert_same_state(weights(tmp_path / "a" / "checkpoint_0002.pth.tar"),
                      weights(tmp_path / "b" / "checkpoint_0002.pth.tar"))


def test_batch_aug_resumes_exactly_mid_epoch(tiny_data, tmp_path, monkeypatch):
    """--batch-aug (in-memory images, batched augmentation): preempted + --resume auto == uninterrupted."""
    monkeypatch.setenv("SMALLSSL_CACHE", str(tmp_path / "cache"))
    argv = [tiny_data, *TINY, "--epochs", "2", "--cos", "--batch-aug", "--aug-plus"]
    assert run([*argv, "--ckpt-dir", tmp_path / "a"]) == 0
    assert len(os.listdir(tmp_path / "cache" / "mem")) == 1  # decoded once, cached outside the data dir
    calls = {"n": 0}

    def stop_at_sixth_step():
        calls["n"] += 1
        return calls["n"] == 6
    monkeypatch.setattr(preempt, "stop_requested", stop_at_sixth_step)
    out = main_moco.main(main_moco.get_args_parser().parse_args([str(a) for a in argv]
                                                                + ["--ckpt-dir", str(tmp_path / "b")]))
    assert out["status"] == "preempted" and out["epoch"] == 1
    monkeypatch.setattr(preempt, "stop_requested", lambda: False)
    assert run([*argv, "--ckpt-dir", tmp_path / "b", "--resume", "auto"]) == 0
    a = weights(tmp_path / "a" / "checkpoint_0002.pth.tar")
    assert_same_state(a, weights(tmp_path / "b" / "checkpoint_0002.pth.tar"))
    # and it trained on other views than the PIL pipeline with the same seed
    assert run([tiny_data, *TINY, "--epochs", "2", "--cos", "--aug-plus", "--ckpt-dir", tmp_path / "c"]) == 0
    c = weights(tmp_path / "c" / "checkpoint_0002.pth.tar")
    assert not torch.equal(a["module.encoder_q.conv1.weight"], c["module.encoder_q.conv1.weight"])


def test_mid_epoch_resume_with_another_batch_is_refused(tiny_data, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(preempt, "stop_requested", lambda: True)  # stop after the first iteration
    args = main_moco.get_args_parser().parse_args([tiny_data, *TINY, "--epochs", "1", "--ckpt-dir", str(tmp_path)])
    assert main_moco.main(args)["status"] == "preempted"
    monkeypatch.setattr(preempt, "stop_requested", lambda: False)
    argv = [tiny_data, *TINY, "--epochs", "1", "--ckpt-dir", tmp_path, "--resume", "auto"]
    argv[argv.index("-b") + 1] = "4"
    assert run(argv) == 2
    assert "stopped inside an epoch with global batch 8 over 32 images; this run has 4" in capsys.readouterr().err


def test_resume_from_an_older_checkpoint_does_not_duplicate_log_lines(tiny_data, tmp_path):
    assert run([tiny_data, *TINY, "--epochs", "2", "--ckpt-dir", tmp_path]) == 0
    assert run([tiny_data, *TINY, "--epochs", "2", "--ckpt-dir", tmp_path,
                "--resume", tmp_path / "checkpoint_0001.pth.tar"]) == 0
    assert [json.loads(x)["epoch"] for x in open(tmp_path / "log.jsonl")] == [0, 1]


def test_keep_last_and_atomic(tiny_data, tmp_path):
    assert run([tiny_data, *TINY, "--epochs", "3", "--keep-last", "2", "--ckpt-dir", tmp_path]) == 0
    names = sorted(os.listdir(tmp_path))
    assert [n for n in names if n.startswith("checkpoint")] == ["checkpoint_0002.pth.tar", "checkpoint_0003.pth.tar"]
    assert not [n for n in names if n.startswith(".tmp")]


def test_restart_from_official_layout_reports_and_copies(tiny_data, tmp_path, capsys):
    from smallssl.backbones import create_backbone
    torch.manual_seed(0)
    bb = create_backbone("resnet18", small_input=True)
    state = {f"module.encoder_q.{k}": v for k, v in bb.state_dict().items()}
    state["module.encoder_q.fc.0.weight"] = torch.randn(7, 512)  # head of another width: dropped
    state["module.queue"] = torch.randn(16, 32)  # official (dim, K) layout: transposed on load
    torch.save({"state_dict": state, "epoch": 800, "arch": "resnet18"}, tmp_path / "official.pth.tar")
    assert run([tiny_data, *TINY, "--epochs", "1", "--ckpt-dir", tmp_path / "r",
                "--resume", tmp_path / "official.pth.tar", "--restart"]) == 0
    out = capsys.readouterr().out
    assert "loaded 120 tensors" in out and "missing 0, shape-mismatched 0" in out
    assert "prefix 'module.encoder_q.'" in out and "projection head NOT loaded" in out  # fc.0 of another width
    assert "['queue']" in out and "copied from the query encoder" in out
    ckpt = load_checkpoint_file(tmp_path / "r" / "checkpoint_0001.pth.tar")
    assert ckpt["epoch"] == 1  # restarted at epoch 0, one epoch trained


def test_restart_wrong_arch_is_an_error(tiny_data, tmp_path, capsys):
    from smallssl.backbones import create_backbone
    bb = create_backbone("resnet34", small_input=True)
    torch.save({"state_dict": {f"module.encoder_q.{k}": v for k, v in bb.state_dict().items()}},
               tmp_path / "r34.pth.tar")
    assert run([tiny_data, *TINY, "--epochs", "1", "--ckpt-dir", tmp_path / "x",
                "--resume", tmp_path / "r34.pth.tar", "--restart"]) == 2
    err = capsys.readouterr().err
    assert "does not fit this model" in err and "-a/--arch" in err


def test_resume_wrong_arch_is_an_error(tiny_data, tmp_path, capsys):
    assert run([tiny_data, *TINY, "--epochs", "1", "--ckpt-dir", tmp_path]) == 0
    argv = [a if a != "resnet18" else "resnet34" for a in TINY]
    assert run([tiny_data, *argv, "--epochs", "2", "--ckpt-dir", tmp_path,
                "--resume", tmp_path / "checkpoint_0001.pth.tar"]) == 2
    assert "was trained with -a resnet18" in capsys.readouterr().err


@pytest.mark.parametrize("case, expect", [
    ("missing_data", "does not exist"),
    ("unknown_arch", "unknown architecture 'resnet19'"),
    ("moco_k", "--moco-k 30 is not a multiple of the global batch size 8"),
    ("missing_resume", "no such checkpoint"),
    ("corrupt_image", "cannot read image"),
    ("print_freq", "--print-freq must be >= 1, got 0"),
    ("batch_aug_corrupt", "cannot read image"),
    ("batch_aug_swav", "--batch-aug supports the two-view methods"),
])
def test_bad_inputs_fail_with_one_clear_message(tiny_data, tmp_path, capsys, case, expect):
    argv = [tiny_data, *TINY, "--epochs", "1", "--ckpt-dir", str(tmp_path / "c")]
    if case == "missing_data":
        argv[0] = str(tmp_path / "nope")
    elif case == "unknown_arch":
        argv[argv.index("resnet18")] = "resnet19"
    elif case == "moco_k":
        argv[argv.index("32")] = "30"
    elif case == "missing_resume":
        argv += ["--resume", str(tmp_path / "nope.pth.tar")]
    elif case == "print_freq":
        argv += ["--print-freq", "0"]
    elif case == "batch_aug_swav":
        argv += ["--batch-aug", "--method", "swav"]
    if case in ("corrupt_image", "batch_aug_corrupt"):
        argv += ["--batch-aug"] if case == "batch_aug_corrupt" else []
        with open(os.path.join(tiny_data, "train", "c0", "img0.png"), "wb") as f:
            f.write(b"not a png")
    assert run(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and expect in err and "Traceback" not in err


def test_skip_bad_images_counts_them(tiny_data, tmp_path):
    with open(os.path.join(tiny_data, "train", "c1", "img3.png"), "wb") as f:
        f.write(b"\x89PNG truncated")
    assert run([tiny_data, *TINY, "--epochs", "1", "--skip-bad-images", "--ckpt-dir", tmp_path]) == 0
    (line,) = [json.loads(x) for x in open(tmp_path / "log.jsonl")]
    assert line["skipped_images"] == 1


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tiny_data, tmp_path, monkeypatch, capsys):
    assert run([tiny_data, *TINY, "--epochs", "1", "--ckpt-dir", tmp_path]) == 0
    good = weights(tmp_path / "checkpoint_0001.pth.tar")
    from smallssl.methods.moco import MoCo
    orig = MoCo.forward

    def nan_forward(self, views):
        out = orig(self, views)
        return dict(out, loss=out["loss"] * float("nan"))
    monkeypatch.setattr(MoCo, "forward", nan_forward)
    assert run([tiny_data, *TINY, "--epochs", "2", "--ckpt-dir", tmp_path, "--resume", "auto"]) == 2
    err = capsys.readouterr().err
    assert "loss is nan (on rank 0 or another) at epoch 1, iteration 0 (global step 4)" in err
    assert "checkpoint_0001" in err
    assert_same_state(good, weights(tmp_path / "checkpoint_0001.pth.tar"))
    assert not os.path.exists(tmp_path / "checkpoint_0002.pth.tar")


def test_ddp_two_processes_gloo(tiny_data, tmp_path):
    """Two CPU processes: both finish, keys are all-gathered (pointer moves by the global batch), replicas agree."""
    cmd = [sys.executable, os.path.join(REPO, "main_moco.py"), tiny_data, *TINY, "--epochs", "1",
           "--multiprocessing-distributed", "--nproc-per-node", "2", "--world-size", "1", "--rank", "0",
           "--dist-url", "env://", "--ckpt-dir", str(tmp_path)]
    cmd[cmd.index("--moco-k") + 1] = "48"  # global batch 8 (2 x 4): 4 steps/epoch... 32 images / 8 = 4 steps
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stderr[-3000:]
    ckpt = load_checkpoint_file(tmp_path / "checkpoint_0001.pth.tar")
    assert int(ckpt["state_dict"]["module.queue_ptr"]) == (4 * 8) % 48  # 4 steps x 8 gathered keys
    (line,) = [json.loads(x) for x in open(tmp_path / "log.jsonl")]
    assert line["replicas_in_sync"] is True


@pytest.mark.skipif(not dataset_available("cifar10"), reason="../shared/data/cifar10.tar.gz not present")
def test_seed004_command_shrunk_on_cifar10(tmp_path):
    """ssl-small's improved-baseline command, shrunk only in epochs/batch/queue/-j and --image-size 32."""
    data = prepare_dataset("cifar10")
    # a "distilled" checkpoint to restart from, as the command expects
    assert run([data, "-a", "mobilenetv3_small", "--image-size", "32", "-b", "16", "-j", "0", "--epochs", "1",
                "--moco-k", "64", "--subset", "64", "--no-progress", "--ckpt-dir", tmp_path / "pre"]) == 0
    cmd = [sys.executable, os.path.join(REPO, "main_moco.py"), data,
           "-a", "mobilenetv3_small", "--lr", "0.06", "--batch-size", "16", "-j", "1", "--epochs", "1",
           "--dist-url", "env://", "--multiprocessing-distributed", "--world-size", "1", "--rank", "0",
           "--mlp", "wide", "--moco-t", "0.1", "--moco-k", "64",
           "--aug-plus", "--cj", "1.", "--grey-scale", "0.5", "--gaussian-blur", "0.5", "--cos",
           "--ckpt-dir", str(tmp_path / "run"), "--resume", str(tmp_path / "pre" / "checkpoint_0001.pth.tar"),
           "--restart", "--image-size", "32", "--subset", "96", "--no-progress"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "restarting from" in r.stdout
    ckpt = load_checkpoint_file(tmp_path / "run" / "checkpoint_0001.pth.tar")
    assert ckpt["arch"] == "mobilenetv3_small" and ckpt["epoch"] == 1
    assert any(k.startswith("module.encoder_q.") for k in ckpt["state_dict"])
    assert any(k.startswith("module.encoder_k.") for k in ckpt["state_dict"])
    assert ckpt["state_dict"]["module.queue"].shape == (128, 64)  # MoCo's (dim, K)


def test_torchrun_two_processes(tiny_data, tmp_path):
    """torchrun sets RANK/WORLD_SIZE/LOCAL_WORLD_SIZE: -b is per node and split over its 2 processes."""
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    cmd = [sys.executable, torchrun, "--standalone", "--nproc_per_node", "2",
           os.path.join(REPO, "main_moco.py"), tiny_data, *TINY, "--epochs", "1", "--ckpt-dir", str(tmp_path)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "batch 4 x 2 process(es)" in r.stdout
    ckpt = load_checkpoint_file(tmp_path / "checkpoint_0001.pth.tar")
    assert int(ckpt["state_dict"]["module.queue_ptr"]) == 0  # 4 steps x 8 keys = 32 = K
