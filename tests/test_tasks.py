"""Learnability tasks (contrastlab.data.tasks), the naive reference loop (contrastlab.naive)
and the harness (pipelines/learnability.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from contrastlab.config import DataConfig, EvalConfig
from contrastlab.data import load_dataset
from contrastlab.data.tasks import (
    CENTRED_SIZE,
    MIN_COLOUR_DISTANCE,
    MIN_INK_CONTRAST,
    SIDE_RANGE,
    TASKS,
    make_task,
    raw_pixel_knn,
    write_task,
)
from contrastlab.naive import _augment, _nt_xent, naive_simclr

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tasks():
    return {name: make_task(name) for name in TASKS}


def _ridge_accuracy(x: np.ndarray, labels: np.ndarray, train, test, lam: float = 1e-3) -> float:
    """Closed-form ridge regression from features ``x`` [N, F] to one-hot labels, fitted on
    ``train`` rows, accuracy (%) of its argmax on ``test`` rows."""
    x = (x - x[train].mean(0)) / (x[train].std(0) + 1e-8)
    x = np.concatenate([x, np.ones((len(x), 1))], axis=1)
    y = np.eye(10)[labels]
    a = x[train]
    w = np.linalg.solve(a.T @ a + lam * len(train) * np.eye(a.shape[1]), a.T @ y[train])
    return 100.0 * float(((x[test] @ w).argmax(1) == labels[test]).mean())


def test_there_are_at_least_four_tasks_with_tune_and_report_roles():
    assert len(TASKS) >= 4
    assert {t.role for t in TASKS.values()} == {"tune", "report"}
    assert len({t.nuisance for t in TASKS.values()}) == len(TASKS)  # each a different nuisance


@pytest.mark.parametrize("name", list(TASKS))
def test_task_is_deterministic_and_the_seed_matters(name, tasks):
    a = tasks[name]
    b = make_task(name, seed=0)
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    assert a.images.shape == (1797, 3, 32, 32) and a.images.dtype == torch.uint8
    c = make_task(name, seed=1)
    assert not torch.equal(a.images, c.images)
    # the split is fixed: the same for every seed and task
    assert np.array_equal(a.test_idx, c.test_idx)
    assert np.array_equal(a.test_idx, tasks["colour"].test_idx)


def test_split_sizes_and_balanced_labels(tasks):
    t = tasks["colour"]
    assert (len(t.train_idx), len(t.test_idx)) == (1400, 397)
    assert np.intersect1d(t.train_idx, t.test_idx).size == 0
    for idx in (t.train_idx, t.test_idx):
        counts = np.bincount(t.labels.numpy()[idx], minlength=10)
        assert counts.min() >= 0.9 * counts.mean() and counts.max() <= 1.1 * counts.mean()


def test_colour_varies_widely_and_says_nothing_about_the_digit(tasks):
    t = tasks["colour"]
    mean_colour = t.images.float().mean((2, 3)).numpy()  # [N, 3] in 0..255
    assert mean_colour.std(0).min() > 30  # every channel's mean varies widely across images
    fg, bg = t.factors["fg"], t.factors["bg"]
    assert np.linalg.norm(fg - bg, axis=1).min() >= MIN_COLOUR_DISTANCE
    y = t.labels.numpy()
    # a ridge from the mean colour (and the two drawn colours) to the digit is at chance ...
    colour = np.concatenate([mean_colour, fg, bg], axis=1)
    assert _ridge_accuracy(colour, y, t.train_idx, t.test_idx) < 17
    # ... while the same ridge on the digit's own 8x8 ink is far above it (the test has power)
    # (|image - background| summed over channels is the alpha mask times a per-image constant)
    ink = (t.images.float() - torch.from_numpy(bg).float()[:, :, None, None]).abs().sum(1)
    ink = ink / ink.amax((1, 2), keepdim=True)
    assert _ridge_accuracy(ink.flatten(1).numpy(), y, t.train_idx, t.test_idx) > 60


@pytest.mark.parametrize("name", ["position", "colour_position"])
def test_digit_moves_and_scales_inside_the_canvas(name, tasks):
    t = tasks[name]
    side, row, col = (t.factors[k] for k in ("side", "row", "col"))
    assert side.min() == SIDE_RANGE[0] and side.max() == SIDE_RANGE[1]
    assert (row + side <= 32).all() and (col + side <= 32).all()
    assert row.std() > 4 and col.std() > 4
    # outside its box every pixel is background: the box is where the digit was drawn
    bg = torch.zeros(1797, 3, dtype=torch.uint8)
    if name == "colour_position":
        bg = torch.from_numpy(t.factors["bg"]).float().round().to(torch.uint8)
    for i in range(0, 1797, 7):
        outside = torch.ones(32, 32, dtype=torch.bool)
        outside[row[i] : row[i] + side[i], col[i] : col[i] + side[i]] = False
        px = t.images[i][:, outside]  # [3, n_outside]
        assert (px == bg[i][:, None]).all(), i
    y = t.labels.numpy()
    assert _ridge_accuracy(np.stack([side, row, col], 1), y, t.train_idx, t.test_idx) < 17


def test_texture_backgrounds_differ_and_the_digit_contrasts(tasks):
    t = tasks["texture"]
    f = t.factors
    assert set(np.unique(f["photo"])) == {0, 1}  # both photos are used
    assert (np.abs(f["ink"] - f["crop_luma"]) >= MIN_INK_CONTRAST - 1e-9).all()
    lo = (32 - CENTRED_SIZE) // 2
    border = torch.cat(  # the 2-px frame outside the digit's box: pure photo
        [t.images[:, :, :lo].flatten(2), t.images[:, :, -lo:].flatten(2)], dim=2
    ).float()
    assert border.mean(2).std(0).min() > 25  # backgrounds differ from image to image
    assert (border.std(2).mean(1) > 3).float().mean() > 0.9  # and are not flat
    y = t.labels.numpy()
    nuisance = np.stack([f["photo"], f["crop_side"], f["crop_top"], f["crop_left"], f["ink"]], 1)
    assert _ridge_accuracy(nuisance, y, t.train_idx, t.test_idx) < 17


def test_unknown_task_names_the_allowed_ones():
    with pytest.raises(ValueError, match="unknown task 'colours'; allowed: colour, position"):
        make_task("colours")


def test_parquet_shards_load_through_the_platform_loader_exactly(tmp_path, tasks):
    write_task("colour_position", tmp_path / "t", rows_per_shard=500)
    assert len(list((tmp_path / "t" / "train").glob("*.parquet"))) == 3  # 500 + 500 + 400
    # a rewrite with other shard sizes leaves no stale shard behind
    written = write_task("colour_position", tmp_path / "t", rows_per_shard=1000)
    assert len(list((tmp_path / "t" / "train").glob("*.parquet"))) == 2
    cfg = DataConfig(
        dataset="parquet",
        root=str(tmp_path / "t" / "train"),
        test_root=str(tmp_path / "t" / "test"),
        image_size=32,
    )
    splits = load_dataset(cfg)
    assert (len(splits.train), len(splits.test)) == (1400, 397)
    ref = written.splits()
    for got, want in ((splits.train, ref.train), (splits.test, ref.test)):
        assert torch.equal(got.images, want.images)  # PNG is lossless
        assert torch.equal(got.labels, want.labels)
    assert torch.equal(ref.train.images, tasks["colour_position"].splits().train.images)
    meta = json.loads((tmp_path / "t" / "task.json").read_text())
    assert meta["task"] == "colour_position" and (meta["train"], meta["test"]) == (1400, 397)


def test_raw_pixel_knn_matches_a_naive_loop(tasks):
    full = tasks["position"].splits()
    splits = type(full)(train=full.train, test=full.test.subset(np.arange(120)))
    cfg = EvalConfig(knn_k=5, knn_t=0.1)
    got = raw_pixel_knn(splits, cfg)
    mean = torch.tensor(splits.train.mean)[:, None, None]
    std = torch.tensor(splits.train.std)[:, None, None]

    def feats(x):
        f = ((x.double() / 255 - mean) / std).flatten(1)
        return f / f.norm(dim=1, keepdim=True)

    tr, te = feats(splits.train.images), feats(splits.test.images)
    correct = 0
    for q, label in zip(te, splits.test.labels.tolist(), strict=True):
        sims = tr @ q
        top = torch.argsort(sims, descending=True)[:5].tolist()
        votes = [0.0] * 10
        for j in top:
            votes[int(splits.train.labels[j])] += float(torch.exp(sims[j] / 0.1))
        correct += max(range(10), key=votes.__getitem__) == label
    assert round(got * len(te) / 100) == correct  # the same test images right (float32 mean)
    assert 20 < got < 100


# --------------------------------------------------------------------------- naive loop


def test_naive_augment_without_crop_or_gain_only_permutes_channels():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(16, 3, 8, 8)
    y = _augment(x, (1.0, 1.0), (1.0, 1.0), g)
    perms = set()
    for a, b in zip(x, y, strict=True):
        match = [
            min(range(3), key=lambda k, c=c: float((b[c] - a[k]).abs().max())) for c in range(3)
        ]
        assert sorted(match) == [0, 1, 2]
        assert torch.allclose(b, a[match], atol=1e-5)  # a full-image crop is the identity
        perms.add(tuple(match))
    assert len(perms) > 1


def test_naive_nt_xent_closed_form():
    # identical embeddings: all 2B-1 logits of a row are equal, loss = log(2B - 1)
    z = torch.ones(8, 4)
    assert _nt_xent(z, 0.2).item() == pytest.approx(np.log(7), rel=1e-6)
    # each pair alone on its own axis: the positive logit 1/t, the others 0
    z = torch.cat([torch.eye(4), torch.eye(4)])
    t = 0.5
    want = -np.log(np.exp(1 / t) / (np.exp(1 / t) + 6))
    assert _nt_xent(z, t).item() == pytest.approx(want, rel=1e-6)


@pytest.mark.slow
def test_naive_loop_runs_reports_and_repeats(tasks):
    splits = tasks["position"].splits()
    small = type(splits)(train=splits.train.subset(np.arange(256)), test=splits.test)
    cfg = EvalConfig(knn_k=20)
    a = naive_simclr(small, 1, cfg, batch_size=64, width=8)
    b = naive_simclr(small, 1, cfg, batch_size=64, width=8)
    assert a["history"] == b["history"]  # same seed, same numbers
    assert len(a["history"]) == 2 and a["knn_top1"] == a["history"][-1]
    assert a["settings"]["knn_k"] == 20 and a["settings"]["temperature"] == 0.2
    with pytest.raises(ValueError, match="batch_size must be in 2..256"):
        naive_simclr(small, 1, cfg, batch_size=512)


# --------------------------------------------------------------------------- the harness


def _harness(*args: str, timeout: int = 240) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "platform")}
    return subprocess.run(
        [sys.executable, str(ROOT / "pipelines" / "learnability.py"), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=ROOT,
    )


@pytest.mark.slow
def test_harness_smoke_test_writes_results_and_table_and_resumes(tmp_path):
    out = tmp_path / "out"
    r = _harness("--smoke-test", "--out", str(out))
    assert r.returncode == 0, r.stdout + r.stderr
    results = json.loads((out / "results.json").read_text())
    assert {(x["method"], x["variant"]) for x in results} == {
        ("raw_pixels", "-"),
        ("naive_simclr", "reference"),
        ("simclr", "defaults"),
        ("simclr", "recipe"),
    }
    for x in results:
        assert x["task"] == "position" and x["knn_k"] == 20
        assert 0 <= x["init_knn"] <= 100 and 0 <= x["final_knn"] <= 100 and x["wall_s"] > 0
    recipe = next(x for x in results if x["variant"] == "recipe")
    assert "augment.crop_scale=[0.1,1.0]" in recipe["overrides"]
    assert len([ln for ln in r.stdout.splitlines() if ln.startswith("[")]) == 4  # one per run
    table = (out / "learnability.md").read_text()
    assert "position (tune): defaults" in table and "raw pixels" in table
    assert "| `simclr` |" in table and "→" in table
    assert (out / "results.csv").read_text().count("\n") == 5

    # a second invocation skips what is done (and trains nothing)
    r = _harness("--smoke-test", "--out", str(out))
    assert r.returncode == 0, r.stdout + r.stderr
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("[")]
    assert len(lines) == 4 and all(ln.endswith("in results: skipped") for ln in lines)
    assert json.loads((out / "results.json").read_text()) == results

    # the sweep column fills from a JSON
    sweep = tmp_path / "sweep.json"
    sweep.write_text(json.dumps({"position": {"simclr": {"init": 12.5, "end": 61.25}}}))
    r = _harness("--smoke-test", "--out", str(out), "--table-only", "--sweep-results", str(sweep))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "| `simclr` | " in (table := (out / "learnability.md").read_text())
    assert "| 12.5 → 61.2 |" in table


@pytest.mark.slow
def test_harness_takes_recipes_from_a_file(tmp_path):
    # only fields this checkout has, whatever the built-in recipes need
    recipes = tmp_path / "recipes.yaml"
    recipes.write_text("position: ['augment.crop_scale=[0.5,1.0]', 'augment.flip_p=0']\n")
    out = tmp_path / "out"
    r = _harness(
        "--smoke-test", "--out", str(out), "--naive-epochs", "0", "--variants", "recipe",
        "--recipes", str(recipes),
    )  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    results = json.loads((out / "results.json").read_text())
    assert [(x["method"], x["variant"]) for x in results] == [
        ("raw_pixels", "-"),
        ("simclr", "recipe"),
    ]
    assert results[1]["overrides"] == ["augment.crop_scale=[0.5,1.0]", "augment.flip_p=0"]
    cfg = yaml.safe_load((Path(results[1]["run_dir"]) / "config.yaml").read_text())
    assert cfg["augment"]["crop_scale"] == [0.5, 1.0] and cfg["augment"]["flip_p"] == 0
    assert cfg["data"]["root"] == str(out / "data" / "position" / "train")


@pytest.mark.slow
def test_harness_rejects_a_recipe_key_before_training(tmp_path):
    recipes = tmp_path / "recipes.yaml"
    recipes.write_text("position: ['augment.not_a_field=1']\n")
    r = _harness("--smoke-test", "--out", str(tmp_path / "o"), "--recipes", str(recipes))
    assert r.returncode == 2
    assert "position / simclr / recipe" in r.stderr and "augment.not_a_field" in r.stderr
    assert "allowed:" in r.stderr and not (tmp_path / "o" / "results.json").exists()
    r = _harness("--tasks", "colours", "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and "--tasks: unknown ['colours']; allowed: colour" in r.stderr
