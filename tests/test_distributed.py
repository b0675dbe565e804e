"""Two real processes over gloo: the distributed pieces give the single-process gradient."""

import os

import pytest
import torch
import torch.multiprocessing as mp

from contrastlab.distributed import (
    average_gradients,
    exit_spawned_worker,
    gather_cat,
    gather_cat_nograd,
)
from contrastlab.losses import nt_xent_loss, supcon_loss
from tests.conftest import init_gloo, tiny_config


def _grad_worker(rank, world, tmp, supervised):
    init_gloo(rank, world, tmp)
    torch.manual_seed(0)
    net = torch.nn.Linear(6, 4)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 8, 6, generator=g)  # [V, B, D_in], the global batch
    y = torch.randint(0, 3, (8,), generator=g)
    b = 8 // world
    local_x, local_y = x[:, rank * b : (rank + 1) * b], y[rank * b : (rank + 1) * b]
    z = gather_cat(net(local_x), dim=1)  # [V, B_global, 4], differentiable
    labels = gather_cat_nograd(local_y) if supervised else None
    loss = supcon_loss(z, labels, 0.3) if supervised else nt_xent_loss(z, 0.3)
    loss.backward()
    average_gradients(net)
    torch.save(
        {"w": net.weight.grad, "b": net.bias.grad, "loss": loss.detach()}, f"{tmp}/grad{rank}.pt"
    )
    exit_spawned_worker()  # barrier, leave the group, skip a racy teardown


@pytest.mark.parametrize("supervised", [False, True])
def test_ddp_gradient_equals_full_batch_gradient(tmp_path, supervised):
    mp.spawn(_grad_worker, args=(2, str(tmp_path), supervised), nprocs=2, join=True)
    torch.manual_seed(0)
    net = torch.nn.Linear(6, 4)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 8, 6, generator=g)
    y = torch.randint(0, 3, (8,), generator=g)
    z = net(x)
    loss = supcon_loss(z, y, 0.3) if supervised else nt_xent_loss(z, 0.3)
    loss.backward()
    for rank in range(2):
        got = torch.load(tmp_path / f"grad{rank}.pt", weights_only=True)
        assert torch.allclose(got["loss"], loss.detach(), atol=1e-6)
        assert torch.allclose(got["w"], net.weight.grad, atol=1e-6)
        assert torch.allclose(got["b"], net.bias.grad, atol=1e-6)


def _train_worker(rank, world, tmp, name):
    init_gloo(rank, world, tmp)
    from contrastlab.rundir import RunPlace
    from contrastlab.train import Trainer

    cfg = tiny_config(name, train={"epochs": 1, "batch_size": 64})
    t = Trainer(cfg, RunPlace(os.path.join(tmp, "run")))
    res = t.fit()
    trainable = {k: v for k, v in t.method.named_parameters() if v.requires_grad}
    torch.save(
        {"params": trainable, "final": res.final, "local_batch": t.local_batch},
        f"{tmp}/train{rank}.pt",
    )
    exit_spawned_worker()  # barrier, leave the group, skip a racy teardown


@pytest.mark.slow
@pytest.mark.parametrize("name", ["simclr", "moco"])
def test_ddp_training_keeps_workers_identical(tmp_path, name):
    mp.spawn(_train_worker, args=(2, str(tmp_path), name), nprocs=2, join=True)
    r0 = torch.load(tmp_path / "train0.pt", weights_only=False)
    r1 = torch.load(tmp_path / "train1.pt", weights_only=False)
    assert r0["local_batch"] == r1["local_batch"] == 32
    for k, v in r0["params"].items():
        assert torch.allclose(v, r1["params"][k], atol=1e-6), k
    assert "knn_top1" in r0["final"] and "knn_top1" not in r1["final"]  # rank 0 evaluates
    assert (tmp_path / "run" / "checkpoints" / "epoch_0001.pt").is_file()
