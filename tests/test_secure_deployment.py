"""TLS and SuperNode authentication on loopback, with real Flower 1.41 processes.

A throwaway CA signs the SuperLink's certificate (openssl) and each SuperNode has an
ECDSA P-384 key pair (ssh-keygen): the commands of the README's "A hospital joins a
federation". The SuperLink runs with TLS and `--enable-supernode-auth`; only public
keys registered with `flwr supernode register` may join. Shown here:

- four hospitals, each a SuperNode with a registered key and its own data folder in
  its node config (folders made by `simulations.export`), connect over TLS, appear
  online under the node ids their keys were registered with, and complete one run
  (`study_run`, read by the tests after it) whose coordinator holds no data. Three
  of them bring a bad site each, one problem a site: hospital 0's manifest has a row
  whose view is not in the study, hospital 2's a corrupt cine, and hospital 3's node
  config names a folder that does not exist; hospital 1 also holds pydicom's real
  ultrasound cine. Each bad site is named in the server's log and the run completes
  with the others: the accuracy matrix comes from the sites' evaluation, each site
  reports the rows of its own manifest less its bad one, and a record of every file
  opened under the hospitals' folders shows the coordinator's processes opened none
  and each site only its own;
- a SuperNode with an unregistered key, or with none, is refused and exits non-zero;
- a SuperNode without TLS (`--insecure`), or one that does not trust the SuperLink's
  certificate, never reaches it, even with a registered key; a SuperNode given a key
  and `--insecure` will not start.

Every process is stopped by its PID.
"""

import json
import os
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
    flwr_log,
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
from pydicom.data import get_testdata_file

REPO = Path(__file__).resolve().parents[1]
HOSPITALS = ("hospital-0", "hospital-1", "hospital-2", "hospital-3")
OPEN_AUDIT = Path(__file__).parent / "open_audit"  # sitecustomize: logs file opens

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


def open_audit(log: Path, watch: Path, who: str) -> dict[str, str]:
    """The environment that makes a process (and those it starts) log every file it
    opens under `watch` to `log` as `who` (tests/open_audit/sitecustomize.py)."""
    path = os.environ.get("PYTHONPATH", "")
    return {
        "PYTHONPATH": f"{OPEN_AUDIT}{os.pathsep}{path}" if path else str(OPEN_AUDIT),
        "FL_CI_OPEN_LOG": str(log),
        "FL_CI_OPEN_WATCH": str(watch),
        "FL_CI_OPEN_WHO": who,
    }


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

    def supernode(
        self,
        procs: FlowerProcesses,
        name: str,
        *tls_and_key: str,
        node_config: str = "partition-id=0 num-partitions=1",
        env: dict[str, str] | None = None,
    ):
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
                node_config,
            ],
            {**flower_env(procs.root / name / "home"), **(env or {})},
        )


@pytest.fixture(scope="module")
def federation(tmp_path_factory):
    """A SuperLink with TLS and SuperNode authentication; the hospitals' keys and
    `spare` registered, `stranger` not."""
    root = tmp_path_factory.mktemp("secure")
    certs, keys = root / "certs", root / "keys"
    _make_certificates(certs)
    keys.mkdir()
    for name in (*HOSPITALS, "spare", "stranger"):
        _make_key(keys, name)
    port = free_port()
    cli = flower_env(root / "cli-home")
    write_cli_config(root / "cli-home", f"127.0.0.1:{port}", certs / "ca.crt")
    procs = FlowerProcesses(root)
    audit = open_audit(root / "opened.tsv", root / "hospitals", "coordinator")
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
            {**flower_env(root / "superlink" / "home"), **audit},
        )
        wait_healthy(port, ca=certs / "ca.crt")
        fed = Federation(root, port, certs, keys, cli, {})
        for name in (*HOSPITALS, "spare"):
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


@dataclass
class StudyRun:
    """What the four hospitals' run left: its status, the server's log, the summary
    and the files each process opened under the hospitals' folders."""

    folders: dict[int, Path]  # site -> the data-root its node config names
    procs: FlowerProcesses  # the hospitals' SuperNodes (stopped), for their logs
    status: str
    log: str  # the server's log, as `flwr log` shows it
    summary: dict
    opened: dict[str, set[str]]  # who -> resolved paths opened under the folders


# what each hospital brings to the run
A5C_ROW = "cines/extra.npz,A5C,p9000,scanner-0"  # hospital 0: a view not in the study
REAL_DICOM_ROW = "real.dcm,A4C,real-patient-1,real-scanner"  # hospital 1: a real cine
CORRUPT_ROW = "cines/corrupt.npz,A2C,p9002,scanner-2"  # hospital 2: a corrupt cine
SKIPPED = {0: 1, 1: 0, 2: 1}  # bad rows each hospital with data leaves out


@pytest.fixture(scope="module")
def study_run(federation) -> StudyRun:
    """One run of the tiny study by the four hospitals (module docstring), their
    SuperNodes started with a registered key over TLS and stopped by PID after it;
    hospital 3's node config names a folder that does not exist."""
    fed = federation
    data = fed.root / "hospitals"
    study = export_hospitals(data, sites=4)
    add_manifest_rows(data / "site-0", [A5C_ROW])
    shutil.copy(
        next((data / "site-0/cines").glob("*.npz")), data / "site-0/cines/extra.npz"
    )
    # pydicom's real ultrasound cine (30 frames, YBR colour)
    shutil.copy(get_testdata_file("examples_ybr_color.dcm"), data / "site-1/real.dcm")
    add_manifest_rows(data / "site-1", [REAL_DICOM_ROW])
    (data / "site-2/cines/corrupt.npz").write_bytes(b"not a cine")
    add_manifest_rows(data / "site-2", [CORRUPT_ROW])
    shutil.rmtree(data / "site-3")  # hospital 3's folder is gone
    folders = {site: data / f"site-{site}" for site in range(len(HOSPITALS))}

    procs = FlowerProcesses(fed.root / "joins")
    try:
        nodes = {}
        for site, name in enumerate(HOSPITALS):
            nodes[name] = fed.supernode(
                procs,
                name,
                "--root-certificates",
                str(fed.certs / "ca.crt"),
                "--auth-supernode-private-key",
                str(fed.keys / name),
                node_config=f"data-root='{folders[site]}' site-id={site}",
                env=open_audit(fed.root / "opened.tsv", data, name),
            )
        deadline = time.time() + 60
        while any(fed.nodes()[fed.registered[n]] != "online" for n in HOSPITALS):
            for name, node in nodes.items():
                assert node.poll() is None, procs.log(name)
            assert time.time() < deadline, "registered SuperNodes never came online"
            time.sleep(1)

        out = fed.root / "run-out"
        config = run_config_file(
            study, fed.root / "study.toml", out=str(out), progress=False
        )
        started = fed.flwr("run", str(REPO), "test", "--run-config", str(config))
        run = wait_for_run(
            fed.cli, fed.root, started["run-id"], procs, 480, done=out / "report.html"
        )
        log = flwr_log(fed.cli, fed.root, started["run-id"])
    finally:
        procs.stop()
    assert all(p.poll() is not None for p in procs.procs)
    summary = out / "summary.json"
    opened: dict[str, set[str]] = {}
    for line in (fed.root / "opened.tsv").read_text().splitlines():
        who, path = line.split("\t", 1)
        opened.setdefault(who, set()).add(path)
    return StudyRun(
        folders,
        procs,
        run["status"],
        log,
        json.loads(summary.read_text()) if summary.exists() else {},
        opened,
    )


def test_hospitals_come_online_under_their_registered_node_ids(federation, study_run):
    for name in HOSPITALS:
        node_id = federation.registered[name]
        assert f"SuperNode ID: {node_id}" in study_run.procs.log(name), name


def test_the_run_completes_with_a_coordinator_that_holds_no_data(study_run):
    assert study_run.status == "finished:completed", study_run.log[-3000:]
    summary = study_run.summary
    assert summary["sites"] == 4 and summary["tasks_completed"] == 2
    assert summary["evaluation"] == "sites"  # the coordinator has no test set
    # the accuracy matrix comes from the three hospitals with data
    assert set(summary["site_accuracy"]) == {"0", "1", "2"}


def test_each_bad_site_is_named_in_the_servers_log(study_run):
    """With its file, its row's view or its node config key."""
    log = study_run.log
    assert "site 0 left out 1 bad data item(s)" in log and "'A5C'" in log, log[-3000:]
    assert "site 2 left out 1 bad data item(s)" in log and "corrupt.npz" in log
    assert "site 3: site reported: DataError: node config key 'data-root'" in log
    # its evaluation reply names it too, not as site -1
    assert "evaluation: site 3 reported: DataError: node config key" in log
    assert "site 1 left out" not in log


def test_each_site_reports_the_rows_of_its_own_manifest_less_its_bad_ones(study_run):
    """Every row of its own manifest, none of another's; hospital 1's real DICOM
    cine among them. Hospital 3, with no folder, reports none."""
    sites_data = study_run.summary["sites_data"]
    assert set(sites_data) == {"0", "1", "2"}
    for site, skipped in SKIPPED.items():
        rows = sites_data[str(site)]
        held = rows["train"] + rows["val"] + rows["test"]
        expected = manifest_rows(study_run.folders[site]) - skipped
        assert held == expected and rows["skipped"] == skipped, (site, rows)


def test_the_coordinator_opens_no_site_file_and_each_site_only_its_own(study_run):
    opened = study_run.opened
    assert "coordinator" not in opened, sorted(opened.get("coordinator", []))[:5]
    for site, name in enumerate(HOSPITALS[:3]):
        own = str(study_run.folders[site].resolve())
        assert opened.get(name), f"{name} opened none of its files"
        assert all(p.startswith(own + os.sep) for p in opened[name]), name
    assert "hospital-3" not in opened  # its folder does not exist
    real = study_run.folders[1] / "real.dcm"
    assert str(real.resolve()) in opened["hospital-1"]


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
        assert nodes[fed.registered["spare"]] == "registered"
    finally:
        procs.stop()


@pytest.mark.parametrize(
    ("transport", "failure"),
    [
        # the TLS SuperLink drops plain HTTP: the client sees the hang-up as EOF or,
        # depending on timing, as a reset or a broken pipe (httpx's RemoteProtocolError,
        # ReadError, WriteError); each is the connection cut off, none a refusal
        (
            ["--insecure"],
            (
                "Server disconnected without sending a response.",
                "Connection reset by peer",
                "Broken pipe",
            ),
        ),
        (["--root-certificates", "other-ca.crt"], ("CERTIFICATE_VERIFY_FAILED",)),
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
        transport += ["--auth-supernode-private-key", str(fed.keys / "spare")]
    try:
        node = fed.supernode(procs, "node", *transport, "--max-retries", "1")
        try:
            code = node.wait(60)
        except subprocess.TimeoutExpired:
            pytest.fail("SuperNode did not give up:\n" + procs.log("node"))
        log = procs.log("node")
        assert code != 0, log
        assert "Failed to initialize the connection to the SuperLink." in log
        assert any(text in log for text in failure), log
        assert "[code: 20" not in log  # refused by TLS, before authentication
        assert fed.nodes()[fed.registered["spare"]] == "registered"
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
            str(fed.keys / "spare"),
        )
        code = node.wait(60)
        log = procs.log("node")
        assert code != 0, log
        assert "Exit Code: 303" in log
        assert "Connection attempt failed" not in log  # never tried the SuperLink
    finally:
        procs.stop()
