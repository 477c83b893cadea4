"""Class means, BN-statistics matching and Class Impression synthesis."""

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fl_ci.config import SynthesisConfig
from fl_ci.data.base import ImageData
from fl_ci.synthesis import (
    BNStatsRecorder,
    ClassMeans,
    MissingMeanError,
    SynthesisError,
    bn_matching_loss,
    feature_mean_gap,
    image_l2,
    lr_at,
    synthesize,
    total_variation,
)

SHAPE = (3, 8, 8)
LOW, HIGH = torch.full((3,), -2.0), torch.full((3,), 2.0)


def conv_bn_net(classes: int = 3) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, stride=2, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, classes),
    )


def bright_channel_batch(n: int, generator: torch.Generator):
    """Class k = channel k brighter by 2: random but separable."""
    y = torch.randint(0, 3, (n,), generator=generator)
    x = torch.randn(n, *SHAPE, generator=generator)
    return x + 2 * F.one_hot(y, 3).float()[:, :, None, None], y


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def teacher(one_thread) -> nn.Module:
    torch.manual_seed(0)
    net = conv_bn_net()
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    for _ in range(30):  # non-trivial running statistics and a usable classifier
        x, y = bright_channel_batch(32, g)
        opt.zero_grad()
        F.cross_entropy(net(x), y).backward()
        opt.step()
    return net.eval()


def cfg(**changes) -> SynthesisConfig:
    # no feature matching: these tests have no real feature statistics to match
    base = dict(
        iterations=20, per_class=4, lr=0.1, warmup=5, init="random", feature_weight=0.0
    )
    return SynthesisConfig(**{**base, **changes})


def run(net, classes=(0, 1, 2), config=None, **kwargs):
    kwargs = {"image_shape": SHAPE, "bounds": (LOW, HIGH), "seed": 0, **kwargs}
    return synthesize(net, list(classes), config or cfg(), progress=False, **kwargs)


# ----- class means ------------------------------------------------------------------


def cines(values: list[list[int]], labels: list[int]) -> ImageData:
    """One-pixel grayscale cines, a value per frame; normalised v/255 -> 2v - 1."""
    frames = torch.tensor(values, dtype=torch.uint8).view(len(values), -1, 1, 1, 1)
    n = len(values)
    ids = torch.arange(n)
    return ImageData(frames, torch.tensor(labels), ids, ids, (0.5,), (0.5,))


def test_class_mean_averages_all_frames_of_each_cine_normalised():
    # class 0: cine frames (0, 255) -> (-1, 1) -> 0; cine (51, 51) -> -0.6; mean -0.3
    # class 1: cine (255, 255) -> 1
    data = cines([[0, 255], [51, 51], [255, 255]], [0, 0, 1])
    means = ClassMeans.from_data(data)
    assert means.counts.tolist() == [2, 1]
    assert torch.allclose(means.means().flatten(), torch.tensor([-0.3, 1.0]))


def test_class_mean_from_data_keeps_only_requested_classes():
    data = cines([[0, 255], [51, 51], [255, 255]], [0, 0, 1])
    assert ClassMeans.from_data(data, classes=[1]).counts.tolist() == [0, 1]


def one_pixel(values: list[float], counts: list[int]) -> ClassMeans:
    """ClassMeans of 1x1x1 images with the given per-class means and counts."""
    c = torch.tensor(counts, dtype=torch.int64)
    sums = torch.tensor(values, dtype=torch.float64) * c
    return ClassMeans(sums.view(-1, 1, 1, 1), c)


def test_merge_is_count_weighted_and_grows_classes():
    # class 0: (1 * 1 + 3 * 4) / 4 = 3.25; class 1 only at site b
    merged = one_pixel([1.0], [1]).merge(one_pixel([4.0, 7.0], [3, 2]))
    assert merged.counts.tolist() == [4, 2]
    assert torch.allclose(merged.means().flatten(), torch.tensor([3.25, 7.0]))


def test_sum_of_sites_equals_merge():
    a, b = one_pixel([1.0], [1]), one_pixel([4.0, 7.0], [3, 2])
    assert torch.equal(sum([a, b]).sums, (a + b).sums)


def test_means_of_class_without_images_raises_naming_it():
    means = one_pixel([1.0, 0.0, 2.0], [3, 0, 1])
    with pytest.raises(MissingMeanError, match="class 1"):
        means.means([0, 1])


def test_available_and_restricted_apply_the_privacy_floor():
    means = one_pixel([1.0, 2.0, 0.0], [5, 2, 0])
    assert means.available() == [0, 1]
    assert means.available(3) == [0]
    kept = means.restricted(3)
    assert kept.counts.tolist() == [5, 0, 0]
    assert kept.sums.flatten().tolist() == [5.0, 0.0, 0.0]


def test_noise_moves_each_shared_mean_by_std_and_leaves_absent_classes():
    counts = torch.tensor([4, 0])
    means = ClassMeans(torch.zeros(2, 1, 60, 60, dtype=torch.float64), counts)
    noisy = means.with_noise(0.5, torch.Generator().manual_seed(0))
    assert noisy.means([0]).std().item() == pytest.approx(0.5, rel=0.05)
    assert noisy.counts.tolist() == [4, 0] and not noisy.sums[1].any()


def test_arrays_round_trip_exactly():
    means = one_pixel([1.5, -2.0], [3, 7])
    arrays = means.to_arrays()
    assert arrays["sums"].dtype == np.float64 and arrays["counts"].dtype == np.int64
    back = ClassMeans.from_arrays(arrays)
    assert torch.equal(back.sums, means.sums) and torch.equal(back.counts, means.counts)


def test_from_arrays_rejects_lossy_dtypes():
    arrays = one_pixel([1.5], [3]).to_arrays()
    with pytest.raises(ValueError, match="float64"):
        ClassMeans.from_arrays({**arrays, "sums": arrays["sums"].astype(np.float32)})


# ----- BN statistics ----------------------------------------------------------------


class ShortcutBlock(nn.Module):
    """conv-BN main path plus a 1x1 conv-BN shortcut, as in a ResNet down-sampling."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.short, self.short_bn = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x)) + self.short_bn(self.short(x))


def biased_stats(h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return h.mean((0, 2, 3)), ((h - h.mean((0, 2, 3), keepdim=True)) ** 2).mean(
        (0, 2, 3)
    )


def test_recorder_captures_input_statistics_of_every_bn_including_shortcut():
    torch.manual_seed(0)
    block, x = ShortcutBlock().eval(), torch.randn(5, 3, 6, 6)
    with BNStatsRecorder(block) as bn, torch.no_grad():
        block(x)
        recorded = bn.batch_stats()
    with torch.no_grad():
        expected = [biased_stats(block.conv(x)), biased_stats(block.short(x))]
    assert len(recorded) == 2
    for (mean, var), (mean_ref, var_ref) in zip(recorded, expected, strict=True):
        assert torch.allclose(mean, mean_ref, atol=1e-6)
        assert torch.allclose(var, var_ref, atol=1e-6)


def test_recorder_removes_its_hooks_on_exit():
    block = ShortcutBlock()
    with BNStatsRecorder(block):
        assert len(block.bn._forward_hooks) == 1
    assert len(block.bn._forward_hooks) == 0 and len(block.short_bn._forward_hooks) == 0


def test_bn_matching_loss_hand_value():
    # layer 0 (r_1 = 10): ‖[1,2] − [1,0]‖ + ‖[3,4] − 0‖ = 2 + 5 -> 70
    # layer 1 (r = 1):    ‖[3] − [0]‖ + ‖[1] − [1]‖ = 3
    batch = [(torch.tensor([1.0, 2.0]), torch.tensor([3.0, 4.0]))]
    batch += [(torch.tensor([3.0]), torch.tensor([1.0]))]
    running = [(torch.tensor([1.0, 0.0]), torch.zeros(2))]
    running += [(torch.tensor([0.0]), torch.tensor([1.0]))]
    assert bn_matching_loss(batch, running, first_bn_weight=10.0).item() == 73.0


def test_recorder_rejects_model_without_batchnorm():
    with pytest.raises(ValueError, match="BatchNorm2d"):
        BNStatsRecorder(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()))


# ----- image priors and schedule ----------------------------------------------------


def test_total_variation_of_2x2_image():
    # [[0, 1], [2, 3]]: horizontal (-1, -1) -> √2; vertical (-2, -2) -> 2√2;
    # diagonal 0 - 3 -> 3; anti-diagonal 2 - 1 -> 1; total 3√2 + 4
    x = torch.tensor([[[[0.0, 1.0], [2.0, 3.0]]]])
    assert total_variation(x).item() == pytest.approx(3 * math.sqrt(2) + 4)


def test_total_variation_is_a_per_image_mean():
    # a flat second image has TV 0: the batch mean halves the first image's value
    x = torch.tensor([[[[0.0, 1.0], [2.0, 3.0]]], [[[5.0, 5.0], [5.0, 5.0]]]])
    assert total_variation(x).item() == pytest.approx((3 * math.sqrt(2) + 4) / 2)


def test_image_l2_is_mean_of_per_image_norms():
    # ‖(3, 4)‖ = 5 and ‖0‖ = 0 -> 2.5
    x = torch.tensor([[[[3.0, 4.0]]], [[[0.0, 0.0]]]])
    assert image_l2(x).item() == pytest.approx(2.5)


def test_learning_rate_warms_up_linearly_then_decays_by_cosine():
    c = SynthesisConfig(lr=1.0, warmup=4, iterations=20, lr_peak=1.0)
    # warm-up (t+1)/4; then 0.5 (1 + cos(π (t − 4) / 16))
    assert [lr_at(t, c) for t in (0, 3, 4, 12)] == pytest.approx([0.25, 1, 1, 0.5])
    assert lr_at(19, c) == pytest.approx(0.5 * (1 + math.cos(15 / 16 * math.pi)))


def test_warm_up_is_at_most_a_fifth_of_a_short_run():
    c = SynthesisConfig(lr=1.0, warmup=100, iterations=50, lr_peak=1.0)
    # warm-up capped at 10 steps: peak at step 9, then cosine over the other 40
    assert [lr_at(t, c) for t in (0, 9, 30)] == pytest.approx([0.1, 1, 0.5])


def test_lr_peak_04_is_upstream_class_impression_schedule():
    # upstream utils.lr_cosine_policy, transcribed: (e + 1) / w · lr during the warm-up,
    # then 0.2 · (1 + cos(π (e − w) / (T − w))) · lr; w = 100 of T = 600 (no cap)
    c = SynthesisConfig(lr=0.25, warmup=100, iterations=600, lr_peak=0.4)

    def upstream(e: int, w: int = 100, t: int = 600, lr: float = 0.25) -> float:
        if e < w:
            return lr * (e + 1) / w
        return 0.2 * (1 + math.cos(math.pi * (e - w) / (t - w))) * lr

    steps = (0, 50, 99, 100, 101, 350, 599)
    assert [lr_at(e, c) for e in steps] == pytest.approx([upstream(e) for e in steps])
    assert lr_at(100, c) == pytest.approx(0.4 * 0.25)  # the drop after the warm-up


def test_lr_peak_1_keeps_the_half_cosine():
    c = SynthesisConfig(lr=1.0, warmup=4, iterations=20, lr_peak=1.0)
    assert lr_at(4, c) == 1.0


def test_batch_total_variation_is_upstream_frobenius_over_the_batch():
    # upstream get_image_prior_losses: Σ_d ‖Δ_d X‖ with one norm over the batch.
    # Image 0 [[0, 1], [2, 3]]: squared differences h 1, 1; v 4, 4; d 9; a 1.
    # Image 1 [[0, 2], [0, 2]]: h 4, 4; v 0, 0; d 4 (0 − 2); a 4 (0 − 2).
    # Batch: sqrt(2 + 8) + sqrt(8 + 0) + sqrt(9 + 4) + sqrt(1 + 4)
    x = torch.tensor([[[[0.0, 1.0], [2.0, 3.0]]], [[[0.0, 2.0], [0.0, 2.0]]]])
    expected = math.sqrt(10) + math.sqrt(8) + math.sqrt(13) + math.sqrt(5)
    assert total_variation(x, "batch").item() == pytest.approx(expected)
    # per image: ((√2 + 2√2 + 3 + 1) + (2√2 + 0 + 2 + 2)) / 2
    per_image = (3 * math.sqrt(2) + 4 + 2 * math.sqrt(2) + 4) / 2
    assert total_variation(x).item() == pytest.approx(per_image)


def test_batch_total_variation_grows_as_sqrt_batch_for_copies():
    x = torch.randn(1, 2, 5, 5).repeat(9, 1, 1, 1)
    assert total_variation(x, "batch").item() == pytest.approx(
        3 * total_variation(x).item(), rel=1e-5
    )


def test_total_variation_rejects_unknown_form():
    with pytest.raises(ValueError, match="per_image"):
        total_variation(torch.zeros(1, 1, 2, 2), "frobenius")


def test_tv_form_batch_reaches_the_objective(teacher):
    # the reported raw TV term at the first iterate follows the form
    per_image = run(teacher, config=cfg(iterations=1)).report.initial["tv"]
    batch = run(teacher, config=cfg(iterations=1, tv_form="batch")).report.initial["tv"]
    assert batch > per_image * 1.5


# ----- synthesis --------------------------------------------------------------------


def test_images_stay_within_each_channels_bounds(teacher):
    low, high = torch.tensor([-0.5, -1.0, 0.0]), torch.tensor([0.5, 0.2, 1.5])
    images, _, _ = run(teacher, config=cfg(lr=1.0), bounds=(low, high))
    per_channel = images.transpose(0, 1).flatten(1)  # [C, N*H*W]
    assert (per_channel.min(1).values >= low).all()
    assert (per_channel.max(1).values <= high).all()


def test_labels_are_balanced_per_class(teacher):
    _, labels, _ = run(teacher, classes=(0, 2), config=cfg(per_class=5, iterations=2))
    assert torch.bincount(labels, minlength=3).tolist() == [5, 0, 5]


def test_chunks_are_balanced_and_cover_all_images(teacher):
    config = cfg(per_class=5, batch_size=4, iterations=2)
    images, labels, report = run(teacher, config=config)
    assert report.chunks == 4 and images.shape == (15, *SHAPE)  # 4 + 4 + 4 + 3
    for chunk in labels.split(4):
        counts = torch.bincount(chunk, minlength=3)
        assert counts.max() - counts.min() <= 1


def test_mean_init_without_noise_starts_at_the_class_means(teacher):
    means = torch.stack([torch.full(SHAPE, v) for v in (-1.0, 0.0, 1.0)])  # class k
    config = cfg(init="mean", init_noise=0.0, iterations=1)
    images, labels, _ = run(teacher, config=config, means=means)
    assert torch.equal(images, means[labels])  # the only iterate scored is the init


def test_mean_init_noise_has_the_configured_std(teacher):
    means = torch.stack([torch.full(SHAPE, v) for v in (-1.0, 0.0, 1.0)])
    config = cfg(init="mean", init_noise=0.1, iterations=1, per_class=10)
    images, labels, _ = run(teacher, config=config, means=means)
    assert (images - means[labels]).std().item() == pytest.approx(0.1, rel=0.1)


def test_mean_init_accepts_class_means_indexed_by_class_id(teacher):
    # four classes with means 0, 0.5, 1, 1.5; synthesise classes 0 and 2 only
    sums = 0.5 * torch.arange(4, dtype=torch.float64).view(4, 1, 1, 1)
    means = ClassMeans(sums.expand(4, *SHAPE).clone(), torch.ones(4, dtype=torch.int64))
    config = cfg(init="mean", init_noise=0.0, iterations=1, per_class=1)
    images, labels, _ = run(teacher, classes=(0, 2), config=config, means=means)
    assert labels.tolist() == [0, 2]
    assert images.mean((1, 2, 3)).tolist() == [0.0, 1.0]


def test_optimisation_lowers_teacher_cross_entropy(teacher):
    config = cfg(bn_weight=0.01, tv_weight=0.0, l2_weight=0.0, iterations=40)
    init, labels, _ = run(teacher, config=cfg(iterations=1))  # same seed: same init
    images, labels_after, report = run(teacher, config=config)
    with torch.no_grad():
        ce_init = F.cross_entropy(teacher(init), labels).item()
        ce_after = F.cross_entropy(teacher(images), labels_after).item()
    assert ce_after < 0.5 * ce_init
    assert report.final["total"] < report.initial["total"]


def test_same_seed_gives_same_images_and_other_seed_differs(teacher):
    a, _, _ = run(teacher, seed=3)
    b, _, _ = run(teacher, seed=3)
    c, _, _ = run(teacher, seed=4)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_teacher_is_left_as_it_was():
    torch.manual_seed(0)
    net = conv_bn_net().train()
    net[0].weight.requires_grad_(False)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    run(net)
    assert net.training and all(m.training for m in net.modules())
    assert not net[0].weight.requires_grad and net[0].bias.requires_grad
    for key, value in net.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_model_without_batchnorm_is_refused():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.LazyLinear(3))
    with pytest.raises(ValueError, match="BatchNorm2d"):
        run(net)


def test_missing_class_mean_is_named(teacher):
    means = ClassMeans(
        torch.zeros(3, *SHAPE, dtype=torch.float64), torch.tensor([2, 0, 2])
    )
    with pytest.raises(MissingMeanError, match="class 1"):
        run(teacher, config=cfg(init="mean"), means=means)


def test_non_finite_mean_row_is_named(teacher):
    means = torch.zeros(3, *SHAPE)
    means[2] = math.nan
    with pytest.raises(MissingMeanError, match="class 2"):
        run(teacher, config=cfg(init="mean"), means=means)


def test_mean_init_without_means_is_refused(teacher):
    with pytest.raises(MissingMeanError, match="needs class means"):
        run(teacher, config=cfg(init="mean"))


def test_non_finite_loss_stops_with_an_error():
    net = conv_bn_net().eval()
    with torch.no_grad():
        net[-1].weight.fill_(math.nan)
    with pytest.raises(SynthesisError, match="non-finite"):
        run(net, config=cfg(iterations=3))


# ----- matching real feature statistics (synthesis.feature_weight) -----------------


def test_feature_mean_gap_hand_value():
    # class 0's features average (2, 0), its target exactly; class 1's (0, 2)
    # against (0, 1): relative squared gap 1; the mean over the two classes is 0.5
    features = torch.tensor([[1.0, 0.0], [3.0, 0.0], [0.0, 2.0]])
    targets = torch.tensor([[2.0, 0.0], [0.0, 1.0], [5.0, 5.0]])  # class 2 absent
    gap = feature_mean_gap(features, torch.tensor([0, 0, 1]), targets)
    assert gap.item() == pytest.approx(0.5)


class WithFeatures(nn.Module):
    """The fixture's teacher as the models expose it: features, then the linear head."""

    def __init__(self, net: nn.Sequential) -> None:
        super().__init__()
        self.body, self.fc = net[:-1], net[-1]

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)  # [B, 8]

    def forward_all(self, x: torch.Tensor) -> SimpleNamespace:
        f = self.body(x)
        return SimpleNamespace(features=f, logits=self.fc(f))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.body(x))


def test_feature_weight_pulls_impression_features_towards_the_real_means(teacher):
    net = WithFeatures(teacher)
    x, y = bright_channel_batch(60, torch.Generator().manual_seed(1))
    with torch.no_grad():
        real = net.features(x)  # [60, 8] "real" features
    targets = torch.stack([real[y == c].mean(0) for c in range(3)])  # [3, 8]

    def gap(weight: float) -> float:
        config = cfg(iterations=40, feature_weight=weight)
        images, labels, _ = run(net, config=config, feature_means=targets)
        with torch.no_grad():
            return feature_mean_gap(net.features(images), labels, targets).item()

    assert gap(100.0) < 0.5 * gap(0.0)


def test_feature_weight_without_feature_means_is_refused(teacher):
    with pytest.raises(ValueError, match="feature means"):
        run(teacher, config=cfg(feature_weight=1.0))
