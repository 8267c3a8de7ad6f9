"""A shortened `ipro demo` end to end: real footage, the embedded base model, real face models."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.slow  # one seed per input: 11 + 11 videos, a third of the default demo's
def test_short_demo_writes_the_report(tmp_path):
    exe = str(Path(sys.executable).with_name("ipro"))
    out = subprocess.run([exe, "demo", "--out", str(tmp_path), "--steps", "2", "--seeds", "1"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    summary = json.loads((tmp_path / "demo_summary.json").read_text())
    rows = {r["run"]: r for r in summary["rows"]}
    assert summary["seeds"] == [0]  # one video per input keeps the test short; the default is 3
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
    # A rerun resumes: nothing is trained, generated or scored again (no file of those stages is rewritten).
    done = {p: p.stat().st_mtime_ns for d in ("runs", "videos", "eval") for p in (tmp_path / d).rglob("*") if p.is_file()}
    assert any(p.name == "metrics.json" for p in done) and any(p.suffix == ".mp4" for p in done)
    again = subprocess.run([exe, "demo", "--out", str(tmp_path), "--steps", "2", "--seeds", "1"], capture_output=True, text=True)
    assert again.returncode == 0, again.stderr[-2000:]
    assert {p: p.stat().st_mtime_ns for p in done} == done
    # Held-out items of another --seeds would mix into the table: refused in one line.
    from ipro.demo import write_footage
    from ipro.errors import IproError

    with pytest.raises(IproError, match="items of seeds 0 from an earlier run"):
        write_footage(tmp_path / "footage", seeds=(1,))
