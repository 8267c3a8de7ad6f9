"""The held-out people: real photos and footage read from installed packages, with faces
the detector finds at the demo's size."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ipro.data import people
from ipro.errors import IproError


@pytest.fixture(scope="module")
def inputs():
    return people.heldout_people()


def test_at_least_ten_people_with_sources_and_licences(inputs):
    assert len({i.name for i in inputs}) == len(inputs)
    assert sum(i.people for i in inputs) >= 10
    assert any(i.people >= 2 for i in inputs)
    for i in inputs:
        assert i.image.dtype == np.uint8 and i.image.ndim == 3 and i.image.shape[2] == 3
        assert "==" in i.source and i.licence
        # 5:4 like the demo's 160x128 frames, so fitting them crops nothing away.
        assert i.image.shape[1] / i.image.shape[0] == pytest.approx(1.25, abs=0.02)


def test_the_detector_finds_every_person_at_the_demo_size(inputs):
    from ipro.demo import _fit
    from ipro.faces.mtcnn import MTCNN

    detector = MTCNN.from_package(min_score=0.95)
    batch = torch.from_numpy(np.stack([_fit(i.image[None])[0] for i in inputs])).permute(0, 3, 1, 2).float() / 255
    found = {i.name: len(d) for i, d in zip(inputs, detector.detect(batch))}
    assert found == {i.name: i.people for i in inputs}


def test_footage_clips_start_on_the_input_image_and_keep_the_face(inputs):
    from ipro.faces.mtcnn import MTCNN

    clips = people.heldout_clips(9)
    assert len(clips) == 2
    detector = MTCNN.from_package(min_score=0.95)
    for name, clip in clips.items():
        image = next(i.image for i in inputs if i.name == name)
        assert clip.shape == (9, *image.shape) and np.array_equal(clip[0], image)
        assert np.abs(clip[-1].astype(int) - clip[0]).mean() > 2  # real motion, not a still
        faces = detector.detect(torch.from_numpy(clip[:, ::2, ::2]).permute(0, 3, 1, 2).float() / 255)
        assert all(len(f) == 1 for f in faces)


def test_a_missing_package_is_named_in_one_line():
    src = people._Source("someone", "ipro_no_such_package", "pip install ipro-no-such-package==1.0", "a.jpg", (0, 0, 5, 4), 1, "")
    with pytest.raises(IproError) as e:
        people._file(src)
    msg = str(e.value)
    assert "\n" not in msg and "ipro_no_such_package" in msg and "pip install ipro-no-such-package==1.0" in msg
