"""Backbone registry contract: every registered name builds, pools to (B, num_features), small-input works."""

import pytest
import torch

from smallssl.backbones import BACKBONES, create_backbone

try:
    from smallssl.backbones.regnet import LARGE_CONFIGS
except ImportError:  # pragma: no cover
    LARGE_CONFIGS = {}

SMALL = [n for n in sorted(BACKBONES) if n not in LARGE_CONFIGS]


@pytest.mark.parametrize("name", SMALL)
def test_pooled_features_small_input(name):
    torch.manual_seed(0)
    model = create_backbone(name, small_input=True).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, model.num_features)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", ["resnet18", "mobilenetv3_small"])
def test_imagenet_stem_at_64px(name):
    model = create_backbone(name, small_input=False).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 64, 64)).shape == (1, model.num_features)


def test_small_input_keeps_resolution():
    big, small = create_backbone("resnet18"), create_backbone("resnet18", small_input=True)
    assert big.conv1.stride == (2, 2) and small.conv1.stride == (1, 1)
    assert isinstance(small.maxpool, torch.nn.Identity)


def test_expected_widths():
    widths = {n: create_backbone(n).num_features for n in
              ["resnet18", "resnet50", "mobilenetv3_small", "mobilenetv3_large", "efficientnet_b0", "deit_tiny"]}
    assert widths == {"resnet18": 512, "resnet50": 2048, "mobilenetv3_small": 1024, "mobilenetv3_large": 1280,
                      "efficientnet_b0": 1280, "deit_tiny": 192}


def test_timm_passthrough_and_unknown_name():
    model = create_backbone("resnet10t").eval()  # a timm name that is not registered
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, model.num_features)
    with pytest.raises(ValueError, match="unknown architecture 'resnet19'.*mobilenetv3_small"):
        create_backbone("resnet19")
