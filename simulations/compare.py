"""`python -m simulations.compare SCENARIO --methods a,b,... --seeds 0,1,2
[--set key=value ...] [--out DIR] [--quiet]`.

Runs every method over every seed with the scenario's settings (`--set` applied
first), one run folder each (OUT/METHOD/seed-N): `simulations.local.run_local` when
`sites = 1`, `simulations.federated.run_federated` otherwise. A method may be a Class
Impression ablation, `class_impression:VARIANT`, a set of config overrides (see
`ablation_overrides`). Then writes to OUT:
- comparison.parquet: one row per method, seed and task (accuracy after the task,
  classes seen) carrying the run's final accuracy, average incremental accuracy,
  forgetting, backward transfer and wall time;
- comparison.md: those three metrics per method as mean ± sample std over seeds;
- comparison.png: accuracy against classes seen, mean over seeds, one line per method.
Only `seed` changes between repeats; the class order stays the scenario's (set
`order_seed` for ABD's repeat protocol). A run that fails is reported on stderr and in
comparison.md, the others go on, and the exit status is 1.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fl_ci.config import Config, ConfigError
from fl_ci.data.base import DataError
from fl_ci.methods import registry
from fl_ci.results import format_table, plot_accuracy, write_metrics
from simulations.__main__ import scenario_path

METRICS = (
    ("final_accuracy", "final accuracy (%)"),
    ("average_incremental_accuracy", "avg. incremental accuracy (%)"),
    ("forgetting", "forgetting (%)"),
    ("val_final_accuracy", "final accuracy, validation (%)"),
)


def ablation_overrides(variant: str) -> dict[str, Any]:
    """Config overrides (dotted keys) of the Class Impression ablation `variant`."""
    table: dict[str, dict[str, Any]] = {
        "no_margin": {"ci.margin_weight": 0.0},
        "no_contrastive": {"ci.contrastive_weight": 0.0},
        "no_distill": {"ci.distill_weight": 0.0},
        "random_init": {"synthesis.init": "random"},
        "linear_head": {"head": "linear"},
        "no_imprint": {"ci.imprint": False},
        # levers against forgetting (docs/results.md, "Keeping the old views")
        "local_ce": {"ci.real_ce": "local"},
        "head_align": {"ci.head_align_weight": 1.0},
        "local_ce_head_align": {"ci.real_ce": "local", "ci.head_align_weight": 1.0},
        "logit_distill": {"ci.logit_distill_weight": 1.0},
        "distill_synthetic": {"ci.distill_rows": "synthetic"},
        "augment_impressions": {"ci.augment_impressions": True},
        "lr_peak": {"synthesis.lr_peak": 0.4},
        "lr_peak_augment": {"synthesis.lr_peak": 0.4, "ci.augment_impressions": True},
        # from the real feature statistics each site keeps (fl_ci/prototypes.py)
        "feature_replay": {"ci.prototype_weight": 1.0},
        "feature_replay_light": {"ci.prototype_weight": 0.1},
        "feature_replay_free": {
            "ci.prototype_weight": 1.0,
            "ci.distill_rows": "synthetic",
        },
        # feature matching at weight 10 is the default now (docs/results.md); these
        # names keep the runs made before it comparable
        "feature_match": {"synthesis.feature_weight": 10.0},
        "no_feature_match": {"synthesis.feature_weight": 0.0},
        "more_impressions": {"synthesis.per_class": 80},
        "calibrate": {"ci.calibration_steps": 200},
        "feature_match_calibrate": {
            "synthesis.feature_weight": 10.0,
            "ci.calibration_steps": 200,
        },
    }
    if variant not in table:
        raise ConfigError(
            f"unknown class_impression ablation {variant!r}; known: "
            f"{', '.join(sorted(table))}"
        )
    return table[variant]


def method_config(base: Config, label: str, seed: int) -> Config:
    """The config of `label` (`method` or `class_impression:VARIANT`) at `seed`."""
    name, sep, variant = label.partition(":")
    methods = registry()
    if name not in methods:
        raise ConfigError(
            f"unknown method {name!r} in --methods; known: {', '.join(sorted(methods))}"
        )
    overrides: dict[str, Any] = {"method": name, "seed": seed}
    if sep:
        if name != "class_impression":
            raise ConfigError(
                f"--methods entry {label!r}: only class_impression has ablations"
            )
        overrides.update(ablation_overrides(variant))
    return Config.from_flat(overrides, base=base)


def _mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof 1; 0.0 for a single value)."""
    a = np.asarray(values, dtype=np.float64)
    if a.size == 0:
        return math.nan, math.nan
    return float(a.mean()), float(a.std(ddof=1)) if a.size > 1 else 0.0


def aggregate(results: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """One Markdown row per method: each metric as "mean ± std" over its runs'
    summaries (keys as in `Recorder.summary`)."""
    rows = []
    for label, summaries in results.items():
        row: dict[str, Any] = {"method": label, "runs": len(summaries)}
        for key, heading in METRICS:
            mean, std = _mean_std([s.get(key, math.nan) for s in summaries])
            row[heading] = "n/a" if math.isnan(mean) else f"{mean:.2f} ± {std:.2f}"
        rows.append(row)
    return rows


def mean_curve(summaries: list[dict[str, Any]]) -> tuple[list[int], list[float]]:
    """(classes seen, mean accuracy after each task) over runs, up to the fewest
    tasks any run completed."""
    done = min(len(s["accuracy_after_task"]) for s in summaries)
    acc = np.mean([s["accuracy_after_task"][:done] for s in summaries], axis=0)
    return list(summaries[0]["classes_seen"][:done]), acc.tolist()


def table_rows(
    label: str, seed: int, summary: dict[str, Any], run_dir: Path
) -> Iterator[dict[str, Any]]:
    """comparison.parquet rows of one run: one per completed task."""
    for task, accuracy in enumerate(summary["accuracy_after_task"]):
        yield {
            "method": label,
            "seed": seed,
            "task": task,
            "classes_seen": summary["classes_seen"][task],
            "accuracy": accuracy,
            "final_accuracy": summary["final_accuracy"],
            "average_incremental_accuracy": summary["average_incremental_accuracy"],
            "forgetting": summary["forgetting"],
            "val_final_accuracy": summary.get("val_final_accuracy", math.nan),
            "bwt": summary["bwt"],
            "wall_seconds": summary["wall_seconds"],
            "run_dir": str(run_dir),
        }


def _write_text(path: Path, text: str) -> None:
    """Write `text` to a temporary file beside `path`, then rename it into place."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def compare(
    base: Config,
    labels: list[str],
    seeds: list[int],
    out: str | Path,
    title: str = "",
    progress: bool = True,
) -> tuple[str, list[str]]:
    """Run every (label, seed), write the three comparison files; returns the
    Markdown table and the failures (one line each)."""
    out = Path(out)
    # every config first: a bad key or method stops the study before any run
    plan = [
        (label, seed, method_config(base, label, seed))
        for label in labels
        for seed in seeds
    ]
    if any(cfg.sites > 1 for _, _, cfg in plan):
        from simulations.federated import run_federated
    if any(cfg.sites == 1 for _, _, cfg in plan):
        from simulations.local import run_local
    results: dict[str, list[dict[str, Any]]] = {label: [] for label in labels}
    rows: list[dict[str, Any]] = []
    failures: list[str] = []
    for label, seed, cfg in plan:
        run_dir = out / label.replace(":", "-") / f"seed-{seed}"
        if progress:
            print(f"== {label}, seed {seed} -> {run_dir}", flush=True)
        # run_local / run_federated do not seed torch's global RNG, which draws the
        # model's initial weights and new head rows: seed it so that a seed means the
        # same initial model for every method.
        torch.manual_seed(cfg.seed)
        try:
            if cfg.sites > 1:
                summary = run_federated(cfg, run_dir, progress=progress)
            else:
                summary = run_local(cfg, run_dir, progress=progress)
        except (ConfigError, DataError):
            raise  # the setup is wrong for every run: stop
        except Exception as err:  # one broken run must not lose the others
            traceback.print_exc()
            failures.append(f"{label}, seed {seed}: {type(err).__name__}: {err}")
            continue
        results[label].append(summary)
        rows.extend(table_rows(label, seed, summary, run_dir))
    out.mkdir(parents=True, exist_ok=True)
    write_metrics(rows, out / "comparison.parquet")
    done = {label: s for label, s in results.items() if s}
    columns = ["method", "runs", *(heading for _, heading in METRICS)]
    table = format_table(aggregate(done), columns)
    sites = base.sites
    lines = [
        f"# Comparison: {title or base.dataset}",
        "",
        f"{base.dataset}, {base.tasks} tasks, {sites} site{'s' * (sites > 1)}, "
        f"seeds {', '.join(map(str, seeds))}; mean ± sample std over seeds (test set; the "
        "last column on validation, which settings are chosen by).",
        "",
        table,
    ]
    if failures:
        lines += ["", "Failed runs:", "", *(f"- {f}" for f in failures)]
    _write_text(out / "comparison.md", "\n".join(lines) + "\n")
    plot_accuracy(
        {label: mean_curve(s) for label, s in done.items()},
        out / "comparison.png",
        title=f"{title or base.dataset}: mean over seeds",
    )
    return table, failures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m simulations.compare", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("scenario", help="name under simulations/scenarios/ or a path")
    parser.add_argument(
        "--methods",
        required=True,
        help="comma-separated, e.g. finetune,lwf,class_impression:no_margin",
    )
    parser.add_argument("--seeds", default="0", help="comma-separated, e.g. 0,1,2")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key for every run",
    )
    parser.add_argument(
        "--out", help="output folder (default runs/compare-SCENARIO-TIME)"
    )
    parser.add_argument("--quiet", action="store_true", help="no progress output")
    args = parser.parse_args(argv)
    labels = list(
        dict.fromkeys(m.strip() for m in args.methods.split(",") if m.strip())
    )
    try:
        seeds = list(dict.fromkeys(int(s) for s in args.seeds.split(",") if s.strip()))
    except ValueError:
        print(f"error: --seeds must be integers, got {args.seeds!r}", file=sys.stderr)
        return 2
    if not labels or not seeds:
        print("error: --methods and --seeds must not be empty", file=sys.stderr)
        return 2
    try:
        path = scenario_path(args.scenario)
        base = Config.from_toml(path, args.overrides)
        out = Path(
            args.out or f"runs/compare-{path.stem}-{time.strftime('%Y%m%d-%H%M%S')}"
        )
        table, failures = compare(
            base, labels, seeds, out, title=path.stem, progress=not args.quiet
        )
    except (ConfigError, DataError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print()
    print(table)
    for failure in failures:
        print(f"failed: {failure}", file=sys.stderr)
    print(f"\nresults in {out.resolve()}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
