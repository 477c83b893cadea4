"""Where the old classes go at one task: replay fit, transfer, head bias, drift.

For a task t >= 1 with old classes 0..n_old-1 and new classes n_old..K-1, given the
teacher (the global model after task t-1), the student (after task t), the
impressions the site replayed and the real validation images of every class seen:

| measure                    | question it answers                                  |
|----------------------------|------------------------------------------------------|
| `teacher_on_impressions`   | do the impressions carry their class for the teacher? |
| `student_on_impressions`   | did the student fit the replay?                      |
| `teacher_on_old`           | what there was to keep (teacher, real old images)     |
| `student_on_old`           | what was kept (student, real old images, all classes) |
| `student_on_old_among_old` | the same with the new classes' scores masked: the     |
|                            | old classes' features and rows alone                  |
| `old_to_new`               | share of real old images called a new class (head     |
|                            | bias)                                                 |
| `old_to_old`               | share called another old class (feature drift)        |
| `feature_cosine`           | mean cos(φ_teacher(x), φ_student(x)) on real old images |
| `impression_gap`           | mean over old classes of 1 − cos between the          |
|                            | teacher's feature centroid of its impressions and of  |
|                            | its real images (the synthetic-real domain gap)       |
| `student_on_new`           | real new-class images, all classes                    |

All accuracies and shares are percentages of images. `old_to_new + old_to_old +
student_on_old = 100`.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from fl_ci.data.base import ImageData, batches
from fl_ci.models import IncrementalNet

MEASURES = (
    "teacher_on_impressions",
    "student_on_impressions",
    "teacher_on_old",
    "student_on_old",
    "student_on_old_among_old",
    "old_to_new",
    "old_to_old",
    "feature_cosine",
    "impression_gap",
    "student_on_new",
)


@dataclass
class TaskDiagnosis:
    """The measures of one task (percentages, cosine in [-1, 1], gap in [0, 2])."""

    task: int
    num_old: int
    num_new: int
    impressions: int  # images replayed
    old_images: int  # real old-class validation images
    new_images: int
    teacher_on_impressions: float
    student_on_impressions: float
    teacher_on_old: float
    student_on_old: float
    student_on_old_among_old: float
    old_to_new: float
    old_to_old: float
    feature_cosine: float
    impression_gap: float
    student_on_new: float

    def to_dict(self) -> dict[str, float | int]:
        return asdict(self)


@torch.no_grad()
def _outputs(model: IncrementalNet, inputs: Iterable[Tensor]) -> tuple[Tensor, Tensor]:
    """(features [N, D], logits [N, K]) over batches of normalised images."""
    model.eval()
    feats, logits = [], []
    for x in inputs:
        out = model.forward_all(x)
        feats.append(out.features.float())
        logits.append(out.logits.float())
    if not feats:
        return torch.zeros(0, model.feature_dim), torch.zeros(0, model.num_classes)
    return torch.cat(feats), torch.cat(logits)


def _held_out_batches(data: ImageData) -> Iterator[Tensor]:
    """Held-out images as evaluation reads them (the middle frame of a cine)."""
    return (x for x, _ in batches(data, 256, train=False))


def _pct(hits: Tensor) -> float:
    return float(hits.float().mean() * 100) if hits.numel() else float("nan")


def class_centroid_gap(
    a: Tensor, a_labels: Tensor, b: Tensor, b_labels: Tensor, classes: list[int]
) -> float:
    """Mean over `classes` present in both of 1 − cos(centroid_a(c), centroid_b(c))
    of features a [N, D] and b [M, D]."""
    gaps = []
    for c in classes:
        ma, mb = a_labels == c, b_labels == c
        if ma.any() and mb.any():
            cos = F.cosine_similarity(a[ma].mean(0), b[mb].mean(0), dim=0)
            gaps.append(1.0 - float(cos))
    return sum(gaps) / len(gaps) if gaps else float("nan")


@dataclass
class Outputs:
    """One model's features [N, D] and logits [N, K] on a set of images."""

    features: Tensor
    logits: Tensor


def diagnosis_from_outputs(
    task: int,
    num_old: int,
    impression_labels: Tensor,
    teacher_on_impressions: Outputs,
    student_on_impressions: Outputs,
    val_labels: Tensor,
    teacher_on_val: Outputs,
    student_on_val: Outputs,
) -> TaskDiagnosis:
    """The measures of the module docstring from the models' outputs: the teacher's
    logits cover the `num_old` old classes, the student's every class seen."""
    imp_labels = impression_labels.long()
    labels = val_labels.long()
    k = student_on_val.logits.shape[1]
    old = labels < num_old  # [M] real old-class images
    s_logits = student_on_val.logits
    s_pred = s_logits.argmax(1)  # [M]
    old_pred, old_labels = s_pred[old], labels[old]
    among_old = s_logits[old][:, :num_old].argmax(1)
    cosine = F.cosine_similarity(
        teacher_on_val.features[old], student_on_val.features[old], dim=1
    )
    return TaskDiagnosis(
        task=task,
        num_old=num_old,
        num_new=k - num_old,
        impressions=len(imp_labels),
        old_images=int(old.sum()),
        new_images=int((~old).sum()),
        teacher_on_impressions=_pct(
            teacher_on_impressions.logits.argmax(1) == imp_labels
        ),
        student_on_impressions=_pct(
            student_on_impressions.logits.argmax(1) == imp_labels
        ),
        teacher_on_old=_pct(teacher_on_val.logits[old].argmax(1) == old_labels),
        student_on_old=_pct(old_pred == old_labels),
        student_on_old_among_old=_pct(among_old == old_labels),
        old_to_new=_pct(old_pred >= num_old),
        old_to_old=_pct((old_pred < num_old) & (old_pred != old_labels)),
        feature_cosine=float(cosine.mean()) if cosine.numel() else float("nan"),
        impression_gap=class_centroid_gap(
            teacher_on_impressions.features,
            imp_labels,
            teacher_on_val.features[old],
            old_labels,
            list(range(num_old)),
        ),
        student_on_new=_pct(s_pred[~old] == labels[~old]),
    )


def diagnose_task(
    task: int,
    teacher: IncrementalNet,
    student: IncrementalNet,
    impressions: Tensor,
    impression_labels: Tensor,
    val: ImageData,
    num_old: int,
) -> TaskDiagnosis:
    """The measures of the module docstring for one task. `impressions` [N, C, H, W]
    are normalised as the site replayed them; `val` holds real validation images of
    every class seen after the task (old and new), read as evaluation reads them."""
    return diagnosis_from_outputs(
        task,
        num_old,
        impression_labels,
        Outputs(*_outputs(teacher, impressions.split(256))),
        Outputs(*_outputs(student, impressions.split(256))),
        val.labels,
        Outputs(*_outputs(teacher, _held_out_batches(val))),
        Outputs(*_outputs(student, _held_out_batches(val))),
    )
