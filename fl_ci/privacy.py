"""Privacy accounting for the two Gaussian mechanisms of this project.

1. Central DP (server/strategies.py): Flower's `DifferentialPrivacyServerSideFixedClipping`
   clips every site's update to L2 norm C, averages the k sound replies with equal
   weights and adds N(0, (z·C/m)²) per coordinate (m = sites, z = noise multiplier).
   Every site takes part in every round (no subsampling), so each round is one
   Gaussian mechanism with sensitivity C/k and std z·C/m. The unit protected is a
   SITE (all of its data, user-level DP), under zero-out adjacency: the site's update
   replaced by a zero update, as in DP-FedAvg (McMahan et al. 2018, "Learning
   differentially private recurrent language models", ICLR) and Kairouz et al. 2021
   (DP-FTRL, ICML). Replace-one adjacency (any other data at that site) doubles the
   sensitivity: account for it with z/2.
2. Noisy class means (`synthesis.mean_noise_std`, fl_ci/synthesis/means.py): a site
   shares the mean of `count` images with N(0, s²) per pixel. The unit protected is
   ONE IMAGE (one cine's mean frame) under replace-one adjacency, with the count
   public; sensitivity = the L2 diameter of the image set / count.

Everything reduces to one number, the Gaussian-DP parameter mu (Dong, Roth & Su 2022,
"Gaussian differential privacy", JRSS-B): a Gaussian mechanism with sensitivity Δ and
noise std σ is (Δ/σ)-GDP (their Theorem 2.7), and composing mu_i-GDP mechanisms, even
adaptively, is exactly sqrt(Σ mu_i²)-GDP (their Corollary 3.3). (ε, δ) then follows
exactly from the analytic Gaussian curve (Balle & Wang 2018, ICML, Theorem 8). The
Rényi-DP route (Mironov 2017) is kept as the general-purpose accountant and as a check:
it is an upper bound on the exact ε.

The accounting is Google's `dp_accounting`: the analytic Gaussian curve and its
inverses (`get_epsilon_gaussian`, `get_sigma_gaussian`, `GaussianPrivacyLoss`), the
RDP accountant and its conversion to (ε, δ). `fedavg_event` states a run as the
library's DpEvents, for any of its accountants (its PLD accountant, a numerical
composition, is the tests' independent check of the quadrature sum). Hand-written, as
no library knows them: which noise multiplier a FedAvg round with k of m sites has
(`fedavg_mu`, `fedavg_event`), the sensitivity of a class mean (`class_mean_epsilon`,
`image_radius`), and Mironov's original RDP conversion (a one-line comparison;
`dp_accounting` has only the tighter one).

δ is a fixed constant, DEFAULT_DELTA = 1e-5 (the config has no key for it). It should
stay well below 1/(number of protected units): for sites that always holds; for images
it is 1/10 of 1/n for a site of n = 10^4 images, and no longer small beyond 10^5.

Not covered: anything a site sends besides the noised model update or noised means
(metrics, example counts, un-noised means), and noise that the receiver can
reproduce (a seed it knows) gives no privacy at all.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

# dp_accounting is imported inside the functions that use it: with scipy.stats it adds
# ~1.6 s to importing every ServerApp (server/app.py imports this module), which needs
# it only at the end of a DP run
if TYPE_CHECKING:
    from dp_accounting import DpEvent

DEFAULT_DELTA = 1e-5

# Rényi orders α > 1: 1 + 1e-4 .. 1 + 1e4, 100 a decade (the optimum lies near
# 1 + sqrt(2 log(1/δ))/mu, from 1.05 for mu = 100 to 1 + 480 for mu = 0.01).
DEFAULT_ORDERS: tuple[float, ...] = tuple(
    1.0 + float(x) for x in np.geomspace(1e-4, 1e4, 801)
)


# ----- Rényi DP (Mironov 2017) ----------------------------------------------------------
def gaussian_rdp(
    noise_multiplier: float, orders: Sequence[float] = DEFAULT_ORDERS
) -> np.ndarray:
    """RDP ε(α) = α / (2 z²) of ONE Gaussian mechanism with noise multiplier
    z = σ/Δ, at each order α > 1 (Mironov 2017, "Rényi differential privacy", CSF,
    Proposition 7), from dp_accounting's RDP accountant. Composition adds: k releases
    give k·α/(2 z²). z = 0: inf."""
    a = _orders(orders)
    z = float(noise_multiplier)
    if not z >= 0:
        raise ValueError(f"noise multiplier must be >= 0, got {noise_multiplier}")
    from dp_accounting import GaussianDpEvent
    from dp_accounting.rdp import RdpAccountant

    return RdpAccountant(a).compose(GaussianDpEvent(z)).rdp


def rdp_to_dp(
    rdp: Sequence[float] | np.ndarray,
    orders: Sequence[float] = DEFAULT_ORDERS,
    delta: float = DEFAULT_DELTA,
    *,
    conversion: str = "cks",
) -> float:
    """(ε, δ)-DP from RDP values `rdp` at `orders`, minimised over the orders.

    conversion "cks" (default, tighter): ε = rdp(α) + log((α − 1)/α)
    − (log δ + log α)/(α − 1) (Canonne, Kamath & Steinke 2020, "The discrete Gaussian
    for differential privacy", NeurIPS, Proposition 12; Balle et al. 2020, AISTATS,
    Theorem 21): dp_accounting's `compute_epsilon`, which also skips orders ≤ 1.01
    (unstable there) and gives 0 where the KL bound already meets δ.
    conversion "mironov": ε = rdp(α) + log(1/δ)/(α − 1) (Mironov 2017, Proposition 3),
    hand-written: a comparison only, dp_accounting has just the tighter bound.
    Never below 0.
    """
    a = _orders(orders)
    r = np.asarray(rdp, dtype=np.float64)
    if r.shape != a.shape:
        raise ValueError(f"rdp has shape {r.shape}, orders {a.shape}")
    _check_delta(delta)
    if conversion == "mironov":
        eps = r + math.log(1.0 / delta) / (a - 1.0)
        return max(float(np.min(eps)), 0.0)
    if conversion == "cks":
        from dp_accounting.rdp.rdp_privacy_accountant import compute_epsilon

        return float(compute_epsilon(a, r, delta)[0])
    raise ValueError(f"conversion must be 'cks' or 'mironov', got {conversion!r}")


# ----- Gaussian DP: exact (ε, δ) of composed Gaussian mechanisms ------------------------
def gdp_delta(mu: float, epsilon: float) -> float:
    """δ(ε) = Φ(−ε/mu + mu/2) − e^ε Φ(−ε/mu − mu/2): the exact privacy curve of a
    mu-GDP mechanism (Balle & Wang 2018, Theorem 8; Dong, Roth & Su 2022,
    Corollary 2.13), i.e. of one Gaussian mechanism with sensitivity 1 and noise std
    1/mu: dp_accounting's `GaussianPrivacyLoss.get_delta_for_epsilon`."""
    mu, epsilon = float(mu), float(epsilon)
    if not mu >= 0:
        raise ValueError(f"mu must be >= 0, got {mu}")
    if mu == 0:
        return 0.0
    if math.isinf(mu):
        return 1.0
    from dp_accounting.pld.privacy_loss_mechanism import GaussianPrivacyLoss

    loss = GaussianPrivacyLoss(standard_deviation=1.0 / mu, sensitivity=1.0)
    return max(float(loss.get_delta_for_epsilon(epsilon)), 0.0)


def gdp_epsilon(mu: float, delta: float = DEFAULT_DELTA) -> float:
    """The smallest ε with δ(ε) ≤ `delta` for a mu-GDP mechanism (see `gdp_delta`):
    dp_accounting's `get_epsilon_gaussian` at noise std 1/mu (Balle & Wang 2018; root
    found to 1e-12). mu = inf: inf."""
    mu = float(mu)
    _check_delta(delta)
    if not mu >= 0:
        raise ValueError(f"mu must be >= 0, got {mu}")
    if math.isinf(mu):
        return math.inf
    if mu == 0:
        return 0.0
    from dp_accounting import get_epsilon_gaussian

    return float(get_epsilon_gaussian(1.0 / mu, delta))


def gdp_mu(epsilon: float, delta: float = DEFAULT_DELTA) -> float:
    """The largest mu whose mechanism is (`epsilon`, `delta`)-DP: the inverse of
    `gdp_epsilon` in mu, for calibrating noise (σ = Δ·sqrt(releases) / mu); 1 over
    dp_accounting's `get_sigma_gaussian`."""
    _check_delta(delta)
    if not epsilon >= 0:
        raise ValueError(f"epsilon must be >= 0, got {epsilon}")
    from dp_accounting import get_sigma_gaussian

    return 1.0 / float(get_sigma_gaussian(epsilon, delta))


def mu_epsilon(
    mu: float, delta: float = DEFAULT_DELTA, *, accountant: str = "exact"
) -> float:
    """ε at `delta` of composed Gaussian mechanisms of total GDP parameter mu:
    "exact" (`gdp_epsilon`) or "rdp" (dp_accounting's RDP accountant at
    DEFAULT_ORDERS, CKS conversion; an upper bound on the exact value)."""
    if accountant == "exact":
        return gdp_epsilon(mu, delta)
    if accountant == "rdp":
        _check_delta(delta)
        if mu == 0:
            return 0.0
        from dp_accounting import GaussianDpEvent
        from dp_accounting.rdp import RdpAccountant

        rdp = RdpAccountant(DEFAULT_ORDERS).compose(GaussianDpEvent(1.0 / mu))
        return float(rdp.get_epsilon(delta))
    raise ValueError(f"accountant must be 'exact' or 'rdp', got {accountant!r}")


# ----- 1. central DP on the FedAvg aggregate --------------------------------------------
def central_dp_epsilon(
    noise_multiplier: float,
    rounds: int,
    delta: float = DEFAULT_DELTA,
    *,
    accountant: str = "exact",
) -> float:
    """Site-level ε after `rounds` rounds of clipped FedAvg in which every site is
    aggregated every round: each round is a Gaussian mechanism with sensitivity C/m
    and std z·C/m, so mu = sqrt(rounds)/z (module docstring). z = 0: inf."""
    if rounds < 0:
        raise ValueError(f"rounds must be >= 0, got {rounds}")
    mu = fedavg_mu(noise_multiplier, 1, [1] * rounds)
    return mu_epsilon(mu, delta, accountant=accountant)


def fedavg_mu(noise_multiplier: float, sites: int, aggregated: Sequence[int]) -> float:
    """GDP mu of the rounds run so far: `aggregated[r]` = k_r sites averaged in round r
    (noise std z·C/m fixed by Flower, sensitivity C/k_r), so round r is
    (m/(z·k_r))-GDP; a round with fewer sites spends more. No rounds: 0."""
    z = float(noise_multiplier)
    if not z >= 0:
        raise ValueError(f"noise multiplier must be >= 0, got {noise_multiplier}")
    if any(not 1 <= int(k) <= sites for k in aggregated):
        raise ValueError(f"each round needs 1..{sites} aggregated sites: {aggregated}")
    if not aggregated:
        return 0.0
    if z == 0:
        return math.inf
    # composing Gaussian mechanisms is exactly a sum in quadrature (Dong, Roth & Su,
    # Cor. 3.3); dp_accounting composes only as RDP or numerically (PLD), so the
    # tests use `fedavg_event` with its PLD accountant as the check of this line
    return math.sqrt(sum((sites / (z * int(k))) ** 2 for k in aggregated))


def fedavg_event(
    noise_multiplier: float, sites: int, aggregated: Sequence[int]
) -> DpEvent:
    """The rounds of `fedavg_mu` as dp_accounting's DpEvents, for any of its
    accountants: round r is a Gaussian mechanism of noise multiplier z·k_r/m (std
    z·C/m over sensitivity C/k_r)."""
    from dp_accounting import ComposedDpEvent, GaussianDpEvent

    fedavg_mu(noise_multiplier, sites, aggregated)  # the same checks
    z = float(noise_multiplier)
    return ComposedDpEvent([GaussianDpEvent(z * int(k) / sites) for k in aggregated])


def central_dp_summary(
    noise_multiplier: float,
    sites: int,
    aggregated: Sequence[int],
    delta: float = DEFAULT_DELTA,
) -> dict[str, float | int | str]:
    """The privacy spent by a central-DP run, for summary.json: site-level ε (exact
    GDP accountant; inf, written as null, when z = 0) at `delta` after the rounds
    in `aggregated` (sites averaged per round), and mu to recompute ε at another δ."""
    mu = fedavg_mu(noise_multiplier, sites, aggregated)
    return {
        "dp_epsilon": gdp_epsilon(mu, delta),
        "dp_delta": delta,
        "dp_rounds": len(aggregated),
        "dp_mu": mu,
        "dp_unit": "site (zero-out adjacency)",
    }


# ----- 2. noisy class means ------------------------------------------------------------
def class_mean_epsilon(
    noise_std: float,
    count: int,
    pixel_bound: float,
    delta: float = DEFAULT_DELTA,
    releases: int = 1,
    *,
    accountant: str = "exact",
) -> float:
    """Per-image ε of sharing a class mean of `count` images with N(0, noise_std²)
    added per pixel, `releases` times with fresh noise.

    Replace-one adjacency with the count public: every image lies in a ball of radius
    `pixel_bound` (`image_radius`; the max L2 norm of one normalised image also works,
    more loosely), so one replaced image moves the mean by at most
    Δ = 2·pixel_bound/count, and mu = sqrt(releases)·Δ/noise_std. noise_std = 0: inf.
    """
    if count < 1 or releases < 0 or not pixel_bound >= 0 or not noise_std >= 0:
        raise ValueError(
            "need count >= 1, releases >= 0, pixel_bound >= 0, noise_std >= 0; got "
            f"{count}, {releases}, {pixel_bound}, {noise_std}"
        )
    sensitivity = 2.0 * pixel_bound / count
    if releases == 0 or sensitivity == 0:
        return 0.0
    if noise_std == 0:
        return math.inf
    mu = math.sqrt(releases) * sensitivity / noise_std
    return mu_epsilon(mu, delta, accountant=accountant)


def class_mean_noise_std(
    epsilon: float,
    count: int,
    pixel_bound: float,
    delta: float = DEFAULT_DELTA,
    releases: int = 1,
) -> float:
    """The smallest per-pixel noise std that makes `class_mean_epsilon` ≤ `epsilon`."""
    return math.sqrt(releases) * (2.0 * pixel_bound / count) / gdp_mu(epsilon, delta)


def image_radius(std: Sequence[float], shape: Sequence[int]) -> float:
    """Radius of the smallest L2 ball holding every image of `shape` (C, H, W) in
    normalised input space, (x/255 − mean_c)/std_c (fl_ci/data/base.py `normalize`):
    channel c spans an interval of width 1/std_c, so the set is a box of L2
    diameter sqrt(H·W·Σ_c 1/std_c²), and 2·radius is that diameter. The means shift
    the box without changing it, so they do not enter. CIFAR-100's std is
    `fl_ci.data.cifar100.CIFAR100_STD`; echo data computes its std from the frames
    (`ImageData.std`)."""
    c, h, w = (int(v) for v in shape)
    if len(std) != c or any(not s > 0 for s in std):
        raise ValueError(f"need {c} positive channel stds, got {std}")
    return 0.5 * math.sqrt(h * w * sum(1.0 / (s * s) for s in std))


# ----- helpers -------------------------------------------------------------------------
def _orders(orders: Sequence[float]) -> np.ndarray:
    a = np.asarray(orders, dtype=np.float64)
    if a.ndim != 1 or a.size == 0 or not (a > 1).all():
        raise ValueError("orders must be a non-empty list of numbers > 1")
    return a


def _check_delta(delta: float) -> None:
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta}")
