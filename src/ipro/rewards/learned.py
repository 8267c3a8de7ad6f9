"""A learned identity reward: does this video keep the people of the subject image(s)?

Identity-GRPO trains a video reward model on pairwise preferences (human and synthetic,
see `ipro.data.pairs`). Here the default backbone is the frozen face stack
(`FaceEmbedder`: MTCNN + dlib/ArcFace), so the model trains on a CPU in minutes:

1. Subject identities: the faces of the subject image(s), clustered into people.
2. N frames evenly spaced over the video; every face is detected and embedded once and
   cached on disk (training never re-runs detection).
3. Per frame, identity features (`FEATURES`): each face is assigned to a person
   (Hungarian, per frame) and followed through time by position (`rewards.tracking`),
   then: cosine to its track's person and the margin to the others, swaps, coverage,
   extra and duplicated faces, and embedding changes along the track (to the previous
   and to the first face, to the track's mean).
4. A small temporal transformer over the N frame tokens (plus a linear path from the
   frame-mean features) gives one scalar: the identity-consistency score.

Loss: Bradley-Terry with ties, in Rao and Kupper's form (1967), as VideoAlign's reward
model (which Identity-GRPO builds on) uses. With d = s_a - s_b and a learned tie margin
tau >= 0:
    P(a > b) = sigmoid(d - tau),  P(b > a) = sigmoid(-d - tau),
    P(tie) = 1 - the two = sigmoid(tau - d) sigmoid(tau + d) (1 - exp(-2 tau)).
A tie pulls the two scores together; a decisive label pushes them at least tau apart.

`LearnedIdentityReward` plugs a trained model into the trainers like any `Reward`. Its
score has no gradient to the pixels (detection and assignment are discrete, and GRPO
needs none); it is normalized by the mean/std of the scores of the training videos.

A VLM backbone (Identity-GRPO's choice: Qwen2.5-VL with LoRA and a value head on the
last token) is `ipro.rewards.vlm.VlmRewardModel`: the same pairs and loss, loaded from a
local folder.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ipro.errors import IproError
from ipro.rewards.base import Normalization, Reward, RewardBatch, RewardOutput, finish

from ipro.rewards.face_tracks import FEATURES, FaceFeatureExtractor, frame_features  # noqa: F401  (re-exported)
from ipro.rewards.preference import (  # noqa: F401  (re-exported: the reward-model API lives here)
    FORMAT,
    PreferenceModel,
    accuracy_from_scores,
    outcome_probs,
    rao_kupper_nll,
    read_meta,
    sample_frames,
)


# --- The model ---------------------------------------------------------------------------


class TemporalHead(nn.Module):
    """Frame tokens (B, N, D) -> scalar per video: a [CLS] token through a small
    pre-norm transformer, plus a linear path from the mean of the frame features."""

    def __init__(self, num_features: int, width: int = 32, layers: int = 2, heads: int = 2, dropout: float = 0.1) -> None:
        super().__init__()
        self.embed = nn.Linear(num_features, width)
        self.cls = nn.Parameter(torch.zeros(1, 1, width))
        layer = nn.TransformerEncoderLayer(width, heads, 2 * width, dropout, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.out = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, 1))
        self.linear = nn.Linear(num_features, 1)

    def forward(self, x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        h = torch.cat([self.cls.expand(x.shape[0], 1, -1), self.embed(x)], 1)
        pad = torch.cat([torch.zeros_like(valid[:, :1]), ~valid], 1)
        h = self.encoder(h, src_key_padding_mask=pad)
        mean = (x * valid[..., None]).sum(1) / valid.sum(1, keepdim=True).clamp_min(1)
        return self.out(h[:, 0]).squeeze(-1) + self.linear(mean).squeeze(-1)


class IdentityRewardModel(PreferenceModel):
    """Frame features -> identity-consistency score, with its tie margin and the
    statistics it was trained with. Save/load as a folder: reward_model.json + model.safetensors."""

    backbone = "faces"

    def __init__(self, num_frames: int = 8, recognizer: str = "dlib", width: int = 32, layers: int = 2,
                 heads: int = 2, dropout: float = 0.1) -> None:
        super().__init__({"num_frames": num_frames, "recognizer": recognizer, "width": width, "layers": layers, "heads": heads, "dropout": dropout})
        self.head = TemporalHead(len(FEATURES), width, layers, heads, dropout)
        self.register_buffer("feature_mean", torch.zeros(len(FEATURES)))
        self.register_buffer("feature_std", torch.ones(len(FEATURES)))

    def set_feature_stats(self, features: torch.Tensor) -> None:
        """Standardize with the mean/std of (V, N, D) training features, ignoring NaN.

        A feature that never varied in training (e.g. coverage when every synthetic pair
        keeps all faces, or margin on one-person clips) gets an infinite std, so it always
        reads 0: the head never learned its weight, and a 1e-3 std blew a generated
        video's value up 1000-fold through that untrained weight (GRPO chased it)."""
        flat = features.reshape(-1, features.shape[-1])
        ok = ~torch.isnan(flat)
        count = ok.sum(0).clamp_min(1)
        mean = torch.where(ok, flat, 0).sum(0) / count
        std = (torch.where(ok, (flat - mean) ** 2, 0).sum(0) / count).sqrt()
        self.feature_mean.copy_(mean)
        self.feature_std.copy_(torch.where(std < 1e-3, torch.inf, std))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """(B, N, D) raw frame features (NaN = undefined) -> (B,) scores."""
        x = (features - self.feature_mean) / self.feature_std
        x = torch.nan_to_num(x, nan=0.0)  # undefined = average; has_face/coverage say why
        valid = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
        return self.head(x, valid)

    def save(self, directory: str | Path) -> Path:
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}, str(directory / "model.safetensors"))
        meta = {"format": FORMAT, "backbone": self.backbone, "features": list(FEATURES), **self.settings,
                "normalization": [self.normalization.mean, self.normalization.std], "tau": float(self.tau.detach()), "metrics": self.metrics}
        (directory / "reward_model.json").write_text(json.dumps(meta, indent=2))
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> IdentityRewardModel:
        from safetensors.torch import load_file

        meta = read_meta(directory)
        if meta.get("features") != list(FEATURES):
            raise IproError(f"{directory}: made with other identity features ({len(meta.get('features', []))}); retrain it with `ipro reward-model train`")
        keys = ("num_frames", "recognizer", "width", "layers", "heads", "dropout")
        model = cls(**{k: meta[k] for k in keys})
        model.load_state_dict(load_file(str(Path(directory) / "model.safetensors")))
        model.normalization = Normalization(*meta["normalization"])
        model.metrics = meta.get("metrics", {})
        return model.eval()


def load_reward_model(directory: str | Path, device="cpu"):
    """An `IdentityRewardModel` or `VlmRewardModel`, whichever the folder holds."""
    meta = read_meta(directory)
    if meta["backbone"] == "vlm":
        from ipro.rewards.vlm import VlmRewardModel

        return VlmRewardModel.load(directory, device=device)
    return IdentityRewardModel.load(directory).to(device)


# --- Training ---------------------------------------------------------------------------


@dataclass
class RewardModelTrainConfig:
    num_frames: int = 8  # frames sampled per video
    width: int = 32
    layers: int = 2
    heads: int = 2
    dropout: float = 0.1
    epochs: int = 150
    batch_size: int = 32
    lr: float = 3e-3
    weight_decay: float = 1e-3
    seed: int = 0


def pair_tensors(pairs, extractor: FaceFeatureExtractor, progress=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, list]:
    """Features of every distinct video once: (V, N, D), index of a and b per pair, targets, videos."""
    videos: dict[tuple, int] = {}
    feats = []
    ia, ib = [], []
    for k, p in enumerate(pairs):
        subj = [str(r) for r in p.subjects]
        for v, dest in ((p.video_a, ia), (p.video_b, ib)):
            key = (str(v), tuple(subj))
            if key not in videos:
                videos[key] = len(feats)
                feats.append(extractor.file_features(v, subj))
            dest.append(videos[key])
        if progress:
            progress(k + 1, len(pairs))
    target = torch.tensor([p.target for p in pairs])
    return torch.stack(feats), torch.tensor(ia), torch.tensor(ib), target, list(videos)


def train_reward_model(train_pairs, eval_pairs=None, config: RewardModelTrainConfig | None = None,
                       extractor: FaceFeatureExtractor | None = None, progress=None) -> IdentityRewardModel:
    """Fit the temporal head on pairs (features are extracted once, then cached)."""
    c = config or RewardModelTrainConfig()
    extractor = extractor or FaceFeatureExtractor(num_frames=c.num_frames)
    if extractor.num_frames != c.num_frames:
        raise IproError(f"the feature extractor samples {extractor.num_frames} frames, the config {c.num_frames}")
    torch.manual_seed(c.seed)
    feats, ia, ib, target, _ = pair_tensors(train_pairs, extractor, progress)
    weight = torch.tensor([p.weight for p in train_pairs])
    model = IdentityRewardModel(c.num_frames, extractor.recognizer, c.width, c.layers, c.heads, c.dropout)
    model.set_feature_stats(feats)
    opt = torch.optim.AdamW(model.parameters(), lr=c.lr, weight_decay=c.weight_decay)
    gen = torch.Generator().manual_seed(c.seed)
    n = len(train_pairs)
    model.train()
    for _ in range(c.epochs):
        order = torch.randperm(n, generator=gen)
        for start in range(0, n, c.batch_size):
            idx = order[start : start + c.batch_size]
            # Score the distinct videos of the batch once each.
            both = torch.cat([ia[idx], ib[idx]])
            scores = model(feats[both])
            d = scores[: len(idx)] - scores[len(idx) :]
            loss = (rao_kupper_nll(d, target[idx], model.tau) * weight[idx]).sum() / weight[idx].sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        s = model(feats)
        model.normalization = Normalization(float(s.mean()), float(s.std().clamp_min(1e-3)) if len(s) > 1 else 1.0)
        model.metrics = {"train": accuracy_from_scores(s[ia] - s[ib], target, model.tau, [p.kind for p in train_pairs]),
                         "train_loss": float(rao_kupper_nll(s[ia] - s[ib], target, model.tau).mean())}
    if eval_pairs:
        model.metrics["eval"] = evaluate_reward_model(model, eval_pairs, extractor)
    return model


@torch.no_grad()
def evaluate_reward_model(model: IdentityRewardModel, pairs, extractor: FaceFeatureExtractor | None = None) -> dict:
    extractor = extractor or FaceFeatureExtractor(num_frames=model.num_frames)
    feats, ia, ib, target, _ = pair_tensors(pairs, extractor)
    model.eval()
    s = model(feats)
    return accuracy_from_scores(s[ia] - s[ib], target, model.tau, [p.kind for p in pairs])


@torch.no_grad()
def score_files(model, videos: list, subjects: list, cache_dir: str | Path | None = None) -> list[float]:
    """Raw scores of video files against subject images, for either backbone."""
    if getattr(model, "backbone", "faces") == "vlm":
        return model.score_files(videos, subjects)
    extractor = FaceFeatureExtractor(num_frames=model.num_frames, cache_dir=cache_dir)
    feats = torch.stack([extractor.file_features(v, subjects) for v in videos])
    return model(feats).tolist()


@torch.no_grad()
def evaluate_files(model, pairs, cache_dir: str | Path | None = None) -> dict:
    """Pair accuracy of either backbone (see `accuracy_from_scores`)."""
    if getattr(model, "backbone", "faces") != "vlm":
        extractor = FaceFeatureExtractor(num_frames=model.num_frames, cache_dir=cache_dir)
        return evaluate_reward_model(model, pairs, extractor)
    d = torch.tensor([a - b for a, b in (score_files(model, [p.video_a, p.video_b], p.subjects) for p in pairs)])
    target = torch.tensor([p.target for p in pairs])
    return accuracy_from_scores(d, target, model.tau.detach().cpu(), [p.kind for p in pairs])


# --- As a reward -------------------------------------------------------------------------


class LearnedIdentityReward(Reward):
    """A trained `IdentityRewardModel` as a `Reward` (scores carry no gradient).

    Subject images, in order of preference: `batch.extra["subjects"]` (per video a
    (K, 3, H, W) tensor of subject images), `batch.input_frames` (the input image),
    the pool's people (`batch.pools`); with none, the video's own first faces.
    `per_frame` holds each scored frame's face cosine to its person (NaN: no face).
    """

    name = "identity_rm"

    def __init__(self, model: IdentityRewardModel, extractor: FaceFeatureExtractor | None = None, name: str | None = None) -> None:
        super().__init__()
        if getattr(model, "backbone", "faces") != "faces":
            raise IproError("LearnedIdentityReward takes a face-feature reward model; a VLM reward model plugs in as ipro.rewards.vlm.VlmIdentityReward")
        self.model = model.eval().requires_grad_(False)
        self.extractor = extractor or FaceFeatureExtractor(num_frames=model.num_frames)
        if self.extractor.recognizer != model.settings["recognizer"]:
            raise IproError(f"the reward model was trained on '{model.settings['recognizer']}' embeddings, the embedder gives '{self.extractor.recognizer}'")
        self.normalization = model.normalization
        if name:
            self.name = name

    @classmethod
    def from_pretrained(cls, directory: str | Path, embedder=None, device="cpu") -> LearnedIdentityReward:
        """Load a trained model; `embedder` must use the recognizer it was trained on
        (built here for dlib; an ArcFace model needs FaceEmbedder('arcface:PATH'))."""
        from ipro.faces.embedder import FaceEmbedder

        model = IdentityRewardModel.load(directory).to(device)
        if embedder is None:
            name = model.settings["recognizer"]
            if not name.startswith("dlib"):
                raise IproError(f"{directory}: trained on '{name}' embeddings; pass embedder=FaceEmbedder('arcface:/path/backbone.pth')")
            embedder = FaceEmbedder("dlib").to(device)
        return cls(model, FaceFeatureExtractor(embedder, num_frames=model.num_frames))

    def train(self, mode: bool = True) -> LearnedIdentityReward:
        super().train(mode)
        self.model.eval()  # always inference: no dropout in a reward
        self.extractor.embedder.eval()
        return self

    @torch.no_grad()
    def _people(self, batch: RewardBatch, b: int) -> list[torch.Tensor]:
        subj = batch.extra.get("subjects")
        if subj is not None:
            return [self.extractor.people(r) for r in subj]
        if batch.input_frames is not None:
            people, seen = [], {}
            for i in range(b):  # a GRPO group repeats each input image: detect it once
                img = batch.input_frames[i]
                key = next((k for k, v in seen.items() if v.shape == img.shape and torch.equal(v, img)), None)
                if key is None:
                    key = len(seen)
                    seen[key] = img
                    people.append(self.extractor.people(img[None]))
                else:
                    people.append(people[key])
            return people
        dim = self.extractor.embedder.embedding_dim
        out = []
        for pool in batch.pools or [None] * b:
            if pool is None or pool.embeddings.shape[0] == 0:
                out.append(torch.zeros(0, dim))
            else:
                sums = torch.zeros(pool.num_people, dim).index_add_(0, pool.identity.long().cpu(), pool.embeddings.float().cpu())
                out.append(F.normalize(sums, dim=-1))
        return out

    def forward(self, frames: torch.Tensor, batch: RewardBatch | Mapping[str, Any] | None = None) -> RewardOutput:
        b = frames.shape[0]
        batch = RewardBatch.coerce(batch, b)
        anchor = frames.flatten()[:1].sum() * 0.0
        with torch.no_grad():
            faces = self.extractor.video_faces(frames)
            people = self._people(batch, b)
            feats = torch.stack([frame_features(f, p) for f, p in zip(faces, people)])
            raw = self.model(feats.to(self.model.feature_mean.device)).float().to(frames.device)
        own = feats[..., FEATURES.index("own_cos")].to(frames.device)
        steps = sample_frames(frames.shape[1], self.model.num_frames).to(frames.device)
        return finish(self.name, self.normalization, list(raw), own, steps, anchor, 0.0)


__all__ = [
    "FEATURES",
    "FaceFeatureExtractor",
    "IdentityRewardModel",
    "LearnedIdentityReward",
    "PreferenceModel",
    "RewardModelTrainConfig",
    "TemporalHead",
    "evaluate_files",
    "evaluate_reward_model",
    "frame_features",
    "load_reward_model",
    "rao_kupper_nll",
    "score_files",
    "train_reward_model",
]
