"""simulations.compare: methods x seeds into one table, one plot, one Parquet file."""

import math

import pytest

from fl_ci.config import Config, ConfigError
from fl_ci.results import read_metrics
from simulations.compare import aggregate, main, method_config

TINY = """\
dataset = "echo-synth"
tasks = 2
init_classes = 3
local_epochs = 2
batch_size = 16
device = "cpu"

[data]
image_size = 32
patients = 6
devices = 2
frames = 2
"""


pytestmark = pytest.mark.usefixtures("one_thread")


def test_two_methods_two_seeds_write_table_plot_and_rows(tmp_path):
    scenario = tmp_path / "tiny.toml"
    scenario.write_text(TINY)
    out = tmp_path / "out"
    argv = [str(scenario), "--methods", "finetune,lwf", "--seeds", "0,1"]
    assert main([*argv, "--out", str(out), "--quiet"]) == 0
    rows = read_metrics(out / "comparison.parquet")
    runs = {(r["method"], r["seed"], r["task"]) for r in rows}
    assert runs == {
        (m, s, t) for m in ("finetune", "lwf") for s in (0, 1) for t in (0, 1)
    }
    table = (out / "comparison.md").read_text()
    assert "| finetune | 2 |" in table and "| lwf | 2 |" in table and "±" in table
    assert (out / "comparison.png").read_bytes().startswith(b"\x89PNG")


def test_aggregate_gives_mean_and_sample_std_over_seeds():
    runs = [
        {
            "final_accuracy": 40.0,
            "average_incremental_accuracy": 60.0,
            "forgetting": 10.0,
        },
        {
            "final_accuracy": 50.0,
            "average_incremental_accuracy": 60.0,
            "forgetting": 20.0,
        },
    ]
    (row,) = aggregate({"lwf": runs})
    std = math.sqrt(50.0)  # sample std of (40, 50) and of (10, 20)
    assert row["final accuracy (%)"] == f"45.00 ± {std:.2f}"
    assert row["avg. incremental accuracy (%)"] == "60.00 ± 0.00"
    assert row["forgetting (%)"] == f"15.00 ± {std:.2f}"


def test_ablation_names_map_to_config_overrides():
    cfg = method_config(Config(), "class_impression:no_margin", seed=3)
    assert cfg.method == "class_impression" and cfg.seed == 3
    assert cfg.ci.margin_weight == 0.0
    assert method_config(Config(), "class_impression:linear_head", 0).head == "linear"
    assert method_config(
        Config(), "class_impression:random_init", 0
    ).synthesis.init == ("random")
    assert not method_config(Config(), "class_impression:no_imprint", 0).ci.imprint


def test_unknown_ablation_and_method_are_refused():
    with pytest.raises(ConfigError, match="no_such"):
        method_config(Config(), "class_impression:no_such", 0)
    with pytest.raises(ConfigError, match="only class_impression"):
        method_config(Config(), "lwf:no_margin", 0)
    with pytest.raises(ConfigError, match="unknown method"):
        method_config(Config(), "nope", 0)


def test_unknown_method_stops_before_any_run(tmp_path):
    scenario = tmp_path / "tiny.toml"
    scenario.write_text(TINY)
    out = tmp_path / "out"
    assert main([str(scenario), "--methods", "finetune,nope", "--out", str(out)]) == 2
    assert not out.exists()
