"""Learning-rate schedule and optimizers."""

import math

import pytest
import torch

from contrastlab.config import OptimConfig
from contrastlab.optim import LARS, build_optimizer, lr_at, param_groups


def test_warmup_then_cosine():
    cfg = OptimConfig(lr=1.0, warmup_epochs=2, final_lr=0.1)
    spe, total = 10, 100
    lrs = [lr_at(s, total, spe, cfg) for s in range(total)]
    assert lrs[0] == pytest.approx(1 / 20)
    assert lrs[19] == pytest.approx(1.0)  # end of warmup reaches the peak
    assert lrs[20] == pytest.approx(1.0)  # cosine starts at the peak
    assert lrs[-1] == pytest.approx(0.1)  # and ends at final_lr
    mid = 20 + (total - 20 - 1) / 2
    assert lr_at(int(mid), total, spe, cfg) == pytest.approx(
        0.1 + 0.45 * (1 + math.cos(math.pi * int(mid - 20) / 79))
    )
    assert all(a >= b for a, b in zip(lrs[20:], lrs[21:], strict=False))


def test_bias_and_norm_excluded_from_decay():
    net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4))
    groups = param_groups(net, OptimConfig(weight_decay=0.1))
    assert [len(g["params"]) for g in groups] == [1, 3]
    assert groups[1]["weight_decay"] == 0.0
    assert len(param_groups(net, OptimConfig(exclude_bias_and_norm=False))) == 1


def test_lars_matches_hand_computed_update():
    w = torch.nn.Parameter(torch.tensor([3.0, 4.0]))  # ||w|| = 5
    w.grad = torch.tensor([0.6, 0.8])  # ||g|| = 1
    opt = LARS([w], lr=0.1, momentum=0.9, weight_decay=0.0, eta=0.01)
    opt.step()
    trust = 0.01 * 5 / 1
    assert torch.allclose(
        w.detach(), torch.tensor([3.0, 4.0]) - 0.1 * trust * torch.tensor([0.6, 0.8])
    )


@pytest.mark.parametrize("name", ["sgd", "lars", "adamw"])
def test_each_optimizer_reduces_a_quadratic(name):
    torch.manual_seed(0)
    net = torch.nn.Linear(8, 1)
    x, y = torch.randn(64, 8), torch.randn(64, 1)
    opt = build_optimizer(net, OptimConfig(name=name, lr=0.05, lars_eta=0.02), torch.device("cpu"))
    first = None
    for _ in range(50):
        loss = (net(x) - y).pow(2).mean()
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.9 * first
