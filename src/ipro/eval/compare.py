"""Compare eval runs in the shape of the paper's Table 1: rows = runs, columns = metrics.

Each cell is the run's mean; after the first row it also shows the change against the
first run: relative (%) for scores, absolute in percentage points (pp) for rates
(dynamic degree, rigid, swap, lost, coverage), where a relative change of a small
share is misleading.
"""

from __future__ import annotations

from pathlib import Path

from ipro.eval.evaluator import load_run
from ipro.eval.metrics import METRICS


def load_runs(paths: list[str | Path]) -> list[dict]:
    runs = [load_run(p) for p in paths]
    names = [r["name"] for r in runs]
    if len(set(names)) < len(names):  # same folder name in different places: use the paths
        for run, path in zip(runs, paths):
            run["name"] = str(path)
    return runs


def table(runs: list[dict], all_metrics: bool = False) -> tuple[list[str], list[list[str]]]:
    """Header and rows of strings. Metrics no run computed are left out; so are the raw
    diagnostics (NIQE, motion px, landmark and chip change) unless `all_metrics`."""
    diagnostics = {"niqe", "motion_px", "expression_motion", "appearance_change"}
    shown = [
        m for m in METRICS
        if any(r["aggregate"].get(m.key, {}).get("mean") is not None for r in runs) and (all_metrics or m.key not in diagnostics)
    ]
    header = ["run"] + [m.label for m in shown]
    base = runs[0]["aggregate"]
    rows = []
    for i, run in enumerate(runs):
        row = [run["name"]]
        for m in shown:
            value = run["aggregate"].get(m.key, {}).get("mean")
            ref = base.get(m.key, {}).get("mean")
            cell = "-" if value is None else (f"{100 * value:.2f}" if m.rate else f"{value:.4f}")
            if i > 0 and value is not None and ref is not None:
                if m.rate:
                    cell += f" ({100 * (value - ref):+.2f}pp)"
                elif ref != 0:
                    cell += f" ({100 * (value - ref) / abs(ref):+.1f}%)"
            row.append(cell)
        rows.append(row)
    return header, rows


def recognizers(runs: list[dict]) -> list[str]:
    return sorted({r["recognizer"] for r in runs})
