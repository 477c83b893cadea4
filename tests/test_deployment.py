"""Deployment runtime on loopback: a SuperLink and two SuperNodes started as processes,
`flwr run` of this app, the run's status read back (the CLI exits 0 even when the
server app failed), every process stopped by its PID."""

import json
import shutil
from pathlib import Path

import pytest
from flower_processes import (
    BIN,
    FlowerProcesses,
    flower_env,
    flwr_json,
    free_port,
    wait_for_run,
    wait_healthy,
    write_cli_config,
)

REPO = Path(__file__).resolve().parents[1]
RUN_CONFIG = (
    "method='class_impression' sites=2 tasks=2 init_classes=3 rounds_per_task=1 "
    "local_epochs=1 batch_size=16 data.patients=6 data.devices=2 data.image_size=32 "
    "data.frames=2 synthesis.iterations=5 synthesis.per_class=4 "
    "synthesis.min_mean_count=1 partition.scheme='iid' federation.timeout=300.0"
)


@pytest.mark.slow
@pytest.mark.skipif(
    shutil.which("flower-superlink", path=str(BIN)) is None,
    reason="flower-superlink not installed",
)
def test_superlink_and_two_supernodes_complete_a_run(tmp_path):
    link_port = free_port()
    procs = FlowerProcesses(tmp_path)
    cli = flower_env(tmp_path / "cli" / "home")
    write_cli_config(Path(cli["FLWR_HOME"]), f"127.0.0.1:{link_port}", None)
    try:
        procs.start(
            "superlink",
            [
                "flower-superlink",
                "--insecure",
                "--host",
                "127.0.0.1",
                "--port",
                str(link_port),
            ],
            flower_env(tmp_path / "superlink" / "home"),
        )
        wait_healthy(link_port)
        for site in range(2):
            procs.start(
                f"site{site}",
                [
                    "flower-supernode",
                    "--insecure",
                    "--superlink",
                    f"127.0.0.1:{link_port}",
                    "--port",
                    str(free_port()),
                    "--node-config",
                    f"partition-id={site} num-partitions=2",
                ],
                flower_env(tmp_path / f"site{site}" / "home"),
            )
        out = tmp_path / "out"
        started = flwr_json(
            cli,
            tmp_path,
            "run",
            str(REPO),
            "test",
            "--run-config",
            f"{RUN_CONFIG} out='{out}' progress=false",
            timeout=120,
        )
        run = wait_for_run(cli, tmp_path, started["run-id"], procs, timeout=420)
        assert run["status"] == "finished:completed", run
        summary = json.loads((out / "summary.json").read_text())
        assert summary["sites"] == 2 and summary["tasks_completed"] == 2
    finally:
        procs.stop()  # by PID: SuperNodes first, SuperLink last
    assert all(p.poll() is not None for p in procs.procs)
