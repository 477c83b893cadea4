"""Losses of the incremental update, each against a value worked out by hand."""

import math

import pytest
import torch

from fl_ci.losses import (
    CentroidTracker,
    balance_weights,
    contrastive_loss,
    cosine_cross_entropy,
    distill_weight,
    feature_distillation,
    kd_loss,
    local_cross_entropy,
    logit_distillation,
    margin_loss,
)

LN2, LN3 = math.log(2.0), math.log(3.0)


def close(value: torch.Tensor, expected: float) -> bool:
    return math.isclose(value.item(), expected, rel_tol=1e-5, abs_tol=1e-6)


# ----- eq. (4) ---------------------------------------------------------------------


def test_cosine_cross_entropy_is_mean_negative_log_softmax():
    # row 0: softmax([ln2, 0, 0]) = [2/4, 1/4, 1/4], label 0 -> -ln(1/2) = ln 2
    # row 1: softmax([0, ln3, 0]) = [1/5, 3/5, 1/5], label 2 -> -ln(1/5) = ln 5
    logits = torch.tensor([[LN2, 0.0, 0.0], [0.0, LN3, 0.0]])
    loss = cosine_cross_entropy(logits, torch.tensor([0, 2]))
    assert close(loss, (math.log(2) + math.log(5)) / 2)


def test_cosine_cross_entropy_class_weights_give_weighted_mean():
    # weights [1, 1, 3]: (1 * ln2 + 3 * ln5) / (1 + 3)
    logits = torch.tensor([[LN2, 0.0, 0.0], [0.0, LN3, 0.0]])
    weights = torch.tensor([1.0, 1.0, 3.0])
    loss = cosine_cross_entropy(logits, torch.tensor([0, 2]), weights)
    assert close(loss, (math.log(2) + 3 * math.log(5)) / 4)


def test_balance_weights_are_max_count_over_count_and_zero_when_absent():
    # max = 4: [4/4, 4/2, absent, 4/1]
    weights = balance_weights(torch.tensor([4, 2, 0, 1]))
    assert torch.equal(weights, torch.tensor([1.0, 2.0, 0.0, 4.0]))


# ----- eq. (5) ---------------------------------------------------------------------

SCORES = torch.tensor([[0.9, 0.1, 0.5, 0.8], [0.2, 0.6, 0.7, 0.3]])
OLD_LABELS = torch.tensor([0, 1])


# ----- levers: local cross-entropy, logit distillation -------------------------------


def test_local_cross_entropy_keeps_each_row_within_its_side():
    # 2 old classes, 1 new. Row 0 (old class 0) over the old logits [ln2, 0]:
    # -ln(2/3); row 1 (new class 2) over the new logits [5] alone: 0, whatever the
    # old scores are.
    logits = torch.tensor([[LN2, 0.0, 9.0], [7.0, 7.0, 5.0]])
    loss = local_cross_entropy(logits, torch.tensor([0, 2]), num_old=2)
    assert close(loss, math.log(1.5) / 2)


def test_local_cross_entropy_takes_class_weights_as_eq4():
    logits = torch.tensor([[LN2, 0.0, 9.0], [7.0, 7.0, 5.0]])
    weights = torch.tensor([1.0, 1.0, 3.0])
    loss = local_cross_entropy(logits, torch.tensor([0, 2]), 2, weights)
    assert close(loss, (1 * math.log(1.5) + 3 * 0.0) / (1 + 3))


def test_local_cross_entropy_of_old_rows_only_is_old_class_ce():
    logits = torch.tensor([[LN3, 0.0, 4.0], [0.0, LN2, -1.0]])
    labels = torch.tensor([0, 1])
    expected = cosine_cross_entropy(logits[:, :2], labels)
    assert close(local_cross_entropy(logits, labels, 2), expected.item())


def test_logit_distillation_is_mean_l1_over_teacher_classes():
    # |1 - 0| and |2 - 4| over the 2 old classes; the new logit 9 is not compared
    student = torch.tensor([[1.0, 2.0, 9.0]])
    assert close(logit_distillation(student, torch.tensor([[0.0, 4.0]])), 1.5)


def test_margin_loss_top1_uses_hardest_new_class():
    # row 0: 0.5 - 0.9 + max(0.5, 0.8) = 0.4; row 1: 0.5 - 0.6 + max(0.7, 0.3) = 0.6
    loss = margin_loss(SCORES, OLD_LABELS, [2, 3], margin=0.5, top_k=1)
    assert close(loss, 0.5)


def test_margin_loss_top2_averages_over_anchors_and_new_classes():
    # row 0: 0.4 and 0.5 - 0.9 + 0.5 = 0.1; row 1: 0.6 and 0.5 - 0.6 + 0.3 = 0.2
    loss = margin_loss(SCORES, OLD_LABELS, [2, 3], margin=0.5, top_k=2)
    assert close(loss, (0.4 + 0.1 + 0.6 + 0.2) / 4)


def test_margin_loss_hinge_ignores_satisfied_anchors():
    # margin 0: row 0: max(0, -0.9 + 0.8) = 0; row 1: max(0, -0.6 + 0.7) = 0.1
    loss = margin_loss(SCORES, OLD_LABELS, [2, 3], margin=0.0, top_k=1)
    assert close(loss, 0.05)


def test_margin_loss_of_empty_batch_is_zero_with_grad():
    scores = torch.zeros(0, 4, requires_grad=True)
    loss = margin_loss(scores, torch.zeros(0, dtype=torch.long), [2, 3], margin=0.5)
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()


# ----- eq. (6) ---------------------------------------------------------------------


def test_centroid_tracker_first_batch_gives_class_means():
    tracker = CentroidTracker(num_classes=3, rho=0.25)
    vectors = torch.tensor([[1.0, 0.0], [3.0, 0.0], [0.0, 2.0]])
    out = tracker.update(vectors, torch.tensor([0, 0, 1]))
    # class 0: mean([1,0], [3,0]) = [2,0]; class 1: [0,2]; class 2 unseen
    assert torch.equal(out[:2], torch.tensor([[2.0, 0.0], [0.0, 2.0]]))
    assert tracker.seen.tolist() == [True, True, False]


def test_centroid_tracker_rho_weighs_new_batch_and_absent_classes_keep_centroid():
    tracker = CentroidTracker(num_classes=3, rho=0.25)
    tracker.update(
        torch.tensor([[1.0, 0.0], [3.0, 0.0], [0.0, 2.0]]), torch.tensor([0, 0, 1])
    )
    out = tracker.update(torch.tensor([[6.0, 4.0]]), torch.tensor([0]))
    # class 0: 0.75 * [2,0] + 0.25 * [6,4] = [3, 1]; class 1 absent: stays [0,2]
    assert torch.allclose(out[:2], torch.tensor([[3.0, 1.0], [0.0, 2.0]]))


def test_centroid_tracker_gradient_flows_only_through_current_batch():
    tracker = CentroidTracker(num_classes=2, rho=0.25)
    first = torch.tensor([[2.0, 0.0]], requires_grad=True)
    second = torch.tensor([[6.0, 4.0]], requires_grad=True)
    tracker.update(first, torch.tensor([0]))
    tracker.update(second, torch.tensor([0]))[0].sum().backward()
    # d c_0 / d v = rho for the new batch; the old centroid is stop-gradient
    assert first.grad is None
    assert torch.allclose(second.grad, torch.tensor([[0.25, 0.25]]))


def test_centroid_tracker_empty_batch_changes_nothing():
    tracker = CentroidTracker(num_classes=2, rho=0.25)
    tracker.update(torch.tensor([[2.0, 0.0]]), torch.tensor([0]))
    out = tracker.update(torch.zeros(0, 2), torch.zeros(0, dtype=torch.long))
    assert torch.equal(out[0], torch.tensor([2.0, 0.0]))
    assert tracker.seen.tolist() == [True, False]


def test_centroid_tracker_reset_forgets_old_centroids():
    tracker = CentroidTracker(num_classes=2, rho=0.25)
    tracker.update(torch.tensor([[2.0, 0.0]]), torch.tensor([0]))
    tracker.reset()
    out = tracker.update(torch.tensor([[6.0, 4.0]]), torch.tensor([0]))
    assert torch.equal(out[0], torch.tensor([6.0, 4.0]))
    assert tracker.seen.tolist() == [True, False]


# target ĉT = [1,0], [1,1]/√2; source ĉS = [1,0], [0,1] (row 2 is not present)
TARGET = torch.tensor([[1.0, 0.0], [1.0, 1.0], [5.0, -7.0]])
SOURCE = torch.tensor([[2.0, 0.0], [0.0, 3.0], [-1.0, 4.0]])
PRESENT = torch.tensor([True, True, False])
A = 1 / math.sqrt(2)  # sim = [[1, 0], [a, a]], sim[j, k] = <ĉT_j, ĉS_k>


def test_contrastive_pooled_matches_hand_value():
    # -log((e^1 + e^a) / (e^1 + e^0 + e^a + e^a))
    expected = math.log((math.e + 1 + 2 * math.exp(A)) / (math.e + math.exp(A)))
    loss = contrastive_loss(TARGET, SOURCE, PRESENT, tau=1.0, form="pooled")
    assert close(loss, expected)


def test_contrastive_per_class_matches_hand_value():
    # class 0: -log(e / (e + 1)); class 1: -log(e^a / (e^a + e^a)) = log 2
    expected = (math.log(1 + 1 / math.e) + math.log(2)) / 2
    loss = contrastive_loss(TARGET, SOURCE, PRESENT, tau=1.0, form="per_class")
    assert close(loss, expected)


def test_contrastive_temperature_divides_similarities():
    # identity centroids, tau 2: -log(2 e^{1/2} / (2 e^{1/2} + 2)) = log(1 + e^{-1/2})
    eye = torch.eye(2)
    loss = contrastive_loss(eye, 3 * eye, torch.tensor([True, True]), tau=2.0)
    assert close(loss, math.log(1 + math.exp(-0.5)))


def test_contrastive_without_shared_classes_is_zero_with_grad():
    target = torch.ones(2, 2, requires_grad=True)
    loss = contrastive_loss(target, torch.ones(2, 2), torch.tensor([False, False]))
    assert loss.item() == 0.0 and loss.requires_grad


def test_contrastive_rejects_unknown_form():
    with pytest.raises(ValueError, match="per_class"):
        contrastive_loss(TARGET, SOURCE, PRESENT, form="infonce")


# ----- eq. (7) and schedules --------------------------------------------------------


def test_feature_distillation_is_mean_one_minus_cosine():
    # cos = 1 and 1/√2 -> mean(0, 1 - 1/√2)
    features = torch.tensor([[1.0, 0.0], [1.0, 1.0]], requires_grad=True)
    teacher = torch.tensor([[3.0, 0.0], [0.0, 2.0]], requires_grad=True)
    loss = feature_distillation(features, teacher)
    assert close(loss, (1 - A) / 2)
    loss.backward()
    assert teacher.grad is None


def test_distill_weight_follows_upstream_schedule():
    assert distill_weight(4, 1) == pytest.approx(10.0)  # 5 * sqrt(4 / 1)
    assert distill_weight(2, 2, base=3.0) == pytest.approx(3.0)


def test_distill_weight_rejects_no_new_classes():
    with pytest.raises(ValueError):
        distill_weight(3, 0)


def test_kd_loss_is_t_squared_kl_of_softened_outputs():
    # T = 2: teacher softmax([2 ln3, 0] / 2) = [3/4, 1/4], student [1/2, 1/2]
    # KL = 3/4 ln(3/2) + 1/4 ln(1/2), times T^2 = 4
    student = torch.zeros(1, 2)
    teacher = torch.tensor([[2 * LN3, 0.0]])
    expected = 4 * (0.75 * math.log(1.5) + 0.25 * math.log(0.5))
    assert close(kd_loss(student, teacher, temperature=2.0), expected)


def test_kd_loss_is_zero_when_student_matches_teacher():
    logits = torch.tensor([[0.3, -1.0, 2.0], [1.0, 0.0, 0.5]])
    assert close(kd_loss(logits, logits.clone()), 0.0)


def test_kd_loss_rejects_mismatched_class_counts():
    with pytest.raises(ValueError, match="slice"):
        kd_loss(torch.zeros(2, 3), torch.zeros(2, 2))
