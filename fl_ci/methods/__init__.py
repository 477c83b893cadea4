"""Incremental-learning methods, one file each, behind one interface (base.py)."""

from __future__ import annotations

from fl_ci.config import Config, ConfigError
from fl_ci.methods.base import Batch, Method, SiteContext, SiteStore
from fl_ci.methods.finetune import FineTune


def registry() -> dict[str, type[Method]]:
    """Every method by its config name (`method = "..."`)."""
    from fl_ci.methods.abd import AlwaysBeDreaming
    from fl_ci.methods.class_impression import ClassImpression
    from fl_ci.methods.deepinversion import DeepInversion
    from fl_ci.methods.icarl import ICaRL
    from fl_ci.methods.joint import Joint
    from fl_ci.methods.lucir import LUCIR
    from fl_ci.methods.lwf import LwF
    from fl_ci.methods.lwm import LwM

    methods = (
        FineTune,
        ClassImpression,
        Joint,
        LwF,
        LwM,
        DeepInversion,
        AlwaysBeDreaming,
        ICaRL,
        LUCIR,
    )
    return {m.name: m for m in methods}


def build_method(cfg: Config) -> Method:
    methods = registry()
    if cfg.method not in methods:
        raise ConfigError(
            f"config key 'method' has unknown value {cfg.method!r}; "
            f"known: {', '.join(sorted(methods))}"
        )
    return methods[cfg.method](cfg)


__all__ = ["Batch", "Method", "SiteContext", "SiteStore", "build_method", "registry"]
