"""Privacy accounting (fl_ci/privacy.py) against values worked out by hand, an
independent numerical integral, and the figures in the shared reliability notes."""

import json
import math

import dp_accounting
import numpy as np
import pytest
import torch

from fl_ci.config import Config
from fl_ci.data.base import normalize
from fl_ci.data.cifar100 import CIFAR100_STD
from fl_ci.privacy import (
    DEFAULT_DELTA,
    DEFAULT_ORDERS,
    central_dp_epsilon,
    central_dp_summary,
    class_mean_epsilon,
    class_mean_noise_std,
    fedavg_event,
    fedavg_mu,
    gaussian_rdp,
    gdp_delta,
    gdp_epsilon,
    gdp_mu,
    image_radius,
    mu_epsilon,
    rdp_to_dp,
)

L = math.log(1 / 1e-5)  # 11.512925


# ----- Rényi DP ------------------------------------------------------------------------
def test_gaussian_rdp_is_alpha_over_two_z_squared():
    assert gaussian_rdp(2.0, [2.0, 10.0]) == pytest.approx([0.25, 1.25])
    assert np.isinf(gaussian_rdp(0.0, [2.0])).all()
    with pytest.raises(ValueError):
        gaussian_rdp(1.0, [1.0])  # order 1 is not an RDP order here


def test_mironov_conversion_at_two_orders_by_hand():
    """z = 1, δ = 1e-5: α = 2 gives 1 + 11.5129 = 12.5129; α = 32 gives
    16 + 11.5129/31 = 16.3714; the minimum is 12.5129."""
    orders = [2.0, 32.0]
    eps = rdp_to_dp(gaussian_rdp(1.0, orders), orders, 1e-5, conversion="mironov")
    assert eps == pytest.approx(1 + L, abs=1e-9)


def test_mironov_conversion_on_the_fine_grid_meets_the_closed_form_minimum():
    """min over real α of α/(2z²) + L/(α−1) is 1/(2z²) + sqrt(2L)/z, at
    α = 1 + z·sqrt(2L). z = 1: 0.5 + sqrt(23.0259) = 0.5 + 4.7985 = 5.2985."""
    rdp = gaussian_rdp(1.0, DEFAULT_ORDERS)
    eps = rdp_to_dp(rdp, DEFAULT_ORDERS, 1e-5, conversion="mironov")
    assert eps == pytest.approx(5.2985, abs=2e-3)
    assert eps >= 0.5 + math.sqrt(2 * L) - 1e-12  # a grid never beats the minimum


def test_cks_conversion_at_one_order_by_hand():
    """α = 6, z = 1: rdp 3; log(5/6) = −0.18232; −(log 1e-5 + log 6)/5 =
    −(−11.51293 + 1.79176)/5 = 1.94423; ε = 3 − 0.18232 + 1.94423 = 4.76191."""
    eps = rdp_to_dp(gaussian_rdp(1.0, [6.0]), [6.0], 1e-5)
    assert eps == pytest.approx(4.76191, abs=1e-4)


# ----- exact Gaussian DP ---------------------------------------------------------------
def _delta_by_integration(mu, eps):
    """δ(ε) = E_P[(1 − e^(ε − L))₊] with the privacy loss L ~ N(mu²/2, mu²) under
    P = N(mu, 1) against Q = N(0, 1): a numerical integral, not the closed form."""
    x = np.linspace(-12, 12, 400_001)
    loss = mu * mu / 2 + mu * x
    density = np.exp(-x * x / 2) / math.sqrt(2 * math.pi)
    gain = np.clip(1 - np.exp(np.minimum(eps - loss, 50)), 0, None)
    return float(np.sum(gain * density) * (x[1] - x[0]))


@pytest.mark.parametrize("mu, eps", [(1.0, 1.0), (1.0, 4.0), (0.3, 0.5), (3.0, 8.0)])
def test_gdp_delta_matches_a_numerical_integral(mu, eps):
    assert gdp_delta(mu, eps) == pytest.approx(_delta_by_integration(mu, eps), rel=1e-6)


def test_delta_at_epsilon_zero_is_the_total_variation_distance():
    """ε = 0: δ = Φ(mu/2) − Φ(−mu/2) = 2Φ(0.5) − 1 = 0.38292 for mu = 1."""
    assert gdp_delta(1.0, 0.0) == pytest.approx(0.382925, abs=1e-6)
    assert gdp_epsilon(1.0, 0.4) == 0.0  # δ above the TV distance costs no ε


def test_one_round_z_1_delta_1e5():
    """z = 1, 1 round, δ = 1e-5: exact ε = 4.3772 (δ(4.3772) = 1e-5 by the
    integral above); RDP with the CKS conversion 4.73 and with Mironov's 5.2985 are
    upper bounds on it, in that order."""
    exact = central_dp_epsilon(1.0, 1, 1e-5)
    assert exact == pytest.approx(4.3772, abs=1e-3)
    assert _delta_by_integration(1.0, exact) == pytest.approx(1e-5, rel=1e-3)
    rdp = central_dp_epsilon(1.0, 1, 1e-5, accountant="rdp")
    mironov = rdp_to_dp(gaussian_rdp(1.0), DEFAULT_ORDERS, 1e-5, conversion="mironov")
    assert exact < rdp < mironov
    assert rdp == pytest.approx(4.7285, abs=1e-3)


def test_classic_gaussian_calibration_is_private_enough():
    """Dwork & Roth 2014, Theorem A.1: σ = Δ·sqrt(2 ln(1.25/δ))/ε gives (ε, δ)-DP for
    ε < 1; at ε = 0.5, δ = 1e-5 that is mu = 0.5/4.8448 = 0.1032, and the exact ε
    (0.39) must not exceed 0.5."""
    mu = 0.5 / math.sqrt(2 * math.log(1.25 / 1e-5))
    assert 0.3 < gdp_epsilon(mu, 1e-5) <= 0.5


# ----- central DP ----------------------------------------------------------------------
def test_central_epsilon_grows_with_rounds_and_shrinks_with_noise():
    by_rounds = [central_dp_epsilon(1.0, r) for r in (1, 10, 100)]
    assert by_rounds == sorted(by_rounds) and by_rounds[0] < by_rounds[-1]
    by_noise = [central_dp_epsilon(z, 50) for z in (0.5, 1.0, 2.0, 8.0)]
    assert by_noise == sorted(by_noise, reverse=True)
    assert central_dp_epsilon(1.0, 0) == 0.0
    assert math.isinf(central_dp_epsilon(0.0, 1))


def test_rounds_compose_like_one_round_with_sqrt_rounds_less_noise():
    """R rounds at z are exactly one round at z/sqrt(R) (Dong, Roth & Su, Cor. 3.3)."""
    assert central_dp_epsilon(2.0, 16) == pytest.approx(central_dp_epsilon(0.5, 1))
    # RDP composes the same way: 16 · α/(2·2²) = α/(2·0.5²)
    assert central_dp_epsilon(2.0, 16, accountant="rdp") == pytest.approx(
        central_dp_epsilon(0.5, 1, accountant="rdp")
    )


def test_a_round_with_fewer_sites_spends_more():
    """m = 3, z = 1: rounds with 3, 3, 2 sites are 1-, 1- and 1.5-GDP; total
    mu = sqrt(1 + 1 + 2.25) = 2.0616."""
    assert fedavg_mu(1.0, 3, [3, 3, 2]) == pytest.approx(math.sqrt(4.25))
    summary = central_dp_summary(1.0, 3, [3, 3, 2])
    assert summary["dp_delta"] == DEFAULT_DELTA == 1e-5
    assert summary["dp_rounds"] == 3
    assert summary["dp_epsilon"] == pytest.approx(gdp_epsilon(math.sqrt(4.25)))
    assert summary["dp_epsilon"] > central_dp_epsilon(1.0, 3)
    with pytest.raises(ValueError):
        fedavg_mu(1.0, 3, [4])


# ----- class means ---------------------------------------------------------------------
def test_class_mean_epsilon_is_inf_without_noise_and_falls_with_more_noise():
    assert math.isinf(class_mean_epsilon(0.0, 30, 10.0, 1e-5))
    eps = [class_mean_epsilon(s, 30, 10.0, 1e-5) for s in (0.5, 1.0, 2.0)]
    assert eps == sorted(eps, reverse=True)


def test_doubling_the_count_halves_the_sensitivity():
    """Sensitivity 2b/n: n → 2n is the same as σ → 2σ; ε falls by 2x (mu small,
    ε ≈ mu·sqrt(2L)) to 4x (mu large, ε ≈ mu²/2). b = 10, σ = 2: n = 30 gives
    mu = (20/30)/2 = 1/3 and ε = 1.2711; n = 60 gives mu = 1/6 and ε = 0.5945 (each
    checked against the integral: δ = 1e-5 at that ε)."""
    a = class_mean_epsilon(2.0, 30, 10.0, 1e-5)
    b = class_mean_epsilon(2.0, 60, 10.0, 1e-5)
    assert b == pytest.approx(class_mean_epsilon(4.0, 30, 10.0, 1e-5))
    assert a == pytest.approx(1.2711, abs=1e-3) and b == pytest.approx(0.5945, abs=1e-3)
    assert _delta_by_integration(1 / 3, 1.2711) == pytest.approx(1e-5, rel=1e-3)
    assert _delta_by_integration(1 / 6, 0.5945) == pytest.approx(1e-5, rel=1e-3)
    assert 2 < a / b < 4


def test_releases_compose_like_less_noise():
    """4 releases with fresh noise σ are one release with σ/2."""
    assert class_mean_epsilon(2.0, 30, 10.0, 1e-5, releases=4) == pytest.approx(
        class_mean_epsilon(1.0, 30, 10.0, 1e-5)
    )


def test_shared_notes_figures_for_means():
    """../shared/docs/reliability-and-metrics.md, δ = 1e-5, pixels in [0, 1]: a
    32×32×3 mean over n = 100 at ε = 1 needs noise std 2.07; an 8×8×3 mean over
    n = 500 at ε = 8 needs 0.017. Radius = half the box diameter: sqrt(3072)/2 and
    sqrt(192)/2."""
    assert class_mean_epsilon(2.07, 100, math.sqrt(3072) / 2) == pytest.approx(
        1.0, abs=0.01
    )
    assert class_mean_noise_std(1.0, 100, math.sqrt(3072) / 2) == pytest.approx(
        2.07, abs=0.005
    )
    assert class_mean_noise_std(8.0, 500, math.sqrt(192) / 2) == pytest.approx(
        0.017, abs=0.0005
    )


def test_image_radius_of_cifar100_by_hand_and_by_two_extreme_images():
    """1/0.26733² + 1/0.25644² + 1/0.27615² = 13.993 + 15.206 + 13.113 = 42.312;
    radius = sqrt(1024 · 42.312)/2 = 208.15/2 = 104.08."""
    r = image_radius(CIFAR100_STD, (3, 32, 32))
    assert r == pytest.approx(104.08, abs=0.01)
    black = torch.zeros(1, 3, 32, 32, dtype=torch.uint8)
    white = torch.full((1, 3, 32, 32), 255, dtype=torch.uint8)
    mean = (0.5, 0.5, 0.5)
    far = normalize(white, mean, CIFAR100_STD) - normalize(black, mean, CIFAR100_STD)
    assert float(far.norm()) == pytest.approx(2 * r, rel=1e-5)


def test_one_replaced_image_moves_the_shared_mean_by_at_most_the_sensitivity():
    """The bound behind `class_mean_epsilon`, on the project's own normalisation."""
    g = torch.Generator().manual_seed(0)
    std = (0.2,)
    n = 8
    images = torch.randint(0, 256, (n, 1, 16, 16), generator=g, dtype=torch.uint8)
    other = images.clone()
    # a far replacement: every pixel moved to the other end of the range
    other[0] = torch.where(images[0] < 128, 255, 0).to(torch.uint8)
    shift = normalize(images, (0.3,), std).mean(0) - normalize(other, (0.3,), std).mean(
        0
    )
    bound = 2 * image_radius(std, (1, 16, 16)) / n
    assert 0.5 * bound < float(shift.norm()) <= bound


def test_echo_worked_example():
    """64×64 grey, pixel std 0.1625 (echo-synth): radius = 64/0.1625/2 = 196.9;
    30 images: sensitivity 13.13; noise 0.5: mu = 26.3, ε ≈ 456 at δ = 1e-5."""
    r = image_radius((0.1625,), (1, 64, 64))
    assert r == pytest.approx(196.92, abs=0.01)
    assert class_mean_epsilon(0.5, 30, r) == pytest.approx(455.8, abs=0.5)
    assert class_mean_noise_std(1.0, 30, r) == pytest.approx(48.98, abs=0.05)


# ----- dp_accounting against the hand-written accountant it replaced ------------------
# Today's figures: the hand-written code at commit 4b80128 (analytic Gaussian curve by
# bisection to 1e-10 relative, RDP with the CKS conversion at DEFAULT_ORDERS), printed
# with repr. dp_accounting finds the same roots by brentq to 1e-12: the exact column
# agreed to 1e-10 relative and the RDP column to 1e-15 over 120 settings, so 1e-8
# relative is the stated tolerance.
# (noise multiplier z, rounds, delta, exact epsilon, RDP epsilon), every site every round
TODAY_CENTRAL = [
    (0.5, 1, 1e-05, 9.997256146743894, 10.72513254454574),
    (0.5, 10, 1e-05, 46.21121019124985, 48.75455418185193),
    (1.0, 1, 1e-05, 4.377178095746785, 4.72852966342444),
    (1.0, 10, 1e-05, 17.856586830690503, 19.047733368407496),
    (1.0, 100, 1e-05, 91.81728962808847, 96.03700180877635),
    (2.0, 10, 1e-05, 7.511275900993496, 8.078832275692447),
    (4.0, 100, 1e-05, 13.20671224128455, 14.13075863104762),
    (1.0, 10, 1e-06, 19.423656474798918, 20.552988844057094),
    (8.0, 1, 1e-06, 0.5038556150102522, 0.5451270498554355),
    (0.3, 50, 0.001, 349.67601731419563, 362.46185550821224),
]
# (z, sites m, sites averaged per round, mu, exact epsilon at 1e-5): rounds with fewer
# sites cost more
TODAY_SUMMARIES = [
    (1.0, 3, [3, 3, 2], 2.0615528128088303, 10.378239460289478),
    (2.0, 5, [5, 4, 3, 5, 5], 1.3546473505840717, 6.245482058264315),
    (0.8, 10, [10] * 20 + [7] * 5, 6.8697800220254805, 52.1197714805603),
    (1.5, 4, [1], 2.6666666666666665, 14.334311217069626),
]


@pytest.mark.parametrize("z, rounds, delta, exact, rdp", TODAY_CENTRAL)
def test_dp_accounting_gives_todays_central_epsilons(z, rounds, delta, exact, rdp):
    assert central_dp_epsilon(z, rounds, delta) == pytest.approx(exact, rel=1e-8)
    assert central_dp_epsilon(z, rounds, delta, accountant="rdp") == pytest.approx(
        rdp, rel=1e-8
    )


@pytest.mark.parametrize("z, sites, aggregated, mu, epsilon", TODAY_SUMMARIES)
def test_dp_accounting_gives_todays_summaries(z, sites, aggregated, mu, epsilon):
    summary = central_dp_summary(z, sites, aggregated)
    assert summary["dp_mu"] == pytest.approx(mu, rel=1e-12)
    assert summary["dp_epsilon"] == pytest.approx(epsilon, rel=1e-8)


@pytest.mark.parametrize("z, sites, aggregated, mu, epsilon", TODAY_SUMMARIES[:3])
def test_the_libraries_own_composition_agrees_with_the_quadrature_sum(
    z, sites, aggregated, mu, epsilon
):
    """dp_accounting composes the per-round Gaussian events itself: its PLD accountant
    numerically (pessimistic, so from above; at a 1e-3 loss grid within 3e-7
    relative of the exact value, 1e-5 stated) and its RDP accountant by adding RDP
    curves (the same sum as the RDP of the total mu, to rounding)."""
    event = fedavg_event(z, sites, aggregated)
    pld = dp_accounting.pld.PLDAccountant(value_discretization_interval=1e-3)
    got = pld.compose(event).get_epsilon(DEFAULT_DELTA)
    assert epsilon * (1 - 1e-12) <= got <= epsilon * (1 + 1e-5)
    rdp = dp_accounting.rdp.RdpAccountant(DEFAULT_ORDERS).compose(event)
    assert rdp.get_epsilon(DEFAULT_DELTA) == pytest.approx(
        mu_epsilon(mu, accountant="rdp"), rel=1e-12
    )


def test_dp_accounting_gives_todays_calibration_and_curve():
    """gdp_mu, class_mean_epsilon and gdp_delta at today's values (same commit)."""
    assert gdp_mu(1.0) == pytest.approx(0.2680511232028948, rel=1e-8)
    assert gdp_mu(8.0, 1e-6) == pytest.approx(1.5315451174974442, rel=1e-8)
    assert gdp_delta(1.0, 1.0) == pytest.approx(0.12693673750664378, rel=1e-10)
    assert gdp_delta(3.0, 8.0) == pytest.approx(0.07560389484898666, rel=1e-10)
    assert class_mean_epsilon(2.07, 100, math.sqrt(3072) / 2) == pytest.approx(
        0.9987936802208424, rel=1e-8
    )
    assert class_mean_epsilon(
        2.0, 30, 10.0, releases=4, accountant="rdp"
    ) == pytest.approx(2.9849304833772514, rel=1e-8)
    assert class_mean_noise_std(1.0, 100, math.sqrt(3072) / 2) == pytest.approx(
        2.0677259315287775, rel=1e-8
    )


def test_a_round_without_noise_is_unbounded_for_every_accountant():
    event = fedavg_event(0.0, 3, [3])
    assert math.isinf(central_dp_summary(0.0, 3, [3])["dp_epsilon"])
    rdp = dp_accounting.rdp.RdpAccountant(DEFAULT_ORDERS).compose(event)
    assert math.isinf(rdp.get_epsilon(DEFAULT_DELTA))


# ----- the run summary -----------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.usefixtures("run_identity")
def test_dp_run_writes_its_epsilon_to_the_summary(tmp_path):
    """2 sites, 1 task x 2 rounds, z = 2; site 1 crashes in round 2, so that round
    averages 1 site: mu = sqrt((2/(2·2))² + (2/(2·1))²) = sqrt(1.25)."""
    from simulations.federated import run_federated

    cfg = Config.from_dict(
        {
            "dataset": "echo-synth",
            "method": "finetune",
            "tasks": 1,
            "init_classes": 5,
            "local_epochs": 1,
            "batch_size": 16,
            "rounds_per_task": 2,
            "sites": 2,
            "partition": {"scheme": "iid"},
            "data": {"patients": 4, "devices": 2, "image_size": 16, "frames": 1},
            "federation": {
                "min_sites": 1,
                "retries": 0,
                "dp_clip_norm": 1.0,
                "dp_noise_multiplier": 2.0,
                # noise of std 2 per weight breaks this tiny model by design (the
                # aggregate check would stop the study); this test is of the account
                "check_aggregate": False,
                # Flower's DP noise is unseeded, so round 2's update from the noised
                # model may land either side of 1x its norm: that screen is not tested
                "max_update_ratio": 0.0,
            },
        }
    )
    run_federated(cfg, tmp_path, progress=False, faults="1:crash@2")
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["dp_rounds"] == 2 and summary["dp_delta"] == 1e-5
    assert summary["dp_mu"] == pytest.approx(math.sqrt(1.25))
    assert summary["dp_epsilon"] == pytest.approx(gdp_epsilon(math.sqrt(1.25)))


# ----- what a site shares of its class means (fl_ci.site.shared_class_means)


def _tiny_experiment(noise: float):
    from fl_ci.experiment import Experiment

    cfg = Config.from_dict(
        {
            "dataset": "echo-synth",
            "tasks": 2,
            "init_classes": 3,
            "data": {"patients": 4, "devices": 1, "image_size": 16, "frames": 1},
            "synthesis": {"min_mean_count": 1, "mean_noise_std": noise},
        }
    )
    return Experiment.from_config(cfg)


def test_shared_means_noise_is_not_reproducible_from_the_run_config():
    from fl_ci.methods import SiteStore
    from fl_ci.site import shared_class_means

    exp = _tiny_experiment(0.5)
    first = shared_class_means(exp.site(0), 0, SiteStore())
    second = shared_class_means(exp.site(0), 0, SiteStore())  # same config, same site
    assert not torch.equal(first.sums, second.sums)


def test_shared_means_are_sent_again_unchanged_on_a_retry():
    from fl_ci.methods import SiteStore
    from fl_ci.site import shared_class_means

    exp = _tiny_experiment(0.5)
    store = SiteStore()
    first = shared_class_means(exp.site(0), 0, store)
    again = shared_class_means(exp.site(0), 0, store)
    assert torch.equal(first.sums, again.sums)


def test_shared_means_without_noise_are_the_exact_means():
    from fl_ci.methods import SiteStore
    from fl_ci.site import shared_class_means, site_class_means

    exp = _tiny_experiment(0.0)
    shared = shared_class_means(exp.site(0), 0, SiteStore())
    assert torch.equal(shared.sums, site_class_means(exp.site(0), 0).sums)
