"""Tests of contrastlab.data on small files written in the real on-disk formats."""

from __future__ import annotations

import io
import os
import pickle
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from contrastlab.config import DataConfig
from contrastlab.data import (
    DataError,
    DatasetSplits,
    ImageDataset,
    channel_stats,
    load_dataset,
    resize_uint8,
    stratified_split,
)
from contrastlab.data.digits import read_digits


def chw(images_hwc: np.ndarray) -> torch.Tensor:
    """``uint8 [N, H, W, 3]`` -> ``uint8 [N, 3, H, W]`` tensor."""
    return torch.from_numpy(np.ascontiguousarray(images_hwc.transpose(0, 3, 1, 2)))


def reference_stats(images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    x = images.double() / 255.0
    return x.mean(dim=(0, 2, 3)).numpy(), x.std(dim=(0, 2, 3), unbiased=False).numpy()


def assert_train_stats(splits: DatasetSplits) -> None:
    mean, std = reference_stats(splits.train.images)
    for ds in (splits.train, splits.test):
        np.testing.assert_allclose(ds.mean, mean, rtol=0, atol=1e-9)
        np.testing.assert_allclose(ds.std, std, rtol=0, atol=1e-9)


def png_bytes(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


# --------------------------------------------------------------------------- digits


def test_digits_shapes_values_and_classes() -> None:
    s = load_dataset(DataConfig(dataset="digits", image_size=32))
    assert len(s.train) + len(s.test) == 1797
    assert len(s.test) == round(0.25 * 1797)
    for ds in (s.train, s.test):
        assert ds.images.dtype == torch.uint8 and ds.labels.dtype == torch.int64
        assert ds.images.shape[1:] == (3, 32, 32)
        assert ds.num_classes == 10
        # grayscale replicated to 3 identical channels
        assert torch.equal(ds.images[:, 0], ds.images[:, 1])
        assert torch.equal(ds.images[:, 0], ds.images[:, 2])
    all_images = torch.cat([s.train.images, s.test.images])
    assert int(all_images.min()) == 0 and int(all_images.max()) == 255
    assert set(torch.cat([s.train.labels, s.test.labels]).tolist()) == set(range(10))
    assert s.labeled_train() is s.train
    assert_train_stats(s)


def test_digits_native_size_matches_sklearn() -> None:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    pixels, target = read_digits()
    np.testing.assert_array_equal(pixels, bunch.images)
    np.testing.assert_array_equal(target, bunch.target)
    s = load_dataset(DataConfig(dataset="digits", image_size=8, test_fraction=0.1))
    train_idx, _ = stratified_split(bunch.target, 0.1, 0)
    expected = np.round(bunch.images[train_idx] * 255 / 16).astype(np.uint8)
    np.testing.assert_array_equal(s.train.images[:, 1].numpy(), expected)


def test_digits_is_fast() -> None:
    read_digits.cache_clear()
    t0 = time.perf_counter()
    load_dataset(DataConfig(dataset="digits", image_size=32))
    assert time.perf_counter() - t0 < 1.0


def test_digits_split_deterministic_and_stratified() -> None:
    a = load_dataset(DataConfig(dataset="digits", split_seed=3))
    b = load_dataset(DataConfig(dataset="digits", split_seed=3))
    c = load_dataset(DataConfig(dataset="digits", split_seed=4))
    assert torch.equal(a.test.images, b.test.images) and torch.equal(a.test.labels, b.test.labels)
    assert not torch.equal(a.test.images, c.test.images)
    # Each class is held out in proportion to its size (+-1 from rounding).
    _, target = read_digits()
    per_class = torch.bincount(torch.tensor(target), minlength=10).numpy()
    held_out = torch.bincount(a.test.labels, minlength=10).numpy()
    assert np.all(np.abs(held_out - 0.25 * per_class) <= 1)


def test_max_train_samples_is_deterministic_subset() -> None:
    full = load_dataset(DataConfig(dataset="digits", image_size=8))
    a = load_dataset(DataConfig(dataset="digits", image_size=8, max_train_samples=100))
    b = load_dataset(DataConfig(dataset="digits", image_size=8, max_train_samples=100))
    assert len(a.train) == 100 and len(a.test) == len(full.test)
    assert torch.equal(a.train.images, b.train.images)
    assert torch.equal(a.train.labels, b.train.labels)
    # every kept row is a row of the full train set
    rows = {bytes(x.numpy().tobytes()) for x in full.train.images}
    assert all(bytes(x.numpy().tobytes()) in rows for x in a.train.images)
    # statistics are those of the truncated train set
    assert_train_stats(a)
    assert a.train.mean != full.train.mean


def test_stratified_split_unit() -> None:
    labels = np.array([0] * 10 + [1] * 30 + [2] * 60 + [-1] * 5)
    tr, te = stratified_split(labels, 0.2, seed=0)
    assert len(te) == 20 and len(tr) == 85
    assert sorted(np.concatenate([tr, te]).tolist()) == list(range(len(labels)))
    assert np.bincount(labels[te], minlength=3).tolist() == [2, 6, 12]
    assert np.all(labels[te] >= 0)  # unlabeled rows always train
    tr2, te2 = stratified_split(labels, 0.2, seed=0)
    assert np.array_equal(te, te2)


# --------------------------------------------------------------------------- containers


def test_image_dataset_container() -> None:
    images = torch.zeros(4, 3, 8, 8, dtype=torch.uint8)
    labels = torch.tensor([0, 1, -1, 1])
    ds = ImageDataset(images, labels, 2, (0.0,) * 3, (1.0,) * 3, "x")
    assert len(ds) == 4 and ds.image_size == 8
    assert ds.to("cpu") is ds
    splits = DatasetSplits(train=ds, test=ds)
    assert splits.labeled_train().labels.tolist() == [0, 1, 1]
    with pytest.raises(ValueError, match="uint8"):
        ImageDataset(images.float(), labels, 2, (0.0,) * 3, (1.0,) * 3, "x")
    with pytest.raises(ValueError, match="int64"):
        ImageDataset(images, labels[:3], 2, (0.0,) * 3, (1.0,) * 3, "x")


def test_resize_and_stats_helpers() -> None:
    gray = torch.full((2, 1, 20, 20), 77, dtype=torch.uint8)
    out = resize_uint8(gray, 7)
    assert out.shape == (2, 3, 7, 7) and bool((out == 77).all())
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.integers(0, 256, (5, 3, 6, 6), dtype=np.uint8))
    mean, std = channel_stats(x)
    ref_mean, ref_std = reference_stats(x)
    np.testing.assert_allclose(mean, ref_mean, atol=1e-12)
    np.testing.assert_allclose(std, ref_std, atol=1e-12)


# --------------------------------------------------------------------------- CIFAR


def write_cifar10(root: Path, n: int = 4, protocol: int = 2, seed: int = 0) -> dict:
    """Official CIFAR-10 layout; returns the HWC images / labels written per split."""
    rng = np.random.default_rng(seed)
    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True)
    out: dict[str, list] = {"train_x": [], "train_y": [], "test_x": [], "test_y": []}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        img = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)  # HWC, like a photo
        labels = rng.integers(0, 10, n).tolist()
        # Official row layout: the 1024 red values (row-major), then green, then blue.
        data = img.transpose(0, 3, 1, 2).reshape(n, 3072)
        batch = {b"batch_label": b"x", b"labels": labels, b"data": data, b"filenames": []}
        (d / name).write_bytes(pickle.dumps(batch, protocol=protocol))
        key = "test" if name == "test_batch" else "train"
        out[f"{key}_x"].append(img)
        out[f"{key}_y"].extend(labels)
    return {k: np.concatenate(v) if k.endswith("_x") else np.array(v) for k, v in out.items()}


@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])
@pytest.mark.parametrize("point_at_folder", [False, True])
def test_cifar10_roundtrip(tmp_path: Path, protocol: int, point_at_folder: bool) -> None:
    ref = write_cifar10(tmp_path, protocol=protocol)
    root = tmp_path / "cifar-10-batches-py" if point_at_folder else tmp_path
    s = load_dataset(DataConfig(dataset="cifar10", root=str(root), image_size=32))
    assert s.train.images.shape == (20, 3, 32, 32) and s.test.images.shape == (4, 3, 32, 32)
    assert s.train.num_classes == 10 and s.train.classes[0] == "airplane"
    assert torch.equal(s.train.images, chw(ref["train_x"]))
    assert torch.equal(s.test.images, chw(ref["test_x"]))
    assert s.train.labels.tolist() == ref["train_y"].tolist()
    assert s.test.labels.tolist() == ref["test_y"].tolist()
    # channel order spelled out on raw rows: [R plane | G plane | B plane], row-major planes
    row = ref["train_x"][0].transpose(2, 0, 1).reshape(-1)
    x = s.train.images[0]
    assert x[0, 0, 1] == row[1] and x[0, 1, 0] == row[32] and x[1, 0, 0] == row[1024]
    assert x[2, 31, 31] == row[3071]
    assert_train_stats(s)


def test_cifar10_resize_and_truncate(tmp_path: Path) -> None:
    write_cifar10(tmp_path)
    cfg = DataConfig(dataset="cifar10", root=str(tmp_path), image_size=16, max_train_samples=7)
    s = load_dataset(cfg)
    assert s.train.images.shape == (7, 3, 16, 16) and s.test.images.shape == (4, 3, 16, 16)
    assert s.train.images.dtype == torch.uint8
    again = load_dataset(cfg)
    assert torch.equal(s.train.images, again.train.images)
    assert_train_stats(s)


def test_cifar100_roundtrip(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    d = tmp_path / "cifar-100-python"
    d.mkdir()
    ref = {}
    for name, n in (("train", 12), ("test", 5)):
        img = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
        fine = rng.integers(0, 100, n).tolist()
        batch = {
            b"data": img.transpose(0, 3, 1, 2).reshape(n, 3072),
            b"fine_labels": fine,
            b"coarse_labels": [0] * n,
        }
        (d / name).write_bytes(pickle.dumps(batch, protocol=2))
        ref[name] = (img, fine)
    names = [f"class{i}".encode() for i in range(100)]
    (d / "meta").write_bytes(pickle.dumps({b"fine_label_names": names}, protocol=2))
    s = load_dataset(DataConfig(dataset="cifar100", root=str(tmp_path), image_size=32))
    assert s.train.num_classes == 100 and s.test.num_classes == 100
    assert s.train.classes[7] == "class7"
    assert torch.equal(s.train.images, chw(ref["train"][0]))
    assert torch.equal(s.test.images, chw(ref["test"][0]))
    assert s.train.labels.tolist() == ref["train"][1]
    assert s.test.labels.tolist() == ref["test"][1]


def test_cifar_missing_batch_file(tmp_path: Path) -> None:
    write_cifar10(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(DataError, match="data_batch_3"):
        load_dataset(DataConfig(dataset="cifar10", root=str(tmp_path)))


def test_cifar_refuses_malicious_pickle(tmp_path: Path) -> None:
    write_cifar10(tmp_path)
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path = tmp_path / "cifar-10-batches-py" / "data_batch_2"
    path.write_bytes(pickle.dumps({b"data": Evil(), b"labels": []}, protocol=2))
    with pytest.raises(DataError, match="data_batch_2.*refusing"):
        load_dataset(DataConfig(dataset="cifar10", root=str(tmp_path)))
    assert not marker.exists()


def test_cifar_bad_contents(tmp_path: Path) -> None:
    write_cifar10(tmp_path)
    path = tmp_path / "cifar-10-batches-py" / "test_batch"
    path.write_bytes(pickle.dumps({b"data": np.zeros((2, 3072), np.uint8)}, protocol=2))
    with pytest.raises(DataError, match="test_batch.*'labels'"):
        load_dataset(DataConfig(dataset="cifar10", root=str(tmp_path)))
    path.write_bytes(b"garbage")
    with pytest.raises(DataError, match="test_batch"):
        load_dataset(DataConfig(dataset="cifar10", root=str(tmp_path)))


@pytest.mark.parametrize("dataset", ["cifar10", "cifar100", "stl10", "imagefolder", "parquet"])
def test_missing_root(tmp_path: Path, dataset: str) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(DataError, match="nowhere"):
        load_dataset(DataConfig(dataset=dataset, root=str(missing)))


# --------------------------------------------------------------------------- STL-10


def write_stl_images(path: Path, img: np.ndarray) -> None:
    """HWC images -> the official column-major-per-channel byte layout ([N, C, W, H] in C order)."""
    path.write_bytes(np.ascontiguousarray(img.transpose(0, 3, 2, 1)).tobytes())


def write_stl10(root: Path, n_train: int = 6, n_test: int = 4, n_unl: int = 3) -> dict:
    rng = np.random.default_rng(2)
    d = root / "stl10_binary"
    d.mkdir(parents=True)
    ref = {}
    for split, n in (("train", n_train), ("test", n_test), ("unlabeled", n_unl)):
        img = rng.integers(0, 256, (n, 96, 96, 3), dtype=np.uint8)
        if split == "train":
            # Image 0: value = row index in red, column index in green: orientation check.
            img[0, :, :, 0] = np.arange(96)[:, None]
            img[0, :, :, 1] = np.arange(96)[None, :]
        write_stl_images(d / f"{split}_X.bin", img)
        labels = rng.integers(1, 11, n).astype(np.uint8)  # official labels are 1..10
        if split != "unlabeled":
            (d / f"{split}_y.bin").write_bytes(labels.tobytes())
        ref[split] = (img, labels)
    return ref


def test_stl10_roundtrip_and_orientation(tmp_path: Path) -> None:
    ref = write_stl10(tmp_path)
    s = load_dataset(DataConfig(dataset="stl10", root=str(tmp_path), image_size=96))
    assert s.train.images.shape == (6, 3, 96, 96) and s.test.images.shape == (4, 3, 96, 96)
    assert torch.equal(s.train.images, chw(ref["train"][0]))
    assert torch.equal(s.test.images, chw(ref["test"][0]))
    red, green = s.train.images[0, 0], s.train.images[0, 1]
    assert red[10, 0] == 10 and red[0, 10] == 0  # red grows down the rows
    assert green[0, 10] == 10 and green[10, 0] == 0  # green grows along the columns
    assert s.train.labels.tolist() == (ref["train"][1].astype(int) - 1).tolist()
    assert s.test.labels.tolist() == (ref["test"][1].astype(int) - 1).tolist()
    assert s.train.num_classes == 10 and s.train.classes[2] == "car"
    assert_train_stats(s)


def test_stl10_unlabeled_and_resize(tmp_path: Path) -> None:
    ref = write_stl10(tmp_path)
    s = load_dataset(
        DataConfig(dataset="stl10", root=str(tmp_path / "stl10_binary"), unlabeled=True)
    )
    assert s.train.images.shape == (9, 3, 16, 16)  # config default image_size
    assert s.train.labels[6:].tolist() == [-1, -1, -1]
    assert bool((s.train.labels[:6] >= 0).all())
    labeled = s.labeled_train()
    assert len(labeled) == 6 and torch.equal(labeled.images, s.train.images[:6])
    assert s.test.images.shape == (4, 3, 16, 16) and bool((s.test.labels >= 0).all())
    assert_train_stats(s)  # statistics include the unlabeled rows
    # unlabeled rows are resized versions of what was written
    full = load_dataset(
        DataConfig(dataset="stl10", root=str(tmp_path), unlabeled=True, image_size=96)
    )
    assert torch.equal(full.train.images[6:], chw(ref["unlabeled"][0]))


def test_stl10_missing_unlabeled_file(tmp_path: Path) -> None:
    write_stl10(tmp_path)
    (tmp_path / "stl10_binary" / "unlabeled_X.bin").unlink()
    load_dataset(DataConfig(dataset="stl10", root=str(tmp_path)))  # not needed: fine
    with pytest.raises(DataError, match="unlabeled_X.bin"):
        load_dataset(DataConfig(dataset="stl10", root=str(tmp_path), unlabeled=True))


def test_stl10_bad_sizes(tmp_path: Path) -> None:
    write_stl10(tmp_path)
    (tmp_path / "stl10_binary" / "test_y.bin").write_bytes(bytes([1, 2]))
    with pytest.raises(DataError, match="test_y.bin"):
        load_dataset(DataConfig(dataset="stl10", root=str(tmp_path)))
    (tmp_path / "stl10_binary" / "train_X.bin").write_bytes(bytes(100))
    with pytest.raises(DataError, match="train_X.bin"):
        load_dataset(DataConfig(dataset="stl10", root=str(tmp_path)))


# --------------------------------------------------------------------------- image folder


def write_folder(root: Path, per_class: int = 8, size: int = 16, seed: int = 3) -> dict:
    """PNGs for 'cat' and 'ant', JPEGs for 'dog'; returns {path: HWC array written}."""
    rng = np.random.default_rng(seed)
    written = {}
    for cls in ("cat", "dog", "ant"):
        (root / cls).mkdir(parents=True)
        for i in range(per_class):
            img = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
            if cls == "dog":  # JPEG mangles noise: use smooth colour ramps instead
                ramp = np.linspace(0, 1, size)
                base = rng.uniform(40, 160, 3)
                img = (base + 80 * ramp[:, None, None] * rng.uniform(0, 1, 3)).astype(np.uint8)
                img = np.broadcast_to(img, (size, size, 3)).copy()
            path = root / cls / f"{i:02d}.{'jpg' if cls == 'dog' else 'png'}"
            Image.fromarray(img).save(path, quality=95)
            written[path] = img
    (root / "cat" / "notes.txt").write_text("not an image, ignored")
    gray = rng.integers(0, 256, (size, size), dtype=np.uint8)
    Image.fromarray(gray).save(root / "ant" / "zz_gray.png")
    written[root / "ant" / "zz_gray.png"] = np.repeat(gray[:, :, None], 3, axis=2)
    return written


def test_image_folder_test_root_roundtrip(tmp_path: Path) -> None:
    written = write_folder(tmp_path / "train")
    write_folder(tmp_path / "val", per_class=2, seed=4)
    cfg = DataConfig(
        dataset="imagefolder",
        root=str(tmp_path / "train"),
        test_root=str(tmp_path / "val"),
        image_size=16,
    )
    s = load_dataset(cfg)
    assert s.train.classes == ("ant", "cat", "dog") and s.train.num_classes == 3
    assert len(s.train) == 25 and len(s.test) == 7
    assert s.train.labels.tolist() == [0] * 9 + [1] * 8 + [2] * 8
    # Files are read class by class, sorted: ant/00..07.png, ant/zz_gray.png, cat/..., dog/...
    order = sorted(written, key=lambda p: (p.parent.name, p.name))
    for i, path in enumerate(order):
        got = s.train.images[i].permute(1, 2, 0).numpy()
        if path.suffix == ".png":
            np.testing.assert_array_equal(got, written[path])  # lossless: exact
        else:
            decoded = np.asarray(Image.open(path).convert("RGB"))
            np.testing.assert_array_equal(got, decoded)  # JPEG: what PIL decodes
            assert np.abs(got.astype(int) - written[path]).mean() < 3
    assert_train_stats(s)


def test_image_folder_split_and_resize(tmp_path: Path) -> None:
    write_folder(tmp_path, per_class=8, size=24)
    cfg = DataConfig(dataset="imagefolder", root=str(tmp_path), image_size=12, test_fraction=0.25)
    s = load_dataset(cfg)
    assert s.train.images.shape[1:] == (3, 12, 12)
    assert len(s.train) + len(s.test) == 25 and len(s.test) == 6
    assert torch.bincount(s.test.labels, minlength=3).tolist() == [2, 2, 2]
    again = load_dataset(cfg)
    assert torch.equal(s.test.images, again.test.images)
    truncated = load_dataset(cfg.model_copy(update={"max_train_samples": 5}))
    assert len(truncated.train) == 5 and torch.equal(truncated.test.images, s.test.images)
    assert_train_stats(truncated)


def test_image_folder_non_square_center_crop(tmp_path: Path) -> None:
    img = np.zeros((10, 30, 3), dtype=np.uint8)
    img[:, 10:20] = 200  # the central square is uniformly 200, the sides black
    for cls in ("a", "b"):
        (tmp_path / cls).mkdir()
        for i in range(2):
            Image.fromarray(img).save(tmp_path / cls / f"{i}.png")
    s = load_dataset(DataConfig(dataset="imagefolder", root=str(tmp_path), image_size=10))
    assert bool((s.train.images == 200).all())


def test_image_folder_corrupt_file(tmp_path: Path) -> None:
    write_folder(tmp_path)
    (tmp_path / "cat" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n but then garbage")
    with pytest.raises(DataError, match="broken.png"):
        load_dataset(DataConfig(dataset="imagefolder", root=str(tmp_path)))


def test_image_folder_empty(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no class folders"):
        load_dataset(DataConfig(dataset="imagefolder", root=str(tmp_path)))
    (tmp_path / "cls").mkdir()
    (tmp_path / "cls" / "readme.txt").write_text("x")
    with pytest.raises(DataError, match="cls"):
        load_dataset(DataConfig(dataset="imagefolder", root=str(tmp_path)))


def test_image_folder_unknown_test_class(tmp_path: Path) -> None:
    write_folder(tmp_path / "train")
    write_folder(tmp_path / "val", per_class=1)
    (tmp_path / "val" / "zebra").mkdir()
    Image.new("RGB", (4, 4)).save(tmp_path / "val" / "zebra" / "z.png")
    cfg = DataConfig(
        dataset="imagefolder", root=str(tmp_path / "train"), test_root=str(tmp_path / "val")
    )
    with pytest.raises(DataError, match="zebra"):
        load_dataset(cfg)


# --------------------------------------------------------------------------- parquet


def write_shard(path: Path, images: list[bytes | None], labels: list[int | None]) -> None:
    table = pa.table(
        {"image": pa.array(images, pa.binary()), "label": pa.array(labels, pa.int64())}
    )
    pq.write_table(table, path)


def make_parquet(root: Path, n_per_shard: int = 12, seed: int = 5) -> tuple[np.ndarray, list]:
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True)
    imgs, labels = [], []
    for k in range(2):
        img = rng.integers(0, 256, (n_per_shard, 8, 8, 3), dtype=np.uint8)
        lab = [int(i % 4) for i in range(n_per_shard)]
        write_shard(root / f"part-{k:03d}.parquet", [png_bytes(x) for x in img], lab)
        imgs.append(img)
        labels.extend(lab)
    return np.concatenate(imgs), labels


def test_parquet_test_root_roundtrip(tmp_path: Path) -> None:
    train_img, train_lab = make_parquet(tmp_path / "train")
    test_img, test_lab = make_parquet(tmp_path / "test", n_per_shard=3, seed=6)
    cfg = DataConfig(
        dataset="parquet",
        root=str(tmp_path / "train"),
        test_root=str(tmp_path / "test"),
        image_size=8,
    )
    s = load_dataset(cfg)
    assert torch.equal(s.train.images, chw(train_img))  # shards in name order, exact
    assert torch.equal(s.test.images, chw(test_img))
    assert s.train.labels.tolist() == train_lab and s.test.labels.tolist() == test_lab
    assert s.train.num_classes == 4
    assert_train_stats(s)


def test_parquet_split_unlabeled_and_struct_column(tmp_path: Path) -> None:
    rng = np.random.default_rng(7)
    img = rng.integers(0, 256, (10, 8, 8, 3), dtype=np.uint8)
    labels = [0, 1, 0, 1, 0, 1, 0, 1, None, -1]  # two unlabeled rows
    tmp_path.joinpath("d").mkdir()
    # Hugging Face `datasets` layout: image = struct<bytes: binary, path: string>
    image_col = pa.array(
        [{"bytes": png_bytes(x), "path": f"{i}.png"} for i, x in enumerate(img)],
        pa.struct([("bytes", pa.binary()), ("path", pa.string())]),
    )
    pq.write_table(
        pa.table({"image": image_col, "label": pa.array(labels, pa.int32())}),
        tmp_path / "d" / "data.parquet",
    )
    cfg = DataConfig(dataset="parquet", root=str(tmp_path / "d"), image_size=8, test_fraction=0.25)
    s = load_dataset(cfg)
    assert len(s.test) == 2 and sorted(s.test.labels.tolist()) == [0, 1]
    assert len(s.train) == 8 and s.train.labels.tolist().count(-1) == 2
    assert len(s.labeled_train()) == 6
    assert s.train.num_classes == 2
    _, test_idx = stratified_split(np.array([-1 if v is None else v for v in labels]), 0.25, 0)
    assert torch.equal(s.test.images, chw(img[test_idx]))


def test_parquet_missing_label_column(tmp_path: Path) -> None:
    tmp_path.joinpath("d").mkdir()
    pq.write_table(
        pa.table({"image": pa.array([b"x"], pa.binary()), "target": [1]}),
        tmp_path / "d" / "shard-a.parquet",
    )
    with pytest.raises(DataError, match=r"shard-a\.parquet.*'label'.*found columns"):
        load_dataset(DataConfig(dataset="parquet", root=str(tmp_path / "d")))


def test_parquet_wrong_column_type(tmp_path: Path) -> None:
    tmp_path.joinpath("d").mkdir()
    pq.write_table(
        pa.table({"image": pa.array([b"x"], pa.binary()), "label": ["cat"]}),
        tmp_path / "d" / "s.parquet",
    )
    with pytest.raises(DataError, match=r"s\.parquet.*'label'.*string"):
        load_dataset(DataConfig(dataset="parquet", root=str(tmp_path / "d")))


def test_parquet_corrupt_row(tmp_path: Path) -> None:
    tmp_path.joinpath("d").mkdir()
    good = png_bytes(np.zeros((8, 8, 3), np.uint8))
    images = [good, good, b"definitely not a png", good]
    write_shard(tmp_path / "d" / "bad-shard.parquet", images, [0, 1, 0, 1])
    cfg = DataConfig(dataset="parquet", root=str(tmp_path / "d"), test_fraction=0.5)
    with pytest.raises(DataError, match=r"bad-shard\.parquet: row 2"):
        load_dataset(cfg)


def test_parquet_no_shards(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"empty.*no \*\.parquet"):
        load_dataset(DataConfig(dataset="parquet", root=str(tmp_path / "empty")))


def test_parquet_many_rows_parallel_decode(tmp_path: Path) -> None:
    # > 64 rows takes the thread-pool path: order is kept and a bad row still names itself.
    rng = np.random.default_rng(8)
    img = rng.integers(0, 256, (150, 4, 4, 3), dtype=np.uint8)
    blobs: list[bytes | None] = [png_bytes(x) for x in img]
    (tmp_path / "d").mkdir()
    write_shard(tmp_path / "d" / "a.parquet", blobs, [i % 3 for i in range(150)])
    cfg = DataConfig(dataset="parquet", root=str(tmp_path / "d"), image_size=4)
    s = load_dataset(cfg.model_copy(update={"test_root": str(tmp_path / "d")}))
    assert torch.equal(s.train.images, chw(img))
    blobs[97] = b"\x89PNG\r\n\x1a\ntruncated"
    write_shard(tmp_path / "d" / "a.parquet", blobs, [i % 3 for i in range(150)])
    with pytest.raises(DataError, match=r"a\.parquet: row 97"):
        load_dataset(cfg)


def test_decode_16bit_png_rescaled() -> None:
    from contrastlab.data.decode import decode_image

    ramp = np.linspace(0, 65535, 64).reshape(8, 8).astype(np.uint16)
    buf = io.BytesIO()
    Image.fromarray(ramp).save(buf, format="PNG")
    out = decode_image(buf.getvalue(), 8, "ramp.png")
    assert out.shape == (8, 8, 3)
    np.testing.assert_array_equal(out[..., 0], np.round(ramp / 257).astype(np.uint8))
