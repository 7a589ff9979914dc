"""Helpers shared by the kernel tests (a helper module, not a test module): inputs, errors, tolerances."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def unit(*shape: int, dtype: torch.dtype = torch.float64, device: str = "cpu") -> torch.Tensor:
    """L2-normalised Gaussian rows, drawn in fp64 (on ``device``) and cast to ``dtype``."""
    return F.normalize(torch.randn(*shape, dtype=torch.float64, device=device), dim=-1).to(dtype)


def err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest absolute difference, in fp64."""
    return (a.double() - b.double()).abs().max().item()


def loss_and_grads(fn, tensors):
    """[fn(*leaves), d fn / d leaf for each leaf] with fresh leaves copied from ``tensors``."""
    leaves = [t.detach().clone().requires_grad_() for t in tensors]
    loss = fn(*leaves)
    return [loss.detach()] + list(torch.autograd.grad(loss, leaves))


def check_tolerance(got, torch_same_dtype, ref, rel_atol: float = 2e-3) -> None:
    """Liger-Kernel / flash-attention rule: ``err(kernel) <= 2 * err(torch, same dtype) + atol`` vs a fp64 reference."""
    for g, t, r in zip(got, torch_same_dtype, ref):
        atol = rel_atol * r.abs().max().item() + 1e-6
        assert err(g, r) <= 2 * err(t, r) + atol, (err(g, r), err(t, r), atol)
