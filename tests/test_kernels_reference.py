"""Value tests for the PyTorch references and CPU paths of kernels/ (no Triton needed)."""

import importlib
import math

import pytest
import torch
import torch.nn.functional as F

import kernels

info_nce_mod = importlib.import_module("kernels.info_nce")
nt_xent_mod = importlib.import_module("kernels.nt_xent")
seed_mod = importlib.import_module("kernels.seed_distill")


def _unit(*shape, dtype=torch.float64):
    return F.normalize(torch.randn(*shape, dtype=dtype), dim=-1)


# ---------------------------------------------------------------- InfoNCE

def test_info_nce_equal_similarities_is_log_k_plus_1():
    q = torch.zeros(4, 8, dtype=torch.float64)
    q[:, 0] = 1.0
    k, queue = q.clone(), q[:1].repeat(10, 1)  # every logit equals 1/T
    assert kernels.info_nce_reference(q, k, queue, 0.2).item() == pytest.approx(math.log(11), abs=1e-12)
    assert kernels.info_nce(q, k, queue, 0.2).item() == pytest.approx(math.log(11), abs=1e-12)


def test_info_nce_reference_hand_computed():
    q = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    k = torch.tensor([[0.6, 0.8]], dtype=torch.float64)
    queue = torch.tensor([[0.0, 1.0], [-1.0, 0.0]], dtype=torch.float64)
    t = 0.5  # logits [1.2, 0, -2]
    expected = -1.2 + math.log(math.exp(1.2) + 1.0 + math.exp(-2.0))
    loss, logits = kernels.info_nce_reference(q, k, queue, t, return_logits=True)
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    assert torch.allclose(logits, torch.tensor([[1.2, 0.0, -2.0]], dtype=torch.float64), atol=1e-12)


@pytest.mark.parametrize("b,d,k_len,chunk", [(1, 3, 1, 8), (5, 7, 13, 4), (6, 16, 40, 40)])
def test_info_nce_chunked_matches_reference(b, d, k_len, chunk):
    torch.manual_seed(b + k_len)
    q, k, queue = _unit(b, d).requires_grad_(), _unit(b, d).requires_grad_(), _unit(k_len, d)
    stats = lambda *a: info_nce_mod._stats_chunked(*a, chunk=chunk)  # noqa: E731
    loss, acc1 = info_nce_mod._InfoNCEFn.apply(q, k, queue, 0.07, stats)
    gq, gk = torch.autograd.grad(3.0 * loss, (q, k))
    ref, logits = kernels.info_nce_reference(q, k, queue, 0.07, return_logits=True)
    rq, rk = torch.autograd.grad(3.0 * ref, (q, k))
    assert loss.item() == pytest.approx(ref.item(), abs=1e-10)
    assert torch.allclose(gq, rq, atol=1e-10) and torch.allclose(gk, rk, atol=1e-10)
    assert acc1.item() == pytest.approx((logits.argmax(1) == 0).double().mean().item() * 100)


def test_info_nce_public_cpu_path_accuracy_and_no_queue_grad():
    torch.manual_seed(0)
    q, k = _unit(9, 6, dtype=torch.float32), _unit(9, 6, dtype=torch.float32)
    k[:4] = q[:4]  # rows 0-3: positive is the exact max
    queue = _unit(50, 6, dtype=torch.float32).requires_grad_()
    loss, acc1 = kernels.info_nce(q.requires_grad_(), k, queue, 0.1, return_accuracy=True)
    _, logits = kernels.info_nce_reference(q, k, queue, 0.1, return_logits=True)
    assert acc1.item() == pytest.approx((logits.argmax(1) == 0).float().mean().item() * 100)
    assert acc1.item() >= 400 / 9 - 1e-4
    loss.backward()
    assert queue.grad is None and q.grad is not None


def test_info_nce_unnormalised_inputs_are_stable():
    torch.manual_seed(1)
    q, k, queue = 40 * torch.randn(4, 8), 40 * torch.randn(4, 8), 40 * torch.randn(30, 8)
    loss = kernels.info_nce(q.requires_grad_(), k, queue, 0.05)  # logits up to ~1e5: exp would overflow
    ref = kernels.info_nce_reference(q.double(), k.double(), queue.double(), 0.05)
    assert torch.isfinite(loss) and loss.item() == pytest.approx(ref.item(), rel=1e-5)
    loss.backward()
    assert torch.isfinite(q.grad).all()


def test_info_nce_rejects_bad_input():
    q = torch.randn(3, 4)
    with pytest.raises(ValueError, match="queue"):
        kernels.info_nce(q, q, torch.randn(5, 3), 0.1)
    with pytest.raises(ValueError, match="temperature"):
        kernels.info_nce(q, q, torch.randn(5, 4), 0.0)
    with pytest.raises(ValueError, match="q and k"):
        kernels.info_nce(q, q[:2], torch.randn(5, 4), 0.1)


# ---------------------------------------------------------------- NT-Xent

def test_nt_xent_equal_similarities_is_log_2n_minus_1():
    z = torch.zeros(5, 4, dtype=torch.float64)
    z[:, 0] = 1.0
    assert kernels.nt_xent_reference(z, z.clone(), 0.5).item() == pytest.approx(math.log(9), abs=1e-12)
    assert kernels.nt_xent(z, z.clone(), 0.5).item() == pytest.approx(math.log(9), abs=1e-12)


def test_nt_xent_reference_matches_explicit_sum():
    torch.manual_seed(2)
    z1, z2, t = _unit(3, 4), _unit(3, 4), 0.3
    z = torch.cat([z1, z2])
    total = 0.0
    for i in range(6):
        pos = (i + 3) % 6
        others = [math.exp(float(z[i] @ z[j]) / t) for j in range(6) if j != i]
        total += -float(z[i] @ z[pos]) / t + math.log(sum(others))
    assert kernels.nt_xent_reference(z1, z2, t).item() == pytest.approx(total / 6, abs=1e-6)


@pytest.mark.parametrize("n,d,chunk", [(1, 3, 4), (5, 7, 3), (9, 16, 64)])
def test_nt_xent_chunked_matches_reference(n, d, chunk, monkeypatch):
    torch.manual_seed(n)
    z1, z2 = _unit(n, d).requires_grad_(), _unit(n, d).requires_grad_()
    fwd, bwd = nt_xent_mod._fwd_chunked, nt_xent_mod._bwd_chunked
    monkeypatch.setattr(nt_xent_mod, "_fwd_chunked", lambda z, t: fwd(z, t, chunk=chunk))
    monkeypatch.setattr(nt_xent_mod, "_bwd_chunked", lambda z, lse, t: bwd(z, lse, t, chunk=chunk))
    loss = kernels.nt_xent(z1, z2, 0.2)
    g1, g2 = torch.autograd.grad(2.0 * loss, (z1, z2))
    ref = kernels.nt_xent_reference(z1, z2, 0.2)
    r1, r2 = torch.autograd.grad(2.0 * ref, (z1, z2))
    assert loss.item() == pytest.approx(ref.item(), abs=1e-10)
    assert torch.allclose(g1, r1, atol=1e-10) and torch.allclose(g2, r2, atol=1e-10)


def test_nt_xent_single_pair_is_zero_and_unnormalised_stable():
    z = torch.randn(1, 5)
    assert kernels.nt_xent(z, torch.randn(1, 5), 0.1).item() == pytest.approx(0.0, abs=1e-6)
    z1, z2 = 50 * torch.randn(6, 8), 50 * torch.randn(6, 8)
    loss = kernels.nt_xent(z1, z2, 0.05)
    ref = kernels.nt_xent_reference(z1.double(), z2.double(), 0.05)
    assert torch.isfinite(loss) and loss.item() == pytest.approx(ref.item(), rel=1e-5)


# ---------------------------------------------------------------- SEED distillation

def test_seed_distill_reference_hand_computed_2x3():
    # B=2, K=2, D=2, T_s=0.5, T_t=1. Row 0: x = [t0, queue] = [(1,0), (0,1), (-1,0)], s0 = t0 = (1,0):
    # student logits [2, 0, -2], teacher [1, 0, -1]. Row 1: s1 = t1 = (0,1): x = [(0,1), (0,1), (-1,0)]:
    # student [2, 2, 0], teacher [1, 1, 0].
    s = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64, requires_grad=True)
    t = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    queue = torch.tensor([[0.0, 1.0], [-1.0, 0.0]], dtype=torch.float64)
    e = math.e
    z0 = e + 1 + 1 / e
    loss0 = math.log(e**2 + 1 + e**-2) - (2 * e - 2 / e) / z0  # LSE(z_s) - sum_j p_t,j z_s,j
    loss1 = math.log(2 * e**2 + 1) - 4 * e / (2 * e + 1)
    loss = kernels.seed_distill_reference(s, t, queue, 0.5, 1.0)
    assert loss.item() == pytest.approx((loss0 + loss1) / 2, abs=1e-12)
    # ds_b = sum_j (p_s,j - p_t,j) x_j / (B T_s). Row 0: x_0 = -x_2 = (1,0), x_1 = (0,1). Row 1: entries 0
    # and 1 are (0,1), entry 2 is (-1,0), and the weights of entries 0+1 are 1 minus that of entry 2.
    ps0 = [math.exp(v) / (e**2 + 1 + e**-2) for v in (2, 0, -2)]
    pt0 = [v / z0 for v in (e, 1, 1 / e)]
    d1 = 1 / (2 * e + 1) - 1 / (2 * e**2 + 1)  # p_t - p_s of entry 2 in row 1
    want = torch.tensor([[(ps0[0] - pt0[0]) - (ps0[2] - pt0[2]), ps0[1] - pt0[1]], [d1, d1]],
                        dtype=torch.float64) / (2 * 0.5)
    loss.backward()
    assert torch.allclose(s.grad, want, atol=1e-12)
    fused = kernels.seed_distill(s, t, queue, 0.5, 1.0)
    assert fused.item() == pytest.approx(loss.item(), abs=1e-12)


@pytest.mark.parametrize("ts,tt,scale", [(0.2, 1e-4, 1.0), (0.1, 0.05, 1.0), (0.2, 0.5, 7.0)])
def test_seed_distill_reference_equals_smallssl_reference(ts, tt, scale):
    from smallssl.losses import seed_distill_reference as smallssl_reference
    torch.manual_seed(5)
    s, t, queue = scale * _unit(6, 10, dtype=torch.float32), _unit(6, 10, dtype=torch.float32), _unit(40, 10)
    s.requires_grad_()
    ours = kernels.seed_distill_reference(s, t, queue.float(), ts, tt)
    (g_ours,) = torch.autograd.grad(ours, s)
    theirs = smallssl_reference(s, t, queue.float(), ts, tt)
    (g_theirs,) = torch.autograd.grad(theirs, s)
    assert ours.dtype == torch.float32 and ours.item() == pytest.approx(theirs.item(), rel=1e-6, abs=1e-6)
    assert torch.allclose(g_ours, g_theirs, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("b,d,k_len,chunk,ts,tt,scale,q_scale", [
    (1, 3, 1, 8, 0.2, 1e-4, 1.0, 1.0), (5, 7, 13, 4, 0.1, 0.05, 1.0, 1.0), (6, 16, 40, 40, 0.2, 1e-4, 1.0, 1.0),
    (5, 7, 37, 5, 0.1, 1e-4, 20.0, 20.0), (4, 16, 33, 8, 0.2, 0.05, 20.0, 20.0), (3, 5, 0, 4, 0.2, 0.05, 1.0, 1.0),
    (4, 6, 30, 4, 0.2, 0.5, 1.0, 3.0)])
def test_seed_distill_chunked_matches_reference(b, d, k_len, chunk, ts, tt, scale, q_scale):
    # q_scale > scale: queue entries outscore the positive, so the teacher's running max moves between chunks.
    torch.manual_seed(b + k_len)
    s, t, queue = scale * _unit(b, d), scale * _unit(b, d), q_scale * _unit(k_len, d)
    s.requires_grad_()
    stats = lambda *a: seed_mod._stats_chunked(*a, chunk=chunk)  # noqa: E731
    loss = seed_mod._SeedDistillFn.apply(s, t, queue, ts, tt, stats)
    (gs,) = torch.autograd.grad(3.0 * loss, s)
    ref = kernels.seed_distill_reference(s, t, queue, ts, tt)
    (rs,) = torch.autograd.grad(3.0 * ref, s)
    tol = 1e-10 * max(1.0, abs(ref.item()))  # fp64 throughout; unnormalised rows have logits ~ 4e6
    assert loss.item() == pytest.approx(ref.item(), abs=tol)
    assert (gs - rs).abs().max().item() <= 1e-10 * max(1.0, rs.abs().max().item())


def test_seed_distill_chunked_fp32_exact_teacher_ties_across_chunks():
    # Queue rows equal to t_b tie with the positive at teacher logits ~ 1e4 (T_t = 1e-4), in other chunks
    # than each other: the merge must rescale by max differences (exact), not by rounded log-sum-exps.
    torch.manual_seed(9)
    s, t, queue = _unit(4, 16), _unit(4, 16), _unit(64, 16)
    queue[5], queue[40], queue[20] = t[0], t[0], t[1]
    for tt in (1e-4, 0.05):
        ref = kernels.seed_distill_reference(s, t, queue, 0.2, tt).item()
        ref32 = kernels.seed_distill_reference(s.float(), t.float(), queue.float(), 0.2, tt).item()
        rows, _ = seed_mod._stats_chunked(s.float(), t.float(), queue.float(), 0.2, tt, False, chunk=8)
        assert abs(rows.mean().item() - ref) <= max(2e-6, 2 * abs(ref32 - ref)), tt


def test_seed_distill_small_teacher_temperature_is_info_nce():
    # T_t -> 0: the target is the one-hot of the teacher's argmax, entry 0 (t.t = 1 beats every t.queue_j),
    # so SEED's loss and student gradient equal InfoNCE's with t as the positive key.
    torch.manual_seed(6)
    s, t, queue = _unit(7, 8).requires_grad_(), _unit(7, 8), _unit(50, 8)
    loss = kernels.seed_distill(s, t, queue, 0.2, 1e-4)
    (gs,) = torch.autograd.grad(loss, s)
    ref = kernels.info_nce_reference(s, t, queue, 0.2)
    (rs,) = torch.autograd.grad(ref, s)
    assert loss.item() == pytest.approx(ref.item(), abs=1e-10)
    assert torch.allclose(gs, rs, atol=1e-10)
    assert abs(kernels.seed_distill(s, t, queue, 0.2, 0.5).item() - ref.item()) > 1e-2  # a soft target differs


def test_seed_distill_public_cpu_half_inputs_and_no_teacher_grad():
    torch.manual_seed(7)
    for dtype in (torch.float16, torch.bfloat16):
        s = _unit(9, 12, dtype=torch.float32).to(dtype).requires_grad_()
        t = _unit(9, 12, dtype=torch.float32).to(dtype).requires_grad_()
        queue = _unit(30, 12, dtype=torch.float32).to(dtype).requires_grad_()
        loss = kernels.seed_distill(s, t, queue, 0.2, 1e-4)
        loss.backward()
        s64 = s.detach().double().requires_grad_()
        ref = kernels.seed_distill_reference(s64, t.detach().double(), queue.detach().double(), 0.2, 1e-4)
        ref.backward()
        assert loss.dtype == torch.float32 and s.grad.dtype == dtype
        assert t.grad is None and queue.grad is None
        assert loss.item() == pytest.approx(ref.item(), abs=1e-5)  # fp32 math on the half-precision values
        assert (s.grad.double() - s64.grad).abs().max().item() < 1e-2 * s64.grad.abs().max().item()


def test_seed_distill_unnormalised_inputs_are_stable():
    torch.manual_seed(8)
    s, t, queue = 40 * torch.randn(4, 8), 40 * torch.randn(4, 8), 40 * torch.randn(30, 8)
    s64 = s.double().requires_grad_()
    kernels.seed_distill_reference(s64, t.double(), queue.double(), 0.1, 1e-4).backward()
    s.requires_grad_()
    loss = kernels.seed_distill(s, t, queue, 0.1, 1e-4)  # teacher logits ~ 1e7, fp32 throughout
    loss.backward()
    ref = kernels.seed_distill_reference(s.detach().double(), t.double(), queue.double(), 0.1, 1e-4)
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)
    assert (s.grad.double() - s64.grad).abs().max().item() <= 1e-5 * s64.grad.abs().max().item()


def test_seed_distill_rejects_bad_input():
    s = torch.randn(3, 4)
    with pytest.raises(ValueError, match="queue"):
        kernels.seed_distill(s, s, torch.randn(5, 3), 0.2, 1e-4)
    with pytest.raises(ValueError, match="temperatures"):
        kernels.seed_distill(s, s, torch.randn(5, 4), 0.2, 0.0)
    with pytest.raises(ValueError, match="s and t"):
        kernels.seed_distill_reference(s, s[:2], torch.randn(5, 4), 0.2, 1e-4)


# ---------------------------------------------------------------- Sinkhorn

def _swav_sinkhorn(out, eps, n_iters):
    """Plain transcription of facebookresearch/swav distributed_sinkhorn at world size 1 (float64)."""
    Q = torch.exp(out.double() / eps).t()
    n_b, n_k = Q.shape[1], Q.shape[0]
    Q /= Q.sum()
    for _ in range(n_iters):
        Q /= Q.sum(dim=1, keepdim=True)
        Q /= n_k
        Q /= Q.sum(dim=0, keepdim=True)
        Q /= n_b
    return (Q * n_b).t()


@pytest.mark.parametrize("b,k,eps,n_iters", [(1, 5, 0.05, 3), (8, 30, 0.05, 3), (16, 7, 0.03, 10), (6, 4, 0.05, 0)])
def test_sinkhorn_reference_matches_swav(b, k, eps, n_iters):
    torch.manual_seed(b * k)
    scores = (_unit(b, 12) @ _unit(k, 12).t()).float()
    out = kernels.sinkhorn(scores, eps, n_iters)
    assert out.dtype == torch.float32 and out.shape == (b, k)
    assert torch.allclose(out.double(), _swav_sinkhorn(scores, eps, n_iters), atol=1e-6, rtol=1e-5)


def test_sinkhorn_uniform_scores_and_hand_example():
    assert torch.allclose(kernels.sinkhorn(torch.full((4, 5), 0.3)), torch.full((4, 5), 0.2))
    # 2x2 with scores eps*log([[2,1],[1,2]]): the symmetric matrix is already balanced, rows -> [2/3, 1/3].
    s = 0.05 * torch.log(torch.tensor([[2.0, 1.0], [1.0, 2.0]]))
    assert torch.allclose(kernels.sinkhorn(s, 0.05, 1), torch.tensor([[2 / 3, 1 / 3], [1 / 3, 2 / 3]]), atol=1e-6)


def test_sinkhorn_marginals_converge():
    torch.manual_seed(3)
    b, k = 32, 8
    scores = _unit(b, 6).float() @ _unit(k, 6).float().t()
    errs = []
    for n in (1, 3, 30):
        q = kernels.sinkhorn(scores, 0.1, n)
        assert torch.allclose(q.sum(1), torch.ones(b), atol=1e-5)  # each sample's codes sum to 1
        errs.append((q.sum(0) - b / k).abs().max().item())  # prototypes get B/K samples at convergence
    assert errs[0] > errs[1] > errs[2] and errs[2] < 2e-3 * b / k


def test_sinkhorn_unnormalised_scores_do_not_overflow():
    torch.manual_seed(4)
    scores = 3 * torch.randn(6, 9)  # exp(scores / 0.05) overflows fp32 without the shift
    q = kernels.sinkhorn(scores, 0.05, 3)
    assert torch.isfinite(q).all() and torch.allclose(q.sum(1), torch.ones(6), atol=1e-5)
    shifted = scores.double() - scores.double().amax(0)  # exact shift, float64
    assert torch.allclose(q.double(), _swav_sinkhorn(shifted, 0.05, 3), atol=1e-6)


def test_sinkhorn_rejects_bad_input():
    with pytest.raises(ValueError, match="epsilon"):
        kernels.sinkhorn(torch.randn(3, 4), epsilon=0)
    with pytest.raises(ValueError, match="n_iters"):
        kernels.sinkhorn(torch.randn(3, 4), n_iters=-1)
    with pytest.raises(ValueError, match="B, K"):
        kernels.sinkhorn(torch.randn(3))
