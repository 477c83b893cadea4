"""Upstream forms behind switches, each against an independent re-computation of the
upstream formula on small tensors (docs/results.md, "Fidelity to upstream").

Upstream sources: Class Impression = sanaAyrml/Class-Impresion-for-Data-free-
Incremental-Learning (incremental_train_and_eval.py); ABD = GT-RIPL/AlwaysBeDreaming-
DFCIL (models/generator.py, learners/datafree_helper.py, learners/default.py). The
synthesis switches (lr_peak, tv_form) are tested in test_synthesis.py.
"""

import math
from types import SimpleNamespace

import pytest
import torch

from fl_ci.config import BaselinesConfig, Config, ConfigError
from fl_ci.losses import CentroidTracker, contrastive_loss, kd_loss
from fl_ci.methods.abd import Generator, build_generator, gaussian_blur
from fl_ci.methods.base import Batch
from fl_ci.methods.class_impression import ClassImpression, margin_anchors
from fl_ci.methods.deepinversion import padded_kd
from fl_ci.methods.lwf import ce_with_kd
from fl_ci.models import NetOutput

# ----- defaults stay as they were ---------------------------------------------------


def test_switch_defaults_are_todays_behaviour():
    cfg = Config()
    # lr_peak became upstream's 0.4 after it won on validation (issue 13)
    assert cfg.synthesis.lr_peak == 0.4 and cfg.synthesis.tv_form == "per_image"
    assert cfg.ci.centroid_form == "seen" and cfg.ci.margin_anchors == "synthetic"
    assert cfg.ci.contrastive_weight == 0.1
    assert cfg.baselines.kd_t2 is True
    assert cfg.baselines.abd_bn_eps == 1e-5 and cfg.baselines.abd_blur_sigma == 1.0


@pytest.mark.parametrize(
    "key, value",
    [
        ("synthesis.tv_form", '"frobenius"'),
        ("synthesis.lr_peak", "0"),
        ("ci.centroid_form", '"zero"'),
        ("ci.margin_anchors", '"all"'),
        ("baselines.abd_bn_eps", "0"),
        ("baselines.abd_blur_sigma", "-1"),
    ],
)
def test_switches_refuse_bad_values(key, value):
    with pytest.raises(ConfigError, match=key):
        Config().with_overrides([f"{key}={value}"])


# ----- margin anchors -----------------------------------------------------------------


def _out(scores: torch.Tensor) -> NetOutput:
    b = scores.shape[0]
    return NetOutput(torch.zeros(b, 1, 1, 1), torch.ones(b, 2), scores, 10 * scores)


def test_margin_old_rows_is_upstream_margin_ranking_over_every_old_label():
    # 2 old classes (0, 1), 2 new (2, 3); rows: synthetic class 0, REAL class 1 (a site
    # holding real old-class images), real new class 2.
    scores = torch.tensor(
        [[0.9, 0.1, 0.5, 0.8], [0.2, 0.6, 0.7, 0.3], [0.1, 0.1, 0.9, 0.2]]
    )
    batch = Batch(
        torch.zeros(3, 1, 2, 2), torch.tensor([0, 1, 2]), torch.tensor([1, 0, 0]) > 0
    )
    assert margin_anchors(batch, 2, "synthetic").tolist() == [True, False, False]
    assert margin_anchors(batch, 2, "old_rows").tolist() == [True, True, False]
    # upstream MarginRankingLoss(margin=m)(gt, top-1 novel, 1) over rows y < n_old:
    # mean max(0, m − (gt − novel)): row 0: 0.7 − (0.9 − 0.8) = 0.6;
    # row 1: 0.7 − (0.6 − 0.7) = 0.8 -> 0.7. Synthetic only: 0.6.
    ctx = SimpleNamespace(num_old=2, new_classes=[2, 3], num_classes=4)
    for anchors, expected in (("old_rows", 0.7), ("synthetic", 0.6)):
        cfg = Config().with_overrides(
            [
                "ci.distill_weight=0",
                "ci.contrastive_weight=0",
                "ci.class_weights=false",
                f'ci.margin_anchors="{anchors}"',
            ]
        )
        method = ClassImpression(cfg)
        out = _out(scores)
        total, terms = method.loss(None, batch, out, out, ctx)
        assert terms["margin"].item() == pytest.approx(expected)
        assert (total - terms["ce"]).item() == pytest.approx(expected)


# ----- contrastive centroids ----------------------------------------------------------


def _upstream_contrastive(batches, k, rho, tau):
    """Upstream's loop, re-derived: zero centroids, every class updated by its batch
    mean (0 when absent), c / (‖c‖ + 1e-10), −log Σ diag e^{sim} + log Σ e^{sim}."""
    s_c = [[0.0] * k for _ in range(k)]
    t_c = [[0.0] * k for _ in range(k)]
    for (sv, sy), (tv, ty) in batches:
        for cent, vecs, labels in ((s_c, sv, sy), (t_c, tv, ty)):
            for i in range(k):
                rows = [v for v, y in zip(vecs, labels, strict=True) if y == i]
                cols = zip(*rows, strict=True)
                mean = [sum(c) / len(rows) for c in cols] if rows else [0.0] * k
                old = cent[i]
                cent[i] = [
                    (1 - rho) * a + rho * m for a, m in zip(old, mean, strict=True)
                ]

    def unit(v):
        n = math.sqrt(sum(a * a for a in v))
        return [a / (n + 1e-10) for a in v]

    tn, sn = [unit(v) for v in t_c], [unit(v) for v in s_c]

    def dot(u, v):
        return sum(a * b for a, b in zip(u, v, strict=True))

    res = [[math.exp(dot(t, s) / tau) for s in sn] for t in tn]
    diag = sum(res[i][i] for i in range(k))
    return -math.log(diag) + math.log(sum(map(sum, res)))


def test_zero_init_centroids_match_upstream_contrastive_loss():
    # 3 classes (D = K = 3 as upstream's score vectors); class 2 never seen as source;
    # class 1 absent from the second batch (decays); class 0 never a pseudo-label.
    b1_s = ([[1.0, 0.2, 0.0], [0.1, 0.9, 0.3]], [0, 1])
    b1_t = ([[0.2, 1.0, 0.1], [0.0, 0.3, 0.8]], [1, 2])
    b2_s = ([[0.7, -0.2, 0.4], [0.5, 0.1, 0.1]], [0, 0])
    b2_t = ([[0.3, 0.9, 0.0]], [1])
    rho, tau = 0.9, 1.0
    expected = _upstream_contrastive([(b1_s, b1_t), (b2_s, b2_t)], 3, rho, tau)

    src = CentroidTracker(3, rho, form="zero_init")
    tgt = CentroidTracker(3, rho, form="zero_init")
    for (sv, sy), (tv, ty) in ((b1_s, b1_t), (b2_s, b2_t)):
        s = src.update(torch.tensor(sv), torch.tensor(sy))
        t = tgt.update(torch.tensor(tv), torch.tensor(ty))
    present = src.seen & tgt.seen
    assert present.all()  # every class row enters the loss, zero rows included
    loss = contrastive_loss(t, s, present, tau, "pooled", norm_eps=1e-10)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    # ours drops rows not seen in both domains and so differs here
    ours_s, ours_t = CentroidTracker(3, rho), CentroidTracker(3, rho)
    for (sv, sy), (tv, ty) in ((b1_s, b1_t), (b2_s, b2_t)):
        s = ours_s.update(torch.tensor(sv), torch.tensor(sy))
        t = ours_t.update(torch.tensor(tv), torch.tensor(ty))
    ours = contrastive_loss(t, s, ours_s.seen & ours_t.seen, tau)
    assert abs(ours.item() - expected) > 1e-3


def test_zero_init_first_update_is_rho_times_batch_mean_and_absent_decays():
    tracker = CentroidTracker(2, 0.25, form="zero_init")
    tracker.update(torch.tensor([[4.0, 0.0]]), torch.tensor([0]))
    out = tracker.update(torch.tensor([[0.0, 8.0]]), torch.tensor([1]))
    # class 0: 0.25 * [4, 0] = [1, 0], then absent: 0.75 * [1, 0]; class 1: 0.25 * 8
    assert torch.allclose(out, torch.tensor([[0.75, 0.0], [0.0, 2.0]]))


def test_centroid_tracker_rejects_unknown_form():
    with pytest.raises(ValueError, match="zero_init"):
        CentroidTracker(2, 0.5, form="zeros")


def test_class_impression_builds_trackers_of_the_chosen_form():
    cfg = Config().with_overrides(['ci.centroid_form="zero_init"'])
    method = ClassImpression(cfg)
    method.begin_epoch(SimpleNamespace(num_classes=3))
    assert method.source.form == method.target.form == "zero_init"


# ----- KD without T² (ABD's loss_fn_kd) ---------------------------------------------


def _soft_ce_grad(student, target_probs, t):
    """d/dz of mean_b −Σ_k q_k log softmax(z/T)_k, by hand: (softmax(z/T) − q) / (T B)."""
    return (torch.softmax(student / t, dim=1) - target_probs) / (t * student.shape[0])


def test_kd_without_t2_has_abds_soft_cross_entropy_gradient():
    student = torch.tensor([[0.5, -1.0, 2.0], [1.0, 0.0, -0.5]], requires_grad=True)
    teacher = torch.tensor([[1.0, 0.0, 0.5], [-1.0, 2.0, 0.0]])
    t = 2.0
    q = torch.softmax(teacher / t, dim=1)
    kd_loss(student, teacher, t, t_squared=False).backward()
    assert torch.allclose(student.grad, _soft_ce_grad(student.detach(), q, t))
    # value: ABD's soft CE minus the teacher's entropy (a constant)
    ce = -(q * torch.log_softmax(student.detach() / t, dim=1)).sum(1).mean()
    entropy = -(q * q.log()).sum(1).mean()
    value = kd_loss(student.detach(), teacher, t, t_squared=False)
    assert value.item() == pytest.approx((ce - entropy).item(), rel=1e-5)
    # with T² (ours, the default) it is exactly T² times that
    assert kd_loss(student.detach(), teacher, t).item() == pytest.approx(
        t * t * value.item(), rel=1e-6
    )


def test_padded_kd_without_t2_has_abds_kd_new_gradient():
    # ABD's "KD new": targets softmax(z*/T) over the old classes padded with zeros for
    # the new ones, student log-softmax over all classes, no T².
    student = torch.tensor([[0.5, -1.0, 2.0, 0.3]], requires_grad=True)
    teacher = torch.tensor([[1.0, 0.0]])
    t = 2.0
    q = torch.cat([torch.softmax(teacher / t, dim=1), torch.zeros(1, 2)], dim=1)
    padded_kd(student, teacher, t, t_squared=False).backward()
    assert torch.allclose(student.grad, _soft_ce_grad(student.detach(), q, t))
    with_t2 = padded_kd(student.detach(), teacher, t)
    without = padded_kd(student.detach(), teacher, t, t_squared=False)
    assert with_t2.item() == pytest.approx(4 * without.item(), rel=1e-6)


def test_lwf_kd_term_follows_the_switch():
    student = torch.tensor([[0.5, -1.0, 2.0]])
    teacher = torch.tensor([[1.0, 0.0]])
    batch = Batch(torch.zeros(1, 1, 2, 2), torch.tensor([2]), torch.tensor([False]))
    out = NetOutput(None, None, student, student)
    t_out = NetOutput(None, None, teacher, teacher)
    kd = {}
    for flag in (True, False):
        cfg = Config().with_overrides([f"baselines.kd_t2={str(flag).lower()}"])
        kd[flag] = ce_with_kd(cfg, batch, out, t_out)[1]["kd"].item()
    assert kd[True] == pytest.approx(4 * kd[False], rel=1e-6)


# ----- ABD's generator -----------------------------------------------------------------


def test_abd_bn_eps_sets_the_two_conv_block_batchnorms_as_upstream():
    # ABD's models/generator.py: BatchNorm2d(128) first (eps 1e-5), BatchNorm2d(128,
    # 0.8) and BatchNorm2d(64, 0.8) in the conv blocks, the last one affine-free 1e-5.
    bcfg = BaselinesConfig(abd_z_dim=8, abd_width=4, abd_bn_eps=0.8)
    gen = build_generator(bcfg, channels=1, size=8)
    bns = [m for m in gen.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert [bn.eps for bn in bns] == [1e-5, 0.8, 0.8, 1e-5]
    # the conv block's output is (x − μ) / sqrt(σ² + 0.8), re-computed by hand
    seen = {}
    gen.block1[1].register_forward_hook(lambda m, i, o: seen.update(x=i[0], y=o))
    torch.manual_seed(0)
    gen.train()(torch.randn(6, 8))
    x = seen["x"]
    mean = x.mean(dim=(0, 2, 3), keepdim=True)
    var = ((x - mean) ** 2).mean(dim=(0, 2, 3), keepdim=True)
    assert torch.allclose(seen["y"], (x - mean) / torch.sqrt(var + 0.8), atol=1e-6)


def test_abd_default_generator_keeps_torch_eps():
    gen = Generator(8, 1, 8, 4)
    assert {m.eps for m in gen.modules() if isinstance(m, torch.nn.BatchNorm2d)} == {
        1e-5
    }


def test_blur_sigma_sqrt2_is_abds_gaussian_smoothing():
    # ABD's Gaussiansmoothing(3, 5, 1), re-derived: 5x5 kernel ∝ Π_d exp(−((i − 2) /
    # (2·1))²), normalised to sum 1, on a reflect-padded (2 px) image, per channel.
    torch.manual_seed(0)
    x = torch.randn(1, 2, 6, 7)
    k1 = [math.exp(-(((i - 2) / 2.0) ** 2)) for i in range(5)]
    norm = sum(k1) ** 2
    pad = torch.nn.functional.pad(x, (2, 2, 2, 2), mode="reflect")
    expected = torch.zeros_like(x)
    for c in range(2):
        for r in range(6):
            for q in range(7):
                expected[0, c, r, q] = (
                    sum(
                        k1[a] * k1[b] * pad[0, c, r + a, q + b]
                        for a in range(5)
                        for b in range(5)
                    )
                    / norm
                )
    ours = gaussian_blur(x, sigma=math.sqrt(2))
    assert torch.allclose(ours, expected, atol=1e-5)
    assert not torch.allclose(gaussian_blur(x), expected, atol=1e-3)  # σ = 1 differs
