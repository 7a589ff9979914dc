"""Shared helpers for the Triton kernels: guarded import, dispatch switch, interpreter loading for tests."""

from __future__ import annotations

import os

import torch

try:  # Triton is optional: every public function falls back to PyTorch without it.
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - depends on the environment
    triton = None
    tl = None
    HAS_TRITON = False

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453


def triton_enabled(*tensors: torch.Tensor) -> bool:
    """True when the Triton path should run: Triton importable, ``SMALLSSL_TRITON`` is not "0", all CUDA.

    Under Triton's interpreter (``TRITON_INTERPRET=1``) CPU tensors qualify too: that is how the CPU tests
    run the kernels through the public functions.
    """
    if not HAS_TRITON or os.environ.get("SMALLSSL_TRITON", "1") == "0":
        return False
    return all(t.is_cuda for t in tensors) or (interpreting() and all(t.device.type == "cpu" for t in tensors))


def next_pow2(n: int, minimum: int = 16) -> int:
    """Smallest power of two >= max(n, minimum) (tl.dot needs tile sides >= 16)."""
    p = minimum
    while p < n:
        p *= 2
    return p


def dot_precision(dtype: torch.dtype) -> str:
    """tl.dot input precision for fp32 inputs: follow torch's TF32 switch so errors match eager PyTorch."""
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device; 8 elsewhere (the interpreter only needs a small number)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 8


def split_plan(n_keys: int, block_k: int, n_row_blocks: int, bytes_per_split: int, device: torch.device,
               splits: int | None = None) -> tuple[int, int]:
    """(slices, key blocks per slice) for a split-K launch over ``n_keys`` keys in blocks of ``block_k``.

    ``splits`` defaults to enough programs (``n_row_blocks`` per slice) for two waves over the device's
    SMs, capped so the slices' fp32 partials (``bytes_per_split`` each) stay under 8 MB. Every slice gets
    at least one block (a slice can be shorter than the others, never empty); no keys still give one slice.
    """
    k_blocks = max(1, -(-n_keys // block_k))
    if splits is None:
        splits = -(-2 * num_sms(device) // n_row_blocks)
        splits = min(splits, max(1, (8 << 20) // max(1, bytes_per_split)))
    splits = max(1, min(splits, k_blocks))
    per_split = -(-k_blocks // splits)
    return -(-k_blocks // per_split), per_split


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1`` before Triton's import)."""
    return HAS_TRITON and os.environ.get("TRITON_INTERPRET", "0") == "1"
