"""Run outputs: metrics table (Parquet), summary (JSON), plots (PNG), Markdown tables.

Every file is written atomically: to a temporary file in the target directory, then
`os.replace`d into place, so a crashed or killed run never leaves a half-written file.
Plots use matplotlib's object API (Figure + Agg canvas), so the global pyplot backend
is never touched.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq


def atomic_write(path: str | os.PathLike[str], write: Callable[[str], None]) -> Path:
    """Call write(tmp_path) on a temp file beside `path`, then rename it into place."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(
        dir=target.parent, prefix=f".{target.name}.", suffix=".tmp"
    )
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


def atomic_torch_save(obj: Any, path: str | os.PathLike[str]) -> Path:
    """`torch.save`, synced to disk, through `atomic_write`: a crash leaves the old file."""
    import torch

    def save(tmp: str) -> None:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())  # the rename must never expose unwritten bytes

    return atomic_write(path, save)


# ---------------------------------------------------------------- metrics.parquet


def _column(values: list[Any]) -> pa.Array:
    # One Arrow type per column: bool, int64, float64 (ints and floats mixed), else
    # string (anything else mixed in is stringified). None is null in every type.
    present = [v for v in values if v is not None]
    present = [v.item() if isinstance(v, np.generic) else v for v in present]
    values = [v.item() if isinstance(v, np.generic) else v for v in values]
    if present and all(isinstance(v, bool) for v in present):
        return pa.array(values, type=pa.bool_())
    if present and all(isinstance(v, int) and not isinstance(v, bool) for v in present):
        return pa.array(values, type=pa.int64())
    if all(isinstance(v, int | float) and not isinstance(v, bool) for v in present):
        return pa.array(
            [None if v is None else float(v) for v in values], type=pa.float64()
        )
    return pa.array([None if v is None else str(v) for v in values], type=pa.string())


def write_metrics(rows: list[dict[str, Any]], path: str | os.PathLike[str]) -> Path:
    """Write rows (one per round and evaluation) to Parquet, columns = union of keys.

    Columns appear in first-seen order; a key missing from a row is null there.
    An all-null column is float64.
    """
    columns: dict[str, None] = {}
    for row in rows:
        columns.update(dict.fromkeys(row))
    table = pa.table(
        {name: _column([row.get(name) for row in rows]) for name in columns}
    )
    return atomic_write(path, lambda tmp: pq.write_table(table, tmp))


def read_metrics(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Read a metrics Parquet file back as a list of row dicts."""
    return pq.read_table(path).to_pylist()


# ---------------------------------------------------------------- summary.json


def to_jsonable(obj: Any) -> Any:
    """Convert numpy/torch values, dataclasses, paths to JSON types; NaN/inf -> None."""
    if isinstance(obj, float | np.floating):
        value = float(obj)
        return value if math.isfinite(value) else None
    if isinstance(obj, bool | int | str) or obj is None:
        return obj
    if isinstance(obj, np.generic):
        return to_jsonable(obj.item())
    if isinstance(obj, np.ndarray):
        return to_jsonable(obj.tolist())
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple | set | frozenset):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return to_jsonable(dataclasses.asdict(obj))
    if hasattr(obj, "detach") and hasattr(obj, "tolist"):  # torch.Tensor
        return to_jsonable(obj.detach().cpu().tolist())
    raise TypeError(f"cannot write {type(obj).__name__} to JSON")


def write_json(obj: Any, path: str | os.PathLike[str]) -> Path:
    """Write obj as indented JSON (see `to_jsonable` for what is converted)."""
    text = json.dumps(to_jsonable(obj), indent=2, allow_nan=False) + "\n"
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


# ---------------------------------------------------------------- plots


def _save_png(fig: Any, path: str | os.PathLike[str]) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))


def plot_accuracy(
    curves: dict[str, tuple[Sequence[int], Sequence[float]]],
    path: str | os.PathLike[str],
    title: str = "",
) -> Path:
    """Accuracy (y) against number of classes seen (x), one line per label."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4))
    ax = fig.add_subplot()
    for label, (classes, acc) in curves.items():
        ax.plot(list(classes), list(acc), marker="o", label=label)
    ax.set_xlabel("number of classes seen")
    ax.set_ylabel("accuracy (%)")
    if title:
        ax.set_title(title)
    ax.grid(alpha=0.3)
    if curves:
        ax.legend()
    fig.tight_layout()
    return _save_png(fig, path)


def plot_matrix(
    R: Any,
    path: str | os.PathLike[str],
    task_labels: Sequence[str] | None = None,
    title: str = "",
) -> Path:
    """Heatmap of the accuracy matrix R[i, j] (after task i, on task j), annotated."""
    from matplotlib.figure import Figure

    m = np.asarray(R, dtype=np.float64)
    t = m.shape[0]
    labels = [str(i) for i in range(t)] if task_labels is None else list(task_labels)
    wide = max((len(label) for label in labels), default=1)  # class-name labels
    fig = Figure(figsize=(2.0 + 0.8 * t + 0.06 * wide, 1.5 + 0.6 * t + 0.06 * wide))
    ax = fig.add_subplot()
    image = ax.imshow(np.ma.masked_invalid(m), vmin=0, vmax=100, cmap="viridis")
    for i in range(t):
        for j in range(m.shape[1]):
            if np.isfinite(m[i, j]):
                color = "white" if m[i, j] < 50 else "black"
                ax.text(j, i, f"{m[i, j]:.1f}", ha="center", va="center", color=color)
    ax.set_xticks(range(m.shape[1]), labels[: m.shape[1]], rotation=30, ha="right")
    ax.set_yticks(range(t), labels[:t])
    ax.set_xlabel("evaluated on task")
    ax.set_ylabel("after training task")
    if title:
        ax.set_title(title)
    fig.colorbar(image, ax=ax, label="accuracy (%)")
    fig.tight_layout()
    return _save_png(fig, path)


# ---------------------------------------------------------------- Markdown


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float):
        return "n/a" if math.isnan(value) else f"{value:.2f}"
    return str(value).replace("|", "\\|")


def format_table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    """Markdown table of `columns`; floats to 2 decimals, NaN as n/a, missing blank."""
    lines = [
        "| " + " | ".join(columns) + " |",
        "| " + " | ".join("---" for _ in columns) + " |",
    ]
    for row in rows:
        lines.append("| " + " | ".join(_cell(row.get(c)) for c in columns) + " |")
    return "\n".join(lines)
