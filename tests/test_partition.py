"""Site partitions: disjoint, complete, seeded; Dirichlet redrawn per task."""

import pytest
import torch

from fl_ci.config import ConfigError, PartitionConfig
from fl_ci.data.partition import partition_task

LABELS = torch.arange(10).repeat_interleave(30)  # 10 classes x 30 rows
DEVICES = torch.arange(300) % 3


def _check_disjoint_complete(parts, n):
    flat = torch.cat(parts)
    assert flat.numel() == n and flat.unique().numel() == n


@pytest.mark.parametrize("scheme", ["iid", "dirichlet", "device"])
def test_partitions_are_disjoint_and_complete(scheme):
    cfg = PartitionConfig(scheme=scheme, alpha=0.5)
    parts = partition_task(LABELS, DEVICES, 3, cfg, task=0, seed=0)
    assert len(parts) == 3
    _check_disjoint_complete(parts, 300)


@pytest.mark.parametrize("scheme", ["iid", "dirichlet"])
def test_partitions_are_seeded(scheme):
    cfg = PartitionConfig(scheme=scheme)
    a = partition_task(LABELS, DEVICES, 3, cfg, task=1, seed=4)
    b = partition_task(LABELS, DEVICES, 3, cfg, task=1, seed=4)
    c = partition_task(LABELS, DEVICES, 3, cfg, task=1, seed=5)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(torch.equal(x, y) for x, y in zip(a, c, strict=True))


def test_dirichlet_is_redrawn_per_task_and_skewed():
    cfg = PartitionConfig(scheme="dirichlet", alpha=0.1)
    t0 = partition_task(LABELS, DEVICES, 3, cfg, task=0, seed=0)
    t1 = partition_task(LABELS, DEVICES, 3, cfg, task=1, seed=0)
    assert not all(torch.equal(x, y) for x, y in zip(t0, t1, strict=True))
    # with alpha 0.1 some site holds most of some class
    shares = torch.stack([torch.bincount(LABELS[p], minlength=10) for p in t0]) / 30
    assert shares.max() > 0.8


def test_iid_sites_get_equal_shares():
    parts = partition_task(LABELS, DEVICES, 3, PartitionConfig(), task=0, seed=0)
    assert [len(p) for p in parts] == [100, 100, 100]


def test_device_partition_gives_site_k_device_k():
    parts = partition_task(
        LABELS, DEVICES, 3, PartitionConfig(scheme="device"), task=0, seed=0
    )
    for site, rows in enumerate(parts):
        assert set(DEVICES[rows].tolist()) == {site}


def test_device_partition_needs_one_site_per_device():
    with pytest.raises(ConfigError, match="one site per device"):
        partition_task(
            LABELS, DEVICES, 2, PartitionConfig(scheme="device"), task=0, seed=0
        )


def test_schedule_gives_a_class_to_its_sites_at_their_tasks():
    cfg = PartitionConfig(scheme="schedule")
    schedule = {9: {2: 1, 0: 2}}  # class 9: site 2 at task 1, site 0 at task 2
    at1 = partition_task(LABELS, DEVICES, 3, cfg, task=1, seed=0, schedule=schedule)
    at2 = partition_task(LABELS, DEVICES, 3, cfg, task=2, seed=0, schedule=schedule)
    nine = lambda p: int((LABELS[p] == 9).sum())  # noqa: E731
    assert [nine(p) for p in at1] == [0, 0, 15]
    assert [nine(p) for p in at2] == [15, 0, 0]
    # the two shares of class 9 never overlap
    rows9 = lambda p: {r for r in p.tolist() if LABELS[r] == 9}  # noqa: E731
    assert not rows9(at1[2]) & rows9(at2[0])
