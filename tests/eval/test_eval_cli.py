"""CLIs end to end on tiny synthetic ImageFolders: values match the pure functions, checkpoints load, caches
invalidate, sample-augs is deterministic, BN runs in eval mode, sharded extraction equals one process."""

import filecmp
import json
import os

import pytest
import torch
from torchvision.datasets import ImageFolder

from eval import instdisc, knn, stats_dist
from eval.features import build_model, eval_transform, extract_features
from experiments.sample_augs import sample_augs
from smallssl.checkpoints import CheckpointMismatchError


def _features(model, folder, size=16):
    x, y = extract_features(model, ImageFolder(folder, eval_transform(size)), batch_size=4)
    return x, y


def test_knn_cli_matches_pure_functions_and_caches(data, tmp_path, capsys):
    cache = str(tmp_path / "cache")
    args = [data, "-a", "resnet18", "-k", "5", "--feature-cache", cache, "--protocol", "both", "--seed", "3"]
    res = knn.main(args)
    out = capsys.readouterr().out
    model = build_model("resnet18", None, True, 16, seed=3, verbose=False)
    xtr, ytr = _features(model, os.path.join(data, "train"))
    xte, yte = _features(model, os.path.join(data, "val"))
    ref = knn.best_nn(xtr, ytr, xte, yte, 5)
    assert res["paper/best_nn"] == pytest.approx(ref["best_nn"]) and res["paper/best_k"] == ref["best_k"]
    assert res["dino/top1"] == pytest.approx(knn.dino_knn(xtr, ytr, xte, yte, 20)["top1"])
    assert f"best-NN={ref['best_nn']:3.2f}%, k={int(ref['best_k'])}." in out and "protocol=dino" in out
    assert len(os.listdir(cache)) == 2
    assert knn.main(args) == res and "from cache" in capsys.readouterr().out
    # Another seed is another random network: a new cache entry, not the old features.
    knn.main(args[:-1] + ["4"])
    assert len(os.listdir(cache)) == 4


def test_knn_cli_loads_moco_checkpoint_and_rejects_mismatch(data, tmp_path):
    torch.manual_seed(11)
    net = build_model("resnet18", None, True, 16, seed=11, verbose=False)
    state = {f"module.encoder_q.backbone.{k}": v for k, v in net.state_dict().items()}
    state["module.queue"] = torch.zeros(4, 2)
    path = str(tmp_path / "checkpoint_0001.pth.tar")
    torch.save({"epoch": 1, "arch": "resnet18", "state_dict": state}, path)
    res = knn.main([data, "-a", "resnet18", "-k", "3", "--pretrained", path, "--no-cache", "--seed", "0"])
    xtr, ytr = _features(net, os.path.join(data, "train"))
    xte, yte = _features(net, os.path.join(data, "val"))
    assert res["paper/best_nn"] == pytest.approx(knn.best_nn(xtr, ytr, xte, yte, 3)["best_nn"])
    with pytest.raises(CheckpointMismatchError):
        knn.main([data, "-a", "resnet34", "--pretrained", path, "--no-cache"])


def test_extraction_uses_eval_mode_bn(data):
    model = build_model("resnet18", None, True, 16, seed=0, verbose=False).train()
    ds = ImageFolder(os.path.join(data, "train"), eval_transform(16))
    x_all, _ = extract_features(model, ds, batch_size=15)
    x_one, _ = extract_features(model, torch.utils.data.Subset(ds, [14]), batch_size=1)
    assert torch.allclose(x_all[14], x_one[0], atol=1e-5)  # batch composition does not matter
    assert model.training  # mode restored


def test_sample_augs_deterministic_and_seeded(data, tmp_path):
    src = os.path.join(data, "train")
    a = sample_augs(src, str(tmp_path / "a"), images_per_class=2, seed=0, workers=1)
    b = sample_augs(src, str(tmp_path / "b"), images_per_class=2, seed=0, workers=2)
    c = sample_augs(src, str(tmp_path / "c"), images_per_class=2, seed=1, workers=1)
    assert a["num_images"] == 6 and a["num_classes"] == 3 and b["files"] == a["files"] and c["seed"] == 1
    files = [o for r in a["files"] for o in r["outputs"]]
    assert len(files) == 18 and files[0] == os.path.join("class0", "img0-0.jpeg")
    assert all(filecmp.cmp(tmp_path / "a" / f, tmp_path / "b" / f, shallow=False) for f in files)
    assert not all(filecmp.cmp(tmp_path / "a" / f, tmp_path / "c" / f, shallow=False) for f in files if "-1" in f)
    with open(tmp_path / "a" / "manifest.json") as f:
        assert json.load(f)["files"] == a["files"]


def test_static_set_clis(data, tmp_path, capsys):
    static = str(tmp_path / "static")
    sample_augs(os.path.join(data, "train"), static, images_per_class=3, seed=0)
    common = [static, "-a", "resnet18", "--no-cache", "-b", "4"]
    res = instdisc.main(common + ["--topk", "2", "--mode", "sd-sd"])
    out = capsys.readouterr().out
    assert "Masked: normal; Mode: sd-sd; Top1-2: [" in out and "CKPT: random-init" in out
    assert res["top1"] <= res["top2"]
    st = stats_dist.main(common + ["-t", "3"])
    out = capsys.readouterr().out
    assert "D-SD align     SD-SD align" in out and "t=3" in out
    assert set(st) == {"d_sd_align", "sd_sd_align", "d_cls_align", "sd_cls_align", "d_uniform", "sd_uniform"}
    assert -12.0 <= st["d_uniform"] <= 0.0  # log E exp(-3 d^2) with d^2 in [0, 4]
    # -s keeps the first S images of each class: fewer images, other statistics.
    assert stats_dist.main(common + ["-s", "2"])["d_cls_align"] != st["d_cls_align"]


def _shard_worker(rank, world, port, folder, out):
    import torch.distributed as tdist

    tdist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    model = build_model("resnet18", None, True, 16, seed=0, verbose=False)
    x, y = extract_features(model, ImageFolder(folder, eval_transform(16)), batch_size=2)
    if rank == 0:
        torch.save((x, y), out)
    tdist.destroy_process_group()


def test_sharded_extraction_equals_single_process(data, tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    folder, out = os.path.join(data, "train"), str(tmp_path / "feats.pt")
    torch.multiprocessing.start_processes(_shard_worker, args=(2, port, folder, out), nprocs=2, start_method="fork")
    x2, y2 = torch.load(out)
    x1, y1 = _features(build_model("resnet18", None, True, 16, seed=0, verbose=False), folder)
    assert torch.equal(y1, y2) and torch.allclose(x1, x2, atol=1e-5)
