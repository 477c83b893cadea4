"""`fl-ci bundle` and `fl-ci predict` end to end: a tiny echo-synth run is bundled,
its test split written as NPZ cines with a manifest, and predicting on them with the
middle frame gives the run's own test accuracy; pydicom's real ultrasound cines and
still images are scored; unreadable files are skipped and listed."""

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import av
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from pydicom.data import get_testdata_file

from fl_ci.bundle import MODEL_NAME, BundleError, bundle_from_run, load_bundle
from fl_ci.cli import main
from fl_ci.config import Config
from fl_ci.data.base import batches
from fl_ci.data.echo import _decode
from fl_ci.experiment import Experiment
from fl_ci.predict import Item, predict, read_item

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

REPO = Path(__file__).resolve().parents[1]
US_CINE = get_testdata_file("examples_ybr_color.dcm")  # 30 frames, YBR_FULL_422, JPEG
US_RGB = get_testdata_file("examples_rgb_color.dcm")  # one frame, RGB
US_PALETTE = get_testdata_file("examples_palette.dcm")  # one frame, PALETTE COLOR
US_SAMPLED_8 = "0 3 7 11 15 18 22 26"  # tests/test_echo.py: 8 of 30 frames


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def run_dir(tiny_echo_paper_run: Path) -> Path:
    """A finished single-machine run (seconds): summary.json and checkpoint.pt;
    shared with other modules, so tests copy it before changing it."""
    return tiny_echo_paper_run


@pytest.fixture(scope="module")
def summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


@pytest.fixture(scope="module")
def experiment(summary: dict) -> Experiment:
    return Experiment.from_config(Config.from_flat(summary["config"]))


@pytest.fixture(scope="module")
def bundle_dir(run_dir: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bundled") / "run"
    shutil.copytree(run_dir, out)
    bundle_from_run(out)
    return out


@pytest.fixture(scope="module")
def test_split(experiment: Experiment, tmp_path_factory) -> Path:
    """The run's test split as NPZ cines of uint8 frames + manifest.csv."""
    root = tmp_path_factory.mktemp("echo-test")
    test = experiment.splits.test
    rows = []
    for i in range(len(test)):
        name = f"cines/cine{i:03d}.npz"
        (root / name).parent.mkdir(exist_ok=True)
        np.savez(root / name, frames=test.frames[i, :, 0].numpy())
        view = experiment.class_names[int(test.labels[i])]
        rows.append([name, view, f"p{int(test.patients[i])}"])
    with open(root / "manifest.csv", "w", newline="") as f:
        csv.writer(f).writerows([["path", "view", "patient_id"], *rows])
    return root


@pytest.fixture
def us_folder(tmp_path: Path) -> Path:
    """pydicom's real ultrasound files (one without suffix, one in a subfolder), a
    text file that is no input and a damaged DICOM."""
    root = tmp_path / "us"
    (root / "more").mkdir(parents=True)
    shutil.copy(US_CINE, root / "cine-no-suffix")
    shutil.copy(US_RGB, root / "rgb.dcm")
    shutil.copy(US_PALETTE, root / "more" / "palette.dcm")
    (root / "notes.txt").write_text("not an input")
    (root / "broken.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"truncated")
    return root


# ------------------------------------------------------------------ bundle a run


def test_a_run_is_bundled_with_its_description_and_normalisation(
    bundle_dir: Path, experiment: Experiment
) -> None:
    bundle = load_bundle(bundle_dir)
    assert bundle.class_names == experiment.class_names
    assert bundle.info["classes_per_task"] == [len(t) for t in experiment.tasks]
    assert bundle.mean == experiment.splits.train.mean
    assert bundle.std == experiment.splits.train.std
    assert (bundle.image_size, bundle.frames, bundle.in_channels) == (32, 2, 1)
    assert "recomputed" in bundle.info["input"]["normalisation_source"]


def test_a_run_without_model_pt_is_bundled_from_its_final_checkpoint(
    run_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    shutil.copytree(run_dir, out)
    (out / MODEL_NAME).unlink(missing_ok=True)  # as single-machine runs leave it
    bundle_from_run(out, mean=(0.2,), std=(0.1,))
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    saved = torch.load(out / MODEL_NAME, weights_only=True)
    assert saved.keys() == ckpt["model"].keys()
    assert all(torch.equal(saved[k], ckpt["model"][k]) for k in saved)


def test_given_normalisation_is_used_and_said(run_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    shutil.copytree(run_dir, out)
    rc = main(["bundle", str(out), "--mean", "0.25", "--std", "0.5"])
    assert rc == 0
    bundle = load_bundle(out)
    assert (bundle.mean, bundle.std) == ((0.25,), (0.5,))
    assert bundle.info["input"]["normalisation_source"] == "given when bundling the run"


def test_an_unfinished_run_is_not_bundled(run_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    shutil.copytree(run_dir, out)
    summary = json.loads((out / "summary.json").read_text())
    summary["tasks_completed"] = 2
    (out / "summary.json").write_text(json.dumps(summary))
    (out / "bundle.json").unlink()  # as a run made before runs wrote their bundle
    with pytest.raises(BundleError, match="completed 2 of 4 tasks"):
        bundle_from_run(out)
    assert not (out / "bundle.json").exists()


# ------------------------------------------------------------------ predict


def test_middle_frame_predictions_reproduce_the_runs_test_accuracy(
    bundle_dir: Path,
    test_split: Path,
    summary: dict,
    experiment: Experiment,
    tmp_path: Path,
    capsys,
) -> None:
    out = tmp_path / "predictions.csv"
    argv = ["predict", str(bundle_dir), str(test_split), "--out", str(out)]
    assert main([*argv, "--frames", "1", "--quiet"]) == 0
    expected = summary["accuracy_all_classes"][-1]
    assert f"accuracy {expected:.2f}%" in capsys.readouterr().out
    rows = read_csv(out)
    test = experiment.splits.test
    assert len(rows) == len(test)
    assert all(r["frames"] == "1" for r in rows)  # 2 frames: the middle is index 1
    # item by item, the run's own evaluation (its batches: the middle frame) agrees
    model = load_bundle(bundle_dir).model
    with torch.inference_mode():
        own = torch.cat(
            [model(x).argmax(1) for x, _ in batches(test, 256, train=False)]
        )
    assert [r["predicted"] for r in rows] == [experiment.class_names[p] for p in own]
    result = predict(bundle_dir, test_split, out, frames=1, progress=False)
    assert result.labelled == len(test)
    assert result.accuracy == pytest.approx(expected, abs=1e-4)


def test_cines_are_scored_over_all_sampled_frames_by_default(
    bundle_dir: Path, test_split: Path, tmp_path: Path
) -> None:
    out = tmp_path / "predictions.csv"
    result = predict(bundle_dir, test_split, out, progress=False, batch_size=3)
    rows = read_csv(out)
    assert result.written == len(rows)
    bundle = load_bundle(bundle_dir)
    names = bundle.class_names
    first = rows[0]
    assert first["frames"] == "0 1"
    frames = np.load(test_split / first["path"])["frames"]
    x = bundle.normalize(torch.from_numpy(frames)[:, None])
    with torch.inference_mode():
        want = torch.softmax(bundle.model(x), dim=1).mean(0)
    got = torch.tensor([float(first[f"prob_{c}"]) for c in names])
    assert torch.allclose(got, want, atol=1e-6)
    assert first["predicted"] == names[int(want.argmax())]
    assert first.keys() == {
        "path",
        "patient_id",
        "view",
        "predicted",
        *(f"prob_{c}" for c in names),
        "frames",
        "correct",
    }


def test_pydicom_ultrasound_cines_are_scored_and_bad_files_listed(
    bundle_dir: Path, us_folder: Path, tmp_path: Path, capsys
) -> None:
    out = tmp_path / "us.csv"
    argv = ["predict", str(bundle_dir), str(us_folder), "--out", str(out)]
    assert main([*argv, "--frames", "8"]) == 0
    rows = {r["path"]: r for r in read_csv(out)}
    assert sorted(rows) == ["cine-no-suffix", "more/palette.dcm", "rgb.dcm"]
    assert rows["cine-no-suffix"]["frames"] == US_SAMPLED_8
    assert rows["rgb.dcm"]["frames"] == "0"  # one frame, scored once
    names = load_bundle(bundle_dir).class_names
    for r in rows.values():
        probs = [float(r[f"prob_{c}"]) for c in names]
        assert sum(probs) == pytest.approx(1.0, abs=1e-5)
        assert r["predicted"] == names[int(np.argmax(probs))]
        assert "view" not in r and "correct" not in r
    skipped = read_csv(tmp_path / "us.skipped.csv")
    assert [s["path"] for s in skipped] == ["broken.dcm"]
    assert skipped[0]["reason"]
    printed = capsys.readouterr()
    assert "broken.dcm" in printed.err
    assert "1 file(s) neither cine nor image" in printed.out  # notes.txt
    assert "accuracy" not in printed.out


def test_cine_frames_are_decoded_as_the_run_decodes_them(tmp_path: Path) -> None:
    arr, idx = read_item(Item(Path(US_CINE), "us"), frames=8, image_size=48)
    assert " ".join(map(str, idx)) == US_SAMPLED_8
    assert np.array_equal(arr[:, 0], _decode(Path(US_CINE), 8, 48))


def test_videos_are_scored_on_frames_counted_by_decoding(
    bundle_dir: Path, tmp_path: Path
) -> None:
    root = tmp_path / "videos"
    root.mkdir()
    with av.open(str(root / "ten.avi"), "w") as container:  # 10 gray frames
        stream = container.add_stream("mjpeg", rate=10)
        stream.width, stream.height, stream.pix_fmt = 48, 32, "yuvj420p"
        for v in range(0, 250, 25):
            img = np.full((32, 48, 3), v, dtype=np.uint8)
            for packet in stream.encode(
                av.VideoFrame.from_ndarray(img, format="rgb24")
            ):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    predict(bundle_dir, root, tmp_path / "v.csv", frames=4, progress=False)
    (row,) = read_csv(tmp_path / "v.csv")
    assert row["frames"] == "0 2 5 7"  # floor(5 + (i - 2) * 2.5)


def test_still_images_are_read_like_a_one_frame_cine(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (40, 56), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "a.png")
    np.save(tmp_path / "a.npy", pixels)
    rgb = np.stack([pixels, pixels // 2, 255 - pixels], axis=-1)
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    np.save(tmp_path / "rgb.npy", rgb[None])
    for name in ("a", "rgb"):
        image, idx = read_item(Item(tmp_path / f"{name}.png", name), 8, 32)
        assert idx == [0] and image.shape == (1, 1, 32, 32)
        assert np.array_equal(image[0, 0], _decode(tmp_path / f"{name}.npy", 1, 32)[0])


def test_an_image_folder_is_scored_like_the_same_pixels_as_cines(
    bundle_dir: Path, test_split: Path, experiment: Experiment, tmp_path: Path
) -> None:
    images = tmp_path / "images"
    images.mkdir()
    test = experiment.splits.test
    for i in range(4):  # the middle frame of each cine as a PNG of the same size
        Image.fromarray(test.frames[i, 1, 0].numpy()).save(images / f"cine{i:03d}.png")
    predict(bundle_dir, images, tmp_path / "png.csv", progress=False)
    predict(bundle_dir, test_split, tmp_path / "npz.csv", frames=1, progress=False)
    png = read_csv(tmp_path / "png.csv")
    npz = read_csv(tmp_path / "npz.csv")[:4]
    for a, b in zip(png, npz, strict=True):
        assert Path(a["path"]).stem == Path(b["path"]).stem
        probs = [k for k in a if k.startswith("prob_")]
        assert probs and probs == [k for k in b if k.startswith("prob_")]
        # the same pixels through another batch may round the 6th digit differently
        for k in probs:
            assert float(a[k]) == pytest.approx(float(b[k]), abs=2e-6), k


def test_bad_manifest_rows_are_skipped_and_the_rest_scored(
    bundle_dir: Path, test_split: Path, tmp_path: Path, capsys
) -> None:
    root = tmp_path / "mixed"
    shutil.copytree(test_split, root)
    (root / "bad.npz").write_bytes(b"not an npz")
    (root / "manifest.csv").unlink()
    table = pa.table(
        {
            "path": ["cines/cine000.npz", "gone.npz", "bad.npz", "cines/cine001.npz"],
            "view": ["a2c", "A2C", "A3C", "A5C"],  # any case; A5C is not a model class
        }
    )
    pq.write_table(table, root / "manifest.parquet")
    out = tmp_path / "p.csv"
    assert main(["predict", str(bundle_dir), str(root), "--out", str(out)]) == 0
    rows = read_csv(out)
    assert [r["path"] for r in rows] == ["cines/cine000.npz", "cines/cine001.npz"]
    assert rows[1]["correct"] == ""  # A5C: no verdict
    skipped = {s["path"]: s["reason"] for s in read_csv(tmp_path / "p.skipped.csv")}
    assert sorted(skipped) == ["bad.npz", "gone.npz"]
    assert "row 2: file not found" in skipped["gone.npz"]
    printed = capsys.readouterr()
    assert "2 skipped" in printed.err
    assert "A5C (1)" in printed.out
    assert "/1 labelled)" in printed.out


def test_bad_arguments_are_errors_not_tracebacks(
    bundle_dir: Path, test_split: Path, tmp_path: Path, capsys
) -> None:
    argv = ["predict", str(bundle_dir), str(test_split), "--out", str(tmp_path / "p")]
    assert main([*argv, "--frames", "0"]) == 2
    assert "frames >= 1" in capsys.readouterr().err
    assert main(["predict", str(tmp_path), str(test_split)]) == 2
    assert "bundle.json not found" in capsys.readouterr().err
    assert main(["predict", str(bundle_dir), str(tmp_path / "nowhere")]) == 2
    assert "not found" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main([*argv, "--device", "cuda"]) == 2
        assert "no CUDA device" in capsys.readouterr().err


def test_the_command_runs_as_a_program(
    bundle_dir: Path, test_split: Path, summary: dict, tmp_path: Path
) -> None:
    out = tmp_path / "p.csv"
    done = subprocess.run(
        [sys.executable, "-m", "fl_ci.cli", "predict", str(bundle_dir)]
        + [str(test_split), "--out", str(out), "--frames", "1"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    expected = summary["accuracy_all_classes"][-1]
    assert f"accuracy {expected:.2f}%" in done.stdout
    assert "predict: 100%" in done.stderr  # the progress bar
