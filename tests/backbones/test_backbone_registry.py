"""Backbone registry contract: every registered name builds, pools to (B, num_features), small-input works, every
trainable parameter gets a gradient (timm's ``test_model_backward``); names, aliases and the small-input rule."""

import ast
import pathlib

import pytest
import torch

import smallssl.backbones as backbones
from smallssl.backbones import (
    BACKBONES,
    check_arch,
    create_backbone,
    default_small_input,
    is_known,
    list_backbones,
    register_backbone,
)
from smallssl.backbones.regnet import LARGE_CONFIGS

SMALL = [n for n in sorted(BACKBONES) if n not in LARGE_CONFIGS]


@pytest.mark.parametrize("name", SMALL)
def test_pooled_features_small_input(name):
    torch.manual_seed(0)
    model = create_backbone(name, small_input=True).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, model.num_features)
    assert torch.isfinite(out).all()
    assert out.std() > 0  # not a constant: the input reaches the features


@pytest.mark.parametrize("name", SMALL)
def test_every_trainable_parameter_gets_a_gradient(name):
    torch.manual_seed(0)
    model = create_backbone(name, small_input=True).train()
    side = 32 if name.startswith("deit") else 16  # small: the check is about the graph, not the numbers
    model(torch.randn(2, 3, side, side)).square().mean().backward()
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert params
    missing = [n for n, p in params if p.grad is None]
    assert not missing, f"{name}: no gradient for {missing[:5]}"
    assert all(torch.isfinite(p.grad).all() for _, p in params)


@pytest.mark.parametrize("name", ["resnet18", "mobilenetv3_small", "efficientnet_b0", "timm_mobilenetv3_small"])
def test_imagenet_stem_at_64px(name):
    model = create_backbone(name, small_input=False).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 64, 64)).shape == (1, model.num_features)


def test_small_input_keeps_resolution():
    big, small = create_backbone("resnet18"), create_backbone("resnet18", small_input=True)
    assert big.conv1.stride == (2, 2) and small.conv1.stride == (1, 1)
    assert isinstance(small.maxpool, torch.nn.Identity)


@pytest.mark.parametrize("name,channels", [("mobilenetv3_small", 576), ("mobilenetv3_large", 960),
                                           ("efficientnet_b0", 1280)])
def test_paper_students_small_input(name, channels):
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert create_backbone(name).eval().forward_features(x).shape == (1, channels, 1, 1)  # 32 / 32
        assert create_backbone(name, small_input=True).eval().forward_features(x).shape == (1, channels, 2, 2)


def test_expected_widths():
    names = ["resnet18", "resnet50", "mobilenetv3_small", "mobilenetv3_large", "efficientnet_b0", "deit_tiny",
             "timm_mobilenetv3_small", "timm_mobilenetv3_large", "timm_efficientnet_b0"]
    widths = {n: create_backbone(n).num_features for n in names}
    assert widths == {"resnet18": 512, "resnet50": 2048, "mobilenetv3_small": 1024, "mobilenetv3_large": 1280,
                      "efficientnet_b0": 1280, "deit_tiny": 192, "timm_mobilenetv3_small": 1024,
                      "timm_mobilenetv3_large": 1280, "timm_efficientnet_b0": 1280}


def test_bare_names_are_the_papers_and_timm_stays_reachable():
    from smallssl.backbones.efficientnet import EfficientNetB0
    from smallssl.backbones.mobilenetv3 import MobileNetV3

    assert isinstance(create_backbone("mobilenetv3_small"), MobileNetV3)
    assert isinstance(create_backbone("efficientnet_b0"), EfficientNetB0)
    timm_small = create_backbone("timm_mobilenetv3_small")
    assert type(timm_small).__module__.startswith("timm.") and hasattr(timm_small, "conv_stem")
    assert type(create_backbone("mobilenetv3_small_100")).__module__.startswith("timm.")  # timm's own name


def test_timm_passthrough_and_unknown_name():
    model = create_backbone("resnet10t").eval()  # a timm name that is not registered
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, model.num_features)
    with pytest.raises(ValueError, match="unknown architecture 'resnet19'.*mobilenetv3_small.*any timm model name"):
        create_backbone("resnet19")


def test_is_known_and_check_arch():
    assert is_known("mobilenetv3_small") and is_known("regnety_tiny")
    assert is_known("mobilenetv3_small_100") and is_known("vit_small_patch16_224.dino")  # timm names and tags
    assert not is_known("resnet19")
    check_arch("resnet18")
    with pytest.raises(ValueError, match=r"^unknown architecture 'resnet19'\. Registered: deit_tiny, efficientnet_b0"):
        check_arch("resnet19")
    assert list_backbones() == sorted(BACKBONES)


def test_default_small_input_rule():
    assert [default_small_input(s) for s in (16, 32, 64, 65, 96, 224)] == [True, True, True, False, False, False]


def test_register_twice_is_an_error():
    with pytest.raises(ValueError, match="'resnet18' registered twice"):
        register_backbone("resnet18")(lambda small_input=False: None)


def test_registry_and_layouts_are_leaves():
    """_registry and layouts import nothing from the package, so any family can import them without a cycle."""
    root = pathlib.Path(backbones.__file__).parent
    for leaf in ("_registry.py", "layouts.py"):
        tree = ast.parse((root / leaf).read_text())
        relative = [n for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.level > 0]
        absolute = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
        assert not relative and not any(a.startswith("smallssl") for a in absolute), leaf
    for family in ("resnet.py", "regnet.py", "mobilenetv3.py", "efficientnet.py", "timm_backbones.py"):
        tree = ast.parse((root / family).read_text())
        froms = {(n.level, n.module) for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.level > 0}
        assert froms == {(1, "_registry")}, (family, froms)  # never the package itself
