"""The diagnostic of where old classes go (fl_ci/diagnose.py), on hand-made outputs,
and `python -m simulations.diagnose` on a real tiny run."""

import json
import math

import pytest
import torch

from fl_ci.diagnose import Outputs, class_centroid_gap, diagnosis_from_outputs
from simulations.__main__ import main as run_main
from simulations.diagnose import main as diagnose_main

# 2 old classes (0, 1), 1 new (2); 4 impressions, 6 real validation images
IMP_LABELS = torch.tensor([0, 0, 1, 1])
TEACHER_IMP = Outputs(
    features=torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]]),
    logits=torch.tensor([[2.0, 0.0], [0.0, 2.0], [0.0, 2.0], [0.0, 2.0]]),  # 3 of 4
)
STUDENT_IMP = Outputs(
    features=torch.zeros(4, 2),
    logits=torch.tensor(  # all 4 right
        [[2.0, 0.0, 0.0], [2.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, 2.0, 0.0]]
    ),
)
VAL_LABELS = torch.tensor([0, 0, 1, 1, 2, 2])
TEACHER_VAL = Outputs(
    features=torch.tensor(
        [[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0], [1.0, 1.0], [1.0, 1.0]]
    ),
    logits=torch.tensor(  # old images: all 4 right
        [[2.0, 0.0], [2.0, 0.0], [0.0, 2.0], [0.0, 2.0], [1.0, 0.0], [1.0, 0.0]]
    ),
)
STUDENT_VAL = Outputs(
    # old images' features: same, orthogonal, same, opposite -> cosines 1, 0, 1, -1
    features=torch.tensor(
        [[2.0, 0.0], [0.0, 1.0], [0.0, 3.0], [0.0, -1.0], [1.0, 1.0], [1.0, 1.0]]
    ),
    logits=torch.tensor(
        [
            [3.0, 0.0, 1.0],  # 0 -> 0 right
            [0.0, 1.0, 5.0],  # 0 -> new (among old rows: 1, wrong)
            [0.0, 1.0, 4.0],  # 1 -> new (among old rows: 1, right)
            [2.0, 1.0, 0.0],  # 1 -> 0, another old class
            [0.0, 0.0, 1.0],  # 2 right
            [1.0, 0.0, 0.0],  # 2 -> 0
        ]
    ),
)


def diagnosis():
    return diagnosis_from_outputs(
        1,
        2,
        IMP_LABELS,
        TEACHER_IMP,
        STUDENT_IMP,
        VAL_LABELS,
        TEACHER_VAL,
        STUDENT_VAL,
    )


def test_replay_fit_is_accuracy_on_impressions():
    d = diagnosis()
    assert d.teacher_on_impressions == 75.0
    assert d.student_on_impressions == 100.0


def test_transfer_is_accuracy_on_real_old_images():
    d = diagnosis()
    assert (d.teacher_on_old, d.student_on_old, d.student_on_new) == (100, 25, 50)
    assert (d.old_images, d.new_images, d.impressions) == (4, 2, 4)


def test_lost_old_images_split_into_head_bias_and_drift():
    d = diagnosis()
    assert d.old_to_new == 50.0  # images 1 and 2
    assert d.old_to_old == 25.0  # image 3
    assert d.student_on_old + d.old_to_new + d.old_to_old == 100.0
    assert d.student_on_old_among_old == 50.0  # new scores masked: images 0 and 2


def test_feature_cosine_is_mean_over_old_images():
    assert math.isclose(diagnosis().feature_cosine, (1 + 0 + 1 - 1) / 4)


def test_impression_gap_compares_class_centroids():
    # class 0: impressions' centroid (1, 0), real (1, 0): gap 0; class 1: (0, 1) both
    assert diagnosis().impression_gap == pytest.approx(0.0)
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    b = torch.tensor([[0.0, 1.0], [0.0, 1.0]])
    labels = torch.tensor([0, 1])
    # class 0: orthogonal (gap 1); class 1: same (gap 0); class 2 absent: skipped
    assert class_centroid_gap(a, labels, b, labels, [0, 1, 2]) == pytest.approx(0.5)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("diag") / "run"
    code = run_main(
        [
            "echo-paper",
            "--out",
            str(out),
            "--quiet",
            "--set",
            "tasks=2",
            "--set",
            "init_classes=4",
            "--set",
            "data.patients=6",
            "--set",
            "data.image_size=32",
            "--set",
            "data.frames=2",
            "--set",
            "local_epochs=1",
            "--set",
            "base_epochs=1",
            "--set",
            "synthesis.iterations=4",
            "--set",
            "synthesis.per_class=3",
        ]
    )
    assert code == 0
    return out


def test_command_writes_table_and_plot_per_task(tiny_run, capsys):
    assert (tiny_run / "tasks" / "model-task0.pt").exists()
    assert diagnose_main([str(tiny_run)]) == 0
    printed = capsys.readouterr().out
    assert "real old called new" in printed
    rows = json.loads((tiny_run / "diagnosis.json").read_text())
    assert [r["task"] for r in rows] == [1]
    assert rows[0]["num_old"] == 4 and rows[0]["impressions"] == 4 * 3
    total = rows[0]["student_on_old"] + rows[0]["old_to_new"] + rows[0]["old_to_old"]
    assert total == pytest.approx(100.0)
    assert (tiny_run / "diagnosis.png").stat().st_size > 0


def test_command_names_the_missing_task_model(tiny_run, tmp_path, capsys):
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(tiny_run, copy)
    (copy / "tasks" / "model-task0.pt").unlink()
    assert diagnose_main([str(copy)]) == 2
    assert "model-task0.pt not found" in capsys.readouterr().err
