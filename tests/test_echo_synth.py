"""The procedural echo dataset: determinism, layout, motion, device shift, splits."""

import pytest
import torch

from fl_ci.data.echo import ECHO_VIEWS, split_by_patient
from fl_ci.data.echo_synth import make_echo_synth

SMALL = dict(patients=3, devices=3, frames=4, image_size=24)


@pytest.fixture(scope="module")
def small():
    return make_echo_synth(**SMALL, seed=0)


def test_same_seed_gives_the_same_bytes(small) -> None:
    again = make_echo_synth(**SMALL, seed=0)
    assert torch.equal(small.frames, again.frames)
    assert small.mean == again.mean and small.std == again.std


def test_different_seed_gives_different_frames(small) -> None:
    other = make_echo_synth(**SMALL, seed=1)
    assert not torch.equal(small.frames, other.frames)


def test_shapes_and_dtypes(small) -> None:
    n = 3 * 3 * 5  # patients x devices x views
    assert small.frames.shape == (n, 4, 1, 24, 24)
    assert small.frames.dtype == torch.uint8
    for t in (small.labels, small.patients, small.devices):
        assert t.dtype == torch.int64 and t.shape == (n,)
    assert small.class_names == list(ECHO_VIEWS)
    assert len(small.mean) == len(small.std) == 1


def test_mean_std_come_from_the_render(small) -> None:
    x = small.frames.double() / 255
    assert small.mean[0] == pytest.approx(x.mean().item())
    assert small.std[0] == pytest.approx(x.std(unbiased=False).item())


def test_every_patient_has_each_view_cines_per_view_times() -> None:
    data = make_echo_synth(
        patients=2, devices=2, cines_per_view=2, frames=2, image_size=16
    )
    counts = torch.zeros(4, 5, dtype=torch.long)  # [patient, view]
    counts.index_put_((data.patients, data.labels), torch.tensor(1), accumulate=True)
    assert (counts == 2).all()
    per_device = torch.bincount(data.devices * 5 + data.labels, minlength=10)
    assert per_device.tolist() == [4] * 10  # 2 patients x 2 cines per (device, view)


def test_patient_ids_are_unique_across_devices(small) -> None:
    assert small.patients.unique().tolist() == list(range(9))
    for p in range(9):
        assert small.devices[small.patients == p].unique().numel() == 1
    assert small.devices.unique().tolist() == [0, 1, 2]


def test_frames_change_over_the_cine(small) -> None:
    f = small.frames.float()
    change = (f[:, 0] - f[:, 2]).abs().mean((1, 2, 3))  # frame 0 vs the middle frame
    assert (change > 1.0).all()


def test_outside_the_sector_is_black(small) -> None:
    # the fan's apex is at the top centre, so the top corners lie outside it
    assert small.frames[..., 0, 0].max() == 0
    assert small.frames[..., 0, -1].max() == 0
    assert small.frames[..., 12, 12].float().mean() > 10


def _hist(data, device: int) -> torch.Tensor:
    """Pixel-value histogram [256] of one device's frames, summing to 1."""
    h = torch.bincount(data.frames[data.devices == device].flatten().long(), None, 256)
    return h.double() / h.sum()


def test_devices_differ_in_intensity_distribution(small) -> None:
    hists = [_hist(small, d) for d in range(3)]
    for i in range(3):
        for j in range(i + 1, 3):
            assert 0.5 * (hists[i] - hists[j]).abs().sum() > 0.05  # total variation


def test_split_by_patient_is_disjoint_and_complete(small) -> None:
    parts = split_by_patient(small, seed=0)
    patient_sets = [set(p.patients.tolist()) for p in parts]
    for i in range(3):
        for j in range(i + 1, 3):
            assert not patient_sets[i] & patient_sets[j]
    assert set().union(*patient_sets) == set(range(9))
    assert sum(len(p) for p in parts) == len(small)
    for p in parts:
        assert p.labels.unique().tolist() == [0, 1, 2, 3, 4]


def test_bad_arguments_are_rejected() -> None:
    with pytest.raises(ValueError, match="patients"):
        make_echo_synth(patients=0)


# ----- a validation cohort (data.val_patients) -----------------------------------------
def test_a_cohort_is_other_patients_on_the_same_devices(small) -> None:
    cohort = make_echo_synth(**SMALL, seed=0, cohort=1)
    assert not torch.equal(cohort.frames, small.frames)
    assert torch.equal(cohort.frames, make_echo_synth(**SMALL, seed=0, cohort=1).frames)
    for d in range(3):
        same = 0.5 * (_hist(cohort, d) - _hist(small, d)).abs().sum()
        others = [
            0.5 * (_hist(cohort, d) - _hist(small, e)).abs().sum() for e in range(3)
        ]
        assert same == min(others)  # each device looks most like itself


def _splits(**data):
    from fl_ci.config import Config
    from fl_ci.data.registry import load_splits

    base = {"patients": 6, "devices": 2, "frames": 2, "image_size": 16}
    cfg = Config.from_dict({"dataset": "echo-synth", "data": {**base, **data}})
    return load_splits(cfg, list(ECHO_VIEWS), list(range(5)))


def test_a_validation_cohort_leaves_training_and_test_as_they_were() -> None:
    before, after = _splits(), _splits(val_patients=4)
    assert torch.equal(before.train.frames, after.train.frames)
    assert torch.equal(before.test.frames, after.test.frames)
    assert len(after.val) == 4 * 2 * 5  # patients per device x devices x views
    assert after.val.mean == after.train.mean  # the study's normalisation
    held = set(after.train.patients.tolist()) | set(after.test.patients.tolist())
    assert not held & set(after.val.patients.tolist())


def test_a_validation_cohort_is_refused_outside_the_procedural_echo() -> None:
    from fl_ci.config import Config, ConfigError
    from fl_ci.data.registry import load_splits

    cfg = Config.from_dict({"dataset": "cifar100", "data": {"val_patients": 4}})
    with pytest.raises(ConfigError, match="data.val_patients"):
        load_splits(cfg, ["apple"], [0])


# ----- an unlabelled cohort (data.unlabelled_patients) ---------------------------------
def test_an_unlabelled_cohort_leaves_the_labelled_splits_as_they_were() -> None:
    before, after = (
        _splits(val_patients=4),
        _splits(val_patients=4, unlabelled_patients=3),
    )
    for split in ("train", "val", "test"):
        assert torch.equal(getattr(before, split).frames, getattr(after, split).frames)
    assert before.unlabelled is None
    assert len(after.unlabelled) == 3 * 2 * 5  # patients per device x devices x views
    assert after.unlabelled.mean == after.train.mean  # the study's normalisation


def test_an_unlabelled_cohort_is_other_patients_than_every_split() -> None:
    splits = _splits(val_patients=4, unlabelled_patients=3)
    pool = set(splits.unlabelled.patients.tolist())
    for split in (splits.train, splits.val, splits.test):
        assert not pool & set(split.patients.tolist())
    assert not torch.equal(splits.unlabelled.frames[:10], splits.val.frames[:10])


def test_an_unlabelled_cohort_and_fraction_together_are_refused() -> None:
    from fl_ci.config import ConfigError

    with pytest.raises(ConfigError, match="unlabelled_patients.*unlabelled_fraction"):
        _splits(unlabelled_patients=3, unlabelled_fraction=0.25)


def test_an_unlabelled_cohort_is_refused_outside_the_procedural_echo() -> None:
    from fl_ci.config import Config, ConfigError
    from fl_ci.data.registry import load_splits

    cfg = Config.from_dict({"dataset": "cifar100", "data": {"unlabelled_patients": 3}})
    with pytest.raises(ConfigError, match="data.unlabelled_patients"):
        load_splits(cfg, ["apple"], [0])
