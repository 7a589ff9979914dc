"""The records every kernel file ends with: a ``KernelCase`` (tests and ``kernels.bench`` loop over them) and the
``Launch`` list its launcher can pick (``kernels.aot`` compiles each one). Pure data: imports neither Triton nor
any kernel module, so every kernel file can import it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F

Shape = tuple[int, ...]

DTYPE_BYTES = {torch.float32: 4, torch.bfloat16: 2, torch.float16: 2, torch.float64: 8}
# Triton signature strings of the torch dtypes the launchers pass (pointer element types).
TRITON_PTR = {torch.float32: "*fp32", torch.bfloat16: "*bf16", torch.float16: "*fp16"}


@dataclass(frozen=True)
class Cost:
    """What one call must do at a shape, for the roofline (``python -m kernels.bench --roofline``).

    min_bytes: every input read once and every output written once (the floor any implementation has).
    kernel_bytes: what this file's kernels move by design (re-reads of the matrix, split partials).
    dot_flops: multiply-adds x 2 of the matrix products (tensor-core work). exps: exponentials (the SFU's).
    """

    min_bytes: float
    kernel_bytes: float
    dot_flops: float
    exps: float


@dataclass(frozen=True)
class KernelInputs:
    """Positional arguments of the reference / implementations, and the tensors that get gradients."""

    args: tuple[Any, ...]
    grad: tuple[torch.Tensor, ...] = ()


@dataclass(frozen=True)
class KernelCase:
    """One kernel's table: inputs, reference, implementations, shapes and costs (timm's registry idea).

    ``make_inputs(shape, dtype, device, generator)`` builds the inputs of one call; ``reference(*args)`` is the
    eager spec and every ``impls[name](*args)`` must equal it (``chunked``: the CPU path of the public function;
    ``triton``: the kernels, CUDA or ``TRITON_INTERPRET=1`` only). Each returns the scalar loss, or the codes for
    a kernel without backward. ``tiny_shapes`` run on a CPU (also in Triton's interpreter); ``quick_shapes`` and
    ``full_shapes`` are the benchmark's. ``eager_bytes(shape)`` estimates the reference's peak extra memory (the
    benchmark skips CPU rows over its budget); ``cost(shape, dtype)`` feeds the roofline; ``launches(cc)`` lists
    every Triton launch configuration the launcher can choose on compute capability ``cc`` (80, 90).
    """

    name: str
    make_inputs: Callable[[Shape, torch.dtype, torch.device, torch.Generator], KernelInputs]
    reference: Callable[..., torch.Tensor]
    impls: dict[str, Callable[..., torch.Tensor]]
    has_backward: bool
    full_shapes: Sequence[Shape]
    quick_shapes: Sequence[Shape]
    tiny_shapes: Sequence[Shape]
    eager_bytes: Callable[[Shape], float]
    shape_str: Callable[[Shape], str]
    cost: Callable[[Shape, torch.dtype], Cost]
    launches: Callable[[int], list[Launch]] = field(default=lambda cc: [])


@dataclass(frozen=True)
class Launch:
    """One launch configuration of one ``@triton.jit`` kernel, as ``kernels.aot`` compiles it.

    signature: Triton type per runtime argument (``*fp32``, ``i32``, ``fp32``); constexprs: the compile-time
    arguments; aligned: runtime arguments assumed divisible by 16 (pointers from torch allocations and the
    feature dimension / row strides at the shapes that matter), as Triton's launcher specialises them; ones:
    runtime arguments equal to 1 at every launch (unit strides), which Triton compiles in as constants.
    heavy: the kernel carries the work (the AOT test asks these for >= 2 programs per SM).
    """

    fn: Any
    signature: dict[str, str]
    constexprs: dict[str, Any]
    num_warps: int
    num_stages: int
    aligned: tuple[str, ...] = ()
    ones: tuple[str, ...] = ()
    heavy: bool = False
    note: str = ""

    @property
    def name(self) -> str:
        return getattr(self.fn, "__name__", None) or self.fn.fn.__name__

    def label(self) -> str:
        """Short config string: constexprs (booleans as 0/1), warps and stages."""
        parts = [f"{k}={int(v) if isinstance(v, bool) else v}" for k, v in self.constexprs.items()]
        return " ".join(parts + [f"w{self.num_warps}", f"s{self.num_stages}"])


def make_signature(fn: Any, types: dict[str, str], constexpr_names: Sequence[str],
                   default: str = "i32") -> dict[str, str]:
    """Signature dict in ``fn``'s argument order: ``types`` by name, ``constexpr`` for compile-time arguments,
    ``default`` for the rest (the integer sizes and strides)."""
    names = fn.arg_names
    missing = set(types) - set(names)
    if missing:
        raise ValueError(f"{fn.__name__}: no argument(s) {sorted(missing)}; arguments are {names}")
    return {n: "constexpr" if n in constexpr_names else types.get(n, default) for n in names}


def unit_rows(n: int, d: int, dtype: torch.dtype, device: torch.device, generator: torch.Generator) -> torch.Tensor:
    """(n, d) L2-normalised Gaussian rows drawn on the CPU from ``generator`` (same values on every device)."""
    return F.normalize(torch.randn(n, d, generator=generator, dtype=torch.float64), dim=-1).to(device=device,
                                                                                             dtype=dtype)
