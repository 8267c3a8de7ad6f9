"""Read and write videos and images.

Videos go through PyAV. Frames are uint8 numpy arrays shaped (F, H, W, 3), RGB.
Every write is atomic: the file appears complete under its final name or not at all.
"""

from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
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


def write_image(path: str | Path, image: np.ndarray) -> None:
    from PIL import Image

    with atomic_path(path) as tmp:
        Image.fromarray(np.asarray(image, dtype=np.uint8)).save(tmp, format="PNG" if Path(path).suffix.lower() == ".png" else None)


def _rotation(stream) -> int:
    """Clockwise display rotation in degrees from the stream's metadata (phone videos)."""
    for key in ("rotate",):
        value = stream.metadata.get(key) if stream.metadata else None
        if value:
            try:
                return int(value) % 360
            except ValueError:
                pass
    try:  # PyAV >= 13 exposes the display matrix through side data on frames instead
        return int(getattr(stream.codec_context, "rotation", 0) or 0) % 360
    except Exception:
        return 0


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
    import av

    path = Path(path)
    if not path.is_file():
        raise IproError(f"{path}: no such file; check the path")
    if path.stat().st_size == 0:
        raise IproError(f"{path}: empty file; remove it or replace it with a real video")
    try:
        container = av.open(str(path))
    except (av.error.InvalidDataError, av.error.FFmpegError, UnicodeDecodeError) as e:
        raise IproError(f"{path}: not a readable video ({e.__class__.__name__}); re-encode it as H.264 mp4") from None
    with container:
        if not container.streams.video:
            raise IproError(f"{path}: has no video stream; pass a video or an image")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        src_fps = float(stream.average_rate or stream.guessed_rate or 25.0)
        out_fps = float(fps) if fps else src_fps
        rotation = _rotation(stream)
        frames: list[np.ndarray] = []
        next_t = start_s
        try:
            for frame in container.decode(stream):
                t = float(frame.pts * stream.time_base) if frame.pts is not None else len(frames) / src_fps
                if t + 0.5 / src_fps < next_t:
                    continue
                img = frame.to_ndarray(format="rgb24")
                # A frame can stand for several output frames when upsampling the rate.
                while t + 0.5 / src_fps >= next_t:
                    frames.append(img)
                    next_t += 1.0 / out_fps
                    if max_frames is not None and len(frames) >= max_frames:
                        break
                if max_frames is not None and len(frames) >= max_frames:
                    break
        except av.error.FFmpegError as e:
            if not frames:
                raise IproError(f"{path}: video data is corrupt ({e.__class__.__name__}); re-encode it") from None
        if not frames:
            raise IproError(f"{path}: video has no decodable frames; re-encode it")
    video = np.stack(frames)
    if rotation in (90, 180, 270):
        video = np.rot90(video, k=-rotation // 90, axes=(1, 2)).copy()
    return video, out_fps


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
