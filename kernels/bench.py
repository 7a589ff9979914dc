"""Benchmark of the fused losses: ``python -m kernels.bench [--quick|--tiny] [--compile] [--dtype fp32,bf16]``.

One row per (op, shape, dtype, provider), for every kernel of ``kernels.KERNELS`` (its case table gives inputs,
reference, implementations and shapes): eager = the PyTorch reference, compile = torch.compile of the
reference, chunked = the memory-friendly PyTorch path the public functions use without Triton, triton = the
kernels (CUDA only). Columns: forward ms, forward+backward ms (Sinkhorn has no backward), peak extra memory in MB
over the inputs, the speedup of fwd+bwd (fwd for Sinkhorn) over eager and, on CUDA, the fraction of the
roofline bound (of the device named by its SM count: H100 or H200 figures).
Memory: CUDA ``max_memory_allocated``; CPU the process's peak RSS (Linux ``/proc/self/clear_refs``),
which also counts allocator slack, so treat CPU MB as approximate.

``--roofline`` prints, without running anything, the bytes and FLOPs of each op and shape and the lower-bound
time on an H100 SXM (3.35 TB/s; 989 dense bf16 TFLOP/s, 495 tf32, 67 plain fp32) and an H200 (4.8 TB/s, same
compute), with ~3.9 T exp/s (16 SFU ops per clock per SM x 132 SMs x 1.83 GHz) as a third floor.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import statistics
import time
from typing import Callable

import torch

from kernels import KERNELS
from kernels._case import KernelCase
from kernels._triton_utils import HAS_TRITON

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# name -> (bytes/s, {compute class: dot FLOP/s}, exp/s). Datasheet figures (dense, no sparsity).
DEVICES = {
    "H100 SXM": (3.35e12, {"bf16": 989e12, "tf32": 495e12, "fp32": 67e12}, 3.9e12),
    "H200": (4.8e12, {"bf16": 989e12, "tf32": 495e12, "fp32": 67e12}, 3.9e12),
}
# roofline rows: (label, input dtype, compute class); fp32 without TF32 is torch's default (dot_precision "ieee")
ROOFLINE_TYPES = (("bf16", torch.bfloat16, "bf16"), ("fp32 tf32", torch.float32, "tf32"),
                  ("fp32", torch.float32, "fp32"))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _Peak:
    """Peak extra memory (MB) of a block, relative to the memory in use when it starts."""

    def __init__(self, device: torch.device):
        self.device = device
        self.mb: float | None = None

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


def _measure(fwd: Callable[[], torch.Tensor], inputs: list[torch.Tensor], device: torch.device, reps: int,
             backward: bool) -> tuple[float, float | None, float | None]:
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


def _rows_for(case: KernelCase, shape: tuple, dtype: torch.dtype, device: torch.device, providers: list[str],
              mem_budget: float):
    """Yield (provider, forward closure or None, reason when None, inputs needing grad) for one op and shape."""
    inputs = case.make_inputs(shape, dtype, device, torch.Generator(device="cpu").manual_seed(0))
    args, grads = inputs.args, list(inputs.grad)
    for prov in providers:
        if prov == "triton" and not (HAS_TRITON and device.type == "cuda"):
            yield prov, None, "not measured (needs a CUDA GPU)", grads
        elif prov == "chunked" and prov not in case.impls:
            continue
        elif device.type == "cpu" and case.has_backward and case.cost(shape, dtype).dot_flops > 100e9:
            yield prov, None, "skipped (too slow on CPU)", grads  # fwd+bwd of ~100 GFLOP+: minutes per row
        elif prov in ("eager", "compile") and device.type == "cpu" and case.eager_bytes(shape) > mem_budget:
            yield prov, None, f"skipped (needs ~{case.eager_bytes(shape) / 2**30:.0f} GB)", grads
        elif prov == "compile":
            compiled = torch.compile(case.reference)
            yield prov, (lambda fn=compiled: fn(*args)), None, grads
        else:
            fn = case.reference if prov == "eager" else case.impls[prov]
            yield prov, (lambda fn=fn: fn(*args)), None, grads


def roofline_bound(case: KernelCase, shape: tuple, dtype: torch.dtype, compute: str, device: str,
                   design: bool = False) -> tuple[float, str]:
    """(lower-bound seconds, what binds: memory / dot / exp) of one call on ``device`` (a ``DEVICES`` key).

    Memory counts ``min_bytes`` (each input read once, each output written once), or with ``design`` the bytes
    this file's kernels move (re-reads included; they mostly hit L2 when the re-read operand fits in it).
    """
    bw, dot, exp_rate = DEVICES[device]
    c = case.cost(shape, dtype)
    terms = {"memory": (c.kernel_bytes if design else c.min_bytes) / bw, "dot": c.dot_flops / dot[compute],
             "exp": c.exps / exp_rate}
    which = max(terms, key=terms.get)
    return terms[which], which


def roofline(ops: list[str], shapes_key: str = "full_shapes") -> list[dict]:
    """Print and return the roofline table of ``ops`` at their ``shapes_key`` shapes."""
    print("| op | shape | dtype | min MB | kernel MB | dot GFLOP | G exp | H100 SXM bound us | H200 bound us | "
          "binds (H100) | H100 at kernel MB us |")
    print("|" + "---|" * 11)
    rows = []
    for op in ops:
        case = KERNELS[op]
        for shape in getattr(case, shapes_key):
            for label, dtype, compute in ROOFLINE_TYPES:
                c = case.cost(shape, dtype)
                if c.dot_flops == 0 and compute == "tf32":
                    continue  # no matrix products: the fp32 row says it all
                h100, which = roofline_bound(case, shape, dtype, compute, "H100 SXM")
                h200, _ = roofline_bound(case, shape, dtype, compute, "H200")
                design, _ = roofline_bound(case, shape, dtype, compute, "H100 SXM", design=True)
                row = dict(op=op, shape=case.shape_str(shape), dtype=label, min_mb=c.min_bytes / 1e6,
                           kernel_mb=c.kernel_bytes / 1e6, dot_gflop=c.dot_flops / 1e9, gexp=c.exps / 1e9,
                           h100_us=h100 * 1e6, h200_us=h200 * 1e6, binds=which, h100_design_us=design * 1e6)
                rows.append(row)
                print(f"| {op} | {row['shape']} | {label} | {row['min_mb']:.1f} | {row['kernel_mb']:.1f} | "
                      f"{row['dot_gflop']:.2f} | {row['gexp']:.3f} | {row['h100_us']:.1f} | {row['h200_us']:.1f} | "
                      f"{which} | {design * 1e6:.1f} |", flush=True)
    return rows


def _roofline_device(device: torch.device) -> str | None:
    """The ``DEVICES`` entry whose figures apply to this CUDA device (by name), or None."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return "H200" if "H200" in name else "H100 SXM" if "H100" in name else None


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="small shapes (minutes on a 2-core CPU)")
    size.add_argument("--tiny", action="store_true", help="the tests' tiny shapes (seconds; a dry run)")
    p.add_argument("--roofline", action="store_true", help="print bytes, FLOPs and lower-bound times; run nothing")
    p.add_argument("--compile", action="store_true", help="also torch.compile rows on CPU (always on CUDA)")
    p.add_argument("--dtype", default=None, help="fp32,bf16,fp16 (default: fp32 on CPU, fp32,bf16 on CUDA)")
    p.add_argument("--ops", default=",".join(KERNELS), help="comma list of " + ", ".join(KERNELS))
    p.add_argument("--reps", type=int, default=None)
    p.add_argument("--mem-budget-gb", type=float, default=4.0, help="skip CPU eager rows needing more")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--json", default=None, help="also write the rows to this JSON file")
    args = p.parse_args(argv)
    ops = args.ops.split(",")
    for op in ops:
        if op not in KERNELS:
            raise ValueError(f"--ops must be a comma list of {sorted(KERNELS)}; got {op!r}")
    shapes_key = "tiny_shapes" if args.tiny else "quick_shapes" if args.quick else "full_shapes"
    if args.roofline:
        results = roofline(ops, shapes_key)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(results, f, indent=1)
        return results
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.threads:
        torch.set_num_threads(args.threads)
    if device.type == "cpu":
        _release_freed_memory_to_os()
    dtypes = (args.dtype or ("fp32,bf16" if device.type == "cuda" else "fp32")).split(",")
    for dt in dtypes:
        if dt not in DTYPES:
            raise ValueError(f"--dtype must be a comma list of {sorted(DTYPES)}; got {dt!r}")
    providers = ["eager", "chunked", "triton"]
    if device.type == "cuda" or args.compile:
        providers.insert(1, "compile")
    reps = args.reps or (20 if device.type == "cuda" else 5)
    roof_dev = _roofline_device(device)
    threads = torch.get_num_threads()
    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {threads} threads"
    print(f"# device: {dev_name}; torch {torch.__version__}; median of {reps} runs")
    header = "| op | shape | dtype | provider | fwd ms | fwd+bwd ms | peak extra MB | speedup vs eager | of bound |"
    print(header + "\n|" + "---|" * 9, flush=True)
    results = []
    for op in ops:
        case = KERNELS[op]
        for shape in getattr(case, shapes_key):
            for dt in dtypes:
                eager_t = None
                compute = "bf16" if dt != "fp32" else "tf32" if torch.backends.cuda.matmul.allow_tf32 else "fp32"
                bound = roofline_bound(case, shape, DTYPES[dt], compute, roof_dev)[0] * 1e3 if roof_dev else None
                for prov, fn, reason, inputs in _rows_for(case, shape, DTYPES[dt], device, providers,
                                                          args.mem_budget_gb * 2**30):
                    row = dict(op=op, shape=case.shape_str(shape), dtype=dt, provider=prov, device=dev_name)
                    if fn is None:
                        row["note"] = reason
                        print(f"| {op} | {row['shape']} | {dt} | {prov} | {reason} | | | | |", flush=True)
                        results.append(row)
                        continue
                    t_fwd, t_full, mb = _measure(fn, inputs, device, reps, case.has_backward)
                    key = t_full if case.has_backward else t_fwd
                    if prov == "eager":
                        eager_t = key
                    speed = f"{eager_t / key:.2f}x" if eager_t else "n/a"
                    frac = f"{bound / key:.0%}" if bound else "n/a"
                    row.update(fwd_ms=t_fwd, fwd_bwd_ms=t_full, peak_mb=mb, speedup=speed, bound_ms=bound,
                               of_bound=frac)
                    results.append(row)
                    full_s = f"{t_full:.3f}" if t_full is not None else "-"
                    mb_s = f"{mb:.0f}" if mb is not None and not math.isnan(mb) else "n/a"
                    print(f"| {op} | {row['shape']} | {dt} | {prov} | {t_fwd:.3f} | {full_s} | {mb_s} | {speed} | "
                          f"{frac} |", flush=True)
                    gc.collect()
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return results


if __name__ == "__main__":
    os.environ.setdefault("SMALLSSL_TRITON", "1")
    main()
