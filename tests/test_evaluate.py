"""kNN monitor and linear probe against naive references."""

import math

import pytest
import torch

from contrastlab.config import EvalConfig
from contrastlab.evaluate import knn_accuracy, knn_predict, linear_probe


def naive_knn(train, train_y, test, n_classes, k, t):
    train = torch.nn.functional.normalize(train.double(), dim=1)
    test = torch.nn.functional.normalize(test.double(), dim=1)
    out = torch.zeros(len(test), n_classes, dtype=torch.float64)
    for i in range(len(test)):
        sims = [(float(test[i] @ train[j]), j) for j in range(len(train))]
        sims.sort(reverse=True)
        for s, j in sims[:k]:
            out[i, train_y[j]] += torch.exp(torch.tensor(s / t, dtype=torch.float64))
    return out


def test_knn_scores_match_naive_loop():
    g = torch.Generator().manual_seed(0)
    tr, te = torch.randn(60, 7, generator=g), torch.randn(13, 7, generator=g)
    ytr = torch.randint(0, 4, (60,), generator=g)
    fast = knn_predict(tr, ytr, te, 4, k=9, temperature=0.1, chunk_size=5)
    assert torch.allclose(fast.double(), naive_knn(tr, ytr, te, 4, 9, 0.1), rtol=1e-5)


def test_knn_separable_clusters_are_perfect_and_k_is_clipped():
    centers = torch.eye(3) * 10
    tr = centers.repeat_interleave(5, 0) + 0.1 * torch.randn(15, 3)
    ytr = torch.arange(3).repeat_interleave(5)
    acc = knn_accuracy(tr, ytr, centers, torch.arange(3), 3, EvalConfig(knn_k=200, knn_t=0.1))
    assert acc["knn_top1"] == 100.0


def test_linear_probe_learns_a_linear_rule():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(400, 10, generator=g)
    y = (x[:, 0] + x[:, 1] > 0).long()
    res = linear_probe(
        x[:300], y[:300], x[300:], y[300:], 2, EvalConfig(probe_epochs=30, probe_lr=0.1)
    )
    assert res["probe_top1"] > 90
    # random labels cannot be predicted on held-out data
    yr = torch.randint(0, 2, (400,), generator=g)
    res = linear_probe(x[:300], yr[:300], x[300:], yr[300:], 2, EvalConfig(probe_epochs=30))
    assert res["probe_top1"] < 70


def test_cpu_blocked_forward_gives_bit_identical_features(monkeypatch):
    # evaluate forwards CPU_FORWARD_ROWS rows at a time on the CPU (speed only): every image's
    # features must equal those of one forward over the whole batch, tail block included
    from contrastlab import evaluate
    from contrastlab.models import build_backbone

    torch.manual_seed(0)
    net, _ = build_backbone("convnet")
    net = net.to(memory_format=torch.channels_last)
    images = torch.randint(0, 256, (200, 3, 32, 32), dtype=torch.uint8)

    def to_input(x):
        return (x.float() / 255).contiguous(memory_format=torch.channels_last)

    def patches(x, n, gen):  # random crops, like EMP-SSL's patch views
        off = torch.randint(0, 9, (n, 2), generator=gen)
        return torch.stack([to_input(x[..., i : i + 24, j : j + 24]) for i, j in off.tolist()])

    cpu = torch.device("cpu")

    def both():
        return (
            evaluate.extract_features(net, images, to_input, 128, cpu),
            evaluate.patch_averaged_features(net, images, patches, 4, 128, cpu, seed=3),
        )

    assert evaluate.CPU_FORWARD_ROWS < 128  # blocks inside each extraction batch
    blocked = both()
    monkeypatch.setattr(evaluate, "CPU_FORWARD_ROWS", 10**6)
    whole = both()
    for b, w in zip(blocked, whole, strict=True):
        assert b.shape == w.shape and torch.equal(b, w)
    assert net.training  # eval mode was restored


# --------------------------------------------------------------------------- label-free monitors


def _orthonormal(f, r, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(f, r, generator=g, dtype=torch.float64))
    return q  # [f, r] orthonormal columns


@pytest.mark.parametrize("r", [1, 3, 10, 32])
def test_rankme_of_r_equal_orthogonal_directions_is_r(r):
    # m rows along each of r orthonormal directions: r equal singular values sqrt(m)
    from contrastlab.evaluate import rankme

    q = _orthonormal(32, r)
    x = 3.0 * q.T.repeat(5, 1)  # [5r, 32]
    assert rankme(x) == pytest.approx(r, rel=1e-4)
    assert rankme(x.float()) == pytest.approx(r, rel=1e-4)  # any float dtype, N < F too


def test_rankme_matches_the_papers_formula_on_svd():
    from contrastlab.evaluate import RANKME_EPS, rankme

    g = torch.Generator().manual_seed(0)
    for shape in [(200, 16), (16, 200)]:
        x = torch.randn(*shape, generator=g) * torch.linspace(0.1, 3, shape[1])
        s = torch.linalg.svdvals(x.double())
        p = s / s.sum() + RANKME_EPS
        assert rankme(x) == pytest.approx(float(torch.exp(-(p * p.log()).sum())), rel=1e-6)


def test_alignment_and_uniformity_match_naive_loops_and_closed_forms():
    from contrastlab.evaluate import alignment, uniformity

    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(12, 5, generator=g), torch.randn(12, 5, generator=g)
    na, nb = (torch.nn.functional.normalize(t.double(), dim=1) for t in (a, b))
    naive_align = sum(float((na[i] - nb[i]).norm() ** 2) for i in range(12)) / 12
    assert alignment(a, b) == pytest.approx(naive_align, rel=1e-9)
    pairs = [(i, j) for i in range(12) for j in range(i + 1, 12)]
    naive_unif = math.log(
        sum(math.exp(-2 * float((na[i] - na[j]).norm() ** 2)) for i, j in pairs) / len(pairs)
    )
    assert uniformity(a) == pytest.approx(naive_unif, rel=1e-9)
    # closed forms: same point -> alignment 0, uniformity 0 (collapse); antipodal -> 4 and -8
    assert alignment(a, 3 * a) == pytest.approx(0, abs=1e-12)
    assert alignment(a, -a) == pytest.approx(4.0)
    assert uniformity(a[:1].repeat(7, 1)) == pytest.approx(0, abs=1e-12)
    assert uniformity(torch.tensor([[1.0, 0.0], [-1.0, 0.0]])) == pytest.approx(-8.0)
    with pytest.raises(ValueError, match="N >= 2"):
        uniformity(a[:1])


def test_ridge_r2_is_one_for_a_linear_target_and_about_zero_for_noise():
    from contrastlab.evaluate import ridge_r2

    g = torch.Generator().manual_seed(0)
    x = torch.randn(600, 20, generator=g) * torch.linspace(0.5, 5, 20) + 3.0
    w = torch.randn(20, 2, generator=g)
    y = torch.cat([x @ w + 1.5, torch.randn(600, 1, generator=g)], dim=1)  # 2 linear, 1 noise
    r2 = ridge_r2(x[:400], y[:400], x[400:], y[400:], ridge=1e-6)
    assert r2[:2].tolist() == pytest.approx([1.0, 1.0], abs=1e-6)
    assert -0.1 < r2[2] < 0.05  # held out: noise cannot be predicted (in-sample it would be >0)
    # a strong ridge shrinks the fit towards the mean prediction: R^2 falls
    assert ridge_r2(x[:400], y[:400], x[400:], y[400:], ridge=100.0)[0] < 0.9
    # a target constant on the held-out rows has no R^2
    const = torch.ones(600, 1)
    assert torch.isnan(ridge_r2(x[:400], const[:400], x[400:], const[400:], 0.1)).all()
    with pytest.raises(ValueError, match="ridge must be > 0"):
        ridge_r2(x, y, x, y, 0.0)


def test_image_statistics_match_a_per_image_loop():
    from contrastlab.evaluate import NUISANCE_TARGETS, image_statistics

    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (7, 3, 5, 6), generator=g, dtype=torch.uint8)
    got = image_statistics(images, chunk=3)
    assert got.shape == (7, len(NUISANCE_TARGETS))
    for i in range(7):
        x = images[i].double() / 255
        luma = 0.299 * x[0] + 0.587 * x[1] + 0.114 * x[2]
        want = [*(float(x[c].mean()) for c in range(3)), float(luma.mean())]
        want.append(math.sqrt(float(((luma - luma.mean()) ** 2).mean())))
        assert got[i].tolist() == pytest.approx(want, abs=1e-6)


def test_paired_view_features_repeat_with_the_seed_and_equal_the_encoded_views():
    from contrastlab.augment import BatchAugment
    from contrastlab.config import AugmentConfig
    from contrastlab.evaluate import paired_view_features
    from contrastlab.models import build_backbone

    torch.manual_seed(0)
    net, _ = build_backbone("convnet", 8)
    aug = BatchAugment(AugmentConfig(), 16, (0.5,) * 3, (0.25,) * 3)
    images = torch.randint(0, 256, (10, 3, 16, 16), dtype=torch.uint8)
    cpu = torch.device("cpu")
    z1, z2 = paired_view_features(net, images, aug, 8, cpu, seed=5)  # 4 images per draw
    again = paired_view_features(net, images, aug, 8, cpu, seed=5)
    assert torch.equal(z1, again[0]) and torch.equal(z2, again[1]) and net.training
    gen = torch.Generator().manual_seed(5)
    net.eval()
    with torch.no_grad():
        for start in range(0, 10, 4):
            v = aug(images[start : start + 4], 2, gen)  # [2, b, 3, 16, 16]
            assert torch.allclose(net(v[0]), z1[start : start + 4], atol=1e-6)
            assert torch.allclose(net(v[1]), z2[start : start + 4], atol=1e-6)
    assert not torch.allclose(z1, z2)  # two different views


# --------------------------------------------------------------------------- automatic kNN k


def test_automatic_knn_k_follows_the_memory_size_and_an_explicit_k_wins():
    from contrastlab.evaluate import auto_knn_k, knn_k, protocol

    assert auto_knn_k(10000, 10) == 200  # CIFAR-10 monitor memory: the usual k
    assert auto_knn_k(50000, 10) == 200  # clipped
    assert auto_knn_k(1347, 10) == 27  # digits
    assert auto_knn_k(10000, 100) == 20
    assert auto_knn_k(60, 3) == 5  # clipped below
    assert knn_k(EvalConfig(), 1347, 10) == 27 and knn_k(EvalConfig(knn_k=200), 1347, 10) == 200
    with pytest.raises(ValueError, match="needs images and classes"):
        auto_knn_k(0, 10)
    prot = protocol(EvalConfig(), "knn", memory_size=1347, num_classes=10, full_memory_size=5000)
    assert prot["k"] == 27 and prot["k_auto"] is True and prot["k_full"] == 100
    assert "N_memory=1347, classes=10" in prot["k_rule"]
    prot = protocol(EvalConfig(knn_k=9), "knn", memory_size=1347, num_classes=10)
    assert prot["k"] == 9 and prot["k_auto"] is False and "k_rule" not in prot


def test_knn_accuracy_uses_the_automatic_k():
    g = torch.Generator().manual_seed(0)
    tr, te = torch.randn(300, 7, generator=g), torch.randn(40, 7, generator=g)
    ytr, yte = torch.randint(0, 4, (300,), generator=g), torch.randint(0, 4, (40,), generator=g)
    got = knn_accuracy(tr, ytr, te, yte, 4, EvalConfig())  # k = round(300 / 20) = 15
    scores = naive_knn(tr, ytr, te, 4, 15, 0.1)
    want = 100.0 * float((scores.argmax(1) == yte).double().mean())
    assert got["knn_top1"] == pytest.approx(want)


# --------------------------------------------------------------------------- diagnosis


def _hist(*rows):
    return [{"epoch": e, **r} for e, r in enumerate(rows)]


INIT = {"knn_top1": 80.0, "rankme": 40.0, "nuisance_r2": 0.7}


def test_diagnose_is_silent_on_a_healthy_run():
    from contrastlab.evaluate import diagnose

    healthy = _hist(INIT, {"knn_top1": 84.0, "rankme": 35.0, "nuisance_r2": 0.4})
    assert diagnose(healthy) == []
    assert diagnose(healthy[:1]) == [] and diagnose([]) == []  # nothing trained yet
    # within the margin of the random-init encoder is noise, not a fall
    assert diagnose(_hist(INIT, {"knn_top1": 77.5, "rankme": 35.0, "nuisance_r2": 0.5})) == []


def test_diagnose_names_a_colour_shortcut():
    from contrastlab.evaluate import diagnose, diagnosis_kind

    msgs = diagnose(
        _hist(INIT, {"knn_top1": 60.0, "rankme": 30.0, "nuisance_r2": 0.97}), final=True
    )
    assert [diagnosis_kind(m) for m in msgs] == ["knn_below_init", "shortcut"]
    assert msgs[0].startswith("knn_below_init: kNN fell below the random-init encoder: a shortcut")
    assert "60.0% at epoch 1 against 80.0% at init, more than 3 points" in msgs[0]
    assert "nuisance_r2 0.97 at epoch 1, 0.70 at init" in msgs[1]
    assert "augment.channel_shuffle_p=1" in msgs[1]
    # kNN flat (not fallen) with a high nuisance_r2 is also a shortcut
    flat = diagnose(_hist(INIT, {"knn_top1": 81.0, "nuisance_r2": 0.9}), final=True)
    assert [diagnosis_kind(m) for m in flat] == ["shortcut"]
    assert "no better than the random-init encoder" in flat[0]
    # no labels (no kNN): a high nuisance_r2 that did not fall from its init value
    unlabeled = _hist({"nuisance_r2": 0.7}, {"nuisance_r2": 0.85})
    msgs = diagnose(unlabeled, final=True)
    assert [diagnosis_kind(m) for m in msgs] == ["shortcut"]
    assert "did not fall from its random-init value" in msgs[0]
    assert diagnose(_hist({"nuisance_r2": 0.95}, {"nuisance_r2": 0.85}), final=True) == []


def test_diagnose_names_a_collapse_and_reads_the_newest_monitored_epoch():
    from contrastlab.evaluate import diagnose, diagnosis_kind

    hist = _hist(INIT, {"knn_top1": 30.0, "rankme": 1.5, "nuisance_r2": 0.2}, {"loss": 1.0})
    msgs = diagnose(hist, final=True)  # epoch 2 has no monitor: epoch 1 is the newest
    assert [diagnosis_kind(m) for m in msgs] == ["knn_below_init", "collapse"]
    assert "see the shortcut and collapse messages" in msgs[0]
    assert "collapsed to a few directions (rankme 1.50 at epoch 1, 40.0 at init)" in msgs[1]
    assert "optim.lr" in msgs[1]
    # rankme is at least 1 (one direction): from 6 (an excess of 5), 1.4 is a collapse, 1.6 not
    assert diagnose(_hist({"rankme": 6.0}, {"rankme": 1.4})) != []
    assert diagnose(_hist({"rankme": 6.0}, {"rankme": 1.6})) == []
    # the embeddings came together although the rank survived: uniformity near 0
    msgs = diagnose(
        _hist({"rankme": 6.0, "uniformity": -0.3}, {"rankme": 5.0, "uniformity": -0.02})
    )
    assert [diagnosis_kind(m) for m in msgs] == ["collapse"]
    assert "came together (rankme 5.00 at epoch 1, 6.0 at init; uniformity -0.020" in msgs[0]
    assert diagnose(_hist({"uniformity": -0.3}, {"uniformity": -0.6})) == []
    # a fall that neither probe explains says where to look
    msgs = diagnose(_hist(INIT, {"knn_top1": 70.0, "rankme": 30.0, "nuisance_r2": 0.3}), final=True)
    assert [diagnosis_kind(m) for m in msgs] == ["knn_below_init"]
    assert "the probes (nuisance_r2 0.30, rankme 30.00) point to neither" in msgs[0]


def test_update_diagnoses_says_each_kind_once_with_its_first_epoch():
    from contrastlab.evaluate import update_diagnoses

    said = []
    hist = _hist(INIT, {"knn_top1": 60.0, "rankme": 30.0, "nuisance_r2": 0.5})
    assert [d["kind"] for d in update_diagnoses(hist, said, final=True)] == ["knn_below_init"]
    hist.append({"epoch": 2, "knn_top1": 55.0, "rankme": 2.0, "nuisance_r2": 0.5})
    new = update_diagnoses(hist, said, final=True)
    assert [(d["epoch"], d["kind"]) for d in new] == [(2, "collapse")]
    assert [(d["epoch"], d["kind"]) for d in said] == [(1, "knn_below_init"), (2, "collapse")]
    assert "60.0% at epoch 1" in said[0]["message"]  # the numbers of its first appearance
    assert update_diagnoses(hist, said, final=True) == []


def test_diagnose_waits_out_the_early_dip_but_not_a_collapse():
    from contrastlab.evaluate import DIAGNOSIS_GRACE_EPOCHS, diagnose, diagnosis_kind

    dip = {"knn_top1": 70.0, "rankme": 30.0, "nuisance_r2": 0.9}
    hist = _hist(INIT, dip)
    assert diagnose(hist) == []  # epoch 1 of a longer run: the usual early dip
    assert len(diagnose(hist, final=True)) == 2  # ...but the run ends there
    hist += [{"epoch": e, "loss": 1.0} for e in range(2, DIAGNOSIS_GRACE_EPOCHS)]
    assert diagnose(hist) == []
    hist.append({"epoch": DIAGNOSIS_GRACE_EPOCHS, **dip})
    assert [diagnosis_kind(m) for m in diagnose(hist)] == ["knn_below_init", "shortcut"]
    collapsed = _hist(INIT, {"knn_top1": 70.0, "rankme": 1.2, "nuisance_r2": 0.3})
    assert [diagnosis_kind(m) for m in diagnose(collapsed)] == ["collapse"]


def test_the_knn_diagnosis_waits_a_fifth_of_the_planned_run():
    """The default digits job dips under its random init for its first dozen epochs and then
    learns: with 100 planned epochs that dip is not reported, a run still under it at a fifth
    of its epochs is."""
    from contrastlab.evaluate import grace_epochs, update_diagnoses

    assert grace_epochs(100) == 20 and grace_epochs(10) == 5 and grace_epochs(40) == 8
    dip = [{"epoch": 0, "knn_top1": 95.5}] + [{"epoch": e, "knn_top1": 92.4} for e in range(1, 8)]
    assert update_diagnoses(dip, [], grace=grace_epochs(100)) == []
    said = update_diagnoses(dip, [], grace=5)
    assert [d["kind"] for d in said] == ["knn_below_init"]
    stuck = dip + [{"epoch": e, "knn_top1": 92.0} for e in range(8, 21)]
    said = update_diagnoses(stuck, [], grace=grace_epochs(100))
    assert [d["kind"] for d in said] == ["knn_below_init"] and said[0]["epoch"] == 20
