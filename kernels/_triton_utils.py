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
MAX_D = 512  # largest feature size the Triton paths take; beyond it the chunked PyTorch paths run
BLOCK_D_CLASSES = (64, 128, 256, 512)  # next_pow2(D, 64) for D <= MAX_D: the tile widths the launchers use
# (input dtype, tl.dot precision) pairs a launcher can compile: fp32 follows torch's TF32 switch (dot_precision).
COMPUTE_TYPES = ((torch.float32, "ieee"), (torch.float32, "tf32"), (torch.bfloat16, "tf32"), (torch.float16, "tf32"))


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


def dot_tile_config(d: int, dtype: torch.dtype, precision: str, accumulators: int = 1) -> dict:
    """Tiles, warps and stages of a flash-style kernel: a BLOCK_B-row tile of inputs against BLOCK_K-row tiles of
    keys (a queue, or the rows themselves), each (BLOCK_B, BLOCK_D) with ``accumulators`` fp32 (BLOCK_B, BLOCK_D)
    weighted sums beside it (InfoNCE and NT-Xent 1, SEED 2). Used by the launchers and the AOT table alike.

    The numbers come from ``python -m kernels.aot`` (ptxas of Triton 3.8; registers / spill bytes / programs per
    SM on sm_80 and sm_90a, gradient variant, D=128 unless said; kernels/README.md has the full table):
    - the former fixed 64 x 64 x 128 tiles with 4 warps: 255 registers and a 16-byte spill on sm_80 (tf32), and
      6-7 KB of spill per thread for fp32 without TF32 (``ieee``: FMA dots keep whole operand fragments in
      registers), 1 program per SM;
    - 16-bit inputs: BLOCK_B=64, BLOCK_K=32, 8 warps, 3 stages: 127 / 91 registers, 2 programs (64 x 64 with 8
      warps: 128 / 151, 1 on sm_90a); at D=512 BLOCK_B=16: 96 registers, 2 programs; at D=64 4 warps (8 warps
      gave 140 registers on sm_80, 1 program);
    - fp32 with TF32: BLOCK_B=32, BLOCK_K=32, 4 warps, 2 stages: 124 / 120 registers, 3 / 4 programs (BLOCK_B=64
      with 8 warps: 138 / 191, 1 program); 2 stages because an fp32 stage of a 64 x 128 key tile is 32 KB;
    - fp32 without TF32: BLOCK_B=16, BLOCK_K=32, 4 warps: 72 / 79 registers, 6 programs (BLOCK_B=32: 255 and a
      16-byte spill on sm_80); wider rows (D > 128) take BLOCK_K=16 and 8 warps, since the FMA dot holds a
      BLOCK_D x BLOCK_K key fragment per thread.
    With ``accumulators`` = 2 (SEED: two row tiles, two accumulators, four logit tiles) 16-bit inputs take a
    quarter of the rows from D=128 (BLOCK_B=32 at D=128 gave 167 registers, 1 program; at D=64 BLOCK_B=16 with
    4 warps left a 16-byte stack frame on sm_90a, so there half the rows and 8 warps), fp32 16 rows.
    The state per program grows with ``BLOCK_D * accumulators``: past 256 (TF32) / 128 (FMA) the key tile
    shrinks to 16 rows and 8 warps share the work (SEED at D=256 with 4 warps: 206 registers, 1 program), 16
    warps from 1024; 16-bit inputs wider than 256 take 2 stages (3 left one program per SM on sm_80).
    """
    block_d = next_pow2(d, BLOCK_D_CLASSES[0])
    width = block_d * accumulators
    if dtype != torch.float32:
        rows = min(64, 8192 // block_d) // (accumulators**2 if block_d >= 128 else accumulators)
        cfg = dict(BLOCK_B=rows, BLOCK_K=32, num_warps=4 if width <= 64 else 8, num_stages=3 if block_d <= 256 else 2)
    elif precision == "tf32":
        cfg = dict(BLOCK_B=min(32, 4096 // block_d) // accumulators, BLOCK_K=32 if width <= 256 else 16,
                   num_warps=4 if width <= 256 else 8, num_stages=2)
    else:
        cfg = dict(BLOCK_B=16, BLOCK_K=32 if width <= 128 else 16, num_warps=4 if width <= 128 else 8, num_stages=2)
    if width >= 1024 and dtype == torch.float32:
        cfg["num_warps"] = 16
    cfg["BLOCK_B"] = max(16, cfg["BLOCK_B"])
    return dict(cfg, BLOCK_D=block_d)


def dot_precision(dtype: torch.dtype) -> str:
    """tl.dot input precision for fp32 inputs: follow torch's TF32 switch so errors match eager PyTorch."""
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def device_cc(device: torch.device) -> int:
    """Compute capability as 80 / 90 of a CUDA device; 90 elsewhere (the interpreter takes the H100 configs)."""
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return 10 * major + minor
    return 90


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device; 8 elsewhere (the interpreter only needs a small number)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 8


def split_plan(n_keys: int, block_k: int, n_row_blocks: int, bytes_per_split: int, device: torch.device,
               splits: int | None = None, sms: int | None = None) -> tuple[int, int]:
    """(slices, key blocks per slice) for a split-K launch over ``n_keys`` keys in blocks of ``block_k``.

    ``splits`` defaults to enough programs (``n_row_blocks`` per slice) for two waves over the device's
    SMs, capped so the slices' fp32 partials (``bytes_per_split`` each) stay under 8 MB. Every slice gets
    at least one block (a slice can be shorter than the others, never empty); no keys still give one slice.
    ``sms`` overrides the device's SM count (the roofline plans for an H100's 132).
    """
    k_blocks = max(1, -(-n_keys // block_k))
    if splits is None:
        splits = -(-2 * (sms or num_sms(device)) // n_row_blocks)
        splits = min(splits, max(1, (8 << 20) // max(1, bytes_per_split)))
    splits = max(1, min(splits, k_blocks))
    per_split = -(-k_blocks // splits)
    return -(-k_blocks // per_split), per_split


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1`` before Triton's import)."""
    return HAS_TRITON and os.environ.get("TRITON_INTERPRET", "0") == "1"
