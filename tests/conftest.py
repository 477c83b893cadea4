"""Shared fixtures, and the environment the suite pins for itself.

The suite runs several Flower processes at once on a small machine: one OpenMP
thread per process (a second only spin-waits, and results such as a resumed run's
must not depend on the machine's core count), and Flower kept offline and quiet.
Set here, before torch is imported, so `pytest -q` as the README prints it runs the
suite exactly as CI does; the Flower processes the tests start inherit it.
"""

import os

os.environ["OMP_NUM_THREADS"] = "1"
for _key, _value in (
    ("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1"),
    ("FLWR_DISABLE_UPDATE_CHECK", "1"),
    ("FLWR_TELEMETRY_ENABLED", "0"),
):
    os.environ.setdefault(_key, _value)

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from tiny_runs import run_tiny_echo_paper  # noqa: E402


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module of tiny tensors: a second OpenMP thread only adds
    spin-waiting, badly so under load. Modules ask for it with
    `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def run_identity():
    """Messages are made inside a run; a ServerApp process has its run id set.

    Building a Flower `Message` in-process (to test reply checks and aggregation on
    real records) needs the identity a ServerApp process would have.
    """
    from flwr.supercore.task_identity import TaskIdentity

    keys = ("_run_id", "_node_id", "_task_id")
    before = [getattr(TaskIdentity, k) for k in keys]
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    yield
    for key, value in zip(keys, before, strict=True):
        setattr(TaskIdentity, key, value)


@pytest.fixture(scope="session")
def tiny_echo_paper_run(tmp_path_factory) -> Path:
    """A finished tiny echo-paper run (tests/tiny_runs.py), made once per session for
    the modules that read it. Read it only: a test that changes a run works on a copy
    (`shutil.copytree`), so every module sees the run as the command left it."""
    return run_tiny_echo_paper(tmp_path_factory.mktemp("run") / "echo-paper")
