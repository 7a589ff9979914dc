"""kernels/nt_xent.py: the reference against an explicit sum, the chunked CPU path, the Triton kernels in the
interpreter (``interp``) and on a GPU at real sizes (``gpu``), 2N = 262144 included."""

import math

import pytest
import torch
import torch.nn.functional as F
from kernel_testing import check_tolerance, err, loss_and_grads, unit

from kernels import nt_xent as mod
from kernels.nt_xent import nt_xent, nt_xent_reference

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _unit(*shape, dtype=torch.float64):
    return F.normalize(torch.randn(*shape, dtype=dtype), dim=-1)


def _unit32(*shape, dtype=torch.float32):
    return unit(*shape, dtype=dtype)


# ---------------------------------------------------------------- reference and CPU path

def test_nt_xent_equal_similarities_is_log_2n_minus_1():
    z = torch.zeros(5, 4, dtype=torch.float64)
    z[:, 0] = 1.0
    assert nt_xent_reference(z, z.clone(), 0.5).item() == pytest.approx(math.log(9), abs=1e-12)
    assert nt_xent(z, z.clone(), 0.5).item() == pytest.approx(math.log(9), abs=1e-12)


def test_nt_xent_reference_matches_explicit_sum():
    torch.manual_seed(2)
    z1, z2, t = _unit(3, 4), _unit(3, 4), 0.3
    z = torch.cat([z1, z2])
    total = 0.0
    for i in range(6):
        pos = (i + 3) % 6
        others = [math.exp(float(z[i] @ z[j]) / t) for j in range(6) if j != i]
        total += -float(z[i] @ z[pos]) / t + math.log(sum(others))
    assert nt_xent_reference(z1, z2, t).item() == pytest.approx(total / 6, abs=1e-6)


@pytest.mark.parametrize("n,d,chunk", [(1, 3, 4), (5, 7, 3), (9, 16, 64)])
def test_nt_xent_chunked_matches_reference(n, d, chunk, monkeypatch):
    torch.manual_seed(n)
    z1, z2 = _unit(n, d).requires_grad_(), _unit(n, d).requires_grad_()
    fwd, bwd = mod._fwd_chunked, mod._bwd_chunked
    monkeypatch.setattr(mod, "_fwd_chunked", lambda z, t: fwd(z, t, chunk=chunk))
    monkeypatch.setattr(mod, "_bwd_chunked", lambda z, lse, t: bwd(z, lse, t, chunk=chunk))
    loss = nt_xent(z1, z2, 0.2)
    g1, g2 = torch.autograd.grad(2.0 * loss, (z1, z2))
    ref = nt_xent_reference(z1, z2, 0.2)
    r1, r2 = torch.autograd.grad(2.0 * ref, (z1, z2))
    assert loss.item() == pytest.approx(ref.item(), abs=1e-10)
    assert torch.allclose(g1, r1, atol=1e-10) and torch.allclose(g2, r2, atol=1e-10)


def test_nt_xent_single_pair_is_zero_and_unnormalised_stable():
    z = torch.randn(1, 5)
    assert nt_xent(z, torch.randn(1, 5), 0.1).item() == pytest.approx(0.0, abs=1e-6)
    z1, z2 = 50 * torch.randn(6, 8), 50 * torch.randn(6, 8)
    loss = nt_xent(z1, z2, 0.05)
    ref = nt_xent_reference(z1.double(), z2.double(), 0.05)
    assert torch.isfinite(loss) and loss.item() == pytest.approx(ref.item(), rel=1e-5)


# ---------------------------------------------------------------- Triton interpreter

@pytest.mark.interp
@pytest.mark.parametrize("n,d,blocks", [(1, 5, (16, 16)), (7, 33, (16, 16)), (40, 16, (16, 32)), (3, 130, (16, 16)),
                                        (37, 8, (64, 64))])
def test_nt_xent_kernel_matches_reference(n, d, blocks, monkeypatch):
    fwd, bwd = mod._fwd_triton, mod._bwd_triton
    monkeypatch.setattr(mod, "_fwd_triton", lambda z, t: fwd(z, t, *blocks))
    monkeypatch.setattr(mod, "_bwd_triton", lambda z, lse, g, t: bwd(z, lse, g, t, *blocks))
    torch.manual_seed(n + d)
    z1, z2 = _unit32(n, d).requires_grad_(), _unit32(n, d).requires_grad_()
    loss = nt_xent(z1, z2, 0.1)
    g1, g2 = torch.autograd.grad(3.0 * loss, (z1, z2))
    a64, b64 = z1.detach().double().requires_grad_(), z2.detach().double().requires_grad_()
    ref = nt_xent_reference(a64, b64, 0.1)
    r1, r2 = torch.autograd.grad(3.0 * ref, (a64, b64))
    assert abs(loss.item() - ref.item()) < 1e-5
    assert err(g1, r1) < 1e-5 and err(g2, r2) < 1e-5


@pytest.mark.interp
def test_nt_xent_unnormalised_and_half():
    torch.manual_seed(2)
    z1, z2 = 30 * torch.randn(6, 10), 30 * torch.randn(6, 10)
    loss = nt_xent(z1, z2, 0.05)
    assert loss.item() == pytest.approx(nt_xent_reference(z1.double(), z2.double(), 0.05).item(), rel=1e-5)
    # fp16 only: Triton 3.8's interpreter gets bf16 tl.dot wrong (off by ~1e10); bf16 runs in the gpu tests.
    h1, h2 = _unit32(11, 16, dtype=torch.float16).requires_grad_(), _unit32(11, 16, dtype=torch.float16)
    loss = nt_xent(h1, h2, 0.2)
    (g,) = torch.autograd.grad(loss, h1)
    a64 = h1.detach().double().requires_grad_()
    ref = nt_xent_reference(a64, h2.double(), 0.2)
    (r,) = torch.autograd.grad(ref, a64)
    assert g.dtype == torch.float16 and abs(loss.item() - ref.item()) < 2e-3 and err(g, r) < 2e-3



# ---------------------------------------------------------------- GPU, real sizes

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,d", [(8192, 128), (1001, 64)])
def test_nt_xent_gpu(n, d, dtype):
    torch.manual_seed(1)
    z1, z2 = unit(n, d, dtype=dtype, device="cuda"), unit(n, d, dtype=dtype, device="cuda")
    got = loss_and_grads(lambda a, b: mod._NTXentFn.apply(a, b, 0.1, True), [z1, z2])
    same = loss_and_grads(lambda a, b: mod.nt_xent_reference(a, b, 0.1), [z1, z2])
    ref = loss_and_grads(lambda a, b: mod.nt_xent_reference(a, b, 0.1), [z1.double(), z2.double()])
    check_tolerance(got, same, ref)


@pytest.mark.gpu
def test_nt_xent_gpu_runs_where_eager_cannot():
    # 2N = 262144: eager needs a 2N x 2N fp32 matrix (256 GiB); the kernel needs O(N * D).
    torch.manual_seed(2)
    z1 = unit(131072, 128, dtype=torch.bfloat16, device="cuda").requires_grad_()
    z2 = unit(131072, 128, dtype=torch.bfloat16, device="cuda")
    loss = mod._NTXentFn.apply(z1, z2, 0.1, True)
    loss.backward()
    chunked = mod._fwd_chunked(torch.cat([z1, z2]).detach(), 0.1, chunk=8192)[0].mean()
    assert torch.isfinite(z1.grad).all() and abs(loss.item() - chunked.item()) < 1e-2
