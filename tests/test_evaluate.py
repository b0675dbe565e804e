"""kNN monitor and linear probe against naive references."""

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
