"""CMC ("cmc"): colour conversion, the multi-view loss against a naive loop and closed forms,
the per-view encoders, training, checkpoints, config checks and DDP gradients."""

import math
import warnings

import pytest
import torch
import torch.multiprocessing as mp

from contrastlab.colorspace import rgb_to_lab, rgb_to_ycbcr, to_colorspace
from contrastlab.config import ConfigError, make_config
from contrastlab.distributed import average_gradients, exit_spawned_worker, gather_cat
from contrastlab.losses import cmc_loss, cmc_view_pairs
from contrastlab.methods import build_method
from contrastlab.methods.cmc import CMC
from contrastlab.models import build_backbone
from contrastlab.train import Trainer
from tests.conftest import init_gloo, tiny_config

# ----------------------------------------------------------------------------- colour spaces

# scikit-image rgb2lab (D65) values, 4 significant decimals
LAB_REFERENCE = {
    (1.0, 1.0, 1.0): (100.0, 0.0, 0.0),
    (0.0, 0.0, 0.0): (0.0, 0.0, 0.0),
    (1.0, 0.0, 0.0): (53.2408, 80.0925, 67.2032),
    (0.0, 1.0, 0.0): (87.7347, -86.1827, 83.1793),
    (0.0, 0.0, 1.0): (32.2970, 79.1875, -107.8602),
    (0.5, 0.5, 0.5): (53.3890, 0.0, 0.0),
}


def _pixels(rgbs):
    return torch.tensor(rgbs, dtype=torch.float64).view(-1, 3, 1, 1)


def test_lab_known_values():
    lab = rgb_to_lab(_pixels(list(LAB_REFERENCE))).view(-1, 3)
    want = torch.tensor(list(LAB_REFERENCE.values()), dtype=torch.float64)
    assert torch.allclose(lab, want, atol=5e-3)
    assert torch.equal(lab[0], torch.tensor([100.0, 0.0, 0.0], dtype=torch.float64))  # white


def _naive_lab(r, g, b):
    """One pixel, straight from the sRGB / CIE definitions, in Python floats."""

    def lin(c):
        return c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4

    m = [
        [0.412453, 0.357580, 0.180423],
        [0.212671, 0.715160, 0.072169],
        [0.019334, 0.119193, 0.950227],
    ]
    rgb = [lin(r), lin(g), lin(b)]
    xyz = [sum(m[i][j] * rgb[j] for j in range(3)) for i in range(3)]
    white = [sum(row) for row in m]

    def f(t):
        d = 6 / 29
        return t ** (1 / 3) if t > d**3 else t / (3 * d * d) + 4 / 29

    fx, fy, fz = (f(xyz[i] / white[i]) for i in range(3))
    return 116 * fy - 16, 500 * (fx - fy), 200 * (fy - fz)


def test_lab_matches_naive_per_pixel_formula():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 4, 5, generator=g, dtype=torch.float64)
    x[0, :, 0, 0] = 0.01  # the linear segments of both curves
    lab = rgb_to_lab(x)
    for n in range(2):
        for i in range(4):
            for j in range(5):
                want = _naive_lab(*x[n, :, i, j].tolist())
                assert lab[n, :, i, j].tolist() == pytest.approx(want, abs=1e-9)


def test_ycbcr_known_values():
    y = rgb_to_ycbcr(_pixels([(1.0, 1.0, 1.0), (1.0, 0.0, 0.0), (0.0, 0.0, 1.0)])).view(-1, 3)
    want = torch.tensor(
        [(1.0, 0.0, 0.0), (0.299, -0.168736, 0.5), (0.114, 0.5, -0.081312)], dtype=torch.float64
    )
    assert torch.allclose(y, want, atol=1e-6)


@pytest.mark.parametrize("space", ["lab", "ycbcr", "rgb"])
def test_to_colorspace_scales_the_gamut_to_about_unit_range(space):
    corners = _pixels([(r, g, b) for r in (0.0, 1.0) for g in (0.0, 1.0) for b in (0.0, 1.0)])
    x = to_colorspace(corners, space)
    assert x.abs().max() <= 1.0 + 1e-3
    assert x.amax(dim=(0, 2, 3)).min() > 0.5  # every channel uses its range
    assert x.dtype == torch.float64


def test_colour_conversion_stays_fp32_under_autocast():
    x = torch.rand(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = to_colorspace(x, "lab")
    assert y.dtype == torch.float32
    assert torch.equal(y, to_colorspace(x, "lab"))


# ----------------------------------------------------------------------------- loss


def _naive_cmc(z, t, graph):
    z = torch.nn.functional.normalize(z.double(), dim=-1)
    V, B, _ = z.shape
    pairs = (
        [(i, j) for i in range(V) for j in range(i + 1, V)]
        if graph == "full"
        else [(0, j) for j in range(1, V)]
    )
    total = 0.0
    for i, j in pairs:
        for a, b in ((i, j), (j, i)):  # anchors from view a, candidates from view b
            direction = 0.0
            for n in range(B):
                s = [float(z[a, n] @ z[b, m]) / t for m in range(B)]
                direction += -s[n] + math.log(sum(math.exp(v) for v in s))
            total += direction / B
    return total


@pytest.mark.parametrize("views, graph", [(2, "full"), (3, "full"), (3, "core"), (4, "core")])
def test_cmc_loss_matches_naive_loop(views, graph):
    z = torch.randn(views, 6, 5, generator=torch.Generator().manual_seed(views))
    loss, acc = cmc_loss(z, 0.3, graph)
    assert loss.item() == pytest.approx(_naive_cmc(z, 0.3, graph), rel=1e-6)
    assert 0.0 <= acc.item() <= 1.0


def test_cmc_two_views_full_equals_core():
    z = torch.randn(2, 8, 4, generator=torch.Generator().manual_seed(1))
    assert torch.equal(cmc_loss(z, 0.2, "full")[0], cmc_loss(z, 0.2, "core")[0])
    assert cmc_view_pairs(4, "full") == [(0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3)]
    assert cmc_view_pairs(4, "core") == [(0, 1), (0, 2), (0, 3)]


def test_cmc_closed_forms():
    B, t = 5, 0.5
    # all embeddings identical: every candidate scores the same, each direction costs log B
    same = torch.ones(3, B, 4)
    loss, _ = cmc_loss(same, t, "full")
    assert loss.item() == pytest.approx(3 * 2 * math.log(B), rel=1e-6)
    # orthonormal samples, aligned across views: positive 1/t, negatives 0
    eye = torch.eye(B).expand(2, B, B)
    loss, acc = cmc_loss(eye, t, "full")
    want = 2 * (-1 / t + math.log(math.exp(1 / t) + B - 1))
    assert loss.item() == pytest.approx(want, rel=1e-6)
    assert acc.item() == 1.0


def test_cmc_gradient_pulls_views_together():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(2, 8, 6, generator=g, requires_grad=True)
    loss, _ = cmc_loss(z, 0.2)
    loss.backward()
    assert torch.isfinite(z.grad).all() and z.grad.abs().sum() > 0
    with torch.no_grad():  # a small step against the gradient lowers the loss
        z2 = z - 0.01 * z.grad
    assert cmc_loss(z2, 0.2)[0] < loss


def test_cmc_loss_rejects_bad_input():
    with pytest.raises(ValueError, match="V, B, D"):
        cmc_loss(torch.randn(4, 3), 0.1)
    with pytest.raises(ValueError, match="at least 2 views"):
        cmc_loss(torch.randn(1, 4, 3), 0.1)
    with pytest.raises(ValueError, match="temperature"):
        cmc_loss(torch.randn(2, 4, 3), 0.0)
    with pytest.raises(ValueError, match="graph"):
        cmc_loss(torch.randn(2, 4, 3), 0.1, "star")


# ----------------------------------------------------------------------------- backbones


@pytest.mark.parametrize(
    "name, in_channels",
    [("convnet", 1), ("convnet", 2), ("cifar_resnet18", 1), ("resnet18", 2), ("cifar_resnet50", 2)],
)
def test_backbone_in_channels_and_half_width(name, in_channels):
    full_net, full = build_backbone(name, 16)
    net, dim = build_backbone(name, 16, in_channels=in_channels, width_mult=0.5)
    assert dim == full // 2
    assert net(torch.randn(2, in_channels, 16, 16)).shape == (2, dim)
    assert sum(p.numel() for p in net.parameters()) < sum(p.numel() for p in full_net.parameters())


def test_full_width_resnet_is_torchvision_resnet():
    import torchvision

    torch.manual_seed(0)
    ref = torchvision.models.resnet18(weights=None)
    torch.manual_seed(0)
    net, _ = build_backbone("resnet18")
    got = net.state_dict()
    assert all(
        torch.equal(v, got[k]) for k, v in ref.state_dict().items() if not k.startswith("fc")
    )


# ----------------------------------------------------------------------------- the method


def test_cmc_builds_one_encoder_per_view_and_concatenates_features():
    cfg = tiny_config("cmc", method={"views": [[0], [1], [2]]})
    m = build_method(cfg, 10)
    assert isinstance(m, CMC) and m.n_views == cfg.views_per_sample == 1
    assert len(m.backbone.encoders) == len(m.head) == 3
    firsts = [next(e.parameters()) for e in m.backbone.encoders]
    assert [w.shape[1] for w in firsts] == [1, 1, 1]  # one input channel each
    m.eval()
    x = torch.rand(4, 3, 16, 16)
    feats = m.backbone(x)
    assert feats.shape == (4, m.feature_dim) and m.feature_dim == 3 * 16  # width 8 halved, x4
    parts = m.backbone.split(x)
    assert torch.equal(feats[:, 16:32], m.backbone.encoders[1](parts[1]))
    # one crop per view: view v's features depend on crop v only
    crops = torch.stack([x, torch.rand_like(x), torch.rand_like(x)])
    assert torch.equal(m.backbone(crops)[:, :16], feats[:, :16])


def test_cmc_separate_crops_draw_one_crop_per_view():
    cfg = tiny_config("cmc", method={"shared_crop": False, "colorspace": "rgb"})
    m = build_method(cfg, 10)
    assert m.n_views == cfg.views_per_sample == 2
    views = torch.rand(2, 4, 3, 16, 16)
    z = m.embed(views)
    assert z.shape == (2, 4, 16)
    # view 1 (channels 1, 2) is computed from crop 1 only
    views2 = views.clone()
    views2[1, :, 0] = 0.0  # channel 0 of crop 1 is not used by any view
    views2[0, :, 1:] = 0.0  # channels 1, 2 of crop 0 are not used either
    m.eval()
    assert torch.allclose(m.embed(views), m.embed(views2))


def test_cmc_warns_that_gray_digits_have_no_chroma_view():
    with pytest.warns(UserWarning, match="grayscale"):
        build_method(tiny_config("cmc", method={"colorspace": "lab"}), 10)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        build_method(tiny_config("cmc", method={"colorspace": "rgb"}), 10)


def test_cmc_defaults_follow_the_paper():
    cfg = make_config({"method": {"name": "cmc"}})
    m = cfg.method
    assert (m.colorspace, m.views, m.graph, m.width_mult) == ("lab", ((0,), (1, 2)), "full", 0.5)
    assert (m.temperature, m.shared_crop, cfg.views_per_sample) == (0.07, True, 1)
    aug = cfg.augment
    assert not aug.normalize and aug.jitter_p == aug.grayscale_p == aug.blur_p == 0.0


def test_cmc_monitor_is_smaller_and_explicit_sizes_win():
    # one cheap crop per image: the default 10000 + 2000 monitor images would cost ~10% of a
    # CIFAR-10 epoch, so CMC resolves a smaller monitor; the others keep the default
    ev = make_config({"method": {"name": "cmc"}}).eval
    assert (ev.monitor_train_size, ev.monitor_test_size, ev.knn_full_at_end) == (4000, 1000, True)
    ev = make_config({"method": {"name": "simclr"}}).eval
    assert (ev.monitor_train_size, ev.monitor_test_size) == (10000, 2000)
    ev = make_config({"method": {"name": "cmc"}, "eval": {"monitor_train_size": 0}}).eval
    assert (ev.monitor_train_size, ev.monitor_test_size) == (0, 1000)


def test_cmc_trains_and_loss_falls():
    # tiny_config splits R | GB on the gray digits (Lab's ab view would be constant)
    cfg = tiny_config("cmc", method={"temperature": 0.2})
    t = Trainer(cfg)
    views = t.views(t.train_set.images[:64])
    losses = []
    for _ in range(5):
        loss, metrics = t.method.training_step(views, t.train_set.labels[:64], torch.arange(64))
        t.optimizer.zero_grad()
        loss.backward()
        t.optimizer.step()
        losses.append(loss.item())
    assert "cmc_acc" in metrics
    assert losses[-1] < losses[0] - 0.5


def test_cmc_checkpoint_round_trip(tmp_path):
    cfg = tiny_config("cmc")
    m = build_method(cfg, 10)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.01)
    torch.save(m.state_dict(), tmp_path / "m.pt")
    m2 = build_method(cfg, 10)
    m2.load_state_dict(torch.load(tmp_path / "m.pt", weights_only=True))
    assert any(k.startswith("backbone.encoders.1.") for k in m2.state_dict())
    assert any(k.startswith("head.1.") for k in m2.state_dict())
    m.eval(), m2.eval()
    x = torch.rand(3, 3, 16, 16)
    assert torch.equal(m.backbone(x), m2.backbone(x))


@pytest.mark.parametrize(
    "method, section, match",
    [
        ({"views": [[0]]}, {}, "method.views needs at least 2"),
        ({"views": [[0, 1], [1, 2]]}, {}, "method.views: channel groups must be disjoint"),
        ({"views": [[0], [3]]}, {}, "method.views: channel indices must be 0, 1 or 2"),
        ({"views": [[0], []]}, {}, "method.views: every channel group"),
        ({"colorspace": "hsv"}, {}, "method.colorspace"),
        ({"graph": "star"}, {}, "method.graph"),
        ({"temperature": 0.0}, {}, "method.temperature"),
        ({"width_mult": 0.0}, {}, "method.width_mult"),
        ({}, {"augment": {"normalize": True}}, "augment.normalize must be false"),
    ],
)
def test_cmc_rejects_bad_config(method, section, match):
    with pytest.raises(ConfigError, match=match):
        tiny_config("cmc", method=method, **section)


# ----------------------------------------------------------------------------- DDP


def _ddp_worker(rank, world, tmp):
    init_gloo(rank, world, tmp)
    torch.manual_seed(0)
    net = torch.nn.Linear(6, 4)
    x = torch.randn(3, 8, 6, generator=torch.Generator().manual_seed(1))  # [V, B, D_in]
    b = 8 // world
    z = gather_cat(net(x[:, rank * b : (rank + 1) * b]), dim=1)  # [V, B_global, 4]
    loss, _ = cmc_loss(z, 0.3, "full")
    loss.backward()
    average_gradients(net)
    torch.save({"w": net.weight.grad, "loss": loss.detach()}, f"{tmp}/grad{rank}.pt")
    exit_spawned_worker()  # barrier, leave the group, skip a racy teardown


@pytest.mark.slow  # two spawned processes: their start-up dominates
def test_cmc_ddp_gradient_equals_full_batch_gradient(tmp_path):
    mp.spawn(_ddp_worker, args=(2, str(tmp_path)), nprocs=2, join=True)
    torch.manual_seed(0)
    net = torch.nn.Linear(6, 4)
    x = torch.randn(3, 8, 6, generator=torch.Generator().manual_seed(1))
    loss, _ = cmc_loss(net(x), 0.3, "full")
    loss.backward()
    for rank in range(2):
        got = torch.load(tmp_path / f"grad{rank}.pt", weights_only=True)
        assert torch.allclose(got["loss"], loss.detach(), atol=1e-6)
        assert torch.allclose(got["w"], net.weight.grad, atol=1e-6)


@pytest.mark.slow
def test_cmc_ddp_training_keeps_workers_identical(tmp_path):
    from tests.test_distributed import _train_worker

    mp.spawn(_train_worker, args=(2, str(tmp_path), "cmc"), nprocs=2, join=True)
    r0 = torch.load(tmp_path / "train0.pt", weights_only=False)
    r1 = torch.load(tmp_path / "train1.pt", weights_only=False)
    assert r0["local_batch"] == r1["local_batch"] == 32
    for k, v in r0["params"].items():
        assert torch.allclose(v, r1["params"][k], atol=1e-6), k
