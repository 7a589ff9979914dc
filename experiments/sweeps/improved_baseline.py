"""Improved MoCo v2 baselines of the five small models (Shi et al., "On the Efficacy of Small Self-Supervised
Contrastive Models without Distillation Signals", AAAI 2022, arXiv:2107.14762; ssl-small's README command).

One 8-GPU node per architecture, 800 epochs on ImageNet; only the architecture changes. Check it with

    IMAGENET=/path/to/imagenet python -m experiments.launch experiments/sweeps/improved_baseline.py --dry-run

Differences from the paper's command line: no ``--multiprocessing-distributed --world-size 1 --rank 0
--dist-url env://`` (the launcher starts one process per GPU and exports RANK/WORLD_SIZE), no ``--ckpt-dir``
(one folder per point) and no ``--resume SEED.pth.tar --restart``: these baselines train from scratch, the
paper's point being that no distillation signal is needed (add ``"--resume": [...]`` plus ``--restart`` to
start from a converted checkpoint; the launcher switches to ``--resume auto`` once the run has its own).
"""

import os

IMAGENET = os.environ.get("IMAGENET", "/datasets/imagenet")  # contains train/<wnid>/<image>.JPEG

BASE = [IMAGENET, "--lr", "0.06", "--batch-size", "512", "-j", "64", "--epochs", "800",
        "--mlp", "wide", "--moco-t", "0.1", "--moco-k", "65536",
        "--aug-plus", "--cj", "1.", "--grey-scale", "0.5", "--gaussian-blur", "0.5", "--cos",
        "--keep-last", "3", "--no-progress"]
GRID = {"-a": ["resnet18", "mobilenetv3_large", "mobilenetv3_small", "efficientnet_b0", "deit_tiny"]}
# -b 512 is per node, split over its 8 processes; -j 64 likewise (8 loader workers per GPU).
SLURM = {"nodes": 1, "gpus_per_node": 8, "cpus_per_task": 8, "mem_gb": 400, "timeout_min": 72 * 60,
         "signal_delay_s": 120, "max_num_timeout": 20}
