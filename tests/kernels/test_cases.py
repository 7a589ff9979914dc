"""Contract tests over ``kernels.KERNELS`` (timm's registry idea): every kernel's case table is complete and each
implementation equals the reference, on the CPU (chunked paths), in Triton's interpreter (``interp``) and on a GPU
at the benchmark's full shapes (``gpu``). A new kernel file with a ``CASE`` is checked here for free."""

import pytest
import torch
from kernel_testing import check_tolerance, err

from kernels import KERNELS
from kernels._case import Cost, KernelCase

CASES = sorted(KERNELS)


def _run(case: KernelCase, impl, shape, dtype, device):
    """Output (and the gradients of 2 x output) of ``impl`` on the case's inputs at ``shape``."""
    inputs = case.make_inputs(shape, dtype, torch.device(device), torch.Generator().manual_seed(sum(shape)))
    out = impl(*inputs.args)
    grads = list(torch.autograd.grad(2.0 * out, inputs.grad)) if case.has_backward else []
    return [out.detach()] + grads


def _reference64(case: KernelCase, shape, device="cpu"):
    """The reference on fp64 copies of the fp64 inputs."""
    return _run(case, case.reference, shape, torch.float64, device)


@pytest.mark.parametrize("name", CASES)
def test_case_table_is_complete(name):
    case = KERNELS[name]
    assert case.name == name and "triton" in case.impls
    assert case.full_shapes and case.quick_shapes and case.tiny_shapes
    for shape in list(case.full_shapes) + list(case.quick_shapes):
        cost = case.cost(shape, torch.bfloat16)
        assert isinstance(cost, Cost) and 0 < cost.min_bytes <= cost.kernel_bytes and cost.exps > 0
        assert case.eager_bytes(shape) > 0 and case.shape_str(shape)
    inputs = case.make_inputs(case.tiny_shapes[0], torch.float32, torch.device("cpu"), torch.Generator())
    assert bool(inputs.grad) == case.has_backward
    assert all(t.requires_grad for t in inputs.grad)


@pytest.mark.parametrize("name", [n for n in CASES if "chunked" in KERNELS[n].impls])
def test_chunked_path_equals_reference(name):
    case = KERNELS[name]
    for shape in case.tiny_shapes:
        got, ref = _run(case, case.impls["chunked"], shape, torch.float64, "cpu"), _reference64(case, shape)
        for g, r in zip(got, ref):
            assert err(g, r) <= 1e-10 * max(1.0, r.abs().max().item()), (name, shape)


@pytest.mark.interp
@pytest.mark.parametrize("name", CASES)
def test_triton_equals_reference_in_interpreter(name):
    # the launchers' own configs (no overrides) on fp32 inputs, within 1e-5 of the fp64 reference
    case = KERNELS[name]
    for shape in case.tiny_shapes:
        got, ref = _run(case, case.impls["triton"], shape, torch.float32, "cpu"), _reference64(case, shape)
        for g, r in zip(got, ref):
            assert err(g, r) <= 1e-5 * max(1.0, r.abs().max().item()), (name, shape)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", CASES)
def test_triton_full_shapes_on_gpu(name, dtype):
    # err(triton) <= 2 err(reference in the same dtype) + atol, both against the fp64 reference
    case = KERNELS[name]
    for shape in case.full_shapes:
        got = _run(case, case.impls["triton"], shape, dtype, "cuda")
        same = _run(case, case.reference, shape, dtype, "cuda")
        ref = _reference64(case, shape, "cuda")
        check_tolerance(got, same, ref)
        torch.cuda.empty_cache()
