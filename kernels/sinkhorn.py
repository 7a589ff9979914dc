"""Sinkhorn-Knopp code assignment of SwAV, as a few fused passes over the score matrix.

Caron et al., "Unsupervised Learning of Visual Features by Contrasting Cluster Assignments", NeurIPS 2020
(facebookresearch/swav ``distributed_sinkhorn``): ``Q = exp(scores / eps)``, then ``n_iters`` times
normalise each prototype's mass to 1/K and each sample's mass to 1/B; the codes are ``B * Q`` so every
sample's row sums to 1. With ``torch.distributed`` initialised the batch is split across ranks and the
per-prototype sums are all-reduced each iteration.

Why vectors suffice: after the iterations ``Q_bk = E_bk u_k v_b`` with ``E = exp(scores / eps)``, so
only the K-vector ``u`` and the B-vector ``v`` change. Each iteration is one pass over the scores for the
per-sample sums ``c_b = sum_k E_bk u_k`` (then ``v = 1/c``) and one pass for the per-prototype sums
``r_k = sum_b E_bk v_b`` (then ``u = 1/r``); constant factors (1/K, 1/B, the total mass) cancel in the
next normalisation. The matrix is read ``2 n_iters`` times and written once, never rewritten, instead
of ~13 eager passes per iteration. Stability: ``exp`` is taken relative to each prototype's maximum
over the (global) batch, an exact shift because the first prototype normalisation removes it, so
unnormalised scores and small eps (SEER: 0.03) cannot overflow; the Triton path also keeps the
per-sample sums in the log domain, so a sample far below every prototype cannot underflow to 0/0.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from kernels._case import DTYPE_BYTES, TRITON_PTR, Cost, KernelCase, KernelInputs, Launch, make_signature, unit_rows
from kernels._triton_utils import HAS_TRITON, LOG2E, device_cc, num_sms, triton, triton_enabled

if HAS_TRITON:
    import triton.language as tl


def _world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _all_reduce(t: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """In-place sum (or max) over ranks, as ``smallssl.dist.all_reduce_sum``; kept here so that kernels/ imports
    nothing from smallssl (the library depends on the kernels, not the other way round)."""
    if _world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    return t


def _check(scores: torch.Tensor, epsilon: float, n_iters: int) -> None:
    if scores.dim() != 2:
        raise ValueError(f"scores must be (B, K); got shape {tuple(scores.shape)}")
    if not epsilon > 0:
        raise ValueError(f"epsilon must be > 0; got {epsilon}")
    if n_iters < 0:
        raise ValueError(f"n_iters must be >= 0; got {n_iters}")


@torch.no_grad()
def sinkhorn_reference(scores: torch.Tensor, epsilon: float = 0.05, n_iters: int = 3) -> torch.Tensor:
    """swav's ``distributed_sinkhorn`` step by step, in fp32, with the exact max shift.

    Args:
        scores: (B, K) sample-prototype scores of this rank's batch slice.
        epsilon: entropy regularisation (SwAV 0.05, SEER 0.03). n_iters: Sinkhorn iterations (3; SEER 10).
    Returns: (B, K) fp32 codes; each row sums to 1 when ``n_iters >= 1``.
    """
    _check(scores, epsilon, n_iters)
    x = scores.detach()
    x = x.to(torch.promote_types(x.dtype, torch.float32)) / epsilon
    # Per-prototype shift is removed exactly by the first prototype normalisation; with no iteration
    # only a global shift is exact.
    shift = x.amax(dim=0) if n_iters > 0 else x.amax().reshape(1)
    shift = _all_reduce(shift, "max")
    Q = torch.exp(x - shift).t()  # K x B
    n_b = Q.shape[1] * _world_size()
    n_k = Q.shape[0]
    Q /= _all_reduce(Q.sum())
    for _ in range(n_iters):
        Q /= _all_reduce(Q.sum(dim=1, keepdim=True))  # each prototype's mass -> 1/K
        Q /= n_k
        Q /= Q.sum(dim=0, keepdim=True)  # each sample's mass -> 1/B
        Q /= n_b
    Q *= n_b  # rows of the (B, K) result sum to 1
    return Q.t()


if HAS_TRITON:

    @triton.jit
    def _sk_init_kernel(x_ptr, pmax_ptr, psum_ptr, B, K, stride_b, alpha, rows_per_split,
                        BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr):
        # Per prototype k over a slice of samples: running max and sum of exp2(alpha * x) (online).
        pid_k = tl.program_id(0)
        pid_s = tl.program_id(1)
        offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        b_lo = pid_s * rows_per_split
        b_hi = tl.minimum(b_lo + rows_per_split, B)
        m = tl.full([BLOCK_K], float("-inf"), tl.float32)
        s = tl.zeros([BLOCK_K], tl.float32)
        for start in range(b_lo, b_hi, BLOCK_B):
            offs_b = start + tl.arange(0, BLOCK_B)
            mask = (offs_b < b_hi)[:, None] & mask_k[None, :]
            x = tl.load(x_ptr + offs_b[:, None] * stride_b + offs_k[None, :], mask=mask, other=0.0)
            x = tl.where(mask, x.to(tl.float32) * alpha, float("-inf"))
            m_new = tl.maximum(m, tl.max(x, 0))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            s = s * tl.exp2(m - m_safe) + tl.sum(tl.exp2(x - m_safe[None, :]), 0)
            m = m_new
        tl.store(pmax_ptr + pid_s * K + offs_k, m, mask=mask_k)
        tl.store(psum_ptr + pid_s * K + offs_k, s, mask=mask_k)

    @triton.jit
    def _sk_sample_kernel(x_ptr, g_ptr, pmax_ptr, psum_ptr, B, K, stride_b, alpha, cols_per_split,
                          BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr):
        # Per-sample log-sum-exp (base 2) of alpha * x_bk - g_k over a slice of prototypes, as (max, sum):
        # c_b = sum_k E_bk u_k kept in the log domain so that a sample far below every prototype's
        # maximum cannot underflow to c_b = 0.
        pid_b = tl.program_id(0)
        pid_s = tl.program_id(1)
        offs_b = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
        mask_b = offs_b < B
        k_lo = pid_s * cols_per_split
        k_hi = tl.minimum(k_lo + cols_per_split, K)
        m = tl.full([BLOCK_B], float("-inf"), tl.float32)
        c = tl.zeros([BLOCK_B], tl.float32)
        for start in range(k_lo, k_hi, BLOCK_K):
            offs_k = start + tl.arange(0, BLOCK_K)
            mask_k = offs_k < k_hi
            mask = mask_b[:, None] & mask_k[None, :]
            x = tl.load(x_ptr + offs_b[:, None] * stride_b + offs_k[None, :], mask=mask, other=0.0)
            g = tl.load(g_ptr + offs_k, mask=mask_k, other=0.0)
            y = tl.where(mask, x.to(tl.float32) * alpha - g[None, :], float("-inf"))
            m_new = tl.maximum(m, tl.max(y, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            c = c * tl.exp2(m - m_safe) + tl.sum(tl.exp2(y - m_safe[:, None]), 1)
            m = m_new
        tl.store(pmax_ptr + pid_s * B + offs_b, m, mask=mask_b)
        tl.store(psum_ptr + pid_s * B + offs_b, c, mask=mask_b)

    @triton.jit
    def _sk_proto_kernel(x_ptr, m_ptr, lv_ptr, pr_ptr, B, K, stride_b, alpha, rows_per_split,
                         BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr):
        # Partial per-prototype sums r_k = sum_b exp2(alpha * x_bk - m_k + log2 v_b) over a slice of samples.
        pid_k = tl.program_id(0)
        pid_s = tl.program_id(1)
        offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        m = tl.load(m_ptr + offs_k, mask=mask_k, other=0.0)
        b_lo = pid_s * rows_per_split
        b_hi = tl.minimum(b_lo + rows_per_split, B)
        r = tl.zeros([BLOCK_K], tl.float32)
        for start in range(b_lo, b_hi, BLOCK_B):
            offs_b = start + tl.arange(0, BLOCK_B)
            mask_b = offs_b < b_hi
            mask = mask_b[:, None] & mask_k[None, :]
            x = tl.load(x_ptr + offs_b[:, None] * stride_b + offs_k[None, :], mask=mask, other=0.0)
            lv = tl.load(lv_ptr + offs_b, mask=mask_b, other=0.0)
            e = tl.exp2(x.to(tl.float32) * alpha - m[None, :] + lv[:, None])
            r += tl.sum(tl.where(mask, e, 0.0), 0)
        tl.store(pr_ptr + pid_s * K + offs_k, r, mask=mask_k)

    @triton.jit
    def _sk_write_kernel(x_ptr, g_ptr, lc_ptr, q_ptr, B, K, stride_b, alpha,
                         BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr):
        # Codes Q_bk = exp2(alpha * x_bk - g_k - log2 c_b) = E_bk u_k / c_b (rows sum to 1).
        offs_b = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
        offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
        mask_b = offs_b < B
        mask_k = offs_k < K
        mask = mask_b[:, None] & mask_k[None, :]
        x = tl.load(x_ptr + offs_b[:, None] * stride_b + offs_k[None, :], mask=mask, other=0.0)
        g = tl.load(g_ptr + offs_k, mask=mask_k, other=0.0)
        lc = tl.load(lc_ptr + offs_b, mask=mask_b, other=0.0)
        q = tl.exp2(x.to(tl.float32) * alpha - g[None, :] - lc[:, None])
        tl.store(q_ptr + offs_b[:, None] * K + offs_k[None, :], q, mask=mask)


def _splits(n_other: int, n_tiles: int, device: torch.device, waves: int = 4) -> int:
    """Number of slices along the reduced dimension so that the grid has ~``waves`` x SMs programs."""
    return max(1, min(n_tiles, triton.cdiv(waves * num_sms(device), max(1, n_other))))


def config(dtype: torch.dtype, cc: int = 90) -> dict[str, int]:
    """Tiles of the four Sinkhorn kernels (the launcher and the AOT table): each streams BLOCK_B x BLOCK_K
    tiles of the scores and keeps vectors, so a 32 x 128 fp32 tile is 32 values per thread over 4 warps;
    128 columns of fp32 are 512-byte rows, full 16-byte loads per thread. Triton's default 3 stages pipeline
    the loads of the three looping kernels (48 KB of shared memory at fp32)."""
    return dict(BLOCK_B=32, BLOCK_K=128, num_warps=4, num_stages=3)


@torch.no_grad()
def _sinkhorn_triton(scores: torch.Tensor, epsilon: float, n_iters: int, block_b: int | None = None,
                     block_k: int | None = None) -> torch.Tensor:
    """Same result as :func:`sinkhorn_reference` for ``n_iters >= 1`` (fp32 accumulation); ``block_b`` /
    ``block_k`` override :func:`config`."""
    x = scores.detach()
    if x.stride(1) != 1:
        x = x.contiguous()
    B, K = x.shape
    dev = x.device
    cfg = config(x.dtype, device_cc(dev))
    block_b, block_k = block_b or cfg["BLOCK_B"], block_k or cfg["BLOCK_K"]
    launch = dict(BLOCK_B=block_b, BLOCK_K=block_k, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    alpha = LOG2E / epsilon  # base-2 exponent scale
    f32 = dict(device=dev, dtype=torch.float32)
    n_rb, n_kb = triton.cdiv(B, block_b), triton.cdiv(K, block_k)
    # Slices over samples (for per-prototype sums) and over prototypes (for per-sample sums).
    bs = _splits(n_kb, n_rb, dev)
    rows_per = triton.cdiv(n_rb, bs) * block_b
    bs = triton.cdiv(B, rows_per)
    ks = _splits(n_rb, n_kb, dev)
    cols_per = triton.cdiv(n_kb, ks) * block_k
    ks = triton.cdiv(K, cols_per)

    pmax, psum = torch.empty(bs, K, **f32), torch.empty(bs, K, **f32)
    _sk_init_kernel[(n_kb, bs)](x, pmax, psum, B, K, x.stride(0), alpha, rows_per, **launch)
    m = _all_reduce(pmax.amax(dim=0), "max")  # (K,) per-prototype max, base 2
    r = _all_reduce((psum * torch.exp2(pmax - m)).sum(dim=0))  # r_k with v = 1
    # swav's constant factors (1/K, 1/B) are kept so that u and v stay O(1) for any B/K ratio.
    log2_k, log2_b = math.log2(K), math.log2(B * _world_size())
    pcm, pcs = torch.empty(ks, B, **f32), torch.empty(ks, B, **f32)
    pr = torch.empty(bs, K, **f32)
    for it in range(n_iters):
        g = m + torch.log2(r) + log2_k  # exp2(alpha x - g) = E_bk u_k with u = 1 / (K r)
        _sk_sample_kernel[(n_rb, ks)](x, g, pcm, pcs, B, K, x.stride(0), alpha, cols_per, **launch)
        cmax = pcm.amax(dim=0)
        lc = cmax + torch.log2((pcs * torch.exp2(pcm - cmax)).sum(dim=0))  # log2 c_b, c_b = sum_k E_bk u_k
        if it == n_iters - 1:
            break
        lv = -(lc + log2_b)  # v = 1 / (B c)
        _sk_proto_kernel[(n_kb, bs)](x, m, lv, pr, B, K, x.stride(0), alpha, rows_per, **launch)
        r = _all_reduce(pr.sum(dim=0))
    out = torch.empty(B, K, **f32)
    _sk_write_kernel[(n_rb, n_kb)](x, g, lc, out, B, K, x.stride(0), alpha, **launch)
    return out


@torch.no_grad()
def sinkhorn(scores: torch.Tensor, epsilon: float = 0.05, n_iters: int = 3) -> torch.Tensor:
    """SwAV codes by Sinkhorn-Knopp, equal to facebookresearch/swav's ``distributed_sinkhorn``.

    Args:
        scores: (B, K) scores of this rank's samples against K prototypes (any float dtype; fp32 math).
        epsilon: entropy regularisation (SwAV 0.05; SEER 0.03). n_iters: iterations (3; SEER 10).
    Returns: (B, K) fp32 codes, rows summing to 1; no gradient (they are targets).
    With ``torch.distributed`` initialised every rank passes its own slice of the batch (equal sizes,
    as in swav) and the per-iteration prototype sums are all-reduced.
    Uses the Triton kernels for CUDA tensors unless ``SMALLSSL_TRITON=0`` (and for ``n_iters >= 1``).
    """
    _check(scores, epsilon, n_iters)
    if n_iters >= 1 and scores.numel() > 0 and triton_enabled(scores):
        return _sinkhorn_triton(scores, float(epsilon), int(n_iters))
    return sinkhorn_reference(scores, epsilon, n_iters)


# ---------------------------------------------------------------- case table (tests, kernels.bench, kernels.aot)

def _launches(cc: int) -> list[Launch]:
    """The four kernels at :func:`config`, for every scores dtype (the kernels upcast to fp32 as they load)."""
    if not HAS_TRITON:
        return []
    out = []
    for dt in (torch.float32, torch.bfloat16, torch.float16):
        cfg = config(dt, cc)
        warps, stages = cfg.pop("num_warps"), cfg.pop("num_stages")
        for fn, types in ((_sk_init_kernel, dict(pmax_ptr="*fp32", psum_ptr="*fp32")),
                          (_sk_sample_kernel, dict(g_ptr="*fp32", pmax_ptr="*fp32", psum_ptr="*fp32")),
                          (_sk_proto_kernel, dict(m_ptr="*fp32", lv_ptr="*fp32", pr_ptr="*fp32")),
                          (_sk_write_kernel, dict(g_ptr="*fp32", lc_ptr="*fp32", q_ptr="*fp32"))):
            sig = make_signature(fn, dict(x_ptr=TRITON_PTR[dt], alpha="fp32", **types), ("BLOCK_B", "BLOCK_K"))
            aligned = tuple(n for n in sig if n.endswith("_ptr")) + ("K", "stride_b")
            out.append(Launch(fn, sig, dict(cfg), warps, stages, aligned=aligned, heavy=True))
    return out


def _make_inputs(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device,
                 generator: torch.Generator) -> KernelInputs:
    b, k, iters = shape
    scores = (unit_rows(b, 64, torch.float32, device, generator) @ unit_rows(k, 64, torch.float32, device,
                                                                             generator).t()).to(dtype)
    return KernelInputs((scores, 0.05, iters))


def _cost(shape: tuple[int, ...], dtype: torch.dtype) -> Cost:
    """The scores are read once and the fp32 codes written once at least; these kernels read the scores
    2 n_iters + 1 times (init, a per-sample pass per iteration, a per-prototype pass per iteration but the
    last, the write) with one exp per element per pass. No matrix products."""
    b, k, iters = shape
    s = DTYPE_BYTES[dtype]
    passes = 2 * iters + 1
    return Cost(min_bytes=b * k * (s + 4), kernel_bytes=passes * b * k * s + b * k * 4, dot_flops=0.0,
                exps=float(passes * b * k))


CASE = KernelCase(
    name="sinkhorn",
    make_inputs=_make_inputs,
    reference=sinkhorn_reference,
    impls={"triton": lambda scores, eps, iters: _sinkhorn_triton(scores, eps, iters)},
    has_backward=False,
    full_shapes=[(256, 3000, 3), (4096, 3000, 3), (1024, 16384, 10), (128, 65536, 3)],
    quick_shapes=[(256, 3000, 3), (1024, 3000, 3)],
    tiny_shapes=[(7, 33, 3), (37, 70, 10)],
    eager_bytes=lambda shape: 3 * shape[0] * shape[1] * 4,
    shape_str=lambda shape: "{}x{} it={}".format(*shape),
    cost=_cost,
    launches=_launches,
)
