"""Method registry: ``METHODS[name]`` is a class ``cls(backbone, **kwargs)`` whose ``forward(views)``
returns ``{"loss": scalar, **logs}``. Contract tests iterate over this dict."""

from __future__ import annotations

import torch.nn as nn

from .barlow import BarlowTwins
from .byol import BYOL
from .moco import MoCo
from .seed import SEED
from .simclr import SimCLR
from .simsiam import SimSiam
from .swav import SwAV

METHODS: dict[str, type[nn.Module]] = {
    "moco": MoCo,
    "seed": SEED,
    "simclr": SimCLR,
    "byol": BYOL,
    "simsiam": SimSiam,
    "barlow": BarlowTwins,
    "swav": SwAV,
}
