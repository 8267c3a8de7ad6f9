"""Shared fixtures: one thread, fixed seeds, and the real footage that ships in packages."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def carphone() -> np.ndarray:
    """(120, 144, 176, 3) uint8: a man talking on a phone, head turning."""
    from ipro.data.footage import carphone

    return carphone()


@pytest.fixture(scope="session")
def astronaut() -> np.ndarray:
    """(512, 512, 3) uint8: one face, public domain."""
    from ipro.data.footage import astronaut

    return astronaut()


def to_tensor(frames: np.ndarray) -> torch.Tensor:
    """(..., H, W, 3) uint8 -> (..., 3, H, W) float32 in [0, 1]."""
    t = torch.from_numpy(np.ascontiguousarray(frames)).float() / 255.0
    return t.movedim(-1, -3)


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> dict:
    """The tiny random-weight Wan presets, saved in diffusers format once per session."""
    from ipro.models import TINY_FAMILIES, build_tiny

    root = tmp_path_factory.mktemp("tiny_models")
    return {family: build_tiny(family, root / family, seed=0) for family in TINY_FAMILIES}


@pytest.fixture(scope="session")
def face(astronaut):
    """The astronaut photo at 64 x 64: uint8 (H, W, 3) and float (1, 3, H, W)."""
    from PIL import Image

    small = np.asarray(Image.fromarray(astronaut).resize((64, 64), Image.Resampling.LANCZOS))
    return small, torch.from_numpy(small.copy()).permute(2, 0, 1)[None].float() / 255


@pytest.fixture(scope="session")
def dataset(tmp_path_factory):
    """Carphone through `ipro prepare` with the tiny preset: 3 kept 17-frame clips."""
    import shutil

    from ipro.data.footage import carphone_path
    from ipro.data.prepare import load_config, prepare

    root = tmp_path_factory.mktemp("curated")
    (root / "in").mkdir()
    shutil.copy(carphone_path(), root / "in" / "carphone.mp4")
    summary = prepare(root / "in", root / "data", load_config("configs/prepare-tiny.yaml"))
    assert summary["kept"] >= 2
    return root / "data"
