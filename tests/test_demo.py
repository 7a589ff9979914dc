"""experiments.demo end to end on tiny data: trains with the demo recipe, evaluates both encoders, resumes."""

import os

from experiments import demo


def test_demo_runs_and_a_rerun_reuses_the_checkpoint(tiny_data, tmp_path, capsys):
    argv = ["--data", tiny_data, "--cache", str(tmp_path / "cache"), "--epochs", "1", "--batch-size", "8",
            "--moco-k", "16", "--workers", "0"]
    out = demo.main(argv)
    assert set(out) == {"random", "pretrained", "minutes"} and 0 <= out["pretrained"] <= 100
    text = capsys.readouterr().out
    assert "--moco-symmetric" in text and "| resnet18 random init |" in text
    (run_dir,) = [d for d in os.listdir(tmp_path / "cache") if d.startswith("demo-")]
    assert os.path.exists(tmp_path / "cache" / run_dir / "checkpoint_0001.pth.tar")
    # same recipe: resumes (nothing left to train) and gives the same figures; another lr: a new directory
    again = demo.main(argv)
    assert (again["random"], again["pretrained"]) == (out["random"], out["pretrained"])
    demo.main(argv + ["--lr", "0.05"])
    assert len([d for d in os.listdir(tmp_path / "cache") if d.startswith("demo-")]) == 2
