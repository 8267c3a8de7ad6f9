"""Rewards: `reward(frames, batch) -> RewardOutput`, shared by every trainer.

- `FaceIdentityReward`: IPRO's face reward with its facial scoring mechanism (FSM),
  for one or several people, with identity-swap counting.
- `ImageFeatureReward`: cosine of any image encoder's features (the CLIP ablation).
- `WeightedReward` / `a * 0.5 + b`: weighted sums of normalized scores.
- `ipro.rewards.factory`: the reward a trainer optimizes, from the config's reward settings
  (`build_face_reward`; `build_reward` adds GRPO's learned reward model and the mix).
"""

from ipro.rewards.base import FrameSelection, Normalization, Reward, RewardBatch, RewardOutput, WeightedReward
from ipro.rewards.face import FaceIdentityReward, default_normalization, pools_from_video
from ipro.rewards.image_features import EncoderRecognizer, ImageEncoder, ImageFeatureReward

__all__ = [
    "EncoderRecognizer",
    "FaceIdentityReward",
    "FrameSelection",
    "ImageEncoder",
    "ImageFeatureReward",
    "Normalization",
    "Reward",
    "RewardBatch",
    "RewardOutput",
    "WeightedReward",
    "default_normalization",
    "pools_from_video",
]
