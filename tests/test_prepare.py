"""``contrastlab prepare-data``: trees in the real on-disk formats -> parquet shards -> the
parquet loader gives back what the source's own loader gives."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from contrastlab.cli import main
from contrastlab.config import DataConfig
from contrastlab.data import DataError, load_dataset
from contrastlab.data.prepare import prepare_data
from tests.test_data import write_cifar10, write_folder, write_stl10


def assert_split_equal(a, b) -> None:
    assert torch.equal(a.images, b.images)
    assert torch.equal(a.labels, b.labels)


def prepare_both(src: Path, out: Path, **kw) -> None:
    for split in ("train", "test"):
        prepare_data(src, str(out / split), split=split, progress=False, **kw)


@pytest.mark.parametrize("resize", [None, 16])
def test_cifar10_to_parquet_equals_cifar_loader(tmp_path: Path, resize: int | None) -> None:
    written = write_cifar10(tmp_path / "src", n=3)
    prepare_both(tmp_path / "src", tmp_path / "pq", rows_per_shard=4, resize=resize)
    shards = sorted((tmp_path / "pq" / "train").glob("*.parquet"))
    assert [p.name for p in shards] == [f"part-{k:05d}.parquet" for k in range(4)]  # 15 rows
    meta = pq.read_schema(shards[0]).metadata
    assert json.loads(meta[b"contrastlab.classes"])[:2] == ["airplane", "automobile"]
    assert meta[b"contrastlab.split"] == b"train"
    size = resize or 32
    got = load_dataset(
        DataConfig(
            dataset="parquet",
            root=str(tmp_path / "pq" / "train"),
            test_root=str(tmp_path / "pq" / "test"),
            image_size=size,
        )
    )
    want = load_dataset(DataConfig(dataset="cifar10", root=str(tmp_path / "src"), image_size=size))
    assert_split_equal(got.train, want.train)
    assert_split_equal(got.test, want.test)
    if resize is None:  # PNG is lossless: the very pixels written
        np.testing.assert_array_equal(got.train.images.permute(0, 2, 3, 1), written["train_x"])
        assert got.train.labels.tolist() == written["train_y"].tolist()


def test_stl10_train_and_unlabeled(tmp_path: Path) -> None:
    ref = write_stl10(tmp_path / "src")
    prepare_both(tmp_path / "src", tmp_path / "pq", format="stl10")
    cfg = DataConfig(dataset="parquet", root=str(tmp_path / "pq" / "train"), image_size=96)
    got = load_dataset(cfg.model_copy(update={"test_root": str(tmp_path / "pq" / "test")}))
    want = load_dataset(DataConfig(dataset="stl10", root=str(tmp_path / "src"), image_size=96))
    assert_split_equal(got.train, want.train)
    assert_split_equal(got.test, want.test)
    prepare_data(tmp_path / "src", str(tmp_path / "unl"), split="unlabeled", progress=False)
    table = pq.read_table(tmp_path / "unl")
    assert table.column("label").to_pylist() == [-1] * len(ref["unlabeled"][0])


@pytest.mark.parametrize("resize", [None, 8])
def test_image_folder_to_parquet_equals_folder_loader(tmp_path: Path, resize: int | None) -> None:
    written = write_folder(tmp_path / "src")
    prepare_data(tmp_path / "src", str(tmp_path / "pq"), shard_mb=0.002, resize=resize)
    shards = sorted((tmp_path / "pq").glob("*.parquet"))
    assert len(shards) > 1  # 2 KiB per shard: several
    if resize is None:  # the files' own bytes, JPEGs included
        blobs = set(pq.read_table(tmp_path / "pq").column("image").to_pylist())
        assert blobs == {p.read_bytes() for p in written}
    meta = pq.read_schema(shards[0]).metadata
    assert json.loads(meta[b"contrastlab.classes"]) == ["ant", "cat", "dog"]
    size = resize or 16
    got = load_dataset(DataConfig(dataset="parquet", root=str(tmp_path / "pq"), image_size=size))
    src = DataConfig(dataset="imagefolder", root=str(tmp_path / "src"), image_size=size)
    want = load_dataset(src)
    assert_split_equal(got.train, want.train)
    assert_split_equal(got.test, want.test)


def test_corrupt_image_named_with_shard_and_row(tmp_path: Path) -> None:
    write_folder(tmp_path / "src")
    (tmp_path / "src" / "cat" / "03.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    # ant holds 9 images (00..07 + zz_gray), so cat/03.png is image 12: shard 2, row 2
    with pytest.raises(DataError, match=r"cat/03\.png \(for .*part-00002\.parquet: row 2\)"):
        prepare_data(tmp_path / "src", str(tmp_path / "pq"), rows_per_shard=5, progress=False)


def test_bad_arguments(tmp_path: Path) -> None:
    write_cifar10(tmp_path / "c", n=1)
    with pytest.raises(DataError, match=r"--split 'val' for cifar10; allowed: train, test"):
        prepare_data(tmp_path / "c", str(tmp_path / "o"), split="val")
    write_folder(tmp_path / "f")
    with pytest.raises(DataError, match="single split"):
        prepare_data(tmp_path / "f", str(tmp_path / "o"), split="train")
    prepare_data(tmp_path / "c", str(tmp_path / "o"), progress=False)
    with pytest.raises(DataError, match=r"already holds 1 parquet shard"):
        prepare_data(tmp_path / "c", str(tmp_path / "o"), progress=False)


def test_cli_to_s3_and_load(tmp_path: Path, s3_store, capsys) -> None:
    write_folder(tmp_path / "src")
    dst = f"{s3_store.bucket('prepared')}/folder"
    rc = main(["prepare-data", str(tmp_path / "src"), dst, "--rows-per-shard", "10"])
    assert rc == 0
    assert "wrote 25 imagefolder images in 3 shard(s)" in capsys.readouterr().out
    got = load_dataset(DataConfig(dataset="parquet", root=dst, image_size=16))
    want = load_dataset(DataConfig(dataset="imagefolder", root=str(tmp_path / "src")))
    assert_split_equal(got.train, want.train)
    assert_split_equal(got.test, want.test)
    rc = main(["prepare-data", str(tmp_path / "src"), "s3://no-such-bucket/x"])
    assert rc == 2
    assert "s3://no-such-bucket/x" in capsys.readouterr().err
