"""Feature statistics of real images (fl_ci/prototypes.py): what a site keeps for
feature replay, how sites and tasks combine, and the pseudo-features drawn from it."""

import torch

from fl_ci.data.base import ImageData
from fl_ci.models import build_model
from fl_ci.prototypes import FeatureStats, sample_features


def stats(sums, squares, counts) -> FeatureStats:
    return FeatureStats(
        torch.tensor(sums, dtype=torch.float64),
        torch.tensor(squares, dtype=torch.float64),
        torch.tensor(counts, dtype=torch.int64),
    )


def test_mean_and_std_come_from_sums_squares_and_counts():
    # class 0: features (1, 1) and (1, 3): mean (1, 2), std (0, 1)
    mean, std = stats([[2.0, 4.0]], [[2.0, 10.0]], [2]).mean_std([0])
    assert mean.tolist() == [[1.0, 2.0]]
    assert std.tolist() == [[0.0, 1.0]]


def test_merging_two_sites_is_the_count_weighted_mean():
    # site a: class 0 at 1.0 (x1); site b: class 0 at 4.0 (x2) and class 1 at 5.0
    a = stats([[1.0]], [[1.0]], [1])
    b = stats([[8.0], [5.0]], [[32.0], [25.0]], [2, 1])
    both = a.merge(b)
    mean, _ = both.mean_std([0, 1])
    assert both.counts.tolist() == [3, 1]
    assert mean.tolist() == [[3.0], [5.0]]
    assert both.available() == [0, 1]


def test_a_class_without_images_is_not_available():
    assert stats([[0.0], [2.0]], [[0.0], [4.0]], [0, 1]).available() == [1]


def test_pseudo_features_with_zero_spread_are_the_class_means():
    mean = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    classes = torch.tensor([3, 7])
    x, y = sample_features(
        mean, torch.zeros(2, 2), classes, 6, torch.Generator().manual_seed(0)
    )
    assert set(y.tolist()) <= {3, 7}
    for row, label in zip(x, y, strict=True):
        assert torch.equal(row, mean[0] if label == 3 else mean[1])


def test_statistics_of_a_model_are_those_of_its_features():
    torch.manual_seed(0)
    model = build_model("echo_net", 3, in_channels=1, head="cosine").eval()
    frames = torch.randint(0, 256, (5, 1, 1, 32, 32), dtype=torch.uint8)
    labels = torch.tensor([0, 1, 1, 2, 1])
    none = torch.full((5,), -1)
    data = ImageData(frames, labels, none, none, mean=(0.5,), std=(0.25,))
    got = FeatureStats.from_model(model, data, [1], 3, torch.device("cpu"))
    x = (frames[:, 0].float() / 255 - 0.5) / 0.25
    with torch.no_grad():
        f = model.features(x[labels == 1]).double()
    assert got.counts.tolist() == [0, 3, 0]
    assert torch.allclose(got.sums[1], f.sum(0))
    assert torch.allclose(got.squares[1], (f * f).sum(0))


def test_calibration_moves_only_the_new_rows_and_separates_the_classes():
    # two old classes along x and y, a new class along the diagonal, whose row
    # starts on top of old class 0's
    from fl_ci.models.heads import CosineHead
    from fl_ci.prototypes import calibrate_head

    head = CosineHead(2, 2, scale=10.0)
    with torch.no_grad():
        head.new_weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    head.grow(1, torch.tensor([[1.0, 0.0]]))  # the two rows become the old ones
    assert head.num_old == 2 and head.num_classes == 3
    old, eta = head.old_weight.detach().clone(), head.eta.detach().clone()
    mean = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    std = torch.full((3, 2), 0.05)
    calibrate_head(
        head,
        mean,
        std,
        torch.arange(3),
        steps=100,
        lr=0.5,
        generator=torch.Generator().manual_seed(0),
    )
    assert torch.equal(head.old_weight, old) and torch.equal(head.eta, eta)
    predicted = head(mean).argmax(1)  # [3] each class mean to its own row
    assert predicted.tolist() == [0, 1, 2]
