"""The one-line errors for a JSON file ipro wrote that is broken or of another kind."""

from __future__ import annotations

import json

import pytest

from ipro.errors import IproError
from ipro.eval.evaluator import load_run
from ipro.rewards.preference import read_meta


@pytest.mark.parametrize("text, message", [
    ("{", r"metrics.json: not valid JSON .*; re-run `ipro eval`"),
    (json.dumps({"format": "something-else"}), r"metrics.json: not an ipro eval result \(format 'something-else'\)"),
    ("[1, 2]", r"metrics.json: not an ipro eval result \(format None\)"),
])
def test_a_bad_eval_result_is_named_in_one_line(tmp_path, text, message):
    (tmp_path / "metrics.json").write_text(text)
    with pytest.raises(IproError, match=message) as e:
        load_run(tmp_path)
    assert "\n" not in str(e.value)


def test_a_bad_reward_model_file_says_how_to_remake_it(tmp_path):
    (tmp_path / "reward_model.json").write_text(json.dumps({"format": "ipro-eval"}))
    with pytest.raises(IproError, match=r"reward_model.json: not an ipro identity reward model .*ipro reward-model train"):
        read_meta(tmp_path)
