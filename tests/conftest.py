import os

import pytest
import torch

# Tests run on 2 shared cores in CI: keep intra-op threads small and deterministic.
torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", 0)) or min(2, os.cpu_count() or 1))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


def make_image_folder(root, classes: int = 2, per_class: int = 8, size: int = 16, split: str = "train",
                      seed: int = 0) -> str:
    """Write ``root/split/c<i>/img<j>.png`` random-noise images (class i has a distinct mean colour)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    for c in range(classes):
        d = os.path.join(str(root), split, f"c{c}")
        os.makedirs(d, exist_ok=True)
        for j in range(per_class):
            base = np.array([(40 + 70 * c) % 256, (200 - 50 * c) % 256, 128], dtype=np.float64)
            img = np.clip(base + rng.normal(0, 40, (size, size, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(img).save(os.path.join(d, f"img{j}.png"))
    return str(root)


@pytest.fixture
def tiny_data(tmp_path):
    """A 2-class, 32-image synthetic ImageFolder with train/ and val/ (16x16 PNGs)."""
    root = tmp_path / "data"
    make_image_folder(root, classes=2, per_class=16, split="train")
    make_image_folder(root, classes=2, per_class=4, split="val", seed=1)
    return str(root)
