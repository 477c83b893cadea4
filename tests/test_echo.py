"""Echo manifest loading on real files: pydicom's 30-frame cardiac ultrasound cine,
NPY/NPZ arrays and an AVI written with PyAV; caching, errors and patient splits."""

import os
import shutil
from pathlib import Path

import av
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pydicom
import pytest
import torch
import torch.nn.functional as F
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, UltrasoundImageStorage, generate_uid

from fl_ci.data.base import DataError, ImageData
from fl_ci.data.echo import (
    ECHO_VIEWS,
    load_echo_manifest,
    sample_indices,
    split_by_patient,
)

US_CINE = get_testdata_file("examples_ybr_color.dcm")  # 30 frames, YBR_FULL_422, JPEG
US_SAMPLED = [0, 3, 7, 11, 15, 18, 22, 26]  # 15 + (i - 4) * 30 / 8, floored


def write_manifest(root: Path, rows: list[str], header: str = "path,view,patient_id"):
    (root / "manifest.csv").write_text("\n".join([header, *rows]) + "\n")


def reference_gray(size: int) -> torch.Tensor:
    """[30, size, size] from pydicom's own YBR->RGB decoding, BT.601 luma, resize."""
    rgb = pydicom.dcmread(US_CINE).pixel_array.astype(np.float32)
    gray = rgb @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    x = torch.from_numpy(gray)[:, None]
    x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True)
    return x[:, 0].round()


def write_avi(path: Path, values: list[int], size=(32, 48)) -> None:
    """MJPEG AVI whose frame i is uniformly gray values[i]."""
    h, w = size
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mjpeg", rate=10)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuvj420p"
        for v in values:
            img = np.full((h, w, 3), v, dtype=np.uint8)
            frame = av.VideoFrame.from_ndarray(img, format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def write_single_frame_dicom(path: Path, pixels: np.ndarray) -> None:
    """Uncompressed 8-bit MONOCHROME2 ultrasound image, one frame."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UltrasoundImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = UltrasoundImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.PixelData = pixels.astype(np.uint8).tobytes()
    ds.save_as(path, enforce_file_format=True)


@pytest.fixture
def cine_root(tmp_path: Path) -> Path:
    shutil.copy(US_CINE, tmp_path / "us.dcm")
    write_manifest(tmp_path, ["us.dcm,A4C,p1"])
    return tmp_path


def test_sample_indices_spread_uniformly_around_the_middle() -> None:
    assert sample_indices(30, 8).tolist() == US_SAMPLED
    assert sample_indices(3, 4).tolist() == [0, 0, 1, 1]  # floor(1 + (i - 2) * 0.75)


def test_dicom_cine_loads_as_grayscale_frames(cine_root: Path) -> None:
    data = load_echo_manifest(cine_root, image_size=32, frames=8)
    assert isinstance(data, ImageData)
    assert data.frames.shape == (1, 8, 1, 32, 32)
    assert data.frames.dtype == torch.uint8
    assert data.labels.tolist() == [ECHO_VIEWS.index("A4C")]
    assert data.class_names == list(ECHO_VIEWS)


def test_dicom_ybr_frames_match_pydicom_rgb_luma(cine_root: Path) -> None:
    got = load_echo_manifest(cine_root, image_size=64).frames[0, :, 0].float()
    want = reference_gray(64)[US_SAMPLED]
    assert (got - want).abs().mean() < 0.3


def test_middle_sample_is_the_cines_middle_frame(cine_root: Path) -> None:
    middle = load_echo_manifest(cine_root, image_size=64).frames[0, 4, 0].float()
    err = (reference_gray(64)[14:17] - middle).abs().mean((1, 2))
    assert err.argmin().item() == 1  # frame 15, not its neighbours 14 or 16
    assert err[1] < 0.3 < err[[0, 2]].min()


def test_single_frame_dicom_repeats_its_frame(tmp_path: Path) -> None:
    pixels = np.zeros((16, 16), dtype=np.uint8)
    pixels[:, 8:] = 200
    write_single_frame_dicom(tmp_path / "one.dcm", pixels)
    write_manifest(tmp_path, ["one.dcm,PSAX,p1"])
    data = load_echo_manifest(tmp_path, image_size=16, frames=3)
    assert data.frames.shape == (1, 3, 1, 16, 16)
    assert (data.frames[0, :, 0] == torch.from_numpy(pixels)).all()


def test_npy_cine_samples_frames_uniformly(tmp_path: Path) -> None:
    cine = np.arange(16, dtype=np.uint8)[:, None, None] * 10 * np.ones((1, 8, 8))
    np.save(tmp_path / "c.npy", cine.astype(np.uint8))
    write_manifest(tmp_path, ["c.npy,A2C,p1"])
    data = load_echo_manifest(tmp_path, image_size=4, frames=8)
    # L = 16, F = 8: frames 8 + (i - 4) * 2 = 0, 2, ..., 14; uniform frames stay uniform
    assert data.frames[0, :, 0, 0, 0].tolist() == [0, 20, 40, 60, 80, 100, 120, 140]


def test_npy_rgb_cine_becomes_luma(tmp_path: Path) -> None:
    cine = np.zeros((2, 4, 4, 3), dtype=np.uint8)
    cine[..., 0] = 100  # pure red: luma 0.299 * 100 = 29.9
    np.save(tmp_path / "rgb.npy", cine)
    write_manifest(tmp_path, ["rgb.npy,A2C,p1"])
    data = load_echo_manifest(tmp_path, image_size=4, frames=2)
    assert (data.frames == 30).all()


def test_npy_single_image_is_a_cine_of_one_frame(tmp_path: Path) -> None:
    np.save(tmp_path / "still.npy", np.full((4, 4), 77, dtype=np.uint8))
    write_manifest(tmp_path, ["still.npy,A2C,p1"])
    data = load_echo_manifest(tmp_path, image_size=4, frames=2)
    assert (data.frames == 77).all()


def test_npz_prefers_the_frames_key(tmp_path: Path) -> None:
    other = np.full((2, 4, 4), 10, dtype=np.uint8)
    frames = np.full((2, 4, 4), 90, dtype=np.uint8)
    np.savez(tmp_path / "c.npz", aaa=other, frames=frames)
    np.savez(tmp_path / "d.npz", first=other)
    write_manifest(tmp_path, ["c.npz,A3C,p1", "d.npz,A3C,p2"])
    data = load_echo_manifest(tmp_path, image_size=4, frames=2)
    assert data.frames[0].unique().tolist() == [90]
    assert data.frames[1].unique().tolist() == [10]


def test_avi_decodes_every_frame(tmp_path: Path) -> None:
    write_avi(tmp_path / "c.avi", [20 * i for i in range(12)])
    write_manifest(tmp_path, ["c.avi,PLAX,p1"])
    data = load_echo_manifest(tmp_path, image_size=8, frames=8)
    # L = 12: frames 6 + (i - 4) * 1.5 = 0, 1, 3, 4, 6, 7, 9, 10
    want = torch.tensor([0, 20, 60, 80, 120, 140, 180, 200]).float()
    got = data.frames[0, :, 0].float().mean((1, 2))
    assert (got - want).abs().max() <= 3  # JPEG rounding


def test_patient_and_device_strings_map_to_sorted_ids(tmp_path: Path) -> None:
    for name in ("a", "b", "c"):
        np.save(tmp_path / f"{name}.npy", np.zeros((1, 4, 4), dtype=np.uint8))
    write_manifest(
        tmp_path,
        ["a.npy,A2C,zed,GE", "b.npy,a4c,amy,", "c.npy,PSAX,zed,Philips"],
        header="path,view,patient_id,device",
    )
    data = load_echo_manifest(tmp_path, image_size=4, frames=1)
    assert data.patient_names == ["amy", "zed"]
    assert data.patients.tolist() == [1, 0, 1]
    assert data.device_names == ["GE", "Philips"]
    assert data.devices.tolist() == [0, -1, 1]
    assert data.labels.tolist() == [0, 2, 4]


def test_site_and_device_together_name_the_domain(tmp_path: Path) -> None:
    for name in ("a", "b"):
        np.save(tmp_path / f"{name}.npy", np.zeros((1, 4, 4), dtype=np.uint8))
    write_manifest(
        tmp_path,
        ["a.npy,A2C,p1,s1,GE", "b.npy,A2C,p2,s2,GE"],
        header="path,view,patient_id,site,device",
    )
    data = load_echo_manifest(tmp_path, image_size=4, frames=1)
    assert data.device_names == ["s1/GE", "s2/GE"]


def test_mean_std_over_loaded_frames(tmp_path: Path) -> None:
    cine = np.zeros((1, 4, 4), dtype=np.uint8)
    cine[:, :, 2:] = 255
    np.save(tmp_path / "c.npy", cine)
    write_manifest(tmp_path, ["c.npy,A2C,p1"])
    data = load_echo_manifest(tmp_path, image_size=4, frames=1)
    assert data.mean == pytest.approx((0.5,))
    assert data.std == pytest.approx((0.5,))


def test_parquet_manifest(tmp_path: Path) -> None:
    np.save(tmp_path / "c.npy", np.zeros((1, 4, 4), dtype=np.uint8))
    table = pa.table({"path": ["c.npy"], "view": ["PLAX"], "patient_id": [7]})
    pq.write_table(table, tmp_path / "manifest.parquet")
    data = load_echo_manifest(tmp_path, image_size=4, frames=1)
    assert data.labels.tolist() == [3]
    assert data.patient_names == ["7"]


def test_max_per_class_keeps_the_first_rows_of_each_view(tmp_path: Path) -> None:
    for i in range(4):
        np.save(tmp_path / f"{i}.npy", np.full((1, 4, 4), i, dtype=np.uint8))
    write_manifest(
        tmp_path, ["0.npy,A2C,p", "1.npy,A2C,p", "2.npy,A3C,p", "3.npy,A2C,p"]
    )
    data = load_echo_manifest(tmp_path, image_size=4, frames=1, max_per_class=2)
    assert data.frames[:, 0, 0, 0, 0].tolist() == [0, 1, 2]


def test_cache_is_reused_without_decoding(cine_root: Path) -> None:
    first = load_echo_manifest(cine_root, image_size=16)
    entries = list((cine_root / ".fl_ci_cache").iterdir())
    assert [e.suffix for e in entries] == [".npy"]  # one entry, no temp files left
    # garbage with the same size and mtime: only a cache hit can still load it
    src = cine_root / "us.dcm"
    st = src.stat()
    src.write_bytes(b"\0" * st.st_size)
    os.utime(src, ns=(st.st_atime_ns, st.st_mtime_ns))
    second = load_echo_manifest(cine_root, image_size=16)
    assert torch.equal(first.frames, second.frames)


def test_cache_misses_when_the_settings_change(cine_root: Path) -> None:
    load_echo_manifest(cine_root, image_size=16)
    load_echo_manifest(cine_root, image_size=8)
    assert len(list((cine_root / ".fl_ci_cache").glob("*.npy"))) == 2


def test_cache_dir_argument(cine_root: Path, tmp_path_factory) -> None:
    cache = tmp_path_factory.mktemp("cache")
    load_echo_manifest(cine_root, image_size=8, cache_dir=cache)
    assert len(list(cache.glob("*.npy"))) == 1
    assert not (cine_root / ".fl_ci_cache").exists()


def test_no_manifest_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no manifest"):
        load_echo_manifest(tmp_path)


def test_missing_column_is_named(tmp_path: Path) -> None:
    write_manifest(tmp_path, ["a.npy,A2C"], header="path,view")
    with pytest.raises(DataError, match="patient_id"):
        load_echo_manifest(tmp_path)


def test_unknown_view_names_row_and_file(tmp_path: Path) -> None:
    np.save(tmp_path / "a.npy", np.zeros((1, 4, 4), dtype=np.uint8))
    write_manifest(tmp_path, ["a.npy,A2C,p1", "a.npy,A5C,p1"])
    with pytest.raises(DataError, match=r"row 2 \(.*a\.npy\): unknown view 'A5C'"):
        load_echo_manifest(tmp_path)


def test_missing_file_names_row_and_file(tmp_path: Path) -> None:
    write_manifest(tmp_path, ["gone.dcm,A2C,p1"])
    with pytest.raises(DataError, match=r"row 1: file not found: .*gone\.dcm"):
        load_echo_manifest(tmp_path)


def test_corrupt_file_names_row_and_file(tmp_path: Path) -> None:
    np.save(tmp_path / "ok.npy", np.zeros((1, 4, 4), dtype=np.uint8))
    (tmp_path / "bad.dcm").write_bytes(b"this is not a DICOM file")
    write_manifest(tmp_path, ["ok.npy,A2C,p1", "bad.dcm,A2C,p1"])
    with pytest.raises(DataError, match=r"row 2: cannot decode .*bad\.dcm"):
        load_echo_manifest(tmp_path)


def test_manifest_checked_before_anything_is_decoded(tmp_path: Path) -> None:
    np.save(tmp_path / "ok.npy", np.zeros((1, 4, 4), dtype=np.uint8))
    write_manifest(tmp_path, ["ok.npy,A2C,p1", "ok.npy,XYZ,p1"])
    with pytest.raises(DataError, match="row 2"):
        load_echo_manifest(tmp_path)
    assert not (tmp_path / ".fl_ci_cache").exists()


def _toy(patient_views: dict[int, list[int]]) -> ImageData:
    """One 1x1-pixel cine per (patient, view) pair."""
    pairs = [(p, v) for p, vs in patient_views.items() for v in vs]
    n = len(pairs)
    return ImageData(
        frames=torch.zeros(n, 1, 1, 1, 1, dtype=torch.uint8),
        labels=torch.tensor([v for _, v in pairs]),
        patients=torch.tensor([p for p, _ in pairs]),
        devices=torch.zeros(n, dtype=torch.long),
        mean=(0.0,),
        std=(1.0,),
        class_names=list(ECHO_VIEWS),
    )


def test_split_is_deterministic_from_seed() -> None:
    data = _toy({p: [p % 5, (p + 1) % 5] for p in range(40)})
    a = [s.patients.tolist() for s in split_by_patient(data, seed=3)]
    b = [s.patients.tolist() for s in split_by_patient(data, seed=3)]
    c = [s.patients.tolist() for s in split_by_patient(data, seed=4)]
    assert a == b
    assert a != c


def test_split_puts_every_view_in_every_split_when_possible() -> None:
    # three single-view patients per view: a plain 70/10/20 draw often misses some
    data = _toy({p: [p % 5] for p in range(15)})
    for seed in range(10):
        for part in split_by_patient(data, seed=seed):
            assert sorted(part.labels.unique().tolist()) == [0, 1, 2, 3, 4]


def test_split_unknown_patients_are_one_group_each() -> None:
    data = _toy({p: [0] for p in range(20)})
    data.patients[:] = -1
    train, val, test = split_by_patient(data, fractions=(0.5, 0.0, 0.5))
    assert (len(train), len(val), len(test)) == (10, 0, 10)


def test_split_rejects_bad_fractions() -> None:
    with pytest.raises(ValueError, match="fractions"):
        split_by_patient(_toy({0: [0]}), fractions=(0.5, 0.5, 0.5))


def test_site_mode_skips_a_corrupt_cine_and_names_it(tmp_path: Path) -> None:
    np.save(tmp_path / "ok.npy", np.zeros((1, 4, 4), dtype=np.uint8))
    (tmp_path / "bad.dcm").write_bytes(b"this is not a DICOM file")
    write_manifest(tmp_path, ["ok.npy,A2C,p1", "bad.dcm,A3C,p2"])
    data = load_echo_manifest(tmp_path, image_size=4, frames=1, skip_bad=True)
    assert data.labels.tolist() == [0] and data.patient_names == ["p1"]
    assert len(data.skipped) == 1 and "row 2: cannot decode" in data.skipped[0]


def test_site_mode_skips_unreadable_manifest_rows_and_names_them(
    tmp_path: Path,
) -> None:
    np.save(tmp_path / "ok.npy", np.zeros((1, 4, 4), dtype=np.uint8))
    write_manifest(
        tmp_path, ["ok.npy,A2C,p1", "ok.npy,XYZ,p1", "gone.npy,A2C,p2", "ok.npy,A4C,p3"]
    )
    data = load_echo_manifest(tmp_path, image_size=4, frames=1, skip_bad=True)
    assert data.labels.tolist() == [0, 2]
    assert len(data.skipped) == 2
    assert "row 2 " in data.skipped[0] and "unknown view 'XYZ'" in data.skipped[0]
    assert "row 3: file not found" in data.skipped[1]


def test_site_mode_with_no_usable_row_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "bad.dcm").write_bytes(b"not DICOM")
    write_manifest(tmp_path, ["bad.dcm,A2C,p1"])
    with pytest.raises(DataError, match="no usable row"):
        load_echo_manifest(tmp_path, image_size=4, frames=1, skip_bad=True)
