"""The vision-language backbone of the identity reward model (Identity-GRPO's choice).

A Qwen2-VL / Qwen2.5-VL checkpoint from a local folder reads the subject image(s) and
N frames of a video as images, then a question; a linear value head on the last token's
hidden state gives the score. LoRA (peft) on the language model's attention projections
and the head train with the same Rao-Kupper pair loss as the face-feature backbone.

We turn frames into the model's patch layout ourselves, in torch, instead of calling the
transformers processor: its Qwen video processor needs torchvision, and in torch the
images stay on the device and in the graph. The layout is the one the processor writes
(`tests/test_vlm_reward.py` checks it against `Qwen2VLImageProcessorPil`, exactly).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ipro.data.video import to_tensor
from ipro.errors import IproError
from ipro.rewards.base import Normalization, Reward, RewardBatch, RewardOutput, finish
from ipro.rewards.preference import (
    FORMAT,
    PreferenceModel,
    rao_kupper_nll,
    read_meta,
    sample_frames,
)

PROMPT = (
    "The first images show the reference people; the next images are frames of a generated video. "
    "Do the people in the video stay the same persons as in the references throughout? Answer with a score."
)
FAMILIES = ("qwen2_vl", "qwen2_5_vl")
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def vision_settings(path: Path) -> dict:
    """Patch layout and normalization from the folder's preprocessor_config.json (the
    Qwen defaults where it is absent)."""
    settings = {"patch_size": 14, "merge_size": 2, "temporal_patch_size": 2, "image_mean": CLIP_MEAN, "image_std": CLIP_STD}
    file = path / "preprocessor_config.json"
    if file.is_file():
        try:
            saved = json.loads(file.read_text())
        except json.JSONDecodeError as e:
            raise IproError(f"{file}: not valid JSON ({e.msg}); restore the file from the model download") from None
        settings.update({k: saved[k] for k in settings if k in saved})
    return settings


def patchify(images: torch.Tensor, patch_size: int, merge_size: int, temporal_patch_size: int) -> tuple[torch.Tensor, list[int]]:
    """Normalized images (K, C, H, W) -> Qwen-VL pixel rows (K*gh*gw, C*T*p*p) and the
    (1, gh, gw) grid of one image. Rows go merge-window by merge-window, so that the
    vision tower's patch merger sees each 2x2 window as consecutive rows; a still image
    fills the temporal patch by repetition."""
    k, c, h, w = images.shape
    p, m, t = patch_size, merge_size, temporal_patch_size
    gh, gw = h // p, w // p
    x = images.reshape(k, c, gh // m, m, p, gw // m, m, p).permute(0, 2, 5, 3, 6, 1, 4, 7)
    x = x.unsqueeze(6).expand(*x.shape[:6], t, p, p)
    return x.reshape(k * gh * gw, c * t * p * p), [1, gh, gw]


class VlmRewardModel(PreferenceModel):
    """A Qwen2-VL / Qwen2.5-VL model with LoRA and a scalar value head on the last
    token's hidden state. Each frame and subject image is resized to `image_size` squared
    (a multiple of patch_size x merge_size, 28 for Qwen)."""

    backbone = "vlm"

    def __init__(self, path: str | Path, num_frames: int = 8, lora_rank: int = 16, image_size: int = 224,
                 device="cpu", dtype: torch.dtype = torch.float32, adapter: str | Path | None = None) -> None:
        path = Path(path).expanduser()
        config_file = path / "config.json"
        if not config_file.is_file():
            raise IproError(
                f"{path}: no VLM checkpoint there (config.json missing); pass a local transformers folder "
                "of a vision-language model, e.g. a download of Qwen/Qwen2.5-VL-3B-Instruct"
            )
        model_type = json.loads(config_file.read_text()).get("model_type")
        if model_type not in FAMILIES:
            raise IproError(f"{config_file}: model_type {model_type!r} is not supported; use a Qwen2-VL or Qwen2.5-VL checkpoint")
        super().__init__({"path": str(path), "num_frames": num_frames, "lora_rank": lora_rank, "image_size": image_size})
        self.vision = vision_settings(path)
        window = self.vision["patch_size"] * self.vision["merge_size"]
        if image_size % window:
            raise IproError(f"image_size {image_size}: must be a multiple of {window} (patch_size x merge_size of {path})")
        from peft import LoraConfig, PeftModel, get_peft_model
        from transformers import AutoModelForImageTextToText, AutoTokenizer

        from ipro.models.base import quiet_loading

        with quiet_loading():
            self.tokenizer = AutoTokenizer.from_pretrained(str(path))
            base = AutoModelForImageTextToText.from_pretrained(str(path), dtype=dtype)
        if adapter is not None:
            self.vlm = PeftModel.from_pretrained(base, str(adapter), is_trainable=True)
        elif lora_rank > 0:
            # The language model's attention; Qwen's vision tower names its own qkv / proj.
            lora = LoraConfig(r=lora_rank, lora_alpha=lora_rank, lora_dropout=0.0, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
            self.vlm = get_peft_model(base, lora)
        else:
            self.vlm = base.requires_grad_(False)
        self.token_ids = {k: int(getattr(base.config, f"{k}_token_id")) for k in ("image", "vision_start", "vision_end")}
        self.weights_dtype = dtype  # the VLM's; LoRA, the head and the scores stay float32
        self.value_head = nn.Linear(_text_hidden_size(base.config), 1, dtype=torch.float32)
        self.to(device)

    @property
    def device(self) -> torch.device:
        return self.value_head.weight.device

    def pixels(self, images: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
        """(K, 3, H, W) in [0, 1] -> pixel rows and one image's grid."""
        size = int(self.settings["image_size"])
        x = F.interpolate(images.float(), size=(size, size), mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)
        mean = torch.tensor(self.vision["image_mean"], device=x.device)[:, None, None]
        std = torch.tensor(self.vision["image_std"], device=x.device)[:, None, None]
        return patchify((x - mean) / std, self.vision["patch_size"], self.vision["merge_size"], self.vision["temporal_patch_size"])

    def prompt_ids(self, num_images: int, tokens_per_image: int) -> list[int]:
        """Qwen's chat format: one user turn holding the images then the question, and
        the opening of the assistant's turn (whose first position the head reads)."""
        encode = lambda text: self.tokenizer(text, add_special_tokens=False)["input_ids"]
        image = [self.token_ids["vision_start"]] + [self.token_ids["image"]] * tokens_per_image + [self.token_ids["vision_end"]]
        return encode("<|im_start|>user\n") + image * num_images + encode(PROMPT + "<|im_end|>\n<|im_start|>assistant\n")

    def forward(self, subjects: Sequence, videos: Sequence[torch.Tensor] | torch.Tensor) -> torch.Tensor:
        """subjects: per video (K, 3, H, W) or a list of (3, H, W); videos: (B, F, 3, H, W)
        or a list of (F, 3, H, W), in [0, 1] -> (B,) scores."""
        rows, grids, ids = [], [], []
        for subj, video in zip(subjects, videos, strict=True):
            subj = torch.stack(list(subj)) if not torch.is_tensor(subj) else subj
            images = torch.cat([subj.to(self.device), video[sample_frames(video.shape[0], self.num_frames)].to(self.device)])
            x, grid = self.pixels(images)
            rows.append(x)
            grids += [grid] * len(images)
            ids.append(self.prompt_ids(len(images), x.shape[0] // len(images) // self.vision["merge_size"] ** 2))
        # Left padding puts every sequence's last token in the last position.
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        width = max(map(len, ids))
        input_ids = torch.tensor([[pad] * (width - len(s)) + s for s in ids], device=self.device)
        mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in ids], device=self.device)
        out = self.vlm(input_ids=input_ids, attention_mask=mask, pixel_values=torch.cat(rows).to(self.weights_dtype),
                       image_grid_thw=torch.tensor(grids, device=self.device), output_hidden_states=True)
        return self.value_head(out.hidden_states[-1][:, -1].float()).squeeze(-1)

    @torch.no_grad()
    def score_files(self, videos: Sequence, subjects: Sequence) -> list[float]:
        from ipro.data.video import read_image, read_media

        subj = [to_tensor(read_image(r)) for r in subjects]
        return [float(self([subj], [to_tensor(read_media(v)[0])])) for v in videos]

    def save(self, directory: str | Path) -> Path:
        """adapter/ (a peft LoRA folder for the base checkpoint), head.safetensors and
        reward_model.json; the base weights stay where they are (settings["path"])."""
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        if self.settings["lora_rank"] > 0:
            self.vlm.save_pretrained(str(directory / "adapter"))
        save_file({"value_head.weight": self.value_head.weight.detach().cpu().contiguous(),
                   "value_head.bias": self.value_head.bias.detach().cpu().contiguous(),
                   "tie_raw": self.tie_raw.detach().cpu().reshape(1)}, str(directory / "head.safetensors"))
        meta = {"format": FORMAT, "backbone": self.backbone, **self.settings,
                "normalization": [self.normalization.mean, self.normalization.std], "metrics": self.metrics}
        tmp = directory / "reward_model.json.tmp"
        tmp.write_text(json.dumps(meta, indent=2))
        tmp.replace(directory / "reward_model.json")
        return directory

    @classmethod
    def load(cls, directory: str | Path, device="cpu", dtype: torch.dtype = torch.float32) -> VlmRewardModel:
        from safetensors.torch import load_file

        directory = Path(directory)
        meta = read_meta(directory)
        adapter = directory / "adapter" if (directory / "adapter").is_dir() else None
        model = cls(meta["path"], meta["num_frames"], meta["lora_rank"], meta["image_size"], device, dtype, adapter)
        head = load_file(str(directory / "head.safetensors"))
        with torch.no_grad():
            model.value_head.weight.copy_(head["value_head.weight"])
            model.value_head.bias.copy_(head["value_head.bias"])
            model.tie_raw.copy_(head["tie_raw"][0])
        model.normalization = Normalization(*meta["normalization"])
        model.metrics = meta.get("metrics", {})
        return model.eval()


def _text_hidden_size(config) -> int:
    for cfg in (getattr(config, "text_config", None), config):
        if cfg is not None and getattr(cfg, "hidden_size", None):
            return int(cfg.hidden_size)
    raise IproError("cannot find the VLM's hidden size in its config (text_config.hidden_size)")


def train_vlm_reward_model(model: VlmRewardModel, train_pairs, epochs: int = 1, lr: float = 1e-5, seed: int = 0,
                           progress=None) -> VlmRewardModel:
    """One pair per step, both videos in one forward: Rao-Kupper on the score difference.
    Ends by setting the score normalization from the training videos."""
    from ipro.data.video import read_image, read_media

    torch.manual_seed(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    gen = torch.Generator().manual_seed(seed)
    step, total = 0, epochs * len(train_pairs)
    model.train()
    for _ in range(epochs):
        for k in torch.randperm(len(train_pairs), generator=gen).tolist():
            p = train_pairs[k]
            subj = [to_tensor(read_image(r)) for r in p.subjects]
            s_a, s_b = model([subj, subj], [to_tensor(read_media(v)[0]) for v in (p.video_a, p.video_b)])
            target = torch.tensor([p.target], device=model.device)
            loss = rao_kupper_nll((s_a - s_b)[None], target, model.tau).mean() * p.weight
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
            if progress:
                progress(step, total)
    model.eval()
    scores: dict[tuple, float] = {}
    for p in train_pairs:
        for v in (p.video_a, p.video_b):
            key = (str(v), tuple(map(str, p.subjects)))
            if key not in scores:
                scores[key] = model.score_files([v], p.subjects)[0]
    s = torch.tensor(list(scores.values()))
    model.normalization = Normalization(float(s.mean()), float(s.std().clamp_min(1e-3)) if len(s) > 1 else 1.0)
    return model


class VlmIdentityReward(Reward):
    """A trained `VlmRewardModel` as a `Reward` (no gradient): subject images are
    `batch.extra["subjects"]` (per video a list or (K, 3, H, W) tensor) or the input
    images (`batch.input_frames`)."""

    name = "identity_vlm"

    def __init__(self, model: VlmRewardModel) -> None:
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.normalization = model.normalization

    def forward(self, frames: torch.Tensor, batch: RewardBatch | Mapping[str, Any] | None = None) -> RewardOutput:
        b = frames.shape[0]
        batch = RewardBatch.coerce(batch, b)
        subj = batch.extra.get("subjects")
        if subj is None:
            if batch.input_frames is None:
                raise IproError("the VLM identity reward needs subject images: batch.input_frames or batch.extra['subjects']")
            subj = [batch.input_frames[i : i + 1] for i in range(b)]
        with torch.no_grad():
            raw = self.model(subj, frames).float().to(frames.device)
        steps = sample_frames(frames.shape[1], self.model.num_frames).to(frames.device)
        per_frame = torch.full((b, len(steps)), float("nan"), device=frames.device)
        anchor = frames.flatten()[:1].sum() * 0.0
        return finish(self.name, self.normalization, list(raw), per_frame, steps, anchor, 0.0)


__all__ = ["PROMPT", "VlmIdentityReward", "VlmRewardModel", "patchify", "train_vlm_reward_model", "vision_settings"]
