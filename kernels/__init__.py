"""Fused losses for self-supervised learning, each a Triton kernel beside its PyTorch reference.

Public functions dispatch to Triton for CUDA tensors when Triton is importable and the environment
variable ``SMALLSSL_TRITON`` is not ``"0"``; otherwise they run PyTorch code with the same semantics.
``import kernels`` works without Triton. Note: ``kernels`` is a generic top-level name and can clash
with other installed packages of the same name.

Import the functions from their modules (``from kernels.info_nce import info_nce``); ``kernels.info_nce`` is
the module. ``KERNELS`` maps each kernel's name to its ``KernelCase`` (inputs, reference, implementations,
shapes, costs, launch configurations), which the tests, ``kernels.bench`` and ``kernels.aot`` loop over.
"""

from kernels import info_nce, nt_xent, seed_distill, sinkhorn
from kernels._case import KernelCase
from kernels._triton_utils import HAS_TRITON, triton_enabled

KERNELS: dict[str, KernelCase] = {c.name: c for c in (info_nce.CASE, nt_xent.CASE, seed_distill.CASE, sinkhorn.CASE)}

__all__ = ["HAS_TRITON", "KERNELS", "KernelCase", "triton_enabled"]
