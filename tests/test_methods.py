"""Every registered method trains on CPU; MoCo's momentum encoder and queue behave."""

import pytest
import torch

from contrastlab.config import METHOD_CONFIGS
from contrastlab.methods import METHODS, build_method
from contrastlab.models import MomentumEncoder, Queue
from contrastlab.train import Trainer
from tests.conftest import tiny_config


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_method_trains_one_step(name):
    cfg = tiny_config(name)
    trainer = Trainer(cfg)
    before = [p.detach().clone() for p in trainer.method.backbone.parameters()]
    images = trainer.train_set.images[:64]
    labels = trainer.train_set.labels[:64]
    views = trainer.views(images)
    assert views.shape[:2] == (trainer.method.n_views, 64)
    loss, metrics = trainer.method.training_step(views, labels, torch.arange(64))
    assert loss.ndim == 0 and torch.isfinite(loss)
    assert all(torch.isfinite(v) for v in metrics.values())
    # what the step reports is what its config class declares (sweeps validate against it)
    reports = METHOD_CONFIGS[name].reports
    assert set(metrics) == {"loss", *reports}
    for key, m in reports.items():
        assert (m.low is None or m.low <= metrics[key]) and (
            m.high is None or metrics[key] <= m.high
        )
    trainer.optimizer.zero_grad()
    loss.backward()
    trainer.optimizer.step()
    trainer.method.on_step_end()
    after = list(trainer.method.backbone.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before, after, strict=True))


@pytest.mark.parametrize("name, views", [("simclr", 2), ("supcon", 3), ("moco", 2), ("emp_ssl", 4)])
def test_views_per_method(name, views):
    overrides = {"supcon": {"contrast_count": 3}}.get(name, {})
    cfg = tiny_config(name, method=overrides)
    assert build_method(cfg, 10).n_views == views == cfg.views_per_sample


def test_momentum_encoder_is_an_ema():
    online = torch.nn.Linear(3, 2)
    ema = MomentumEncoder(online)
    k0 = ema.module.weight.detach().clone()
    with torch.no_grad():
        online.weight.add_(1.0)
    ema.update(online, 0.9)
    assert torch.allclose(ema.module.weight, 0.9 * k0 + 0.1 * online.weight)
    assert not any(p.requires_grad for p in ema.parameters())
    ema.update(online, 0.0)  # m = 0 copies the online weights
    assert torch.equal(ema.module.weight, online.weight)


def test_queue_is_fifo_and_checks_divisibility():
    q = Queue(6, 2)
    assert torch.allclose(q.keys.norm(dim=1), torch.ones(6))
    a, b = torch.full((3, 2), 1.0), torch.full((3, 2), 2.0)
    q.enqueue(a)
    q.enqueue(b)
    assert torch.equal(q.keys, torch.cat([a, b]))
    c = torch.full((3, 2), 3.0)
    q.enqueue(c)  # overwrites the oldest slot
    assert torch.equal(q.keys, torch.cat([c, b])) and int(q.ptr) == 3
    with pytest.raises(ValueError, match="multiple"):
        q.enqueue(torch.zeros(4, 2))


def test_moco_updates_key_encoder_and_queue():
    cfg = tiny_config("moco")
    trainer = Trainer(cfg)
    m = trainer.method
    keys_before = m.queue.keys.clone()
    ema_before = [p.clone() for p in m.key_encoder.parameters()]
    views = trainer.views(trainer.train_set.images[:64])
    loss, metrics = m.training_step(views, trainer.train_set.labels[:64], torch.arange(64))
    loss.backward()
    assert int(m.queue.ptr) == 64
    assert not torch.equal(m.queue.keys[:64], keys_before[:64])
    assert torch.equal(m.queue.keys[64:], keys_before[64:])
    assert all(p.grad is None for p in m.key_encoder.parameters())
    assert 0.0 <= metrics["moco_acc"].item() <= 1.0
    trainer.optimizer.step()
    m.training_step(views, trainer.train_set.labels[:64], torch.arange(64))
    assert any(
        not torch.equal(a, b) for a, b in zip(ema_before, m.key_encoder.parameters(), strict=True)
    )


def test_supcon_rejects_unlabeled_rows():
    cfg = tiny_config("supcon")
    m = build_method(cfg, 10)
    views = torch.randn(2, 4, 3, 16, 16)
    with pytest.raises(ValueError, match="label"):
        m.training_step(views, torch.tensor([0, 1, -1, 2]), torch.arange(4))
