"""`FaceEmbedder`: every face in a batch of videos, with differentiable embeddings.

Detection runs under no_grad (MTCNN is a cascade with NMS, so it has no useful
gradient); the landmarks it returns are constants. Alignment (grid_sample) and the
recognizer are differentiable, so a reward built on the embeddings sends gradients
back to the frames' pixels.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ipro.errors import IproError
from ipro.faces.align import warp_faces
from ipro.faces.recognizer import FaceRecognizer
from ipro.faces.types import Detections


def load_recognizer(spec: str = "dlib", device: str | torch.device = "cpu") -> FaceRecognizer:
    """Build a recognizer from a short spec.

    - "dlib" (default): dlib's face ResNet (128-d, 150x150 chips) from the weights in
      face-recognition-models, run by our PyTorch port.
    - "arcface:PATH": an arcface_torch IResNet-50/100 `backbone.pth` (512-d, 112x112).
    """
    if spec == "dlib":
        from ipro.faces.dlib_resnet import DlibResNet

        model = DlibResNet.from_package()
    elif spec.startswith("arcface:"):
        from ipro.faces.arcface import ArcFaceIResNet

        path = Path(spec.split(":", 1)[1]).expanduser()
        model = ArcFaceIResNet.from_checkpoint(path)
    else:
        raise IproError(f"unknown recognizer '{spec}'; use 'dlib' or 'arcface:/path/to/backbone.pth'")
    return model.to(device).eval().requires_grad_(False)


def _float32(method):
    """Run a face-model method in float32 outside autocast. Under bf16 mixed precision the
    recognizer's embeddings drift (cosine 0.9976 to float32 on the same faces), as much as
    IPRO's whole effect on the demo, so detection, alignment and embedding never use it."""

    @functools.wraps(method)
    def wrapper(self, video: torch.Tensor, *args, **kwargs):
        with torch.autocast(video.device.type, enabled=False):
            return method(self, video.float() if video.dtype in (torch.float16, torch.bfloat16) else video, *args, **kwargs)

    return wrapper


@dataclass
class VideoFaces:
    """All faces found in a (B, F) batch of frames, flattened to M faces.

    sample, frame: (M,) which video and which frame each face belongs to.
    boxes (M, 4), scores (M,), landmarks (M, 5, 2): detector output in frame pixels.
    embeddings: (M, D) unit-norm, differentiable w.r.t. the frames.
    has_face: (B, F) bool.
    """

    sample: torch.Tensor
    frame: torch.Tensor
    boxes: torch.Tensor
    scores: torch.Tensor
    landmarks: torch.Tensor
    embeddings: torch.Tensor
    has_face: torch.Tensor
    recognizer: str

    @property
    def num_faces(self) -> int:
        return int(self.sample.shape[0])

    def select(self, mask: torch.Tensor) -> "VideoFaces":
        """Keep the faces where `mask` (M,) is true."""
        kept = VideoFaces(
            self.sample[mask], self.frame[mask], self.boxes[mask], self.scores[mask],
            self.landmarks[mask], self.embeddings[mask], torch.zeros_like(self.has_face), self.recognizer,
        )
        kept.has_face[kept.sample, kept.frame] = True
        return kept

    def frame_faces(self, b: int, f: int) -> torch.Tensor:
        """Indices (into the M faces) of the faces in video b, frame f."""
        return torch.nonzero((self.sample == b) & (self.frame == f)).flatten()

    def to_records(self) -> list[list[list[dict]]]:
        """Plain Python per video, per frame: [{"box", "score", "landmarks"}]."""
        b, f = self.has_face.shape
        out: list[list[list[dict]]] = [[[] for _ in range(f)] for _ in range(b)]
        for i in range(self.num_faces):
            out[int(self.sample[i])][int(self.frame[i])].append(
                {
                    "box": [round(float(v), 2) for v in self.boxes[i]],
                    "score": round(float(self.scores[i]), 4),
                    "landmarks": [[round(float(x), 2), round(float(y), 2)] for x, y in self.landmarks[i]],
                }
            )
        return out


def validate_video(video: torch.Tensor, value_range: tuple[float, float], name: str = "video") -> None:
    """Raise ValueError naming what is wrong with a (B, F, 3, H, W) frame batch."""
    if not isinstance(video, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(video).__name__}")
    if video.ndim != 5 or video.shape[2] != 3:
        raise ValueError(f"{name} must be shaped (B, F, 3, H, W), got {tuple(video.shape)}")
    if not video.is_floating_point():
        raise ValueError(f"{name} must be a float tensor in {value_range}, got {video.dtype}; divide uint8 frames by 255")
    if video.numel() == 0:
        return
    v = video.detach()
    if not torch.isfinite(v).all():
        raise ValueError(f"{name} contains NaN or inf values")
    lo, hi = value_range
    tol = 1e-2 * (hi - lo)
    vmin, vmax = float(v.min()), float(v.max())
    if vmin < lo - tol or vmax > hi + tol:
        raise ValueError(f"{name} values span [{vmin:.3g}, {vmax:.3g}], outside the declared range {value_range}")


class FaceEmbedder(nn.Module):
    """Detect, align and embed every face of a (B, F, 3, H, W) video batch.

    Args:
        recognizer: a `FaceRecognizer` or a spec for `load_recognizer` ("dlib",
            "arcface:/path/backbone.pth").
        detector: an MTCNN (built from the shipped weights when None).
        value_range: the range of the input pixels, (0, 1) or (-1, 1).
        min_score: faces below this detector score are dropped.
        max_faces: keep at most this many faces per frame (highest score first).
        detect_max_side: frames larger than this are downscaled for detection only;
            landmarks are mapped back, so alignment still reads full-resolution pixels.
        min_face_size: smallest face (pixels) the detector looks for.
        dtype: run the detector's and recognizer's networks in this dtype (e.g.
            torch.bfloat16: 3-4x faster on CPUs with AMX/AVX-512-bf16 and on GPUs);
            None keeps their float32 weights. Alignment always runs in >= float32.
        keyframe_every: video mode: run the full detector every N frames and only its
            last stage on the faces in between (`MTCNN.detect_video`); ~3-4x faster
            detection on talking-head footage, embeddings within cosine ~0.99 of full
            detection (benchmarks/RESULTS.md). None detects every frame independently.
    """

    def __init__(
        self,
        recognizer: FaceRecognizer | str = "dlib",
        detector: nn.Module | None = None,
        value_range: tuple[float, float] = (0.0, 1.0),
        min_score: float = 0.9,
        max_faces: int | None = None,
        detect_max_side: int | None = 640,
        min_face_size: int = 20,
        dtype: torch.dtype | None = None,
        keyframe_every: int | None = None,
    ) -> None:
        super().__init__()
        if detector is None:
            from ipro.faces.mtcnn import MTCNN

            detector = MTCNN.from_package(min_face_size=min_face_size)
        self.detector = detector.eval().requires_grad_(False)
        self.recognizer = load_recognizer(recognizer) if isinstance(recognizer, str) else recognizer
        if dtype is not None:
            self.detector.to(dtype)
            self.recognizer.to(dtype)
        self.value_range = (float(value_range[0]), float(value_range[1]))
        self.min_score = min_score
        self.max_faces = max_faces
        self.detect_max_side = detect_max_side
        self.keyframe_every = keyframe_every

    @property
    def embedding_dim(self) -> int:
        return self.recognizer.embedding_dim

    def _to_unit(self, video: torch.Tensor) -> torch.Tensor:
        # No clamp here: decoded frames overshoot [0, 1] a little, and a clamp would cut
        # their gradient. Detection clamps its own (detached) copy.
        lo, hi = self.value_range
        return (video - lo) / (hi - lo)

    @torch.no_grad()
    @_float32
    def detect(self, frames: torch.Tensor, chunk: int = 64, video_length: int | None = None) -> list[Detections]:
        """Detect faces in (N, 3, H, W) frames in [0, 1]; one `Detections` per frame.

        video_length: the frames are consecutive runs of this many frames of one video
        each (enables `keyframe_every`); None treats them as unrelated images.
        """
        frames = frames.detach().float()
        h, w = frames.shape[-2:]
        scale = 1.0
        if self.detect_max_side and max(h, w) > self.detect_max_side:
            scale = self.detect_max_side / max(h, w)
            frames = F.interpolate(frames, scale_factor=scale, mode="area")
        if self.keyframe_every and video_length:
            raw = [det for i in range(0, frames.shape[0], video_length)
                   for det in self.detector.detect_video(frames[i : i + video_length], self.keyframe_every, confirm_score=self.min_score)]
        else:
            raw = [det for i in range(0, frames.shape[0], chunk) for det in self.detector.detect(frames[i : i + chunk])]
        out: list[Detections] = []
        for det in raw:
            keep = det.scores >= self.min_score
            det = Detections(det.boxes[keep] / scale, det.scores[keep], det.landmarks[keep] / scale)
            if self.max_faces is not None and len(det) > self.max_faces:
                top = det.scores.argsort(descending=True)[: self.max_faces]
                det = Detections(det.boxes[top], det.scores[top], det.landmarks[top])
            out.append(det)
        return out

    @_float32
    def embed(self, video: torch.Tensor, detections: list[Detections]) -> VideoFaces:
        """Align and embed given detections (one per frame, row-major over B, F)."""
        b, f = video.shape[:2]
        frames = self._to_unit(video.flatten(0, 1))
        counts = torch.tensor([len(d) for d in detections], dtype=torch.long)
        flat_index = torch.repeat_interleave(torch.arange(b * f), counts).to(video.device)
        dev = video.device
        if len(flat_index):
            boxes = torch.cat([d.boxes for d in detections]).to(dev)
            scores = torch.cat([d.scores for d in detections]).to(dev)
            landmarks = torch.cat([d.landmarks for d in detections]).to(dev)
        else:
            boxes, scores, landmarks = (torch.zeros(0, 4, device=dev), torch.zeros(0, device=dev), torch.zeros(0, 5, 2, device=dev))
        rec = self.recognizer
        work = torch.promote_types(video.dtype, torch.float32)
        chips = warp_faces(frames.to(work), flat_index, landmarks, rec.template, rec.input_size)
        param = next(rec.parameters())
        if chips.shape[0]:
            emb = rec(chips.to(device=param.device, dtype=param.dtype)).to(work)
        else:
            # Keep the graph connected so a batch without faces still backpropagates (zeros).
            emb = chips.new_zeros(0, rec.embedding_dim, dtype=work) + 0.0 * video.sum()
        has_face = (counts > 0).view(b, f).to(dev)
        return VideoFaces(
            sample=flat_index // f, frame=flat_index % f, boxes=boxes, scores=scores, landmarks=landmarks,
            embeddings=F.normalize(emb, dim=-1), has_face=has_face, recognizer=rec.name,
        )

    def forward(self, video: torch.Tensor) -> VideoFaces:
        validate_video(video, self.value_range)
        detections = self.detect(self._to_unit(video.detach().flatten(0, 1)).clamp(0, 1), video_length=video.shape[1])
        return self.embed(video, detections)
