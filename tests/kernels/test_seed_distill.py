"""kernels/seed_distill.py: the reference against hand values and InfoNCE's limit, the chunked CPU path, the
Triton kernels in the interpreter (``interp``, against the fp64 and fp32 references) and on a GPU (``gpu``)."""

import math

import pytest
import torch
import torch.nn.functional as F
from kernel_testing import check_tolerance, err, loss_and_grads, unit

from kernels import seed_distill as mod
from kernels.info_nce import info_nce_reference
from kernels.seed_distill import seed_distill, seed_distill_reference

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _unit(*shape, dtype=torch.float64):
    return F.normalize(torch.randn(*shape, dtype=dtype), dim=-1)


def _unit32(*shape, dtype=torch.float32):
    return unit(*shape, dtype=dtype)


# ---------------------------------------------------------------- reference and CPU path

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
    loss = seed_distill_reference(s, t, queue, 0.5, 1.0)
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
    fused = seed_distill(s, t, queue, 0.5, 1.0)
    assert fused.item() == pytest.approx(loss.item(), abs=1e-12)


@pytest.mark.parametrize("b,d,k_len,chunk,ts,tt,scale,q_scale", [
    (1, 3, 1, 8, 0.2, 1e-4, 1.0, 1.0), (5, 7, 13, 4, 0.1, 0.05, 1.0, 1.0), (6, 16, 40, 40, 0.2, 1e-4, 1.0, 1.0),
    (5, 7, 37, 5, 0.1, 1e-4, 20.0, 20.0), (4, 16, 33, 8, 0.2, 0.05, 20.0, 20.0), (3, 5, 0, 4, 0.2, 0.05, 1.0, 1.0),
    (4, 6, 30, 4, 0.2, 0.5, 1.0, 3.0)])
def test_seed_distill_chunked_matches_reference(b, d, k_len, chunk, ts, tt, scale, q_scale):
    # q_scale > scale: queue entries outscore the positive, so the teacher's running max moves between chunks.
    torch.manual_seed(b + k_len)
    s, t, queue = scale * _unit(b, d), scale * _unit(b, d), q_scale * _unit(k_len, d)
    s.requires_grad_()
    stats = lambda *a: mod._stats_chunked(*a, chunk=chunk)  # noqa: E731
    loss = mod._SeedDistillFn.apply(s, t, queue, ts, tt, stats)
    (gs,) = torch.autograd.grad(3.0 * loss, s)
    ref = seed_distill_reference(s, t, queue, ts, tt)
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
        ref = seed_distill_reference(s, t, queue, 0.2, tt).item()
        ref32 = seed_distill_reference(s.float(), t.float(), queue.float(), 0.2, tt).item()
        rows, _ = mod._stats_chunked(s.float(), t.float(), queue.float(), 0.2, tt, False, chunk=8)
        assert abs(rows.mean().item() - ref) <= max(2e-6, 2 * abs(ref32 - ref)), tt


def test_seed_distill_small_teacher_temperature_is_info_nce():
    # T_t -> 0: the target is the one-hot of the teacher's argmax, entry 0 (t.t = 1 beats every t.queue_j),
    # so SEED's loss and student gradient equal InfoNCE's with t as the positive key.
    torch.manual_seed(6)
    s, t, queue = _unit(7, 8).requires_grad_(), _unit(7, 8), _unit(50, 8)
    loss = seed_distill(s, t, queue, 0.2, 1e-4)
    (gs,) = torch.autograd.grad(loss, s)
    ref = info_nce_reference(s, t, queue, 0.2)
    (rs,) = torch.autograd.grad(ref, s)
    assert loss.item() == pytest.approx(ref.item(), abs=1e-10)
    assert torch.allclose(gs, rs, atol=1e-10)
    assert abs(seed_distill(s, t, queue, 0.2, 0.5).item() - ref.item()) > 1e-2  # a soft target differs


def test_seed_distill_public_cpu_half_inputs_and_no_teacher_grad():
    torch.manual_seed(7)
    for dtype in (torch.float16, torch.bfloat16):
        s = _unit(9, 12, dtype=torch.float32).to(dtype).requires_grad_()
        t = _unit(9, 12, dtype=torch.float32).to(dtype).requires_grad_()
        queue = _unit(30, 12, dtype=torch.float32).to(dtype).requires_grad_()
        loss = seed_distill(s, t, queue, 0.2, 1e-4)
        loss.backward()
        s64 = s.detach().double().requires_grad_()
        ref = seed_distill_reference(s64, t.detach().double(), queue.detach().double(), 0.2, 1e-4)
        ref.backward()
        assert loss.dtype == torch.float32 and s.grad.dtype == dtype
        assert t.grad is None and queue.grad is None
        assert loss.item() == pytest.approx(ref.item(), abs=1e-5)  # fp32 math on the half-precision values
        assert (s.grad.double() - s64.grad).abs().max().item() < 1e-2 * s64.grad.abs().max().item()


def test_seed_distill_unnormalised_inputs_are_stable():
    torch.manual_seed(8)
    s, t, queue = 40 * torch.randn(4, 8), 40 * torch.randn(4, 8), 40 * torch.randn(30, 8)
    s64 = s.double().requires_grad_()
    seed_distill_reference(s64, t.double(), queue.double(), 0.1, 1e-4).backward()
    s.requires_grad_()
    loss = seed_distill(s, t, queue, 0.1, 1e-4)  # teacher logits ~ 1e7, fp32 throughout
    loss.backward()
    ref = seed_distill_reference(s.detach().double(), t.double(), queue.double(), 0.1, 1e-4)
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)
    assert (s.grad.double() - s64.grad).abs().max().item() <= 1e-5 * s64.grad.abs().max().item()


def test_seed_distill_rejects_bad_input():
    s = torch.randn(3, 4)
    with pytest.raises(ValueError, match="queue"):
        seed_distill(s, s, torch.randn(5, 3), 0.2, 1e-4)
    with pytest.raises(ValueError, match="temperatures"):
        seed_distill(s, s, torch.randn(5, 4), 0.2, 0.0)
    with pytest.raises(ValueError, match="s and t"):
        seed_distill_reference(s, s[:2], torch.randn(5, 4), 0.2, 1e-4)


def test_seed_distill_launch_configs_cover_every_feature_size():
    for d in range(1, mod.SEED_MAX_D + 1):
        for grad in (False, True):
            cfg = mod.split_config(d, torch.float32, "tf32", grad)
            assert cfg["BLOCK_D"] in mod.BLOCK_D_CLASSES and cfg["BLOCK_D"] >= d and cfg["BLOCK_B"] >= 16


# ---------------------------------------------------------------- Triton interpreter

def _seed_and_reference(fn, s, t, queue, ts, tt, ref_dtype=torch.float64, ref_fn=None):
    """Loss and d(2 loss)/ds of ``fn`` and of the reference (``ref_fn`` or SEED's) in ``ref_dtype``, same values."""
    ref_fn = ref_fn or seed_distill_reference
    out = []
    for f, dtype in ((fn, None), (ref_fn, ref_dtype)):
        s_in, t_in, queue_in = (x.detach() if dtype is None else x.detach().to(dtype) for x in (s, t, queue))
        leaf = s_in.clone().requires_grad_()
        loss = f(leaf, t_in, queue_in, ts, tt)
        out += [loss, torch.autograd.grad(2.0 * loss, leaf)[0]]
    return out


@pytest.mark.interp
@pytest.mark.parametrize("b,d,k_len,ts,tt,scale,splits,blocks", [
    (1, 7, 3, 0.2, 1e-4, 1.0, None, (16, 16)), (5, 7, 37, 0.1, 1e-4, 1.0, 2, (16, 16)),
    (5, 16, 70, 0.2, 0.05, 1.0, 3, (16, 32)), (1, 16, 45, 0.1, 0.05, 1.0, 4, (16, 16)),
    (5, 16, 90, 0.2, 0.05, 30.0, 2, (16, 16)), (5, 7, 33, 0.1, 1e-4, 30.0, None, (16, 16)),
    (19, 20, 200, 0.2, 1e-4, 1.0, None, (64, 64)), (5, 7, 100, 0.1, 0.05, 1.0, 1, (16, 16)),
    (4, 16, 130, 0.2, 1e-4, 30.0, 2, (16, 16)), (3, 7, 21, 0.2, 0.5, 1.0, 1, (16, 16))])
def test_seed_distill_kernel_matches_reference(b, d, k_len, ts, tt, scale, splits, blocks):
    # Tolerance: 1e-5 of max(1, |reference|) for the loss and of max(1, max |reference grad|) for ds, against
    # both the fp64 reference and the fp32 one; scale 30 gives unnormalised inputs (teacher logits ~ 1e7).
    # Cases with splits 1-2 walk several tiles per slice, so the running maxima move inside a program; the
    # soft teacher (T_t = 0.5) makes the padded columns of a partial tile count if they were not masked.
    torch.manual_seed(b * 100 + k_len)
    s, t, queue = scale * _unit32(b, d), scale * _unit32(b, d), scale * _unit32(k_len, d)
    stats = lambda *a: mod._stats_triton(*a, splits=splits, block_b=blocks[0], block_k=blocks[1])  # noqa: E731
    fused = lambda *a: mod._SeedDistillFn.apply(*a, stats)  # noqa: E731
    for dtype in (torch.float64, torch.float32):
        loss, gs, ref, rs = _seed_and_reference(fused, s, t, queue, ts, tt, ref_dtype=dtype)
        assert abs(loss.item() - ref.item()) <= 1e-5 * max(1.0, abs(ref.item())), dtype
        assert err(gs, rs) <= 1e-5 * max(1.0, rs.abs().max().item()), dtype


@pytest.mark.interp
def test_seed_distill_public_dispatch_no_grad_strided_and_info_nce_limit():
    torch.manual_seed(0)
    s, t = 30 * torch.randn(5, 12), 30 * torch.randn(5, 12)
    queue = (30 * torch.randn(12, 70)).t()  # strided (70, 12) view
    with torch.no_grad():  # the kernels' loss-only variant (no weighted row sums)
        loss = seed_distill(s, t, queue, 0.1, 0.05)
    ref = mod.seed_distill_reference(s.double(), t.double(), queue.double(), 0.1, 0.05)
    assert torch.isfinite(loss) and loss.item() == pytest.approx(ref.item(), rel=1e-5)
    # T_t -> 0 on normalised inputs: InfoNCE with t as the positive key, loss and student gradient.
    info_nce = lambda q, k, negatives, ts, tt: info_nce_reference(q, k, negatives, ts)  # noqa: E731
    loss, gs, ref, rs = _seed_and_reference(seed_distill, _unit32(6, 16), _unit32(6, 16), _unit32(40, 16), 0.2,
                                            1e-4, ref_fn=info_nce)
    assert abs(loss.item() - ref.item()) < 1e-5 and err(gs, rs) < 1e-5


@pytest.mark.interp
def test_seed_distill_exact_teacher_ties_across_slices():
    torch.manual_seed(9)
    s, t, queue = _unit32(4, 16), _unit32(4, 16), _unit32(64, 16)
    queue[5], queue[40], queue[20] = t[0], t[0], t[1]  # ties with the positive at teacher logits ~ 1e4
    stats = lambda *a: mod._stats_triton(*a, splits=3, block_b=16, block_k=16)  # noqa: E731
    loss, gs, ref, rs = _seed_and_reference(lambda *a: mod._SeedDistillFn.apply(*a, stats), s, t, queue, 0.2, 1e-4)
    assert abs(loss.item() - ref.item()) < 2e-6 and err(gs, rs) < 2e-6


@pytest.mark.interp
def test_seed_distill_half_inputs():
    torch.manual_seed(1)
    # fp16 only (the interpreter's bf16 tl.dot is wrong, see the NT-Xent test). All-fp16 runs half dots;
    # an fp32 queue promotes the kernel to fp32. The reference sees the same (rounded) values in fp64.
    for queue_dtype in (torch.float16, torch.float32):
        s16, t16 = _unit32(9, 16, dtype=torch.float16), _unit32(9, 16, dtype=torch.float16)
        queue = _unit32(40, 16, dtype=queue_dtype)
        loss, gs, ref, rs = _seed_and_reference(seed_distill, s16, t16, queue, 0.2, 1e-4)
        assert gs.dtype == torch.float16 and loss.dtype == torch.float32
        assert abs(loss.item() - ref.item()) < 2e-3 and err(gs, rs) < 4e-3



# ---------------------------------------------------------------- GPU, real sizes

def _seed_same_dtype(s, t, queue, ts, tt):
    """Eager SEED with the similarities in the input dtype (as under autocast), softmaxes in fp32."""
    z_s = torch.cat([(s * t).sum(1, keepdim=True), s @ queue.t()], 1).float() / ts
    z_t = torch.cat([(t * t).sum(1, keepdim=True), t @ queue.t()], 1).float() / tt
    return -(torch.softmax(z_t, 1) * torch.log_softmax(z_s, 1)).sum(1).mean()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tt", [1e-4, 0.05])
@pytest.mark.parametrize("b,d,k", [(256, 128, 65536), (1024, 128, 16384), (33, 96, 1001)])
def test_seed_distill_gpu(b, d, k, tt, dtype):
    torch.manual_seed(0)
    s, t = unit(b, d, dtype=dtype, device="cuda"), unit(b, d, dtype=dtype, device="cuda")
    queue = unit(k, d, dtype=dtype, device="cuda")
    triton_fn = lambda a: mod._SeedDistillFn.apply(a, t, queue, 0.2, tt, mod._stats_triton)  # noqa
    got = loss_and_grads(triton_fn, [s])
    same = loss_and_grads(lambda a: _seed_same_dtype(a, t, queue, 0.2, tt), [s])
    ref = loss_and_grads(lambda a: mod.seed_distill_reference(a, t.double(), queue.double(), 0.2, tt),
                          [s.double()])
    check_tolerance(got, same, ref)


@pytest.mark.gpu
def test_seed_distill_gpu_memory_and_dispatch():
    torch.manual_seed(0)
    s = unit(256, 128, dtype=torch.bfloat16, device="cuda").requires_grad_()
    t = unit(256, 128, dtype=torch.bfloat16, device="cuda")
    queue = unit(65536, 128, dtype=torch.bfloat16, device="cuda")
    seed_distill(s, t, queue, 0.2, 1e-4).backward()  # warm-up / compile
    s.grad = None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    loss = seed_distill(s, t, queue, 0.2, 1e-4)
    loss.backward()
    torch.cuda.synchronize()
    assert (torch.cuda.max_memory_allocated() - base) / 2**20 <= 16  # eager needs ~0.5 GB of logits
    ref = mod.seed_distill_reference(s.detach().double(), t.double(), queue.double(), 0.2, 1e-4)
    assert abs(loss.item() - ref.item()) <= 1e-3 * abs(ref.item())
