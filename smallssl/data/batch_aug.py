"""Batched augmentations on image tensors: one call augments a whole batch, on the CPU or the GPU.

The PIL pipeline of :mod:`smallssl.data.transforms` costs per image and per transform in Python; on a 2-core CPU with
32 px images it takes about as long as the model step. These functions draw every random parameter per
sample and apply it to the whole batch with tensor ops (``affine_grid``/``grid_sample`` for the crop, exact
HSV arithmetic for the hue), so augmentation becomes a few vectorised passes over the batch.

Semantics follow torchvision's transforms (tested against them with fixed parameters):

- ``RandomResizedCrop(size, scale, ratio)`` + horizontal flip: area fraction uniform in ``scale``, aspect ratio
  log-uniform in ``ratio``, a box that does not fit is clipped to the image (torchvision retries 10 times and
  then falls back to a centre crop), bilinear resampling of the box to ``size``;
- ``ColorJitter(b, c, s, h)`` applied with probability ``p``: brightness, contrast (blend with the mean grey
  level of the image), saturation (blend with the grey image), hue (shift in HSV); the four are applied in a
  random order, drawn once per batch (torchvision draws it per image);
- ``RandomApply([GaussianBlur(k, sigma=(0.1, 2))], p)`` (per-sample sigma, reflect padding);
- ``RandomGrayscale(p)`` (ITU-R 601 luma, as torchvision), ``RandomSolarize(0.5, p)`` (BYOL);
- normalisation with the ImageNet mean and std.

Images are uint8 ``(N, 3, H, W)`` or float in [0, 1]; the output is float, normalised.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .transforms import IMAGENET_MEAN, IMAGENET_STD, blur_kernel_size


def _uniform(n: int, lo: float, hi: float, g: torch.Generator | None, device) -> torch.Tensor:
    return torch.rand(n, generator=g, device=device) * (hi - lo) + lo


def grayscale(x: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) -> (N, 1, H, W) luma, torchvision's weights."""
    return (0.2989 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]).unsqueeze(1)


def adjust_brightness(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    return (x * f.view(-1, 1, 1, 1)).clamp_(0, 1)


def adjust_contrast(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    mean = grayscale(x).mean(dim=(1, 2, 3), keepdim=True)
    f = f.view(-1, 1, 1, 1)
    return (f * x + (1 - f) * mean).clamp_(0, 1)


def adjust_saturation(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    f = f.view(-1, 1, 1, 1)
    return (f * x + (1 - f) * grayscale(x)).clamp_(0, 1)


def rgb_to_hsv(x: torch.Tensor) -> torch.Tensor:
    r, g, b = x.unbind(1)
    maxc, minc = x.amax(1), x.amin(1)
    cr = maxc - minc
    s = cr / torch.where(maxc == 0, torch.ones_like(maxc), maxc)
    crd = torch.where(cr == 0, torch.ones_like(cr), cr)
    rc, gc, bc = (maxc - r) / crd, (maxc - g) / crd, (maxc - b) / crd
    h = torch.where(maxc == r, bc - gc, torch.where(maxc == g, 2.0 + rc - bc, 4.0 + gc - rc))
    h = torch.where(cr == 0, torch.zeros_like(h), (h / 6.0) % 1.0)
    return torch.stack([h, s, maxc], 1)


def hsv_to_rgb(x: torch.Tensor) -> torch.Tensor:
    h, s, v = x.unbind(1)
    i = torch.floor(h * 6.0)
    f = h * 6.0 - i
    i = i.long() % 6
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    # For each sector i in 0..5 the (r, g, b) triple is a fixed choice among (v, q, p, t).
    cand = torch.stack([v, q, p, t], 1)  # (N, 4, H, W)
    table = torch.tensor([[0, 3, 2], [1, 0, 2], [2, 0, 3], [2, 1, 0], [3, 2, 0], [0, 2, 1]], device=x.device)
    idx = table[i].permute(0, 3, 1, 2)  # (N, 3, H, W)
    return cand.gather(1, idx)


def adjust_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    hsv = rgb_to_hsv(x)
    hsv[:, 0] = (hsv[:, 0] + shift.view(-1, 1, 1)) % 1.0
    return hsv_to_rgb(hsv)


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """Per-sample Gaussian blur (sigma (N,), odd ``kernel_size``), reflect padding, as torchvision's."""
    n, c, h, w = x.shape
    half = kernel_size // 2
    t = torch.arange(-half, half + 1, device=x.device, dtype=x.dtype)
    k = torch.exp(-0.5 * (t.view(1, -1) / sigma.view(-1, 1).to(x.dtype)) ** 2)
    k = (k / k.sum(1, keepdim=True)).repeat_interleave(c, 0)  # (N*C, k): one kernel per image channel
    y = F.pad(x.reshape(1, n * c, h, w), (half, half, half, half), mode="reflect")
    y = F.conv2d(y, k.view(n * c, 1, 1, kernel_size), groups=n * c)
    y = F.conv2d(y, k.view(n * c, 1, kernel_size, 1), groups=n * c)
    return y.view(n, c, h, w)


def crop_flip_grid(n: int, size: int, scale: tuple[float, float], ratio: tuple[float, float], flip_p: float,
                   g: torch.Generator | None, device) -> torch.Tensor:
    """Sampling grid (n, size, size, 2) of random resized crops, mirrored with probability ``flip_p``."""
    area = _uniform(n, scale[0], scale[1], g, device)
    r = torch.exp(_uniform(n, math.log(ratio[0]), math.log(ratio[1]), g, device))
    w = torch.sqrt(area * r).clamp(max=1.0)  # fraction of the image width
    h = torch.sqrt(area / r).clamp(max=1.0)
    cx = (torch.rand(n, generator=g, device=device) * 2 - 1) * (1 - w)
    cy = (torch.rand(n, generator=g, device=device) * 2 - 1) * (1 - h)
    flip = torch.where(torch.rand(n, generator=g, device=device) < flip_p, -1.0, 1.0)
    theta = torch.zeros(n, 2, 3, device=device)
    theta[:, 0, 0], theta[:, 0, 2] = w * flip, cx
    theta[:, 1, 1], theta[:, 1, 2] = h, cy
    return F.affine_grid(theta, [n, 3, size, size], align_corners=False)


@dataclass
class BatchAugment:
    """One view's augmentation; ``__call__(images, generator)`` returns a normalised float batch.

    Defaults are MoCo v2's (``--aug-plus``) without the blur: crop scale (0.2, 1), jitter (0.4, 0.4, 0.4, 0.1)
    with p 0.8, grey p 0.2, flip p 0.5.
    """

    size: int = 32
    scale: tuple[float, float] = (0.2, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_p: float = 0.5
    jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.4, 0.1)
    jitter_p: float = 0.8
    grey_p: float = 0.2
    blur_p: float = 0.0
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    blur_kernel: int = 0  # 0: smallssl.data.blur_kernel_size(size), as the PIL pipeline
    solarize_p: float = 0.0
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def __call__(self, images: torch.Tensor, g: torch.Generator | None = None) -> torch.Tensor:
        x = images.float().div_(255.0) if images.dtype == torch.uint8 else images.float()
        n, dev = x.shape[0], x.device
        grid = crop_flip_grid(n, self.size, self.scale, self.ratio, self.flip_p, g, dev)
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False).clamp_(0, 1)
        if self.jitter_p > 0 and any(self.jitter):
            x = self._jitter(x, g)
        if self.grey_p > 0:
            m = (torch.rand(n, generator=g, device=dev) < self.grey_p).view(-1, 1, 1, 1)
            x = torch.where(m, grayscale(x).expand_as(x), x)
        if self.blur_p > 0:
            x = self._blur(x, g)
        if self.solarize_p > 0:
            m = (torch.rand(n, generator=g, device=dev) < self.solarize_p).view(-1, 1, 1, 1)
            x = torch.where(m & (x >= 0.5), 1.0 - x, x)
        mean = torch.tensor(self.mean, device=dev).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=dev).view(1, 3, 1, 1)
        return (x - mean) / std

    def _blur(self, x: torch.Tensor, g: torch.Generator | None) -> torch.Tensor:
        n, dev = x.shape[0], x.device
        on = torch.rand(n, generator=g, device=dev) < self.blur_p
        sigma = _uniform(n, self.blur_sigma[0], self.blur_sigma[1], g, dev)
        k = self.blur_kernel or blur_kernel_size(self.size)
        if k // 2 >= min(x.shape[-2:]):
            raise ValueError(f"blur kernel {k} is too large for {tuple(x.shape[-2:])} images")
        return torch.where(on.view(-1, 1, 1, 1), gaussian_blur(x, sigma, k), x)

    def _jitter(self, x: torch.Tensor, g: torch.Generator | None) -> torch.Tensor:
        n, dev = x.shape[0], x.device
        on = torch.rand(n, generator=g, device=dev) < self.jitter_p
        b, c, s, h = self.jitter
        factors = [
            torch.where(on, _uniform(n, max(0.0, 1 - b), 1 + b, g, dev), 1.0),
            torch.where(on, _uniform(n, max(0.0, 1 - c), 1 + c, g, dev), 1.0),
            torch.where(on, _uniform(n, max(0.0, 1 - s), 1 + s, g, dev), 1.0),
            torch.where(on, _uniform(n, -h, h, g, dev), 0.0),
        ]
        ops = [adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue]
        for i in torch.randperm(4, generator=g, device="cpu" if g is None else g.device).tolist():
            if (i < 3 and self.jitter[i] > 0) or (i == 3 and h > 0):
                x = ops[i](x, factors[i])
        return x
