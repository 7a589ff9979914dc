"""VISSL model-zoo ResNets, sliced indexes VISSL can open from anywhere, renamed sliced indexes and FSDP2
sharded (DCP) directories read wherever a checkpoint is read; teacher-stem errors; LARS as SwAV uses it."""

import os

import pytest
import torch
import torch.distributed.checkpoint as dcp
import torch.nn as nn
import torchvision

from smallssl.backbones import create_backbone
from smallssl.checkpoints import CheckpointMismatchError, load_backbone, restart_load
from smallssl.checkpoints.load import open_checkpoint
from smallssl.checkpoints.report import is_lazy
from smallssl.checkpoints.sliced import consolidated_to_sliced
from smallssl.checkpoints.teacher import build_teacher
from smallssl.convert import main as convert
from smallssl.methods import METHODS
from smallssl.optim import build_optimizer, excludes_bias_and_norm, param_groups


def _r18(seed=0):
    torch.manual_seed(seed)
    m = create_backbone("resnet18", small_input=True)
    with torch.no_grad():
        for t in m.state_dict().values():
            if t.is_floating_point():
                t.normal_()
    return m


def _equal(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_vissl_model_zoo_resnet_loads_and_exports_back(tmp_path):
    src = _r18()
    trunk = {f"_feature_blocks.{k}": v for k, v in src.state_dict().items()}  # VISSL ResNe(X)t trunk names
    path = tmp_path / "converted_vissl_rn18.torch"
    torch.save({"classy_state_dict": {"base_model": {"model": {"trunk": trunk, "heads": {}}}}}, path)
    dst = create_backbone("resnet18", small_input=True)
    report = load_backbone(dst, str(path), verbose=False)
    assert len(report.loaded) == len(trunk) and not report.missing
    _equal(dst.state_dict(), src.state_dict())
    # back to VISSL: its trunk keys, readable by the VISSL rule (strip _feature_blocks.) into torchvision
    torch.save({"state_dict": {f"module.encoder_q.{k}": v for k, v in src.state_dict().items()}}, tmp_path / "m.pth")
    convert(["smallssl2vissl", str(tmp_path / "m.pth"), str(tmp_path / "v.torch"), "--layout", "resnet"])
    out = torch.load(tmp_path / "v.torch", weights_only=False)["classy_state_dict"]["base_model"]["model"]["trunk"]
    assert set(out) == set(trunk)
    tv = torchvision.models.resnet18()
    tv.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
    msg = tv.load_state_dict({k[len("_feature_blocks."):]: v for k, v in out.items()}, strict=False)
    assert set(msg.missing_keys) == {"fc.weight", "fc.bias"}


def test_sliced_index_opens_in_vissl_from_another_directory_and_renamed_index_with_pretrained(tmp_path,
                                                                                             monkeypatch):
    src = _r18()
    trunk = {f"_feature_blocks.{k}": v for k, v in src.state_dict().items()}
    torch.save({"classy_state_dict": {"base_model": {"model": {"trunk": trunk, "heads": {}}}}}, tmp_path / "c.torch")
    index = str(tmp_path / "sl" / "index.torch")
    os.makedirs(tmp_path / "sl")
    consolidated_to_sliced(str(tmp_path / "c.torch"), index)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    # VISSL's SlicedCheckpointLoader opens each stored path as is
    leaves = torch.load(index, weights_only=False)["classy_state_dict"]["base_model"]["model"]["trunk"]
    for k, p in leaves.items():
        assert torch.equal(torch.load(p, weights_only=False)["weight"], trunk[k])
    # the smallssl-named index of a sliced VISSL file works as --pretrained (one read per tensor)
    convert(["vissl2smallssl", index, str(tmp_path / "renamed.torch")])
    _, ck = open_checkpoint(str(tmp_path / "renamed.torch"))
    assert is_lazy(ck["state_dict"])
    dst = create_backbone("resnet18", small_input=True)
    load_backbone(dst, str(tmp_path / "renamed.torch"), verbose=False)
    _equal(dst.state_dict(), src.state_dict())
    assert ck["state_dict"].load_count == 0  # opening read nothing


def _dcp_dir(tmp_path, method, arch="resnet18"):
    path = str(tmp_path / "checkpoint_0001")
    dcp.save({"model": method.state_dict(), "extra": {"arch": arch, "method": "moco", "epoch": 1}},
             checkpoint_id=path, no_dist=True)
    return path


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_sharded_directory_read_by_load_backbone_teacher_and_restart(tmp_path):
    torch.manual_seed(0)
    m = METHODS["moco"](_r18(1), dim=16, K=32, mlp="v2")
    path = _dcp_dir(tmp_path, m)
    dst = create_backbone("resnet18", small_input=True)
    load_backbone(dst, path, verbose=False)  # eval.* / main_transfer.py --pretrained CKPT_DIR/checkpoint_0001
    _equal(dst.state_dict(), m.backbone.state_dict())
    t = build_teacher(None, path, small_input=True, verbose=False)  # --teacher-ckpt DIR, arch from the extras
    _equal(t.backbone.state_dict(), m.backbone.state_dict())
    _equal(t.head.state_dict(), m.encoder_q.head.state_dict())
    r = METHODS["moco"](create_backbone("resnet18", small_input=True), dim=16, K=32, mlp="v2")
    restart_load(r, path, verbose=False)
    _equal(r.encoder_q.state_dict(), m.encoder_q.state_dict())
    assert torch.equal(r.queue, m.queue)
    _, ck = open_checkpoint(path)
    lazy = ck["state_dict"]
    load_backbone(create_backbone("resnet18", small_input=True), ck, verbose=False)
    assert lazy.load_count == len(m.backbone.state_dict())  # one read per backbone tensor, nothing else


def test_teacher_stem_error_names_the_teacher_flags():
    src = create_backbone("resnet18", small_input=True)
    ckpt = {"arch": "resnet18", "state_dict": {f"module.encoder_q.{k}": v for k, v in src.state_dict().items()}}
    with pytest.raises(CheckpointMismatchError, match="--no-teacher-small-input") as e:
        build_teacher("resnet18", ckpt, small_input=False, verbose=False)
    assert "(and --small-input)" not in str(e.value)


def test_lars_is_swav_larc_on_every_parameter_unless_excluded():
    # a bias (1-d) with w = (3, 4), g = (0.6, 0.8), wd 0.1, trust 1e-3, lr 2, eps 1e-8 ~ 0:
    # SwAV's LARC: local_lr = 1e-3 * 5 / (1 + 0.5) = 1/300; w <- w - 2 (g + 0.1 w) / 300 = (2.994, 3.992)
    # excluded (SimCLR / BYOL): plain SGD without decay: w <- w - 2 g = (1.8, 2.4)
    for name, expect in (("lars", [2.994, 3.992]), ("lars-exclude-bn", [1.8, 2.4])):
        lin = nn.Linear(1, 2).double()
        with torch.no_grad():
            lin.bias.copy_(torch.tensor([3.0, 4.0]))
        groups = param_groups(lin, 0.1, exclude_bias_and_norm=excludes_bias_and_norm(name))
        opt = build_optimizer(name, groups, lr=2.0, momentum=0.9, weight_decay=0.1)
        lin.weight.grad = torch.zeros_like(lin.weight)
        lin.bias.grad = torch.tensor([0.6, 0.8], dtype=torch.float64)
        opt.step()
        torch.testing.assert_close(lin.bias.data, torch.tensor(expect, dtype=torch.float64))
