"""A faster weight gradient for convolutions on tiny feature maps, on CPU.

Why: torch's oneDNN (mkldnn) path computes the weight gradient of a convolution whose output map is 1x1 or 2x2
very slowly on CPU. Measured on the 2-core AMD EPYC (AVX2) of this project's CI machine, torch 2.14.1, batch 128,
3x3 convolution, stride 1, padding 1 (``python -m experiments.bench_small_map_conv``)::

    channels  map   oneDNN weight grad   im2col matmul
    512       1x1   175 ms               17 ms
    512       2x2   184 ms               53 ms
    256       2x2    23 ms               14 ms
    256       4x4    31 ms               42 ms   <- oneDNN wins from 4x4 up
    ResNet-18 (ImageNet stem) forward + backward at 32 px: 1137 ms -> 412 ms (2.8x); at 64 px 2011 -> 1640 ms

The first row is ~3 GFLOP/s on a machine whose matmul runs ~90 GFLOP/s. ResNet-18's layer4 sits on a 1x1 map at
32 px with the ImageNet stem and on 2x2 at 64 px, so this one gradient made the 32 px training step ~2.8x slower
than it needs to be. The weight gradient of a convolution is a matmul of the output gradient with the unfolded
input (im2col): ``grad_W = sum_{b,l} grad_y[b, :, l] x cols[b, :, l]^T``, cheap to materialise when the map has at
most :data:`MAX_OUTPUT_PIXELS` pixels. Forward and the input gradient stay on the native path, except on a 1x1
input whose zero padding covers every tap but the centre (ResNet's layer4 at 32 px): that convolution is exactly a
linear map with the centre tap, and oneDNN's forward spends 9x its FLOPs on padding zeros.

:func:`use_matmul_weight_grad` switches every plain ``nn.Conv2d`` of a module to :class:`SmallMapConv2d` (same
parameters, same ``state_dict``); the matmul path runs only on CPU, fp32, outside autocast, when gradients are
needed and the output map is at most :data:`MAX_OUTPUT_PIXELS` pixels; every other call is ``nn.Conv2d.forward``.
The result equals the native gradient up to float summation order (relative 5e-7 in the measurement above).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

# Output maps up to 2x2 take the matmul path: it won at 1x1 and 2x2 for 256 and 512 channels and lost at 4x4.
MAX_OUTPUT_PIXELS = 4


class _MatmulWeightGradConv(torch.autograd.Function):
    """``F.conv2d`` (groups=1, zero padding) whose weight gradient is an im2col matmul."""

    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding, dilation):
        ctx.save_for_backward(x, weight)
        ctx.geometry = (stride, padding, dilation)
        ctx.has_bias = bias is not None
        return F.conv2d(x, weight, bias, stride, padding, dilation)

    @staticmethod
    def backward(ctx, grad_y):
        x, weight = ctx.saved_tensors
        stride, padding, dilation = ctx.geometry
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.ops.aten.convolution_backward(
                grad_y, x, weight, None, stride, padding, dilation, False, (0, 0), 1, (True, False, False))[0]
        if ctx.needs_input_grad[1]:
            out_ch = weight.shape[0]
            cols = F.unfold(x, weight.shape[2:], dilation=dilation, padding=padding, stride=stride)  # B, Cin*kh*kw, L
            g = grad_y.reshape(grad_y.shape[0], out_ch, -1)  # B, Cout, L
            # (Cout, B*L) @ (B*L, Cin*kh*kw): one GEMM over every (image, output pixel) pair
            grad_w = (g.transpose(1, 2).reshape(-1, out_ch).t() @ cols.transpose(1, 2).reshape(-1, cols.shape[1]))
            grad_w = grad_w.view_as(weight)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad_y.sum((0, 2, 3))
        return grad_x, grad_w, grad_b, None, None, None


def _output_pixels(conv: nn.Conv2d, x: torch.Tensor) -> int:
    n = 1
    for size, k, s, p, d in zip(x.shape[-2:], conv.kernel_size, conv.stride, conv.padding, conv.dilation):
        n *= (size + 2 * p - d * (k - 1) - 1) // s + 1
    return n


class SmallMapConv2d(nn.Conv2d):
    """``nn.Conv2d`` whose weight gradient on tiny CPU maps is an im2col matmul (see the module docstring)."""

    def _matmul_path(self, x: torch.Tensor) -> bool:
        return (x.device.type == "cpu" and x.dtype == torch.float32 and self.weight.dtype == torch.float32
                and self.weight.requires_grad and torch.is_grad_enabled()
                and not torch.is_autocast_enabled("cpu") and x.dim() == 4
                and _output_pixels(self, x) <= MAX_OUTPUT_PIXELS)

    def _center_tap_only(self, x: torch.Tensor) -> bool:
        """A 1x1 input whose zero padding covers every tap but the centre: the convolution is a linear map."""
        return x.shape[-2:] == (1, 1) and all(k % 2 == 1 and p == k // 2 and d == 1 for k, p, d in zip(
            self.kernel_size, self.padding, self.dilation))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self._matmul_path(x):
            return super().forward(x)
        if self._center_tap_only(x):  # oneDNN multiplies all 9 taps of a 3x3 kernel, 8 of them by padding zeros
            kh, kw = self.kernel_size
            w = self.weight[:, :, kh // 2, kw // 2]
            return F.linear(x.flatten(1), w, self.bias)[:, :, None, None]
        return _MatmulWeightGradConv.apply(x, self.weight, self.bias, self.stride, self.padding, self.dilation)


def _eligible(m: nn.Module) -> bool:
    return (type(m) is nn.Conv2d and m.groups == 1 and m.padding_mode == "zeros"
            and isinstance(m.padding, tuple))


def use_matmul_weight_grad(model: nn.Module) -> int:
    """Switch every plain ``nn.Conv2d`` (groups 1, zero padding) in ``model`` to :class:`SmallMapConv2d` in place.

    Parameters, buffers and ``state_dict`` keys are unchanged; returns how many convolutions were switched.
    """
    n = 0
    for m in model.modules():
        if _eligible(m):
            m.__class__ = SmallMapConv2d
            n += 1
    return n
