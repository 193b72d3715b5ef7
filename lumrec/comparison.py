"""Rows of a comparison (e.g. Base vs Base+LUM) over seeds: per-row summaries and a text table.

A row's runs are results.json dicts of one job per seed (``{"test": {"auc", "ne"}, "valid": {"auc"}}``).

Example::

    >>> runs = {"base": [{"test": {"auc": 0.70, "ne": 0.9}}, {"test": {"auc": 0.72, "ne": 0.8}}],
    ...         "lum": [{"test": {"auc": 0.75, "ne": 0.85}}, {"test": {"auc": 0.76, "ne": 0.75}}]}
    >>> summary = summarize_seeds(runs)
    >>> round(summary["lum"]["delta_auc_mean"], 4)
    0.045
    >>> print(comparison_table(summary, {"lum": "Base+LUM"}))
    row                 test AUC                NE      ΔAUC vs base  seeds
    -----------------------------------------------------------------------
    base         0.7100 ± 0.0141   0.8500 ± 0.0707                 -      2
    Base+LUM     0.7550 ± 0.0071   0.8000 ± 0.0707  +0.0450 ± 0.0071      2
"""

from __future__ import annotations

import statistics
from typing import Any

__all__ = ["comparison_table", "summarize_seeds"]


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarize_seeds(runs: dict[str, list[dict]], base: str = "base") -> dict[str, dict[str, Any]]:
    """Per row: AUC / NE mean and std over seeds, and the paired AUC delta vs `base` (mean, std)."""
    out: dict[str, dict[str, Any]] = {}
    base_auc = [r["test"]["auc"] for r in runs.get(base, [])]
    for name, results in runs.items():
        if not results:
            out[name] = {"status": "not run"}
            continue
        auc = [r["test"]["auc"] for r in results]
        ne = [r["test"]["ne"] for r in results]
        row: dict[str, Any] = {"seeds": len(results), "auc": auc, "ne": ne}
        row["auc_mean"], row["auc_std"] = _mean_std(auc)
        valid = [(r.get("valid") or {}).get("auc") for r in results]
        if all(v is not None for v in valid):  # the best epoch's validation AUC: what a row may be chosen on
            row["valid_auc"] = valid
            row["valid_auc_mean"], row["valid_auc_std"] = _mean_std(valid)
        row["ne_mean"], row["ne_std"] = _mean_std(ne)
        if base_auc and len(base_auc) == len(auc):
            deltas = [a - b for a, b in zip(auc, base_auc)]
            row["delta_auc_mean"], row["delta_auc_std"] = _mean_std(deltas)
        out[name] = row
    return out


def _cell(mean: float, std: float, seeds: int, signed: bool = False) -> str:
    text = f"{mean:+.4f}" if signed else f"{mean:.4f}"
    return f"{text} ± {std:.4f}" if seeds > 1 else text


def comparison_table(summary: dict[str, dict[str, Any]], labels: dict[str, str] | None = None, base: str = "base") -> str:
    """A text table: row, test AUC and NE (mean ± std over seeds), paired ΔAUC vs `base` (mean ± std), seeds."""
    labels = labels or {}
    width = max([len(labels.get(k, k)) for k in summary] + [10])
    head = f"{'row':<{width}}  {'test AUC':>16}  {'NE':>16}  {'ΔAUC vs base':>16}  {'seeds':>5}"
    lines = [head, "-" * len(head)]
    for name, row in summary.items():
        label = labels.get(name, name)
        if "auc_mean" not in row:
            lines.append(f"{label:<{width}}  {row.get('status', 'not run'):>16}")
            continue
        n = row["seeds"]
        delta = "-" if name == base or "delta_auc_mean" not in row else _cell(row["delta_auc_mean"], row["delta_auc_std"], n, True)
        lines.append(
            f"{label:<{width}}  {_cell(row['auc_mean'], row['auc_std'], n):>16}  {_cell(row['ne_mean'], row['ne_std'], n):>16}  "
            f"{delta:>16}  {n:>5}"
        )
    return "\n".join(lines)
