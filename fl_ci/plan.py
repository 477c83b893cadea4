"""The shape of a study from its config alone: classes by name, tasks, schedule, model.

The coordinator holds no data, so everything the server needs to run a study (how
many classes, which arrive at which task and at which site, the model to grow) comes
from here. Model label i is the i-th class in arrival order, so the classes of task t
are a contiguous range and "old" always means 0..n_old-1.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch

from fl_ci.config import Config, ConfigError, parse_names
from fl_ci.data.registry import dataset_spec
from fl_ci.data.scenario import apply_schedule, class_order, parse_schedule, task_splits
from fl_ci.models import IncrementalNet, build_model, model_for


@dataclass(frozen=True)
class StudyPlan:
    """Classes, tasks and schedule of one study, in model labels (arrival order)."""

    cfg: Config
    dataset_names: list[str]  # the study's classes in the dataset's numbering
    order: list[int]  # dataset label of model label i
    tasks: list[list[int]]  # model labels new at each task
    # model label -> {site: task the site gains it} (partition.schedule)
    schedule: dict[int, dict[int, int]] = field(default_factory=dict)

    @classmethod
    def from_config(cls, cfg: Config) -> StudyPlan:
        spec = dataset_spec(cfg.dataset)
        names = parse_names(cfg.classes) if cfg.classes else list(spec.class_names)
        if len(set(names)) != len(names):
            raise ConfigError(f"config key 'classes' names a class twice: {names}")
        k = len(names)
        order = class_order(k, cfg.class_order, cfg.order_seed)
        positions = task_splits(k, cfg.tasks, cfg.init_classes)
        tasks_ds = [[order[p] for p in s] for s in positions]
        schedule_ds: dict[int, dict[int, int]] = {}
        if cfg.partition.scheme == "schedule":
            if not cfg.partition.schedule:
                raise ConfigError(
                    "config key 'partition.schedule' is empty but 'partition.scheme' "
                    "is 'schedule'"
                )
            schedule_ds = parse_schedule(cfg.partition.schedule, names, cfg.sites)
            tasks_ds = apply_schedule(tasks_ds, schedule_ds)
        final_order = [c for t in tasks_ds for c in t]
        rank = {c: i for i, c in enumerate(final_order)}
        tasks, start = [], 0
        for t in tasks_ds:
            tasks.append(list(range(start, start + len(t))))
            start += len(t)
        schedule = {rank[c]: sites for c, sites in schedule_ds.items()}
        return cls(cfg, names, final_order, tasks, schedule)

    # ----- shape ---------------------------------------------------------------------
    @property
    def class_names(self) -> list[str]:
        """Class names in model-label (head) order."""
        return [self.dataset_names[c] for c in self.order]

    @property
    def num_classes(self) -> int:
        return len(self.order)

    @property
    def in_channels(self) -> int:
        return dataset_spec(self.cfg.dataset).in_channels

    def seen(self, task: int) -> int:
        """Classes known after `task`."""
        return sum(len(t) for t in self.tasks[: task + 1])

    def task_of(self, label: int) -> int:
        return next(t for t, classes in enumerate(self.tasks) if label in classes)

    def classes_received(self, task: int, site: int) -> list[int]:
        """Classes `site` has received labelled data of by `task` (its schedule)."""
        return [
            c
            for c in range(self.seen(task))
            if c not in self.schedule or self.schedule[c].get(site, task + 1) <= task
        ]

    def arrivals_at(self, site: int, task: int) -> str:
        """Why `site` may hold none of `task`'s classes, by the schedule, in words:
        "A4C arrives there at task 2" ("" if the schedule says nothing)."""
        notes = []
        for c in self.tasks[task]:
            if c in self.schedule:
                at = self.schedule[c].get(site)
                when = (
                    f"arrives there at task {at}"
                    if at is not None
                    else "never arrives there"
                )
                notes.append(f"{self.class_names[c]} {when}")
        return ", ".join(notes)

    # ----- the model -------------------------------------------------------------------
    def build_model(self) -> IncrementalNet:
        """The model at task 0, before any training."""
        cfg = self.cfg
        # seeded without touching the caller's random state: same seed, same weights
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            return build_model(
                model_for(cfg.dataset, cfg.model),
                num_classes=len(self.tasks[0]),
                in_channels=self.in_channels,
                head=cfg.head,
                head_scale=cfg.head_scale,
            )

    def grow(self, model: IncrementalNet, task: int) -> IncrementalNet:
        """The global model for `task`: `model` plus the task's head rows, seeded
        from the study's seed and the task (the one head-growth seed formula)."""
        return grow_for_task(
            model, len(self.tasks[task]), seed=self.cfg.seed * 1000 + task
        )

    def model_at_task(self, task: int) -> IncrementalNet:
        """The architecture of the global model during `task` (its head grown task by
        task, as the study grows it; weights are loaded afterwards)."""
        model = self.build_model()
        for t in range(1, task + 1):
            model = self.grow(model, t)
        return model


def grow_for_task(
    model: IncrementalNet, new_classes: int, seed: int = 0
) -> IncrementalNet:
    """The old model plus `new_classes` head rows, initialised from `seed`."""
    grown = copy.deepcopy(model)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        grown.grow(new_classes)
    return grown
