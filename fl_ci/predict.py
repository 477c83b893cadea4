"""Score cines and images with a bundle; write one CSV row per item.

INPUT is a manifest folder (`manifest.csv` or `manifest.parquet`, column `path`
relative to it, optional `view` = the true label and `patient_id`), a folder of cines
(DICOM, AVI/MP4/..., NPY/NPZ) and images (PNG/JPEG/BMP/TIFF) scanned recursively, or
one such file. Cines are decoded exactly as a run decodes them (`fl_ci.data.echo`):
`frames` frames sampled uniformly around the middle, gray, resized to the bundle's
size; each distinct sampled frame is scored and the softmax averaged. With
`frames = 1` the one frame is the cine's middle, as the run's own evaluation uses.
Files that cannot be read are skipped and listed (stderr and `<out>.skipped.csv`);
rows are written as they are scored, so an interruption keeps what was done.
"""

from __future__ import annotations

import csv
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from fl_ci.bundle import Bundle, load_bundle
from fl_ci.data.base import DataError
from fl_ci.data.echo import (
    _VIDEO_SUFFIXES,
    _decode,
    _gray,
    _read_manifest,
    _to_uint8_scale,
    sample_indices,
)
from fl_ci.results import atomic_write

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"})
CINE_SUFFIXES = frozenset({".npy", ".npz", ".dcm", ".dicom"}) | _VIDEO_SUFFIXES
_SKIP_DIRS = frozenset({".fl_ci_cache", "__pycache__"})


class PredictError(ValueError):
    """Arguments predict cannot work with (frames, batch size, device)."""


@dataclass(frozen=True)
class Item:
    """One input: the file, its name in the CSV, and the manifest's fields if any."""

    file: Path
    name: str
    view: str = ""
    patient_id: str = ""


@dataclass
class Inputs:
    items: list[Item]
    skipped: list[tuple[str, str]]  # (name, reason): bad manifest rows
    has_view: bool = False
    has_patient: bool = False
    ignored: int = 0  # files in a scanned folder that are neither cine nor image


@dataclass
class PredictResult:
    out: Path
    skipped_file: Path
    written: int
    skipped: list[tuple[str, str]] = field(default_factory=list)
    labelled: int = 0  # rows whose true view is one of the bundle's classes
    correct: int = 0
    unknown_views: dict[str, int] = field(default_factory=dict)
    ignored: int = 0  # files of a scanned folder that are neither cine nor image

    @property
    def accuracy(self) -> float | None:
        """Accuracy in % over the labelled rows; None without labels."""
        return 100.0 * self.correct / self.labelled if self.labelled else None


def find_inputs(root: str | Path) -> Inputs:
    """The items under `root`: a manifest's rows, else every cine and image found."""
    root = Path(root)
    if not root.exists():
        raise DataError(f"input {root} not found")
    if root.is_file():
        return Inputs([Item(root, root.name)], [])
    if (root / "manifest.csv").is_file() or (root / "manifest.parquet").is_file():
        return _manifest_inputs(root)
    items, ignored = [], 0
    for file in sorted(_walk(root)):
        if _is_input(file):
            items.append(Item(file, file.relative_to(root).as_posix()))
        else:
            ignored += 1
    if not items:
        raise DataError(
            f"{root} holds no manifest and no DICOM, video, NPY/NPZ or image file"
        )
    return Inputs(items, [], ignored=ignored)


def read_item(
    item: Item, frames: int, image_size: int, channels: int = 1
) -> tuple[np.ndarray, list[int]]:
    """(uint8 [F', C, S, S], source frame index of each) for one item: the distinct
    frames of `frames` sampled uniformly (a still image: its one frame, index 0)."""
    if item.file.suffix.lower() in IMAGE_SUFFIXES:
        return _read_image(item.file, image_size, channels)[None], [0]
    if channels != 1:
        raise ValueError(f"cines decode to gray; this bundle takes {channels} channels")
    length = _cine_length(item.file)
    gray = _decode(item.file, frames, image_size)  # the run's decoder
    idx, first = np.unique(sample_indices(length, frames), return_index=True)
    return gray[first][:, None], [int(i) for i in idx]


def predict(
    bundle: Bundle | str | Path,
    input_path: str | Path,
    out: str | Path,
    *,
    frames: int | None = None,
    device: str = "auto",
    batch_size: int = 64,
    progress: bool = True,
) -> PredictResult:
    """Score every item of `input_path` and write `out` (CSV) and its skipped list.

    Columns: path, patient_id and view (when the manifest has them), predicted,
    prob_<class> per class (head order), frames (the source frame indices scored)
    and correct (with a view). `frames` defaults to the bundle's; 1 scores the middle
    frame only, as the run's own evaluation.
    """
    if not isinstance(bundle, Bundle):
        bundle = load_bundle(bundle)
    frames = bundle.frames if frames is None else frames
    if frames < 1 or batch_size < 1:
        raise PredictError(
            f"need frames >= 1 and batch size >= 1, got {frames} and {batch_size}"
        )
    dev = _device(device)
    inputs = find_inputs(input_path)
    out = Path(out)
    skipped_file = out.with_name(f"{out.stem}.skipped.csv")
    names = bundle.class_names
    canonical = {c.upper(): c for c in names}
    header = ["path"]
    header += ["patient_id"] * inputs.has_patient + ["view"] * inputs.has_view
    header += ["predicted", *(f"prob_{c}" for c in names), "frames"]
    header += ["correct"] * inputs.has_view
    result = PredictResult(
        out, skipped_file, 0, list(inputs.skipped), ignored=inputs.ignored
    )
    model = bundle.model.to(dev).eval()
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        with open(out, "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(header)
            for item, idx, probs in _scored(
                bundle, model, inputs.items, frames, dev, batch_size, result, progress
            ):
                top = int(probs.argmax())
                row = [item.name]
                row += [item.patient_id] * inputs.has_patient
                row += [item.view] * inputs.has_view
                row += [names[top], *(f"{p:.6f}" for p in probs.tolist())]
                row.append(" ".join(map(str, idx)))
                if inputs.has_view:
                    truth = canonical.get(item.view.upper())
                    if truth is not None:
                        result.labelled += 1
                        result.correct += truth == names[top]
                    elif item.view:
                        result.unknown_views[item.view] = (
                            result.unknown_views.get(item.view, 0) + 1
                        )
                    row.append("" if truth is None else int(truth == names[top]))
                writer.writerow(row)
                result.written += 1
                f.flush()  # an interrupted run keeps every row scored so far
    finally:
        _write_skipped(skipped_file, result.skipped)
    return result


# ------------------------------------------------------------------ helpers


def _scored(
    bundle: Bundle,
    model: torch.nn.Module,
    items: list[Item],
    frames: int,
    dev: torch.device,
    batch_size: int,
    result: PredictResult,
    progress: bool,
) -> Iterator[tuple[Item, list[int], torch.Tensor]]:
    """(item, frame indices, averaged probabilities [K]) in input order; items that
    cannot be read go to `result.skipped` (and stderr)."""
    from tqdm import tqdm

    pending: list[tuple[Item, list[int], np.ndarray]] = []

    def flush() -> Iterator[tuple[Item, list[int], torch.Tensor]]:
        x = torch.from_numpy(np.concatenate([a for _, _, a in pending]))
        probs = []
        with torch.inference_mode():
            for chunk in x.split(batch_size):
                logits = model(bundle.normalize(chunk.to(dev)))
                probs.append(torch.softmax(logits.float(), dim=1).cpu())
        per_frame = torch.cat(probs)
        start = 0
        for item, idx, arr in pending:
            yield item, idx, per_frame[start : start + len(arr)].mean(0)
            start += len(arr)
        pending.clear()

    bar = tqdm(
        items, desc="predict", unit="file", file=sys.stderr, disable=not progress
    )
    for item in bar:
        try:
            arr, idx = read_item(item, frames, bundle.image_size, bundle.in_channels)
        except Exception as err:  # noqa: BLE001 - decoders raise many types
            reason = f"{type(err).__name__}: {err}"
            result.skipped.append((item.name, reason))
            bar.write(f"skipped {item.file}: {reason}", file=sys.stderr)
            continue
        pending.append((item, idx, arr))
        if sum(len(a) for _, _, a in pending) >= batch_size:
            yield from flush()
    if pending:
        yield from flush()


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise PredictError("device cuda asked for but no CUDA device is present")
    if name not in ("cpu", "cuda"):
        raise PredictError(f"unknown device {name!r}; expected auto, cpu or cuda")
    return torch.device(name)


def _manifest_inputs(root: Path) -> Inputs:
    manifest, rows, columns = _read_manifest(root)
    if "path" not in columns:
        raise DataError(f"{manifest}: no 'path' column; it has {columns}")
    has_view, has_patient = "view" in columns, "patient_id" in columns
    items, skipped = [], []
    for number, r in enumerate(rows, start=1):
        name = r["path"]
        if not name:
            skipped.append((f"{manifest.name} row {number}", "empty path"))
            continue
        file = root / name
        if not file.is_file():
            skipped.append((name, f"{manifest.name} row {number}: file not found"))
            continue
        view = r.get("view", "") if has_view else ""
        patient = r.get("patient_id", "") if has_patient else ""
        items.append(Item(file, name, view, patient))
    if not items:
        raise DataError(f"{manifest}: no row names an existing file ({skipped[:3]})")
    return Inputs(items, skipped, has_view, has_patient)


def _walk(root: Path) -> Iterator[Path]:
    for path in root.iterdir():
        if path.name.startswith(".") or path.name in _SKIP_DIRS:
            continue
        if path.is_dir():
            yield from _walk(path)
        elif path.is_file():
            yield path


def _is_input(file: Path) -> bool:
    """A cine or image by its suffix, or a DICOM file by its preamble (DICOM files
    often have no suffix)."""
    suffix = file.suffix.lower()
    if suffix in IMAGE_SUFFIXES or suffix in CINE_SUFFIXES:
        return True
    try:
        with open(file, "rb") as f:
            return f.read(132)[128:] == b"DICM"
    except OSError:
        return True  # unreadable: let the decoder report it as skipped


def _cine_length(file: Path) -> int:
    """Frames in the source cine, counted as the echo decoders count them."""
    suffix = file.suffix.lower()
    if suffix == ".npy":
        arr = np.load(file, mmap_mode="r", allow_pickle=False)
        return 1 if arr.ndim == 2 else int(arr.shape[0])
    if suffix == ".npz":
        with np.load(file, allow_pickle=False) as z:
            if not z.files:
                raise ValueError("empty NPZ")
            shape = z["frames" if "frames" in z.files else z.files[0]].shape
        return 1 if len(shape) == 2 else int(shape[0])
    if suffix in _VIDEO_SUFFIXES:
        import av

        # decoded frames, not the header's count (often wrong), as _decode_video does
        with av.open(str(file)) as container:
            if not container.streams.video:
                raise ValueError("no video stream")
            return sum(1 for _ in container.decode(video=0))
    import pydicom

    ds = pydicom.dcmread(file, stop_before_pixels=True)
    return int(ds.get("NumberOfFrames", 1) or 1)


def _read_image(file: Path, image_size: int, channels: int) -> np.ndarray:
    """uint8 [C, S, S] of a still image: gray by BT.601 luma (as the echo decoders)
    for one channel, RGB for three."""
    from PIL import Image

    with Image.open(file) as img:
        img.load()
        if channels == 3:
            planes = np.asarray(img.convert("RGB"), dtype=np.float32).transpose(2, 0, 1)
        elif channels == 1:
            if img.mode in ("L", "I", "F") or img.mode.startswith("I;16"):
                planes = _to_uint8_scale(np.asarray(img))[None]
            elif img.mode == "LA":
                planes = np.asarray(img, dtype=np.float32)[None, ..., 0]
            else:
                rgb = np.asarray(img.convert("RGB"), dtype=np.float32)
                planes = _gray(rgb, 3)[None]
        else:
            raise ValueError(f"images are read as gray or RGB; bundle takes {channels}")
    return _resize(planes, image_size)


def _resize(planes: np.ndarray, size: int) -> np.ndarray:
    """float [N, H, W] on 0..255 -> uint8 [N, size, size], as `echo._decode` resizes."""
    x = torch.from_numpy(np.ascontiguousarray(planes, dtype=np.float32))[:, None]
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True)
    return x[:, 0].round().clamp(0, 255).to(torch.uint8).numpy()


def _write_skipped(path: Path, skipped: list[tuple[str, str]]) -> None:
    """Always written (header only when nothing was skipped), so a stale list from an
    earlier run never lingers beside new predictions."""

    def write(tmp: str) -> None:
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(["path", "reason"])
            writer.writerows(skipped)

    atomic_write(path, write)
