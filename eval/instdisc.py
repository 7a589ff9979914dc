"""Instance-discrimination accuracy on a static augmented set (Shi et al. 2021, arXiv:2107.14762, sec. 4).

Retrieval with L2-normalised features: query i must find its positive key among a gallery of the
positive plus every *other* query (the same-domain negatives, as in ssl-small, whose gallery also held the
query itself and so read its top-k from ranks 2..k+1). ``d-sd``: query = original ``-0``, key = view
``-1``; ``sd-sd``: query = view ``-1``, key = view ``-2``. Top-m accuracy = P(rank of the positive <= m),
where rank = 1 + #{j != i : q_i . q_j > q_i . k_i} (ties do not beat the positive).
"""

from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F

from eval import cli
from smallssl.errors import run_cli

MODES = ("d-sd", "sd-sd")


def positive_ranks(queries: torch.Tensor, keys: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """Rank (1 = best) of ``keys[i]`` for ``queries[i]`` among {keys[i]} + {queries[j], j != i}.

    queries, keys: (N, D), compared by inner product (normalise first for cosine). Returns (N,) int64.
    """
    if queries.shape != keys.shape:
        raise ValueError(f"queries and keys must be paired (N, D), got {tuple(queries.shape)}, {tuple(keys.shape)}")
    n = queries.shape[0]
    ranks = []
    for i0 in range(0, n, chunk):
        q = queries[i0:i0 + chunk]
        pos = (q * keys[i0:i0 + chunk]).sum(1, keepdim=True)  # positive logits: Bx1
        neg = q @ queries.T  # negative logits: BxN (includes the query itself, masked below)
        rows = torch.arange(q.shape[0], device=q.device)
        neg[rows, rows + i0] = float("-inf")
        ranks.append(1 + (neg > pos).sum(1))
    return torch.cat(ranks)


def instdisc_accuracy(queries: torch.Tensor, keys: torch.Tensor, topk: int = 5) -> dict[str, float]:
    """Top-1..top-``topk`` retrieval accuracy (%) of the positive key, L2-normalised features (N, D)."""
    if topk < 1:
        raise ValueError(f"topk must be >= 1, got {topk}")
    ranks = positive_ranks(F.normalize(queries.float(), dim=1), F.normalize(keys.float(), dim=1))
    return {f"top{m}": float((ranks <= m).float().mean()) * 100 for m in range(1, topk + 1)}


def select_views(r0: torch.Tensor, r1: torch.Tensor, r2: torch.Tensor, mode: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(queries, keys) for ``mode``: d-sd = (original, view 1), sd-sd = (view 1, view 2)."""
    if mode == "d-sd":
        return r0, r1
    if mode == "sd-sd":
        return r1, r2
    raise ValueError(f"mode must be one of {MODES}, got {mode!r}")


def get_args_parser() -> argparse.ArgumentParser:
    p = cli.ArgumentParser("python -m eval.instdisc", parents=[cli.common_parser()],
                           description="instance discrimination accuracy on a static augmented set")
    p.add_argument("-s", "--sample-per-class", default=None, type=cli.positive_int,
                   help="use the first S images of each class (default: all)")
    p.add_argument("--topk", default=5, type=cli.positive_int, help="report top-1 .. top-k accuracy")
    p.add_argument("--mode", default="d-sd", choices=MODES)
    p.add_argument("--dataset-mode", default="normal", help="view set: normal, g-mask, avg-mask, ...")
    return p


def main(argv: list[str] | None = None) -> dict[str, float]:
    args = get_args_parser().parse_args(argv)
    em = cli.model_from_args(args, cli.static_set_dir(args.data))
    r0, r1, r2, _ = cli.static_view_features(em, args.data, args.dataset_mode, args.sample_per_class)
    q, k = select_views(r0, r1, r2, args.mode)
    res = instdisc_accuracy(q, k, args.topk)
    accs = [round(res[f"top{m}"], 3) for m in range(1, args.topk + 1)]
    print(f"Masked: {args.dataset_mode}; Mode: {args.mode}; Top1-{args.topk}: {accs}; "
          f"CKPT: {args.pretrained or 'random-init'}; Dataset: {args.data}; "
          f"Protocol: cosine retrieval, gallery = positive + {r0.shape[0] - 1} other queries")
    return res


if __name__ == "__main__":
    sys.exit(run_cli(main))
