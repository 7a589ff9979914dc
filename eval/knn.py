"""k-nearest-neighbour evaluation: the paper's best-NN and DINO's weighted kNN, from one top-k pass.

Protocols (every printed line names its protocol, so numbers of different protocols are never mixed):

* ``paper`` (Shi et al. 2021, arXiv:2107.14762, "best-NN"): Euclidean distance in a representation
  space (``original`` features, ``norm``: L2-normalised, ``shifted-norm``: centred then normalised;
  ``shift-norm`` is accepted too), majority vote among the k nearest training samples (ties go to the
  smallest class index), accuracy for every odd k <= K; reports the best k:
  ``best-NN=xx.xx%, k=K.``
* ``dino`` (Caron et al. 2021, DINO's ``knn_classifier``; Wu et al. 2018): cosine similarity of
  L2-normalised features, the k=20 nearest vote with weight exp(sim / T), T=0.07; top-1 / top-5.

One search for the K nearest neighbours serves every k <= K (the K neighbours are sorted, so the k nearest
are their first k columns). Backends: ``torch`` (blocked matmul with a running top-k, CPU or GPU) and
``faiss`` (exact ``IndexFlatIP`` / ``IndexFlatL2``, CPU). Deviation from ssl-small: ``shifted-norm``
subtracts the mean of the *training* features from both sets, instead of each shuffled batch's own mean
(which made the result depend on batch size and order).
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
import torch.nn.functional as F

REP_SPACES = ("original", "norm", "shifted-norm")
_REP_ALIASES = {"shift-norm": "shifted-norm"}
METRICS = ("ip", "l2")
BACKENDS = ("auto", "torch", "faiss")


# ------------------------------------------------------------------------------------------- search
def rep_space_transform(train: torch.Tensor, test: torch.Tensor, rep_space: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Map (N, D) train and (Q, D) test features into ``rep_space`` (see module docstring)."""
    rep_space = _REP_ALIASES.get(rep_space, rep_space)
    if rep_space == "original":
        return train, test
    if rep_space == "norm":
        return F.normalize(train, dim=1), F.normalize(test, dim=1)
    if rep_space == "shifted-norm":
        mean = train.mean(0, keepdim=True)
        return F.normalize(train - mean, dim=1), F.normalize(test - mean, dim=1)
    raise ValueError(f"rep_space must be one of {REP_SPACES} (or 'shift-norm'), got {rep_space!r}")


def _torch_search(train: torch.Tensor, test: torch.Tensor, k: int, metric: str, query_chunk: int,
                  bank_chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    n = train.shape[0]
    if metric == "l2":
        # -||q - y||^2 / 2 = q.y - ||y||^2 / 2 - ||q||^2 / 2: the last term does not change a query's ranking,
        # the others are one matmul of [q, 1] with [y, -||y||^2 / 2] (no extra pass over the Qc x Nb scores).
        train = torch.cat([train, -0.5 * train.pow(2).sum(1, keepdim=True)], 1)
        test_aug = torch.cat([test, torch.ones_like(test[:, :1])], 1)
    else:
        test_aug = test
    out_s, out_i = [], []
    for q0 in range(0, test.shape[0], query_chunk):
        q = test_aug[q0:q0 + query_chunk]
        best_s = q.new_full((q.shape[0], 0), float("-inf"))
        best_i = torch.zeros((q.shape[0], 0), dtype=torch.long, device=q.device)
        for b0 in range(0, n, bank_chunk):
            s = q @ train[b0:b0 + bank_chunk].T  # similarities: Qc x Nb
            s, i = s.topk(min(k, s.shape[1]), dim=1)
            best_s, j = torch.cat([best_s, s], 1).topk(min(k, best_s.shape[1] + s.shape[1]), dim=1)
            best_i = torch.cat([best_i, i + b0], 1).gather(1, j)
        if metric == "l2":  # back to negated squared distances: -||q - y||^2 = 2 s - ||q||^2
            best_s = 2 * best_s - test[q0:q0 + query_chunk].pow(2).sum(1, keepdim=True)
        out_s.append(best_s)
        out_i.append(best_i)
    return torch.cat(out_s), torch.cat(out_i)


def _faiss_search(train: torch.Tensor, test: torch.Tensor, k: int, metric: str) -> tuple[torch.Tensor, torch.Tensor]:
    import faiss  # optional dependency: only needed for backend="faiss"

    xb = train.detach().float().cpu().contiguous().numpy()
    xq = test.detach().float().cpu().contiguous().numpy()
    index = faiss.IndexFlatIP(xb.shape[1]) if metric == "ip" else faiss.IndexFlatL2(xb.shape[1])
    index.add(xb)
    s, i = index.search(xq, k)
    s, i = torch.from_numpy(s), torch.from_numpy(i).long()
    if metric == "l2":
        s = -s  # faiss returns squared distances, ascending
    return s.to(test.device), i.to(test.device)


def _has_faiss() -> bool:
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


def knn_search(train: torch.Tensor, test: torch.Tensor, k: int, metric: str = "ip", backend: str = "auto",
               query_chunk: int = 2048, bank_chunk: int = 16384) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact k nearest training rows of each test row.

    train: (N, D), test: (Q, D). ``metric="ip"``: largest inner product; ``"l2"``: smallest Euclidean
    distance. ``backend="auto"``: faiss for CPU tensors when installed (faster there), torch otherwise.
    Returns scores (Q, k) sorted descending (inner products, or negated squared distances) and
    indices (Q, k) into ``train``. ``k`` is clipped to N. Chunk sizes bound memory (Qc x Nb scores)
    and do not change the result.
    """
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if train.dim() != 2 or test.dim() != 2 or train.shape[1] != test.shape[1]:
        raise ValueError(f"expected (N, D) and (Q, D) features, got {tuple(train.shape)} and {tuple(test.shape)}")
    if k < 1 or query_chunk < 1 or bank_chunk < 1:
        raise ValueError(f"k, query_chunk and bank_chunk must be >= 1, got {k}, {query_chunk}, {bank_chunk}")
    k = min(k, train.shape[0])
    train, test = train.float(), test.float()
    if backend == "auto":
        backend = "faiss" if test.device.type == "cpu" and _has_faiss() else "torch"
    if backend == "faiss":
        return _faiss_search(train, test, k, metric)
    return _torch_search(train, test, k, metric, query_chunk, bank_chunk)


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


def best_nn(train: torch.Tensor, train_labels: torch.Tensor, test: torch.Tensor, test_labels: torch.Tensor,
            max_k: int = 101, rep_space: str = "original", backend: str = "auto",
            query_chunk: int = 2048, bank_chunk: int = 16384) -> dict[str, float]:
    """The paper's best-NN (%) over odd k <= ``max_k``, Euclidean distance in ``rep_space``.

    train: (N, D) with labels (N,); test: (Q, D) with labels (Q,). Returns ``best_nn``, ``best_k`` and
    ``acc@k=<k>`` for every odd k, in percent.
    """
    train, test = rep_space_transform(train.float(), test.float(), rep_space)
    _, idx = knn_search(train, test, max_k, "l2", backend, query_chunk, bank_chunk)
    num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    neighbor_labels = train_labels.to(idx.device)[idx]
    return best_nn_from_neighbors(neighbor_labels, test_labels.to(idx.device), max_k, num_classes)


def dino_knn(train: torch.Tensor, train_labels: torch.Tensor, test: torch.Tensor, test_labels: torch.Tensor,
             k: int = 20, temperature: float = 0.07, backend: str = "auto", query_chunk: int = 2048,
             bank_chunk: int = 16384) -> dict[str, float]:
    """DINO's weighted kNN (%): cosine similarity, the k nearest vote with weight exp(sim / temperature).

    train: (N, D) with labels (N,); test: (Q, D) with labels (Q,). Returns ``top1`` and ``top5``.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    train, test = F.normalize(train.float(), dim=1), F.normalize(test.float(), dim=1)
    sims, idx = knn_search(train, test, k, "ip", backend, query_chunk, bank_chunk)
    num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    neighbor_labels = train_labels.to(idx.device)[idx]
    probs = torch.zeros(test.shape[0], num_classes, device=idx.device)
    probs.scatter_add_(1, neighbor_labels, (sims / temperature).exp())
    top = probs.topk(min(5, num_classes), dim=1).indices
    hit = top == test_labels.to(idx.device).view(-1, 1)
    return {"top1": float(hit[:, 0].float().mean()) * 100, "top5": float(hit.any(1).float().mean()) * 100}


# ----------------------------------------------------------------------------------------- printing
def paper_line(res: dict[str, float], rep_space: str, max_k: int, split: str) -> str:
    return (f"[knn protocol=paper rep-space={_REP_ALIASES.get(rep_space, rep_space)} distance=euclidean "
            f"vote=majority k=odd<={max_k} split={split}] best-NN={res['best_nn']:3.2f}%, k={int(res['best_k'])}.")


def dino_line(res: dict[str, float], k: int, temperature: float, split: str) -> str:
    return (f"[knn protocol=dino features=l2-normalised similarity=cosine vote=weighted k={k} T={temperature:g} "
            f"split={split}] top1={res['top1']:.2f}% top5={res['top5']:.2f}%")


# ---------------------------------------------------------------------------------------------- CLI
def get_args_parser() -> argparse.ArgumentParser:
    from eval.features import common_parser

    p = argparse.ArgumentParser("python -m eval.knn", parents=[common_parser()],
                                description="kNN evaluation (paper best-NN or DINO weighted kNN)")
    p.add_argument("-k", "--k", default=None, type=int,
                   help="paper: max k (odd k <= K are tried; default 101); dino: k (default 20)")
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
    argv = sys.argv[1:] if argv is None else argv
    if "--bench" in argv:
        from eval.knn_bench import main as bench_main

        return bench_main([a for a in argv if a != "--bench"])
    from eval.features import init_distributed_from_env, model_from_args, resolve_data, split_dir, split_features

    args = get_args_parser().parse_args(argv)
    init_distributed_from_env()
    root = resolve_data(args.data)
    train_dir, val_dir = split_dir(root, args.train_split), split_dir(root, args.val_split)
    model, size = model_from_args(args, train_dir)
    t0 = time.time()
    xtr, ytr = split_features(args, model, train_dir, size)
    xte, yte = split_features(args, model, val_dir, size)
    import torch.distributed as tdist

    if tdist.is_initialized() and tdist.get_rank() != 0:
        return {}
    print(f"=> features: train {tuple(xtr.shape)}, val {tuple(xte.shape)} ({time.time() - t0:.1f}s)")
    if args.backend != "faiss":  # search where the model ran (GPU when there is one)
        xtr, ytr, xte, yte = (t.to(args.device) for t in (xtr, ytr, xte, yte))
    split = f"{args.train_split}->{args.val_split}"
    results: dict[str, float] = {}
    if args.protocol in ("paper", "both"):
        max_k = args.k or 101
        res = best_nn(xtr, ytr, xte, yte, max_k, args.rep_space, args.backend)
        print(paper_line(res, args.rep_space, max_k, split))
        results.update({f"paper/{name}": v for name, v in res.items()})
    if args.protocol in ("dino", "both"):
        k = args.k if (args.k and args.protocol == "dino") else 20
        res = dino_knn(xtr, ytr, xte, yte, k, args.temperature, args.backend)
        print(dino_line(res, k, args.temperature, split))
        results.update({f"dino/{name}": v for name, v in res.items()})
    return results


if __name__ == "__main__":
    main()
