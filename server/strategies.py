"""The Flower strategy that aggregates a round's sound replies, chosen by config.

Optionally wrapped in Flower's `DifferentialPrivacyServerSideFixedClipping` (central
DP: each site's update clipped to an L2 norm, Gaussian noise on the aggregate). The
wrapper works with this app's own round loop because the loop sets its
`current_arrays` (what `configure_train` would set) before `aggregate_train`, passes
it float arrays only (Flower's clipping cannot scale integer buffers) and weights
every site equally (the noise std z·C/m assumes each site moves the mean by at most
C/m; weighting by example counts would break that).
"""

from __future__ import annotations

import math

from flwr.serverapp.strategy import (
    DifferentialPrivacyServerSideFixedClipping,
    FedAvg,
    FedMedian,
    FedTrimmedAvg,
    Krum,
    Strategy,
)

from fl_ci.config import Config, ConfigError


def build_strategy(cfg: Config) -> Strategy:
    """`federation.strategy`: fedavg (weighted by examples), median, trimmed_mean, krum;
    wrapped for central DP when `federation.dp_clip_norm` > 0.

    Only `aggregate_train` is used; the minimum number of replies is checked by the
    server loop before aggregation (Krum and trimmed mean need enough of them).
    """
    fed = cfg.federation
    common = dict(min_train_nodes=1, min_evaluate_nodes=1, min_available_nodes=1)
    strategy: Strategy
    if fed.strategy == "fedavg":
        strategy = FedAvg(**common)
    elif fed.strategy == "median":
        strategy = FedMedian(**common)
    elif fed.strategy == "trimmed_mean":
        if cfg.sites * fed.trim_beta < 1:
            raise ConfigError(
                f"config key 'federation.trim_beta' = {fed.trim_beta} trims no site of "
                f"{cfg.sites}; raise it to at least {1 / cfg.sites:.2f}"
            )
        strategy = FedTrimmedAvg(beta=fed.trim_beta, **common)
    elif fed.strategy == "krum":
        if cfg.sites < 2 * fed.krum_malicious + 3:
            raise ConfigError(
                f"config key 'federation.krum_malicious' = {fed.krum_malicious} needs at "
                f"least {2 * fed.krum_malicious + 3} sites, 'sites' is {cfg.sites}"
            )
        strategy = Krum(num_malicious_nodes=fed.krum_malicious, **common)
    else:
        raise ConfigError(
            f"config key 'federation.strategy' has unknown value {fed.strategy!r}"
        )
    clip, noise = dp_settings(cfg)
    if fed.rehearse and (clip > 0 or fed.strategy != "fedavg"):
        # new-class head rows are then a plain mean over the sites holding the class
        # (fl_ci.experiment.average_new_rows), outside the robust rule or the DP noise
        raise ConfigError(
            "config key 'federation.rehearse' needs 'federation.strategy' = 'fedavg' "
            "without DP ('federation.dp_clip_norm' = 0)"
        )
    if clip > 0:
        if fed.strategy != "fedavg":
            # the noise is calibrated to a mean's sensitivity, not a median's or Krum's
            raise ConfigError(
                f"config key 'federation.dp_clip_norm' = {clip} needs "
                f"'federation.strategy' = 'fedavg', not {fed.strategy!r}"
            )
        strategy = with_dp(strategy, clip, noise, cfg.sites)
    return strategy


def dp_settings(cfg: Config) -> tuple[float, float]:
    """(clipping norm, noise multiplier); clipping norm 0 means no DP.

    Read with defaults until `fl_ci/config.py` has `federation.dp_clip_norm` and
    `federation.dp_noise_multiplier`.
    """
    fed = cfg.federation
    clip = fed.dp_clip_norm
    noise = fed.dp_noise_multiplier
    if not math.isfinite(clip) or clip < 0:
        raise ConfigError(f"config key 'federation.dp_clip_norm' must be >= 0: {clip}")
    if not math.isfinite(noise) or noise < 0:
        raise ConfigError(
            f"config key 'federation.dp_noise_multiplier' must be >= 0: {noise}"
        )
    return clip, noise


def with_dp(
    strategy: Strategy, clip_norm: float, noise_multiplier: float, sites: int
) -> DifferentialPrivacyServerSideFixedClipping:
    """Flower's server-side fixed-clipping DP around `strategy` (noise std z·C/sites)."""
    return DifferentialPrivacyServerSideFixedClipping(
        strategy,
        noise_multiplier=noise_multiplier,
        clipping_norm=clip_norm,
        num_sampled_clients=sites,
    )


def is_dp(strategy: Strategy) -> bool:
    return isinstance(strategy, DifferentialPrivacyServerSideFixedClipping)
