"""Multi-crop augmentation of SwAV (Caron et al., NeurIPS 2020, arXiv:2006.09882, Sec. 3.2).

Each image gives ``sum(nmb_crops)`` views: ``nmb_crops[i]`` random resized crops of side ``size_crops[i]`` with
area scale in ``[min_scale_crops[i], max_scale_crops[i]]`` (SwAV ImageNet: 2 x 224 in [0.14, 1] + 6 x 96 in
[0.05, 0.14]; SEER: 2 x 160 + 4 x 96 or 2 x 224 + 4 x 196). Views come grouped by size, large ones first, so
the method can run one backbone forward per resolution and compute codes on the first (large) crops.

Per view, after the crop: horizontal flip, colour distortion (``ColorJitter(0.8s, 0.8s, 0.8s, 0.2s)`` with
p = 0.8, then grayscale with p = 0.2; s = 1) and Gaussian blur (sigma in [0.1, 2], p = 0.5), as in SwAV's
``MultiCropDataset``; ``cj`` / ``grey_scale`` / ``gaussian_blur`` override the strength and probabilities.
"""

from __future__ import annotations

from collections.abc import Sequence

import torchvision.transforms as T

from .data import IMAGENET_MEAN, IMAGENET_STD, MultiViewTransform, blur_kernel_size

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
