"""Shared fixtures of the eval tests: tiny synthetic ImageFolders (one flat colour per class plus noise)."""

import os

import pytest
import torch
from PIL import Image

COLOURS = [(220, 30, 30), (30, 220, 30), (30, 30, 220)]


def _make_folder(root, per_class=4, size=16, seed=0):
    """``root/class<c>/img<i>.png`` for the three COLOURS, ``per_class`` noisy images each."""
    g = torch.Generator().manual_seed(seed)
    for c, rgb in enumerate(COLOURS):
        os.makedirs(os.path.join(root, f"class{c}"), exist_ok=True)
        for i in range(per_class):
            noise = torch.randint(-25, 25, (size, size, 3), generator=g)
            arr = (torch.tensor(rgb) + noise).clamp(0, 255).to(torch.uint8).numpy()
            Image.fromarray(arr).save(os.path.join(root, f"class{c}", f"img{i}.png"))


@pytest.fixture(scope="session")
def make_folder():
    """The folder writer, for tests that need their own tree."""
    return _make_folder


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A 3-class ImageFolder root: train/ 5 images per class, val/ 3 (16x16 PNGs)."""
    root = tmp_path_factory.mktemp("data")
    _make_folder(str(root / "train"), 5, seed=0)
    _make_folder(str(root / "val"), 3, seed=1)
    return str(root)
