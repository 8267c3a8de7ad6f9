"""The reward a trainer optimizes, built from the training config's reward settings.

Every method reads the `reward` section (face identity reward or the generic image-feature
reward); GRPO can add a learned identity reward model (`grpo.reward_model`) and mix the
two. The settings are passed in as plain objects: this module reads their fields and
never imports the training code.
"""

from __future__ import annotations

import torch

from ipro.errors import IproError
from ipro.rewards.base import FrameSelection, Normalization, Reward, WeightedReward


def build_face_reward(section, device) -> Reward:
    """The `reward` section (kind, mode, recognizer, norm_*, frame_stride, max_frames,
    exclude_first_frame, no_face, unmatched, feature_encoder) as a reward object."""
    from ipro.rewards.face import FaceIdentityReward, default_normalization

    frames = FrameSelection(stride=section.frame_stride, count=section.max_frames)
    if section.kind == "feature":
        from ipro.rewards.image_features import ImageFeatureReward

        if not section.feature_encoder:
            raise IproError("reward.kind 'feature' needs reward.feature_encoder: a local CLIP/DINO checkpoint folder")
        reward = ImageFeatureReward.from_pretrained(section.feature_encoder, frames=frames)
        return reward.to(device) if hasattr(reward, "to") else reward
    from ipro.faces.embedder import FaceEmbedder

    embedder = FaceEmbedder(section.recognizer).to(device)
    measured = default_normalization(embedder.recognizer.name)
    norm = Normalization(section.norm_mean if section.norm_mean is not None else measured.mean,
                         section.norm_std if section.norm_std is not None else measured.std)
    return FaceIdentityReward(
        embedder, mode=section.mode, frames=frames, normalization=norm,
        no_face="skip" if section.no_face == "skip" else 0.0, unmatched=section.unmatched,
        pool_skip_first=section.exclude_first_frame,
    )


def build_reward(section, device, reward_model: str | None = None, reward_model_weight: float = 1.0,
                 face_reward_weight: float = 1.0, dtype: torch.dtype = torch.float32) -> Reward:
    """The face reward of `section`, a learned identity reward model (a checkpoint of
    `ipro reward-model train`, dlib/ArcFace or VLM backbone), or their weighted mix.

    `dtype` is the VLM reward model's (the policy's); the face reward always runs in float32.
    """
    if reward_model is None:
        if face_reward_weight == 0:
            raise IproError("grpo.face_reward_weight is 0 and grpo.reward_model is not set: there is no reward to optimize")
        return build_face_reward(section, device)
    from ipro.rewards.face import FaceIdentityReward
    from ipro.rewards.learned import LearnedIdentityReward, read_meta

    meta = read_meta(reward_model)
    face = build_face_reward(section, device) if face_reward_weight > 0 else None
    if meta["backbone"] == "vlm":
        from ipro.rewards.vlm import VlmIdentityReward, VlmRewardModel

        learned = VlmIdentityReward(VlmRewardModel.load(reward_model, device=device, dtype=dtype))
    else:
        from ipro.faces.embedder import FaceEmbedder

        # One face detector/recognizer in memory when both rewards use the same one; the
        # reward section's recognizer is also how an ArcFace-trained model finds its weights.
        embedder = face.embedder if isinstance(face, FaceIdentityReward) else FaceEmbedder(section.recognizer).to(device)
        shared = embedder if embedder.recognizer.name == meta["recognizer"] else None
        learned = LearnedIdentityReward.from_pretrained(reward_model, embedder=shared, device=device)
    if face is None:
        return learned
    return WeightedReward([(face_reward_weight, face), (reward_model_weight, learned)])
