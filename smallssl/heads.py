"""Projection heads and the ``Encoder`` (backbone + head) used by every method.

``--mlp`` choices (MoCo / ssl-small CLI): ``none`` = one linear layer (MoCo v1); ``v2`` (bare ``--mlp``) =
Linear-ReLU-Linear with hidden = in_dim (MoCo v2); ``wide`` = hidden 2048 or in_dim if larger, with BN
(ssl-small's wider head for small backbones); ``simple`` = Linear-ReLU-Linear with hidden = out_dim;
``deep`` = three linear layers. Index layout of ``v2`` matches the official ``fc.0`` / ``fc.2`` keys.
"""

from __future__ import annotations

import torch
import torch.nn as nn

HEADS = ("none", "v2", "wide", "simple", "deep")


def build_head(kind: str, in_dim: int, out_dim: int) -> nn.Module:
    if kind == "none":
        return nn.Sequential(nn.Linear(in_dim, out_dim))
    if kind == "v2":
        return nn.Sequential(nn.Linear(in_dim, in_dim), nn.ReLU(inplace=True), nn.Linear(in_dim, out_dim))
    if kind == "wide":
        hidden = max(2048, in_dim)
        return nn.Sequential(nn.Linear(in_dim, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
                             nn.Linear(hidden, out_dim))
    if kind == "simple":
        return nn.Sequential(nn.Linear(in_dim, out_dim), nn.ReLU(inplace=True), nn.Linear(out_dim, out_dim))
    if kind == "deep":
        return nn.Sequential(nn.Linear(in_dim, in_dim), nn.ReLU(inplace=True), nn.Linear(in_dim, in_dim),
                             nn.ReLU(inplace=True), nn.Linear(in_dim, out_dim))
    raise ValueError(f"unknown head {kind!r}; choose one of {', '.join(HEADS)}")


def mlp(in_dim: int, hidden: int, out_dim: int, num_layers: int = 2, bn: bool = True,
        last_bn: bool = False) -> nn.Sequential:
    """Generic projector / predictor: (Linear-BN-ReLU) x (num_layers-1) then Linear (+ optional affine-free BN)."""
    if num_layers < 1:
        raise ValueError(f"num_layers must be >= 1, got {num_layers}")
    layers: list[nn.Module] = []
    d = in_dim
    for _ in range(num_layers - 1):
        layers += [nn.Linear(d, hidden, bias=not bn)] + ([nn.BatchNorm1d(hidden)] if bn else [])
        layers.append(nn.ReLU(inplace=True))
        d = hidden
    layers.append(nn.Linear(d, out_dim, bias=not last_bn))
    if last_bn:
        layers.append(nn.BatchNorm1d(out_dim, affine=False))
    return nn.Sequential(*layers)


class Encoder(nn.Module):
    """``head(backbone(x))``; ``backbone`` returns pooled (B, D) features, ``head`` maps to (B, dim)."""

    def __init__(self, backbone: nn.Module, head: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))
