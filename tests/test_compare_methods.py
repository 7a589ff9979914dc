"""experiments.compare_methods on tiny data: the equal-steps and equal-time budgets, the table and results.json."""

import json
import os

from experiments import compare_methods

TINY = ["--image-size", "16", "-b", "8", "--no-small-input", "--bank-per-class", "8", "--val-per-class", "4"]


def test_equal_steps_rows_and_results(tiny_data, tmp_path, capsys):
    out = str(tmp_path / "cmp")
    rows = compare_methods.main(["--data", tiny_data, "--out", out, "--budget-s", "0", "--subset", "16",
                                 "--methods", "moco-demo", "simsiam", *TINY])
    assert [r["method"] for r in rows] == ["random init", "moco-demo", "simsiam"]
    assert [r["steps"] for r in rows] == [0, 2, 2]  # 16 images / batch 8, one epoch
    assert all(0 <= r["top1"] <= 100 for r in rows) and all(isinstance(r["collapsed"], bool) for r in rows[1:])
    assert rows[1]["collapse_loss"] > 0 and "--moco-symmetric" in rows[1]["command"]
    with open(os.path.join(out, "results.json")) as f:
        assert [r["method"] for r in json.load(f)] == ["random init", "moco-demo", "simsiam"]
    assert "| moco-demo | 2 |" in capsys.readouterr().out


def test_time_budget_goes_through_the_shared_calibration(tiny_data, tmp_path, monkeypatch):
    seen = []

    def fake_calibrate(flags, budget_s):
        seen.append((flags, budget_s))
        return 5, 0.25  # 5 steps of 8 from 32 images: two passes over 16 (plan_budget), 4 steps

    monkeypatch.setattr(compare_methods, "calibrate", fake_calibrate)
    rows = compare_methods.main(["--data", tiny_data, "--out", str(tmp_path / "cmp"), "--budget-s", "1.25",
                                 "--methods", "simsiam", *TINY])
    flags, budget = seen[0]
    assert budget == 1.25 and flags[:6] == ["-a", "resnet18", "-b", "8", "--image-size", "16"]
    assert "--no-small-input" in flags and "simsiam" in flags
    assert rows[1]["steps"] == 4 and rows[1]["calibrated_s_per_step"] == 0.25
