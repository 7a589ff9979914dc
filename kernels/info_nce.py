"""Fused InfoNCE with a negative queue (MoCo), without materialising the ``B x (1+K)`` logits.

He et al., "Momentum Contrast for Unsupervised Visual Representation Learning", CVPR 2020: for queries
``q`` (B, D), positive keys ``k`` (B, D) and a queue of negatives (K, D) the logits of row i are
``[q_i . k_i, q_i . queue^T] / T`` and the loss is cross-entropy with the positive at index 0.

Why one pass suffices: with ``p`` the softmax over ``[k_i, queue]`` and ``O_i = sum_j p_ij queue_j``,
``loss_i = LSE_i - q_i . k_i / T``, ``dL/dq_i = (O_i - (1 - p_pos_i) k_i) / T`` and
``dL/dk_i = (p_pos_i - 1) q_i / T``. The forward therefore keeps, per query, a running max, sum and
weighted sum of queue rows (flash-attention style, keys = values = queue) and the backward is an
``O(B * D)`` epilogue: nothing is recomputed and no logits are stored.

Layout of this file: reference -> chunked PyTorch path (same algorithm, CPU friendly) -> Triton kernels
(split over the queue so that B=256 fills a GPU, then a merge) -> launch configs and launcher ->
autograd.Function -> public function -> ``CASE`` (the table tests, the benchmark and the AOT check read).
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F

from kernels._case import DTYPE_BYTES, TRITON_PTR, Cost, KernelCase, KernelInputs, Launch, make_signature, unit_rows
from kernels._triton_utils import (
    BLOCK_D_CLASSES,
    COMPUTE_TYPES,
    HAS_TRITON,
    LOG2E,
    MAX_D,
    device_cc,
    dot_precision,
    dot_tile_config,
    next_pow2,
    split_plan,
    triton,
    triton_enabled,
)

if HAS_TRITON:
    import triton.language as tl

Stats = tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]


def _check(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, temperature: float) -> None:
    if q.dim() != 2 or k.shape != q.shape:
        raise ValueError(f"q and k must both be (B, D); got {tuple(q.shape)} and {tuple(k.shape)}")
    if queue.dim() != 2 or queue.shape[1] != q.shape[1]:
        raise ValueError(f"queue must be (K, D) with D={q.shape[1]}; got {tuple(queue.shape)}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0; got {temperature}")


def info_nce_reference(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, temperature: float,
                       return_logits: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Eager MoCo loss, as in facebookresearch/moco ``builder.py`` (materialises the logits).

    Args:
        q: (B, D) queries, k: (B, D) positive keys, queue: (K, D) negatives (expected L2-normalised).
        temperature: softmax temperature T (MoCo v1 0.07, v2 0.2).
        return_logits: also return the fp32 logits (B, 1+K) (positive in column 0).
    Returns:
        scalar mean cross-entropy (fp32); with ``return_logits`` a tuple (loss, logits).
    The similarities run in the input dtype (as eager MoCo under autocast), the cross-entropy in fp32.
    """
    _check(q, k, queue, temperature)
    l_pos = torch.einsum("nc,nc->n", q, k).unsqueeze(-1)  # positive logits: Bx1
    l_neg = torch.einsum("nc,kc->nk", q, queue.to(q.dtype))  # negative logits: BxK
    logits = torch.cat([l_pos, l_neg], dim=1)  # Bx(1+K)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32)) / temperature
    labels = torch.zeros(q.shape[0], dtype=torch.long, device=q.device)
    loss = F.cross_entropy(logits, labels)
    return (loss, logits) if return_logits else loss


def _stats_chunked(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, temperature: float,
                   need_grad: bool, chunk: int | None = None) -> Stats:
    """PyTorch version of the kernel's algorithm: per-row loss, top-1 hit, and the unscaled gradients.

    Walks the queue in chunks of ``chunk`` rows with an online log-sum-exp, so memory is
    O(B * chunk) instead of O(B * K) (default: 4M logits per chunk).
    Returns (loss_rows (B,), correct (B,) bool, gq (B, D), gk (B, D));
    the gradients are d(sum of loss_rows)/dq and /dk in fp32, or None without ``need_grad``.
    """
    dt = torch.promote_types(q.dtype, queue.dtype)
    acc_dt = torch.promote_types(dt, torch.float32)  # fp32 accumulation (fp64 stays fp64)
    inv_t = 1.0 / temperature
    chunk = chunk or max(1024, (1 << 22) // max(1, q.shape[0]))
    qs = q.to(dt) * inv_t  # fold 1/T into the small operand
    qf, kf = q.to(acc_dt), k.to(acc_dt)
    pos = (qf * kf).sum(1) * inv_t  # (B,)
    lse, neg_max = pos.clone(), torch.full_like(pos, float("-inf"))  # the positive alone: LSE = pos
    acc = torch.zeros_like(qf) if need_grad else None  # softmax-weighted sum of queue rows so far
    for start in range(0, queue.shape[0], chunk):
        v = queue[start:start + chunk].to(dt)
        s = (qs @ v.t()).to(acc_dt)  # B x chunk logits
        neg_max = torch.maximum(neg_max, s.amax(1))
        # log_softmax is one fused pass on CPU (logsumexp is several); read the LSE off column 0.
        ls = torch.log_softmax(s, dim=1)
        lse_c = s[:, 0] - ls[:, 0]
        lse_new = torch.logaddexp(lse, lse_c)
        if need_grad:
            o_c = ls.exp_() @ v.to(acc_dt)  # chunk-local softmax, merged below by LSE weights
            acc = acc * torch.exp(lse - lse_new)[:, None] + o_c * torch.exp(lse_c - lse_new)[:, None]
        lse = lse_new
    loss_rows = lse - pos
    gq = gk = None
    if need_grad:
        p_pos = torch.exp(pos - lse)
        gq = (acc - (1.0 - p_pos)[:, None] * kf) * inv_t
        gk = (p_pos - 1.0)[:, None] * qf * inv_t
    return loss_rows, pos >= neg_max, gq, gk


if HAS_TRITON:

    @triton.jit
    def _info_nce_split_kernel(q_ptr, queue_ptr, m_ptr, l_ptr, o_ptr, B, K, D, blocks_per_split,
                               stride_qb, stride_kk, stride_kd, scale,
                               WITH_GRAD: tl.constexpr, PRECISION: tl.constexpr,
                               BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
        # One program: BLOCK_B queries x one contiguous slice of the queue. Writes the slice's running
        # max / sum (base 2) and, for the gradient, the exp-weighted sum of queue rows.
        pid_b = tl.program_id(0)
        pid_s = tl.program_id(1)
        offs_b = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
        offs_d = tl.arange(0, BLOCK_D)
        mask_b = offs_b < B
        mask_d = offs_d < D
        q = tl.load(q_ptr + offs_b[:, None] * stride_qb + offs_d[None, :],
                    mask=mask_b[:, None] & mask_d[None, :], other=0.0)
        k_lo = pid_s * blocks_per_split * BLOCK_K
        k_hi = tl.minimum(k_lo + blocks_per_split * BLOCK_K, K)
        m = tl.full([BLOCK_B], float("-inf"), tl.float32)
        l = tl.zeros([BLOCK_B], tl.float32)
        acc = tl.zeros([BLOCK_B, BLOCK_D], tl.float32)
        for start in range(k_lo, k_hi, BLOCK_K):
            offs_k = start + tl.arange(0, BLOCK_K)
            mask_k = offs_k < k_hi
            v = tl.load(queue_ptr + offs_k[:, None] * stride_kk + offs_d[None, :] * stride_kd,
                        mask=mask_k[:, None] & mask_d[None, :], other=0.0).to(q.dtype)
            s = tl.dot(q, tl.trans(v), input_precision=PRECISION) * scale  # logits * log2(e), fp32
            s = tl.where(mask_k[None, :], s, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, 1))
            alpha = tl.exp2(m - m_new)
            p = tl.exp2(s - m_new[:, None])
            l = l * alpha + tl.sum(p, 1)
            if WITH_GRAD:
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
            m = m_new
        row = pid_s * B + offs_b
        tl.store(m_ptr + row, m, mask=mask_b)
        tl.store(l_ptr + row, l, mask=mask_b)
        if WITH_GRAD:
            tl.store(o_ptr + row[:, None] * D + offs_d[None, :], acc, mask=mask_b[:, None] & mask_d[None, :])

    @triton.jit
    def _info_nce_merge_kernel(q_ptr, k_ptr, m_ptr, l_ptr, o_ptr, loss_ptr, hit_ptr, gq_ptr, gk_ptr,
                               B, D, n_splits, stride_qb, stride_kb, scale, inv_t,
                               WITH_GRAD: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr):
        # Merge the per-slice partials with the positive logit; emit loss, top-1 hit and gradients.
        pid = tl.program_id(0)
        offs_b = pid * BLOCK_B + tl.arange(0, BLOCK_B)
        offs_d = tl.arange(0, BLOCK_D)
        mask_b = offs_b < B
        mask_bd = mask_b[:, None] & (offs_d < D)[None, :]
        qf = tl.load(q_ptr + offs_b[:, None] * stride_qb + offs_d[None, :], mask=mask_bd, other=0.0).to(tl.float32)
        kf = tl.load(k_ptr + offs_b[:, None] * stride_kb + offs_d[None, :], mask=mask_bd, other=0.0).to(tl.float32)
        pos = tl.sum(qf * kf, 1) * scale
        m = pos
        l = tl.full([BLOCK_B], 1.0, tl.float32)
        neg = tl.full([BLOCK_B], float("-inf"), tl.float32)
        acc = tl.zeros([BLOCK_B, BLOCK_D], tl.float32)
        for s in range(0, n_splits):
            row = s * B + offs_b
            ms = tl.load(m_ptr + row, mask=mask_b, other=float("-inf"))
            ls = tl.load(l_ptr + row, mask=mask_b, other=0.0)
            neg = tl.maximum(neg, ms)
            m_new = tl.maximum(m, ms)
            a = tl.exp2(m - m_new)
            b = tl.exp2(ms - m_new)
            l = l * a + ls * b
            if WITH_GRAD:
                o = tl.load(o_ptr + row[:, None] * D + offs_d[None, :], mask=mask_bd, other=0.0)
                acc = acc * a[:, None] + o * b[:, None]
            m = m_new
        lse2 = m + tl.log2(l)
        tl.store(loss_ptr + offs_b, (lse2 - pos) * 0.6931471805599453, mask=mask_b)
        tl.store(hit_ptr + offs_b, (pos >= neg).to(tl.int8), mask=mask_b)
        if WITH_GRAD:
            p_pos = tl.exp2(pos - lse2)
            gq = (acc / l[:, None] - (1.0 - p_pos)[:, None] * kf) * inv_t
            gk = (p_pos - 1.0)[:, None] * qf * inv_t
            tl.store(gq_ptr + offs_b[:, None] * D + offs_d[None, :], gq, mask=mask_bd)
            tl.store(gk_ptr + offs_b[:, None] * D + offs_d[None, :], gk, mask=mask_bd)


def split_config(d: int, dtype: torch.dtype, precision: str, with_grad: bool, cc: int = 90) -> dict[str, int]:
    """Tiles, warps and stages of ``_info_nce_split_kernel`` for feature size ``d`` (the launcher and the AOT
    table): one (BLOCK_B, BLOCK_D) accumulator, :func:`kernels._triton_utils.dot_tile_config` explains the
    numbers. The loss-only variant takes the same tiles (fewer registers: no accumulator); ``cc`` is accepted so
    that a target-specific choice has one place to go, and both targets take the same tiles today."""
    return dot_tile_config(d, dtype, precision, accumulators=1)


def merge_config(d: int) -> dict[str, int]:
    """``_info_nce_merge_kernel``: holds q, k, the accumulated O and one slice's O (four BLOCK_B x BLOCK_D fp32
    tiles); 2048 elements per tile over 4 warps is 16 values each, 64 in all (BLOCK_B 32 at D=64, 4 at 512)."""
    block_d = next_pow2(d, BLOCK_D_CLASSES[0])
    return dict(BLOCK_B=max(4, 2048 // block_d), BLOCK_D=block_d, num_warps=4, num_stages=1)


def _stats_triton(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, temperature: float, need_grad: bool,
                  splits: int | None = None, block_b: int | None = None,
                  block_k: int | None = None) -> Stats:
    """Launch the split + merge kernels; same outputs as :func:`_stats_chunked`.

    ``splits`` (number of queue slices) defaults to enough programs for two waves over the GPU's SMs,
    capped so the fp32 partials stay under 8 MB. ``block_b`` / ``block_k`` override :func:`split_config`
    (tests use small tiles). A queue in another dtype than the promoted inputs is cast once (a K x D copy), so
    that the kernels see one element type: keep the queue in the embeddings' dtype to avoid it.
    """
    dt = torch.promote_types(torch.promote_types(q.dtype, k.dtype), queue.dtype)
    q, k, queue = q.to(dt).contiguous(), k.to(dt).contiguous(), queue.to(dt)
    B, D = q.shape
    K = queue.shape[0]
    precision = dot_precision(dt)
    cfg = split_config(D, dt, precision, need_grad, device_cc(q.device))
    if block_b is not None:
        cfg["BLOCK_B"] = block_b
    if block_k is not None:
        cfg["BLOCK_K"] = block_k
    n_rb = triton.cdiv(B, cfg["BLOCK_B"])
    splits, per_split = split_plan(K, cfg["BLOCK_K"], n_rb, B * D * 4, q.device, splits)
    f32 = dict(device=q.device, dtype=torch.float32)
    m_part = torch.empty(splits, B, **f32)
    l_part = torch.empty(splits, B, **f32)
    o_part = torch.empty(splits, B, D, **f32) if need_grad else m_part
    scale = LOG2E / temperature
    _info_nce_split_kernel[(n_rb, splits)](
        q, queue, m_part, l_part, o_part, B, K, D, per_split, q.stride(0), queue.stride(0), queue.stride(1),
        scale, WITH_GRAD=need_grad, PRECISION=precision, **cfg)
    loss_rows = torch.empty(B, **f32)
    hit = torch.empty(B, device=q.device, dtype=torch.int8)
    gq = torch.empty(B, D, **f32) if need_grad else None
    gk = torch.empty(B, D, **f32) if need_grad else None
    mcfg = merge_config(D)
    _info_nce_merge_kernel[(triton.cdiv(B, mcfg["BLOCK_B"]),)](
        q, k, m_part, l_part, o_part, loss_rows, hit, gq if need_grad else loss_rows,
        gk if need_grad else loss_rows, B, D, splits, q.stride(0), k.stride(0), scale, 1.0 / temperature,
        WITH_GRAD=need_grad, **mcfg)
    return loss_rows, hit.bool(), gq, gk


class _InfoNCEFn(torch.autograd.Function):
    """Loss and top-1 accuracy from a stats function; backward scales the stored gradients."""

    @staticmethod
    def forward(ctx, q, k, queue, temperature, stats_fn: Callable[..., Stats]):
        need_grad = bool(ctx.needs_input_grad[0] or ctx.needs_input_grad[1])
        loss_rows, hit, gq, gk = stats_fn(q, k, queue, temperature, need_grad)
        ctx.save_for_backward(gq, gk)
        ctx.meta = (q.shape[0], q.dtype, k.dtype)
        acc1 = hit.float().mean() * 100.0
        ctx.mark_non_differentiable(acc1)
        return loss_rows.mean(), acc1

    @staticmethod
    def backward(ctx, g_loss, g_acc):
        gq, gk = ctx.saved_tensors
        n, q_dtype, k_dtype = ctx.meta
        scale = g_loss / n
        dq = (gq * scale).to(q_dtype) if ctx.needs_input_grad[0] else None
        dk = (gk * scale).to(k_dtype) if ctx.needs_input_grad[1] else None
        return dq, dk, None, None, None


def info_nce(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, temperature: float, *,
             return_accuracy: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """MoCo's InfoNCE loss with a queue of negatives, fused (He et al., CVPR 2020).

    Args:
        q: (B, D) queries; k: (B, D) positive keys; queue: (K, D) negatives, no gradient. Inputs are
            expected L2-normalised, but any scale is numerically safe (running max in fp32).
        temperature: T > 0.
        return_accuracy: also return the pretext top-1 accuracy in percent (MoCo's ``acc1``: the
            positive logit is the largest), computed in the same pass at no extra cost.
    Returns:
        scalar fp32 loss (mean over B), or (loss, acc1) with ``return_accuracy``.
    Runs the Triton kernels for CUDA tensors (unless ``SMALLSSL_TRITON=0`` or D > ``MAX_D`` = 512) and a chunked
    PyTorch path with the same algorithm otherwise; both keep O(B * D) memory for the backward.
    """
    _check(q, k, queue, temperature)
    if triton_enabled(q, k, queue) and q.shape[1] <= MAX_D:
        stats_fn = _stats_triton
    else:
        stats_fn = _stats_chunked
    loss, acc1 = _InfoNCEFn.apply(q, k, queue, float(temperature), stats_fn)
    return (loss, acc1) if return_accuracy else loss


# ---------------------------------------------------------------- case table (tests, kernels.bench, kernels.aot)

def _launches(cc: int) -> list[Launch]:
    """Every (kernel, config) :func:`_stats_triton` can launch on compute capability ``cc``."""
    if not HAS_TRITON:
        return []
    out = []
    const = ("WITH_GRAD", "PRECISION", "BLOCK_B", "BLOCK_K", "BLOCK_D")
    for dt, precision in COMPUTE_TYPES:
        for block_d in BLOCK_D_CLASSES:
            for grad in (False, True):
                cfg = split_config(block_d, dt, precision, grad, cc)
                warps, stages = cfg.pop("num_warps"), cfg.pop("num_stages")
                sig = make_signature(_info_nce_split_kernel, dict(
                    q_ptr=TRITON_PTR[dt], queue_ptr=TRITON_PTR[dt], m_ptr="*fp32", l_ptr="*fp32", o_ptr="*fp32",
                    scale="fp32"), const)
                out.append(Launch(_info_nce_split_kernel, sig, dict(WITH_GRAD=grad, PRECISION=precision, **cfg),
                                  warps, stages, aligned=("q_ptr", "queue_ptr", "m_ptr", "l_ptr", "o_ptr", "D",
                                                          "stride_qb", "stride_kk"), ones=("stride_kd",), heavy=True))
    for dt in (torch.float32, torch.bfloat16, torch.float16):
        for block_d in BLOCK_D_CLASSES:
            for grad in (False, True):
                cfg = merge_config(block_d)
                warps, stages = cfg.pop("num_warps"), cfg.pop("num_stages")
                sig = make_signature(_info_nce_merge_kernel, dict(
                    q_ptr=TRITON_PTR[dt], k_ptr=TRITON_PTR[dt], m_ptr="*fp32", l_ptr="*fp32", o_ptr="*fp32",
                    loss_ptr="*fp32", hit_ptr="*i8", gq_ptr="*fp32", gk_ptr="*fp32", scale="fp32", inv_t="fp32"),
                    ("WITH_GRAD", "BLOCK_B", "BLOCK_D"))
                out.append(Launch(_info_nce_merge_kernel, sig, dict(WITH_GRAD=grad, **cfg), warps, stages,
                                  aligned=("q_ptr", "k_ptr", "m_ptr", "l_ptr", "o_ptr", "gq_ptr", "gk_ptr", "D",
                                           "stride_qb", "stride_kb")))
    return out


def _make_inputs(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device,
                 generator: torch.Generator) -> KernelInputs:
    b, d, k = shape
    q, key = unit_rows(b, d, dtype, device, generator), unit_rows(b, d, dtype, device, generator)
    queue = unit_rows(k, d, dtype, device, generator)
    q.requires_grad_()
    key.requires_grad_()
    return KernelInputs((q, key, queue, 0.2), grad=(q, key))


def _cost(shape: tuple[int, ...], dtype: torch.dtype) -> Cost:
    """Forward + backward. The split kernel reads the queue once per BLOCK_B-row block and writes (D + 2) fp32
    partials per row and slice (H100's 132 SMs); the merge reads them and writes fp32 gradients, which the
    backward scales into the input dtype."""
    b, d, k = shape
    s = DTYPE_BYTES[dtype]
    cfg = split_config(d, dtype, dot_precision(dtype), True)
    n_rb = -(-b // cfg["BLOCK_B"])
    splits, _ = split_plan(k, cfg["BLOCK_K"], n_rb, b * d * 4, torch.device("cpu"), sms=132)
    partials = splits * b * (d + 2) * 4
    kernel = n_rb * k * d * s + 2 * b * d * s + 2 * partials + 2 * b * d * 4 * 2 + 2 * b * d * s
    return Cost(min_bytes=(4 * b * d + k * d) * s, kernel_bytes=kernel, dot_flops=4.0 * b * k * d, exps=float(b * k))


CASE = KernelCase(
    name="info_nce",
    make_inputs=_make_inputs,
    reference=info_nce_reference,
    impls={"chunked": lambda q, k, queue, t: _InfoNCEFn.apply(q, k, queue, t, _stats_chunked)[0],
           "triton": lambda q, k, queue, t: _InfoNCEFn.apply(q, k, queue, t, _stats_triton)[0]},
    has_backward=True,
    full_shapes=[(256, 128, 65536), (1024, 128, 16384)],
    quick_shapes=[(256, 128, 16384)],
    tiny_shapes=[(5, 16, 70), (19, 20, 200)],
    eager_bytes=lambda shape: 5 * shape[0] * (shape[2] + 1) * 4,
    shape_str=lambda shape: "B={} D={} K={}".format(*shape),
    cost=_cost,
    launches=_launches,
)
