"""What one site does: its data, a round of local training, its share of class means,
and its evaluation of the global model as per-class counts.

A site's data is either a hospital's own folder (`OwnData`, the deployment: every
row of its own manifest, split by patient into train / validation / test, classes
matched to the study by name) or a virtual site's share of a simulated study
(`fl_ci.experiment.SimulatedSite`). Both have the same interface, `SiteData`, so
the round and the evaluation below are written once. The Flower ClientApp and the
single-machine runner call these functions; neither holds a copy of the loop.
"""

from __future__ import annotations

import logging
import secrets
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from fl_ci.config import Config
from fl_ci.data.base import DataError, ImageData, batches
from fl_ci.data.registry import Splits, load_splits
from fl_ci.experiment import Experiment, contrastive_target
from fl_ci.methods import SiteContext, SiteStore, build_method
from fl_ci.models import IncrementalNet
from fl_ci.plan import StudyPlan
from fl_ci.synthesis import ClassMeans
from fl_ci.trainer import resolve_device, train_round

log = logging.getLogger("fl_ci")


class SiteData(Protocol):
    """One site's data, as the round and the evaluation read it."""

    number: int  # the site's number: the schedule's `site`, and in reports

    @property
    def plan(self) -> StudyPlan: ...

    @property
    def cfg(self) -> Config: ...

    @property
    def skipped(self) -> list[str]: ...  # bad items left out (data.skip_bad)

    def train(self, task: int, classes: list[int] | None = None) -> ImageData:
        """Real training rows at `task`: the classes new here now, or (with
        `classes`, joint training) every row of those classes received so far."""

    def unlabelled(self, task: int, data: ImageData) -> ImageData:
        """The contrastive target (`ci.target`)."""

    def held_out(self, split: str, task: int) -> ImageData:
        """This site's validation or test rows of every class seen after `task`."""

    def row_counts(self) -> dict[str, int]:
        """Rows the site holds, by split, and items it left out."""

    @property
    def normalization(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """The input (mean, std) its images are normalised with: the study's."""


@dataclass
class OwnData:
    """A hospital's own data folder: the deployment's site data.

    Every row of the site's manifest (or CIFAR-style folder) is read and split by
    patient into train / validation / test (seeded, patient-disjoint). A class
    arrives at the task the study gives it, or later where `partition.schedule`
    names this site's number for it.
    """

    plan: StudyPlan
    splits: Splits
    number: int
    root: str

    @classmethod
    def load(cls, cfg: Config, root: str, number: int) -> OwnData:
        plan = StudyPlan.from_config(cfg)
        splits = load_splits(cfg, plan.dataset_names, plan.order, root=root)
        return cls(plan, splits, number, root)

    @property
    def cfg(self) -> Config:
        return self.plan.cfg

    @property
    def skipped(self) -> list[str]:
        return self.splits.skipped

    def arrival(self, label: int) -> int:
        """The task at which this site trains on class `label`."""
        return self.plan.schedule.get(label, {}).get(
            self.number, self.plan.task_of(label)
        )

    def train(self, task: int, classes: list[int] | None = None) -> ImageData:
        if classes is None:
            wanted = [
                c for c in range(self.plan.num_classes) if self.arrival(c) == task
            ]
        else:
            wanted = [c for c in classes if self.arrival(c) <= task]
        return self.splits.train.of_classes(wanted)

    def unlabelled(self, task: int, data: ImageData) -> ImageData:
        received = [c for c in range(self.plan.seen(task)) if self.arrival(c) <= task]
        return contrastive_target(
            self.cfg,
            data,
            pool=self.splits.unlabelled,
            test=lambda: self.held_out("test", task),
            received=received,
            where=f"site {self.number} ({self.root}), task {task}",
        )

    def held_out(self, split: str, task: int) -> ImageData:
        data = getattr(self.splits, split)
        return data.of_classes(list(range(self.plan.seen(task))))

    def row_counts(self) -> dict[str, int]:
        return self.splits.row_counts()

    @property
    def normalization(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        return self.splits.train.mean, self.splits.train.std


# A site builds its data once per process, not once per message (a Flower client
# process serves many messages): one entry, keyed by everything that defines it.
_LOADED: dict[tuple, Any] = {}


def open_site_data(cfg: Config, *, root: str | None, partition: int | None) -> SiteData:
    """The site's data: its own folder `root` (deployment), else virtual site
    `partition` of the simulated study. Loaded once per process and config."""
    key = (
        "own" if root else "simulated",
        root or "",
        tuple(sorted(cfg.to_flat().items())),
    )
    if key not in _LOADED:
        _LOADED.clear()  # keep one study's data in memory, never two
        if root:
            _LOADED[key] = OwnData.load(cfg, root, partition or 0)
        else:
            _LOADED[key] = Experiment.from_config(cfg)
    loaded = _LOADED[key]
    if root:
        return loaded
    return loaded.site(int(partition or 0))


# ----- one site's round --------------------------------------------------------------
def site_round(
    data: SiteData,
    model: IncrementalNet,
    teacher: IncrementalNet | None,
    *,
    task: int,
    round: int,
    class_means: ClassMeans | torch.Tensor | None = None,
    store: SiteStore | None = None,
    progress: bool = True,
) -> tuple[IncrementalNet, dict[str, Any]]:
    """Train `model` (already grown for `task`) at the site for one round."""
    cfg, site = data.cfg, data.number
    method = build_method(cfg)
    new_classes = data.plan.tasks[task]
    ctx = SiteContext(
        cfg=cfg,
        task=task,
        round=round,
        site=site,
        new_classes=new_classes,
        num_old=new_classes[0],
        data=None,  # type: ignore[arg-type]  # set below, once the method is known
        teacher=teacher,
        class_means=class_means,
        unlabelled=None,
        device=resolve_device(cfg.device),
        store=store or SiteStore(),
        seed=cfg.seed,
        progress=progress,
    )
    ctx.data = data.train(task, method.train_classes(ctx))
    rehearse = cfg.federation.rehearse and teacher is not None
    if len(ctx.data) == 0 and not rehearse:
        raise NoTaskData(f"site {site} has no training data for task {task}")
    ctx.unlabelled = data.unlabelled(task, ctx.data)
    method.begin_round(model, ctx)
    if len(ctx.data) == 0 and (
        method.extra_share(ctx) == 0 or not method.replay_size()
    ):
        raise NoTaskData(
            f"site {site} has no training data for task {task}, and {method.name} "
            "has no synthetic replay to rehearse on"
        )
    method.prepare_model(model, ctx)
    metrics = train_round(model, method, ctx)
    if round == cfg.rounds_at(task) - 1:
        metrics.update(method.end_task(model, ctx))
    model.to("cpu")
    if teacher is not None:
        teacher.to("cpu")
    return model, metrics


class NoTaskData(DataError):
    """The site holds no data of this task's classes: by the schedule, it sits the
    task out (not a fault)."""


def site_class_means(data: SiteData, task: int) -> ClassMeans:
    """(sum, count) per class of the site's task data, in normalised input space."""
    return ClassMeans.from_data(data.train(task), classes=data.plan.tasks[task])


def shared_class_means(data: SiteData, task: int, store: SiteStore) -> ClassMeans:
    """What a site shares of its class means: only classes with at least
    `synthesis.min_mean_count` images, with `synthesis.mean_noise_std` noise drawn from
    a secret seed. The noisy means are kept in the site's store, so a retried round
    sends the same ones (fresh noise would be a second release); a seed derived from
    the run config would let the server regenerate the noise and subtract it."""
    scfg = data.cfg.synthesis
    mine = site_class_means(data, task).restricted(scfg.min_mean_count)
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


# ----- evaluation as counts ----------------------------------------------------------
@dataclass
class Counts:
    """Per-class correct and total predictions: what a site's evaluation returns, and
    what the server sums over sites (so federated and central evaluation agree)."""

    correct: torch.Tensor  # [K] int64
    total: torch.Tensor  # [K] int64

    def __add__(self, other: Counts) -> Counts:
        return Counts(self.correct + other.correct, self.total + other.total)

    @classmethod
    def zeros(cls, num_classes: int) -> Counts:
        zero = torch.zeros(num_classes, dtype=torch.long)
        return cls(zero, zero.clone())


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


def class_counts(model: IncrementalNet, data: ImageData, cfg: Config) -> Counts:
    """Correct and total predictions of `model` on `data`, per class of the model."""
    k = model.num_classes
    pred = predict(model, data, resolve_device(cfg.device), cfg.eval_batch_size)
    hit = data.labels[pred == data.labels]
    return Counts(
        torch.bincount(hit, minlength=k)[:k],
        torch.bincount(data.labels, minlength=k)[:k],
    )


def evaluate_site(
    data: SiteData, model: IncrementalNet, task: int, splits: list[str]
) -> dict[str, Counts]:
    """The site's counts on its own held-out rows of every class seen after `task`."""
    return {
        split: class_counts(model, data.held_out(split, task), data.cfg)
        for split in splits
    }
