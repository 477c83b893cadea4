"""One class-incremental study: data, task schedule, sites, and what each side does.

The same functions serve the single-machine runner and the Flower apps:
- `Experiment.from_config` loads the data, fixes the class order and the task split;
- `Experiment.site_data` is a site's real training data for a task;
- `grow_for_task` is the server's step at a task boundary;
- `site_round` is one site's local round (method hooks inside the one trainer);
- `evaluate` fills a row of the accuracy matrix.
"""

from __future__ import annotations

import copy
import logging
import secrets
from dataclasses import dataclass, field
from typing import Any

import torch

from fl_ci.config import Config, ConfigError
from fl_ci.data.base import DataError, ImageData, batches, patient_groups, valid_range
from fl_ci.data.partition import check_partitions, partition_task
from fl_ci.data.registry import Splits, load_splits, relabel
from fl_ci.data.scenario import apply_schedule, class_order, parse_schedule, task_splits
from fl_ci.methods import SiteContext, SiteStore, build_method
from fl_ci.models import IncrementalNet, build_model, model_for
from fl_ci.synthesis import ClassMeans
from fl_ci.trainer import resolve_device, train_round

log = logging.getLogger("fl_ci")


@dataclass
class Experiment:
    """The data and the schedule of one study, in model labels (arrival order)."""

    cfg: Config
    splits: Splits
    tasks: list[list[int]]
    schedule: dict[int, dict[int, int]] = field(default_factory=dict)
    _parts: dict[int, list[torch.Tensor]] = field(default_factory=dict, repr=False)
    _pool_parts: list[torch.Tensor] | None = field(default=None, repr=False)

    @classmethod
    def from_config(cls, cfg: Config) -> Experiment:
        raw = load_splits(cfg)
        k = cfg.num_classes
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
            schedule_ds = parse_schedule(
                cfg.partition.schedule, raw.class_names, cfg.sites
            )
            tasks_ds = apply_schedule(tasks_ds, schedule_ds)
        final_order = [c for t in tasks_ds for c in t]
        rank = {c: i for i, c in enumerate(final_order)}
        splits = Splits(
            *(relabel(s, final_order) for s in (raw.train, raw.val, raw.test)),
            unlabelled=(
                relabel(raw.unlabelled, final_order)
                if raw.unlabelled is not None
                else None
            ),
            skipped=raw.skipped,
        )
        tasks, start = [], 0
        for t in tasks_ds:
            tasks.append(list(range(start, start + len(t))))
            start += len(t)
        schedule = {rank[c]: sites for c, sites in schedule_ds.items()}
        return cls(cfg, splits, tasks, schedule)

    # ----- shape of the study ------------------------------------------------------
    @property
    def class_names(self) -> list[str]:
        return self.splits.class_names

    def seen(self, task: int) -> int:
        """Classes known after `task`."""
        return sum(len(t) for t in self.tasks[: task + 1])

    def build_model(self) -> IncrementalNet:
        """The model at task 0, before any training."""
        cfg = self.cfg
        # seeded without touching the caller's random state: same seed, same weights
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            return build_model(
                model_for(cfg.dataset, cfg.model),
                num_classes=len(self.tasks[0]),
                in_channels=self.splits.train.channels,
                head=cfg.head,
                head_scale=cfg.head_scale,
            )

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
        """The contrastive target at `site` (`ci.target`); the method never reads its
        labels. task_data: the site's own task images. unlabelled: the site's share
        of the unlabelled exams, of the classes it has received by `task` (a hospital
        images only the views it performs). test: the test images of every class seen
        (the paper's transductive choice, reported as such)."""
        target = self.cfg.ci.target
        if target == "test":
            return self.test_data(task)
        if target == "task_data":
            return data
        pool = self.splits.unlabelled
        if pool is None or len(pool) == 0:
            raise ConfigError(
                "config key 'ci.target' = 'unlabelled' needs unlabelled exams: set "
                "'data.unlabelled_fraction' above 0"
            )
        if self._pool_parts is None:
            self._pool_parts = split_exams(pool, self.cfg)
        mine = pool.subset(self._pool_parts[site])
        mine = mine.of_classes(self.classes_received(task, site))
        if len(mine) == 0:
            log.warning(
                "site %d, task %d: no unlabelled exams of its classes; the contrastive "
                "target falls back to its task images",
                site,
                task,
            )
            return data
        return mine

    def classes_received(self, task: int, site: int) -> list[int]:
        """Classes `site` has received labelled data of by `task` (its schedule)."""
        return [
            c
            for c in range(self.seen(task))
            if c not in self.schedule or self.schedule[c].get(site, task + 1) <= task
        ]

    def test_data(self, task: int) -> ImageData:
        return self.splits.test.of_classes(list(range(self.seen(task))))


def split_exams(pool: ImageData, cfg: Config) -> list[torch.Tensor]:
    """Rows of each site's unlabelled exams: whole patients (an exam belongs to one
    hospital), by device under `partition.scheme = "device"`, else at random (seeded).
    Rows without a patient id count as one patient each."""
    if cfg.partition.scheme == "device":
        return partition_task(
            pool.labels, pool.devices, cfg.sites, cfg.partition, task=0, seed=cfg.seed
        )
    group = patient_groups(pool.patients)
    patients = int(group.max()) + 1 if len(group) else 0
    generator = torch.Generator().manual_seed(cfg.seed + 1)
    shuffled = torch.randperm(patients, generator=generator)
    site_of = torch.empty(patients, dtype=torch.long)
    for site, chunk in enumerate(torch.tensor_split(shuffled, cfg.sites)):
        site_of[chunk] = site
    return [torch.nonzero(site_of[group] == s).flatten() for s in range(cfg.sites)]


# ----- the server's side -------------------------------------------------------------
def grow_for_task(
    model: IncrementalNet, new_classes: int, seed: int = 0
) -> IncrementalNet:
    """The global model for a new task: the old model plus `new_classes` head rows
    (initialised from `seed`, so server and single-machine runs agree)."""
    grown = copy.deepcopy(model)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        grown.grow(new_classes)
    return grown


def average_new_rows(
    state: dict[str, torch.Tensor],
    site_states: list[dict[str, torch.Tensor]],
    site_classes: list[list[int]],
    weights: list[float],
    num_old: int,
) -> dict[str, torch.Tensor]:
    """`state` with each new class's head rows (`head.new_*`, row i = class
    num_old + i) averaged over the sites that hold data of that class, weighted by
    `weights` (example counts). With rehearsal, sites that trained without a class
    only pushed its row away from the old classes; averaging them in would wash the
    class out. A class no site holds keeps `state`'s rows."""
    out = dict(state)
    for key in (k for k in state if k.startswith("head.new_")):
        rows = state[key].clone()  # [n_new, D] or [n_new]
        for i in range(rows.shape[0]):
            holders = [j for j, held in enumerate(site_classes) if num_old + i in held]
            total = sum(weights[j] for j in holders)
            if not holders or total <= 0:
                continue
            rows[i] = (
                sum(site_states[j][key][i].double() * weights[j] for j in holders)
                .div(total)
                .to(rows.dtype)
            )
        out[key] = rows
    return out


# ----- one site's round --------------------------------------------------------------
def site_round(
    exp: Experiment,
    model: IncrementalNet,
    teacher: IncrementalNet | None,
    *,
    task: int,
    round: int,
    site: int,
    class_means: ClassMeans | torch.Tensor | None = None,
    store: SiteStore | None = None,
    progress: bool = True,
) -> tuple[IncrementalNet, dict[str, Any]]:
    """Train `model` (already grown for `task`) at `site` for one round."""
    cfg = exp.cfg
    method = build_method(cfg)
    new_classes = exp.tasks[task]
    device = resolve_device(cfg.device)
    ctx = SiteContext(
        cfg=cfg,
        task=task,
        round=round,
        site=site,
        new_classes=new_classes,
        num_old=new_classes[0],
        data=exp.splits.train.subset(torch.zeros(0, dtype=torch.long)),
        teacher=teacher,
        class_means=class_means,
        unlabelled=None,
        device=device,
        store=store or SiteStore(),
        seed=cfg.seed,
        progress=progress,
    )
    ctx.data = exp.site_data(task, site, method.train_classes(ctx))
    rehearse = cfg.federation.rehearse and teacher is not None
    if len(ctx.data) == 0 and not rehearse:
        raise DataError(f"site {site} has no training data for task {task}")
    ctx.unlabelled = exp.unlabelled(task, site, ctx.data)
    method.begin_task(model, ctx)
    if len(ctx.data) == 0 and (
        method.extra_share(ctx) == 0 or not method.replay_size()
    ):
        raise DataError(
            f"site {site} has no training data for task {task}, and {method.name} "
            "has no synthetic replay to rehearse on"
        )
    method.prepare_model(model, ctx)
    metrics = train_round(model, method, ctx)
    if round == cfg.rounds_per_task - 1:
        metrics.update(method.end_task(model, ctx))
    model.to("cpu")
    if teacher is not None:
        teacher.to("cpu")
    return model, metrics


def site_class_means(exp: Experiment, task: int, site: int) -> ClassMeans:
    """(sum, count) per class of the site's task data, in normalised input space."""
    return ClassMeans.from_data(exp.site_data(task, site), classes=exp.tasks[task])


def shared_class_means(
    exp: Experiment, task: int, site: int, store: SiteStore
) -> ClassMeans:
    """What a site shares of its class means: only classes with at least
    `synthesis.min_mean_count` images, with `synthesis.mean_noise_std` noise drawn from
    a secret seed. The noisy means are kept in the site's store, so a retried round
    sends the same ones (fresh noise would be a second release); a seed derived from
    the run config would let the server regenerate the noise and subtract it."""
    scfg = exp.cfg.synthesis
    mine = site_class_means(exp, task, site).restricted(scfg.min_mean_count)
    if scfg.mean_noise_std <= 0:
        return mine
    key = f"shared-means-task{task}"
    kept = store.get(key)
    if kept is not None:
        return ClassMeans(kept["sums"], kept["counts"])
    generator = torch.Generator().manual_seed(secrets.randbits(63))
    noisy = mine.with_noise(scfg.mean_noise_std, generator)
    store.put(key, {"sums": noisy.sums, "counts": noisy.counts})
    return noisy


# ----- evaluation --------------------------------------------------------------------
@torch.no_grad()
def predict(
    model: IncrementalNet, data: ImageData, device, batch_size: int
) -> torch.Tensor:
    model.to(device).eval()
    preds = [
        model(x).argmax(1).cpu()
        for x, _ in batches(data, batch_size, train=False, device=device)
    ]
    return torch.cat(preds) if preds else torch.zeros(0, dtype=torch.long)


def evaluate(
    exp: Experiment, model: IncrementalNet, task: int, split: str = "test"
) -> dict:
    """Accuracy (%) on each task's classes so far, over all classes seen (one R row)."""
    cfg = exp.cfg
    data = getattr(exp.splits, split).of_classes(list(range(exp.seen(task))))
    device = resolve_device(cfg.device)
    pred = predict(model, data, device, cfg.eval_batch_size)
    correct = (pred == data.labels).float()
    per_task = []
    for classes in exp.tasks[: task + 1]:
        mask = torch.isin(data.labels, torch.tensor(classes))
        per_task.append(
            100 * float(correct[mask].mean()) if mask.any() else float("nan")
        )
    n_old = exp.tasks[task][0]
    old = data.labels < n_old
    return {
        "per_task": per_task,
        "accuracy": 100 * float(correct.mean()) if len(correct) else float("nan"),
        "old_accuracy": 100 * float(correct[old].mean()) if old.any() else float("nan"),
        "new_accuracy": 100 * float(correct[~old].mean())
        if (~old).any()
        else float("nan"),
        "examples": len(data),
    }


def image_bounds(exp: Experiment) -> tuple[torch.Tensor, torch.Tensor]:
    return valid_range(exp.splits.train.mean, exp.splits.train.std)
