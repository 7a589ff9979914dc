"""LARS / LARC against hand computations (apex LARC semantics as used by SwAV / SEER)."""

import pytest
import torch
import torch.nn as nn

from smallssl.lars import LARS, lars_param_groups


def _param(values, grad):
    p = nn.Parameter(torch.tensor(values, dtype=torch.float64))
    p.grad = torch.tensor(grad, dtype=torch.float64)
    return p


def test_one_step_by_hand():
    # w = (3, 4): ||w|| = 5; g = (0.6, 0.8): ||g|| = 1; wd = 0.1, trust = 1e-3, eps = 0
    # local_lr = 1e-3 * 5 / (1 + 0.1 * 5) = 1/300; d = (g + 0.1 w) / 300 = (0.9, 1.2) / 300 = (0.003, 0.004)
    # lr = 2: w <- w - 2 d = (2.994, 3.992)
    w = _param([3.0, 4.0], [0.6, 0.8])
    b = _param([1.0], [0.5])  # excluded: plain SGD, no decay: 1 - 2 * 0.5 = 0
    opt = LARS([{"params": [w], "weight_decay": 0.1, "lars": True}, {"params": [b], "weight_decay": 0.0,
                                                                      "lars": False}],
               lr=2.0, momentum=0.9, eps=0.0)
    opt.step()
    torch.testing.assert_close(w.data, torch.tensor([2.994, 3.992], dtype=torch.float64))
    torch.testing.assert_close(b.data, torch.tensor([0.0], dtype=torch.float64))
    # second step, same gradient: ||w'|| = 4.99, local_lr' = 1e-3 * 4.99 / (1 + 0.499); d' = (g + 0.1 w') * local_lr'
    # momentum buffer = 0.9 * d + d'
    wp = torch.tensor([2.994, 3.992], dtype=torch.float64)
    n = 1e-3 * 4.99 / (1 + 0.499)
    d2 = (torch.tensor([0.6, 0.8], dtype=torch.float64) + 0.1 * wp) * n
    buf = 0.9 * torch.tensor([0.003, 0.004], dtype=torch.float64) + d2
    w.grad = torch.tensor([0.6, 0.8], dtype=torch.float64)
    opt.step()
    torch.testing.assert_close(w.data, wp - 2.0 * buf)


def test_clip_and_zero_norms():
    # clip: local_lr = min(1/300 / lr, 1) with lr = 1e-3 -> min(3.33, 1) = 1: plain SGD on g + wd w
    w = _param([3.0, 4.0], [0.6, 0.8])
    LARS([w], lr=1e-3, momentum=0.0, weight_decay=0.1, clip=True, eps=0.0).step()
    torch.testing.assert_close(w.data, torch.tensor([3.0, 4.0], dtype=torch.float64) - 1e-3 * torch.tensor(
        [0.9, 1.2], dtype=torch.float64))
    # a zero weight keeps its raw gradient, without decay (apex LARC)
    z = _param([0.0, 0.0], [1.0, -1.0])
    LARS([z], lr=0.5, momentum=0.0, weight_decay=0.1).step()
    torch.testing.assert_close(z.data, torch.tensor([-0.5, 0.5], dtype=torch.float64))


def test_param_groups_exclude_bias_and_norm():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Linear(4, 2))
    groups = lars_param_groups(model, weight_decay=1e-5)
    assert [p.shape for p in groups[0]["params"]] == [torch.Size([4, 3, 3, 3]), torch.Size([2, 4])]
    assert len(groups[1]["params"]) == 4 and groups[1]["lars"] is False and groups[1]["weight_decay"] == 0.0
    with pytest.raises(ValueError, match="trust_coefficient"):
        LARS(model.parameters(), lr=0.1, trust_coefficient=0.0)
