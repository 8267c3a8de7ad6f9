"""Load a folder made by `ipro prepare` for training.

Each item is one kept clip (or still): the first frame the I2V model is conditioned on,
the caption, the face pool the reward compares against and, on request, the
ground-truth clip. Stills have no clip, so they are left out when `load_clip=True`.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ipro.data.pool import FacePool, load_pool
from ipro.data.video import read_image, read_video, to_tensor
from ipro.errors import IproError


def _resize(x: torch.Tensor, size: tuple[int, int] | None) -> torch.Tensor:
    if size is None or tuple(x.shape[-2:]) == tuple(size):
        return x
    flat = x.reshape(-1, *x.shape[-3:])
    out = torch.nn.functional.interpolate(flat, size=tuple(size), mode="bilinear", align_corners=False, antialias=True)
    return out.clamp(0, 1).reshape(*x.shape[:-2], *size)


class CuratedDataset(torch.utils.data.Dataset):
    """The kept rows of `OUT_DIR/manifest.parquet`.

    Args:
        out_dir: a folder written by `ipro prepare` (or `ipro prepare-merge`).
        load_clip: also return the ground-truth clip (F, 3, H, W); stills are skipped.
        frames: keep the first `frames` frames of each clip (None: all).
        size: (H, W) to resize images and clips to (None: as prepared). Face pool boxes
            and landmarks stay in prepared-clip pixels; only embeddings matter to rewards.

        subjects: per item, this many subject images of the people (see
            `subject_crops`), for subject-to-video models (Wan VACE, Phantom).

    Items are dicts: id, image (3, H, W) float in [0, 1], caption, pool (FacePool),
    clip (F, 3, H, W) when load_clip, and subjects (R, 3, S, S) when subjects > 0
    (S: the smaller side of `size`).
    """

    def __init__(self, out_dir: str | Path, load_clip: bool = False, frames: int | None = None,
                 size: tuple[int, int] | None = None, subjects: int = 0) -> None:
        import pyarrow.parquet as pq

        self.out_dir = Path(out_dir)
        manifest = self.out_dir / "manifest.parquet"
        if not manifest.is_file():
            raise IproError(f"{manifest}: not found; run `ipro prepare INPUT_DIR {self.out_dir}` first")
        columns = ["id", "kept", "is_still", "caption", "first_frame", "clip", "pool", "num_frames"]
        rows = pq.read_table(manifest, columns=columns).to_pylist()
        self.rows = [r for r in rows if r["kept"] and not (load_clip and r["is_still"])]
        if load_clip and frames is not None:
            short = [r["id"] for r in self.rows if r["num_frames"] < frames]
            if short:
                raise IproError(f"{manifest}: {len(short)} clips (e.g. {short[0]}) have fewer than frames={frames} frames; ask for fewer")
        self.load_clip, self.frames, self.size, self.subjects = load_clip, frames, size, subjects

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict:
        row = self.rows[index]
        image = to_tensor(read_image(self.out_dir / row["first_frame"]))
        item = {"id": row["id"], "image": _resize(image, self.size), "caption": row["caption"], "pool": load_pool(self.out_dir / row["pool"])}
        if self.subjects:
            side = min(self.size) if self.size else min(image.shape[-2:])
            item["subjects"] = subject_crops(image, item["pool"], self.subjects, side)
        if self.load_clip:
            clip, _ = read_video(self.out_dir / row["clip"], max_frames=self.frames)
            item["clip"] = _resize(to_tensor(clip), self.size)
        return item


def collate(batch: list[dict]) -> dict:
    """Stack images (B, 3, H, W) and clips (B, F, 3, H, W); captions, pools and ids stay lists."""
    out: dict = {
        "id": [b["id"] for b in batch],
        "image": torch.stack([b["image"] for b in batch]),
        "caption": [b["caption"] for b in batch],
        "pool": [b["pool"] for b in batch],
    }
    for key in ("clip", "subjects"):
        if batch and key in batch[0]:
            out[key] = torch.stack([b[key] for b in batch])
    return out


def subject_crops(image: torch.Tensor, pool: FacePool, count: int, side: int, margin: float = 1.8) -> torch.Tensor:
    """`count` subject images (count, 3, side, side) of the people in a first frame
    (3, H, W), as a user would give a subject-to-video model: person p's face on
    frame 0, a square `margin` times the box's longer side (moved inside the image),
    in person order. Where the frame shows fewer people, the whole frame (squashed to a
    square) fills the remaining slots, so every item has the same number of subject images.
    """
    h, w = image.shape[-2:]
    crops = []
    for person in range(pool.num_people):
        if len(crops) == count:
            break
        on_first = (pool.identity == person) & (pool.frame == 0)
        if not on_first.any():
            continue
        x0, y0, x1, y1 = pool.boxes[on_first][pool.scores[on_first].argmax()].tolist()
        half = min(margin * max(x1 - x0, y1 - y0), h, w) / 2
        cx = min(max((x0 + x1) / 2, half), w - half)
        cy = min(max((y0 + y1) / 2, half), h - half)
        top, left, size = round(cy - half), round(cx - half), max(1, round(2 * half))
        crops.append(_resize(image[:, top : top + size, left : left + size], (side, side)))
    crops += [_resize(image, (side, side))] * (count - len(crops))
    return torch.stack(crops)


__all__ = ["CuratedDataset", "FacePool", "collate", "subject_crops"]
