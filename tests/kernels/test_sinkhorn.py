"""kernels/sinkhorn.py: the reference against a transcription of swav's ``distributed_sinkhorn``, hand values and
convergence, the Triton kernels in the interpreter (``interp``, 2-rank gloo included) and on a GPU (``gpu``)."""

import pytest
import torch
import torch.nn.functional as F
from kernel_testing import err, unit

from kernels import sinkhorn as mod
from kernels.sinkhorn import sinkhorn, sinkhorn_reference


def _unit(*shape, dtype=torch.float64):
    return F.normalize(torch.randn(*shape, dtype=dtype), dim=-1)


def _unit32(*shape, dtype=torch.float32):
    return unit(*shape, dtype=dtype)


# ---------------------------------------------------------------- reference and CPU path

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
    out = sinkhorn(scores, eps, n_iters)
    assert out.dtype == torch.float32 and out.shape == (b, k)
    assert torch.allclose(out.double(), _swav_sinkhorn(scores, eps, n_iters), atol=1e-6, rtol=1e-5)


def test_sinkhorn_uniform_scores_and_hand_example():
    assert torch.allclose(sinkhorn(torch.full((4, 5), 0.3)), torch.full((4, 5), 0.2))
    # 2x2 with scores eps*log([[2,1],[1,2]]): the symmetric matrix is already balanced, rows -> [2/3, 1/3].
    s = 0.05 * torch.log(torch.tensor([[2.0, 1.0], [1.0, 2.0]]))
    assert torch.allclose(sinkhorn(s, 0.05, 1), torch.tensor([[2 / 3, 1 / 3], [1 / 3, 2 / 3]]), atol=1e-6)


def test_sinkhorn_marginals_converge():
    torch.manual_seed(3)
    b, k = 32, 8
    scores = _unit(b, 6).float() @ _unit(k, 6).float().t()
    errs = []
    for n in (1, 3, 30):
        q = sinkhorn(scores, 0.1, n)
        assert torch.allclose(q.sum(1), torch.ones(b), atol=1e-5)  # each sample's codes sum to 1
        errs.append((q.sum(0) - b / k).abs().max().item())  # prototypes get B/K samples at convergence
    assert errs[0] > errs[1] > errs[2] and errs[2] < 2e-3 * b / k


def test_sinkhorn_unnormalised_scores_do_not_overflow():
    torch.manual_seed(4)
    scores = 3 * torch.randn(6, 9)  # exp(scores / 0.05) overflows fp32 without the shift
    q = sinkhorn(scores, 0.05, 3)
    assert torch.isfinite(q).all() and torch.allclose(q.sum(1), torch.ones(6), atol=1e-5)
    shifted = scores.double() - scores.double().amax(0)  # exact shift, float64
    assert torch.allclose(q.double(), _swav_sinkhorn(shifted, 0.05, 3), atol=1e-6)


def test_sinkhorn_rejects_bad_input():
    with pytest.raises(ValueError, match="epsilon"):
        sinkhorn(torch.randn(3, 4), epsilon=0)
    with pytest.raises(ValueError, match="n_iters"):
        sinkhorn(torch.randn(3, 4), n_iters=-1)
    with pytest.raises(ValueError, match="B, K"):
        sinkhorn(torch.randn(3))
# ---------------------------------------------------------------- Triton interpreter

@pytest.mark.interp
@pytest.mark.parametrize("b,k,eps,n_iters,blocks", [(1, 5, 0.05, 3, (16, 16)), (7, 33, 0.05, 3, (16, 16)),
                                                    (37, 70, 0.03, 10, (16, 32)), (5, 3, 0.05, 1, (32, 128))])
def test_sinkhorn_kernel_matches_reference(b, k, eps, n_iters, blocks):
    torch.manual_seed(b * k)
    scores = _unit32(b, 16) @ _unit32(k, 16).t()
    out = mod._sinkhorn_triton(scores, eps, n_iters, *blocks)
    ref = sinkhorn_reference(scores.double(), eps, n_iters)
    assert err(out, ref) < 1e-5
    assert torch.allclose(out.sum(1), torch.ones(b), atol=1e-5)


@pytest.mark.interp
def test_sinkhorn_public_half_and_extreme_scores():
    torch.manual_seed(3)
    scores = (_unit32(20, 8) @ _unit32(50, 8).t()).half()
    out = sinkhorn(scores, 0.05, 3)
    assert out.dtype == torch.float32
    assert err(out, sinkhorn_reference(scores.double(), 0.05, 3)) < 1e-5
    extreme = 5 * torch.randn(6, 9)  # exp(x / eps) up to e^300: overflows fp32 without the max shift
    out = sinkhorn(extreme, 0.05, 3)
    assert torch.isfinite(out).all() and torch.allclose(out.sum(1), torch.ones(6), atol=1e-5)
    assert err(out, sinkhorn_reference(extreme.double(), 0.05, 3)) < 1e-5


def _dist_worker(rank, world, init_file, scores, result_dir):
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    part = scores.chunk(world)[rank]
    torch.save({"ref": sinkhorn_reference(part, 0.05, 3), "kernel": mod._sinkhorn_triton(part, 0.05, 3, 16, 16)},
               f"{result_dir}/{rank}.pt")
    dist.destroy_process_group()


@pytest.mark.interp
def test_sinkhorn_distributed_equals_single_process(tmp_path):
    import torch.multiprocessing as mp
    torch.manual_seed(4)
    scores = _unit32(12, 8) @ _unit32(20, 8).t()
    mp.spawn(_dist_worker, args=(2, str(tmp_path / "init"), scores, str(tmp_path)), nprocs=2)
    full = sinkhorn_reference(scores, 0.05, 3)
    for key in ("ref", "kernel"):
        got = torch.cat([torch.load(tmp_path / f"{r}.pt")[key] for r in range(2)])
        assert err(got, full) < 1e-6, key

# ---------------------------------------------------------------- GPU, real sizes

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("b,k,eps,iters", [(256, 3000, 0.05, 3), (4096, 3000, 0.05, 3), (1024, 16384, 0.03, 10),
                                           (128, 65536, 0.05, 3), (77, 1001, 0.05, 3)])
def test_sinkhorn_gpu(b, k, eps, iters, dtype):
    torch.manual_seed(3)
    scores = unit(b, 128, dtype=torch.float32, device="cuda") @ unit(k, 128, dtype=torch.float32, device="cuda").t()
    scores = scores.to(dtype)
    got = mod._sinkhorn_triton(scores, eps, iters)
    ref = sinkhorn_reference(scores.double(), eps, iters)
    assert err(got, ref) <= 1e-5  # the target: within 1e-5 of the reference
    assert torch.allclose(got.sum(1), torch.ones(b, device="cuda"), atol=1e-4)
