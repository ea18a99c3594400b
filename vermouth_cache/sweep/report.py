"""The report of a sweep: one table row per grid point, and the paper's figures redrawn from them.

    from vermouth_cache.sweep.report import write_report
    paths = write_report(records, Path(OUT), title="fewshot ablations")

`records` holds one JSON-safe dict per grid point (point, dataset, task, varied, settings, status,
scores, paper, entries, seconds, heads_in_pass, run). The report writes, under OUT:

    results.csv             raw fractions, full precision, one row per point
    results.md              the same rows as percentages, the paper's number beside ours
    plots/timestep.png      the metric against t, when t is varied (the paper's Figure 5)
    plots/ablation_K.png    grouped bars for every other varied key K (the paper's Tables 5 and 6)

A plot of key K compares points that differ in K only: points are grouped by (score dataset, metric,
the settings of every other varied key), and a group is a series when it holds at least two values
of K. This works for a full cartesian grid and for one-factor-at-a-time variants alike (a prompt=null
variant forms no series in the stages plot, since no other point shares its prompt).

Same records in, same CSV and Markdown bytes out; every file is written through a temporary name.
"""

from __future__ import annotations

import csv
import io
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from vermouth_cache.core.atomic import atomic_write
from vermouth_cache.core.errors import available, install_hint
from vermouth_cache.core.progress import get_logger

log = get_logger(__name__)
_MISSING = object()


def write_report(records: list[dict], out: Path, *, title: str = "") -> dict:
    """Write results.csv, results.md and plots/ under `out`; returns their paths."""
    out = Path(out)
    (out / "plots").mkdir(parents=True, exist_ok=True)
    columns = _columns(records)
    csv_path, md_path = out / "results.csv", out / "results.md"
    _atomic_text(csv_path, _csv_text(records, columns))
    _atomic_text(md_path, _md_text(records, columns, title))
    return {"csv": str(csv_path), "md": str(md_path), "plots": [str(p) for p in write_plots(records, out / "plots")]}


# ---- values and columns ------------------------------------------------------------------------

def show(value) -> str:
    """How a setting's value is written in tables, labels and legends."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, str):
        return value
    return json.dumps(value, sort_keys=True)  # numbers as repr, lists and dicts canonically


def setting(rec: dict, key: str):
    """A point's value of `key`: the resolved settings, else what it varies; _MISSING if neither."""
    if key in rec.get("settings", {}):
        return rec["settings"][key]
    return rec.get("varied", {}).get(key, _MISSING)


def score_name(rec: dict, score: dict) -> str:
    # A seg point scores on several eval sets; only the point's own dataset goes unnamed.
    return score["metric"] if score["dataset"] == rec["dataset"] else f"{score['metric']}:{score['dataset']}"


def _first_seen(items) -> list:
    return list(dict.fromkeys(items))


@dataclass
class Columns:
    varied: list[str]
    metrics: list[str]
    paper: list[str]  # the metrics with a paper value in some record


def _columns(records: list[dict]) -> Columns:
    varied = _first_seen(k for r in records for k in r.get("varied", {}))
    # Metrics named only by a paper value (a failed point has no scores) still get a column.
    metrics = _first_seen([score_name(r, s) for r in records for s in r.get("scores", [])]
                          + [score_name(r, s) for r in records for s in r.get("paper", [])])
    paper = _first_seen(score_name(r, s) for r in records for s in r.get("paper", []))
    return Columns(varied, metrics, [m for m in metrics if m in paper])


def _by_name(rec: dict, field_name: str) -> dict[str, float]:
    return {score_name(rec, s): s["value"] for s in rec.get(field_name, [])}


def _varied_cells(rec: dict, cols: Columns) -> list[str]:
    return ["" if setting(rec, k) is _MISSING else show(setting(rec, k)) for k in cols.varied]


# ---- tables ------------------------------------------------------------------------------------

def _csv_text(records: list[dict], cols: Columns) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["point", "dataset", "task", "status", *cols.varied, "features_key", "expert_key",
                *cols.metrics, *(f"paper {m}" for m in cols.paper), "seconds", "heads_in_pass", "run"])
    for r in records:
        ours, paper = _by_name(r, "scores"), _by_name(r, "paper")
        entries = r.get("entries", {})
        w.writerow([r["point"], r["dataset"], r["task"], r["status"], *_varied_cells(r, cols),
                    entries.get("features", ""), entries.get("expert", ""),
                    *(_raw(ours.get(m)) for m in cols.metrics), *(_raw(paper.get(m)) for m in cols.paper),
                    _raw(r.get("seconds")), _raw(r.get("heads_in_pass")), r.get("run", "")])
    return buf.getvalue()


def _raw(value) -> str:
    return "" if value is None else repr(value)  # repr: the shortest text that reads back exactly


def _scale(metric: str) -> float:
    """Shares are shown as percentages; a metric in its own unit (depth's RMSE in metres) as it is."""
    from vermouth_cache.train.tasks import TASKS

    return 1.0 if any(t.main_metric == metric and not t.percent for t in TASKS.values()) else 100.0


def _pct(value, metric: str = "") -> str:
    return f"{_scale(metric) * value:.{2 if _scale(metric) == 100 else 3}f}"


def _md_metric(ours, paper, metric: str = "") -> str:
    cell = "" if ours is None else _pct(ours, metric)
    if paper is not None:
        cell = f"{cell} (paper {_pct(paper, metric)})".strip()
    return cell


def _md_text(records: list[dict], cols: Columns, title: str) -> str:
    done = sum(r["status"] == "done" for r in records)
    lines = [f"# {title}", ""] if title else []
    lines += [f"{len(records)} points: {done} done, {len(records) - done} failed.", ""]
    header = ["point", "dataset", "task", "status", *cols.varied, "features", "expert", *cols.metrics,
              "seconds", "heads", "run"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in records:
        ours, paper = _by_name(r, "scores"), _by_name(r, "paper")
        entries = r.get("entries", {})
        seconds = "" if r.get("seconds") is None else f"{r['seconds']:.1f}"
        cells = [r["point"], r["dataset"], r["task"], r["status"], *_varied_cells(r, cols),
                 entries.get("features", "")[:12], entries.get("expert", "")[:12],
                 *(_md_metric(ours.get(m), paper.get(m), m) for m in cols.metrics),
                 seconds, _raw(r.get("heads_in_pass")), r.get("run", "")]
        lines.append("| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines) + "\n"


# ---- series ------------------------------------------------------------------------------------

@dataclass
class Series:
    dataset: str
    metric: str
    others: dict[str, str]  # the other varied keys' values shared by this series' points
    label: str = ""
    ours: dict[str, float] = field(default_factory=dict)  # shown value of K -> score
    paper: dict[str, float] = field(default_factory=dict)
    raw: dict[str, object] = field(default_factory=dict)  # shown value of K -> the value, for sorting


def series_for(records: list[dict], key: str) -> list[Series]:
    """The series of a plot of `key`: points of equal (score dataset, metric, other varied settings),
    mapped value-of-key -> score; only those with at least two values of `key`."""
    varied = _first_seen(k for r in records for k in r.get("varied", {}))
    others = [k for k in varied if k != key]
    groups: dict[tuple, Series] = {}
    for r in records:
        value = setting(r, key)
        if r["status"] != "done" or value is _MISSING:
            continue
        context = {k: show(setting(r, k)) if setting(r, k) is not _MISSING else "?" for k in others}
        paper = {(p["dataset"], p["metric"]): p["value"] for p in r.get("paper", [])}
        for s in r.get("scores", []):
            gid = (s["dataset"], s["metric"], tuple(context.values()))
            ser = groups.setdefault(gid, Series(s["dataset"], s["metric"], context))
            shown = show(value)
            if shown in ser.ours:
                continue  # two points alike in every varied setting: keep the first, deterministically
            ser.ours[shown], ser.raw[shown] = s["value"], value
            if (s["dataset"], s["metric"]) in paper:
                ser.paper[shown] = paper[(s["dataset"], s["metric"])]
    kept = [s for s in groups.values() if len(s.ours) >= 2]
    # Name a series by what tells it apart: its dataset, the metric and other settings only if they vary.
    spread = [k for k in others if len({s.others[k] for s in kept}) > 1]
    many_metrics = len({s.metric for s in kept}) > 1
    for s in kept:
        parts = [s.dataset] + ([s.metric] if many_metrics else []) + [f"{k}={s.others[k]}" for k in spread]
        s.label = " ".join(parts)
    return kept


# ---- plots -------------------------------------------------------------------------------------

def plot_name(key: str) -> str:
    return "timestep.png" if key == "t" else "ablation_" + re.sub(r"[^A-Za-z0-9_.-]+", "_", key) + ".png"


def write_plots(records: list[dict], plots: Path) -> list[Path]:
    if not available("matplotlib"):  # the tables are the result; the plots redraw them
        log.warning("%s: no plots, drawing them needs matplotlib: %s", plots, install_hint("matplotlib"))
        return []
    written = []
    for key in _first_seen(k for r in records for k in r.get("varied", {})):
        series = series_for(records, key)
        if not series:
            continue
        path = plots / plot_name(key)
        fig = (_timestep_figure if key == "t" else _ablation_figure)(series, key)
        atomic_write(path, write=lambda tmp: fig.savefig(tmp, format="png", metadata={"Software": None}))
        written.append(path)
    # A plot this sweep no longer draws would otherwise stay and contradict the tables.
    for stale in sorted(set(plots.glob("ablation_*.png")) | set(plots.glob("timestep.png"))):
        if stale not in written:
            stale.unlink()
    return written


def _figure(size):
    # A bare Figure on the Agg canvas: no pyplot, so no global backend switch and no figure to close.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=size, dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _ylabel(series: list[Series]) -> str:
    return ", ".join(_first_seen(s.metric for s in series)) + (" (%)" if _scale(series[0].metric) == 100 else "")


def _timestep_figure(series: list[Series], key: str):
    fig = _figure((6.4, 4.0))
    ax = fig.add_subplot()
    for i, s in enumerate(series):
        color = f"C{i % 10}"
        ts = sorted(s.ours, key=lambda v: _number(s.raw[v]))
        ax.plot([_number(s.raw[t]) for t in ts], [_scale(s.metric) * s.ours[t] for t in ts], "o-", color=color, label=s.label)
        tp = [t for t in ts if t in s.paper]
        if tp:
            ax.plot([_number(s.raw[t]) for t in tp], [_scale(s.metric) * s.paper[t] for t in tp], "o--", color=color,
                    markerfacecolor="none", label=f"{s.label} (paper)")
    ax.set_xlabel("t")
    ax.set_ylabel(_ylabel(series))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def _number(value) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return float("inf")  # a non-numeric t sorts last rather than failing the whole report


def _ablation_figure(series: list[Series], key: str):
    values = _first_seen(v for s in series for v in s.ours)
    width = 0.8 / len(values)
    fig = _figure((max(4.8, 1.2 + 0.5 * len(values) * len(series)), 4.0))
    ax = fig.add_subplot()
    paper_drawn = False
    for j, v in enumerate(values):
        xs = [i - 0.4 + (j + 0.5) * width for i, s in enumerate(series) if v in s.ours]
        ys = [_scale(s.metric) * s.ours[v] for s in series if v in s.ours]
        bars = ax.bar(xs, ys, width * 0.9, color=f"C{j % 10}", label=f"{key}={v}")
        ax.bar_label(bars, fmt="%.1f", fontsize=7)
        # The paper's number as a black tick across our bar: the gap reads at a glance.
        for x, s in zip(xs, [s for s in series if v in s.ours]):
            if v in s.paper:
                ax.hlines(_scale(s.metric) * s.paper[v], x - width * 0.45, x + width * 0.45, colors="black", lw=2,
                          label=None if paper_drawn else "paper")
                paper_drawn = True
    # one line per part of a series label ("demo", "t=10", "head=linear"): long labels never overlap
    ax.set_xticks(range(len(series)), [s.label.replace(" ", "\n") for s in series], fontsize=8)
    ax.set_ylabel(_ylabel(series))
    ax.set_title(f"ablation: {key}", fontsize=9)
    # Headroom above the tallest bar or tick, so the legend in one row up there covers neither.
    top = max(_scale(s.metric) * v for s in series for v in [*s.ours.values(), *s.paper.values()])
    ax.set_ylim(0, 1.3 * top if top > 0 else 1.0)
    ax.legend(fontsize=8, loc="upper center", ncol=len(values) + paper_drawn)
    fig.tight_layout()
    return fig


# ---- files -------------------------------------------------------------------------------------

def _atomic_text(path: Path, text: str) -> None:
    atomic_write(path, text)
