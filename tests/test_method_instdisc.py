"""InstDisc: NCE / full-softmax / proximal losses against naive loops and closed forms, the
memory bank, the method's state (bank, Z, step count) through checkpoints, and DDP replicas."""

import math
import os

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

from contrastlab.config import ConfigError, make_config
from contrastlab.distributed import exit_spawned_worker
from contrastlab.losses import (
    instance_softmax_loss,
    nce_log_partition,
    nce_logits,
    nce_loss,
    proximal_loss,
)
from contrastlab.methods import build_method
from contrastlab.models import MemoryBank
from contrastlab.rundir import RunPlace
from contrastlab.train import Trainer
from tests.conftest import init_gloo, tiny_config


def _unit(*shape, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=g, dtype=dtype), dim=-1)


# --------------------------------------------------------------------------- naive references


def _naive_nce(f, pos, noise, t, log_z, n):
    """Upstream's NCEAverage + NCECriterion, one scalar at a time, in float64."""
    B, K = noise.shape[0], noise.shape[1]
    Z = math.exp(log_z)
    kpn = K / n
    total = 0.0
    for b in range(B):
        fb = f[b].tolist()
        p_pos = math.exp(sum(x * y for x, y in zip(fb, pos[b].tolist(), strict=True)) / t) / Z
        total += math.log(p_pos / (p_pos + kpn))
        for k in range(K):
            dot = sum(x * y for x, y in zip(fb, noise[b, k].tolist(), strict=True))
            p = math.exp(dot / t) / Z
            total += math.log(kpn / (p + kpn))
    return -total / B


def _naive_softmax(f, bank, index, t):
    total = 0.0
    for b in range(f.shape[0]):
        logits = [
            sum(x * y for x, y in zip(f[b].tolist(), v, strict=True)) / t for v in bank.tolist()
        ]
        m = max(logits)
        lse = m + math.log(sum(math.exp(s - m) for s in logits))
        total += lse - logits[int(index[b])]
    return total / f.shape[0]


# --------------------------------------------------------------------------- losses


@pytest.mark.parametrize("b, k, d, t", [(3, 5, 4, 0.07), (4, 1, 8, 0.5), (2, 16, 3, 1.0)])
def test_nce_loss_matches_naive_loop(b, k, d, t):
    n = 100
    f, pos, noise = _unit(b, d, seed=1), _unit(b, d, seed=2), _unit(b, k, d, seed=3)
    logits = nce_logits(f, pos, noise, t)
    assert logits.shape == (b, 1 + k) and logits.dtype == torch.float64
    log_z = 2.3
    got = nce_loss(logits, log_z, n)
    assert got.item() == pytest.approx(_naive_nce(f, pos, noise, t, log_z, n), rel=1e-10)
    # a tensor log_z gives the same value
    assert nce_loss(logits, torch.tensor(log_z, dtype=torch.float64), n).item() == pytest.approx(
        got.item(), rel=1e-12
    )


def test_nce_loss_closed_form_at_the_decision_boundary():
    # P(i|v) = exp(s)/Z equal to K * P_n for every column: h = 1/2 everywhere, so each image
    # contributes (K + 1) * log 2.
    B, K, n = 4, 7, 50
    log_z = 1.7
    logits = torch.full((B, 1 + K), log_z + math.log(K / n), dtype=torch.float64)
    assert nce_loss(logits, log_z, n).item() == pytest.approx((K + 1) * math.log(2), rel=1e-12)


def test_nce_log_partition_is_the_monte_carlo_estimate():
    noise_logits = torch.randn(5, 9, dtype=torch.float64)
    n = 1000
    expected = math.log(n * noise_logits.exp().mean().item())
    assert nce_log_partition(noise_logits, n).item() == pytest.approx(expected, rel=1e-12)
    # constant logits c: Z = n * exp(c) exactly; huge c does not overflow (log space)
    assert nce_log_partition(torch.full((2, 3), 200.0), n).item() == pytest.approx(
        math.log(n) + 200.0, rel=1e-6
    )


def test_instance_softmax_matches_naive_loop_and_closed_form():
    f, bank = _unit(4, 6, seed=4), _unit(10, 6, seed=5)
    index = torch.tensor([0, 3, 9, 3])
    loss, logits = instance_softmax_loss(f, bank, index, 0.1)
    assert logits.shape == (4, 10)
    assert loss.item() == pytest.approx(_naive_softmax(f, bank, index, 0.1), rel=1e-10)
    # every bank row identical: the softmax is uniform over the n rows, loss = log n
    same = bank[:1].expand(10, 6)
    assert instance_softmax_loss(f, same, index, 0.1)[0].item() == pytest.approx(math.log(10))


def test_proximal_loss_closed_form():
    f, v = _unit(5, 4, seed=6), _unit(5, 4, seed=7)
    expected = (2 - 2 * (f * v).sum(1)).mean()
    assert proximal_loss(3.0 * f, v).item() == pytest.approx(expected.item(), rel=1e-12)
    assert proximal_loss(f, f).item() == pytest.approx(0.0, abs=1e-15)


def test_gradients_reach_the_features_only():
    f = _unit(3, 5, seed=8).requires_grad_(True)
    pos = _unit(3, 5, seed=9).requires_grad_(True)
    noise = _unit(3, 4, 5, seed=10).requires_grad_(True)
    loss = nce_loss(nce_logits(f, pos, noise, 0.2), 0.5, 20) + proximal_loss(f, pos)
    loss.backward()
    assert pos.grad is None and noise.grad is None  # the bank is not a parameter
    assert torch.isfinite(f.grad).all() and f.grad.abs().sum() > 0
    # float64 gradcheck of the composed NCE loss w.r.t. the features
    torch.autograd.gradcheck(
        lambda x: nce_loss(nce_logits(x, pos.detach(), noise.detach(), 0.2), 0.5, 20),
        (f.detach().clone().requires_grad_(True),),
    )
    bank = _unit(6, 5, seed=11)
    torch.autograd.gradcheck(
        lambda x: instance_softmax_loss(x, bank, torch.tensor([1, 4, 5]), 0.3)[0],
        (f.detach().clone().requires_grad_(True),),
    )


def test_bad_shapes_are_rejected():
    with pytest.raises(ValueError, match="K >= 1"):
        nce_loss(torch.zeros(3, 1), 0.0, 10)
    with pytest.raises(ValueError, match="noise"):
        nce_logits(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2, 4, 5), 0.1)
    with pytest.raises(ValueError, match="index"):
        instance_softmax_loss(torch.zeros(2, 3), torch.zeros(5, 3), torch.zeros(3).long(), 0.1)


# --------------------------------------------------------------------------- memory bank


def test_memory_bank_init_update_and_checks():
    bank = MemoryBank(6, 4, momentum=0.5, generator=torch.Generator().manual_seed(3))
    again = MemoryBank(6, 4, momentum=0.5, generator=torch.Generator().manual_seed(3))
    assert torch.equal(bank.rows, again.rows)  # seeded
    assert torch.allclose(bank.rows.norm(dim=1), torch.ones(6))
    old = bank.rows.clone()
    idx, feats = torch.tensor([4, 1]), F.normalize(torch.randn(2, 4), dim=1)
    bank.update(idx, feats)
    expected = F.normalize(0.5 * old[idx] + 0.5 * feats, dim=1)
    assert torch.allclose(bank.rows[idx], expected, atol=1e-6)
    untouched = [0, 2, 3, 5]
    assert torch.equal(bank.rows[untouched], old[untouched])
    assert torch.equal(bank(torch.tensor([[4], [1]])).squeeze(1), bank.rows[idx])
    zero = MemoryBank(6, 4, momentum=0.0)
    zero.update(idx, feats)
    assert torch.allclose(zero.rows[idx], feats, atol=1e-6)  # momentum 0 overwrites
    assert "rows" in dict(bank.named_buffers())
    with pytest.raises(ValueError, match="momentum"):
        MemoryBank(6, 4, momentum=1.0)
    with pytest.raises(ValueError, match="index"):
        bank.update(torch.tensor([0]), torch.zeros(2, 4))


# --------------------------------------------------------------------------- config and method


@pytest.mark.parametrize(
    "key, value",
    [
        ("bank_momentum", 1.0),
        ("bank_momentum", -0.1),
        ("nce_k", -1),
        ("temperature", 0.0),
        ("proximal_weight", -1.0),
        ("z_estimate", "sometimes"),
    ],
)
def test_bad_config_values_name_the_key(key, value):
    with pytest.raises(ConfigError, match=f"method.{key}"):
        make_config({"method": {"name": "instdisc", key: value}})


def test_defaults_follow_the_paper():
    cfg = make_config({"method": {"name": "instdisc"}})
    m = cfg.method
    assert (m.temperature, m.nce_k, m.bank_momentum) == (0.07, 4096, 0.5)
    assert (m.z_estimate, m.proximal_weight) == ("first_batch", 0.0)
    assert cfg.views_per_sample == 1 and cfg.model.head == "linear"


def test_nce_k_must_be_below_the_dataset_size():
    cfg = tiny_config("instdisc", method={"nce_k": 256})
    with pytest.raises(ConfigError, match=r"method\.nce_k \(256\).*256 in digits"):
        build_method(cfg, 256)
    assert build_method(cfg, 257).bank.rows.shape == (257, 16)
    with pytest.raises(ConfigError, match="method.nce_k"):  # the trainer builds it before any step
        Trainer(tiny_config("instdisc", method={"nce_k": 4096}))


def _batch(trainer, n=64, start=0):
    idx = torch.arange(start, start + n)
    views = trainer.views(trainer.train_set.images[idx])
    return views, trainer.train_set.labels[idx], idx


@pytest.mark.parametrize("z_estimate", ["first_batch", "every_batch"])
def test_step_updates_bank_after_the_optimizer_step_and_z(z_estimate):
    trainer = Trainer(tiny_config("instdisc", method={"z_estimate": z_estimate}))
    m = trainer.method
    assert m.n_views == 1 and torch.isnan(m.log_z)
    views, labels, idx = _batch(trainer)
    assert views.shape[0] == 1
    before = m.bank.rows.clone()
    loss, metrics = m.training_step(views, labels, idx)
    assert torch.equal(m.bank.rows, before)  # nothing written before the step ends
    loss.backward()
    f = F.normalize(m.project(views[0]).float(), dim=1).detach()  # same weights, eval of f
    m.on_step_end()
    expected = F.normalize(0.5 * before[idx] + 0.5 * f, dim=1)
    assert torch.allclose(m.bank.rows[idx], expected, atol=1e-5)
    assert torch.equal(m.bank.rows[64:], before[64:])
    assert int(m.steps) == 1 and set(metrics) == {"loss", "proximal", "log_z"}
    z1 = metrics["log_z"].item()
    if z_estimate == "first_batch":
        assert m.log_z.item() == z1
    trainer.optimizer.step()
    _, metrics2 = m.training_step(*_batch(trainer, start=64))
    m.on_step_end()
    assert (metrics2["log_z"].item() == z1) == (z_estimate == "first_batch")


def test_full_softmax_variant_and_proximal_weight():
    cfg0 = tiny_config("instdisc", method={"nce_k": 0})
    cfg1 = tiny_config("instdisc", method={"nce_k": 0, "proximal_weight": 30.0})
    m0, m1 = build_method(cfg0, 256), build_method(cfg1, 256)
    m1.load_state_dict(m0.state_dict())
    views = torch.randn(1, 8, 3, 16, 16)
    idx = torch.arange(8)
    l0, met0 = m0.training_step(views, torch.zeros(8), idx)
    l1, met1 = m1.training_step(views, torch.zeros(8), idx)
    assert "log_z" not in met0
    assert l1.item() == pytest.approx(l0.item() + 30.0 * met0["proximal"].item(), rel=1e-5)
    # at init the bank is random: the proximal distance of unit vectors is about 2
    assert 1.0 < met1["proximal"].item() < 3.0


# With Z fixed at its first-batch value the NCE loss is not a quantity that must fall: once
# the bank rows of a young, poorly spread encoder resemble each other, the noise terms grow
# (on this 256-image set the whole bank is rewritten every 4 steps). The self-normalised
# variants must fall.
@pytest.mark.parametrize("nce_k, z_estimate", [(64, "every_batch"), (0, "first_batch")])
def test_loss_falls_over_a_few_steps(nce_k, z_estimate):
    method = {"nce_k": nce_k, "z_estimate": z_estimate}
    cfg = tiny_config("instdisc", method=method, optim={"lr": 0.1})
    trainer = Trainer(cfg)
    m = trainer.method
    views, labels, idx = _batch(trainer)
    losses = []
    for _ in range(10):
        loss, _ = m.training_step(views, labels, idx)
        trainer.optimizer.zero_grad()
        loss.backward()
        trainer.optimizer.step()
        m.on_step_end()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses


class _CrashError(Exception):
    pass


def _crash_after_first_epoch(epoch, metrics, ckpt):
    if epoch == 1:
        raise _CrashError


def test_checkpoint_round_trip_resumes_exactly(tmp_path):
    cfg = tiny_config("instdisc", train={"epochs": 2, "batch_size": 64}, eval={"knn_every": 0})
    straight = Trainer(cfg, RunPlace(tmp_path / "a")).fit().method

    with pytest.raises(_CrashError):  # a run that dies right after its first checkpoint
        Trainer(cfg, RunPlace(tmp_path / "b"), hooks=[_crash_after_first_epoch]).fit()
    ckpt = torch.load(tmp_path / "b" / "checkpoints" / "epoch_0001.pt", weights_only=True)
    assert {"bank.rows", "log_z", "steps"} <= set(ckpt["model"])
    trainer = Trainer(cfg, RunPlace(tmp_path / "b"))
    assert trainer.resume()
    m = trainer.method
    assert m._steps == 4 and m._z_known  # host copies refreshed from the loaded buffers
    assert torch.equal(m.bank.rows, ckpt["model"]["bank.rows"])
    resumed = trainer.fit(resume=False).method
    assert int(resumed.steps) == int(straight.steps) == 8
    assert torch.equal(resumed.log_z, straight.log_z)
    assert torch.equal(resumed.bank.rows, straight.bank.rows)


# --------------------------------------------------------------------------- DDP


def _ddp_worker(rank, world, tmp, nce_k):
    init_gloo(rank, world, tmp)
    cfg = tiny_config("instdisc", method={"nce_k": nce_k}, eval={"knn_every": 0})
    t = Trainer(cfg, RunPlace(os.path.join(tmp, "run")))
    t.fit()
    m = t.method
    draw = torch.randint(m.num_train, (4, 8), generator=m._noise_generator())
    torch.save(
        {
            "rows": m.bank.rows,
            "log_z": m.log_z,
            "steps": m.steps,
            "draw": draw,
            "w": next(m.backbone.parameters()).detach(),
        },
        f"{tmp}/bank{rank}.pt",
    )
    exit_spawned_worker()  # barrier, leave the group, skip a racy teardown


@pytest.mark.slow
@pytest.mark.parametrize("nce_k", [64, 0])
def test_ddp_bank_replicas_stay_identical(tmp_path, nce_k):
    mp.spawn(_ddp_worker, args=(2, str(tmp_path), nce_k), nprocs=2, join=True)
    r0 = torch.load(tmp_path / "bank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "bank1.pt", weights_only=True)
    assert int(r0["steps"]) == int(r1["steps"]) == 4
    assert torch.equal(r0["rows"], r1["rows"])
    assert torch.allclose(r0["w"], r1["w"], atol=1e-6)
    # every image of the epoch was written into the bank (4 steps x 64 = all 256 rows moved)
    init = MemoryBank(256, 16, 0.5, generator=torch.Generator().manual_seed(0)).rows
    assert not torch.isclose(r0["rows"], init).all(dim=1).any()
    if nce_k:
        assert torch.equal(r0["log_z"], r1["log_z"]) and torch.isfinite(r0["log_z"])
        assert not torch.equal(r0["draw"], r1["draw"])  # noise is drawn per worker
