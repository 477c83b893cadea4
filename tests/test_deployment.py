"""Deployment runtime on loopback: a SuperLink and two SuperNodes started as processes,
`flwr run` of this app, the run's status read back (the CLI exits 0 even when the
server app failed), every process stopped by its PID."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from flower_processes import free_port, wait_healthy

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
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
    env = {
        **os.environ,
        "PATH": f"{BIN}:{os.environ.get('PATH', '')}",
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "FLWR_TELEMETRY_ENABLED": "0",
    }
    home = lambda name: {**env, "FLWR_HOME": str(tmp_path / name / "home")}  # noqa: E731
    link_port = free_port()
    procs: list[subprocess.Popen] = []
    logs = []

    def start(name, cmd):
        (tmp_path / name).mkdir(parents=True, exist_ok=True)
        log = open(tmp_path / name / "log.txt", "wb")
        logs.append(log)
        procs.append(
            subprocess.Popen(
                cmd,
                cwd=tmp_path / name,
                env=home(name),
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        )

    cli = home("cli")
    Path(cli["FLWR_HOME"]).mkdir(parents=True)
    (Path(cli["FLWR_HOME"]) / "config.toml").write_text(
        f'[superlink]\ndefault = "test"\n\n[superlink.test]\n'
        f'address = "127.0.0.1:{link_port}"\ninsecure = true\n'
    )
    try:
        start(
            "superlink",
            [
                "flower-superlink",
                "--insecure",
                "--host",
                "127.0.0.1",
                "--port",
                str(link_port),
            ],
        )
        wait_healthy(link_port)
        for site in range(2):
            start(
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
            )
        out = tmp_path / "out"
        started = subprocess.run(
            [
                "flwr",
                "run",
                str(REPO),
                "test",
                "--format",
                "json",
                "--run-config",
                f"{RUN_CONFIG} out='{out}' progress=false",
            ],
            env=cli,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert started.returncode == 0, started.stderr
        run_id = json.loads(started.stdout)["run-id"]
        status = "?"
        deadline = time.time() + 420
        while time.time() < deadline:
            ls = subprocess.run(
                ["flwr", "ls", "test", "--run-id", str(run_id), "--format", "json"],
                env=cli,
                capture_output=True,
                text=True,
                timeout=60,
            )
            status = json.loads(ls.stdout)["runs"][0]["status"]
            if status.startswith("finished"):
                break
            assert all(p.poll() is None for p in procs), "a Flower process died"
            time.sleep(2)
        assert status == "finished:completed", status
        summary = json.loads((out / "summary.json").read_text())
        assert summary["sites"] == 2 and summary["tasks_completed"] == 2
    finally:
        for p in reversed(procs):  # stop by PID: SuperNodes first, SuperLink last
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(15)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
        for log in logs:
            log.close()
    assert all(p.poll() is not None for p in procs)
