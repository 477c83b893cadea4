"""Splitting one task's training data over simulated sites.

Uses Flower Datasets' partitioners (the `flwr_datasets` package: a data library that
does not import the Flower framework) over a tiny `datasets.Dataset` of row indices,
labels and devices, so the partitions are the ones Flower users already know.
Every scheme is disjoint, complete and seeded; Dirichlet label skew is redrawn per
task (the TARGET / LANDER protocol).
"""

from __future__ import annotations

import numpy as np
import torch

from fl_ci.config import ConfigError, PartitionConfig
from fl_ci.data.base import DataError


def partition_task(
    labels: torch.Tensor,
    devices: torch.Tensor,
    sites: int,
    cfg: PartitionConfig,
    *,
    task: int,
    seed: int,
    schedule: dict[int, dict[int, int]] | None = None,
) -> list[torch.Tensor]:
    """Row indices of each site's share of one task's training data.

    labels, devices: [N] of the task's training rows. `schedule` ({class: {site:
    task}}) restricts a class to the sites named for it, from their task on; rows of
    a scheduled class are split once over all the sites it ever reaches, and a site
    receives its share at its arrival task; pass every row of a scheduled class.
    """
    n = labels.shape[0]
    if sites == 1:
        return [torch.arange(n)]
    scheme = cfg.scheme
    if scheme == "schedule":
        return _by_schedule(labels, devices, sites, cfg, task, seed, schedule or {})
    if n == 0:
        return [torch.zeros(0, dtype=torch.long) for _ in range(sites)]
    dataset = _as_dataset(labels, devices)
    if scheme == "iid":
        from flwr_datasets.partitioner import IidPartitioner

        # IidPartitioner cuts contiguous blocks: shuffle first, seeded per task
        dataset = dataset.shuffle(seed=seed * 1000 + task)
        partitioner = IidPartitioner(num_partitions=sites)
    elif scheme == "dirichlet":
        from flwr_datasets.partitioner import DirichletPartitioner

        partitioner = DirichletPartitioner(
            num_partitions=sites,
            partition_by="label",
            alpha=cfg.alpha,
            min_partition_size=min(cfg.min_per_site, n // sites),
            self_balancing=False,
            shuffle=True,
            seed=seed * 1000 + task,  # redrawn per task
        )
    elif scheme == "device":
        from flwr_datasets.partitioner import NaturalIdPartitioner

        present = sorted(set(devices.tolist()))
        if len(present) != sites or min(present) < 0:
            raise ConfigError(
                f"config key 'partition.scheme' = 'device' needs one site per device: "
                f"this task's data has devices {present} but 'sites' = {sites}"
            )
        partitioner = NaturalIdPartitioner(partition_by="device")
    else:
        raise ConfigError(f"config key 'partition.scheme' has unknown value {scheme!r}")
    partitioner.dataset = dataset
    parts = [
        # numpy format: reading the column row by row in Python dominated the cost
        torch.from_numpy(
            partitioner.load_partition(i).with_format("numpy")[:]["row"]
        ).long()
        for i in range(sites)
    ]
    if scheme == "device":
        # NaturalIdPartitioner numbers partitions in order of first appearance
        ids = partitioner.partition_id_to_natural_id
        order = sorted(range(sites), key=lambda i: ids[i])
        parts = [parts[i] for i in order]
    return [p.sort().values for p in parts]


def _as_dataset(labels: torch.Tensor, devices: torch.Tensor):
    import datasets

    return datasets.Dataset.from_dict(
        {
            "row": np.arange(labels.shape[0]),
            "label": labels.numpy(),
            "device": devices.numpy(),
        }
    )


def _by_schedule(
    labels, devices, sites, cfg, task, seed, schedule
) -> list[torch.Tensor]:
    parts: list[list[int]] = [[] for _ in range(sites)]
    free = ~torch.isin(labels, torch.tensor(sorted(schedule), dtype=torch.long))
    free_rows = torch.nonzero(free).flatten()
    if len(free_rows):
        base = PartitionConfig(scheme="iid")
        for site, rows in enumerate(
            partition_task(
                labels[free_rows], devices[free_rows], sites, base, task=task, seed=seed
            )
        ):
            parts[site].extend(free_rows[rows].tolist())
    for cls, arrivals in schedule.items():
        rows = torch.nonzero(labels == cls).flatten().numpy()
        owners = sorted(arrivals)
        # one fixed split of the class over every site it ever reaches (seeded by
        # class, not task), so a site gaining it later gets rows no one else had
        rows = np.random.default_rng([seed, cls]).permutation(rows)
        for site, chunk in zip(owners, np.array_split(rows, len(owners)), strict=True):
            if arrivals[site] == task:
                parts[site].extend(chunk.tolist())
    return [torch.tensor(sorted(p), dtype=torch.long) for p in parts]


def check_partitions(parts: list[torch.Tensor], n: int, task: int) -> None:
    """Refuse partitions that overlap or lose rows (a bug, never silently)."""
    flat = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)
    if flat.numel() != flat.unique().numel():
        raise DataError(f"task {task}: site partitions overlap")
    if flat.numel() > n:
        raise DataError(f"task {task}: site partitions hold more rows than the task")
