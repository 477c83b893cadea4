"""A study on one machine without Flower (`sites = 1`: plain class-incremental learning).

The loop is the federated one with a single site: at each task boundary the model is
frozen as the teacher and its head grows; the site trains `rounds_per_task` rounds;
validation after every round, test after every task.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

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


def run_local(cfg: Config, out: str | Path, progress: bool = True) -> dict[str, Any]:
    """Run every task of `cfg` at one site; write the output folder; return the summary."""
    exp = Experiment.from_config(cfg)
    recorder = Recorder(cfg, exp.tasks, exp.class_names)
    model = exp.build_model()
    teacher = None
    means: ClassMeans | None = None
    store = SiteStore(Path(out) / "site-0")
    for task, classes in enumerate(exp.tasks):
        if task > 0:
            teacher = copy.deepcopy(model).eval()
            model = grow_for_task(model, len(classes), seed=cfg.seed * 1000 + task)
        old_means = means.means(list(range(classes[0]))) if means and task else None
        for rnd in range(cfg.rounds_per_task):
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
                split="val",
                site=0,
                accuracy=val["accuracy"],
                old_accuracy=val["old_accuracy"],
                new_accuracy=val["new_accuracy"],
                **train_metrics,
            )
        site_means = site_class_means(exp, task, 0)
        means = site_means if means is None else means + site_means
        result = evaluate(exp, model, task, split="test")
        recorder.add_task(task, result)
        if progress:
            print(
                f"task {task}: {exp.seen(task)} classes seen, test accuracy "
                f"{result['accuracy']:.2f}% (old {result['old_accuracy']:.2f}%, "
                f"new {result['new_accuracy']:.2f}%)",
                flush=True,
            )
    summary = recorder.write(out)
    summary["table"] = recorder.table()
    return summary
