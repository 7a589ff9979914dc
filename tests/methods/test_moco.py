"""MoCo: loss values, queue, momentum update, shuffle-BN emulation."""

import math

import pytest
import torch
import torch.nn.functional as F

from smallssl.backbones import create_backbone
from smallssl.losses import info_nce, info_nce_top1
from smallssl.methods.moco import MoCo


def test_info_nce_hand_built_batch():
    # Two queries in 2-d; queue of two keys. Logits computed by hand.
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    k = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    queue = torch.tensor([[0.0, 1.0], [-1.0, 0.0]])
    T = 0.5
    # row 0: pos 1/T=2, neg [0, -2]; row 1: pos 0, neg [2, 0]
    l0 = -2 + math.log(math.exp(2) + math.exp(0) + math.exp(-2))
    l1 = -0 + math.log(math.exp(0) + math.exp(2) + math.exp(0))
    assert info_nce(q, k, queue, T).item() == pytest.approx((l0 + l1) / 2, rel=1e-5)
    assert info_nce_top1(q, k, queue).item() == pytest.approx(50.0)


def test_info_nce_equal_similarities_is_log_k_plus_1():
    q = F.normalize(torch.ones(3, 4), dim=1)
    k = q.clone()
    queue = q[:1].repeat(7, 1)
    assert info_nce(q, k, queue, 0.07).item() == pytest.approx(math.log(8), rel=1e-5)


def _moco(K=8, m=0.9, splits=1, dim=4):
    torch.manual_seed(0)
    return MoCo(create_backbone("resnet18", small_input=True), dim=dim, K=K, m=m, T=0.2, mlp="v2",
                shuffle_bn_splits=splits)


def test_queue_starts_normalised_and_pointer_wraps():
    model = _moco(K=8)
    assert torch.allclose(model.queue.norm(dim=1), torch.ones(8), atol=1e-5)
    keys = [F.normalize(torch.randn(4, 4), dim=1) for _ in range(3)]
    model.enqueue(keys[0])
    assert int(model.queue_ptr) == 4 and torch.equal(model.queue[:4], keys[0])
    model.enqueue(keys[1])
    assert int(model.queue_ptr) == 0 and torch.equal(model.queue[4:], keys[1])
    model.enqueue(keys[2])  # wraps: overwrites the oldest keys
    assert int(model.queue_ptr) == 4 and torch.equal(model.queue[:4], keys[2])
    with pytest.raises(ValueError, match="multiple"):
        model.enqueue(torch.randn(3, 4))


def test_momentum_update_matches_formula():
    model = _moco(m=0.9)
    with torch.no_grad():
        for p in model.encoder_q.parameters():
            p.add_(1.0)
    before_k = [p.clone() for p in model.encoder_k.parameters()]
    q = [p.clone() for p in model.encoder_q.parameters()]
    model.momentum_update()
    for pk, bk, pq in zip(model.encoder_k.parameters(), before_k, q):
        torch.testing.assert_close(pk, 0.9 * bk + 0.1 * pq)


def test_key_encoder_updated_before_its_forward_and_no_grad():
    model = _moco(K=8, splits=2)
    x = [torch.randn(4, 3, 16, 16), torch.randn(4, 3, 16, 16)]
    out = model(x)
    out["loss"].backward()
    assert all(p.grad is None for p in model.encoder_k.parameters())
    assert any(p.grad is not None for p in model.encoder_q.parameters())
    assert int(model.queue_ptr) == 4


def test_check_batch_names_fix():
    model = _moco(K=8)
    with pytest.raises(ValueError, match="--moco-k 8 is not a multiple of the global batch size 3"):
        model.check_batch(3)


@pytest.mark.parametrize("bad", [dict(K=0), dict(m=1.0), dict(T=0.0), dict(shuffle_bn_splits=0),
                                 dict(queue_init="zeros")])
def test_constructor_validates(bad):
    kwargs = dict(dim=4, K=8, m=0.9, T=0.2, shuffle_bn_splits=1) | bad
    with pytest.raises(ValueError):
        MoCo(create_backbone("resnet18", small_input=True), **kwargs)


def test_shuffle_bn_emulation_uses_sub_batch_statistics():
    # With splits=2 the keys of the first half are computed with BN statistics of a random half; with the
    # identity order they would equal a separate forward of that half.
    model = _moco(splits=2)
    model.train()
    x = torch.randn(8, 3, 16, 16)
    torch.manual_seed(1)
    perm_keys = model._keys(x)
    torch.manual_seed(1)
    order = torch.randperm(8)
    halves = [model.encoder_k(c) for c in x[order].chunk(2)]
    expected = F.normalize(torch.cat(halves)[torch.argsort(order)], dim=1)
    torch.testing.assert_close(perm_keys, expected)


def test_symmetric_loss_is_the_sum_of_both_directions_and_enqueues_both_keys():
    """MoCo's CIFAR-10 demo: loss = loss_12 + loss_21 (a sum); both views' keys enqueued in one block."""
    torch.manual_seed(0)
    model = MoCo(create_backbone("resnet18", small_input=True), dim=4, K=8, m=0.0, T=0.2, mlp="v2",
                 shuffle_bn_splits=1, symmetric=True)
    model.eval()  # BN with running stats: an image embeds the same in any batch, so the reference can recompute
    x1, x2 = torch.randn(2, 3, 16, 16), torch.randn(2, 3, 16, 16)
    queue = model.queue.clone()
    out = model([x1, x2])
    with torch.no_grad():  # m = 0: after the update the key encoder equals the query encoder
        z1, z2 = (F.normalize(model.encoder_q(x), dim=1) for x in (x1, x2))
    ref = info_nce(z1, z2, queue, 0.2) + info_nce(z2, z1, queue, 0.2)
    assert out["loss"].item() == pytest.approx(ref.item(), rel=1e-5)
    assert int(model.queue_ptr) == 4  # 2 keys of each view
    torch.testing.assert_close(model.queue[:4], torch.cat([z2, z1]), atol=1e-5, rtol=0)  # view 2's keys first
    with pytest.raises(ValueError, match="--moco-k 8 is not a multiple of the global batch size 16"):
        model.check_batch(8)


def test_info_nce_by_hand_for_the_symmetric_sum():
    # one query per direction, dim 2, queue of one negative n = (0, 1), T = 0.5:
    # q1 = k1 = (1, 0): logits (1, 0) / 0.5 = (2, 0): loss_12 = log(1 + e^-2)
    # q2 = (0, 1), k = (1, 0): logits (0, 1) / 0.5 = (0, 2): loss_21 = log(1 + e^2)
    # symmetric loss = log(1 + e^-2) + log(1 + e^2) = 2.2538...; the mean would be half of that
    e1, e2, n = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]]), torch.tensor([[0.0, 1.0]])
    total = info_nce(e1, e1, n, 0.5) + info_nce(e2, e1, n, 0.5)
    assert total.item() == pytest.approx(math.log(1 + math.exp(-2)) + math.log(1 + math.exp(2)), rel=1e-6)


def test_batch_top1_tells_images_apart_not_steps():
    from smallssl.methods.moco import batch_top1

    torch.manual_seed(0)
    q = F.normalize(torch.randn(8, 16), dim=1)
    assert float(batch_top1(q, q)) == 100.0  # every key is its query's nearest
    assert float(batch_top1(q, q.roll(1, 0))) == 0.0  # every query's nearest key is another image's
    collapsed = q[:1].expand(8, -1)
    assert float(batch_top1(collapsed, collapsed)) == pytest.approx(100 / 8)  # one batch collapsed: chance (ties -> 0)


def test_empty_queue_trains_only_against_keys_written_so_far():
    torch.manual_seed(0)
    model = MoCo(create_backbone("resnet18", small_input=True), dim=4, K=8, m=0.0, T=0.2, mlp="v2",
                 shuffle_bn_splits=1, queue_init="empty")
    model.eval()  # BN with running stats: an image embeds the same in any batch, so the reference can recompute
    assert torch.count_nonzero(model.queue) == 0
    x1, x2 = torch.randn(2, 3, 16, 16), torch.randn(2, 3, 16, 16)
    out = model([x1, x2])  # step 1: no key written yet, no negatives: nothing to learn
    assert out["loss"].item() == 0.0 and float(out["acc1"]) == 100.0
    out["loss"].backward()
    assert all(p.grad is None or not p.grad.any() for p in model.encoder_q.parameters())
    assert int(model.queue_ptr) == 2 and torch.count_nonzero(model.queue[2:]) == 0
    written = model.queue[:2].clone()
    y1, y2 = torch.randn(2, 3, 16, 16), torch.randn(2, 3, 16, 16)
    out = model([y1, y2])  # step 2: exactly the two keys of step 1 are the negatives
    with torch.no_grad():
        q, k = (F.normalize(model.encoder_q(x), dim=1) for x in (y1, y2))
    assert out["loss"].item() == pytest.approx(info_nce(q, k, written, 0.2).item(), rel=1e-5)
    assert not model._queue_full
    for _ in range(3):  # 2 keys a step: written rows 4, 6, 8 = K: then the whole queue, as the random init's
        model([torch.randn(2, 3, 16, 16), torch.randn(2, 3, 16, 16)])
    assert torch.count_nonzero(model.queue.norm(dim=1)) == 8 and model.negatives().shape == (8, 4)
    assert model._queue_full
    # a partly filled queue loaded into this model (which has seen a full one): only its written rows again
    state = model.state_dict()
    state["queue"] = torch.cat([written, torch.zeros(6, 4)])
    model.load_state_dict(state)
    torch.testing.assert_close(model.negatives(), written)


def test_random_queue_uses_all_rows_from_the_first_step():
    model = _moco()
    assert model.negatives().shape == (8, 4) and model._queue_full
    torch.testing.assert_close(model.negatives(), model.queue)
