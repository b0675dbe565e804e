"""CPC ("cpc"): patch grid, causal context network, the InfoNCE loss against a naive loop and a
closed form, training, checkpoints, config checks and DDP gradients."""

import math

import pytest
import torch
import torch.multiprocessing as mp

from contrastlab.config import ConfigError
from contrastlab.distributed import average_gradients, exit_spawned_worker, gather_cat
from contrastlab.losses import cpc_loss
from contrastlab.methods import build_method
from contrastlab.methods.cpc import CPC, CausalContext, patch_grid
from contrastlab.train import Trainer
from tests.conftest import init_gloo, tiny_config

# ----------------------------------------------------------------------------- patches


def test_patch_grid_matches_slicing():
    x = torch.randn(2, 3, 16, 16)
    p = patch_grid(x, 8, 4)
    assert p.shape == (2, 3, 3, 3, 8, 8)
    for r in range(3):
        for c in range(3):
            assert torch.equal(p[:, r, c], x[:, :, 4 * r : 4 * r + 8, 4 * c : 4 * c + 8])


def test_backbone_is_the_mean_patch_encoding():
    m = build_method(tiny_config("cpc"), 10)
    assert isinstance(m, CPC)
    m.eval()
    x = torch.randn(3, 3, 16, 16)
    grid = m.backbone.grid(x)
    assert grid.shape == (3, 3, 3, m.feature_dim)
    one = m.backbone.encoder(x[:, :, 4:12, 8:16])  # the patch at row 1, column 2
    assert torch.allclose(grid[:, 1, 2], one, atol=1e-5)
    assert torch.allclose(m.backbone(x), grid.mean(dim=(1, 2)))


# ----------------------------------------------------------------------------- context


def test_context_is_causal_down_the_rows():
    torch.manual_seed(0)
    ctx = CausalContext(dim=6, hidden=8, layers=3)
    z = torch.randn(2, 5, 4, 6)
    out = ctx(z)
    assert out.shape == z.shape
    for r in range(5):
        z2 = z.clone()
        z2[:, r:] += torch.randn_like(z2[:, r:])  # change row r and everything below
        out2 = ctx(z2)
        assert torch.equal(out2[:, :r], out[:, :r])  # rows above r cannot see it
        assert not torch.allclose(out2[:, r], out[:, r])  # row r does


# ----------------------------------------------------------------------------- loss


def _naive_cpc(preds, targets, steps, t, normalize, first):
    preds, targets = preds.double(), targets.double()
    if normalize:
        preds = torch.nn.functional.normalize(preds, dim=-1)
        targets = torch.nn.functional.normalize(targets, dim=-1)
    K, B, H, W, _ = preds.shape
    N = targets.shape[0]
    per_step = []
    for i, k in enumerate(steps):
        total, count = 0.0, 0
        for b in range(B):
            for r in range(H - k):
                for c in range(W):
                    p = preds[i, b, r, c]
                    scores = {
                        (n, rr, cc): float(p @ targets[n, rr, cc]) / t
                        for n in range(N)
                        for rr in range(H)
                        for cc in range(W)
                    }
                    lse = math.log(sum(math.exp(v) for v in scores.values()))
                    total += lse - scores[(first + b, r + k, c)]
                    count += 1
        per_step.append(total / count)
    return sum(per_step) / len(per_step)


@pytest.mark.parametrize(
    "steps, normalize, first, n_images",
    [([1, 2], False, 0, 3), ([2], True, 0, 3), ([1, 3], False, 2, 5), ([1], True, 1, 4)],
)
def test_cpc_loss_matches_naive_loop(steps, normalize, first, n_images):
    g = torch.Generator().manual_seed(len(steps) + first)
    B, H, W, D = 3, 4, 3, 5
    preds = torch.randn(len(steps), B, H, W, D, generator=g)
    targets = torch.randn(n_images, H, W, D, generator=g)
    t = 0.5 if normalize else 2.0
    loss, acc = cpc_loss(preds, targets, steps, t, normalize, first)
    assert loss.item() == pytest.approx(_naive_cpc(preds, targets, steps, t, normalize, first))
    assert 0.0 <= acc.item() <= 1.0


def test_cpc_closed_forms():
    # all targets identical: every one of the N*H*W candidates scores the same
    preds = torch.randn(2, 3, 4, 4, 6, generator=torch.Generator().manual_seed(0))
    targets = torch.ones(3, 4, 4, 6)
    loss, _ = cpc_loss(preds, targets, [1, 2], 1.0)
    assert loss.item() == pytest.approx(math.log(3 * 4 * 4), rel=1e-6)
    # orthonormal targets, predictions equal to the right target: 1/t against N*H*W - 1 zeros
    B, H, W = 2, 3, 2
    n = B * H * W
    targets = torch.eye(n).view(B, H, W, n)
    preds = torch.zeros(1, B, H, W, n)
    preds[0, :, :-1] = targets[:, 1:]
    t = 0.25
    loss, acc = cpc_loss(preds, targets, [1], t)
    assert loss.item() == pytest.approx(-1 / t + math.log(math.exp(1 / t) + n - 1), rel=1e-6)
    assert acc.item() == 1.0


def test_cpc_gradient_reaches_predictions_positives_and_negatives():
    g = torch.Generator().manual_seed(0)
    preds = torch.randn(1, 2, 3, 3, 4, generator=g, requires_grad=True)
    targets = torch.randn(4, 3, 3, 4, generator=g, requires_grad=True)
    loss, _ = cpc_loss(preds, targets, [2], 1.0, first=1)
    loss.backward()
    assert torch.isfinite(preds.grad).all() and torch.isfinite(targets.grad).all()
    assert preds.grad[0, :, 1:].abs().sum() == 0  # rows without a target two rows below
    assert preds.grad[0, :, 0].abs().sum() > 0
    assert targets.grad[0].abs().sum() > 0 and targets.grad[3].abs().sum() > 0  # negatives only
    with torch.no_grad():
        lower = cpc_loss(
            preds - 0.05 * preds.grad, targets - 0.05 * targets.grad, [2], 1.0, False, 1
        )
    assert lower[0] < loss


def test_cpc_loss_rejects_bad_input():
    preds, targets = torch.randn(1, 2, 3, 3, 4), torch.randn(2, 3, 3, 4)
    with pytest.raises(ValueError, match="steps"):
        cpc_loss(preds, targets, [3], 1.0)
    with pytest.raises(ValueError, match="steps"):
        cpc_loss(preds, targets, [1, 2], 1.0)
    with pytest.raises(ValueError, match="first"):
        cpc_loss(preds, targets, [1], 1.0, first=1)
    with pytest.raises(ValueError, match="temperature"):
        cpc_loss(preds, targets, [1], 0.0)
    with pytest.raises(ValueError, match="K, B, H, W, D"):
        cpc_loss(preds[0], targets, [1], 1.0)


# ----------------------------------------------------------------------------- the method


def test_cpc_defaults_and_predictors():
    cfg = tiny_config("cpc", method={"prediction_steps": 2, "skip_steps": 1})
    assert cfg.model.head == "linear" and cfg.views_per_sample == 1
    m = build_method(cfg, 10)
    assert m.steps == [2] and len(m.predictors) == 1 and m.n_views == 1


def test_cpc_trains_and_loss_falls():
    cfg = tiny_config("cpc")
    t = Trainer(cfg)
    views = t.views(t.train_set.images[:64])
    losses = []
    for _ in range(5):
        loss, metrics = t.method.training_step(views, t.train_set.labels[:64], torch.arange(64))
        t.optimizer.zero_grad()
        loss.backward()
        t.optimizer.step()
        losses.append(loss.item())
    assert "cpc_acc" in metrics
    assert losses[-1] < losses[0] - 0.1


def test_cpc_checkpoint_round_trip(tmp_path):
    cfg = tiny_config("cpc")
    m = build_method(cfg, 10)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.01)
    torch.save(m.state_dict(), tmp_path / "m.pt")
    m2 = build_method(cfg, 10)
    m2.load_state_dict(torch.load(tmp_path / "m.pt", weights_only=True))
    keys = m2.state_dict().keys()
    assert any(k.startswith("context.") for k in keys)
    assert any(k.startswith("predictors.1.") for k in keys)
    assert any(k.startswith("backbone.encoder.") for k in keys)
    m.eval(), m2.eval()
    views = torch.randn(1, 4, 3, 16, 16)
    idx = torch.arange(4)
    assert torch.equal(m.training_step(views, idx, idx)[0], m2.training_step(views, idx, idx)[0])


@pytest.mark.parametrize(
    "method, data, match",
    [
        ({"patch_size": 20}, {}, r"method.patch_size \(20\) must be <= data.image_size"),
        ({"patch_stride": 3}, {}, "must be a multiple of method.patch_stride"),
        ({"prediction_steps": 3}, {}, "method.prediction_steps .* at least 4 rows"),
        ({"patch_size": 16}, {}, "method.prediction_steps .* at least 3 rows"),
        ({"skip_steps": 2}, {}, r"method.skip_steps \(2\) must be < method.prediction_steps"),
        ({"temperature": 0}, {}, "method.temperature"),
        ({"context_layers": 0}, {}, "method.context_layers"),
        ({"prediction_steps": 7}, {"image_size": 32}, "at least 8 rows.* give 7"),
    ],
)
def test_cpc_rejects_bad_config(method, data, match):
    with pytest.raises(ConfigError, match=match):
        tiny_config("cpc", method=method, data=data)


def test_cpc_grid_on_cifar_sized_images():
    # 8 px patches at stride 4 cut a 7x7 grid from 32 px images, as the paper's 64/32 on 256 px
    cfg = tiny_config("cpc", method={"prediction_steps": 6}, data={"image_size": 32})
    m = build_method(cfg, 10)
    assert m.backbone.grid(torch.randn(2, 3, 32, 32)).shape[:3] == (2, 7, 7)


# ----------------------------------------------------------------------------- DDP


def _ddp_worker(rank, world, tmp):
    init_gloo(rank, world, tmp)
    torch.manual_seed(0)
    net = torch.nn.Linear(6, 4)
    x = torch.randn(4, 3, 3, 6, generator=torch.Generator().manual_seed(1))  # [B, H, W, D_in]
    b = 4 // world
    z = net(x[rank * b : (rank + 1) * b])
    preds = z.roll(1, dims=-1).unsqueeze(0)  # a stand-in predictor: [1, b, H, W, 4]
    loss, _ = cpc_loss(preds, gather_cat(z, dim=0), [1], 2.0, first=rank * b)
    loss.backward()
    average_gradients(net)
    torch.save({"w": net.weight.grad, "b": net.bias.grad}, f"{tmp}/grad{rank}.pt")
    exit_spawned_worker()  # barrier, leave the group, skip a racy teardown


@pytest.mark.slow  # two spawned processes: their start-up dominates
def test_cpc_ddp_gradient_equals_full_batch_gradient(tmp_path):
    mp.spawn(_ddp_worker, args=(2, str(tmp_path)), nprocs=2, join=True)
    torch.manual_seed(0)
    net = torch.nn.Linear(6, 4)
    x = torch.randn(4, 3, 3, 6, generator=torch.Generator().manual_seed(1))
    z = net(x)
    loss, _ = cpc_loss(z.roll(1, dims=-1).unsqueeze(0), z, [1], 2.0)
    loss.backward()
    for rank in range(2):
        got = torch.load(tmp_path / f"grad{rank}.pt", weights_only=True)
        assert torch.allclose(got["w"], net.weight.grad, atol=1e-6)
        assert torch.allclose(got["b"], net.bias.grad, atol=1e-6)


@pytest.mark.slow
def test_cpc_ddp_training_keeps_workers_identical(tmp_path):
    from tests.test_distributed import _train_worker

    mp.spawn(_train_worker, args=(2, str(tmp_path), "cpc"), nprocs=2, join=True)
    r0 = torch.load(tmp_path / "train0.pt", weights_only=False)
    r1 = torch.load(tmp_path / "train1.pt", weights_only=False)
    assert r0["local_batch"] == r1["local_batch"] == 32
    for k, v in r0["params"].items():
        assert torch.allclose(v, r1["params"][k], atol=1e-6), k
