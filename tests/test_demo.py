"""A shortened `ipro demo` end to end: real footage, the embedded base model, real face models."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.slow
def test_short_demo_writes_the_report(tmp_path):
    exe = str(Path(sys.executable).with_name("ipro"))
    out = subprocess.run([exe, "demo", "--out", str(tmp_path), "--steps", "2", "--no-ablations"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    summary = json.loads((tmp_path / "demo_summary.json").read_text())
    rows = {r["run"]: r for r in summary["rows"]}
    assert set(rows) == {"base", "ipro", "ground truth (ceiling)"}
    # Held out: carphone clips and at least 10 people no model saw, one picture of several.
    inputs = summary["inputs"]
    unseen = [a for a in inputs.values() if a["unseen"]]
    assert sum(a["people"] for a in unseen) >= 10 and any(a["people"] >= 2 for a in unseen)
    assert rows["base"]["face_sim"]["n"] == len(inputs)
    # The base model draws faces the detector finds, and its identity drifts below the
    # ground truth's own FaceSim (the gap IPRO is meant to close).
    assert rows["base"]["face_coverage"]["value"] > 0.5
    gt = rows["ground truth (ceiling)"]["face_sim_gt"]
    assert 0.9 < rows["base"]["face_sim_gt"]["value"] < gt["value"]
    assert gt["n"] == sum(a["ground_truth"] for a in inputs.values()) >= 6
    for r in rows:
        for key in ("face_sim", "dynamic_degree", "rigid"):
            cell = rows[r][key]
            assert cell["value"] is None or cell["ci_low"] <= cell["value"] <= cell["ci_high"]
    html = (tmp_path / "demo_report.html").read_text()
    assert "gap closed" in html and "curves.png" in html and "licence" in html
    for png in ("curves.png", "carphone_80_s0.png", "astronaut_s0.png", "feat_group_left_s0.png"):
        assert (tmp_path / "report" / png).stat().st_size > 1000
    # A rerun resumes: nothing is trained or generated again.
    again = subprocess.run([exe, "demo", "--out", str(tmp_path), "--steps", "2", "--no-ablations"], capture_output=True, text=True)
    assert again.returncode == 0 and "ipro train" not in again.stdout
