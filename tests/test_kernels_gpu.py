"""Triton kernels at real sizes on a CUDA GPU (``gpu`` marker: skipped without one).

Tolerance rule (Liger-Kernel / flash-attention style): against a float64 reference,
``err(kernel, dtype) <= 2 * err(eager torch, same dtype) + atol``.
"""

import importlib

import pytest
import torch
import torch.nn.functional as F

pytestmark = pytest.mark.gpu
triton = pytest.importorskip("triton")

info_nce_mod = importlib.import_module("kernels.info_nce")
nt_xent_mod = importlib.import_module("kernels.nt_xent")
seed_mod = importlib.import_module("kernels.seed_distill")
sinkhorn_mod = importlib.import_module("kernels.sinkhorn")
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _unit(*shape, dtype):
    return F.normalize(torch.randn(*shape, device="cuda", dtype=torch.float64), dim=-1).to(dtype)


def _err(a, b):
    return (a.double() - b.double()).abs().max().item()


def _loss_and_grads(fn, tensors):
    leaves = [t.detach().clone().requires_grad_() for t in tensors]
    loss = fn(*leaves)
    return [loss.detach()] + list(torch.autograd.grad(loss, leaves))


def _check(got, torch_same_dtype, ref, rel_atol=2e-3):
    for g, t, r in zip(got, torch_same_dtype, ref):
        atol = rel_atol * r.abs().max().item() + 1e-6
        assert _err(g, r) <= 2 * _err(t, r) + atol, (_err(g, r), _err(t, r), atol)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("b,d,k", [(256, 128, 65536), (1024, 128, 16384), (33, 96, 1001)])
def test_info_nce_gpu(b, d, k, dtype):
    torch.manual_seed(0)
    q, key, queue = _unit(b, d, dtype=dtype), _unit(b, d, dtype=dtype), _unit(k, d, dtype=dtype)
    triton_fn = lambda a, c: info_nce_mod._InfoNCEFn.apply(a, c, queue, 0.2, info_nce_mod._stats_triton)[0]  # noqa
    got = _loss_and_grads(triton_fn, [q, key])
    same = _loss_and_grads(lambda a, c: info_nce_mod.info_nce_reference(a, c, queue, 0.2), [q, key])
    ref = _loss_and_grads(lambda a, c: info_nce_mod.info_nce_reference(a, c, queue.double(), 0.2),
                          [q.double(), key.double()])
    _check(got, same, ref)


def test_info_nce_gpu_memory_and_dispatch():
    torch.manual_seed(0)
    q = _unit(256, 128, dtype=torch.bfloat16).requires_grad_()
    key, queue = _unit(256, 128, dtype=torch.bfloat16), _unit(65536, 128, dtype=torch.bfloat16)
    import kernels
    kernels.info_nce(q, key, queue, 0.2).backward()  # warm-up / compile
    q.grad = None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    loss, acc1 = kernels.info_nce(q, key, queue, 0.2, return_accuracy=True)
    loss.backward()
    torch.cuda.synchronize()
    assert (torch.cuda.max_memory_allocated() - base) / 2**20 <= 16  # the target: <= 16 MB extra
    _, logits = info_nce_mod.info_nce_reference(q.detach().float(), key.float(), queue.float(), 0.2, True)
    assert abs(acc1.item() - (logits.argmax(1) == 0).float().mean().item() * 100) <= 100 / 256 + 1e-4


def _seed_same_dtype(s, t, queue, ts, tt):
    """Eager SEED with the similarities in the input dtype (as under autocast), softmaxes in fp32."""
    z_s = torch.cat([(s * t).sum(1, keepdim=True), s @ queue.t()], 1).float() / ts
    z_t = torch.cat([(t * t).sum(1, keepdim=True), t @ queue.t()], 1).float() / tt
    return -(torch.softmax(z_t, 1) * torch.log_softmax(z_s, 1)).sum(1).mean()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tt", [1e-4, 0.05])
@pytest.mark.parametrize("b,d,k", [(256, 128, 65536), (1024, 128, 16384), (33, 96, 1001)])
def test_seed_distill_gpu(b, d, k, tt, dtype):
    torch.manual_seed(0)
    s, t, queue = _unit(b, d, dtype=dtype), _unit(b, d, dtype=dtype), _unit(k, d, dtype=dtype)
    triton_fn = lambda a: seed_mod._SeedDistillFn.apply(a, t, queue, 0.2, tt, seed_mod._stats_triton)  # noqa
    got = _loss_and_grads(triton_fn, [s])
    same = _loss_and_grads(lambda a: _seed_same_dtype(a, t, queue, 0.2, tt), [s])
    ref = _loss_and_grads(lambda a: seed_mod.seed_distill_reference(a, t.double(), queue.double(), 0.2, tt),
                          [s.double()])
    _check(got, same, ref)


def test_seed_distill_gpu_memory_and_dispatch():
    torch.manual_seed(0)
    s = _unit(256, 128, dtype=torch.bfloat16).requires_grad_()
    t, queue = _unit(256, 128, dtype=torch.bfloat16), _unit(65536, 128, dtype=torch.bfloat16)
    import kernels
    kernels.seed_distill(s, t, queue, 0.2, 1e-4).backward()  # warm-up / compile
    s.grad = None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    loss = kernels.seed_distill(s, t, queue, 0.2, 1e-4)
    loss.backward()
    torch.cuda.synchronize()
    assert (torch.cuda.max_memory_allocated() - base) / 2**20 <= 16  # eager needs ~0.5 GB of logits
    ref = seed_mod.seed_distill_reference(s.detach().double(), t.double(), queue.double(), 0.2, 1e-4)
    assert abs(loss.item() - ref.item()) <= 1e-3 * abs(ref.item())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,d", [(8192, 128), (1001, 64)])
def test_nt_xent_gpu(n, d, dtype):
    torch.manual_seed(1)
    z1, z2 = _unit(n, d, dtype=dtype), _unit(n, d, dtype=dtype)
    got = _loss_and_grads(lambda a, b: nt_xent_mod._NTXentFn.apply(a, b, 0.1, True), [z1, z2])
    same = _loss_and_grads(lambda a, b: nt_xent_mod.nt_xent_reference(a, b, 0.1), [z1, z2])
    ref = _loss_and_grads(lambda a, b: nt_xent_mod.nt_xent_reference(a, b, 0.1), [z1.double(), z2.double()])
    _check(got, same, ref)


def test_nt_xent_gpu_runs_where_eager_cannot():
    # 2N = 262144: eager needs a 2N x 2N fp32 matrix (256 GiB); the kernel needs O(N * D).
    torch.manual_seed(2)
    z1 = _unit(131072, 128, dtype=torch.bfloat16).requires_grad_()
    z2 = _unit(131072, 128, dtype=torch.bfloat16)
    loss = nt_xent_mod._NTXentFn.apply(z1, z2, 0.1, True)
    loss.backward()
    chunked = nt_xent_mod._fwd_chunked(torch.cat([z1, z2]).detach(), 0.1, chunk=8192)[0].mean()
    assert torch.isfinite(z1.grad).all() and abs(loss.item() - chunked.item()) < 1e-2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("b,k,eps,iters", [(256, 3000, 0.05, 3), (4096, 3000, 0.05, 3), (1024, 16384, 0.03, 10),
                                           (128, 65536, 0.05, 3), (77, 1001, 0.05, 3)])
def test_sinkhorn_gpu(b, k, eps, iters, dtype):
    torch.manual_seed(3)
    scores = (_unit(b, 128, dtype=torch.float32) @ _unit(k, 128, dtype=torch.float32).t()).to(dtype)
    got = sinkhorn_mod._sinkhorn_triton(scores, eps, iters)
    ref = sinkhorn_mod.sinkhorn_reference(scores.double(), eps, iters)
    assert _err(got, ref) <= 1e-5  # the target: within 1e-5 of the reference
    assert torch.allclose(got.sum(1), torch.ones(b, device="cuda"), atol=1e-4)
