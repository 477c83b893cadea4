"""Faults and bad inputs (issue 6): what the federation does, one behaviour per test.

In-process tests use real Flower records and real model state dicts; the end-to-end
ones run Flower's simulation runtime with the test-only `faults` switch
(docs/reliability.md). Each Flower run is made once per module and read by several
tests.
"""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict

from client.faults import parse_faults
from fl_ci.checkpoint import (
    CheckpointError,
    RunStopped,
    checkpoint_path,
    load_checkpoint,
    restore,
    save_checkpoint,
)
from fl_ci.config import Config, ConfigError, FederationConfig
from fl_ci.experiment import Experiment
from fl_ci.models import build_model
from fl_ci.plan import grow_for_task
from fl_ci.recorder import Recorder
from fl_ci.synthesis import ClassMeans
from server.app import RoundFailed, aggregate
from server.checks import ScreenPolicy, check_reply, screen_replies
from server.strategies import build_strategy, is_dp, with_dp

NO_SCREEN = ScreenPolicy(0.0, 0.0, 0.0)  # the strategies alone, without the screen

TINY = {
    "dataset": "echo-synth",
    "method": "class_impression",
    "tasks": 2,
    "init_classes": 3,
    "local_epochs": 1,
    "batch_size": 16,
    "partition": {"scheme": "iid"},
    "data": {"patients": 6, "devices": 2, "image_size": 32, "frames": 2},
    "synthesis": {"iterations": 5, "per_class": 4, "min_mean_count": 1},
}


# Flower Messages are built in-process here (tests/conftest.py)
pytestmark = pytest.mark.usefixtures("run_identity")


# ----- replies built in-process ---------------------------------------------------
def _model():
    torch.manual_seed(0)
    return build_model("echo_net", 2, 1)


def _reply(state, site, n=10, classes=None):
    metrics = {"site": site, "num-examples": n, "num-classes": 2}
    if classes is not None:
        metrics["classes"] = classes
    content = RecordDict(
        {
            "arrays": ArrayRecord(torch_state_dict=state),
            "metrics": MetricRecord(metrics),
        }
    )
    return Message(content=content, dst_node_id=site + 1, message_type="train")


def _floats(state):
    return {k: v for k, v in state.items() if v.is_floating_point()}


def _moved(base, deltas, scale=1.0):
    return {
        k: v + scale * deltas[k] if k in deltas else v.clone() for k, v in base.items()
    }


def _distance(a, b):
    return float(
        torch.sqrt(sum(((a[k] - b[k]).double() ** 2).sum() for k in _floats(b)))
    )


def _update(seed, common, spread=0.1):
    """An honest site's update: a shared direction plus a little site noise."""
    g = torch.Generator().manual_seed(seed)
    return {
        k: v + spread * v.abs().mean() * torch.randn(v.shape, generator=g)
        for k, v in common.items()
    }


@pytest.fixture
def five_sites():
    """Base state, the 4 honest sites' updates and their mean (the honest aggregate)."""
    base = _model().state_dict()
    g = torch.Generator().manual_seed(1)
    common = {
        k: 0.01 * torch.randn(v.shape, generator=g) for k, v in _floats(base).items()
    }
    honest = [_update(10 + i, common) for i in range(5)]
    honest_mean = _moved(base, {k: sum(d[k] for d in honest[:4]) / 4 for k in common})
    return base, honest, honest_mean


def test_reply_naming_a_class_the_server_did_not_announce_is_rejected():
    state = _model().state_dict()
    sent = ArrayRecord(torch_state_dict=state)
    assert (
        check_reply(_reply(state, 0, classes=[0, 1]), sent, announced_classes=2) is None
    )
    reason = check_reply(_reply(state, 0, classes=[0, 1, 4]), sent, announced_classes=2)
    assert "[4]" in reason and "did not announce" in reason


@pytest.mark.parametrize("attack", ["scaled", "sign_flipped"])
def test_fedavg_is_harmed_by_one_bad_site(five_sites, attack):
    base, honest, honest_mean = five_sites
    sent = ArrayRecord(torch_state_dict=base)
    replies = [_reply(_moved(base, d), i) for i, d in enumerate(honest[:4])]
    scale = 1e3 if attack == "scaled" else -1.0
    replies.append(_reply(_moved(base, honest[4], scale), 4))
    good, _ = screen_replies(replies, sent, announced_classes=2, policy=NO_SCREEN)
    state = aggregate(build_strategy(Config(sites=5)), 1, good, sent)
    honest_step = _distance(honest_mean, base)
    assert _distance(state, honest_mean) > 0.3 * honest_step


@pytest.mark.parametrize("attack", ["scaled", "sign_flipped"])
@pytest.mark.parametrize("strategy", ["median", "trimmed_mean", "krum"])
def test_robust_strategy_stays_close_to_the_honest_aggregate(
    five_sites, attack, strategy
):
    base, honest, honest_mean = five_sites
    sent = ArrayRecord(torch_state_dict=base)
    replies = [_reply(_moved(base, d), i) for i, d in enumerate(honest[:4])]
    scale = 1e3 if attack == "scaled" else -1.0
    replies.append(_reply(_moved(base, honest[4], scale), 4))
    # the norm screen is off: the strategy alone must hold
    good, _ = screen_replies(replies, sent, announced_classes=2, policy=NO_SCREEN)
    assert len(good) == 5
    cfg = Config.from_dict({"sites": 5, "federation": {"strategy": strategy}})
    state = aggregate(build_strategy(cfg), 1, good, sent)
    honest_step = _distance(honest_mean, base)
    assert _distance(state, honest_mean) < 0.15 * honest_step


# ----- central differential privacy (Flower's server-side fixed clipping) ----------
def test_dp_clips_every_update_to_the_clipping_norm(five_sites):
    base, honest, _ = five_sites
    sent = ArrayRecord(torch_state_dict=base)
    replies = [_reply(_moved(base, d), i) for i, d in enumerate(honest[:4])]
    replies.append(_reply(_moved(base, honest[4], 1e3), 4))
    clip = 0.5 * _distance(_moved(base, honest[0]), base)
    strategy = with_dp(build_strategy(Config(sites=5)), clip, 0.0, sites=5)
    state = aggregate(strategy, 1, replies, sent)
    assert _distance(state, base) <= clip * (1 + 1e-6)


def test_dp_noise_has_std_z_times_clip_over_sites(five_sites):
    base, honest, _ = five_sites
    sent = ArrayRecord(torch_state_dict=base)
    same = _moved(base, honest[0])  # every site sends it: the mean is exact
    replies = [_reply(same, i) for i in range(5)]
    clip = 10 * _distance(same, base)  # nothing is clipped
    strategy = with_dp(build_strategy(Config(sites=5)), clip, 1.0, sites=5)
    state = aggregate(strategy, 1, replies, sent)
    noise = torch.cat([(state[k] - same[k]).flatten().double() for k in _floats(base)])
    assert noise.numel() > 10_000
    assert float(noise.std()) == pytest.approx(clip / 5, rel=0.05)


@dataclasses.dataclass(frozen=True)
class _DPFederation(FederationConfig):
    """The knobs proposed for fl_ci/config.py (server/strategies.py reads them)."""

    dp_clip_norm: float = 0.0
    dp_noise_multiplier: float = 1.0


def test_dp_knob_wraps_the_configured_strategy():
    cfg = dataclasses.replace(
        Config(sites=5), federation=_DPFederation(dp_clip_norm=1.0)
    )
    assert is_dp(build_strategy(cfg))
    assert not is_dp(build_strategy(Config(sites=5)))


def test_dp_knob_refuses_a_strategy_the_noise_is_not_calibrated_for():
    fed = _DPFederation(strategy="median", dp_clip_norm=1.0)
    with pytest.raises(ConfigError, match="dp_clip_norm"):
        build_strategy(dataclasses.replace(Config(sites=5), federation=fed))


# ----- checkpoints -------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_exp():
    return Experiment.from_config(Config.from_dict(TINY))


def _state_at_task_1(exp):
    teacher = exp.build_model()
    with torch.no_grad():
        for p in teacher.parameters():
            p.add_(0.25)  # differs from a freshly built model
    model = grow_for_task(teacher, len(exp.tasks[1]), seed=1)
    with torch.no_grad():
        model.head.new_weight.add_(0.5)  # differs from a freshly grown head
    means = ClassMeans.from_data(exp.site_data(0, 0), classes=exp.tasks[0])
    recorder = Recorder(exp.cfg, exp.tasks, exp.class_names)
    recorder.add_row(task=0, round=0, split="val", accuracy=50.0)
    recorder.add_task(
        0,
        {
            "per_task": [60.0],
            "accuracy": 60.0,
            "old_accuracy": float("nan"),
            "new_accuracy": 60.0,
        },
    )
    return model, teacher, means, recorder


def test_checkpoint_restores_model_teacher_means_and_records(tmp_path, tiny_exp):
    model, teacher, means, recorder = _state_at_task_1(tiny_exp)
    save_checkpoint(
        tmp_path, cfg=tiny_exp.cfg, server_round=2, model=model, teacher=teacher,
        means=means, recorder=recorder,
    )  # fmt: skip
    fresh = Recorder(tiny_exp.cfg, tiny_exp.tasks, tiny_exp.class_names)
    resumed = restore(load_checkpoint(tmp_path, tiny_exp.cfg), tiny_exp.plan, fresh)
    assert resumed.server_round == 2
    for got, want in ((resumed.model, model), (resumed.teacher, teacher)):
        want_state = want.state_dict()
        assert all(torch.equal(v, want_state[k]) for k, v in got.state_dict().items())
    assert torch.equal(resumed.means.sums, means.sums)
    assert repr(fresh.rows) == repr(recorder.rows)  # NaN != NaN, but reprs match
    np.testing.assert_array_equal(fresh.matrix, recorder.matrix)


def test_interrupted_checkpoint_write_keeps_the_previous_one(tmp_path, tiny_exp):
    model, teacher, means, recorder = _state_at_task_1(tiny_exp)
    kwargs = dict(cfg=tiny_exp.cfg, model=model, teacher=teacher, means=means)
    save_checkpoint(tmp_path, server_round=2, recorder=recorder, **kwargs)
    recorder.add_row(task=1, round=0, split="val", accuracy=lambda: 0)  # cannot pickle
    with pytest.raises(Exception, match="lambda|pickle"):
        save_checkpoint(tmp_path, server_round=3, recorder=recorder, **kwargs)
    assert load_checkpoint(tmp_path, tiny_exp.cfg)["server_round"] == 2
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]


def test_checkpoint_of_another_config_is_refused_naming_file_and_key(
    tmp_path, tiny_exp
):
    model, teacher, means, recorder = _state_at_task_1(tiny_exp)
    save_checkpoint(
        tmp_path, cfg=tiny_exp.cfg, server_round=2, model=model, teacher=teacher,
        means=means, recorder=recorder,
    )  # fmt: skip
    with pytest.raises(CheckpointError, match=r"checkpoint\.pt.*\blr = 0\.01 there"):
        load_checkpoint(tmp_path, tiny_exp.cfg.replace(lr=0.02))


def test_malformed_fault_spec_names_the_key():
    assert [f.kind for f in parse_faults("1:crash@2, 0:empty@3/0")] == [
        "crash",
        "empty",
    ]
    with pytest.raises(ConfigError, match="'faults'"):
        parse_faults("1:explode@2")


# ----- a single-machine run stopped and resumed (`python -m simulations`) -------------
SCENARIO = (
    'dataset = "echo-synth"\nmethod = "class_impression"\ntasks = 3\n'
    "init_classes = 3\nrounds_per_task = 2\nlocal_epochs = 1\nbatch_size = 16\n"
    "[data]\npatients = 6\ndevices = 2\nimage_size = 32\nframes = 2\n"
    "[synthesis]\niterations = 5\nper_class = 4\nmin_mean_count = 1\n"
)


@pytest.mark.slow
def test_single_site_run_resumed_mid_task_ends_like_an_uninterrupted_one(tmp_path):
    from simulations.__main__ import main as simulations_main
    from simulations.local import run_local

    scenario = tmp_path / "tiny.toml"
    scenario.write_text(SCENARIO)
    run = [str(scenario), "--quiet", "--out"]
    assert simulations_main([*run, str(tmp_path / "ref")]) == 0
    cfg = Config.from_toml(scenario)
    with pytest.raises(RunStopped):
        run_local(cfg, tmp_path / "cut", progress=False, stop_after_round=3)
    kept = load_checkpoint(tmp_path / "cut", cfg)["recorder"]["rows"]
    assert [r.get("server_round") for r in kept] == [1, 2, None, 3]  # mid task 1
    assert simulations_main([*run, str(tmp_path / "cut")]) == 0
    ref = json.loads((tmp_path / "ref/summary.json").read_text())
    cut = json.loads((tmp_path / "cut/summary.json").read_text())
    assert cut["tasks_completed"] == 3
    assert cut["accuracy_matrix"] == ref["accuracy_matrix"]
    # rounds 1-3 were not run again: their rows (timings included) are the kept ones
    rows = pq.read_table(tmp_path / "cut/metrics.parquet").to_pylist()
    assert [r["train_seconds"] for r in rows[:4]] == [
        r.get("train_seconds") for r in kept
    ]


@pytest.mark.slow
def test_single_site_run_killed_mid_run_resumes_to_the_same_result(tmp_path):
    from simulations.__main__ import main as simulations_main

    scenario = tmp_path / "tiny.toml"
    scenario.write_text(SCENARIO.replace("rounds_per_task = 2", "rounds_per_task = 3"))
    cfg = Config.from_toml(scenario)
    run = [str(scenario), "--quiet", "--out"]
    assert simulations_main([*run, str(tmp_path / "ref")]) == 0
    cut = tmp_path / "cut"
    proc = subprocess.Popen(
        [sys.executable, "-m", "simulations", *run, str(cut)],
        cwd=Path(__file__).resolve().parents[1],
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:
            if checkpoint_path(cut).exists():
                if load_checkpoint(cut, cfg)["server_round"] >= 2:
                    break
            time.sleep(0.02)
        assert proc.poll() is None, "the run ended before it could be killed"
        proc.send_signal(signal.SIGKILL)  # no clean-up: a crash
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    state = load_checkpoint(cut, cfg)
    assert 2 <= state["server_round"] < 9
    kept = state["recorder"]["rows"]
    assert simulations_main([*run, str(cut)]) == 0
    ref = json.loads((tmp_path / "ref/summary.json").read_text())
    got = json.loads((cut / "summary.json").read_text())
    assert got["accuracy_matrix"] == ref["accuracy_matrix"]
    # the rounds done before the kill were not run again
    rows = pq.read_table(cut / "metrics.parquet").to_pylist()
    assert [r["train_seconds"] for r in rows[: len(kept)]] == [
        r.get("train_seconds") for r in kept
    ]


# ----- Flower simulation: sites that fail or hold bad data --------------------------
FAULTS = "1:crash@2, 2:bad-labels@2/0, 2:empty@3, 0:restart@4"


@pytest.fixture(scope="module")
def faulty_run(tmp_path_factory):
    """3 sites, 2 tasks x 2 rounds, at least 2 sound replies a round. Round 2: site 1
    crashes, site 2's data names an unannounced class (first attempt only); round 3:
    site 2's partition is empty; round 4: site 0 restarts without its store."""
    from simulations.federated import run_federated

    out = tmp_path_factory.mktemp("faulty")
    cfg = Config.from_dict(
        {**TINY, "sites": 3, "rounds_per_task": 2, "federation": {"min_sites": 2}}
    )
    summary = run_federated(cfg, out, progress=False, faults=FAULTS)
    rows = pq.read_table(out / "metrics.parquet").to_pylist()
    by_round = {r["server_round"]: r for r in rows if r["split"] == "val"}
    return out, summary, by_round


@pytest.mark.slow
def test_crashing_site_is_left_out_and_named_and_the_run_completes(faulty_run):
    _, summary, rounds = faulty_run
    assert summary["tasks_completed"] == 2
    assert rounds[2]["sites_aggregated"] == 2
    assert "site 1: site error: site 1: injected crash" in rounds[2]["left_out"]


@pytest.mark.slow
def test_too_few_sound_replies_sends_the_round_again(faulty_run):
    _, _, rounds = faulty_run
    # first attempt: only site 0 sound (1 < 2); second: sites 0 and 2
    assert rounds[2]["attempts"] == 2
    assert rounds[1]["attempts"] == 1


@pytest.mark.slow
def test_site_data_with_an_unannounced_class_is_reported_by_the_site(faulty_run):
    _, _, rounds = faulty_run
    note = rounds[2]["left_out"]
    assert "site 2: site reported: DataError" in note and "labels [3]" in note


@pytest.mark.slow
def test_empty_partition_is_reported_and_the_round_goes_on(faulty_run):
    _, _, rounds = faulty_run
    assert rounds[3]["sites_aggregated"] == 2
    # no rows of the task's classes: the site sits out, which is not a rejection
    assert "site 2 has no data for task 1: sits this task out" in rounds[3]["sat_out"]
    assert rounds[3]["sites_sat_out"] == 1 and rounds[3]["sites_rejected"] == 0


@pytest.mark.slow
def test_restarted_site_synthesizes_its_impressions_again(faulty_run):
    out, _, rounds = faulty_run
    assert rounds[4]["sites_aggregated"] == 3
    round4 = rounds[4]["started_at"]
    mine = list((out / "sites/site-0").glob("impressions-task1-*.pt"))
    other = list((out / "sites/site-1").glob("impressions-task1-*.pt"))
    assert len(mine) == 1 and len(other) == 1
    # site 1 kept the impressions it made in round 3; site 0 lost them and made them
    # again in round 4
    assert other[0].stat().st_mtime < round4 < mine[0].stat().st_mtime


# ----- Flower simulation: a failed round, then the run resumed -----------------------
RESUMABLE = {**TINY, "sites": 2, "federation": {"min_sites": 2}}


@pytest.fixture(scope="module")
def failed_run(tmp_path_factory):
    """2 sites, 2 sound replies needed, site 1 crashing in round 2: round 2 fails
    twice and the run stops."""
    from simulations.federated import run_federated

    cfg = Config.from_dict(RESUMABLE)
    out = tmp_path_factory.mktemp("cut")
    with pytest.raises(RoundFailed) as failure:
        run_federated(cfg, out, progress=False, faults="1:crash@2")
    return {
        "out": out,
        "message": str(failure.value),
        "failed_at": time.time(),
        "checkpoint_round": load_checkpoint(out, cfg)["server_round"],
        "model_written": (out / "model.pt").exists(),
    }


@pytest.mark.slow
def test_round_that_fails_twice_stops_with_a_clear_message(failed_run):
    message = failed_run["message"]
    assert "round 2" in message and "after 2 attempts" in message
    assert "site 1: site error: site 1: injected crash" in message
    path = checkpoint_path(failed_run["out"].resolve())
    assert str(path) in message and "resume" in message


@pytest.mark.slow
def test_failed_round_leaves_the_last_checkpoint_and_no_model(failed_run):
    assert failed_run["checkpoint_round"] == 1
    assert not failed_run["model_written"]


@pytest.mark.slow
def test_resumed_federated_run_ends_like_an_uninterrupted_one(failed_run, tmp_path):
    from simulations.federated import run_federated

    cfg = Config.from_dict(RESUMABLE)
    cut = failed_run["out"]
    run_federated(cfg, cut, progress=False)  # the same output folder: resumes
    run_federated(cfg, tmp_path, progress=False)  # uninterrupted
    a = json.loads((tmp_path / "summary.json").read_text())
    b = json.loads((cut / "summary.json").read_text())
    assert b["tasks_completed"] == 2
    assert b["accuracy_matrix"] == a["accuracy_matrix"]
    ref_model = torch.load(tmp_path / "model.pt", weights_only=True)
    cut_model = torch.load(cut / "model.pt", weights_only=True)
    assert all(torch.equal(v, cut_model[k]) for k, v in ref_model.items())
    # round 1 was not run again after the failure; round 2 was
    rows = pq.read_table(cut / "metrics.parquet").to_pylist()
    started = {r["server_round"]: r["started_at"] for r in rows if r["split"] == "val"}
    assert started[1] < failed_run["failed_at"] < started[2]
