"""Which implementation a checkpoint's backbone keys belong to, and the ``-a`` that loads it.

MobileNetV3 and EfficientNet-B0 exist here twice: as the small-models paper trained them (ssl-small / SEED's
``features.* / conv.* / classifier.*`` MobileNetV3 and lukemelas' ``_conv_stem / _blocks.*`` EfficientNet:
``-a mobilenetv3_small``, ``mobilenetv3_large``, ``efficientnet_b0``) and as timm's (``conv_stem / blocks.*``:
``-a timm_mobilenetv3_small`` ... or any timm name). A checkpoint of one does not load into the other (the
names differ, and a rename would not give the same network), so a loader calls :func:`layout_hint` to turn
"0 tensors matched" into an error that names the right ``-a``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

PAPER_ARCHS = ("mobilenetv3_small", "mobilenetv3_large", "efficientnet_b0")
_PAPER_MNV3_BLOCKS = {11: "mobilenetv3_small", 15: "mobilenetv3_large"}  # features.1 ... features.N
_TIMM_MNV3_STAGES = {6: "timm_mobilenetv3_small", 7: "timm_mobilenetv3_large"}  # blocks.0 ... blocks.N-1
_B0_BLOCKS = 16


def _indices(keys: set[str], pattern: str) -> set[int]:
    rx = re.compile(pattern)
    return {int(m.group(1)) for k in keys if (m := rx.match(k))}


def _paper_mobilenetv3(keys: set[str]) -> str | None:
    """ssl-small / SEED's MobileNetV3 (``features.{i}.conv.{j}``, ``conv.0``, ``classifier.0``): its size."""
    if not {"features.0.0.weight", "conv.0.weight", "classifier.0.weight"} <= keys:
        return None
    blocks = _indices(keys, r"features\.(\d+)\.conv\.\d+\.")
    return _PAPER_MNV3_BLOCKS.get(len(blocks), "mobilenetv3_?")


def _lukemelas_efficientnet(keys: set[str]) -> int | None:
    """lukemelas' EfficientNet: the number of ``_blocks.{i}`` (16 for B0), None for another layout."""
    if "_conv_stem.weight" not in keys:
        return None
    return len(_indices(keys, r"_blocks\.(\d+)\."))


def _timm_efficientnet_family(keys: set[str]) -> str | None:
    """timm's MobileNetV3 / EfficientNet (``conv_stem``, ``blocks.{stage}.{block}``): the alias that builds it."""
    if "conv_stem.weight" not in keys or not any(k.startswith("blocks.") for k in keys):
        return None
    if "bn2.weight" in keys:  # timm's EfficientNet normalizes after conv_head; its MobileNetV3 does not
        return "timm_efficientnet_b0"
    return _TIMM_MNV3_STAGES.get(len(_indices(keys, r"blocks\.(\d+)\.")), "timm_mobilenetv3_small")


def layout_hint(arch: str, keys: Iterable[str]) -> str | None:
    """An error message naming the right ``-a`` when ``keys`` belong to the other implementation of ``arch``.

    Args:
        arch: the architecture the user asked for (``-a``).
        keys: the checkpoint's backbone keys with the wrapper prefix (``module.encoder_q.`` ...) stripped.

    Returns:
        One line for the user, or None when the keys fit ``arch`` or belong to no layout known here.
    """
    keys = set(keys)
    paper = _paper_mobilenetv3(keys)
    if paper is not None and paper != arch:
        if paper == "mobilenetv3_?":
            return ("checkpoint holds ssl-small / SEED's MobileNetV3 layout (features.* / conv.* / classifier.*) "
                    "with a block count that is neither Small (11) nor Large (15); smallssl builds only those two "
                    "(-a mobilenetv3_small / mobilenetv3_large)")
        return (f"checkpoint holds ssl-small / SEED's MobileNetV3 (features.* / conv.* / classifier.* keys), "
                f"not what -a {arch} builds; use -a {paper}")
    n_blocks = _lukemelas_efficientnet(keys)
    if n_blocks is not None:
        if n_blocks != _B0_BLOCKS:
            return (f"checkpoint holds lukemelas' EfficientNet layout (_conv_stem / _blocks.*) with {n_blocks} "
                    f"blocks; B0 has {_B0_BLOCKS} and is the only one smallssl builds in that layout "
                    "(-a efficientnet_b0)")
        if arch != "efficientnet_b0":
            return (f"checkpoint holds lukemelas' EfficientNet-B0 (_conv_stem / _blocks.* keys, as ssl-small / SEED "
                    f"write it), not what -a {arch} builds; use -a efficientnet_b0")
        return None
    timm_alias = _timm_efficientnet_family(keys)
    if timm_alias is not None and arch in PAPER_ARCHS:
        return (f"checkpoint holds timm's layout (conv_stem / blocks.* keys), but -a {arch} is the small-models "
                f"paper's network (ssl-small / SEED layout); use -a {timm_alias} or the timm model name it was "
                "created with (e.g. mobilenetv3_small_100, tf_efficientnet_b0)")
    return None
