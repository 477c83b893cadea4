"""Each attack of docs/reliability.md against each aggregation, in Flower's simulation
runtime: `python scripts/attack_matrix.py OUT_DIR [STRATEGY ...]`.

The study is tests/test_screen.py's ATTACKED: at task 1 sites 0 and 1 reply (site 2
sits out by the schedule), at tasks 0 and 2 all three; site 1 attacks in every round
it takes part in. Prints one Markdown row per (attack, strategy): whether the study
completed, the attacker's rounds rejected at two and at three replies, the final
accuracy, and the honest run's for comparison.
"""

import json
import sys
from pathlib import Path

import pyarrow.parquet as pq

from fl_ci.config import Config
from simulations.federated import run_federated

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from test_screen import ATTACKED  # noqa: E402

ATTACKS = ("none", "scale1000", "scale50", "sign-flip", "nan", "claim")
# trimmed_mean trims a third of 3 sites (beta 0.2 trims none: refused); Krum with
# f = 1 needs 5 sites, so it is refused for this 3-site study
STRATEGIES = ("fedavg", "median", "trimmed_mean", "krum")
EXTRA = {"trimmed_mean": {"trim_beta": 0.34}}


def one(out: Path, attack: str, strategy: str) -> str:
    cfg = Config.from_dict(
        {
            **ATTACKED,
            "federation": {
                **ATTACKED["federation"],
                "strategy": strategy,
                **EXTRA.get(strategy, {}),
            },
        }
    )
    faults = "" if attack == "none" else f"1:{attack}@*"
    try:
        summary = run_federated(cfg, out, progress=False, faults=faults)
    except Exception as err:  # noqa: BLE001 - the table reports how a run ended
        return f"| {attack} | {strategy} | stopped: {type(err).__name__}: {str(err)[:120]} | | | |"
    rows = [
        r
        for r in pq.read_table(out / "metrics.parquet").to_pylist()
        if r["split"] == "val"
    ]
    two = [r for r in rows if r["task"] == 1]
    three = [r for r in rows if r["task"] != 1]
    rej = lambda rs: f"{sum(r['sites_rejected'] > 0 for r in rs)}/{len(rs)}"  # noqa: E731
    summary = json.loads((out / "summary.json").read_text())
    return (
        f"| {attack} | {strategy} | completed | {rej(two)} | {rej(three)} | "
        f"{summary['final_accuracy']:.1f} |"
    )


def main() -> None:
    root = Path(sys.argv[1])
    print(
        "| attack (site 1) | strategy | study | rounds rejected, 2 replies | "
        "rounds rejected, 3 replies | final acc. (%) |"
    )
    print("|---|---|---|---|---|---|")
    for strategy in sys.argv[2:] or STRATEGIES:
        for attack in ATTACKS:
            print(one(root / f"{strategy}-{attack}", attack, strategy), flush=True)


if __name__ == "__main__":
    main()
