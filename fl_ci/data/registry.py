"""The dataset table, and from a config (and a folder) to one study's splits.

Each dataset is one row of `DATASETS`: its class names, input channels, default model
and image size, normalisation, training augmentation and its loader. A new dataset
touches this table and its own loader module only.

`load_splits(cfg, names, order)` gives train / validation / test (and, when asked for, the
unlabelled exams) in model labels. Labels travel by class name: a row's name is
looked up in the study's class list (`StudyPlan.dataset_names`), so sites that number
their classes differently still agree. `root` replaces `data.root`: a hospital's own
folder named in its node config.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from fl_ci.config import Config, ConfigError, parse_floats
from fl_ci.data.base import DataError, ImageData
from fl_ci.data.cifar100 import CIFAR100_FINE_NAMES, CIFAR100_MEAN, CIFAR100_STD
from fl_ci.data.echo import ECHO_VIEWS

# the procedural echo's own pixel statistics at its default size (64 px, 3 devices);
# the constants of dataset "echo" unless a study sets data.mean / data.std
ECHO_MEAN, ECHO_STD = (0.15,), (0.16,)
# (test share of patients) for datasets split by patient
TEST_SHARE = 0.2


@dataclass
class Splits:
    """Train (for sites), validation (model selection), test (reporting only) and the
    sites' unlabelled exams (`data.unlabelled_fraction` or `.unlabelled_patients`;
    None when not asked for)."""

    train: ImageData
    val: ImageData
    test: ImageData
    unlabelled: ImageData | None = None
    skipped: list[str] = field(default_factory=list)  # bad items left out (skip_bad)

    @property
    def class_names(self) -> list[str]:
        return self.train.class_names

    def row_counts(self) -> dict[str, int]:
        """Rows of each split, and the items left out: what a site reports."""
        return {
            "train": len(self.train),
            "val": len(self.val),
            "test": len(self.test),
            "unlabelled": len(self.unlabelled) if self.unlabelled is not None else 0,
            "skipped": len(self.skipped),
        }


@dataclass(frozen=True)
class DatasetSpec:
    """One row of the dataset table."""

    name: str
    class_names: tuple[str, ...]  # default classes, in the dataset's numbering
    in_channels: int
    default_model: str
    image_size: int
    # normalisation constants (None: the simulated render's own statistics, which
    # every virtual site computes identically from the seed)
    mean: tuple[float, ...] | None
    std: tuple[float, ...] | None
    flip: bool  # horizontal flips when training (a mirrored echo view is not the same)
    pad_divisor: int  # random-crop padding = image size // pad_divisor
    # (cfg, root, class names) -> splits in the dataset's numbering of those names
    load: Callable[[Config, str, list[str]], Splits]
    cines: bool = True  # items are cines of `data.frames` frames (else still images)


def _load_cifar100(cfg: Config, root: str, names: list[str]) -> Splits:
    from fl_ci.data.cifar100 import load_cifar100

    d = cfg.data
    if not root and not d.download:
        raise ConfigError(
            "config key 'data.root' must name the CIFAR-100 folder (Parquet files or "
            "cifar-100-python), or set 'data.download = true'"
        )
    train, test = load_cifar100(
        root or str(Path.home() / ".cache/fl_ci/cifar100-download"),
        max_per_class=d.max_per_class,
        download=d.download,
        cache_dir=d.cache_dir or None,
    )
    train, test = (_by_names(s, names) for s in (train, test))
    train, val = split_validation(train, d.val_fraction, cfg.seed)
    pool = None
    if d.unlabelled_fraction > 0:
        train, pool = split_validation(train, d.unlabelled_fraction, cfg.seed + 1)
    return Splits(train, val, test, pool)


def _load_echo(cfg: Config, root: str, names: list[str]) -> Splits:
    from fl_ci.data.echo import load_echo_manifest

    if not root:
        raise ConfigError("config key 'data.root' must name the echo manifest folder")
    d = cfg.data
    data = load_echo_manifest(
        root,
        image_size=d.image_size or 64,
        frames=d.frames,
        cache_dir=d.cache_dir or None,
        skip_bad=d.skip_bad,
        class_names=names,
    )
    return _split_patients(cfg, data, skipped=list(data.skipped))


def render_echo_synth(cfg: Config, cohort: int = 0) -> ImageData:
    """The procedural echo cines of a study's config (`data.*`, `seed`): the one
    place that maps config keys to the renderer. `cohort` 1 is the validation
    cohort of `data.val_patients` patients per device, 2 the unlabelled exams'
    cohort of `data.unlabelled_patients`."""
    from fl_ci.data.echo_synth import make_echo_synth

    d = cfg.data
    patients = {0: d.patients, 1: d.val_patients, 2: d.unlabelled_patients}[cohort]
    return make_echo_synth(
        patients=patients,
        devices=d.devices,
        cines_per_view=d.cines_per_view,
        frames=d.frames,
        image_size=d.image_size or 64,
        seed=cfg.seed,
        cohort=cohort,
    )


def _load_echo_synth(cfg: Config, root: str, names: list[str]) -> Splits:
    d = cfg.data
    data = _by_names(render_echo_synth(cfg), names)
    cohorts = {}
    first_id = d.devices * d.patients
    for cohort, split, patients in (
        (1, "val", d.val_patients),
        (2, "pool", d.unlabelled_patients),
    ):
        if not patients:
            continue
        rendered = _by_names(render_echo_synth(cfg, cohort=cohort), names)
        cohorts[split] = replace(
            rendered,
            # ids after the study's own (and the validation cohort's), so no patient
            # id is in two splits; the study's normalisation, not the cohort's own
            # render statistics
            patients=rendered.patients + first_id,
            mean=data.mean,
            std=data.std,
        )
        first_id += d.devices * patients
    return _split_patients(cfg, data, **cohorts)


DATASETS: dict[str, DatasetSpec] = {
    spec.name: spec
    for spec in (
        DatasetSpec(
            name="cifar100",
            class_names=CIFAR100_FINE_NAMES,
            in_channels=3,
            default_model="resnet32",
            image_size=32,
            mean=CIFAR100_MEAN,
            std=CIFAR100_STD,
            flip=True,
            pad_divisor=8,  # pad 4 at 32 px, as in ABD
            load=_load_cifar100,
            cines=False,
        ),
        DatasetSpec(
            name="echo",
            class_names=ECHO_VIEWS,
            in_channels=1,
            default_model="echo_net",
            image_size=64,
            mean=ECHO_MEAN,
            std=ECHO_STD,
            flip=False,
            pad_divisor=32,  # a shift of about 3 % of the image
            load=_load_echo,
        ),
        DatasetSpec(
            name="echo-synth",
            class_names=ECHO_VIEWS,
            in_channels=1,
            default_model="echo_net",
            image_size=64,
            mean=None,
            std=None,
            flip=False,
            pad_divisor=32,
            load=_load_echo_synth,
        ),
    )
}


def dataset_spec(name: str) -> DatasetSpec:
    """The table row of dataset `name`; a ConfigError naming the key if unknown."""
    try:
        return DATASETS[name]
    except KeyError:
        known = ", ".join(DATASETS)
        raise ConfigError(
            f"config key 'dataset' has unknown value {name!r}; known: {known}"
        ) from None


def augmentation(dataset: str, size: int, enabled: bool = True) -> tuple[int, bool]:
    """(crop padding in px, horizontal flip) used for training on `dataset`: CIFAR
    pads 4 at 32 px and flips, as in ABD; echo shifts about 3 % of the image and does
    not flip (a mirrored view is not the same view on every device)."""
    if not enabled:
        return 0, False
    spec = dataset_spec(dataset)
    return max(1, size // spec.pad_divisor), spec.flip


def normalization(cfg: Config) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
    """The study's (mean, std): `data.mean`/`data.std`, else the dataset's constants;
    None where the dataset computes them from its render (echo-synth)."""
    spec = dataset_spec(cfg.dataset)
    d = cfg.data
    if bool(d.mean) != bool(d.std):
        raise ConfigError("config keys 'data.mean' and 'data.std' go together")
    if d.mean:
        mean, std = parse_floats("data.mean", d.mean), parse_floats("data.std", d.std)
        if len(mean) != spec.in_channels or len(std) != spec.in_channels:
            raise ConfigError(
                f"config keys 'data.mean'/'data.std' need {spec.in_channels} value(s) "
                f"for dataset {cfg.dataset!r}, got {d.mean!r} / {d.std!r}"
            )
        if min(std) <= 0:
            raise ConfigError(f"config key 'data.std' must be > 0, got {d.std!r}")
        return mean, std
    if spec.mean is None:
        return None
    return spec.mean, spec.std


def load_splits(
    cfg: Config, names: list[str], order: list[int], root: str | None = None
) -> Splits:
    """`cfg.dataset` as train / val / test in model labels, in the study's
    normalisation: `names` are the study's classes in the dataset's numbering and
    `order[i]` the one that becomes model label i (`StudyPlan.dataset_names` and
    `.order`). `root` (a site's own folder) replaces `data.root`."""
    if cfg.data.unlabelled_fraction >= 1:
        raise ConfigError(
            "config key 'data.unlabelled_fraction' must be below 1: some training "
            "data must stay labelled"
        )
    spec = dataset_spec(cfg.dataset)
    for key in ("val_patients", "unlabelled_patients"):
        if getattr(cfg.data, key) and spec.name != "echo-synth":
            raise ConfigError(
                f"config key 'data.{key}' renders a cohort of the procedural echo "
                f"only (dataset 'echo-synth'), not {cfg.dataset!r}"
            )
    if cfg.data.unlabelled_patients and cfg.data.unlabelled_fraction > 0:
        raise ConfigError(
            "config keys 'data.unlabelled_patients' and 'data.unlabelled_fraction' "
            "both name the unlabelled exams: set one of them"
        )
    raw = spec.load(cfg, cfg.data.root if root is None else root, names)
    norm = normalization(cfg)
    parts = (raw.train, raw.val, raw.test, raw.unlabelled)
    if norm is not None:
        parts = tuple(_normalised(p, *norm) if p is not None else None for p in parts)
    train, val, test, pool = (
        relabel(p, order) if p is not None else None for p in parts
    )
    return Splits(train, val, test, pool, skipped=raw.skipped)


def _normalised(data: ImageData, mean, std) -> ImageData:
    return replace(data, mean=tuple(mean), std=tuple(std))


def _by_names(data: ImageData, names: list[str]) -> ImageData:
    """`data` renumbered into `names` (the study's classes); rows of other classes
    are left out (a benchmark subset), and a study class the data lacks is fine."""
    if list(data.class_names) == list(names):
        return data
    index = {n: i for i, n in enumerate(names)}
    lookup = torch.tensor([index.get(n, -1) for n in data.class_names] or [-1])
    labels = lookup[data.labels] if len(data) else data.labels
    keep = labels >= 0
    kept = data.subset(keep)
    return ImageData(
        kept.frames,
        labels[keep],
        kept.patients,
        kept.devices,
        kept.mean,
        kept.std,
        list(names),
    )


def _split_patients(
    cfg: Config,
    data: ImageData,
    skipped=None,
    val: ImageData | None = None,
    pool: ImageData | None = None,
) -> Splits:
    """Echo data split by patient into train / val / test (seeded; no patient in two
    splits), then the unlabelled exams and the per-class cap. `val`, a validation
    cohort of its own, replaces the val share (whose patients then go unused);
    `pool`, an unlabelled cohort of its own, leaves the training split whole."""
    from fl_ci.data.echo import split_by_patient

    d = cfg.data
    if d.val_fraction + TEST_SHARE >= 1:
        raise ConfigError(
            f"config key 'data.val_fraction' = {d.val_fraction} leaves no training "
            f"patients beside the {TEST_SHARE:.0%} test share"
        )
    train, share, test = split_by_patient(
        data,
        (1 - d.val_fraction - TEST_SHARE, d.val_fraction, TEST_SHARE),
        seed=cfg.seed,
    )
    val = share if val is None else val
    if d.unlabelled_fraction > 0:
        # whole patients: no patient is both labelled and unlabelled
        u = d.unlabelled_fraction
        train, pool, _ = split_by_patient(train, (1 - u, u, 0.0), seed=cfg.seed + 1)
    if d.max_per_class:
        train, val, test = (
            first_per_class(s, d.max_per_class) for s in (train, val, test)
        )
        pool = first_per_class(pool, d.max_per_class) if pool is not None else None
    return Splits(train, val, test, pool, skipped=list(skipped or []))


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
