"""One self-contained HTML page of a finished run: `write_report(out)` -> out/report.html.

Reads what a run leaves in its output folder: `summary.json` (required; the fields of
`fl_ci.recorder.Recorder.summary`, optional `dp_*` fields, and later `site_accuracy`,
site -> accuracy per task, and `evaluation`), `metrics.parquet`, the plots
`accuracy.png` and `accuracy_matrix.png`, impression grids `*impressions*.png` and the
privacy audit `audit.md` (`python -m simulations.audit`). Every piece but the summary
is optional and its section is left out when it is missing; the page lists what it
found. Plots are embedded as base64 PNG data URIs and the CSS is inline, so the page
has no external `src` or `href`: it can be mailed or archived on its own.

Tasks are counted from 0, as in `fl_ci.metrics` and the run's plots.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fl_ci.results import atomic_write, read_metrics

REPORT = "report.html"
# summary fields shown in the header and the cards rather than as leftovers
_HEADLINE = [
    ("final_accuracy", "final accuracy"),
    ("average_incremental_accuracy", "average incremental accuracy"),
    ("forgetting", "forgetting"),
    ("bwt", "backward transfer"),
]


# ----- the numbers ------------------------------------------------------------------
def class_tasks(classes_per_task: Sequence[int]) -> list[int]:
    """The task that brought each class: [0, 0, 1, 2] for classes_per_task [2, 1, 1]
    (model labels are assigned task by task, so class c is column c)."""
    return [t for t, n in enumerate(classes_per_task) for _ in range(int(n))]


def accuracy_by_class(
    matrix: Sequence[Sequence[float | None]], classes_per_task: Sequence[int]
) -> np.ndarray:
    """[T, K] accuracy after task i on the test images of class c's task: the
    accuracy matrix R[i, j] (after task i, on task j) spread over the classes of task
    j; NaN where class c is not seen yet. The summary has no per-class accuracy, so
    the classes of one task share its value."""
    r = _float_matrix(matrix)
    tasks = class_tasks(classes_per_task)
    if not tasks:
        return np.full((r.shape[0], 0), np.nan)
    if max(tasks) >= r.shape[1]:
        raise ValueError(
            f"classes_per_task names {max(tasks) + 1} tasks, the accuracy matrix has "
            f"{r.shape[1]} columns"
        )
    return r[:, tasks]


def _float_matrix(rows: Sequence[Sequence[float | None]]) -> np.ndarray:
    """Rows of numbers or None (JSON's null for NaN) -> a float array, NaN padded."""
    width = max((len(row) for row in rows), default=0)
    out = np.full((len(rows), width), np.nan)
    for i, row in enumerate(rows):
        for j, v in enumerate(row):
            if v is not None:
                out[i, j] = float(v)
    return out


# ----- the page ---------------------------------------------------------------------
def write_report(out: Path) -> Path:
    """Write `out/report.html` from the run folder `out` and return its path."""
    out = Path(out)
    summary_path = out / "summary.json"
    if not summary_path.is_file():
        raise FileNotFoundError(f"no summary.json in {out}: not a finished run folder")
    summary = json.loads(summary_path.read_text(encoding="utf-8"))
    found = ["summary.json"]
    body: list[str] = [_header(summary, out), _cards(summary)]
    body.append(_by_class(summary))
    body.append(_accuracy(summary, out, found))
    body.append(_sites(summary))
    body.append(_training(out, found))
    body.append(_evaluation(summary))
    body.append(_privacy(summary, out, found))
    body.append(_config(summary))
    body.append(_footer(out, found))
    title = f"{summary.get('method', 'run')} on {summary.get('dataset', '?')}"
    page = _PAGE.format(
        title=_esc(f"fl-ci report: {title}"),
        css=_CSS,
        body="\n".join(b for b in body if b),
    )
    target = out / REPORT
    return atomic_write(target, lambda tmp: Path(tmp).write_text(page, "utf-8"))


def _header(s: dict[str, Any], out: Path) -> str:
    tasks = len(s.get("classes_per_task") or [])
    done = s.get("tasks_completed")
    bits = [
        f"{_count(s.get('sites'), 'site')}" if s.get("sites") is not None else "",
        f"seed {s['seed']}" if s.get("seed") is not None else "",
        f"{done} of {tasks} tasks" if done is not None and tasks else "",
        f"{_count(len(s.get('class_names') or []), 'class', 'classes')}"
        if s.get("class_names")
        else "",
        f"{s['wall_seconds']:.1f} s wall time"
        if _finite(s.get("wall_seconds"))
        else "",
        f"folder {out.name}",
    ]
    return (
        f"<header><h1>{_esc(s.get('method', 'run'))} "
        f"<span class=on>on</span> {_esc(s.get('dataset', '?'))}</h1>"
        f"<p class=meta>{' · '.join(_esc(b) for b in bits if b)}</p></header>"
    )


def _cards(s: dict[str, Any]) -> str:
    cards = [
        f"<div class=card><div class=value>{_num(s.get(k), 2)}<small>%</small></div>"
        f"<div class=label>{_esc(label)}</div></div>"
        for k, label in _HEADLINE
        if k in s
    ]
    if "dp_epsilon" in s:
        eps = s["dp_epsilon"]
        value = "∞" if eps is None else _num(eps, 2)
        delta = s.get("dp_delta")
        cards.append(
            f"<div class='card dp'><div class=value>ε = {value}</div>"
            f"<div class=label>central DP, δ = {_esc(delta)}</div></div>"
        )
    return f"<section class=cards>{''.join(cards)}</section>" if cards else ""


def _by_class(s: dict[str, Any]) -> str:
    matrix, per_task = s.get("accuracy_matrix"), s.get("classes_per_task")
    if not matrix or not per_task:
        return _missing("Accuracy after each task, by class", "no accuracy matrix")
    acc = accuracy_by_class(matrix, per_task)
    k = acc.shape[1]
    names = list(s.get("class_names") or [])
    names += [f"class {c}" for c in range(len(names), k)]
    tasks = class_tasks(per_task)
    rows = _done_rows(s, acc)
    narrow = " narrow" if k > 12 else ""
    head_tasks = "".join(
        f"<th colspan={n} class='task{' first' * (t > 0)}'>task {t}</th>"
        for t, n in enumerate(per_task)
    )
    head_names = "".join(
        f"<th class='name{narrow}{' first' * _starts(tasks, c)}'>"
        f"<span>{_esc(names[c])}</span></th>"
        for c in range(k)
    )
    after = s.get("accuracy_after_task") or []
    everything = s.get("accuracy_all_classes") or []
    lines = []
    for i in rows:
        cells = "".join(
            _heat(acc[i, c], extra=" first" * _starts(tasks, c)) for c in range(k)
        )
        lines.append(
            f"<tr><th class=row>after task {i}</th>{_heat(_at(after, i))}"
            f"{_heat(_at(everything, i), extra=' total')}"
            f"{cells}</tr>"
        )
    overview = ""
    if k > 12:  # too wide to take in as a table: a heatmap over the classes first
        png = _plot_class_heat(acc[rows], names, [f"after task {i}" for i in rows])
        overview = f"<figure class=wide>{_img(png, 'accuracy by class')}</figure>"
    return (
        "<section id=by-class><h2>Accuracy after each task, by class</h2>"
        "<p class=note>Test accuracy (%) after training each task. Each class shows "
        "the accuracy on the test images of the task that brought it (the accuracy "
        "matrix spread over that task's classes; the summary has no per-class "
        "figure). Blank: not seen yet. <i>A<sub>k</sub></i>: mean over the tasks "
        "seen; <i>all seen</i>: over every test image of the classes seen.</p>"
        f"{overview}<div class=scroll><table class=heat><thead>"
        "<tr><th class=row></th><th rowspan=2>A<sub>k</sub></th>"
        f"<th rowspan=2 class=total>all seen</th>{head_tasks}</tr>"
        f"<tr><th class=row></th>{head_names}</tr></thead>"
        f"<tbody>{''.join(lines)}</tbody></table></div></section>"
    )


def _accuracy(s: dict[str, Any], out: Path, found: list[str]) -> str:
    parts = []
    matrix = s.get("accuracy_matrix")
    if matrix:
        r = _float_matrix(matrix)
        rows = _done_rows(s, r)
        head = "".join(f"<th>task {j}</th>" for j in range(r.shape[1]))
        body = "".join(
            f"<tr><th class=row>after task {i}</th>"
            + "".join(_heat(v) for v in r[i])
            + "</tr>"
            for i in rows
        )
        old, new = s.get("old_accuracy") or [], s.get("new_accuracy") or []
        split = "".join(
            f"<tr><th class=row>after task {i}</th>{_heat(_at(old, i))}"
            f"{_heat(_at(new, i))}</tr>"
            for i in rows
        )
        parts.append(
            "<div class=tables><div><h3>Accuracy matrix R[i, j] (%)</h3>"
            "<p class=note>After training task i (rows), on task j's test images "
            "(columns).</p><table class=heat>"
            f"<thead><tr><th></th>{head}</tr></thead><tbody>{body}</tbody></table>"
            "</div><div><h3>Old and new classes (%)</h3><p class=note>Old: classes "
            "of earlier tasks; new: the task's own.</p><table class=heat><thead><tr>"
            "<th></th><th>old</th><th>new</th></tr></thead>"
            f"<tbody>{split}</tbody></table></div></div>"
        )
    figures = [
        _figure(out / name, caption, found)
        for name, caption in (
            ("accuracy.png", "Accuracy against classes seen (accuracy.png)"),
            ("accuracy_matrix.png", "Accuracy matrix (accuracy_matrix.png)"),
        )
    ]
    if any(figures):
        parts.append(f"<div class=figures>{''.join(figures)}</div>")
    if not parts:
        return _missing("Accuracy", "no accuracy matrix and no plots")
    return "<section id=accuracy><h2>Accuracy</h2>" + "".join(parts) + "</section>"


def _sites(s: dict[str, Any]) -> str:
    """Per-site figures of `site_accuracy` (site -> accuracy per task), if any."""
    per_site = s.get("site_accuracy")
    if not isinstance(per_site, dict) or not per_site:
        return ""
    sites = sorted(per_site, key=_natural)
    series = {
        str(k): [_float(v) for v in per_site[k]]
        if isinstance(per_site[k], list)
        else []
        for k in sites
    }
    t = max(len(v) for v in series.values())
    label = {k: k if k.startswith("site") else f"site {k}" for k in series}
    head = "".join(f"<th>{_esc(label[k])}</th>" for k in series)
    body = "".join(
        f"<tr><th class=row>after task {i}</th>"
        + "".join(_heat(_at(v, i)) for v in series.values())
        + "</tr>"
        for i in range(t)
    )
    plot = _plot_lines(
        {label[k]: (list(range(len(v))), v) for k, v in series.items()},
        xlabel="after task",
        ylabel="accuracy (%)",
        title="accuracy per site",
    )
    return (
        "<section id=sites><h2>Per site</h2><div class=tables><div>"
        "<p class=note>Each site's accuracy (%) after each task.</p>"
        f"<table class=heat><thead><tr><th></th>{head}</tr></thead>"
        f"<tbody>{body}</tbody></table></div>"
        f"<div>{_img(plot, 'accuracy per site')}</div></div></section>"
    )


def _training(out: Path, found: list[str]) -> str:
    """Validation accuracy and training loss per server round, one line per site,
    from metrics.parquet's rows of split 'val'."""
    path = out / "metrics.parquet"
    if not path.is_file():
        return ""
    found.append(path.name)
    rows = [r for r in read_metrics(path) if r.get("split") == "val"]
    if not rows:
        return ""
    plots = []
    for key, label in (
        ("accuracy", "validation accuracy (%)"),
        ("train_loss", "training loss"),
    ):
        curves: dict[str, tuple[list[float], list[float]]] = {}
        for i, r in enumerate(rows):
            y = _float(r.get(key))
            if math.isnan(y):
                continue
            x = _float(r.get("server_round"))
            site = r.get("site")
            name = "site ?" if site is None else f"site {int(site)}"
            xs, ys = curves.setdefault(name, ([], []))
            xs.append(i + 1 if math.isnan(x) else x)
            ys.append(y)
        if curves:
            png = _plot_lines(
                dict(sorted(curves.items(), key=lambda kv: _natural(kv[0]))),
                xlabel="server round",
                ylabel=label,
                title=f"{label} per round",
            )
            plots.append(f"<figure>{_img(png, label)}</figure>")
    if not plots:
        return ""
    return (
        "<section id=training><h2>Training rounds</h2><p class=note>From "
        "metrics.parquet: each site's validation accuracy and training loss per "
        f"server round.</p><div class=figures>{''.join(plots)}</div></section>"
    )


def _evaluation(s: dict[str, Any]) -> str:
    value = s.get("evaluation")
    if value in (None, {}, []):
        return ""
    return (
        "<section id=evaluation><h2>Evaluation</h2>"
        f"{_kv_table(_flatten(value))}</section>"
    )


def _privacy(s: dict[str, Any], out: Path, found: list[str]) -> str:
    parts = []
    dp = {k: v for k, v in s.items() if k.startswith("dp_")}
    if dp:
        parts.append(
            "<h3>Central differential privacy</h3><p class=note>Privacy spent by the "
            "noised FedAvg aggregate over every aggregated round (fl_ci.privacy); "
            "ε = ∞ (null) when no noise was added.</p>" + _kv_table(dp)
        )
    audit = out / "audit.md"
    if audit.is_file():
        found.append(audit.name)
        parts.append(_audit(audit.read_text(encoding="utf-8")))
    grids = sorted(out.glob("*impressions*.png"), key=lambda p: _natural(p.name))
    figures = [
        _figure(
            p, f"{p.name}: class mean, impressions, their nearest real images", found
        )
        for p in grids
    ]
    if figures:
        # the last task's grid (every class so far) open, the earlier ones folded
        earlier = ""
        if len(figures) > 1:
            earlier = (
                f"<details><summary>impressions of earlier tasks ({len(figures) - 1})"
                f"</summary>{''.join(figures[:-1])}</details>"
            )
        parts.append(f"<h3>Impressions</h3>{figures[-1]}{earlier}")
    if not parts:
        return ""
    return "<section id=privacy><h2>Privacy</h2>" + "".join(parts) + "</section>"


def _config(s: dict[str, Any]) -> str:
    config = s.get("config")
    if not isinstance(config, dict) or not config:
        return _missing("Configuration", "no config in summary.json")
    groups: dict[str, dict[str, Any]] = {}
    for key, value in config.items():
        group, _, name = key.rpartition(".")
        groups.setdefault(group or "run", {})[name] = value
    tables = "".join(
        f"<div><h3>{_esc(group)}</h3>{_kv_table(values)}</div>"
        for group, values in groups.items()
    )
    return (
        "<section id=config><h2>Configuration</h2>"
        f"<div class=config>{tables}</div></section>"
    )


def _footer(out: Path, found: list[str]) -> str:
    wanted = [
        "summary.json",
        "metrics.parquet",
        "accuracy.png",
        "accuracy_matrix.png",
        "audit.md",
    ]
    missing = [name for name in wanted if name not in found]
    text = f"Read from {out.name}/: {', '.join(found)}."
    if missing:
        text += f" Not there: {', '.join(missing)}."
    return f"<footer>{_esc(text)}</footer>"


# ----- pieces -----------------------------------------------------------------------
def _audit(text: str) -> str:
    """audit.md: its preamble, then one fold per '## ' section (a task) whose summary
    is the heading and the verdict; the last section open."""
    blocks = re.split(r"(?m)^(?=## )", text)
    intro, tasks = blocks[0], blocks[1:]
    folds = []
    for i, block in enumerate(tasks):
        heading, _, rest = block.partition("\n")
        verdict = re.search(r"(?m)^- verdict: (.*)$", rest)
        label = heading.removeprefix("## ").strip()
        if verdict:
            label += f" — {verdict.group(1).strip()}"
        folds.append(
            f"<details{' open' * (i == len(tasks) - 1)}><summary>{_esc(label)}"
            f"</summary>{_markdown(rest)}</details>"
        )
    return f"<div class=markdown>{_markdown(intro)}{''.join(folds)}</div>"


def _markdown(text: str) -> str:
    """audit.md as HTML: CommonMark with tables (markdown-it-py); raw HTML, links and
    images are off, so the page keeps no external src or href."""
    from markdown_it import MarkdownIt

    md = MarkdownIt("commonmark", {"html": False}).enable("table")
    md.disable(["link", "image", "autolink"])
    return md.render(text)


def _plot_lines(
    curves: dict[str, tuple[Sequence[float], Sequence[float]]],
    *,
    xlabel: str,
    ylabel: str,
    title: str,
) -> bytes:
    """PNG bytes of one line per curve (matplotlib's object API, as fl_ci.results)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(6, 3.6))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for label, (x, y) in curves.items():
        ax.plot(list(x), list(y), marker="o", markersize=3, label=label)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # rounds and tasks
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if 1 < len(curves) <= 12:
        ax.legend(fontsize="small")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return buf.getvalue()


def _plot_class_heat(
    acc: np.ndarray, names: Sequence[str], rows: Sequence[str]
) -> bytes:
    """PNG bytes of a [T, K] accuracy heatmap, one column per class name."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    t, k = acc.shape
    fig = Figure(figsize=(10.6, 1.6 + 0.3 * t + 0.06 * max(len(n) for n in names)))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    image = ax.imshow(
        np.ma.masked_invalid(acc), vmin=0, vmax=100, cmap="Blues", aspect="auto"
    )
    ax.set_xticks(range(k), list(names[:k]), rotation=90, fontsize=max(4, 9 - k // 25))
    ax.set_yticks(range(t), list(rows), fontsize=8)
    fig.colorbar(image, ax=ax, label="accuracy (%)", pad=0.01)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return buf.getvalue()


def _img(png: bytes, alt: str) -> str:
    data = base64.b64encode(png).decode("ascii")
    return f"<img alt='{_esc(alt)}' src='data:image/png;base64,{data}'>"


def _figure(path: Path, caption: str, found: list[str]) -> str:
    if not path.is_file():
        return ""
    found.append(path.name)
    return (
        f"<figure>{_img(path.read_bytes(), caption)}"
        f"<figcaption>{_esc(caption)}</figcaption></figure>"
    )


def _kv_table(values: dict[str, Any]) -> str:
    rows = "".join(
        f"<tr><th>{_esc(k)}</th><td>{_esc(_show(v))}</td></tr>"
        for k, v in values.items()
    )
    return f"<table class=kv><tbody>{rows}</tbody></table>"


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for k, v in value.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix or "value": value}


def _show(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, float):
        return f"{v:.6g}"
    if isinstance(v, list):
        return ", ".join(_show(x) for x in v)
    if isinstance(v, str) and v == "":
        return '""'
    return str(v)


def _heat(value: float | None, extra: str = "") -> str:
    """A table cell shaded by accuracy 0..100 %, blank for NaN / None."""
    v = _float(value)
    if math.isnan(v):
        return f"<td class='empty{extra}'></td>"
    alpha = min(max(v, 0.0), 100.0) / 100 * 0.85
    ink = " dark" if alpha > 0.5 else ""
    return (
        f"<td class='num{ink}{extra}' style='background:rgba(37,99,175,{alpha:.2f})'>"
        f"{v:.1f}</td>"
    )


def _done_rows(s: dict[str, Any], r: np.ndarray) -> list[int]:
    """Rows of tasks that were evaluated: `tasks_completed`, else rows with a value."""
    done = s.get("tasks_completed")
    if isinstance(done, int):
        return list(range(min(done, r.shape[0])))
    return [i for i in range(r.shape[0]) if np.isfinite(r[i]).any()]


def _starts(tasks: list[int], c: int) -> bool:
    return c > 0 and tasks[c] != tasks[c - 1]


def _at(values: Sequence[Any], i: int) -> float:
    return _float(values[i]) if i < len(values) else math.nan


def _float(v: Any) -> float:
    try:
        return math.nan if v is None else float(v)
    except (TypeError, ValueError):
        return math.nan


def _finite(v: Any) -> bool:
    return math.isfinite(_float(v))


def _num(v: Any, digits: int) -> str:
    x = _float(v)
    return "n/a" if math.isnan(x) else f"{x:.{digits}f}"


def _count(n: Any, one: str, many: str | None = None) -> str:
    return f"{n} {one if n == 1 else (many or one + 's')}"


def _natural(text: Any) -> list[Any]:
    """Sort key: 'site 10' after 'site 2', 'task10' after 'task2'."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", str(text))]


def _missing(title: str, why: str) -> str:
    return f"<section><h2>{_esc(title)}</h2><p class=note>{_esc(why)}.</p></section>"


def _esc(v: Any) -> str:
    return html.escape(str(v), quote=True)


_PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}</title>
<style>{css}</style>
</head>
<body>
<main>
{body}
</main>
</body>
</html>
"""

_CSS = """
:root { --ink: #1f2933; --muted: #616e7c; --line: #d9e2ec; --accent: #2563af; }
* { box-sizing: border-box; }
body { margin: 0; background: #f5f7fa; color: var(--ink);
  font: 15px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; }
main { max-width: 1120px; margin: 0 auto; padding: 24px 28px 40px; }
header h1 { margin: 0; font-size: 26px; }
header .on { color: var(--muted); font-weight: 400; }
.meta { margin: 4px 0 0; color: var(--muted); }
section { background: #fff; border: 1px solid var(--line); border-radius: 8px;
  padding: 16px 20px; margin-top: 18px; }
h2 { margin: 0 0 10px; font-size: 19px; }
h3 { margin: 14px 0 6px; font-size: 15px; }
.note { color: var(--muted); margin: 0 0 10px; font-size: 13px; }
section.cards { display: flex; gap: 14px; flex-wrap: wrap; background: none;
  border: none; padding: 0; }
.card { flex: 1 1 180px; background: #fff; border: 1px solid var(--line);
  border-radius: 8px; padding: 12px 16px; }
.card .value { font-size: 28px; font-weight: 600; color: var(--accent); }
.card .value small { font-size: 15px; font-weight: 400; margin-left: 2px; }
.card .label { color: var(--muted); font-size: 13px; }
.card.dp .value { color: #7b3fa0; }
.scroll { overflow-x: auto; }
table { border-collapse: collapse; font-size: 13px; }
th, td { padding: 4px 8px; border: 1px solid var(--line); }
th { background: #f0f4f8; font-weight: 600; text-align: left; }
th.row { white-space: nowrap; position: sticky; left: 0; z-index: 1; }
th.task { text-align: center; }
td.num { text-align: right; font-variant-numeric: tabular-nums; min-width: 44px; }
td.dark { color: #fff; }
td.empty { background: #fafbfc; }
.first { border-left: 2px solid #9fb3c8; }
.total { border-right: 2px solid #9fb3c8; }
figure.wide img { width: 100%; }
th.name.narrow { vertical-align: bottom; padding: 6px 2px; }
th.name.narrow span { writing-mode: vertical-rl; transform: rotate(180deg);
  white-space: nowrap; }
table.kv th { font-weight: 500; color: var(--muted); background: #f8fafc; }
table.kv td { font-family: ui-monospace, SFMono-Regular, Menlo, monospace;
  font-size: 12px; word-break: break-word; }
.tables { display: flex; gap: 28px; flex-wrap: wrap; align-items: flex-start; }
.figures { display: grid; gap: 18px; align-items: start;
  grid-template-columns: repeat(auto-fit, minmax(340px, 1fr)); }
figure { margin: 10px 0; }
figure img, .tables img, .figures img { max-width: 100%; height: auto;
  border: 1px solid var(--line); border-radius: 4px; }
figcaption { color: var(--muted); font-size: 12px; margin-top: 4px; }
.config { display: grid; grid-template-columns: repeat(auto-fill, minmax(300px, 1fr));
  gap: 6px 22px; }
.config table { width: 100%; }
.markdown h1 { font-size: 16px; margin: 6px 0; }
.markdown h2 { font-size: 15px; margin: 14px 0 6px; }
.markdown p, .markdown li { font-size: 13px; }
.markdown table { margin: 8px 0; }
.markdown code { font-size: 12px; background: #f0f4f8; padding: 0 3px;
  border-radius: 3px; word-break: break-all; }
details { margin: 6px 0; }
summary { cursor: pointer; font-weight: 600; font-size: 14px; padding: 4px 0; }
footer { color: var(--muted); font-size: 12px; margin-top: 18px; }
"""
