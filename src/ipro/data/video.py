"""Read and write videos and images.

Videos go through PyAV. Frames are uint8 numpy arrays shaped (F, H, W, 3), RGB.
Every write is atomic: the file appears complete under its final name or not at all.
"""

from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Iterator

import numpy as np

from ipro.errors import IproError

VIDEO_EXTENSIONS = {".mp4", ".mov", ".avi", ".mkv", ".webm", ".m4v"}
IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff"}


def is_video(path: str | Path) -> bool:
    return Path(path).suffix.lower() in VIDEO_EXTENSIONS


def is_image(path: str | Path) -> bool:
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to `path`; rename it into place on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def read_image(path: str | Path) -> np.ndarray:
    """An image as (H, W, 3) uint8 RGB."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise IproError(f"{path}: no such file; check the path")
    try:
        with Image.open(path) as im:
            im = ImageOps.exif_transpose(im)
            return np.asarray(im.convert("RGB")).copy()
    except (UnidentifiedImageError, OSError) as e:
        raise IproError(f"{path}: not a readable image ({e.__class__.__name__}); use PNG or JPEG") from None


def to_tensor(frames: np.ndarray):
    """uint8 pixels (..., H, W, 3) -> float32 torch tensor (..., 3, H, W) in [0, 1]."""
    import torch

    return torch.from_numpy(np.ascontiguousarray(frames)).float().div(255).movedim(-1, -3)


def write_image(path: str | Path, image: np.ndarray) -> None:
    from PIL import Image

    with atomic_path(path) as tmp:
        Image.fromarray(np.asarray(image, dtype=np.uint8)).save(tmp, format="PNG" if Path(path).suffix.lower() == ".png" else None)


def _rotation(stream, frame=None) -> int:
    """Clockwise display rotation in degrees (phone videos).

    FFmpeg >= 7 keeps it only in the display matrix, which PyAV exposes per frame as a
    counterclockwise angle; older files may still carry the legacy `rotate` tag.
    """
    if frame is not None and getattr(frame, "rotation", 0):
        return int(-frame.rotation) % 360
    value = stream.metadata.get("rotate") if stream.metadata else None
    try:
        return int(value) % 360 if value else 0
    except ValueError:
        return 0


def _open_video(path: Path):
    """Open a container that has a video stream, or raise a one-line IproError."""
    import av

    if not path.is_file():
        raise IproError(f"{path}: no such file; check the path")
    if path.stat().st_size == 0:
        raise IproError(f"{path}: empty file; remove it or replace it with a real video")
    try:
        container = av.open(str(path))
    except (av.error.FFmpegError, UnicodeDecodeError) as e:
        raise IproError(f"{path}: not a readable video ({e.__class__.__name__}); re-encode it as H.264 mp4") from None
    if not container.streams.video:
        container.close()
        raise IproError(f"{path}: has no video stream; pass a video or an image")
    return container


@dataclass
class VideoInfo:
    """What the container says about a video, read without decoding it.

    width, height: decoded size before rotation. fps: average rate. frames and
    duration_s come from the packets' timestamps. variable_fps: more than 10% of the
    gaps between frames differ from the typical gap by over 20% (screen recordings,
    phones). truncated: the packets cover less than 90% of the duration the header
    declares (an interrupted download or copy).
    """

    width: int
    height: int
    fps: float
    frames: int
    duration_s: float
    pix_fmt: str
    codec: str
    variable_fps: bool
    truncated: bool


def probe_video(path: str | Path) -> VideoInfo:
    """Size, rate, length and pixel format of a video by demuxing (no decoding)."""
    import av

    path = Path(path)
    with _open_video(path) as container:
        stream = container.streams.video[0]
        fps = float(stream.average_rate or stream.guessed_rate or 25.0)
        try:
            pts = sorted(float(p.pts * stream.time_base) for p in container.demux(stream) if p.pts is not None)
        except av.error.FFmpegError:
            pts = []  # corrupt packets: decoding will say how much is usable
        gaps = np.diff(pts) if len(pts) > 2 else np.zeros(0)
        # Robust to a few odd gaps (a dropped frame, a cut-off B-frame group at the end).
        variable = bool(len(gaps) and np.mean(np.abs(gaps - np.median(gaps)) > 0.2 * np.median(gaps)) > 0.1)
        declared = float(container.duration or 0) / 1e6
        duration = (pts[-1] - pts[0] + 1.0 / fps) if pts else declared
        cc = stream.codec_context
        return VideoInfo(
            width=int(cc.width), height=int(cc.height), fps=fps, frames=len(pts), duration_s=duration,
            pix_fmt=str(cc.pix_fmt), codec=str(cc.name), variable_fps=variable,
            truncated=bool(declared > 0 and duration < 0.9 * declared),
        )


def iter_video(path: str | Path, fps: float | None = None, start_s: float = 0.0) -> Iterator[np.ndarray]:
    """Yield (H, W, 3) uint8 RGB frames one at a time (memory stays flat for long videos).

    fps: resample to this rate by picking the nearest source frame by presentation
    time (None keeps the source rate), so variable frame rate input comes out evenly
    spaced. Display rotation metadata is applied. Corrupt data after at least one good
    frame ends the stream early instead of raising (the decodable part is usable).
    """
    import av

    path = Path(path)
    with _open_video(path) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        src_fps = float(stream.average_rate or stream.guessed_rate or 25.0)
        out_fps = float(fps) if fps else src_fps
        next_t, count, t0 = start_s, 0, None
        try:
            for frame in container.decode(stream):
                t = float(frame.pts * stream.time_base) if frame.pts is not None else count / src_fps
                t0 = t if t0 is None else t0
                t -= t0  # some files start at a non-zero timestamp
                if t + 0.5 / src_fps < next_t:
                    continue
                img = frame.to_ndarray(format="rgb24")
                rotation = _rotation(stream, frame)
                if rotation in (90, 180, 270):
                    img = np.ascontiguousarray(np.rot90(img, k=-rotation // 90))
                # A frame can stand for several output frames when upsampling the rate.
                while t + 0.5 / src_fps >= next_t:
                    yield img
                    count += 1
                    next_t += 1.0 / out_fps
        except av.error.FFmpegError as e:
            if not count:
                raise IproError(f"{path}: video data is corrupt ({e.__class__.__name__}); re-encode it") from None
    if not count:
        raise IproError(f"{path}: video has no decodable frames; re-encode it")


def read_video(
    path: str | Path,
    max_frames: int | None = None,
    fps: float | None = None,
    start_s: float = 0.0,
) -> tuple[np.ndarray, float]:
    """Decode a video to (F, H, W, 3) uint8 RGB and its frame rate.

    fps: resample to this rate by picking the nearest source frame (None keeps the
    source rate). Frames are taken by presentation time, so variable frame rate input
    comes out evenly spaced. Display rotation metadata is applied.
    """
    frames = []
    for img in iter_video(path, fps=fps, start_s=start_s):
        frames.append(img)
        if max_frames is not None and len(frames) >= max_frames:
            break
    if fps:
        return np.stack(frames), float(fps)
    with _open_video(Path(path)) as container:
        stream = container.streams.video[0]
        return np.stack(frames), float(stream.average_rate or stream.guessed_rate or 25.0)


def write_video(path: str | Path, frames: np.ndarray, fps: float = 16.0, crf: int = 18) -> None:
    """Write (F, H, W, 3) uint8 RGB frames as H.264 mp4 (odd sizes are padded by one pixel)."""
    import av

    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be (F, H, W, 3), got {frames.shape}")
    if frames.dtype != np.uint8:
        raise ValueError(f"frames must be uint8, got {frames.dtype}")
    f, h, w, _ = frames.shape
    ph, pw = h + h % 2, w + w % 2  # yuv420p needs even sizes
    if (ph, pw) != (h, w):
        frames = np.pad(frames, ((0, 0), (0, ph - h), (0, pw - w), (0, 0)), mode="edge")
    with atomic_path(path) as tmp:
        with av.open(str(tmp), mode="w", format="mp4") as container:
            stream = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1000))
            stream.width, stream.height, stream.pix_fmt = pw, ph, "yuv420p"
            stream.options = {"crf": str(crf), "preset": "veryfast"}
            for img in frames:
                for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(img), format="rgb24")):
                    container.mux(packet)
            for packet in stream.encode():
                container.mux(packet)


def read_media(path: str | Path, max_frames: int | None = None) -> tuple[np.ndarray, float | None]:
    """An image as a one-frame video, or a video; returns (F, H, W, 3) uint8 and fps."""
    path = Path(path)
    if is_image(path):
        return read_image(path)[None], None
    if is_video(path):
        return read_video(path, max_frames=max_frames)
    if not path.exists():
        raise IproError(f"{path}: no such file; check the path")
    raise IproError(
        f"{path}: unsupported file type '{path.suffix}'; pass an image "
        f"({', '.join(sorted(IMAGE_EXTENSIONS))}) or a video ({', '.join(sorted(VIDEO_EXTENSIONS))})"
    )
