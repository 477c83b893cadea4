"""TLS and SuperNode authentication on loopback, with real Flower 1.41 processes.

A throwaway CA signs the SuperLink's certificate (openssl) and each SuperNode has an
ECDSA P-384 key pair (ssh-keygen): the commands of the README's "A hospital joins a
federation". The SuperLink runs with TLS and `--enable-supernode-auth`; only public
keys registered with `flwr supernode register` may join. Shown here:

- a SuperNode with a registered key connects over TLS, appears online under the node
  id its key was registered with, and takes part in a run that completes;
- a SuperNode with an unregistered key, or with none, is refused and exits non-zero;
- a SuperNode without TLS (`--insecure`), or one that does not trust the SuperLink's
  certificate, never reaches it, even with a registered key; a SuperNode given a key
  and `--insecure` will not start.

Every process is stopped by its PID.
"""

import json
import shutil
import subprocess
import time
from dataclasses import dataclass
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
    "method='class_impression' sites=1 tasks=1 init_classes=5 rounds_per_task=1 "
    "local_epochs=1 batch_size=16 data.patients=4 data.devices=1 data.image_size=32 "
    "data.frames=2 partition.scheme='iid' federation.timeout=120.0"
)

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        shutil.which("flower-superlink", path=str(BIN)) is None,
        reason="flower-superlink not installed",
    ),
    pytest.mark.skipif(
        shutil.which("openssl") is None or shutil.which("ssh-keygen") is None,
        reason="needs the openssl and ssh-keygen commands",
    ),
]


def _sh(cmd: list[str], cwd: Path) -> None:
    subprocess.run(cmd, cwd=cwd, check=True, capture_output=True, timeout=60)


def _make_ca(folder: Path, name: str) -> None:
    _sh(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "365"]
        + ["-subj", f"/CN={name}", "-keyout", f"{name}.key", "-out", f"{name}.crt"],
        folder,
    )


def _make_certificates(folder: Path) -> None:
    """ca.crt, and server.pem/server.key signed by it for 127.0.0.1 and localhost."""
    folder.mkdir(parents=True, exist_ok=True)
    _make_ca(folder, "ca")
    (folder / "server.ext").write_text(
        "subjectAltName=DNS:localhost,IP:127.0.0.1\n"
        "basicConstraints=CA:FALSE\nauthorityKeyIdentifier=keyid,issuer\n"
    )
    _sh(
        ["openssl", "req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=localhost"]
        + ["-keyout", "server.key", "-out", "server.csr"],
        folder,
    )
    _sh(
        ["openssl", "x509", "-req", "-in", "server.csr", "-CA", "ca.crt"]
        + ["-CAkey", "ca.key", "-CAcreateserial", "-days", "365"]
        + ["-extfile", "server.ext", "-out", "server.pem"],
        folder,
    )
    _make_ca(folder, "other-ca")  # a CA the SuperLink's certificate is not from


def _make_key(folder: Path, name: str) -> Path:
    """`name` (private, OpenSSH format) and `name.pub`; returns the private key."""
    _sh(["ssh-keygen", "-q", "-t", "ecdsa", "-b", "384", "-N", "", "-f", name], folder)
    return folder / name


@dataclass
class Federation:
    root: Path
    port: int
    certs: Path
    keys: Path
    cli: dict[str, str]  # environment of the `flwr` CLI
    registered: dict[str, int]  # key name -> node id it was registered with

    def flwr(self, *args: str, timeout: float = 60) -> dict:
        return flwr_json(self.cli, self.root, *args, timeout=timeout)

    def nodes(self) -> dict[int, str]:
        """node id -> status, as the SuperLink lists them."""
        listed = self.flwr("supernode", "list", "test")["nodes"]
        return {int(n["node-id"]): n["status"] for n in listed}

    def supernode(self, procs: FlowerProcesses, name: str, *tls_and_key: str):
        return procs.start(
            name,
            [
                "flower-supernode",
                "--superlink",
                f"127.0.0.1:{self.port}",
                *tls_and_key,
                "--port",
                str(free_port()),
                "--node-config",
                "partition-id=0 num-partitions=1",
            ],
            flower_env(procs.root / name / "home"),
        )


@pytest.fixture(scope="module")
def federation(tmp_path_factory):
    """A SuperLink with TLS and SuperNode authentication; keys `hospital-1` and
    `hospital-2` registered, `stranger` not."""
    root = tmp_path_factory.mktemp("secure")
    certs, keys = root / "certs", root / "keys"
    _make_certificates(certs)
    keys.mkdir()
    for name in ("hospital-1", "hospital-2", "stranger"):
        _make_key(keys, name)
    port = free_port()
    cli = flower_env(root / "cli-home")
    write_cli_config(root / "cli-home", f"127.0.0.1:{port}", certs / "ca.crt")
    procs = FlowerProcesses(root)
    try:
        procs.start(
            "superlink",
            [
                "flower-superlink",
                "--ssl-ca-certfile",
                str(certs / "ca.crt"),
                "--ssl-certfile",
                str(certs / "server.pem"),
                "--ssl-keyfile",
                str(certs / "server.key"),
                "--enable-supernode-auth",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
            ],
            flower_env(root / "superlink" / "home"),
        )
        wait_healthy(port, ca=certs / "ca.crt")
        fed = Federation(root, port, certs, keys, cli, {})
        for name in ("hospital-1", "hospital-2"):
            done = fed.flwr("supernode", "register", str(keys / f"{name}.pub"), "test")
            fed.registered[name] = int(done["node-id"])
        assert fed.nodes() == {i: "registered" for i in fed.registered.values()}
        yield fed
    finally:
        procs.stop()
    assert all(p.poll() is not None for p in procs.procs)


def test_superlink_refuses_plain_http(federation):
    import httpx

    with pytest.raises(httpx.HTTPError):
        httpx.get(f"http://127.0.0.1:{federation.port}/health", timeout=5.0)


def test_registered_supernode_joins_over_tls_and_completes_a_run(federation):
    fed = federation
    node_id = fed.registered["hospital-1"]
    procs = FlowerProcesses(fed.root / "joins")
    try:
        node = fed.supernode(
            procs,
            "hospital-1",
            "--root-certificates",
            str(fed.certs / "ca.crt"),
            "--auth-supernode-private-key",
            str(fed.keys / "hospital-1"),
        )
        deadline = time.time() + 45
        while fed.nodes()[node_id] != "online":
            assert node.poll() is None, procs.log("hospital-1")
            assert time.time() < deadline, "registered SuperNode never came online"
            time.sleep(1)
        assert f"SuperNode ID: {node_id}" in procs.log("hospital-1")

        out = fed.root / "run-out"
        started = fed.flwr(
            "run",
            str(REPO),
            "test",
            "--run-config",
            f"{RUN_CONFIG} out='{out}' progress=false",
            timeout=120,
        )
        run = wait_for_run(fed.cli, fed.root, started["run-id"], procs, timeout=180)
        assert run["status"] == "finished:completed", (run, procs.log("hospital-1"))
        summary = json.loads((out / "summary.json").read_text())
        assert summary["sites"] == 1 and summary["tasks_completed"] == 1
    finally:
        procs.stop()


@pytest.mark.parametrize(
    ("key", "refusal"),
    [
        ("stranger", "[code: 2004] Failed to activate SuperNode."),
        (None, "[code: 2001] SuperNode authentication is enabled."),
    ],
    ids=["unregistered-key", "no-key"],
)
def test_unregistered_supernode_is_refused(federation, key, refusal):
    """A key not registered with `flwr supernode register` cannot activate (2004); a
    node without a key registers a throwaway one itself, which only SuperNode
    authentication refuses (2001): without `--enable-supernode-auth` that node joins
    and this test fails (checked). The node exits with status 1 (Flower exit code
    305) and the SuperLink knows no node but the registered ones."""
    fed = federation
    procs = FlowerProcesses(fed.root / f"refused-{key}")
    auth = ["--auth-supernode-private-key", str(fed.keys / key)] if key else []
    try:
        node = fed.supernode(
            procs, "node", "--root-certificates", str(fed.certs / "ca.crt"), *auth
        )
        try:
            code = node.wait(60)  # with authentication off it would run on
        except subprocess.TimeoutExpired:
            pytest.fail("unregistered SuperNode was not refused:\n" + procs.log("node"))
        log = procs.log("node")
        assert code != 0, log
        assert "Failed to initialize the connection to the SuperLink." in log
        assert refusal in log
        # nothing joined: the SuperLink knows only the registered keys
        nodes = fed.nodes()
        assert set(nodes) == set(fed.registered.values())
        assert nodes[fed.registered["hospital-2"]] == "registered"
    finally:
        procs.stop()


@pytest.mark.parametrize(
    ("transport", "failure"),
    [
        (["--insecure"], "Server disconnected without sending a response."),
        (["--root-certificates", "other-ca.crt"], "CERTIFICATE_VERIFY_FAILED"),
    ],
    ids=["insecure", "untrusted-certificate"],
)
def test_supernode_without_tls_cannot_reach_the_tls_superlink(
    federation, transport, failure
):
    """Plain HTTP is cut off by the SuperLink; a node that does not trust its
    certificate hangs up itself. Either way the node gives up and exits non-zero."""
    fed = federation
    procs = FlowerProcesses(fed.root / f"transport{transport[0]}")
    if transport[0] == "--root-certificates":
        transport = [transport[0], str(fed.certs / transport[1])]
        # a registered key: only the transport stands in the way
        transport += ["--auth-supernode-private-key", str(fed.keys / "hospital-2")]
    try:
        node = fed.supernode(procs, "node", *transport, "--max-retries", "1")
        try:
            code = node.wait(60)
        except subprocess.TimeoutExpired:
            pytest.fail("SuperNode did not give up:\n" + procs.log("node"))
        log = procs.log("node")
        assert code != 0, log
        assert "Failed to initialize the connection to the SuperLink." in log
        assert failure in log
        assert "[code: 20" not in log  # refused by TLS, before authentication
        assert fed.nodes()[fed.registered["hospital-2"]] == "registered"
    finally:
        procs.stop()


def test_supernode_sends_its_key_only_over_tls(federation):
    """`--insecure` with an authentication key: the SuperNode refuses to start
    (Flower exit code 303) rather than present its key over plain HTTP."""
    fed = federation
    procs = FlowerProcesses(fed.root / "insecure-with-key")
    try:
        node = fed.supernode(
            procs,
            "node",
            "--insecure",
            "--auth-supernode-private-key",
            str(fed.keys / "hospital-2"),
        )
        code = node.wait(60)
        log = procs.log("node")
        assert code != 0, log
        assert "Exit Code: 303" in log
        assert "Connection attempt failed" not in log  # never tried the SuperLink
    finally:
        procs.stop()
