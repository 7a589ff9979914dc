"""Projection heads and the ``Encoder`` (backbone + head) used by every method.

``--mlp`` choices. ssl-small's names mean what ssl-small's ``moco/builder.py`` builds (``d`` = backbone width,
``dim`` = ``--moco-dim``; ReLU between layers, no BatchNorm)::

    none     Linear(d, dim)                                        MoCo v1's fc (ssl-small without --mlp)
    simple   Linear(d, d) - Linear(d, dim)                         MoCo v2's head; ``v2`` (bare ``--mlp``) is the same
    wide     Linear(d, 2d) - Linear(2d, dim)                       ssl-small's default for small backbones
    deep     Linear(d, d) - Linear(d, d) - Linear(d, dim)
    dropout  Linear(d, d) - Dropout(0.5) - Linear(d, dim)

and smallssl's own heads (earlier smallssl versions called them ``wide`` and ``simple``)::

    wide_bn  Linear(d, h) - BN - Linear(h, dim), h = max(2048, d)
    narrow   Linear(d, dim) - Linear(dim, dim)

Module indices match the peers' checkpoints (``fc.0`` / ``fc.2`` ..., ``fc.3`` after the dropout).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn as nn

SSL_SMALL_HEADS = ("none", "simple", "wide", "deep", "dropout")
HEADS = ("none", "v2", "simple", "wide", "deep", "dropout", "wide_bn", "narrow")


def build_head(kind: str, in_dim: int, out_dim: int) -> nn.Module:
    """The ``--mlp`` head ``kind`` (see the module docstring): (B, in_dim) -> (B, out_dim)."""
    d, relu = in_dim, nn.ReLU(inplace=True)
    if kind == "none":
        return nn.Sequential(nn.Linear(d, out_dim))
    if kind in ("v2", "simple"):
        return nn.Sequential(nn.Linear(d, d), relu, nn.Linear(d, out_dim))
    if kind == "wide":
        return nn.Sequential(nn.Linear(d, 2 * d), relu, nn.Linear(2 * d, out_dim))
    if kind == "deep":
        return nn.Sequential(nn.Linear(d, d), relu, nn.Linear(d, d), nn.ReLU(inplace=True), nn.Linear(d, out_dim))
    if kind == "dropout":
        return nn.Sequential(nn.Linear(d, d), relu, nn.Dropout(0.5), nn.Linear(d, out_dim))
    if kind == "wide_bn":
        hidden = max(2048, d)
        return nn.Sequential(nn.Linear(d, hidden), nn.BatchNorm1d(hidden), relu, nn.Linear(hidden, out_dim))
    if kind == "narrow":
        return nn.Sequential(nn.Linear(d, out_dim), relu, nn.Linear(out_dim, out_dim))
    raise ValueError(f"unknown head {kind!r}; choose one of {', '.join(HEADS)}")


def head_kind(head_state: Mapping[str, torch.Tensor]) -> str | None:
    """The ``--mlp`` kind whose head has exactly these tensor names and shapes (keys relative to the head)."""
    shapes = {k: tuple(v.shape) for k, v in head_state.items() if not k.endswith("num_batches_tracked")}
    first = shapes.get("0.weight") or shapes.get("weight")
    last_w = [v for k, v in shapes.items() if k.endswith("weight") and len(v) == 2]
    if first is None or len(first) != 2 or not last_w:
        return None
    in_dim = first[1]
    out_dim = max(((int(k.split(".")[0]) if "." in k else 0), v[0]) for k, v in shapes.items()
                  if k.endswith("weight") and len(v) == 2)[1]
    for kind in (h for h in HEADS if h != "v2"):  # v2 is simple's alias
        with torch.device("meta"):
            ref = build_head(kind, in_dim, out_dim).state_dict()
        if {k: tuple(v.shape) for k, v in ref.items() if not k.endswith("num_batches_tracked")} == shapes:
            return kind
    return None


def head_hint(state: Mapping[str, torch.Tensor], own: Mapping[str, torch.Tensor], prefix: str = "encoder_q.head."
              ) -> str:
    """`` The checkpoint's head is --mlp X.`` when the checkpoint's and the model's heads differ, else ``""``.

    ``own``: the model's tensors, its head under ``prefix``; ``state``: the checkpoint's head, keys relative to
    the head (``0.weight``)."""
    theirs = dict(state)
    ours = {k[len(prefix):]: v for k, v in own.items() if k.startswith(prefix)}
    if not theirs or {k: tuple(v.shape) for k, v in theirs.items()} == {k: tuple(v.shape) for k, v in ours.items()}:
        return ""
    kind = head_kind(theirs)
    if kind is None:
        return " The checkpoint's projection head is none of the --mlp choices."
    note = " (smallssl's --mlp wide before it took ssl-small's meaning)" if kind == "wide_bn" else ""
    return f" The checkpoint's projection head is --mlp {kind}{note}; pass --mlp {kind} to load it."


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

    def embed(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(head(f), f)`` with ``f = backbone(x)``: the embedding and the pooled (B, D) features (for the
        trainer's collapse diagnostics, at no extra cost)."""
        f = self.backbone(x)
        return self.head(f), f
