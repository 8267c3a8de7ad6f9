"""`ipro demo --grpo` at a reduced size: the learned identity reward model trained on
synthetic pairs from the demo footage (one- and two-person clips), one GRPO step on one
held-out multi-person input, and the before/after rows. Real footage, real face models,
the embedded base model."""

from __future__ import annotations

import math

import pytest
import torch

from ipro.demo_grpo import multi_person_items, run_grpo_demo


@pytest.mark.slow
def test_grpo_demo_rows_and_reward_model(tmp_path):
    from ipro.data.prepare import load_config, prepare
    from ipro.demo import _config_path, write_footage
    from ipro.eval import Evaluator
    from ipro.models import resolve_model_path
    from ipro.rewards.learned import FEATURES, IdentityRewardModel

    train, heldout = write_footage(tmp_path / "footage")
    prepare(train, tmp_path / "data", load_config(_config_path("prepare-tiny.yaml")))
    items = multi_person_items(heldout)
    assert items and all("_s" in p.stem for p in items)
    one = [p for p in items if p.stem.endswith("_s0")][:1]  # one input, one seed
    report = tmp_path / "demo_report.html"
    report.write_text("<!doctype html><body><h1>ipro demo</h1></body>")
    result = run_grpo_demo(tmp_path, resolve_model_path("builtin", tmp_path), heldout, Evaluator(), report=report, log=lambda *_: None,
                           items=one, num_frames=5, overrides={"optim.steps": 1, "grpo.group_size": 4, "run.checkpoint_every": 1})

    # The reward model ranks every held-out synthetic pair right, the two-person ones too:
    # the original clip above its identity swap and above one person's face pasted on the other.
    held = result["reward_model"]
    assert held["by_kind"]["swap"] == 1.0 and held["by_kind"]["duplicate"] == 1.0 and held["accuracy"] >= 0.9
    # Features that never varied in training (all synthetic pairs keep every face) are
    # ignored rather than amplified 1000-fold on a generated video.
    rm = IdentityRewardModel.load(tmp_path / "grpo" / "reward-model")
    assert math.isinf(rm.feature_std[FEATURES.index("coverage")]) and torch.isfinite(rm.feature_std[FEATURES.index("own_cos")])

    rows = {r["run"]: r for r in result["rows"]}
    assert set(rows) == {"base", "identity-grpo"} and rows["base"]["videos"] == 1
    for r in rows.values():
        for key in ("rm_score", "face_sim", "face_coverage"):
            assert math.isfinite(r[key]), (r["run"], key)
        # A generated video scores within the spread of the training videos' scores.
        assert abs(r["rm_score"]) < 10
        assert 0.5 < r["face_sim"] <= 1.0  # every input person found and matched
    assert math.isfinite(rows["identity-grpo"]["face_sim_change"])
    assert len(result["training_reward"]) == 1 and math.isfinite(result["training_reward"][0])
    page = report.read_text()
    assert "Identity-GRPO on the multi-person inputs" in page and page.rstrip().endswith("</body>")
    assert (tmp_path / "report" / f"grpo_{one[0].stem}.png").stat().st_size > 1000
