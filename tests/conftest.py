"""Shared fixtures."""

import pytest
import torch


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
