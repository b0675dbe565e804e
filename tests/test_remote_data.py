"""Datasets on an object store: a real S3-compatible server (moto's) on 127.0.0.1.

Shards and image folders are written in their real formats, uploaded into a bucket, loaded
through ``load_dataset`` from ``s3://`` and compared with the same files loaded locally.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from contrastlab.config import DataConfig
from contrastlab.data import DataError, DatasetSplits, load_dataset
from contrastlab.data.fs import open_fs, read_bytes
from tests.test_data import make_parquet, png_bytes, write_folder, write_shard


def assert_same(a: DatasetSplits, b: DatasetSplits) -> None:
    for x, y in ((a.train, b.train), (a.test, b.test)):
        assert torch.equal(x.images, y.images)
        assert torch.equal(x.labels, y.labels)
        meta = ("num_classes", "classes", "mean", "std")
        assert [getattr(x, k) for k in meta] == [getattr(y, k) for k in meta]


def load_both(s3_store, cfg: DataConfig, root: Path, test_root: Path, bucket: str):
    """``(remote, local)`` splits of ``cfg`` with ``root`` and ``test_root`` as they are and
    uploaded to ``s3://bucket/data/<name>``; sets ``cfg``'s roots to the local ones."""
    uri = s3_store.bucket(bucket)
    local = {"root": str(root), "test_root": str(test_root)}
    remote = {k: s3_store.upload(v, f"{uri}/data/{Path(v).name}") for k, v in local.items()}
    got = load_dataset(cfg.model_copy(update=remote))
    return got, load_dataset(cfg.model_copy(update=local))


def test_parquet_from_s3_equals_local(tmp_path: Path, s3_store) -> None:
    make_parquet(tmp_path / "train")
    make_parquet(tmp_path / "test", n_per_shard=3, seed=6)
    local = DataConfig(dataset="parquet", image_size=8)
    got, want = load_both(s3_store, local, tmp_path / "train", tmp_path / "test", "shards")
    assert len(got.train) == 24 and len(got.test) == 6
    assert_same(got, want)
    assert got.train.name == "parquet:train/train"
    # a stratified split of root (no test_root) picks the same rows
    split = local.model_copy(update={"root": str(tmp_path / "train")})
    remote = split.model_copy(update={"root": "s3://shards/data/train"})
    assert_same(load_dataset(remote), load_dataset(split))


def test_image_folder_from_s3_equals_local(tmp_path: Path, s3_store) -> None:
    write_folder(tmp_path / "train")
    # nested folders, hidden files: listed in the same order as os.walk gives locally
    rng = np.random.default_rng(9)
    (tmp_path / "train" / "cat" / "sub").mkdir()
    for name in ("sub/00.png", "zz.png"):
        img = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
        Image.fromarray(img).save(tmp_path / "train" / "cat" / name)
    (tmp_path / "train" / "cat" / ".hidden.png").write_bytes(b"not read")
    write_folder(tmp_path / "val", per_class=2, seed=4)
    local = DataConfig(dataset="imagefolder", image_size=12)
    got, want = load_both(s3_store, local, tmp_path / "train", tmp_path / "val", "folders")
    assert got.train.classes == ("ant", "cat", "dog") and len(got.train) == 27
    assert_same(got, want)
    split = local.model_copy(update={"root": str(tmp_path / "train"), "max_train_samples": 11})
    remote = split.model_copy(update={"root": "s3://folders/data/train"})
    assert_same(load_dataset(remote), load_dataset(split))


def test_fs_helpers_roundtrip(s3_store) -> None:
    bucket = s3_store.bucket("helpers")
    loc = open_fs(f"{bucket}/a")
    assert loc.name() == "s3://helpers/a" and loc.path == "helpers/a"
    with loc.fs.open_output_stream(loc.child("x.bin")) as f:
        f.write(b"\x00\x01payload")
    assert read_bytes(loc, loc.child("x.bin")) == b"\x00\x01payload"


# --------------------------------------------------------------------------- streaming


@pytest.fixture
def ray_s3(s3_store):
    """A local Ray whose workers (the decode tasks) see the S3 server's environment."""
    import os

    import ray

    keys = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_REGION", "AWS_ENDPOINT_URL")
    ray.init(
        address="local",
        num_cpus=2,
        include_dashboard=False,
        configure_logging=False,
        runtime_env={"env_vars": {k: os.environ[k] for k in keys}},
    )
    yield
    ray.shutdown()


@pytest.mark.slow
def test_streaming_from_s3_equals_local_memory(tmp_path: Path, s3_store, ray_s3) -> None:
    """Shards and an image folder streamed from ``s3://`` by Ray Data decode tasks give, row
    for row, the images memory mode decodes from the local copy; the monitors' pool and
    queries equal the local stream's."""
    from contrastlab.config import EvalConfig
    from contrastlab.data import stream

    make_parquet(tmp_path / "shards", n_per_shard=40)
    write_folder(tmp_path / "folder", per_class=12)
    bucket = s3_store.bucket("streamed")
    for kind, name in (("parquet", "shards"), ("imagefolder", "folder")):
        local = DataConfig(dataset=kind, root=str(tmp_path / name), image_size=8)
        uri = s3_store.upload(tmp_path / name, f"{bucket}/{name}")
        remote = local.model_copy(update={"root": uri, "source": "stream"})
        plan = stream.plan(remote)
        assert plan.root == uri and not plan.paths[0].startswith("/")  # read from the store
        held = load_dataset(local).train
        assert len(plan) == len(held) and np.array_equal(plan.labels, held.labels.numpy())
        batches = stream.StreamBatches(plan, remote, 0, 8, 0, 1, torch.device("cpu"))
        steps = len(plan) // 8
        seen = []
        for x, y, pos in batches.epoch(0, steps):
            assert torch.equal(x, held.images[pos]) and torch.equal(y, held.labels[pos])
            seen.append(pos)
        seen = torch.cat(seen)  # full batches only: all but the epoch's last n % 8 rows
        assert len(seen) == steps * 8 and len(set(seen.tolist())) == steps * 8
        ev = EvalConfig(monitor_train_size=10, monitor_test_size=6)
        got = stream.monitor_splits(remote, ev)
        want = stream.monitor_splits(local, ev)
        assert_same(got, want)
        assert plan.where(0).startswith(f"{uri}/")  # messages name the object


# --------------------------------------------------------------------------- bad input


def test_s3_shard_without_image_column(tmp_path: Path, s3_store) -> None:
    (tmp_path / "d").mkdir()
    pq.write_table(
        pa.table({"img": pa.array([b"x"], pa.binary()), "label": [1]}),
        tmp_path / "d" / "part-7.parquet",
    )
    uri = s3_store.upload(tmp_path / "d", f"{s3_store.bucket('nocol')}/d")
    with pytest.raises(DataError, match=r"s3://nocol/d/part-7\.parquet: missing.*'image'.*img"):
        load_dataset(DataConfig(dataset="parquet", root=uri))


def test_s3_corrupt_row(tmp_path: Path, s3_store) -> None:
    (tmp_path / "d").mkdir()
    good = png_bytes(np.zeros((8, 8, 3), np.uint8))
    write_shard(tmp_path / "d" / "s.parquet", [good, good, b"garbage", good], [0, 1, 0, 1])
    uri = s3_store.upload(tmp_path / "d", f"{s3_store.bucket('corrupt')}/d")
    cfg = DataConfig(dataset="parquet", root=uri, test_fraction=0.5)
    with pytest.raises(DataError, match=r"s3://corrupt/d/s\.parquet: row 2: cannot decode"):
        load_dataset(cfg)


def test_s3_missing_bucket_and_prefix(s3_store) -> None:
    with pytest.raises(DataError, match=r"s3://no-such-bucket/x.*bucket does not exist"):
        load_dataset(DataConfig(dataset="parquet", root="s3://no-such-bucket/x"))
    bucket = s3_store.bucket("empty")
    with pytest.raises(DataError, match=r"image folder root not found: s3://empty/nothing"):
        load_dataset(DataConfig(dataset="imagefolder", root=f"{bucket}/nothing"))


def test_s3_unreachable_endpoint(monkeypatch) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # discard port: nothing listens
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s")
    monkeypatch.setenv("AWS_REGION", "us-east-1")
    with pytest.raises(DataError, match=r"s3://b/train: the endpoint is unreachable.*ENDPOINT"):
        load_dataset(DataConfig(dataset="parquet", root="s3://b/train"))


def test_s3_wrong_credentials(tmp_path: Path, s3_store, monkeypatch) -> None:
    make_parquet(tmp_path / "d")
    uri = s3_store.upload(tmp_path / "d", f"{s3_store.bucket('locked')}/d")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "not-a-key")
    s3_store.require_auth(True)
    try:
        with pytest.raises(DataError, match=r"s3://locked/d: the store refused the credentials"):
            load_dataset(DataConfig(dataset="parquet", root=uri))
    finally:
        s3_store.require_auth(False)


def test_bad_uri() -> None:
    with pytest.raises(DataError, match=r"nosuchfs://x/y: not a filesystem URI"):
        load_dataset(DataConfig(dataset="parquet", root="nosuchfs://x/y"))
