"""The sites' unlabelled exams (`data.unlabelled_fraction`) and the contrastive target
(`ci.target`): kept apart from every labelled split, shared out by site and schedule."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch

from fl_ci.config import Config, ConfigError
from fl_ci.data.registry import load_splits as _load_splits
from fl_ci.experiment import Experiment
from fl_ci.plan import StudyPlan
from fl_ci.site import site_round


def load_splits(cfg: Config):
    plan = StudyPlan.from_config(cfg)
    return _load_splits(cfg, plan.dataset_names, plan.order)


pytestmark = pytest.mark.usefixtures("one_thread")

SHARED = Path(__file__).resolve().parents[1].parent / "shared/data/cifar100"
ECHO = {
    "dataset": "echo-synth",
    "tasks": 3,
    "init_classes": 3,
    "data": {"image_size": 32, "patients": 10, "devices": 2, "frames": 2},
}


def echo_config(**changes) -> Config:
    values = {**ECHO, **changes}
    values["data"] = {**ECHO["data"], **changes.get("data", {})}
    return Config.from_dict(values)


def test_no_fraction_means_no_unlabelled_split():
    assert load_splits(echo_config()).unlabelled is None


def test_echo_unlabelled_exams_are_whole_patients_of_no_other_split():
    plain = load_splits(echo_config())
    splits = load_splits(echo_config(data={"unlabelled_fraction": 0.25}))
    pool = splits.unlabelled
    assert pool is not None and len(pool) > 0
    pool_patients = set(pool.patients.tolist())
    for labelled in (splits.train, splits.val, splits.test):
        assert pool_patients.isdisjoint(labelled.patients.tolist())
    # the exams come out of the training split only: validation and test stay as they were
    assert torch.equal(splits.val.patients, plain.val.patients)
    assert torch.equal(splits.test.patients, plain.test.patients)
    assert len(splits.train) + len(pool) == len(plain.train)
    assert set(pool.labels.tolist()) == {0, 1, 2, 3, 4}  # every view


@pytest.mark.skipif(not (SHARED / "manifest.json").is_file(), reason="no CIFAR-100")
def test_cifar_unlabelled_images_come_from_each_class_of_the_training_split(tmp_path):
    cfg = Config.from_dict(
        {
            "dataset": "cifar100",
            "data": {
                "root": str(SHARED),
                "cache_dir": str(tmp_path),
                "max_per_class": 20,
                "unlabelled_fraction": 0.25,
            },
        }
    )
    splits = load_splits(cfg)
    pool, train = splits.unlabelled, splits.train
    # 20 per class: 2 to validation, then 25 % of the other 18 (4.5, rounded to 4)
    assert pool.counts(100).tolist() == [4] * 100
    assert train.counts(100).tolist() == [14] * 100

    def digests(data):
        return {hashlib.sha1(f.numpy().tobytes()).hexdigest() for f in data.frames}

    assert digests(pool).isdisjoint(digests(train))


def test_a_fraction_of_one_is_refused_by_name():
    with pytest.raises(ConfigError, match="data.unlabelled_fraction"):
        load_splits(echo_config(data={"unlabelled_fraction": 1.0}))


def test_target_unlabelled_without_exams_is_refused_by_name():
    exp = Experiment.from_config(echo_config(ci={"target": "unlabelled"}))
    data = exp.site_data(1, 0)
    with pytest.raises(ConfigError, match="data.unlabelled_fraction"):
        exp.unlabelled(1, 0, data)


def test_target_default_is_the_sites_task_images():
    exp = Experiment.from_config(echo_config())
    data = exp.site_data(1, 0)
    assert exp.unlabelled(1, 0, data) is data


def test_target_test_is_the_test_images_of_every_class_seen():
    exp = Experiment.from_config(echo_config(ci={"target": "test"}))
    target = exp.unlabelled(1, 0, exp.site_data(1, 0))
    assert sorted(set(target.labels.tolist())) == [0, 1, 2, 3]
    assert len(target) == len(exp.splits.test.of_classes([0, 1, 2, 3]))


def test_unlabelled_target_holds_the_classes_seen_by_then():
    exp = Experiment.from_config(
        echo_config(ci={"target": "unlabelled"}, data={"unlabelled_fraction": 0.3})
    )
    at_task_1 = exp.unlabelled(1, 0, exp.site_data(1, 0))
    assert sorted(set(at_task_1.labels.tolist())) == [0, 1, 2, 3]
    assert len(at_task_1) == len(exp.splits.unlabelled.of_classes([0, 1, 2, 3]))


def test_each_site_gets_its_own_exams_of_the_views_it_was_scheduled():
    # class 3 reaches site 0 at task 1 and site 1 at task 2
    cfg = echo_config(
        sites=2,
        ci={"target": "unlabelled"},
        data={"unlabelled_fraction": 0.3},
        partition={"scheme": "schedule", "schedule": "0:A4C@1, 1:A4C@2"},
    )
    exp = Experiment.from_config(cfg)
    a4c = exp.class_names.index("A4C")
    site0 = exp.unlabelled(1, 0, exp.site_data(1, 0))
    site1 = exp.unlabelled(1, 1, exp.site_data(1, 1))
    assert a4c in site0.labels.tolist()
    assert a4c not in site1.labels.tolist()
    later = exp.unlabelled(2, 1, exp.site_data(2, 1))
    assert a4c in later.labels.tolist()
    # the two sites' exams never overlap and together are the whole pool
    pool = exp.splits.unlabelled
    both = exp.unlabelled(2, 0, exp.site_data(2, 0)), exp.unlabelled(2, 1, None)
    assert len(both[0]) + len(both[1]) == len(pool)
    assert set(both[0].patients.tolist()).isdisjoint(both[1].patients.tolist())


def test_class_impression_trains_against_the_unlabelled_exams():
    cfg = echo_config(
        method="class_impression",
        local_epochs=1,
        batch_size=16,
        ci={"target": "unlabelled"},
        data={"unlabelled_fraction": 0.3},
        synthesis={"iterations": 2, "per_class": 2, "warmup": 0},
    )
    exp = Experiment.from_config(cfg)
    model = exp.build_model()
    teacher = exp.build_model().eval()
    model.grow(1)
    means = torch.zeros(3, 1, 32, 32)
    _, metrics = site_round(
        exp.site(0), model, teacher, task=1, round=0, class_means=means, progress=False
    )
    # an untrained model pseudo-labels everything alike, so the term may be 0 here
    assert 0 <= metrics["train_contrastive"] < float("inf")
