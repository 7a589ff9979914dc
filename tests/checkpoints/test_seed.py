"""SEED (Fang et al., 2021): loss values, frozen teacher, queue, teacher loading, SEED -> MoCo conversion,
and the tiny teacher -> SEED -> convert -> restart -> kNN pipeline."""

from __future__ import annotations

import math
import os
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

from kernels.seed_distill import seed_distill_reference
from smallssl.backbones import create_backbone
from smallssl.checkpoints import CheckpointError, atomic_save, restart_load
from smallssl.checkpoints.seed2moco import converted_path, distill_ckpt2moco_ckpt
from smallssl.checkpoints.teacher import RandomProjection, build_teacher, head_from_state
from smallssl.heads import Encoder, build_head
from smallssl.losses import info_nce, seed_distill, soft_cross_entropy
from smallssl.methods import METHODS
from smallssl.methods.seed import SEED

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(autouse=True)
def one_thread():
    # Small convnets on a shared 2-core CPU: one intra-op thread is several times faster than two spinning ones.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


class Tiny(nn.Module):
    """Pooled-feature backbone with BN (to check running statistics): (B, 3, H, W) -> (B, 8)."""

    def __init__(self, width: int = 8):
        super().__init__()
        self.conv = nn.Conv2d(3, width, 3, padding=1)
        self.bn = nn.BatchNorm2d(width)
        self.num_features = width

    def forward(self, x):
        return F.relu(self.bn(self.conv(x))).mean((2, 3))


def tiny_seed(K: int = 16, dim: int = 4, **kw) -> SEED:
    torch.manual_seed(0)
    teacher = Encoder(Tiny(), build_head("v2", 8, dim))
    return SEED(Tiny(), teacher=teacher, dim=dim, K=K, mlp="v2", **kw)


# ------------------------------------------------------------------------------------------------ loss
def _hand_loss(s, t, queue, ts, tt):
    """Plain-Python SEED loss: per row, -sum_j p_t(j) log p_s(j) over [positive, queue]."""
    total = 0.0
    for sb, tb in zip(s, t):
        dot = lambda a, b: sum(x * y for x, y in zip(a, b))  # noqa: E731
        ls = [dot(sb, tb) / ts] + [dot(sb, q) / ts for q in queue]
        lt = [dot(tb, tb) / tt] + [dot(tb, q) / tt for q in queue]
        mt = max(lt)
        pt = [math.exp(v - mt) for v in lt]
        pt = [v / sum(pt) for v in pt]
        ms = max(ls)
        lse = ms + math.log(sum(math.exp(v - ms) for v in ls))
        total += -sum(p * (v - lse) for p, v in zip(pt, ls))
    return total / len(s)


def test_seed_loss_matches_hand_computation():
    c, s_ = math.cos(0.3), math.sin(0.3)
    s = [[1.0, 0.0], [0.0, 1.0]]
    t = [[c, s_], [s_, c]]
    queue = [[1.0, 0.0], [-1.0, 0.0], [0.0, -1.0]]
    ts, tt = 0.2, 0.5  # a soft teacher: every target entry matters
    want = _hand_loss(s, t, queue, ts, tt)
    args = (torch.tensor(s), torch.tensor(t), torch.tensor(queue))
    assert seed_distill_reference(*args, ts, tt).item() == pytest.approx(want, rel=1e-5)
    assert seed_distill(*args, ts, tt).item() == pytest.approx(want, rel=1e-5)


def test_soft_cross_entropy_gradient_is_softmax_minus_target():
    g = torch.Generator().manual_seed(0)
    ls = torch.randn(3, 5, generator=g, requires_grad=True)
    lt = torch.randn(3, 5, generator=g)
    soft_cross_entropy(ls, lt).backward()
    assert torch.allclose(ls.grad, (ls.softmax(1) - lt.softmax(1)).detach() / 3, atol=1e-6)


def test_teacher_temperature_to_zero_gives_argmax_one_hot():
    g = torch.Generator().manual_seed(1)
    ls, lt = torch.randn(6, 9, generator=g), torch.randn(6, 9, generator=g)
    # soft CE with teacher logits / 1e-4 == hard CE on the teacher's argmax
    hard = F.cross_entropy(ls, lt.argmax(1))
    assert soft_cross_entropy(ls, lt / 1e-4).item() == pytest.approx(hard.item(), rel=1e-5)
    # ... and SEED with T_t -> 0 is InfoNCE with the teacher embedding as key (t.t = 1 is the argmax)
    s = F.normalize(torch.randn(4, 8, generator=g), dim=1)
    t = F.normalize(torch.randn(4, 8, generator=g), dim=1)
    queue = F.normalize(torch.randn(32, 8, generator=g), dim=1)
    assert seed_distill(s, t, queue, 0.2, 1e-4).item() == pytest.approx(info_nce(s, t, queue, 0.2).item(), rel=1e-5)
    # a larger teacher temperature spreads the target: the loss changes
    assert abs(seed_distill(s, t, queue, 0.2, 0.5).item() - info_nce(s, t, queue, 0.2).item()) > 1e-3


def test_seed_distill_validates_temperatures():
    x = F.normalize(torch.randn(2, 4), dim=1)
    with pytest.raises(ValueError, match="temperatures"):
        seed_distill_reference(x, x, x, 0.2, 0.0)


# ------------------------------------------------------------------------------------------- method
def test_registered_and_constructor_validates():
    assert METHODS["seed"] is SEED
    with pytest.raises(ValueError, match="teacher"):
        SEED(Tiny())
    with pytest.raises(ValueError, match="--teacher-proj random"):
        SEED(Tiny(), teacher=Encoder(Tiny(), nn.Identity()), dim=4, K=16)  # teacher 8-d, student 4-d
    with pytest.raises(ValueError, match="--seed-k 16"):
        tiny_seed(K=24).check_batch(16)


def test_teacher_frozen_student_trained():
    method = tiny_seed()
    teacher_before = {k: v.clone() for k, v in method.teacher.state_dict().items()}
    student_before = {k: v.clone() for k, v in method.encoder_q.state_dict().items()}
    opt = torch.optim.SGD([p for p in method.parameters() if p.requires_grad], lr=0.5)
    method.train()
    assert not method.teacher.training and method.encoder_q.training
    assert all(not p.requires_grad for p in method.teacher.parameters())
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        out = method([torch.randn(8, 3, 6, 6, generator=g)])
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        assert set(out) >= {"loss", "acc1", "agree"}
    for k, v in method.teacher.state_dict().items():  # weights and BN running statistics
        assert torch.equal(v, teacher_before[k]), k
    assert all(p.grad is None for p in method.teacher.parameters())
    changed = [k for k, v in method.encoder_q.state_dict().items() if not torch.equal(v, student_before[k])]
    assert "backbone.conv.weight" in changed and "backbone.bn.running_mean" in changed


def test_queue_holds_normalised_teacher_keys():
    method = tiny_seed(K=16)
    x1, x2 = torch.randn(8, 3, 6, 6), torch.randn(8, 3, 6, 6)
    method.train()
    method([x1])
    method([x2, torch.randn(8, 3, 6, 6)])  # a second view is ignored
    with torch.no_grad():
        want = F.normalize(method.teacher.eval()(torch.cat([x1, x2])), dim=1)
    assert torch.allclose(method.queue, want, atol=1e-6)
    assert torch.allclose(method.queue.norm(dim=1), torch.ones(16), atol=1e-6)
    assert int(method.queue_ptr) == 0  # 2 x 8 = K: wrapped


# ------------------------------------------------------------------------------------------ teachers
def _resnet18_state():
    torch.manual_seed(3)
    return create_backbone("resnet18").state_dict()


def test_teacher_from_official_moco_layout():
    bb = _resnet18_state()
    fc0, fc2 = nn.Linear(512, 512), nn.Linear(512, 128)
    state = {f"module.encoder_q.{k}": v for k, v in bb.items()}
    state.update({f"module.encoder_k.{k}": torch.zeros_like(v) for k, v in bb.items()})  # must not be used
    state.update({"module.encoder_q.fc.0.weight": fc0.weight, "module.encoder_q.fc.0.bias": fc0.bias,
                  "module.encoder_q.fc.2.weight": fc2.weight, "module.encoder_q.fc.2.bias": fc2.bias,
                  "module.queue": torch.randn(128, 64), "module.queue_ptr": torch.zeros(1, dtype=torch.long)})
    teacher = build_teacher(None, {"arch": "resnet18", "state_dict": state}, verbose=False)
    for k, v in teacher.backbone.state_dict().items():
        assert torch.equal(v, bb[k]), k
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        feat = teacher.backbone(x)
        assert torch.allclose(teacher(x), fc2(F.relu(fc0(feat))), atol=1e-5)
    assert not teacher.training and all(not p.requires_grad for p in teacher.parameters())


def test_teacher_from_torchvision_state_dict(tmp_path, capsys):
    path = str(tmp_path / "tv.pth")
    tv = torchvision.models.resnet18(weights=None)
    torch.save(tv.state_dict(), path)  # raw torchvision: backbone + ImageNet classifier (fc, 1000 classes)
    teacher = build_teacher("resnet18", path)
    assert "loaded 120 tensors" in capsys.readouterr().out
    assert isinstance(teacher.head, nn.Identity)  # the classifier is not a projection head
    assert torch.equal(teacher.backbone.conv1.weight, tv.conv1.weight)
    with pytest.raises(ValueError, match="512 dims but the student head into 128"):
        SEED(Tiny(), teacher=teacher, dim=128, K=16)
    assert SEED(Tiny(), teacher=teacher, dim=512, K=16).teacher is teacher
    proj = build_teacher("resnet18", path, proj="random", dim=128, seed=5, verbose=False)
    assert isinstance(proj.head, RandomProjection) and proj.head.weight.shape == (128, 512)
    assert torch.equal(proj.head.weight, RandomProjection(512, 128, seed=5).weight)  # fixed by the seed
    assert SEED(Tiny(), teacher=proj, dim=128, K=16).teacher is proj
    with pytest.raises(ValueError, match="no projection head"):
        build_teacher("resnet18", path, proj="head", verbose=False)


def test_teacher_from_swav_and_smallssl_layouts():
    bb = _resnet18_state()
    head = nn.Sequential(nn.Linear(512, 64), nn.BatchNorm1d(64), nn.ReLU(), nn.Linear(64, 16)).eval()
    head[1].running_mean.uniform_()
    swav = {f"module.{k}": v for k, v in bb.items()}
    swav.update({f"module.projection_head.{k}": v for k, v in head.state_dict().items()})
    swav["module.prototypes.weight"] = torch.randn(30, 16)
    t = build_teacher("resnet18", swav, verbose=False)
    x = torch.randn(2, 512)
    with torch.no_grad():
        assert torch.allclose(t.head(x), head(x), atol=1e-5)
    ours = {f"module.encoder_q.backbone.{k}": v for k, v in bb.items()}
    ours.update({f"module.encoder_q.head.{k}": v for k, v in head.state_dict().items()})
    t2 = build_teacher("resnet18", {"state_dict": ours}, verbose=False)
    with torch.no_grad():
        assert torch.allclose(t2.head(x), head(x), atol=1e-5)
    assert isinstance(head_from_state({"weight": torch.zeros(4, 8), "bias": torch.zeros(4)}), nn.Linear)  # v1 fc


def test_teacher_from_vissl_layout():
    vissl = pytest.importorskip("smallssl.checkpoints.vissl")
    torch.manual_seed(0)
    trunk = create_backbone("regnety_tiny", small_input=True)
    feat = trunk.num_features
    heads = {"0.projection_head.0.weight": torch.randn(8, feat), "0.projection_head.0.bias": torch.randn(8)}
    ckpt = vissl.to_vissl_checkpoint(trunk.state_dict(), heads)
    teacher = build_teacher("regnety_tiny", ckpt, small_input=True, verbose=False)
    for k, v in trunk.state_dict().items():
        assert torch.equal(teacher.backbone.state_dict()[k], v), k
    assert torch.equal(teacher.head[0].weight, heads["0.projection_head.0.weight"])


# ----------------------------------------------------------------------------------------- convert
def test_convert_smallssl_seed_checkpoint_round_trip(tmp_path):
    method = tiny_seed()
    state = {"module." + k: v for k, v in method.state_dict().items()}
    path = str(tmp_path / "run-checkpoint_0003.pth.tar")
    atomic_save({"epoch": 3, "arch": "tiny", "method": "seed", "state_dict": state, "optimizer": {}}, path)
    out = distill_ckpt2moco_ckpt(path)
    assert out == str(tmp_path / "converted_checkpoint_0003.pth.tar") == converted_path(path)
    ck = torch.load(out, weights_only=False)
    assert ck["method"] == "moco" and ck["epoch"] == 3 and "optimizer" not in ck
    # an earlier smallssl SEED file (encoder_q.backbone / head names) comes out in MoCo's own layout
    student = {k.replace("backbone.", "").replace("head.", "fc."): v for k, v in state.items()
               if k.startswith("module.encoder_q.")}
    assert set(ck["state_dict"]) == set(student) and ck["layout"] == "moco"  # no teacher keys, no queue
    for k, v in student.items():
        assert torch.equal(ck["state_dict"][k], v)
    out_q = distill_ckpt2moco_ckpt(path, str(tmp_path / "q.pth.tar"), keep_queue=True)
    sd = torch.load(out_q, weights_only=False)["state_dict"]
    assert set(sd) == set(student) | {"module.queue", "module.queue_ptr"}
    assert torch.equal(sd["module.queue"], method.queue.T)  # (K, dim) rows -> MoCo's (dim, K)
    # MoCo --restart from the converted checkpoint: the student becomes the query and key encoders
    torch.manual_seed(1)
    moco = METHODS["moco"](Tiny(), dim=4, K=16, mlp="v2")
    restart_load(moco, torch.load(out, weights_only=False), verbose=False)
    for k, v in method.encoder_q.state_dict().items():
        assert torch.equal(moco.encoder_q.state_dict()[k], v) and torch.equal(moco.encoder_k.state_dict()[k], v), k
    with pytest.raises(ValueError, match="overwrite"):
        distill_ckpt2moco_ckpt(path, path)


def test_convert_official_seed_layout_cli(tmp_path):
    from smallssl import convert

    bb = _resnet18_state()
    state = {f"module.student.{k}": v for k, v in bb.items()}
    state.update({"module.student.fc.0.weight": torch.randn(512, 512), "module.student.fc.0.bias": torch.zeros(512),
                  "module.student.fc.2.weight": torch.randn(128, 512), "module.student.fc.2.bias": torch.zeros(128)})
    state.update({f"module.teacher.{k}": torch.zeros_like(v) for k, v in bb.items()})
    state.update({"module.queue": F.normalize(torch.randn(128, 64), dim=0), "module.queue_ptr": torch.tensor([32])})
    path = str(tmp_path / "seed.pth.tar")
    torch.save({"epoch": 200, "arch": "resnet18", "state_dict": state}, path)
    convert.main(["seed2moco", path, "--keep-queue"])
    sd = torch.load(str(tmp_path / "converted_seed.pth.tar"), weights_only=False)["state_dict"]
    assert not any("teacher" in k or "student" in k for k in sd)
    assert len([k for k in sd if k.startswith("module.encoder_q.")]) == len(bb) + 4
    assert sd["module.encoder_q.fc.2.weight"].shape == (128, 512) and sd["module.queue"].shape == (128, 64)
    # --restart into MoCo v2 (resnet18, bare --mlp): backbone, head (fc -> head) and transposed queue
    torch.manual_seed(2)
    moco = METHODS["moco"](create_backbone("resnet18"), dim=128, K=64, mlp="v2")
    restart_load(moco, {"state_dict": sd}, verbose=False)
    assert torch.equal(moco.encoder_q.backbone.conv1.weight, bb["conv1.weight"])
    assert torch.equal(moco.encoder_q.head[2].weight, state["module.student.fc.2.weight"])
    assert torch.equal(moco.queue, state["module.queue"].T) and int(moco.queue_ptr) == 32
    torch.save({"state_dict": {"module.teacher.x": torch.zeros(1)}}, str(tmp_path / "t.pth"))
    with pytest.raises(CheckpointError, match="no student"):
        distill_ckpt2moco_ckpt(str(tmp_path / "t.pth"))


# ---------------------------------------------------------------------------------------- pipeline
def test_main_moco_seed_needs_teacher(tmp_path):
    sys.path.insert(0, REPO)
    import main_moco

    (tmp_path / "train" / "a").mkdir(parents=True)
    args = main_moco.get_args_parser().parse_args([str(tmp_path), "--method", "seed"])
    with pytest.raises(FileNotFoundError, match="--teacher-ckpt"):
        main_moco.validate_args(args)


def test_tiny_pipeline_end_to_end(tmp_path):
    sys.path.insert(0, REPO)
    from experiments.pipeline_seed import main

    res = main(["--tiny", "--out", str(tmp_path)])
    rows = {r["model"]: r for r in res["rows"]}
    assert rows["teacher (MoCo)"]["train_steps"] == 4 and rows["SEED student"]["train_steps"] == 4
    assert rows["SEED + MoCo restart"]["train_steps"] == 6  # SEED steps + the restarted MoCo's
    assert rows["MoCo-only student (2 ep)"]["train_steps"] == 4
    for r in rows.values():
        assert 0.0 <= r["knn_top1"] <= 100.0 and r["knn_top5"] >= r["knn_top1"]
    conv = torch.load(str(tmp_path / "seed" / "converted_checkpoint_0002.pth.tar"), weights_only=False)
    assert conv["method"] == "moco" and not any("teacher" in k for k in conv["state_dict"])
    seed_ck = torch.load(rows["SEED student"]["checkpoint"], weights_only=False)
    assert seed_ck["method"] == "seed" and any(k.startswith("module.teacher.") for k in seed_ck["state_dict"])
    teacher_ck = torch.load(rows["teacher (MoCo)"]["checkpoint"], weights_only=False)["state_dict"]
    for k, v in seed_ck["state_dict"].items():  # the teacher inside SEED is exactly the MoCo teacher
        if k.startswith("module.teacher.backbone."):
            assert torch.equal(v, teacher_ck["module.encoder_q." + k[len("module.teacher."):]]), k


def test_teacher_stem_follows_its_checkpoint():
    bb = _resnet18_state()  # ImageNet stem (7x7 conv1)
    state = {f"module.encoder_q.backbone.{k}": v for k, v in bb.items()}
    ck = {"arch": "resnet18", "state_dict": state, "args": {"small_input": False, "image_size": 32}}
    t = build_teacher(None, ck, default_small_input=True, verbose=False)  # student: CIFAR stem; teacher: its own
    assert t.backbone.conv1.kernel_size == (7, 7) and torch.equal(t.backbone.conv1.weight, bb["conv1.weight"])
    ck["args"] = {"small_input": None, "image_size": 32}  # trained with the automatic CIFAR stem: does not fit
    with pytest.raises(ValueError, match="does not fit"):
        build_teacher(None, ck, verbose=False)
