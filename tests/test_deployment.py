"""Deployment runtime on loopback: a SuperLink and three SuperNodes started as
processes, each naming its own data folder in its node config (folders made by
`simulations.export`), `flwr run` of this app, the run's status and the server's log
read back (the CLI exits 0 even when the server app failed), every process stopped
by its PID.

Each bad site is named in the server's log and the run completes with the others:
site 0's manifest has a row whose view is not in the study, site 1's has a corrupt
cine, site 2's node config names a folder that does not exist.
"""

import json
import shutil
import subprocess
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
from hospitals import (
    add_manifest_rows,
    export_hospitals,
    manifest_rows,
    run_config_file,
)

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.skipif(
    shutil.which("flower-superlink", path=str(BIN)) is None,
    reason="flower-superlink not installed",
)
def test_sites_with_their_own_folders_complete_a_run_and_bad_sites_are_named(
    tmp_path,
):
    data = tmp_path / "hospitals"
    study = export_hospitals(data, sites=3)
    add_manifest_rows(data / "site-0", ["cines/extra.npz,A5C,p9000,scanner-0"])
    shutil.copy(
        next((data / "site-0/cines").glob("*.npz")), data / "site-0/cines/extra.npz"
    )
    (data / "site-1/cines/corrupt.npz").write_bytes(b"not a cine")
    add_manifest_rows(data / "site-1", ["cines/corrupt.npz,A2C,p9001,scanner-1"])
    folders = {0: data / "site-0", 1: data / "site-1", 2: tmp_path / "no-such-folder"}

    link_port = free_port()
    procs = FlowerProcesses(tmp_path)
    cli = flower_env(tmp_path / "cli" / "home")
    write_cli_config(Path(cli["FLWR_HOME"]), f"127.0.0.1:{link_port}", None)
    out = tmp_path / "out"
    config = run_config_file(
        study, tmp_path / "study.toml", out=str(out), progress=False
    )
    try:
        procs.start(
            "superlink",
            ["flower-superlink", "--insecure", "--host", "127.0.0.1"]
            + ["--port", str(link_port)],
            flower_env(tmp_path / "superlink" / "home"),
        )
        wait_healthy(link_port)
        for site, folder in folders.items():
            procs.start(
                f"site{site}",
                ["flower-supernode", "--insecure"]
                + ["--superlink", f"127.0.0.1:{link_port}", "--port", str(free_port())]
                + ["--node-config", f"data-root='{folder}' site-id={site}"],
                flower_env(tmp_path / f"site{site}" / "home"),
            )
        started = flwr_json(
            cli,
            tmp_path,
            "run",
            str(REPO),
            "test",
            "--run-config",
            str(config),
            timeout=120,
        )
        run = wait_for_run(
            cli, tmp_path, started["run-id"], procs, 480, done=out / "report.html"
        )
        log = subprocess.run(
            ["flwr", "log", str(started["run-id"]), "test", "--show"],
            env=cli,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=60,
        ).stdout
    finally:
        procs.stop()  # by PID: SuperNodes first, SuperLink last
    assert all(p.poll() is not None for p in procs.procs)
    assert run["status"] == "finished:completed", (run, log[-3000:])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["tasks_completed"] == 2 and summary["evaluation"] == "sites"
    # each bad site named in the server's log, with its file or node config key
    assert "site 0 left out 1 bad data item(s)" in log and "'A5C'" in log, log[-3000:]
    assert "site 1 left out 1 bad data item(s)" in log and "corrupt.npz" in log
    assert "site 2: site reported: DataError: node config key 'data-root'" in log
    # the sites read their own rows, less the bad one each, and evaluated on them
    for site in (0, 1):
        rows = summary["sites_data"][str(site)]
        held = rows["train"] + rows["val"] + rows["test"]
        assert held == manifest_rows(folders[site]) - 1 and rows["skipped"] == 1
    assert set(summary["site_accuracy"]) == {"0", "1"}
