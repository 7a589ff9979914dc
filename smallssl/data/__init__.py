"""Data: augmentation presets and constants (:mod:`.transforms`), datasets and samplers (:mod:`.datasets`),
batched tensor augmentation (:mod:`.batch_aug`) over in-memory images (:mod:`.memdata`), and the dataset
tarball cache (:mod:`.cache`)."""

from .datasets import (
                       CorruptImageError,
                       ResumableSampler,
                       SafeImageFolder,
                       SeededViews,
                       collate_skip_bad,
                       fixed_subset,
                       steps_per_epoch,
)
from .transforms import (
                       IMAGENET_MEAN,
                       IMAGENET_STD,
                       MultiViewTransform,
                       blur_kernel_size,
                       blur_prob,
                       eval_transform,
                       jitter_params,
                       multicrop_transform,
                       pretrain_transform,
                       two_crops,
)

__all__ = [
    "CorruptImageError", "ResumableSampler", "SafeImageFolder", "SeededViews", "collate_skip_bad", "fixed_subset",
    "steps_per_epoch", "IMAGENET_MEAN", "IMAGENET_STD", "MultiViewTransform", "blur_kernel_size", "blur_prob",
    "eval_transform", "jitter_params", "multicrop_transform", "pretrain_transform", "two_crops",
]
