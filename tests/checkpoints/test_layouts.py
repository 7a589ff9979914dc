"""Round trips through every peer layout: smallssl writes it, the peer's own loading rule accepts it with equal
weights, and smallssl reads files built from the peer's documented key names and shapes.

The peers' loading rules are re-stated here from their code (MoCo / ssl-small ``main_lincls.py``,
``util.load_model``; SEED ``main_lincls.py``; SwAV ``eval_linear.py``; VISSL's trunk layout and sliced loader).
"""

import os

import pytest
import torch
import torch.nn.functional as F
import torchvision

from smallssl.backbones import create_backbone
from smallssl.checkpoints import CheckpointError, CheckpointMismatchError, load_backbone, restart_load
from smallssl.checkpoints.export import export_checkpoint
from smallssl.checkpoints.native import from_native, to_native
from smallssl.checkpoints.resume import resume_exact, training_state
from smallssl.checkpoints.seed2moco import convert_state
from smallssl.heads import Encoder, build_head
from smallssl.methods import METHODS

torch.set_grad_enabled(True)


def _randomise(module, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in module.state_dict().values():
            if t.is_floating_point():
                t.copy_(torch.randn(t.shape, generator=g))
    return module


def _opt(method):
    return torch.optim.SGD([p for p in method.parameters() if p.requires_grad], lr=0.1)


def _state(method, name, opt=None):
    opt = opt or _opt(method)
    return training_state(method, opt, None, [], epoch=1, it=0, step=4, arch="resnet18", method_name=name,
                          global_batch=8, dataset_len=32, args={})


def _moco(mlp="v2", K=32, dim=16, seed=0):
    torch.manual_seed(seed)
    return _randomise(METHODS["moco"](create_backbone("resnet18", small_input=True), dim=dim, K=K, mlp=mlp), seed)


def _assert_equal_states(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def _moco_lincls(state, prefix="module.encoder_q."):
    """MoCo's main_lincls.py (and ssl-small's util.load_model, SEED's main_lincls.py with module.student.):
    keep prefix-but-not-fc keys, strip the prefix, load non-strictly, assert the missing keys are the fc."""
    sd = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix) and not k.startswith(prefix + "fc")}
    model = torchvision.models.resnet18()
    model.conv1 = torch.nn.Conv2d(3, 64, 3, 1, 1, bias=False)  # the CIFAR stem the backbone was built with
    msg = model.load_state_dict(sd, strict=False)
    assert set(msg.missing_keys) == {"fc.weight", "fc.bias"} and not msg.unexpected_keys
    return model


# ------------------------------------------------------------------------------------------------- MoCo
@pytest.mark.parametrize("mlp", ["v2", "none"])
def test_moco_writes_moco_layout_read_by_main_lincls_and_resumes_bit_for_bit(mlp):
    m = _moco(mlp)
    ckpt = _state(m, "moco")
    sd = ckpt["state_dict"]
    assert ckpt["layout"] == "moco" and sd["module.queue"].shape == (16, 32)  # MoCo's (dim, K)
    assert torch.equal(sd["module.queue"], m.queue.T)
    head_keys = {k for k in sd if k.startswith("module.encoder_q.fc")}
    assert head_keys == ({"module.encoder_q.fc.weight", "module.encoder_q.fc.bias"} if mlp == "none" else
                         {f"module.encoder_q.fc.{i}.{p}" for i in (0, 2) for p in ("weight", "bias")})
    model = _moco_lincls(sd)
    for k, v in m.encoder_q.backbone.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k
    fresh = _moco(mlp, seed=5)
    assert resume_exact(fresh, _opt(fresh), None, ckpt, "c", arch="resnet18",
                        method_name="moco", global_batch=8, dataset_len=32) == (1, 0, 4)
    _assert_equal_states(fresh.state_dict(), m.state_dict())


def test_earlier_smallssl_files_still_resume_and_hint_the_renamed_head():
    m = _moco("v2")
    old = {"module." + k: v for k, v in m.state_dict().items()}  # encoder_q.backbone.* and a (K, dim) queue
    ckpt = {"epoch": 1, "arch": "resnet18", "method": "moco", "state_dict": old}
    fresh = _moco("v2", seed=3)
    resume_exact(fresh, _opt(fresh), None, ckpt, "old", arch="resnet18",
                 method_name="moco", global_batch=8, dataset_len=32)
    _assert_equal_states(fresh.state_dict(), m.state_dict())
    # an earlier "--mlp wide" (2048 + BN) file resumed with today's ssl-small wide: the error names the head
    wide_bn = _moco("wide_bn")
    ckpt = {"epoch": 1, "method": "moco", "state_dict": {"module." + k: v for k, v in wide_bn.state_dict().items()}}
    other = _moco("wide")
    with pytest.raises(CheckpointMismatchError, match="--mlp wide_bn"):
        resume_exact(other, _opt(other), None, ckpt, "old", arch="resnet18",
                     method_name="moco", global_batch=8, dataset_len=32)


def test_official_moco_file_square_queue_is_transposed_by_layout_and_exports_back():
    """A file in MoCo's documented layout with K == dim (a square queue: shape cannot tell the orientation)."""
    bb = _randomise(create_backbone("resnet18", small_input=True), 1).state_dict()
    head = _randomise(build_head("v2", 512, 16), 2).state_dict()
    queue = F.normalize(torch.randn(16, 16), dim=0)  # (dim, K), K == dim
    sd = {f"module.encoder_q.{k}": v for k, v in bb.items()} | {f"module.encoder_q.fc.{k}": v for k, v in head.items()}
    sd |= {f"module.encoder_k.{k}": torch.zeros_like(v) for k, v in bb.items()}
    sd |= {"module.queue": queue, "module.queue_ptr": torch.tensor([8])}
    m = _moco("v2", K=16, seed=9)
    restart_load(m, {"state_dict": sd, "arch": "resnet18"}, verbose=False)
    assert torch.equal(m.queue, queue.T) and int(m.queue_ptr) == 8
    _assert_equal_states(m.encoder_q.backbone.state_dict(), bb)
    _assert_equal_states(m.encoder_k.state_dict(), m.encoder_q.state_dict())  # key encoder copied
    _assert_equal_states(m.encoder_q.head.state_dict(), head)
    out = export_checkpoint({"state_dict": {"module." + k: v for k, v in m.state_dict().items()}}, "moco")
    for k in sd:
        if not k.startswith("module.encoder_k"):
            assert torch.equal(out["state_dict"][k], sd[k]), k


def test_restart_with_another_moco_k_skips_queue_and_pointer_together():
    src = _moco("v2", K=64)
    src.queue_ptr.fill_(40)
    ckpt = _state(src, "moco")
    m = _moco("v2", K=32, seed=4)
    fresh_queue = m.queue.clone()
    restart_load(m, ckpt, verbose=False)
    assert torch.equal(m.queue, fresh_queue) and int(m.queue_ptr) == 0
    m.enqueue(F.normalize(torch.randn(8, 16), dim=1))  # the first step's enqueue works
    assert int(m.queue_ptr) == 8
    _assert_equal_states(m.encoder_q.state_dict(), src.encoder_q.state_dict())


def test_ssl_small_heads_and_v1_fc_restore_on_restart():
    d, dim = 512, 16
    shapes = {k: tuple(v.shape) for k, v in build_head("wide", d, dim).state_dict().items()}
    assert shapes == {"0.weight": (2 * d, d), "0.bias": (2 * d,), "2.weight": (dim, 2 * d), "2.bias": (dim,)}
    assert {k: tuple(v.shape) for k, v in build_head("simple", d, dim).state_dict().items()} == \
        {"0.weight": (d, d), "0.bias": (d,), "2.weight": (dim, d), "2.bias": (dim,)}
    assert [k for k in build_head("deep", d, dim).state_dict()][-1] == "4.bias"
    assert "3.weight" in build_head("dropout", d, dim).state_dict()
    bb = _randomise(create_backbone("resnet18", small_input=True), 1).state_dict()
    for mlp, head in (("wide", build_head("wide", d, dim)), ("none", torch.nn.Linear(d, dim))):
        head = _randomise(head, 3)
        sd = {f"module.encoder_q.{k}": v for k, v in bb.items()}  # ssl-small / MoCo v1: fc.* / fc.weight
        sd |= {f"module.encoder_q.fc.{k}": v for k, v in head.state_dict().items()}
        m = _moco(mlp, seed=7)
        restart_load(m, {"state_dict": sd}, verbose=False)
        ours = m.encoder_q.head.state_dict()
        theirs = head.state_dict() if mlp == "wide" else {"0." + k: v for k, v in head.state_dict().items()}
        _assert_equal_states(ours, theirs)


# ------------------------------------------------------------------------------------------------- SEED
def _seed(student="resnet18", teacher="resnet34", K=32, dim=16):
    torch.manual_seed(0)
    t = _randomise(Encoder(create_backbone(teacher, small_input=True), build_head("v2", 512, dim)), 1).eval()
    s = METHODS["seed"](create_backbone(student, small_input=True), teacher=t, dim=dim, K=K, mlp="v2")
    return _randomise(s, 2)


def test_seed_writes_seed_layout_read_by_seed_lincls_resumes_and_never_gives_the_teacher():
    s = _seed()
    ckpt = _state(s, "seed")
    sd = ckpt["state_dict"]
    assert ckpt["layout"] == "seed" and sd["module.queue"].shape == (16, 32)
    assert any(k.startswith("module.teacher.fc.") for k in sd)
    model = _moco_lincls(sd, prefix="module.student.")  # SEED's main_lincls.py rule
    _assert_equal_states({k: model.state_dict()[k] for k in s.backbone.state_dict()}, s.backbone.state_dict())
    fresh = _seed()
    _randomise(fresh.encoder_q, 8)
    resume_exact(fresh, _opt(fresh), None, ckpt,
                 "c", arch="resnet18", method_name="seed", global_batch=8, dataset_len=32)
    _assert_equal_states(fresh.state_dict(), s.state_dict())
    # -a resnet34 on this file: the resnet34 in it is the teacher; never evaluated instead of the student
    with pytest.raises(CheckpointMismatchError, match="module.teacher."):
        load_backbone(create_backbone("resnet34", small_input=True), ckpt, verbose=False)
    r18 = create_backbone("resnet18", small_input=True)
    load_backbone(r18, ckpt, verbose=False)
    _assert_equal_states(r18.state_dict(), s.backbone.state_dict())


@pytest.mark.parametrize("kind", ["official", "sslsmall_converted", "smallssl"])
def test_restart_from_seed_files_never_carries_the_teacher_queue(kind):
    s = _seed()
    sd = _state(s, "seed")["state_dict"]
    if kind == "sslsmall_converted":  # ssl-small's distill_ckpt2moco_ckpt: student copied to encoder_q, queue kept
        sd = {k: v for k, v in sd.items() if not k.startswith("module.teacher.")}
        sd |= {"module.encoder_q." + k[len("module.student."):]: v for k, v in sd.items()
               if k.startswith("module.student.")}
    ckpt = {"state_dict": sd} if kind != "smallssl" else {"state_dict": sd, "method": "seed", "layout": "seed"}
    m = _moco("v2", K=32, seed=6)
    fresh_queue = m.queue.clone()
    restart_load(m, ckpt, verbose=False)
    assert torch.equal(m.queue, fresh_queue)
    _assert_equal_states(m.encoder_q.state_dict(), s.encoder_q.state_dict())


def test_seed2moco_refuses_non_seed_files_and_writes_moco_layout():
    m = _moco("v2")
    with pytest.raises(CheckpointError, match="not a SEED checkpoint"):
        convert_state(_state(m, "moco")["state_dict"])
    s = _seed()
    out, log = convert_state(_state(s, "seed")["state_dict"], keep_queue=True)
    model = _moco_lincls(out)
    _assert_equal_states({k: model.state_dict()[k] for k in s.backbone.state_dict()}, s.backbone.state_dict())
    assert torch.equal(out["module.queue"], s.queue.T) and not any("teacher" in k for k in out)


# ------------------------------------------------------------------------------------------------- SwAV
def test_swav_writes_swav_layout_read_by_eval_linear_and_resumes():
    torch.manual_seed(0)
    sw = _randomise(METHODS["swav"](create_backbone("resnet18", small_input=True), dim=16, n_prototypes=10,
                                    hidden_dim=32, queue_length=0), 1)
    ckpt = _state(sw, "swav")
    sd = ckpt["state_dict"]
    assert ckpt["layout"] == "swav" and "module.prototypes.weight" in sd and "module.projection_head.0.weight" in sd
    # SwAV's eval_linear.py: replace "module." everywhere, load non-strictly into its ResNet (torchvision names)
    loaded = {k.replace("module.", ""): v for k, v in sd.items()}
    model = torchvision.models.resnet18()
    model.conv1 = torch.nn.Conv2d(3, 64, 3, 1, 1, bias=False)
    msg = model.load_state_dict({k: v for k, v in loaded.items() if k in model.state_dict()}, strict=False)
    assert set(msg.missing_keys) == {"fc.weight", "fc.bias"}
    _assert_equal_states({k: model.state_dict()[k] for k in sw.backbone.state_dict()}, sw.backbone.state_dict())
    fresh = METHODS["swav"](create_backbone("resnet18", small_input=True), dim=16, n_prototypes=10, hidden_dim=32,
                            queue_length=0)
    resume_exact(fresh, _opt(fresh), None, ckpt, "c", arch="resnet18",
                 method_name="swav", global_batch=8, dataset_len=32)
    _assert_equal_states(fresh.state_dict(), sw.state_dict())


@pytest.mark.parametrize("to", ["moco", "sslsmall", "swav", "timm", "torchvision"])
def test_export_old_file_to_every_target(to, tmp_path):
    from smallssl.convert import main as convert

    m = _moco("v2")
    path = tmp_path / "old.pth.tar"
    torch.save({"epoch": 3, "arch": "resnet18", "state_dict": {"module." + k: v for k, v in m.state_dict().items()}},
               path)
    convert(["export", str(path), str(tmp_path / "out.pth"), "--to", to])
    out = torch.load(tmp_path / "out.pth", weights_only=False)
    if to in ("moco", "sslsmall"):
        model = _moco_lincls(out["state_dict"])
    else:
        sd = out if to in ("timm", "torchvision") else {k.replace("module.", ""): v for k, v in
                                                         out["state_dict"].items()}
        model = torchvision.models.resnet18()
        model.conv1 = torch.nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        msg = model.load_state_dict({k: v for k, v in sd.items() if k in model.state_dict()}, strict=False)
        assert set(msg.missing_keys) == {"fc.weight", "fc.bias"}
    _assert_equal_states({k: model.state_dict()[k] for k in m.backbone.state_dict()}, m.backbone.state_dict())
    back = create_backbone("resnet18", small_input=True)
    load_backbone(back, out if to not in ("timm", "torchvision") else {"state_dict": out}, verbose=False)
    _assert_equal_states(back.state_dict(), m.backbone.state_dict())


def test_from_native_renames_only_what_the_model_has():
    m = _moco("none")
    sd = to_native(m.state_dict(), "moco")
    back, layout, unused = from_native(sd | {"module.extra": torch.zeros(1)}, m.state_dict().keys())
    assert layout == "moco" and unused == ["module.extra"]
    _assert_equal_states(back, m.state_dict())
    assert os.path.basename(__file__).startswith("test_")
