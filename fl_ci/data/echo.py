"""Echocardiography cines listed in a manifest, decoded once and cached as uint8 frames.

`root/manifest.csv` (or `manifest.parquet`) has one row per cine with columns `path`
(relative to the manifest), `view` (one of `ECHO_VIEWS`, any case), `patient_id` and
optionally `device` and/or `site`. Files may be DICOM (multi- or single-frame), AVI/MP4
(or anything else PyAV decodes), NPY or NPZ. Every cine becomes grayscale, `frames`
frames sampled uniformly over time (sample `frames // 2` is the cine's middle frame,
which evaluation uses), each resized to `image_size` x `image_size`.
"""

from __future__ import annotations

import csv
import hashlib
import os
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from fl_ci.data.base import DataError, ImageData, patient_groups

ECHO_VIEWS = ("A2C", "A3C", "A4C", "PLAX", "PSAX")

_REQUIRED = ("path", "view", "patient_id")
_VIDEO_SUFFIXES = frozenset(
    {".avi", ".mp4", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg"}
)
_CACHE_VERSION = "1"  # bump when decoding changes, so stale caches are ignored


@dataclass
class EchoData(ImageData):
    """`ImageData` that also keeps the manifest's names behind the integer ids.

    `patient_names[i]` is the `patient_id` string of patient id `i`, `device_names[j]`
    the device of device id `j` (sorted unique strings; id -1 is an empty value).
    `subset` returns a plain `ImageData`; the ids keep their meaning.
    """

    patient_names: list[str] = field(default_factory=list)
    device_names: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # bad rows left out, and why


@dataclass(frozen=True)
class _Row:
    number: int  # 1-based data row (the header is not counted)
    file: Path
    label: int
    patient: str
    device: str


def pixel_mean_std(frames: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of uint8 frames [N, F, C, H, W], on the 0..1 scale.

    Exact, via a 256-bin histogram per channel, so it needs no float copy of the data.
    """
    if frames.numel() == 0:
        raise DataError("cannot compute mean/std of an empty dataset")
    values = torch.arange(256, dtype=torch.float64) / 255.0
    means, stds = [], []
    for c in range(frames.shape[2]):
        hist = torch.zeros(256, dtype=torch.float64)
        for start in range(0, frames.shape[0], 256):  # chunks bound the int64 copy
            chunk = frames[start : start + 256, :, c].reshape(-1)
            hist += torch.bincount(chunk.long(), minlength=256).double()
        p = hist / hist.sum()
        mean = float((p * values).sum())
        var = float((p * (values - mean) ** 2).sum())
        means.append(mean)
        stds.append(max(var, 0.0) ** 0.5)
    return tuple(means), tuple(stds)


def sample_indices(length: int, frames: int) -> np.ndarray:
    """`frames` indices spread uniformly over `length`; sample frames//2 is length//2.

    The step is length / frames; anchoring on the middle (rather than the first frame)
    makes the evaluation frame the cine's middle. Short cines repeat frames.
    """
    offsets = (np.arange(frames) - frames // 2) * (length / frames)
    idx = np.floor(length // 2 + offsets + 1e-9).astype(np.int64)
    return np.clip(idx, 0, length - 1)


def _read_manifest(root: Path) -> tuple[Path, list[dict[str, str]], list[str]]:
    """(manifest file, rows as str dicts, column names)."""
    csv_path, pq_path = root / "manifest.csv", root / "manifest.parquet"
    if csv_path.is_file() and pq_path.is_file():
        raise DataError(f"{root} has both manifest.csv and manifest.parquet; keep one")
    if pq_path.is_file():
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(pq_path)
        except Exception as e:  # pyarrow raises several types for bad files
            raise DataError(f"{pq_path}: cannot read Parquet ({e})") from e
        columns = list(table.column_names)
        rows = [
            {k: "" if v is None else str(v).strip() for k, v in r.items()}
            for r in table.to_pylist()
        ]
        return pq_path, rows, columns
    if csv_path.is_file():
        try:
            with open(csv_path, newline="", encoding="utf-8-sig") as f:
                reader = csv.DictReader(f)
                columns = [c.strip() for c in reader.fieldnames or []]
                reader.fieldnames = columns
                rows = [
                    {k: (v or "").strip() for k, v in r.items() if k is not None}
                    for r in reader
                ]
        except (UnicodeDecodeError, csv.Error) as e:
            raise DataError(f"{csv_path}: cannot read CSV ({e})") from e
        return csv_path, rows, columns
    raise DataError(f"no manifest.csv or manifest.parquet in {root}")


def _check_manifest(
    manifest: Path,
    rows: list[dict[str, str]],
    columns: list[str],
    skip_bad: bool,
    class_names: tuple[str, ...] | list[str] = ECHO_VIEWS,
) -> tuple[list[_Row], list[str]]:
    """The sound rows as `_Row`s and the problems of the others; unless `skip_bad`,
    one DataError listing every bad row."""
    missing = [c for c in _REQUIRED if c not in columns]
    if missing:
        raise DataError(
            f"{manifest}: missing column(s) {missing}; it has {columns}, needs "
            f"{list(_REQUIRED)} (+ optional device, site)"
        )
    if not rows:
        raise DataError(f"{manifest}: no rows")
    has_device, has_site = "device" in columns, "site" in columns
    views = [name.upper() for name in class_names]
    base = manifest.parent
    out, problems = [], []
    for number, r in enumerate(rows, start=1):
        where = f"{manifest} row {number}"
        before = len(problems)
        view = r["view"].upper()
        if not r["path"]:
            problems.append(f"{where}: empty path")
            continue
        file = base / r["path"]
        if view not in views:
            problems.append(
                f"{where} ({file}): unknown view {r['view']!r}, not one of the "
                f"study's classes {list(class_names)}"
            )
        if not r["patient_id"]:
            problems.append(f"{where} ({file}): empty patient_id")
        if not file.is_file():
            problems.append(f"{where}: file not found: {file}")
        # site and device together name one acquisition domain (a scanner at a site)
        site = r["site"] if has_site else ""
        dev = r["device"] if has_device else ""
        device = f"{site}/{dev}" if site and dev else site or dev
        if len(problems) > before:
            continue
        out.append(_Row(number, file, views.index(view), r["patient_id"], device))
    if problems and not skip_bad:
        shown = "\n  ".join(problems[:20])
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        raise DataError(f"{manifest}: {len(problems)} problem(s):\n  {shown}{more}")
    return out, problems


def _to_uint8_scale(arr: np.ndarray) -> np.ndarray:
    """Any numeric array -> float32 on the 0..255 scale.

    uint8 is kept; floats within [0, 1] are scaled by 255; anything else (e.g. 16-bit
    DICOM) is min-max stretched per cine, since its display window is unknown.
    """
    if arr.dtype == np.uint8:
        return arr.astype(np.float32)
    if arr.dtype == np.bool_:
        return arr.astype(np.float32) * 255.0
    a = arr.astype(np.float32)
    if not np.isfinite(a).all():
        raise ValueError("non-finite pixel values")
    lo, hi = float(a.min()), float(a.max())
    if np.issubdtype(arr.dtype, np.floating) and lo >= 0.0 and hi <= 1.0:
        return a * 255.0
    return (a - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(a)


def _gray(arr: np.ndarray, channels: int) -> np.ndarray:
    """[F, H, W] or [F, H, W, C] (C = channels) on the 0..255 scale -> [F, H, W]."""
    if channels == 1:
        return arr if arr.ndim == 3 else arr[..., 0]
    if channels == 2:  # gray + alpha
        return arr[..., 0]
    rgb = arr[..., :3]  # drops alpha
    return rgb @ np.array([0.299, 0.587, 0.114], dtype=np.float32)  # ITU-R BT.601 luma


def _decode_dicom(file: Path, frames: int) -> np.ndarray:
    """Sampled frames of a DICOM cine as float32 gray [frames, H, W] (0..255)."""
    import pydicom
    from pydicom.pixels import apply_color_lut, convert_color_space, pixel_array

    ds = pydicom.dcmread(file)
    if "PixelData" not in ds and "FloatPixelData" not in ds:
        raise ValueError("no pixel data")
    # DICOM's frame count is reliable (it sizes the pixel data), unlike video headers
    length = int(ds.get("NumberOfFrames", 1) or 1)
    spp = int(ds.get("SamplesPerPixel", 1))
    pi = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    idx = sample_indices(length, frames)
    unique, inverse = np.unique(idx, return_inverse=True)
    # decode only the frames we keep; raw=True so the colour conversion below is ours
    decoded = np.stack([pixel_array(ds, index=int(i), raw=True) for i in unique])
    if pi in ("YBR_FULL", "YBR_FULL_422"):
        decoded = convert_color_space(decoded, pi, "RGB", per_frame=True)
    elif pi == "PALETTE COLOR":
        decoded = np.stack([apply_color_lut(f, ds) for f in decoded])
        spp = 3
    want = 4 if spp > 1 else 3
    if decoded.ndim != want:
        raise ValueError(f"unexpected pixel array shape {decoded.shape[1:]}")
    gray = _gray(_to_uint8_scale(decoded), spp)
    if pi == "MONOCHROME1":  # low values are bright
        gray = 255.0 - gray
    return gray[inverse]


def _decode_video(file: Path, frames: int) -> np.ndarray:
    """Sampled frames of a video as float32 gray [frames, H, W] (0..255)."""
    import av

    gray = []
    with av.open(str(file)) as container:
        if not container.streams.video:
            raise ValueError("no video stream")
        # decode until the decoder stops: header frame counts are often wrong
        for frame in container.decode(video=0):
            gray.append(_gray(frame.to_ndarray(format="rgb24").astype(np.float32), 3))
    if not gray:
        raise ValueError("no frames decoded")
    return np.stack(gray)[sample_indices(len(gray), frames)]


def _decode_array(file: Path, frames: int) -> np.ndarray:
    """Sampled frames of an NPY/NPZ cine ([F,H,W], [F,H,W,C] or [H,W]) as gray."""
    if file.suffix.lower() == ".npz":
        with np.load(file, allow_pickle=False) as z:
            if not z.files:
                raise ValueError("empty NPZ")
            arr = z["frames"] if "frames" in z.files else z[z.files[0]]
    else:
        arr = np.load(file, allow_pickle=False)
    if arr.ndim == 2:
        arr = arr[None]
    if arr.ndim == 3:
        channels = 1
    elif arr.ndim == 4 and arr.shape[-1] in (1, 2, 3, 4):
        channels = arr.shape[-1]
    else:
        raise ValueError(
            f"array shape {arr.shape}, expected [F,H,W], [F,H,W,C] (C<=4) or [H,W]"
        )
    if arr.shape[0] == 0 or arr.shape[1] == 0 or arr.shape[2] == 0:
        raise ValueError(f"empty array {arr.shape}")
    if not (np.issubdtype(arr.dtype, np.number) or arr.dtype == np.bool_):
        raise ValueError(f"non-numeric dtype {arr.dtype}")
    arr = arr[sample_indices(arr.shape[0], frames)]
    return _gray(_to_uint8_scale(arr), channels)


def _decode(file: Path, frames: int, image_size: int) -> np.ndarray:
    """uint8 [frames, image_size, image_size] for one cine file."""
    suffix = file.suffix.lower()
    if suffix in (".npy", ".npz"):
        gray = _decode_array(file, frames)
    elif suffix in _VIDEO_SUFFIXES:
        gray = _decode_video(file, frames)
    else:  # DICOM files often have no or arbitrary suffixes
        gray = _decode_dicom(file, frames)
    x = torch.from_numpy(np.ascontiguousarray(gray, dtype=np.float32))[:, None]
    if x.shape[-2:] != (image_size, image_size):
        x = F.interpolate(
            x, size=(image_size, image_size), mode="bilinear", antialias=True
        )
    return x[:, 0].round().clamp(0, 255).to(torch.uint8).numpy()


def _cache_file(cache_dir: Path, file: Path, image_size: int, frames: int) -> Path:
    """Cache entry named by source path, size, mtime and the decode settings."""
    st = file.stat()
    key = "|".join(
        map(
            str,
            (file.resolve(), st.st_size, st.st_mtime_ns, image_size, frames),
        )
    )
    digest = hashlib.sha256(f"{_CACHE_VERSION}|{key}".encode()).hexdigest()[:24]
    return cache_dir / f"{file.stem[:40]}-{digest}.npy"


def _load_cached(path: Path, shape: tuple[int, ...]) -> np.ndarray | None:
    try:
        arr = np.load(path, allow_pickle=False)
    except (OSError, ValueError):  # missing or damaged entry: decode again
        return None
    return arr if arr.shape == shape and arr.dtype == np.uint8 else None


def _save_cached(path: Path, arr: np.ndarray) -> None:
    """Atomic write (temp file + os.replace) so readers never see half a file."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                np.save(f, arr)
            os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide a shared cache
            os.replace(tmp, path)
        except BaseException:
            os.unlink(tmp)
            raise
    except OSError as e:  # a read-only data folder should not stop training
        warnings.warn(f"cannot write echo cache {path}: {e}", stacklevel=3)


def load_echo_manifest(
    root: str | os.PathLike,
    *,
    image_size: int = 64,
    frames: int = 8,
    max_per_class: int = 0,
    cache_dir: str | os.PathLike | None = None,
    skip_bad: bool = False,
    class_names: tuple[str, ...] | list[str] = ECHO_VIEWS,
) -> EchoData:
    """Load the cines listed in `root/manifest.{csv,parquet}` as grayscale uint8.

    Returns `EchoData` (an `ImageData`; labels index `class_names`, the study's
    views, matched without regard to case; default `ECHO_VIEWS`) in manifest order,
    with `patient_names`/`device_names` mapping ids back to the manifest's strings.
    `max_per_class` > 0 keeps the first that many rows of each view. Decoded cines are
    cached in `cache_dir` (default `root/.fl_ci_cache`; "" means the default), keyed by
    file path, size, mtime, `image_size` and `frames`. The whole manifest is checked
    (columns, views, patient ids, files exist) before anything is decoded; errors
    name the file and the manifest row (counted from 1, header excluded). With
    `skip_bad`, bad rows and cines that cannot be decoded are left out instead and
    listed in the result's `skipped` (a site goes on with the rest and reports them).
    """
    if image_size < 1 or frames < 1 or max_per_class < 0:
        raise ValueError(
            f"need image_size >= 1, frames >= 1, max_per_class >= 0; got {image_size}, "
            f"{frames}, {max_per_class}"
        )
    root = Path(root)
    manifest, raw_rows, columns = _read_manifest(root)
    rows, skipped = _check_manifest(manifest, raw_rows, columns, skip_bad, class_names)
    if max_per_class > 0:
        kept: dict[int, int] = {}
        chosen = []
        for r in rows:
            if kept.get(r.label, 0) < max_per_class:
                kept[r.label] = kept.get(r.label, 0) + 1
                chosen.append(r)
        rows = chosen
    cache = Path(cache_dir) if cache_dir else root / ".fl_ci_cache"
    shape = (frames, image_size, image_size)
    cines, decoded = [], []
    for r in rows:
        entry = _cache_file(cache, r.file, image_size, frames)
        arr = _load_cached(entry, shape)
        if arr is None:
            try:
                arr = _decode(r.file, frames, image_size)
            except Exception as e:  # decoders raise many types; all mean "unusable"
                problem = (
                    f"{manifest} row {r.number}: cannot decode {r.file} "
                    f"({type(e).__name__}: {e})"
                )
                if not skip_bad:
                    raise DataError(problem) from e
                skipped.append(problem)
                continue
            _save_cached(entry, arr)
        cines.append(torch.from_numpy(arr))
        decoded.append(r)
    rows = decoded
    if not rows:
        raise DataError(
            f"{manifest}: no usable row; {len(skipped)} skipped, first: {skipped[:3]}"
        )
    patient_names = sorted({r.patient for r in rows})
    device_names = sorted({r.device for r in rows if r.device})
    pid = {p: i for i, p in enumerate(patient_names)}
    did = {d: i for i, d in enumerate(device_names)}
    frames_t = torch.stack(cines)[:, :, None]  # [N, F, 1, H, W]
    mean, std = pixel_mean_std(frames_t)
    return EchoData(
        frames=frames_t,
        labels=torch.tensor([r.label for r in rows], dtype=torch.long),
        patients=torch.tensor([pid[r.patient] for r in rows], dtype=torch.long),
        devices=torch.tensor([did.get(r.device, -1) for r in rows], dtype=torch.long),
        mean=mean,
        std=std,
        class_names=list(class_names),
        patient_names=patient_names,
        device_names=device_names,
        skipped=skipped,
    )


def _largest_split_first(sizes: np.ndarray, targets: np.ndarray) -> list[int]:
    return [int(j) for j in np.argsort(-(sizes - targets), kind="stable")]


def split_by_patient(
    data: ImageData,
    fractions: tuple[float, float, float] = (0.7, 0.1, 0.2),
    seed: int = 0,
) -> tuple[ImageData, ImageData, ImageData]:
    """(train, val, test) with every patient in exactly one split.

    Patients are stratified by their most common view and spread over the splits in
    proportion to `fractions` (deterministic from `seed`); then, where a split lacks a
    view, a patient with that view moves in from a split that keeps the view without
    them. Cines with patient id -1 (unknown) count as one patient each.
    """
    fr = np.asarray(fractions, dtype=np.float64)
    if fr.shape != (3,) or (fr < 0).any() or abs(fr.sum() - 1.0) > 1e-6:
        raise ValueError(f"fractions must be 3 non-negative numbers summing to 1: {fr}")
    n = len(data)
    group = patient_groups(data.patients)
    group_np = group.numpy()
    groups = int(group.max()) + 1 if n else 0
    k = max(len(data.class_names), int(data.labels.max()) + 1 if n else 0)
    counts = np.zeros((groups, k), dtype=np.int64)
    np.add.at(counts, (group_np, data.labels.numpy()), 1)
    has = counts > 0
    rng = np.random.default_rng(seed)
    assign = np.zeros(groups, dtype=np.int64)
    cum = np.cumsum(fr)
    stratum = counts.argmax(1) if groups else np.zeros(0, dtype=np.int64)
    for s in np.unique(stratum):
        members = rng.permutation(np.flatnonzero(stratum == s))
        # systematic sampling with a random start: split sizes follow the fractions
        pos = (np.arange(len(members)) + rng.random()) / len(members)
        assign[members] = np.minimum(np.searchsorted(cum, pos, side="right"), 2)
    targets = fr * groups
    tiebreak = rng.permutation(groups)
    for _ in range(3 * k):  # each move covers one (split, view) pair; bounded
        moved = False
        present = np.stack([has[assign == j].sum(0) for j in range(3)])  # [3, K]
        for split in (j for j in range(3) if fr[j] > 0):
            for view in np.flatnonzero((present[split] == 0) & (has.sum(0) > 0)):
                sizes = np.bincount(assign, minlength=3)
                for donor in _largest_split_first(sizes, targets):
                    if donor == split:
                        continue
                    cand = [
                        g
                        for g in tiebreak
                        if assign[g] == donor
                        and has[g, view]
                        and (present[donor][has[g]] >= 2).all()
                    ]
                    if cand:
                        g = min(cand, key=lambda g: has[g].sum())
                        assign[g] = split
                        moved = True
                        break
                if moved:
                    break
            if moved:
                break
        if not moved:
            break
    row_split = torch.from_numpy(assign[group_np]) if n else torch.zeros(0)
    train, val, test = (data.subset(row_split == j) for j in range(3))
    return train, val, test
