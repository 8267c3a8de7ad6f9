"""The face pool of a clip: the embeddings of its faces in every frame that has one.

IPRO's facial scoring mechanism (FSM) compares each generated face against the whole
pool of the ground-truth clip rather than the input image's face alone, so that natural changes
of pose and expression are not penalized. Stored per clip as safetensors.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ipro.data.video import atomic_path
from ipro.errors import IproError


@dataclass
class FacePool:
    """M faces of one clip.

    embeddings: (M, D) float32, unit norm. frame: (M,) int64 frame index in the clip.
    identity: (M,) int64 person id (0..P-1). boxes (M, 4), landmarks (M, 5, 2) and
    scores (M,) in clip pixels. recognizer: the name of the recognizer that made the
    embeddings (pools from different recognizers are not comparable).
    """

    embeddings: torch.Tensor
    frame: torch.Tensor
    identity: torch.Tensor
    boxes: torch.Tensor
    landmarks: torch.Tensor
    scores: torch.Tensor
    recognizer: str
    num_frames: int

    @property
    def num_people(self) -> int:
        return int(self.identity.max()) + 1 if self.identity.numel() else 0

    def to(self, device: torch.device | str) -> "FacePool":
        return FacePool(
            self.embeddings.to(device), self.frame.to(device), self.identity.to(device), self.boxes.to(device),
            self.landmarks.to(device), self.scores.to(device), self.recognizer, self.num_frames,
        )


_TENSORS = ("embeddings", "frame", "identity", "boxes", "landmarks", "scores")


def save_pool(path: str | Path, pool: FacePool) -> None:
    tensors = {k: getattr(pool, k).detach().cpu().contiguous() for k in _TENSORS}
    meta = {"recognizer": pool.recognizer, "num_frames": str(pool.num_frames), "format": "ipro-face-pool-1"}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)


def load_pool(path: str | Path) -> FacePool:
    path = Path(path)
    if not path.is_file():
        raise IproError(f"{path}: face pool file not found; run `ipro prepare` to build the dataset")
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        tensors = load_file(str(path))
    except (SafetensorError, OSError, json.JSONDecodeError) as e:
        raise IproError(f"{path}: not a readable face pool ({e}); rebuild it with `ipro prepare`") from None
    missing = [k for k in _TENSORS if k not in tensors]
    if missing or meta.get("format") != "ipro-face-pool-1":
        raise IproError(f"{path}: not an ipro face pool (missing {missing or 'format tag'}); rebuild it with `ipro prepare`")
    return FacePool(**{k: tensors[k] for k in _TENSORS}, recognizer=meta["recognizer"], num_frames=int(meta["num_frames"]))
