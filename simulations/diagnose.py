"""`python -m simulations.diagnose RUN_DIR [RUN_DIR ...]`: where the old classes go.

For every task t >= 1 of a finished (or stopped) run: the teacher (`tasks/
model-task{t-1}.pt`), the student (`tasks/model-task{t}.pt`), the impressions every
site replayed at t (`impressions-task{t}-*.pt` in the site stores) and the run's real
validation images give the measures of fl_ci/diagnose.py: does the teacher recognise
its impressions, did the student fit them, does that transfer to real old images,
and are the lost ones called the new class (head bias) or another old class (drift).
Writes `RUN_DIR/diagnosis.json`, `diagnosis.md` and `diagnosis.png` (one group of
bars per task) and prints the Markdown. Several run folders: one table with a row per
run and task, and its mean over runs per task (`--out DIR` for the combined files).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

from fl_ci.config import ConfigError
from fl_ci.data.base import DataError
from fl_ci.diagnose import MEASURES, TaskDiagnosis, diagnose_task
from fl_ci.experiment import Experiment
from fl_ci.methods.base import model_hash
from fl_ci.results import _save_png, atomic_write, write_json
from fl_ci.study import task_model_path
from simulations.audit import AuditError, find_impressions, load_config, site_stores

LABELS = {
    "teacher_on_impressions": "teacher on impressions",
    "student_on_impressions": "student on impressions",
    "teacher_on_old": "teacher on real old",
    "student_on_old": "student on real old",
    "student_on_old_among_old": "student on real old, old rows only",
    "old_to_new": "real old called new",
    "old_to_old": "real old called another old",
    "feature_cosine": "feature cosine teacher-student",
    "impression_gap": "impression-real centroid gap",
    "student_on_new": "student on real new",
}


def task_impressions(
    run_dir: Path, task: int, teacher_hash: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Every site's impressions of `task` made by the teacher with `teacher_hash`."""
    images, labels = [], []
    for store in site_stores(run_dir):
        for path in store.glob(f"impressions-task{task}-{teacher_hash}.pt"):
            cached = torch.load(path, map_location="cpu", weights_only=True)
            images.append(cached["images"].float())
            labels.append(cached["labels"].long())
    if not images:
        found = {
            str(s): sorted(p.name for p in find_impressions(s).values())
            for s in site_stores(run_dir)
        }
        raise AuditError(
            f"{run_dir}: no impressions of task {task} by its teacher "
            f"(impressions-task{task}-{teacher_hash}.pt); the site stores hold {found}"
        )
    return torch.cat(images), torch.cat(labels)


def load_task_model(exp: Experiment, run_dir: Path, task: int):
    path = task_model_path(run_dir, task)
    if not path.exists():
        raise AuditError(
            f"{path} not found: the run stopped before task {task} ended, or was made "
            "before runs kept each task's model"
        )
    model = exp.plan.model_at_task(task)
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return model.eval()


def diagnose_run(run_dir: str | Path) -> list[TaskDiagnosis]:
    """The diagnosis of every task >= 1 whose model the run kept."""
    run_dir = Path(run_dir)
    cfg = load_config(run_dir)
    exp = Experiment.from_config(cfg)
    out = []
    for task in range(1, len(exp.tasks)):
        if not task_model_path(run_dir, task).exists():
            break
        teacher = load_task_model(exp, run_dir, task - 1)
        student = load_task_model(exp, run_dir, task)
        images, labels = task_impressions(run_dir, task, model_hash(teacher))
        out.append(
            diagnose_task(
                task,
                teacher,
                student,
                images,
                labels,
                exp.held_out("val", task),
                num_old=exp.seen(task - 1),
            )
        )
    if not out:
        raise AuditError(f"{run_dir}: no task after the first was kept")
    return out


def _f(value: float, measure: str) -> str:
    if value != value:
        return "n/a"
    digits = 3 if measure in ("feature_cosine", "impression_gap") else 1
    return f"{value:.{digits}f}"


def markdown(rows: list[tuple[str, TaskDiagnosis]]) -> str:
    """One row per run and task, then the mean over runs per task when several."""
    head = ["run", "task", "old / new"] + [LABELS[m] for m in MEASURES]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, d in rows:
        cells = [name, str(d.task), f"{d.num_old} / {d.num_new}"]
        cells += [_f(getattr(d, m), m) for m in MEASURES]
        lines.append("| " + " | ".join(cells) + " |")
    runs = {name for name, _ in rows}
    if len(runs) > 1:
        for task in sorted({d.task for _, d in rows}):
            ds = [d for _, d in rows if d.task == task]
            cells = [
                f"mean of {len(ds)}",
                str(task),
                f"{ds[0].num_old} / {ds[0].num_new}",
            ]
            for m in MEASURES:
                vals = np.array([getattr(d, m) for d in ds], dtype=float)
                cells.append(_f(float(np.nanmean(vals)), m))
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(rows: list[tuple[str, TaskDiagnosis]], path: Path) -> Path:
    """Grouped bars per task (mean over runs): the accuracy measures in %."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [m for m in MEASURES if m not in ("feature_cosine", "impression_gap")]
    tasks = sorted({d.task for _, d in rows})
    fig, ax = plt.subplots(figsize=(2.2 + 2.4 * len(tasks), 4.2))
    width = 0.8 / len(shown)
    for i, m in enumerate(shown):
        means = [
            float(np.nanmean([getattr(d, m) for _, d in rows if d.task == t]))
            for t in tasks
        ]
        xs = np.arange(len(tasks)) + (i - (len(shown) - 1) / 2) * width
        ax.bar(xs, means, width, label=LABELS[m])
    cos = [
        float(np.nanmean([d.feature_cosine for _, d in rows if d.task == t]))
        for t in tasks
    ]
    ax.set_xticks(
        np.arange(len(tasks)),
        [f"task {t}\nfeature cos {c:.2f}" for t, c in zip(tasks, cos, strict=True)],
    )
    ax.set_ylabel("% of images")
    ax.set_ylim(0, 100)
    runs = len({name for name, _ in rows})
    ax.set_title(f"Where the old classes go ({runs} run{'s' * (runs > 1)})")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    return _save_png(fig, path)


def write(rows: list[tuple[str, TaskDiagnosis]], out: Path) -> str:
    text = markdown(rows)
    write_json(
        [{"run": name, **d.to_dict()} for name, d in rows], out / "diagnosis.json"
    )
    atomic_write(
        out / "diagnosis.md", lambda tmp: Path(tmp).write_text(text, encoding="utf-8")
    )
    plot(rows, out / "diagnosis.png")
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m simulations.diagnose", description=__doc__
    )
    parser.add_argument("run_dirs", nargs="+", help="run output folders")
    parser.add_argument(
        "--out", help="folder for the combined files of several runs (default: the run)"
    )
    args = parser.parse_args(argv)
    runs = [Path(r) for r in args.run_dirs]
    if len(runs) > 1 and not args.out:
        parser.error("several run folders need --out DIR for the combined files")
    try:
        rows = [(str(r), d) for r in runs for d in diagnose_run(r)]
    except (AuditError, ConfigError, DataError, json.JSONDecodeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    out = Path(args.out) if args.out else runs[0]
    print(write(rows, out), end="")
    print(f"written: {out / 'diagnosis.json'}, diagnosis.md, diagnosis.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
