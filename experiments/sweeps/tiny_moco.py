"""Tiny CPU MoCo sweep: 2 points (two temperatures) on a synthetic 16x16 ImageFolder; seconds per point.

    python -m experiments.launch experiments/sweeps/tiny_moco.py --dry-run
    python -m experiments.launch experiments/sweeps/tiny_moco.py --cluster local     # or slurm
    python -m experiments.launch experiments/sweeps/tiny_moco.py --collect

The data (2 classes x 16 random 16x16 PNGs, seeded) is written on first use to $SMALLSSL_TINY_DATA
(default ~/.cache/smallssl/tiny-synthetic).
"""

import os


def make_tiny_imagefolder(root: str, classes: int = 2, per_class: int = 16, size: int = 16, seed: int = 0) -> str:
    """Write root/train/class<c>/<i>.png (class-dependent mean colour plus noise) once; return root."""
    if os.path.isdir(os.path.join(root, "train")):
        return root
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    tmp = f"{root}.tmp{os.getpid()}"
    for c in range(classes):
        os.makedirs(os.path.join(tmp, "train", f"class{c}"), exist_ok=True)
        mean = rng.integers(40, 216, size=3)
        for i in range(per_class):
            img = np.clip(mean + rng.normal(0, 40, size=(size, size, 3)), 0, 255).astype("uint8")
            Image.fromarray(img).save(os.path.join(tmp, "train", f"class{c}", f"{i:03d}.png"))
    os.makedirs(os.path.dirname(os.path.abspath(root)), exist_ok=True)
    try:
        os.rename(tmp, root)  # atomic: concurrent first uses do not see half a dataset
    except OSError:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return root


DATA = make_tiny_imagefolder(os.environ.get("SMALLSSL_TINY_DATA",
                                            os.path.expanduser("~/.cache/smallssl/tiny-synthetic")))

BASE = [DATA, "-a", "resnet18", "--image-size", "16", "-b", "8", "--moco-k", "64", "--epochs", "2", "-j", "0",
        "--lr", "0.03", "--device", "cpu", "--no-progress", "--print-freq", "100"]
GRID = {"--moco-t": [0.07, 0.2]}
SLURM = {"cpus_per_task": 1, "timeout_min": 30, "signal_delay_s": 30}
