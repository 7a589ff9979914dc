"""Augmentation presets and the one home of the image constants (ImageNet mean / std, the small-input rule).

* :func:`pretrain_transform`: MoCo v1 augmentation by default, MoCo v2 (``aug_plus``), with ssl-small's
  strength knobs ``cj`` / ``grey_scale`` / ``gaussian_blur``; :func:`eval_transform`: resize + centre crop.
* :func:`multicrop_transform`: SwAV's multi-crop (Caron et al., NeurIPS 2020, arXiv:2006.09882, Sec. 3.2).
  Each image gives ``sum(nmb_crops)`` views: ``nmb_crops[i]`` random resized crops of side ``size_crops[i]`` with
  area scale in ``[min_scale_crops[i], max_scale_crops[i]]`` (SwAV ImageNet: 2 x 224 in [0.14, 1] + 6 x 96 in
  [0.05, 0.14]; SEER: 2 x 160 + 4 x 96 or 2 x 224 + 4 x 196). Views come grouped by size, large ones first, so
  the method can run one backbone forward per resolution and compute codes on the first (large) crops. Per
  view, after the crop: horizontal flip, colour distortion (``ColorJitter(0.8s, 0.8s, 0.8s, 0.2s)`` with
  p = 0.8, then grayscale with p = 0.2; s = 1) and Gaussian blur (sigma in [0.1, 2], p = 0.5), as in SwAV's
  ``MultiCropDataset``; ``cj`` / ``grey_scale`` / ``gaussian_blur`` override the strength and probabilities.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Callable

import torchvision.transforms as T

from ..backbones import default_small_input

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def blur_kernel_size(image_size: int) -> int:
    """Odd Gaussian-blur kernel side, ~10% of the image side (as SimCLR)."""
    k = max(3, int(0.1 * image_size))  # ~10% of the side, as in SimCLR
    return k if k % 2 == 1 else k + 1


def jitter_params(aug_plus: bool = False, cj: float | None = None) -> tuple[tuple[float, ...], float]:
    """ColorJitter (brightness, contrast, saturation, hue) and the probability it is applied with: MoCo v1
    (0.4 x 4, always), MoCo v2 (0.4, 0.4, 0.4, 0.1; p 0.8) or ssl-small's ``cj=c`` (0.8c x 3, min(0.5, 0.4c); p 0.8)."""
    if cj is not None:
        return (0.8 * cj, 0.8 * cj, 0.8 * cj, min(0.5, 0.4 * cj)), 0.8
    if aug_plus:
        return (0.4, 0.4, 0.4, 0.1), 0.8
    return (0.4, 0.4, 0.4, 0.4), 1.0


def blur_prob(aug_plus: bool = False, gaussian_blur: float | None = None) -> float:
    """``gaussian_blur`` when given, else MoCo v2's 0.5 with ``aug_plus`` and none for v1."""
    return gaussian_blur if gaussian_blur is not None else (0.5 if aug_plus else 0.0)


def pretrain_transform(image_size: int = 224, aug_plus: bool = False, cj: float | None = None,
                       grey_scale: float | None = None, gaussian_blur: float | None = None,
                       min_scale: float = 0.2, max_scale: float = 1.0, solarize: float = 0.0) -> Callable:
    """One random view.

    - MoCo v1 (default): RandomResizedCrop(scale=(0.2, 1)), RandomGrayscale(0.2), ColorJitter(0.4 x 4), flip.
    - MoCo v2 (``aug_plus``): ColorJitter(0.4, 0.4, 0.4, 0.1) with p=0.8, RandomGrayscale(0.2),
      GaussianBlur(sigma in [0.1, 2]) with p=0.5, flip.
    - ssl-small knobs: ``cj=c`` sets ColorJitter(0.8c, 0.8c, 0.8c, min(0.5, 0.4c)) with p=0.8;
      ``grey_scale=p`` and ``gaussian_blur=p`` set those probabilities (blur applies with or without aug_plus).
    - ``solarize=p``: RandomSolarize(128, p) after the blur (BYOL's second view: 0.2).
    """
    for name, p in (("grey_scale", grey_scale), ("gaussian_blur", gaussian_blur), ("solarize", solarize)):
        if p is not None and not 0.0 <= p <= 1.0:
            raise ValueError(f"{name} is a probability in [0, 1], got {p}")
    if cj is not None and cj < 0:
        raise ValueError(f"cj (colour-jitter strength) must be >= 0, got {cj}")
    ops: list = [T.RandomResizedCrop(image_size, scale=(min_scale, max_scale))]
    jitter, jitter_p = jitter_params(aug_plus, cj)
    if aug_plus or cj is not None:
        ops += [T.RandomApply([T.ColorJitter(*jitter)], p=jitter_p),
                T.RandomGrayscale(p=0.2 if grey_scale is None else grey_scale)]
    else:
        ops += [T.RandomGrayscale(p=0.2 if grey_scale is None else grey_scale), T.ColorJitter(*jitter)]
    blur_p = blur_prob(aug_plus, gaussian_blur)
    if blur_p > 0:
        ops.append(T.RandomApply([T.GaussianBlur(blur_kernel_size(image_size), sigma=(0.1, 2.0))], p=blur_p))
    if solarize > 0:
        ops.append(T.RandomSolarize(128, p=solarize))
    ops += [T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    return T.Compose(ops)


def eval_transform(image_size: int = 224) -> Callable:
    """Resize (to 256/224 of the size for ImageNet-sized inputs) + centre crop + normalise."""
    resize = image_size if default_small_input(image_size) else int(round(image_size * 256 / 224))
    return T.Compose([T.Resize(resize), T.CenterCrop(image_size), T.ToTensor(),
                      T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


class MultiViewTransform:
    """Apply each transform of ``transforms`` to the image: ``[t(img) for t in transforms]``."""

    def __init__(self, transforms: Sequence[Callable]):
        self.transforms = list(transforms)

    def __call__(self, img):
        return [t(img) for t in self.transforms]


def two_crops(transform: Callable) -> MultiViewTransform:
    """MoCo's TwoCropsTransform: two independent views of one image."""
    return MultiViewTransform([transform, transform])


# ------------------------------------------------------------------------------------ SwAV multi-crop
SWAV_IMAGENET = dict(nmb_crops=(2, 6), size_crops=(224, 96), min_scale_crops=(0.14, 0.05),
                     max_scale_crops=(1.0, 0.14))


def swav_view_transform(size: int, min_scale: float, max_scale: float, cj: float | None = None,
                        grey_scale: float | None = None, gaussian_blur: float | None = None):
    """One SwAV view: RandomResizedCrop(size, scale) -> flip -> colour distortion -> blur -> tensor (3, size, size)."""
    s = 1.0 if cj is None else cj
    blur_p = 0.5 if gaussian_blur is None else gaussian_blur
    ops: list = [T.RandomResizedCrop(size, scale=(min_scale, max_scale)), T.RandomHorizontalFlip(),
                 T.RandomApply([T.ColorJitter(0.8 * s, 0.8 * s, 0.8 * s, min(0.5, 0.2 * s))], p=0.8),
                 T.RandomGrayscale(p=0.2 if grey_scale is None else grey_scale)]
    if blur_p > 0:
        ops.append(T.RandomApply([T.GaussianBlur(blur_kernel_size(size), sigma=(0.1, 2.0))], p=blur_p))
    ops += [T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    return T.Compose(ops)


def multicrop_transform(size_crops: Sequence[int], nmb_crops: Sequence[int], min_scale_crops: Sequence[float],
                        max_scale_crops: Sequence[float], cj: float | None = None, grey_scale: float | None = None,
                        gaussian_blur: float | None = None) -> MultiViewTransform:
    """Image -> list of ``sum(nmb_crops)`` tensors: ``nmb_crops[i]`` views (3, size_crops[i], size_crops[i]) each.

    Raises ``ValueError`` when the four lists differ in length or hold invalid sizes / scales.
    """
    lists = dict(size_crops=list(size_crops), nmb_crops=list(nmb_crops), min_scale_crops=list(min_scale_crops),
                 max_scale_crops=list(max_scale_crops))
    if len({len(v) for v in lists.values()}) != 1 or not lists["size_crops"]:
        raise ValueError(f"--size-crops, --nmb-crops, --min-scale-crops and --max-scale-crops need one value per "
                         f"crop group each (same non-zero length); got {lists}")
    for size, n, lo, hi in zip(*lists.values()):
        if size < 1 or n < 1 or not 0 < lo <= hi <= 1:
            raise ValueError(f"invalid crop group: size {size}, count {n}, scale [{lo}, {hi}] (need size >= 1, "
                             "count >= 1, 0 < min_scale <= max_scale <= 1)")
    views = []
    for size, n, lo, hi in zip(*lists.values()):
        views += [swav_view_transform(size, lo, hi, cj, grey_scale, gaussian_blur)] * n
    if sum(lists["nmb_crops"]) < 2:
        raise ValueError(f"SwAV needs at least 2 crops in total, got nmb_crops={lists['nmb_crops']}")
    return MultiViewTransform(views)
