"""A trained model as a self-describing folder: `bundle.json` beside `model.pt`.

`model.pt` is the bare state dict of the run's final `IncrementalNet`; `bundle.json`
says everything needed to use it without the run's config or data: architecture, head
type and scale, input channels, size and frames, the normalisation (mean/std on the
0..1 pixel scale), class names in head order, the task schedule, method, dataset,
metrics, the fl-ci version and a SHA-256 of `model.pt`. `load_bundle` rebuilds the
network from the description and refuses weights that do not match it.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from fl_ci.data.base import normalize
from fl_ci.models import HEAD_NAMES, MODEL_NAMES, IncrementalNet, build_model
from fl_ci.models.heads import CosineHead, LinearHead
from fl_ci.results import atomic_torch_save, to_jsonable, write_json

BUNDLE_NAME = "bundle.json"
MODEL_NAME = "model.pt"
FORMAT_VERSION = 1
# summary.json keys that the bundle holds elsewhere (or that are not metrics)
_NOT_METRICS = frozenset(
    {"config", "class_names", "classes_per_task", "method", "dataset", "table"}
)


class BundleError(ValueError):
    """A bundle that cannot be written or used; the message names the file and key."""


@dataclass
class Bundle:
    """A loaded bundle: the model (eval mode, CPU) and its description."""

    path: Path  # the bundle.json
    model: IncrementalNet
    info: dict[str, Any]

    @property
    def class_names(self) -> list[str]:
        return list(self.info["class_names"])

    @property
    def in_channels(self) -> int:
        return int(self.info["input"]["channels"])

    @property
    def image_size(self) -> int:
        return int(self.info["input"]["image_size"])

    @property
    def frames(self) -> int:
        return int(self.info["input"]["frames"])

    @property
    def mean(self) -> tuple[float, ...]:
        return tuple(float(v) for v in self.info["input"]["mean"])

    @property
    def std(self) -> tuple[float, ...]:
        return tuple(float(v) for v in self.info["input"]["std"])

    def normalize(self, images: Tensor) -> Tensor:
        """uint8 [B, C, H, W] -> the model's float input, as the run normalised."""
        return normalize(images, self.mean, self.std)


def fl_ci_version() -> str:
    try:
        return metadata.version("fl-ci")
    except metadata.PackageNotFoundError:  # run from a source tree, not installed
        return "0.1.0"


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def run_metrics(summary: dict[str, Any]) -> dict[str, Any]:
    """The metrics part of a run's summary (final accuracy, forgetting, the accuracy
    after each task, ...): what `write_bundle` takes as `metrics`."""
    return {k: v for k, v in summary.items() if k not in _NOT_METRICS}


def write_bundle(
    out_dir: str | Path,
    model: IncrementalNet,
    *,
    config_flat: dict[str, Any],
    class_names: list[str],
    classes_per_task: list[int],
    mean: tuple[float, ...],
    std: tuple[float, ...],
    in_channels: int,
    image_size: int,
    frames: int,
    metrics: dict[str, Any],
    normalisation_source: str = "the run's data",
) -> Path:
    """Write `out_dir/bundle.json` describing `model`; returns its path.

    `out_dir/model.pt` is written (atomically) from `model` when absent; when present
    it must hold exactly `model`'s weights. Everything is checked before anything is
    written: the names, task schedule, normalisation and input shape must describe
    `model` as `load_bundle` will rebuild it.
    """
    out = Path(out_dir)
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    info = {
        "format": FORMAT_VERSION,
        "fl_ci_version": fl_ci_version(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "method": str(config_flat.get("method", "")),
        "dataset": str(config_flat.get("dataset", "")),
        "architecture": _architecture(config_flat),
        "head": _head_kind(model),
        "head_scale": float(config_flat.get("head_scale", 1.0)),
        "num_classes": len(class_names),
        "class_names": [str(c) for c in class_names],
        "classes_per_task": [int(k) for k in classes_per_task],
        "input": {
            "channels": int(in_channels),
            "image_size": int(image_size),
            "frames": int(frames),
            "mean": [float(v) for v in mean],
            "std": [float(v) for v in std],
            "pixels": "gray (or RGB) uint8 / 255, then (x - mean) / std per channel",
            "normalisation_source": normalisation_source,
        },
        "metrics": to_jsonable(metrics),
        "weights": {"file": MODEL_NAME, "sha256": "", "parameters": 0},
        "config": to_jsonable(config_flat),
    }
    where = out / BUNDLE_NAME
    if config_flat.get("head", info["head"]) != info["head"]:
        raise BundleError(
            f"{where}: config head {config_flat.get('head')!r} but the model has a "
            f"{info['head']} head"
        )
    _check_info(info, where)
    _check_weights(info, state, f"the model given for {out}")
    weights = out / MODEL_NAME
    if weights.exists():
        saved = _read_state(weights)
        if set(saved) != set(state) or any(
            saved[k].shape != state[k].shape or not torch.equal(saved[k], state[k])
            for k in state
        ):
            raise BundleError(
                f"{weights} holds other weights than the model given; remove it or "
                "write the bundle to another folder"
            )
    else:
        atomic_torch_save(state, weights)
    info["weights"]["sha256"] = file_sha256(weights)
    info["weights"]["parameters"] = sum(v.numel() for v in state.values())
    return write_json(info, where)


def load_bundle(path: str | Path) -> Bundle:
    """Load a bundle folder (or its bundle.json): the model rebuilt, weights loaded and
    checked against the description (hash, keys, shapes, number of classes)."""
    path = Path(path)
    where = path / BUNDLE_NAME if path.is_dir() else path
    if not where.is_file():
        raise BundleError(f"{where} not found: is {path} a bundle folder?")
    try:
        info = json.loads(where.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise BundleError(f"{where} cannot be read as JSON ({err})") from None
    _check_info(info, where)
    weights = where.parent / str(info["weights"].get("file", MODEL_NAME))
    if not weights.is_file():
        raise BundleError(f"{where}: its weights file {weights} is missing")
    expected = str(info["weights"].get("sha256", ""))
    actual = file_sha256(weights)
    if actual != expected:
        raise BundleError(
            f"{weights} does not match {where}: SHA-256 {actual[:16]}... but the bundle "
            f"says {expected[:16] or '(none)'}...; the weights were changed or belong "
            "to another bundle"
        )
    state = _read_state(weights)
    model = _check_weights(info, state, str(weights))
    model.load_state_dict(state)
    return Bundle(where, model.eval(), info)


def bundle_from_run(
    out_dir: str | Path,
    *,
    mean: tuple[float, ...] | None = None,
    std: tuple[float, ...] | None = None,
) -> Path:
    """Write `bundle.json` for a finished run folder (summary.json + model.pt).

    A single-machine run writes no model.pt; its final `checkpoint.pt` holds the
    final model, which is then saved as model.pt. Runs so far do not record their
    normalisation: pass `mean` and `std`, or they are recomputed by loading the run's
    data from its config (`load_splits(cfg).train.mean/std`: exact for echo-synth,
    which is regenerated from the seed, and for data still at `data.root`); the bundle
    says which (`input.normalisation_source`).
    """
    out = Path(out_dir)
    summary_path = out / "summary.json"
    try:
        summary = json.loads(summary_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BundleError(f"{summary_path} not found: is {out} a run folder?") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise BundleError(f"{summary_path} cannot be read as JSON ({err})") from None
    for key in ("config", "class_names", "classes_per_task"):
        if key not in summary:
            raise BundleError(f"{summary_path} has no {key!r}")
    cfg_flat = summary["config"]
    per_task = [int(k) for k in summary["classes_per_task"]]
    done = summary.get("tasks_completed", len(per_task))
    if done != len(per_task):
        raise BundleError(
            f"{summary_path}: the run completed {done} of {len(per_task)} tasks; "
            "bundle a finished run"
        )
    state = _run_weights(out, cfg_flat, len(per_task))
    if (mean is None) != (std is None):
        raise BundleError("give both mean and std, or neither")
    size, frames = _run_input_shape(cfg_flat)
    if mean is None or std is None:
        mean, std, size, frames = _recompute_normalisation(cfg_flat, summary_path)
        source = (
            f"recomputed by fl-ci {fl_ci_version()} from the run's config "
            f"(dataset {cfg_flat.get('dataset')!r} reloaded)"
        )
    else:
        source = "given when bundling the run"
    mean, std = tuple(float(v) for v in mean), tuple(float(v) for v in std)
    info = {
        "architecture": _architecture(cfg_flat),
        "head": str(cfg_flat.get("head", "cosine")),
        "head_scale": float(cfg_flat.get("head_scale", 1.0)),
        "class_names": summary["class_names"],
        "classes_per_task": per_task,
        "input": {"channels": len(mean)},
    }
    model = _check_weights(info, state, str(out / MODEL_NAME))
    model.load_state_dict(state)
    return write_bundle(
        out,
        model,
        config_flat=cfg_flat,
        class_names=summary["class_names"],
        classes_per_task=per_task,
        mean=mean,
        std=std,
        in_channels=len(mean),
        image_size=size,
        frames=frames,
        metrics=run_metrics(summary),
        normalisation_source=source,
    )


# ------------------------------------------------------------------ helpers


def _architecture(config_flat: dict[str, Any]) -> str:
    from fl_ci.models import model_for

    try:
        return model_for(
            str(config_flat.get("dataset", "")), str(config_flat.get("model", "auto"))
        )
    except ValueError as err:
        raise BundleError(f"config keys 'dataset'/'model': {err}") from None


def _head_kind(model: IncrementalNet) -> str:
    if isinstance(model.head, CosineHead):
        return "cosine"
    if isinstance(model.head, LinearHead):
        return "linear"
    raise BundleError(f"unknown head type {type(model.head).__name__}")


def _check_info(info: Any, where: Path) -> None:
    """Every field `load_bundle` needs is there and consistent; else name the key."""

    def bad(key: str, why: str) -> BundleError:
        return BundleError(f"{where}: key {key!r} {why}")

    if not isinstance(info, dict):
        raise BundleError(f"{where} is not a JSON object")
    if info.get("format") != FORMAT_VERSION:
        raise bad("format", f"is {info.get('format')!r}, expected {FORMAT_VERSION}")
    for key in ("architecture", "head", "class_names", "classes_per_task", "input"):
        if key not in info:
            raise bad(key, "is missing")
    if info["architecture"] not in MODEL_NAMES:
        raise bad("architecture", f"is {info['architecture']!r}, not in {MODEL_NAMES}")
    if info["head"] not in HEAD_NAMES:
        raise bad("head", f"is {info['head']!r}, not in {HEAD_NAMES}")
    names = info["class_names"]
    if (
        not isinstance(names, list)
        or not names
        or not all(isinstance(c, str) and c for c in names)
        or len(set(names)) != len(names)
    ):
        raise bad("class_names", f"must be distinct non-empty names, got {names!r}")
    per_task = info["classes_per_task"]
    if (
        not isinstance(per_task, list)
        or not per_task
        or not all(isinstance(k, int) and k >= 1 for k in per_task)
    ):
        raise bad("classes_per_task", f"must be positive counts, got {per_task!r}")
    if sum(per_task) != len(names):
        raise bad(
            "classes_per_task",
            f"adds up to {sum(per_task)} classes but class_names has {len(names)}",
        )
    if "num_classes" in info and info["num_classes"] != len(names):
        raise bad(
            "num_classes", f"is {info['num_classes']}, class_names has {len(names)}"
        )
    inp = info["input"]
    if not isinstance(inp, dict):
        raise bad("input", "must be an object")
    for key in ("channels", "image_size", "frames"):
        if not isinstance(inp.get(key), int) or inp[key] < 1:
            raise bad(
                f"input.{key}", f"must be a positive integer, got {inp.get(key)!r}"
            )
    for key in ("mean", "std"):
        values = inp.get(key)
        if (
            not isinstance(values, list)
            or len(values) != inp["channels"]
            or not all(isinstance(v, int | float) and math.isfinite(v) for v in values)
        ):
            raise bad(
                f"input.{key}",
                f"must be {inp['channels']} number(s) (one per channel), got {values!r}",
            )
    if any(v <= 0 for v in inp["std"]):
        raise bad("input.std", f"must be positive, got {inp['std']!r}")
    if not isinstance(info.get("weights", {}), dict):
        raise bad("weights", "must be an object")


def _build(info: dict[str, Any]) -> IncrementalNet:
    """The architecture the description names, head grown task by task as in a run
    (row counts of old and new classes included); weights are loaded afterwards."""
    per_task = info["classes_per_task"]
    with torch.random.fork_rng(devices=[]):  # the caller's random state is untouched
        model = build_model(
            info["architecture"],
            num_classes=per_task[0],
            in_channels=int(info["input"]["channels"]),
            head=info["head"],
            head_scale=float(info.get("head_scale", 1.0)),
        )
        for k in per_task[1:]:
            model.grow(k)
    return model


def _check_weights(
    info: dict[str, Any], state: dict[str, Tensor], source: str
) -> IncrementalNet:
    """The model `info` describes, if `state` fits it; else a BundleError that says
    what differs (classes, input channels, keys or shapes)."""
    model = _build(info)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    names = info["class_names"]
    rows = [
        state[k].shape[0]
        for k in ("head.old_weight", "head.new_weight")
        if k in state and state[k].dim() == 2
    ]
    if len(rows) == 2 and sum(rows) != len(names):
        raise BundleError(
            f"{source} has {sum(rows)} classes in its head but the bundle names "
            f"{len(names)} ({', '.join(names)})"
        )
    stem = next((k for k, shape in expected.items() if len(shape) == 4), None)
    if stem in state and state[stem].dim() == 4:
        want, got = expected[stem][1], state[stem].shape[1]
        if want != got:
            raise BundleError(
                f"{source} takes {got} input channel(s) but the bundle says {want}"
            )
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = [
        f"{k}: {tuple(state[k].shape)} in the weights, {expected[k]} expected"
        for k in expected
        if k in state and tuple(state[k].shape) != expected[k]
    ]
    problems = []
    if missing:
        problems.append(f"missing keys {missing[:5]}{' ...' * (len(missing) > 5)}")
    if unexpected:
        problems.append(
            f"unexpected keys {unexpected[:5]}{' ...' * (len(unexpected) > 5)}"
        )
    if shapes:
        problems.append(f"other shapes ({'; '.join(shapes[:5])})")
    if problems:
        raise BundleError(
            f"{source} does not fit a {info['architecture']} with a {info['head']} "
            f"head and tasks {info['classes_per_task']}: {', '.join(problems)}"
        )
    return model


def _read_state(path: Path) -> dict[str, Tensor]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unreadable file gets one message
        raise BundleError(
            f"{path} cannot be read as a state dict ({type(err).__name__}: {err})"
        ) from None
    if not isinstance(state, dict) or not all(
        isinstance(v, Tensor) for v in state.values()
    ):
        raise BundleError(f"{path} is not a state dict (name -> tensor)")
    return state


def _run_weights(out: Path, cfg_flat: dict[str, Any], tasks: int) -> dict[str, Tensor]:
    """model.pt, else the final model in checkpoint.pt (single-machine runs)."""
    if (out / MODEL_NAME).exists():
        return _read_state(out / MODEL_NAME)
    ckpt = out / "checkpoint.pt"
    if not ckpt.exists():
        raise BundleError(f"{out} has neither {MODEL_NAME} nor checkpoint.pt")
    try:
        state = torch.load(ckpt, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001
        raise BundleError(
            f"{ckpt} cannot be read ({type(err).__name__}: {err})"
        ) from None
    from fl_ci.config import Config, ConfigError

    try:
        rounds = Config.from_flat(cfg_flat).first_round(tasks) - 1  # the last round
    except ConfigError as err:
        raise BundleError(f"{out}: the run's config cannot be read ({err})") from None
    if not isinstance(state, dict) or not isinstance(state.get("model"), dict):
        raise BundleError(f"{ckpt} holds no model")
    if state.get("server_round") != rounds:
        raise BundleError(
            f"{ckpt} is from round {state.get('server_round')} of {rounds}: the run "
            "has not finished"
        )
    return state["model"]


def _run_input_shape(cfg_flat: dict[str, Any]) -> tuple[int, int]:
    """(image size, frames) the run's data had (as fl_ci.data.registry loads it)."""
    if cfg_flat.get("dataset") == "cifar100":
        return 32, 1
    size = int(cfg_flat.get("data.image_size") or 64)
    return size, int(cfg_flat.get("data.frames", 1))


def _recompute_normalisation(
    cfg_flat: dict[str, Any], summary_path: Path
) -> tuple[tuple[float, ...], tuple[float, ...], int, int]:
    """(mean, std, image size, frames) of the run's training data, loaded again."""
    from fl_ci.config import Config, ConfigError
    from fl_ci.data.base import DataError
    from fl_ci.experiment import Experiment

    try:
        train = Experiment.from_config(Config.from_flat(cfg_flat)).splits.train
    except (ConfigError, DataError, OSError) as err:
        raise BundleError(
            f"{summary_path} records no normalisation and the run's data cannot be "
            f"loaded again ({err}); pass mean and std (fl-ci bundle --mean --std)"
        ) from None
    return train.mean, train.std, train.size, int(train.frames.shape[1])
