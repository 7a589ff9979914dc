"""Linear probe / transfer: metrics by hand, schedules, frozen vs fine-tuned backbones, CLI = pure function."""

import os

import pytest
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

import main_transfer
from eval.features import build_model, eval_transform, extract_features
from eval.linear import Classifier, classification_metrics, linear_probe_features, train_classifier
from smallssl.optim import lr_at


def test_classification_metrics_by_hand():
    # 4 samples of class 0 (3 right), 1 sample of class 1 (wrong): top1 60%, mean per class (75 + 0) / 2.
    logits = torch.tensor([[2.0, 1, 0], [2, 1, 0], [2, 1, 0], [0, 2, 1], [2, 0, 1]])
    labels = torch.tensor([0, 0, 0, 0, 1])
    m = classification_metrics(logits, labels, 3)
    assert m["top1"] == pytest.approx(60.0) and m["mean_per_class"] == pytest.approx(37.5)
    assert m["top5"] == 100.0


def test_lr_schedules():
    # eval.linear's schedule is smallssl.optim.lr_at (MoCo's steps x0.1, or half-cosine without warm-up).
    assert [lr_at(e, 30.0, 100, cos=False, schedule=[60, 80]) for e in (0, 59, 60, 80, 99)] == pytest.approx(
        [30, 30, 3, 0.3, 0.3])
    assert lr_at(0, 1.0, 10, cos=True, schedule=[]) == 1.0 and lr_at(5, 1.0, 10, cos=True, schedule=[]) == \
        pytest.approx(0.5)


def _blobs(n, seed):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(3).repeat(n)
    return torch.eye(4)[y] * 3 + 0.3 * torch.randn(len(y), 4, generator=g), y


def test_linear_probe_separable_and_hyperparameters_matter():
    xtr, ytr = _blobs(20, 0)
    xte, yte = _blobs(10, 1)
    res = linear_probe_features(xtr, ytr, xte, yte, epochs=5, lr=1.0, batch_size=16)
    assert res["top1"] == 100.0 and res["mean_per_class"] == 100.0

    def fc_after(**kw):
        torch.manual_seed(0)
        ident = nn.Identity()
        ident.num_features = 4
        model = Classifier(ident, 3)
        loader = DataLoader(TensorDataset(xtr, ytr), batch_size=20)
        train_classifier(model, loader, loader, 3, log=None, **kw)
        return model.fc.weight.detach().clone()

    base = dict(epochs=3, lr=0.5, momentum=0.9, weight_decay=0.0, schedule=(2,))
    ref = fc_after(**base)
    for change in (dict(lr=0.1), dict(epochs=2), dict(momentum=0.0), dict(weight_decay=0.1), dict(schedule=(1,)),
                   dict(cos=True)):
        assert not torch.allclose(ref, fc_after(**{**base, **change})), change
    assert fc_after(**{**base, "weight_decay": 0.1}).norm() < ref.norm()


def test_frozen_vs_finetune_backbone():
    net = build_model("resnet18", None, True, 16, seed=0, verbose=False)
    frozen = Classifier(net, 3, normalize=True, frozen=True).train()
    assert not frozen.backbone.training and all(not p.requires_grad for p in frozen.backbone.parameters())
    x = torch.randn(6, 3, 16, 16)
    feats = net(x)
    assert torch.allclose(frozen(x), frozen.fc(torch.nn.functional.normalize(feats, dim=1)), atol=1e-5)
    net2 = build_model("resnet18", None, True, 16, seed=0, verbose=False)
    tuned = Classifier(net2, 3, normalize=True, frozen=False).train()
    assert tuned.backbone.training  # --finetune trains BN too
    before = net2.conv1.weight.detach().clone()
    loader = DataLoader(TensorDataset(x, torch.tensor([0, 1, 2, 0, 1, 2])), batch_size=6)
    train_classifier(tuned, loader, loader, 3, epochs=1, lr=0.1, log=None)
    assert not torch.equal(before, net2.conv1.weight)


def test_main_transfer_precompute_equals_pure_function(tmp_path, capsys, make_folder):
    root = str(tmp_path / "d")
    make_folder(os.path.join(root, "train"), 4, seed=0)
    make_folder(os.path.join(root, "val"), 2, seed=1)
    argv = [root, "--dataset", "folder", "-a", "resnet18", "--epochs", "3", "--lr", "5", "--precompute",
            "--no-cache", "--seed", "2", "-b", "8", "--dist-url", "tcp://localhost:10001",
            "--multiprocessing-distributed"]
    res = main_transfer.main(main_transfer.get_args_parser().parse_args(argv))
    assert "features=l2-normalised" in capsys.readouterr().out
    net = build_model("resnet18", None, True, 16, seed=2, verbose=False)
    from torchvision.datasets import ImageFolder

    xtr, ytr = extract_features(net, ImageFolder(os.path.join(root, "train"), eval_transform(16)))
    xte, yte = extract_features(net, ImageFolder(os.path.join(root, "val"), eval_transform(16)))
    ref = linear_probe_features(xtr, ytr, xte, yte, epochs=3, lr=5.0, batch_size=8, normalize=True, seed=2)
    assert res == pytest.approx(ref)
    ft = main_transfer.main(main_transfer.get_args_parser().parse_args(
        [root, "--dataset", "folder", "-a", "resnet18", "--epochs", "1", "--finetune", "-b", "6", "--no-cache"]))
    assert 0.0 <= ft["top1"] <= 100.0 and "finetune (backbone in train mode)" in capsys.readouterr().out
    with pytest.raises(ValueError, match="cifar10"):
        main_transfer.resolve_root(root, "imagenet")
    assert main_transfer.resolve_root(root, "folder") == (root, "folder")


def test_tsne_separates_clusters_and_writes_png(tmp_path):
    pytest.importorskip("sklearn")
    pytest.importorskip("matplotlib")
    from experiments.tsne import plot_embedding, tsne_embed

    x, y = _blobs(15, 0)
    emb = tsne_embed(x, perplexity=5, pca=None, seed=0, max_iter=500)
    assert emb.shape == (45, 2)
    assert torch.equal(emb, tsne_embed(x, perplexity=5, pca=None, seed=0, max_iter=500))  # seeded
    # Each point's nearest other point in the picture has its class (the clusters stay apart).
    d = torch.cdist(emb, emb) + torch.eye(45) * 1e9
    assert torch.equal(y[d.argmin(1)], y)
    assert not torch.equal(emb, tsne_embed(x, perplexity=12, pca=None, seed=0, max_iter=500))  # perplexity is used
    out = str(tmp_path / "t.png")
    plot_embedding(emb, y, ["a", "b", "c"], out)
    with open(out, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
