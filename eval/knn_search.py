"""Exact k-nearest-neighbour search over a bank that may be split across ``torch.distributed`` ranks.

Each rank holds a block of bank rows (with their global indices) and every query. Per block of queries:

1. **candidates**: the ``k + margin`` best rows of the local shard by a float32 search (``torch``: blocked
   matmul with a running top-k, so no rank ever holds more than a ``query_chunk x bank_chunk`` score block;
   ``faiss``: exact ``IndexFlatIP`` / ``IndexFlatL2`` on CPU);
2. **exact scores**: the candidates are re-scored in float64 by a fixed pairwise (tree) sum over the feature
   dimension, built from element-wise operations only. A BLAS matmul's rounding depends on the matrix
   shapes (measured here: a bank split in two gives other last bits for 132 of 160 shapes), so shard sizes
   would change the scores; the tree sum gives the same bits for a pair whatever the shard, the chunking,
   the thread count or the device;
3. **merge**: the local top-k (scores, global indices, labels) of every rank are all-gathered and merged,
   ordered by score, then by global index: ties go to the smaller global index.

So the result equals the one-process search bit for bit, as long as no true neighbour lies more than
``margin`` places below its float32 rank (which needs ``margin`` near-duplicates within float32 rounding of
each other: the margin defaults to ``8 + k // 4``).
"""

from __future__ import annotations

import torch
import torch.distributed as tdist

from smallssl import dist

METRICS = ("ip", "l2")
BACKENDS = ("auto", "torch", "faiss")
_NO_INDEX = torch.iinfo(torch.int64).max  # padding of ranks with fewer than k rows: sorts after every real index
_RESCORE_ELEMS = 1 << 22  # float64 elements per re-scoring block (32 MB)


def has_faiss() -> bool:
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


def check_search_args(k: int, metric: str, backend: str, query_chunk: int = 1, bank_chunk: int = 1) -> None:
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if k < 1 or query_chunk < 1 or bank_chunk < 1:
        raise ValueError(f"k, query_chunk and bank_chunk must be >= 1, got {k}, {query_chunk}, {bank_chunk}")


# --------------------------------------------------------------------------------------- candidates
def _torch_candidates(bank: torch.Tensor, queries: torch.Tensor, c: int, metric: str,
                      bank_chunk: int) -> torch.Tensor:
    """Local indices (Q, c) of the ``c`` best rows of ``bank`` (n, D) per query (Q, D), float32 scores."""
    if metric == "l2":
        # -||q - y||^2 / 2 = q.y - ||y||^2 / 2 - ||q||^2 / 2: the last term does not change a query's ranking,
        # the others are one matmul of [q, 1] with [y, -||y||^2 / 2] (no extra pass over the Qc x Nb scores).
        bank = torch.cat([bank, -0.5 * bank.pow(2).sum(1, keepdim=True)], 1)
        queries = torch.cat([queries, torch.ones_like(queries[:, :1])], 1)
    best_s = queries.new_full((queries.shape[0], 0), float("-inf"))
    best_i = torch.zeros((queries.shape[0], 0), dtype=torch.long, device=queries.device)
    for b0 in range(0, bank.shape[0], bank_chunk):
        s = queries @ bank[b0:b0 + bank_chunk].T  # similarities: Qc x Nb
        s, i = s.topk(min(c, s.shape[1]), dim=1)
        best_s, j = torch.cat([best_s, s], 1).topk(min(c, best_s.shape[1] + s.shape[1]), dim=1)
        best_i = torch.cat([best_i, i + b0], 1).gather(1, j)
    return best_i


def _faiss_candidates(bank: torch.Tensor, queries: torch.Tensor, c: int, metric: str) -> torch.Tensor:
    import faiss  # optional dependency: only needed for backend="faiss"

    xb = bank.detach().float().cpu().contiguous().numpy()
    index = faiss.IndexFlatIP(xb.shape[1]) if metric == "ip" else faiss.IndexFlatL2(xb.shape[1])
    index.add(xb)
    _, i = index.search(queries.detach().float().cpu().contiguous().numpy(), c)
    return torch.from_numpy(i).long().to(queries.device)


# ----------------------------------------------------------------------------------- exact re-scoring
def _tree_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum over the last dim by halving (element-wise adds only): the order depends on that dim's size alone."""
    while t.shape[-1] > 1:
        h = t.shape[-1] // 2
        s = t[..., :h] + t[..., h:2 * h]
        t = torch.cat([s, t[..., 2 * h:]], -1) if t.shape[-1] % 2 else s
    return t[..., 0]


def exact_scores(bank: torch.Tensor, queries: torch.Tensor, idx: torch.Tensor, metric: str) -> torch.Tensor:
    """float64 scores (Q, c) of queries (Q, D) against ``bank[idx]`` (idx (Q, c) local): inner products, or
    negated squared Euclidean distances; the same bits for a pair whatever the shapes around it."""
    q_n, c = idx.shape
    out = torch.empty((q_n, c), dtype=torch.float64, device=queries.device)
    step = max(1, _RESCORE_ELEMS // max(1, c * bank.shape[1]))
    for q0 in range(0, q_n, step):
        b = bank[idx[q0:q0 + step]].double()  # Qc x c x D
        q = queries[q0:q0 + step, None, :].double()
        out[q0:q0 + step] = _tree_sum(q * b) if metric == "ip" else -_tree_sum((q - b).square())
    return out


def sort_neighbors(scores: torch.Tensor, index: torch.Tensor, *extra: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Order each row by score (descending), ties by index (ascending); ``extra`` (same shape) follow along."""
    o = index.argsort(dim=1, stable=True)
    scores, index, extra = scores.gather(1, o), index.gather(1, o), [e.gather(1, o) for e in extra]
    o = scores.argsort(dim=1, descending=True, stable=True)
    return (scores.gather(1, o), index.gather(1, o), *(e.gather(1, o) for e in extra))


def local_topk(bank: torch.Tensor, queries: torch.Tensor, k: int, metric: str = "ip", backend: str = "auto",
               bank_chunk: int = 16384, margin: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``min(k, n)`` nearest rows of ``bank`` (n, D) for each query (Q, D), exact float64 order.

    Returns scores (Q, k') float64 (inner products, or negated squared distances) and local indices (Q, k'),
    ordered by score then index.
    """
    n = bank.shape[0]
    k = min(k, n)
    if k == 0:
        return (queries.new_zeros((queries.shape[0], 0), dtype=torch.float64),
                torch.zeros((queries.shape[0], 0), dtype=torch.long, device=queries.device))
    c = min(n, k + (8 + k // 4 if margin is None else margin))
    if backend == "auto":
        backend = "faiss" if queries.device.type == "cpu" and has_faiss() else "torch"
    if backend == "faiss":
        idx = _faiss_candidates(bank, queries, c, metric)
    else:
        idx = _torch_candidates(bank.float(), queries.float(), c, metric, bank_chunk)
    s, i = sort_neighbors(exact_scores(bank, queries, idx, metric), idx)
    return s[:, :k], i[:, :k]


# ------------------------------------------------------------------------------------ sharded search
def comm_device() -> torch.device:
    """Where collectives run: the current CUDA device under NCCL, the CPU otherwise (gloo)."""
    if tdist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _all_gather_cols(x: torch.Tensor) -> torch.Tensor:
    """(Q, k) from every rank -> (Q, world * k), rank order."""
    dev = comm_device()
    parts = [torch.empty_like(x, device=dev) for _ in range(dist.get_world_size())]
    tdist.all_gather(parts, x.to(dev).contiguous())
    return torch.cat(parts, 1).to(x.device)


def all_gather_rows(x: torch.Tensor) -> torch.Tensor:
    """Concatenate (n_r, ...) from every rank along dim 0, rank order; ranks may hold different n_r."""
    dev = comm_device()
    n = torch.tensor([x.shape[0]], device=dev)
    sizes = [torch.empty_like(n) for _ in range(dist.get_world_size())]
    tdist.all_gather(sizes, n)
    width = max(int(s) for s in sizes)
    pad = torch.zeros((width,) + tuple(x.shape[1:]), dtype=x.dtype, device=dev)
    pad[: x.shape[0]] = x.to(dev)
    parts = [torch.empty_like(pad) for _ in sizes]
    tdist.all_gather(parts, pad)
    return torch.cat([p[: int(s)] for p, s in zip(parts, sizes)]).to(x.device)


def global_count(n_local: int, distributed: bool) -> int:
    """Sum of ``n_local`` over ranks."""
    if not distributed:
        return n_local
    t = torch.tensor([n_local], dtype=torch.long)
    t = t.to(comm_device())
    tdist.all_reduce(t)
    return int(t)


def global_max(values: list[int], distributed: bool) -> list[int]:
    """Element-wise max of ``values`` over ranks."""
    if not distributed:
        return values
    t = torch.tensor(values, dtype=torch.long)
    t = t.to(comm_device())
    tdist.all_reduce(t, op=tdist.ReduceOp.MAX)
    return t.tolist()


def sharded_topk(bank_local: torch.Tensor, bank_labels_local: torch.Tensor, bank_index: torch.Tensor,
                 queries: torch.Tensor, k: int, metric: str = "ip", backend: str = "auto",
                 query_chunk: int = 1024, bank_chunk: int = 16384, margin: int | None = None,
                 distributed: bool | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The k nearest bank rows of every query when each rank holds a shard of the bank.

    bank_local: (n_local, D) with labels (n_local,) and global indices ``bank_index`` (n_local,) int64;
    queries: (Q, D), the same on every rank. ``k`` is clipped to the global bank size. ``distributed``:
    merge over the process group (default: when one is initialised); False searches the local bank alone.
    Returns scores (Q, k) float64, global indices (Q, k) and labels (Q, k), equal on every rank, ordered by
    score then global index. Peak memory per rank: ``query_chunk x bank_chunk`` scores and
    ``world x query_chunk x k`` gathered candidates; the bank is never gathered.
    """
    check_search_args(k, metric, backend, query_chunk, bank_chunk)
    width_ok = bank_local.shape[0] == 0 or bank_local.shape[-1] == queries.shape[-1]  # an empty shard may be (0, 0)
    if bank_local.dim() != 2 or queries.dim() != 2 or not width_ok:
        raise ValueError(f"expected (N, D) bank and (Q, D) query features, got {tuple(bank_local.shape)} and "
                         f"{tuple(queries.shape)}")
    if not (bank_labels_local.shape == bank_index.shape == bank_local.shape[:1]):
        raise ValueError(f"bank labels {tuple(bank_labels_local.shape)} and indices {tuple(bank_index.shape)} must "
                         f"have one entry per bank row ({bank_local.shape[0]})")
    distributed = dist.is_dist() if distributed is None else distributed
    distributed = distributed and dist.get_world_size() > 1
    n_total = global_count(bank_local.shape[0], distributed)
    if n_total == 0:
        raise ValueError("the kNN bank is empty. Pass at least one bank row")
    q_min, q_max = global_max([-queries.shape[0], queries.shape[0]], distributed)
    if -q_min != q_max:
        raise ValueError(f"every rank must hold the same queries: query counts range from {-q_min} to {q_max}")
    k = min(k, n_total)
    dev = queries.device
    bank_local, bank_labels_local, bank_index = bank_local.to(dev), bank_labels_local.to(dev), bank_index.to(dev)
    out_s, out_i, out_y = [], [], []
    for q0 in range(0, queries.shape[0], query_chunk):
        q = queries[q0:q0 + query_chunk]
        s, i = local_topk(bank_local, q, k, metric, backend, bank_chunk, margin)
        gi, y = bank_index[i], bank_labels_local[i]
        if distributed:  # pad to k columns so that every rank sends the same shape
            pad = k - s.shape[1]
            s = torch.cat([s, s.new_full((s.shape[0], pad), float("-inf"))], 1)
            gi = torch.cat([gi, gi.new_full((gi.shape[0], pad), _NO_INDEX)], 1)
            y = torch.cat([y, y.new_zeros((y.shape[0], pad))], 1)
            s, gi, y = _all_gather_cols(s), _all_gather_cols(gi), _all_gather_cols(y)
        s, gi, y = sort_neighbors(s, gi, y)  # ties by *global* index (a shard's rows need not be in global order)
        s, gi, y = s[:, :k], gi[:, :k], y[:, :k]
        out_s.append(s)
        out_i.append(gi)
        out_y.append(y)
    return torch.cat(out_s), torch.cat(out_i), torch.cat(out_y)


def knn_search(train: torch.Tensor, test: torch.Tensor, k: int, metric: str = "ip", backend: str = "auto",
               query_chunk: int = 2048, bank_chunk: int = 16384) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact k nearest training rows of each test row (one process, no collectives).

    train: (N, D), test: (Q, D). ``metric="ip"``: largest inner product; ``"l2"``: smallest Euclidean
    distance. ``backend="auto"``: faiss for CPU tensors when installed (faster there), torch otherwise.
    Returns scores (Q, k) float32 sorted descending (inner products, or negated squared distances; ties by
    index) and indices (Q, k) into ``train``. ``k`` is clipped to N. Chunk sizes bound memory (Qc x Nb
    scores) and do not change the result.
    """
    check_search_args(k, metric, backend, query_chunk, bank_chunk)
    if train.dim() != 2 or test.dim() != 2 or train.shape[1] != test.shape[1]:
        raise ValueError(f"expected (N, D) and (Q, D) features, got {tuple(train.shape)} and {tuple(test.shape)}")
    n = train.shape[0]
    index = torch.arange(n, device=test.device)
    s, i, _ = sharded_topk(train.float(), index, index, test.float(), k, metric, backend, query_chunk, bank_chunk,
                           distributed=False)
    return s.float(), i
