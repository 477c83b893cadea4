"""End to end: a tiny study on one machine and through Flower's simulation engine."""

import json

import pyarrow.parquet as pq
import pytest
import torch

from fl_ci.config import Config
from simulations.__main__ import main as simulations_main

TINY = {
    "dataset": "echo-synth",
    "method": "class_impression",
    "tasks": 2,
    "init_classes": 3,
    "local_epochs": 1,
    "batch_size": 16,
    "data": {"patients": 6, "devices": 2, "image_size": 32, "frames": 2},
    "synthesis": {"iterations": 5, "per_class": 4, "min_mean_count": 1},
}


def _check_outputs(out, sites):
    summary = json.loads((out / "summary.json").read_text())
    assert summary["sites"] == sites and summary["tasks_completed"] == 2
    assert summary["classes_per_task"] == [3, 2]
    # old-class accuracy is reported for the task that has old classes
    assert summary["old_accuracy"][1] is not None
    rows = pq.read_table(out / "metrics.parquet").to_pylist()
    assert {r["split"] for r in rows} == {"val", "test"}
    assert (out / "accuracy.png").stat().st_size > 0
    assert (out / "accuracy_matrix.png").stat().st_size > 0
    return summary


@pytest.mark.slow
def test_single_site_run_writes_every_output(tmp_path, capsys):
    scenario = tmp_path / "tiny.toml"
    scenario.write_text(
        'dataset = "echo-synth"\nmethod = "class_impression"\ntasks = 2\n'
        "init_classes = 3\nlocal_epochs = 1\nbatch_size = 16\n"
        "[data]\npatients = 6\ndevices = 2\nimage_size = 32\nframes = 2\n"
        "[synthesis]\niterations = 5\nper_class = 4\nmin_mean_count = 1\n"
    )
    code = simulations_main([str(scenario), "--out", str(tmp_path / "out"), "--quiet"])
    assert code == 0
    _check_outputs(tmp_path / "out", sites=1)
    assert "final_accuracy" in capsys.readouterr().out
    # impressions were synthesized once for task 1 and kept on the site's disk
    assert (
        len(list((tmp_path / "out/sites/site-0").glob("impressions-task1-*.pt"))) == 1
    )


def test_bad_override_is_one_clear_error(tmp_path, capsys):
    code = simulations_main(["echo-paper", "--set", "synthesis.iterationz=5"])
    assert code == 2
    assert "synthesis.iterationz" in capsys.readouterr().err


@pytest.mark.slow
def test_two_sites_through_flower_simulation(tmp_path):
    from simulations.federated import run_federated

    # the new views reach site 0 at task 1 and site 1 only later: site 1 rehearses
    cfg = Config.from_dict(
        {
            **TINY,
            "sites": 2,
            "rounds_per_task": 2,
            "partition": {"scheme": "schedule", "schedule": "0:PLAX@1, 0:PSAX@1"},
            "federation": {"rehearse": True},
        }
    )
    run_federated(cfg, tmp_path, progress=False)
    _check_outputs(tmp_path, sites=2)
    state = torch.load(tmp_path / "model.pt", weights_only=True)
    # the head grew from 3 to 5 classes
    assert state["head.old_weight"].shape[0] + state["head.new_weight"].shape[0] == 5
    rows = pq.read_table(tmp_path / "metrics.parquet").to_pylist()
    val = [r for r in rows if r["split"] == "val"]
    assert all(r["sites_aggregated"] == 2 for r in val)
    assert [r["sites_rehearsing"] for r in val] == [0, 0, 1, 1]
    assert all(r["bytes_sent"] > 0 for r in val)
    # the teacher (as large as the model) travels in a task's first round only
    sent = {(r["task"], r["round"]): r["bytes_sent"] for r in val}
    assert sent[(1, 0)] > 1.6 * sent[(1, 1)]
    assert sent[(1, 1)] < 1.2 * sent[(0, 1)]
    # each site kept its own impressions for task 1
    for site in (0, 1):
        assert list((tmp_path / f"sites/site-{site}").glob("impressions-task1-*.pt"))


@pytest.mark.slow
def test_a_validation_cohort_changes_validation_only(tmp_path):
    """data.val_patients replaces the validation split and nothing else: the same
    training, so the test metrics are identical and only the val ones move."""
    from simulations.local import run_local

    runs = {}
    for cohort in (0, 5):
        cfg = Config.from_dict(
            {**TINY, "data": {**TINY["data"], "val_patients": cohort}}
        )
        runs[cohort] = run_local(cfg, tmp_path / f"cohort-{cohort}", progress=False)
    # the test split's matrix (nan where a task is not yet seen)
    assert str(runs[0]["accuracy_matrix"]) == str(runs[5]["accuracy_matrix"])
    assert runs[0]["final_accuracy"] == runs[5]["final_accuracy"]
    val = {
        c: pq.read_table(tmp_path / f"cohort-{c}" / "metrics.parquet")
        .to_pandas()
        .query("split == 'val'")
        for c in runs
    }
    assert len(val[0]) == len(val[5])
    assert not val[0]["accuracy"].equals(val[5]["accuracy"])
