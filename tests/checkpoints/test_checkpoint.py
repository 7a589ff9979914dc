"""Checkpoint I/O: atomic saves, retention, layout detection with reports, mismatch errors."""

import os

import pytest
import torch
import torchvision

from smallssl.backbones import create_backbone
from smallssl.checkpoints import (
    CheckpointError,
    CheckpointMismatchError,
    atomic_save,
    latest_checkpoint,
    load_backbone,
    load_checkpoint_file,
    save_checkpoint,
)


def test_atomic_save_never_leaves_partial_file(tmp_path, monkeypatch):
    path = tmp_path / "c.pth.tar"
    atomic_save({"a": torch.ones(2)}, str(path))

    def boom(*a, **k):
        raise OSError("disk full")
    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(OSError):
        atomic_save({"a": torch.zeros(2)}, str(path))
    assert torch.equal(torch.load(path)["a"], torch.ones(2))  # old file intact
    assert os.listdir(tmp_path) == ["c.pth.tar"]  # no temp file left


def test_keep_last_and_latest(tmp_path):
    for e in range(1, 5):
        save_checkpoint({"epoch": e}, str(tmp_path), e, keep_last=2)
    assert sorted(os.listdir(tmp_path)) == ["checkpoint_0003.pth.tar", "checkpoint_0004.pth.tar"]
    assert latest_checkpoint(str(tmp_path)).endswith("checkpoint_0004.pth.tar")


def test_keep_last_ignores_a_previous_runs_later_epochs(tmp_path):
    save_checkpoint({"epoch": 9}, str(tmp_path), 9)  # left by an older, longer run in the same directory
    for e in (1, 2, 3):
        save_checkpoint({"epoch": e}, str(tmp_path), e, keep_last=1)
        assert os.path.exists(tmp_path / f"checkpoint_{e:04d}.pth.tar")  # the new file is never pruned
    assert sorted(os.listdir(tmp_path)) == ["checkpoint_0003.pth.tar", "checkpoint_0009.pth.tar"]


def test_corrupt_and_missing_files(tmp_path):
    bad = tmp_path / "bad.pth.tar"
    bad.write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="could not be read"):
        load_checkpoint_file(str(bad))
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint_file(str(tmp_path / "nope"))


def _randomised(model):
    torch.manual_seed(1)
    for p in model.parameters():
        p.data.normal_()
    return model


@pytest.mark.parametrize("layout", ["smallssl", "moco_official", "seed", "torchvision", "bare_module"])
def test_load_backbone_layouts_round_trip(tmp_path, layout):
    src = _randomised(create_backbone("resnet18"))
    sd = src.state_dict()
    if layout == "smallssl":
        ckpt = {"state_dict": {f"module.encoder_q.backbone.{k}": v for k, v in sd.items()}
                | {f"module.encoder_k.backbone.{k}": torch.zeros_like(v) for k, v in sd.items()}}
    elif layout == "moco_official":
        ckpt = {"state_dict": {f"module.encoder_q.{k}": v for k, v in sd.items()}
                | {"module.encoder_q.fc.0.weight": torch.randn(2048, 512), "module.queue": torch.randn(128, 8)}}
    elif layout == "seed":
        ckpt = {"state_dict": {f"module.student.{k}": v for k, v in sd.items()}
                | {f"module.teacher.{k}": torch.zeros_like(v) for k, v in sd.items()}}
    elif layout == "torchvision":
        tv = torchvision.models.resnet18()
        tv.load_state_dict({**sd, "fc.weight": tv.fc.weight, "fc.bias": tv.fc.bias})
        ckpt = tv.state_dict()
    else:
        ckpt = {"model": {f"module.{k}": v for k, v in sd.items()}}
    torch.save(ckpt, tmp_path / "c.pth")
    dst = create_backbone("resnet18")
    report = load_backbone(dst, str(tmp_path / "c.pth"), verbose=False)
    assert not report.missing and not report.mismatched
    for k, v in dst.state_dict().items():
        assert torch.equal(v, sd[k]), k  # the query/student weights, never the key encoder / teacher


def test_wrong_arch_is_a_clear_error(tmp_path):
    torch.save({"state_dict": {f"module.encoder_q.{k}": v for k, v in
                               create_backbone("resnet34").state_dict().items()}}, tmp_path / "r34.pth")
    with pytest.raises(CheckpointMismatchError, match="does not fit this model"):
        load_backbone(create_backbone("resnet18"), str(tmp_path / "r34.pth"), verbose=False)
    with pytest.raises(CheckpointMismatchError, match="another shape"):
        load_backbone(create_backbone("resnet18", small_input=True),
                      {"state_dict": create_backbone("resnet18").state_dict()}, verbose=False)
