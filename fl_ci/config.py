"""One typed configuration for every run: scenario TOML, `--set`, Flower run-config.

The field names are the knobs users type (`synthesis.iterations`, `partition.alpha`).
Nested sections are frozen dataclasses; `Config.from_dict` refuses unknown keys and
wrong types with a message naming the key, `Config.to_flat` gives the dotted form that
Flower's run-config carries (bool, int, float and str only), and `Config.from_flat`
reads it back, so the server and every client rebuild the same object.
"""

from __future__ import annotations

import dataclasses
import tomllib
import typing
from dataclasses import dataclass, field, fields, is_dataclass, replace
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A configuration key or value is wrong; the message names the key."""


@dataclass(frozen=True)
class DataConfig:
    root: str = ""  # CIFAR-100 Parquet/pickle folder or echo manifest folder
    # input normalisation, comma-separated per channel on the 0..1 scale ("": the
    # dataset's constants); fixed by the study so every site feeds the model the
    # same space, never computed from one site's pixels
    mean: str = ""
    std: str = ""
    max_per_class: int = 0  # subsample each class of each split for quick runs (0: all)
    image_size: int = 0  # side length fed to the model (0: the dataset's default)
    val_fraction: float = 0.1  # share of training data held out for model selection
    # share of the training split set aside as the sites' unlabelled exams (by patient
    # for echo, per class for CIFAR); the method never reads their labels, and
    # `ci.target = "unlabelled"` makes them the contrastive target
    unlabelled_fraction: float = 0.0
    cache_dir: str = ""  # where decoded echo frames are cached ("": beside the data)
    # echo manifests: leave out bad rows and undecodable cines and list them (a site
    # goes on and reports them) instead of stopping with the list
    skip_bad: bool = False
    # procedural echo (`dataset = "echo-synth"`)
    patients: int = 60  # patients per device
    devices: int = 3
    cines_per_view: int = 1  # cines of each view per patient
    frames: int = 8  # frames per cine
    # > 0: the validation split is a cohort of its own, this many other patients per
    # device on the same devices, so that selection can resolve a few points; the
    # training and test patients stay as they are (the val_fraction share goes unused)
    val_patients: int = 0
    # > 0: the sites' unlabelled exams are a cohort of their own, this many other
    # patients per device on the same devices (labels never read), beside the whole
    # labelled training split; instead of `unlabelled_fraction`, which takes them
    # from it
    unlabelled_patients: int = 0
    download: bool = False  # CIFAR-100: fetch the official archive when root is empty


@dataclass(frozen=True)
class PartitionConfig:
    scheme: str = "iid"  # iid | dirichlet | device | schedule
    alpha: float = 0.5  # Dirichlet concentration (label skew), redrawn per task
    # explicit arrival schedule: "site:class@task,..." e.g. "1:4@3" = site 1 gains class 4
    # at task 3 (tasks and sites counted from 0); classes not named follow `iid`
    schedule: str = ""
    min_per_site: int = 1  # Dirichlet redraws until every site holds this many samples


@dataclass(frozen=True)
class SynthesisConfig:
    iterations: int = 2000
    per_class: int = 20  # impressions per old class (balanced)
    batch_size: int = 0  # images optimised together (0: all old classes in one batch)
    lr: float = 0.05
    init: str = "mean"  # mean (class-mean image + noise) | random (the ablation)
    init_noise: float = 0.1
    warmup: int = 100  # linear learning-rate warm-up iterations, then cosine decay
    # the cosine decay after the warm-up starts at lr_peak * lr (upstream Class
    # Impression's `0.2 * (1 + cos)` is lr_peak = 0.4, the default since it kept more
    # old views on validation, docs/results.md; NVlabs DeepInversion's is 1.0)
    lr_peak: float = 0.4
    bn_weight: float = 1.0  # a_bn
    first_bn_weight: float = 10.0  # r_1: weight of the first BatchNorm layer
    tv_weight: float = 1e-3  # a_tv
    # per_image: mean over images of each image's TV | batch: upstream's Frobenius
    # norms over the whole batch (about sqrt(batch) times larger)
    tv_form: str = "per_image"
    l2_weight: float = 1e-2  # a_l2
    # pull each class's mean teacher feature towards that of its real images, kept
    # by the sites (fl_ci/prototypes.py; CwD's statistics, Wang et al. 2024); 10 won
    # on validation (docs/results.md, "A validation split that can select"); 0: off
    feature_weight: float = 10.0
    jitter: int = 0  # random roll in pixels (0: about image_size / 16)
    flip: bool = True
    compile: bool = False  # torch.compile the synthesis step (CUDA only)
    min_mean_count: int = 10  # share a class mean only if the site has this many images
    mean_noise_std: float = 0.0  # Gaussian noise added to shared class means


@dataclass(frozen=True)
class ClassImpressionConfig:
    synthetic_ratio: float = 0.66  # share of each batch drawn from impressions
    distill_weight: float = -1.0  # alpha_dist (< 0: 5 * sqrt(n_old / n_new), upstream)
    margin_weight: float = 1.0  # alpha_margin (0 disables the margin loss)
    margin: float = 0.7
    top_k: int = 1
    # margin-loss anchors: synthetic = the impressions only (the method doc) |
    # old_rows = every row with an old-class label, real ones included (upstream)
    margin_anchors: str = "synthetic"
    contrastive_weight: float = 0.1  # alpha_contras (0 disables)
    contrastive_form: str = "pooled"  # pooled (upstream) | per_class (paper's InfoNCE)
    tau: float = 1.0
    rho: float = 0.9  # centroid update rate (weight of the new batch)
    # seen: a class starts at its first batch mean, absent classes keep theirs, only
    # classes seen in both domains enter eq. (6) | zero_init (upstream): centroids
    # start at 0, absent classes decay by 1 - rho, every class row enters the loss
    centroid_form: str = "seen"
    class_weights: bool = True  # CE class weights max_j n_j / n_c
    freeze_old: bool = True  # keep the old head rows fixed
    imprint: bool = True  # new-class rows from mean teacher features
    # contrastive target (eq. 6), unlabelled by the method: task_data = the site's own
    # task images | unlabelled = its unlabelled exams (data.unlabelled_fraction or
    # data.unlabelled_patients) of the views it performs | test = the test images of
    # every class seen (the paper's transductive choice, reported as such)
    target: str = "task_data"
    # Levers against forgetting (docs/results.md, "Keeping the old views"); the
    # defaults are the paper's method.
    # cross-entropy of the real rows: global = over every class (the paper) | local =
    # over the task's new classes only, the impressions' over the old classes only
    # (ABD, R-DFCIL: "real vs synthetic" is no longer a shortcut to the new label)
    real_ce: str = "global"
    # weight of a class-balanced cross-entropy over every class on the batch's
    # detached features: it trains the head alone, so the old/new boundary is drawn
    # on real new and synthetic old rows alike (ABD's "ft" term; R-DFCIL's
    # classification alignment, done at every step)
    head_align_weight: float = 0.0
    # weight of the L1 distance between the student's and the teacher's old-class
    # logits on the impressions (R-DFCIL's hard KD)
    logit_distill_weight: float = 0.0
    # rows whose features eq. (7) distils: all = real and synthetic (the paper) |
    # synthetic = the impressions only, so the new view's own images are free to move
    # away from the old classes, where the teacher (which never saw them) put them
    distill_rows: str = "all"
    # give the impressions the same random crop (and flip) as the real rows, as
    # upstream does by loading them through the training transform; otherwise the
    # student can tell a fixed, unaugmented impression from an augmented real image
    augment_impressions: bool = False
    # weight of feature replay: a cross-entropy of the head on pseudo-features drawn
    # from each old class's real feature statistics (fl_ci/prototypes.py, PASS), so
    # the new class's row learns where the real old images lie
    prototype_weight: float = 0.0
    # steps (0: none) of training the new head rows alone, at the end of each task,
    # on pseudo-features of every class from the kept statistics, old and new alike
    # (SLCA's classifier alignment), with SGD at this learning rate
    calibration_steps: int = 0
    calibration_lr: float = 0.1


@dataclass(frozen=True)
class FederationConfig:
    strategy: str = "fedavg"  # fedavg | median | trimmed_mean | krum
    min_sites: int = 1  # fewest valid replies a round needs
    timeout: float = 600.0  # seconds a round waits for replies
    trim_beta: float = 0.2
    krum_malicious: int = 1
    # the reply screen (server/checks.py; 0 switches a test off): an update norm over
    # this x the round's median (3+ replies) or the median accepted in earlier rounds
    max_norm_ratio: float = 10.0
    # an update norm over this x the global model's own norm; honest sites reached 1.9x
    # in a task's first round on the CIFAR-100 federated protocol (docs/reliability.md)
    max_update_ratio: float = 10.0
    # a claimed example count over this x the other replies' median (or, alone, the
    # counts accepted earlier) is rejected; a site's weight never exceeds its claim at
    # its first accepted round of the task
    max_count_ratio: float = 10.0
    max_site_share: float = 1.0  # cap on one site's FedAvg share (1: none)
    # the aggregate is redone without the most suspect reply when its validation
    # accuracy falls more than this many points within a task (0: off; needs a
    # validation split of 20 images or more to tell a collapse from noise)
    max_val_drop: float = 50.0
    check_aggregate: bool = True  # the probe-batch and validation checks above
    cpus_per_site: float = 1.0
    gpus_per_site: float = 0.0
    retries: int = 1  # times a round short of sound replies is sent again
    # a site with no new-class data at a task trains on its method's synthetic replay
    # alone (Class Impression's impressions, DeepInversion's images) instead of sitting
    # the round out, so the average holds on to the old classes
    rehearse: bool = False
    dp_clip_norm: float = 0.0  # > 0: Flower's server-side DP, clip each update's L2
    dp_noise_multiplier: float = 1.0  # z: aggregate noise std = z * clip / sites


@dataclass(frozen=True)
class BaselinesConfig:
    """Knobs of the baseline methods (fl_ci/methods/: lwf, lwm, deepinversion, abd,
    icarl, lucir). Defaults follow each paper's CIFAR setting unless noted."""

    kd_temperature: float = 2.0  # T of Hinton KD (lwf, lwm, deepinversion, icarl)
    kd_weight: float = 1.0  # weight of the KD term (lwf, lwm, deepinversion, icarl)
    # Hinton's T^2 factor on KD (lwf, lwm, deepinversion, icarl); ABD's code leaves it
    # out (false), so with it our KD gradient is T^2 times ABD's
    kd_t2: bool = True
    lwm_weight: float = 1.0  # gamma of LwM's attention distillation
    synthetic_ratio: float = 0.5  # synthetic share of a batch (deepinversion, abd)
    memory: int = 2000  # exemplar budget at one site, all classes (icarl, lucir)
    lucir_lambda: float = 5.0  # lambda_base: less-forget weight x sqrt(n_old/n_new)
    lucir_margin: float = 0.5  # m of the margin ranking loss
    lucir_k: int = 2  # K hardest new classes in the margin ranking loss
    lucir_margin_weight: float = 1.0
    abd_iterations: int = 10000  # generator steps per task (ABD's power_iters)
    abd_batch_size: int = 128  # images per generator step
    abd_lr: float = 1e-3  # Adam learning rate of the generator
    abd_z_dim: int = 1000
    abd_width: int = 128  # channels of the generator's convolutions
    # eps of the generator's two conv-block BatchNorms (ABD's `BatchNorm2d(128, 0.8)`
    # passes 0.8 as eps)
    abd_bn_eps: float = 1e-5
    # sigma of the smoothness prior's 5x5 Gaussian blur (ABD's kernel
    # exp(-((x - m) / (2 sigma))^2) with sigma 1 is a Gaussian of sigma sqrt(2))
    abd_blur_sigma: float = 1.0
    abd_bn_weight: float = 50.0  # BN-statistics (Gaussian KL) weight
    abd_smooth_weight: float = 1e-3  # image prior: MSE to a Gaussian-blurred copy
    abd_content_temperature: float = 1000.0  # CE on the teacher's argmax, over T
    abd_content_weight: float = 1.0
    abd_kd_weight: float = 0.1  # mu: importance-weighted feature distillation


@dataclass(frozen=True)
class Config:
    method: str = "finetune"
    dataset: str = "echo-synth"  # cifar100 | echo | echo-synth
    # the study's classes by name, comma-separated, in the dataset's numbering that
    # `class_order` permutes ("": the dataset's own names: echo views A2C, A3C, A4C,
    # PLAX, PSAX; CIFAR-100's official fine labels); sites agree on label ids by name
    classes: str = ""
    model: str = "auto"  # auto | resnet32 | resnet18 | echo_net
    head: str = "cosine"  # cosine | linear
    # start of the cosine head's learnable scale eta (upstream 1.0; at 1.0 the logits
    # span only [-1, 1] and small studies barely train at lr 0.01: docs/results.md)
    head_scale: float = 10.0
    tasks: int = 4
    init_classes: int = 0  # classes in the first task (0: equal split)
    class_order: str = "natural"  # natural | abd | target
    order_seed: int = 0  # repeat r of the ABD protocol
    sites: int = 1
    rounds_per_task: int = 1
    local_epochs: int = 1
    # rounds and local epochs per round of the first task (0: rounds_per_task,
    # local_epochs): the base model is trained once and every later task keeps its
    # features, so it pays to fit it well (docs/results.md, "A base model fitted to
    # its task")
    base_rounds: int = 0
    base_epochs: int = 0
    batch_size: int = 64
    eval_batch_size: int = 256
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    lr_schedule: str = "cosine"  # cosine | constant, over a task's local epochs
    augment: bool = True
    device: str = "auto"  # cpu | cuda | auto
    amp: bool = True  # bf16 autocast on CUDA
    seed: int = 0
    # who evaluates the global model: the sites on their own held-out patients
    # (summed per-class counts), the server on its own test set, or both (the
    # accuracy matrix then comes from the sites, the server's is kept beside it)
    evaluation: str = "server"  # sites | server | both
    data: DataConfig = field(default_factory=DataConfig)
    partition: PartitionConfig = field(default_factory=PartitionConfig)
    synthesis: SynthesisConfig = field(default_factory=SynthesisConfig)
    ci: ClassImpressionConfig = field(default_factory=ClassImpressionConfig)
    baselines: BaselinesConfig = field(default_factory=BaselinesConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)

    # ----- construction -------------------------------------------------------------
    @classmethod
    def from_dict(cls, values: dict[str, Any], *, base: Config | None = None) -> Config:
        """Nested dict (a parsed TOML) over `base` (defaults); refuses unknown keys."""
        return _apply(base or cls(), values, prefix="")

    @classmethod
    def from_flat(cls, flat: dict[str, Any], *, base: Config | None = None) -> Config:
        """Dotted keys (`synthesis.iterations`), as in Flower's run-config."""
        return cls.from_dict(_nest(flat), base=base)

    @classmethod
    def from_toml(cls, path: str | Path, overrides: list[str] | None = None) -> Config:
        """A scenario file, then `key=value` overrides (values in TOML syntax)."""
        path = Path(path)
        try:
            values = tomllib.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"scenario file not found: {path}") from None
        except tomllib.TOMLDecodeError as err:
            raise ConfigError(f"{path}: not valid TOML: {err}") from None
        try:
            config = cls.from_dict(values)
        except ConfigError as err:
            raise ConfigError(f"{path}: {err}") from None
        return config.with_overrides(overrides or [])

    def with_overrides(self, overrides: list[str]) -> Config:
        """Apply `key=value` strings, e.g. `synthesis.iterations=50`."""
        flat: dict[str, Any] = {}
        for item in overrides:
            key, sep, raw = item.partition("=")
            if not sep or not key.strip():
                raise ConfigError(f"override {item!r} is not of the form key=value")
            flat[key.strip()] = parse_value(raw.strip())
        return Config.from_flat(flat, base=self)

    # ----- export ---------------------------------------------------------------------
    def to_flat(self) -> dict[str, bool | int | float | str]:
        """Dotted keys with scalar values: what Flower's run-config and records carry."""
        out: dict[str, bool | int | float | str] = {}
        _flatten(self, "", out)
        return out

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> Config:
        return replace(self, **changes)

    # ----- the schedule of rounds (the one place that counts them) ------------------
    def rounds_at(self, task: int) -> int:
        """Rounds of `task`: `base_rounds` for the first task when set."""
        return (
            self.base_rounds if task == 0 and self.base_rounds else self.rounds_per_task
        )

    def epochs_at(self, task: int) -> int:
        """Local epochs per round of `task`: `base_epochs` for the first when set."""
        return self.base_epochs if task == 0 and self.base_epochs else self.local_epochs

    def first_round(self, task: int) -> int:
        """The server round (from 1) that opens `task`; `first_round(tasks) - 1` is
        the study's last round."""
        return 1 + sum(self.rounds_at(t) for t in range(task))

    def task_of_round(self, server_round: int) -> int:
        """The task that server round `server_round` (from 1) belongs to."""
        task = 0
        while self.first_round(task + 1) <= server_round:
            task += 1
        return task


def parse_floats(key: str, text: str) -> tuple[float, ...]:
    """`"0.5, 0.25"` -> (0.5, 0.25); a ConfigError naming `key` otherwise."""
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise ConfigError(
            f"config key '{key}' must be comma-separated numbers, got {text!r}"
        ) from None
    return values


def parse_names(text: str) -> list[str]:
    """`"A2C, A3C"` -> ["A2C", "A3C"] (a name list in a Flower-safe string)."""
    return [name.strip() for name in text.split(",") if name.strip()]


_CHOICES: dict[str, tuple[str, ...]] = {
    "dataset": ("cifar100", "echo", "echo-synth"),
    "model": ("auto", "resnet32", "resnet18", "echo_net"),
    "head": ("cosine", "linear"),
    "class_order": ("natural", "abd", "target"),
    "device": ("cpu", "cuda", "auto"),
    "evaluation": ("sites", "server", "both"),
    "lr_schedule": ("cosine", "constant"),
    "partition.scheme": ("iid", "dirichlet", "device", "schedule"),
    "synthesis.init": ("mean", "random"),
    "synthesis.tv_form": ("per_image", "batch"),
    "ci.contrastive_form": ("pooled", "per_class"),
    "ci.margin_anchors": ("synthetic", "old_rows"),
    "ci.centroid_form": ("seen", "zero_init"),
    "ci.target": ("task_data", "unlabelled", "test"),
    "ci.real_ce": ("global", "local"),
    "ci.distill_rows": ("all", "synthetic"),
    "federation.strategy": ("fedavg", "median", "trimmed_mean", "krum"),
}
_POSITIVE = {
    "head_scale", "tasks", "sites", "rounds_per_task", "batch_size", "eval_batch_size",
    "synthesis.per_class", "data.devices", "data.patients", "data.frames",
    "data.cines_per_view", "synthesis.iterations", "baselines.kd_temperature",
    "baselines.lucir_k", "baselines.abd_iterations", "baselines.abd_batch_size",
    "baselines.abd_lr", "baselines.abd_z_dim", "baselines.abd_width",
    "baselines.abd_content_temperature",
    "synthesis.lr_peak", "baselines.abd_bn_eps", "baselines.abd_blur_sigma",
}  # fmt: skip
_NON_NEGATIVE = {
    "local_epochs", "base_epochs", "base_rounds", "init_classes", "lr",
    "weight_decay", "momentum",
    "data.max_per_class", "data.image_size", "data.val_patients",
    "data.unlabelled_patients",
    "synthesis.batch_size", "synthesis.lr",
    "synthesis.warmup", "synthesis.init_noise", "synthesis.jitter",
    "synthesis.min_mean_count", "synthesis.mean_noise_std", "ci.margin_weight",
    "synthesis.feature_weight",
    "ci.contrastive_weight", "ci.top_k", "ci.head_align_weight",
    "ci.logit_distill_weight", "ci.prototype_weight", "ci.calibration_steps",
    "ci.calibration_lr", "federation.min_sites",
    "federation.retries", "federation.dp_clip_norm", "federation.dp_noise_multiplier",
    "federation.max_norm_ratio", "federation.max_update_ratio",
    "federation.max_count_ratio", "federation.max_val_drop",
    "federation.cpus_per_site", "federation.gpus_per_site",
    "partition.min_per_site", "baselines.kd_weight", "baselines.lwm_weight",
    "baselines.memory", "baselines.lucir_lambda", "baselines.lucir_margin",
    "baselines.lucir_margin_weight", "baselines.abd_bn_weight",
    "baselines.abd_smooth_weight", "baselines.abd_content_weight",
    "baselines.abd_kd_weight",
}  # fmt: skip
_UNIT = {
    "data.val_fraction",
    "data.unlabelled_fraction",
    "ci.synthetic_ratio",
    "ci.rho",
    "federation.max_site_share",
    "baselines.synthetic_ratio",
}


def parse_value(raw: str) -> Any:
    """A `--set` value: TOML literal (`5`, `0.1`, `true`, `"x"`) or else a bare string."""
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw


def _apply(obj: Any, values: dict[str, Any], prefix: str) -> Any:
    if not isinstance(values, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'} must be a table")
    hints = typing.get_type_hints(type(obj))
    known = {f.name for f in fields(obj)}
    changes: dict[str, Any] = {}
    for key, value in values.items():
        name = key.replace("-", "_")
        dotted = prefix + name
        if name not in known:
            raise ConfigError(f"unknown config key '{prefix + key}'")
        current = getattr(obj, name)
        if is_dataclass(current):
            changes[name] = _apply(current, value, dotted + ".")
        else:
            changes[name] = _check(dotted, hints[name], value)
    return replace(obj, **changes)


def _check(key: str, kind: Any, value: Any) -> Any:
    if kind is bool:
        if not isinstance(value, bool):
            raise ConfigError(
                f"config key '{key}' must be true or false, got {value!r}"
            )
    elif kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"config key '{key}' must be an integer, got {value!r}")
    elif kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"config key '{key}' must be a number, got {value!r}")
        value = float(value)
        if value != value or value in (float("inf"), float("-inf")):
            raise ConfigError(f"config key '{key}' must be finite, got {value!r}")
    elif kind is str:
        if not isinstance(value, str):
            raise ConfigError(f"config key '{key}' must be a string, got {value!r}")
    if key in _CHOICES and value not in _CHOICES[key]:
        raise ConfigError(
            f"config key '{key}' must be one of {', '.join(_CHOICES[key])}; got {value!r}"
        )
    if key in _POSITIVE and value <= 0:
        raise ConfigError(f"config key '{key}' must be > 0, got {value!r}")
    if key in _NON_NEGATIVE and value < 0:
        raise ConfigError(f"config key '{key}' must be >= 0, got {value!r}")
    if key in _UNIT and not 0 <= value <= 1:
        raise ConfigError(f"config key '{key}' must lie in [0, 1], got {value!r}")
    return value


def _nest(flat: dict[str, Any]) -> dict[str, Any]:
    nested: dict[str, Any] = {}
    for key, value in flat.items():
        parts = key.split(".")
        node = nested
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"config key '{key}' conflicts with a scalar key")
        node[parts[-1]] = value
    return nested


def _flatten(obj: Any, prefix: str, out: dict[str, Any]) -> None:
    for f in fields(obj):
        value = getattr(obj, f.name)
        if is_dataclass(value):
            _flatten(value, f"{prefix}{f.name}.", out)
        else:
            out[prefix + f.name] = value
