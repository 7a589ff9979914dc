"""Fused NT-Xent (SimCLR) loss with memory O(N * D): the ``2N x 2N`` similarity matrix is never stored.

Chen et al., "A Simple Framework for Contrastive Learning of Visual Representations", ICML 2020.
With ``z = cat(z1, z2)`` (M = 2N rows), ``s_ij = z_i . z_j / T``, the positive of row i is row
``i + N mod M`` and self-similarity is excluded:
``loss = mean_i [ LSE_{j != i}(s_ij) - s_{i, pos(i)} ]``.

Gradient: with ``P_ij = exp(s_ij - LSE_i)`` (zero on the diagonal),
``dL/dz_i = (sum_j (P_ij + P_ji) z_j - 2 z_pos(i)) / (M T)``. The forward keeps only the per-row LSE
(online, one pass); the backward recomputes the similarity tiles once and needs both row and column
LSEs, so it is a second pass. Memory is O(M * D) in both.

Layout: reference -> chunked PyTorch path -> Triton kernels -> launch configs and launchers -> autograd.Function
-> public function -> ``CASE`` (the table tests, the benchmark and the AOT check read).
"""

from __future__ import annotations

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
    triton,
    triton_enabled,
)

if HAS_TRITON:
    import triton.language as tl


def _check(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> None:
    if z1.dim() != 2 or z2.shape != z1.shape or z1.shape[0] < 1:
        raise ValueError(f"z1 and z2 must both be (N, D) with N >= 1; got {tuple(z1.shape)} and {tuple(z2.shape)}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0; got {temperature}")


def _partner(m: int, device: torch.device) -> torch.Tensor:
    n = m // 2
    return (torch.arange(m, device=device) + n) % m


def nt_xent_reference(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """Eager NT-Xent: builds the (2N, 2N) logits, masks the diagonal, cross-entropy against the partner view.

    Args:
        z1, z2: (N, D) projections of the two views (expected L2-normalised; not normalised here).
        temperature: T > 0 (SimCLR uses 0.1-0.5).
    Returns: scalar fp32 loss, mean over the 2N rows. Similarities in the input dtype, softmax in fp32.
    """
    _check(z1, z2, temperature)
    z = torch.cat([z1, z2], dim=0)  # M x D
    logits = z @ z.t()  # M x M
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32)) / temperature
    eye = torch.eye(z.shape[0], dtype=torch.bool, device=z.device)
    logits = logits.masked_fill(eye, float("-inf"))
    return F.cross_entropy(logits, _partner(z.shape[0], z.device))


def _fwd_chunked(z: torch.Tensor, temperature: float, chunk: int = 2048) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row loss and LSE (natural log) of the masked similarity rows, ``chunk`` rows at a time."""
    m = z.shape[0]
    inv_t = 1.0 / temperature
    acc_dt = torch.promote_types(z.dtype, torch.float32)
    partner = _partner(m, z.device)
    loss = torch.empty(m, device=z.device, dtype=acc_dt)
    lse = torch.empty_like(loss)
    zs = z * inv_t  # fold 1/T into the left operand
    for a in range(0, m, chunk):
        rows = torch.arange(a, min(a + chunk, m), device=z.device)
        s = (zs[a:a + chunk] @ z.t()).to(acc_dt)
        s[rows - a, rows] = float("-inf")
        ls = torch.log_softmax(s, dim=1)  # one fused pass on CPU (logsumexp takes several)
        loss[a:a + chunk] = -ls[rows - a, partner[rows]]
        lse[a:a + chunk] = s[rows - a, partner[rows]] - ls[rows - a, partner[rows]]
    return loss, lse


def _bwd_chunked(z: torch.Tensor, lse: torch.Tensor, temperature: float, chunk: int = 2048) -> torch.Tensor:
    """d(sum_i loss_i)/dz (fp32, M x D) from the stored LSEs: (sum_j (P_ij + P_ji) z_j - 2 z_pos) / T."""
    m = z.shape[0]
    inv_t = 1.0 / temperature
    zf = z.to(torch.promote_types(z.dtype, torch.float32))
    out = torch.empty_like(zf)
    for a in range(0, m, chunk):
        s = (z[a:a + chunk] @ z.t()).to(zf.dtype) * inv_t
        w = torch.exp(s - lse[a:a + chunk, None]) + torch.exp(s - lse[None, :])
        rows = torch.arange(a, min(a + chunk, m), device=z.device)
        w[rows - a, rows] = 0.0
        out[a:a + chunk] = w @ zf
    return (out - 2.0 * zf[_partner(m, z.device)]) * inv_t


if HAS_TRITON:

    @triton.jit
    def _nt_xent_fwd_kernel(z_ptr, lse_ptr, loss_ptr, M, N, D, stride_z, scale, PRECISION: tl.constexpr,
                            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
        # Rows [pid*BLOCK_M, ...) against all M columns: online LSE (base 2) with the diagonal masked.
        pid = tl.program_id(0)
        offs_m = pid * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        mask_m = offs_m < M
        mask_d = offs_d < D
        zi = tl.load(z_ptr + offs_m[:, None] * stride_z + offs_d[None, :], mask=mask_m[:, None] & mask_d[None, :],
                     other=0.0)
        m = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l = tl.zeros([BLOCK_M], tl.float32)
        for start in range(0, M, BLOCK_N):
            offs_n = start + tl.arange(0, BLOCK_N)
            zj = tl.load(z_ptr + offs_n[:, None] * stride_z + offs_d[None, :],
                         mask=(offs_n < M)[:, None] & mask_d[None, :], other=0.0)
            s = tl.dot(zi, tl.trans(zj), input_precision=PRECISION) * scale
            valid = (offs_n[None, :] < M) & (offs_n[None, :] != offs_m[:, None])
            s = tl.where(valid, s, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, 1))
            # A tile can hold only the diagonal for some rows; guard -inf - -inf (first tile is never empty).
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            l = l * tl.exp2(m - m_safe) + tl.sum(tl.exp2(s - m_safe[:, None]), 1)
            m = m_new
        partner = tl.where(offs_m < N, offs_m + N, offs_m - N)
        zp = tl.load(z_ptr + partner[:, None] * stride_z + offs_d[None, :], mask=mask_m[:, None] & mask_d[None, :],
                     other=0.0)
        pos = tl.sum(zi.to(tl.float32) * zp.to(tl.float32), 1) * scale
        lse2 = m + tl.log2(l)
        tl.store(lse_ptr + offs_m, lse2, mask=mask_m)
        tl.store(loss_ptr + offs_m, (lse2 - pos) * 0.6931471805599453, mask=mask_m)

    @triton.jit
    def _nt_xent_bwd_kernel(z_ptr, lse_ptr, g_ptr, dz_ptr, M, N, D, stride_z, scale, coef,
                            PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                            BLOCK_D: tl.constexpr):
        # dz_i = g * coef * (sum_j (P_ij + P_ji) z_j - 2 z_pos(i)), coef = 1 / (M T); tiles recomputed.
        pid = tl.program_id(0)
        offs_m = pid * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        mask_m = offs_m < M
        mask_md = mask_m[:, None] & (offs_d < D)[None, :]
        zi = tl.load(z_ptr + offs_m[:, None] * stride_z + offs_d[None, :], mask=mask_md, other=0.0)
        lse_i = tl.load(lse_ptr + offs_m, mask=mask_m, other=0.0)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        for start in range(0, M, BLOCK_N):
            offs_n = start + tl.arange(0, BLOCK_N)
            mask_n = offs_n < M
            zj = tl.load(z_ptr + offs_n[:, None] * stride_z + offs_d[None, :],
                         mask=mask_n[:, None] & (offs_d < D)[None, :], other=0.0)
            lse_j = tl.load(lse_ptr + offs_n, mask=mask_n, other=0.0)
            s = tl.dot(zi, tl.trans(zj), input_precision=PRECISION) * scale
            valid = mask_n[None, :] & (offs_n[None, :] != offs_m[:, None])
            w = tl.exp2(tl.where(valid, s - lse_i[:, None], float("-inf")))
            w += tl.exp2(tl.where(valid, s - lse_j[None, :], float("-inf")))
            acc += tl.dot(w.to(zj.dtype), zj, input_precision=PRECISION)
        partner = tl.where(offs_m < N, offs_m + N, offs_m - N)
        zp = tl.load(z_ptr + partner[:, None] * stride_z + offs_d[None, :], mask=mask_md, other=0.0)
        g = tl.load(g_ptr)
        dz = (acc - 2.0 * zp.to(tl.float32)) * (coef * g)
        tl.store(dz_ptr + offs_m[:, None] * D + offs_d[None, :], dz.to(dz_ptr.dtype.element_ty), mask=mask_md)


def fwd_config(d: int, dtype: torch.dtype, precision: str, cc: int = 90) -> dict[str, int]:
    """``_nt_xent_fwd_kernel``: a row tile against column tiles of the same rows with an online LSE and no
    accumulator, so InfoNCE's tiles (:func:`kernels._triton_utils.dot_tile_config`), BLOCK_B / BLOCK_K named
    BLOCK_M / BLOCK_N here. Without TF32 (FMA dots) the diagonal mask and the partner rows cost what a second
    accumulator costs (InfoNCE's 16 x 32 tiles: 255 registers + 112 spilled bytes on sm_90a), so it is sized
    as one with two."""
    cfg = dot_tile_config(d, dtype, precision, accumulators=2 if precision == "ieee" else 1)
    if precision == "tf32" and dtype == torch.float32 and cfg["BLOCK_D"] >= 512:
        cfg["num_warps"] = 4  # 8 warps left a 16-byte stack frame on sm_90a (80 registers); 4 warps none
    return dict(BLOCK_M=cfg.pop("BLOCK_B"), BLOCK_N=cfg.pop("BLOCK_K"), **cfg)


def bwd_config(d: int, dtype: torch.dtype, precision: str, cc: int = 90) -> dict[str, int]:
    """``_nt_xent_bwd_kernel``: row tile + one fp32 gradient accumulator + two weight tiles, the load of InfoNCE's
    split kernel with gradient: the same tiles (:func:`kernels._triton_utils.dot_tile_config`)."""
    cfg = dot_tile_config(d, dtype, precision, accumulators=2 if precision == "ieee" else 1)
    return dict(BLOCK_M=cfg.pop("BLOCK_B"), BLOCK_N=cfg.pop("BLOCK_K"), **cfg)


def _fwd_triton(z: torch.Tensor, temperature: float, block_m: int | None = None,
                block_n: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row loss (fp32) and base-2 LSE of the masked logits; ``block_m`` / ``block_n`` override the config."""
    m, d = z.shape
    cfg = fwd_config(d, z.dtype, dot_precision(z.dtype), device_cc(z.device))
    cfg["BLOCK_M"], cfg["BLOCK_N"] = block_m or cfg["BLOCK_M"], block_n or cfg["BLOCK_N"]
    lse2 = torch.empty(m, device=z.device, dtype=torch.float32)
    loss_rows = torch.empty_like(lse2)
    _nt_xent_fwd_kernel[(triton.cdiv(m, cfg["BLOCK_M"]),)](
        z, lse2, loss_rows, m, m // 2, d, z.stride(0), LOG2E / temperature, PRECISION=dot_precision(z.dtype), **cfg)
    return loss_rows, lse2


def _bwd_triton(z: torch.Tensor, lse2: torch.Tensor, g: torch.Tensor, temperature: float,
                block_m: int | None = None, block_n: int | None = None) -> torch.Tensor:
    """Gradient of ``g * mean(loss_rows)`` w.r.t. z, in z's dtype."""
    m, d = z.shape
    cfg = bwd_config(d, z.dtype, dot_precision(z.dtype), device_cc(z.device))
    cfg["BLOCK_M"], cfg["BLOCK_N"] = block_m or cfg["BLOCK_M"], block_n or cfg["BLOCK_N"]
    dz = torch.empty_like(z)
    _nt_xent_bwd_kernel[(triton.cdiv(m, cfg["BLOCK_M"]),)](
        z, lse2, g.float().reshape(1), dz, m, m // 2, d, z.stride(0), LOG2E / temperature, 1.0 / (m * temperature),
        PRECISION=dot_precision(z.dtype), **cfg)
    return dz


class _NTXentFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z1, z2, temperature, use_triton: bool):
        z = torch.cat([z1, z2], dim=0).contiguous()
        if use_triton:
            loss_rows, lse = _fwd_triton(z, temperature)
        else:
            loss_rows, lse = _fwd_chunked(z, temperature)
        ctx.save_for_backward(z, lse)
        ctx.meta = (temperature, use_triton, z1.shape[0])
        return loss_rows.mean()

    @staticmethod
    def backward(ctx, g):
        z, lse = ctx.saved_tensors
        temperature, use_triton, n = ctx.meta
        if use_triton:
            dz = _bwd_triton(z, lse, g, temperature)
        else:
            dz = (_bwd_chunked(z, lse, temperature) * (g / z.shape[0])).to(z.dtype)
        return dz[:n], dz[n:], None, None


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """SimCLR's NT-Xent loss, symmetric over the 2N samples, self-similarity masked (Chen et al., 2020).

    Args:
        z1, z2: (N, D) projections of two views of the same N images; expected L2-normalised (this
            function does not normalise), but unnormalised inputs are numerically safe (running max).
        temperature: T > 0.
    Returns: scalar fp32 loss, mean over 2N rows; gradients for z1 and z2.
    Triton kernels for CUDA tensors (unless ``SMALLSSL_TRITON=0`` or D > ``MAX_D`` = 512); otherwise a chunked
    PyTorch path that also never holds the full (2N, 2N) matrix.
    """
    _check(z1, z2, temperature)
    use_triton = triton_enabled(z1, z2) and z1.shape[1] <= MAX_D
    if z1.dtype != z2.dtype:
        z2 = z2.to(z1.dtype)
    return _NTXentFn.apply(z1, z2, float(temperature), use_triton)


# ---------------------------------------------------------------- case table (tests, kernels.bench, kernels.aot)

def _launches(cc: int) -> list[Launch]:
    """Every (kernel, config) the forward and backward launchers can choose on compute capability ``cc``."""
    if not HAS_TRITON:
        return []
    out = []
    for dt, precision in COMPUTE_TYPES:
        for block_d in BLOCK_D_CLASSES:
            for fn, config, types in (
                    (_nt_xent_fwd_kernel, fwd_config, dict(z_ptr=TRITON_PTR[dt], lse_ptr="*fp32", loss_ptr="*fp32",
                                                           scale="fp32")),
                    (_nt_xent_bwd_kernel, bwd_config, dict(z_ptr=TRITON_PTR[dt], lse_ptr="*fp32", g_ptr="*fp32",
                                                           dz_ptr=TRITON_PTR[dt], scale="fp32", coef="fp32"))):
                cfg = config(block_d, dt, precision, cc)
                warps, stages = cfg.pop("num_warps"), cfg.pop("num_stages")
                sig = make_signature(fn, types, ("PRECISION", "BLOCK_M", "BLOCK_N", "BLOCK_D"))
                aligned = tuple(n for n in sig if n.endswith("_ptr")) + ("D", "stride_z")
                out.append(Launch(fn, sig, dict(PRECISION=precision, **cfg), warps, stages, aligned=aligned,
                                  heavy=True))
    return out


def _make_inputs(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device,
                 generator: torch.Generator) -> KernelInputs:
    n, d = shape
    z1, z2 = unit_rows(n, d, dtype, device, generator), unit_rows(n, d, dtype, device, generator)
    z1.requires_grad_()
    z2.requires_grad_()
    return KernelInputs((z1, z2, 0.1), grad=(z1, z2))


def _cost(shape: tuple[int, ...], dtype: torch.dtype) -> Cost:
    """Forward + backward over M = 2N rows: the forward computes M^2 logits (2 M^2 D), the backward recomputes
    them and multiplies the weights back (4 M^2 D), with one exp per logit forward and two backward. Each
    kernel re-reads the M x D rows once per BLOCK_M-row block."""
    n, d = shape
    m, s = 2 * n, DTYPE_BYTES[dtype]
    prec = dot_precision(dtype)
    row_blocks = -(-m // fwd_config(d, dtype, prec)["BLOCK_M"]) + -(-m // bwd_config(d, dtype, prec)["BLOCK_M"])
    return Cost(min_bytes=2 * m * d * s + 2 * m * 4, kernel_bytes=row_blocks * m * d * s + 3 * m * d * s + 4 * m * 4,
                dot_flops=6.0 * m * m * d, exps=3.0 * m * m)


CASE = KernelCase(
    name="nt_xent",
    make_inputs=_make_inputs,
    reference=nt_xent_reference,
    impls={"chunked": lambda z1, z2, t: _NTXentFn.apply(z1, z2, t, False),
           "triton": lambda z1, z2, t: _NTXentFn.apply(z1, z2, t, True)},
    has_backward=True,
    full_shapes=[(8192, 128), (32768, 128)],
    quick_shapes=[(1024, 128)],
    tiny_shapes=[(7, 33), (40, 16)],
    eager_bytes=lambda shape: 5 * (2 * shape[0]) ** 2 * 4,
    shape_str=lambda shape: f"2N={2 * shape[0]} D={shape[1]}",
    cost=_cost,
    launches=_launches,
)
