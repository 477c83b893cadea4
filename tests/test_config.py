"""The typed config: scenario TOML, `--set`, Flower's flat run-config."""

import pytest

from fl_ci.config import Config, ConfigError


def test_defaults_round_trip_through_flat_form():
    cfg = Config().with_overrides(["synthesis.iterations=50", "partition.alpha=0.1"])
    flat = cfg.to_flat()
    assert flat["synthesis.iterations"] == 50
    assert all(isinstance(v, (bool, int, float, str)) for v in flat.values())
    assert Config.from_flat(flat) == cfg


def test_set_values_are_parsed_as_toml():
    cfg = Config().with_overrides(["lr=0.1", "ci.freeze_old=false", 'method="lwf"'])
    assert cfg.lr == 0.1 and cfg.ci.freeze_old is False and cfg.method == "lwf"


def test_bare_strings_are_accepted_for_string_keys():
    assert Config().with_overrides(["dataset=cifar100"]).dataset == "cifar100"


def test_unknown_key_names_the_key():
    with pytest.raises(ConfigError, match="synthesis.iterationz"):
        Config().with_overrides(["synthesis.iterationz=5"])


def test_false_string_is_not_true():
    # upstream parsed "False" as True; a bool key takes only true/false
    with pytest.raises(ConfigError, match="ci.freeze_old"):
        Config.from_flat({"ci.freeze_old": "False"})


def test_wrong_type_and_choice_name_the_key():
    with pytest.raises(ConfigError, match="'tasks' must be an integer"):
        Config.from_dict({"tasks": 2.5})
    with pytest.raises(ConfigError, match="partition.scheme"):
        Config.from_dict({"partition": {"scheme": "random"}})
    with pytest.raises(ConfigError, match="'sites' must be > 0"):
        Config.from_dict({"sites": 0})


def test_flower_style_dashes_are_accepted():
    assert Config.from_flat({"rounds-per-task": 3}).rounds_per_task == 3


def test_scenario_file_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("tasks = 4\nwhatever = 1\n")
    with pytest.raises(ConfigError, match=r"bad\.toml: unknown config key 'whatever'"):
        Config.from_toml(bad)
    with pytest.raises(ConfigError, match="not found"):
        Config.from_toml(tmp_path / "missing.toml")


def test_the_first_task_has_its_own_rounds_and_epochs_when_set():
    cfg = Config(
        tasks=3, rounds_per_task=2, local_epochs=5, base_rounds=3, base_epochs=9
    )
    assert [cfg.rounds_at(t) for t in range(3)] == [3, 2, 2]
    assert [cfg.epochs_at(t) for t in range(3)] == [9, 5, 5]
    assert [cfg.first_round(t) for t in range(4)] == [1, 4, 6, 8]  # 7 rounds in all
    assert [cfg.task_of_round(r) for r in range(1, 8)] == [0, 0, 0, 1, 1, 2, 2]


def test_unset_base_rounds_and_epochs_follow_every_other_task():
    cfg = Config(tasks=3, rounds_per_task=2, local_epochs=5)
    assert [cfg.rounds_at(t) for t in range(3)] == [2, 2, 2]
    assert [cfg.epochs_at(t) for t in range(3)] == [5, 5, 5]
    assert [cfg.task_of_round(r) for r in range(1, 7)] == [0, 0, 1, 1, 2, 2]
