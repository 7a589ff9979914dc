"""The Triton kernels of kernels/ on CPU, in Triton's interpreter, against the fp32/fp64 references.

Triton chooses interpreter or compiler when it is imported (``TRITON_INTERPRET``), and the pytest
process has already imported it, so ``test_interpreter_suite`` reruns this file in a subprocess with
``TRITON_INTERPRET=1``; there the cases below run and the runner skips itself. Run the cases directly
with ``TRITON_INTERPRET=1 pytest tests/test_kernels_interpreter.py``.
"""

import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

INTERP = os.environ.get("TRITON_INTERPRET") == "1"
REPO = Path(__file__).resolve().parents[1]
cases = pytest.mark.skipif(not INTERP, reason="runs in test_interpreter_suite's TRITON_INTERPRET=1 subprocess")


@pytest.mark.skipif(INTERP, reason="this is the runner; the cases run in this process")
def test_interpreter_suite():
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(Path(__file__))],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    assert " passed" in proc.stdout and "skipped" in proc.stdout  # the runner skipped, the cases ran


def _unit(*shape, dtype=torch.float32):
    return F.normalize(torch.randn(*shape, dtype=torch.float64), dim=-1).to(dtype)


def _err(a, b):
    return (a.double() - b.double()).abs().max().item()


# ---------------------------------------------------------------- InfoNCE

@cases
@pytest.mark.parametrize("b,d,k_len,splits,blocks", [
    (1, 5, 3, None, (16, 16)), (7, 33, 77, 3, (16, 16)), (5, 16, 130, 2, (16, 32)), (3, 8, 1, None, (16, 16)),
    (19, 20, 45, 4, (16, 16)), (6, 24, 200, None, (64, 64))])
def test_info_nce_kernel_matches_reference(b, d, k_len, splits, blocks):
    mod = importlib.import_module("kernels.info_nce")
    torch.manual_seed(b * 100 + k_len)
    q, k, queue = _unit(b, d).requires_grad_(), _unit(b, d).requires_grad_(), _unit(k_len, d)
    stats = lambda *a: mod._stats_triton(*a, splits=splits, block_b=blocks[0], block_k=blocks[1])  # noqa: E731
    loss, acc1 = mod._InfoNCEFn.apply(q, k, queue, 0.07, stats)
    gq, gk = torch.autograd.grad(2.0 * loss, (q, k))
    q64, k64 = q.detach().double().requires_grad_(), k.detach().double().requires_grad_()
    ref, logits = mod.info_nce_reference(q64, k64, queue.double(), 0.07, return_logits=True)
    rq, rk = torch.autograd.grad(2.0 * ref, (q64, k64))
    assert abs(loss.item() - ref.item()) < 1e-5
    assert _err(gq, rq) < 1e-5 and _err(gk, rk) < 1e-5
    assert acc1.item() == pytest.approx((logits.argmax(1) == 0).double().mean().item() * 100)


@cases
def test_info_nce_public_dispatch_no_grad_strided_and_unnormalised():
    import kernels
    mod = importlib.import_module("kernels.info_nce")
    assert kernels.triton_enabled(torch.zeros(1))  # CPU tensors take the Triton path in the interpreter
    torch.manual_seed(0)
    q, k = 30 * torch.randn(5, 12), 30 * torch.randn(5, 12)
    queue = (30 * torch.randn(12, 70)).t()  # strided (70, 12) view; logits ~ 1e4 overflow a naive exp
    with torch.no_grad():
        loss = kernels.info_nce(q, k, queue, 0.1)
    ref = mod.info_nce_reference(q.double(), k.double(), queue.double(), 0.1)
    assert torch.isfinite(loss) and loss.item() == pytest.approx(ref.item(), rel=1e-5)


@cases
def test_info_nce_half_inputs_with_fp32_queue():
    import kernels
    mod = importlib.import_module("kernels.info_nce")
    torch.manual_seed(1)
    q16, k16, queue = _unit(9, 16, dtype=torch.float16), _unit(9, 16, dtype=torch.float16), _unit(40, 16)
    q = q16.clone().requires_grad_()
    loss = kernels.info_nce(q, k16, queue, 0.2)
    (gq,) = torch.autograd.grad(loss, q)
    q64 = q16.double().requires_grad_()
    ref = mod.info_nce_reference(q64, k16.double(), queue.double(), 0.2)
    (rq,) = torch.autograd.grad(ref, q64)
    assert gq.dtype == torch.float16
    assert abs(loss.item() - ref.item()) < 2e-3 and _err(gq, rq) < 2e-3


# ---------------------------------------------------------------- SEED distillation

def _seed_and_reference(fn, s, t, queue, ts, tt, ref_dtype=torch.float64, ref_fn=None):
    """Loss and d(2 loss)/ds of ``fn`` and of the reference (``ref_fn`` or SEED's) in ``ref_dtype``, same values."""
    ref_fn = ref_fn or importlib.import_module("kernels.seed_distill").seed_distill_reference
    out = []
    for f, dtype in ((fn, None), (ref_fn, ref_dtype)):
        s_in, t_in, queue_in = (x.detach() if dtype is None else x.detach().to(dtype) for x in (s, t, queue))
        leaf = s_in.clone().requires_grad_()
        loss = f(leaf, t_in, queue_in, ts, tt)
        out += [loss, torch.autograd.grad(2.0 * loss, leaf)[0]]
    return out


@cases
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
    mod = importlib.import_module("kernels.seed_distill")
    torch.manual_seed(b * 100 + k_len)
    s, t, queue = scale * _unit(b, d), scale * _unit(b, d), scale * _unit(k_len, d)
    stats = lambda *a: mod._stats_triton(*a, splits=splits, block_b=blocks[0], block_k=blocks[1])  # noqa: E731
    fused = lambda *a: mod._SeedDistillFn.apply(*a, stats)  # noqa: E731
    for dtype in (torch.float64, torch.float32):
        loss, gs, ref, rs = _seed_and_reference(fused, s, t, queue, ts, tt, ref_dtype=dtype)
        assert abs(loss.item() - ref.item()) <= 1e-5 * max(1.0, abs(ref.item())), dtype
        assert _err(gs, rs) <= 1e-5 * max(1.0, rs.abs().max().item()), dtype


@cases
def test_seed_distill_public_dispatch_no_grad_strided_and_info_nce_limit():
    import kernels
    mod = importlib.import_module("kernels.seed_distill")
    torch.manual_seed(0)
    s, t = 30 * torch.randn(5, 12), 30 * torch.randn(5, 12)
    queue = (30 * torch.randn(12, 70)).t()  # strided (70, 12) view
    with torch.no_grad():  # the kernels' loss-only variant (no weighted row sums)
        loss = kernels.seed_distill(s, t, queue, 0.1, 0.05)
    ref = mod.seed_distill_reference(s.double(), t.double(), queue.double(), 0.1, 0.05)
    assert torch.isfinite(loss) and loss.item() == pytest.approx(ref.item(), rel=1e-5)
    # T_t -> 0 on normalised inputs: InfoNCE with t as the positive key, loss and student gradient.
    info_nce = lambda q, k, negatives, ts, tt: kernels.info_nce_reference(q, k, negatives, ts)  # noqa: E731
    loss, gs, ref, rs = _seed_and_reference(kernels.seed_distill, _unit(6, 16), _unit(6, 16), _unit(40, 16), 0.2,
                                            1e-4, ref_fn=info_nce)
    assert abs(loss.item() - ref.item()) < 1e-5 and _err(gs, rs) < 1e-5


@cases
def test_seed_distill_exact_teacher_ties_across_slices():
    mod = importlib.import_module("kernels.seed_distill")
    torch.manual_seed(9)
    s, t, queue = _unit(4, 16), _unit(4, 16), _unit(64, 16)
    queue[5], queue[40], queue[20] = t[0], t[0], t[1]  # ties with the positive at teacher logits ~ 1e4
    stats = lambda *a: mod._stats_triton(*a, splits=3, block_b=16, block_k=16)  # noqa: E731
    loss, gs, ref, rs = _seed_and_reference(lambda *a: mod._SeedDistillFn.apply(*a, stats), s, t, queue, 0.2, 1e-4)
    assert abs(loss.item() - ref.item()) < 2e-6 and _err(gs, rs) < 2e-6


@cases
def test_seed_distill_half_inputs():
    import kernels
    torch.manual_seed(1)
    # fp16 only (the interpreter's bf16 tl.dot is wrong, see the NT-Xent test). All-fp16 runs half dots;
    # an fp32 queue promotes the kernel to fp32. The reference sees the same (rounded) values in fp64.
    for queue_dtype in (torch.float16, torch.float32):
        s16, t16 = _unit(9, 16, dtype=torch.float16), _unit(9, 16, dtype=torch.float16)
        queue = _unit(40, 16, dtype=queue_dtype)
        loss, gs, ref, rs = _seed_and_reference(kernels.seed_distill, s16, t16, queue, 0.2, 1e-4)
        assert gs.dtype == torch.float16 and loss.dtype == torch.float32
        assert abs(loss.item() - ref.item()) < 2e-3 and _err(gs, rs) < 4e-3


# ---------------------------------------------------------------- NT-Xent

@cases
@pytest.mark.parametrize("n,d,blocks", [(1, 5, (16, 16)), (7, 33, (16, 16)), (40, 16, (16, 32)), (3, 130, (16, 16)),
                                        (37, 8, (64, 64))])
def test_nt_xent_kernel_matches_reference(n, d, blocks, monkeypatch):
    import kernels
    mod = importlib.import_module("kernels.nt_xent")
    fwd, bwd = mod._fwd_triton, mod._bwd_triton
    monkeypatch.setattr(mod, "_fwd_triton", lambda z, t: fwd(z, t, *blocks))
    monkeypatch.setattr(mod, "_bwd_triton", lambda z, lse, g, t: bwd(z, lse, g, t, *blocks))
    torch.manual_seed(n + d)
    z1, z2 = _unit(n, d).requires_grad_(), _unit(n, d).requires_grad_()
    loss = kernels.nt_xent(z1, z2, 0.1)
    g1, g2 = torch.autograd.grad(3.0 * loss, (z1, z2))
    a64, b64 = z1.detach().double().requires_grad_(), z2.detach().double().requires_grad_()
    ref = mod.nt_xent_reference(a64, b64, 0.1)
    r1, r2 = torch.autograd.grad(3.0 * ref, (a64, b64))
    assert abs(loss.item() - ref.item()) < 1e-5
    assert _err(g1, r1) < 1e-5 and _err(g2, r2) < 1e-5


@cases
def test_nt_xent_unnormalised_and_half():
    import kernels
    mod = importlib.import_module("kernels.nt_xent")
    torch.manual_seed(2)
    z1, z2 = 30 * torch.randn(6, 10), 30 * torch.randn(6, 10)
    loss = kernels.nt_xent(z1, z2, 0.05)
    assert loss.item() == pytest.approx(mod.nt_xent_reference(z1.double(), z2.double(), 0.05).item(), rel=1e-5)
    # fp16 only: Triton 3.8's interpreter gets bf16 tl.dot wrong (off by ~1e10); bf16 runs in the gpu tests.
    h1, h2 = _unit(11, 16, dtype=torch.float16).requires_grad_(), _unit(11, 16, dtype=torch.float16)
    loss = kernels.nt_xent(h1, h2, 0.2)
    (g,) = torch.autograd.grad(loss, h1)
    a64 = h1.detach().double().requires_grad_()
    ref = mod.nt_xent_reference(a64, h2.double(), 0.2)
    (r,) = torch.autograd.grad(ref, a64)
    assert g.dtype == torch.float16 and abs(loss.item() - ref.item()) < 2e-3 and _err(g, r) < 2e-3


# ---------------------------------------------------------------- Sinkhorn

@cases
@pytest.mark.parametrize("b,k,eps,n_iters,blocks", [(1, 5, 0.05, 3, (16, 16)), (7, 33, 0.05, 3, (16, 16)),
                                                    (37, 70, 0.03, 10, (16, 32)), (5, 3, 0.05, 1, (32, 128))])
def test_sinkhorn_kernel_matches_reference(b, k, eps, n_iters, blocks):
    mod = importlib.import_module("kernels.sinkhorn")
    torch.manual_seed(b * k)
    scores = _unit(b, 16) @ _unit(k, 16).t()
    out = mod._sinkhorn_triton(scores, eps, n_iters, *blocks)
    ref = mod.sinkhorn_reference(scores.double(), eps, n_iters)
    assert _err(out, ref) < 1e-5
    assert torch.allclose(out.sum(1), torch.ones(b), atol=1e-5)


@cases
def test_sinkhorn_public_half_and_extreme_scores():
    import kernels
    mod = importlib.import_module("kernels.sinkhorn")
    torch.manual_seed(3)
    scores = (_unit(20, 8) @ _unit(50, 8).t()).half()
    out = kernels.sinkhorn(scores, 0.05, 3)
    assert out.dtype == torch.float32
    assert _err(out, mod.sinkhorn_reference(scores.double(), 0.05, 3)) < 1e-5
    extreme = 5 * torch.randn(6, 9)  # exp(x / eps) up to e^300: overflows fp32 without the max shift
    out = kernels.sinkhorn(extreme, 0.05, 3)
    assert torch.isfinite(out).all() and torch.allclose(out.sum(1), torch.ones(6), atol=1e-5)
    assert _err(out, mod.sinkhorn_reference(extreme.double(), 0.05, 3)) < 1e-5


def _dist_worker(rank, world, init_file, scores, result_dir):
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    mod = importlib.import_module("kernels.sinkhorn")
    part = scores.chunk(world)[rank]
    torch.save({"ref": mod.sinkhorn_reference(part, 0.05, 3), "kernel": mod._sinkhorn_triton(part, 0.05, 3, 16, 16)},
               f"{result_dir}/{rank}.pt")
    dist.destroy_process_group()


@cases
def test_sinkhorn_distributed_equals_single_process(tmp_path):
    import torch.multiprocessing as mp
    mod = importlib.import_module("kernels.sinkhorn")
    torch.manual_seed(4)
    scores = _unit(12, 8) @ _unit(20, 8).t()
    mp.spawn(_dist_worker, args=(2, str(tmp_path / "init"), scores, str(tmp_path)), nprocs=2)
    full = mod.sinkhorn_reference(scores, 0.05, 3)
    for key in ("ref", "kernel"):
        got = torch.cat([torch.load(tmp_path / f"{r}.pt")[key] for r in range(2)])
        assert _err(got, full) < 1e-6, key
