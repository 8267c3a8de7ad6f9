"""Blockiness (ipro.eval.blockiness) on real footage, with and without an 8x8 block artefact."""

from __future__ import annotations

import numpy as np
import pytest

from ipro.data.video import read_video, write_video
from ipro.eval.blockiness import blockiness


def with_blocks(frames: np.ndarray, phase: int = 0, amplitude: float = 8.0, block: int = 8) -> np.ndarray:
    """Each block x block patch (grid starting at `phase`) of each frame shifted by its own
    random colour offset: the seams of a model that makes every patch from one token."""
    f, h, w, _ = frames.shape
    offsets = np.random.default_rng(0).normal(0, amplitude, (f, h // block + 2, w // block + 2, 3))
    start = (block - phase) % block
    field = offsets.repeat(block, 1).repeat(block, 2)[:, start : start + h, start : start + w]
    return np.clip(frames + field, 0, 255).round().astype(np.uint8)


@pytest.fixture(scope="module")
def clip(carphone) -> np.ndarray:
    return carphone[:30]


def test_real_footage_has_no_grid_at_any_phase(clip):
    # Measured on carphone's luma: 0.94-1.02 over the 8 phases.
    for phase in range(8):
        assert 0.9 < blockiness(clip, phase=phase) < 1.1


def test_block_artefact_is_found_at_its_phase_only(clip):
    # Offsets of sd 8 levels per channel: measured 1.34 at their phase, <= 1.03 elsewhere
    # (the two phases beside it read low: their neighbour is the seam).
    for artefact_phase in (0, 3):
        blocky = with_blocks(clip, artefact_phase)
        scores = [blockiness(blocky, phase=p) for p in range(8)]
        assert scores[artefact_phase] > 1.25
        assert max(s for p, s in enumerate(scores) if p != artefact_phase) < 1.1
        assert scores[artefact_phase] > blockiness(clip, phase=artefact_phase) + 0.2


def test_stronger_artefact_reads_higher(clip):
    scores = [blockiness(with_blocks(clip, amplitude=a)) for a in (2.0, 4.0, 8.0)]
    assert scores == sorted(scores) and scores[0] > blockiness(clip)


def test_codec_round_trip_keeps_the_difference(clip, tmp_path):
    # H.264 puts a little of its own grid on the same phase (measured ~1.1 on the demo's
    # clips); the artefact must still stand out after the codec.
    write_video(tmp_path / "real.mp4", clip, fps=30)
    write_video(tmp_path / "blocky.mp4", with_blocks(clip), fps=30)
    real, blocky = (blockiness(read_video(tmp_path / f"{n}.mp4")[0]) for n in ("real", "blocky"))
    assert real < 1.2 and blocky > real + 0.15


def test_flat_and_bad_inputs():
    assert blockiness(np.full((2, 32, 40, 3), 90, np.uint8)) == 1.0
    assert np.isnan(blockiness(np.zeros((1, 8, 8, 3), np.uint8)))  # no grid line with two neighbours
    with pytest.raises(ValueError, match="phase"):
        blockiness(np.zeros((1, 16, 16, 3), np.uint8), phase=8)
    with pytest.raises(ValueError, match=r"\(F, H, W, 3\)"):
        blockiness(np.zeros((16, 16, 3), np.uint8))
