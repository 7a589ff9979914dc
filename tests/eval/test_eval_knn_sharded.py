"""kNN on a bank sharded over ranks: equal to one process bit for bit (both protocols, ties by global index),
and DINO's top-5 semantics (k < 5, classes without votes) against values computed by hand."""

import math
import os

import pytest
import torch
import torch.nn.functional as F

from eval.knn import dino_from_neighbors, dino_knn, knn_eval_sharded
from eval.knn_search import exact_scores, knn_search, sharded_topk
from smallssl.dist import free_port


def _unit(c):
    return torch.tensor([c, math.sqrt(1 - c * c)])


# --------------------------------------------------------------------------------- DINO semantics
def test_dino_top5_counts_min_5_k_columns():
    # 10 classes; neighbours of the query: class 3 (cos 0.9), class 4 (cos 0.8); a class-0 row is far away.
    xtr = torch.stack([_unit(0.9), _unit(0.8), _unit(-1.0)])
    ytr = torch.tensor([3, 4, 0])
    y_extra = torch.tensor([9])  # makes num_classes 10
    xq = torch.stack([_unit(1.0)] * 3)
    yq = torch.tensor([4, 0, 3])
    # k=2: ranking [3 (e^9), 4 (e^8), 0, 1, 2, ...]; DINO counts only the first min(5, 2) = 2 ranks: label 4
    # hits top-5, label 0 does not (it is 3rd), label 3 hits top-1 and top-5.
    res = knn_eval_sharded(torch.cat([xtr, _unit(-0.5)[None]]), torch.cat([ytr, y_extra]), 0, xq, yq, k=2, T=0.1,
                           distributed=False)
    assert res["top1"] == pytest.approx(100 / 3) and res["top5"] == pytest.approx(200 / 3) and res["k"] == 2
    # k=1: top-5 is top-1.
    res1 = knn_eval_sharded(xtr, ytr, 0, xq, yq, k=1, T=0.1, num_classes=10, distributed=False)
    assert res1["top1"] == res1["top5"] == pytest.approx(100 / 3)


def test_dino_zero_vote_classes_fill_top5_by_class_index():
    # k=6 nearest: 2 rows of class 7 (cos 0.99) and 4 of class 8 (cos 0.95); classes 0, 3, 9 further away.
    # T=0.1: class 8 gets 4 e^9.5 = 53439, class 7 2 e^9.9 = 39861, every other class 0. DINO's ranking is then
    # [8, 7, 0, 1, 2, 3, ...] (equal weights by class index), so its top-5 is {8, 7, 0, 1, 2}.
    xtr = torch.stack([_unit(c) for c in (0.99, 0.99, 0.95, 0.95, 0.95, 0.95, 0.1, 0.0, -0.3)])
    ytr = torch.tensor([7, 7, 8, 8, 8, 8, 0, 3, 9])
    yq = torch.tensor([8, 7, 0, 2, 3, 9])
    xq = _unit(1.0).expand(6, 2)
    res = knn_eval_sharded(xtr, ytr, 0, xq, yq, k=6, T=0.1, distributed=False)
    assert res["top1"] == pytest.approx(100 / 6)  # only label 8
    assert res["top5"] == pytest.approx(400 / 6)  # 8, 7, 0, 2; not 3 or 9
    assert 4 * math.exp(9.5) > 2 * math.exp(9.9)
    # T=0.01 makes the nearer class win: 2 e^99 > 4 e^95; label 7 is now the top-1 hit.
    assert knn_eval_sharded(xtr, ytr, 0, xq, yq, k=6, T=0.01, distributed=False)["top1"] == pytest.approx(100 / 6)
    sims = torch.tensor([[0.99, 0.99, 0.95, 0.95, 0.95, 0.95]])
    assert dino_from_neighbors(sims, ytr[:6][None], torch.tensor([7]), 0.01, 10)["top1"] == 100.0
    assert dino_from_neighbors(sims, ytr[:6][None], torch.tensor([7]), 0.1, 10)["top1"] == 0.0
    # The same through the one-process wrapper.
    assert dino_knn(xtr, ytr, xq, yq, k=6, temperature=0.1)["top5"] == pytest.approx(400 / 6)


def test_exact_scores_do_not_depend_on_shapes():
    g = torch.Generator().manual_seed(0)
    bank, q = torch.randn(300, 37, generator=g), torch.randn(9, 37, generator=g)
    idx = torch.randint(0, 300, (9, 11), generator=g)
    ref = exact_scores(bank, q, idx, "ip")
    assert torch.equal(exact_scores(bank[:200], q[:4], idx[:4].clamp_max(199), "ip")[idx[:4] < 200],
                       ref[:4][idx[:4] < 200])
    assert torch.equal(exact_scores(bank, q[3:4], idx[3:4, 2:5], "ip"), ref[3:4, 2:5])
    assert torch.allclose(ref, (q[:, None, :].double() * bank[idx].double()).sum(-1))
    l2 = exact_scores(bank, q, idx, "l2")
    assert torch.allclose(-l2, (q[:, None, :].double() - bank[idx].double()).pow(2).sum(-1))


def test_ties_go_to_the_smaller_index():
    bank = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [1.0, 0.0], [0.6, 0.8]])
    s, i = knn_search(bank, torch.tensor([[1.0, 0.0]]), 3, "ip", "torch")
    assert i.tolist() == [[0, 2, 3]] and s.tolist() == [[1.0, 1.0, 1.0]]
    s, i = knn_search(bank, torch.tensor([[1.0, 0.0]]), 4, "l2", "torch", bank_chunk=2)
    assert i.tolist() == [[0, 2, 3, 4]]


# ------------------------------------------------------------------------------- sharded == single
def _bank(seed=0):
    """37 bank rows (4 classes), 13 queries; row 30 duplicates row 5 with another label (a tie across the
    shard boundary at 18 rows) and query 0 is that row, so the order of the tie decides its vote."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(37) % 4
    x = torch.randn(37, 6, generator=g) + 1.5 * F.one_hot(y, 6).float()
    x[30] = x[5]
    y[30] = (y[5] + 1) % 4
    yq = torch.arange(13) % 4
    xq = torch.randn(13, 6, generator=g) + 1.5 * F.one_hot(yq, 6).float()
    xq[0] = x[5]
    return x, y, xq, yq


CASES = [dict(protocol="dino", k=5, T=0.1), dict(protocol="dino", k=1, T=0.07),
         dict(protocol="paper", k=7, rep_space="shifted-norm"), dict(protocol="paper", k=5, rep_space="original")]


def _single():
    x, y, xq, yq = _bank()
    res = [knn_eval_sharded(x, y, 0, xq, yq, distributed=False, **c) for c in CASES]
    nn = [sharded_topk(F.normalize(x, dim=1), y, torch.arange(37), F.normalize(xq, dim=1), 9, "ip",
                       backend="torch", distributed=False)]
    return res, nn


def _worker(rank, world, port, out):
    import torch.distributed as tdist

    torch.set_num_threads(1)
    tdist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    x, y, xq, yq = _bank()
    start, stop = 37 * rank // world, 37 * (rank + 1) // world
    xl, yl = x[start:stop], y[start:stop]
    # Other chunk sizes than the single process: chunking must not change the result either.
    res = [knn_eval_sharded(xl, yl, start, xq, yq, query_chunk=4, bank_chunk=5, **c) for c in CASES]
    nn = [sharded_topk(F.normalize(xl, dim=1), yl, torch.arange(start, stop), F.normalize(xq, dim=1), 9, "ip",
                       backend="torch", query_chunk=5, bank_chunk=3)]
    # Queries split unevenly over the ranks too (an online kNN's val shards): gathered, same result.
    qs = slice(0, 4) if rank == 0 else slice(4, 13)
    res += [knn_eval_sharded(xl, yl, start, xq[qs], yq[qs], query_sharded=True, **c) for c in CASES[:1]]
    torch.save((res, nn), os.path.join(out, f"rank{rank}.pt"))
    tdist.destroy_process_group()


def test_sharded_knn_equals_single_process(tmp_path):
    torch.multiprocessing.start_processes(_worker, args=(2, free_port(), str(tmp_path)), nprocs=2,
                                          start_method="fork")
    ref_res, ref_nn = _single()
    for rank in (0, 1):
        res, nn = torch.load(tmp_path / f"rank{rank}.pt")
        assert res == ref_res + ref_res[:1]  # every float equal, on every rank
        for a, b in zip(nn[0], ref_nn[0]):
            assert torch.equal(a, b)
    s, i, y = ref_nn[0]
    assert i[0, :2].tolist() == [5, 30] and s[0, 0] == s[0, 1]  # the duplicate: tie -> smaller global index
    assert y[0, 0] != y[0, 1]
    assert ref_res[0]["k"] == 5 and ref_res[2]["k"] == 7 and 0 < ref_res[0]["top1"] <= 100


def test_bank_larger_k_is_clamped_and_offsets_are_global():
    x, y, xq, yq = _bank()
    res = knn_eval_sharded(x, y, 0, xq, yq, k=500, distributed=False)
    assert res["k"] == 37 and res == knn_eval_sharded(x, y, 0, xq, yq, k=37, distributed=False)
    # Indices as a tensor: a permuted local bank with its global indices gives the same neighbours.
    p = torch.randperm(37, generator=torch.Generator().manual_seed(1))
    a = sharded_topk(x, y, torch.arange(37), xq, 6, "l2", "torch", distributed=False)
    b = sharded_topk(x[p], y[p], p, xq, 6, "l2", "torch", distributed=False)
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    with pytest.raises(ValueError, match="k must be >= 1"):
        knn_eval_sharded(x, y, 0, xq, yq, k=0)
    with pytest.raises(ValueError, match="protocol"):
        knn_eval_sharded(x, y, 0, xq, yq, protocol="dino-v2")
