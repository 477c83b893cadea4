"""Helpers shared by the deployment tests: free ports, the Flower environment, waiting
for a SuperLink to answer, the `flwr` CLI, a run's status and log, Flower processes
started with their logs and stopped by PID.

Imported as `flower_processes` (pytest puts `tests/` on `sys.path`).
"""

import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

BIN = Path(sys.executable).parent
FLOWER_ENV = {
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_TELEMETRY_ENABLED": "0",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def flower_env(home: Path) -> dict[str, str]:
    """The environment for a Flower process whose FLWR_HOME is `home`."""
    return {
        **os.environ,
        "PATH": f"{BIN}:{os.environ.get('PATH', '')}",
        **FLOWER_ENV,
        "FLWR_HOME": str(home),
    }


def wait_healthy(port: int, timeout: float = 60.0, ca: Path | None = None) -> None:
    """Wait for the SuperLink's /health; over HTTPS, trusting only `ca`, when given."""
    import httpx  # ships with flwr

    url = f"{'https' if ca else 'http'}://127.0.0.1:{port}/health"
    verify = ssl.create_default_context(cafile=str(ca)) if ca else True
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if httpx.get(url, timeout=1.0, verify=verify).is_success:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise TimeoutError(f"SuperLink on port {port} not healthy after {timeout} s")


def write_cli_config(home: Path, address: str, root_certificates: Path | None) -> None:
    """FLWR_HOME/config.toml with one connection, `test`: TLS trusting
    `root_certificates` when given, else insecure."""
    home.mkdir(parents=True, exist_ok=True)
    transport = (
        f"root-certificates = {json.dumps(str(root_certificates))}\n"
        if root_certificates
        else "insecure = true\n"
    )
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "test"\n\n[superlink.test]\n'
        f'address = "{address}"\n{transport}'
    )


def flwr_json(env: dict[str, str], cwd: Path, *args: str, timeout: float = 60) -> dict:
    """`flwr ARGS --format json` with the CLI environment `env`; must exit 0."""
    done = subprocess.run(
        ["flwr", *args, "--format", "json"],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return json.loads(done.stdout)


def flwr_log(env: dict[str, str], cwd: Path, run_id: int) -> str:
    """The run's log as the SuperLink keeps it (`flwr log RUN_ID test --show`): what
    its ServerApp printed, e.g. the bad sites it named."""
    return subprocess.run(
        ["flwr", "log", str(run_id), "test", "--show"],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout


def wait_for_run(
    env: dict[str, str],
    cwd: Path,
    run_id: int,
    procs: "FlowerProcesses",
    timeout: float,
    done: Path | None = None,
) -> dict:
    """The run as `flwr ls` lists it once finished (or at `timeout`): `flwr run`
    exits 0 even when the ServerApp failed, so its status is what counts. Every
    process in `procs` must stay up meanwhile.

    Each `flwr ls` costs seconds of CPU on a 2-core machine that the run's own
    processes need: with `done` (a file the ServerApp writes last, e.g. its
    report.html) the status is asked every 30 s until `done` appears (a failed
    run writes none), then every second until it reads finished."""
    run, deadline, asked = {"status": "?"}, time.time() + timeout, 0.0
    while time.time() < deadline:
        ended = done is None or done.exists()
        if ended or time.time() - asked >= 30:
            asked = time.time()
            listed = flwr_json(env, cwd, "ls", "test", "--run-id", str(run_id))
            run = listed["runs"][0]
            if run["status"].startswith("finished"):
                break
        procs.assert_running()
        time.sleep(1 if done is not None else 5)
    return run


class FlowerProcesses:
    """Processes started in their own folder with their output in `folder/log.txt`;
    `stop()` ends each one still running by its PID, the last started first."""

    def __init__(self, root: Path):
        self.root = root
        self.procs: list[subprocess.Popen] = []
        self._logs = []

    def start(self, name: str, cmd: list[str], env: dict[str, str]) -> subprocess.Popen:
        folder = self.root / name
        folder.mkdir(parents=True, exist_ok=True)
        log = open(folder / "log.txt", "wb")
        self._logs.append(log)
        proc = subprocess.Popen(
            cmd, cwd=folder, env=env, stdout=log, stderr=subprocess.STDOUT
        )
        self.procs.append(proc)
        return proc

    def log(self, name: str) -> str:
        return (self.root / name / "log.txt").read_text(errors="replace")

    def assert_running(self) -> None:
        dead = [p for p in self.procs if p.poll() is not None]
        assert not dead, f"a Flower process died: {[p.args for p in dead]}"

    def stop(self) -> None:
        for p in reversed(self.procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(15)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
        for log in self._logs:
            log.close()
