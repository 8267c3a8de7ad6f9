"""The interface every reward implements, and how rewards combine.

A reward maps decoded frames to one score per video:

    out = reward(frames, batch)      # frames: (B, F, 3, H, W) in [0, 1], differentiable
    loss = -out.mean()               # mean normalized score over the samples it could score

`batch` carries what the generated videos are compared against (face pools, the input
image, the ground-truth video); see `RewardBatch`. Scores are normalized,
`(raw - mean) / std`, so that rewards with different natural scales can be weighted
against each other and the trainer's reward weight means the same thing for every
recognizer. Rewards add and scale like numbers:

    reward = face * 1.0 + clip * 0.1     # a WeightedReward
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any, Mapping

import torch
from torch import nn

from ipro.data.pool import FacePool
from ipro.errors import IproError


@dataclass(frozen=True)
class Normalization:
    """score = (raw - mean) / std."""

    mean: float = 0.0
    std: float = 1.0

    def __post_init__(self) -> None:
        if not self.std > 0:
            raise IproError(f"reward normalization std must be > 0, got {self.std}")

    def __call__(self, raw: torch.Tensor) -> torch.Tensor:
        return (raw - self.mean) / self.std

    def invert(self, score: float) -> float:
        return self.mean + score * self.std


@dataclass(frozen=True)
class FrameSelection:
    """Which decoded frames a reward scores, to bound its cost.

    Candidates are frames `first, first+stride, ...` with `first` = 1 when `skip_first`
    (in I2V the first generated frame is the input image, so scoring it rewards nothing
    the model did). With `count`, that many candidates are taken, evenly spaced and
    always including the first and last candidate.
    """

    stride: int = 1
    count: int | None = None
    skip_first: bool = False

    def __post_init__(self) -> None:
        if self.stride < 1:
            raise IproError(f"frame stride must be >= 1, got {self.stride}")
        if self.count is not None and self.count < 1:
            raise IproError(f"frame count must be >= 1, got {self.count}")

    def indices(self, num_frames: int) -> torch.Tensor:
        candidates = torch.arange(1 if self.skip_first else 0, num_frames)[:: self.stride]
        if self.count is not None and self.count < len(candidates):
            pos = torch.linspace(0, len(candidates) - 1, self.count).round().long().unique()
            candidates = candidates[pos]
        if len(candidates) == 0:  # e.g. a one-frame video with skip_first: score it anyway
            candidates = torch.arange(min(num_frames, 1))
        return candidates


@dataclass
class RewardBatch:
    """What B generated videos are compared against. Every field is optional; each
    reward says which it needs and raises `IproError` when it is missing.

    pools: one `FacePool` (or None) per video: the faces of its ground-truth clip, from
        the curated dataset. Face rewards fall back to `gt_frames` when a pool is None.
    input_frames: (B, 3, H, W) in [0, 1]: the input image of each video.
    gt_frames: (B, F', 3, H', W') in [0, 1]: the ground-truth videos.
    extra: anything else the trainer carries (prompts, ids); rewards ignore it.
    """

    pools: list[FacePool | None] | None = None
    input_frames: torch.Tensor | None = None
    gt_frames: torch.Tensor | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def coerce(cls, batch: "RewardBatch | Mapping[str, Any] | None", size: int) -> "RewardBatch":
        """Accept a RewardBatch, a dict (unknown keys go to `extra`) or None; check sizes."""
        if batch is None:
            batch = cls()
        elif isinstance(batch, Mapping):
            known = {f.name for f in fields(cls)} - {"extra"}
            batch = cls(**{k: v for k, v in batch.items() if k in known},
                        extra={k: v for k, v in batch.items() if k not in known})
        elif not isinstance(batch, cls):
            raise IproError(f"reward batch must be a RewardBatch or a dict, got {type(batch).__name__}")
        if batch.pools is not None and len(batch.pools) != size:
            raise IproError(f"reward batch has {len(batch.pools)} pools for {size} videos")
        for name in ("input_frames", "gt_frames"):
            t = getattr(batch, name)
            if t is not None and t.shape[0] != size:
                raise IproError(f"reward batch {name} has {t.shape[0]} items for {size} videos")
        return batch


@dataclass
class RewardOutput:
    """What a reward returns for B videos.

    score: (B,) normalized, differentiable w.r.t. the frames. A sample the reward could
        not score (`valid` false) has score 0 with zero gradient.
    raw: (B,) the unnormalized reward (e.g. mean cosine); NaN where not `valid`.
    per_frame: (B, K) raw value of each scored frame, NaN where the frame got no score
        (no face); `frame_indices` (K,) says which decoded frames these are.
    coverage: (B,) fraction of the K frames that got a score.
    has_face: (B,) bool: at least one frame got a score (for non-face rewards: always).
    valid: (B,) bool: the sample counts in `mean()` (false for skipped no-face samples).
    logs: named floats for the training log, prefixed by the reward's name.
    details: named per-sample tensors (e.g. "swaps" (B,)), prefixed like logs.
    """

    score: torch.Tensor
    raw: torch.Tensor
    per_frame: torch.Tensor
    frame_indices: torch.Tensor
    coverage: torch.Tensor
    has_face: torch.Tensor
    valid: torch.Tensor
    logs: dict[str, float] = field(default_factory=dict)
    details: dict[str, torch.Tensor] = field(default_factory=dict)

    def mean(self) -> torch.Tensor:
        """Mean score over valid samples; 0 (still in the graph) when none is valid."""
        if bool(self.valid.any()):
            return self.score[self.valid].mean()
        return self.score.sum() * 0.0


def finish(
    name: str,
    normalization: Normalization,
    raw: list[torch.Tensor | None],
    per_frame: torch.Tensor,
    frame_indices: torch.Tensor,
    anchor: torch.Tensor,
    fallback: float | str,
    logs: dict[str, float] | None = None,
    details: dict[str, torch.Tensor] | None = None,
) -> RewardOutput:
    """Normalize per-sample raw rewards (None = nothing scored) into a `RewardOutput`.

    anchor: a zero that depends on the frames (one pixel times 0), so that scores of
    unscored samples are still part of the graph and backward never fails.
    fallback: "skip" (unscored samples are not `valid`) or a score given to them.
    """
    scores, raws, valid = [], [], []
    for r in raw:
        if r is not None:
            scores.append(normalization(r) + anchor)
            raws.append(r.detach())
            valid.append(True)
        elif fallback == "skip":
            scores.append(anchor)
            raws.append(anchor.detach() + math.nan)
            valid.append(False)
        else:
            scores.append(anchor + float(fallback))
            raws.append(anchor.detach() + normalization.invert(float(fallback)))
            valid.append(True)
    device = anchor.device
    scored = ~torch.isnan(per_frame)
    out = RewardOutput(
        score=torch.stack(scores) if scores else anchor.reshape(1)[:0],
        raw=torch.stack(raws) if raws else anchor.detach().reshape(1)[:0],
        per_frame=per_frame.detach(),
        frame_indices=frame_indices,
        coverage=scored.float().mean(1) if per_frame.shape[1] else torch.zeros(len(raw), device=device),
        has_face=torch.tensor([r is not None for r in raw], dtype=torch.bool, device=device),
        valid=torch.tensor(valid, dtype=torch.bool, device=device),
    )
    n_valid = int(out.valid.sum())
    out.logs = {
        f"{name}/coverage": float(out.coverage.mean()) if len(raw) else 0.0,
        f"{name}/no_face_samples": float((~out.has_face).sum()),
        # 1.0 flags a batch where nothing could be scored: the loss is a connected zero.
        f"{name}/no_face_batch": float(not bool(out.has_face.any())),
    }
    if n_valid:
        out.logs[f"{name}/raw"] = float(out.raw[out.valid].mean())
        out.logs[f"{name}/score"] = float(out.score.detach()[out.valid].mean())
    out.logs.update(logs or {})
    out.details = {f"{name}/per_frame": out.per_frame, **(details or {})}
    return out


class Reward(nn.Module):
    """Base class: `forward(frames, batch) -> RewardOutput`.

    Subclasses set `name` (the log prefix) and `normalization`.
    """

    name: str = "reward"
    normalization: Normalization = Normalization()

    def forward(self, frames: torch.Tensor, batch: RewardBatch | Mapping[str, Any] | None = None) -> RewardOutput:
        raise NotImplementedError

    def __mul__(self, weight: float) -> "WeightedReward":
        return WeightedReward([(float(weight), self)])

    __rmul__ = __mul__

    def __add__(self, other: "Reward") -> "WeightedReward":
        return WeightedReward(_terms(self) + _terms(other))


def _terms(r: Reward) -> list[tuple[float, Reward]]:
    if isinstance(r, WeightedReward):
        return list(zip(r.weights, r.rewards))
    if isinstance(r, Reward):
        return [(1.0, r)]
    raise TypeError(f"can only add rewards, got {type(r).__name__}")


class WeightedReward(Reward):
    """score = sum_i w_i * score_i over already-normalized component scores.

    A sample is valid when any component could score it (a component that skipped it
    adds 0, its neutral score). raw is the weighted sum of the components' raw values
    (NaN where a component skipped), per_frame too when all components score the same
    frames (else the first component's). coverage is the smallest and has_face the
    conjunction over components. Logs and details keep each component's names, so
    components need distinct names.
    """

    name = "total"

    def __init__(self, terms: list[tuple[float, Reward]]) -> None:
        super().__init__()
        if not terms:
            raise IproError("WeightedReward needs at least one (weight, reward) term")
        names = [r.name for _, r in terms]
        if len(set(names)) != len(names):
            raise IproError(f"rewards in a sum need distinct names (set name=...), got {names}")
        self.weights = [float(w) for w, _ in terms]
        self.rewards = nn.ModuleList([r for _, r in terms])

    def __mul__(self, weight: float) -> "WeightedReward":
        return WeightedReward([(float(weight) * w, r) for w, r in zip(self.weights, self.rewards)])

    __rmul__ = __mul__

    def forward(self, frames: torch.Tensor, batch: RewardBatch | Mapping[str, Any] | None = None) -> RewardOutput:
        batch = RewardBatch.coerce(batch, frames.shape[0])
        outs = [r(frames, batch) for r in self.rewards]
        ws = self.weights
        score = sum(w * o.score for w, o in zip(ws, outs))
        raw = sum(w * o.raw for w, o in zip(ws, outs))
        same_frames = all(torch.equal(o.frame_indices, outs[0].frame_indices) for o in outs)
        per_frame = sum(w * o.per_frame for w, o in zip(ws, outs)) if same_frames else outs[0].per_frame
        valid = torch.stack([o.valid for o in outs]).any(0)
        logs, details = {}, {}
        for o in outs:
            logs.update(o.logs)
            details.update(o.details)
        logs[f"{self.name}/score"] = float(score.detach()[valid].mean()) if bool(valid.any()) else 0.0
        return RewardOutput(
            score=score, raw=raw, per_frame=per_frame, frame_indices=outs[0].frame_indices,
            coverage=torch.stack([o.coverage for o in outs]).min(0).values,
            has_face=torch.stack([o.has_face for o in outs]).all(0), valid=valid, logs=logs, details=details,
        )
