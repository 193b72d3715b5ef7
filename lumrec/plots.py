"""Pictures from result files: training curves, the daily next-day AUC line, Base vs Base+LUM bars.

    lumrec plot RUN_OR_RESULT ... --out DIR

Each input is recognised by what it holds:

- a training run folder (``results.json`` with a ``history``; pretrain, rank or retrieve), drawn
  as ``<name>_curves.png``: the training loss per step from its TensorBoard scalars (``tb/``)
  where they exist, else per epoch from the history, beside the validation metric per evaluation;
- a daily run folder (``report.tsv``), drawn with every other daily folder given as one line per
  folder in ``daily_auc.png`` (next-day AUC per day);
- a ``warm_start`` results file, drawn as ``warm_start_<data set>.png``: next-day AUC per day, one
  line per row (DLRM from scratch, warm-started, with LUM ...), mean over seeds;
- a Base vs Base+LUM summary: a ``lum_tables`` results file (one group of bars per data set) or a
  demo folder (``rank/summary.json``), drawn as ``base_vs_lum.png`` (mean AUC, one bar per row,
  error bars = std over seeds).

    >>> import json, tempfile, pathlib
    >>> run = pathlib.Path(tempfile.mkdtemp())
    >>> _ = (run / "results.json").write_text(json.dumps({"history": [
    ...     {"epoch": 0, "step": 10, "train_loss": 0.6, "valid": {"auc": 0.70}},
    ...     {"epoch": 1, "step": 20, "train_loss": 0.5, "valid": {"auc": 0.72}}]}))
    >>> [p.suffix for p in plot_paths([run], run / "png")]
    ['.png']
"""

from __future__ import annotations

import csv
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

log = logging.getLogger("lumrec.plot")

__all__ = ["Curve", "bars_from_lum_tables", "curves_from_run", "daily_auc", "plot_paths", "load_scalars"]

# Headless: plots are files, never windows.
_BACKEND = "Agg"


@dataclass
class Curve:
    """One line of a chart: x values, y values and a label."""

    label: str
    x: list[float] = field(default_factory=list)
    y: list[float] = field(default_factory=list)


def _pyplot():
    # matplotlib is imported only when a picture is drawn: the training jobs never need it.
    import matplotlib

    matplotlib.use(_BACKEND)
    import matplotlib.pyplot as plt

    return plt


def load_scalars(tb_dir: Path, tag: str) -> Curve | None:
    """Scalar `tag` of the TensorBoard event files under `tb_dir` as a curve (None when absent)."""
    if not tb_dir.is_dir() or not any(tb_dir.glob("events.out.tfevents.*")):
        return None
    # tensorboard is an optional reader here; it is part of the pinned stack.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tb_dir), size_guidance={"scalars": 0})
    acc.Reload()
    if tag not in acc.Tags().get("scalars", []):
        return None
    events = acc.Scalars(tag)
    return Curve(tag, [float(e.step) for e in events], [float(e.value) for e in events])


def _metric_of(entry: dict[str, Any]) -> tuple[str, float] | None:
    """The validation metric of one history entry: rank/retrieve ({'valid': {'auc': ..}}) or pretrain ({'hr@10': ..})."""
    valid = entry.get("valid")
    if isinstance(valid, dict):
        for key in ("auc", "hr@10", "recall@10"):
            if key in valid:
                return f"valid {key}", float(valid[key])
    if "hr@10" in entry:
        return "valid hr@10", float(entry["hr@10"])
    return None


def curves_from_run(run: Path) -> tuple[Curve | None, Curve | None]:
    """(training loss, validation metric) of a run folder; the loss per step from tb/ when it was logged."""
    results_path = run / "results.json"
    history = json.loads(results_path.read_text()).get("history", []) if results_path.exists() else []
    loss = load_scalars(run / "tb", "train/loss")
    if loss is not None:
        loss.label = "train loss (per logged step)"
    else:
        points = [(h["step"], h["train_loss"]) for h in history if "train_loss" in h]
        if points:
            loss = Curve("train loss (epoch mean)", [float(s) for s, _ in points], [float(v) for _, v in points])
    metric = None
    for entry in history:
        found = _metric_of(entry)
        if found is None:
            continue
        if metric is None:
            metric = Curve(found[0])
        metric.x.append(float(entry.get("step", len(metric.x))))
        metric.y.append(found[1])
    return loss, metric


def draw_curves(run: Path, out: Path, name: str | None = None) -> Path:
    """`<name>_curves.png` (default: the run folder's name): loss and validation metric against training steps."""
    loss, metric = curves_from_run(run)
    if loss is None and metric is None:
        raise ValueError(f"{run}: no training history (results.json 'history') and no tb/ train/loss scalars to plot")
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    if loss is not None:
        ax.plot(loss.x, loss.y, color="tab:blue", label=loss.label)
        ax.set_ylabel("training loss")
    ax.set_xlabel("step")
    if metric is not None:
        right = ax.twinx()
        right.plot(metric.x, metric.y, "o-", color="tab:orange", label=metric.label)
        right.set_ylabel(metric.label)
        handles = ax.get_legend_handles_labels()[0] + right.get_legend_handles_labels()[0]
        ax.legend(handles, [h.get_label() for h in handles], loc="center right")
    elif loss is not None:
        ax.legend()
    ax.set_title(f"training: {name or run.name}")
    path = out / f"{name or run.name}_curves.png"
    _save(fig, path)
    return path


def daily_auc(folders: Sequence[Path]) -> list[Curve]:
    """One curve per daily run folder: next-day AUC per day of its report.tsv."""
    curves = []
    for folder in folders:
        with open(folder / "report.tsv", newline="") as f:
            rows = list(csv.DictReader(f, delimiter="\t"))
        if rows and "next_day_auc" not in rows[0]:
            raise ValueError(f"{folder / 'report.tsv'}: no next_day_auc column (has {list(rows[0])})")
        curve = Curve(folder.name)
        for row in rows:
            curve.x.append(row["ds"])  # type: ignore[arg-type]  # days are categorical labels
            curve.y.append(float(row["next_day_auc"]))
        curves.append(curve)
    return curves


def warm_start_lines(path: Path, datasets: Sequence[str] | None = None) -> dict[str, list[Curve]]:
    """Per data set of a warm_start results file: one next-day AUC curve per row (mean over its seeds)."""
    data = json.loads(path.read_text())
    names = list(datasets) if datasets is not None else sorted(data)
    unknown = [n for n in names if n not in data]
    if unknown:
        raise ValueError(f"{path}: no data set {unknown} (has {sorted(data)})")
    out = {}
    for name in names:
        rows = data[name].get("rows", {})
        out[name] = [Curve(row.get("label", key), list(row["eval_days"]), [float(v) for v in row["next_day_auc"]])
                     for key, row in rows.items() if "next_day_auc" in row]
    return out


def draw_daily(folders: Sequence[Path], out: Path) -> Path:
    """`daily_auc.png`: next-day AUC per day, one line per daily run."""
    return draw_day_lines(daily_auc(folders), "daily pipeline: next-day AUC", out / "daily_auc.png")


def draw_day_lines(curves: Sequence[Curve], title: str, path: Path) -> Path:
    """Next-day AUC per day, one line per curve (days are labels, placed by position)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.5))
    days = sorted({day for curve in curves for day in curve.x})
    few = len(curves) <= 2  # values are written on the points only where they stay readable
    for curve in curves:
        xs = [days.index(day) for day in curve.x]
        ax.plot(xs, curve.y, "o-", label=curve.label)
        for x, y in zip(xs, curve.y) if few else ():
            ax.annotate(f"{y:.4f}", (x, y), textcoords="offset points", xytext=(0, 6), ha="center", fontsize=8)
    ax.set_xticks(range(len(days)), days, rotation=20 if len(days) > 4 else 0)
    ax.set_xlabel("day the AUC is measured on (the model trained on the day before)")
    ax.set_ylabel("next-day AUC")
    ax.set_title(title)
    ax.legend(fontsize=8)
    _save(fig, path)
    return path


@dataclass
class BarGroup:
    """Bars of one data set: row label -> (mean AUC, std over seeds)."""

    name: str
    bars: dict[str, tuple[float, float]]


def bars_from_lum_tables(path: Path, datasets: Sequence[str] | None = None) -> list[BarGroup]:
    """Base vs Base+LUM test AUC per data set of a lum_tables results file.

    Base+LUM is the LUM row validation AUC selected where several LUM rows were run
    (`selected_on_validation`), else the `lum` row. `datasets` picks and orders data sets by
    name; by default every one except the tiny smoke rows.
    """
    data = json.loads(path.read_text())
    entries = {key.split("/")[0]: entry for key, entry in sorted(data.items())
               if isinstance(entry, dict) and "base" in entry.get("rows", {})}
    if datasets is None:
        names = [name for name in entries if not name.endswith("-tiny")]
    else:
        names = list(datasets)
        unknown = [n for n in names if n not in entries]
        if unknown:
            raise ValueError(f"{path}: no data set {unknown} (has {sorted(entries)})")
    groups = []
    for name in names:
        entry = entries[name]
        rows = entry["rows"]
        chosen = entry.get("selected_on_validation") or rows.get("lum")
        if chosen is None:
            continue
        groups.append(BarGroup(name, {
            "Base": (float(rows["base"]["auc_mean"]), float(rows["base"].get("auc_std", 0.0))),
            "Base+LUM": (float(chosen["auc_mean"]), float(chosen.get("auc_std", 0.0))),
        }))
    if not groups:
        raise ValueError(f"{path}: no data set with a base and a LUM row (a lum_tables results file has 'rows' per data set)")
    return groups


def bars_from_summary(path: Path, name: str) -> list[BarGroup]:
    """Base vs Base+LUM of one seed summary (`summarize_seeds` output, e.g. the demo's rank/summary.json)."""
    summary = json.loads(path.read_text())
    if "base" not in summary or "lum" not in summary:
        raise ValueError(f"{path}: a summary needs rows 'base' and 'lum' (has {sorted(summary)})")
    bars = {label: (float(summary[row]["auc_mean"]), float(summary[row].get("auc_std", 0.0)))
            for row, label in (("base", "Base"), ("lum", "Base+LUM"))}
    return [BarGroup(name, bars)]


def draw_bars(groups: Sequence[BarGroup], out: Path) -> Path:
    """`base_vs_lum.png`: grouped bars of test AUC, annotated with the Base+LUM gain."""
    plt = _pyplot()
    labels = list(groups[0].bars)
    width = 0.8 / len(labels)
    fig, ax = plt.subplots(figsize=(max(5.0, 1.6 * len(groups) + 2), 4))
    lows = []
    for i, label in enumerate(labels):
        xs = [g + (i - (len(labels) - 1) / 2) * width for g in range(len(groups))]
        means = [grp.bars[label][0] for grp in groups]
        stds = [grp.bars[label][1] for grp in groups]
        lows += [m - s for m, s in zip(means, stds)]
        ax.bar(xs, means, width, yerr=stds, capsize=3, label=label)
    for g, grp in enumerate(groups):
        base, lum = grp.bars[labels[0]][0], grp.bars[labels[-1]][0]
        top = max(m + s for m, s in grp.bars.values())
        ax.annotate(f"{lum - base:+.4f}", (g, top), textcoords="offset points", xytext=(0, 4), ha="center", fontsize=8)
    # AUCs differ in the second decimal: a zero-based axis would hide every difference.
    floor = math.floor(min(lows) * 50) / 50 - 0.02
    ax.set_ylim(bottom=max(0.0, floor))
    ax.set_xticks(range(len(groups)), [grp.name for grp in groups], rotation=20, ha="right")
    ax.set_ylabel("test AUC (mean over seeds)")
    ax.set_title("Base vs Base+LUM")
    ax.legend(loc="upper left")
    path = out / "base_vs_lum.png"
    _save(fig, path)
    return path


def _save(fig: Any, path: Path) -> None:
    """Write the PNG through a temporary name, so a killed run never leaves a half-written picture."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    fig.tight_layout()
    fig.savefig(tmp, format="png", dpi=110)
    _pyplot().close(fig)
    tmp.replace(path)


def _is_warm_start_file(path: Path) -> bool:
    """Whether a results file holds daily AUC rows (benchmarks/warm_start.py) rather than Base vs Base+LUM rows."""
    data = json.loads(path.read_text())
    return any(isinstance(e, dict) and any("next_day_auc" in r for r in e.get("rows", {}).values()) for e in data.values())


def plot_paths(inputs: Sequence[Path], out: Path, datasets: Sequence[str] | None = None) -> list[Path]:
    """Draw what each input holds (module docstring) into `out`; returns the PNGs written.

    `datasets`: the data sets (and their order) of a lum_tables results file's bars.
    """
    written: list[Path] = []
    daily: list[Path] = []
    curve_names: set[str] = set()
    for path in map(Path, inputs):
        if not path.exists():
            raise FileNotFoundError(f"lumrec plot: {path} does not exist")
        if path.is_file() and _is_warm_start_file(path):
            for name, curves in warm_start_lines(path, datasets).items():
                written.append(draw_day_lines(curves, f"warm start, {name}: next-day AUC (mean over seeds)",
                                              out / f"warm_start_{name}.png"))
        elif path.is_file():
            written.append(draw_bars(bars_from_lum_tables(path, datasets), out))
        elif (path / "report.tsv").exists():
            daily.append(path)
        elif (path / "rank" / "summary.json").exists():  # a demo folder: its Base vs Base+LUM and its daily run
            written.append(draw_bars(bars_from_summary(path / "rank" / "summary.json", "synthetic (demo)"), out))
            if (path / "daily" / "report.tsv").exists():
                daily.append(path / "daily")
        elif (path / "results.json").exists() or (path / "tb").is_dir():
            # Two runs of one name (rank/lum, daily/lum) keep apart: the parent folder joins the name.
            name = path.name if path.name not in curve_names else f"{path.parent.name}_{path.name}"
            curve_names.add(name)
            written.append(draw_curves(path, out, name))
        else:
            raise ValueError(f"lumrec plot: {path} is neither a run folder (results.json or tb/), a daily folder "
                             "(report.tsv), a demo folder (rank/summary.json) nor a lum_tables results file")
    if daily:
        written.append(draw_daily(daily, out))
    for p in written:
        log.info("wrote %s", p)
    return written
