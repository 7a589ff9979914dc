"""kNN: hand-computed votes, separable clusters, invariances, backends, every hyperparameter matters."""

import pytest
import torch
import torch.nn.functional as F

from eval.knn import best_nn, dino_knn, knn_search, majority_votes, paper_line, rep_space_transform
from eval.knn_bench import dino_style_per_k, dino_style_shared_topk, make_features


def _clusters(n_per=20, classes=4, dim=8, spread=0.05, seed=0):
    g = torch.Generator().manual_seed(seed)
    centers = torch.eye(dim)[:classes] * 5
    y = torch.arange(classes).repeat_interleave(n_per)
    x = centers[y] + spread * torch.randn(len(y), dim, generator=g)
    return x, y


def test_separable_clusters_give_100_percent():
    xtr, ytr = _clusters(seed=0)
    xte, yte = _clusters(n_per=7, seed=1)
    for rep in ("original", "norm", "shifted-norm", "shift-norm"):
        res = best_nn(xtr, ytr, xte, yte, max_k=15, rep_space=rep)
        assert res["best_nn"] == 100.0 and res["best_k"] == 1.0
    assert dino_knn(xtr, ytr, xte, yte, k=20)["top1"] == 100.0


def test_search_matches_brute_force_and_is_chunk_invariant():
    g = torch.Generator().manual_seed(0)
    xtr, xte = torch.randn(300, 16, generator=g), torch.randn(50, 16, generator=g)
    d = torch.cdist(xte, xtr)
    ref = d.argsort(1)[:, :11]
    for qc, bc in ((7, 13), (50, 300), (1000, 64)):
        s, i = knn_search(xtr, xte, 11, "l2", "torch", query_chunk=qc, bank_chunk=bc)
        assert torch.equal(i, ref)
        assert torch.allclose(-s, d.gather(1, ref) ** 2, atol=1e-4)
    s, i = knn_search(xtr, xte, 11, "ip", "torch", query_chunk=9, bank_chunk=31)
    assert torch.equal(i, (xte @ xtr.T).argsort(1, descending=True)[:, :11])


def test_faiss_and_torch_agree():
    pytest.importorskip("faiss")
    g = torch.Generator().manual_seed(1)
    xtr, xte = torch.randn(500, 32, generator=g), torch.randn(40, 32, generator=g)
    for metric in ("ip", "l2"):
        st, it = knn_search(xtr, xte, 21, metric, "torch", query_chunk=16, bank_chunk=100)
        sf, i_f = knn_search(xtr, xte, 21, metric, "faiss")
        assert torch.equal(it, i_f)
        assert torch.allclose(st, sf, atol=1e-3)
    ytr, yte = torch.randint(0, 5, (500,), generator=g), torch.randint(0, 5, (40,), generator=g)
    assert best_nn(xtr, ytr, xte, yte, 31, backend="faiss") == best_nn(xtr, ytr, xte, yte, 31, backend="torch")


def test_permutation_invariance():
    xtr, ytr, xte, yte = make_features(400, 100, 16, 5, seed=3)
    ref = best_nn(xtr, ytr, xte, yte, 21)
    p, q = torch.randperm(400), torch.randperm(100)
    assert best_nn(xtr[p], ytr[p], xte[q], yte[q], 21) == ref
    ref_d = dino_knn(xtr, ytr, xte, yte)
    assert dino_knn(xtr[p], ytr[p], xte[q], yte[q]) == ref_d


def test_majority_votes_by_hand():
    labels = torch.tensor([[2, 1, 1, 0, 0], [0, 1, 2, 2, 1]])
    # k=1: first label; k=3: row0 {2,1,1} -> 1, row1 {0,1,2} tie -> smallest = 0;
    # k=5: row0 {2,1,1,0,0} tie 1 vs 0 -> 0, row1 {0,1,2,2,1} tie 1 vs 2 -> 1.
    preds = majority_votes(labels, [1, 3, 5], num_classes=3)
    assert preds.tolist() == [[2, 0], [1, 0], [0, 1]]


def test_best_k_and_max_k_change_the_result():
    # Query at 0 with train points at distances 1 (label 1), 2, 3 (label 0), 4, 5 (label 1): k=1 right,
    # k=3 wrong, k=5 right again. max_k bounds the odd ks tried.
    xtr = torch.tensor([[1.0], [2.0], [3.0], [4.0], [5.0]])
    ytr = torch.tensor([1, 0, 0, 1, 1])
    xte, yte = torch.tensor([[0.0]]), torch.tensor([1])
    res = best_nn(xtr, ytr, xte, yte, max_k=5)
    assert (res["acc@k=1"], res["acc@k=3"], res["acc@k=5"]) == (100.0, 0.0, 100.0)
    assert res["best_k"] == 1.0
    ytr2 = torch.tensor([0, 1, 1, 0, 1])  # k=1 wrong, k=3 right
    assert best_nn(xtr, ytr2, xte, yte, max_k=5)["best_k"] == 3.0
    assert best_nn(xtr, ytr2, xte, yte, max_k=1)["best_nn"] == 0.0


def test_rep_space_changes_neighbours():
    # Original space: the test point (10, 3) is nearest to (9, 9) (label 0, distance 6.1 vs 9.5); normalised,
    # its direction is nearest to (1, 0.01) (label 1). Centred on the train mean (5, 4.505) the test
    # direction (5, -1.5) is nearest to (4, 4.5) (label 0) again.
    xtr = torch.tensor([[9.0, 9.0], [1.0, 0.01]])
    ytr = torch.tensor([0, 1])
    xte, yte = torch.tensor([[10.0, 3.0]]), torch.tensor([1])
    assert best_nn(xtr, ytr, xte, yte, 1, "original")["best_nn"] == 0.0
    assert best_nn(xtr, ytr, xte, yte, 1, "norm")["best_nn"] == 100.0
    assert best_nn(xtr, ytr, xte, yte, 1, "shifted-norm")["best_nn"] == 0.0
    tr, te = rep_space_transform(xtr, xte, "shifted-norm")
    mean = xtr.mean(0)
    assert torch.allclose(te, F.normalize(xte - mean, dim=1)) and torch.allclose(tr.norm(dim=1), torch.ones(2))
    with pytest.raises(ValueError, match="original"):
        rep_space_transform(xtr, xte, "whitened")


def test_dino_k_and_temperature_change_the_result():
    # Cosine sims to the query: label 0 neighbours 1.0 and 0.6; label 1 neighbours 0.95, 0.94, 0.93.
    def unit(c):
        return torch.tensor([c, (1 - c * c) ** 0.5])

    xtr = torch.stack([unit(1.0), unit(0.95), unit(0.94), unit(0.93), unit(0.6)])
    ytr = torch.tensor([0, 1, 1, 1, 0])
    xte, yte = unit(1.0)[None], torch.tensor([0])
    assert dino_knn(xtr, ytr, xte, yte, k=1)["top1"] == 100.0
    # k=4, T=0.07: e^(1/.07) vs 3 e^(~.94/.07): label 1 wins; a tiny T makes the nearest dominate.
    assert dino_knn(xtr, ytr, xte, yte, k=4, temperature=0.07)["top1"] == 0.0
    assert dino_knn(xtr, ytr, xte, yte, k=4, temperature=0.005)["top1"] == 100.0
    with pytest.raises(ValueError, match="temperature"):
        dino_knn(xtr, ytr, xte, yte, temperature=0)


def test_baselines_agree_with_best_nn_and_line_format():
    xtr, ytr, xte, yte = make_features(600, 120, 16, 4, seed=5)
    res = best_nn(xtr, ytr, xte, yte, 15, "norm")
    acc, k = dino_style_shared_topk(xtr, ytr, xte, yte, 15, 4)
    assert abs(acc - res["best_nn"]) < 1e-6 and k == res["best_k"]
    acc2, k2 = dino_style_per_k(xtr, ytr, xte, yte, 15, 4, chunk=10)
    assert abs(acc2 - res["best_nn"]) < 1e-6 and k2 == res["best_k"]
    line = paper_line({"best_nn": 39.6, "best_k": 11.0}, "shift-norm", 101, "train->val")
    assert line.endswith("best-NN=39.60%, k=11.") and "rep-space=shifted-norm" in line


def test_bad_arguments_name_choices():
    x = torch.randn(5, 3)
    with pytest.raises(ValueError, match="ip"):
        knn_search(x, x, 2, metric="cos")
    with pytest.raises(ValueError, match="faiss"):
        knn_search(x, x, 2, backend="annoy")
