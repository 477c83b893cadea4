"""Reply screening, aggregation and head growth with real Flower records, in-process."""

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from fl_ci.config import Config, ConfigError
from fl_ci.models import build_model
from fl_ci.plan import grow_for_task
from server.app import _for_strategy
from server.checks import check_reply, screen_replies
from server.strategies import build_strategy

# Flower Messages are built in-process here (tests/conftest.py)
pytestmark = pytest.mark.usefixtures("run_identity")


def _model():
    torch.manual_seed(0)
    return build_model("echo_net", 2, 1)


def _reply(state, site, n=10, **extra_records):
    content = RecordDict(
        {
            "arrays": ArrayRecord(torch_state_dict=state),
            "metrics": MetricRecord(
                {"site": site, "num-examples": n, "num-classes": 2}
            ),
            **extra_records,
        }
    )
    return Message(content=content, dst_node_id=site + 1, message_type="train")


def _shifted(model, delta):
    return {
        k: (v + delta if v.is_floating_point() else v)
        for k, v in model.state_dict().items()
    }


@pytest.fixture
def sent():
    return ArrayRecord(torch_state_dict=_model().state_dict())


def test_sound_reply_passes(sent):
    assert (
        check_reply(_reply(_shifted(_model(), 0.01), 0), sent, announced_classes=2)
        is None
    )


def test_nan_is_rejected_with_the_array_named(sent):
    state = _shifted(_model(), 0.0)
    state["head.new_weight"][0, 0] = float("nan")
    reason = check_reply(_reply(state, 0), sent, announced_classes=2)
    assert "head.new_weight" in reason and "NaN" in reason


def test_wrong_shape_missing_key_and_counts_are_rejected(sent):
    grown = _model()
    grown.grow(1)
    assert "expected" in check_reply(
        _reply(grown.state_dict(), 0), sent, announced_classes=2
    )
    state = _shifted(_model(), 0.0)
    state.pop("head.eta")
    assert "keys differ" in check_reply(_reply(state, 0), sent, announced_classes=2)
    ok = _shifted(_model(), 0.0)
    assert "positive" in check_reply(_reply(ok, 0, n=-5), sent, announced_classes=2)
    assert "plausible" in check_reply(
        _reply(ok, 0, n=10**12), sent, announced_classes=2
    )
    assert "announced 3" in check_reply(_reply(ok, 0), sent, announced_classes=3)


def test_site_problem_is_rejected_with_its_reason(sent):
    reply = _reply(
        _shifted(_model(), 0.0),
        0,
        problem=ConfigRecord({"reason": "no data for task 1"}),
    )
    assert "no data for task 1" in check_reply(reply, sent, announced_classes=2)


def test_scaled_update_is_left_out_and_the_round_goes_on(sent):
    base = _model()
    replies = [_reply(_shifted(base, 0.01 * (i + 1)), i) for i in range(4)]
    replies.append(_reply(_shifted(base, 1000.0), 4))
    good, rejected = screen_replies(
        replies, sent, announced_classes=2, max_norm_ratio=10.0
    )
    assert len(good) == 4
    assert [r.site for r in rejected] == [4] and "norm" in rejected[0].reason


def test_fedavg_weights_by_examples():
    cfg = Config()
    base = _model()
    a = _reply(_shifted(base, 1.0), 0, n=30)
    b = _reply(_shifted(base, 2.0), 1, n=10)
    arrays, _ = build_strategy(cfg).aggregate_train(
        1, [_for_strategy(a), _for_strategy(b)]
    )
    eta = arrays.to_torch_state_dict()["head.eta"]
    # (30 * (eta+1) + 10 * (eta+2)) / 40 = eta + 1.25
    assert torch.allclose(eta, base.state_dict()["head.eta"] + 1.25)


def test_median_resists_one_huge_update():
    cfg = Config.from_dict({"federation": {"strategy": "median"}})
    base = _model()
    replies = [
        _for_strategy(_reply(_shifted(base, d), i))
        for i, d in enumerate([0.0, 0.1, 1e6])
    ]
    arrays, _ = build_strategy(cfg).aggregate_train(1, replies)
    eta = arrays.to_torch_state_dict()["head.eta"]
    assert np.isclose(float(eta), float(base.state_dict()["head.eta"]) + 0.1, atol=1e-5)


def test_krum_needs_enough_sites():
    with pytest.raises(ConfigError, match="krum_malicious"):
        build_strategy(
            Config.from_dict({"sites": 3, "federation": {"strategy": "krum"}})
        )


def test_head_grows_keeping_old_rows():
    model = _model()
    grown = grow_for_task(model, 1)
    assert grown.num_classes == 3 and model.num_classes == 2
    assert torch.equal(grown.head.weight[:2], model.head.weight)
