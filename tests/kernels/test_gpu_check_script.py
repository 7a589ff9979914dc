"""``scripts/gpu_check.sh --cpu-dry-run``: every part of the prepared device script runs on the CPU at tiny sizes
(same commands, same report code), so it is known to work before a GPU ever runs it."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PARTS = ["env", "gpu_tests", "kernels_bench", "roofline", "aot_device", "train_resnet18", "train_mobilenet",
         "moco_batch_aug", "swav_fsdp"]


@pytest.mark.slow
def test_gpu_check_cpu_dry_run(tmp_path):
    pytest.importorskip("triton")
    env = dict(os.environ, PYTHON=sys.executable, OMP_NUM_THREADS="1")
    env.pop("OUT", None)
    proc = subprocess.run(["bash", str(REPO / "scripts" / "gpu_check.sh"), "--cpu-dry-run", "--out", str(tmp_path)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=1800)
    results = json.loads((tmp_path / "results.json").read_text())
    failed = {k: v["log_tail"][-1500:] for k, v in results["parts"].items() if not v["ok"]}
    assert proc.returncode == 0 and not failed, (proc.stdout[-2000:], proc.stderr[-2000:], failed)
    assert list(results["parts"]) == PARTS and results["dry_run"] is True
    report = (tmp_path / "report.md").read_text()
    assert all(f"| {p} | ok |" in report for p in PARTS)
    assert (tmp_path / "logs.txt").stat().st_size > 0
    parts = results["parts"]
    # the benchmark ran every kernel's reference at its tiny shapes; the roofline has a row per op
    bench = parts["kernels_bench"]["rows"]
    assert {r["op"] for r in bench if r["provider"] == "eager" and "fwd_ms" in r} == {
        "info_nce", "nt_xent", "seed_distill", "sinkhorn"}
    roof = parts["roofline"]["rows"]
    moco = [r for r in roof if r["op"] == "info_nce" and r["shape"] == "B=256 D=128 K=65536" and r["dtype"] == "bf16"]
    assert moco and moco[0]["min_mb"] == pytest.approx((4 * 256 * 128 + 65536 * 128) * 2 / 1e6)
    assert moco[0]["h100_us"] == pytest.approx(4 * 256 * 65536 * 128 / 989e12 * 1e6)  # dot-bound at bf16
    assert parts["env"]["info"]["cuda"] is False
    assert "no CUDA device" in parts["aot_device"]["log_tail"]
    assert parts["moco_batch_aug"]["epochs"] and parts["moco_batch_aug"]["epochs"][0]["img_per_s"] > 0
    assert "img/s" in parts["train_resnet18"]["log_tail"] and "| fsdp | 1 |" in parts["swav_fsdp"]["log_tail"]
