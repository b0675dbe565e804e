"""Streaming parquet shards and image folders through Ray Data: the epoch order, every row once
per epoch across workers (the same images memory mode holds), exact resume, decode failures
counted or stopping the run, the auto threshold, one- and two-worker sweep trials."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from contrastlab.config import DataConfig
from contrastlab.data import DataError, load_dataset, stream
from contrastlab.data.digits import read_digits
from contrastlab.data.load import resolve_source
from contrastlab.rundir import RunPlace
from contrastlab.train import Trainer, train
from tests.conftest import tiny_config
from tests.test_data import png_bytes
from tests.test_unlabeled import digit_images

N = 256


def write_shards(root: Path, n: int = N, corrupt: int | None = None) -> None:
    """Two labeled shards of digits as PNG, small row groups; row ``corrupt`` of the second
    shard holds bytes that are no image."""
    root.mkdir(parents=True)
    img = digit_images(n)
    _, y = read_digits()
    half = n // 2
    for k in range(2):
        data = [png_bytes(x) for x in img[k * half : (k + 1) * half]]
        if k == 1 and corrupt is not None:
            data[corrupt] = b"\x89PNG but truncated"
        table = pa.table(
            {"image": pa.array(data, pa.binary()), "label": pa.array(y[k * half : (k + 1) * half])}
        )
        pq.write_table(table, root / f"part-{k}.parquet", row_group_size=50)


def write_folder(root: Path, n: int = N, corrupt: int | None = None) -> list[Path]:
    """The same digits as PNG files in class folders ``digit<y>/<i>.png``; file ``corrupt``
    (an index into the returned listing order) holds bytes that are no image.

    Returns:
        The files in the order the folder is listed (class, then name).
    """
    img = digit_images(n)
    _, y = read_digits()
    files = []
    for i in range(n):
        path = root / f"digit{y[i]}" / f"{i:04d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(png_bytes(img[i]))
        files.append(path)
    files.sort()
    if corrupt is not None:
        files[corrupt].write_bytes(b"\x89PNG but truncated")
    return files


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("stream") / "shards"
    write_shards(root)
    return root


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("stream") / "folder"
    write_folder(root)
    return root


KINDS = {"shards": "parquet", "folder": "imagefolder"}


def _cfg(root: Path, kind: str = "parquet", **data):
    return tiny_config(
        data={"dataset": kind, "root": str(root), "source": "stream", **data},
        train={"epochs": 2, "batch_size": 64},
    )


def test_epoch_order_is_a_seeded_permutation_shared_out_once():
    a = stream.epoch_order(1000, seed=3, epoch=1, chunk_rows=16, task_chunks=4)
    assert sorted(a.tolist()) == list(range(1000))
    assert np.array_equal(a, stream.epoch_order(1000, 3, 1, 16, 4))  # (seed, epoch) alone
    assert not np.array_equal(a, stream.epoch_order(1000, 3, 2, 16, 4))
    assert not np.array_equal(a, stream.epoch_order(1000, 4, 1, 16, 4))
    parts = [stream.worker_positions(a, 100, r, 2, steps=10) for r in range(2)]
    assert sorted(np.concatenate(parts).tolist()) == list(range(1000))
    # worker r holds its contiguous half of every global batch, as in memory
    assert np.array_equal(parts[1][:50], a[50:100])


@pytest.mark.slow
@pytest.mark.parametrize("source", KINDS)
def test_two_workers_stream_every_row_once_per_epoch(source, request, ray_local):
    root, kind = request.getfixturevalue(source), KINDS[source]
    plan = stream.plan(DataConfig(dataset=kind, root=str(root), image_size=8))
    cfg = DataConfig(dataset=kind, root=str(root), image_size=8, source="stream")
    # memory mode's training split of the same files: position p is its image p
    held = load_dataset(cfg.model_copy(update={"source": "memory"})).train
    n = len(plan)  # the 192 training rows: 64 of the 256 are the held-out split
    assert n == len(held) and n % 64 == 0
    assert torch.equal(torch.from_numpy(plan.labels), held.labels)
    seen = []
    for rank in range(2):
        src = stream.StreamBatches(plan, cfg, 0, 64, rank, 2, torch.device("cpu"))
        batches = list(src.epoch(epoch=1, steps=n // 64))
        assert [len(b[2]) for b in batches] == [32] * (n // 64)  # equal steps on both workers
        seen.append(torch.cat([b[2] for b in batches]))
        for x, y, pos in batches:  # images and labels are those of the rows named
            assert torch.equal(x, held.images[pos]) and torch.equal(y, held.labels[pos])
    union = torch.cat(seen).sort().values
    assert union.tolist() == list(range(n))  # every row exactly once across the two workers


def _history(run: Path) -> list[dict]:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    timing = ("time", "per_s", "seconds")  # wall-clock values differ between any two runs
    return [{k: v for k, v in r.items() if not any(t in k for t in timing)} for r in rows]


@pytest.mark.slow
@pytest.mark.parametrize("source", KINDS)
def test_a_resumed_stream_run_sees_what_an_uninterrupted_one_saw(
    source, request, tmp_path, ray_local
):
    cfg = _cfg(request.getfixturevalue(source), KINDS[source])
    whole = train(cfg, RunPlace(tmp_path / "whole"))

    def stop(epoch, metrics, ckpt):
        if epoch == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(cfg, RunPlace(tmp_path / "cut"), hooks=[stop])
    Trainer(cfg, RunPlace(tmp_path / "cut")).fit(resume=True)
    assert _history(tmp_path / "cut") == _history(tmp_path / "whole")
    assert "knn_top1" in whole.history[-1] and whole.history[-1]["epoch"] == 2


@pytest.mark.slow
@pytest.mark.parametrize("source", KINDS)
def test_a_corrupt_row_stops_the_run_or_is_counted(source, tmp_path, ray_local, capsys):
    # unlabeled, so every row streams; the row is outside the monitors' pool (decoded up front)
    pool = set(stream._fixed_subset(N, 48).tolist())
    bad = next(r for r in range(N // 2, N) if r not in pool)
    root = tmp_path / "bad"
    if source == "shards":
        write_shards(root, corrupt=bad - N // 2)
        where = rf"part-1\.parquet: row {bad - N // 2}"
    else:
        where = str(write_folder(root, corrupt=bad)[bad])

    def cfg(**data):
        return tiny_config(
            data={"dataset": KINDS[source], "root": str(root), "source": "stream"}
            | {"labels": False}
            | data,
            train={"epochs": 2, "batch_size": 64},
            eval={"monitor_train_size": 32, "monitor_test_size": 16},
        )

    with pytest.raises(DataError, match=rf"{where}: cannot decode image \(Unidentified"):
        train(cfg(), RunPlace(tmp_path / "stop"))
    capsys.readouterr()
    res = train(cfg(decode_errors="skip"), RunPlace(tmp_path / "skip"))
    err = capsys.readouterr().err
    said = re.findall(rf"contrastlab: 1 image\(s\) failed to decode in epoch (\d) .*{where}", err)
    assert said == ["1", "2"]  # reported in each epoch, naming the row or file
    assert [h.get("decode_skipped") for h in res.history[1:]] == [1.0, 2.0]  # over the run


@pytest.mark.slow
def test_a_file_gone_after_listing_stops_the_stream_naming_it(tmp_path, ray_local):
    files = write_folder(tmp_path / "f", n=64)
    cfg = DataConfig(dataset="imagefolder", root=str(tmp_path / "f"), image_size=8)
    cfg = cfg.model_copy(update={"source": "stream", "labels": False})
    plan = stream.plan(cfg)
    files[5].unlink()
    src = stream.StreamBatches(plan, cfg, 0, 32, 0, 1, torch.device("cpu"))
    with pytest.raises(DataError, match=rf"{files[5]}: .*(No such file|not exist|Failed to open)"):
        list(src.epoch(0, 2))


def test_auto_streams_above_the_threshold(shards):
    base = {"dataset": "parquet", "root": str(shards), "image_size": 16}
    assert resolve_source(DataConfig(**base)) == "memory"  # 256 * 3 * 16 * 16 bytes
    assert stream.decoded_gb(N, 16) == N * 3 * 16 * 16 / 1e9
    assert resolve_source(DataConfig(**base, stream_above_gb=1e-4)) == "stream"
    assert resolve_source(DataConfig()) == "memory"  # digits: always in memory
    with pytest.raises(ValueError, match=r"source='stream' reads parquet shards or image fold"):
        DataConfig(source="stream")


def test_auto_streams_a_large_image_folder(folder):
    base = {"dataset": "imagefolder", "root": str(folder), "image_size": 16}
    assert resolve_source(DataConfig(**base)) == "memory"
    assert resolve_source(DataConfig(**base, stream_above_gb=1e-4)) == "stream"
    assert len(stream.plan(DataConfig(**base))) == N - 64  # the listing's rows, split


def _stream_sweep(tmp_path: Path, root: Path, kind: str, trials: int, **over):
    """A FIFO sweep of ``trials`` 2-epoch SimCLR trials streaming ``root``; ``over`` updates
    the space (resources) and ``data_over`` its base's data section."""
    import yaml

    from contrastlab.sweep.runner import run_sweep
    from contrastlab.sweep.space import load_space

    data = {"dataset": kind, "root": str(root), "source": "stream", **over.pop("data_over", {})}
    raw = {
        "method": "simclr",
        "base": {
            "data": data,
            "model": {"backbone": "convnet", "width": 8, "head_hidden_dim": 32, "proj_dim": 16},
            "train": {"batch_size": 64, "device": "cpu"},
            "eval": {"knn_k": 20},
        },
        "params": {"method.temperature": {"dist": "uniform", "low": 0.2, "high": 0.6}},
        "metric": "knn_top1",
        "mode": "max",
        "trials": trials,
        "budget": {"epochs": 2},
        "scheduler": {"name": "fifo"},
        **over,
    }
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "stream.yaml").write_text(yaml.safe_dump(raw))
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    out = run_sweep(
        load_space(tmp_path / "stream.yaml"),
        name="st",
        tracking_uri=uri,
        storage_path=tmp_path / "sweeps",
    )
    return out, uri


@pytest.mark.slow
def test_a_sweep_streams_its_trials_through_ray_into_mlflow(shards, tmp_path, ray_local):
    """A one-worker trial streams its parquet shards inside its Tune trial process (Ray Data
    tasks beside the trials on the same local Ray): every trial finishes its epochs, logged."""
    from contrastlab import tracking

    out, uri = _stream_sweep(tmp_path, shards, "parquet", trials=2)
    assert [t["status"] for t in out.trials] == ["FINISHED", "FINISHED"]
    c = tracking.client(uri)
    losses = []
    for t in out.trials:
        run = c.get_run(t["run_id"])
        assert run.data.params["data.source"] == "stream"
        hist = sorted(c.get_metric_history(t["run_id"], "loss"), key=lambda m: m.step)
        assert [m.step for m in hist] == [1, 2]
        losses.append([m.value for m in hist])
    assert losses[0] != losses[1]  # two different trials, each trained on the stream


@pytest.mark.slow
def test_a_two_worker_trainer_trial_streams_and_reproduces_exactly(folder, tmp_path, ray_local):
    """A TorchTrainer trial with 2 DDP workers, each streaming its share of an image folder
    through its own Ray Data pipeline on the sweep's Ray (decode tasks fit beside the workers:
    2 x 0.5 CPUs held, tasks of 0.25). Reproduced in two local gloo processes sharing one Ray,
    every metric of every epoch is equal, so both workers read exactly their rows."""
    from contrastlab import tracking
    from contrastlab.sweep.reproduce import reproduce

    out, uri = _stream_sweep(
        tmp_path,
        folder,
        "imagefolder",
        trials=1,
        resources={"workers": 2, "cpus_per_worker": 0.5},
        data_over={"stream_task_cpus": 0.25},
    )
    assert [t["status"] for t in out.trials] == ["FINISHED"]
    c = tracking.client(uri)
    run = c.get_run(out.trials[0]["run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.tags["contrastlab.workers"] == "2"
    assert run.data.params["data.source"] == "stream"
    assert run.data.params["data.dataset"] == "imagefolder"
    knn = c.get_metric_history(run.info.run_id, "knn_top1")
    assert sorted(m.step for m in knn) == [0, 1, 2]
    rep = reproduce(run_id=run.info.run_id, tracking_uri=uri, output_dir=tmp_path / "repro")
    assert rep.ok and rep.exact, rep.text
    assert {r["epoch"] for r in rep.rows if r["metric"] == "loss"} == {1, 2}


@pytest.mark.parametrize("source", KINDS)
def test_unlabeled_data_trains_on_every_image_in_both_modes(source, request):
    """With labels: false no held-out split is cut from root, in memory as in the stream."""
    root = request.getfixturevalue(source)
    cfg = DataConfig(dataset=KINDS[source], root=str(root), image_size=8, labels=False)
    mem = load_dataset(cfg)
    assert len(mem.train) == N and mem.test is None
    assert (mem.train.labels == -1).all()
    plan = stream.plan(cfg)
    assert len(plan) == N and (plan.labels == -1).all()


@pytest.mark.parametrize("source", KINDS)
def test_the_monitors_test_root_is_memory_modes_test_split(source, request, tmp_path):
    """With a test_root, the stream's monitor queries (all of them: monitor_test_size 0) are
    memory mode's test split: same images, labels, classes; a folder's class count is its
    folders', as in memory mode."""
    from contrastlab.config import EvalConfig

    root = request.getfixturevalue(source)
    kind = KINDS[source]
    held = tmp_path / "held"
    (write_shards if kind == "parquet" else write_folder)(held, n=64)
    cfg = DataConfig(dataset=kind, root=str(root), test_root=str(held), image_size=8)
    mem = load_dataset(cfg)
    ev = EvalConfig(monitor_train_size=40, monitor_test_size=0)
    got = stream.monitor_splits(cfg, ev)
    assert torch.equal(got.test.images, mem.test.images)
    assert torch.equal(got.test.labels, mem.test.labels)
    assert got.test.classes == mem.test.classes and got.test.num_classes == mem.test.num_classes
    assert len(got.train) == 40 and (got.train.labels >= 0).all()


def test_a_local_sweep_that_leaves_no_cpu_for_decoding_is_refused_up_front(
    shards, tmp_path, ray_local
):
    """Two 1-CPU trials at once on a 2-CPU Ray would hold every CPU, and their decode tasks
    would never start: refused before any run or trial, naming what fits."""
    from contrastlab import tracking
    from contrastlab.config import ConfigError

    with pytest.raises(ConfigError, match=r"2 trial\(s\) at once x 1 CPUs hold 2 of this ") as e:
        _stream_sweep(tmp_path, shards, "parquet", trials=2, concurrency=2)
    assert "concurrency <= 1 (it is 2)" in str(e.value)
    assert "data.stream_task_cpus=1" in str(e.value)
    c = tracking.client(f"sqlite:///{tmp_path}/mlflow.db")
    runs = c.search_runs([x.experiment_id for x in c.search_experiments()])
    assert runs == [] and not (tmp_path / "sweeps").exists()
    # the same sweep with decode tasks of a quarter CPU fits beside a 0.5-CPU trial pair
    out, _ = _stream_sweep(
        tmp_path / "fits",
        shards,
        "parquet",
        trials=2,
        concurrency=2,
        resources={"cpus_per_worker": 0.5},
        data_over={"stream_task_cpus": 0.25},
    )
    assert [t["status"] for t in out.trials] == ["FINISHED", "FINISHED"]
