"""Every eval CLI and main_transfer.py: bad input ends with exactly one ``error:`` line on stderr and exit 2,
no traceback; kNN's k is clipped to the bank and labelled with the k used, ``-k 0`` is an error."""

import os
import runpy
import sys

import pytest

import main_transfer
from eval import embed, instdisc, knn, knn_bench, linear, similar, stats_dist
from smallssl.errors import run_cli

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _one_error(capsys, main, argv) -> str:
    """Run ``main(argv)`` as its ``__main__`` does; return the single stderr line (asserting rc 2)."""
    try:
        rc = run_cli(main, argv)
    except SystemExit as e:  # argparse errors exit from inside parse_args
        rc = e.code
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2, err
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_knn_errors(data, capsys):
    line = _one_error(capsys, knn.main, [data, "-a", "resnet1O", "--no-cache"])
    assert "unknown architecture 'resnet1O'" in line and "resnet18" in line
    line = _one_error(capsys, knn.main, [data, "--pretrained", os.path.join(data, "nope.pth.tar"), "--no-cache"])
    assert "nope.pth.tar" in line and "no such file" in line
    line = _one_error(capsys, knn.main, ["cifar1O", "--no-cache"])
    assert "'cifar1O'" in line and "did you mean 'cifar10'" in line and "--dataset" not in line
    line = _one_error(capsys, knn.main, [data, "-k", "0"])
    assert "-k" in line and "must be >= 1" in line
    line = _one_error(capsys, knn.main, [data, "--protocol", "simclr"])
    assert "invalid choice: 'simclr'" in line and "--help" in line
    assert "python -m eval.knn_bench" in _one_error(capsys, knn.main, ["--bench"])
    line = _one_error(capsys, knn.main, [data, "--train-split", "training", "--no-cache"])
    assert "no training/ directory" in line


def test_knn_k_larger_than_bank_is_clipped_and_labelled(data, tmp_path, capsys):
    # 15 training images: -k 500 uses every one of them, and the printed line says k=15, not 500.
    common = [data, "--feature-cache", str(tmp_path / "cache")]
    res = knn.main(common + ["-k", "500", "--protocol", "dino"])
    out = capsys.readouterr().out
    assert res["dino/k"] == 15 and "k=15 T=0.07" in out and "(asked 500: the bank has 15 images)" in out
    assert res == knn.main(common + ["-k", "15", "--protocol", "dino"])
    assert "asked" not in capsys.readouterr().out
    res = knn.main(common + ["-k", "500"])
    out = capsys.readouterr().out
    assert res["paper/k"] == 15 and "k=odd<=15 " in out and "paper/acc@k=15" in res and "paper/acc@k=17" not in res


def test_other_eval_clis_errors(data, tmp_path, capsys):
    line = _one_error(capsys, linear.main, [data, "-a", "vit_nope", "--precompute", "--no-cache"])
    assert "unknown architecture 'vit_nope'" in line
    line = _one_error(capsys, linear.main, [data, "--lr", "-1"])
    assert "--lr -1" in line
    missing = str(tmp_path / "static")
    for main in (instdisc.main, stats_dist.main):
        line = _one_error(capsys, main, [missing, "--no-cache"])
        assert "static augmented set" in line and "experiments.sample-augs" in line
    line = _one_error(capsys, knn_bench.main, ["--n-train", "0"])
    assert "--n-train" in line
    line = _one_error(capsys, embed.main, [str(tmp_path / "nothing"), "--out", str(tmp_path / "e")])
    assert "no such directory" in line
    line = _one_error(capsys, similar.main, [str(tmp_path / "e"), "--query", "0"])
    assert "e.npy is missing" in line and "eval.embed" in line


def test_main_transfer_errors(data, capsys):
    # A typo'd dataset name given as DATA: no mention of a "--dataset folder" the user never typed.
    line = _one_error(capsys, main_transfer.cli_main, ["cifar1O"])
    assert "'cifar1O'" in line and "did you mean 'cifar10'" in line and "--dataset folder" not in line
    line = _one_error(capsys, main_transfer.cli_main, [data, "--dataset", "imagenet"])
    assert "invalid choice: 'imagenet'" in line
    line = _one_error(capsys, main_transfer.cli_main, [data, "-a", "resnet1O", "--precompute", "--no-cache"])
    assert "unknown architecture" in line


@pytest.mark.filterwarnings("ignore:.*found in sys.modules:RuntimeWarning")  # runpy of an imported module: benign
def test_entry_points_print_one_line_without_traceback(tmp_path, monkeypatch, capsys):
    """The ``__main__`` wiring (``sys.exit(run_cli(main))``) as a user runs it, in-process (runpy, as
    ``python main_transfer.py`` / ``python -m eval.stats-dist`` do): one line, exit 2, no traceback."""
    monkeypatch.delenv("SMALLSSL_DEBUG", raising=False)
    for run, argv, expect in (
            (lambda: runpy.run_path(os.path.join(REPO, "main_transfer.py"), run_name="__main__"),
             ["main_transfer.py", "cifar1O"], "error: data 'cifar1O'"),
            (lambda: runpy.run_module("eval.stats-dist", run_name="__main__"),
             ["stats-dist", str(tmp_path / "missing")], "error: static augmented set")):
        monkeypatch.setattr(sys, "argv", argv)
        with pytest.raises(SystemExit) as e:
            run()
        err = capsys.readouterr().err
        lines = err.strip().splitlines()
        assert e.value.code == 2 and len(lines) == 1 and lines[0].startswith(expect), err
        assert "Traceback" not in err
    for module in ("eval.knn", "eval.linear", "eval.instdisc", "eval.stats_dist", "eval.knn_bench", "eval.embed",
                   "eval.similar"):
        with open(os.path.join(REPO, *module.split(".")) + ".py") as f:
            assert f.read().rstrip().endswith('if __name__ == "__main__":\n    sys.exit(run_cli(main))'), module


@pytest.mark.parametrize("flag", ["-b", "--image-size"])
def test_common_flags_must_be_positive(data, capsys, flag):
    line = _one_error(capsys, knn.main, [data, flag, "0"])
    assert flag in line
