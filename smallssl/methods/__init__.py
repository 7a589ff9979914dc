"""Method registry: ``METHODS[name]`` is an :class:`~smallssl.methods.base.SSLMethod` subclass built as
``cls(backbone, **kwargs)`` whose ``forward(views)`` returns ``{"loss": scalar, **logs}`` (the contract is
:mod:`smallssl.methods.base`). Contract tests iterate over this dict."""

from __future__ import annotations

from .barlow import BarlowTwins
from .base import SSLMethod
from .byol import BYOL
from .moco import MoCo
from .seed import SEED
from .simclr import SimCLR
from .simsiam import SimSiam
from .swav import SwAV

METHODS: dict[str, type[SSLMethod]] = {
    "moco": MoCo,
    "seed": SEED,
    "simclr": SimCLR,
    "byol": BYOL,
    "simsiam": SimSiam,
    "barlow": BarlowTwins,
    "swav": SwAV,
}
