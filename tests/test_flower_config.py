"""`flwr run .` reads its defaults from pyproject: they must be the typed config's keys."""

import tomllib
from pathlib import Path

from fl_ci.config import Config
from fl_ci_flower.protocol import split_run_config

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


def _flatten(table, prefix=""):
    out = {}
    for key, value in table.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


def test_pyproject_run_config_has_every_config_key_and_parses():
    app = tomllib.loads(PYPROJECT.read_text())["tool"]["flwr"]["app"]
    flat = _flatten(app["config"])
    cfg, runtime = split_run_config(flat)
    assert set(flat) - set(runtime) == set(Config().to_flat())
    assert cfg.method == "class_impression" and cfg.sites >= 2
    assert app["components"] == {
        "serverapp": "server.app:app",
        "clientapp": "client.app:app",
    }
