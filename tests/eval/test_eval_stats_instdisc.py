"""Alignment / uniformity / intra-class alignment and instance discrimination: analytic values."""

import math

import pytest
import torch
import torch.nn.functional as F

from eval.instdisc import instdisc_accuracy, positive_ranks, select_views
from eval.stats_dist import alignment, format_table, intra_class_alignment, stats_dist, uniformity


def test_alignment_identical_pairs_zero_and_antipodal_four():
    x = F.normalize(torch.randn(10, 5), dim=1)
    assert alignment(x, x) == 0.0
    assert alignment(x, -x) == pytest.approx(4.0)  # ||x - (-x)||^2 = 4 on the unit sphere
    assert alignment(x, -x, alpha=1) == pytest.approx(2.0)  # alpha changes the result


def test_uniformity_known_values():
    e = torch.eye(3)
    # {e1, -e1}: one pair at squared distance 4 -> log exp(-4t) = -4t.
    assert uniformity(torch.stack([e[0], -e[0]]), t=2) == pytest.approx(-8.0)
    assert uniformity(torch.stack([e[0], -e[0]]), t=3) == pytest.approx(-12.0)
    # {+-e1, +-e2, +-e3}: 15 pairs, 3 antipodal (d^2 = 4), 12 orthogonal (d^2 = 2).
    x = torch.cat([e, -e])
    expect = math.log((3 * math.exp(-8) + 12 * math.exp(-4)) / 15)
    assert uniformity(x, t=2) == pytest.approx(expect)
    assert uniformity(x, t=2, chunk=2) == pytest.approx(expect)  # chunking is exact
    assert uniformity(x, t=1) == pytest.approx(math.log((3 * math.exp(-4) + 12 * math.exp(-2)) / 15))


def test_uniformity_subsample_is_seeded():
    x = F.normalize(torch.randn(200, 4, generator=torch.Generator().manual_seed(0)), dim=1)
    a, b = uniformity(x, max_samples=50, seed=1), uniformity(x, max_samples=50, seed=1)
    assert a == b and a != uniformity(x, max_samples=50, seed=2) and a != uniformity(x)


def test_intra_class_alignment_by_hand():
    e = torch.eye(2)
    x = torch.stack([e[0], e[0], e[0], -e[0], e[1], e[1]])
    y = torch.tensor([0, 0, 1, 1, 2, 2])
    # class 0: identical (0); class 1: antipodal (4); class 2: identical (0) -> mean 4/3.
    assert intra_class_alignment(x, y) == pytest.approx(4 / 3)
    assert intra_class_alignment(x, y, alpha=1) == pytest.approx(2 / 3)


def test_stats_dist_table():
    r0 = F.normalize(torch.randn(12, 6), dim=1)
    y = torch.arange(3).repeat_interleave(4)
    res = stats_dist(r0, r0, r0 * 3, y)  # views identical up to scale: both alignments 0
    assert res["d_sd_align"] == pytest.approx(0.0, abs=1e-6) and res["sd_sd_align"] == pytest.approx(0.0, abs=1e-6)
    assert res["d_uniform"] == pytest.approx(res["sd_uniform"])
    assert stats_dist(r0, r0, r0, y, t=1.0)["d_uniform"] != res["d_uniform"]
    lines = format_table(res).splitlines()
    assert lines[0].split() == ["D-SD", "align", "SD-SD", "align", "D", "cls-align", "SD", "cls-align", "D",
                                "uniform", "SD", "uniform"]
    assert len(lines[1].split()) == 6 and len(lines[0]) == 90


def test_instdisc_identity_map_is_perfect():
    x = torch.randn(50, 16)
    res = instdisc_accuracy(x, x.clone(), topk=3)
    assert res == {"top1": 100.0, "top2": 100.0, "top3": 100.0}


def test_instdisc_ranks_by_hand():
    e = torch.eye(3)
    q1 = F.normalize(e[0] + 0.2 * e[1], dim=0)
    queries = torch.stack([e[0], q1, e[2]])
    # q0: positive 0.707 < q0.q1 = 0.98 -> rank 2; q1: exact key -> 1; q2: key -e2 (-1) < 0, 0 -> rank 3.
    keys = torch.stack([F.normalize(e[0] + e[2], dim=0), q1, -e[2]])
    assert positive_ranks(queries, keys).tolist() == [2, 1, 3]
    assert positive_ranks(queries, keys, chunk=1).tolist() == [2, 1, 3]
    res = instdisc_accuracy(queries, keys, topk=3)
    assert res["top1"] == pytest.approx(100 / 3) and res["top2"] == pytest.approx(200 / 3) and res["top3"] == 100
    assert len(instdisc_accuracy(queries, keys, topk=2)) == 2


def test_instdisc_mode_selects_views():
    r0, r1, r2 = torch.zeros(2, 1), torch.ones(2, 1), 2 * torch.ones(2, 1)
    assert select_views(r0, r1, r2, "d-sd") == (r0, r1)
    assert select_views(r0, r1, r2, "sd-sd") == (r1, r2)
    with pytest.raises(ValueError, match="d-sd"):
        select_views(r0, r1, r2, "sd-d")
