"""A run's state after its last completed round, so a crashed run can resume.

`out/checkpoint.pt` holds the global model, the teacher, the shared class means, the
position (last completed server round), the recorder's rows and accuracy matrix, the
run's flat config and the process's global random states. It is written after every
round to a temporary file that replaces the old one only once complete, so a crash
mid-write leaves the previous round's checkpoint. Loading uses `weights_only=True`:
a checkpoint holds tensors and plain values only, never code.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fl_ci.config import Config, ConfigError
from fl_ci.models import IncrementalNet
from fl_ci.plan import StudyPlan
from fl_ci.recorder import Recorder
from fl_ci.results import atomic_torch_save
from fl_ci.synthesis import ClassMeans

CHECKPOINT_NAME = "checkpoint.pt"
FORMAT_VERSION = 2  # 2: the sites' own test accuracies
# keys that may change between a run and its resumption: where and how fast it runs,
# not what it computes
OPERATIONAL_KEYS = frozenset(
    {
        "device",
        "federation.timeout",
        "federation.cpus_per_site",
        "federation.gpus_per_site",
    }
)


class CheckpointError(ConfigError):
    """A checkpoint cannot be resumed (unreadable, or another run's); names the file."""


class RunStopped(RuntimeError):
    """A run stopped on purpose after a checkpointed round (the `stop_after_round`
    test switch), as a crash there would."""


@dataclass
class Resumed:
    """What a runner needs to carry on after `server_round` (1-based, completed)."""

    server_round: int
    model: IncrementalNet
    teacher: IncrementalNet | None
    means: ClassMeans | None


def checkpoint_path(out: str | Path) -> Path:
    return Path(out) / CHECKPOINT_NAME


def save_checkpoint(
    out: str | Path,
    *,
    cfg: Config,
    server_round: int,
    model: IncrementalNet,
    teacher: IncrementalNet | None,
    means: ClassMeans | None,
    recorder: Recorder,
) -> Path:
    """Write the state after `server_round` atomically; returns the file's path."""
    state = {
        "format": FORMAT_VERSION,
        "config": cfg.to_flat(),
        "server_round": int(server_round),
        "model": _cpu_state(model),
        "teacher": _cpu_state(teacher) if teacher is not None else None,
        "means": {k: torch.from_numpy(v) for k, v in means.to_arrays().items()}
        if means is not None
        else None,
        "recorder": _recorder_state(recorder),
        "rng": _rng_state(),
        "saved_at": time.time(),
    }
    path = checkpoint_path(out)
    atomic_torch_save(state, path)
    return path


def end_of_round(
    out: str | Path,
    *,
    cfg: Config,
    server_round: int,
    model: torch.nn.Module,
    teacher: torch.nn.Module | None,
    means: Any,
    recorder: Any,
    stop_after_round: int = 0,
) -> None:
    """Checkpoint a completed round; stop there if `stop_after_round` asks for it."""
    save_checkpoint(
        out,
        cfg=cfg,
        server_round=server_round,
        model=model,
        teacher=teacher,
        means=means,
        recorder=recorder,
    )
    if server_round == stop_after_round:
        raise RunStopped(
            f"stopped after round {server_round} (stop-after-round); run again with "
            f"the same output folder {out} to resume"
        )


def load_checkpoint(out: str | Path, cfg: Config) -> dict[str, Any] | None:
    """The checkpoint in `out` if there is one, checked against `cfg`; else None."""
    path = checkpoint_path(out)
    if not path.exists():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unreadable file gets one message
        raise CheckpointError(
            f"{path} cannot be read ({type(err).__name__}: {err}); delete it to start "
            "afresh or choose another output folder"
        ) from None
    if not isinstance(state, dict) or state.get("format") != FORMAT_VERSION:
        raise CheckpointError(
            f"{path} is not a checkpoint of format {FORMAT_VERSION}; delete it to "
            "start afresh or choose another output folder"
        )
    saved, now = state["config"], cfg.to_flat()
    differ = sorted(
        k
        for k in set(saved) | set(now)
        if k not in OPERATIONAL_KEYS and saved.get(k) != now.get(k)
    )
    if differ:
        shown = ", ".join(
            f"{k} = {saved.get(k)!r} there, {now.get(k)!r} now" for k in differ[:5]
        )
        raise CheckpointError(
            f"{path} belongs to a run with a different config ({shown}"
            f"{', ...' if len(differ) > 5 else ''}); use the same config to resume, "
            "or another output folder"
        )
    return state


def restore(state: dict[str, Any], plan: StudyPlan, recorder: Recorder) -> Resumed:
    """Rebuild model, teacher and means from `state`; refill `recorder`; set the
    global random states as they were after the checkpointed round."""
    done = int(state["server_round"])
    task = plan.cfg.task_of_round(done)
    model = plan.model_at_task(task)
    model.load_state_dict(state["model"])
    teacher = None
    if state["teacher"] is not None:
        teacher = plan.model_at_task(task - 1)
        teacher.load_state_dict(state["teacher"])
        teacher.eval()
    means = None
    if state["means"] is not None:
        means = ClassMeans.from_arrays(
            {k: v.numpy() for k, v in state["means"].items()}
        )
    rec = state["recorder"]
    recorder.rows = list(rec["rows"])
    recorder.matrix = rec["matrix"].numpy().copy()
    recorder.task_results = list(rec["task_results"])
    recorder.elapsed_before = float(rec["elapsed"])
    recorder.site_accuracy = {k: list(v) for k, v in rec["site_accuracy"].items()}
    recorder.server_matrix = rec["server_matrix"].numpy().copy()
    recorder.started = time.time()
    _set_rng_state(state["rng"])
    return Resumed(done, model, teacher, means)


def _cpu_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def _plain(value: Any) -> Any:
    """Numpy scalars and arrays as Python values and tensors (weights_only loads)."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return torch.from_numpy(value.copy())
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _recorder_state(recorder: Recorder) -> dict[str, Any]:
    return {
        "rows": _plain(recorder.rows),
        "matrix": torch.from_numpy(np.asarray(recorder.matrix, dtype=np.float64)),
        "task_results": _plain(recorder.task_results),
        "elapsed": recorder.elapsed_before + time.time() - recorder.started,
        "site_accuracy": _plain(recorder.site_accuracy),
        "server_matrix": torch.from_numpy(
            np.asarray(recorder.server_matrix, dtype=np.float64)
        ),
    }


def _rng_state() -> dict[str, Any]:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "numpy": [
            kind,
            torch.from_numpy(keys.astype(np.int64)),
            pos,
            has_gauss,
            cached,
        ],
        "python": random.getstate(),
    }


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
