"""CIFAR-100 from our Parquet copy or the official `cifar-100-python` pickles.

Both formats give the official split in official order, as `ImageData` with one frame
per item and the 100 fine labels. Decoding 60,000 PNGs takes seconds, so a full or
subsampled Parquet load is cached as .npy, keyed by the files' names, sizes and mtimes.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import shutil
import tarfile
import tempfile
import urllib.request
import warnings
from pathlib import Path, PurePosixPath

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image

from fl_ci.data.base import DataError, ImageData

CIFAR100_MEAN = (0.50708, 0.48655, 0.44092)
CIFAR100_STD = (0.26733, 0.25644, 0.27615)
CIFAR100_URL = "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"
CIFAR100_MD5 = "eb9058c3a382ffc7106e4002c42a8d85"
CIFAR100_FINE_NAMES: tuple[str, ...] = tuple(
    """
    apple aquarium_fish baby bear beaver bed bee beetle bicycle bottle bowl boy
    bridge bus butterfly camel can castle caterpillar cattle chair chimpanzee clock
    cloud cockroach couch crab crocodile cup dinosaur dolphin elephant flatfish
    forest fox girl hamster house kangaroo keyboard lamp lawn_mower leopard lion
    lizard lobster man maple_tree motorcycle mountain mouse mushroom oak_tree orange
    orchid otter palm_tree pear pickup_truck pine_tree plain plate poppy porcupine
    possum rabbit raccoon ray road rocket rose sea seal shark shrew skunk skyscraper
    snail snake spider squirrel streetcar sunflower sweet_pepper table tank
    telephone television tiger tractor train trout tulip turtle wardrobe whale
    willow_tree wolf woman worm
    """.split()
)  # in label order, as in the official `meta` pickle

_SPLITS = ("train", "test")
_PICKLE_DIR = "cifar-100-python"
_ARCHIVE = "cifar-100-python.tar.gz"
_PARQUET_COLUMNS = ("split", "index", "image_png", "fine_label")
# Bump when the cached arrays' layout or meaning changes, so old caches are ignored.
_CACHE_VERSION = 1
# The only globals the official pickles need (numpy arrays, Python-2 byte strings);
# anything else in a pickle would be code to run, so it is refused.
_PICKLE_GLOBALS = frozenset(
    {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),
    }
)

Arrays = dict[str, tuple[np.ndarray, np.ndarray]]  # split -> (x [N,3,32,32] u8, y [N])


def load_cifar100(
    root: str | Path,
    *,
    max_per_class: int = 0,
    download: bool = False,
    cache_dir: str | Path | None = None,
) -> tuple[ImageData, ImageData]:
    """(train, test) CIFAR-100 with fine labels, in official order.

    `root` holds our Parquet files, or is (or contains) `cifar-100-python`. With
    `download`, the official archive is fetched into `root` when neither is there.
    `max_per_class > 0` keeps the first that many images of each class per split.
    `cache_dir` (default ~/.cache/fl_ci/cifar100) holds decoded Parquet loads.
    """
    if max_per_class < 0:
        raise ValueError(f"max_per_class must be >= 0, got {max_per_class}")
    root = Path(root)
    if not root.exists() and not download:
        raise DataError(f"CIFAR-100 folder {root} does not exist")
    if root.exists() and not root.is_dir():
        raise DataError(f"CIFAR-100 root {root} is not a folder")

    parquet = _find_parquet(root) if root.exists() else None
    if parquet is not None:
        cache = Path(cache_dir) if cache_dir is not None else _default_cache_dir()
        arrays = _load_parquet(root, parquet, max_per_class, cache)
    else:
        pickle_dir = _find_pickle_dir(root) if root.exists() else None
        if pickle_dir is None:
            if not download:
                raise DataError(
                    f"no CIFAR-100 in {root}: expected train-*.parquet and "
                    f"test-*.parquet, or {_PICKLE_DIR}/{{train,test,meta}}; "
                    "pass download=True to fetch the official archive"
                )
            pickle_dir = _download(root)
        arrays = _load_pickle_dir(pickle_dir, max_per_class)
    train, test = (_to_image_data(*arrays[s]) for s in _SPLITS)
    return train, test


def _to_image_data(x: np.ndarray, y: np.ndarray) -> ImageData:
    n = len(y)
    return ImageData(
        frames=torch.from_numpy(x).unsqueeze(1),
        labels=torch.from_numpy(y.astype(np.int64, copy=False)),
        patients=torch.full((n,), -1, dtype=torch.int64),
        devices=torch.full((n,), -1, dtype=torch.int64),
        mean=CIFAR100_MEAN,
        std=CIFAR100_STD,
        class_names=list(CIFAR100_FINE_NAMES),
    )


def _first_per_class(labels: np.ndarray, k: int) -> np.ndarray:
    """Positions of the first `k` items of each class, in their original order."""
    if k == 0:
        return np.arange(len(labels))
    order = np.argsort(labels, kind="stable")
    sorted_labels = labels[order]
    starts = np.searchsorted(sorted_labels, sorted_labels, side="left")
    rank = np.empty(len(labels), dtype=np.int64)
    rank[order] = np.arange(len(labels)) - starts
    return np.flatnonzero(rank < k)


def _check_label_range(labels: np.ndarray, where: str) -> None:
    bad = np.flatnonzero((labels < 0) | (labels >= len(CIFAR100_FINE_NAMES)))
    if len(bad):
        r = int(bad[0])
        raise DataError(f"{where} row {r}: fine label {labels[r]} is outside 0..99")


# --- Parquet ---------------------------------------------------------------------


def _find_parquet(root: Path) -> dict[str, list[Path]] | None:
    files = {s: sorted(root.glob(f"{s}-*.parquet")) for s in _SPLITS}
    if not any(files.values()):
        return None
    for s in _SPLITS:
        if not files[s]:
            raise DataError(f"{root} has Parquet files but no {s}-*.parquet")
    return files


def _default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "fl_ci" / "cifar100"


def _read_manifest(root: Path) -> dict | None:
    path = root / "manifest.json"
    if not path.exists():
        return None
    try:
        manifest = json.loads(path.read_text())
        by_file = {f["file"]: f for f in manifest["files"]}
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DataError(f"{path}: not a readable CIFAR-100 manifest ({e})") from e
    manifest["by_file"] = by_file
    return manifest


def _check_against_manifest(
    manifest: dict, root: Path, files: dict[str, list[Path]]
) -> None:
    """Cheap checks only (names, sizes); hashing 127 MB on every load is too slow."""
    listed = set(manifest["by_file"])
    found = {p.name for ps in files.values() for p in ps}
    if listed != found:
        missing = sorted(listed - found)
        extra = sorted(found - listed)
        raise DataError(
            f"{root / 'manifest.json'} lists other Parquet files than {root} holds "
            f"(missing: {missing}, not listed: {extra})"
        )
    for ps in files.values():
        for p in ps:
            want = manifest["by_file"][p.name].get("bytes")
            size = p.stat().st_size
            if want is not None and size != want:
                raise DataError(f"{p}: {size} bytes, manifest.json says {want}")


def _open_parquet(path: Path) -> pq.ParquetFile:
    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{path}: not a readable Parquet file ({e})") from e
    missing = [c for c in _PARQUET_COLUMNS if c not in pf.schema_arrow.names]
    if missing:
        raise DataError(f"{path}: missing column(s) {missing}")
    return pf


def _read_columns(path: Path, columns: list[str]) -> pa.Table:
    try:
        return _open_parquet(path).read(columns=columns)
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{path}: cannot read columns {columns} ({e})") from e


def _read_labels(path: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(index, fine_label) of every row of one file, after checking them."""
    cols = ["split", "index", "fine_label"]
    if "fine_label_name" in _open_parquet(path).schema_arrow.names:
        cols.append("fine_label_name")
    table = _read_columns(path, cols)
    for col in cols:
        if table.column(col).null_count:
            raise DataError(f"{path}: column {col!r} has missing values")
    splits = table.column("split").to_numpy(zero_copy_only=False)
    wrong = np.flatnonzero(splits != split)
    if len(wrong):
        r = int(wrong[0])
        raise DataError(f"{path} row {r}: split is {splits[r]!r}, expected {split!r}")
    index = table.column("index").to_numpy().astype(np.int64)
    labels = table.column("fine_label").to_numpy().astype(np.int64)
    _check_label_range(labels, str(path))
    if "fine_label_name" in cols:
        label_names = table.column("fine_label_name").to_pylist()
        for label, name in set(zip(labels.tolist(), label_names, strict=True)):
            if name != CIFAR100_FINE_NAMES[label]:
                raise DataError(
                    f"{path}: fine label {label} is named {name!r}, "
                    f"expected {CIFAR100_FINE_NAMES[label]!r}"
                )
    return index, labels


def _decode_png(data: bytes | None, where: str) -> np.ndarray:
    """PNG bytes -> [32, 32, 3] uint8."""
    if data is None:
        raise DataError(f"{where}: image_png is missing")
    try:
        with Image.open(io.BytesIO(data), formats=["PNG"]) as im:
            im.load()
            mode, size = im.mode, im.size
            pixels = np.asarray(im)
    except (OSError, ValueError, SyntaxError) as e:
        raise DataError(f"{where}: image_png is not a readable PNG ({e})") from e
    if mode != "RGB" or size != (32, 32):
        raise DataError(f"{where}: image is {mode} {size}, expected RGB (32, 32)")
    return pixels


def _load_parquet_split(
    files: list[Path], split: str, max_per_class: int, manifest: dict | None
) -> tuple[np.ndarray, np.ndarray]:
    per_file = [_read_labels(p, split) for p in files]
    if manifest is not None:
        for p, (index, _) in zip(files, per_file, strict=True):
            want = manifest["by_file"][p.name].get("rows")
            if want is not None and len(index) != want:
                raise DataError(f"{p}: {len(index)} rows, manifest.json says {want}")
        want = manifest.get("rows", {}).get(split)
        total = sum(len(i) for i, _ in per_file)
        if want is not None and total != want:
            raise DataError(f"{split} Parquet files hold {total} rows, manifest {want}")

    index = np.concatenate([i for i, _ in per_file])
    labels = np.concatenate([y for _, y in per_file])
    file_of = np.concatenate([np.full(len(i), f) for f, (i, _) in enumerate(per_file)])
    row_of = np.concatenate([np.arange(len(i)) for i, _ in per_file])
    order = np.argsort(index, kind="stable")
    # `index` must be exactly 0..N-1, else official order (and our rows) are lost.
    gaps = np.flatnonzero(index[order] != np.arange(len(index)))
    if len(gaps):
        g = int(gaps[0])
        pos = order[g]
        where = f"{files[file_of[pos]]} row {row_of[pos]}"
        if index[pos] < g:
            raise DataError(f"{where}: index {index[pos]} occurs twice in {split}")
        raise DataError(f"{where}: index {g} is missing from {split} (gap before it)")

    keep = order[_first_per_class(labels[order], max_per_class)]
    # Decoded as stored (NHWC): the manifest hashes that layout, and one bulk
    # transpose afterwards is cheaper than 60,000 small ones.
    x = np.empty((len(keep), 32, 32, 3), dtype=np.uint8)
    for f, path in enumerate(files):
        mine = np.flatnonzero(file_of[keep] == f)
        if not len(mine):
            continue  # a small subsample often needs none of this file's images
        rows = row_of[keep[mine]]
        pngs = _read_columns(path, ["image_png"]).column("image_png")
        for out, r, data in zip(mine, rows, pngs.take(rows).to_pylist(), strict=True):
            x[out] = _decode_png(data, f"{path} row {r}")
    return x, labels[keep]


def _check_content_hashes(manifest: dict, arrays: Arrays) -> None:
    """Compare a full NHWC load with the manifest's hashes of the decoded arrays."""
    hashes = manifest.get("content_sha256", {})
    for split, (x, y) in arrays.items():
        checks = {
            f"{split}_pixels_NHWC_uint8": x,
            f"{split}_fine_labels_int64": y.astype(np.int64),
        }
        for key, arr in checks.items():
            want = hashes.get(key)
            if want is not None and hashlib.sha256(arr.data).hexdigest() != want:
                raise DataError(
                    f"decoded {split} data does not match manifest.json {key}"
                )


def _cache_key(files: dict[str, list[Path]], max_per_class: int) -> str:
    stats = []
    for s in _SPLITS:
        for p in files[s]:
            st = p.stat()
            stats.append([p.name, st.st_size, st.st_mtime_ns])
    blob = json.dumps([_CACHE_VERSION, max_per_class, stats]).encode()
    return f"mpc{max_per_class}-{hashlib.sha256(blob).hexdigest()[:20]}"


def _read_cache(path: Path) -> Arrays | None:
    if not path.is_dir():
        return None
    try:
        arrays = {
            s: (np.load(path / f"{s}_x.npy"), np.load(path / f"{s}_y.npy"))
            for s in _SPLITS
        }
    except (OSError, ValueError) as e:
        warnings.warn(f"ignoring unreadable CIFAR-100 cache {path} ({e})", stacklevel=3)
        return None
    for x, y in arrays.values():
        ok = (
            x.dtype == np.uint8
            and x.shape[1:] == (3, 32, 32)
            and y.shape == x.shape[:1]
        )
        if not ok:
            warnings.warn(f"ignoring malformed CIFAR-100 cache {path}", stacklevel=3)
            return None
    return arrays


def _write_cache(path: Path, arrays: Arrays) -> None:
    """Write into a temporary folder, then rename it: readers never see half a cache."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}-", dir=path.parent))
    except OSError as e:
        warnings.warn(f"cannot cache CIFAR-100 in {path.parent} ({e})", stacklevel=3)
        return
    try:
        for s, (x, y) in arrays.items():
            np.save(tmp / f"{s}_x.npy", x)
            np.save(tmp / f"{s}_y.npy", y)
        if path.exists():
            shutil.rmtree(path)  # a stale or malformed cache under this key
        os.replace(tmp, path)
    except OSError as e:
        # Another process may have written the same key first; theirs is as good.
        if not path.is_dir():
            warnings.warn(f"cannot cache CIFAR-100 in {path} ({e})", stacklevel=3)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _load_parquet(
    root: Path, files: dict[str, list[Path]], max_per_class: int, cache_dir: Path
) -> Arrays:
    manifest = _read_manifest(root)
    if manifest is not None:
        _check_against_manifest(manifest, root, files)
    cache = cache_dir / _cache_key(files, max_per_class)
    arrays = _read_cache(cache)
    if arrays is not None:
        return arrays
    arrays = {
        s: _load_parquet_split(files[s], s, max_per_class, manifest) for s in _SPLITS
    }
    if manifest is not None and max_per_class == 0:
        _check_content_hashes(manifest, arrays)
    # torch's permute copies with all cores, about twice as fast as numpy's here.
    arrays = {
        s: (torch.from_numpy(x).permute(0, 3, 1, 2).contiguous().numpy(), y)
        for s, (x, y) in arrays.items()
    }
    _write_cache(cache, arrays)
    return arrays


# --- official pickles ------------------------------------------------------------


def _find_pickle_dir(root: Path) -> Path | None:
    """`root` itself or `root/cifar-100-python`, if either looks like the pickles."""
    for candidate in (root, root / _PICKLE_DIR):
        present = [n for n in ("train", "test", "meta") if (candidate / n).is_file()]
        if len(present) == 3:
            return candidate
        if present or (candidate.name == _PICKLE_DIR and candidate.is_dir()):
            missing = sorted({"train", "test", "meta"} - set(present))
            raise DataError(f"{candidate} looks like {_PICKLE_DIR} but lacks {missing}")
    return None


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickler that builds numpy arrays and nothing else."""

    def find_class(self, module: str, name: str) -> object:
        if (module, name) not in _PICKLE_GLOBALS:
            raise pickle.UnpicklingError(f"refusing global {module}.{name}")
        if module.startswith("numpy.core."):
            # numpy >= 2 warns on the old name; numpy 1.26 already ships `_core`.
            module = "numpy._core." + module.removeprefix("numpy.core.")
        return super().find_class(module, name)


def _unpickle(path: Path) -> dict[str, object]:
    try:
        with path.open("rb") as f:
            # latin1: the official files are Python 2 pickles of str and numpy arrays.
            obj = _ArrayUnpickler(f, encoding="latin1").load()
    except Exception as e:  # a damaged pickle can raise almost any error
        raise DataError(f"{path}: not a readable CIFAR-100 pickle ({e})") from e
    if not isinstance(obj, dict):
        raise DataError(f"{path}: expected a dict, got {type(obj).__name__}")
    return {
        k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in obj.items()
    }


def _load_pickle_split(path: Path, max_per_class: int) -> tuple[np.ndarray, np.ndarray]:
    batch = _unpickle(path)
    for key in ("data", "fine_labels"):
        if key not in batch:
            raise DataError(f"{path}: missing key {key!r}")
    data = batch["data"]
    if not (
        isinstance(data, np.ndarray)
        and data.dtype == np.uint8
        and data.ndim == 2
        and data.shape[1] == 3 * 32 * 32
    ):
        shape = getattr(data, "shape", None)
        raise DataError(f"{path}: 'data' must be [N, 3072] uint8, got {shape}")
    try:
        labels = np.asarray(batch["fine_labels"], dtype=np.int64)
    except (TypeError, ValueError) as e:
        raise DataError(f"{path}: 'fine_labels' are not integers ({e})") from e
    if labels.shape != (len(data),):
        raise DataError(
            f"{path}: {len(data)} rows of 'data' but {labels.size} 'fine_labels'"
        )
    _check_label_range(labels, str(path))
    keep = _first_per_class(labels, max_per_class)
    # Rows are channel-major (1024 R, then G, then B), each row-major over 32x32.
    x = np.ascontiguousarray(data[keep].reshape(-1, 3, 32, 32))
    return x, labels[keep]


def _load_pickle_dir(pickle_dir: Path, max_per_class: int) -> Arrays:
    meta_path = pickle_dir / "meta"
    names = _unpickle(meta_path).get("fine_label_names")
    if names is None:
        raise DataError(f"{meta_path}: missing key 'fine_label_names'")
    names = [n.decode("latin1") if isinstance(n, bytes) else n for n in names]
    if tuple(names) != CIFAR100_FINE_NAMES:
        raise DataError(f"{meta_path}: fine_label_names are not CIFAR-100's 100 names")
    return {s: _load_pickle_split(pickle_dir / s, max_per_class) for s in _SPLITS}


# --- download --------------------------------------------------------------------


def _fetch(url: str, dest: Path) -> None:
    """Download `url` to `dest`, via a temporary name so `dest` is whole or absent."""
    part = dest.with_name(dest.name + ".part")
    try:
        with urllib.request.urlopen(url, timeout=60) as r, part.open("wb") as f:
            shutil.copyfileobj(r, f, length=1 << 20)
        os.replace(part, dest)
    except OSError as e:
        part.unlink(missing_ok=True)
        raise DataError(f"cannot download {url} to {dest} ({e})") from e


def _download(root: Path) -> Path:
    """Fetch (unless already there), verify and extract the official archive."""
    root.mkdir(parents=True, exist_ok=True)
    archive = root / _ARCHIVE
    if not archive.exists():
        _fetch(CIFAR100_URL, archive)
    _verify_and_extract(archive, CIFAR100_MD5, root)
    pickle_dir = root / _PICKLE_DIR
    if _find_pickle_dir(pickle_dir) is None:
        raise DataError(f"{archive} did not contain {_PICKLE_DIR}/{{train,test,meta}}")
    return pickle_dir


def _md5(path: Path) -> str:
    h = hashlib.md5(usedforsecurity=False)
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _verify_and_extract(
    archive: str | Path, expected_md5: str, dest: str | Path
) -> None:
    """Check `archive`'s MD5, then extract it into `dest` all at once or not at all.

    Only plain files and folders inside `dest` are allowed; links, devices, absolute
    names and `..` are refused before anything is written.
    """
    archive, dest = Path(archive), Path(dest)
    got = _md5(archive)
    if got != expected_md5:
        raise DataError(f"{archive}: MD5 {got}, expected {expected_md5}; not extracted")
    dest.mkdir(parents=True, exist_ok=True)
    try:
        with tarfile.open(archive, "r:gz") as tar:
            members = tar.getmembers()
            tops = set()
            for m in members:
                parts = PurePosixPath(m.name).parts
                unsafe = m.name.startswith(("/", "\\")) or ".." in parts or not parts
                if unsafe or not (m.isfile() or m.isdir()):
                    raise DataError(f"{archive}: refusing unsafe member {m.name!r}")
                tops.add(parts[0])
            clash = sorted(t for t in tops if (dest / t).exists())
            if clash:
                raise DataError(
                    f"{archive}: {dest} already holds {clash}; not extracted"
                )
            tmp = Path(tempfile.mkdtemp(prefix=".extract-", dir=dest))
            try:
                tar.extractall(tmp, members=members, filter="data")
                for t in sorted(tops):
                    os.replace(tmp / t, dest / t)
            except BaseException:
                # None of `tops` existed before, so whatever is there now is ours.
                for t in tops:
                    moved = dest / t
                    if moved.is_dir():
                        shutil.rmtree(moved, ignore_errors=True)
                    elif moved.exists():
                        moved.unlink()
                raise
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    except (tarfile.TarError, OSError, EOFError) as e:
        raise DataError(f"{archive}: cannot extract ({e})") from e
