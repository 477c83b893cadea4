"""`python -m simulations.audit RUN_DIR [--site K] [--task T] [--top-k N] [--model PT]`.

Audits the class impressions a run cached (`impressions-task{T}-{hash}.pt` in the site
store: `RUN_DIR/site-0/` for single-machine runs, `RUN_DIR/sites/site-K/` for
federated ones) against the run's real data (fl_ci/audit.py): the train split is the
reference an impression could copy (every site's rows, every frame), the validation
split gives the held-out baseline. Writes `RUN_DIR/audit.json`, `RUN_DIR/audit.md`
and `RUN_DIR/impressions_task{T}.png` (per class: the class mean, then impressions,
most SSIM-similar first, each beside its nearest real training image, as in the
supplementary figure of Ayromlou et al., MICCAI 2022), and prints the Markdown.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from fl_ci.audit import (
    GOAL_SHARE,
    AuditReport,
    audit_impressions,
    class_mean_images,
    real_images,
)
from fl_ci.config import Config, ConfigError
from fl_ci.data.base import DataError
from fl_ci.experiment import Experiment
from fl_ci.methods.base import model_hash
from fl_ci.results import _save_png, atomic_write, write_json

_FILE = re.compile(r"impressions-task(\d+)-([0-9a-f]+)\.pt$")


class AuditError(RuntimeError):
    """The run folder lacks what the audit needs; the message names it."""


def site_store(run_dir: Path, site: int) -> Path:
    """The site's store: `sites/site-K` (federated) or `site-0` (single machine)."""
    federated = run_dir / "sites" / f"site-{site}"
    if federated.is_dir():
        return federated
    local = run_dir / "site-0"
    if site == 0 and local.is_dir():
        return local
    raise AuditError(
        f"no store of site {site} under {run_dir} (looked for {federated})"
    )


def site_stores(run_dir: Path) -> list[Path]:
    """Every site store of a run, by the same rule as `site_store`."""
    stores = [s for s in sorted((run_dir / "sites").glob("site-*")) if s.is_dir()]
    if not stores and (run_dir / "site-0").is_dir():
        stores = [run_dir / "site-0"]
    return stores


def find_impressions(store: Path) -> dict[int, Path]:
    """{task: file}; of several files for one task, the most recently written."""
    found: dict[int, Path] = {}
    for path in sorted(store.glob("impressions-task*-*.pt")):
        match = _FILE.search(path.name)
        if match is None:
            continue
        task = int(match.group(1))
        if task not in found or path.stat().st_mtime > found[task].stat().st_mtime:
            found[task] = path
    return found


def load_config(run_dir: Path) -> Config:
    path = run_dir / "summary.json"
    if not path.exists():
        raise AuditError(f"{path} not found: is {run_dir} a run folder?")
    summary = json.loads(path.read_text())
    if "config" not in summary:
        raise AuditError(f"{path} has no 'config'")
    return Config.from_flat(summary["config"])


def backbone_model(exp: Experiment, state: dict[str, Tensor], source: str) -> nn.Module:
    """The run's model with the backbone weights of `state` (the head, whose size
    depends on the task, is not needed for features)."""
    model = exp.build_model()
    backbone = {
        k.removeprefix("backbone."): v
        for k, v in state.items()
        if k.startswith("backbone.")
    }
    if not backbone:
        raise AuditError(f"{source} holds no backbone.* weights")
    model.backbone.load_state_dict(backbone)
    return model.eval()


def read_state(path: Path) -> dict[str, Tensor]:
    """A state dict file, or a checkpoint's teacher (else its model)."""
    if not path.exists():
        raise AuditError(f"model file {path} not found")
    state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("teacher", "model"):
        if isinstance(state.get(key), dict):
            return state[key]
    return state


def frozen_teacher(run_dir: Path, file_hash: str) -> dict[str, Tensor] | None:
    """The teacher in `RUN_DIR/checkpoint.pt` if it is the model that synthesized the
    impressions (its content hash is the one in their file name), else None."""
    path = run_dir / "checkpoint.pt"
    if not path.exists():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # a torn or foreign file: no features rather than no audit
        return None
    teacher = state.get("teacher") if isinstance(state, dict) else None
    if not isinstance(teacher, dict):
        return None
    # model_hash reads only state_dict(): the saved state stands in for the model
    shim = SimpleNamespace(state_dict=lambda: teacher)
    return teacher if model_hash(shim) == file_hash else None  # type: ignore[arg-type]


def audit_run(
    run_dir: str | Path,
    *,
    site: int = 0,
    task: int | None = None,
    top_k: int = 64,
    model_path: str | Path | None = None,
    features: bool = True,
    per_class: int = 4,
) -> dict[str, Any]:
    """Audit every cached task of `site` (or only `task`); write and return audit.json.

    Feature-space distances use `model_path` (a state dict, or a checkpoint's teacher)
    for every task; without it, `RUN_DIR/checkpoint.pt`'s teacher for the task whose
    impressions it synthesized (matching hash). `features=False`: none.
    """
    run_dir = Path(run_dir)
    cfg = load_config(run_dir)
    store = site_store(run_dir, site)
    files = find_impressions(store)
    if task is not None:
        files = {t: p for t, p in files.items() if t == task}
    if not files:
        which = f"task {task}" if task is not None else "any task"
        raise AuditError(f"no cached impressions of {which} in {store}")
    exp = Experiment.from_config(cfg)
    train, val = exp.splits.train, exp.splits.val
    real, real_labels = real_images(train)  # [M, C, H, W], every frame
    held, held_labels = real_images(val, all_frames=False)  # middle frames
    given = None
    if model_path and features:
        given = backbone_model(exp, read_state(Path(model_path)), str(model_path))

    out: dict[str, Any] = {
        "run_dir": str(run_dir),
        "site": site,
        "store": str(store),
        "top_k": top_k,
        "tasks": {},
    }
    sections = []
    for t, path in sorted(files.items()):
        cached = torch.load(path, map_location="cpu", weights_only=True)
        images, labels = cached["images"].float(), cached["labels"].long()
        model, feature_model = given, str(model_path) if given is not None else None
        teacher = None
        if features and given is None:
            teacher = frozen_teacher(run_dir, _FILE.search(path.name).group(2))
        if teacher is not None:
            model = backbone_model(exp, teacher, "checkpoint teacher")
            feature_model = "checkpoint.pt teacher (the synthesizing model)"
        start = time.perf_counter()
        report = audit_impressions(
            images,
            labels,
            real,
            real_labels,
            held,
            held_labels,
            mean=train.mean,
            std=train.std,
            model=model,
            top_k=top_k,
        )
        seconds = time.perf_counter() - start
        png = run_dir / f"impressions_task{t}.png"
        plot_impressions(
            png,
            images,
            labels,
            report,
            class_mean_images(real, real_labels, max(report.classes) + 1),
            real,
            exp.class_names,
            mean=train.mean,
            std=train.std,
            per_class=per_class,
        )
        out["tasks"][str(t)] = {
            "file": path.name,
            "seconds": seconds,
            "figure": png.name,
            "feature_model": feature_model,
            **report.to_dict(),
        }
        sections.append(
            task_markdown(t, path.name, report, exp.class_names, seconds, feature_model)
        )
    out["markdown"] = markdown(out, sections)
    write_json(
        {k: v for k, v in out.items() if k != "markdown"}, run_dir / "audit.json"
    )
    atomic_write(
        run_dir / "audit.md",
        lambda tmp: Path(tmp).write_text(out["markdown"], encoding="utf-8"),
    )
    return out


# ----- Markdown ----------------------------------------------------------------------
def _f(value: float, digits: int = 3) -> str:
    return "n/a" if value != value else f"{value:.{digits}f}"  # NaN != NaN


def _yes(flag: bool) -> str:
    return "yes" if flag else "**no**"


def markdown(out: dict[str, Any], sections: list[str]) -> str:
    head = [
        f"# Impression privacy audit: {out['run_dir']}",
        "",
        f"Site {out['site']} (store `{out['store']}`). Reference: every frame of the "
        "train split (all sites' rows); held-out baseline: the validation split's "
        "middle frames; start: the class mean of the train split. SSIM (Wang et al. "
        "2004; 11x11 Gaussian, sigma 1.5) in [0, 1] pixels; L2 in normalised input "
        "space. "
        + (
            f"SSIM searched among each image's {out['top_k']} nearest by L2 plus its "
            f"{out['top_k']} most correlated training images."
            if out["top_k"] > 0
            else "SSIM searched exhaustively."
        ),
        "Goals (reliability-and-metrics.md): share above the held-out 99th "
        f"percentile <= {GOAL_SHARE:.0%}; leakage median <= 0; no leakage score > 1.",
        "",
    ]
    return "\n".join(head + sections)


def task_markdown(
    task: int,
    name: str,
    r: AuditReport,
    class_names: list[str],
    seconds: float,
    feature_model: str | None = None,
) -> str:
    goals = r.goals
    mean_ssim = float(np.nanmedian(list(r.class_mean_ssim.values())))
    rows = [
        f"## Task {task}: {r.impressions} impressions of classes {r.classes}",
        "",
        f"`{name}`; {r.real_images} training images, {r.held_out_images} held-out; "
        f"{seconds:.1f} s." + (f" Features: {feature_model}." if r.features else ""),
        "",
        "| measure | impressions | baseline / goal | goal met |",
        "|---|---|---|---|",
        f"| nearest-training SSIM, median | {_f(r.impression_ssim_median)} | "
        f"held-out median {_f(r.held_out_ssim_median)} | |",
        f"| nearest-training SSIM, max | {_f(r.impression_ssim_max)} | "
        f"held-out p99 {_f(r.held_out_ssim_p99)} | |",
        f"| share above held-out p99 | {r.share_above_held_out_p99:.1%} | "
        f"<= {GOAL_SHARE:.0%} | {_yes(goals['share_above_held_out_p99 <= 1%'])} |",
        f"| leakage score, median | {_f(r.leakage_median)} | <= 0 | "
        f"{_yes(goals['leakage median <= 0'])} |",
        f"| leakage score > 1 | {r.leakage_above_1} of {r.impressions} "
        f"(max {_f(r.leakage_max)}) | 0 | {_yes(goals['no leakage score > 1'])} |",
        f"| class mean's nearest-training SSIM, median over classes | "
        f"{_f(mean_ssim)} | held-out median {_f(r.held_out_ssim_median)} | |",
        f"| nearest-training L2, median | {_f(r.impression_l2_median, 2)} | "
        f"held-out median {_f(r.held_out_l2_median, 2)} | |",
    ]
    if r.features:
        f = r.features
        rows.append(
            f"| feature cosine distance to nearest, median (min) | "
            f"{_f(f['impression_distance_median'])} "
            f"({_f(f['impression_distance_min'])}) | held-out median "
            f"{_f(f['held_out_distance_median'])}, p01 "
            f"{_f(f['held_out_distance_p01'])}; share below p01 "
            f"{f['share_below_held_out_p01']:.1%} | |"
        )
    rows += [
        "",
        "| class | name | impressions | SSIM median | SSIM max | class mean SSIM | "
        "above p99 | leakage median | leakage max |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for c in r.per_class:
        k = c["class"]
        name_k = class_names[k] if k < len(class_names) else ""
        rows.append(
            f"| {k} | {name_k} | {c['impressions']} | {_f(c['ssim_median'])} | "
            f"{_f(c['ssim_max'])} | {_f(c['class_mean_ssim'])} | "
            f"{c['share_above_held_out_p99']:.1%} | {_f(c['leakage_median'])} | "
            f"{_f(c['leakage_max'])} |"
        )
    rows.append("")
    rows += [f"- warning: {w}" for w in r.warnings]
    rows.append(f"- verdict: {'all goals met' if r.passed else 'goals NOT all met'}")
    rows.append("")
    return "\n".join(rows)


# ----- figure ------------------------------------------------------------------------
def plot_impressions(
    path: Path,
    images: Tensor,
    labels: Tensor,
    report: AuditReport,
    means: Tensor,
    real: Tensor,
    class_names: list[str],
    *,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    per_class: int = 4,
    max_classes: int = 10,
) -> Path:
    """Rows: classes; columns: the class mean, then (impression, nearest real image)
    pairs, most similar first, titled with SSIM and leakage score."""
    from matplotlib.figure import Figure

    m = torch.tensor(mean).view(-1, 1, 1)
    s = torch.tensor(std).view(-1, 1, 1)

    def show(ax: Any, x: Tensor, title: str) -> None:
        pixels = (x.float() * s + m).clamp(0, 1)  # [C, H, W]
        if pixels.shape[0] == 1:
            ax.imshow(pixels[0].numpy(), cmap="gray", vmin=0, vmax=1)
        else:
            ax.imshow(pixels.permute(1, 2, 0).numpy())
        ax.set_title(title, fontsize=6)
        ax.set_xticks([])
        ax.set_yticks([])

    classes = report.classes[:max_classes]
    cols = 1 + 2 * per_class
    fig = Figure(figsize=(0.95 * cols, 1.3 * len(classes) + 0.2))
    axes = fig.subplots(len(classes), cols, squeeze=False)
    near = report.nearest_ssim
    for row, c in enumerate(classes):
        name = class_names[c] if c < len(class_names) else str(c)
        show(axes[row, 0], means[c].nan_to_num(), "class mean")
        axes[row, 0].set_ylabel(f"{c} {name}", fontsize=7)
        idx = (labels == c).nonzero().squeeze(1)
        idx = idx[near.value[idx].nan_to_num(-2).argsort(descending=True)]
        for j in range(per_class):
            a, b = axes[row, 1 + 2 * j], axes[row, 2 + 2 * j]
            if j >= len(idx) or near.index[idx[j]] < 0:
                a.axis("off")
                b.axis("off")
                continue
            i = int(idx[j])
            show(
                a, images[i], f"SSIM {near.value[i]:.2f}\nleak {report.leakage[i]:.2f}"
            )
            show(b, real[near.index[i]], "nearest real")
    fig.tight_layout(pad=0.3)
    return _save_png(fig, path)


# ----- command line ------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m simulations.audit", description=__doc__
    )
    parser.add_argument("run_dir", help="a run's output folder (holds summary.json)")
    parser.add_argument("--site", type=int, default=0, help="site store to audit")
    parser.add_argument("--task", type=int, help="only this task (default: all found)")
    parser.add_argument(
        "--top-k",
        type=int,
        default=64,
        help="SSIM candidates per image by L2 and by correlation (0: exhaustive)",
    )
    parser.add_argument(
        "--model",
        help="state dict whose backbone gives feature-space distances (e.g. model.pt)",
    )
    parser.add_argument(
        "--no-features", action="store_true", help="skip feature-space distances"
    )
    parser.add_argument("--per-class", type=int, default=4, help="pairs per figure row")
    args = parser.parse_args(argv)
    try:
        out = audit_run(
            args.run_dir,
            site=args.site,
            task=args.task,
            top_k=args.top_k,
            model_path=args.model,
            features=not args.no_features,
            per_class=args.per_class,
        )
    except (AuditError, ConfigError, DataError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(out["markdown"])
    print(
        f"written: {Path(args.run_dir) / 'audit.json'}, audit.md, impressions_task*.png"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
