"""One bad site cannot take over: the reply screen's references (the global model's
own norm, the norms and counts accepted earlier, the other replies), bounded FedAvg
weights, and the aggregate check, with real Flower records in-process; then an
attacking site in a real Flower simulation run (a test-only fault of its replies)."""

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict

from fl_ci.config import Config
from fl_ci.models import build_model
from server.app import aggregate
from server.checks import (
    ScreenMemory,
    ScreenPolicy,
    bounded_weights,
    model_norm,
    screen_replies,
    update_norm,
)
from server.strategies import build_strategy
from simulations.federated import run_federated

pytestmark = pytest.mark.usefixtures("run_identity")


def _model():
    torch.manual_seed(0)
    return build_model("echo_net", 2, 1)


def _reply(state, site, n=10):
    content = RecordDict(
        {
            "arrays": ArrayRecord(torch_state_dict=state),
            "metrics": MetricRecord(
                {"site": site, "num-examples": n, "num-classes": 2}
            ),
        }
    )
    return Message(content=content, dst_node_id=site + 1, message_type="train")


def _update(scale=1.0, seed=0):
    """The global state plus `scale` x a small seeded update (norm about 0.3)."""
    g = torch.Generator().manual_seed(seed)
    return {
        k: v + scale * 0.002 * torch.randn(v.shape, generator=g)
        if v.is_floating_point()
        else v
        for k, v in _model().state_dict().items()
    }


@pytest.fixture
def sent():
    return ArrayRecord(torch_state_dict=_model().state_dict())


def _screen(replies, sent, memory=None, first_round=True):
    return screen_replies(
        replies,
        sent,
        announced_classes=2,
        memory=memory,
        policy=ScreenPolicy(),
        first_round=first_round,
    )


def test_honest_replies_all_pass_and_are_remembered(sent):
    memory = ScreenMemory()
    good, rejected = _screen([_reply(_update(1, s), s) for s in range(3)], sent, memory)
    assert len(good) == 3 and rejected == []
    assert len(memory.norms[True]) == 3 and memory.claims == [10.0, 10.0, 10.0]


def test_the_screen_remembers_the_largest_accepted_update_over_the_model(sent):
    # the 1000x reply is rejected, so the margin is the honest replies' own
    memory = ScreenMemory()
    honest = [_reply(_update(1, s), s) for s in (0, 2)]
    _screen([honest[0], _reply(_update(1000, 1), 1), honest[1]], sent, memory)
    largest = max(update_norm(r, sent) for r in honest)
    assert memory.update_ratio == pytest.approx(largest / model_norm(sent))
    assert memory.update_ratio < 1


def test_a_1000x_update_with_one_other_reply_is_judged_against_the_model(sent):
    # two replies: the round's median is half the attacker's own, so it is no
    # reference; the global model's own norm is one the attacker cannot set
    good, rejected = _screen(
        [_reply(_update(1, 0), 0), _reply(_update(1000, 1), 1)], sent
    )
    assert [r.content["metrics"]["site"] for r in good] == [0]
    assert rejected[0].site == 1 and "global model's own norm" in rejected[0].reason


def test_a_50x_update_alone_is_judged_against_earlier_rounds(sent):
    memory = ScreenMemory()
    _screen(
        [_reply(_update(1, s), s) for s in range(3)], sent, memory, first_round=False
    )
    good, rejected = _screen(
        [_reply(_update(50, 4), 1)], sent, memory, first_round=False
    )
    assert good == [] and "norms accepted in earlier rounds" in rejected[0].reason


def test_a_sign_flipped_update_of_honest_size_passes_the_size_screen(sent):
    # the screen bounds size, not direction: a flipped update is one site's bounded
    # share (docs/reliability.md); robust strategies bound it further
    flipped = {
        k: 2 * v - u
        for (k, v), u in zip(
            _model().state_dict().items(), _update(1, 1).values(), strict=True
        )
    }
    good, _ = _screen(
        [_reply(_update(1, 0), 0), _reply(flipped, 1), _reply(_update(1, 2), 2)], sent
    )
    assert len(good) == 3


def test_a_site_claiming_ten_million_examples_is_rejected_and_named(sent):
    replies = [_reply(_update(1, 0), 0, 13), _reply(_update(5, 1), 1, 10**7)]
    replies.append(_reply(_update(1, 2), 2, 14))
    good, rejected = _screen(replies, sent)
    assert [r.content["metrics"]["site"] for r in good] == [0, 2]
    assert "example count 10000000 is over 10.0x the other sites' median" in (
        rejected[0].reason
    )
    # the global model is exactly the honest sites' FedAvg (13 : 14)
    state = aggregate(build_strategy(Config()), 1, good, sent)
    honest = [_update(1, 0), _update(1, 2)]
    for key, value in state.items():
        if value.is_floating_point():
            want = (13 * honest[0][key].double() + 14 * honest[1][key].double()) / 27
            np.testing.assert_allclose(value.double(), want, rtol=1e-5, atol=1e-6)


def test_a_site_may_not_raise_its_claim_later_in_a_task():
    memory = ScreenMemory()
    first = bounded_weights(
        [_reply(_update(), 0, 20), _reply(_update(), 1, 30)], task=1, memory=memory
    )
    later = bounded_weights(
        [_reply(_update(), 0, 2000), _reply(_update(), 1, 25)], task=1, memory=memory
    )
    assert first == [20.0, 30.0] and later == [20.0, 25.0]
    assert bounded_weights([_reply(_update(), 0, 2000)], task=2, memory=memory) == [
        2000.0
    ]


def test_a_share_cap_bounds_one_sites_weight():
    replies = [_reply(_update(), s, n) for s, n in enumerate((80, 10, 10))]
    weights = bounded_weights(replies, task=0, max_share=0.5)
    assert weights == [20.0, 10.0, 10.0]  # 20 / 40 = the 0.5 cap
    assert bounded_weights(replies, task=0) == [80.0, 10.0, 10.0]  # no cap by default


# ----- an attacking site in a real Flower simulation -----------------------------------
# sites 0 and 1 hold PLAX at task 1 (two replies), all three hold PSAX at task 2
ATTACKED = {
    "dataset": "echo-synth",
    "method": "class_impression",
    "tasks": 3,
    "init_classes": 3,
    "sites": 3,
    "rounds_per_task": 2,
    "local_epochs": 1,
    "batch_size": 16,
    "data": {"patients": 6, "devices": 3, "image_size": 32, "frames": 2},
    "partition": {"scheme": "schedule", "schedule": "0:PLAX@1, 1:PLAX@1"},
    "synthesis": {"iterations": 5, "per_class": 4, "min_mean_count": 1},
    "federation": {"timeout": 300.0},
}


@pytest.mark.slow
def test_a_1000x_site_at_two_reply_rounds_is_left_out_and_the_study_completes(
    tmp_path,
):
    summary = run_federated(
        Config.from_dict(ATTACKED), tmp_path, progress=False, faults="1:scale1000@*"
    )
    assert summary["tasks_completed"] == 3
    rows = pq.read_table(tmp_path / "metrics.parquet").to_pylist()
    val = {r["server_round"]: r for r in rows if r["split"] == "val"}
    for rnd in (3, 4):  # task 1: sites 0 and 1 reply, site 2 sits out
        assert val[rnd]["sites_sat_out"] == 1 and val[rnd]["sites_rejected"] == 1
        assert val[rnd]["sites_aggregated"] == 1
        assert "site 1: update norm" in val[rnd]["left_out"]
    # each round records its largest accepted update against the model's own norm:
    # the honest sites' margin to the bound, not the rejected 1000x reply's
    assert all(0 < r["update_ratio"] < 1 for r in val.values()), val
    assert all(np.isfinite(a) for a in summary["accuracy_after_task"])
    # task 2's impressions were synthesized from a clean teacher: finite
    store = tmp_path / "sites" / "site-0"
    (impressions,) = store.glob("impressions-task2-*.pt")
    assert torch.isfinite(torch.load(impressions)["images"]).all()
    assert json.loads((tmp_path / "summary.json").read_text())["sites"] == 3
