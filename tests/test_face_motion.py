"""IPRO's hinge against frozen faces (`face_motion.weight`, `ipro.train.ipro.face_motion_loss`),
on carphone and the embedded base model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import to_tensor
from ipro.models.pixel import BUILTIN_PATH
from ipro.rewards import RewardBatch
from ipro.train.ipro import face_change, face_motion_loss, face_region


@pytest.fixture(scope="module")
def reward():
    from ipro.rewards.factory import build_face_reward
    from ipro.train.config import IPRORewardConfig

    return build_face_reward(IPRORewardConfig(mode="input_face"), "cpu")


def test_the_reward_reports_the_faces_it_found_and_face_change_reads_them(carphone, reward):
    moving = to_tensor(carphone[0:90:10][:9])[None]  # (1, 9, 3, H, W): 3 s of a man talking and turning
    still = moving[:, :1].expand_as(moving)
    blank = torch.full_like(moving, 0.5)
    out = reward(torch.cat([moving, still, blank]), RewardBatch(input_frames=moving[:, 0].expand(3, -1, -1, -1)))
    boxes = out.details[f"{reward.name}/boxes"]
    assert boxes.shape[0] == 3 and boxes.shape[2] == 4
    found = boxes[0][torch.isfinite(boxes[0]).all(1)]
    assert len(found) >= 8 and torch.isnan(boxes[2]).all()  # a face in (nearly) every frame; none in the blank clip
    h, w = moving.shape[-2:]
    assert (found[:, 0] >= -2).all() and (found[:, 2] <= w + 2).all() and (found[:, 3] <= h + 2).all()
    region = face_region(boxes, h, w)
    assert region[2].sum() == 0 and 0.05 < region[0].mean() < 0.6  # the face, not the frame
    change = face_change(torch.cat([moving, still]), region[:2])
    assert change[:, 0].abs().max() < 1e-5  # the first frame against itself
    assert change[1].abs().max() < 1e-5 and change[0, 1:].min() > 0.02, change  # a frozen face does not change


@pytest.mark.skipif(not (BUILTIN_PATH / "model_index.json").is_file(), reason="the embedded base model is not in this checkout")
def test_the_hinge_is_zero_for_the_base_model_and_pulls_a_frozen_face_back(carphone, reward):
    from ipro.models import load_model
    from ipro.sampling import sample

    torch.manual_seed(0)
    model = load_model(BUILTIN_PATH, finetune="lora", lora_rank=8)
    image = to_tensor(carphone[80][None])[0]  # (3, 144, 176)
    cond = model.prepare_condition(image[None], [""], 9, 128, 160)
    rollout = sample(model, cond, 4, grad_steps=2, seed=0)
    frames = model.decode(rollout.latents)
    boxes = reward(frames, RewardBatch(input_frames=frames[:, 0])).details[f"{reward.name}/boxes"]
    assert torch.isfinite(boxes).all(1).any()
    # LoRA B = 0: the policy is the base model, whose faces change exactly as much as its own.
    loss, logs = face_motion_loss(model, rollout, cond, frames, None, boxes)
    assert loss.item() == 0.0 and logs["face_motion/change_base"] > 0.005
    # A face frozen on the first frame (the copy-paste hack) costs, and the gradient undoes it.
    frozen = frames.detach()[:, :1].expand_as(frames).clone().requires_grad_(True)
    loss, logs = face_motion_loss(model, rollout, cond, frozen, None, boxes)
    assert loss.item() > 0.005 and logs["face_motion/change"] < 1e-5
    loss.backward()
    assert frozen.grad[:, 1:].abs().sum() > 0 and frozen.grad[:, 1:].flatten(2).abs().sum(-1).gt(0).float().mean() > 0.5
    # No face found: nothing to keep moving, and the loss is still in the graph.
    none = torch.full_like(boxes, float("nan"))
    loss, _ = face_motion_loss(model, rollout, cond, frozen, None, none)
    assert loss.item() == 0.0 and loss.requires_grad
    assert np.isfinite(logs["face_motion/deficit"])
