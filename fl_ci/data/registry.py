"""From a config to the splits of one dataset (train, validation, test and, when asked
for, unlabelled exams), relabelled into arrival order."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from fl_ci.config import Config, ConfigError
from fl_ci.data.base import DataError, ImageData

_NUM_CLASSES = {"cifar100": 100, "echo": 5, "echo-synth": 5}


def dataset_num_classes(name: str) -> int:
    try:
        return _NUM_CLASSES[name]
    except KeyError:
        raise ConfigError(f"config key 'dataset' has unknown value {name!r}") from None


@dataclass
class Splits:
    """Train (for sites), validation (model selection), test (reporting only) and the
    sites' unlabelled exams (`data.unlabelled_fraction`; None when not asked for)."""

    train: ImageData
    val: ImageData
    test: ImageData
    unlabelled: ImageData | None = None
    skipped: list[str] = field(default_factory=list)  # bad items left out (skip_bad)

    @property
    def class_names(self) -> list[str]:
        return self.train.class_names


def load_splits(cfg: Config) -> Splits:
    """Load `cfg.dataset` as train / val / test, in the dataset's own labels."""
    d = cfg.data
    if d.unlabelled_fraction >= 1:
        raise ConfigError(
            "config key 'data.unlabelled_fraction' must be below 1: some training "
            "data must stay labelled"
        )
    if cfg.dataset == "cifar100":
        from fl_ci.data.cifar100 import load_cifar100

        if not d.root and not d.download:
            raise ConfigError(
                "config key 'data.root' must name the CIFAR-100 folder (Parquet files or "
                "cifar-100-python), or set 'data.download = true'"
            )
        train, test = load_cifar100(
            d.root or str(Path.home() / ".cache/fl_ci/cifar100-download"),
            max_per_class=d.max_per_class,
            download=d.download,
            cache_dir=d.cache_dir or None,
        )
        train, val = split_validation(train, d.val_fraction, cfg.seed)
        pool = None
        if d.unlabelled_fraction > 0:
            train, pool = split_validation(train, d.unlabelled_fraction, cfg.seed + 1)
        return Splits(train, val, test, pool)
    if cfg.dataset == "echo":
        from fl_ci.data.echo import load_echo_manifest, split_by_patient

        if not d.root:
            raise ConfigError(
                "config key 'data.root' must name the echo manifest folder"
            )
        data = load_echo_manifest(
            d.root,
            image_size=d.image_size or 64,
            frames=d.frames,
            cache_dir=d.cache_dir or None,
            skip_bad=d.skip_bad,
        )
    elif cfg.dataset == "echo-synth":
        from fl_ci.data.echo_synth import make_echo_synth

        data = make_echo_synth(
            patients=d.patients,
            devices=d.devices,
            cines_per_view=d.cines_per_view,
            frames=d.frames,
            image_size=d.image_size or 64,
            seed=cfg.seed,
        )
    else:
        raise ConfigError(f"config key 'dataset' has unknown value {cfg.dataset!r}")
    from fl_ci.data.echo import split_by_patient

    test_share = 0.2
    if d.val_fraction + test_share >= 1:
        raise ConfigError(
            f"config key 'data.val_fraction' = {d.val_fraction} leaves no training "
            f"patients beside the {test_share:.0%} test share"
        )
    train, val, test = split_by_patient(
        data,
        (1 - d.val_fraction - test_share, d.val_fraction, test_share),
        seed=cfg.seed,
    )
    pool = None
    if d.unlabelled_fraction > 0:
        # whole patients: no patient is both labelled and unlabelled
        u = d.unlabelled_fraction
        train, pool, _ = split_by_patient(train, (1 - u, u, 0.0), seed=cfg.seed + 1)
    if d.max_per_class:
        train, val, test = (
            first_per_class(s, d.max_per_class) for s in (train, val, test)
        )
        pool = first_per_class(pool, d.max_per_class) if pool is not None else None
    return Splits(train, val, test, pool, skipped=list(getattr(data, "skipped", [])))


def split_validation(train: ImageData, fraction: float, seed: int):
    """Hold out `fraction` of each class (seeded) for model selection."""
    if fraction <= 0:
        return train, train.subset(torch.zeros(len(train), dtype=torch.bool))
    g = torch.Generator().manual_seed(seed)
    val_mask = torch.zeros(len(train), dtype=torch.bool)
    for c in train.labels.unique():
        rows = torch.nonzero(train.labels == c).flatten()
        rows = rows[torch.randperm(len(rows), generator=g)]
        val_mask[rows[: max(1, round(fraction * len(rows)))]] = True
    return train.subset(~val_mask), train.subset(val_mask)


def first_per_class(data: ImageData, n: int) -> ImageData:
    keep = torch.zeros(len(data), dtype=torch.bool)
    for c in data.labels.unique():
        keep[torch.nonzero(data.labels == c).flatten()[:n]] = True
    return data.subset(keep)


def relabel(data: ImageData, order: list[int]) -> ImageData:
    """Dataset label order[i] becomes model label i; class names follow."""
    k = len(order)
    top = int(data.labels.max()) if len(data) else 0
    rank = torch.full((max(max(order), top) + 1,), -1)
    rank[torch.tensor(order)] = torch.arange(k)
    labels = rank[data.labels]
    if (labels < 0).any():
        bad = int(data.labels[labels < 0][0])
        raise DataError(f"label {bad} is not among the dataset's {k} classes")
    names = [data.class_names[c] for c in order] if data.class_names else []
    return ImageData(
        data.frames, labels, data.patients, data.devices, data.mean, data.std, names
    )
