"""The small-models paper's students: a state dict written in the peers' layouts (ssl-small / SEED's MobileNetV3,
lukemelas' EfficientNet-B0) from their documented key names and shapes loads with ``strict=True`` and gives the
features of an independent functional forward written here from that state dict (float64, relative 1e-10).

The reference below is a second implementation: it reads the peer's layout description (block tables as the
peers write them: expansion *ratios* rounded by TF-slim's rule for MobileNetV3, TF block strings for EfficientNet)
and applies ``F.conv2d`` / ``F.batch_norm`` over the keys. It never calls the backbone modules.
"""

import math
import re

import pytest
import torch
import torch.nn.functional as F

from smallssl.backbones import create_backbone, layout_hint
from smallssl.backbones.efficientnet import drop_connect, same_padding

# ---------------------------------------------------------------------------------------------------------------
# ssl-small / SEED MobileNetV3 (early d-li14 mobilenetv3.pytorch): (k, expansion ratio t, c, SE, HS, stride)
MNV3_PEER_CFGS = {
    "small": [(3, 1, 16, 1, 0, 2), (3, 4.5, 24, 0, 0, 2), (3, 3.67, 24, 0, 0, 1), (5, 4, 40, 1, 1, 2),
              (5, 6, 40, 1, 1, 1), (5, 6, 40, 1, 1, 1), (5, 3, 48, 1, 1, 1), (5, 3, 48, 1, 1, 1),
              (5, 6, 96, 1, 1, 2), (5, 6, 96, 1, 1, 1), (5, 6, 96, 1, 1, 1)],
    "large": [(3, 1, 16, 0, 0, 1), (3, 4, 24, 0, 0, 2), (3, 3, 24, 0, 0, 1), (5, 3, 40, 1, 0, 2),
              (5, 3, 40, 1, 0, 1), (5, 3, 40, 1, 0, 1), (3, 6, 80, 0, 1, 2), (3, 2.5, 80, 0, 1, 1),
              (3, 2.3, 80, 0, 1, 1), (3, 2.3, 80, 0, 1, 1), (3, 6, 112, 1, 1, 1), (3, 6, 112, 1, 1, 1),
              (5, 6, 160, 1, 1, 2), (5, 6, 160, 1, 1, 1), (5, 6, 160, 1, 1, 1)],
}
MNV3_LAST = {"small": 1024, "large": 1280}


def _div8(v):
    n = max(8, int(v + 4) // 8 * 8)
    return n + 8 if n < 0.9 * v else n


def mnv3_blocks(mode):
    """Per block: (prefix, inp, hidden, oup, k, stride, se, hs), widths as the peer derives them."""
    inp, out = 16, []
    for i, (k, t, c, se, hs, s) in enumerate(MNV3_PEER_CFGS[mode], start=1):
        hidden, oup = _div8(inp * t), _div8(c)
        out.append((f"features.{i}.conv", inp, hidden, oup, k, s, bool(se), bool(hs)))
        inp = oup
    return out


def _bn_keys(spec, prefix, c):
    for name in ("weight", "bias", "running_mean", "running_var"):
        spec[f"{prefix}.{name}"] = (c,)
    spec[f"{prefix}.num_batches_tracked"] = ()


def mnv3_spec(mode):
    """ssl-small's MobileNetV3 backbone keys -> shapes (its ``fc`` head excluded)."""
    spec = {"features.0.0.weight": (16, 3, 3, 3)}
    _bn_keys(spec, "features.0.1", 16)
    for p, inp, hid, oup, k, _, se, _ in mnv3_blocks(mode):
        i = 0 if inp == hid else 3  # index of the depthwise conv
        if inp != hid:
            spec[f"{p}.0.weight"] = (hid, inp, 1, 1)
            _bn_keys(spec, f"{p}.1", hid)
        spec[f"{p}.{i}.weight"] = (hid, 1, k, k)
        _bn_keys(spec, f"{p}.{i + 1}", hid)
        if se:  # SE: conv.3 after dw-BN-act (no expansion) / conv.5 between dw-BN and act (expanded)
            r, q = _div8(hid // 4), f"{p}.{3 if inp == hid else 5}.fc"
            spec.update({f"{q}.0.weight": (r, hid), f"{q}.0.bias": (r,), f"{q}.2.weight": (hid, r),
                         f"{q}.2.bias": (hid,)})
        j = 7 if inp != hid else 4  # project conv: conv.7 (expanded) / conv.4 (no expansion)
        spec[f"{p}.{j}.weight"] = (oup, hid, 1, 1)
        _bn_keys(spec, f"{p}.{j + 1}", oup)
    last_in, last = mnv3_blocks(mode)[-1][3], mnv3_blocks(mode)[-1][2]
    spec["conv.0.weight"] = (last, last_in, 1, 1)
    _bn_keys(spec, "conv.1", last)
    spec.update({"classifier.0.weight": (MNV3_LAST[mode], last), "classifier.0.bias": (MNV3_LAST[mode],)})
    return spec


def random_state(spec, seed=0):
    """float64 values that keep activations O(1) through the net: conv ~ N(0, 1/fan_in), BN stats away from 0/1."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for k, shape in spec.items():
        if k.endswith("num_batches_tracked"):
            sd[k] = torch.tensor(7)
        elif k.endswith("running_var"):
            sd[k] = 0.5 + torch.rand(shape, generator=g, dtype=torch.float64)
        elif k.endswith("running_mean") or k.endswith("bias"):
            sd[k] = 0.2 * torch.randn(shape, generator=g, dtype=torch.float64)
        elif len(shape) == 1:  # BN gamma
            sd[k] = 0.5 + torch.rand(shape, generator=g, dtype=torch.float64)
        else:
            fan_in = math.prod(shape[1:])
            sd[k] = torch.randn(shape, generator=g, dtype=torch.float64) / math.sqrt(fan_in)
    return sd


def _bn(sd, p, x, eps):
    return F.batch_norm(x, sd[f"{p}.running_mean"], sd[f"{p}.running_var"], sd[f"{p}.weight"], sd[f"{p}.bias"],
                        training=False, eps=eps)


def _hsig(x):
    return torch.clamp(x + 3.0, 0.0, 6.0) / 6.0


def mnv3_reference(sd, mode, x, se_before_act=True, stem_stride=2):
    """The peer's forward, from the state dict: pooled (B, 1024 | 1280) features."""
    def act(y, hs):
        return y * _hsig(y) if hs else torch.clamp(y, min=0.0)

    def se(p, y):
        s = y.mean(dim=(2, 3))
        s = torch.clamp(s @ sd[f"{p}.fc.0.weight"].T + sd[f"{p}.fc.0.bias"], min=0.0)
        return y * _hsig(s @ sd[f"{p}.fc.2.weight"].T + sd[f"{p}.fc.2.bias"])[:, :, None, None]

    y = F.conv2d(x, sd["features.0.0.weight"], stride=stem_stride, padding=1)
    y = act(_bn(sd, "features.0.1", y, 1e-5), True)
    for p, inp, hid, oup, k, s, use_se, hs in mnv3_blocks(mode):
        z = y
        if inp == hid:
            z = act(_bn(sd, f"{p}.1", F.conv2d(z, sd[f"{p}.0.weight"], stride=s, padding=k // 2, groups=hid),
                        1e-5), hs)
            if use_se:
                z = se(f"{p}.3", z)
            z = _bn(sd, f"{p}.5", F.conv2d(z, sd[f"{p}.4.weight"]), 1e-5)
        else:
            z = act(_bn(sd, f"{p}.1", F.conv2d(z, sd[f"{p}.0.weight"]), 1e-5), hs)
            z = _bn(sd, f"{p}.4", F.conv2d(z, sd[f"{p}.3.weight"], stride=s, padding=k // 2, groups=hid), 1e-5)
            if use_se and se_before_act:
                z = act(se(f"{p}.5", z), hs)
            elif use_se:  # the paper's Figure 4 / timm order, for the sensitivity check only
                z = se(f"{p}.5", act(z, hs))
            else:
                z = act(z, hs)
            z = _bn(sd, f"{p}.8", F.conv2d(z, sd[f"{p}.7.weight"]), 1e-5)
        y = y + z if s == 1 and inp == oup else z
    y = act(_bn(sd, "conv.1", F.conv2d(y, sd["conv.0.weight"]), 1e-5), True)
    y = y.mean(dim=(2, 3)) @ sd["classifier.0.weight"].T + sd["classifier.0.bias"]
    return y * _hsig(y)


def _close(ours, ref, rtol=1e-10):
    err = ((ours - ref).abs().max() / ref.abs().max()).item()
    assert err < rtol, err
    return err


@pytest.mark.parametrize("mode", ["small", "large"])
def test_mobilenetv3_peer_state_dict_gives_peer_features(mode):
    spec = mnv3_spec(mode)
    sd = random_state(spec, seed=1)
    model = create_backbone(f"mobilenetv3_{mode}").double().eval()
    model.load_state_dict(sd, strict=True)
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == spec  # same keys, same shapes
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    with torch.no_grad():
        ours = model(x)
    ref = mnv3_reference(sd, mode, x)
    assert ours.shape == (2, MNV3_LAST[mode]) and ref.abs().max() > 0.1
    _close(ours, ref)
    # The reference can fail: the paper's SE-after-activation order gives another function (Small and Large).
    other = mnv3_reference(sd, mode, x, se_before_act=False)
    assert ((other - ref).abs().max() / ref.abs().max()) > 1e-4


def test_mobilenetv3_small_input_is_a_stride1_stem():
    sd = random_state(mnv3_spec("small"), seed=3)
    model = create_backbone("mobilenetv3_small", small_input=True).double().eval()
    model.load_state_dict(sd, strict=True)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    with torch.no_grad():
        _close(model(x), mnv3_reference(sd, "small", x, stem_stride=1))


# ---------------------------------------------------------------------------------------------------------------
# lukemelas EfficientNet-PyTorch B0: TensorFlow's block strings (utils.efficientnet), BN eps 1e-3.
B0_BLOCK_STRINGS = ["r1_k3_s11_e1_i32_o16_se0.25", "r2_k3_s22_e6_i16_o24_se0.25", "r2_k5_s22_e6_i24_o40_se0.25",
                    "r3_k3_s22_e6_i40_o80_se0.25", "r3_k5_s11_e6_i80_o112_se0.25", "r4_k5_s22_e6_i112_o192_se0.25",
                    "r1_k3_s11_e6_i192_o320_se0.25"]


def b0_blocks():
    """Per block: (prefix, inp, oup, expand, k, stride, squeezed)."""
    out = []
    for s in B0_BLOCK_STRINGS:
        o = dict(re.match(r"([a-z]+)(.*)", part).groups() for part in s.split("_"))
        r, k, st, e, i, oc = int(o["r"]), int(o["k"]), int(o["s"][0]), int(o["e"]), int(o["i"]), int(o["o"])
        for j in range(r):
            inp = i if j == 0 else oc
            out.append((f"_blocks.{len(out)}", inp, oc, e, k, st if j == 0 else 1, max(1, int(inp * float(o["se"])))))
    return out


def b0_spec():
    spec = {"_conv_stem.weight": (32, 3, 3, 3)}
    _bn_keys(spec, "_bn0", 32)
    for p, inp, oup, e, k, _, sq in b0_blocks():
        hid = inp * e
        if e != 1:
            spec[f"{p}._expand_conv.weight"] = (hid, inp, 1, 1)
            _bn_keys(spec, f"{p}._bn0", hid)
        spec[f"{p}._depthwise_conv.weight"] = (hid, 1, k, k)
        _bn_keys(spec, f"{p}._bn1", hid)
        spec.update({f"{p}._se_reduce.weight": (sq, hid, 1, 1), f"{p}._se_reduce.bias": (sq,),
                     f"{p}._se_expand.weight": (hid, sq, 1, 1), f"{p}._se_expand.bias": (hid,)})
        spec[f"{p}._project_conv.weight"] = (oup, hid, 1, 1)
        _bn_keys(spec, f"{p}._bn2", oup)
    spec["_conv_head.weight"] = (1280, 320, 1, 1)
    _bn_keys(spec, "_bn1", 1280)
    return spec


def _static_pad(size, k, s):
    """lukemelas' Conv2dStaticSamePadding for a nominal input side: (left, right)."""
    pad = max((math.ceil(size / s) - 1) * s + (k - 1) + 1 - size, 0)
    return pad // 2, pad - pad // 2


def b0_reference(sd, x, nominal=224):
    """The peer's ``from_name('efficientnet-b0')`` forward: padding precomputed for a ``nominal`` input side."""
    def conv(y, w, size, s=1, groups=1, bias=None):
        a, b = _static_pad(size, w.shape[-1], s)
        return F.conv2d(F.pad(y, (a, b, a, b)), w, bias, stride=s, groups=groups)

    def swish(y):
        return y * torch.sigmoid(y)

    size = nominal
    y = swish(_bn(sd, "_bn0", conv(x, sd["_conv_stem.weight"], size, 2), 1e-3))
    size = math.ceil(size / 2)
    for p, inp, oup, e, _, s, _ in b0_blocks():
        z = y
        if e != 1:
            z = swish(_bn(sd, f"{p}._bn0", conv(z, sd[f"{p}._expand_conv.weight"], size), 1e-3))
        z = swish(_bn(sd, f"{p}._bn1", conv(z, sd[f"{p}._depthwise_conv.weight"], size, s, groups=z.shape[1]), 1e-3))
        size = math.ceil(size / s)
        q = swish(F.conv2d(z.mean(dim=(2, 3), keepdim=True), sd[f"{p}._se_reduce.weight"], sd[f"{p}._se_reduce.bias"]))
        z = torch.sigmoid(F.conv2d(q, sd[f"{p}._se_expand.weight"], sd[f"{p}._se_expand.bias"])) * z
        z = _bn(sd, f"{p}._bn2", F.conv2d(z, sd[f"{p}._project_conv.weight"]), 1e-3)
        y = y + z if s == 1 and inp == oup else z
    y = swish(_bn(sd, "_bn1", F.conv2d(y, sd["_conv_head.weight"]), 1e-3))
    return y.mean(dim=(2, 3))


def test_efficientnet_b0_peer_state_dict_gives_peer_features():
    spec = b0_spec()
    assert len(b0_blocks()) == 16
    sd = random_state(spec, seed=5)
    model = create_backbone("efficientnet_b0").double().eval()
    model.load_state_dict(sd, strict=True)
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == spec
    # 64 is a multiple of 32: the peer's padding (precomputed for 224) equals "SAME" computed from the input.
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    with torch.no_grad():
        ours = model(x)
    ref = b0_reference(sd, x)
    assert ours.shape == (2, 1280) and ref.abs().max() > 0.1
    _close(ours, ref)
    # Sensitivity: PyTorch's BN eps (1e-5) instead of TensorFlow's 1e-3 is visible.
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.eps = 1e-5
    with torch.no_grad():
        assert ((model(x) - ref).abs().max() / ref.abs().max()) > 1e-5


def test_efficientnet_training_settings_and_same_padding():
    model = create_backbone("efficientnet_b0")
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert {(m.eps, m.momentum) for m in bns} == {(1e-3, 0.01)}  # TF decay 0.99
    rates = [b.drop_connect_rate for b in model._blocks]
    assert rates[0] == 0.0 and rates[-1] == pytest.approx(0.2 * 15 / 16)
    assert model._dropout.p == 0.2
    # "SAME": output side ceil(n / s); the smaller half of the padding before.
    assert [same_padding(n, k, s) for n, k, s in [(224, 3, 2), (112, 5, 2), (7, 3, 1), (25, 5, 2), (1, 1, 1)]] == \
        [(0, 1), (1, 2), (1, 1), (2, 2), (0, 0)]
    with torch.no_grad():
        assert model.eval().forward_features(torch.randn(1, 3, 50, 50)).shape == (1, 1280, 2, 2)  # ceil(50 / 32)
    mnv3 = [m for m in create_backbone("mobilenetv3_small").modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert {(m.eps, m.momentum) for m in mnv3} == {(1e-5, 0.1)}


def test_drop_connect_drops_whole_samples():
    torch.manual_seed(0)
    y = drop_connect(torch.ones(400, 2, 3, 3), 0.25, training=True)
    per_sample = y.flatten(1)
    assert ((per_sample == 0).all(1) | (per_sample == 1 / 0.75).all(1)).all()  # 0 or 1/keep, per sample
    assert 0.15 < (per_sample[:, 0] == 0).float().mean() < 0.35
    assert torch.equal(drop_connect(torch.ones(4, 2, 3, 3), 0.25, training=False), torch.ones(4, 2, 3, 3))


# ---------------------------------------------------------------------------------------------------------------
# Parameter counts with a 1000-class classifier, as the papers report them: MobileNetV3-Small 2.5M, -Large 5.4M
# (Howard et al. 2019, Tables 3-4), EfficientNet-B0 5.3M (Tan & Le 2019, Table 2); equal to timm's implementations.
PAPER_PARAMS = {"mobilenetv3_small": (2_542_856, 2.5e6), "mobilenetv3_large": (5_483_032, 5.4e6),
                "efficientnet_b0": (5_288_548, 5.3e6)}


@pytest.mark.parametrize("name", sorted(PAPER_PARAMS))
def test_parameter_counts(name):
    exact, paper = PAPER_PARAMS[name]
    with torch.device("meta"):
        model, timm_model = create_backbone(name), create_backbone(f"timm_{name}")
    trunk = sum(p.numel() for p in model.parameters())
    with_classifier = trunk + model.num_features * 1000 + 1000
    assert with_classifier == exact and abs(with_classifier / paper - 1) < 0.02  # the papers give 2 digits
    assert trunk == sum(p.numel() for p in timm_model.parameters())


# ---------------------------------------------------------------------------------------------------------------
# layout_hint: a checkpoint of one implementation given to the other names the right -a.
def _keys(name):
    with torch.device("meta"):
        return list(create_backbone(name).state_dict())


@pytest.mark.parametrize("asked,ckpt,expected", [
    ("mobilenetv3_small", "timm_mobilenetv3_small", "-a timm_mobilenetv3_small"),
    ("mobilenetv3_large", "timm_mobilenetv3_large", "-a timm_mobilenetv3_large"),
    ("efficientnet_b0", "timm_efficientnet_b0", "-a timm_efficientnet_b0"),
    ("timm_mobilenetv3_small", "mobilenetv3_small", "-a mobilenetv3_small"),
    ("mobilenetv3_small_100", "mobilenetv3_small", "-a mobilenetv3_small"),
    ("timm_mobilenetv3_large", "mobilenetv3_large", "-a mobilenetv3_large"),
    ("mobilenetv3_large", "mobilenetv3_small", "-a mobilenetv3_small"),
    ("timm_efficientnet_b0", "efficientnet_b0", "-a efficientnet_b0"),
    ("resnet18", "efficientnet_b0", "-a efficientnet_b0"),
])
def test_layout_hint_names_the_right_arch(asked, ckpt, expected):
    msg = layout_hint(asked, _keys(ckpt))
    assert msg is not None and re.search(rf"use {re.escape(expected)}\b", msg), msg
    assert f"-a {asked} " in msg, msg  # says what was asked for


def test_layout_hint_on_the_peers_own_key_lists():
    """The keys written from the peers' layouts (not from our modules) are recognised too, with the head present."""
    assert "-a mobilenetv3_small" in layout_hint("timm_mobilenetv3_small", [*mnv3_spec("small"), "fc.weight"])
    assert "-a mobilenetv3_large" in layout_hint("mobilenetv3_small", list(mnv3_spec("large")))
    assert "-a efficientnet_b0" in layout_hint("timm_efficientnet_b0", [*b0_spec(), "_fc.weight", "_fc.bias"])
    b1_like = [*b0_spec(), "_blocks.16._bn1.weight"]
    assert "17 blocks" in layout_hint("efficientnet_b0", b1_like)


@pytest.mark.parametrize("asked,ckpt", [("mobilenetv3_small", "mobilenetv3_small"),
                                        ("efficientnet_b0", "efficientnet_b0"),
                                        ("timm_mobilenetv3_small", "timm_mobilenetv3_small"),
                                        ("mixnet_s", "timm_efficientnet_b0"),  # other timm nets share the names
                                        ("resnet18", "resnet18"), ("mobilenetv3_small", "resnet18")])
def test_layout_hint_is_silent_when_nothing_is_known_to_be_wrong(asked, ckpt):
    assert layout_hint(asked, _keys(ckpt)) is None
