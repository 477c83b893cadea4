"""A simulated study: one dataset, split over virtual sites.

Simulations (and the coordinator's own audit set) hold the whole study's data:
`Experiment.from_config` loads it in model labels (the plan's order);
`Experiment.site_data` is a virtual site's share of a task's training rows (Flower
Datasets' partitioners, seeded); `Experiment.site(k)` is site k's view of it with
the same interface as a hospital's own folder (`fl_ci.site.OwnData`), including its
share of the held-out patients for federated evaluation. In a deployment no process
holds an `Experiment`: each site reads only its own folder.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from fl_ci.config import Config, ConfigError
from fl_ci.data.base import ImageData, patient_groups
from fl_ci.data.partition import check_partitions, partition_task
from fl_ci.data.registry import Splits, load_splits
from fl_ci.models import IncrementalNet
from fl_ci.plan import StudyPlan

log = logging.getLogger("fl_ci")


@dataclass
class Experiment:
    """The data and the schedule of one study, in model labels (arrival order)."""

    plan: StudyPlan
    splits: Splits
    _parts: dict[int, list[torch.Tensor]] = field(default_factory=dict, repr=False)
    _pool_parts: list[torch.Tensor] | None = field(default=None, repr=False)
    _held_out: dict[str, list[torch.Tensor]] = field(default_factory=dict, repr=False)

    @classmethod
    def from_config(cls, cfg: Config) -> Experiment:
        plan = StudyPlan.from_config(cfg)
        return cls(plan, load_splits(cfg, plan.dataset_names, plan.order))

    @property
    def cfg(self) -> Config:
        return self.plan.cfg

    @property
    def tasks(self) -> list[list[int]]:
        return self.plan.tasks

    @property
    def schedule(self) -> dict[int, dict[int, int]]:
        return self.plan.schedule

    # ----- shape of the study ------------------------------------------------------
    @property
    def class_names(self) -> list[str]:
        return self.plan.class_names

    def seen(self, task: int) -> int:
        """Classes known after `task`."""
        return self.plan.seen(task)

    def build_model(self) -> IncrementalNet:
        """The model at task 0, before any training."""
        return self.plan.build_model()

    def site(self, site: int) -> SimulatedSite:
        """Virtual site `site`'s view of the study's data."""
        if not 0 <= site < self.cfg.sites:
            raise ConfigError(f"site {site} is not in 0..{self.cfg.sites - 1}")
        return SimulatedSite(self, site)

    # ----- data at a site ------------------------------------------------------------
    def site_data(
        self, task: int, site: int, classes: list[int] | None = None
    ) -> ImageData:
        """Site `site`'s real training data at `task`.

        Default: the rows the site receives at this task (its share of the new
        classes, plus any class a schedule brings to it now). With `classes`: every
        row of those classes the site received up to this task (joint training), so
        a site only ever sees rows it was given.
        """
        if not 0 <= site < self.cfg.sites:
            raise ConfigError(f"site {site} is not in 0..{self.cfg.sites - 1}")
        labels = self.splits.train.labels
        rows = []
        for t in range(task + 1) if classes is not None else [task]:
            task_rows, parts = self._partition(t)
            mine = task_rows[parts[site]]
            if classes is not None:
                mine = mine[torch.isin(labels[mine], torch.tensor(classes))]
            rows.append(mine)
        return self.splits.train.subset(torch.cat(rows).sort().values)

    def _partition(self, task: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
        train = self.splits.train
        classes = set(self.tasks[task]) | set(self.schedule)
        task_rows = torch.nonzero(
            torch.isin(train.labels, torch.tensor(sorted(classes)))
        ).flatten()
        if task not in self._parts:
            parts = partition_task(
                train.labels[task_rows],
                train.devices[task_rows],
                self.cfg.sites,
                self.cfg.partition,
                task=task,
                seed=self.cfg.seed,
                schedule=self.schedule,
            )
            check_partitions(parts, len(task_rows), task)
            self._parts[task] = parts
        return task_rows, self._parts[task]

    def unlabelled(self, task: int, site: int, data: ImageData) -> ImageData:
        """The contrastive target at `site` (`contrastive_target`)."""
        pool = self.splits.unlabelled
        if pool is None or len(pool) == 0:
            pool = None
        elif self.cfg.ci.target == "unlabelled":
            if self._pool_parts is None:
                self._pool_parts = split_exams(pool, self.cfg)
            pool = pool.subset(self._pool_parts[site])
        return contrastive_target(
            self.cfg,
            data,
            pool=pool,
            test=lambda: self.test_data(task),
            received=self.classes_received(task, site),
            where=f"site {site}, task {task}",
        )

    def classes_received(self, task: int, site: int) -> list[int]:
        """Classes `site` has received labelled data of by `task` (its schedule)."""
        return self.plan.classes_received(task, site)

    def test_data(self, task: int) -> ImageData:
        return self.held_out("test", task)

    def held_out(self, split: str, task: int, site: int | None = None) -> ImageData:
        """Validation or test rows of every class seen after `task`: all of them
        (central evaluation) or `site`'s share (federated evaluation; the shares
        partition the split, so their per-class counts sum to the central ones)."""
        data = getattr(self.splits, split)
        if site is not None:
            if split not in self._held_out:
                self._held_out[split] = split_exams(data, self.cfg, salt=_SALT[split])
            data = data.subset(self._held_out[split][site])
        return data.of_classes(list(range(self.seen(task))))


# seed offsets of the patient splits over sites (the unlabelled exams keep 1)
_SALT = {"val": 2, "test": 3}


@dataclass
class SimulatedSite:
    """One virtual site's data in a simulation: the interface of `OwnData`."""

    exp: Experiment
    number: int

    @property
    def plan(self) -> StudyPlan:
        return self.exp.plan

    @property
    def cfg(self) -> Config:
        return self.exp.cfg

    @property
    def skipped(self) -> list[str]:
        return self.exp.splits.skipped

    def train(self, task: int, classes: list[int] | None = None) -> ImageData:
        return self.exp.site_data(task, self.number, classes)

    def unlabelled(self, task: int, data: ImageData) -> ImageData:
        return self.exp.unlabelled(task, self.number, data)

    def held_out(self, split: str, task: int) -> ImageData:
        return self.exp.held_out(split, task, self.number)

    def test_images(self, task: int) -> ImageData:
        """The study's test images of every class seen (`ci.target = "test"`)."""
        return self.exp.held_out("test", task)

    @property
    def normalization(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        return self.exp.splits.train.mean, self.exp.splits.train.std

    def row_counts(self) -> dict[str, int]:
        """Rows this site holds over the whole study, by split."""
        parts = [self.exp.site_data(t, self.number) for t in range(len(self.exp.tasks))]
        return {
            "train": sum(len(p) for p in parts),
            "val": len(self.held_out("val", len(self.exp.tasks) - 1)),
            "test": len(self.held_out("test", len(self.exp.tasks) - 1)),
            "skipped": len(self.skipped),
        }


def contrastive_target(
    cfg: Config,
    data: ImageData,
    *,
    pool: ImageData | None,
    test,
    received: list[int],
    where: str,
) -> ImageData:
    """The contrastive target (`ci.target`); the method never reads its labels.
    task_data: the site's own task images `data`. unlabelled: the site's unlabelled
    exams `pool` (None: the study has none), of the classes it has `received` (a
    hospital images only the views it performs). test: `test()`, the test images of every class seen (the paper's
    transductive choice, reported as such)."""
    target = cfg.ci.target
    if target == "test":
        return test()
    if target == "task_data":
        return data
    if pool is None:
        raise ConfigError(
            "config key 'ci.target' = 'unlabelled' needs unlabelled exams: set "
            "'data.unlabelled_fraction' (or, procedural echo, "
            "'data.unlabelled_patients') above 0"
        )
    mine = pool.of_classes(received)
    if len(mine) == 0:
        log.warning(
            "%s: no unlabelled exams of its classes; the contrastive target falls "
            "back to its task images",
            where,
        )
        return data
    return mine


def split_exams(pool: ImageData, cfg: Config, salt: int = 1) -> list[torch.Tensor]:
    """Rows of each site's exams (unlabelled, or held out for evaluation): whole
    patients (an exam belongs to one hospital), by device under
    `partition.scheme = "device"`, else at random (seeded with `seed + salt`). Rows
    without a patient id count as one patient each."""
    if cfg.partition.scheme == "device":
        return partition_task(
            pool.labels, pool.devices, cfg.sites, cfg.partition, task=0, seed=cfg.seed
        )
    group = patient_groups(pool.patients)
    patients = int(group.max()) + 1 if len(group) else 0
    generator = torch.Generator().manual_seed(cfg.seed + salt)
    shuffled = torch.randperm(patients, generator=generator)
    site_of = torch.empty(patients, dtype=torch.long)
    for site, chunk in enumerate(torch.tensor_split(shuffled, cfg.sites)):
        site_of[chunk] = site
    return [torch.nonzero(site_of[group] == s).flatten() for s in range(cfg.sites)]
