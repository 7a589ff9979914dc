"""Benchmark of the fused losses: ``python -m kernels.bench [--quick] [--compile] [--dtype fp32,bf16]``.

One row per (op, shape, dtype, provider): eager = the PyTorch reference, compile = torch.compile of the
reference, chunked = the memory-friendly PyTorch path the public functions use without Triton, triton =
the kernels (CUDA only). Columns: forward ms, forward+backward ms (Sinkhorn has no backward), peak extra
memory in MB over the inputs, and the speedup of fwd+bwd (fwd for Sinkhorn) over eager.
Memory: CUDA ``max_memory_allocated``; CPU the process's peak RSS (Linux ``/proc/self/clear_refs``),
which also counts allocator slack, so treat CPU MB as approximate.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import math
import os
import statistics
import time
from typing import Callable, List, Optional, Tuple

import torch
import torch.nn.functional as F

from kernels._triton_utils import HAS_TRITON

info_nce_mod = importlib.import_module("kernels.info_nce")
nt_xent_mod = importlib.import_module("kernels.nt_xent")
seed_mod = importlib.import_module("kernels.seed_distill")
sinkhorn_mod = importlib.import_module("kernels.sinkhorn")

FULL = {
    "info_nce": [(256, 128, 65536), (1024, 128, 16384)],
    "nt_xent": [(8192, 128), (32768, 128)],
    "seed_distill": [(256, 128, 65536)],
    "sinkhorn": [(256, 3000, 3), (4096, 3000, 3), (1024, 16384, 10), (128, 65536, 3)],
}
QUICK = {
    "info_nce": [(256, 128, 16384)],
    "nt_xent": [(1024, 128)],
    "seed_distill": [(256, 128, 16384)],
    "sinkhorn": [(256, 3000, 3), (1024, 3000, 3)],
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _Peak:
    """Peak extra memory (MB) of a block, relative to the memory in use when it starts."""

    def __init__(self, device: torch.device):
        self.device = device
        self.mb: Optional[float] = None

    def __enter__(self):
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
        else:
            try:
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")  # reset the peak RSS (VmHWM) to the current RSS
                self.base = self._status("VmRSS")
            except OSError:
                self.base = None
        return self

    @staticmethod
    def _status(key: str) -> int:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
        raise OSError(key)

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.mb = (torch.cuda.max_memory_allocated(self.device) - self.base) / 2**20
        elif self.base is not None:
            self.mb = (self._status("VmHWM") - self.base) / 2**20


def _release_freed_memory_to_os() -> None:
    """glibc keeps freed large blocks once its mmap threshold adapts; a fixed threshold keeps RSS honest."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 1 << 17)  # M_MMAP_THRESHOLD: blocks >= 128 KiB are mmap'd and unmapped on free
        libc.mallopt(-1, 1 << 17)  # M_TRIM_THRESHOLD
    except (OSError, AttributeError):
        pass


def _time(fn: Callable[[], object], device: torch.device, reps: int) -> float:
    """Median wall time in ms over ``reps`` runs after one warm-up."""
    fn()
    _sync(device)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _measure(fwd: Callable[[], torch.Tensor], inputs: List[torch.Tensor], device: torch.device, reps: int,
             backward: bool) -> Tuple[float, Optional[float], Optional[float]]:
    def fwd_bwd():
        for t in inputs:
            t.grad = None
        fwd().backward()

    with torch.no_grad():
        t_fwd = _time(fwd, device, reps)
    if not backward:
        with _Peak(device) as peak:
            fwd()
        return t_fwd, None, peak.mb
    t_full = _time(fwd_bwd, device, reps)
    for t in inputs:
        t.grad = None
    with _Peak(device) as peak:
        fwd_bwd()
    return t_fwd, t_full, peak.mb


def _rows_for(op: str, shape: tuple, dtype: torch.dtype, device: torch.device, providers: List[str]):
    """Yield (provider, forward closure or None with a reason, inputs needing grad, has backward)."""
    g = torch.Generator(device="cpu").manual_seed(0)

    def unit(*s):
        return F.normalize(torch.randn(*s, generator=g), dim=-1).to(device=device, dtype=dtype)

    if op == "info_nce":
        b, d, k = shape
        q, key, queue = unit(b, d).requires_grad_(), unit(b, d).requires_grad_(), unit(k, d)
        impls = {
            "eager": lambda: info_nce_mod.info_nce_reference(q, key, queue, 0.2),
            "chunked": lambda: info_nce_mod._InfoNCEFn.apply(q, key, queue, 0.2, info_nce_mod._stats_chunked)[0],
            "triton": lambda: info_nce_mod._InfoNCEFn.apply(q, key, queue, 0.2, info_nce_mod._stats_triton)[0],
        }
        ref, inputs, bwd, eager_bytes = info_nce_mod.info_nce_reference, [q, key], True, 5 * b * (k + 1) * 4
        args = (q, key, queue, 0.2)
    elif op == "seed_distill":
        b, d, k = shape
        s, t, queue = unit(b, d).requires_grad_(), unit(b, d), unit(k, d)
        temps = (0.2, 1e-4)  # SEED's student and teacher temperatures
        impls = {
            "eager": lambda: seed_mod.seed_distill_reference(s, t, queue, *temps),
            "chunked": lambda: seed_mod._SeedDistillFn.apply(s, t, queue, *temps, seed_mod._stats_chunked),
            "triton": lambda: seed_mod._SeedDistillFn.apply(s, t, queue, *temps, seed_mod._stats_triton),
        }
        ref, inputs, bwd, eager_bytes = seed_mod.seed_distill_reference, [s], True, 8 * b * (k + 1) * 4
        args = (s, t, queue, *temps)
    elif op == "nt_xent":
        n, d = shape
        z1, z2 = unit(n, d).requires_grad_(), unit(n, d).requires_grad_()
        impls = {
            "eager": lambda: nt_xent_mod.nt_xent_reference(z1, z2, 0.1),
            "chunked": lambda: nt_xent_mod._NTXentFn.apply(z1, z2, 0.1, False),
            "triton": lambda: nt_xent_mod._NTXentFn.apply(z1, z2, 0.1, True),
        }
        ref, inputs, bwd, eager_bytes = nt_xent_mod.nt_xent_reference, [z1, z2], True, 5 * (2 * n) ** 2 * 4
        if device.type == "cpu" and 6 * (2 * n) ** 2 * d > 100e9:  # fwd+bwd FLOPs: minutes per row on a CPU
            for prov in providers:
                why = "not measured (needs a CUDA GPU)" if prov == "triton" else "skipped (too slow on CPU)"
                yield prov, None, why, inputs, True
            return
        args = (z1, z2, 0.1)
    else:
        b, k, iters = shape
        scores = unit(b, 64) @ unit(k, 64).t()
        impls = {
            "eager": lambda: sinkhorn_mod.sinkhorn_reference(scores, 0.05, iters),
            "triton": lambda: sinkhorn_mod._sinkhorn_triton(scores, 0.05, iters),
        }
        ref, inputs, bwd, eager_bytes = sinkhorn_mod.sinkhorn_reference, [], False, 3 * b * k * 4
        args = (scores, 0.05, iters)
    for prov in providers:
        if prov == "triton" and not (HAS_TRITON and device.type == "cuda"):
            yield prov, None, "not measured (needs a CUDA GPU)", inputs, bwd
        elif prov == "chunked" and prov not in impls:
            continue
        elif prov in ("eager", "compile") and device.type == "cpu" and eager_bytes > _MEM_BUDGET[0]:
            yield prov, None, f"skipped (needs ~{eager_bytes / 2**30:.0f} GB)", inputs, bwd
        elif prov == "compile":
            compiled = torch.compile(ref)
            yield prov, (lambda fn=compiled: fn(*args)), None, inputs, bwd
        else:
            yield prov, impls[prov], None, inputs, bwd


_MEM_BUDGET = [4 * 2**30]


def _shape_str(op: str, shape: tuple) -> str:
    if op in ("info_nce", "seed_distill"):
        return "B={} D={} K={}".format(*shape)
    if op == "nt_xent":
        return "2N={} D={}".format(2 * shape[0], shape[1])
    return "{}x{} it={}".format(*shape)


def main(argv: Optional[List[str]] = None) -> List[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small shapes (minutes on a 2-core CPU)")
    p.add_argument("--compile", action="store_true", help="also torch.compile rows on CPU (always on CUDA)")
    p.add_argument("--dtype", default=None, help="fp32,bf16,fp16 (default: fp32 on CPU, fp32,bf16 on CUDA)")
    p.add_argument("--ops", default="info_nce,nt_xent,seed_distill,sinkhorn")
    p.add_argument("--reps", type=int, default=None)
    p.add_argument("--mem-budget-gb", type=float, default=4.0, help="skip CPU eager rows needing more")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.threads:
        torch.set_num_threads(args.threads)
    if device.type == "cpu":
        _release_freed_memory_to_os()
    _MEM_BUDGET[0] = int(args.mem_budget_gb * 2**30)
    dtypes = (args.dtype or ("fp32,bf16" if device.type == "cuda" else "fp32")).split(",")
    for dt in dtypes:
        if dt not in DTYPES:
            raise ValueError(f"--dtype must be a comma list of {sorted(DTYPES)}; got {dt!r}")
    providers = ["eager", "chunked", "triton"]
    if device.type == "cuda" or args.compile:
        providers.insert(1, "compile")
    reps = args.reps or (20 if device.type == "cuda" else 5)
    shapes = QUICK if args.quick else FULL
    threads = torch.get_num_threads()
    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {threads} threads"
    print(f"# device: {dev_name}; torch {torch.__version__}; median of {reps} runs")
    header = "| op | shape | dtype | provider | fwd ms | fwd+bwd ms | peak extra MB | speedup vs eager |"
    print(header + "\n|" + "---|" * 8, flush=True)
    results = []
    for op in args.ops.split(","):
        if op not in shapes:
            raise ValueError(f"--ops must be a comma list of {sorted(shapes)}; got {op!r}")
        for shape in shapes[op]:
            for dt in dtypes:
                eager_t = None
                for prov, fn, reason, inputs, bwd in _rows_for(op, shape, DTYPES[dt], device, providers):
                    row = dict(op=op, shape=_shape_str(op, shape), dtype=dt, provider=prov)
                    if fn is None:
                        row["note"] = reason
                        print(f"| {op} | {row['shape']} | {dt} | {prov} | {reason} | | | |", flush=True)
                        results.append(row)
                        continue
                    t_fwd, t_full, mb = _measure(fn, inputs, device, reps, bwd)
                    key = t_full if bwd else t_fwd
                    if prov == "eager":
                        eager_t = key
                    speed = f"{eager_t / key:.2f}x" if eager_t else "n/a"
                    row.update(fwd_ms=t_fwd, fwd_bwd_ms=t_full, peak_mb=mb, speedup=speed)
                    results.append(row)
                    full_s = f"{t_full:.2f}" if t_full is not None else "-"
                    mb_s = f"{mb:.0f}" if mb is not None and not math.isnan(mb) else "n/a"
                    print(f"| {op} | {row['shape']} | {dt} | {prov} | {t_fwd:.2f} | {full_s} | {mb_s} | {speed} |",
                          flush=True)
                    gc.collect()
    return results


if __name__ == "__main__":
    os.environ.setdefault("SMALLSSL_TRITON", "1")
    main()
