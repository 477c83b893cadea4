"""The run report (fl_ci/report.py): one self-contained HTML page of a run folder,
checked on a real small echo-paper run (with its privacy audit) and in headless
Chromium."""

import base64
import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from fl_ci.report import accuracy_by_class, class_tasks, write_report
from simulations.audit import main as audit_main

ROOT = Path(__file__).resolve().parents[1]
DATA_URI = "data:image/png;base64,"


@pytest.fixture(scope="module")
def run_dir(tiny_echo_paper_run, tmp_path_factory):
    """A finished echo-paper run (tests/tiny_runs.py, the session's copy left as it
    is) with its impression audit (audit.md, grids)."""
    out = tmp_path_factory.mktemp("echo-paper")
    shutil.copytree(tiny_echo_paper_run, out, dirs_exist_ok=True)
    assert audit_main([str(out), "--no-features"]) == 0
    return out


@pytest.fixture(scope="module")
def report(run_dir):
    path = write_report(run_dir)
    return path, path.read_text(encoding="utf-8")


def section(html: str, name: str) -> str:
    """The HTML of <section id=name>."""
    match = re.search(rf"<section id={name}>(.*?)</section>", html, re.S)
    assert match, f"no section {name}"
    return match.group(1)


def copy_run(run_dir: Path, dest: Path, *names: str) -> Path:
    dest.mkdir()
    for name in names:
        shutil.copy(run_dir / name, dest / name)
    return dest


# ----- the numbers -------------------------------------------------------------------
def test_each_class_belongs_to_the_task_that_brought_it():
    assert class_tasks([2, 1, 1]) == [0, 0, 1, 2]
    assert class_tasks([]) == []


def test_accuracy_by_class_spreads_each_task_column_over_its_classes():
    # R after task 0: (80); after task 1: (60, 90); classes a, b in task 0, c in 1
    r = [[80.0, None], [60.0, 90.0]]
    got = accuracy_by_class(r, [2, 1])
    want = np.array([[80.0, 80.0, np.nan], [60.0, 60.0, 90.0]])
    np.testing.assert_array_equal(got, want)


def test_accuracy_by_class_refuses_more_tasks_than_the_matrix_has():
    with pytest.raises(ValueError, match="3 tasks"):
        accuracy_by_class([[50.0, None], [40.0, 60.0]], [1, 1, 1])


# ----- a real run --------------------------------------------------------------------
@pytest.mark.slow
def test_report_names_every_class_with_its_accuracy_after_each_task(run_dir, report):
    path, html = report
    assert path == run_dir / "report.html"
    summary = json.loads((run_dir / "summary.json").read_text())
    table = section(html, "by-class")
    for name in summary["class_names"]:
        assert f"<span>{name}</span>" in table
    rows = re.findall(r"<tr><th class=row>after task (\d+)</th>(.*?)</tr>", table)
    assert [int(i) for i, _ in rows] == list(range(summary["tasks_completed"]))
    # the last row: A_k, all seen, then each class at its task's accuracy
    last = [float(v) for v in re.findall(r">(-?\d+\.\d)</td>", rows[-1][1])]
    r = summary["accuracy_matrix"][-1]
    by_class = [r[t] for t in class_tasks(summary["classes_per_task"])]
    want = [summary["accuracy_after_task"][-1], summary["accuracy_all_classes"][-1]]
    assert last == pytest.approx(want + by_class, abs=0.05)


@pytest.mark.slow
def test_report_shows_the_final_accuracy_of_the_summary(run_dir, report):
    _, html = report
    summary = json.loads((run_dir / "summary.json").read_text())
    final = f"{summary['final_accuracy']:.2f}"  # as the run's printed table has it
    cards = re.search(r"<section class=cards>(.*?)</section>", html, re.S).group(1)
    assert f"{final}<small>%</small></div><div class=label>final accuracy" in cards


@pytest.mark.slow
def test_report_is_one_self_contained_file(report):
    _, html = report
    links = re.findall(r"""\b(?:src|href)\s*=\s*['"]?([^'" >]+)""", html)
    assert links and all(link.startswith(DATA_URI) for link in links)
    assert "<link" not in html and "<script" not in html and "url(" not in html
    # every embedded image is a PNG
    for link in links:
        assert base64.b64decode(link[len(DATA_URI) :])[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_report_embeds_the_run_plots_and_the_training_curves(run_dir, report):
    _, html = report
    plots = section(html, "accuracy")
    for name in ("accuracy.png", "accuracy_matrix.png"):
        data = base64.b64encode((run_dir / name).read_bytes()).decode()
        assert f"src='{DATA_URI}{data}'" in plots
    assert section(html, "training").count(DATA_URI) == 2  # accuracy and loss


@pytest.mark.slow
def test_report_shows_the_audit_and_every_impression_grid(run_dir, report):
    _, html = report
    privacy = section(html, "privacy")
    assert "Impression privacy audit" in privacy
    tasks = sorted(
        int(t) for t in re.findall(r"## Task (\d+)", (run_dir / "audit.md").read_text())
    )
    assert tasks and all(f"Task {t}: " in privacy for t in tasks)
    assert "<table>" in privacy  # its Markdown tables became HTML tables
    grids = sorted(run_dir.glob("*impressions*.png"))
    assert len(grids) == len(tasks)
    assert privacy.count(DATA_URI) == len(grids)


@pytest.mark.slow
def test_report_lists_the_config(run_dir, report):
    _, html = report
    config = section(html, "config")
    assert "<h3>synthesis</h3>" in config
    assert "<tr><th>iterations</th><td>5</td></tr>" in config


@pytest.mark.slow
def test_report_of_a_bare_summary_leaves_out_what_is_missing(run_dir, tmp_path):
    bare = copy_run(run_dir, tmp_path / "bare", "summary.json")
    html = write_report(bare).read_text()
    summary = json.loads((bare / "summary.json").read_text())
    assert all(name in html for name in summary["class_names"])
    assert "<img" not in html and "id=privacy" not in html and "id=training" not in html
    assert (
        "Not there: metrics.parquet, accuracy.png, accuracy_matrix.png, audit.md"
        in (html)
    )


def test_report_of_a_summary_without_the_matrix_or_config(tmp_path):
    (tmp_path / "summary.json").write_text(
        json.dumps({"method": "finetune", "final_accuracy": None})
    )
    html = write_report(tmp_path).read_text()
    assert "n/a<small>%</small>" in html  # NaN is written as null
    assert "no accuracy matrix" in html and "no config in summary.json" in html


def test_report_needs_a_summary(tmp_path):
    with pytest.raises(FileNotFoundError, match="summary.json"):
        write_report(tmp_path)


@pytest.mark.slow
def test_report_shows_per_site_figures_and_privacy_spent(run_dir, tmp_path):
    # fields a later change adds: site_accuracy (site -> per task) and dp_*
    run = copy_run(run_dir, tmp_path / "sites", "summary.json")
    summary = json.loads((run / "summary.json").read_text())
    t = len(summary["classes_per_task"])
    summary["site_accuracy"] = {"0": [50.0] * t, "1": [55.0] * (t - 1) + [None]}
    summary.update(dp_epsilon=12.345, dp_delta=1e-5, dp_mu=2.5, dp_rounds=4)
    summary["evaluation"] = {"classifier": "nme"}
    (run / "summary.json").write_text(json.dumps(summary))
    html = write_report(run).read_text()
    sites = section(html, "sites")
    assert "<th>site 0</th><th>site 1</th>" in sites and ">55.0</td>" in sites
    assert sites.count(DATA_URI) == 1  # the per-site plot
    assert "ε = 12.35" in html and "<th>dp_mu</th><td>2.5</td>" in html
    assert "<th>classifier</th><td>nme</td>" in section(html, "evaluation")


# ----- in a browser ------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.skipif(shutil.which("chromium") is None, reason="chromium not installed")
def test_report_renders_in_headless_chromium(run_dir, report, tmp_path):
    import matplotlib.image

    png = tmp_path / "report.png"
    subprocess.run(
        [str(ROOT / "scripts/screenshot_report.sh"), str(run_dir), str(png)],
        check=True,
        capture_output=True,
        timeout=120,
    )
    shot = matplotlib.image.imread(png)[..., :3]  # [H, W, RGB] in [0, 1]
    assert shot.shape[:2] == (2000, 1200)

    def has(rgb: str) -> bool:
        colour = np.array([int(rgb[i : i + 2], 16) for i in (0, 2, 4)]) / 255
        return bool((np.abs(shot - colour).max(-1) < 0.04).sum() > 50)

    # the cards' accent blue (the page's own CSS) and viridis yellow, the top of the
    # colour bar of the embedded accuracy_matrix.png: the page and its images drew
    assert has("2563af") and has("fde725")
    assert not has("ff0000")  # a colour the page never uses: the check can fail
