"""A site with no new data at a task rehearses on its synthetic replay
(`federation.rehearse`) instead of sitting the round out."""

from __future__ import annotations

import math

import pytest
import torch

from fl_ci.config import Config
from fl_ci.data.base import DataError
from fl_ci.experiment import Experiment
from fl_ci.plan import grow_for_task
from fl_ci.site import site_round

pytestmark = pytest.mark.usefixtures("one_thread")

# A4C (class 2 in arrival order) reaches site 0 at task 1 and site 1 only at task 2
BASE = {
    "dataset": "echo-synth",
    "tasks": 4,
    "init_classes": 2,
    "sites": 2,
    "local_epochs": 2,
    "batch_size": 8,
    "data": {"image_size": 32, "patients": 8, "devices": 2, "frames": 2},
    "partition": {"scheme": "schedule", "schedule": "0:A4C@1, 1:A4C@2"},
    "synthesis": {"iterations": 2, "per_class": 5, "warmup": 0},
}


def setup(method: str, rehearse: bool):
    cfg = Config.from_dict(
        {**BASE, "method": method, "federation": {"rehearse": rehearse}}
    )
    exp = Experiment.from_config(cfg)
    teacher = exp.build_model().eval()
    model = grow_for_task(teacher, len(exp.tasks[1]))
    means = torch.zeros(2, 1, 32, 32)
    return exp, model, teacher, means


def test_the_schedule_leaves_site_1_without_data_at_task_1():
    exp, *_ = setup("class_impression", rehearse=True)
    assert len(exp.site_data(1, 1)) == 0
    assert len(exp.site_data(1, 0)) > 0


def test_without_rehearsal_a_site_without_data_reports_it():
    exp, model, teacher, means = setup("class_impression", rehearse=False)
    with pytest.raises(DataError, match="site 1 has no training data for task 1"):
        site_round(exp.site(1), model, teacher, task=1, round=0, class_means=means)


def test_a_rehearsing_site_trains_one_pass_over_its_impressions_per_epoch():
    exp, model, teacher, means = setup("class_impression", rehearse=True)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trained, metrics = site_round(
        exp.site(1), model, teacher, task=1, round=0, class_means=means, progress=False
    )
    impressions = 2 * 5  # 2 old classes x per_class
    assert metrics["rehearsal"] == 1
    assert metrics["train_steps"] == 2 * math.ceil(impressions / 8)
    assert metrics["train_images"] == 2 * 2 * 8  # every row a replay row
    # FedAvg weight: replay images per epoch x the real share of a batch (1 - 0.66)
    assert metrics["num_examples"] == round(10 * 0.34)
    after = trained.state_dict()
    assert not torch.equal(
        before["backbone.stem.0.weight"], after["backbone.stem.0.weight"]
    )
    # the old classes' rows stay frozen, as at a site with data
    assert torch.equal(before["head.old_weight"], after["head.old_weight"])


def test_a_method_without_synthetic_replay_cannot_rehearse():
    exp, model, teacher, means = setup("lwf", rehearse=True)
    with pytest.raises(DataError, match="lwf has no synthetic replay"):
        site_round(exp.site(1), model, teacher, task=1, round=0, class_means=means)


def test_a_site_with_data_is_unchanged_by_the_switch():
    runs = []
    for rehearse in (False, True):
        exp, model, teacher, means = setup("class_impression", rehearse=rehearse)
        trained, metrics = site_round(
            exp.site(0),
            model,
            teacher,
            task=1,
            round=0,
            class_means=means,
            progress=False,
        )
        runs.append((trained.state_dict(), metrics))
    assert runs[0][1]["rehearsal"] == runs[1][1]["rehearsal"] == 0
    assert runs[0][1]["num_examples"] == runs[1][1]["num_examples"]
    for key, value in runs[0][0].items():
        assert torch.equal(value, runs[1][0][key]), key


def test_new_class_rows_average_over_the_sites_that_hold_the_class():
    from fl_ci.study import average_new_rows

    # 2 old classes, 2 new ones (labels 2 and 3); site 0 holds class 2, site 1 holds
    # classes 2 and 3, site 2 rehearsed (holds neither)
    fedavg = {"head.new_weight": torch.zeros(2, 2), "backbone.w": torch.ones(1)}
    sites = [
        {"head.new_weight": torch.tensor([[1.0, 0.0], [9.0, 9.0]])},
        {"head.new_weight": torch.tensor([[4.0, 3.0], [2.0, 2.0]])},
        {"head.new_weight": torch.tensor([[-5.0, -5.0], [-5.0, -5.0]])},
    ]
    held = [[2], [2, 3], []]
    out = average_new_rows(fedavg, sites, held, [1.0, 2.0, 3.0], num_old=2)
    # class 2: (1*[1, 0] + 2*[4, 3]) / 3 ; class 3: site 1's row alone
    assert torch.allclose(
        out["head.new_weight"], torch.tensor([[3.0, 2.0], [2.0, 2.0]])
    )
    assert torch.equal(out["backbone.w"], fedavg["backbone.w"])  # untouched


def test_a_class_no_site_holds_keeps_the_aggregate_row():
    from fl_ci.study import average_new_rows

    fedavg = {"head.new_weight": torch.tensor([[7.0, 7.0]])}
    sites = [{"head.new_weight": torch.tensor([[1.0, 1.0]])}]
    out = average_new_rows(fedavg, sites, [[]], [1.0], num_old=2)
    assert torch.equal(out["head.new_weight"], fedavg["head.new_weight"])


def test_rehearsal_refuses_robust_and_dp_aggregation():
    from fl_ci.config import ConfigError
    from server.strategies import build_strategy

    for federation in (
        {"rehearse": True, "strategy": "median"},
        {"rehearse": True, "dp_clip_norm": 1.0},
    ):
        cfg = Config.from_dict({**BASE, "sites": 3, "federation": federation})
        with pytest.raises(ConfigError, match="federation.rehearse"):
            build_strategy(cfg)
