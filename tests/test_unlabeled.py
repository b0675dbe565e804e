"""Training on images without labels: parquet shards with no label column, label-free monitors
only (or a separate labeled evaluation set), sweeps refused a kNN metric before cluster time,
and a smoke sweep on such shards through Ray into MLflow, reported and reproduced."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from contrastlab import tracking
from contrastlab.config import LABEL_FREE_METRICS, ConfigError, DataConfig
from contrastlab.data import DataError, load_dataset
from contrastlab.data.digits import read_digits
from contrastlab.rundir import RunPlace
from contrastlab.sweep.report import sweep_report
from contrastlab.sweep.reproduce import reproduce
from contrastlab.sweep.runner import run_sweep, smoke_space
from contrastlab.sweep.space import load_space
from contrastlab.sweep.spec import SpaceError
from contrastlab.train import train
from tests.conftest import tiny_config
from tests.test_data import png_bytes

ROOT = Path(__file__).resolve().parents[1]


def digit_images(n: int) -> np.ndarray:
    """``uint8 [n, 8, 8, 3]``: the first n scikit-learn digits as RGB."""
    x, _ = read_digits()
    gray = (x[:n] * (255 / 16)).round().astype(np.uint8)
    return np.repeat(gray[..., None], 3, axis=-1)


def write_unlabeled_shards(root: Path, images: np.ndarray, shards: int = 2) -> None:
    """Parquet shards with an ``image`` column only: no label column at all."""
    root.mkdir(parents=True)
    for k, part in enumerate(np.array_split(images, shards)):
        col = pa.array([png_bytes(x) for x in part], pa.binary())
        pq.write_table(pa.table({"image": col}), root / f"part-{k:03d}.parquet")


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("unlabeled") / "shards"
    write_unlabeled_shards(root, digit_images(256))
    return root


def test_unlabeled_shards_load_every_row_for_training(shards):
    with pytest.raises(DataError, match=r"'label'.*found columns"):
        load_dataset(DataConfig(dataset="parquet", root=str(shards), image_size=8))
    s = load_dataset(DataConfig(dataset="parquet", root=str(shards), image_size=8, labels=False))
    assert s.test is None and not s.labeled
    assert len(s.train) == 256  # no held-out split taken out of unlabeled data
    assert s.train.labels.eq(-1).all()
    assert torch.equal(s.train.images, torch.from_numpy(digit_images(256)).permute(0, 3, 1, 2))


def test_all_null_labels_ask_for_labels_false(tmp_path):
    tmp_path.joinpath("d").mkdir()
    img = [png_bytes(x) for x in digit_images(4)]
    table = pa.table(
        {"image": pa.array(img, pa.binary()), "label": pa.array([None] * 4, pa.int64())}
    )
    pq.write_table(table, tmp_path / "d" / "a.parquet")
    with pytest.raises(DataError, match=r"no labeled rows.*data\.labels: false"):
        load_dataset(DataConfig(dataset="parquet", root=str(tmp_path / "d")))
    s = load_dataset(DataConfig(dataset="parquet", root=str(tmp_path / "d"), labels=False))
    assert len(s.train) == 4 and s.test is None


def test_an_evaluation_set_gives_the_knn_memory_and_queries(shards):
    cfg = DataConfig(
        dataset="parquet", root=str(shards), image_size=8, labels=False, eval_dataset="digits"
    )
    s = load_dataset(cfg)
    digits = load_dataset(DataConfig(image_size=8))
    assert len(s.train) == 256 and s.train.labels.eq(-1).all()
    assert torch.equal(s.test.images, digits.test.images)
    assert torch.equal(s.labeled_train().labels, digits.train.labels)
    assert s.labeled_train().num_classes == 10


def test_config_rules_for_unlabeled_data():
    assert not DataConfig(labels=False).has_labels
    assert DataConfig(labels=False, eval_dataset="digits").has_labels
    with pytest.raises(ConfigError, match=r"eval_dataset='parquet' needs data\.eval_root"):
        tiny_config(data={"eval_dataset": "parquet"})
    with pytest.raises(ConfigError, match=r"supcon trains on labels.*data\.labels is false"):
        tiny_config("supcon", data={"labels": False})
    with pytest.raises(ConfigError, match=r"eval\.linear_probe needs labels"):
        tiny_config(data={"labels": False}, eval={"linear_probe": True})


def test_training_without_labels_reports_label_free_monitors_only(shards, tmp_path, capsys):
    cfg = tiny_config(
        data={"dataset": "parquet", "root": str(shards), "labels": False},
        train={"epochs": 2},
    )
    res = train(cfg, RunPlace(tmp_path / "run"))
    assert [h["epoch"] for h in res.history] == [0, 1, 2]
    for h in res.history:
        assert not any(k.startswith("knn") for k in h), h
        assert set(LABEL_FREE_METRICS) <= set(h)
    assert "best_knn_top1" not in res.final and "init_knn_top1" not in res.final
    err = capsys.readouterr().err
    assert err.count("no labeled evaluation set") == 1  # said once, not every epoch
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    lf = summary["protocol"]["label_free"]
    # disjoint held-out quarter and memory (the rest) of the 256 training images
    assert (lf["test_size"], lf["memory_size"]) == (64, 192)
    assert "off" in summary["protocol"]["knn"]


def _unlabeled_space(shards: Path, **changes):
    space = smoke_space(load_space(ROOT / "search_spaces" / "simclr.yaml"), trials=2)
    data = {"dataset": "parquet", "root": str(shards), "labels": False}
    return space.with_overrides(base_overrides={"data": data}, **changes)


def test_a_sweep_on_unlabeled_data_must_optimise_a_label_free_metric(shards):
    with pytest.raises(SpaceError, match=r"metric: knn_top1 needs labels.*allowed.*rankme"):
        _unlabeled_space(shards)
    assert _unlabeled_space(shards, metric="rankme", mode="max").metric == "rankme"
    # a named labeled evaluation set brings kNN back
    space = smoke_space(load_space(ROOT / "search_spaces" / "simclr.yaml"), trials=2)
    data = {"labels": False, "eval_dataset": "digits"}
    assert space.with_overrides(base_overrides={"data": data}).metric == "knn_top1"


@pytest.mark.slow
def test_unlabeled_smoke_sweep_reports_and_reproduces(shards, tmp_path, ray_local):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    space = _unlabeled_space(
        shards, metric="rankme", mode="max", scheduler={"name": "fifo"}, concurrency=2
    )
    out = run_sweep(space, name="unl", storage_path=tmp_path / "sweeps", tracking_uri=uri)
    assert [t["status"] for t in out.trials] == ["FINISHED", "FINISHED"]
    c = tracking.client(uri)
    parent = c.get_run(out.parent_run_id)
    children = tracking.child_runs(uri, parent.info.experiment_id, out.parent_run_id)
    assert [r.info.status for r in children] == ["FINISHED", "FINISHED"]
    for run in children:
        rank = c.get_metric_history(run.info.run_id, "rankme")
        assert sorted(m.step for m in rank) == [0, 1, 2]
        assert not [k for k in run.data.metrics if k.startswith("knn")]
        assert run.data.params["data.labels"] == "False"
    assert parent.data.metrics["best_rankme"] == pytest.approx(out.best["metric"])

    rep = sweep_report("unl", tracking_uri=uri, out_dir=tmp_path / "report")
    assert rep.best is not None and rep.best["run_id"] == out.best["run_id"]
    assert "rankme" in rep.leaderboard.columns and "knn_top1" not in rep.leaderboard.columns

    again = reproduce(best_of="unl", tracking_uri=uri, output_dir=tmp_path / "repro")
    assert again.ok and again.exact, again.text
    assert {r["epoch"] for r in again.rows if r["metric"] == "rankme"} == {0, 1, 2}
