"""SmallMapConv2d: the CPU small-map weight gradient equals torch's own convolution gradients."""

import copy

import pytest
import torch
import torch.nn as nn

import main_moco
from smallssl.backbones import create_backbone
from smallssl.backbones.small_map_conv import (
    MAX_OUTPUT_PIXELS,
    SmallMapConv2d,
    _output_pixels,
    use_matmul_weight_grad,
)


def _grads(conv: nn.Module, x: torch.Tensor, gy: torch.Tensor):
    x = x.clone().requires_grad_(True)
    conv.zero_grad()
    y = conv(x)
    y.backward(gy)
    return y.detach(), x.grad, conv.weight.grad.clone(), None if conv.bias is None else conv.bias.grad.clone()


# (in, out, kernel, stride, padding, dilation, bias, input side): 1x1 and 2x2 outputs, the centre-tap case,
# strided, no padding, dilation, 1x1 kernels, rectangular kernels, and a 4x4 output (native path)
GEOMETRIES = [
    (8, 6, 3, 1, 1, 1, False, 1),   # centre tap only: a linear map
    (8, 6, 3, 1, 1, 1, True, 2),
    (8, 6, 3, 2, 1, 1, False, 2),   # ResNet's strided first conv of layer4 at 32 px: 2x2 -> 1x1
    (8, 6, 1, 2, 0, 1, True, 2),    # the downsample 1x1 conv
    (5, 7, 3, 1, 0, 1, True, 3),    # no padding: 3x3 -> 1x1
    (5, 7, 3, 1, 2, 2, False, 2),   # dilation 2
    (5, 7, (1, 3), 1, (0, 1), 1, True, 1),
    (4, 4, 3, 1, 1, 1, True, 4),    # 16 output pixels: the native path
]


@pytest.mark.parametrize("cin,cout,k,s,p,d,bias,side", GEOMETRIES)
def test_gradients_equal_native(cin, cout, k, s, p, d, bias, side):
    torch.manual_seed(0)
    ref = nn.Conv2d(cin, cout, k, stride=s, padding=p, dilation=d, bias=bias).double()
    fast = copy.deepcopy(ref)
    assert use_matmul_weight_grad(fast) == 1 and type(fast) is SmallMapConv2d
    x = torch.randn(3, cin, side, side, dtype=torch.float64)
    gy = torch.randn_like(ref(x))
    # the matmul path is fp32-only: compare in fp32 against the float64 reference, and float64 through the
    # native fallback bit for bit
    for a, b in zip(_grads(ref, x, gy), _grads(fast, x, gy)):
        assert a is None and b is None or torch.equal(a, b)
    expect = _grads(ref, x, gy)
    fast32 = fast.float()
    got = _grads(fast32, x.float(), gy.float())
    for e, g in zip(expect, got):
        if e is not None:
            assert torch.allclose(g.double(), e, rtol=1e-5, atol=1e-5), (g.double() - e).abs().max()
    assert _output_pixels(fast32, x) == expect[0].shape[-2] * expect[0].shape[-1]


@pytest.mark.parametrize("shape,channels_last", [((1, 6, 1, 2), False), ((2, 6, 2, 1), True), ((1, 6, 1, 1), True),
                                                  ((3, 6, 2, 2), True)])
def test_batch_one_rectangular_maps_and_channels_last(monkeypatch, shape, channels_last):
    from smallssl.backbones import small_map_conv as smc

    calls = []
    real = smc._MatmulWeightGradConv.apply
    monkeypatch.setattr(smc._MatmulWeightGradConv, "apply", lambda *a: calls.append(1) or real(*a))
    torch.manual_seed(0)
    ref = nn.Conv2d(6, 5, 3, padding=1).double()
    fast = copy.deepcopy(ref).float()
    use_matmul_weight_grad(fast)
    x = torch.randn(shape, dtype=torch.float64)
    gy = torch.randn_like(ref(x))
    expect = _grads(ref, x, gy)
    xf, gyf = x.float(), gy.float()
    if channels_last:
        fast = fast.to(memory_format=torch.channels_last)
        xf, gyf = (t.contiguous(memory_format=torch.channels_last) for t in (xf, gyf))
    got = _grads(fast, xf, gyf)
    for e, g in zip(expect, got):
        assert g.shape == e.shape and torch.allclose(g.double(), e, rtol=1e-5, atol=1e-5), (g.double() - e).abs().max()
    # 1x1 inputs take the centre-tap linear map (no autograd Function); the other small maps the matmul path
    assert calls == ([] if shape[-2:] == (1, 1) else [1])


def test_matmul_path_taken_only_where_documented(monkeypatch):
    calls = []
    from smallssl.backbones import small_map_conv as smc
    real = smc._MatmulWeightGradConv.apply
    monkeypatch.setattr(smc._MatmulWeightGradConv, "apply", lambda *a: calls.append(1) or real(*a))
    conv = nn.Conv2d(4, 4, 3, padding=1)
    use_matmul_weight_grad(conv)
    small = torch.randn(2, 4, 2, 2)
    conv(small).sum().backward()
    assert calls == [1]  # 2x2 output, fp32, CPU, grad: matmul path
    with torch.no_grad():
        conv(small)
    conv(torch.randn(2, 4, 3, 3)).sum()  # 9 output pixels > MAX_OUTPUT_PIXELS
    with torch.autocast("cpu", dtype=torch.bfloat16):
        conv(small)
    conv.weight.requires_grad_(False)
    conv(small)
    assert calls == [1] and MAX_OUTPUT_PIXELS == 4


def test_switch_keeps_parameters_and_skips_grouped():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1, groups=8),
                          nn.Conv2d(8, 8, 3, padding="same"), nn.Conv2d(8, 8, 3, padding=1, padding_mode="reflect"))
    sd = copy.deepcopy(model.state_dict())
    assert use_matmul_weight_grad(model) == 1
    assert [type(m).__name__ for m in model] == ["SmallMapConv2d", "Conv2d", "Conv2d", "Conv2d"]
    assert model.state_dict().keys() == sd.keys() and all(torch.equal(model.state_dict()[k], v)
                                                          for k, v in sd.items())
    assert use_matmul_weight_grad(model) == 0  # idempotent


def test_resnet18_step_matches_native_and_trainer_switches():
    torch.manual_seed(0)
    ref = create_backbone("resnet18", small_input=False).double()  # float64: the reference
    native = copy.deepcopy(ref).float()
    fast = copy.deepcopy(native)
    assert use_matmul_weight_grad(fast) == 20  # every conv of a ResNet-18 (groups 1)
    x = torch.randn(4, 3, 32, 32, dtype=torch.float64)
    for m in (ref, native, fast):
        m(x.to(next(m.parameters()).dtype)).square().mean().backward()
    for (name, p), q, r in zip(ref.named_parameters(), native.parameters(), fast.parameters()):
        scale = p.grad.abs().max().item()
        err_native = (q.grad.double() - p.grad).abs().max().item()
        err_fast = (r.grad.double() - p.grad).abs().max().item()
        # the kernel rule of DESIGN.md: err(new path) <= 2 * err(torch, same dtype) + atol, against float64
        assert err_fast <= 2 * err_native + 1e-6 * scale, (name, err_fast, err_native)
    parse = main_moco.get_args_parser().parse_args
    auto = main_moco.build_backbone(parse(["d", "-a", "resnet18", "--image-size", "32", "--no-small-input"]))
    native = main_moco.build_backbone(parse(["d", "-a", "resnet18", "--image-size", "32", "--no-small-input",
                                             "--conv-wgrad", "native"]))
    assert sum(type(m) is SmallMapConv2d for m in auto.modules()) == 20
    assert not any(type(m) is SmallMapConv2d for m in native.modules())


def test_benchmark_table_runs(capsys):
    from experiments import bench_small_map_conv

    rows = bench_small_map_conv.main(["-b", "2", "--reps", "1", "--layers-only"])
    assert [r["layer"] for r in rows][:2] == ["conv3x3 512->512 on 1x1", "conv3x3 512->512 on 2x2"]
    assert all(r["rel_err"] < 1e-5 and r["native_ms"] > 0 and r["matmul_ms"] > 0 for r in rows)
    assert "| conv3x3 128->128 on 8x8 |" in capsys.readouterr().out
