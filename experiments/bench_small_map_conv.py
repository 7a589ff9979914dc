"""The CPU weight gradient of convolutions on tiny maps: torch's own (oneDNN) vs smallssl's im2col matmul.

    python -m experiments.bench_small_map_conv            # per-layer table, then ResNet-18 fwd+bwd at 32 / 64 px

Each row times both paths alternately in the same loop (these machines are shared and noisy: compare the ratio,
not the milliseconds across runs). Batch 128, fp32, the torch threads of the process.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from smallssl.backbones import create_backbone
from smallssl.backbones.small_map_conv import MAX_OUTPUT_PIXELS, use_matmul_weight_grad
from smallssl.errors import run_cli

LAYERS = [(512, 1), (512, 2), (256, 2), (256, 4), (128, 4), (128, 8)]  # (channels, map side), 3x3, padding 1


def _paired(fns: list, reps: int) -> list[float]:
    """Median ms of each callable, timed round-robin so a noisy neighbour hits all of them alike."""
    for fn in fns:
        fn()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(reps):
        for t, fn in zip(times, fns):
            t0 = time.perf_counter()
            fn()
            t.append(time.perf_counter() - t0)
    return [1e3 * sorted(t)[len(t) // 2] for t in times]


def _weight_grad_paths(x: torch.Tensor, w: torch.Tensor, gy: torch.Tensor) -> tuple:
    """torch's weight gradient of a 3x3, padding-1 convolution, and the im2col matmul, as two callables."""
    ch = w.shape[1]

    def native() -> torch.Tensor:
        return torch.ops.aten.convolution_backward(gy, x, w, None, (1, 1), (1, 1), (1, 1), False, (0, 0), 1,
                                                   (False, True, False))[1]

    def matmul() -> torch.Tensor:
        cols = F.unfold(x, 3, padding=1).transpose(1, 2).reshape(-1, ch * 9)
        return (gy.flatten(2).transpose(1, 2).reshape(-1, w.shape[0]).t() @ cols).view_as(w)

    return native, matmul


def layer_rows(batch: int, reps: int) -> list[dict]:
    rows = []
    for ch, side in LAYERS:
        native, matmul = _weight_grad_paths(torch.randn(batch, ch, side, side), torch.randn(ch, ch, 3, 3) * 0.01,
                                            torch.randn(batch, ch, side, side))
        ref = native()
        err = ((matmul() - ref).abs().max() / ref.abs().max()).item()
        t_native, t_mm = _paired([native, matmul], reps)
        rows.append({"layer": f"conv3x3 {ch}->{ch} on {side}x{side}", "native_ms": t_native, "matmul_ms": t_mm,
                     "rel_err": err})
    return rows


def _train_step(model: nn.Module, x: torch.Tensor):
    return lambda: (model.zero_grad(), model(x).square().mean().backward())


def model_rows(batch: int, reps: int) -> list[dict]:
    rows = []
    for size in (32, 64):
        torch.manual_seed(0)
        native = create_backbone("resnet18", small_input=False)
        fast = copy.deepcopy(native)
        use_matmul_weight_grad(fast)
        x = torch.randn(batch, 3, size, size)
        t_native, t_mm = _paired([_train_step(native, x), _train_step(fast, x)], reps)
        err = max(((p.grad - q.grad).abs().max() / p.grad.abs().max().clamp_min(1e-30)).item()
                  for p, q in zip(native.parameters(), fast.parameters()))
        rows.append({"layer": f"resnet18 (ImageNet stem) fwd+bwd at {size} px", "native_ms": t_native,
                     "matmul_ms": t_mm, "rel_err": err})
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-b", "--batch-size", type=int, default=128)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--layers-only", action="store_true")
    a = p.parse_args(argv)
    if a.batch_size < 1 or a.reps < 1:
        raise ValueError("--batch-size and --reps must be >= 1")
    rows = layer_rows(a.batch_size, a.reps) + ([] if a.layers_only else model_rows(a.batch_size, a.reps))
    print(f"batch {a.batch_size}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"the model rows take the matmul path for output maps of <= {MAX_OUTPUT_PIXELS} pixels")
    lines = ["| what | torch (oneDNN) ms | smallssl ms | speed-up | max rel. diff |", "|---|---|---|---|---|"]
    lines += [f"| {r['layer']} | {r['native_ms']:.1f} | {r['matmul_ms']:.1f} | {r['native_ms'] / r['matmul_ms']:.2f}x"
              f" | {r['rel_err']:.1e} |" for r in rows]
    print("\n".join(lines))
    return rows


if __name__ == "__main__":
    sys.exit(run_cli(main))
