"""One word per idea (issue #18.6): config keys and values that were renamed are refused
with one line naming the new word."""

from __future__ import annotations

import pytest

from ipro.errors import IproError
from ipro.train.config import load_config


def test_reward_mode_reference_is_refused_naming_input_face(tmp_path):
    with pytest.raises(IproError) as err:
        load_config(None, {"data.dataset": str(tmp_path), "reward.mode": "reference"})
    assert "\n" not in str(err.value)
    assert "reward.mode: 'reference' is now 'input_face'" in str(err.value)
    assert load_config(None, {"data.dataset": str(tmp_path), "reward.mode": "input_face"}).reward.mode == "input_face"


def test_model_reference_images_is_refused_naming_subject_images(tmp_path):
    with pytest.raises(IproError) as err:
        load_config(None, {"data.dataset": str(tmp_path), "model.reference_images": 2})
    assert str(err.value) == ("config: model.reference_images: renamed to model.subject_images (images of the people "
                              "to keep); rename the key")
    assert load_config(None, {"data.dataset": str(tmp_path), "model.subject_images": 2}).model.subject_images == 2
