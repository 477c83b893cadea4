"""Seconds and bytes per federated round of a scenario in Flower's simulation.

    python -m benchmarks.federated_round [SCENARIO] [--set KEY=VALUE ...] [--out FILE]

Runs the scenario through `simulations.federated.run_federated` (Ray, one simulated
SuperNode per site), then reads the run's metrics.parquet: per round the server's
`round_seconds` (send to last reply; evaluation excluded), `bytes_sent` and
`bytes_received` (array payloads, all sites together). The first round also pays
for Ray's actors starting and importing the client app, so it is reported apart.
Without SCENARIO: echo-federated's small CPU variant, the README's main job
(`data.patients=30`, `rounds_per_task=2`, `base_rounds=6`, `synthesis.iterations=200`,
`synthesis.per_class=30`, as pyproject.toml's); `--set` goes on top.

Also timed once in this process: `Experiment.from_config` (loading or generating the
data), which every site repeats at every round (client/app.py).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from typing import Any

from benchmarks.common import (
    default_out,
    fmt_float,
    fmt_int,
    fmt_str,
    machine_info,
    markdown_table,
    write_result,
)

DEFAULT_SCENARIO = "echo-federated"
SMALL = [  # the README's main job
    "data.patients=30",
    "rounds_per_task=2",
    "base_rounds=6",  # pyproject's; the scenario's own is 9
    "synthesis.iterations=200",  # pyproject's; the scenario's own is 300
    "synthesis.per_class=30",  # and 40
]


def _stats(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"n": 0, "mean": None, "median": None, "min": None, "max": None}
    return {
        "n": len(values),
        "mean": statistics.fmean(values),
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
    }


def round_rows(metrics_path: Path) -> list[dict[str, Any]]:
    """The per-round (validation) rows of a run, in round order."""
    from fl_ci.results import read_metrics

    rows = [
        r
        for r in read_metrics(metrics_path)
        if r.get("split") == "val" and r.get("round_seconds") is not None
    ]
    return sorted(rows, key=lambda r: r["server_round"])


def summarise(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """First round apart; the rest as mean/median; task-start rounds split out."""
    if not rows:
        raise RuntimeError("metrics.parquet has no per-round rows")
    first, rest = rows[0], rows[1:]
    secs = [r["round_seconds"] for r in rest]
    return {
        "rounds": len(rows),
        "first_round_seconds": first["round_seconds"],
        "round_seconds_after_first": _stats(secs),
        # round 0 of tasks > 0: Class Impression synthesizes its impressions here
        "task_start_round_seconds": _stats(
            [r["round_seconds"] for r in rest if r["round"] == 0]
        ),
        "other_round_seconds": _stats(
            [r["round_seconds"] for r in rest if r["round"] != 0]
        ),
        "bytes_sent_per_round": _stats([float(r["bytes_sent"]) for r in rows]),
        "bytes_received_per_round": _stats([float(r["bytes_received"]) for r in rows]),
        "total_round_seconds": sum(r["round_seconds"] for r in rows),
    }


COLUMNS = [
    ("server_round", "round", fmt_int),
    ("task", "task", fmt_int),
    ("round", "round in task", fmt_int),
    ("sites_aggregated", "sites", fmt_int),
    ("attempts", "attempts", fmt_int),
    ("round_seconds", "seconds", fmt_float(1)),
    ("mb_sent", "MB sent", fmt_float(2)),
    ("mb_received", "MB received", fmt_float(2)),
]
SUMMARY_COLUMNS = [
    ("what", "what", fmt_str),
    ("n", "rounds", fmt_int),
    ("mean", "mean", fmt_float(2)),
    ("median", "median", fmt_float(2)),
    ("min", "min", fmt_float(2)),
    ("max", "max", fmt_float(2)),
]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.federated_round",
        description=__doc__.split("\n")[0],
    )
    parser.add_argument(
        "scenario",
        nargs="?",
        help=f"name under simulations/scenarios/ or a TOML path (default "
        f"{DEFAULT_SCENARIO} with {' '.join(SMALL)})",
    )
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE"
    )
    parser.add_argument(
        "--run-dir", help="the run's output folder (default runs/bench-federated-...)"
    )
    parser.add_argument(
        "--out", help="JSON file to write (default benchmarks/results/NAME-...json)"
    )
    parser.add_argument("--quiet", action="store_true", help="no progress output")
    parser.add_argument(
        "--from-run",
        metavar="DIR",
        help="do not run: summarise the metrics.parquet of an earlier run in DIR",
    )
    args = parser.parse_args(argv)

    import torch

    from fl_ci.config import Config
    from fl_ci.experiment import Experiment
    from fl_ci.trainer import resolve_device
    from simulations.__main__ import scenario_path

    name = args.scenario or DEFAULT_SCENARIO
    overrides = ([] if args.scenario else list(SMALL)) + args.overrides
    path = scenario_path(name)
    cfg = Config.from_toml(path, overrides)
    if cfg.sites < 2:
        parser.error(f"{name} has sites = {cfg.sites}; a federated round needs >= 2")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    run_dir = Path(
        args.from_run or args.run_dir or f"runs/bench-federated-{path.stem}-{stamp}"
    )
    device = resolve_device(cfg.device)
    info = machine_info(device)

    data_seconds = wall = None
    summary: dict[str, Any] = {}
    if args.from_run:
        import json

        summary = json.loads((run_dir / "summary.json").read_text())
        print(f"summarising {run_dir} (not run again)", flush=True)
    else:
        from simulations.federated import run_federated

        start = time.perf_counter()
        Experiment.from_config(cfg)
        data_seconds = time.perf_counter() - start
        print(
            f"{name} {' '.join(overrides)}: data load {data_seconds:.2f} s", flush=True
        )
        start = time.perf_counter()
        summary = run_federated(cfg, run_dir, progress=not args.quiet)
        wall = time.perf_counter() - start
    rows = round_rows(run_dir / "metrics.parquet")
    for r in rows:
        r["mb_sent"] = r["bytes_sent"] / 1e6
        r["mb_received"] = r["bytes_received"] / 1e6
    stats = summarise(rows)
    per_round = markdown_table(rows, COLUMNS)
    summary_rows = [
        {"what": "first round (Ray actors start)", "n": 1}
        | dict.fromkeys(("mean", "median", "min", "max"), stats["first_round_seconds"]),
        {"what": "rounds after the first, seconds"}
        | stats["round_seconds_after_first"],
        {"what": "  of which task-start rounds"} | stats["task_start_round_seconds"],
        {"what": "  of which other rounds"} | stats["other_round_seconds"],
        {"what": "MB sent per round (all sites)"}
        | {
            k: (v / 1e6 if k != "n" and v is not None else v)
            for k, v in stats["bytes_sent_per_round"].items()
        },
        {"what": "MB received per round (all sites)"}
        | {
            k: (v / 1e6 if k != "n" and v is not None else v)
            for k, v in stats["bytes_received_per_round"].items()
        },
    ]
    table = markdown_table(summary_rows, SUMMARY_COLUMNS)
    print()
    print(per_round)
    print()
    print(table)
    if wall is not None:
        print(
            f"\nwhole run {wall:.1f} s (Ray start-up, every round, evaluation, "
            f"writing); sum of round times {stats['total_round_seconds']:.1f} s"
        )
    out = write_result(
        {
            "benchmark": "federated_round",
            "machine": info,
            "scenario": name,
            "overrides": overrides,
            "sites": cfg.sites,
            "method": cfg.method,
            "dataset": cfg.dataset,
            "run_dir": str(run_dir.resolve()),
            "summarised_existing_run": bool(args.from_run),
            "wall_seconds": wall,
            "summary_wall_seconds": summary.get("wall_seconds"),
            "data_load_seconds": data_seconds,
            "final_accuracy": summary.get("final_accuracy"),
            "torch_threads_server": torch.get_num_threads(),
            **stats,
            "rounds_table": [
                {
                    k: r.get(k)
                    for k in (
                        "server_round",
                        "task",
                        "round",
                        "sites_aggregated",
                        "round_seconds",
                        "bytes_sent",
                        "bytes_received",
                    )
                }
                for r in rows
            ],
            "table": table,
            "per_round_table": per_round,
        },
        args.out or default_out("federated_round", device),
    )
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
