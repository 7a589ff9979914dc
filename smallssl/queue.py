"""The ring buffer of keys shared by MoCo and SEED: a (K, dim) tensor plus a write pointer."""

from __future__ import annotations

import torch


def check_queue_batch(K: int, global_batch: int, flag: str) -> None:
    """Raise ``ValueError`` naming ``flag`` when the queue would wrap in the middle of a global batch."""
    if K % global_batch != 0:
        raise ValueError(f"{flag} {K} is not a multiple of the global batch size {global_batch}; the queue would "
                         f"wrap mid-batch. Use e.g. {flag} {max(global_batch, K // global_batch * global_batch)}.")


@torch.no_grad()
def enqueue_keys(queue: torch.Tensor, queue_ptr: torch.Tensor, keys: torch.Tensor) -> None:
    """Write ``keys`` (N, dim) into ``queue`` (K, dim) at ``queue_ptr`` and advance the pointer (mod K), in place."""
    K, n = queue.shape[0], keys.shape[0]
    if K % n != 0:
        raise ValueError(f"queue size {K} is not a multiple of the gathered batch {n}")
    ptr = int(queue_ptr)
    queue[ptr:ptr + n] = keys.to(queue.dtype)
    queue_ptr[0] = (ptr + n) % K
