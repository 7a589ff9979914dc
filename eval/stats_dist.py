"""Alignment, uniformity and intra-class alignment (Wang & Isola 2020; Shi et al. 2021, arXiv:2107.14762).

On L2-normalised features:

* alignment(x, y; alpha) = E_i ||x_i - y_i||^alpha over positive pairs (alpha = 2: 2 - 2 cos).
* uniformity(x; t) = log E_{i<j} exp(-t ||x_i - x_j||^2), over all distinct pairs (exact, chunked,
  log-sum-exp), optionally on a seeded random subset. ssl-small averaged three subsets of 128 points and
  always used t=2 whatever it was given; here ``t`` is honoured.
* intra-class alignment = mean over classes of E_{i<j in class} ||x_i - x_j||^alpha.

``python -m eval.stats-dist DIR -a ARCH --pretrained CKPT`` prints the paper's six-column table (Shi et al.
2021, as ssl-small prints it) for the original domain D (``-0`` images) and the shifted domain SD (augmented
``-1`` / ``-2`` views).
"""

from __future__ import annotations

import argparse
import math
import sys

import torch
import torch.nn.functional as F

from eval import cli
from smallssl.errors import run_cli


def alignment(x: torch.Tensor, y: torch.Tensor, alpha: float = 2.0) -> float:
    """E ||x_i - y_i||^alpha for (N, D) tensors of positive pairs."""
    if x.shape != y.shape:
        raise ValueError(f"alignment needs paired (N, D) tensors, got {tuple(x.shape)} and {tuple(y.shape)}")
    if alpha <= 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")
    return float((x - y).norm(dim=1).pow(alpha).mean())


def uniformity(x: torch.Tensor, t: float = 2.0, max_samples: int | None = None, seed: int = 0,
               chunk: int = 4096) -> float:
    """log mean_{i<j} exp(-t ||x_i - x_j||^2) for (N, D) ``x`` (exact over all pairs, chunked).

    ``max_samples``: use a seeded random subset of that many rows (None = all).
    """
    if t <= 0:
        raise ValueError(f"t must be > 0, got {t}")
    n = x.shape[0]
    if n < 2:
        raise ValueError("uniformity needs at least 2 points")
    if max_samples is not None and max_samples < n:
        g = torch.Generator().manual_seed(seed)
        x = x[torch.randperm(n, generator=g)[:max_samples].to(x.device)]
        n = x.shape[0]
    x = x.double()
    sq = x.pow(2).sum(1)
    parts = []
    for i0 in range(0, n, chunk):
        xi = x[i0:i0 + chunk]
        d2 = (sq[i0:i0 + chunk, None] + sq[None, :] - 2 * xi @ x.T).clamp_min_(0)  # chunk x N
        cols = torch.arange(n, device=x.device)[None, :]
        rows = torch.arange(i0, i0 + xi.shape[0], device=x.device)[:, None]
        logits = (-t * d2).masked_fill_(cols <= rows, float("-inf"))  # pairs i < j only
        parts.append(torch.logsumexp(logits.flatten(), 0))
    return float(torch.logsumexp(torch.stack(parts), 0) - math.log(n * (n - 1) / 2))


def intra_class_alignment(x: torch.Tensor, labels: torch.Tensor, alpha: float = 2.0) -> float:
    """Mean over classes (with >= 2 samples) of E_{i<j} ||x_i - x_j||^alpha within the class."""
    values = []
    for c in labels.unique():
        xc = x[labels == c]
        if xc.shape[0] >= 2:
            values.append(float(torch.pdist(xc.double(), p=2).pow(alpha).mean()))
    if not values:
        raise ValueError("intra-class alignment needs a class with at least 2 samples")
    return sum(values) / len(values)


def stats_dist(r0: torch.Tensor, r1: torch.Tensor, r2: torch.Tensor, labels: torch.Tensor, alpha: float = 2.0,
               t: float = 2.0, uniformity_samples: int | None = None, seed: int = 0) -> dict[str, float]:
    """The paper's six statistics from features of originals ``r0`` and views ``r1``, ``r2`` (N, D) each.

    Features are L2-normalised first. Keys: ``d_sd_align`` (r0 vs r1), ``sd_sd_align`` (r1 vs r2),
    ``d_cls_align`` (r0), ``sd_cls_align`` (r1), ``d_uniform`` (r0), ``sd_uniform`` (r1).
    """
    r0, r1, r2 = (F.normalize(r.float(), dim=1) for r in (r0, r1, r2))
    return {
        "d_sd_align": alignment(r0, r1, alpha),
        "sd_sd_align": alignment(r1, r2, alpha),
        "d_cls_align": intra_class_alignment(r0, labels, alpha),
        "sd_cls_align": intra_class_alignment(r1, labels, alpha),
        "d_uniform": uniformity(r0, t, uniformity_samples, seed),
        "sd_uniform": uniformity(r1, t, uniformity_samples, seed),
    }


COLUMNS = [("D-SD align", "d_sd_align"), ("SD-SD align", "sd_sd_align"), ("D cls-align", "d_cls_align"),
           ("SD cls-align", "sd_cls_align"), ("D uniform", "d_uniform"), ("SD uniform", "sd_uniform")]


def format_table(res: dict[str, float]) -> str:
    """The paper's six-column table, as ssl-small prints it (15-character columns, 4 decimals)."""
    head = "".join(f"{name:<15}" for name, _ in COLUMNS)
    row = "".join(f"{res[key]:<15.4f}" for _, key in COLUMNS)
    return f"{head}\n{row}"


def get_args_parser() -> argparse.ArgumentParser:
    p = cli.ArgumentParser("python -m eval.stats-dist", parents=[cli.common_parser()],
                           description="alignment / uniformity / intra-class alignment on a static set")
    p.add_argument("-s", "--sample-per-class", default=None, type=cli.positive_int,
                   help="use the first S images of each class (default: all)")
    p.add_argument("--alpha", default=2.0, type=float, help="alignment exponent")
    p.add_argument("-t", "--t", default=2.0, type=float, help="uniformity temperature")
    p.add_argument("--uniformity-samples", default=None, type=cli.positive_int,
                   help="random subset for uniformity (default: all pairs)")
    p.add_argument("--mode", "--dataset-mode", dest="mode", default="normal", help="view set (normal, g-mask...)")
    return p


def main(argv: list[str] | None = None) -> dict[str, float]:
    args = get_args_parser().parse_args(argv)
    em = cli.model_from_args(args, cli.static_set_dir(args.data))
    r0, r1, r2, labels = cli.static_view_features(em, args.data, args.mode, args.sample_per_class)
    res = stats_dist(r0, r1, r2, labels, args.alpha, args.t, args.uniformity_samples, args.seed)
    print(f"[stats-dist features=l2-normalised alpha={args.alpha:g} t={args.t:g} "
          f"uniformity-pairs={'all' if args.uniformity_samples is None else args.uniformity_samples} "
          f"mode={args.mode}]")
    print(f"{args.pretrained or 'random-init'},{args.data}")
    print(format_table(res))
    return res


if __name__ == "__main__":
    sys.exit(run_cli(main))
