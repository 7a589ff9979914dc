"""k-nearest-neighbour evaluation: the paper's best-NN and DINO's weighted kNN, on a bank that may be sharded.

Protocols (every printed line names its protocol, so numbers of different protocols are never mixed):

* ``paper`` (Shi et al. 2021, arXiv:2107.14762, "best-NN"): Euclidean distance in a representation
  space (``original`` features, ``norm``: L2-normalised, ``shifted-norm``: centred then normalised;
  ``shift-norm`` is accepted too), majority vote among the k nearest training samples (ties go to the
  smallest class index), accuracy for every odd k <= K; reports the best k:
  ``best-NN=xx.xx%, k=K.``
* ``dino`` (Caron et al. 2021, DINO's ``knn_classifier``; Wu et al. 2018): cosine similarity of
  L2-normalised features, the k=20 nearest vote with weight exp(sim / T), T=0.07. Classes are ranked by
  their summed weight; top-1 is the first, top-5 counts a hit in the first ``min(5, k)`` ranks (DINO: "top5
  does not make sense if k < 5"), and classes with equal weight (in particular the classes that got no
  vote, which fill the top-5 when fewer than 5 classes were voted for) rank by class index, the order of
  the stable descending sort DINO's ``probs.sort`` performs on small class counts.

One search for the K nearest neighbours serves every k <= K (the neighbours are sorted, so the k nearest
are their first k columns). The bank may be split over ``torch.distributed`` ranks (see
:mod:`eval.knn_search`: per-rank top-k, all-gathered, merged; equal to one process bit for bit, ties by
global index); ``torchrun --nproc_per_node P -m eval.knn ...`` shards both the feature extraction and the
bank. Deviation from ssl-small: ``shifted-norm`` subtracts the mean of the *training* features from both
sets, instead of each shuffled batch's own mean (which made the result depend on batch size and order).
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
import torch.nn.functional as F

from eval import cli
from eval.knn_search import (
    BACKENDS,
    METRICS,
    all_gather_rows,
    comm_device,
    global_count,
    global_max,
    knn_search,
    sharded_topk,
)
from smallssl import dist
from smallssl.errors import run_cli

__all__ = ["BACKENDS", "METRICS", "PROTOCOLS", "REP_SPACES", "best_nn", "best_nn_from_neighbors", "dino_from_neighbors",
           "dino_knn", "knn_eval_sharded", "knn_search", "majority_votes", "rep_space_transform", "main"]

REP_SPACES = ("original", "norm", "shifted-norm")
_REP_ALIASES = {"shift-norm": "shifted-norm"}
PROTOCOLS = ("dino", "paper")


def rep_space_transform(train: torch.Tensor, test: torch.Tensor, rep_space: str,
                        mean: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Map (N, D) train and (Q, D) test features into ``rep_space`` (see module docstring).

    ``mean``: the (D,) training mean for ``shifted-norm`` (default: the mean of ``train``; a sharded bank
    passes the global one).
    """
    rep_space = _REP_ALIASES.get(rep_space, rep_space)
    if rep_space == "original":
        return train, test
    if rep_space == "norm":
        return F.normalize(train, dim=1), F.normalize(test, dim=1)
    if rep_space == "shifted-norm":
        mean = (train.double().sum(0) / train.shape[0]).to(train.dtype) if mean is None else mean
        return F.normalize(train - mean, dim=1), F.normalize(test - mean, dim=1)
    raise ValueError(f"rep_space must be one of {REP_SPACES} (or 'shift-norm'), got {rep_space!r}")


# --------------------------------------------------------------------------------------------- votes
def majority_votes(neighbor_labels: torch.Tensor, ks: list[int], num_classes: int) -> torch.Tensor:
    """Majority-vote predictions for each k in ``ks`` from sorted neighbour labels (Q, K) -> (len(ks), Q).

    Counts grow one neighbour at a time, so all k cost one pass; ties go to the smallest class index.
    """
    q, kmax = neighbor_labels.shape
    if any(k < 1 or k > kmax for k in ks):
        raise ValueError(f"every k must be in [1, {kmax}], got {ks}")
    wanted = set(ks)
    counts = torch.zeros(q, num_classes, device=neighbor_labels.device)
    ones = torch.ones(q, 1, device=neighbor_labels.device)
    preds = {}
    for j in range(max(ks)):
        counts.scatter_add_(1, neighbor_labels[:, j:j + 1], ones)
        if j + 1 in wanted:
            preds[j + 1] = counts.argmax(1)  # first maximum = smallest class on ties
    return torch.stack([preds[k] for k in ks])


def best_nn_from_neighbors(neighbor_labels: torch.Tensor, test_labels: torch.Tensor, max_k: int,
                           num_classes: int) -> dict[str, float]:
    """Paper best-NN: accuracy for every odd k <= max_k; the best one (smallest k on ties)."""
    ks = list(range(1, min(max_k, neighbor_labels.shape[1]) + 1, 2))
    preds = majority_votes(neighbor_labels, ks, num_classes)
    accs = (preds == test_labels.view(1, -1)).float().mean(1)
    best = int(accs.argmax())  # first maximum = smallest k
    out = {"best_nn": float(accs[best]) * 100, "best_k": float(ks[best])}
    out.update({f"acc@k={k}": float(a) * 100 for k, a in zip(ks, accs)})
    return out


def dino_from_neighbors(sims: torch.Tensor, neighbor_labels: torch.Tensor, test_labels: torch.Tensor,
                        temperature: float, num_classes: int) -> dict[str, float]:
    """DINO's weighted vote on sorted neighbours: sims (Q, k) cosine, labels (Q, k) -> top1 / top5 (%).

    Each neighbour adds exp(sim / T) to its class; classes ranked by that sum, ties by class index; top-5
    looks at the first min(5, k) ranks only (DINO's ``correct.narrow(1, 0, min(5, k))``).
    """
    q, k = sims.shape
    weights = (sims.double() / temperature).exp()
    probs = torch.zeros(q, num_classes, dtype=torch.float64, device=sims.device)
    for j in range(k):  # one neighbour per call: no two adds meet in one cell, so the sum order is fixed
        probs.scatter_add_(1, neighbor_labels[:, j:j + 1], weights[:, j:j + 1])
    ranked = probs.argsort(dim=1, descending=True, stable=True)  # equal weights: smaller class first
    hit = ranked[:, :min(5, k)] == test_labels.to(ranked.device).view(-1, 1)
    return {"top1": float(hit[:, 0].float().mean()) * 100, "top5": float(hit.any(1).float().mean()) * 100}


# ------------------------------------------------------------------------------------------ protocols
def knn_eval_sharded(bank_feats_local: torch.Tensor, bank_labels_local: torch.Tensor,
                     bank_offset: int | torch.Tensor, query_feats: torch.Tensor, query_labels: torch.Tensor,
                     k: int = 20, T: float = 0.07, num_classes: int | None = None, protocol: str = "dino", *,
                     rep_space: str = "original", backend: str = "auto", query_chunk: int = 1024,
                     bank_chunk: int = 16384, query_sharded: bool = False,
                     distributed: bool | None = None) -> dict[str, float]:
    """kNN accuracy of queries against a bank whose rows are split over the ranks (or all local).

    bank_feats_local: (n_local, D) this rank's bank rows, labels (n_local,); ``bank_offset``: the global index
    of its first row (contiguous shards, e.g. :func:`eval.features.extract_shard`) or a (n_local,) int64
    tensor of global indices. query_feats (Q, D) and query_labels (Q,): the same on every rank, or with
    ``query_sharded=True`` each rank's own queries (any split; they are all-gathered, Q x D is small).
    ``protocol="dino"``: cosine, weighted vote, k neighbours, temperature ``T`` -> ``top1``, ``top5``;
    ``"paper"``: Euclidean in ``rep_space``, majority vote for every odd k <= ``k`` -> ``best_nn``,
    ``best_k``, ``acc@k=<k>``. Both add ``k``: the k actually used, ``min(k, N)`` for a bank of N rows.
    ``num_classes``: default the largest label + 1 over all ranks. ``distributed``: merge over the process
    group (default: when one is initialised; world size 1 and no group work too). Every rank returns the
    same dict; no rank holds the whole bank or a Q x N score matrix. Results equal one process bit for
    bit (ties between equal scores go to the smaller global index).
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if protocol == "dino" and T <= 0:
        raise ValueError(f"temperature must be > 0, got {T}")
    distributed = (dist.is_dist() if distributed is None else distributed) and dist.get_world_size() > 1
    if query_feats.shape[0] != query_labels.shape[0]:
        raise ValueError(f"queries need one label each, got {tuple(query_feats.shape)} features and "
                         f"{tuple(query_labels.shape)} labels")
    if query_sharded and distributed:
        query_feats, query_labels = all_gather_rows(query_feats), all_gather_rows(query_labels)
    if query_feats.shape[0] == 0:
        raise ValueError("no queries. Pass at least one query feature")
    dev = query_feats.device
    n_local = bank_feats_local.shape[0]
    if isinstance(bank_offset, torch.Tensor):
        bank_index = bank_offset.to(dev, torch.long)
    else:
        bank_index = torch.arange(int(bank_offset), int(bank_offset) + n_local, device=dev)
    bank_labels_local = bank_labels_local.to(dev, torch.long)
    query_labels = query_labels.to(dev, torch.long)
    if num_classes is None:
        top = int(bank_labels_local.max()) if n_local else -1
        num_classes = max(global_max([top, int(query_labels.max())], distributed)) + 1
    bank = bank_feats_local.to(dev).float()
    queries = query_feats.float()
    if protocol == "dino":
        bank, queries = F.normalize(bank, dim=1), F.normalize(queries, dim=1)
        metric = "ip"
    else:
        mean = None
        if _REP_ALIASES.get(rep_space, rep_space) == "shifted-norm":
            # float64 partial sums rounded to float32: the split can change the mean only where a float64
            # rounding difference crosses a float32 rounding boundary (never seen; not guaranteed).
            total = bank.double().sum(0)
            if distributed:
                total = dist.all_reduce_sum(total.to(comm_device())).to(dev)
            mean = (total / global_count(n_local, distributed)).float()
        bank, queries = rep_space_transform(bank, queries, rep_space, mean)
        metric = "l2"
    sims, _, labels = sharded_topk(bank, bank_labels_local, bank_index, queries, k, metric, backend,
                                   query_chunk, bank_chunk, distributed=distributed)
    k_used = sims.shape[1]
    if protocol == "dino":
        res = dino_from_neighbors(sims, labels, query_labels, T, num_classes)
    else:
        res = best_nn_from_neighbors(labels, query_labels, k_used, num_classes)
    res["k"] = float(k_used)
    return res


def best_nn(train: torch.Tensor, train_labels: torch.Tensor, test: torch.Tensor, test_labels: torch.Tensor,
            max_k: int = 101, rep_space: str = "original", backend: str = "auto",
            query_chunk: int = 2048, bank_chunk: int = 16384) -> dict[str, float]:
    """The paper's best-NN (%) over odd k <= ``max_k``, Euclidean distance in ``rep_space`` (one process).

    train: (N, D) with labels (N,); test: (Q, D) with labels (Q,). Returns ``best_nn``, ``best_k``,
    ``acc@k=<k>`` for every odd k, in percent, and ``k`` (max k used, ``min(max_k, N)``).
    """
    return knn_eval_sharded(train, train_labels, 0, test, test_labels, max_k, protocol="paper", rep_space=rep_space,
                            backend=backend, query_chunk=query_chunk, bank_chunk=bank_chunk, distributed=False)


def dino_knn(train: torch.Tensor, train_labels: torch.Tensor, test: torch.Tensor, test_labels: torch.Tensor,
             k: int = 20, temperature: float = 0.07, backend: str = "auto", query_chunk: int = 2048,
             bank_chunk: int = 16384) -> dict[str, float]:
    """DINO's weighted kNN (%), one process: cosine similarity, the k nearest vote with weight exp(sim / T).

    train: (N, D) with labels (N,); test: (Q, D) with labels (Q,). Returns ``top1``, ``top5`` and ``k``.
    """
    return knn_eval_sharded(train, train_labels, 0, test, test_labels, k, temperature, protocol="dino",
                            backend=backend, query_chunk=query_chunk, bank_chunk=bank_chunk, distributed=False)


# ----------------------------------------------------------------------------------------- printing
def _k_note(asked: int, used: int) -> str:
    return f" (asked {asked}: the bank has {used} images)" if used < asked else ""


def paper_line(res: dict[str, float], rep_space: str, max_k: int, split: str) -> str:
    return (f"[knn protocol=paper rep-space={_REP_ALIASES.get(rep_space, rep_space)} distance=euclidean "
            f"vote=majority k=odd<={max_k} split={split}] best-NN={res['best_nn']:3.2f}%, k={int(res['best_k'])}.")


def dino_line(res: dict[str, float], k: int, temperature: float, split: str) -> str:
    return (f"[knn protocol=dino features=l2-normalised similarity=cosine vote=weighted k={k} T={temperature:g} "
            f"split={split}] top1={res['top1']:.2f}% top5={res['top5']:.2f}%")


# ---------------------------------------------------------------------------------------------- CLI
def get_args_parser() -> argparse.ArgumentParser:
    p = cli.ArgumentParser("python -m eval.knn", parents=[cli.common_parser()],
                           description="kNN evaluation (paper best-NN or DINO weighted kNN); under torchrun the "
                                       "bank is sharded over the processes")
    p.add_argument("-k", "--k", default=None, type=cli.positive_int,
                   help="paper: max k (odd k <= K are tried; default 101); dino: k (default 20); clipped to the "
                        "bank size, and the printed line says the k used")
    p.add_argument("--protocol", default="paper", choices=["paper", "dino", "both"])
    p.add_argument("--rep-space", default="original", choices=list(REP_SPACES) + list(_REP_ALIASES))
    p.add_argument("--temperature", "-T", default=0.07, type=float, help="dino protocol vote temperature")
    p.add_argument("--backend", default="auto", choices=BACKENDS, help="auto: faiss on CPU if installed, else torch")
    p.add_argument("--train-split", default="train")
    p.add_argument("--val-split", default="val")
    p.add_argument("-g", "--gpus", default=None, type=int,
                   help="ssl-small compatibility (ignored): shard with torchrun --nproc_per_node N instead")
    return p


def main(argv: list[str] | None = None) -> dict[str, float]:
    if "--bench" in (sys.argv[1:] if argv is None else argv):
        raise ValueError("--bench: the kNN benchmark is its own command. Run python -m eval.knn_bench")
    args = get_args_parser().parse_args(argv)
    if args.temperature <= 0:
        raise ValueError(f"--temperature {args.temperature:g}: must be > 0. DINO uses 0.07")
    cli.init_distributed()
    root = cli.resolve_data(args.data)
    train_dir, val_dir = cli.split_dir(root, args.train_split), cli.split_dir(root, args.val_split)
    em = cli.model_from_args(args, train_dir)
    t0 = time.time()
    xtr, ytr, offset = cli.bank_features(em, train_dir)  # this rank's block of the bank
    xte, yte = cli.split_features(em, val_dir)  # every query on every rank
    world = dist.get_world_size()
    n_bank = global_count(xtr.shape[0], world > 1)
    main_rank = dist.is_main_process()
    if main_rank:
        shard = f" ({xtr.shape[0]} rows on each of {world} ranks)" if world > 1 else ""
        print(f"=> features: train ({n_bank}, {xte.shape[1]}){shard}, val {tuple(xte.shape)} "
              f"({time.time() - t0:.1f}s)")
    if args.backend != "faiss":  # search where the model ran (GPU when there is one)
        xtr, ytr, xte, yte = (t.to(em.device) for t in (xtr, ytr, xte, yte))
    split = f"{args.train_split}->{args.val_split}"
    results: dict[str, float] = {}
    if args.protocol in ("paper", "both"):
        asked = args.k or 101
        res = knn_eval_sharded(xtr, ytr, offset, xte, yte, asked, protocol="paper", rep_space=args.rep_space,
                               backend=args.backend)
        if main_rank:
            print(paper_line(res, args.rep_space, int(res["k"]), split) + _k_note(asked, int(res["k"])))
        results.update({f"paper/{name}": v for name, v in res.items()})
    if args.protocol in ("dino", "both"):
        asked = args.k if (args.k and args.protocol == "dino") else 20
        res = knn_eval_sharded(xtr, ytr, offset, xte, yte, asked, args.temperature, protocol="dino",
                               backend=args.backend)
        if main_rank:
            print(dino_line(res, int(res["k"]), args.temperature, split) + _k_note(asked, int(res["k"])))
        results.update({f"dino/{name}": v for name, v in res.items()})
    return results


if __name__ == "__main__":
    sys.exit(run_cli(main))
