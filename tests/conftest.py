"""Shared fixtures."""

import pytest


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
