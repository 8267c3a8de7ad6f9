"""ipro.rewards on real footage: carphone (a man talking, 176x144) and the astronaut
photo, through the real MTCNN + dlib face models. Numbers in the comments were
measured on this CPU with one thread; margins leave room for other platforms."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import to_tensor

from ipro.data.pool import FacePool
from ipro.errors import IproError
from ipro.faces.embedder import FaceEmbedder
from ipro.rewards import (
    FaceIdentityReward,
    FrameSelection,
    ImageFeatureReward,
    Normalization,
    RewardBatch,
    WeightedReward,
    pools_from_video,
)
from ipro.rewards.tracking import count_swaps, track_faces, track_identity

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def embedder() -> FaceEmbedder:
    return FaceEmbedder()


@pytest.fixture(scope="module")
def natural(carphone) -> torch.Tensor:
    """(1, 17, 3, 144, 176): every 7th frame of carphone, the head turns and talks."""
    return to_tensor(carphone[:113:7])[None]


@pytest.fixture(scope="module")
def carphone_pool(embedder, carphone) -> FacePool:
    """The carphone clip's pool: all 120 frames, one person."""
    return pools_from_video(embedder, to_tensor(carphone)[None], identity_threshold=0.92)[0]


@pytest.fixture(scope="module")
def astronaut_video(astronaut) -> torch.Tensor:
    """(1, 17, 3, 144, 144): the astronaut photo at carphone's height, held still."""
    img = F.interpolate(to_tensor(astronaut)[None], size=(144, 144), mode="area")
    return img[:, None].expand(1, 17, 3, 144, 144).contiguous()


def tile(left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """Put two (F, 3, 288, W) videos side by side."""
    return torch.cat([left, right], dim=-1)


@pytest.fixture(scope="module")
def two_people(carphone, astronaut) -> tuple[torch.Tensor, torch.Tensor]:
    """(9, 3, 288, 352) carphone at 2x and (9, 3, 288, 288) the astronaut, still."""
    man = F.interpolate(to_tensor(carphone[:113:14]), scale_factor=2.0, mode="bilinear", align_corners=False).clamp(0, 1)
    woman = F.interpolate(to_tensor(astronaut)[None], size=(288, 288), mode="area").expand(len(man), 3, 288, 288)
    return man, woman.contiguous()


def test_frame_selection_picks_expected_frames():
    assert FrameSelection().indices(5).tolist() == [0, 1, 2, 3, 4]
    assert FrameSelection(stride=4).indices(17).tolist() == [0, 4, 8, 12, 16]
    # count spreads evenly over the candidates and keeps both ends.
    assert FrameSelection(count=5).indices(17).tolist() == [0, 4, 8, 12, 16]
    assert FrameSelection(count=3).indices(81).tolist() == [0, 40, 80]
    # skip_first leaves out the input frame: candidates 1..16, four of them.
    assert FrameSelection(count=4, skip_first=True).indices(17).tolist() == [1, 6, 11, 16]
    assert FrameSelection(stride=2, skip_first=True).indices(6).tolist() == [1, 3, 5]
    # more requested than there are: all of them; a 1-frame video still scores its frame.
    assert FrameSelection(count=50).indices(4).tolist() == [0, 1, 2, 3]
    assert FrameSelection(skip_first=True).indices(1).tolist() == [0]
    with pytest.raises(IproError):
        FrameSelection(stride=0)


def test_reward_scores_only_selected_frames(embedder, natural, carphone_pool):
    reward = FaceIdentityReward(embedder, frames=FrameSelection(count=3, skip_first=True))
    out = reward(natural, {"pools": [carphone_pool]})
    assert out.frame_indices.tolist() == [1, 9, 16]
    assert out.per_frame.shape == (1, 3)
    assert out.logs["face/faces"] == 3  # one face in each of the three scored frames


def test_own_pool_scores_higher_than_another_person(embedder, natural, astronaut_video, carphone_pool):
    reward = FaceIdentityReward(embedder)
    same = reward(natural, {"pools": [carphone_pool]})
    other = reward(astronaut_video, {"pools": [carphone_pool]})
    # Measured: carphone frames vs carphone's pool 0.9775 (per frame 0.962-0.984); the
    # astronaut (face ~40 px here) vs carphone's pool 0.840. dlib's band is narrow, but
    # the gap is ~3.4 std of the default normalization.
    assert same.raw.item() > 0.95
    assert other.raw.item() < 0.87
    assert same.raw.item() - other.raw.item() > 0.1
    # Normalized with the dlib defaults (0.94, 0.04): measured +0.94 and -2.49.
    assert same.score.item() > 0.3 and other.score.item() < -1.8
    assert same.coverage.item() == 1.0 and bool(same.has_face.all()) and bool(same.valid.all())
    assert not torch.isnan(same.per_frame).any()


def test_frozen_face_copy_paste(embedder, natural, carphone_pool):
    frozen = natural[:, :1].expand_as(natural).contiguous()
    batch = {"pools": [carphone_pool], "input_frames": natural[:, 0]}
    ref = FaceIdentityReward(embedder, mode="input_face")
    pool = FaceIdentityReward(embedder, mode="pool")
    ref_frozen, ref_natural = ref(frozen, batch).raw.item(), ref(natural, batch).raw.item()
    pool_frozen, pool_natural = pool(frozen, batch).raw.item(), pool(natural, batch).raw.item()
    # input_face mode pays most for copying the input face: frozen 1.000 vs natural
    # 0.9805 (measured), a gain of ~0.5 std of the dlib normalization.
    assert ref_frozen > 0.999
    assert ref_frozen - ref_natural > 0.01
    # Pool mode (FSM) compares every frame with all 120 poses of the clip, so a copy of
    # frame 0 is just one more pose: measured frozen 0.9789 vs natural 0.9775, a gain
    # of 0.0014, 7% of input_face mode's (0.0195). FSM damps the copy-paste incentive
    # but does not remove it: frame 0 is a typical, frontal pose, close to the pool's
    # mean. (Leaving gt frame 0 out of the pool changes this by < 1e-4: one of 120.)
    gain_ref, gain_pool = ref_frozen - ref_natural, pool_frozen - pool_natural
    assert 0 < gain_pool < 0.25 * gain_ref


def test_aligned_mode_matches_time(embedder, natural, carphone):
    # The ground truth is the full 120-frame clip; generated frame i of 17 is compared
    # with ground-truth frame round(i * 119 / 16). The "generated" video is the clip
    # sampled at those times, so every frame meets itself: measured 1.0000.
    gt = to_tensor(carphone[np.round(np.arange(17) * 119 / 16).astype(int)])[None]
    gt_pool = pools_from_video(embedder, gt, identity_threshold=0.92)[0]
    gt_pool.num_frames = 120
    gt_pool.frame = torch.round(gt_pool.frame.float() * 119 / 16).long()
    aligned = FaceIdentityReward(embedder, mode="aligned")(gt, {"pools": [gt_pool]})
    assert aligned.raw.item() > 0.99
    # Reversed in time, frames meet other poses of the same man: measured 0.974.
    backwards = FaceIdentityReward(embedder, mode="aligned")(gt.flip(1), {"pools": [gt_pool]})
    assert backwards.raw.item() < aligned.raw.item() - 0.01


def test_gradients_reach_the_face_pixels(embedder, natural, carphone_pool):
    frames = natural[:, ::4].clone().requires_grad_(True)  # 5 frames
    out = FaceIdentityReward(embedder)(frames, {"pools": [carphone_pool]})
    out.mean().backward()
    grad = frames.grad
    assert torch.isfinite(grad).all()
    assert grad.abs().sum() > 0
    # The gradient lives where the face is: the aligned chip covers the face box plus
    # dlib's padding. Measured: all of the gradient mass lies within the box grown 2x.
    assert out.per_frame.shape == (1, 5) and out.coverage.item() == 1.0
    inside = torch.zeros_like(grad, dtype=torch.bool)
    box = carphone_pool.boxes.mean(0)  # the man barely moves: one box for all frames
    cx, cy, w, h = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2, box[2] - box[0], box[3] - box[1]
    inside[..., int(cy - h) : int(cy + h), int(cx - w) : int(cx + w)] = True
    assert grad.abs()[inside].sum() / grad.abs().sum() > 0.99


def test_tracking_follows_position_not_looks():
    # Two 40 px faces walk towards each other by 10 px a frame; from frame 3 the left
    # one is matched to person 1 and the right one to person 0 (they trade faces).
    step = torch.arange(6).repeat_interleave(2)
    x = torch.stack([torch.tensor([50.0 + 10 * s, 200.0 - 10 * s]) for s in range(6)]).flatten()
    boxes = torch.stack([x - 20, torch.full_like(x, 50), x + 20, torch.full_like(x, 90)], 1)
    track = track_faces(step, boxes)
    assert track.tolist() == [0, 1] * 6  # position keeps each person on their track
    identity = torch.tensor([0, 1] * 3 + [1, 0] * 3)
    assert count_swaps(track, step, identity) == 2
    assert track_identity(track, identity).tolist() == [0, 1] * 6  # 3-3 tie: the first identity
    # Unmatched faces (-1) are passed over, not counted as swaps.
    assert count_swaps(track, step, torch.tensor([0, 1, -1, 1, 0, -1] + [0, 1] * 3)) == 0
    # A face that jumps by more than max_shift face sizes, or comes back after more than
    # max_gap missing frames, starts a new track (no swap invented).
    jump = torch.tensor([[0.0, 0, 40, 40], [200, 0, 240, 40]])
    assert track_faces(torch.tensor([0, 1]), jump).tolist() == [0, 1]
    assert track_faces(torch.tensor([0, 3]), jump[:1].repeat(2, 1)).tolist() == [0, 0]
    assert track_faces(torch.tensor([0, 4]), jump[:1].repeat(2, 1)).tolist() == [0, 1]


@pytest.mark.slow  # keeps the fast subset under 3 minutes
def test_two_people_swap_is_counted_and_costs_reward(embedder, two_people):
    man, woman = two_people
    gt = tile(man, woman)[None]  # man on the left, woman on the right, 9 frames
    half = 4
    # From frame 4 on the two trade places: whoever stands left now has the woman's face.
    swapped = torch.cat([tile(man[:half], woman[:half]), tile(woman[half:], man[half:])])[None]
    reward = FaceIdentityReward(embedder)
    batch = RewardBatch(gt_frames=gt)  # the pool is computed and clustered on the fly
    plain, swap = reward(gt, batch), reward(swapped, batch)
    # Two people in the pool, both found and scored in every frame; no swap.
    assert plain.logs["face/people"] == 2
    assert plain.details["face/swaps"].tolist() == [0]
    assert not torch.isnan(plain.details["face/identity_scores"]).any()
    # Each side's track changes identity once at frame 4: 2 swaps.
    assert swap.details["face/swaps"].tolist() == [2]
    assert swap.logs["face/swaps"] == 2
    # Each track is scored against the person it showed most (5 of 9 frames), so the
    # 4 frames before the swap compare the wrong faces: measured 0.989 -> 0.915.
    assert swap.raw.item() < plain.raw.item() - 0.05
    # Scoring each face against its own per-frame match hides the swap entirely.
    per_frame_id = FaceIdentityReward(embedder, identity_from="frame")(swapped, batch)
    assert per_frame_id.details["face/swaps"].tolist() == [2]
    assert abs(per_frame_id.raw.item() - plain.raw.item()) < 0.01


def test_unmatched_faces_ignore_or_penalize(embedder, two_people, carphone_pool):
    man, woman = two_people
    video = tile(man, woman)[None]
    # The pool has only the man: the woman's face is left over in every frame.
    ignore = FaceIdentityReward(embedder)(video, {"pools": [carphone_pool]})
    penalize = FaceIdentityReward(embedder, unmatched="penalize")(video, {"pools": [carphone_pool]})
    assert ignore.logs["face/unmatched_faces"] == 9
    assert ignore.raw.item() > 0.95  # only the man counts (measured 0.977)
    # Penalized, each frame is the mean of the man's ~0.97 and the woman's 0.
    assert penalize.raw.item() == pytest.approx(ignore.raw.item() / 2, abs=1e-4)


@pytest.mark.slow  # keeps the fast subset under 3 minutes
def test_a_person_who_vanishes_is_missing_and_penalized(embedder, two_people):
    """Two people in the input; from frame 4 the woman's half is blank. Ignored, the
    man's faces alone keep the reward; penalized, each of those 5 frames averages his
    value with a 0 for her."""
    man, woman = two_people
    gt = tile(man, woman)[None]
    gone = gt.clone()
    gone[0, 4:, :, :, gt.shape[-1] // 2 :] = 0.5
    batch = RewardBatch(gt_frames=gt)
    full = FaceIdentityReward(embedder)(gt, batch)
    ignore = FaceIdentityReward(embedder)(gone, batch)
    penalize = FaceIdentityReward(embedder, unmatched="penalize")(gone, batch)
    assert full.logs["face/missing_people"] == 0
    assert ignore.logs["face/missing_people"] == penalize.logs["face/missing_people"] == 5
    assert ignore.raw.item() > full.raw.item() - 0.01
    per_frame = ignore.per_frame[0].clone()
    per_frame[4:] /= 2
    assert penalize.raw.item() == pytest.approx(per_frame.mean().item(), abs=1e-4)
    # Aligned mode expects whoever the ground-truth frame shows: blank her there too and
    # nothing is missing.
    aligned = FaceIdentityReward(embedder, mode="aligned", unmatched="penalize")
    assert aligned(gone, RewardBatch(gt_frames=gone)).logs["face/missing_people"] == 0
    assert aligned(gone, batch).logs["face/missing_people"] == 5


def test_no_face_never_crashes(embedder, natural, carphone_pool):
    gray = torch.full((2, 3, 3, 64, 64), 0.5)
    noise = torch.rand(2, 3, 3, 64, 64)
    for blank in (gray, noise):
        frames = blank.clone().requires_grad_(True)
        out = FaceIdentityReward(embedder)(frames, {"pools": [carphone_pool] * 2})
        assert not out.has_face.any() and not out.valid.any()
        assert out.coverage.tolist() == [0.0, 0.0]
        assert torch.isnan(out.raw).all()
        assert out.score.tolist() == [0.0, 0.0]
        assert out.logs["face/no_face_batch"] == 1.0 and out.logs["face/no_face_samples"] == 2
        loss = -out.mean()
        loss.backward()  # connected to the graph, so backward works and gives zeros
        assert frames.grad is not None and frames.grad.abs().sum() == 0

    # One video with a face, one without: "skip" leaves the second out of the mean;
    # a numeric fallback gives it that normalized score (here -1: a penalty).
    face = F.interpolate(natural[0, :3], size=(64, 64), mode="area")[None]
    mixed = torch.cat([face, gray[:1]])
    skip = FaceIdentityReward(embedder)(mixed, {"pools": [carphone_pool] * 2})
    assert skip.valid.tolist() == [True, False] and skip.mean() == skip.score[0]
    fallback = FaceIdentityReward(embedder, no_face=-1.0)(mixed, {"pools": [carphone_pool] * 2})
    assert fallback.valid.tolist() == [True, True]
    assert fallback.score[1].item() == -1.0
    assert fallback.raw[1].item() == pytest.approx(0.94 - 0.04)
    assert fallback.logs["face/no_face_batch"] == 0.0 and fallback.logs["face/no_face_samples"] == 1
    # In a sum, a sample the face reward skipped still counts through the other reward.
    total = FaceIdentityReward(embedder) + 0.5 * ImageFeatureReward(TinyEncoder())
    both = total(mixed, {"pools": [carphone_pool] * 2, "input_frames": mixed[:, 0]})
    assert both.valid.tolist() == [True, True] and both.has_face.tolist() == [True, False]


def test_errors_name_what_is_missing(embedder, natural, carphone_pool):
    with pytest.raises(IproError, match="needs batch.pools or batch.gt_frames"):
        FaceIdentityReward(embedder)(natural[:, :2], {})
    wrong = FacePool(**{**carphone_pool.__dict__, "recognizer": "arcface-iresnet50"})
    with pytest.raises(IproError, match="recognizer"):
        FaceIdentityReward(embedder)(natural[:, :2], {"pools": [wrong]})
    with pytest.raises(IproError, match="2 pools for 1 videos"):
        FaceIdentityReward(embedder)(natural[:, :2], {"pools": [carphone_pool] * 2})
    with pytest.raises(IproError, match="mode"):
        FaceIdentityReward(embedder, mode="best")


class TinyEncoder(torch.nn.Module):
    """Random conv encoder: plumbing only, its features mean nothing."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 5, stride=4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x).mean((2, 3))


def test_image_feature_reward_and_weighted_sum(embedder, natural, carphone_pool):
    frames = natural[:, :3].clone().requires_grad_(True)
    image = ImageFeatureReward(TinyEncoder(), normalization=Normalization(0.5, 0.25))
    batch = {"pools": [carphone_pool], "input_frames": natural[:, 0], "prompt": ["a man"]}
    out = image(frames, batch)
    # Frame 0 is the input image itself: cosine 1.
    assert out.per_frame[0, 0].item() == pytest.approx(1.0, abs=1e-5)
    assert out.score.item() == pytest.approx((out.raw.item() - 0.5) / 0.25, abs=1e-5)
    face = FaceIdentityReward(embedder)
    total = face * 1.0 + 0.5 * image
    assert isinstance(total, WeightedReward)
    both = total(frames, batch)
    f, i = face(frames, batch), image(frames, batch)
    assert both.score.item() == pytest.approx(f.score.item() + 0.5 * i.score.item(), abs=1e-4)
    assert {"face/raw", "image/raw", "total/score"} <= set(both.logs)
    both.mean().backward()
    assert torch.isfinite(frames.grad).all() and frames.grad.abs().sum() > 0
    assert (total * 2).weights == [2.0, 1.0]  # scaling a sum scales every term
    with pytest.raises(IproError, match="distinct names"):
        face + face


def test_image_feature_reward_from_local_clip_checkpoint(tmp_path, natural):
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    config = CLIPVisionConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=2,
                              image_size=32, patch_size=8, projection_dim=16)
    CLIPVisionModelWithProjection(config).save_pretrained(tmp_path)
    reward = ImageFeatureReward.from_pretrained(tmp_path, target="gt")
    assert reward.encoder.image_size == 32
    out = reward(natural[:, :2], {"gt_frames": natural[:, :4]})
    assert out.per_frame.shape == (1, 2) and math.isfinite(out.raw.item())


def test_any_encoder_as_face_recognizer(natural):
    # The paper's CLIP ablation embeds face chips with CLIP: any encoder can stand in
    # for the recognizer, and the whole face reward (FSM, people, swaps) runs on it.
    from ipro.rewards import EncoderRecognizer, ImageEncoder

    recognizer = EncoderRecognizer(ImageEncoder(TinyEncoder(), image_size=64), name="tiny")
    assert recognizer.embedding_dim == 8 and recognizer.template.shape == (5, 2)
    reward = FaceIdentityReward(FaceEmbedder(recognizer=recognizer), identity_threshold=0.5)
    assert reward.normalization == Normalization(0.0, 1.0)  # unknown recognizer: none
    out = reward(natural[:, :3], {"gt_frames": natural[:, 3:6]})
    assert out.coverage.item() == 1.0 and math.isfinite(out.raw.item())
    with pytest.raises(IproError, match="identity threshold"):
        FaceIdentityReward(FaceEmbedder(recognizer=recognizer))(natural[:, :1], {"gt_frames": natural[:, :1]})
