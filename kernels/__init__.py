"""Fused losses for self-supervised learning, each a Triton kernel beside its PyTorch reference.

Public functions dispatch to Triton for CUDA tensors when Triton is importable and the environment
variable ``SMALLSSL_TRITON`` is not ``"0"``; otherwise they run PyTorch code with the same semantics.
``import kernels`` works without Triton. Note: ``kernels`` is a generic top-level name and can clash
with other installed packages of the same name.

The public functions shadow their submodules as attributes of ``kernels`` (``kernels.info_nce`` is the
function); reach a submodule with ``importlib.import_module("kernels.info_nce")``.
"""

from kernels._triton_utils import HAS_TRITON, triton_enabled
from kernels.info_nce import info_nce, info_nce_reference
from kernels.nt_xent import nt_xent, nt_xent_reference
from kernels.seed_distill import seed_distill, seed_distill_reference
from kernels.sinkhorn import sinkhorn, sinkhorn_reference

__all__ = ["HAS_TRITON", "triton_enabled", "info_nce", "info_nce_reference", "nt_xent", "nt_xent_reference",
           "seed_distill", "seed_distill_reference", "sinkhorn", "sinkhorn_reference"]
