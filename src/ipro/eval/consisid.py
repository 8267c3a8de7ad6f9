"""FaceSim-Arc / FaceSim-Cur as ConsisID measures them (and OpenS2V-Eval reuses them).

The protocol, per generated video and its input image (ConsisID `eval/get_facesim_fid.py`):

1. Reference: the largest face (box area) of the input image; if no face is found, the
   image is padded by 25% of its height/width on each side with gray (128) and searched
   again. No face at all: the video is not scored.
2. Frames: 16 indices `linspace(0, F - 1, 16)` truncated to integers (all frames of a
   shorter video appear, some twice, as in the original).
3. In each sampled frame: the largest face (same padding retry), embedded; its score is
   max(0, cos(input_face, face)). Frames without a face are left out.
4. FaceSim = mean of those scores over the frames with a face; 0.0 when no frame has one.

FaceSim-Arc uses ArcFace (ConsisID: insightface's antelopev2 glintr100, IResNet-100),
FaceSim-Cur uses CurricularFace IR-101 (Glint360K). Both read 112x112 chips aligned to
the ArcFace 5-point template. Differences from the original, stated in the output: faces
are found by our MTCNN (ConsisID: SCRFD at 320x320) and aligned at 112 px directly
(ConsisID aligns at 224 and resizes to 112); without a local ArcFace / CurricularFace
checkpoint the score comes from dlib's recognizer, whose cosine scale is not ArcFace's:
the output names the recognizer of every number.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch

from ipro.data.video import atomic_path, read_video
from ipro.eval.inputs import find_items
from ipro.eval.stats import bootstrap_mean

FORMAT = "ipro-eval-consisid-1"
NUM_FRAMES = 16
PAD_SCALE = 1.25  # ConsisID's retry: pad by (scale - 1) x size on each side
PAD_VALUE = 128


def sample_indices(num_frames: int, count: int = NUM_FRAMES) -> list[int]:
    """ConsisID's frame choice: np.linspace(0, F - 1, count, dtype=int)."""
    return np.linspace(0, num_frames - 1, count, dtype=int).tolist()


def clipped_mean(cosines: list[float]) -> float:
    """Mean of max(0, cos) over the frames with a face; 0.0 when there is none."""
    return float(np.mean([max(0.0, c) for c in cosines])) if cosines else 0.0


def _largest(embedder, image: np.ndarray) -> torch.Tensor | None:
    """Embedding of the largest face of one (H, W, 3) uint8 image, or None."""
    with torch.no_grad():
        video = torch.from_numpy(np.array(image, copy=True)).permute(2, 0, 1).float().div(255)[None, None]
        faces = embedder(video.to(next(embedder.parameters()).device))
    if faces.num_faces == 0:
        return None
    area = (faces.boxes[:, 2] - faces.boxes[:, 0]) * (faces.boxes[:, 3] - faces.boxes[:, 1])
    return torch.nn.functional.normalize(faces.embeddings[area.argmax()].detach().float().cpu(), dim=0)


def largest_face(embedder, image: np.ndarray) -> torch.Tensor | None:
    """The largest face, retried on the image padded with gray as ConsisID does."""
    emb = _largest(embedder, image)
    if emb is None:
        h, w = image.shape[:2]
        dy, dx = int(h * (PAD_SCALE - 1)), int(w * (PAD_SCALE - 1))
        emb = _largest(embedder, np.pad(image, ((dy, dy), (dx, dx), (0, 0)), constant_values=PAD_VALUE))
    return emb


def face_sim(embedder, frames: np.ndarray, input_face: torch.Tensor) -> dict:
    """FaceSim of (F, H, W, 3) uint8 frames against the input face's unit embedding."""
    cosines = []
    for i in sample_indices(len(frames)):
        emb = largest_face(embedder, frames[i])
        if emb is not None:
            cosines.append(float(emb @ input_face))
    return {"face_sim": clipped_mean(cosines), "frames_with_face": len(cosines)}


class ConsisIDProtocol:
    """`arc` and `cur`: FaceEmbedders for FaceSim-Arc and FaceSim-Cur (the same one when
    a checkpoint is missing and dlib stands in for both)."""

    def __init__(self, arcface: str | Path | None = None, curricularface: str | Path | None = None, device: str = "cpu") -> None:
        from ipro.faces.embedder import FaceEmbedder

        fallback = None
        if arcface is None or curricularface is None:
            fallback = FaceEmbedder("dlib").to(device)
        self.arc = FaceEmbedder(f"arcface:{arcface}").to(device) if arcface is not None else fallback
        if curricularface is not None:
            from ipro.faces.curricularface import CurricularFaceIR

            self.cur = FaceEmbedder(CurricularFaceIR.from_checkpoint(curricularface)).to(device)
        else:
            self.cur = fallback
        self.recognizers = {"face_sim_arc": self.arc.recognizer.name, "face_sim_cur": self.cur.recognizer.name}

    def __call__(self, frames: np.ndarray, image: np.ndarray) -> dict:
        out: dict = {}
        for key, embedder in (("face_sim_arc", self.arc), ("face_sim_cur", self.cur)):
            if key == "face_sim_cur" and self.cur is self.arc:
                out[key], out[f"{key}_frames"] = out["face_sim_arc"], out["face_sim_arc_frames"]
                continue
            input_face = largest_face(embedder, image)
            if input_face is None:
                out[key], out[f"{key}_frames"] = None, 0
                continue
            r = face_sim(embedder, frames, input_face)
            out[key], out[f"{key}_frames"] = r["face_sim"], r["frames_with_face"]
        return out


def evaluate_consisid(videos: str | Path, inputs: str | Path, out: str | Path, protocol: ConsisIDProtocol | None = None,
                      progress=None, **options) -> dict:
    """Score every generated video in `videos` that matches an input; write out/consisid.json."""
    items, unmatched = find_items(videos, inputs)
    protocol = protocol or ConsisIDProtocol(**options)
    records = []
    for i, item in enumerate(items):
        t0 = time.perf_counter()
        frames, _ = read_video(item.video)
        image = item.input_image()
        scores = protocol(frames, image) if image is not None else {"face_sim_arc": None, "face_sim_cur": None}
        records.append({"name": item.name, "video": str(item.video), "num_frames": int(len(frames)), **scores,
                        "seconds": time.perf_counter() - t0})
        if progress:
            progress(i + 1, len(items), item.name)
    result = {
        "format": FORMAT,
        "protocol": "consisid: 16 uniformly sampled frames, largest face, cosine to the input image's largest face clipped at 0, mean",
        "recognizers": protocol.recognizers,
        "comparable_with_papers": {k: not v.startswith("dlib") for k, v in protocol.recognizers.items()},
        "aggregate": {k: bootstrap_mean([r[k] for r in records]) for k in ("face_sim_arc", "face_sim_cur")},
        "seconds_per_video": float(np.mean([r["seconds"] for r in records])) if records else None,
        "unmatched_videos": unmatched,
        "videos": records,
    }
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / "consisid.json") as tmp:
        tmp.write_text(json.dumps(result, indent=1))
    return result
