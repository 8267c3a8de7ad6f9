"""Pair generated videos with what they were generated from.

INPUTS is either a curated dataset (a folder with manifest.parquet, from `ipro
prepare`) or a plain folder where `name.png` (any image type) is the input image and
an optional `name.mp4` (any video type) the ground-truth clip; with only the clip, its
first frame is the input image. A generated video `VIDEOS/name.mp4` is matched by its
file stem.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ipro.data.video import is_image, is_video, read_image, read_video
from ipro.errors import IproError


@dataclass
class EvalItem:
    """One generated video and its input image (and ground truth). `image` is a path or an array."""

    name: str
    video: Path
    image: Path | np.ndarray | None = None
    gt: Path | None = None
    pool: Path | None = None
    caption: str | None = None

    def input_image(self) -> np.ndarray | None:
        """(H, W, 3) uint8 input image: the file, the array, or the GT clip's first frame."""
        if isinstance(self.image, np.ndarray):
            return self.image
        if self.image is not None:
            return read_image(self.image)
        if self.gt is not None:
            return read_video(self.gt, max_frames=1)[0][0]
        return None


def _videos(folder: Path) -> dict[str, Path]:
    return {p.stem: p for p in sorted(folder.iterdir()) if p.is_file() and is_video(p) and not p.name.startswith(".")}


def _folder_inputs(folder: Path) -> dict[str, EvalItem]:
    items: dict[str, EvalItem] = {}
    for p in sorted(folder.iterdir()):
        if not p.is_file() or p.name.startswith("."):
            continue
        item = items.setdefault(p.stem, EvalItem(p.stem, Path()))
        if is_image(p):
            item.image = p
        elif is_video(p):
            item.gt = p
    return {k: v for k, v in items.items() if v.image is not None or v.gt is not None}


def _curated_inputs(folder: Path) -> dict[str, EvalItem]:
    """The kept clips of a curated dataset's manifest (`ipro prepare`): id, first frame,
    GT clip, face pool and caption; paths in the manifest are relative to the dataset."""
    import pyarrow.parquet as pq

    try:
        rows = pq.read_table(folder / "manifest.parquet").to_pylist()
    except Exception as e:  # pyarrow raises several types for a damaged file
        raise IproError(f"{folder / 'manifest.parquet'}: unreadable ({e.__class__.__name__}); rerun `ipro prepare`") from None
    path = lambda rel: folder / rel if rel else None  # noqa: E731
    return {
        row["id"]: EvalItem(
            row["id"], Path(), path(row.get("first_frame")), path(row.get("clip")), path(row.get("pool")), row.get("caption")
        )
        for row in rows
        if row.get("kept") and row.get("first_frame")
    }


def find_inputs(inputs: str | Path) -> dict[str, EvalItem]:
    """name -> item (without a video yet) for every input in a dataset or folder."""
    inputs = Path(inputs).expanduser()
    if not inputs.is_dir():
        raise IproError(f"{inputs}: no such inputs folder; pass a curated dataset or a folder of name.png (+ name.mp4)")
    refs = _curated_inputs(inputs) if (inputs / "manifest.parquet").is_file() else _folder_inputs(inputs)
    if not refs:
        raise IproError(f"{inputs}: no input images or clips found; expected name.png (and optionally name.mp4) per video")
    return refs


def subject_montage(paths: list[Path], height: int = 256) -> np.ndarray:
    """Subject images side by side at one height, on white: the input image of a video made
    from subject images alone (Phantom), so that each subject image's face is one person to keep."""
    from PIL import Image

    tiles = [Image.fromarray(read_image(p)) for p in paths]
    tiles = [t.resize((max(1, round(t.width * height / t.height)), height), Image.Resampling.LANCZOS) for t in tiles]
    gap = height // 8
    canvas = Image.new("RGB", (sum(t.width for t in tiles) + gap * (len(tiles) - 1), height), (255, 255, 255))
    x = 0
    for t in tiles:
        canvas.paste(t, (x, 0))
        x += t.width + gap
    return np.asarray(canvas)


def _subject_only_items(generated: dict[str, Path]) -> dict[str, EvalItem]:
    """Videos whose `ipro generate` settings have subject images and no first frame (Phantom):
    their subject images, side by side, are their input image."""
    import json

    items = {}
    for name, video in generated.items():
        sidecar = video.with_suffix(".json")
        try:
            settings = json.loads(sidecar.read_text()) if sidecar.is_file() else {}
        except (json.JSONDecodeError, UnicodeDecodeError):
            continue
        subjects = [Path(p) for p in settings.get("subjects") or settings.get("references") or []]  # "references" before the rename
        if settings.get("image") is None and subjects:
            for p in subjects:
                if not p.is_file():
                    raise IproError(f"{sidecar}: subject image {p} is missing; restore it or regenerate the video")
            items[name] = EvalItem(name, video, subject_montage(subjects), caption=settings.get("prompt") or None)
    return items


def find_items(videos: str | Path, inputs: str | Path) -> tuple[list[EvalItem], list[str]]:
    """Matched items (sorted by name) and the names of generated videos with no input.
    A video made from subject images alone (Phantom) with no input of its name is its own
    input (see `_subject_only_items`)."""
    videos = Path(videos).expanduser()
    if not videos.is_dir():
        raise IproError(f"{videos}: no such folder of generated videos; check the path (or use --generate)")
    generated = _videos(videos)
    if not generated:
        raise IproError(f"{videos}: no videos (.mp4, .mov, ...) in this folder")
    refs = find_inputs(inputs)
    refs.update(_subject_only_items({name: v for name, v in generated.items() if name not in refs}))
    matched = sorted(set(generated) & set(refs))
    if not matched:
        raise IproError(
            f"no generated video in {videos} matches an input in {inputs} by file name "
            f"(videos: {', '.join(sorted(generated)[:3])}...; inputs: {', '.join(sorted(refs)[:3])}...); "
            "name each video after its input image's stem"
        )
    items = []
    for name in matched:
        item = refs[name]
        item.name, item.video = name, generated[name]
        items.append(item)
    return items, sorted(set(generated) - set(refs))
