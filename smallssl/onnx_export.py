"""ONNX export of a pooled-feature backbone, checked against PyTorch with onnxruntime, and its latency.

The exported graph maps ``images`` (B, 3, H, W) float32, already normalised like training's inputs, to
``features`` (B, num_features), with a dynamic batch axis; H and W are fixed at export. It is written with
PyTorch's TorchScript-based exporter (``dynamo=False``), which honours ``opset`` 17 and needs no onnxscript;
the torch.export-based exporter (torch 2.14, onnxscript 0.7) asked for opset 17 on a ResNet-18 failed to convert
its opset-18 graph down and wrote opset 18.

Needs the ``onnx`` extra (``pip install -e .[onnx]``: onnx + onnxruntime). Without onnxruntime the export still
runs and the check is skipped (``checked: False`` in the result).

A checkpoint is exported by building its backbone and loading it first (the CLI does this)::

    backbone = create_backbone(arch, small_input=small_input)          # smallssl.backbones
    smallssl.checkpoints.load.load_backbone(backbone, ckpt_path)        # any supported layout
    export_onnx(backbone, out_path, image_size)
"""

from __future__ import annotations

import copy
import os
import statistics
import time
import warnings

import torch
import torch.nn as nn


def _hw(image_size: int | tuple[int, int]) -> tuple[int, int]:
    hw = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    if len(hw) != 2 or any(not isinstance(s, int) or s < 1 for s in hw):
        raise ValueError(f"image_size must be a positive int or (H, W), got {image_size!r}")
    return hw


def _onnxruntime():
    try:
        import onnxruntime
    except ImportError:
        return None
    return onnxruntime


def _session(onnx_path: str, threads: int | None = None):
    ort = _onnxruntime()
    if ort is None:
        raise ValueError("onnxruntime is not installed: pip install -e .[onnx] (or pip install onnxruntime)")
    opts = ort.SessionOptions()
    if threads is not None:
        opts.intra_op_num_threads = threads
    return ort.InferenceSession(onnx_path, sess_options=opts, providers=["CPUExecutionProvider"])


@torch.no_grad()
def export_onnx(backbone: nn.Module, out_path: str, image_size: int | tuple[int, int], opset: int = 17,
                check_batch: int = 3, atol: float = 1e-4, rtol: float = 1e-3, seed: int = 0) -> dict:
    """Export ``backbone`` (eval mode, on CPU) to ``out_path`` and check it with onnxruntime when installed.

    Args:
        backbone: module mapping (B, 3, H, W) to pooled (B, num_features) features; not modified (a CPU copy is
            exported).
        image_size: S or (H, W) of the exported graph's input.
        opset: ONNX opset version.
        check_batch: rows of the random check batch (differs from the export batch of 2, so the dynamic batch axis
            is exercised).
        atol, rtol: the check fails when ``max |onnx - torch| > atol + rtol * max |torch|``.
        seed: seed of the random check batch.
    Returns:
        dict with ``path``, ``opset``, ``image_size`` [H, W], ``num_features``, ``bytes``, ``checked`` (bool),
        ``max_abs_diff`` (float, or None when not checked), ``tolerance`` and ``onnxruntime`` (version or None).
    Raises:
        RuntimeError when onnxruntime's features differ from PyTorch's by more than the tolerance.
    """
    h, w = _hw(image_size)
    if check_batch < 1:
        raise ValueError(f"check_batch must be >= 1, got {check_batch}")
    model = copy.deepcopy(backbone).cpu().float().eval()  # the caller's module keeps its device and mode
    d = os.path.dirname(os.path.abspath(out_path))
    os.makedirs(d, exist_ok=True)
    tmp = out_path + ".tmp"
    with warnings.catch_warnings():
        # the TorchScript exporter is deprecated in favour of torch.export; it is chosen on purpose (module doc)
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(model, (torch.zeros(2, 3, h, w),), tmp, dynamo=False, opset_version=opset,
                          input_names=["images"], output_names=["features"],
                          dynamic_axes={"images": {0: "batch"}, "features": {0: "batch"}})
    os.replace(tmp, out_path)  # a reader never sees half a model
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(check_batch, 3, h, w, generator=g)
    ref = model(x)
    if ref.dim() != 2:
        raise ValueError(f"backbone must return pooled (B, num_features) features, got shape {tuple(ref.shape)}")
    ort = _onnxruntime()
    info = {"path": out_path, "opset": opset, "image_size": [h, w], "num_features": int(ref.shape[1]),
            "bytes": os.path.getsize(out_path), "checked": False, "max_abs_diff": None,
            "tolerance": atol + rtol * float(ref.abs().max()), "onnxruntime": None if ort is None else ort.__version__}
    if ort is None:
        return info
    out = torch.from_numpy(_session(out_path).run(["features"], {"images": x.numpy()})[0])
    if out.shape != ref.shape:
        raise RuntimeError(f"onnxruntime returned shape {tuple(out.shape)} for {out_path}, PyTorch {tuple(ref.shape)}")
    diff = float((out - ref).abs().max())
    info.update(checked=True, max_abs_diff=diff)
    if not diff <= info["tolerance"]:  # also catches NaN
        raise RuntimeError(f"ONNX export {out_path} does not match PyTorch: max abs diff {diff:.3g} > tolerance "
                           f"{info['tolerance']:.3g} (atol {atol:g} + rtol {rtol:g} x max|features|); an op may be "
                           "exported differently at this opset, or the forward depends on Python state")
    return info


def measure_latency(onnx_path: str, image_size: int | tuple[int, int], batch: int = 1, runs: int = 50,
                    warmup: int = 5, threads: int | None = None, seed: int = 0) -> dict:
    """Wall-clock latency of onnxruntime (CPU provider) on one random (batch, 3, H, W) input, ``runs`` times.

    ``threads``: onnxruntime intra-op threads (None: its default, all cores). Returns ms ``mean``, ``median``,
    ``min``, ``p90`` and ``batch``, ``runs``, ``threads``, ``img_per_s`` (from the median).
    """
    h, w = _hw(image_size)
    if batch < 1 or runs < 1 or warmup < 0:
        raise ValueError(f"need batch >= 1, runs >= 1, warmup >= 0; got batch={batch}, runs={runs}, warmup={warmup}")
    sess = _session(onnx_path, threads)
    name = sess.get_inputs()[0].name
    x = torch.randn(batch, 3, h, w, generator=torch.Generator().manual_seed(seed)).numpy()
    for _ in range(warmup):
        sess.run(None, {name: x})
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        sess.run(None, {name: x})
        times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    median = statistics.median(times)
    return {"mean": statistics.fmean(times), "median": median, "min": times[0],
            "p90": times[min(len(times) - 1, int(0.9 * len(times)))], "batch": batch, "runs": runs,
            "threads": threads, "img_per_s": batch * 1e3 / median}
