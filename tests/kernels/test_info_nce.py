"""kernels/info_nce.py: the reference against hand values, the chunked CPU path, the Triton kernels in the
interpreter (``interp``) and on a GPU at real sizes (``gpu``)."""

import math

import pytest
import torch
import torch.nn.functional as F
from kernel_testing import check_tolerance, err, loss_and_grads, unit

from kernels import info_nce as mod
from kernels.info_nce import info_nce, info_nce_reference


def _unit(*shape, dtype=torch.float64):
    return F.normalize(torch.randn(*shape, dtype=dtype), dim=-1)


# ---------------------------------------------------------------- reference and CPU path

def test_info_nce_equal_similarities_is_log_k_plus_1():
    q = torch.zeros(4, 8, dtype=torch.float64)
    q[:, 0] = 1.0
    k, queue = q.clone(), q[:1].repeat(10, 1)  # every logit equals 1/T
    assert info_nce_reference(q, k, queue, 0.2).item() == pytest.approx(math.log(11), abs=1e-12)
    assert info_nce(q, k, queue, 0.2).item() == pytest.approx(math.log(11), abs=1e-12)


def test_info_nce_reference_hand_computed():
    q = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    k = torch.tensor([[0.6, 0.8]], dtype=torch.float64)
    queue = torch.tensor([[0.0, 1.0], [-1.0, 0.0]], dtype=torch.float64)
    t = 0.5  # logits [1.2, 0, -2]
    expected = -1.2 + math.log(math.exp(1.2) + 1.0 + math.exp(-2.0))
    loss, logits = info_nce_reference(q, k, queue, t, return_logits=True)
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    assert torch.allclose(logits, torch.tensor([[1.2, 0.0, -2.0]], dtype=torch.float64), atol=1e-12)


@pytest.mark.parametrize("b,d,k_len,chunk", [(1, 3, 1, 8), (5, 7, 13, 4), (6, 16, 40, 40)])
def test_info_nce_chunked_matches_reference(b, d, k_len, chunk):
    torch.manual_seed(b + k_len)
    q, k, queue = _unit(b, d).requires_grad_(), _unit(b, d).requires_grad_(), _unit(k_len, d)
    stats = lambda *a: mod._stats_chunked(*a, chunk=chunk)  # noqa: E731
    loss, acc1 = mod._InfoNCEFn.apply(q, k, queue, 0.07, stats)
    gq, gk = torch.autograd.grad(3.0 * loss, (q, k))
    ref, logits = info_nce_reference(q, k, queue, 0.07, return_logits=True)
    rq, rk = torch.autograd.grad(3.0 * ref, (q, k))
    assert loss.item() == pytest.approx(ref.item(), abs=1e-10)
    assert torch.allclose(gq, rq, atol=1e-10) and torch.allclose(gk, rk, atol=1e-10)
    assert acc1.item() == pytest.approx((logits.argmax(1) == 0).double().mean().item() * 100)


def test_info_nce_public_cpu_path_accuracy_and_no_queue_grad():
    torch.manual_seed(0)
    q, k = _unit(9, 6, dtype=torch.float32), _unit(9, 6, dtype=torch.float32)
    k[:4] = q[:4]  # rows 0-3: positive is the exact max
    queue = _unit(50, 6, dtype=torch.float32).requires_grad_()
    loss, acc1 = info_nce(q.requires_grad_(), k, queue, 0.1, return_accuracy=True)
    _, logits = info_nce_reference(q, k, queue, 0.1, return_logits=True)
    assert acc1.item() == pytest.approx((logits.argmax(1) == 0).float().mean().item() * 100)
    assert acc1.item() >= 400 / 9 - 1e-4
    loss.backward()
    assert queue.grad is None and q.grad is not None


def test_info_nce_unnormalised_inputs_are_stable():
    torch.manual_seed(1)
    q, k, queue = 40 * torch.randn(4, 8), 40 * torch.randn(4, 8), 40 * torch.randn(30, 8)
    loss = info_nce(q.requires_grad_(), k, queue, 0.05)  # logits up to ~1e5: exp would overflow
    ref = info_nce_reference(q.double(), k.double(), queue.double(), 0.05)
    assert torch.isfinite(loss) and loss.item() == pytest.approx(ref.item(), rel=1e-5)
    loss.backward()
    assert torch.isfinite(q.grad).all()


def test_info_nce_rejects_bad_input():
    q = torch.randn(3, 4)
    with pytest.raises(ValueError, match="queue"):
        info_nce(q, q, torch.randn(5, 3), 0.1)
    with pytest.raises(ValueError, match="temperature"):
        info_nce(q, q, torch.randn(5, 4), 0.0)
    with pytest.raises(ValueError, match="q and k"):
        info_nce(q, q[:2], torch.randn(5, 4), 0.1)


def test_info_nce_launch_configs_cover_every_feature_size():
    # every D the Triton path takes maps onto a tile width the AOT table compiles, with at most 8192 tile elements
    for d in range(1, mod.MAX_D + 1):
        for grad in (False, True):
            cfg = mod.split_config(d, torch.bfloat16, "tf32", grad)
            assert cfg["BLOCK_D"] in mod.BLOCK_D_CLASSES and cfg["BLOCK_D"] >= d
            assert cfg["BLOCK_B"] * cfg["BLOCK_D"] <= 8192 and cfg["BLOCK_B"] >= 16


# ---------------------------------------------------------------- Triton interpreter

def _unit32(*shape, dtype=torch.float32):
    return unit(*shape, dtype=dtype)


@pytest.mark.interp
@pytest.mark.parametrize("b,d,k_len,splits,blocks", [
    (1, 5, 3, None, (16, 16)), (7, 33, 77, 3, (16, 16)), (5, 16, 130, 2, (16, 32)), (3, 8, 1, None, (16, 16)),
    (19, 20, 45, 4, (16, 16)), (6, 24, 200, None, (64, 64)), (21, 16, 150, None, (None, None))])
def test_info_nce_kernel_matches_reference(b, d, k_len, splits, blocks):
    torch.manual_seed(b * 100 + k_len)
    q, k, queue = _unit32(b, d).requires_grad_(), _unit32(b, d).requires_grad_(), _unit32(k_len, d)
    stats = lambda *a: mod._stats_triton(*a, splits=splits, block_b=blocks[0], block_k=blocks[1])  # noqa: E731
    loss, acc1 = mod._InfoNCEFn.apply(q, k, queue, 0.07, stats)
    gq, gk = torch.autograd.grad(2.0 * loss, (q, k))
    q64, k64 = q.detach().double().requires_grad_(), k.detach().double().requires_grad_()
    ref, logits = info_nce_reference(q64, k64, queue.double(), 0.07, return_logits=True)
    rq, rk = torch.autograd.grad(2.0 * ref, (q64, k64))
    assert abs(loss.item() - ref.item()) < 1e-5
    assert err(gq, rq) < 1e-5 and err(gk, rk) < 1e-5
    assert acc1.item() == pytest.approx((logits.argmax(1) == 0).double().mean().item() * 100)


@pytest.mark.interp
def test_info_nce_public_dispatch_no_grad_strided_and_unnormalised():
    from kernels import triton_enabled

    assert triton_enabled(torch.zeros(1))  # CPU tensors take the Triton path in the interpreter
    torch.manual_seed(0)
    q, k = 30 * torch.randn(5, 12), 30 * torch.randn(5, 12)
    queue = (30 * torch.randn(12, 70)).t()  # strided (70, 12) view; logits ~ 1e4 overflow a naive exp
    with torch.no_grad():
        loss = info_nce(q, k, queue, 0.1)
    ref = info_nce_reference(q.double(), k.double(), queue.double(), 0.1)
    assert torch.isfinite(loss) and loss.item() == pytest.approx(ref.item(), rel=1e-5)


@pytest.mark.interp
def test_info_nce_half_inputs_with_fp32_queue():
    torch.manual_seed(1)
    q16, k16, queue = _unit32(9, 16, dtype=torch.float16), _unit32(9, 16, dtype=torch.float16), _unit32(40, 16)
    q = q16.clone().requires_grad_()
    loss = info_nce(q, k16, queue, 0.2)
    (gq,) = torch.autograd.grad(loss, q)
    q64 = q16.double().requires_grad_()
    ref = info_nce_reference(q64, k16.double(), queue.double(), 0.2)
    (rq,) = torch.autograd.grad(ref, q64)
    assert gq.dtype == torch.float16
    assert abs(loss.item() - ref.item()) < 2e-3 and err(gq, rq) < 2e-3


# ---------------------------------------------------------------- GPU, real sizes

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("b,d,k", [(256, 128, 65536), (1024, 128, 16384), (33, 96, 1001)])
def test_info_nce_gpu(b, d, k, dtype):
    torch.manual_seed(0)
    q, key = unit(b, d, dtype=dtype, device="cuda"), unit(b, d, dtype=dtype, device="cuda")
    queue = unit(k, d, dtype=dtype, device="cuda")
    triton_fn = lambda a, c: mod._InfoNCEFn.apply(a, c, queue, 0.2, mod._stats_triton)[0]  # noqa: E731
    got = loss_and_grads(triton_fn, [q, key])
    same = loss_and_grads(lambda a, c: info_nce_reference(a, c, queue, 0.2), [q, key])
    ref = loss_and_grads(lambda a, c: info_nce_reference(a, c, queue.double(), 0.2), [q.double(), key.double()])
    check_tolerance(got, same, ref)


@pytest.mark.gpu
def test_info_nce_gpu_memory_and_dispatch():
    torch.manual_seed(0)
    q = unit(256, 128, dtype=torch.bfloat16, device="cuda").requires_grad_()
    key, queue = unit(256, 128, dtype=torch.bfloat16, device="cuda"), unit(65536, 128, dtype=torch.bfloat16,
                                                                              device="cuda")
    info_nce(q, key, queue, 0.2).backward()  # warm-up / compile
    q.grad = None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    loss, acc1 = info_nce(q, key, queue, 0.2, return_accuracy=True)
    loss.backward()
    torch.cuda.synchronize()
    assert (torch.cuda.max_memory_allocated() - base) / 2**20 <= 16  # the target: <= 16 MB extra
    _, logits = info_nce_reference(q.detach().float(), key.float(), queue.float(), 0.2, True)
    assert abs(acc1.item() - (logits.argmax(1) == 0).float().mean().item() * 100) <= 100 / 256 + 1e-4
