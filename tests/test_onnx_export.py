"""ONNX export of pooled-feature backbones, checked against PyTorch with onnxruntime."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

pytest.importorskip("onnx")

from smallssl.onnx_export import export_onnx, measure_latency  # noqa: E402


class TinyNet(nn.Module):
    """Conv + BN + global pool: (B, 3, H, W) -> (B, 8)."""

    num_features = 8

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                  nn.AdaptiveAvgPool2d(1), nn.Flatten())

    def forward(self, x):
        return self.body(x)


class DriftingNet(TinyNet):
    """Adds a Python-side call counter: the traced graph freezes it, so ONNX and PyTorch disagree by >= 1."""

    calls = 0

    def forward(self, x):
        DriftingNet.calls += 1
        return self.body(x) + DriftingNet.calls


def test_export_tiny_and_dynamic_batch(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    import onnx

    net = TinyNet().train()
    info = export_onnx(net, str(tmp_path / "tiny.onnx"), image_size=(12, 10), opset=17, check_batch=5)
    assert net.training  # the caller's module is not switched to eval
    assert info["checked"] and info["max_abs_diff"] < 1e-5 and info["num_features"] == 8
    assert info["image_size"] == [12, 10] and info["onnxruntime"] == ort.__version__
    model = onnx.load(str(tmp_path / "tiny.onnx"))
    assert model.opset_import[0].version == 17
    dims = model.graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param == "batch" and [d.dim_value for d in dims[1:]] == [3, 12, 10]
    sess = ort.InferenceSession(str(tmp_path / "tiny.onnx"), providers=["CPUExecutionProvider"])
    x = torch.randn(7, 3, 12, 10)
    out = sess.run(None, {"images": x.numpy()})[0]
    assert torch.allclose(torch.from_numpy(out), net.eval()(x).detach(), atol=1e-5)
    assert export_onnx(TinyNet(), str(tmp_path / "t16.onnx"), 8, opset=16)["opset"] == 16


def test_export_mismatch_raises(tmp_path):
    pytest.importorskip("onnxruntime")
    with pytest.raises(RuntimeError, match="does not match PyTorch: max abs diff"):
        export_onnx(DriftingNet(), str(tmp_path / "drift.onnx"), 8)
    # a loose enough tolerance accepts the same drift
    info = export_onnx(DriftingNet(), str(tmp_path / "drift.onnx"), 8, atol=10.0)
    assert info["max_abs_diff"] == pytest.approx(1.0, abs=1e-4)


def test_bad_input(tmp_path):
    with pytest.raises(ValueError, match="image_size"):
        export_onnx(TinyNet(), str(tmp_path / "x.onnx"), 0)
    with pytest.raises(ValueError, match="check_batch"):
        export_onnx(TinyNet(), str(tmp_path / "x.onnx"), 8, check_batch=0)


def test_measure_latency(tmp_path):
    pytest.importorskip("onnxruntime")
    path = str(tmp_path / "tiny.onnx")
    export_onnx(TinyNet(), path, 16)
    lat = measure_latency(path, 16, batch=2, runs=5, warmup=1, threads=1)
    assert lat["runs"] == 5 and lat["batch"] == 2 and lat["threads"] == 1
    assert 0 < lat["min"] <= lat["median"] <= lat["p90"] and lat["img_per_s"] == pytest.approx(2e3 / lat["median"])
    with pytest.raises(ValueError, match="runs"):
        measure_latency(path, 16, runs=0)


@pytest.mark.slow
def test_export_resnet18_cifar_stem(tmp_path):
    pytest.importorskip("onnxruntime")
    from smallssl.backbones import create_backbone

    torch.manual_seed(0)
    info = export_onnx(create_backbone("resnet18", small_input=True), str(tmp_path / "r18.onnx"), 32)
    assert info["checked"] and info["num_features"] == 512
    assert info["max_abs_diff"] < 1e-4  # measured 4.8e-6 on CPU (features of magnitude ~5)


@pytest.mark.slow
def test_convert_onnx_cli_exports_the_checkpoint_weights(tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    import numpy as np
    import onnxruntime as ort

    from smallssl.backbones import create_backbone
    from smallssl.convert import main as convert

    torch.manual_seed(1)
    net = create_backbone("resnet18", small_input=True).eval()
    torch.save({"state_dict": net.state_dict()}, tmp_path / "c.pth.tar")  # a torchvision-layout state dict
    convert(["onnx", str(tmp_path / "c.pth.tar"), str(tmp_path / "r.onnx"), "-a", "resnet18", "--image-size", "32"])
    assert "checked True" in capsys.readouterr().out
    x = torch.randn(2, 3, 32, 32)
    sess = ort.InferenceSession(str(tmp_path / "r.onnx"), providers=["CPUExecutionProvider"])
    got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        np.testing.assert_allclose(got, net(x).numpy(), rtol=1e-3, atol=1e-4)  # the checkpoint's weights, not init
