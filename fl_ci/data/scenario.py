"""Class order and task splits: which classes arrive at which task.

Datasets are relabelled once so that model label i is the i-th class in the order;
the classes of task t are then a contiguous range and "old" always means 0..n_old-1.
"""

from __future__ import annotations

import random

import numpy as np

from fl_ci.config import ConfigError


def class_order(num_classes: int, scheme: str, seed: int = 0) -> list[int]:
    """The dataset labels in arrival order.

    natural: 0..K-1.  abd: ABD / R-DFCIL protocol, `random.seed(r)` then
    `random.shuffle(range(K))`.  target: TARGET / LANDER protocol,
    `np.random.seed(2023)` then `np.random.permutation(K)` (seed + r for repeats r > 0).
    """
    if scheme == "natural":
        return list(range(num_classes))
    if scheme == "abd":
        order = list(range(num_classes))
        random.Random(seed).shuffle(order)  # same stream as random.seed(seed); shuffle
        return order
    if scheme == "target":
        # the legacy global RNG is a RandomState, so this equals np.random.seed(2023)
        return [
            int(c) for c in np.random.RandomState(2023 + seed).permutation(num_classes)
        ]
    raise ConfigError(f"config key 'class_order' has unknown value {scheme!r}")


def task_splits(num_classes: int, tasks: int, init_classes: int = 0) -> list[list[int]]:
    """Model labels of each task: `init_classes` first (0: an equal share), then equal.

    echo: 5 classes, 4 tasks, init 2 -> [[0, 1], [2], [3], [4]].
    """
    if tasks < 1:
        raise ConfigError("config key 'tasks' must be >= 1")
    if init_classes == 0:
        if num_classes % tasks:
            raise ConfigError(
                f"config key 'tasks': {num_classes} classes do not split into {tasks} "
                "equal tasks; set 'init_classes' or another 'tasks'"
            )
        first = num_classes // tasks
    else:
        first = init_classes
    rest = num_classes - first
    if (
        first > num_classes
        or (tasks == 1 and rest)
        or (tasks > 1 and rest % (tasks - 1))
    ):
        raise ConfigError(
            f"config key 'init_classes': {first} first classes and {tasks - 1} further "
            f"equal tasks cannot cover {num_classes} classes"
        )
    step = rest // (tasks - 1) if tasks > 1 else 0
    if tasks > 1 and step == 0:
        raise ConfigError("config key 'tasks': more tasks than classes")
    splits = [list(range(first))]
    for t in range(tasks - 1):
        start = first + t * step
        splits.append(list(range(start, start + step)))
    return splits


def parse_schedule(
    text: str, class_names: list[str], sites: int
) -> dict[int, dict[int, int]]:
    """`"site:class@task, ..."` -> {class: {site: task}} (model labels, counted from 0).

    `class` is a class name (`PSAX`) or a model label. "2:PSAX@3" means site 2 gains
    PSAX at task 3.
    """
    schedule: dict[int, dict[int, int]] = {}
    for raw in filter(None, (item.strip() for item in text.split(","))):
        try:
            site_s, rest = raw.split(":", 1)
            cls_s, task_s = rest.split("@", 1)
            site, task = int(site_s), int(task_s)
        except ValueError:
            raise ConfigError(
                f"config key 'partition.schedule': entry {raw!r} is not 'site:class@task'"
            ) from None
        cls_s = cls_s.strip()
        if cls_s in class_names:
            cls = class_names.index(cls_s)
        elif cls_s.isdigit() and int(cls_s) < len(class_names):
            cls = int(cls_s)
        else:
            raise ConfigError(
                f"config key 'partition.schedule': unknown class {cls_s!r} in {raw!r}"
            )
        if not 0 <= site < sites:
            raise ConfigError(
                f"config key 'partition.schedule': site {site} in {raw!r} is not in "
                f"0..{sites - 1}"
            )
        if task < 0:
            raise ConfigError(
                f"config key 'partition.schedule': negative task in {raw!r}"
            )
        schedule.setdefault(cls, {})[site] = task
    return schedule


def apply_schedule(
    splits: list[list[int]], schedule: dict[int, dict[int, int]]
) -> list[list[int]]:
    """Move each scheduled class to the task of its first arrival at any site.

    Works on dataset labels, before relabelling, so that every task stays a
    contiguous range of model labels afterwards.
    """
    first_task = {c: min(sites.values()) for c, sites in schedule.items()}
    if first_task and max(first_task.values()) >= len(splits):
        raise ConfigError("config key 'partition.schedule': a task is beyond 'tasks'")
    out = [[c for c in classes if c not in first_task] for classes in splits]
    for c, t in sorted(first_task.items()):
        out[t].append(c)
    for t, classes in enumerate(out):
        if not classes:
            raise ConfigError(
                f"config key 'partition.schedule': task {t} would have no new class"
            )
    return out
