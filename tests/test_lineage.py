"""Dataset lineage in MLflow: every tracked run records its data (source, digest, rows), and
``reproduce`` warns when the data changed since."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from contrastlab import tracking
from contrastlab.cli import main
from contrastlab.config import DataConfig
from contrastlab.data.lineage import data_sources
from contrastlab.sweep.reproduce import reproduce
from tests.conftest import tiny_config
from tests.test_data import make_parquet


def write_classes(root: Path, per_class: int = 24) -> list[Path]:
    rng = np.random.default_rng(0)
    paths = []
    for cls in ("a", "b", "c"):
        (root / cls).mkdir(parents=True)
        for i in range(per_class):
            paths.append(root / cls / f"{i:02d}.png")
            Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(paths[-1])
    return paths


def test_digests_follow_the_files(tmp_path: Path) -> None:
    paths = write_classes(tmp_path / "f", per_class=2)
    cfg = DataConfig(dataset="imagefolder", root=str(tmp_path / "f"))
    (before,) = data_sources(cfg)
    assert (before.rows, before.context, before.name) == (6, "training", "imagefolder:f")
    assert data_sources(cfg)[0].digest == before.digest  # stable
    os.utime(paths[0], ns=(1, 1))  # touched: another modification time
    assert data_sources(cfg)[0].digest != before.digest
    make_parquet(tmp_path / "train")
    make_parquet(tmp_path / "test", n_per_shard=3)
    pq_cfg = DataConfig(
        dataset="parquet", root=str(tmp_path / "train"), test_root=str(tmp_path / "test")
    )
    train, test = data_sources(pq_cfg)
    assert (train.rows, train.context, test.rows, test.context) == (24, "training", 6, "evaluation")
    digits = data_sources(DataConfig())[0]
    assert (digits.rows, digits.digest) == (1797, data_sources(DataConfig())[0].digest)


@pytest.mark.slow
def test_train_run_carries_its_data_and_reproduce_warns_when_it_changed(tmp_path: Path) -> None:
    paths = write_classes(tmp_path / "imgs")
    cfg = tiny_config(
        "simclr",
        data={"dataset": "imagefolder", "root": str(tmp_path / "imgs"), "image_size": 8},
        train={"batch_size": 16},
        eval={"knn_k": 5},
    )
    (tmp_path / "c.yaml").write_text(cfg.to_yaml())
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    argv = ["train", str(tmp_path / "c.yaml"), "--run-dir", str(tmp_path / "run")]
    assert main([*argv, "--tracking-uri", uri, "--no-progress"]) == 0
    c = tracking.client(uri)
    run_id = json.loads((tmp_path / "run" / tracking.TRAIN_RUN_FILE).read_text())["run_id"]
    (di,) = c.get_run(run_id).inputs.dataset_inputs
    (expected,) = data_sources(cfg.data)
    assert di.dataset.digest == expected.digest and di.dataset.name == "imagefolder:imgs"
    assert json.loads(di.dataset.source) == {"uri": str(tmp_path / "imgs")}
    assert json.loads(di.dataset.profile) == {"num_rows": 72}
    assert [(t.key, t.value) for t in di.tags] == [("mlflow.data.context", "training")]

    same = reproduce(run_id=run_id, tracking_uri=uri, output_dir=tmp_path / "r1")
    assert same.ok and "data differs" not in same.text
    (rep_input,) = c.get_run(same.mlflow_run_id).inputs.dataset_inputs
    assert rep_input.dataset.digest == expected.digest

    img = np.asarray(Image.open(paths[5])).copy()
    img[0, 0] ^= 255
    Image.fromarray(img).save(paths[5])
    os.utime(paths[5], ns=(10**18, 10**18))  # a distinct mtime even on a coarse clock
    (now,) = data_sources(cfg.data)
    changed = reproduce(run_id=run_id, tracking_uri=uri, output_dir=tmp_path / "r2")
    line = next(w for w in changed.warnings if "data differs" in w)
    assert expected.digest in line and now.digest in line and expected.digest != now.digest
    assert f"warning: {line}" in changed.text


def test_a_sweep_with_a_missing_data_root_fails_before_ray_and_mlflow(tmp_path):
    import ray

    from contrastlab.data import DataError
    from contrastlab.sweep.runner import run_sweep
    from contrastlab.sweep.space import space_from_dict

    missing = tmp_path / "no_such_folder"
    space = space_from_dict(
        {
            "method": "simclr",
            "base": {"data": {"dataset": "imagefolder", "root": str(missing)}},
            "params": {"method.temperature": {"dist": "uniform", "low": 0.1, "high": 0.5}},
            "metric": "knn_top1",
            "mode": "max",
            "trials": 2,
            "budget": {"epochs": 1},
        }
    )
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    with pytest.raises(DataError, match="no_such_folder"):
        run_sweep(space, name="bad-root", storage_path=tmp_path / "sweeps", tracking_uri=uri)
    assert not ray.is_initialized()
    assert not (tmp_path / "sweeps").exists()
    exp = tracking.client(uri).get_experiment_by_name("contrastlab-<dict>")
    assert exp is None or not tracking.client(uri).search_runs([exp.experiment_id])


def test_runs_logging_the_same_new_dataset_at_once_all_get_it(tmp_path: Path) -> None:
    """Concurrent trials record the same dataset: MLflow's SQL store looks a dataset up, then
    inserts it, so all but one insert break its unique key. Each run still ends with its one
    dataset input, and none raises (a sweep trial FAILED on this). Six runs released at
    once by a barrier, fifteen new datasets: before the fix 14 of 15 rounds raised."""
    import threading

    from contrastlab.data.lineage import DataSource

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    c = tracking.client(uri)
    exp = c.create_experiment("lineage-race")
    errors: list[BaseException] = []
    for k in range(15):
        sources = [DataSource(f"parquet:d{k}", "/data/d", f"{k:016x}", 10, "training")]
        runs = [c.create_run(exp).info.run_id for _ in range(6)]
        start = threading.Barrier(len(runs))

        def log(run_id: str, sources=sources, start=start) -> None:
            start.wait()
            try:
                tracking.log_data_inputs(uri, run_id, sources)
            except BaseException as e:  # noqa: BLE001 - collected, asserted below
                errors.append(e)

        threads = [threading.Thread(target=log, args=(r,)) for r in runs]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        got = [c.get_run(r).inputs.dataset_inputs for r in runs]
        assert [len(g) for g in got] == [1] * len(runs)
        assert {g[0].dataset.digest for g in got} == {f"{k:016x}"}
    assert errors == []
