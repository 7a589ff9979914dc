"""RegNetY: design-parameter expansion, SEER parameter counts on the meta device, equivalence with timm."""

import pytest
import torch

from smallssl.backbones import create_backbone
from smallssl.backbones.regnet import REGNET_CONFIGS, RegNet, RegNetParams

# Final widths = in_channels of the VISSL linear-eval heads on avgpool (configs/config/benchmark/
# linear_image_classification/imagenet1k/models/regnet{32Gf,64Gf_3,128Gf,256Gf_1,10B}.yaml).
VISSL_WIDTHS = {"regnety_32gf": 3712, "regnety_64gf": 4920, "regnety_128gf": 7392, "regnety_256gf": 10444,
                "regnety_10b": 28280}
# Trunk parameters (no head). The first four equal timm's independent regnety_320/640/1280/2560 (the SEER
# weights' timm ports); see test_matches_timm_counts.
TRUNK_PARAMS = {"regnety_32gf": 141_333_770, "regnety_64gf": 276_457_786, "regnety_128gf": 637_419_894,
                "regnety_256gf": 1_272_156_138, "regnety_10b": 9_323_934_872}
# SEER model card (VISSL MODEL_ZOO / Goyal et al. 2022): 156M, 250M, 693M, 1.5B, 10B. Trunk + SwAV projection MLP
# (dims [D, D, 256]; 10B: [D, 8192, 8192, 256]) gives 156.1M (32GF), 249.6M (classy-vision's 64GF config) and
# 694.0M (128GF); the published 64GF (302M), 256GF (1.38B) and 10B (9.62B) do not reach the card's rounded figures.
MODEL_CARD = {"regnety_32gf": 156e6, "regnety_128gf": 693e6, "regnety_64gf_classy": 250e6}


def _meta(name):
    with torch.device("meta"):
        return create_backbone(name)


def _mlp(dims):
    return sum(a * b + b for a, b in zip(dims[:-1], dims[1:]))


@pytest.mark.parametrize("name", sorted(VISSL_WIDTHS))
def test_seer_configs_on_meta(name):
    m = _meta(name)
    assert all(p.is_meta for p in m.parameters())
    assert m.num_features == VISSL_WIDTHS[name]
    assert sum(p.numel() for p in m.parameters()) == TRUNK_PARAMS[name]


@pytest.mark.parametrize("name", sorted(MODEL_CARD))
def test_model_card_counts_with_swav_mlp(name):
    m = _meta(name)
    n = sum(p.numel() for p in m.parameters()) + _mlp([m.num_features, m.num_features, 256])
    assert abs(n / MODEL_CARD[name] - 1) < 0.02, (name, n)


def test_expanded_params_by_hand():
    # u_j = 8 + 8 j = 8, 16, 24, 32; k = round(log2(u_j / 8)) = 0, 1, 2 (1.58), 2 -> widths 8, 16, 32, 32
    p = RegNetParams(depth=4, w_0=8, w_a=8.0, w_m=2.0, group_width=8)
    assert p.stages() == [(8, 1, 8), (16, 1, 8), (32, 2, 8)]
    # width / group compatibility: w = 232 in a stage with group width 232 stays 232 (RegNetY-32GF stage 1)
    assert REGNET_CONFIGS["regnety_32gf"].stages()[0] == (232, 2, 232)
    with pytest.raises(ValueError, match="multiple of 8"):
        RegNetParams(depth=4, w_0=12, w_a=8.0, w_m=2.0, group_width=8)
    with pytest.raises(ValueError, match="regnety_tiny"):
        from smallssl.backbones.regnet import regnet
        regnet("regnety_7gf")


@pytest.mark.parametrize("ours,theirs", [("regnety_400mf", "regnety_004"), ("regnety_32gf", "regnety_320"),
                                         ("regnety_128gf", "regnety_1280"), ("regnety_256gf", "regnety_2560")])
def test_matches_timm_counts(ours, theirs):
    timm = pytest.importorskip("timm")
    with torch.device("meta"):
        t = timm.create_model(theirs, num_classes=0)
    assert sum(p.numel() for p in _meta(ours).parameters()) == sum(p.numel() for p in t.parameters())


def _timm_name(key: str) -> str:
    """smallssl RegNet key -> timm RegNet key."""
    import re
    m = re.match(r"stages\.(\d+)\.(\d+)\.(.+)", key)
    if not m:
        return key  # stem.conv / stem.bn are the same
    rest = m.group(3)
    for ours, theirs in (("proj_bn.", "downsample.bn."), ("proj.", "downsample.conv."), ("conv_a.", "conv1.conv."),
                         ("bn_a.", "conv1.bn."), ("conv_b.", "conv2.conv."), ("bn_b.", "conv2.bn."),
                         ("se.reduce.", "se.fc1."), ("se.expand.", "se.fc2."), ("conv_c.", "conv3.conv."),
                         ("bn_c.", "conv3.bn.")):
        if rest.startswith(ours):
            rest = theirs + rest[len(ours):]
            break
    return f"s{int(m.group(1)) + 1}.b{int(m.group(2)) + 1}.{rest}"


def test_forward_equals_timm_regnety_400mf():
    """Same weights -> same features as timm's independent RegNetY-400MF: the block structure is right."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    ours = create_backbone("regnety_400mf").eval()
    for m in ours.modules():  # non-trivial BN statistics so that a swapped BN would show
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.1, 0.1)
    theirs = timm.create_model("regnety_004", num_classes=0).eval()
    theirs.load_state_dict({_timm_name(k): v for k, v in ours.state_dict().items()}, strict=True)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), rtol=1e-4, atol=1e-5)


def test_tiny_forward_shapes_small_input_and_checkpointing():
    torch.manual_seed(0)
    m = create_backbone("regnety_tiny", small_input=True)
    x = torch.randn(2, 3, 32, 32)
    assert m.forward_features(x).shape == (2, 32, 4, 4)  # stride-1 stem, three stride-2 stages
    assert create_backbone("regnety_tiny").forward_features(x).shape == (2, 32, 2, 2)
    m.train()
    y = m(x)
    y.square().sum().backward()
    g = [p.grad.clone() for p in m.parameters()]
    # per-stage activation checkpointing recomputes the same function: same output and gradients
    m.zero_grad()
    m.activation_checkpointing = True
    for mod in m.modules():  # undo the BN running-stat update of the first pass so both passes match
        if isinstance(mod, torch.nn.BatchNorm2d):
            mod.reset_running_stats()
    y2 = m(x)
    y2.square().sum().backward()
    torch.testing.assert_close(y2, y)
    for a, p in zip(g, m.parameters()):
        torch.testing.assert_close(p.grad, a)


def test_isinstance_regnet_and_registry():
    from smallssl.backbones import BACKBONES
    for name in VISSL_WIDTHS:
        assert name in BACKBONES
    assert isinstance(_meta("regnety_tiny"), RegNet)
