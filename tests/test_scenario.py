"""Class orders of the published protocols and task splits."""

import pytest

from fl_ci.config import ConfigError
from fl_ci.data.scenario import apply_schedule, class_order, parse_schedule, task_splits


def test_abd_order_of_repeat_0_matches_the_protocol():
    assert class_order(100, "abd", 0)[:10] == [23, 8, 11, 7, 48, 13, 1, 91, 94, 54]


def test_target_order_matches_the_protocol():
    assert class_order(100, "target")[:5] == [56, 12, 68, 0, 82]


def test_orders_are_permutations():
    for scheme in ("natural", "abd", "target"):
        assert sorted(class_order(100, scheme, 1)) == list(range(100))


def test_echo_split_two_base_views_then_one_per_task():
    assert task_splits(5, 4, init_classes=2) == [[0, 1], [2], [3], [4]]


def test_equal_split():
    splits = task_splits(100, 10)
    assert [len(s) for s in splits] == [10] * 10 and splits[3][0] == 30


def test_uneven_split_is_refused_with_the_key():
    with pytest.raises(ConfigError, match="'tasks'"):
        task_splits(100, 3)


def test_schedule_parses_names_and_moves_first_arrival():
    names = ["A2C", "A3C", "A4C", "PLAX", "PSAX"]
    schedule = parse_schedule("2:PSAX@1, 0:PSAX@3, 1:3@2", names, sites=3)
    assert schedule == {4: {2: 1, 0: 3}, 3: {1: 2}}
    with pytest.raises(ConfigError, match="task 3 would have no new class"):
        apply_schedule([[0, 1], [2], [3], [4]], schedule)


def test_schedule_refuses_unknown_class_and_site():
    with pytest.raises(ConfigError, match="unknown class 'XYZ'"):
        parse_schedule("0:XYZ@1", ["A"], sites=2)
    with pytest.raises(ConfigError, match="site 5"):
        parse_schedule("5:0@1", ["A"], sites=2)


def test_schedule_moves_a_class_to_its_first_arrival():
    assert apply_schedule([[0], [1, 2], [3, 4]], {4: {1: 1, 0: 2}}) == [
        [0],
        [1, 2, 4],
        [3],
    ]
