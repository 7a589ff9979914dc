"""``python -m eval.knn_bench``: time the paper's best-NN (all odd k <= 101) on random features.

Default shape is CIFAR-10's: 50,000 train x 10,000 test, D=128, 10 classes, k <= 101, L2-normalised
features (so Euclidean and cosine neighbours coincide). Implementations timed in the same run:

* ``dino-style, one pass per k``: DINO's ``knn_classifier`` structure (Caron et al. 2021): test queries in
  100 chunks, ``chunk @ train.T``, ``topk(k)``, one-hot votes; DINO's ``eval_knn`` calls it once per k, so
  best-NN over 51 odd k makes 51 passes. Timed on ``--baseline-queries`` queries and scaled linearly to
  the full query set (the scaling is printed) unless ``--full-baseline``.
* ``dino-style, shared top-k``: the same chunks, one ``topk(101)`` per chunk, one-hot votes per k.
* ``smallssl torch`` / ``smallssl faiss``: :func:`eval.knn.best_nn` (one search, incremental votes).

Every implementation must give the same best-NN (checked, printed).
"""

from __future__ import annotations

import sys
import time

import torch
import torch.nn.functional as F

from eval import cli
from eval.knn import best_nn
from smallssl.errors import run_cli


def _dino_style_chunk_votes(train_t: torch.Tensor, train_labels: torch.Tensor, feats: torch.Tensor, k: int,
                            num_classes: int) -> torch.Tensor:
    """One DINO-style chunk: similarities, top-k, one-hot majority vote -> predictions (B,)."""
    sims = feats @ train_t  # B x N
    _, idx = sims.topk(k, dim=1, largest=True, sorted=True)
    retrieved = train_labels.view(1, -1).expand(feats.shape[0], -1).gather(1, idx)
    one_hot = torch.zeros(feats.shape[0] * k, num_classes)
    one_hot.scatter_(1, retrieved.reshape(-1, 1), 1)
    return one_hot.view(feats.shape[0], k, num_classes).sum(1).argmax(1)


def dino_style_per_k(train, train_labels, test, test_labels, max_k, num_classes, chunk) -> tuple[float, int]:
    """Best-NN as DINO's eval loop would compute it: one full chunked pass per odd k."""
    train_t = train.t()
    best, best_k = -1.0, 0
    for k in range(1, max_k + 1, 2):
        correct = 0
        for i in range(0, test.shape[0], chunk):
            pred = _dino_style_chunk_votes(train_t, train_labels, test[i:i + chunk], k, num_classes)
            correct += int((pred == test_labels[i:i + chunk]).sum())
        acc = 100.0 * correct / test.shape[0]
        if acc > best:
            best, best_k = acc, k
    return best, best_k


def dino_style_shared_topk(train, train_labels, test, test_labels, max_k, num_classes) -> tuple[float, int]:
    """DINO-style chunks with one top-``max_k`` per chunk reused for every odd k."""
    train_t = train.t()
    chunk = max(1, test.shape[0] // 100)
    ks = list(range(1, max_k + 1, 2))
    correct = torch.zeros(len(ks))
    for i in range(0, test.shape[0], chunk):
        feats, targets = test[i:i + chunk], test_labels[i:i + chunk]
        _, idx = (feats @ train_t).topk(max_k, dim=1)
        retrieved = train_labels[idx]
        for n, k in enumerate(ks):
            one_hot = torch.zeros(feats.shape[0] * k, num_classes)
            one_hot.scatter_(1, retrieved[:, :k].reshape(-1, 1), 1)
            pred = one_hot.view(feats.shape[0], k, num_classes).sum(1).argmax(1)
            correct[n] += (pred == targets).sum()
    accs = 100.0 * correct / test.shape[0]
    j = int(accs.argmax())
    return float(accs[j]), ks[j]


def make_features(n_train: int, n_test: int, dim: int, num_classes: int, seed: int = 0):
    """Gaussian class clusters (so accuracies are far from chance), L2-normalised: (N, D), (N,), (Q, D), (Q,)."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(num_classes, dim, generator=g)
    ytr = torch.randint(0, num_classes, (n_train,), generator=g)
    yte = torch.randint(0, num_classes, (n_test,), generator=g)
    xtr = F.normalize(centers[ytr] * 0.15 + torch.randn(n_train, dim, generator=g), dim=1)
    xte = F.normalize(centers[yte] * 0.15 + torch.randn(n_test, dim, generator=g), dim=1)
    return xtr, ytr, xte, yte


def main(argv: list[str] | None = None) -> dict[str, float]:
    p = cli.ArgumentParser("python -m eval.knn_bench", description="time best-NN implementations on random features")
    p.add_argument("--n-train", type=cli.positive_int, default=50000)
    p.add_argument("--n-test", type=cli.positive_int, default=10000)
    p.add_argument("--dim", type=cli.positive_int, default=128)
    p.add_argument("--classes", type=cli.positive_int, default=10)
    p.add_argument("-k", "--k", type=cli.positive_int, default=101)
    p.add_argument("--threads", type=cli.positive_int, default=2)
    p.add_argument("--baseline-queries", type=cli.positive_int, default=1000,
                   help="queries the per-k baseline runs on (time scaled to --n-test)")
    p.add_argument("--full-baseline", action="store_true", help="run the per-k baseline on every query")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    xtr, ytr, xte, yte = make_features(args.n_train, args.n_test, args.dim, args.classes)
    rows = []

    def timed(name, fn, scale=1.0):
        t = time.perf_counter()
        acc, k = fn()
        rows.append((name, (time.perf_counter() - t) * scale, acc, k, scale))

    nq = args.n_test if args.full_baseline else min(args.baseline_queries, args.n_test)
    chunk = max(1, args.n_test // 100)  # DINO: the test set in 100 chunks
    timed("dino-style, one pass per k", lambda: dino_style_per_k(xtr, ytr, xte[:nq], yte[:nq], args.k,
                                                                    args.classes, chunk), args.n_test / nq)
    timed("dino-style, shared top-k", lambda: dino_style_shared_topk(xtr, ytr, xte, yte, args.k, args.classes))
    for backend in ("torch", "faiss"):
        if backend == "faiss":
            try:
                import faiss

                faiss.omp_set_num_threads(args.threads)
            except ImportError:
                print("faiss not installed: skipped")
                continue

        def ours(b=backend):
            r = best_nn(xtr, ytr, xte, yte, args.k, "norm", b)
            return r["best_nn"], int(r["best_k"])

        timed(f"smallssl best_nn ({backend})", ours)
    print(f"kNN bench: best-NN over odd k<={args.k}, train {args.n_train} x test {args.n_test} x D={args.dim}, "
          f"{args.classes} classes, {args.threads} threads, device cpu")
    print(f"{'implementation':<34}{'time (s)':>10}{'speed-up':>10}{'best-NN':>10}{'k':>5}")
    base = {name: t for name, t, *_ in rows}
    ref = rows[0][1]
    for name, t, acc, k, scale in rows:
        note = f"  (measured on {nq} queries, x{scale:g})" if scale != 1 else ""
        print(f"{name:<34}{t:>10.2f}{ref / t:>9.1f}x{acc:>9.2f}%{k:>5}{note}")
    full = [r for r in rows if r[4] == 1]
    if len({(round(r[2], 3), r[3]) for r in full}) != 1:
        print("WARNING: implementations disagree on best-NN")
    return {name: t for name, t in base.items()}


if __name__ == "__main__":
    sys.exit(run_cli(main))
