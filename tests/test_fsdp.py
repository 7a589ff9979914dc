"""FSDP2 on 2 CPU processes (gloo) with the tiny RegNet: sharding does not change the math, sharded checkpoints
resume exactly, and sharded -> consolidated -> sliced round trips are equal tensor by tensor.

The test runs this file as a script (``python tests/test_fsdp.py OUT``), which spawns 2 ranks; each rank writes
its figures to ``OUT/rank{r}.json`` and the test checks them.
"""

import copy
import json
import os
import socket
import subprocess
import sys

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _loss(model, x, target):
    return (model(x).float() - target).pow(2).mean()


def _worker(rank: int, world: int, out: str, port: int) -> None:
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from smallssl.backbones import create_backbone
    from smallssl.checkpoints.sharded import dcp_to_consolidated, dcp_to_sliced, load_sharded, save_sharded
    from smallssl.checkpoints.sliced import SlicedCheckpoint, consolidated_to_sliced
    from smallssl.fsdp import enable_activation_checkpointing, fsdp_wrap, gather_into
    from smallssl.lars import LARS, lars_param_groups

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    res: dict = {}
    g = torch.Generator().manual_seed(100 + rank)  # each rank has its own data
    x, target = torch.randn(4, 3, 16, 16, generator=g), torch.randn(4, 32, generator=g)

    def opt_for(m):
        return LARS(lars_param_groups(m, weight_decay=1e-4), lr=0.5, momentum=0.9)

    # A. fp32 FSDP + LARS == plain model + gradients averaged over ranks + LARS (sharding changes nothing)
    torch.manual_seed(0)
    ref = create_backbone("regnety_tiny", small_input=True)
    sh = fsdp_wrap(copy.deepcopy(ref), param_dtype=None)
    opt_ref, opt_sh = opt_for(ref), opt_for(sh)
    for _ in range(2):
        _loss(ref, x, target).backward()
        for p in ref.parameters():
            dist.all_reduce(p.grad)
            p.grad /= world
        opt_ref.step()
        opt_ref.zero_grad()
        _loss(sh, x, target).backward()
        opt_sh.step()
        opt_sh.zero_grad()
    full = {n: p.full_tensor() for n, p in sh.named_parameters()}
    res["fp32_max_param_diff"] = max((full[n] - p).abs().max().item() for n, p in ref.named_parameters())
    res["fp32_params_moved"] = min((full[n] - p).abs().max().item() for n, p in
                                   create_backbone("regnety_tiny", small_input=True).named_parameters()
                                   if p.ndim > 1)
    # gather_into (the online kNN's replica under --fsdp): the full parameters, and rank 0's BN statistics on every
    # rank (each rank's own statistics differ: its own data)
    rep = gather_into(sh, create_backbone("regnety_tiny", small_input=True))
    rp = dict(rep.named_parameters())
    res["gather_param_diff"] = max((rp[n] - p).abs().max().item() for n, p in ref.named_parameters())
    rb = dict(rep.named_buffers())
    res["gather_buffers"] = [rb[n].double().sum().item() for n, _ in ref.named_buffers()]
    res["ref_buffers"] = [b.double().sum().item() for _, b in ref.named_buffers()]

    # B. bf16 compute / fp32 reduce + activation checkpointing; sharded save -> load -> identical next steps
    def fresh(seed):
        torch.manual_seed(seed)
        m = fsdp_wrap(create_backbone("regnety_tiny", small_input=True))
        enable_activation_checkpointing(m)
        return m, opt_for(m)

    model, opt = fresh(0)
    losses = []
    for _ in range(2):
        loss = _loss(model, x, target)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    ckpt = os.path.join(out, "sharded")
    save_sharded(ckpt, model, opt, extra={"epoch": 2, "step": 2})
    full_sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    full_sd = {k: v.clone() for k, v in full_sd.items()}  # buffers come by reference and keep training
    after = []
    for _ in range(2):
        loss = _loss(model, x, target)
        loss.backward()
        opt.step()
        opt.zero_grad()
        after.append(loss.item())
    model2, opt2 = fresh(1)  # other init: everything must come from the checkpoint
    extra = load_sharded(ckpt, model2, opt2)
    resumed = []
    for _ in range(2):
        loss = _loss(model2, x, target)
        loss.backward()
        opt2.step()
        opt2.zero_grad()
        resumed.append(loss.item())
    res.update(losses=losses, after=after, resumed=resumed, extra=extra,
               param_dtype=str(next(iter(model.parameters())).dtype))

    # C. sharded -> consolidated -> sliced, tensor by tensor (rank 0, offline: no process group needed)
    dist.barrier()
    if rank == 0:
        conso = dcp_to_consolidated(ckpt, os.path.join(out, "conso.pth.tar"))
        c = torch.load(conso, weights_only=False)
        res["conso_keys_equal"] = sorted(c["state_dict"]) == sorted(full_sd)
        res["conso_equal"] = all(torch.equal(c["state_dict"][k], v) for k, v in full_sd.items())
        res["conso_extra"] = [c["epoch"], c["step"]]
        res["conso_has_momentum"] = all("momentum_buffer" in s for s in c["optimizer"]["state"].values())
        index = consolidated_to_sliced(conso, os.path.join(out, "sliced", "index.torch"))
        sl = SlicedCheckpoint(index).state_dict(("state_dict",))
        res["sliced_equal"] = sorted(sl) == sorted(full_sd) and all(torch.equal(sl[k], v) for k, v in full_sd.items())
        direct = SlicedCheckpoint(dcp_to_sliced(ckpt, os.path.join(out, "direct", "index.torch"))).state_dict()
        res["dcp_sliced_equal"] = sorted(direct) == sorted(full_sd) and all(
            torch.equal(direct[k], v) for k, v in full_sd.items())
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(res, f)
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory):
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    out = str(tmp_path_factory.mktemp("fsdp"))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), out], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return [json.load(open(os.path.join(out, f"rank{r}.json"))) for r in range(2)] + [out]


def test_fsdp_fp32_equals_unsharded_with_lars(fsdp_run):
    for r in fsdp_run[:2]:
        assert r["fp32_params_moved"] > 0  # not trivially equal
        assert r["fp32_max_param_diff"] < 1e-5
        assert r["gather_param_diff"] < 1e-5  # the replica holds the full (trained) parameters
        # rank 0's BN statistics on every rank (the sharded forward's own rounding: equal to the plain model's
        # within float32 error)
        assert r["gather_buffers"] == fsdp_run[0]["gather_buffers"]
        assert r["gather_buffers"] == pytest.approx(fsdp_run[0]["ref_buffers"], rel=1e-6, abs=1e-7)
    assert fsdp_run[1]["gather_buffers"] != pytest.approx(fsdp_run[1]["ref_buffers"], rel=1e-6, abs=1e-7)


def test_fsdp_bf16_sharded_resume_is_exact(fsdp_run):
    for r in fsdp_run[:2]:
        assert r["param_dtype"] == "torch.float32"  # sharded master weights stay fp32; compute is bf16
        assert all(v == v and abs(v) < 1e6 for v in r["losses"] + r["after"])  # finite
        assert r["resumed"] == r["after"]  # same loss at the next two steps: weights and LARS momentum restored
        assert r["extra"] == {"epoch": 2, "step": 2}
    assert fsdp_run[0]["losses"] != fsdp_run[1]["losses"]  # ranks saw different data


def test_sharded_consolidated_sliced_round_trip(fsdp_run):
    r = fsdp_run[0]
    assert r["conso_keys_equal"] and r["conso_equal"] and r["conso_extra"] == [2, 2] and r["conso_has_momentum"]
    assert r["sliced_equal"] and r["dcp_sliced_equal"]
    # the CLI gives the same file; sliced -> consolidated by CLI gives the model tensors back
    from smallssl.convert import main as convert

    out = fsdp_run[2]
    convert(["dcp2consolidated", os.path.join(out, "sharded"), os.path.join(out, "cli.pth.tar"), "--no-optimizer"])
    convert(["sliced2consolidated", os.path.join(out, "sliced", "index.torch"), os.path.join(out, "back.pth.tar")])
    ref = torch.load(os.path.join(out, "conso.pth.tar"), weights_only=False)
    for name in ("cli.pth.tar", "back.pth.tar"):
        c = torch.load(os.path.join(out, name), weights_only=False)
        assert "optimizer" not in c and c["epoch"] == 2
        assert c["state_dict"].keys() == ref["state_dict"].keys()
        assert all(torch.equal(c["state_dict"][k], v) for k, v in ref["state_dict"].items())


def test_errors_name_the_problem(tmp_path):
    from smallssl.checkpoints import CheckpointError
    from smallssl.checkpoints.sharded import dcp_to_consolidated
    from smallssl.fsdp import enable_activation_checkpointing, fsdp_wrap

    with pytest.raises(ValueError, match="regnety_"):
        enable_activation_checkpointing(torch.nn.Linear(2, 2))
    with pytest.raises(CheckpointError, match="does not exist"):
        dcp_to_consolidated(str(tmp_path / "nope"), str(tmp_path / "out.pth"))
    import torch.distributed as dist
    if not dist.is_initialized():
        with pytest.raises(RuntimeError, match="process group"):
            fsdp_wrap(torch.nn.Linear(2, 2))


if __name__ == "__main__":
    import torch.multiprocessing as mp

    import smallssl.fsdp  # noqa: F401  (imported once here; forked ranks inherit it)

    # fork: the ranks inherit the imported modules (spawn would re-import torch in each, ~2x slower on 2 cores)
    mp.start_processes(_worker, args=(2, sys.argv[1], _free_port()), nprocs=2, start_method="fork")
