"""The Flower strategy that aggregates a round's sound replies, chosen by config."""

from __future__ import annotations

from flwr.serverapp.strategy import FedAvg, FedMedian, FedTrimmedAvg, Krum, Strategy

from fl_ci.config import Config, ConfigError


def build_strategy(cfg: Config) -> Strategy:
    """`federation.strategy`: fedavg (weighted by examples), median, trimmed_mean, krum.

    Only `aggregate_train` is used; the minimum number of replies is checked by the
    server loop before aggregation (Krum and trimmed mean need enough of them).
    """
    fed = cfg.federation
    common = dict(min_train_nodes=1, min_evaluate_nodes=1, min_available_nodes=1)
    if fed.strategy == "fedavg":
        return FedAvg(**common)
    if fed.strategy == "median":
        return FedMedian(**common)
    if fed.strategy == "trimmed_mean":
        if cfg.sites * fed.trim_beta < 1:
            raise ConfigError(
                f"config key 'federation.trim_beta' = {fed.trim_beta} trims no site of "
                f"{cfg.sites}; raise it to at least {1 / cfg.sites:.2f}"
            )
        return FedTrimmedAvg(beta=fed.trim_beta, **common)
    if fed.strategy == "krum":
        if cfg.sites < 2 * fed.krum_malicious + 3:
            raise ConfigError(
                f"config key 'federation.krum_malicious' = {fed.krum_malicious} needs at "
                f"least {2 * fed.krum_malicious + 3} sites, 'sites' is {cfg.sites}"
            )
        return Krum(num_malicious_nodes=fed.krum_malicious, **common)
    raise ConfigError(
        f"config key 'federation.strategy' has unknown value {fed.strategy!r}"
    )
