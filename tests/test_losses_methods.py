"""Loss math of SimCLR / BYOL / SimSiam / Barlow Twins against hand computations, and the DDP helpers
(gather / all-reduce with gradient) against the single-process full-batch loss and gradient."""

import math
import os

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn as nn

from smallssl.losses import (
    barlow_twins_loss,
    barlow_twins_loss_from_c,
    batch_standardize,
    byol_loss,
    cross_correlation,
    negative_cosine,
    nt_xent,
)
from smallssl.methods.simclr import nt_xent_top1


# ---------------------------------------------------------------------------------------------- SimCLR
@pytest.mark.parametrize("n", [1, 2, 5])
@pytest.mark.parametrize("temperature", [0.1, 0.5])
def test_nt_xent_equal_similarities_give_log_2n_minus_1(n, temperature):
    # every row identical: all 2N-1 logits of a row are equal, so the loss is log(2N - 1) for any T
    z = torch.nn.functional.normalize(torch.ones(n, 8), dim=1)
    assert float(nt_xent(z, z.clone(), temperature)) == pytest.approx(math.log(2 * n - 1), abs=1e-5)


def test_nt_xent_hand_value_identical_positives_orthogonal_images():
    # z1 = z2 = [e1, e2]: positive sim 1, the two other rows 0 -> loss = log(e^{1/T} + 2) - 1/T
    t = 0.5
    z = torch.eye(2, 4)
    assert float(nt_xent(z, z.clone(), t)) == pytest.approx(math.log(math.exp(1 / t) + 2) - 1 / t, abs=1e-5)
    # positives orthogonal to everything: log(3) (the positive is one of 3 equal logits)
    z1, z2 = torch.eye(4)[:2], torch.eye(4)[2:]
    assert float(nt_xent(z1, z2, t)) == pytest.approx(math.log(3), abs=1e-5)


def test_nt_xent_matches_explicit_cross_entropy_and_top1():
    g = torch.Generator().manual_seed(0)
    z1 = torch.nn.functional.normalize(torch.randn(6, 5, generator=g), dim=1)
    z2 = torch.nn.functional.normalize(z1 + 0.1 * torch.randn(6, 5, generator=g), dim=1)
    z = torch.cat([z1, z2])
    logits = z @ z.T / 0.2
    logits.fill_diagonal_(-float("inf"))
    target = torch.cat([torch.arange(6, 12), torch.arange(0, 6)])
    ref = torch.nn.functional.cross_entropy(logits, target)
    assert float(nt_xent(z1, z2, 0.2)) == pytest.approx(float(ref), rel=1e-5)
    assert float(nt_xent_top1(z1, z2)) == pytest.approx(100.0 * float((logits.argmax(1) == target).float().mean()))
    assert float(nt_xent_top1(z1, z1[[1, 0, 2, 3, 4, 5]])) < 100.0  # swapped positives are missed


# ------------------------------------------------------------------------------------------------ BYOL
def test_byol_loss_hand_values():
    p = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [3.0, 4.0]])
    z = torch.tensor([[2.0, 0.0], [0.0, 5.0], [-1.0, 0.0], [3.0, 0.0]])
    # 2 - 2 cos: aligned 0, orthogonal 2, opposite 4, cos = 3/5 -> 0.8
    assert float(byol_loss(p, z)) == pytest.approx((0 + 2 + 4 + 0.8) / 4, abs=1e-6)
    # = mean squared distance of the normalised vectors
    pn, zn = torch.nn.functional.normalize(p, dim=1), torch.nn.functional.normalize(z, dim=1)
    assert float(byol_loss(p, z)) == pytest.approx(float(((pn - zn) ** 2).sum(1).mean()), abs=1e-6)


# --------------------------------------------------------------------------------------------- SimSiam
def test_negative_cosine_hand_values_and_stop_gradient():
    p = torch.tensor([[1.0, 0.0], [0.0, 2.0]], requires_grad=True)
    z = torch.tensor([[1.0, 1.0], [0.0, -1.0]], requires_grad=True)
    loss = negative_cosine(p, z)
    assert float(loss.detach()) == pytest.approx(-(1 / math.sqrt(2) - 1) / 2, abs=1e-6)
    loss.backward()
    assert z.grad is None  # stop-gradient on the target
    assert p.grad is not None and p.grad.abs().sum() > 0


# ---------------------------------------------------------------------------------------- Barlow Twins
def test_batch_standardize_equals_train_mode_batchnorm():
    x = torch.randn(7, 5) * 3 + 1
    bn = nn.BatchNorm1d(5, affine=False).train()
    torch.testing.assert_close(batch_standardize(x), bn(x), rtol=1e-5, atol=1e-5)


def _orthonormal_columns():
    # B=4, D=2: zero-mean, unit (biased) variance, orthogonal columns -> bn(z) = z, z^T z / B = I
    return torch.tensor([[1.0, 1.0], [-1.0, 1.0], [1.0, -1.0], [-1.0, -1.0]])


def test_barlow_identity_cross_correlation_gives_zero():
    z = _orthonormal_columns()
    c = cross_correlation(z, z, eps=0.0)
    torch.testing.assert_close(c, torch.eye(2))
    loss, on, off = barlow_twins_loss_from_c(c, 5e-3)
    assert float(on) == 0.0 and float(off) == 0.0 and float(loss) == 0.0
    assert float(barlow_twins_loss(z * 3 + 2, z, lambd=5e-3)) == pytest.approx(0.0, abs=1e-8)  # scale/shift-free


@pytest.mark.parametrize("lambd", [0.0, 5e-3, 1.0])
def test_barlow_known_values(lambd):
    z = _orthonormal_columns()
    # opposite views: C = -I -> on = sum (1 - (-1))^2 = 4 D = 8, off = 0
    assert float(barlow_twins_loss(z, -z, lambd, eps=0.0)) == pytest.approx(8.0)
    # swapped units: C = [[0, 1], [1, 0]] -> on = 2, off = 2
    loss, on, off = barlow_twins_loss_from_c(cross_correlation(z, z[:, [1, 0]], eps=0.0), lambd)
    assert (float(on), float(off)) == pytest.approx((2.0, 2.0))
    assert float(loss) == pytest.approx(2.0 + 2.0 * lambd)


def test_barlow_c_is_the_correlation_matrix():
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(64, 3, generator=g), torch.randn(64, 3, generator=g)
    b[:, 0] = a[:, 0] * 2 + 0.5 * b[:, 0]
    corr = torch.corrcoef(torch.cat([a, b], 1).T)[:3, 3:]  # Pearson correlations across views
    torch.testing.assert_close(cross_correlation(a, b, eps=0.0), corr, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------ DDP: exact global loss
def _ddp_worker(rank: int, port: int, z1: torch.Tensor, z2: torch.Tensor, q) -> None:
    import torch.distributed as dist

    from smallssl.dist import all_gather_with_grad as gather_with_grad
    from smallssl.dist import all_reduce_sum_with_grad

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        b = z1.shape[0] // 2
        rows = slice(rank * b, (rank + 1) * b)
        a1, a2 = z1[rows].clone().requires_grad_(), z2[rows].clone().requires_grad_()
        simclr = nt_xent(gather_with_grad(a1), gather_with_grad(a2), 0.3)
        simclr.backward()
        s_grads = (a1.grad.tolist(), a2.grad.tolist())  # plain lists: tensors die with the process
        a1.grad = a2.grad = None
        c = cross_correlation(a1, a2, reduce_sum=all_reduce_sum_with_grad, n_total=2 * b)
        barlow = barlow_twins_loss_from_c(c, 0.1)[0]
        barlow.backward()
        q.put((rank, float(simclr.detach()), s_grads, float(barlow.detach()), (a1.grad.tolist(), a2.grad.tolist())))
    finally:
        dist.destroy_process_group()


def test_ddp_gather_and_all_reduce_give_the_global_loss_and_gradient():
    """Two gloo ranks with half a batch each: the loss equals the full-batch loss, and each rank's gradient
    is world x the full-batch gradient of its rows (DDP's averaging then gives exactly the global gradient)."""
    from smallssl.dist import free_port

    g = torch.Generator().manual_seed(0)
    z1 = torch.nn.functional.normalize(torch.randn(6, 4, generator=g), dim=1)
    z2 = torch.nn.functional.normalize(z1 + 0.3 * torch.randn(6, 4, generator=g), dim=1)
    f1, f2 = z1.clone().requires_grad_(), z2.clone().requires_grad_()
    ref_s = nt_xent(f1, f2, 0.3)
    ref_s.backward()
    ref_s_grads = (f1.grad.clone(), f2.grad.clone())
    f1.grad = f2.grad = None
    ref_b = barlow_twins_loss(f1, f2, 0.1)
    ref_b.backward()
    ref_b_grads = (f1.grad.clone(), f2.grad.clone())

    ctx = mp.get_context("spawn")
    q = ctx.SimpleQueue()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.start_processes(_ddp_worker, nprocs=2, args=(free_port(), z1, z2, q), start_method="spawn")
    results = [q.get() for _ in range(2)]
    for rank, s_loss, s_grads, b_loss, b_grads in results:
        rows = slice(rank * 3, rank * 3 + 3)
        assert s_loss == pytest.approx(float(ref_s.detach()), rel=1e-5)
        assert b_loss == pytest.approx(float(ref_b.detach()), rel=1e-5)
        for got, ref in zip(s_grads + b_grads, ref_s_grads + ref_b_grads):
            torch.testing.assert_close(torch.tensor(got) / 2, ref[rows], rtol=1e-4, atol=1e-6)
