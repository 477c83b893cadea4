import math

import numpy as np
import pytest
import torch

from fl_ci.metrics import (
    accuracy,
    accuracy_after_tasks,
    average_incremental_accuracy,
    backward_transfer,
    final_accuracy,
    forgetting,
    mean_over_tasks,
    old_new_accuracy,
    per_class_accuracy,
    summarize,
)

NAN = np.nan
# Worked example: rows after tasks 1..3 are (90), (95, 80), (85, 70, 75).
R = np.array([[90.0, NAN, NAN], [95.0, 80.0, NAN], [85.0, 70.0, 75.0]])


def test_accuracy_after_tasks() -> None:
    np.testing.assert_allclose(accuracy_after_tasks(R), [90.0, 87.5, 230.0 / 3])


def test_final_accuracy() -> None:
    assert final_accuracy(R) == pytest.approx(76.6667, abs=1e-4)


def test_average_incremental_accuracy() -> None:
    # (90 + 87.5 + 76.667) / 3
    assert average_incremental_accuracy(R) == pytest.approx(84.7222, abs=1e-4)


def test_backward_transfer() -> None:
    # ((85 - 90) + (70 - 80)) / 2
    assert backward_transfer(R) == pytest.approx(-7.5)


def test_forgetting_uses_max_over_earlier_rows() -> None:
    # task 0: max(90, 95) - 85 = 10; task 1: 80 - 70 = 10. Avalanche's first-
    # accuracy form would give ((90 - 85) + (80 - 70)) / 2 = 7.5.
    assert forgetting(R) == pytest.approx(10.0)


def test_forgetting_is_not_clipped_at_zero() -> None:
    improved = np.array([[50.0, NAN], [70.0, 60.0]])
    assert forgetting(improved) == pytest.approx(-20.0)


def test_single_task_transfer_and_forgetting_are_zero() -> None:
    one = np.array([[42.0]])
    assert backward_transfer(one) == 0.0
    assert forgetting(one) == 0.0
    assert final_accuracy(one) == 42.0


def test_non_square_matrix_raises() -> None:
    with pytest.raises(ValueError):
        final_accuracy(np.zeros((2, 3)))


def test_summarize_keys_and_values() -> None:
    s = summarize(R)
    assert s["final_accuracy"] == pytest.approx(76.6667, abs=1e-4)
    assert s["average_incremental_accuracy"] == pytest.approx(84.7222, abs=1e-4)
    assert s["backward_transfer"] == pytest.approx(-7.5)
    assert s["forgetting"] == pytest.approx(10.0)
    assert s["accuracy_after_tasks"] == pytest.approx([90.0, 87.5, 230.0 / 3])


def test_accuracy_from_predictions() -> None:
    assert accuracy(np.array([0, 1, 2, 2]), np.array([0, 1, 1, 2])) == 75.0


def test_accuracy_from_logits_tensor() -> None:
    logits = torch.tensor([[2.0, 1.0], [0.0, 3.0], [5.0, 4.0]])
    assert accuracy(logits, torch.tensor([0, 1, 1])) == pytest.approx(200.0 / 3)


def test_accuracy_of_nothing_is_nan() -> None:
    assert math.isnan(accuracy(np.array([], dtype=int), np.array([], dtype=int)))


def test_per_class_accuracy() -> None:
    pred = np.array([0, 0, 1, 2])
    labels = np.array([0, 1, 1, 1])
    out = per_class_accuracy(pred, labels, num_classes=3)
    np.testing.assert_allclose(out, [100.0, 100.0 / 3, NAN])


def test_old_new_accuracy() -> None:
    # old (label < 2): 2 of 3 right; new: 1 of 2 right
    pred = np.array([0, 1, 3, 2, 0])
    labels = np.array([0, 1, 0, 2, 3])
    old, new = old_new_accuracy(pred, labels, n_old=2)
    assert old == pytest.approx(200.0 / 3)
    assert new == 50.0


def test_old_new_accuracy_uses_argmax_over_all_classes() -> None:
    # A new-class logit beating the old one counts as an error on the old sample.
    logits = np.array([[1.0, 2.0]])
    old, new = old_new_accuracy(logits, np.array([0]), n_old=1)
    assert old == 0.0 and math.isnan(new)


def test_mean_over_tasks_leaves_out_tasks_without_images():
    assert mean_over_tasks([60.0, NAN, 30.0]) == 45.0
    assert np.isnan(mean_over_tasks([NAN, NAN]))
