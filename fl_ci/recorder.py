"""Collects a run's evaluations and writes its output folder.

Single-machine and federated runs write the same files: `metrics.parquet` (one row
per round and evaluation), `summary.json`, `accuracy.png` (accuracy against classes
seen) and `accuracy_matrix.png`.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import numpy as np

from fl_ci import metrics
from fl_ci.config import Config
from fl_ci.results import (
    format_table,
    plot_accuracy,
    plot_matrix,
    write_json,
    write_metrics,
)

SUMMARY_COLUMNS = [
    "method",
    "dataset",
    "sites",
    "seed",
    "final_accuracy",
    "average_incremental_accuracy",
    "forgetting",
    "bwt",
    "wall_seconds",
]


class Recorder:
    """Accuracy matrix R (tasks x tasks, %) and metric rows of one run."""

    def __init__(self, cfg: Config, tasks: list[list[int]], class_names: list[str]):
        self.cfg = cfg
        self.tasks = tasks
        self.class_names = class_names
        self.rows: list[dict[str, Any]] = []
        self.matrix = np.full((len(tasks), len(tasks)), np.nan)
        self.task_results: list[dict[str, Any]] = []
        self.started = time.time()
        self.elapsed_before = 0.0  # wall time of earlier attempts of a resumed run
        # after each task: {site: [test accuracy, ...]} from the sites' own counts,
        # and the server's own test row when both evaluate (evaluation = "both")
        self.site_accuracy: dict[str, list[float]] = {}
        self.server_matrix = np.full((len(tasks), len(tasks)), np.nan)

    def add_row(self, **row: Any) -> None:
        self.rows.append(row)

    def add_task(self, task: int, result: dict[str, Any]) -> None:
        """The test evaluation after `task` (from `experiment.evaluate`)."""
        self.matrix[task, : task + 1] = result["per_task"]
        self.task_results.append({"task": task, **result})
        self.add_row(
            task=task,
            round=-1,
            split="test",
            classes_seen=sum(len(t) for t in self.tasks[: task + 1]),
            accuracy=result["accuracy"],
            old_accuracy=result["old_accuracy"],
            new_accuracy=result["new_accuracy"],
            accuracy_mean_over_tasks=metrics.mean_over_tasks(result["per_task"]),
        )

    def add_site_task(self, site: Any, task: int, result: dict[str, Any]) -> None:
        """Site `site`'s test accuracy after `task`, from its own held-out counts."""
        accuracies = self.site_accuracy.setdefault(str(site), [])
        accuracies += [math.nan] * (task - len(accuracies))
        accuracies[task:] = [result["accuracy"]]

    def add_server_task(self, task: int, result: dict[str, Any]) -> None:
        """The server's own test row after `task`, beside the sites' (both)."""
        self.server_matrix[task, : task + 1] = result["per_task"]

    def summary(self) -> dict[str, Any]:
        done = len(self.task_results)
        r = self.matrix[:done, :done]
        scores = metrics.summarize(r) if done else {}
        seen = np.cumsum([len(t) for t in self.tasks]).tolist()
        return {
            "method": self.cfg.method,
            "dataset": self.cfg.dataset,
            "sites": self.cfg.sites,
            "seed": self.cfg.seed,
            "tasks_completed": done,
            "final_accuracy": scores.get("final_accuracy", math.nan),
            "average_incremental_accuracy": scores.get(
                "average_incremental_accuracy", math.nan
            ),
            "forgetting": scores.get("forgetting", math.nan),
            "bwt": scores.get("backward_transfer", math.nan),
            "val_final_accuracy": self.val_final_accuracy() if done else math.nan,
            "accuracy_after_task": metrics.accuracy_after_tasks(r).tolist()
            if done
            else [],
            "accuracy_all_classes": [t["accuracy"] for t in self.task_results],
            "old_accuracy": [t["old_accuracy"] for t in self.task_results],
            "new_accuracy": [t["new_accuracy"] for t in self.task_results],
            "accuracy_matrix": self.matrix.tolist(),
            "classes_per_task": [len(t) for t in self.tasks],
            "classes_seen": seen,
            "class_names": self.class_names,
            "evaluation": self.cfg.evaluation,
            **({"site_accuracy": self.site_accuracy} if self.site_accuracy else {}),
            **(
                {"accuracy_matrix_server": self.server_matrix.tolist()}
                if self.cfg.evaluation == "both"
                else {}
            ),
            "wall_seconds": self.elapsed_before + time.time() - self.started,
            "config": self.cfg.to_flat(),
        }

    def val_final_accuracy(self) -> float:
        """Final accuracy's form (mean over tasks) on validation, after the last
        round recorded: the number settings are chosen by."""
        rows = [
            r
            for r in self.rows
            if r.get("split") == "val" and "accuracy_mean_over_tasks" in r
        ]
        return rows[-1]["accuracy_mean_over_tasks"] if rows else math.nan

    def write(
        self,
        out: str | Path,
        extra: dict[str, Any] | None = None,
        plots: bool = True,
    ) -> dict[str, Any]:
        """Write every output file (each atomically) and return the summary, with
        `extra` fields (e.g. the privacy spent) added to it. `plots=False` writes
        only the tables: drawing the plots after every task took over half of a
        20-task CIFAR run's time."""
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        summary = {**self.summary(), **(extra or {})}
        write_metrics(self.rows, out / "metrics.parquet")
        write_json(summary, out / "summary.json")
        done = summary["tasks_completed"]
        if done and plots:
            label = (
                f"{self.cfg.method} ({self.cfg.sites} site{'s' * (self.cfg.sites > 1)})"
            )
            plot_accuracy(
                {
                    label: (
                        summary["classes_seen"][:done],
                        summary["accuracy_after_task"],
                    )
                },
                out / "accuracy.png",
                title=f"{self.cfg.dataset}: accuracy against classes seen",
            )
            plot_matrix(
                self.matrix, out / "accuracy_matrix.png", task_labels=self.task_labels()
            )
        return summary

    def task_labels(self) -> list[str]:
        """Each task by its class names ("A2C+A3C"), or "t3 (10 classes)" when long."""
        labels = []
        for t, classes in enumerate(self.tasks):
            names = [self.class_names[c] for c in classes] if self.class_names else []
            text = "+".join(names)
            labels.append(
                text if names and len(text) <= 16 else f"t{t} ({len(classes)})"
            )
        return labels

    def table(self) -> str:
        return format_table([self.summary()], SUMMARY_COLUMNS)
