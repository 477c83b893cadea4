"""`python -m simulations SCENARIO [--set key=value ...] [--out DIR]`."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from fl_ci.config import Config, ConfigError
from fl_ci.data.base import DataError
from fl_ci.synthesis import MissingMeanError, SynthesisError
from fl_ci.trainer import TrainingError

SCENARIOS = Path(__file__).parent / "scenarios"


def scenario_path(name: str) -> Path:
    """A scenario name under simulations/scenarios/, or a path to a TOML file."""
    path = Path(name)
    if path.suffix == ".toml" or path.exists():
        return path
    candidate = SCENARIOS / f"{name}.toml"
    if not candidate.exists():
        known = ", ".join(sorted(p.stem for p in SCENARIOS.glob("*.toml")))
        raise ConfigError(f"unknown scenario {name!r}; known: {known}")
    return candidate


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m simulations", description=__doc__)
    parser.add_argument("scenario", help="name under simulations/scenarios/ or a path")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key, e.g. --set synthesis.iterations=50",
    )
    parser.add_argument("--out", help="output folder (default runs/SCENARIO-TIME)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    try:
        path = scenario_path(args.scenario)
        cfg = Config.from_toml(path, args.overrides)
        out = Path(args.out or f"runs/{path.stem}-{time.strftime('%Y%m%d-%H%M%S')}")
        if cfg.sites == 1:
            from simulations.local import run_local

            summary = run_local(cfg, out, progress=not args.quiet)
        else:
            from simulations.federated import run_federated

            summary = run_federated(cfg, out, progress=not args.quiet)
    except (
        ConfigError,
        DataError,
        MissingMeanError,
        SynthesisError,
        TrainingError,
    ) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print()
    print(summary["table"])
    print(f"\nresults in {out.resolve()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
