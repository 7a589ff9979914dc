"""SimCLR / BYOL / SimSiam / Barlow Twins specifics: EMA schedule, stop-gradient, collapse monitor, flags -> kwargs,
and 2-process gloo DDP runs (the contract every method keeps is in test_contract.py)."""

import copy
import json
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from _tiny import TinyBackbone, views

import main_moco
from smallssl.checkpoints import load_checkpoint_file
from smallssl.methods.barlow import BarlowTwins, parse_sizes
from smallssl.methods.byol import BYOL
from smallssl.methods.simclr import SimCLR
from smallssl.methods.simsiam import SimSiam, normalized_std
from smallssl.optim import build_optimizer, param_groups

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


# ------------------------------------------------------------------------------------------------ BYOL
def test_byol_ema_follows_the_cosine_schedule_exactly():
    m = BYOL(TinyBackbone(), dim=4, hidden_dim=8, base_momentum=0.996)
    with torch.no_grad():
        for p in m.encoder_q.parameters():
            p.fill_(1.0)
        for p in m.encoder_k.parameters():
            p.fill_(0.0)
        m.encoder_q.backbone.bn.running_mean.fill_(3.0)
    total, expect = 7, 0.0
    for step in range(total):
        m.after_step(step=step, total_steps=total)
        tau = 1 - (1 - 0.996) * (math.cos(math.pi * step / total) + 1) / 2  # paper, section 3.2
        expect = tau * expect + (1 - tau) * 1.0
        assert m.momentum == pytest.approx(tau, abs=1e-12)
        for p in m.encoder_k.parameters():
            torch.testing.assert_close(p, torch.full_like(p, expect), rtol=1e-6, atol=1e-7)
    assert m.encoder_k.backbone.bn.running_mean.eq(3.0).all()  # buffers are copied
    m.after_step(step=total, total_steps=total)
    assert m.momentum == 1.0
    m.after_step(step=0, total_steps=total)
    assert m.momentum == pytest.approx(0.996)


def test_byol_target_gets_no_gradient_and_loss_is_symmetric():
    torch.manual_seed(0)
    m = BYOL(TinyBackbone(), dim=4, hidden_dim=8)
    x1, x2 = views()
    out = m([x1, x2])
    out["loss"].backward()
    assert all(p.grad is None for p in m.encoder_k.parameters())
    assert all(p.grad is not None for p in m.predictor.parameters())
    assert 0.0 <= float(out["loss"].detach()) <= 8.0
    torch.manual_seed(0)
    m2 = BYOL(TinyBackbone(), dim=4, hidden_dim=8)
    assert float(m2([x2, x1])["loss"].detach()) == pytest.approx(float(out["loss"].detach()), rel=1e-5)


# --------------------------------------------------------------------------------------------- SimSiam
def _grads(module: nn.Module) -> list[torch.Tensor]:
    return [p.grad.clone() for p in module.parameters() if p.grad is not None]


def test_simsiam_stop_gradient_no_grad_through_target_branch():
    torch.manual_seed(0)
    m = SimSiam(TinyBackbone(), dim=16, pred_dim=4, proj_layers=2)
    ref_detached, ref_full = copy.deepcopy(m), copy.deepcopy(m)
    x1, x2 = views()
    m([x1, x2])["loss"].backward()

    def manual(mod, detach):
        z1, z2 = mod.encoder_q(x1), mod.encoder_q(x2)
        p1, p2 = mod.predictor(z1), mod.predictor(z2)
        t1, t2 = (z1.detach(), z2.detach()) if detach else (z1, z2)
        return -(F.cosine_similarity(p1, t2).mean() + F.cosine_similarity(p2, t1).mean()) / 2

    manual(ref_detached, True).backward()
    manual(ref_full, False).backward()
    for a, b in zip(_grads(m), _grads(ref_detached)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    assert any(not torch.allclose(a, b, rtol=1e-3, atol=1e-6) for a, b in zip(_grads(m), _grads(ref_full)))


def test_simsiam_std_detects_collapse():
    z = torch.randn(4096, 256, generator=torch.Generator().manual_seed(0))
    assert float(normalized_std(z)) == pytest.approx(1 / math.sqrt(256), rel=0.05)
    assert float(normalized_std(torch.ones(16, 256) + 1e-9 * z[:16])) < 1e-6
    out = SimSiam(TinyBackbone(), dim=16, pred_dim=4)(views())
    assert 0.0 < float(out["std"]) <= 1.0 and -1.0 <= float(out["loss"].detach()) <= 1.0


# ----------------------------------------------------------------------------------- validation, flags
@pytest.mark.parametrize("cls,kwargs,match", [
    (SimCLR, dict(temperature=0.0), "temperature"),
    (SimCLR, dict(dim=0), "dim"),
    (BYOL, dict(base_momentum=1.5), "base_momentum"),
    (BYOL, dict(hidden_dim=-1), "hidden_dim"),
    (SimSiam, dict(proj_layers=0), "proj_layers"),
    (SimSiam, dict(pred_dim=0), "pred_dim"),
    (BarlowTwins, dict(lambd=-1.0), "lambd"),
    (BarlowTwins, dict(projector=(16, 0)), "projector"),
])
def test_bad_kwargs_raise_value_error(cls, kwargs, match):
    with pytest.raises(ValueError, match=match):
        cls(TinyBackbone(), **kwargs)


def test_two_views_required_and_barlow_batch_check():
    for cls, kw in ((SimCLR, {}), (BYOL, dict(hidden_dim=8)), (SimSiam, dict(dim=8, pred_dim=4)),
                    (BarlowTwins, dict(projector=(8,)))):
        with pytest.raises(ValueError, match="2 views"):
            cls(TinyBackbone(), **kw)(views() + views())
    with pytest.raises(ValueError, match="batch"):
        BarlowTwins(TinyBackbone(), projector=(8,)).check_batch(1)


def test_parse_sizes():
    assert parse_sizes("8192-8192-8192") == (8192, 8192, 8192) and parse_sizes("64") == (64,)
    for bad in ("", "8192-", "a-b", "64-0"):
        with pytest.raises(ValueError, match="dash-separated"):
            parse_sizes(bad)


def test_flags_become_kwargs():
    def build(*flags):
        args = main_moco.get_args_parser().parse_args(["DATA", *flags])
        return main_moco.build_method(args, TinyBackbone())

    m = build("--method", "simclr", "--simclr-t", "0.2", "--simclr-dim", "12", "--simclr-hidden", "24")
    assert m.temperature == 0.2 and m.encoder_q.head[0].out_features == 24 and m.encoder_q.head[-1].out_features == 12
    m = build("--method", "byol", "--byol-m", "0.99", "--byol-dim", "6", "--byol-hidden", "10")
    assert m.base_momentum == 0.99 and m.predictor[0].out_features == 10 and m.predictor[-1].out_features == 6
    m = build("--method", "simsiam", "--simsiam-dim", "20", "--simsiam-pred-dim", "5", "--simsiam-proj-layers", "2")
    assert m.predictor[0].out_features == 5 and sum(isinstance(x, nn.Linear) for x in m.encoder_q.head) == 2
    m = build("--method", "barlow", "--barlow-lambda", "0.01", "--barlow-proj", "16-16-9")
    assert m.lambd == 0.01 and [x.out_features for x in m.encoder_q.head if isinstance(x, nn.Linear)] == [16, 16, 9]
    defaults = main_moco.get_args_parser().parse_args(["DATA"])
    assert (defaults.simclr_t, defaults.byol_m, defaults.barlow_lambda, defaults.barlow_proj) == \
        (0.5, 0.996, 5e-3, "8192-8192-8192")


def test_simsiam_predictor_lr_fixed_and_barlow_bias_lr_scaled():
    from smallssl.optim import set_lr

    sim = SimSiam(TinyBackbone(), dim=16, pred_dim=4, proj_layers=2)
    opt = build_optimizer("sgd", param_groups(sim, 1e-4), lr=0.05)
    set_lr(opt, 0.01, base_lr=0.05)  # late in a cosine schedule
    pred = {id(p) for p in sim.predictor.parameters()}
    for g in opt.param_groups:
        is_pred = all(id(p) in pred for p in g["params"])
        assert g["lr"] == (0.05 if is_pred else 0.01)
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(sim.parameters()))
    free = SimSiam(TinyBackbone(), dim=16, pred_dim=4, proj_layers=2, fix_pred_lr=False)
    opt = build_optimizer("sgd", param_groups(free, 1e-4), lr=0.05)
    set_lr(opt, 0.01, base_lr=0.05)
    assert [g["lr"] for g in opt.param_groups] == [0.01]

    bt = BarlowTwins(TinyBackbone(), projector=(8, 8))
    opt = build_optimizer("lars", param_groups(bt, 1.5e-6, exclude_bias_and_norm=True), lr=0.2)
    set_lr(opt, 0.2, base_lr=0.2)
    for g in opt.param_groups:
        small = all(p.ndim <= 1 for p in g["params"])
        assert g["lr"] == pytest.approx(0.2 * 0.024 if small else 0.2)
        assert g["weight_decay"] == (0.0 if small else 1.5e-6)


def test_byol_asymmetric_views():
    from PIL import Image

    args = main_moco.get_args_parser().parse_args(["DATA", "--method", "byol", "--image-size", "16"])
    assert main_moco.byol_view_probs(args) == [(1.0, 0.0), (0.1, 0.2)]
    names = [[type(t).__name__ for t in tf.transforms] for tf in main_moco.build_transform(args).transforms]
    assert "RandomSolarize" not in names[0] and "RandomSolarize" in names[1]
    augs = main_moco.build_batch_augs(args)
    assert (augs[0].blur_p, augs[0].solarize_p, augs[1].blur_p, augs[1].solarize_p) == (1.0, 0.0, 0.1, 0.2)
    args = main_moco.get_args_parser().parse_args(["DATA", "--method", "byol", "--gaussian-blur", "0"])
    assert main_moco.byol_view_probs(args) == [(0.0, 0.0), (0.0, 0.2)]
    args = main_moco.get_args_parser().parse_args(["DATA", "--method", "byol", "--byol-aug", "same"])
    a, b = main_moco.build_batch_augs(args)
    assert a == b and a.solarize_p == 0
    # a solarised PIL view is the inverted image above 128 (white -> black)
    from smallssl.data import pretrain_transform
    tf = pretrain_transform(8, solarize=1.0, grey_scale=0.0, min_scale=1.0)
    tf.transforms = [t for t in tf.transforms if type(t).__name__ in ("RandomSolarize", "ToTensor")]
    assert tf(Image.new("RGB", (8, 8), (255, 255, 255))).max() == 0


# ---------------------------------------------------------------------------- 2-process gloo DDP runs
DDP_FLAGS = {
    "simclr": ["--simclr-dim", "16", "--simclr-hidden", "32"],
    "byol": ["--byol-dim", "16", "--byol-hidden", "32"],
    "simsiam": ["--simsiam-dim", "32", "--simsiam-pred-dim", "8", "--simsiam-proj-layers", "2"],
    "barlow": ["--barlow-proj", "32-32", "--batch-aug"],  # also covers --batch-aug under DDP (rank-sharded)
}


@pytest.mark.parametrize("name", sorted(DDP_FLAGS))
def test_ddp_two_processes_gloo_via_main_moco(name, tiny_data, tmp_path):
    """1 epoch of 2 steps (16 images, global batch 8 = 2 x 4) on 2 CPU processes; checkpoint in MoCo schema."""
    from smallssl.backbones import create_backbone

    cmd = [sys.executable, os.path.join(REPO, "main_moco.py"), tiny_data, "-a", "resnet18", "--image-size", "16",  # noqa
           "-b", "8", "-j", "0", "--subset", "16", "--epochs", "1", "--lr", "0.1", "--no-progress", "--seed", "1",
           "--method", name, *DDP_FLAGS[name], "--multiprocessing-distributed", "--nproc-per-node", "2",
           "--device", "cpu", "--ckpt-dir", str(tmp_path)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO,
                       env=dict(os.environ, OMP_NUM_THREADS="1", SMALLSSL_CACHE=str(tmp_path / "cache")))
    assert r.returncode == 0, r.stderr[-3000:]
    ckpt = load_checkpoint_file(tmp_path / "checkpoint_0001.pth.tar")
    assert ckpt["method"] == name and ckpt["step"] == 2
    from smallssl.checkpoints.export import memory_names

    state = memory_names(ckpt["state_dict"], ckpt["layout"])[0]  # each method's peer layout -> in-memory names
    torch.manual_seed(1)  # the trainer seeds, then builds the backbone first: its initial weights
    init = create_backbone("resnet18", small_input=True).state_dict()
    w = state["encoder_q.backbone.conv1.weight"]
    assert not torch.equal(w, init["conv1.weight"])
    if name == "byol":  # the EMA target moved, but only part of the way
        k = state["encoder_k.backbone.conv1.weight"]
        assert not torch.equal(k, init["conv1.weight"]) and not torch.equal(k, w)
    log = [json.loads(x) for x in open(tmp_path / "log.jsonl")]
    assert len(log) == 1 and math.isfinite(log[0]["loss"])
    if "replicas_in_sync" in log[0]:
        assert log[0]["replicas_in_sync"]
