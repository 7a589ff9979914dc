"""SwAV / SEER: loss against a hand computation, Sinkhorn codes from the large crops only, frozen then
trained and always normalised prototypes, the queue, multi-crop shapes, LARS groups, flags, 2-process gloo FSDP2
through main_moco (sharded save -> resume -> identical weights), and SwAV / VISSL checkpoints as SEED teachers and
in eval."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
from PIL import Image

import main_moco
from kernels.sinkhorn import sinkhorn_reference
from smallssl.backbones import create_backbone
from smallssl.data import multicrop_transform
from smallssl.losses import swav_loss
from smallssl.methods import METHODS
from smallssl.methods.swav import SwAV, size_groups
from smallssl.optim import build_optimizer, param_groups

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class Pool(nn.Module):
    """Linear map of the per-channel mean: (B, 3, H, W) -> (B, 4); counts its calls and batch sizes."""

    num_features = 4

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 4)
        self.calls: list[int] = []

    def forward(self, x):
        self.calls.append(x.shape[0])
        return self.fc(x.mean((2, 3)))


def crops(b=4, sizes=(8, 8, 4, 4, 4), seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, 3, s, s, generator=g) for s in sizes]


# ------------------------------------------------------------------------------------------------ loss
def test_swav_loss_matches_hand_computation():
    # 3 crops, B = 2, K = 2; codes for crops 0 and 1
    s = [torch.tensor([[0.5, -0.5], [0.1, 0.2]]), torch.tensor([[0.0, 1.0], [0.3, -0.3]]),
         torch.tensor([[0.2, 0.2], [-1.0, 0.4]])]
    q = [torch.tensor([[0.9, 0.1], [0.3, 0.7]]), torch.tensor([[0.2, 0.8], [0.6, 0.4]])]
    T = 0.5

    def ce(qrow, srow):  # -sum_k q_k log softmax(s / T)_k, in plain floats
        z = [math.exp(v / T) for v in srow]
        return -sum(qk * math.log(zk / sum(z)) for qk, zk in zip(qrow, z))

    expect = 0.0
    for a in (0, 1):
        sub = [sum(ce(q[a][b].tolist(), s[v][b].tolist()) for b in range(2)) / 2 for v in range(3) if v != a]
        expect += sum(sub) / 2
    expect /= 2
    assert swav_loss(s, q, T).item() == pytest.approx(expect, rel=1e-6)
    # codes predicted from another crop only: with crops_for_assign=(2,) crop 2's codes are targets of 0 and 1
    one = swav_loss(s, [q[0]], T, crops_for_assign=[2])
    assert one.item() == pytest.approx(sum(sum(ce(q[0][b].tolist(), s[v][b].tolist()) for b in range(2)) / 2
                                           for v in (0, 1)) / 2, rel=1e-6)
    with pytest.raises(ValueError, match="crops"):
        swav_loss(s, q, T, crops_for_assign=[0, 3])
    with pytest.raises(ValueError, match="temperature"):
        swav_loss(s, q, 0.0)


def test_forward_codes_from_large_crops_one_backbone_call_per_size():
    torch.manual_seed(0)
    m = SwAV(Pool(), dim=6, hidden_dim=8, n_prototypes=5, temperature=0.1, epsilon=0.05, sinkhorn_iters=3)
    v = crops()
    out = m(v)
    assert m.backbone.calls == [8, 12]  # [2 x 8px crops], [3 x 4px crops] of batch 4
    assert size_groups(v) == [(0, 2), (2, 5)]
    with torch.no_grad():  # reference: same pipeline by hand
        feats = torch.cat([m.backbone.fc(x.mean((2, 3))) for x in v])
        z = nn.functional.normalize(m.encoder_q.head(feats), dim=1)
        scores = (z @ m.prototypes.weight.T).split(4)
        codes = [sinkhorn_reference(scores[c], 0.05, 3) for c in (0, 1)]
        expect = swav_loss(list(scores), codes, 0.1)
    torch.testing.assert_close(out["loss"].detach(), expect, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="crops_for_assign"):
        m(v[:1])


def test_prototypes_frozen_then_updated_and_normalised():
    torch.manual_seed(0)
    m = SwAV(Pool(), dim=6, hidden_dim=0, n_prototypes=5, freeze_prototypes_iters=2)
    assert torch.allclose(m.prototypes.weight.norm(dim=1), torch.ones(5))  # normalised at construction
    opt = build_optimizer("lars", param_groups(m, 1e-4, exclude_bias_and_norm=True), lr=1.0, weight_decay=1e-4)
    for step in range(4):
        before = m.prototypes.weight.detach().clone()
        out = m(crops(seed=step))
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        assert m.prototypes.weight.grad is not None and m.prototypes.weight.grad.abs().sum() > 0
        m.before_optimizer_step(step=step)  # what main_moco.train_one_epoch calls before optimizer.step()
        assert (m.prototypes.weight.grad is None) == (step < 2)
        opt.step()
        m.after_step(step=step, total_steps=4)
        moved = (m.prototypes.weight - before).abs().max().item()
        assert (moved < 1e-6) if step < 2 else (moved > 1e-4), (step, moved)  # renormalising: rounding only
        torch.testing.assert_close(m.prototypes.weight.norm(dim=1), torch.ones(5))  # normalised after the step


def test_queue_fills_from_its_epoch_and_is_used_once_full():
    torch.manual_seed(0)
    m = SwAV(Pool(), dim=6, hidden_dim=8, n_prototypes=5, queue_length=8, queue_start_epoch=1)
    m.check_batch(4)
    with pytest.raises(ValueError, match="multiple of the global batch"):
        m.check_batch(3)
    m.set_epoch(0)
    m(crops(seed=0))
    assert int(m.queue_count) == 0 and m.queue.abs().sum() == 0  # not started yet
    m.set_epoch(1)
    used = []
    for i in range(3):
        v = crops(seed=10 + i)
        out = m(v)
        used.append(float(out["queue_used"]))
        with torch.no_grad():
            z = m.embed(v)
        # newest embeddings of the two large crops at the front of their queue
        torch.testing.assert_close(m.queue[0, :4], z[:4])
        torch.testing.assert_close(m.queue[1, :4], z[4:8])
    assert used == [0.0, 0.0, 1.0] and int(m.queue_count) == 8
    # when used, the codes of crop 0 are Sinkhorn over [queue scores; batch scores], last B rows
    v = crops(seed=20)
    q0 = m.queue[0].clone()
    with torch.no_grad():
        z = m.embed(v)
        s_b = z[:4] @ m.prototypes.weight.T
        expect = sinkhorn_reference(torch.cat([q0 @ m.prototypes.weight.T, s_b]), m.epsilon, 3)[-4:]
        got = m._codes(s_b, z[:4], 0)
    torch.testing.assert_close(got, expect, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------- multicrop
def test_multicrop_shapes_and_validation():
    img = Image.new("RGB", (40, 30), (120, 60, 200))
    tf = multicrop_transform([24, 8], [2, 3], [0.5, 0.1], [1.0, 0.5])
    out = tf(img)
    assert [tuple(t.shape) for t in out] == [(3, 24, 24)] * 2 + [(3, 8, 8)] * 3
    with pytest.raises(ValueError, match="same non-zero length"):
        multicrop_transform([24, 8], [2], [0.5, 0.1], [1.0, 0.5])
    with pytest.raises(ValueError, match="min_scale"):
        multicrop_transform([24], [2], [0.6], [0.5])
    args = main_moco.get_args_parser().parse_args(["d", "--method", "swav", "--image-size", "32"])
    assert main_moco.swav_size_crops(args) == [32, 14]  # default: --image-size and 96/224 of it
    assert [tuple(t.shape) for t in main_moco.build_transform(args)(img)] == [(3, 32, 32)] * 2 + [(3, 14, 14)] * 6


# ------------------------------------------------------------------------------------ flags and optimiser
def test_flags_become_kwargs_and_bad_flags_fail_early(tiny_data):
    argv = ["d", "--method", "swav", "--swav-prototypes", "16000", "--swav-epsilon", "0.03", "--swav-iters", "10",
            "--swav-dim", "256", "--swav-hidden", "64", "--swav-t", "0.2", "--swav-queue-length", "64",
            "--swav-queue-start", "3", "--freeze-prototypes-iters", "7", "--crops-for-assign", "0"]
    m = main_moco.build_method(main_moco.get_args_parser().parse_args(argv), Pool())
    assert isinstance(m, METHODS["swav"]) and m.prototypes.weight.shape == (16000, 256)
    assert (m.epsilon, m.sinkhorn_iters, m.temperature, m.queue_length, m.queue_start_epoch,
            m.freeze_prototypes_iters, m.crops_for_assign) == (0.03, 10, 0.2, 64, 3, 7, (0,))
    assert m.encoder_q.head[0].out_features == 64
    base = [tiny_data, "-a", "regnety_tiny", "-b", "8"]
    for extra, match in ((["--method", "moco", "--fsdp", "--multiprocessing-distributed"], "not supported by"),
                         (["--method", "swav", "--fsdp"], "shards over processes"),
                         (["--method", "swav", "--crops-for-assign", "0", "9"], "must index"),
                         (["--method", "swav", "--lr-per-256", "-1"], "lr-per-256")):
        with pytest.raises(ValueError, match=match):
            main_moco.validate_args(main_moco.get_args_parser().parse_args(base + extra))


def test_lars_excludes_bias_and_norm_from_trust_ratio():
    torch.manual_seed(0)
    lin = nn.Linear(3, 2)
    lin.weight.grad, lin.bias.grad = torch.randn(2, 3), torch.randn(2)
    w0, b0, gw, gb = lin.weight.detach().clone(), lin.bias.detach().clone(), lin.weight.grad, lin.bias.grad
    opt = build_optimizer("lars", param_groups(lin, 0.1, exclude_bias_and_norm=True), lr=0.5, weight_decay=0.1)
    opt.step()
    torch.testing.assert_close(lin.bias.detach(), b0 - 0.5 * gb)  # plain SGD, no decay, no trust ratio
    trust = 1e-3 * w0.norm() / (gw.norm() + 0.1 * w0.norm() + 1e-8)
    torch.testing.assert_close(lin.weight.detach(), w0 - 0.5 * trust * (gw + 0.1 * w0))


# ------------------------------------------------------------------------------- FSDP2 through main_moco
SWAV_TINY = ["-a", "regnety_tiny", "--method", "swav", "--image-size", "16", "--size-crops", "16", "8",
             "--nmb-crops", "2", "2", "-b", "8", "-j", "0", "--epochs", "2", "--swav-prototypes", "10",
             "--swav-dim", "16", "--swav-hidden", "32", "--freeze-prototypes-iters", "3", "--optimizer", "lars",
             "--lr-per-256", "0.3", "--cos", "--warmup-epochs", "1", "--swav-queue-length", "8",
             "--swav-queue-start", "1", "--no-progress", "--seed", "1"]
FSDP = ["--fsdp", "--activation-checkpointing", "--amp", "bf16", "--multiprocessing-distributed",
        "--nproc-per-node", "2"]


def _train(data, ckpt_dir, *extra):
    cmd = [sys.executable, os.path.join(REPO, "main_moco.py"), data, *SWAV_TINY, *FSDP, "--ckpt-dir", str(ckpt_dir),
           *map(str, extra)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=400, cwd=REPO,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    return r


def test_fsdp_two_processes_sharded_resume_is_exact(tmp_path):
    import torch.distributed as dist

    from smallssl.checkpoints.sharded import dcp_to_consolidated
    from tests.conftest import make_image_folder

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    data = make_image_folder(tmp_path / "data", classes=2, per_class=8, size=16)
    knn = tmp_path / "knn"
    make_image_folder(knn / "train", classes=2, per_class=6, size=16)
    make_image_folder(knn / "val", classes=2, per_class=3, size=16)
    # 2 epochs uninterrupted, with the online kNN on the gathered backbone; prototypes frozen for 3 of the 4 steps,
    # so the epoch-1 checkpoint is saved while they have no optimizer state yet (the resumed optimizer must still
    # find every key)
    _train(data, tmp_path / "a", "--knn-every", "1", "--knn-data", knn)
    r = _train(data, tmp_path / "b", "--resume", tmp_path / "a" / "checkpoint_0001")  # epoch 2 from the shards
    assert "resumed" in r.stdout and "at epoch 1, iteration 0 (step 2)" in r.stdout
    la = [json.loads(x) for x in open(tmp_path / "a" / "log.jsonl")]
    lb = [json.loads(x) for x in open(tmp_path / "b" / "log.jsonl")]
    assert all(math.isfinite(x["loss"]) for x in la) and la[0]["loss"] != la[1]["loss"]
    assert lb[0]["epoch"] == 1 and lb[0]["loss"] == la[1]["loss"]  # the next steps' loss is identical
    a = torch.load(dcp_to_consolidated(str(tmp_path / "a" / "checkpoint_0002"), str(tmp_path / "a.pth")),
                   weights_only=False)
    b = torch.load(dcp_to_consolidated(str(tmp_path / "b" / "checkpoint_0002"), str(tmp_path / "b.pth")),
                   weights_only=False)
    assert (a["epoch"], a["step"], a["arch"], a["method"]) == (2, 4, "regnety_tiny", "swav")
    assert a["args"]["fsdp"] is True and a["args"]["lr"] == pytest.approx(0.3 * 8 / 256)  # --lr-per-256
    sa, sb = a["state_dict"], b["state_dict"]
    assert sa.keys() == sb.keys() and "encoder_q.backbone.stem.conv.weight" in sa
    assert all(torch.equal(sa[k], sb[k]) for k in sa)  # identical final weights, BN statistics and queue
    torch.testing.assert_close(sa["prototypes.weight"].norm(dim=1), torch.ones(10))
    assert int(sa["queue_count"]) == 8 and sa["queue"].abs().sum() > 0  # filled during epoch 1 (2 x 8 rows)
    # the consolidated file is a SEED teacher and an eval backbone
    from smallssl.checkpoints.teacher import build_teacher

    teacher = build_teacher(None, str(tmp_path / "a.pth"), verbose=False)
    assert teacher.head[3].out_features == 16
    torch.testing.assert_close(teacher.backbone.stem.conv.weight, sa["encoder_q.backbone.stem.conv.weight"])
    # the online kNN under FSDP (run a only; run b, resumed without it, still ends identical above): at step 0 and
    # after each epoch, and the last one is the kNN of the consolidated checkpoint's backbone in one process
    from eval.online import OnlineKNN

    knn_rows = [x for x in map(json.loads, open(tmp_path / "a" / "steps.jsonl")) if "knn_top1" in x]
    assert [x["knn_step"] for x in knn_rows] == [0, 2, 4] and all(x["knn_bank"] == 12 for x in knn_rows)
    ref = OnlineKNN(str(knn), 16, verbose=False, workers=0).evaluate(teacher.backbone)
    assert (ref["knn_top1"], ref["knn_top5"]) == (knn_rows[-1]["knn_top1"], knn_rows[-1]["knn_top5"])


# --------------------------------------------------------------------- checkpoints as teacher / for eval
def _swav_and_vissl_checkpoints(tmp_path):
    """A smallssl SwAV checkpoint of regnety_tiny (main_moco schema) and the same weights in VISSL's layout."""
    from smallssl.checkpoints.vissl import save_vissl_checkpoint

    torch.manual_seed(0)
    m = SwAV(create_backbone("regnety_tiny", small_input=True), dim=16, hidden_dim=32, n_prototypes=10)
    m.train()
    m(crops(b=4, sizes=(16, 16, 8)))  # BN running statistics move away from their init
    sd = {"module." + k: v for k, v in m.state_dict().items()}
    swav_path = str(tmp_path / "swav.pth.tar")
    torch.save({"epoch": 1, "arch": "regnety_tiny", "method": "swav", "state_dict": sd,
                "args": {"image_size": 16, "small_input": None}}, swav_path)
    heads = {f"0.projection_head.{k}": v for k, v in m.encoder_q.head.state_dict().items()}
    heads["0.prototypes0.weight"] = m.prototypes.weight.detach()
    vissl_path = save_vissl_checkpoint(str(tmp_path / "seer.torch"), m.backbone.state_dict(), heads)
    return m.eval(), swav_path, vissl_path


def test_swav_and_vissl_checkpoints_load_as_seed_teacher_and_in_eval(tmp_path):
    from eval.features import build_model
    from smallssl.checkpoints.teacher import build_teacher
    from smallssl.convert import main as convert
    from smallssl.methods.seed import SEED

    m, swav_path, vissl_path = _swav_and_vissl_checkpoints(tmp_path)
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        feat, emb = m.backbone(x), m.encoder_q(x)
    for ckpt in (swav_path, vissl_path):
        teacher = build_teacher("regnety_tiny", ckpt, small_input=True, verbose=False)
        with torch.no_grad():
            torch.testing.assert_close(teacher(x), emb)  # backbone and SwAV projection head
        student = SEED(create_backbone("regnety_tiny", small_input=True), teacher=teacher, dim=16, K=8)
        assert torch.isfinite(student([x[:2]])["loss"])
    # eval.linear / eval.knn build the frozen backbone with eval.features.build_model (load_backbone): the VISSL
    # file loads directly and after conversion
    out = str(tmp_path / "seer_smallssl.pth.tar")
    convert(["vissl2smallssl", vissl_path, out, "--arch", "regnety_tiny"])
    for ckpt in (swav_path, out, vissl_path):
        backbone = build_model("regnety_tiny", ckpt, small_input=True, image_size=16, verbose=False)
        with torch.no_grad():
            torch.testing.assert_close(backbone(x), feat)
