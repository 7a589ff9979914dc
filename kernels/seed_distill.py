"""Fused SEED distillation loss over a queue, without materialising the two ``B x (1+K)`` logit matrices.

Fang et al., "SEED: Self-supervised Distillation for Visual Representation", ICLR 2021 (eq. 4-6): for
student embeddings ``s`` (B, D), teacher embeddings ``t`` (B, D) of the same images and a queue of
earlier teacher embeddings (K, D), row b compares the 1 + K entries ``x = [t_b, queue]``: the student's
``log_softmax(s_b . x / T_s)`` against the teacher's target ``softmax(t_b . x / T_t)``, and
``loss = mean_b sum_j -p_t,bj log p_s,bj``. Only ``s`` gets a gradient (the teacher is frozen).

Why one pass suffices: with ``z_s = s_b . x / T_s``, ``p_s = softmax(z_s)``, ``p_t = softmax(t_b . x / T_t)``,
``loss_b = LSE(z_s) - sum_j p_t,j z_s,j`` and ``dloss_b/ds_b = (O_s - O_t) / T_s`` with
``O_s = sum_j p_s,j x_j`` and ``O_t = sum_j p_t,j x_j``. So the forward keeps, per row, a running max and
sum for each of the two softmaxes, the teacher-weighted sum of student logits (the cross term) and the
two weighted sums of queue rows, all rescaled when a running max moves (flash-attention style, twice,
with keys = values = queue). The backward is an ``O(B * D)`` scaling. SEED's teacher temperature is
1e-4, so teacher logits reach ~1e4: they are fp32 and the max is a running one, never a fixed offset.

Layout of this file: reference -> chunked PyTorch path (same algorithm, CPU friendly) -> Triton kernels
(split over the queue, then a merge) -> launch configs and launcher -> autograd.Function -> public function ->
``CASE`` (the table tests, the benchmark and the AOT check read).
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

from kernels._case import DTYPE_BYTES, TRITON_PTR, Cost, KernelCase, KernelInputs, Launch, make_signature, unit_rows
from kernels._triton_utils import (
    BLOCK_D_CLASSES,
    COMPUTE_TYPES,
    HAS_TRITON,
    LOG2E,
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

Stats = tuple[torch.Tensor, Optional[torch.Tensor]]


def _check(s: torch.Tensor, t: torch.Tensor, queue: torch.Tensor, student_temperature: float,
           teacher_temperature: float) -> None:
    if s.dim() != 2 or t.shape != s.shape:
        raise ValueError(f"s and t must both be (B, D); got {tuple(s.shape)} and {tuple(t.shape)}")
    if queue.dim() != 2 or queue.shape[1] != s.shape[1]:
        raise ValueError(f"queue must be (K, D) with D={s.shape[1]}; got {tuple(queue.shape)}")
    if not (student_temperature > 0 and teacher_temperature > 0):
        raise ValueError(f"temperatures must be > 0; got student {student_temperature}, "
                         f"teacher {teacher_temperature}")


def _acc_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """fp32 for fp32/bf16/fp16 inputs, fp64 when any input is fp64."""
    dt = torch.float32
    for x in tensors:
        dt = torch.promote_types(dt, x.dtype)
    return dt


def seed_distill_reference(s: torch.Tensor, t: torch.Tensor, queue: torch.Tensor, student_temperature: float,
                           teacher_temperature: float) -> torch.Tensor:
    """Eager SEED loss: builds both (B, 1+K) logit matrices, then a soft-target cross-entropy.

    Args:
        s: (B, D) student embeddings; t: (B, D) teacher embeddings (detached); queue: (K, D) (detached).
        student_temperature, teacher_temperature: T_s, T_t > 0 (SEED: 0.2 and 1e-4).
    Returns:
        scalar mean over B, in fp32 (fp64 for fp64 inputs). All math runs in that dtype, whatever the
        input dtype, because T_t = 1e-4 leaves no room for half-precision teacher logits.
    """
    _check(s, t, queue, student_temperature, teacher_temperature)
    dt = _acc_dtype(s, t, queue)
    s, t, queue = s.to(dt), t.detach().to(dt), queue.detach().to(dt)
    keys = queue.t()
    z_student = torch.cat([torch.einsum("bd,bd->b", s, t)[:, None], s @ keys], dim=1) / student_temperature
    z_teacher = torch.cat([torch.einsum("bd,bd->b", t, t)[:, None], t @ keys], dim=1) / teacher_temperature
    target = torch.softmax(z_teacher, dim=1)
    per_row = -torch.sum(target * torch.log_softmax(z_student, dim=1), dim=1)
    return per_row.mean()


def _online_exp_(z: torch.Tensor, m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One block of an online softmax: (new running max, factor for the old sums, ``exp(z - new max)``).

    ``z`` (B, C) is overwritten by the exponentials. Subtracting maxima (not log-sum-exps) keeps the
    rescaling exact for near-equal logits of ~1e4, which SEED's teacher produces.
    """
    m_new = torch.maximum(m, z.amax(1))
    return m_new, torch.exp(m - m_new), z.sub_(m_new[:, None]).exp_()


def _stats_chunked(s: torch.Tensor, t: torch.Tensor, queue: torch.Tensor, student_temperature: float,
                   teacher_temperature: float, need_grad: bool, chunk: int | None = None) -> Stats:
    """PyTorch version of the kernels' algorithm: per-row loss and the unscaled student gradient.

    Walks the queue in chunks of ``chunk`` rows (default: 4M logits per chunk), so memory is
    O(B * chunk), keeping the same running maxima, sums and weighted row sums as the kernels.
    Returns (loss_rows (B,), gs (B, D)) with ``gs = d(sum of loss_rows)/ds`` (None without ``need_grad``),
    in fp32 (fp64 for fp64 inputs). Similarities run in that dtype too, as in the reference.
    """
    dt = _acc_dtype(s, t, queue)
    chunk = chunk or max(1024, (1 << 22) // max(1, s.shape[0]))
    sf, tf = s.to(dt), t.to(dt)
    s_scaled, t_scaled = sf / student_temperature, tf / teacher_temperature  # fold 1/T into the small operand
    # Entry 0 is t_b itself: each sum starts with its term, exp(0) = 1 relative to the max.
    m_s = (s_scaled * tf).sum(1)
    m_t = (t_scaled * tf).sum(1)
    cross = m_s.clone()  # sum_j exp(z_t,j - m_t) z_s,j
    l_s, l_t = torch.ones_like(m_s), torch.ones_like(m_t)
    o_s = tf.clone() if need_grad else None
    o_t = tf.clone() if need_grad else None
    for start in range(0, queue.shape[0], chunk):
        v = queue[start:start + chunk].to(dt)
        z_s = s_scaled @ v.t()
        m_t, a_t, e_t = _online_exp_(t_scaled @ v.t(), m_t)
        l_t = l_t * a_t + e_t.sum(1)
        cross = cross * a_t + (e_t * z_s).sum(1)
        m_s, a_s, e_s = _online_exp_(z_s, m_s)  # z_s is not needed after this
        l_s = l_s * a_s + e_s.sum(1)
        if need_grad:
            o_t = o_t * a_t[:, None] + e_t @ v
            o_s = o_s * a_s[:, None] + e_s @ v
    gs = (o_s / l_s[:, None] - o_t / l_t[:, None]) / student_temperature if need_grad else None
    return m_s + torch.log(l_s) - cross / l_t, gs


if HAS_TRITON:

    @triton.jit
    def _row_block(ptr_a, ptr_b, stride_a, stride_b, pid, B, D, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr):
        # Rows [pid * BLOCK_B, ...) of two (B, D) row-major tensors, zero-padded, with their offsets and masks.
        offs_b = pid * BLOCK_B + tl.arange(0, BLOCK_B)
        offs_d = tl.arange(0, BLOCK_D)
        mask_b = offs_b < B
        mask_bd = mask_b[:, None] & (offs_d < D)[None, :]
        a = tl.load(ptr_a + offs_b[:, None] * stride_a + offs_d[None, :], mask=mask_bd, other=0.0)
        b = tl.load(ptr_b + offs_b[:, None] * stride_b + offs_d[None, :], mask=mask_bd, other=0.0)
        return a, b, offs_b, offs_d, mask_b, mask_bd

    @triton.jit
    def _online_rescale(m, m_other):
        # Merge two base-2 running maxima: new max and the factors that rescale each side's sums to it.
        m_new = tl.maximum(m, m_other)
        return m_new, tl.exp2(m - m_new), tl.exp2(m_other - m_new)

    @triton.jit
    def _seed_split_kernel(s_ptr, t_ptr, queue_ptr, st_ptr, o_ptr, B, K, D, blocks_per_split, part,
                           stride_sb, stride_tb, stride_kk, stride_kd, scale_s, scale_t,
                           WITH_GRAD: tl.constexpr, PRECISION: tl.constexpr,
                           BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
        # One program: BLOCK_B rows x one contiguous slice of the queue. Writes, per row, the slice's
        # student (max, sum), teacher (max, sum), teacher-weighted sum of student logits (all base 2,
        # relative to the slice's maxima) and, for the gradient, both exp-weighted sums of queue rows.
        pid_s = tl.program_id(1)
        s, t, offs_b, offs_d, mask_b, mask_bd = _row_block(s_ptr, t_ptr, stride_sb, stride_tb, tl.program_id(0), B, D,
                                                           BLOCK_B, BLOCK_D)
        k_lo = pid_s * blocks_per_split * BLOCK_K
        k_hi = tl.minimum(k_lo + blocks_per_split * BLOCK_K, K)
        m_s = tl.full([BLOCK_B], float("-inf"), tl.float32)
        m_t = tl.full([BLOCK_B], float("-inf"), tl.float32)
        l_s = tl.zeros([BLOCK_B], tl.float32)
        l_t = tl.zeros([BLOCK_B], tl.float32)
        cross = tl.zeros([BLOCK_B], tl.float32)
        acc_s = tl.zeros([BLOCK_B, BLOCK_D], tl.float32)
        acc_t = tl.zeros([BLOCK_B, BLOCK_D], tl.float32)
        for start in range(k_lo, k_hi, BLOCK_K):
            offs_k = start + tl.arange(0, BLOCK_K)
            mask_k = offs_k < k_hi
            v = tl.load(queue_ptr + offs_k[:, None] * stride_kk + offs_d[None, :] * stride_kd,
                        mask=mask_k[:, None] & (offs_d < D)[None, :], other=0.0).to(s.dtype)
            z_s = tl.dot(s, tl.trans(v), input_precision=PRECISION) * scale_s  # 0 in masked columns
            z_t = tl.dot(t, tl.trans(v), input_precision=PRECISION) * scale_t
            z_t = tl.where(mask_k[None, :], z_t, float("-inf"))
            m_t_new, a_t, _ = _online_rescale(m_t, tl.max(z_t, 1))
            p_t = tl.exp2(z_t - m_t_new[:, None])  # 0 in masked columns, where z_s is 0: no 0 * inf
            l_t = l_t * a_t + tl.sum(p_t, 1)
            cross = cross * a_t + tl.sum(p_t * z_s, 1)
            z_s = tl.where(mask_k[None, :], z_s, float("-inf"))
            m_s_new, a_s, _ = _online_rescale(m_s, tl.max(z_s, 1))
            p_s = tl.exp2(z_s - m_s_new[:, None])
            l_s = l_s * a_s + tl.sum(p_s, 1)
            if WITH_GRAD:
                acc_s = acc_s * a_s[:, None] + tl.dot(p_s.to(v.dtype), v, input_precision=PRECISION)
                acc_t = acc_t * a_t[:, None] + tl.dot(p_t.to(v.dtype), v, input_precision=PRECISION)
            m_s = m_s_new
            m_t = m_t_new
        row = pid_s * B + offs_b
        tl.store(st_ptr + row, m_s, mask=mask_b)
        tl.store(st_ptr + part + row, l_s, mask=mask_b)
        tl.store(st_ptr + 2 * part + row, m_t, mask=mask_b)
        tl.store(st_ptr + 3 * part + row, l_t, mask=mask_b)
        tl.store(st_ptr + 4 * part + row, cross, mask=mask_b)
        if WITH_GRAD:
            o_off = row[:, None] * D + offs_d[None, :]
            tl.store(o_ptr + o_off, acc_s, mask=mask_bd)
            tl.store(o_ptr + part * D + o_off, acc_t, mask=mask_bd)

    @triton.jit
    def _seed_merge_kernel(s_ptr, t_ptr, st_ptr, o_ptr, loss_ptr, gs_ptr, B, D, n_splits, part,
                           stride_sb, stride_tb, scale_s, scale_t, inv_ts,
                           WITH_GRAD: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr):
        # Start from entry 0 (x = t_b, a point mass in both softmaxes), fold in every slice's partials,
        # then write the per-row loss and the unscaled student gradient.
        s, t, offs_b, offs_d, mask_b, mask_bd = _row_block(s_ptr, t_ptr, stride_sb, stride_tb, tl.program_id(0), B, D,
                                                           BLOCK_B, BLOCK_D)
        sf = s.to(tl.float32)
        tf = t.to(tl.float32)
        m_s = tl.sum(sf * tf, 1) * scale_s
        m_t = tl.sum(tf * tf, 1) * scale_t
        cross = m_s
        l_s = tl.full([BLOCK_B], 1.0, tl.float32)
        l_t = tl.full([BLOCK_B], 1.0, tl.float32)
        acc_s = tf
        acc_t = tf
        for i in range(0, n_splits):
            row = i * B + offs_b
            ms = tl.load(st_ptr + row, mask=mask_b, other=float("-inf"))
            ls = tl.load(st_ptr + part + row, mask=mask_b, other=0.0)
            mt = tl.load(st_ptr + 2 * part + row, mask=mask_b, other=float("-inf"))
            lt = tl.load(st_ptr + 3 * part + row, mask=mask_b, other=0.0)
            ct = tl.load(st_ptr + 4 * part + row, mask=mask_b, other=0.0)
            m_s, a_s, b_s = _online_rescale(m_s, ms)
            m_t, a_t, b_t = _online_rescale(m_t, mt)
            l_s = l_s * a_s + ls * b_s
            l_t = l_t * a_t + lt * b_t
            cross = cross * a_t + ct * b_t
            if WITH_GRAD:
                o_off = row[:, None] * D + offs_d[None, :]
                o_s = tl.load(o_ptr + o_off, mask=mask_bd, other=0.0)
                o_t = tl.load(o_ptr + part * D + o_off, mask=mask_bd, other=0.0)
                acc_s = acc_s * a_s[:, None] + o_s * b_s[:, None]
                acc_t = acc_t * a_t[:, None] + o_t * b_t[:, None]
        loss = (m_s + tl.log2(l_s) - cross / l_t) * 0.6931471805599453
        tl.store(loss_ptr + offs_b, loss, mask=mask_b)
        if WITH_GRAD:
            gs = (acc_s / l_s[:, None] - acc_t / l_t[:, None]) * inv_ts
            tl.store(gs_ptr + offs_b[:, None] * D + offs_d[None, :], gs, mask=mask_bd)


# SEED's Triton path stops at D=256: at D=512 its two fp32 accumulators spill without TF32 even at the smallest
# tiles (16 x 16 x 512, 16 warps: 8 B on sm_80, 192 B on sm_90a); wider embeddings take the chunked path.
SEED_MAX_D = 256


def split_config(d: int, dtype: torch.dtype, precision: str, with_grad: bool, cc: int = 90) -> dict[str, int]:
    """Tiles, warps and stages of ``_seed_split_kernel`` (the launcher and the AOT table): two row tiles (s, t) and
    two fp32 accumulators (O_s, O_t) per program, twice InfoNCE's state, so
    :func:`kernels._triton_utils.dot_tile_config` with 2 accumulators (half the rows per program)."""
    return dot_tile_config(d, dtype, precision, accumulators=2)


def merge_config(d: int) -> dict[str, int]:
    """``_seed_merge_kernel`` holds six BLOCK_B x BLOCK_D fp32 tiles (s, t, O_s, O_t and one slice's two):
    1024 elements per tile over 4 warps is 8 values each (BLOCK_B 16 at D=64, 2 at 512)."""
    block_d = next_pow2(d, BLOCK_D_CLASSES[0])
    return dict(BLOCK_B=max(2, 1024 // block_d), BLOCK_D=block_d, num_warps=4, num_stages=1)


def _stats_triton(s: torch.Tensor, t: torch.Tensor, queue: torch.Tensor, student_temperature: float,
                  teacher_temperature: float, need_grad: bool, splits: int | None = None,
                  block_b: int | None = None, block_k: int | None = None) -> Stats:
    """Launch the split + merge kernels; same outputs as :func:`_stats_chunked` (fp32).

    ``splits`` (number of queue slices) defaults to enough programs for two waves over the GPU's SMs,
    capped so the fp32 partials (two (B, D) row sums per slice) stay under 8 MB. ``block_b`` / ``block_k``
    override :func:`split_config`. A queue in another dtype than the promoted inputs is cast once.
    """
    dt = torch.promote_types(torch.promote_types(s.dtype, t.dtype), queue.dtype)
    s, t, queue = s.to(dt).contiguous(), t.to(dt).contiguous(), queue.to(dt)
    B, D = s.shape
    K = queue.shape[0]
    precision = dot_precision(dt)
    cfg = split_config(D, dt, precision, need_grad, device_cc(s.device))
    cfg["BLOCK_B"], cfg["BLOCK_K"] = block_b or cfg["BLOCK_B"], block_k or cfg["BLOCK_K"]
    n_rb = triton.cdiv(B, cfg["BLOCK_B"])
    splits, per_split = split_plan(K, cfg["BLOCK_K"], n_rb, 2 * B * D * 4, s.device, splits)
    f32 = dict(device=s.device, dtype=torch.float32)
    st_part = torch.empty(5, splits, B, **f32)  # student max, sum; teacher max, sum; cross term
    o_part = torch.empty(2, splits, B, D, **f32) if need_grad else st_part  # O_s, O_t (unnormalised)
    scale_s, scale_t = LOG2E / student_temperature, LOG2E / teacher_temperature
    _seed_split_kernel[(n_rb, splits)](
        s, t, queue, st_part, o_part, B, K, D, per_split, splits * B, s.stride(0), t.stride(0), queue.stride(0),
        queue.stride(1), scale_s, scale_t, WITH_GRAD=need_grad, PRECISION=precision, **cfg)
    loss_rows = torch.empty(B, **f32)
    gs = torch.empty(B, D, **f32) if need_grad else None
    mcfg = merge_config(D)
    _seed_merge_kernel[(triton.cdiv(B, mcfg["BLOCK_B"]),)](
        s, t, st_part, o_part, loss_rows, gs if need_grad else loss_rows, B, D, splits, splits * B,
        s.stride(0), t.stride(0), scale_s, scale_t, 1.0 / student_temperature, WITH_GRAD=need_grad, **mcfg)
    return loss_rows, gs


class _SeedDistillFn(torch.autograd.Function):
    """Loss from a stats function; backward scales the stored student gradient (t and queue get none)."""

    @staticmethod
    def forward(ctx, s, t, queue, student_temperature, teacher_temperature, stats_fn: Callable[..., Stats]):
        need_grad = bool(ctx.needs_input_grad[0])
        loss_rows, gs = stats_fn(s, t, queue, student_temperature, teacher_temperature, need_grad)
        ctx.save_for_backward(gs)
        ctx.meta = (s.shape[0], s.dtype)
        return loss_rows.mean()

    @staticmethod
    def backward(ctx, g_loss):
        (gs,) = ctx.saved_tensors
        n, s_dtype = ctx.meta
        return (gs * (g_loss / n)).to(s_dtype), None, None, None, None, None


def seed_distill(s: torch.Tensor, t: torch.Tensor, queue: torch.Tensor, student_temperature: float,
                 teacher_temperature: float) -> torch.Tensor:
    """SEED's distillation loss over ``[t_b, queue]``, fused (Fang et al., ICLR 2021).

    Args:
        s: (B, D) student embeddings (the only input that gets a gradient); t: (B, D) teacher embeddings
            of the same images; queue: (K, D) earlier teacher embeddings. Expected L2-normalised, but any
            scale is numerically safe (fp32 logits, running maxima).
        student_temperature: T_s > 0 (SEED: 0.2); teacher_temperature: T_t > 0 (SEED: 1e-4).
    Returns:
        scalar fp32 loss ``mean_b sum_j -softmax(t_b x / T_t)_j log_softmax(s_b x / T_s)_j``, x = [t_b, queue].
    Runs the Triton kernels for CUDA tensors (unless ``SMALLSSL_TRITON=0`` or D > ``SEED_MAX_D`` = 256) and a chunked
    PyTorch path with the same algorithm otherwise; both keep O(B * D) memory for the backward.
    """
    _check(s, t, queue, student_temperature, teacher_temperature)
    if triton_enabled(s, t, queue) and s.shape[1] <= SEED_MAX_D:
        stats_fn = _stats_triton
    else:
        stats_fn = _stats_chunked
    return _SeedDistillFn.apply(s, t.detach(), queue.detach(), float(student_temperature),
                                float(teacher_temperature), stats_fn)


# ---------------------------------------------------------------- case table (tests, kernels.bench, kernels.aot)

def _launches(cc: int) -> list[Launch]:
    """Every (kernel, config) :func:`_stats_triton` can launch on compute capability ``cc``."""
    if not HAS_TRITON:
        return []
    out = []
    const = ("WITH_GRAD", "PRECISION", "BLOCK_B", "BLOCK_K", "BLOCK_D")
    widths = [w for w in BLOCK_D_CLASSES if w <= SEED_MAX_D]
    for dt, precision in COMPUTE_TYPES:
        for block_d in widths:
            for grad in (False, True):
                cfg = split_config(block_d, dt, precision, grad, cc)
                warps, stages = cfg.pop("num_warps"), cfg.pop("num_stages")
                sig = make_signature(_seed_split_kernel, dict(
                    s_ptr=TRITON_PTR[dt], t_ptr=TRITON_PTR[dt], queue_ptr=TRITON_PTR[dt], st_ptr="*fp32",
                    o_ptr="*fp32", scale_s="fp32", scale_t="fp32"), const)
                out.append(Launch(_seed_split_kernel, sig, dict(WITH_GRAD=grad, PRECISION=precision, **cfg), warps,
                                  stages, aligned=("s_ptr", "t_ptr", "queue_ptr", "st_ptr", "o_ptr", "D", "stride_sb",
                                                   "stride_tb", "stride_kk"), ones=("stride_kd",), heavy=True))
    for dt in (torch.float32, torch.bfloat16, torch.float16):
        for block_d in widths:
            for grad in (False, True):
                cfg = merge_config(block_d)
                warps, stages = cfg.pop("num_warps"), cfg.pop("num_stages")
                sig = make_signature(_seed_merge_kernel, dict(
                    s_ptr=TRITON_PTR[dt], t_ptr=TRITON_PTR[dt], st_ptr="*fp32", o_ptr="*fp32", loss_ptr="*fp32",
                    gs_ptr="*fp32", scale_s="fp32", scale_t="fp32", inv_ts="fp32"), ("WITH_GRAD", "BLOCK_B", "BLOCK_D"))
                out.append(Launch(_seed_merge_kernel, sig, dict(WITH_GRAD=grad, **cfg), warps, stages,
                                  aligned=("s_ptr", "t_ptr", "st_ptr", "o_ptr", "gs_ptr", "D", "stride_sb",
                                           "stride_tb")))
    return out


_TEMPS = (0.2, 1e-4)  # SEED's student and teacher temperatures


def _make_inputs(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device,
                 generator: torch.Generator) -> KernelInputs:
    b, d, k = shape
    s, t = unit_rows(b, d, dtype, device, generator), unit_rows(b, d, dtype, device, generator)
    queue = unit_rows(k, d, dtype, device, generator)
    s.requires_grad_()
    return KernelInputs((s, t, queue, *_TEMPS), grad=(s,))


def _cost(shape: tuple[int, ...], dtype: torch.dtype) -> Cost:
    """Forward + backward: student and teacher logits (2 x 2 B K D) and both weighted row sums (2 x 2 B K D),
    two exps per entry; the split kernel reads the queue once per BLOCK_B-row block and writes 5 + 2 D fp32
    partials per row and slice (H100's 132 SMs)."""
    b, d, k = shape
    s = DTYPE_BYTES[dtype]
    cfg = split_config(d, dtype, dot_precision(dtype), True)
    n_rb = -(-b // cfg["BLOCK_B"])
    splits, _ = split_plan(k, cfg["BLOCK_K"], n_rb, 2 * b * d * 4, torch.device("cpu"), sms=132)
    partials = splits * b * (5 + 2 * d) * 4
    kernel = n_rb * k * d * s + 4 * b * d * s + 2 * partials + b * d * 4 * 2 + b * d * s
    return Cost(min_bytes=(3 * b * d + k * d) * s, kernel_bytes=kernel, dot_flops=8.0 * b * k * d,
                exps=2.0 * b * k)


CASE = KernelCase(
    name="seed_distill",
    make_inputs=_make_inputs,
    reference=seed_distill_reference,
    impls={"chunked": lambda s, t, queue, ts, tt: _SeedDistillFn.apply(s, t, queue, ts, tt, _stats_chunked),
           "triton": lambda s, t, queue, ts, tt: _SeedDistillFn.apply(s, t, queue, ts, tt, _stats_triton)},
    has_backward=True,
    full_shapes=[(256, 128, 65536)],
    quick_shapes=[(256, 128, 16384)],
    tiny_shapes=[(5, 16, 70), (19, 20, 200)],
    eager_bytes=lambda shape: 8 * shape[0] * (shape[2] + 1) * 4,
    shape_str=lambda shape: "B={} D={} K={}".format(*shape),
    cost=_cost,
    launches=_launches,
)
