"""CIFAR-100 loading: the real Parquet copy, the official pickle format, the archive."""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from fl_ci.data import cifar100
from fl_ci.data.base import DataError
from fl_ci.data.cifar100 import (
    CIFAR100_FINE_NAMES,
    CIFAR100_MEAN,
    CIFAR100_STD,
    load_cifar100,
)

SHARED = Path(__file__).resolve().parents[1].parent / "shared/data/cifar100"
needs_shared = pytest.mark.skipif(
    not (SHARED / "manifest.json").is_file(),
    reason=f"real CIFAR-100 Parquet copy not found at {SHARED}",
)
TRAIN = "train-00000-of-00001.parquet"
TEST = "test-00000-of-00001.parquet"


# --- real data ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def real_subset(tmp_path_factory) -> tuple:
    if not (SHARED / "manifest.json").is_file():
        pytest.skip(f"real CIFAR-100 Parquet copy not found at {SHARED}")
    cache = tmp_path_factory.mktemp("cache")
    return load_cifar100(SHARED, max_per_class=2, cache_dir=cache)


@pytest.fixture(scope="module")
def real_rows() -> dict[str, pa.Table]:
    """The first rows of the real train and test files, to build small Parquet dirs."""
    if not (SHARED / "manifest.json").is_file():
        pytest.skip(f"real CIFAR-100 Parquet copy not found at {SHARED}")
    return {
        "train": pq.read_table(SHARED / "train-00000-of-00004.parquet").slice(0, 6),
        "test": pq.read_table(SHARED / "test-00000-of-00001.parquet").slice(0, 5),
    }


def test_subset_keeps_two_per_class_per_split(real_subset):
    train, test = real_subset
    assert (len(train), len(test)) == (200, 200)
    assert train.counts(100).tolist() == [2] * 100
    assert test.counts(100).tolist() == [2] * 100


def test_subset_shapes_and_dtypes(real_subset):
    train, _ = real_subset
    assert tuple(train.frames.shape) == (200, 1, 3, 32, 32)
    assert train.frames.dtype == torch.uint8
    assert train.labels.dtype == torch.int64
    assert train.patients.tolist() == [-1] * 200
    assert train.devices.tolist() == [-1] * 200
    assert (train.mean, train.std) == (CIFAR100_MEAN, CIFAR100_STD)


def test_subset_keeps_official_test_order(real_subset):
    # The first five test images are five different classes, so all are kept, first.
    _, test = real_subset
    assert test.labels[:5].tolist() == [49, 33, 72, 51, 71]


def test_class_names_are_the_official_fine_names(real_subset):
    train, _ = real_subset
    assert len(train.class_names) == 100
    assert train.class_names[:2] == ["apple", "aquarium_fish"]
    assert train.class_names[99] == "worm"


def test_frames_are_png_pixels_channel_first(real_subset, real_rows):
    _, test = real_subset
    png = Image.open(io.BytesIO(real_rows["test"].column("image_png")[0].as_py()))
    hwc = np.array(png)
    assert test.frames[0, 0, 0, 5, 9] == hwc[5, 9, 0]
    assert test.frames[0, 0, 2, 31, 0] == hwc[31, 0, 2]
    assert torch.equal(test.frames[0, 0], torch.from_numpy(hwc).permute(2, 0, 1))


def test_channel_means_near_published_constants(tmp_path):
    if not (SHARED / "manifest.json").is_file():
        pytest.skip(f"real CIFAR-100 Parquet copy not found at {SHARED}")
    train, _ = load_cifar100(SHARED, max_per_class=50, cache_dir=tmp_path)
    mean = train.frames.float().div(255).mean(dim=(0, 1, 3, 4))
    # 5,000 images land within 0.002 of the full means; swapped channels, 0.07 off.
    assert torch.allclose(mean, torch.tensor(CIFAR100_MEAN), atol=0.01)


@needs_shared
@pytest.mark.slow
def test_full_load_matches_manifest_and_cache(tmp_path):
    # The loader checks the decoded arrays against the manifest's SHA-256 when cold.
    train, test = load_cifar100(SHARED, cache_dir=tmp_path)
    assert (len(train), len(test)) == (50_000, 10_000)
    assert train.counts(100).unique().tolist() == [500]
    cached_train, _ = load_cifar100(SHARED, cache_dir=tmp_path)
    assert torch.equal(cached_train.frames, train.frames)


# --- small Parquet dirs built from real rows ---------------------------------------


def _write_parquet(root: Path, tables: dict[str, pa.Table]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    pq.write_table(tables["train"], root / TRAIN)
    pq.write_table(tables["test"], root / TEST)
    return root


def _replace(table: pa.Table, column: str, values: list) -> pa.Table:
    i = table.schema.get_field_index(column)
    return table.set_column(i, column, pa.array(values, table.schema.field(i).type))


@pytest.fixture
def tiny_parquet(tmp_path, real_rows) -> Path:
    return _write_parquet(tmp_path / "data", real_rows)


def test_small_parquet_dir_loads_its_rows(tiny_parquet, tmp_path, real_rows):
    train, test = load_cifar100(tiny_parquet, cache_dir=tmp_path / "cache")
    assert (len(train), len(test)) == (6, 5)
    assert train.labels.tolist() == real_rows["train"].column("fine_label").to_pylist()


def test_rows_are_sorted_by_index(tmp_path, real_rows):
    shuffled = real_rows["test"].take([3, 0, 4, 1, 2])
    root = _write_parquet(tmp_path / "data", {**real_rows, "test": shuffled})
    _, test = load_cifar100(root, cache_dir=tmp_path / "cache")
    assert test.labels.tolist() == [49, 33, 72, 51, 71]


def test_second_load_comes_from_cache(tiny_parquet, tmp_path, monkeypatch):
    first, _ = load_cifar100(tiny_parquet, cache_dir=tmp_path / "cache")

    def no_decoding(data, where):
        raise AssertionError(f"decoded {where} despite the cache")

    monkeypatch.setattr(cifar100, "_decode_png", no_decoding)
    second, _ = load_cifar100(tiny_parquet, cache_dir=tmp_path / "cache")
    assert torch.equal(second.frames, first.frames)


def test_changed_file_is_not_served_from_cache(tiny_parquet, tmp_path, real_rows):
    load_cifar100(tiny_parquet, cache_dir=tmp_path / "cache")
    # Row 0 relabelled 'apple' (0): the new file must be read, not the cached one.
    labels = real_rows["train"].column("fine_label").to_pylist()
    names = real_rows["train"].column("fine_label_name").to_pylist()
    assert labels[0] != 0
    table = _replace(real_rows["train"], "fine_label", [0] + labels[1:])
    table = _replace(table, "fine_label_name", ["apple"] + names[1:])
    pq.write_table(table, tiny_parquet / TRAIN)
    stat = (tiny_parquet / TRAIN).stat()
    os.utime(tiny_parquet / TRAIN, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    train, _ = load_cifar100(tiny_parquet, cache_dir=tmp_path / "cache")
    assert train.labels[0].item() == 0


def test_failed_load_leaves_no_cache(tmp_path, real_rows):
    pngs = real_rows["train"].column("image_png").to_pylist()
    bad = _replace(
        real_rows["train"], "image_png", pngs[:3] + [b"\x89PNG junk"] + pngs[4:]
    )
    root = _write_parquet(tmp_path / "data", {**real_rows, "train": bad})
    with pytest.raises(DataError):
        load_cifar100(root, cache_dir=tmp_path / "cache")
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())


def test_corrupt_png_names_file_and_row(tmp_path, real_rows):
    pngs = real_rows["train"].column("image_png").to_pylist()
    bad = _replace(
        real_rows["train"], "image_png", pngs[:3] + [b"\x89PNG junk"] + pngs[4:]
    )
    root = _write_parquet(tmp_path / "data", {**real_rows, "train": bad})
    with pytest.raises(DataError, match=f"{TRAIN} row 3: image_png is not a readable"):
        load_cifar100(root, cache_dir=tmp_path / "cache")


def test_corrupt_parquet_names_file(tiny_parquet, tmp_path):
    (tiny_parquet / TEST).write_bytes(b"this is not parquet")
    with pytest.raises(DataError, match=f"{TEST}: not a readable Parquet file"):
        load_cifar100(tiny_parquet, cache_dir=tmp_path / "cache")


def test_label_out_of_range_names_file_and_row(tmp_path, real_rows):
    labels = real_rows["train"].column("fine_label").to_pylist()
    bad = _replace(real_rows["train"], "fine_label", labels[:2] + [100] + labels[3:])
    root = _write_parquet(tmp_path / "data", {**real_rows, "train": bad})
    with pytest.raises(DataError, match=f"{TRAIN} row 2: fine label 100 is outside"):
        load_cifar100(root, cache_dir=tmp_path / "cache")


def test_row_count_differing_from_manifest_names_file(tiny_parquet, tmp_path):
    manifest = {
        "rows": {"train": 7, "test": 5},
        "files": [{"file": TRAIN, "rows": 7}, {"file": TEST, "rows": 5}],
    }
    (tiny_parquet / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match=f"{TRAIN}: 6 rows, manifest.json says 7"):
        load_cifar100(tiny_parquet, cache_dir=tmp_path / "cache")


def test_pixels_differing_from_manifest_hash_are_refused(tiny_parquet, tmp_path):
    manifest = {
        "rows": {"train": 6, "test": 5},
        "files": [{"file": TRAIN, "rows": 6}, {"file": TEST, "rows": 5}],
        "content_sha256": {"test_pixels_NHWC_uint8": "0" * 64},
    }
    (tiny_parquet / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match="test data does not match manifest.json"):
        load_cifar100(tiny_parquet, cache_dir=tmp_path / "cache")


def test_duplicate_index_names_file_and_row(tmp_path, real_rows):
    bad = _replace(real_rows["train"], "index", [0, 1, 2, 2, 4, 5])
    root = _write_parquet(tmp_path / "data", {**real_rows, "train": bad})
    with pytest.raises(DataError, match=f"{TRAIN} row 3: index 2 occurs twice"):
        load_cifar100(root, cache_dir=tmp_path / "cache")


def test_missing_test_split_is_named(tiny_parquet, tmp_path):
    (tiny_parquet / TEST).unlink()
    with pytest.raises(DataError, match=r"no test-\*\.parquet"):
        load_cifar100(tiny_parquet, cache_dir=tmp_path / "cache")


def test_missing_folder_is_named(tmp_path):
    with pytest.raises(DataError, match="nowhere does not exist"):
        load_cifar100(tmp_path / "nowhere")


def test_folder_without_cifar_files_is_named(tmp_path):
    (tmp_path / "notes.txt").write_text("nothing here")
    with pytest.raises(DataError, match=f"no CIFAR-100 in {tmp_path}"):
        load_cifar100(tmp_path)


# --- official pickle format, written here -------------------------------------------


def _write_pickles(
    root: Path, train_labels: list[int], test_labels: list[int], str_keys: bool = False
) -> dict[str, np.ndarray]:
    """A `cifar-100-python` dir in the official layout; pixel (0,0,0) = row number."""
    root.mkdir(parents=True, exist_ok=True)

    def key(k: str) -> str | bytes:
        return k if str_keys else k.encode()

    data = {}
    for split, labels in (("train", train_labels), ("test", test_labels)):
        x = np.zeros((len(labels), 3072), dtype=np.uint8)
        x[:, 0] = np.arange(len(labels))
        data[split] = x
        batch = {
            key("batch_label"): key(f"{split} batch"),
            key("fine_labels"): labels,
            key("coarse_labels"): [0] * len(labels),
            key("data"): x,
        }
        (root / split).write_bytes(pickle.dumps(batch, protocol=2))
    meta = {key("fine_label_names"): [key(n) for n in CIFAR100_FINE_NAMES]}
    (root / "meta").write_bytes(pickle.dumps(meta, protocol=2))
    return data


@pytest.mark.parametrize("str_keys", [False, True], ids=["bytes-keys", "str-keys"])
def test_pickle_dir_loads_labels_and_names(tmp_path, str_keys):
    _write_pickles(tmp_path, [3, 0, 7], [5, 5], str_keys=str_keys)
    train, test = load_cifar100(tmp_path)
    assert train.labels.tolist() == [3, 0, 7]
    assert test.labels.tolist() == [5, 5]
    assert train.class_names[3] == "bear"


def test_pickle_rows_are_channel_major(tmp_path):
    data = _write_pickles(tmp_path, [1, 2], [4])
    # Official rows: 1024 red values, then green, then blue, each row-major 32x32.
    data["train"][1, 1024 + 5 * 32 + 7] = 200  # green, y=5, x=7
    (tmp_path / "train").write_bytes(
        pickle.dumps({b"fine_labels": [1, 2], b"data": data["train"]}, protocol=2)
    )
    train, _ = load_cifar100(tmp_path)
    assert train.frames[1, 0, 1, 5, 7].item() == 200
    assert train.frames[1].sum().item() == 200 + 1  # plus the row-number mark


def test_parent_of_pickle_dir_is_found(tmp_path):
    _write_pickles(tmp_path / "cifar-100-python", [9, 8], [7])
    train, _ = load_cifar100(tmp_path)
    assert train.labels.tolist() == [9, 8]


def test_pickle_max_per_class_keeps_first_rows_of_each_class(tmp_path):
    _write_pickles(tmp_path, [3, 0, 3, 1, 3], [2])
    train, _ = load_cifar100(tmp_path, max_per_class=2)
    assert train.labels.tolist() == [3, 0, 3, 1]
    assert train.frames[:, 0, 0, 0, 0].tolist() == [0, 1, 2, 3]  # rows 0..3


def test_pickle_missing_meta_is_named(tmp_path):
    _write_pickles(tmp_path / "cifar-100-python", [1], [1])
    (tmp_path / "cifar-100-python" / "meta").unlink()
    with pytest.raises(
        DataError, match=r"cifar-100-python looks like .* lacks \['meta'\]"
    ):
        load_cifar100(tmp_path)


def test_corrupt_pickle_is_named(tmp_path):
    _write_pickles(tmp_path, [1], [1])
    (tmp_path / "test").write_bytes(b"\x80\x02garbage")
    with pytest.raises(DataError, match=f"{tmp_path / 'test'}: not a readable"):
        load_cifar100(tmp_path)


class _Exploit:
    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self):
        return (os.mkdir, (str(self.target),))


def test_pickle_with_code_is_refused_unrun(tmp_path):
    _write_pickles(tmp_path, [1], [1])
    target = tmp_path / "pwned"
    payload = {b"fine_labels": [1], b"data": _Exploit(target)}
    (tmp_path / "train").write_bytes(pickle.dumps(payload, protocol=2))
    with pytest.raises(DataError, match="refusing global"):
        load_cifar100(tmp_path)
    assert not target.exists()


# --- archive verification and extraction ---------------------------------------------


def _archive_of(src: Path, archive: Path) -> str:
    """tar.gz of `src` as `cifar-100-python/`; returns its MD5."""
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(src, arcname="cifar-100-python")
    return hashlib.md5(archive.read_bytes()).hexdigest()


def test_verified_archive_extracts_and_loads(tmp_path):
    _write_pickles(tmp_path / "src", [4, 2], [6])
    dest = tmp_path / "dest"
    dest.mkdir()
    md5 = _archive_of(tmp_path / "src", dest / "cifar-100-python.tar.gz")
    cifar100._verify_and_extract(dest / "cifar-100-python.tar.gz", md5, dest)
    train, _ = load_cifar100(dest)
    assert train.labels.tolist() == [4, 2]


def test_wrong_checksum_extracts_nothing(tmp_path):
    _write_pickles(tmp_path / "src", [4, 2], [6])
    dest = tmp_path / "dest"
    dest.mkdir()
    _archive_of(tmp_path / "src", dest / "cifar-100-python.tar.gz")
    with pytest.raises(DataError, match="MD5 .* expected 0{32}; not extracted"):
        cifar100._verify_and_extract(dest / "cifar-100-python.tar.gz", "0" * 32, dest)
    assert sorted(p.name for p in dest.iterdir()) == ["cifar-100-python.tar.gz"]


def test_path_traversal_member_extracts_nothing(tmp_path):
    dest = tmp_path / "dest"
    dest.mkdir()
    archive = dest / "evil.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for name in ("cifar-100-python/meta", "../escaped.txt"):
            info = tarfile.TarInfo(name)
            info.size = 2
            tar.addfile(info, io.BytesIO(b"hi"))
    md5 = hashlib.md5(archive.read_bytes()).hexdigest()
    with pytest.raises(DataError, match="unsafe member '../escaped.txt'"):
        cifar100._verify_and_extract(archive, md5, dest)
    assert not (tmp_path / "escaped.txt").exists()
    assert sorted(p.name for p in dest.iterdir()) == ["evil.tar.gz"]


def test_symlink_member_is_refused(tmp_path):
    archive = tmp_path / "link.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        info = tarfile.TarInfo("cifar-100-python/train")
        info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(info)
    md5 = hashlib.md5(archive.read_bytes()).hexdigest()
    with pytest.raises(DataError, match="unsafe member 'cifar-100-python/train'"):
        cifar100._verify_and_extract(archive, md5, tmp_path / "dest")


def test_download_fetches_verifies_and_loads(tmp_path, monkeypatch):
    _write_pickles(tmp_path / "src", [1, 1], [0])
    md5 = _archive_of(tmp_path / "src", tmp_path / "served.tar.gz")
    fetched = []

    def fake_fetch(url: str, dest: Path) -> None:
        fetched.append(url)
        dest.write_bytes((tmp_path / "served.tar.gz").read_bytes())

    monkeypatch.setattr(cifar100, "_fetch", fake_fetch)
    monkeypatch.setattr(cifar100, "CIFAR100_MD5", md5)
    train, test = load_cifar100(tmp_path / "new", download=True)
    assert fetched == [cifar100.CIFAR100_URL]
    assert (train.labels.tolist(), test.labels.tolist()) == ([1, 1], [0])
