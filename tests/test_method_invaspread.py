"""InvaSpread: the batch softmax loss against a naive float64 loop (upstream's BatchAverage +
BatchCriterion, one scalar at a time), its closed form, the gradient of ``detach_other``,
training, checkpoints, config errors, and the cross-worker gradient over two processes."""

import math

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

from contrastlab.config import ConfigError, make_config
from contrastlab.distributed import average_gradients, exit_spawned_worker, gather_cat
from contrastlab.losses import _log1mexp, invaspread_loss
from contrastlab.methods import build_method
from contrastlab.rundir import RunPlace
from contrastlab.train import Trainer
from tests.conftest import init_gloo, tiny_config


def _naive(z, t):
    """Upstream semantics, in float64 with Python loops: z [2, B, D] view-major."""
    two, b, _ = z.shape
    f = F.normalize(z.reshape(two * b, -1).double(), dim=1).tolist()
    n = two * b
    total = 0.0
    for i in range(n):
        pos = (i + b) % n
        e = {j: math.exp(sum(x * y for x, y in zip(f[i], f[j], strict=True)) / t) for j in range(n)}
        denom = sum(v for j, v in e.items() if j != i)
        total += math.log(e[pos] / denom)
        for j in range(n):
            if j not in (i, pos):
                total += math.log(1 - e[j] / denom)
    return -total / n


@pytest.mark.parametrize("b, d, t", [(2, 3, 0.1), (5, 8, 0.5), (4, 16, 1.0)])
def test_loss_matches_naive_loop(b, d, t):
    g = torch.Generator().manual_seed(b * d)
    z = torch.randn(2, b, d, generator=g, dtype=torch.float64)
    for detach in (True, False):
        got = invaspread_loss(z, t, detach_other=detach)
        assert got.dtype == torch.float64
        assert got.item() == pytest.approx(_naive(z, t), rel=1e-10)


@pytest.mark.parametrize("b", [2, 3, 8])
def test_closed_form_for_identical_embeddings(b):
    # every similarity is 1/T: P = 1/(2B - 1) for every other row
    n = 2 * b
    z = torch.ones(2, b, 4, dtype=torch.float64)
    expected = -(math.log(1 / (n - 1)) + (n - 2) * math.log(1 - 1 / (n - 1)))
    assert invaspread_loss(z, 0.3).item() == pytest.approx(expected, rel=1e-12)


def test_float32_matches_float64_at_a_small_temperature():
    z = torch.randn(2, 16, 8, generator=torch.Generator().manual_seed(0))
    ref = invaspread_loss(z.double(), 0.05).item()
    x = z.clone().requires_grad_(True)
    loss = invaspread_loss(x, 0.05)
    loss.backward()
    assert loss.item() == pytest.approx(ref, rel=1e-5)
    assert torch.isfinite(x.grad).all()


def test_log_one_minus_p_is_accurate_when_p_is_near_one():
    # log(1 - P) from log P: exact at both ends in float32, where log(1 - exp(x)) is not
    x = torch.tensor([-1e-6, -1e-3, -0.5, -0.7, -1.0, -20.0, -90.0], requires_grad=True)
    ref = torch.tensor([math.log(-math.expm1(v)) for v in x.tolist()], dtype=torch.float64)
    got = _log1mexp(x)
    assert torch.allclose(got.double(), ref, rtol=1e-5)
    assert (torch.log(1 - torch.exp(x[:1])).double() - ref[:1]).abs().item() > 0.01
    got.sum().backward()
    assert torch.isfinite(x.grad).all()


def _naive_grad_reference(z, t, detach_other):
    """Autograd through a plain re-implementation with explicit exp/sum/log."""
    two, b, _ = z.shape
    n = two * b
    f = F.normalize(z.reshape(n, -1), dim=1)
    other = f.detach() if detach_other else f
    e = torch.exp(f @ other.T / t)
    eye = torch.eye(n, dtype=torch.bool)
    denom = e.masked_fill(eye, 0).sum(1)
    pos = (torch.arange(n) + b) % n
    loss = -torch.log(e[torch.arange(n), pos] / denom).sum()
    neg = ~eye
    neg[torch.arange(n), pos] = False
    loss = loss - torch.log(1 - e / denom[:, None])[neg].sum()
    return loss / n


@pytest.mark.parametrize("detach_other", [True, False])
def test_gradient_matches_reference_and_detach_changes_it(detach_other):
    z = torch.randn(2, 4, 5, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    a = z.clone().requires_grad_(True)
    invaspread_loss(a, 0.2, detach_other).backward()
    r = z.clone().requires_grad_(True)
    _naive_grad_reference(r, 0.2, detach_other).backward()
    assert torch.allclose(a.grad, r.grad, atol=1e-10)
    other = z.clone().requires_grad_(True)
    invaspread_loss(other, 0.2, not detach_other).backward()
    assert not torch.allclose(a.grad, other.grad, atol=1e-6)  # a real, visible choice
    if not detach_other:  # the full gradient is the true derivative of the loss
        torch.autograd.gradcheck(
            lambda x: invaspread_loss(x, 0.2, False), (z.clone().requires_grad_(True),)
        )


def test_bad_inputs_are_rejected():
    with pytest.raises(ValueError, match=r"\[2, B, D\]"):
        invaspread_loss(torch.zeros(3, 4, 5), 0.1)
    with pytest.raises(ValueError, match=r"\[2, B, D\]"):
        invaspread_loss(torch.zeros(2, 1, 5), 0.1)
    with pytest.raises(ValueError, match="temperature"):
        invaspread_loss(torch.zeros(2, 4, 5), 0.0)


@pytest.mark.parametrize("key, value", [("temperature", 0.0), ("detach_other", "maybe")])
def test_bad_config_values_name_the_key(key, value):
    with pytest.raises(ConfigError, match=f"method.{key}"):
        make_config({"method": {"name": "invaspread", key: value}})


def test_defaults_follow_upstream():
    cfg = make_config({"method": {"name": "invaspread"}})
    assert cfg.method.temperature == 0.1 and cfg.method.detach_other is True
    assert cfg.views_per_sample == 2 and cfg.model.head == "linear"


def test_loss_falls_over_a_few_steps():
    trainer = Trainer(tiny_config("invaspread", optim={"lr": 0.1}))
    m = trainer.method
    assert m.n_views == 2
    images = trainer.train_set.images[:64]
    views = trainer.views(images)
    losses = []
    for _ in range(10):
        loss, metrics = m.training_step(views, trainer.train_set.labels[:64], torch.arange(64))
        trainer.optimizer.zero_grad()
        loss.backward()
        trainer.optimizer.step()
        losses.append(loss.item())
    assert set(metrics) == {"loss"}
    assert losses[-1] < 0.8 * losses[0], losses


def test_checkpoint_round_trip(tmp_path):
    cfg = tiny_config("invaspread", eval={"knn_every": 0})
    res = Trainer(cfg, RunPlace(tmp_path / "run")).fit()
    trainer = Trainer(cfg, RunPlace(tmp_path / "run"))
    assert trainer.resume()
    for k, v in res.method.state_dict().items():
        assert torch.equal(v, trainer.method.state_dict()[k]), k
    x = torch.randn(1, 2, 3, 16, 16)
    res.method.eval()
    trainer.method.eval()
    assert torch.equal(res.method.project(x[0]), trainer.method.project(x[0]))
    assert build_method(cfg, 10).detach_other is True


# --------------------------------------------------------------------------- DDP


def _grad_worker(rank, world, tmp, detach_other):
    init_gloo(rank, world, tmp)
    torch.manual_seed(0)
    net = torch.nn.Linear(6, 4)
    x = torch.randn(2, 8, 6, generator=torch.Generator().manual_seed(1))  # global batch
    b = 8 // world
    z = gather_cat(net(x[:, rank * b : (rank + 1) * b]), dim=1)  # [2, 8, 4], differentiable
    loss = invaspread_loss(z, 0.3, detach_other)
    loss.backward()
    average_gradients(net)
    torch.save({"w": net.weight.grad, "loss": loss.detach()}, f"{tmp}/grad{rank}.pt")
    exit_spawned_worker()  # barrier, leave the group, skip a racy teardown


@pytest.mark.slow
@pytest.mark.parametrize("detach_other", [True, False])
def test_ddp_gradient_equals_full_batch_gradient(tmp_path, detach_other):
    mp.spawn(_grad_worker, args=(2, str(tmp_path), detach_other), nprocs=2, join=True)
    torch.manual_seed(0)
    net = torch.nn.Linear(6, 4)
    x = torch.randn(2, 8, 6, generator=torch.Generator().manual_seed(1))
    loss = invaspread_loss(net(x), 0.3, detach_other)
    loss.backward()
    for rank in range(2):
        got = torch.load(tmp_path / f"grad{rank}.pt", weights_only=True)
        assert torch.allclose(got["loss"], loss.detach(), atol=1e-6)
        assert torch.allclose(got["w"], net.weight.grad, atol=1e-6)
