"""Privacy audit of impressions (fl_ci/audit.py) and its command (simulations/audit.py).

Real data: CIFAR-100 images from the shared Parquet copy and procedural echo cines.
"""

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from fl_ci.audit import (
    SSIM_K1,
    SSIM_K2,
    audit_impressions,
    class_mean_images,
    gaussian_window,
    nearest_real,
    real_images,
    ssim,
    ssim_window,
)
from fl_ci.config import Config
from fl_ci.data.cifar100 import load_cifar100
from fl_ci.data.echo_synth import make_echo_synth
from fl_ci.experiment import Experiment
from fl_ci.results import to_jsonable
from simulations.audit import main as audit_main
from simulations.local import run_local

SHARED = Path(__file__).resolve().parents[1].parent / "shared/data/cifar100"
CLASSES = 10  # CIFAR classes audited
TRAIN, HELD = 80, 20  # images per class: training reference, held out
TINY_RUN = {
    "dataset": "echo-synth",
    "method": "class_impression",
    "tasks": 2,
    "init_classes": 3,
    "local_epochs": 1,
    "batch_size": 16,
    "device": "cpu",
    "data": {"patients": 6, "devices": 2, "image_size": 32, "frames": 2},
    "synthesis": {"iterations": 5, "per_class": 4, "min_mean_count": 1},
}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def cifar(tmp_path_factory):
    """(train x, train y, held-out x, held-out y, mean, std) of CIFAR classes 0..9:
    the first TRAIN images of each class train, the next HELD are held out."""
    if not (SHARED / "manifest.json").is_file():
        pytest.skip(f"real CIFAR-100 Parquet copy not found at {SHARED}")
    train, _ = load_cifar100(
        SHARED, max_per_class=TRAIN + HELD, cache_dir=tmp_path_factory.mktemp("cache")
    )
    data = train.of_classes(list(range(CLASSES)))
    x, y = real_images(data)  # [1000, 3, 32, 32], classes interleaved
    held = torch.zeros(len(y), dtype=torch.bool)
    for c in range(CLASSES):
        held[(y == c).nonzero().squeeze(1)[TRAIN:]] = True
    return x[~held], y[~held], x[held], y[held], data.mean, data.std


def pixels(x, mean, std):
    m, s = torch.tensor(mean).view(1, -1, 1, 1), torch.tensor(std).view(1, -1, 1, 1)
    return (x * s + m).clamp(0, 1)


# ----- SSIM --------------------------------------------------------------------------
def direct_ssim(
    a: np.ndarray, b: np.ndarray, size: int = 11, sigma: float = 1.5
) -> float:
    """SSIM of two [C, H, W] images by an explicit loop over size x size windows."""
    g = gaussian_window(size, sigma).double().numpy()
    w2 = np.outer(g, g)
    c1, c2 = SSIM_K1**2, SSIM_K2**2
    values = []
    for ch in range(a.shape[0]):
        for i in range(a.shape[1] - size + 1):
            for j in range(a.shape[2] - size + 1):
                pa = a[ch, i : i + size, j : j + size]
                pb = b[ch, i : i + size, j : j + size]
                ma, mb = (w2 * pa).sum(), (w2 * pb).sum()
                va = (w2 * (pa - ma) ** 2).sum()
                vb = (w2 * (pb - mb) ** 2).sum()
                cov = (w2 * (pa - ma) * (pb - mb)).sum()
                values.append(
                    (2 * ma * mb + c1)
                    * (2 * cov + c2)
                    / ((ma**2 + mb**2 + c1) * (va + vb + c2))
                )
    return float(np.mean(values))


def test_ssim_matches_a_direct_window_loop(cifar):
    x, y, *_, mean, std = cifar
    p = pixels(x, mean, std)[:, :, :16, :16]  # crops keep the loop quick
    a, b = p[:3], p[3:6]
    got = ssim(a, b)
    want = [direct_ssim(a[i].double().numpy(), b[i].double().numpy()) for i in range(3)]
    assert got.tolist() == pytest.approx(want, abs=1e-5)


def test_ssim_of_identical_images_is_one_and_symmetric(cifar):
    x, _, h, *_, mean, std = cifar
    a, b = pixels(x[:8], mean, std), pixels(h[:8], mean, std)
    assert torch.equal(ssim(a, a), torch.ones(8))
    assert torch.allclose(ssim(a, b), ssim(b, a), atol=1e-6)
    assert (ssim(a, b) < 0.99).all()
    # noise lowers SSIM, more noise lowers it more
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(a.shape, generator=g)
    light, heavy = ssim(a, (a + 0.02 * noise).clamp(0, 1)), ssim(a, a + 0.2 * noise)
    assert (light < 1).all() and (heavy < light).all()


def test_ssim_of_a_constant_shift_is_the_luminance_term(cifar):
    # constant images c and c + d: variances and covariance vanish, so SSIM is
    # (2 c (c + d) + C1) / (c^2 + (c + d)^2 + C1) exactly
    c, d = torch.tensor([0.2, 0.5, 0.7]), torch.tensor([0.1, 0.3, -0.2])
    a = c.view(3, 1, 1, 1).expand(3, 1, 16, 16)
    b = (c + d).view(3, 1, 1, 1).expand(3, 1, 16, 16)
    c1 = SSIM_K1**2
    want = (2 * c * (c + d) + c1) / (c**2 + (c + d) ** 2 + c1)
    assert torch.allclose(ssim(a, b), want, atol=1e-6)
    assert ssim(a, b)[0] == pytest.approx(0.1201 / 0.1301, abs=1e-6)  # by hand
    # a textured image shifted by d keeps its structure: SSIM is the mean luminance
    # term over windows, below 1, and the same whichever image is shifted
    x, *_, mean, std = cifar
    p = pixels(x[:4], mean, std) * 0.7
    assert (ssim(p, p + 0.3) < 1).all()
    assert torch.allclose(ssim(p, p + 0.3), ssim(p + 0.3, p), atol=1e-6)
    assert (ssim(p, p + 0.3) < ssim(p, p + 0.1)).all()


def test_ssim_of_small_images_and_bad_shapes():
    # echo cines at 8 px: a 7 px window whose sigma, 6/7, scikit-image's 3.5-sigma
    # truncation cuts at 7 px (the code before scikit-image cut sigma 1.5 at 7 px);
    # identical images still score 1
    data = make_echo_synth(patients=1, devices=1, frames=1, image_size=8)
    x = data.frames[:, 0].float() / 255  # [5, 1, 8, 8]
    assert ssim_window(8, 8) == (7, pytest.approx(6 / 7))
    assert torch.equal(ssim(x, x), torch.ones(5))
    got = ssim(x, x.roll(1, 0))  # each view against another
    want = [
        direct_ssim(x[i].double().numpy(), x[i - 1].double().numpy(), 7, 6 / 7)
        for i in range(5)
    ]
    assert got.tolist() == pytest.approx(want, abs=1e-5) and (got < 1).all()
    with pytest.raises(ValueError, match="batches of one shape"):
        ssim(x, x[:2])
    with pytest.raises(ValueError, match="too small"):
        ssim(x[..., :2, :2], x[..., :2, :2])


# Today's SSIM before scikit-image: the hand-written float32 `ssim` this module had
# (same window, constants and valid region), run on the `cifar` fixture's pixels at
# commit 4b80128, to 6 decimals. scikit-image computes in float64; the two differ by
# < 1e-7 on these images (7e-8 over all 28 pairs of 8 CIFAR images), so 1e-6 holds
# the rounding.
TODAY_TRAIN_VS_HELD = [0.230984, 0.061432, 0.154446, 5.9e-05]
TODAY_TRAIN_VS_TRAIN = [0.242118, 0.122729, -0.03135, -0.046876]


def test_ssim_from_scikit_image_keeps_the_hand_written_values(cifar):
    x, _, h, *_, mean, std = cifar
    a, b, c = (
        pixels(x[:4], mean, std),
        pixels(h[:4], mean, std),
        pixels(x[8:12], mean, std),
    )
    assert ssim(a, b).tolist() == pytest.approx(TODAY_TRAIN_VS_HELD, abs=1e-6)
    assert ssim(a, c).tolist() == pytest.approx(TODAY_TRAIN_VS_TRAIN, abs=1e-6)


def test_search_scores_are_the_library_ssim(cifar):
    # the hand-written batched scorer behind `nearest_real` against scikit-image, on
    # every held-out image's exhaustive nearest training image (200 real pairs)
    x, y, h, hy, mean, std = cifar
    found = nearest_real(h, hy, x, y, mean=mean, std=std, top_k=0)
    library = ssim(pixels(h, mean, std), pixels(x[found.index], mean, std))
    assert (library - found.value).abs().max() < 1e-5


# Today's audit figures (same commit, same fixture): the search is still the
# hand-written scorer, SSIM(start, nearest) now comes from scikit-image.
TODAY_AUDIT = {
    "held_out_ssim_median": 0.223339,
    "held_out_ssim_p99": 0.653085,
    "impression_ssim_median": 0.166985,
    "leakage_median": -0.448219,
    "leakage_max": -0.121063,
}
TODAY_CLASS_MEAN_SSIM = [
    0.551752, 0.442156, 0.299066, 0.334731, 0.395669,
    0.319588, 0.416294, 0.414937, 0.3307, 0.462762,
]  # fmt: skip


def test_audit_figures_are_todays(cifar):
    x, y, h, hy, mean, std = cifar
    images, labels = fake_impressions(x, y, per_class=10, noise=0.3)
    r = audit_impressions(images, labels, x, y, h, hy, mean=mean, std=std)
    assert {k: getattr(r, k) for k in TODAY_AUDIT} == pytest.approx(
        TODAY_AUDIT, abs=1e-5
    )
    assert list(r.class_mean_ssim.values()) == pytest.approx(
        TODAY_CLASS_MEAN_SSIM, abs=1e-5
    )


# ----- nearest real image ------------------------------------------------------------
def test_nearest_real_finds_planted_copies_within_their_class(cifar):
    x, y, *_, mean, std = cifar
    rows = torch.stack([(y == c).nonzero()[3, 0] for c in range(4)])  # classes 0..3
    queries = x[rows] + 0.01 * torch.randn(4, 3, 32, 32)
    by_l2 = nearest_real(queries, y[rows], x, y, "l2", mean=mean, std=std)
    by_ssim = nearest_real(queries, y[rows], x, y, "ssim", mean=mean, std=std)
    assert torch.equal(by_l2.index, rows) and torch.equal(by_ssim.index, rows)
    assert (by_l2.value < 0.01 * math.sqrt(3 * 32 * 32) * 1.2).all()
    assert (by_ssim.value > 0.99).all()
    # labelled as another class, the copy is not found: only same-class images count
    other = nearest_real(queries, (y[rows] + 1) % CLASSES, x, y, mean=mean, std=std)
    assert not (other.index == rows).any()
    assert (y[other.index] == (y[rows] + 1) % CLASSES).all()
    # a class without real images gets -1 and NaN
    none = nearest_real(queries[:1], torch.tensor([99]), x, y, mean=mean, std=std)
    assert none.index.item() == -1 and math.isnan(none.value.item())


def test_top_k_prefilter_is_a_lower_bound_of_the_exhaustive_search(cifar):
    x, y, h, hy, mean, std = cifar
    full = nearest_real(h, hy, x, y, mean=mean, std=std, top_k=0)
    few = nearest_real(h, hy, x, y, mean=mean, std=std, top_k=3)
    wide = nearest_real(h, hy, x, y, mean=mean, std=std, top_k=TRAIN // 2)  # all
    assert (few.value <= full.value + 1e-6).all()
    assert torch.equal(wide.index, full.index)
    # SSIM of each reported pair is what `ssim` gives for it
    again = ssim(pixels(h, mean, std), pixels(x[full.index], mean, std))
    assert torch.allclose(again, full.value, atol=1e-5)
    # the exhaustive nearest is the best over all same-class images
    i = 0
    same = (y == hy[i]).nonzero().squeeze(1)
    scores = ssim(
        pixels(h[i : i + 1].expand(len(same), -1, -1, -1), mean, std),
        pixels(x[same], mean, std),
    )
    assert full.value[i].item() == pytest.approx(scores.max().item(), abs=1e-5)


# ----- the audit ---------------------------------------------------------------------
def fake_impressions(x, y, per_class: int, noise: float, seed: int = 0):
    """Class mean + Gaussian noise, as synthesis starts (normalised space)."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(CLASSES).repeat(per_class)
    means = class_mean_images(x, y, CLASSES)
    return means[labels] + noise * torch.randn(len(labels), 3, 32, 32, generator=g), (
        labels
    )


def test_audit_flags_a_planted_near_copy(cifar):
    x, y, h, hy, mean, std = cifar
    images, labels = fake_impressions(x, y, per_class=10, noise=0.3)
    n = len(labels)
    planted = torch.tensor([0, 15])  # two impressions become training copies
    source = torch.stack([(y == labels[i]).nonzero()[7, 0] for i in planted])
    images[planted] = x[source] + 0.01 * torch.randn(2, 3, 32, 32)
    r = audit_impressions(images, labels, x, y, h, hy, mean=mean, std=std)
    assert torch.equal(r.nearest_ssim.index[planted], source)
    assert (r.nearest_ssim.value[planted] > r.held_out_ssim_p99).all()
    assert r.share_above_held_out_p99 == pytest.approx(2 / n)
    assert (r.leakage[planted] > 1).all() and r.leakage_above_1 == 2
    assert not r.passed
    assert not r.goals["share_above_held_out_p99 <= 1%"]
    # the noisy class means are not flagged, and noise only moves them away
    rest = torch.ones(n, dtype=torch.bool)
    rest[planted] = False
    assert (r.nearest_ssim.value[rest] < r.held_out_ssim_p99).all()
    assert (r.leakage[rest] < 0).all() and r.leakage_median < 0
    # JSON form: plain values, per-image arrays on request
    d = r.to_dict(per_image=True)
    json.dumps(to_jsonable(d), allow_nan=False)
    assert len(d["per_image"]["leakage"]) == n and d["passed"] is False
    assert {c["class"] for c in d["per_class"]} == set(range(CLASSES))
    assert not r.warnings  # 200 held-out images: the baseline is not flagged as rough


def test_held_out_images_audited_as_impressions_sit_at_their_own_baseline(cifar):
    # by the definition of the 99th percentile, 2 of 200 held-out images lie above it
    x, y, h, hy, mean, std = cifar
    r = audit_impressions(h, hy, x, y, h, hy, mean=mean, std=std)
    assert r.share_above_held_out_p99 == pytest.approx(2 / len(hy))
    assert r.impression_ssim_median == pytest.approx(r.held_out_ssim_median)


def test_audit_of_the_class_mean_itself_is_within_baseline(cifar):
    x, y, h, hy, mean, std = cifar
    images, labels = fake_impressions(x, y, per_class=1, noise=0.0)
    r = audit_impressions(images, labels, x, y, h, hy, mean=mean, std=std)
    # the start compared with itself: zero leakage, by definition
    assert torch.allclose(r.leakage, torch.zeros(CLASSES), atol=1e-6)
    assert r.share_above_held_out_p99 == 0.0 and r.passed
    # the class mean is no copy of one image (below the held-out 99th percentile),
    # yet closer to its nearest image than a typical unseen image (as the doc found)
    means = torch.tensor(list(r.class_mean_ssim.values()))
    assert (means < r.held_out_ssim_p99).all()
    assert means.median() > r.held_out_ssim_median
    assert torch.allclose(means, r.nearest_ssim.value)
    # auditing some classes only: indices still name rows of the full `real`
    part = labels >= 5
    sub = audit_impressions(images[part], labels[part], x, y, h, hy, mean=mean, std=std)
    assert sub.classes == [5, 6, 7, 8, 9]
    assert torch.equal(y[sub.nearest_ssim.index], labels[part])
    assert torch.equal(sub.nearest_ssim.index, r.nearest_ssim.index[part])
    assert torch.equal(y[sub.nearest_l2.index], labels[part])
    # a small held-out set is reported as a rough baseline
    few = hy < 2
    small = audit_impressions(images, labels, x, y, h[few], hy[few], mean=mean, std=std)
    assert any(f"rests on {2 * HELD} images" in w for w in small.warnings)


def test_audit_in_feature_space_with_a_model(cifar):
    x, y, h, hy, mean, std = cifar
    images, labels = fake_impressions(x, y, per_class=5, noise=0.3)
    images[0] = x[(y == labels[0]).nonzero()[2, 0]]  # an exact copy: distance 0
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, stride=2), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten()
    ).train()
    r = audit_impressions(images, labels, x, y, h, hy, mean=mean, std=std, model=model)
    f = r.features
    assert f is not None and model.training  # mode restored
    assert f["impression_distance_min"] == pytest.approx(0.0, abs=1e-5)
    assert f["share_below_held_out_p01"] >= 1 / len(labels)
    assert 0 <= f["held_out_distance_p01"] <= f["held_out_distance_median"] <= 2


# ----- the command --------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    run_local(Config.from_dict(TINY_RUN), out, progress=False)
    return out


def test_cli_writes_audit_files(tiny_run, capsys):
    assert audit_main([str(tiny_run)]) == 0
    text = capsys.readouterr().out
    assert "share above held-out p99" in text
    report = json.loads((tiny_run / "audit.json").read_text())
    task = report["tasks"]["1"]
    assert task["impressions"] == 12 and task["classes"] == [0, 1, 2]
    assert task["file"].startswith("impressions-task1-")
    assert 0 <= task["held_out_ssim_median"] <= 1
    # the checkpointed teacher synthesized these impressions: its features are used
    has_teacher = (tiny_run / "checkpoint.pt").exists()
    assert (task["features"] is not None) == has_teacher
    assert "## Task 1" in (tiny_run / "audit.md").read_text()
    assert (tiny_run / "impressions_task1.png").stat().st_size > 5000


def test_cli_flags_a_planted_copy_in_a_federated_store(tiny_run, capsys):
    run = tiny_run.parent / "federated-copy"
    shutil.copytree(tiny_run, run)
    store = run / "sites" / "site-1"
    shutil.move(run / "sites" / "site-0", store)
    (path,) = store.glob("impressions-task1-*.pt")
    cached = torch.load(path, weights_only=True)
    exp = Experiment.from_config(Config.from_dict(TINY_RUN))
    real, real_labels = real_images(exp.splits.train)
    row = int((real_labels == cached["labels"][0]).nonzero()[0, 0])
    cached["images"][0] = real[row]
    torch.save(cached, path)
    assert audit_main([str(run), "--site", "1", "--no-features"]) == 0
    task = json.loads((run / "audit.json").read_text())["tasks"]["1"]
    assert task["share_above_held_out_p99"] == pytest.approx(1 / 12)
    assert task["leakage_above_1"] >= 1 and task["passed"] is False
    assert task["features"] is None
    assert "goals NOT all met" in capsys.readouterr().out


def test_cli_errors_name_what_is_missing(tiny_run, tmp_path, capsys):
    assert audit_main([str(tmp_path)]) == 2
    assert "summary.json" in capsys.readouterr().err
    assert audit_main([str(tiny_run), "--task", "5"]) == 2
    assert "no cached impressions of task 5" in capsys.readouterr().err
    assert audit_main([str(tiny_run), "--site", "3"]) == 2
    assert "site 3" in capsys.readouterr().err
