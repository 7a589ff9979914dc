"""Collapse diagnostics: analytic values of the statistics, the loss-at-collapse table and the online monitor.

The measured figures behind the monitor's defaults are in :class:`smallssl.diagnostics.CollapseMonitor`'s
docstring. An isotropic Gaussian (N, d) has RankMe 0.99 d at N = 16 d, 0.93 d at N = 2 d and 0.80 d at N = d
(the Marchenko-Pastur spread of its singular values), and ``emb_std`` 1/sqrt(d) within 1% at N = 4096.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from smallssl.diagnostics import (
    DEFAULT_COLLAPSE_HINT,
    RANKME_EPS,
    CollapseMonitor,
    alignment,
    collapse_value,
    effective_rank,
    embedding_std,
    is_collapsed_loss,
    uniformity,
)


def _gauss(n: int, d: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------------------------- statistics
def test_embedding_std_collapsed_and_isotropic():
    v = _gauss(1, 64)
    assert embedding_std(v.repeat(32, 1)) < 1e-6  # all rows equal
    scales = torch.rand(32, 1, generator=torch.Generator().manual_seed(1)) + 0.1
    assert embedding_std(scales * v) < 1e-6  # rank-1, positive scales: one direction after normalisation
    z = _gauss(4096, 64)
    assert embedding_std(z) * math.sqrt(64) == pytest.approx(1.0, abs=0.01)
    assert embedding_std(z.double()) == pytest.approx(embedding_std(z), rel=1e-5)


def test_effective_rank_analytic():
    v = _gauss(1, 128)
    assert effective_rank(v.repeat(64, 1)) == pytest.approx(1.0, abs=1e-3)  # collapsed
    a = torch.linspace(-2, 3, 64)[:, None]
    assert effective_rank(a * v) == pytest.approx(1.0, abs=1e-3)  # rank-1 with mixed signs
    assert effective_rank(a.double() * v.double(), eps=0.0) == pytest.approx(1.0, abs=1e-9)
    # k orthonormal rows: k equal singular values -> exactly k (eps=0), a little more with RankMe's eps
    q = torch.linalg.qr(_gauss(128, 128).double())[0][:, :5].T  # (5, 128)
    assert effective_rank(q, eps=0.0) == pytest.approx(5.0, abs=1e-9)
    assert effective_rank(q) > effective_rank(q, eps=0.0)
    assert effective_rank(torch.zeros(8, 4)) == 0.0


@pytest.mark.parametrize("n,d,low", [(1024, 64, 0.97), (32, 256, 0.95), (256, 128, 0.9)])
def test_effective_rank_isotropic_gaussian(n, d, low):
    r = effective_rank(_gauss(n, d))
    assert low * min(n, d) <= r <= min(n, d)


def test_alignment():
    z = F.normalize(_gauss(16, 8), dim=1)
    assert alignment(z, z) == 0.0
    x, y = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    assert alignment(x, y) == pytest.approx(2.0)
    assert alignment(x, y, alpha=1) == pytest.approx(math.sqrt(2))
    with pytest.raises(ValueError, match="paired"):
        alignment(z, z[:3])


def test_uniformity_three_points():
    # unit circle at 0, 90 and 180 degrees: squared distances 2, 4, 2
    z = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    assert uniformity(z, t=2) == pytest.approx(math.log((2 * math.exp(-4) + math.exp(-8)) / 3), abs=1e-12)
    assert uniformity(z, t=1) == pytest.approx(math.log((2 * math.exp(-2) + math.exp(-4)) / 3), abs=1e-12)
    assert uniformity(z, t=2, chunk=1) == pytest.approx(uniformity(z, t=2), abs=1e-12)
    assert uniformity(z[[0, 0, 0]]) == pytest.approx(0.0, abs=1e-12)  # collapsed


def test_alignment_uniformity_match_eval_stats_dist():
    """eval.stats_dist can import these (same definitions, same float64 numerics)."""
    from eval import stats_dist

    x, y = (F.normalize(_gauss(300, 16, s), dim=1) for s in (0, 1))
    assert uniformity(x, t=2, chunk=128) == pytest.approx(stats_dist.uniformity(x, 2.0), abs=1e-9)  # 3 chunks
    assert alignment(x, y, 1.5) == pytest.approx(stats_dist.alignment(x, y, 1.5), abs=1e-6)


# ----------------------------------------------------------------------------------------- loss at collapse
def test_collapse_values_are_the_losses_of_equal_embeddings():
    from kernels.nt_xent import nt_xent_reference
    from smallssl.losses import barlow_twins_loss, info_nce

    z = F.normalize(_gauss(1, 16), dim=1).repeat(8, 1)
    loss = info_nce(z, z, z.repeat(4, 1), temperature=0.2)  # queue K = 32 copies of the same key
    assert float(loss) == pytest.approx(collapse_value("moco", K=32), rel=1e-5)
    assert float(nt_xent_reference(z, z, 0.5)) == pytest.approx(collapse_value("simclr", batch_size=8), rel=1e-5)
    assert float(barlow_twins_loss(z, z)) == pytest.approx(collapse_value("barlow", dim=16), rel=1e-4)
    assert collapse_value("moco", K=512) == pytest.approx(math.log(513))
    assert collapse_value("moco", K=512, symmetric=True) == pytest.approx(2 * math.log(513))  # summed directions
    assert collapse_value("moco") is None and collapse_value("seed") is None and collapse_value("swav") is None


def test_is_collapsed_loss():
    v = math.log(513)
    assert is_collapsed_loss(6.23, v) and not is_collapsed_loss(5.9, v)
    assert is_collapsed_loss(6.0, v, rel=0.05) and not is_collapsed_loss(6.0, v, rel=0.02)
    assert not is_collapsed_loss(None, v) and not is_collapsed_loss(6.2, None)
    assert not is_collapsed_loss(float("nan"), v)
    assert is_collapsed_loss(0.01, 0.0) and not is_collapsed_loss(0.5, 0.0)


# ------------------------------------------------------------------------------------------------ monitor
def _healthy(step: int, b: int = 64, d: int = 32) -> list[torch.Tensor]:
    z = _gauss(b, d, seed=2 * step)
    return [z, z + 0.3 * _gauss(b, d, seed=2 * step + 1)]


def _init_like(step: int, b: int = 64, d: int = 32) -> list[torch.Tensor]:
    """Like random-init embeddings: a shared mean direction plus a decaying spectrum (std ~0.3 / sqrt(d), RankMe
    ~0.5 d)."""
    mean = torch.ones(1, d) * 0.8
    spectrum = torch.logspace(0, -1, d)[None, :]
    z = mean + 0.7 * spectrum * _gauss(b, d, seed=step)
    return [z, z + 0.02 * _gauss(b, d, seed=step + 10_000)]


def _collapsed(step: int, b: int = 64, d: int = 32) -> list[torch.Tensor]:
    z = torch.ones(b, d) + 1e-4 * _gauss(b, d, seed=step)
    return [z, z.clone()]


def _run(mon: CollapseMonitor, stream, steps: range) -> dict[int, str]:
    warnings = {}
    for s in steps:
        mon.update(stream(s))
        w = mon.check(s)
        if w is not None:
            warnings[s] = w
    return warnings


def test_monitor_warns_once_per_collapse_episode():
    mon = CollapseMonitor(history=2, patience=3)
    assert _run(mon, _healthy, range(0, 10)) == {}
    stats = mon.stats()
    assert stats["emb_std"] == pytest.approx(1 / math.sqrt(32), rel=0.1) and stats["emb_std_ref"] == 1 / math.sqrt(32)
    got = _run(mon, _collapsed, range(10, 20))
    assert list(got) == [12]  # the third consecutive low check, and only once
    assert "step 12" in got[12] and "lr" in got[12] and "temperature" in got[12] and "batch" in got[12]
    assert mon.stats()["emb_std"] < 1e-3 and mon.stats()["emb_rank"] < 1.5
    assert _run(mon, _healthy, range(20, 25)) == {}  # recovered: episode over
    assert list(_run(mon, _collapsed, range(25, 30))) == [27]  # a new episode warns again


def test_monitor_patience_and_buffer_fill():
    mon = CollapseMonitor(history=3, patience=1, std_floor=0.05)
    mon.update(_collapsed(0))
    assert mon.check(0) is None and mon.check(0) is None  # buffer not yet full: no judgement
    mon.update(_collapsed(1))
    mon.update(_collapsed(2))
    assert mon.check(2) is not None  # patience 1, absolute std floor


def test_monitor_silent_on_healthy_and_init_like_streams():
    assert _run(CollapseMonitor(), _healthy, range(40)) == {}
    mon = CollapseMonitor()
    assert _run(mon, _init_like, range(40)) == {}
    s = mon.stats()
    assert 0.1 < s["emb_std"] / s["emb_std_ref"] < 0.5  # as far from isotropic as a random-init ResNet


def test_monitor_thresholds_change_the_verdict():
    # constant low std (no relative drop): only the absolute floor can flag it
    low = lambda s: [torch.ones(64, 32) + 0.03 * _gauss(64, 32, s)]  # std ~0.03 x 1/sqrt(d)
    assert _run(CollapseMonitor(std_floor=0.05), low, range(6))
    assert not _run(CollapseMonitor(std_floor=0.01), low, range(6))
    # rank-only collapse (standardised rank-1 embeddings, as behind a BatchNorm): std stays high, rank falls to 1
    v = torch.sign(_gauss(1, 32))

    def rank1(s):
        a = _gauss(64, 1, s)
        return [(a - a.mean()) / a.std() * v]

    mon = CollapseMonitor(patience=2)
    _run(mon, _healthy, range(5))
    got = _run(mon, rank1, range(5, 10))
    assert list(got) == [7] and "effective rank" in got[7]
    assert mon.stats()["emb_std"] > 0.5 / math.sqrt(32)
    mon = CollapseMonitor(patience=2, drop=0.01)
    _run(mon, _healthy, range(5))
    assert _run(mon, rank1, range(5, 10)) == {}


def test_monitor_stats_keys_buffer_and_storage():
    mon = CollapseMonitor(history=2)
    assert mon.stats() == {} and mon.check(0) is None
    emb = [_gauss(16, 8).double().requires_grad_(), _gauss(16, 8, 1).double()]
    mon.update(emb)
    assert set(mon.stats()) == {"emb_std", "emb_std_ref", "align", "unif"}  # no rank from a part-filled buffer
    mon.update(emb)
    assert set(mon.stats()) == {"emb_std", "emb_std_ref", "emb_rank", "emb_rank_max", "align", "unif"}
    for _ in range(3):
        mon.update(emb, features=_gauss(16, 40))
    s = mon.stats()
    assert s["emb_rank_max"] == 8 and "feat_rank" in s and s["feat_rank"] <= 32  # 2 batches of 16 feature rows
    assert len(mon._emb) == 2 and mon._emb[0][0].dtype == torch.float32 and not mon._emb[0][0].requires_grad
    assert s["align"] == pytest.approx(alignment(F.normalize(emb[0].float(), dim=1), F.normalize(emb[1].float(),
                                                                                              dim=1)), rel=1e-5)
    one_view = CollapseMonitor()
    one_view.update([_gauss(16, 8)])
    assert "align" not in one_view.stats()
    with pytest.raises(ValueError, match="emb_views"):
        mon.update([_gauss(16, 8), _gauss(16, 9)])
    assert effective_rank(_gauss(16, 8), eps=RANKME_EPS) == pytest.approx(effective_rank(_gauss(16, 8)))


def test_monitor_state_dict_keeps_peaks():
    mon = CollapseMonitor(patience=2)
    _run(mon, _healthy, range(5))
    resumed = CollapseMonitor(patience=2)
    resumed.load_state_dict(mon.state_dict())
    assert resumed.peak == mon.peak
    assert list(_run(resumed, _collapsed, range(5, 9))) == [7]  # its buffer refills first (step 5 not judged)


def test_monitor_warning_ends_with_the_methods_hint():
    from smallssl.methods import METHODS

    torch.manual_seed(0)
    mon = CollapseMonitor(history=1, patience=1, hint=METHODS["moco"].collapse_hint)
    v = torch.nn.functional.normalize(torch.randn(1, 16), dim=1)
    mon.update([v.repeat(32, 1)])
    line = mon.check(7)
    assert line.startswith("WARNING: the embeddings are collapsing at step 7") and "--moco-queue-init empty" in line
    assert METHODS["simsiam"].collapse_hint == DEFAULT_COLLAPSE_HINT != METHODS["moco"].collapse_hint
