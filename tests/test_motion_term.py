"""IPRO's motion-keeping term (`kl.motion_weight`): what it charges, on real footage and a real model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import prepared, to_tensor

from ipro.models.pixel import BUILTIN_PATH, pack
from ipro.sampling import sample
from ipro.train.ipro import frame_change, motion_deficit, motion_loss


@pytest.fixture(scope="module")
def clip(carphone):
    """9 carphone frames (every other one: a man talking and turning) as pixel-i2v latents (1, 12, 3, H, W)."""
    return pack(to_tensor(carphone[0:18:2])[None].transpose(1, 2))


CONFIGS = Path(__file__).resolve().parents[1] / "configs"
GENERATED = torch.tensor([False, True, True])  # pixel-i2v: latent frame 0 is the imposed input


def test_a_frozen_clip_loses_all_motion_and_a_livelier_one_none(clip):
    first = clip[:, :, :1]
    assert frame_change(clip, GENERATED).item() > 0
    assert motion_deficit(clip, clip, GENERATED).item() == 0.0
    assert motion_deficit(first.expand_as(clip), clip, GENERATED).item() == pytest.approx(1.0)
    # Halfway toward the first frame: every frame difference halves, its energy falls to a quarter.
    assert motion_deficit(first + 0.5 * (clip - first), clip, GENERATED).item() == pytest.approx(0.75, abs=1e-5)
    # More motion than the base model costs nothing: the term only guards against freezing.
    assert motion_deficit(first + 2.0 * (clip - first), clip, GENERATED).item() == 0.0


def test_the_term_is_zero_at_initialisation_and_its_gradient_gives_motion_back(face):
    model, cond = prepared(BUILTIN_PATH, face, finetune="lora", lora_rank=4)
    rollout = sample(model, cond, 4, grad_steps=2, seed=0)
    assert motion_loss(model, rollout, cond).item() == 0.0  # LoRA B = 0: policy == base model
    generated = model.generated_mask(cond)[0, 0, :, 0, 0] > 0
    params = model.trainable_parameters()
    opt = torch.optim.Adam(params, lr=1e-2)

    def descend(loss_of, steps):
        for _ in range(steps):
            rollout = sample(model, cond, 4, grad_steps=2, seed=0)
            opt.zero_grad()
            loss_of(rollout).backward()
            opt.step()

    # Teach the adapter to freeze the clip (what a face reward can do), then let the term pull back.
    descend(lambda r: frame_change(r.grad_steps[-1].x0, generated).mean(), 6)
    frozen = motion_loss(model, sample(model, cond, 4, grad_steps=2, seed=0), cond).item()
    assert frozen > 0.2
    descend(lambda r: motion_loss(model, r, cond), 6)
    after = motion_loss(model, sample(model, cond, 4, grad_steps=2, seed=0), cond).item()
    assert after < 0.5 * frozen


def test_the_trainer_adds_the_term_and_logs_it(dataset, tmp_path):
    from ipro.train.config import load_config
    from ipro.train.ipro import IPROTrainer

    overrides = {"data.dataset": str(dataset), "model.lora_rank": 4, "optim.steps": 1, "run.output_dir": str(tmp_path),
                 "run.log_with": [], "data.height": 64, "data.width": 64, "kl.motion_weight": 1.0}
    logs = IPROTrainer(load_config(CONFIGS / "tiny-cpu-ipro.yaml", overrides)).step()
    assert logs["motion_deficit"] == 0.0  # the first step's policy is the base model
    overrides["kl.motion_weight"] = 0.0
    assert "motion_deficit" not in IPROTrainer(load_config(CONFIGS / "tiny-cpu-ipro.yaml", overrides)).step()
