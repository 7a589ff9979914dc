"""VISSL/SEER import and export, sliced checkpoints, and the ``python -m smallssl.convert`` CLI."""

import hashlib
import os

import pytest
import torch

from smallssl.backbones import create_backbone
from smallssl.checkpoints import CheckpointMismatchError, load_backbone
from smallssl.checkpoints.sliced import SlicedCheckpoint, consolidated_to_sliced, load_tensors, sliced_to_consolidated
from smallssl.checkpoints.vissl import (
    load_vissl_trunk,
    save_vissl_checkpoint,
    smallssl_to_vissl_key,
    to_vissl_checkpoint,
    vissl_to_smallssl_key,
)
from smallssl.convert import main as convert

SEER10B_GROUPS = [[2], [7], [9, 17], []]  # VISSL regnet10B.yaml stage_checkpoints


def _tiny(seed=0, **kw):
    torch.manual_seed(seed)
    m = create_backbone("regnety_tiny", **kw)
    for mod in m.modules():  # non-default BN statistics, so buffers are checked too
        if isinstance(mod, torch.nn.BatchNorm2d):
            mod.running_mean.uniform_(-0.1, 0.1)
            mod.running_var.uniform_(0.5, 1.5)
            mod.num_batches_tracked.fill_(seed + 3)
    return m.eval()


def _assert_same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


@pytest.mark.parametrize("vissl,ours", [
    ("_feature_blocks.conv1.stem.0.weight", "stem.conv.weight"),
    ("_feature_blocks.conv1.stem.1.running_var", "stem.bn.running_var"),
    ("_feature_blocks.res2.block1-0.proj.weight", "stages.0.0.proj.weight"),
    ("_feature_blocks.res2.block1-0.bn.bias", "stages.0.0.proj_bn.bias"),
    ("_feature_blocks.res3.block2-4.f.a.0.weight", "stages.1.4.conv_a.weight"),
    ("_feature_blocks.res4.block3-11.f.b.1.running_mean", "stages.2.11.bn_b.running_mean"),
    ("_feature_blocks.res5.block4-0.f.se.excitation.0.bias", "stages.3.0.se.reduce.bias"),
    ("_feature_blocks.res5.block4-0.f.se.excitation.2.weight", "stages.3.0.se.expand.weight"),
    ("_feature_blocks.res5.block4-0.f.c.weight", "stages.3.0.conv_c.weight"),
    ("_feature_blocks.res5.block4-0.f.final_bn.weight", "stages.3.0.bn_c.weight"),
])
def test_key_mapping_regnet_layout(vissl, ours):
    assert vissl_to_smallssl_key(vissl) == ours
    assert smallssl_to_vissl_key(ours) == vissl


def test_key_mapping_fsdp_layout_and_wrappers():
    # SEER 10B: stage 3 (res4) split into groups at blocks 9 and 17 -> block 9 is in part 1, block 17 in part 2
    assert smallssl_to_vissl_key("stages.2.9.se.expand.bias", "regnet_fsdp", SEER10B_GROUPS) == \
        "_feature_blocks.res4.block3-part1.block3-9.f.se.excitation.2.bias"
    assert smallssl_to_vissl_key("stages.2.17.conv_c.weight", "regnet_fsdp", SEER10B_GROUPS) == \
        "_feature_blocks.res4.block3-part2.block3-17.f.c.weight"
    assert smallssl_to_vissl_key("stages.3.0.bn_c.bias", "regnet_fsdp", SEER10B_GROUPS) == \
        "_feature_blocks.res5.block4-part0.block4-0.f.final_bn.bias"
    wrapped = ("_fsdp_wrapped_module._feature_blocks.res4._fsdp_wrapped_module.block3-part1."
               "_fpw_module.block3-9._checkpoint_wrapped_module.f.c.weight")
    assert vissl_to_smallssl_key(wrapped) == "stages.2.9.conv_c.weight"
    assert vissl_to_smallssl_key("module.trunk._feature_blocks.conv1.stem.0.weight") == "stem.conv.weight"
    for foreign in ("0.projection_head.0.weight", "0.prototypes0.weight", "_feature_blocks.res3.block1-0.f.c.weight"):
        assert vissl_to_smallssl_key(foreign) is None  # heads; res3 must hold block2
    with pytest.raises(ValueError, match="regnet_fsdp"):
        smallssl_to_vissl_key("stem.conv.weight", layout="fsdp")


@pytest.mark.parametrize("layout", ["regnet", "regnet_fsdp"])
def test_vissl_round_trip(tmp_path, layout):
    src = _tiny(0)
    heads = {"0.projection_head.0.weight": torch.randn(32, 32), "0.prototypes0.weight": torch.randn(10, 32)}
    path = save_vissl_checkpoint(str(tmp_path / "model_final_checkpoint_phase0.torch"), src.state_dict(), heads,
                                 layout=layout, stage_checkpoints=[[], [], [1]])
    ck = torch.load(path, weights_only=False)
    trunk = ck["classy_state_dict"]["base_model"]["model"]["trunk"]
    assert len(trunk) == len(src.state_dict())
    if layout == "regnet_fsdp":
        assert "_feature_blocks.res4.block3-part1.block3-1.f.a.0.weight" in trunk
    dst = _tiny(1)
    report = load_vissl_trunk(dst, path, verbose=False)
    assert len(report.loaded) == len(src.state_dict()) and not report.missing and not report.mismatched
    assert sorted(report.unexpected) == ["heads.0.projection_head.0.weight", "heads.0.prototypes0.weight"]
    _assert_same_state(src, dst)
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(dst(x), src(x), rtol=0, atol=0)
    # export the loaded model again: identical VISSL trunk, tensor by tensor
    again = to_vissl_checkpoint(dst.state_dict(), layout=layout, stage_checkpoints=[[], [], [1]])
    again = again["classy_state_dict"]["base_model"]["model"]["trunk"]
    assert again.keys() == trunk.keys() and all(torch.equal(again[k], trunk[k]) for k in trunk)


def test_vissl_wrong_arch_is_reported(tmp_path):
    path = save_vissl_checkpoint(str(tmp_path / "v.torch"), _tiny(0).state_dict())
    with pytest.raises(CheckpointMismatchError, match="missing"):
        load_vissl_trunk(create_backbone("regnety_400mf"), path, verbose=False)


def test_vissl_keys_match_timm_seer_loader():
    """Our VISSL export goes through timm's own SEER/VISSL key filter into timm's RegNetY-400MF: same output."""
    timm = pytest.importorskip("timm")
    from timm.models.regnet import _filter_fn

    ours = create_backbone("regnety_400mf").eval()
    ck = to_vissl_checkpoint(ours.state_dict(), heads={"0.prototypes0.weight": torch.zeros(3, 4)})
    theirs = timm.create_model("regnety_004", num_classes=0).eval()
    theirs.load_state_dict(_filter_fn(ck), strict=True)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), rtol=1e-4, atol=1e-5)


def test_sliced_round_trip(tmp_path):
    src = _tiny(0)
    ckpt = {"epoch": 7, "arch": "regnety_tiny", "state_dict": {f"module.encoder_q.backbone.{k}": v
                                                                for k, v in src.state_dict().items()},
            "optimizer": {"state": {0: {"momentum_buffer": torch.ones(3)}}, "param_groups": [{"lr": 0.1}]}}
    torch.save(ckpt, tmp_path / "c.pth.tar")
    index = consolidated_to_sliced(str(tmp_path / "c.pth.tar"), str(tmp_path / "sliced" / "index.torch"))
    n = len(ckpt["state_dict"])
    assert len(os.listdir(tmp_path / "sliced" / "index_layers")) == n  # one file per tensor, optimizer dropped
    back = SlicedCheckpoint(index).to_consolidated()
    assert back["epoch"] == 7 and back["arch"] == "regnety_tiny" and "optimizer" not in back
    assert back["state_dict"].keys() == ckpt["state_dict"].keys()
    for k, v in ckpt["state_dict"].items():
        assert torch.equal(back["state_dict"][k], v) and back["state_dict"][k].dtype == v.dtype, k
    # CLI: sliced -> consolidated file, then load_backbone finds the prefix
    sliced_to_consolidated(index, str(tmp_path / "c2.pth.tar"))
    dst = _tiny(1)
    load_backbone(dst, str(tmp_path / "c2.pth.tar"), verbose=False)
    _assert_same_state(src, dst)
    # --keep-optimizer keeps the optimizer tensors as slices too
    convert(["consolidated2sliced", str(tmp_path / "c.pth.tar"), str(tmp_path / "s2" / "i.torch"), "--keep-optimizer"])
    full = SlicedCheckpoint(str(tmp_path / "s2" / "i.torch")).to_consolidated()
    assert torch.equal(full["optimizer"]["state"][0]["momentum_buffer"], torch.ones(3))
    assert full["optimizer"]["param_groups"] == [{"lr": 0.1}]


def test_sliced_into_meta_model_one_tensor_at_a_time(tmp_path):
    src = _tiny(0)
    save_vissl_checkpoint(str(tmp_path / "conso.torch"), src.state_dict())
    convert(["consolidated2sliced", str(tmp_path / "conso.torch"), str(tmp_path / "sl" / "model_sliced.torch")])
    trunk = SlicedCheckpoint(str(tmp_path / "sl" / "model_sliced.torch")).state_dict(
        ("classy_state_dict", "base_model", "model", "trunk"))
    with torch.device("meta"):
        dst = create_backbone("regnety_tiny")
    reads = []
    orig = trunk.load
    trunk.load = lambda key: (reads.append(key), orig(key))[1]
    report = load_tensors(dst, trunk, rename=vissl_to_smallssl_key)
    assert sorted(reads) == sorted(trunk) and len(reads) == len(set(reads))  # each slice read exactly once
    assert not report.missing and len(report.loaded) == len(src.state_dict())
    assert not any(t.is_meta for t in list(dst.parameters()) + list(dst.buffers()))
    _assert_same_state(src, dst.eval())


def test_vissl_style_sliced_index_absolute_paths(tmp_path):
    """An index as VISSL writes it (absolute paths, no slice_meta, sha1 names) loads, also after a move."""
    src = _tiny(0)
    folder = tmp_path / "orig" / "ck_layers"
    folder.mkdir(parents=True)
    trunk_files = {}
    for k, v in to_vissl_checkpoint(src.state_dict())["classy_state_dict"]["base_model"]["model"]["trunk"].items():
        f = folder / (hashlib.sha1(k.encode()).hexdigest() + ".torch")
        torch.save({"type": "slice", "weight": v}, f)
        trunk_files[k] = str(f)
    index = {"type": "slice_list", "classy_state_dict": {"base_model": {"model": {"trunk": trunk_files, "heads": {}}}}}
    torch.save(index, tmp_path / "orig" / "ck.torch")
    os.rename(tmp_path / "orig", tmp_path / "moved")  # absolute paths now stale: found next to the index
    dst = _tiny(1)
    load_vissl_trunk(dst, str(tmp_path / "moved" / "ck.torch"), verbose=False)
    _assert_same_state(src, dst)


def test_cli_vissl2smallssl_and_back(tmp_path, capsys):
    src = _tiny(0)
    save_vissl_checkpoint(str(tmp_path / "seer.torch"), src.state_dict(), {"0.prototypes0.weight": torch.ones(2, 2)})
    convert(["vissl2smallssl", str(tmp_path / "seer.torch"), str(tmp_path / "ours.pth.tar"), "--arch", "regnety_tiny"])
    assert "missing 0" in capsys.readouterr().out
    dst = _tiny(1)
    load_backbone(dst, str(tmp_path / "ours.pth.tar"), verbose=False)
    _assert_same_state(src, dst)
    with pytest.raises(ValueError, match="does not fit --arch"):  # wrong --arch: shapes / names do not fit
        convert(["vissl2smallssl", str(tmp_path / "seer.torch"), str(tmp_path / "x.pth.tar"),
                 "--arch", "regnety_400mf"])
    # sliced VISSL input -> sliced smallssl index sharing the slice files, loadable into a meta model
    convert(["consolidated2sliced", str(tmp_path / "seer.torch"), str(tmp_path / "sl" / "seer.torch")])
    convert(["vissl2smallssl", str(tmp_path / "sl" / "seer.torch"), str(tmp_path / "sl2" / "ours.torch"),
             "--arch", "regnety_tiny"])
    with torch.device("meta"):
        meta = create_backbone("regnety_tiny")
    load_tensors(meta, SlicedCheckpoint(str(tmp_path / "sl2" / "ours.torch")).state_dict(("state_dict",)))
    _assert_same_state(src, meta.eval())
    # a MoCo-style smallssl checkpoint -> VISSL (regnet_fsdp) -> smallssl again
    torch.save({"state_dict": {"module.encoder_q.backbone." + k: v for k, v in src.state_dict().items()}},
               tmp_path / "moco.pth.tar")
    convert(["smallssl2vissl", str(tmp_path / "moco.pth.tar"), str(tmp_path / "v.torch"), "--layout", "regnet_fsdp",
             "--stage-checkpoints", ";;1"])
    trunk = torch.load(tmp_path / "v.torch", weights_only=False)["classy_state_dict"]["base_model"]["model"]["trunk"]
    assert "_feature_blocks.res4.block3-part1.block3-1.f.c.weight" in trunk
    dst2 = _tiny(2)
    load_vissl_trunk(dst2, str(tmp_path / "v.torch"), verbose=False)
    _assert_same_state(src, dst2)
