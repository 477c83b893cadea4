"""Hospital folders for the deployment tests: the procedural echo of a tiny study,
exported one folder per site (simulations.export), and the run config that goes
with it. Imported as `hospitals` (pytest puts `tests/` on `sys.path`)."""

from pathlib import Path

from fl_ci.config import Config
from simulations.export import export, flat_toml

# the study: 2 + 3 views over 2 tasks, one round each; every site holds every view
TINY_STUDY = {
    "dataset": "echo-synth",
    "method": "class_impression",
    "tasks": 2,
    "init_classes": 3,
    "rounds_per_task": 1,
    "local_epochs": 1,
    "batch_size": 16,
    "data": {"patients": 4, "image_size": 32, "frames": 2},
    "partition": {"scheme": "iid"},
    "synthesis": {"iterations": 5, "per_class": 4, "min_mean_count": 1},
    "federation": {"timeout": 300.0},
}


def export_hospitals(root: Path, sites: int = 3) -> Config:
    """`root/site-K/` for K < `sites` (device K's patients), and the deployment study
    (dataset `echo`, views by name, fixed normalisation, evaluation at the sites)."""
    data = {**TINY_STUDY["data"], "devices": sites}
    export(Config.from_dict({**TINY_STUDY, "sites": sites, "data": data}), root)
    return Config.from_toml(root / "study.toml")


def add_manifest_rows(site: Path, rows: list[str]) -> None:
    """Append `path,view,patient_id,device` lines to a site's manifest."""
    with open(site / "manifest.csv", "a") as f:
        f.writelines(f"{row}\n" for row in rows)


def manifest_rows(site: Path) -> int:
    """Data rows of a site's manifest (the header not counted)."""
    return len((site / "manifest.csv").read_text().strip().splitlines()) - 1


def run_config_file(study: Config, path: Path, **runtime) -> Path:
    """The study and runtime keys (`out`, `progress`) as a run-config TOML file."""
    path.write_text(flat_toml({**study.to_flat(), **runtime}))
    return path
