"""A reward from any image encoder: cosine of generated frames' features to the
input image's (the paper's "CLIP reward" ablation).

No CLIP weights ship in any package here, so the encoder is the user's: a local
transformers checkpoint (`ImageFeatureReward.from_pretrained(path)`), or any torch
module mapping (N, 3, S, S) normalized images to (N, D) features.

Two ways to use an encoder:
- `ImageFeatureReward`: whole frames (resized on the short side, centre-cropped).
- `EncoderRecognizer`: wraps the encoder as a face recognizer, so `FaceEmbedder` feeds
  it aligned face chips and `FaceIdentityReward` scores them with FSM, as the paper's
  ablation does ("the CLIP image encoder to extract facial embeddings").
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from ipro.errors import IproError
from ipro.faces.align import ARCFACE_TEMPLATE_112
from ipro.faces.embedder import validate_video
from ipro.faces.recognizer import FaceRecognizer
from ipro.rewards.base import FrameSelection, Normalization, Reward, RewardBatch, RewardOutput, finish

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _features(output: Any) -> torch.Tensor:
    """(N, D) features from a plain tensor or a transformers model output."""
    if isinstance(output, torch.Tensor):
        return output.flatten(1)
    for key in ("image_embeds", "pooler_output"):
        value = getattr(output, key, None)
        if value is not None:
            return value.flatten(1)
    hidden = getattr(output, "last_hidden_state", None)
    if hidden is not None:
        return hidden[:, 0]  # CLS token
    raise IproError(f"image encoder returned {type(output).__name__}; expected a tensor or image_embeds/pooler_output")


class ImageEncoder(nn.Module):
    """Resize, crop and normalize [0, 1] images, run the encoder, return (N, D) features."""

    def __init__(self, encoder: nn.Module, image_size: int = 224,
                 mean: tuple[float, ...] = CLIP_MEAN, std: tuple[float, ...] = CLIP_STD) -> None:
        super().__init__()
        self.encoder = encoder.eval().requires_grad_(False)
        self.image_size = image_size
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        h, w = images.shape[-2:]
        s = self.image_size
        if (h, w) != (s, s):
            scale = s / min(h, w)
            size = (max(s, round(h * scale)), max(s, round(w * scale)))
            images = F.interpolate(images, size=size, mode="bilinear", antialias=True, align_corners=False)
            top, left = (size[0] - s) // 2, (size[1] - s) // 2
            images = images[..., top : top + s, left : left + s]
        x = (images - self.mean) / self.std
        param = next(self.encoder.parameters(), None)
        if param is not None:
            x = x.to(param.dtype)
        return _features(self.encoder(x)).float()

    @classmethod
    def from_pretrained(cls, path: str | Path) -> "ImageEncoder":
        """A local transformers checkpoint: CLIP/SigLIP vision towers, or any AutoModel."""
        path = Path(path).expanduser()
        if not (path / "config.json").is_file():
            raise IproError(f"{path}: no config.json; pass a local transformers checkpoint folder")
        import transformers

        config = transformers.AutoConfig.from_pretrained(path, local_files_only=True)
        kind = config.model_type
        if kind in ("clip", "clip_vision_model"):
            model = transformers.CLIPVisionModelWithProjection.from_pretrained(path, local_files_only=True)
        elif kind in ("siglip", "siglip_vision_model"):
            model = transformers.SiglipVisionModel.from_pretrained(path, local_files_only=True)
        else:
            model = transformers.AutoModel.from_pretrained(path, local_files_only=True)
        vision = getattr(config, "vision_config", config)
        size = int(getattr(vision, "image_size", 224))
        mean, std = CLIP_MEAN, CLIP_STD
        pre = path / "preprocessor_config.json"  # read by hand: image processors may need torchvision
        if pre.is_file():
            cfg = json.loads(pre.read_text())
            mean, std = tuple(cfg.get("image_mean", mean)), tuple(cfg.get("image_std", std))
        return cls(model, size, mean, std)


class EncoderRecognizer(FaceRecognizer):
    """Any image encoder as a face recognizer: aligned chips (ArcFace's 5-point
    template scaled to the encoder's input size) in, features out."""

    def __init__(self, encoder: ImageEncoder, name: str = "image_encoder") -> None:
        super().__init__()
        self.encoder = encoder
        self.name = name
        self.input_size = encoder.image_size
        self.template = ARCFACE_TEMPLATE_112 * (encoder.image_size / 112)
        with torch.no_grad():
            self.embedding_dim = int(encoder(torch.zeros(1, 3, self.input_size, self.input_size)).shape[1])

    def embed_chips(self, chips: torch.Tensor) -> torch.Tensor:
        return self.encoder(chips)


class ImageFeatureReward(Reward):
    """Mean cosine between each scored frame's features and the target's.

    target: "input" (the input image, `batch.input_frames`, else ground-truth
    frame 0) or "gt" (mean over all ground-truth frames, the FSM analogue).
    Default normalization is none (0, 1): no CLIP weights ship here to measure one.
    """

    def __init__(self, encoder: ImageEncoder | nn.Module, target: str = "input",
                 frames: FrameSelection = FrameSelection(), normalization: Normalization | None = None,
                 name: str = "image") -> None:
        super().__init__()
        if target not in ("input", "gt"):
            raise IproError(f"ImageFeatureReward target must be 'input' or 'gt', got '{target}'")
        self.encoder = encoder if isinstance(encoder, ImageEncoder) else ImageEncoder(encoder)
        self.target, self.frames, self.name = target, frames, name
        self.normalization = normalization or Normalization()

    @classmethod
    def from_pretrained(cls, path: str | Path, **kwargs: Any) -> "ImageFeatureReward":
        return cls(ImageEncoder.from_pretrained(path), **kwargs)

    def forward(self, frames: torch.Tensor, batch: RewardBatch | Mapping[str, Any] | None = None) -> RewardOutput:
        validate_video(frames, (0.0, 1.0), "frames")
        b, num_frames = frames.shape[:2]
        batch = RewardBatch.coerce(batch, b)
        with torch.no_grad():
            if self.target == "input" and batch.input_frames is not None:
                ref = F.normalize(self.encoder(batch.input_frames), dim=-1)
            elif batch.gt_frames is not None:
                gt = batch.gt_frames if self.target == "gt" else batch.gt_frames[:, :1]
                feats = F.normalize(self.encoder(gt.flatten(0, 1)), dim=-1).view(b, gt.shape[1], -1)
                ref = feats.mean(1)  # a dot with the mean = the mean cosine to all gt frames
            else:
                raise IproError(
                    f"ImageFeatureReward(target='{self.target}') needs batch.input_frames or batch.gt_frames"
                )
        steps = self.frames.indices(num_frames).to(frames.device)
        k = len(steps)
        feats = F.normalize(self.encoder(frames[:, steps].flatten(0, 1)), dim=-1).view(b, k, -1)
        per_frame = (feats * ref[:, None].to(feats.dtype)).sum(-1)  # (B, K)
        anchor = frames.flatten()[:1].sum() * 0.0
        return finish(self.name, self.normalization, list(per_frame.mean(1)), per_frame, steps, anchor, "skip")
