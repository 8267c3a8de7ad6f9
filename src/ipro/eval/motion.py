"""VBench-I2V-style temporal metrics that need no learned weights.

VBench uses RAFT (dynamic degree) and AMT (motion smoothness); no such weights ship
here, so both use OpenCV's DIS optical flow (classical, ~0.05 px on a known shift).
Flow and warping run at a working size whose longest side is at most `max_side`;
thresholds that VBench states in pixels are scaled to that size.

All functions take uint8 RGB frames shaped (F, H, W, 3).
"""

from __future__ import annotations

import cv2
import numpy as np

# VBench dynamic degree: a frame pair "moves" when the mean of its top 5% flow
# magnitudes exceeds 6 px at a 256-px short side; a video is dynamic when at least
# round(4 * n / 16) of its n sampled frames' pairs move. Frames are sampled at ~8 fps.
DYNAMIC_TOP_FRACTION = 0.05
DYNAMIC_THRESHOLD_PX_AT_256 = 6.0
DYNAMIC_SAMPLE_FPS = 8.0


def working_frames(frames: np.ndarray, max_side: int = 512) -> np.ndarray:
    """Downscale frames (area filter) so the longest side is at most `max_side`."""
    h, w = frames.shape[1:3]
    scale = max_side / max(h, w)
    if scale >= 1:
        return frames
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return np.stack([cv2.resize(f, size, interpolation=cv2.INTER_AREA) for f in frames])


def _flow(dis, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Dense flow (H, W, 2) from RGB frame a to RGB frame b."""
    return dis.calc(cv2.cvtColor(a, cv2.COLOR_RGB2GRAY), cv2.cvtColor(b, cv2.COLOR_RGB2GRAY), None)


def _dis():
    return cv2.DISOpticalFlow_create(cv2.DISOPTICAL_FLOW_PRESET_MEDIUM)


def temporal_flickering(frames: np.ndarray) -> float:
    """VBench: (255 - mean absolute difference of adjacent frames) / 255; 1 = no change.

    VBench applies it to static-scene prompts, where any change is flicker; on
    moving content it also drops with motion, so read it beside dynamic degree.
    """
    if len(frames) < 2:
        return float("nan")
    mae = float(np.mean([cv2.absdiff(a, b).mean() for a, b in zip(frames[:-1], frames[1:])]))  # uint8, no copies
    return (255.0 - mae) / 255.0


def motion_smoothness(frames: np.ndarray, max_side: int = 512) -> float:
    """How well each odd frame is predicted from its neighbours by flow interpolation.

    VBench drops the odd frames, re-creates them with a frame interpolator and scores
    (255 - MAE) / 255. Our interpolator: DIS flow between t-1 and t+1 both ways; under
    linear motion the pixel at x in frame t sits at x + F_bwd(x)/2 in t-1 and at
    x + F_fwd(x)/2 in t+1 (the flow at x stands in for the flow along the path), so we
    average the two backward warps. Jerky or shuffled motion breaks linearity and
    raises the error.
    """
    frames = working_frames(frames, max_side)
    if len(frames) < 3:
        return float("nan")
    dis = _dis()
    h, w = frames.shape[1:3]
    grid = np.stack(np.meshgrid(np.arange(w, dtype=np.float32), np.arange(h, dtype=np.float32)), -1)
    errors = []
    for t in range(1, len(frames) - 1, 2):
        prev, nxt = frames[t - 1], frames[t + 1]
        fwd, bwd = _flow(dis, prev, nxt), _flow(dis, nxt, prev)
        from_prev = _warp(prev, grid + 0.5 * bwd)
        from_next = _warp(nxt, grid + 0.5 * fwd)
        predicted = 0.5 * (from_prev + from_next)
        errors.append(np.abs(predicted - frames[t].astype(np.float32)).mean())
    return (255.0 - float(np.mean(errors))) / 255.0


def _warp(image: np.ndarray, coords: np.ndarray) -> np.ndarray:
    """Sample `image` at (x, y) `coords` (H, W, 2), bilinear, edges replicated."""
    return cv2.remap(
        image.astype(np.float32), coords[..., 0], coords[..., 1], cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE
    )


def dynamic_degree(frames: np.ndarray, fps: float | None, max_side: int = 512) -> dict:
    """VBench's dynamic degree with DIS flow instead of RAFT.

    Returns {"dynamic": 0/1, "motion_px": mean over pairs of the top-5% flow magnitude,
    rescaled to a 256-px short side so it reads against the 6 px threshold,
    "moving_pairs", "pairs", "required_pairs"}.
    """
    step = max(1, round((fps or 16.0) / DYNAMIC_SAMPLE_FPS))
    frames = working_frames(frames[::step], max_side)
    n = len(frames)
    if n < 2:
        return {"dynamic": float("nan"), "motion_px": float("nan"), "moving_pairs": 0, "pairs": 0, "required_pairs": 0}
    to_256 = 256.0 / min(frames.shape[1:3])
    dis = _dis()
    top = []
    for a, b in zip(frames[:-1], frames[1:]):
        mag = np.linalg.norm(_flow(dis, a, b), axis=-1).ravel()
        k = max(1, int(mag.size * DYNAMIC_TOP_FRACTION))
        top.append(float(np.partition(mag, -k)[-k:].mean()) * to_256)
    required = max(1, round(4 * n / 16))
    moving = int(sum(m > DYNAMIC_THRESHOLD_PX_AT_256 for m in top))
    return {
        "dynamic": float(moving >= required),
        "motion_px": float(np.mean(top)),
        "moving_pairs": moving,
        "pairs": len(top),
        "required_pairs": required,
    }
