"""The method contract (smallssl/methods/base.py), checked for every entry of ``METHODS``, including the
test-only ``_contract_example`` that conftest.py registers: one training step in the trainer's hook order."""

import math

import pytest
import torch
from _tiny import TinyBackbone, tiny_kwargs, views

from smallssl.heads import Encoder
from smallssl.methods import METHODS
from smallssl.methods.base import SSLMethod
from smallssl.optim import build_optimizer, param_groups


def build(name: str) -> SSLMethod:
    torch.manual_seed(0)
    try:
        return METHODS[name](TinyBackbone(), **tiny_kwargs(name))
    except (TypeError, ValueError) as e:
        pytest.fail(f"METHODS[{name!r}] cannot be built with defaults ({e}); add small kwargs to tiny_kwargs()")


def test_the_test_only_method_is_registered():
    assert "_contract_example" in METHODS  # so the tests below also run on a method defined in the test suite


@pytest.mark.parametrize("name", sorted(METHODS))
def test_method_contract_one_step(name):
    method = build(name)
    assert isinstance(method, SSLMethod) and isinstance(type(method).supports_fsdp, bool)
    assert isinstance(method.encoder_q, Encoder) and method.backbone is method.encoder_q.backbone
    assert any(k.startswith("encoder_q.backbone.") for k in method.state_dict())  # what eval loads
    method.check_batch(8)
    method.set_epoch(0)
    options = method.param_group_options()
    assert isinstance(options, list) and all(isinstance(o, dict) for _, o in options)
    before = {k: v.detach().clone() for k, v in method.encoder_q.named_parameters()}
    opt = build_optimizer("sgd", param_groups(method, 1e-4), lr=0.5)
    method.train()
    out = method(views())
    loss = out["loss"]
    assert loss.dim() == 0 and torch.isfinite(loss) and loss.requires_grad
    for k, v in out.items():
        if k == "emb":  # the embeddings the loss saw, for the collapse monitor: (B, d) each, detached
            assert v and all(e.shape[0] == 8 and e.dim() == 2 and not e.requires_grad for e in v), k
        elif k == "feat":  # backbone features of the first view
            assert v.shape == (8, TinyBackbone.num_features) and not v.requires_grad
        else:
            assert math.isfinite(float(torch.as_tensor(v).detach())), k
    opt.zero_grad()
    loss.backward()
    # timm's check: every trainable parameter of the query encoder (backbone and head) gets a gradient
    for k, p in method.encoder_q.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and torch.isfinite(p.grad).all(), f"encoder_q.{k} got no/non-finite gradient"
    method.before_optimizer_step(step=0)
    opt.step()
    method.after_step(step=0, total_steps=10)
    changed = [k for k, v in method.encoder_q.named_parameters() if not torch.equal(v, before[k])]
    assert any(k.startswith("backbone.") for k in changed) and any(k.startswith("head.") for k in changed)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_copy_query_to_key_makes_every_momentum_encoder_equal(name):
    method = build(name)
    with torch.no_grad():
        for p in method.encoder_q.parameters():
            p.add_(1.0)  # the query encoder now differs from any key / target copy
    method.copy_query_to_key()
    key = getattr(method, "encoder_k", None)
    if key is not None:  # MoCo's key encoder, BYOL's target
        for (n, a), b in zip(method.encoder_q.state_dict().items(), key.state_dict().values()):
            assert torch.equal(a, b), n
