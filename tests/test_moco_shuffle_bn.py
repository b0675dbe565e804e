"""MoCo's shuffle-BN ("moco", method.bn_mode): split-batch BatchNorm on one worker, the
cross-worker shuffle over gloo, the sync/none alternatives, and their config checks."""

import copy
import os

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from contrastlab.config import ConfigError
from contrastlab.distributed import (
    broadcast_module,
    exit_spawned_worker,
    shuffle_rows,
    unshuffle_rows,
)
from contrastlab.methods import build_method
from contrastlab.models import BatchShuffler, SplitBatchNorm, convert_split_batchnorm
from contrastlab.rundir import RunPlace
from contrastlab.train import Trainer
from tests.conftest import init_gloo, tiny_config

# --------------------------------------------------------------------------- SplitBatchNorm


def _groupwise_bn(x, bn, splits):
    """Naive reference: a plain BatchNorm copy run on each group (rows i % splits) in turn.

    Returns the output and the running statistics each group's update would give."""
    out = torch.empty_like(x)
    means, vars_ = [], []
    for g in range(splits):
        ref = copy.deepcopy(bn)  # every group starts from the same running statistics
        rows = torch.arange(g, x.shape[0], splits)
        out[rows] = ref(x[rows])
        means.append(ref.running_mean)
        vars_.append(ref.running_var)
    return out, torch.stack(means).mean(0), torch.stack(vars_).mean(0)


@pytest.mark.parametrize(
    "shape, channels_last",
    [((24, 5, 3, 4), False), ((24, 5, 3, 4), True), ((24, 7), False), ((24, 6, 5), False)],
)
@pytest.mark.parametrize("splits", [1, 3, 4])
def test_split_batchnorm_equals_groupwise_batchnorm(shape, channels_last, splits):
    g = torch.Generator().manual_seed(0)
    x = (3 * torch.randn(shape, generator=g) + 1).double()
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    bn_cls = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d}[len(shape)]
    plain = bn_cls(shape[1]).double()
    with torch.no_grad():
        plain.weight.copy_(torch.rand(shape[1], generator=g) + 0.5)
        plain.bias.copy_(torch.randn(shape[1], generator=g))
        plain.running_mean.copy_(torch.randn(shape[1], generator=g))
    split = convert_split_batchnorm(copy.deepcopy(plain), splits)
    assert isinstance(split, SplitBatchNorm) and split.num_splits == splits

    x1, x2 = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    upstream = torch.randn(shape, generator=g).double()  # a random linear loss on the output
    y = split(x1)
    y_ref, mean_ref, var_ref = _groupwise_bn(x2, plain, splits)
    assert torch.allclose(y, y_ref, atol=1e-10)
    assert torch.allclose(split.running_mean, mean_ref, atol=1e-12)
    assert torch.allclose(split.running_var, var_ref, atol=1e-12)
    assert int(split.num_batches_tracked) == 1
    if channels_last:
        assert y.is_contiguous(memory_format=torch.channels_last)

    # gradients against the group-by-group reference (the reference's affine params are
    # shared by all groups through deepcopy, so compare input gradients and a fresh pass)
    (y * upstream).sum().backward()
    (y_ref * upstream).sum().backward()
    assert torch.allclose(x1.grad, x2.grad, atol=1e-10)
    assert torch.isfinite(split.weight.grad).all() and torch.isfinite(split.bias.grad).all()

    # eval mode: exactly BatchNorm with the running statistics
    split.eval()
    plain.load_state_dict(split.state_dict())
    plain.eval()
    assert torch.allclose(split(x), plain(x), atol=1e-12)


def test_split_batchnorm_affine_gradients_match_reference():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(12, 3, 2, 2, generator=g).double()
    w = (torch.rand(3, generator=g) + 0.5).double().requires_grad_(True)
    b = torch.randn(3, generator=g).double().requires_grad_(True)
    up = torch.randn(12, 3, 2, 2, generator=g).double()
    split = SplitBatchNorm(3, 3).double()
    with torch.no_grad():
        split.weight.copy_(w)
        split.bias.copy_(b)
    (split(x) * up).sum().backward()
    # naive loop: normalise each group with its own mean and biased variance
    loss = 0.0
    for grp in range(3):
        xg = x[grp::3]
        mean = xg.mean(dim=(0, 2, 3), keepdim=True)
        var = xg.var(dim=(0, 2, 3), unbiased=False, keepdim=True)
        yg = (xg - mean) / torch.sqrt(var + 1e-5) * w.view(1, 3, 1, 1) + b.view(1, 3, 1, 1)
        loss = loss + (yg * up[grp::3]).sum()
    loss.backward()
    assert torch.allclose(split.weight.grad, w.grad, atol=1e-10)
    assert torch.allclose(split.bias.grad, b.grad, atol=1e-10)


def test_split_batchnorm_rejects_an_uneven_batch():
    with pytest.raises(ValueError, match=r"10 rows.*4 equal.*method\.bn_splits"):
        SplitBatchNorm(3, 4)(torch.randn(10, 3))


def test_convert_keeps_state_dict_and_leaves_syncbn():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.BatchNorm1d(16))
    net.add_module("sync", nn.SyncBatchNorm(16))
    before = copy.deepcopy(net.state_dict())
    convert_split_batchnorm(net, 2)
    assert isinstance(net[1], SplitBatchNorm) and isinstance(net[3], SplitBatchNorm)
    assert type(net.sync) is nn.SyncBatchNorm
    after = net.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


# --------------------------------------------------------------------------- permutations


def test_shuffle_then_unshuffle_is_the_identity():
    x = torch.randn(10, 3, 4, 4).contiguous(memory_format=torch.channels_last)
    perm = BatchShuffler(0).permutation(10, x.device)
    s = shuffle_rows(x, perm)
    assert torch.equal(s, x[perm])
    assert s.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(unshuffle_rows(s, perm), x)
    assert torch.equal(unshuffle_rows(shuffle_rows(torch.arange(10), perm), perm), torch.arange(10))


def test_shuffler_is_seeded_and_resumes_from_its_state_dict():
    a, b = BatchShuffler(7), BatchShuffler(7)
    first = [a.permutation(16, torch.device("cpu")) for _ in range(3)]
    assert all(torch.equal(p, b.permutation(16, torch.device("cpu"))) for p in first)
    assert not torch.equal(first[0], first[1])  # a fresh permutation per draw
    assert not torch.equal(first[0], BatchShuffler(8).permutation(16, torch.device("cpu")))
    c = BatchShuffler(7)
    c.load_state_dict(a.state_dict())
    assert c.draws == 3
    assert torch.equal(
        c.permutation(16, torch.device("cpu")), a.permutation(16, torch.device("cpu"))
    )


# --------------------------------------------------------------------------- MoCo, one worker


def _moco(mode, **method):
    cfg = tiny_config("moco", method={"bn_mode": mode, **method}, train={"batch_size": 32})
    torch.manual_seed(0)
    return cfg, build_method(cfg, 256)


def test_bn_modes_build_the_right_layers_on_one_worker():
    def kinds(m):
        return {type(x) for x in m.modules() if isinstance(x, nn.modules.batchnorm._BatchNorm)}

    assert kinds(_moco("shuffle", bn_splits=4)[1]) == {SplitBatchNorm}
    assert kinds(_moco("shuffle", bn_splits=1)[1]) == {nn.BatchNorm2d, nn.BatchNorm1d}
    # SyncBatchNorm only across workers: one worker keeps plain BatchNorm
    assert kinds(_moco("sync")[1]) == {nn.BatchNorm2d, nn.BatchNorm1d}
    assert kinds(_moco("none")[1]) == {nn.BatchNorm2d, nn.BatchNorm1d}
    assert _moco("none")[1].shuffler is None
    # same state dict keys in every mode, plus the shuffler's draw count
    keys = set(_moco("none")[1].state_dict())
    assert set(_moco("shuffle")[1].state_dict()) == keys | {"shuffler._extra_state"}
    assert set(_moco("sync")[1].state_dict()) == keys


@pytest.mark.parametrize("splits", [2, 4, 8])
def test_single_worker_keys_equal_groupwise_key_encoder(splits):
    """Key of image i == the plain-BN key encoder applied to the group i was shuffled into."""
    cfg, m = _moco("shuffle", bn_splits=splits)
    m.train()
    reference = copy.deepcopy(m.key_encoder)
    for mod in reference.modules():
        if isinstance(mod, SplitBatchNorm):
            mod.num_splits = 1  # plain BatchNorm over whatever batch it is given
    x = torch.randn(32, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    m.shuffler.draws = 5
    keys = m._keys(x)  # [32, D]
    assert m.shuffler.draws == 6
    perm = BatchShuffler(cfg.train.seed)
    perm.draws = 5
    perm = perm.permutation(32, x.device)  # position j of the shuffled batch holds image perm[j]
    expected = torch.empty_like(keys)
    for g in range(splits):
        images = perm[torch.arange(g, 32, splits)]  # shuffled positions j with j % S == g
        with torch.no_grad():
            expected[images] = F.normalize(reference(x[images]), dim=1)
    assert torch.allclose(keys, expected, atol=1e-5)
    # and not what one BatchNorm over the whole key batch gives
    with torch.no_grad():
        whole = F.normalize(reference(x), dim=1)
    assert not torch.allclose(keys, whole, atol=1e-3)


def test_query_encoder_uses_the_unshuffled_groups_and_eval_is_plain_bn():
    _, m = _moco("shuffle", bn_splits=4)
    m.train()
    x = torch.randn(32, 3, 16, 16, generator=torch.Generator().manual_seed(4))
    ref = copy.deepcopy(m)
    for mod in ref.modules():
        if isinstance(mod, SplitBatchNorm):
            mod.num_splits = 1
    q = m.project(x)
    with torch.no_grad():
        for g in range(4):
            assert torch.allclose(q[g::4], ref.project(x[g::4]), atol=1e-5)
    # evaluation reads the backbone in eval mode: plain BatchNorm with the running statistics
    m.eval()
    ref.load_state_dict(m.state_dict())
    ref.eval()
    with torch.no_grad():
        assert torch.allclose(m.backbone(x), ref.backbone(x), atol=1e-6)


@pytest.mark.parametrize("mode", ["shuffle", "sync", "none"])
def test_moco_loss_falls_with_every_bn_mode(mode, monkeypatch):
    """A few CPU steps on fresh batches. The queue is frozen at its random initial keys: the
    negatives then stay fixed and InfoNCE can only fall by matching queries to their keys
    (a queue that fills with real keys makes the raw loss rise at first: harder negatives)."""
    cfg = tiny_config("moco", method={"bn_mode": mode, "bn_splits": 4})
    tr = Trainer(cfg)
    m = tr.method
    monkeypatch.setattr(m.queue, "enqueue", lambda keys: None)
    gen = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(6):
        idx = torch.randperm(len(tr.train_set), generator=gen)[:64]
        views = tr.views(tr.train_set.images[idx])
        loss, metrics = m.training_step(views, tr.train_set.labels[idx], idx)
        tr.optimizer.zero_grad()
        loss.backward()
        tr.optimizer.step()
        m.on_step_end()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0] - 0.5, losses


@pytest.mark.slow
def test_symmetric_loss_draws_two_permutations_and_checkpoints_the_count(tmp_path):
    cfg = tiny_config("moco", method={"symmetric": True, "bn_splits": 4}, eval={"knn_every": 0})
    first = Trainer(cfg, RunPlace(tmp_path))
    first.fit()
    steps = first.steps_per_epoch
    assert first.method.shuffler.draws == 2 * steps  # one per key batch, two keys per step
    again = Trainer(cfg, RunPlace(tmp_path))
    assert again.method.shuffler.draws == 0
    assert again.resume()
    assert again.method.shuffler.draws == 2 * steps
    a, b = first.method.state_dict(), again.method.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# --------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    "method, train, match",
    [
        ({"bn_mode": "shufle"}, {}, r"method\.bn_mode.*'shuffle', 'sync' or 'none'"),
        ({"bn_splits": 0}, {}, r"method\.bn_splits.*greater than or equal to 1"),
        ({"bn_splits": 5}, {"batch_size": 64}, r"method\.bn_splits \(5\).*train\.batch_size"),
        ({"bn_splits": 64}, {"batch_size": 64}, r"method\.bn_splits \(64\).*at least 2 images"),
    ],
)
def test_bad_bn_values_are_rejected_naming_the_key(method, train, match):
    with pytest.raises(ConfigError, match=match):
        tiny_config("moco", method=method, train=train)


def test_splits_only_checked_for_shuffle_and_fields_are_logged():
    cfg = tiny_config("moco", method={"bn_mode": "none", "bn_splits": 5})  # 64 % 5: unused
    assert cfg.flat()["method.bn_mode"] == "none" and cfg.flat()["method.bn_splits"] == 5
    defaults = tiny_config("moco").method
    assert (defaults.bn_mode, defaults.bn_splits) == ("shuffle", 8)


# --------------------------------------------------------------------------- two processes


def _ddp_worker(rank, world, tmp):
    init_gloo(rank, world, tmp)
    import contrastlab.methods.moco as moco_module

    out = {}
    try:  # SyncBatchNorm with several CPU workers: refused when the method is built
        build_method(tiny_config("moco", method={"bn_mode": "sync"}), 256)
    except ConfigError as e:
        out["sync_error"] = str(e)

    cfg = tiny_config("moco", train={"batch_size": 16})
    torch.manual_seed(rank)  # different on purpose: broadcast_module must align the workers
    m = build_method(cfg, 256)
    broadcast_module(m)
    m.train()
    if rank == 1:
        m.shuffler.seed = 12345  # a worker that would draw differently: rank 0's draw wins
    used = []

    def recording_shuffle(x, perm):
        used.append(perm.clone())
        return shuffle_rows(x, perm)

    moco_module.shuffle_rows = recording_shuffle
    x = torch.randn(16, 3, 16, 16, generator=torch.Generator().manual_seed(1))  # global batch
    b = 16 // world
    out["keys"] = m._keys(x[rank * b : (rank + 1) * b])
    out["perm"] = used[0]
    out["split_bn"] = any(isinstance(mod, SplitBatchNorm) for mod in m.modules())
    out["key_encoder"] = m.key_encoder.state_dict()
    torch.save(out, f"{tmp}/keys{rank}.pt")
    exit_spawned_worker()  # barrier, leave the group, skip a racy teardown


def test_two_workers_shuffle_keys_across_workers(tmp_path):
    """Each rank's keys == a one-process reference that encodes each rank's slice of the
    permuted global batch with plain BatchNorm, then puts the keys back in order."""
    mp.spawn(_ddp_worker, args=(2, str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"keys{r}.pt", weights_only=True) for r in range(2))
    for r in (r0, r1):
        assert "method.bn_mode='sync' needs GPUs" in r["sync_error"]
        assert not r["split_bn"]  # across workers each worker's batch is one BN group
    assert torch.equal(r0["perm"], r1["perm"])  # both ranks use rank 0's permutation
    seed = tiny_config("moco").train.seed
    perm = BatchShuffler(seed).permutation(16, torch.device("cpu"))
    assert torch.equal(r0["perm"], perm)  # reproducible: the seeded first draw

    cfg = tiny_config("moco", method={"bn_mode": "none"}, train={"batch_size": 16})
    ref = build_method(cfg, 256).key_encoder
    ref.load_state_dict(r0["key_encoder"])
    ref.train()
    x = torch.randn(16, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    expected = torch.empty(16, r0["keys"].shape[1])
    with torch.no_grad():
        for rank in range(2):
            rows = perm[rank * 8 : (rank + 1) * 8]  # the images rank `rank` encodes
            expected[rows] = F.normalize(ref(x[rows]), dim=1)
    assert torch.allclose(r0["keys"], expected[:8], atol=1e-5)
    assert torch.allclose(r1["keys"], expected[8:], atol=1e-5)


@pytest.mark.slow
def test_two_workers_train_with_shuffle_bn_and_stay_identical(tmp_path):
    """The whole trainer over gloo with the default bn_mode='shuffle' (the slow DDP test in
    test_distributed.py runs the same for the default config; this one is symmetric)."""
    mp.spawn(_train_worker, args=(2, str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"train{r}.pt", weights_only=True) for r in range(2))
    assert r0["draws"] == r1["draws"] == 2 * r0["steps"]
    for k, v in r0["params"].items():
        assert torch.allclose(v, r1["params"][k], atol=1e-6), k


def _train_worker(rank, world, tmp):
    init_gloo(rank, world, tmp)
    cfg = tiny_config("moco", method={"symmetric": True}, train={"epochs": 1})
    t = Trainer(cfg, RunPlace(os.path.join(tmp, "run")))
    t.fit()
    torch.save(
        {
            "params": {k: v.detach().clone() for k, v in t.method.named_parameters()},
            "draws": t.method.shuffler.draws,
            "steps": t.steps_per_epoch,
        },
        f"{tmp}/train{rank}.pt",
    )
    exit_spawned_worker()  # barrier, leave the group, skip a racy teardown
