"""A study on one machine without Flower (`sites = 1`: plain class-incremental learning).

The loop is the federated one with a single site: at each task boundary the model is
frozen as the teacher and its head grows; the site trains `rounds_per_task` rounds;
validation after every round, test after every task. After every round the state is
checkpointed in `out/checkpoint.pt` (fl_ci/checkpoint.py); a run started again with
the same `out` resumes after the last completed round.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from fl_ci.checkpoint import end_of_round, load_checkpoint, restore
from fl_ci.config import Config
from fl_ci.experiment import (
    Experiment,
    evaluate,
    grow_for_task,
    site_class_means,
    site_round,
)
from fl_ci.methods import SiteStore
from fl_ci.recorder import Recorder
from fl_ci.synthesis import ClassMeans


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
    out = Path(out)
    exp = Experiment.from_config(cfg)
    recorder = Recorder(cfg, exp.tasks, exp.class_names)
    model = exp.build_model()
    teacher = None
    means: ClassMeans | None = None
    done = 0
    state = load_checkpoint(out, cfg)
    if state is not None:
        resumed = restore(state, exp, recorder)
        model, teacher, means = resumed.model, resumed.teacher, resumed.means
        done = resumed.server_round
        if progress:
            print(f"resuming {out} after round {done}", flush=True)
    store = SiteStore(out / "site-0")
    rounds = cfg.rounds_per_task
    for task, classes in enumerate(exp.tasks):
        first = task * rounds + 1
        if first + rounds - 1 <= done:
            continue  # the whole task was completed before a restart
        if task > 0 and first > done:
            teacher = copy.deepcopy(model).eval()
            model = grow_for_task(model, len(classes), seed=cfg.seed * 1000 + task)
        old_means = means if task else None
        for rnd in range(rounds):
            server_round = first + rnd
            if server_round <= done:
                continue
            model, train_metrics = site_round(
                exp,
                model,
                teacher,
                task=task,
                round=rnd,
                site=0,
                class_means=old_means,
                store=store,
                progress=progress,
            )
            val = evaluate(exp, model, task, split="val")
            recorder.add_row(
                task=task,
                round=rnd,
                server_round=server_round,
                split="val",
                site=0,
                accuracy=val["accuracy"],
                old_accuracy=val["old_accuracy"],
                new_accuracy=val["new_accuracy"],
                **train_metrics,
            )
            if rnd == rounds - 1:
                site_means = site_class_means(exp, task, 0)
                means = site_means if means is None else means + site_means
                recorder.test_task(exp, model, task, progress)
            end_of_round(
                out,
                cfg=cfg,
                server_round=server_round,
                model=model,
                teacher=teacher,
                means=means,
                recorder=recorder,
                stop_after_round=stop_after_round,
            )
    summary = recorder.write(out)
    summary["table"] = recorder.table()
    return summary
