"""The face-identity reward of IPRO, extended to several people.

For each scored generated frame, every detected face is matched to a person of the
ground truth; its value is its mean cosine to that person's target faces, and the
frame's value is the mean over its faces. The reward is the mean over frames that
got a value. With one person and `mode="pool"` this is exactly the paper's facial
scoring mechanism (FSM): s_i = mean_j cos(phi(gen_i), phi(gt_j)), R = mean_i s_i.
Since the embeddings are unit vectors, mean_j cos(g, e_j) = g . mean_j e_j, so a
person's pool collapses to one (unnormalized) mean vector.

Modes (what "that person's target faces" are):
- "pool": the person's faces in every frame of the ground-truth clip (FSM).
  `pool_skip_first` drops ground-truth frame 0, which is the input image itself.
- "input_face": the person's face in the input image only (`batch.input_frames`,
  each face there one person; else the pool's frame-0 faces). Rewards copy-paste.
- "aligned": the person's face in the time-aligned ground-truth frame.

Several people: the pool is split by person (`FacePool.identity`, or clustering when
the pool is computed from `gt_frames`). In each frame, faces are assigned to people by
Hungarian assignment on cosine to each person's centroid; faces left over (more faces
than people, or below `match_threshold`) are "unmatched" and either ignored or
counted with value 0 (`unmatched="penalize"`). The same setting counts a person who
should be in a frame but is not found there as a value of 0, so that two people blending
into one, or one vanishing, costs reward: expected are the people of the input image
(pool and input_face modes) or of the time-aligned ground-truth frame ("aligned"). A
frame without any face is not penalized (see "No faces" below). Missing people are
logged either way. Generated faces are tracked through time by
position (see `ipro.rewards.tracking`); a track whose per-frame match changes is an
identity swap, reported in logs and details. With `identity_from="track"` (default)
each face is scored against the person its track matched most often, so a swap also
lowers the reward; with "frame" each face is scored against its own per-frame match.

Normalization defaults (score = (R - mean) / std), per recognizer:
- ArcFace: 0.54 / 0.16, the public IPRO code's values. Unrelated faces have ArcFace
  cosine near 0, about 3 std below that mean.
- dlib (the default recognizer here): 0.94 / 0.04. Measured with this repo's MTCNN +
  dlib port (`python benchmarks/rewards.py --calibrate`): per-frame FSM values s_i
  against carphone's pool (all 120 frames, one face each):
    same person, carphone's own frames:   mean 0.977, range 0.950-0.984
    other people: astronaut 0.821 (512 px photo), 0.840 (144 px), cameraman 0.831
  With gap = 0.977 - 0.831 (mean of the three), mean = 0.977 - gap/4 = 0.941 and
  std = gap/4 = 0.037, rounded to 0.94 / 0.04: the same person scores ~+1 and another
  person ~-3, the same spread ArcFace's normalization gives. The band is narrow and
  narrower still for tiny faces (the astronaut at 22 px against a 28 px carphone pool:
  0.86-0.87), so read dlib scores by their std, never beside ArcFace values.
Other recognizers get (0, 1) (no normalization) unless given one.

No faces: a sample with no scored frame is skipped (`no_face="skip"`: not valid,
excluded from `RewardOutput.mean()`) or given a fixed normalized score
(`no_face=0.0` is neutral, negative values penalize losing the face). A batch without
any face yields a zero score connected to the graph, and logs `face/no_face_batch`.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
import torch.nn.functional as F

from ipro.data.pool import FacePool
from ipro.errors import IproError
from ipro.faces.embedder import FaceEmbedder, VideoFaces, validate_video
from ipro.faces.identity import assign, cluster_identities
from ipro.faces.thresholds import same_person_threshold
from ipro.rewards.base import FrameSelection, Normalization, Reward, RewardBatch, RewardOutput, finish
from ipro.rewards.tracking import count_swaps, track_faces, track_identity

# Measured as described in the module docstring.
NORMALIZATION = {"dlib": Normalization(0.94, 0.04), "arcface": Normalization(0.54, 0.16)}

MODES = ("pool", "input_face", "aligned")


def _family(recognizer: str) -> str | None:
    name = recognizer.lower()
    return next((k for k in NORMALIZATION if name.startswith(k)), None)


def default_normalization(recognizer: str) -> Normalization:
    family = _family(recognizer)
    return NORMALIZATION[family] if family else Normalization()




@torch.no_grad()
def pools_from_video(embedder: FaceEmbedder, video: torch.Tensor, identity_threshold: float) -> list[FacePool]:
    """Face pool of each of B ground-truth videos (B, F, 3, H, W), people clustered."""
    faces = embedder(video.detach())
    pools = []
    for b in range(video.shape[0]):
        i = faces.sample == b
        emb, frame = faces.embeddings[i].float(), faces.frame[i]
        pools.append(FacePool(
            embeddings=emb, frame=frame, identity=cluster_identities(emb, frame, identity_threshold).to(emb.device),
            boxes=faces.boxes[i], landmarks=faces.landmarks[i], scores=faces.scores[i],
            recognizer=faces.recognizer, num_frames=video.shape[1],
        ))
    return pools


def _mean_by(emb: torch.Tensor, group: torch.Tensor, num_groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group mean of rows (num_groups, D), and whether the group has any row."""
    sums = emb.new_zeros(num_groups, emb.shape[1]).index_add_(0, group, emb)
    counts = torch.bincount(group, minlength=num_groups).to(emb.dtype)
    return sums / counts.clamp_min(1)[:, None], counts > 0


class FaceIdentityReward(Reward):
    """Face-identity reward: FSM and its ablations, for one or several people.

    Args:
        embedder: detects and embeds faces; default `FaceEmbedder()` (MTCNN + dlib).
        mode: "pool" (FSM), "input_face" (input image) or "aligned" (gt frame i).
        frames: which generated frames to score.
        normalization: default: by recognizer (see module docstring).
        no_face: "skip" or the normalized score given to a sample without faces.
        unmatched: "ignore" faces matched to nobody and expected people not found, or
            "penalize" both (value 0).
        identity_from: "track" or "frame" (see module docstring).
        match_threshold: faces below this cosine to every person are unmatched
            (None: every face is matched while people are left).
        identity_threshold: clustering threshold for pools computed from gt_frames.
        pool_skip_first: leave ground-truth frame 0 (the input image) out of the pool.
        max_shift, max_gap: face tracking (see `ipro.rewards.tracking.track_faces`).
    """

    def __init__(
        self,
        embedder: FaceEmbedder | None = None,
        mode: str = "pool",
        frames: FrameSelection = FrameSelection(),
        normalization: Normalization | None = None,
        no_face: float | str = "skip",
        unmatched: str = "ignore",
        identity_from: str = "track",
        match_threshold: float | None = None,
        identity_threshold: float | None = None,
        pool_skip_first: bool = False,
        max_shift: float = 1.5,
        max_gap: int = 2,
        name: str = "face",
    ) -> None:
        super().__init__()
        for arg, value, allowed in (("mode", mode, MODES), ("unmatched", unmatched, ("ignore", "penalize")),
                                    ("identity_from", identity_from, ("track", "frame"))):
            if value not in allowed:
                raise IproError(f"FaceIdentityReward {arg} must be one of {allowed}, got '{value}'")
        if not (no_face == "skip" or isinstance(no_face, (int, float))):
            raise IproError(f"FaceIdentityReward no_face must be 'skip' or a number, got {no_face!r}")
        self.embedder = embedder if embedder is not None else FaceEmbedder()
        recognizer = self.embedder.recognizer.name
        self.mode, self.frames, self.no_face, self.unmatched = mode, frames, no_face, unmatched
        self.identity_from, self.match_threshold = identity_from, match_threshold
        self.normalization = normalization or default_normalization(recognizer)
        self.identity_threshold = identity_threshold
        self.pool_skip_first, self.max_shift, self.max_gap, self.name = pool_skip_first, max_shift, max_gap, name

    def train(self, mode: bool = True) -> "FaceIdentityReward":
        super().train(mode)
        self.embedder.eval()  # the face models always run in inference mode
        return self

    def forward(self, frames: torch.Tensor, batch: RewardBatch | Mapping[str, Any] | None = None) -> RewardOutput:
        # float32 outside autocast, from the pixels to the score: under bf16 mixed precision the
        # embeddings and cosines drift by about IPRO's whole effect (see ipro.faces.embedder).
        with torch.autocast(frames.device.type, enabled=False):
            return self._score(frames.float() if frames.dtype in (torch.float16, torch.bfloat16) else frames, batch)

    def _score(self, frames: torch.Tensor, batch: RewardBatch | Mapping[str, Any] | None) -> RewardOutput:
        validate_video(frames, self.embedder.value_range, "frames")
        b, num_frames = frames.shape[:2]
        batch = RewardBatch.coerce(batch, b)
        # A zero in the graph (one pixel times 0: a full sum can overflow in float16), so
        # every score backpropagates, even with no face at all.
        anchor = frames.flatten()[:1].sum() * 0.0
        steps = self.frames.indices(num_frames).to(frames.device)
        gen = self.embedder(frames[:, steps])
        targets = self._targets(batch, b, steps, num_frames)

        k = len(steps)
        empty = {"raw": None, "per_frame": None, "swaps": 0, "unmatched": 0, "missing": 0, "people": 0, "identity_scores": torch.zeros(0)}
        results = [self._score_sample(gen, i, k, *targets[i]) if targets[i] is not None else empty for i in range(b)]
        per_frame = torch.full((b, k), float("nan"), device=frames.device)
        id_table = torch.full((b, max((len(r["identity_scores"]) for r in results), default=0)), float("nan"))
        for i, r in enumerate(results):
            if r["per_frame"] is not None:
                per_frame[i] = r["per_frame"].detach()
            id_table[i, : len(r["identity_scores"])] = r["identity_scores"]
        people = [r["people"] for r in results if r["people"]]
        # samples with generated faces but nothing to compare them with
        no_target = sum(t is None and bool((gen.sample == i).any()) for i, t in enumerate(targets))
        n = self.name
        logs = {
            f"{n}/faces": float(gen.num_faces),
            f"{n}/unmatched_faces": float(sum(r["unmatched"] for r in results)),
            f"{n}/missing_people": float(sum(r["missing"] for r in results)),  # person-frames not found
            f"{n}/swaps": float(sum(r["swaps"] for r in results)),
            f"{n}/people": sum(people) / max(1, len(people)),  # mean over samples with someone scored
            f"{n}/no_target_samples": float(no_target),
        }
        details = {
            f"{n}/swaps": torch.tensor([r["swaps"] for r in results]),
            f"{n}/unmatched": torch.tensor([r["unmatched"] for r in results]),
            f"{n}/missing": torch.tensor([r["missing"] for r in results]),
            f"{n}/identity_scores": id_table,  # (B, people) mean value per person, NaN if not scored
        }
        raws = [r["raw"] for r in results]
        return finish(n, self.normalization, raws, per_frame, steps, anchor, self.no_face, logs, details)

    # -- targets ----------------------------------------------------------------

    def _pools(self, batch: RewardBatch, b: int) -> list[FacePool | None]:
        pools = list(batch.pools) if batch.pools is not None else [None] * b
        missing = [i for i in range(b) if pools[i] is None]
        if missing and batch.gt_frames is not None:
            threshold = self.identity_threshold
            if threshold is None:
                threshold = same_person_threshold(self.embedder.recognizer.name)
            for i, pool in zip(missing, pools_from_video(self.embedder, batch.gt_frames[missing], threshold)):
                pools[i] = pool
        rec = self.embedder.recognizer.name
        for i, pool in enumerate(pools):
            if pool is not None and pool.recognizer != rec:
                raise IproError(
                    f"face pool of sample {i} was made with recognizer '{pool.recognizer}', the reward uses '{rec}'; "
                    "rebuild the pools with the same recognizer"
                )
        return pools

    def _targets(self, batch: RewardBatch, b: int, steps: torch.Tensor, num_frames: int):
        """Per sample: None (nothing to compare with) or (centroids (P, D) for
        assignment, targets (T, P, D) mean target embedding per person, available
        (T, P), expected (T, P): who should be in the frame); T is 1, or one entry per
        scored frame in "aligned" mode."""
        device = steps.device
        if self.mode == "input_face" and batch.input_frames is not None:
            with torch.no_grad():
                ref = self.embedder(batch.input_frames[:, None].detach())
            out = []
            for i in range(b):
                emb = ref.embeddings[ref.sample == i].float()
                # Each face of the input image is one person.
                everyone = torch.ones(1, len(emb), dtype=torch.bool, device=emb.device)
                out.append((emb, emb[None], everyone, everyone) if len(emb) else None)
            return out

        pools = self._pools(batch, b)
        if all(p is None for p in pools):
            need = "batch.pools or batch.gt_frames"
            if self.mode == "input_face":
                need = "batch.input_frames, " + need
            raise IproError(f"FaceIdentityReward(mode='{self.mode}') needs {need}")
        out = []
        for pool in pools:
            if pool is None or pool.embeddings.shape[0] == 0:
                out.append(None)
                continue
            pool = pool.to(device)
            emb, ident, frame, people = pool.embeddings.float(), pool.identity.long(), pool.frame.long(), pool.num_people
            dim = self.embedder.embedding_dim
            if emb.shape[1] != dim:
                raise IproError(f"face pool embeddings are {emb.shape[1]}-d, the recognizer gives {dim}-d")
            centroids = F.normalize(_mean_by(emb, ident, people)[0], dim=-1)
            if self.mode == "pool":
                keep = frame != 0 if self.pool_skip_first else torch.ones_like(frame, dtype=torch.bool)
                if not keep.any():  # the only faces are in frame 0: use them rather than nothing
                    keep = torch.ones_like(keep)
                mean, avail = _mean_by(emb[keep], ident[keep], people)
                on_input = _mean_by(emb[frame == 0], ident[frame == 0], people)[1]
                out.append((centroids, mean[None], avail[None], on_input[None]))
            elif self.mode == "input_face":  # the input image is ground-truth frame 0
                mean, avail = _mean_by(emb[frame == 0], ident[frame == 0], people)
                out.append((centroids, mean[None], avail[None], avail[None]) if avail.any() else None)
            else:  # aligned: generated frame f <-> ground-truth frame at the same relative time
                gt_len = max(pool.num_frames, int(frame.max()) + 1)
                scale = (gt_len - 1) / max(num_frames - 1, 1)
                gt_step = (steps.float() * scale).round().long()
                mean, avail = _mean_by(emb, frame * people + ident, gt_len * people)
                avail = avail.view(gt_len, people)[gt_step]
                out.append((centroids, mean.view(gt_len, people, -1)[gt_step], avail, avail))
        return out

    # -- scoring ------------------------------------------------------------------

    def _score_sample(self, gen: VideoFaces, sample: int, k: int, centroids, targets, available, expected) -> dict:
        fb = torch.nonzero(gen.sample == sample).flatten()
        emb, step, boxes = gen.embeddings[fb], gen.frame[fb], gen.boxes[fb]
        people = centroids.shape[0]
        # Per-frame Hungarian assignment of faces to people (no gradient needed).
        match = torch.full((len(fb),), -1, dtype=torch.long)
        sim = (emb.detach().float() @ centroids.T).cpu()
        threshold = -2.0 if self.match_threshold is None else self.match_threshold
        for s in step.unique().tolist():
            faces = torch.nonzero(step.cpu() == s).flatten()
            for face, person in assign(sim[faces], threshold):
                match[faces[face]] = person
        track = track_faces(step, boxes, self.max_shift, self.max_gap)
        swaps = count_swaps(track, step.cpu(), match)
        person = track_identity(track, match) if self.identity_from == "track" else match
        person = person.to(emb.device)

        matched = person >= 0
        t = step if targets.shape[0] > 1 else torch.zeros_like(step)
        p = person.clamp_min(0)
        value = (emb * targets[t, p].to(emb.dtype)).sum(-1)  # = mean cosine to the person's target faces
        comparable = matched & available[t, p]
        if self.unmatched == "penalize":
            value = torch.where(matched, value, torch.zeros_like(value))
            counted = comparable | ~matched
        else:
            counted = comparable

        # Expected people no face of the frame was matched to (in frames that show faces).
        found = torch.zeros(k, people, dtype=torch.bool, device=step.device)
        found[step[matched], person[matched]] = True
        shows_faces = torch.bincount(step, minlength=k) > 0
        missing = expected.to(step.device).expand(k, people) & ~found & shows_faces[:, None]

        sums = value.new_zeros(k).index_add(0, step[counted], value[counted])
        counts = torch.bincount(step[counted], minlength=k)
        if self.unmatched == "penalize":
            counts = counts + missing.sum(1)  # each adds a value of 0
        per_frame = torch.where(counts > 0, sums / counts.clamp_min(1), torch.full_like(sums, float("nan")))
        id_scores = torch.full((people,), float("nan"))
        for q in person[comparable].unique().tolist():
            id_scores[q] = float(value[comparable & (person == q)].detach().mean())
        return {
            "raw": per_frame[counts > 0].mean() if bool((counts > 0).any()) else None,
            "per_frame": per_frame,
            "swaps": swaps,
            "unmatched": int((~matched).sum()),
            "missing": int(missing.sum()),
            "people": int(person[comparable].unique().numel()),
            "identity_scores": id_scores,
        }
