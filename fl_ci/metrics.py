"""Continual-learning metrics over an accuracy matrix, and plain accuracies.

R is a [T, T] array with R[i, j] = accuracy (percent) on task j's test data after
training task i; entries with j > i are NaN. Tasks are counted from 0.

- A_k = mean_{j <= k} R[k, j]                        (accuracy after task k)
- final accuracy = A_{T-1}
- average incremental accuracy = mean_k A_k          (Rebuffi et al. 2017; k = 0 too)
- backward transfer = mean_{i < T-1} (R[T-1, i] - R[i, i])   (Lopez-Paz & Ranzato 2017)
- forgetting = mean_{j < T-1} (max_{j <= l < T-1} R[l, j] - R[T-1, j])
  (Chaudhry et al. 2018; not clipped at 0. Avalanche instead subtracts from the first
  accuracy R[j, j], which can differ.)

With a single task there is nothing to transfer or forget: backward transfer and
forgetting are 0.0, not NaN, so a one-task run still summarises to numbers.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np


def _matrix(R: Any) -> np.ndarray:
    m = np.asarray(R, dtype=np.float64)
    if m.ndim != 2 or m.shape[0] != m.shape[1] or m.shape[0] == 0:
        raise ValueError(
            f"accuracy matrix must be square [T, T], T >= 1; got {m.shape}"
        )
    return m


def accuracy_after_tasks(R: Any) -> np.ndarray:
    """A_k = mean over seen tasks j <= k of R[k, j]; returns [T]."""
    m = _matrix(R)
    return np.array([m[k, : k + 1].mean() for k in range(m.shape[0])])


def final_accuracy(R: Any) -> float:
    """A_{T-1}: mean accuracy over all tasks after the last one."""
    return float(accuracy_after_tasks(R)[-1])


def mean_over_tasks(per_task: Any) -> float:
    """Mean of one row of R (accuracy on each task's classes), leaving out tasks
    with no image in the split evaluated (NaN); NaN if none has one."""
    row = np.asarray(per_task, dtype=np.float64)
    row = row[np.isfinite(row)]
    return float(row.mean()) if row.size else math.nan


def average_incremental_accuracy(R: Any) -> float:
    """Mean of A_k over all tasks, the first included."""
    return float(accuracy_after_tasks(R).mean())


def backward_transfer(R: Any) -> float:
    """BWT = mean_{i < T-1} (R[T-1, i] - R[i, i]); 0.0 for T = 1."""
    m = _matrix(R)
    t = m.shape[0]
    if t == 1:
        return 0.0
    idx = np.arange(t - 1)
    return float((m[t - 1, idx] - m[idx, idx]).mean())


def forgetting(R: Any) -> float:
    """Chaudhry forgetting: mean_{j < T-1} (max_{j<=l<T-1} R[l, j] - R[T-1, j])."""
    m = _matrix(R)
    t = m.shape[0]
    if t == 1:
        return 0.0
    drops = [m[j : t - 1, j].max() - m[t - 1, j] for j in range(t - 1)]
    return float(np.mean(drops))


def summarize(R: Any) -> dict[str, Any]:
    """All matrix metrics in one JSON-friendly dict."""
    return {
        "accuracy_after_tasks": accuracy_after_tasks(R).tolist(),
        "final_accuracy": final_accuracy(R),
        "average_incremental_accuracy": average_incremental_accuracy(R),
        "backward_transfer": backward_transfer(R),
        "forgetting": forgetting(R),
    }


def _predictions(logits_or_predictions: Any) -> np.ndarray:
    # Accept torch tensors without importing torch here.
    x = logits_or_predictions
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    x = np.asarray(x)
    if x.ndim == 2:
        return x.argmax(axis=1)
    if x.ndim != 1:
        raise ValueError(f"expected logits [N, K] or predictions [N], got {x.shape}")
    return x


def _labels(labels: Any) -> np.ndarray:
    if hasattr(labels, "detach"):
        labels = labels.detach().cpu().numpy()
    return np.asarray(labels).reshape(-1)


def accuracy(logits_or_predictions: Any, labels: Any) -> float:
    """Top-1 accuracy in percent; logits [N, K] are arg-maxed. NaN if N = 0."""
    pred = _predictions(logits_or_predictions)
    y = _labels(labels)
    if pred.shape != y.shape:
        raise ValueError(f"{pred.shape[0]} predictions for {y.shape[0]} labels")
    if y.size == 0:
        return float("nan")
    return float((pred == y).mean() * 100.0)


def per_class_accuracy(
    logits_or_predictions: Any, labels: Any, num_classes: int | None = None
) -> np.ndarray:
    """Accuracy in percent per class [C]; NaN for classes without test samples."""
    pred = _predictions(logits_or_predictions)
    y = _labels(labels).astype(np.int64)
    if num_classes is None:
        num_classes = int(y.max()) + 1 if y.size else 0
    correct = np.bincount(y[pred == y], minlength=num_classes)[:num_classes]
    total = np.bincount(y, minlength=num_classes)[:num_classes]
    out = np.full(num_classes, np.nan)
    seen = total > 0
    out[seen] = correct[seen] / total[seen] * 100.0
    return out


def old_new_accuracy(
    logits_or_predictions: Any, labels: Any, n_old: int
) -> tuple[float, float]:
    """(accuracy on samples with label < n_old, on the rest), percent; NaN if none."""
    pred = _predictions(logits_or_predictions)
    y = _labels(labels)
    old = y < n_old
    return accuracy(pred[old], y[old]), accuracy(pred[~old], y[~old])


def accuracy_from_counts(
    correct: Any, total: Any, tasks: list[list[int]], task: int
) -> dict[str, Any]:
    """One row of R and the old/new split from per-class counts after `task`.

    `correct[c]` and `total[c]` count class c's test predictions (summed over sites
    in federated evaluation). Accuracy over a set of classes is the share of its
    images predicted right (micro average): per task j <= `task`, over all classes
    seen, over the old classes (before `task`) and the new ones; NaN where a set has
    no image.
    """
    correct = np.asarray(correct, dtype=np.int64)
    total = np.asarray(total, dtype=np.int64)

    def share(classes: list[int]) -> float:
        n = int(total[classes].sum()) if classes else 0
        return 100.0 * int(correct[classes].sum()) / n if n else float("nan")

    seen = [c for t in tasks[: task + 1] for c in t]
    n_old = tasks[task][0]
    return {
        "per_task": [share(list(t)) for t in tasks[: task + 1]],
        "accuracy": share(seen),
        "old_accuracy": share([c for c in seen if c < n_old]),
        "new_accuracy": share([c for c in seen if c >= n_old]),
        "examples": int(total[seen].sum()),
    }
