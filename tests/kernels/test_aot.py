"""``kernels.aot``: every Triton launch configuration compiles for sm_80 and sm_90a without spills and within the
shared memory of the target (Triton's bundled ptxas / cuobjdump, no GPU needed; results cached by source hash)."""

import pytest
import torch

from kernels import KERNELS, aot
from kernels._case import Launch, make_signature

triton = pytest.importorskip("triton")


def test_programs_per_sm_arithmetic():
    # 255 registers x 32 threads round up to 8192 per warp: 8 warps fit the 64K register file, 2 programs of 4
    assert aot.programs_per_sm(255, 0, 4, 228 * 1024) == 2
    assert aot.programs_per_sm(128, 0, 8, 228 * 1024) == 2
    assert aot.programs_per_sm(32, 0, 4, 228 * 1024) == 16  # thread limit: 2048 / 128
    assert aot.programs_per_sm(32, 96 * 1024, 4, 164 * 1024) == 1  # shared memory binds: 2 x 97 KB > 164 KB
    assert aot.programs_per_sm(32, 0, 1, 228 * 1024) == 32  # at most 32 programs


def test_check_reports_a_spill(tmp_path, monkeypatch):
    # InfoNCE's former fixed launch (64 x 64 x 128 tiles, 4 warps, 3 stages, fp32 tf32 with gradient) spills on
    # sm_80: the check must say so, so that the suite-wide test below can fail.
    monkeypatch.setenv("SMALLSSL_CACHE", str(tmp_path))
    from kernels import info_nce

    fn = info_nce._info_nce_split_kernel
    sig = make_signature(fn, dict(q_ptr="*fp32", queue_ptr="*fp32", m_ptr="*fp32", l_ptr="*fp32", o_ptr="*fp32",
                                  scale="fp32"), ("WITH_GRAD", "PRECISION", "BLOCK_B", "BLOCK_K", "BLOCK_D"))
    launch = Launch(fn, sig, dict(WITH_GRAD=True, PRECISION="tf32", BLOCK_B=64, BLOCK_K=64, BLOCK_D=128), 4, 3)
    res = aot.compile_one(launch, 80)
    assert res["regs"] == 255 and res["spill"] > 0, res
    assert list(tmp_path.glob("aot/*.json"))  # cached outside the repository
    assert aot.compile_one(launch, 80) == res


@pytest.mark.slow
def test_every_launch_configuration_compiles_without_spill():
    rows = aot.check()
    assert len(rows) == sum(len(c.launches(cc)) for c in KERNELS.values() for cc in (80, 90))
    assert {r.op for r in rows} == set(KERNELS) and {r.target for r in rows} == set(aot.TARGETS)
    bad = [r for r in rows if r.status in aot.FAILING]
    assert not bad, "\n" + aot.table(bad)
    assert all(r.programs >= 1 for r in rows)


def test_launchers_use_the_configs_the_table_compiles():
    # the AOT table is built from the same config functions as the launchers: a launch at D=128 in bf16 with
    # gradient must appear among the InfoNCE launches
    from kernels import info_nce

    cfg = info_nce.split_config(128, torch.bfloat16, "tf32", True, 90)
    labels = {(launch.name, tuple(sorted(launch.constexprs.items())), launch.num_warps, launch.num_stages)
              for launch in KERNELS["info_nce"].launches(90)}
    warps, stages = cfg.pop("num_warps"), cfg.pop("num_stages")
    want = ("_info_nce_split_kernel", tuple(sorted(dict(WITH_GRAD=True, PRECISION="tf32", **cfg).items())), warps,
            stages)
    assert want in labels
