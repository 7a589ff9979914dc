"""Ahead-of-time compile check: ``python -m kernels.aot [--targets sm_80,sm_90a] [--kernels info_nce,...]``.

Compiles every ``@triton.jit`` kernel at every launch configuration its launcher can choose (each kernel file's
``CASE.launches(cc)``, built from the same config functions the launchers call) for A100 (sm_80) and H100/H200
(sm_90a) on a machine without a GPU: Triton ships its CUDA back end, ``ptxas`` and ``cuobjdump``. Prints one row
per (kernel, config, target): registers per thread, spill (stack + local bytes per thread), shared memory per
program, and programs per SM from the register file (64K 32-bit registers), the shared memory (164 KB / 228 KB
per SM, 1 KB reserved per program) and the thread limit (2048). Status: ``ok``, ``SPILL``, ``SMEM`` (over the
per-program limit), ``FAIL`` (did not compile), ``LOW`` (a heavy kernel with fewer than 2 programs per SM). The
exit code is 1 on any FAIL / SPILL / SMEM; LOW rows are listed (the aim is >= 2 programs) but do not fail.

Results are cached by (Triton version, kernel source hash, config, target) under
``$SMALLSSL_CACHE/aot`` (default ``~/.cache/smallssl/aot``), outside the repository, so a rerun with unchanged
kernels compiles nothing.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from kernels import KERNELS
from kernels._case import Launch

# name -> (compute capability, shared memory per SM, largest shared memory one program may use), bytes.
TARGETS: dict[str, tuple] = {"sm_80": (80, 164 * 1024, 163 * 1024), "sm_90a": (90, 228 * 1024, 227 * 1024)}
REGS_PER_SM, MAX_THREADS_PER_SM, MAX_PROGRAMS_PER_SM, SMEM_RESERVED = 65536, 2048, 32, 1024
FAILING = ("FAIL", "SPILL", "SMEM")  # what the test and the exit code reject; LOW is reported, not rejected


@dataclass
class Row:
    op: str
    kernel: str
    config: str
    target: str
    regs: int | None = None
    spill: int | None = None
    shared: int | None = None
    programs: int | None = None
    heavy: bool = False
    error: str = ""

    @property
    def status(self) -> str:
        if self.error:
            return "FAIL"
        if self.spill:
            return "SPILL"
        if self.shared > TARGETS[self.target][2]:
            return "SMEM"
        if self.heavy and self.programs < 2:
            return "LOW"
        return "ok"


def programs_per_sm(regs: int, shared: int, num_warps: int, smem_per_sm: int) -> int:
    """Resident programs per SM: registers are allocated per warp in units of 256, shared memory per program
    plus 1 KB the driver reserves, at most 2048 threads and 32 programs."""
    threads = 32 * num_warps
    regs_per_warp = -(-max(regs, 1) * 32 // 256) * 256
    by_regs = (REGS_PER_SM // regs_per_warp) // num_warps
    by_smem = smem_per_sm // (shared + SMEM_RESERVED)
    return max(0, min(MAX_PROGRAMS_PER_SM, MAX_THREADS_PER_SM // threads, by_regs, by_smem))


def cache_dir() -> Path:
    root = os.environ.get("SMALLSSL_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "smallssl")
    return Path(root) / "aot"


def _key(launch: Launch, cc: int) -> str:
    import triton

    desc = json.dumps([triton.__version__, launch.fn.cache_key, launch.signature, {k: str(v) for k, v in
                       launch.constexprs.items()}, launch.num_warps, launch.num_stages, sorted(launch.aligned),
                       sorted(launch.ones), cc])
    return hashlib.sha256(desc.encode()).hexdigest()[:32]


def _cuobjdump() -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def compile_one(launch: Launch, cc: int) -> dict:
    """Compile one launch for compute capability ``cc``; {regs, spill, shared} or {error} (cached)."""
    path = cache_dir() / f"{_key(launch, cc)}.json"
    if path.exists():
        return json.loads(path.read_text())
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    names = launch.fn.arg_names
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in launch.aligned}
    signature = dict(launch.signature, **{n: "constexpr" for n in launch.ones})
    constexprs = dict(launch.constexprs, **{n: 1 for n in launch.ones})
    try:
        src = ASTSource(launch.fn, signature, constexprs, attrs=attrs)
        compiled = triton.compile(src, target=GPUTarget("cuda", cc, 32),
                                  options={"num_warps": launch.num_warps, "num_stages": launch.num_stages})
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(compiled.asm["cubin"])
            f.flush()
            usage = subprocess.run([_cuobjdump(), "-res-usage", f.name], capture_output=True, text=True,
                                   check=True).stdout
        fields = dict(re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", usage.split("Function", 1)[1]))
        res = {"regs": int(fields["REG"]), "spill": int(fields["STACK"]) + int(fields["LOCAL"]),
               "shared": int(compiled.metadata.shared) + int(fields["SHARED"])}
    except Exception as e:  # noqa: BLE001 - any compiler error is a result to report, not a crash
        res = {"error": f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}"[:300]}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(res))
    tmp.replace(path)
    return res


def _job(args: tuple) -> dict:
    op, index, cc = args
    return compile_one(KERNELS[op].launches(cc)[index], cc)


def check(ops: Sequence[str] = tuple(KERNELS), targets: Sequence[str] = tuple(TARGETS),
          workers: int | None = None) -> list[Row]:
    """Compile every launch of ``ops`` for ``targets`` (in ``workers`` processes) and return the table rows."""
    for t in targets:
        if t not in TARGETS:
            raise ValueError(f"unknown target {t!r}; choose from {sorted(TARGETS)}")
    for op in ops:
        if op not in KERNELS:
            raise ValueError(f"unknown kernel {op!r}; choose from {sorted(KERNELS)}")
    plan = [(op, i, t, launch) for t in targets for op in ops
            for i, launch in enumerate(KERNELS[op].launches(TARGETS[t][0]))]
    jobs = [(op, i, TARGETS[t][0]) for op, i, t, _ in plan]
    todo = [j for j, (_, _, _, launch) in zip(jobs, plan) if not (cache_dir() / f"{_key(launch, j[2])}.json").exists()]
    workers = workers or min(len(todo), os.cpu_count() or 1)
    if workers > 1 and len(todo) > 1:
        # fork: the children inherit the imported kernels; nothing here has touched CUDA
        import multiprocessing as mp

        with ProcessPoolExecutor(workers, mp_context=mp.get_context("fork")) as pool:
            list(pool.map(_job, todo, chunksize=1))
    rows = []
    for (op, _, t, launch), job in zip(plan, jobs):
        res = _job(job)
        row = Row(op, launch.name, launch.label(), t, heavy=launch.heavy, error=res.get("error", ""))
        if not row.error:
            row.regs, row.spill, row.shared = res["regs"], res["spill"], res["shared"]
            row.programs = programs_per_sm(row.regs, row.shared, launch.num_warps, TARGETS[t][1])
        rows.append(row)
    return rows


def table(rows: Sequence[Row]) -> str:
    out = ["| kernel | config | target | regs | spill B | smem KB | programs/SM | status |", "|" + "---|" * 8]
    for r in rows:
        if r.error:
            out.append(f"| {r.kernel} | {r.config} | {r.target} | | | | | FAIL: {r.error} |")
        else:
            out.append(f"| {r.kernel} | {r.config} | {r.target} | {r.regs} | {r.spill} | {r.shared / 1024:.1f} | "
                       f"{r.programs} | {r.status} |")
    return "\n".join(out)


def summary(rows: Sequence[Row]) -> str:
    """One line per (kernel, target): configurations, worst registers / spill / shared memory, fewest programs."""
    groups: dict[tuple, list[Row]] = {}
    for r in rows:
        groups.setdefault((r.kernel, r.target), []).append(r)
    out = ["| kernel | target | configs | max regs | max spill B | max smem KB | min programs/SM | not ok |",
           "|" + "---|" * 8]
    for (kernel, target), rs in groups.items():
        done = [r for r in rs if not r.error]
        bad = ", ".join(f"{r.status}: {r.config}" for r in rs if r.status != "ok") or "-"
        out.append(f"| {kernel} | {target} | {len(rs)} | {max(r.regs for r in done)} | {max(r.spill for r in done)} | "
                   f"{max(r.shared for r in done) / 1024:.1f} | {min(r.programs for r in done)} | {bad} |")
    return "\n".join(out)


def on_device_resources() -> list[dict]:
    """On a CUDA device: run every kernel's Triton path at its quick shapes in fp32 and bf16, then read the
    registers and spills the driver reports for each compiled kernel (to set beside the AOT table)."""
    import torch

    out = []
    for case in KERNELS.values():
        for dtype in (torch.float32, torch.bfloat16):
            for shape in case.quick_shapes:
                inputs = case.make_inputs(shape, dtype, torch.device("cuda"), torch.Generator().manual_seed(0))
                res = case.impls["triton"](*inputs.args)
                if case.has_backward:
                    res.backward()
        fns = {id(launch.fn): launch.fn for launch in case.launches(_case_cc())}
        for fn in fns.values():
            for entry in getattr(fn, "device_caches", {}).values():
                for k in entry[0].values():  # the compiled kernels of this device (Triton's own cache layout)
                    k._init_handles()
                    md = k.metadata
                    out.append(dict(op=case.name, kernel=k.name, num_warps=md.num_warps, num_stages=md.num_stages,
                                    shared=md.shared, regs=k.n_regs, spills=k.n_spills))
    return out


def _case_cc() -> int:
    import torch

    major, minor = torch.cuda.get_device_capability()
    return 10 * major + minor


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--targets", default=",".join(TARGETS), help="comma list of " + ", ".join(TARGETS))
    p.add_argument("--kernels", default=",".join(KERNELS), help="comma list of " + ", ".join(KERNELS))
    p.add_argument("--workers", type=int, default=None, help="compile processes (default: CPU count)")
    p.add_argument("--json", default=None, help="also write the rows as JSON to this file")
    p.add_argument("--summary", action="store_true", help="one line per kernel and target instead of every config")
    p.add_argument("--on-device", action="store_true",
                   help="on a CUDA GPU: run the kernels and print the registers / spills the driver reports")
    a = p.parse_args(argv)
    if a.on_device:
        import torch

        if not torch.cuda.is_available():
            print("--on-device: no CUDA device; nothing to report")
            return 0
        rows = on_device_resources()
        print(f"# {torch.cuda.get_device_name()}: kernels as compiled by this device's Triton")
        print("| kernel | warps | stages | smem KB | regs | spills |\n|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['kernel']} | {r['num_warps']} | {r['num_stages']} | {r['shared'] / 1024:.1f} | {r['regs']} | "
                  f"{r['spills']} |")
        if a.json:
            Path(a.json).write_text(json.dumps(rows, indent=1))
        return 1 if any(r["spills"] for r in rows) else 0
    rows = check(a.kernels.split(","), a.targets.split(","), a.workers)
    print(summary(rows) if a.summary else table(rows))
    bad = [r for r in rows if r.status != "ok"]
    print(f"\n{len(rows)} configurations, {len(bad)} not ok; cache: {cache_dir()}")
    if bad:
        print("not ok:\n" + table(bad))
    if a.json:
        Path(a.json).write_text(json.dumps([dict(vars(r), status=r.status) for r in rows], indent=1))
    return 1 if any(r.status in FAILING for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
