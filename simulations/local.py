"""A study on one machine without Flower (`sites = 1`: plain class-incremental learning).

The one study loop (fl_ci/study.py) with a driver whose single site is a function
call: the site trains a round (`fl_ci.site.site_round`), shares its class means after
a task's last round, and its model is the new global model. Validation after every
round, test after every task; a run started again with the same `out` resumes after
the last completed round.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from fl_ci.config import Config, ConfigError
from fl_ci.experiment import Experiment
from fl_ci.methods import SiteStore
from fl_ci.site import evaluate_site, shared_class_means, site_round
from fl_ci.study import RoundResult, Step, Study


def run_local(
    cfg: Config,
    out: str | Path,
    progress: bool = True,
    stop_after_round: int = 0,
) -> dict[str, Any]:
    """Run every task of `cfg` at one site; write the output folder; return the summary.

    `stop_after_round` > 0 stops with `RunStopped` once that round is checkpointed,
    as a crash would (for tests of resuming).
    """
    if cfg.sites != 1:
        raise ConfigError(
            f"config key 'sites' = {cfg.sites}: the single-machine runner runs one "
            "site; more sites run in Flower's simulation runtime"
        )
    out = Path(out)
    exp = Experiment.from_config(cfg)
    site = exp.site(0)
    store = SiteStore(out / "sites" / "site-0")

    def sites_eval(model, task: int, splits: list[str]):
        return {0: evaluate_site(site, model, task, splits)}

    study = Study(
        cfg,
        out,
        central=exp,
        sites_eval=sites_eval,
        progress=progress,
        stop_after_round=stop_after_round,
    )

    def run_round(step: Step) -> RoundResult:
        started = time.perf_counter()
        model, metrics = site_round(
            site,
            step.model,
            step.teacher,
            task=step.task,
            round=step.round,
            class_means=step.means,
            store=store,
            progress=progress,
        )
        means = shared_class_means(site, step.task, store) if step.last else None
        seconds = time.perf_counter() - started
        return RoundResult(
            model.state_dict(), means, {"site": 0, **metrics}, f"{seconds:.1f} s"
        )

    for step in study.rounds():
        study.finish_round(step, run_round(step))
    return study.finish()
