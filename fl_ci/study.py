"""The one study loop: tasks, rounds, and what happens between them. Flower-free.

The study owns what happens at a task boundary (the global model is frozen as the
teacher and its head grows), after a round (the new global state, the class means
the sites shared, validation, the checkpoint) and at the end (summary, model). A
driver owns only how a round's work reaches the sites and comes back: the Flower
ServerApp (`server/app.py`) sends messages; the single-machine runner
(`simulations/local.py`) calls the site's functions directly.

    study = Study(cfg, out, central=..., sites_eval=...)  # resumes from `out`
    for step in study.rounds():
        study.finish_round(step, driver.run_round(step))
    summary = study.finish()

Evaluation (`evaluation`): "sites" sums the per-class counts each site returns on
its own held-out patients; "server" counts on the server's own test set (the
simulation's, or a coordinator's audit set); "both" records the server's beside the
sites'. Validation for model selection follows the same rule.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fl_ci.bundle import run_metrics, write_bundle
from fl_ci.checkpoint import end_of_round, load_checkpoint, restore
from fl_ci.config import Config, ConfigError
from fl_ci.data.registry import dataset_spec, normalization
from fl_ci.experiment import Experiment
from fl_ci.metrics import accuracy_from_counts, mean_over_tasks
from fl_ci.models import IncrementalNet
from fl_ci.plan import StudyPlan
from fl_ci.recorder import Recorder
from fl_ci.report import write_report
from fl_ci.results import atomic_torch_save
from fl_ci.site import Counts, class_counts
from fl_ci.synthesis import ClassMeans

# (model, task, splits) -> {site: {split: counts}}: the sites' own evaluation
SiteEvaluator = Callable[[IncrementalNet, int, list[str]], dict[Any, dict[str, Counts]]]


@dataclass
class Step:
    """One round to run: the model to send (already grown for `task`), the teacher
    and the shared class means of the old classes (None at task 0)."""

    task: int
    round: int  # within the task, from 0
    server_round: int  # over the study, from 1
    model: IncrementalNet
    teacher: IncrementalNet | None
    means: ClassMeans | None
    last: bool  # the task's last round: sites share class means, test follows


@dataclass
class RoundResult:
    """What a driver brings back from a round."""

    state: dict[str, torch.Tensor]  # the new global model
    means: ClassMeans | None = None  # class means the sites shared (last round)
    row: dict[str, Any] = field(default_factory=dict)  # the driver's measurements
    note: str = ""  # for the progress line, e.g. "3/3 sites, 2.1 s, 4.0 MB sent"
    # the same round aggregated without its most suspect reply (None: no other)
    redo: Callable[[], RoundResult | None] | None = None


class AggregateRejected(RuntimeError):
    """The round's aggregate failed the check before it became the global model,
    and so did every aggregate without its most suspect replies; the study stopped
    with the model of the previous round (checkpointed)."""


class Study:
    """A whole study's state between rounds; resumes from `out/checkpoint.pt`."""

    def __init__(
        self,
        cfg: Config,
        out: str | Path,
        *,
        central: Experiment | None = None,
        sites_eval: SiteEvaluator | None = None,
        progress: bool = True,
        stop_after_round: int = 0,
        say: Callable[[str], None] = print,
    ) -> None:
        self.cfg, self.out = cfg, Path(out)
        self.plan = central.plan if central is not None else StudyPlan.from_config(cfg)
        if cfg.evaluation in ("server", "both") and central is None:
            raise ConfigError(
                f"config key 'evaluation' = {cfg.evaluation!r} needs a test set at the "
                "server; a coordinator without data evaluates at the sites: set "
                "evaluation = 'sites'"
            )
        if cfg.evaluation in ("sites", "both") and sites_eval is None:
            raise ConfigError(
                f"config key 'evaluation' = {cfg.evaluation!r}, but this runner has no "
                "sites to evaluate at"
            )
        self.central, self.sites_eval = central, sites_eval
        self.progress, self.stop_after_round, self.say = progress, stop_after_round, say
        self.recorder = Recorder(cfg, self.plan.tasks, self.plan.class_names)
        self.model = self.plan.build_model()
        self.teacher: IncrementalNet | None = None
        self.means: ClassMeans | None = None
        self.done = 0
        state = load_checkpoint(self.out, cfg)
        if state is not None:
            resumed = restore(state, self.plan, self.recorder)
            self.model, self.teacher = resumed.model, resumed.teacher
            self.means, self.done = resumed.means, resumed.server_round
            if progress:
                say(f"resuming {self.out} after round {self.done}")

    # ----- the loop ------------------------------------------------------------------
    def rounds(self) -> Iterator[Step]:
        """Every round not completed yet, in order; a task boundary (teacher, head
        growth) happens before its first round."""
        for task in range(len(self.plan.tasks)):
            rounds = self.cfg.rounds_at(task)
            first = self.cfg.first_round(task)
            if first + rounds - 1 <= self.done:
                continue  # the whole task was completed before a restart
            if task > 0 and first > self.done:
                self.teacher = _frozen_copy(self.model)
                self.model = self.plan.grow(self.model, task)
            old_means = self.means if task else None
            for rnd in range(rounds):
                server_round = first + rnd
                if server_round <= self.done:
                    continue
                yield Step(
                    task,
                    rnd,
                    server_round,
                    self.model,
                    self.teacher,
                    old_means,
                    last=rnd == rounds - 1,
                )

    def finish_round(self, step: Step, result: RoundResult) -> None:
        """Check the round's aggregate (finite outputs, no collapse of validation
        accuracy) before it becomes the global model, redoing it without the most
        suspect reply if it fails; then validate, test after the task's last round,
        record and checkpoint. A teacher is only ever taken from a checked round."""
        previous = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        splits = ["val", "test"] if step.last else ["val"]
        while True:
            self.model.load_state_dict(result.state)
            check = self.cfg.federation.check_aggregate
            problem = self.probe_problem() if check else None
            if problem is None:
                evals = self.evaluate(step.task, splits)
                problem = self.collapse_problem(step, evals["val"]) if check else None
            if problem is None:
                break
            self.say(f"round {step.server_round}: the aggregate {problem}")
            self.model.load_state_dict(previous)
            result = result.redo() if result.redo is not None else None
            if result is None:
                raise AggregateRejected(
                    f"round {step.server_round}: the aggregate {problem}, and no "
                    "aggregate of fewer replies passes the check; the study stopped "
                    f"with the model of round {step.server_round - 1}, checkpointed in "
                    f"{self.out}: find the site at fault in the log, then run again "
                    "with the same output folder to resume"
                )
        if step.last and result.means is not None:
            self.means = (
                result.means if self.means is None else self.means + result.means
            )
        val = evals["val"]
        self.recorder.add_row(
            task=step.task,
            round=step.round,
            server_round=step.server_round,
            split="val",
            accuracy=val["accuracy"],
            old_accuracy=val["old_accuracy"],
            new_accuracy=val["new_accuracy"],
            # the pinned final-accuracy form (mean over tasks) on validation: what
            # settings are chosen by (docs/results.md)
            accuracy_mean_over_tasks=mean_over_tasks(val["per_task"]),
            **(
                {"server_accuracy": evals["server_val"]["accuracy"]}
                if "server_val" in evals
                else {}
            ),
            **result.row,
        )
        if self.progress:
            note = f"{result.note}, " if result.note else ""
            self.say(
                f"task {step.task} round {step.round}: {note}val accuracy "
                f"{val['accuracy']:.2f}%"
            )
        if step.last:
            test = evals["test"]
            self.recorder.add_task(step.task, test)
            for site, result_ in evals.get("site_test", {}).items():
                self.recorder.add_site_task(site, step.task, result_)
            if "server_test" in evals:
                self.recorder.add_server_task(step.task, evals["server_test"])
            if self.progress:
                new = ", ".join(
                    self.plan.class_names[c] for c in self.plan.tasks[step.task]
                )
                self.say(
                    f"task {step.task}: {self.plan.seen(step.task)} classes seen (new: "
                    f"{new}), test accuracy {_pct(test['accuracy'])} (old "
                    f"{_pct(test['old_accuracy'])}, new {_pct(test['new_accuracy'])})"
                )
            # the tables so far, after every task (the plots at the end)
            self.recorder.write(self.out, plots=False)
            # the global model after each task: the teacher of the next one, kept for
            # `python -m simulations.diagnose` (fl_ci/diagnose.py)
            atomic_torch_save(
                self.model.state_dict(), task_model_path(self.out, step.task)
            )
        self.done = step.server_round
        end_of_round(
            self.out,
            cfg=self.cfg,
            server_round=step.server_round,
            model=self.model,
            teacher=self.teacher,
            means=self.means,
            recorder=self.recorder,
            stop_after_round=self.stop_after_round,
        )

    def finish(
        self,
        extra: dict[str, Any] | None = None,
        normalization: tuple[tuple[float, ...], tuple[float, ...]] | None = None,
    ) -> dict[str, Any]:
        """Write the summary, the final model with its bundle (what a hospital needs
        to use it: fl_ci/bundle.py) and `report.html`; returns the summary (and
        `table`). `normalization` is the input (mean, std) the sites used, where the
        study does not fix it (the procedural echo's render)."""
        summary = self.recorder.write(self.out, extra=extra)
        atomic_torch_save(self.model.state_dict(), self.out / "model.pt")
        norm = normalization or study_normalization(self.cfg, self.central)
        if norm is not None:
            spec = dataset_spec(self.cfg.dataset)
            write_bundle(
                self.out,
                self.model,
                config_flat=self.cfg.to_flat(),
                class_names=self.plan.class_names,
                classes_per_task=[len(t) for t in self.plan.tasks],
                mean=tuple(norm[0]),
                std=tuple(norm[1]),
                in_channels=spec.in_channels,
                image_size=self.cfg.data.image_size or spec.image_size,
                frames=self.cfg.data.frames if spec.cines else 1,
                metrics=run_metrics(summary),
                normalisation_source="the study's"
                if normalization is None
                else "reported by the sites",
            )
        write_report(self.out)
        summary["table"] = self.recorder.table()
        return summary

    # ----- the aggregate check --------------------------------------------------------
    def probe_problem(self) -> str | None:
        """Why the loaded model must not become the global one, from a probe batch of
        seeded noise images (no data needed): non-finite outputs."""
        spec = dataset_spec(self.cfg.dataset)
        size = self.cfg.data.image_size or spec.image_size
        generator = torch.Generator().manual_seed(0)
        probe = torch.randn(4, spec.in_channels, size, size, generator=generator)
        self.model.eval()
        with torch.no_grad():
            out = self.model.to("cpu")(probe)
        if not torch.isfinite(out).all():
            return "gives non-finite outputs on a probe batch"
        return None

    def collapse_problem(self, step: Step, val: dict[str, Any]) -> str | None:
        """Why the loaded model must not become the global one: its validation
        accuracy fell more than `federation.max_val_drop` points since the task's
        previous round (on 20 validation images or more: fewer cannot tell a collapse
        from noise)."""
        tolerance = self.cfg.federation.max_val_drop
        if tolerance <= 0 or step.round == 0 or val.get("examples", 0) < 20:
            return None
        earlier = [
            r["accuracy"]
            for r in self.recorder.rows
            if r.get("split") == "val" and r.get("task") == step.task
        ]
        if not earlier or not earlier[-1] == earlier[-1]:  # none, or NaN
            return None
        if earlier[-1] - val["accuracy"] > tolerance:
            return (
                f"has validation accuracy {val['accuracy']:.1f}%, down from "
                f"{earlier[-1]:.1f}% after the previous round (more than "
                f"federation.max_val_drop = {tolerance:g} points)"
            )
        return None

    # ----- evaluation ----------------------------------------------------------------
    def evaluate(self, task: int, splits: list[str]) -> dict[str, Any]:
        """Accuracies of the global model after `task` on `splits`, from the
        configured source: {split: result}; with "both" also {"server_<split>": ...};
        with site evaluation also {"site_test": {site: result}}."""
        tasks = self.plan.tasks
        out: dict[str, Any] = {}
        server = None
        if self.central is not None and self.cfg.evaluation in ("server", "both"):
            server = {
                split: accuracy_from_counts(
                    *_pair(self.central_counts(task, split)), tasks, task
                )
                for split in splits
            }
        if self.cfg.evaluation in ("sites", "both"):
            per_site = self.sites_eval(self.model, task, splits)
            k = self.model.num_classes
            for split in splits:
                total = Counts.zeros(k)
                for counts in per_site.values():
                    if split in counts:
                        total = total + counts[split]
                out[split] = accuracy_from_counts(*_pair(total), tasks, task)
                out[split]["sites"] = sum(split in c for c in per_site.values())
            if "test" in splits:
                out["site_test"] = {
                    site: accuracy_from_counts(*_pair(c["test"]), tasks, task)
                    for site, c in per_site.items()
                    if "test" in c
                }
            if server is not None:
                out.update({f"server_{s}": r for s, r in server.items()})
        else:
            out.update(server or {})
        return out

    def central_counts(self, task: int, split: str) -> Counts:
        data = self.central.held_out(split, task)
        return class_counts(self.model, data, self.cfg)


def task_model_path(out: str | Path, task: int) -> Path:
    """Where a run keeps the global model after `task`."""
    return Path(out) / "tasks" / f"model-task{task}.pt"


def study_normalization(
    cfg: Config, central: Experiment | None = None
) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
    """The input (mean, std) of the study: fixed by its config or dataset, else (the
    procedural echo) that of the data the server holds, if any."""
    norm = normalization(cfg)
    if norm is None and central is not None:
        norm = (central.splits.train.mean, central.splits.train.std)
    return norm


def _pct(value: float) -> str:
    return "-" if value != value else f"{value:.2f}%"  # NaN: no image of that kind


def _pair(counts: Counts) -> tuple[torch.Tensor, torch.Tensor]:
    return counts.correct, counts.total


def _frozen_copy(model: IncrementalNet) -> IncrementalNet:
    return copy.deepcopy(model).eval()


# ----- class-wise head averaging (federation.rehearse) ------------------------------
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
