"""experiments.compare_peers and experiments.ablate_moco on tiny data (the lightly half only where lightly is
installed: it is an optional peer, never needed by the test suite)."""

import importlib.util
import math
import os
import shlex

import pytest
import torch

import main_moco
from eval.knn import dino_knn
from experiments import ablate_moco, compare_peers
from smallssl.backbones import create_backbone

TINY = ["-a", "resnet18", "--no-small-input", "--image-size", "16", "-b", "8", "--batch-aug", "--lr", "0.02",
        "--cos", "--mlp", "--moco-t", "0.2", "--moco-m", "0.9", "--moco-k", "16", "--moco-symmetric",
        "--shuffle-bn-splits", "1"]  # one forward per encoder and view: the fewest convolutions per step
HAS_LIGHTLY = importlib.util.find_spec("lightly") is not None


def test_plan_budget_gives_the_steps_in_the_fewest_passes():
    assert compare_peers.plan_budget(10, 128, 5784) == (1, 1280)  # one pass over a fixed subset
    assert compare_peers.plan_budget(66, 128, 5784) == (2, 33 * 128)  # 66 steps > 45 per pass: two passes
    assert compare_peers.plan_budget(45, 128, 5784) == (1, 45 * 128)
    with pytest.raises(ValueError, match="n_train"):
        compare_peers.plan_budget(5, 128, 100)


def test_collapse_loss_counts_both_directions_of_the_symmetric_loss():
    scale = compare_peers.symmetric_loss_scale(True)  # sum of the two directions: 2; their mean: 1
    assert round(scale, 4) in (1.0, 2.0) and compare_peers.symmetric_loss_scale(False) == pytest.approx(1.0)
    assert compare_peers.moco_collapse_loss(TINY) == pytest.approx(scale * math.log(17))
    asym = [f for f in TINY if f != "--moco-symmetric"]
    assert compare_peers.moco_collapse_loss(asym) == pytest.approx(math.log(17))
    assert ablate_moco.per_direction(10.0, TINY) == pytest.approx(10.0 / scale)
    assert ablate_moco.per_direction(10.0, asym) == pytest.approx(10.0)


def test_each_ablation_changes_exactly_what_it_names():
    base = vars(main_moco.get_args_parser().parse_args(["d", *compare_peers.BASELINE]))
    expect = {"baseline": {}, "t0.1": {"moco_t": 0.1}, "splits1": {"shuffle_bn_splits": 1},
              "k4096": {"moco_k": 4096, "moco_m": 0.99}, "head2048": {"mlp": "wide_bn"}, "head1024": {"mlp": "wide"},
              "small-input": {"small_input": True}, "t0.1+splits1": {"moco_t": 0.1, "shuffle_bn_splits": 1},
              "m0.99": {"moco_m": 0.99}, "lr0.03": {"lr": 0.03}, "empty-queue": {"moco_queue_init": "empty"},
              "m0.99+empty": {"moco_m": 0.99, "moco_queue_init": "empty"},
              "recipe": {"moco_m": 0.99, "moco_queue_init": "empty", "mlp": "wide_bn"}}
    assert set(expect) == set(ablate_moco.ABLATIONS)
    for name, changed in expect.items():
        args = vars(main_moco.get_args_parser().parse_args(["d", *ablate_moco.ablation_flags(name)]))
        assert {k: v for k, v in args.items() if v != base[k]} == changed, name
    assert base["moco_symmetric"] and base["small_input"] is False and base["batch_size"] == 128
    with pytest.raises(ValueError, match="unknown ablation"):
        ablate_moco.ablation_flags("t0.3")


def test_smallssl_half_trains_the_steps_and_scores_with_the_shared_knn(tiny_data, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SMALLSSL_CACHE", str(tmp_path / "cache"))
    rows = compare_peers.main(["--data", tiny_data, "--peers", "random", "smallssl", "--steps", "2", "--out",
                               str(tmp_path / "out"), "--smallssl-flags", shlex.join(TINY), "--knn-every", "1",
                               "--print-freq", "1"])
    rand, ours = rows
    # the random-init row is the same network and kNN as a direct computation
    sets = compare_peers.eval_sets(tiny_data, 16)
    torch.manual_seed(0)
    net = create_backbone("resnet18", small_input=False).eval()
    with torch.no_grad():
        feats = [net(torch.stack([ds[i][0] for i in range(len(ds))]))
                 for ds in (compare_peers.NormalizedImages(x, y) for x, y in sets)]
    direct = dino_knn(feats[0], sets[0][1], feats[1], sets[1][1], k=20, temperature=0.07)
    assert rand["top1"] == pytest.approx(direct["top1"]) and rand["top1"] >= 75.0  # colour-separable classes
    assert ours["steps"] == 2 and math.isfinite(ours["loss"]) and ours["collapse_loss"] == pytest.approx(
        compare_peers.symmetric_loss_scale(True) * math.log(17))
    assert ours["knn_curve"] and ours["knn_curve"][-1][0] == 2 and 0 <= ours["top1"] <= 100
    assert {"emb_std", "emb_rank"} <= set(ours["last_diag"]) and "--subset 16" in ours["command"]
    assert "| smallssl MoCo | 2 |" in capsys.readouterr().out


def test_ablation_driver_writes_one_row_per_ablation(tiny_data, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SMALLSSL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(ablate_moco, "BASELINE", TINY)
    rows = ablate_moco.main(["--data", tiny_data, "--only", "random", "t0.1", "--steps", "1", "--knn-every", "0",
                             "--out", str(tmp_path / "abl")])
    assert [r.get("ablation") for r in rows] == [None, "t0.1"]
    row = rows[1]
    assert row["steps"] == 1 and "--moco-t 0.1" in row["command"] and row["ln_k1"] == pytest.approx(math.log(17))
    assert row["loss_dir"] == pytest.approx(row["loss"] / compare_peers.symmetric_loss_scale(True))
    assert "| t0.1: T 0.2 -> 0.1 | 1 |" in capsys.readouterr().out


@pytest.mark.skipif(not HAS_LIGHTLY, reason="lightly is not installed (optional peer: pip install lightly)")
def test_lightly_half_wires_momentum_and_memory_bank():
    torch.manual_seed(0)
    model = compare_peers.LightlyMoCo(create_backbone("resnet18", small_input=False), K=16, T=0.1, hidden=32)
    x = torch.randn(8, 3, 16, 16)
    model(x, x, m=0.0)  # m = 0: the key encoder becomes the query encoder
    for p, q in zip(model.backbone.parameters(), model.backbone_momentum.parameters()):
        assert torch.equal(p, q)
    before = [p.clone() for p in model.projection_head_momentum.parameters()]
    with torch.no_grad():
        next(model.projection_head.parameters()).add_(1.0)
    loss = model(x, x, m=1.0)  # m = 1: the key encoder does not move
    assert all(torch.equal(a, b) for a, b in zip(before, model.projection_head_momentum.parameters()))
    assert 0 < float(loss.detach()) < 2 * math.log(17) + 1


@pytest.mark.skipif(not HAS_LIGHTLY, reason="lightly is not installed (optional peer: pip install lightly)")
def test_lightly_half_trains_the_steps(tiny_data, monkeypatch, tmp_path):
    monkeypatch.setenv("SMALLSSL_CACHE", str(tmp_path / "cache"))
    images = compare_peers.eval_sets(tiny_data, 16)[0][0]
    torch.manual_seed(0)
    init = create_backbone("resnet18", small_input=False)
    row, backbone = compare_peers.run_lightly(images, arch="resnet18", small_input=False, image_size=16, batch_size=8,
                                              budget_s=0, steps=3, K=16, workers=0)
    assert row["steps"] == 3 and math.isfinite(row["loss"]) and row["collapse_loss"] == pytest.approx(math.log(17))
    assert not backbone.training
    assert any(not torch.equal(a, b) for a, b in zip(init.state_dict().values(), backbone.state_dict().values()))


def test_resolve_data_takes_a_folder_or_a_class_balanced_subset(tiny_data, tmp_path, monkeypatch):
    monkeypatch.setenv("SMALLSSL_CACHE", str(tmp_path / "cache"))
    assert compare_peers.resolve_data(tiny_data) == tiny_data
    sub = compare_peers.resolve_data(tiny_data, [3, 2])
    counts = {split: sorted(len(os.listdir(os.path.join(sub, split, c))) for c in os.listdir(os.path.join(sub, split)))
              for split in ("train", "val")}
    assert counts == {"train": [3, 3], "val": [2, 2]}
    x, y = compare_peers.eval_sets(sub, 16)[0]
    assert x.shape == (6, 3, 16, 16) and sorted(y.tolist()) == [0, 0, 0, 1, 1, 1]
    with pytest.raises(FileNotFoundError, match="no tarball"):
        compare_peers.resolve_data("no-such-set")
