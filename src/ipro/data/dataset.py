"""Load a folder made by `ipro prepare` for training.

Each item is one kept clip (or still): the first frame the I2V model is conditioned on,
the caption, the face pool the reward compares against and, on request, the
ground-truth clip. Stills have no clip, so they are left out when `load_clip=True`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ipro.data.pool import FacePool, load_pool
from ipro.data.video import read_image, read_video
from ipro.errors import IproError


def _to_tensor(frames: np.ndarray) -> torch.Tensor:
    """(..., H, W, 3) uint8 -> (..., 3, H, W) float32 in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(frames)).float().div(255).movedim(-1, -3)


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

    Items are dicts: id, image (3, H, W) float in [0, 1], caption, pool (FacePool),
    and clip (F, 3, H, W) when load_clip.
    """

    def __init__(self, out_dir: str | Path, load_clip: bool = False, frames: int | None = None,
                 size: tuple[int, int] | None = None) -> None:
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
        self.load_clip, self.frames, self.size = load_clip, frames, size

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict:
        row = self.rows[index]
        item = {
            "id": row["id"],
            "image": _resize(_to_tensor(read_image(self.out_dir / row["first_frame"])), self.size),
            "caption": row["caption"],
            "pool": load_pool(self.out_dir / row["pool"]),
        }
        if self.load_clip:
            clip, _ = read_video(self.out_dir / row["clip"], max_frames=self.frames)
            item["clip"] = _resize(_to_tensor(clip), self.size)
        return item


def collate(batch: list[dict]) -> dict:
    """Stack images (B, 3, H, W) and clips (B, F, 3, H, W); captions, pools and ids stay lists."""
    out: dict = {
        "id": [b["id"] for b in batch],
        "image": torch.stack([b["image"] for b in batch]),
        "caption": [b["caption"] for b in batch],
        "pool": [b["pool"] for b in batch],
    }
    if batch and "clip" in batch[0]:
        out["clip"] = torch.stack([b["clip"] for b in batch])
    return out


__all__ = ["CuratedDataset", "FacePool", "collate"]
