import json
import math
from pathlib import Path

import numpy as np

from fl_ci.results import (
    format_table,
    plot_accuracy,
    plot_matrix,
    read_metrics,
    write_json,
    write_metrics,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_metrics_parquet_round_trip_with_mixed_values(tmp_path: Path) -> None:
    rows = [
        {"round": 1, "task": 0, "acc": 50, "split": "val"},
        {"round": 2, "task": 0, "acc": 62.5, "split": None, "loss": 1.25},
    ]
    path = write_metrics(rows, tmp_path / "metrics.parquet")
    back = read_metrics(path)
    assert back == [
        {"round": 1, "task": 0, "acc": 50.0, "split": "val", "loss": None},
        {"round": 2, "task": 0, "acc": 62.5, "split": None, "loss": 1.25},
    ]


def test_metrics_int_column_stays_int(tmp_path: Path) -> None:
    path = write_metrics([{"round": np.int64(3)}], tmp_path / "m.parquet")
    value = read_metrics(path)[0]["round"]
    assert value == 3 and isinstance(value, int)


def test_metrics_column_mixing_numbers_and_text_becomes_text(tmp_path: Path) -> None:
    path = write_metrics([{"x": 1}, {"x": "a"}], tmp_path / "m.parquet")
    assert [r["x"] for r in read_metrics(path)] == ["1", "a"]


def test_write_leaves_no_temp_files(tmp_path: Path) -> None:
    write_metrics([{"a": 1}], tmp_path / "metrics.parquet")
    write_json({"a": 1}, tmp_path / "summary.json")
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "metrics.parquet",
        "summary.json",
    ]


def test_json_round_trip_numpy_and_nan(tmp_path: Path) -> None:
    obj = {
        "R": np.array([[90.0, np.nan], [85.0, 80.0]]),
        "final": np.float64(82.5),
        "n": np.int64(2),
        "bwt": float("nan"),
        "name": "run",
    }
    path = write_json(obj, tmp_path / "summary.json")
    back = json.loads(path.read_text())
    assert back == {
        "R": [[90.0, None], [85.0, 80.0]],
        "final": 82.5,
        "n": 2,
        "bwt": None,
        "name": "run",
    }


def test_json_file_is_strict_json(tmp_path: Path) -> None:
    path = write_json({"x": float("inf")}, tmp_path / "s.json")
    assert "Infinity" not in path.read_text()


def test_plot_accuracy_writes_png(tmp_path: Path) -> None:
    curves = {
        "ours": ([10, 20, 30], [90.0, 80.0, 70.0]),
        "ft": ([10, 20], [90.0, 40.0]),
    }
    path = plot_accuracy(curves, tmp_path / "acc.png", "CIFAR-100")
    data = path.read_bytes()
    assert len(data) > 1000 and data.startswith(PNG_MAGIC)


def test_plot_matrix_writes_png(tmp_path: Path) -> None:
    R = np.array([[90.0, np.nan], [85.0, 80.0]])
    path = plot_matrix(R, tmp_path / "matrix.png", task_labels=["t0", "t1"])
    data = path.read_bytes()
    assert len(data) > 1000 and data.startswith(PNG_MAGIC)


def test_format_table_exact() -> None:
    rows = [
        {"method": "ours", "final": 76.666, "n": 3},
        {"method": "a|b", "final": math.nan},
    ]
    assert format_table(rows, ["method", "final", "n"]) == (
        "| method | final | n |\n"
        "| --- | --- | --- |\n"
        "| ours | 76.67 | 3 |\n"
        "| a\\|b | n/a |  |"
    )
