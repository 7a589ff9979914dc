"""main_moco.py shows what training learns while it runs: online kNN, collapse warnings, steps.jsonl, curves."""

import json
import os
import subprocess
import sys

import torch

from smallssl.checkpoints import load_checkpoint_file
from smallssl.logging import read_jsonl

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["-a", "resnet18", "--image-size", "16", "-b", "8", "-j", "0", "--no-progress", "--seed", "3"]
MOCO = ["--moco-k", "32", "--moco-dim", "16", "--mlp", "--lr", "0.05"]


def run(data, ckpt_dir, *extra):
    r = subprocess.run([sys.executable, os.path.join(REPO, "main_moco.py"), str(data), *TINY, "--ckpt-dir",
                        str(ckpt_dir), *[str(e) for e in extra]], capture_output=True, text=True, timeout=600,
                       cwd=REPO, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def test_online_knn_is_logged_and_leaves_training_unchanged(tiny_data, tmp_path):
    run(tiny_data, tmp_path / "plain", *MOCO, "--epochs", "2")
    r = run(tiny_data, tmp_path / "knn", *MOCO, "--epochs", "2", "--knn-every", "0.5", "--knn-val-per-class", "2")
    a = load_checkpoint_file(str(tmp_path / "plain" / "checkpoint_0002.pth.tar"))["state_dict"]
    b = load_checkpoint_file(str(tmp_path / "knn" / "checkpoint_0002.pth.tar"))["state_dict"]
    for k in a:  # eval mode, no gradients, every generator restored: the same training, bit for bit
        assert torch.equal(a[k], b[k]), k
    steps = read_jsonl(str(tmp_path / "knn" / "steps.jsonl"))
    knn = [s for s in steps if "knn_top1" in s]
    assert [s["knn_step"] for s in knn] == [0, 2, 4, 6, 8]  # random init, then every half epoch of 4 steps
    assert all(s["knn_bank"] == 32 and s["knn_queries"] == 4 and s["knn_k"] == 20 for s in knn)
    assert all(0 <= s["knn_top1"] <= s["knn_top5"] <= 100 and s["knn_time_s"] > 0 for s in knn)
    epochs = read_jsonl(str(tmp_path / "knn" / "log.jsonl"))
    assert [e["knn_step"] for e in epochs] == [4, 8]  # each epoch line carries its last evaluation (not step 0)
    assert "kNN top-1" in r.stdout
    printed = [s for s in steps if "loss" in s]
    assert all("emb_std" in s and "lr" in s for s in printed)  # diagnostics every print step
    assert [s["step"] for s in printed] == [4, 8]  # after every 10 steps (-p 10) and at each epoch's end (4 steps)


def test_a_collapsing_run_is_flagged_within_100_steps(tiny_data, tmp_path):
    # SimSiam at lr 5: the embeddings fall onto a line within a few steps
    r = run(tiny_data, tmp_path, "--method", "simsiam", "--simsiam-dim", "32", "--simsiam-pred-dim", "8",
            "--simsiam-proj-layers", "2", "--lr", "5", "--epochs", "3", "--print-freq", "1")
    warned = [s for s in read_jsonl(str(tmp_path / "steps.jsonl")) if "collapse_warning" in s]
    assert warned and warned[0]["step"] < 100
    line = [x for x in r.stderr.splitlines() if "collapsing" in x]
    assert len(line) == len(warned) >= 1  # once per episode, not at every print
    assert f"at step {warned[0]['step']}" in line[0] and "lower lr" in line[0]
    rec = warned[0]
    assert rec["emb_rank"] < 0.3 * max(s.get("emb_rank", 0) for s in read_jsonl(str(tmp_path / "steps.jsonl"))) \
        or rec["emb_std"] < 0.05 * rec["emb_std_ref"]


def test_curves_png_is_written_beside_the_checkpoints(tiny_data, tmp_path):
    import pytest

    pytest.importorskip("matplotlib")
    run(tiny_data, tmp_path, *MOCO, "--epochs", "1", "--print-freq", "1")
    png = tmp_path / "curves.png"
    assert png.exists() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((tmp_path / "steps.jsonl").read_text().splitlines()[0])["step"] == 1
