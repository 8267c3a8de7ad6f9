"""IPRO: reward feedback through the last K sampler steps, with a multi-step KL.

Each step: roll out from pure noise with the current model (T-K steps without
gradient, K with), decode with the frozen VAE, score the faces against the clip's
face pool, and minimize

    loss = -w * normalized R_face + beta * mean_k ||v_theta(x_k, t_k) - v_base(x_k, t_k)||^2 / (2 sigma_k^2)
           [+ lambda * motion_deficit]

The optional motion term (`kl.motion_weight`, not in the paper) charges what the clip loses
of the base model's frame-to-frame change (`motion_deficit`): a reward on identity is
maximized by a frozen face, which the KL alone does not prevent here.

v_base is the base model (the model with its LoRA switched off, or a frozen copy for full
fine-tuning) under the rollout's guidance; only the trained expert's steps count (`ipro.train.kl`).
"""

from __future__ import annotations

import torch

from ipro.models.offload import activations_on_cpu
from ipro.train.kl import multistep_kl
from ipro.train.trainer import Trainer


def frame_change(x0: torch.Tensor, generated: torch.Tensor) -> torch.Tensor:
    """(B,) mean squared difference between consecutive latent frames of x0 (B, C, F, H, W),
    over the pairs whose later frame is generated (`generated`: (F,) bool)."""
    diff = (x0[:, :, 1:] - x0[:, :, :-1]) ** 2
    return diff[:, :, generated[1:]].flatten(1).mean(1)


def motion_deficit(x0: torch.Tensor, x0_base: torch.Tensor, generated: torch.Tensor) -> torch.Tensor:
    """(B,) relu(1 - E / E_base): the share of the base model's frame-to-frame change that x0 lost
    (0 when it moves as much or more)."""
    return torch.relu(1 - frame_change(x0, generated) / frame_change(x0_base, generated).clamp_min(1e-12))


def motion_loss(model, rollout, cond) -> torch.Tensor:
    """motion_deficit of the clean-video prediction at the last gradient step the trained
    weights act on, against the base model's on the same input (no gradient through it)."""
    steps = [s for s in rollout.grad_steps if model.trained_at(s.t)]
    if not steps:
        return torch.zeros((), device=rollout.latents.device)
    step = steps[-1]
    with torch.no_grad():
        x0_base = step.x_t - step.sigma * model.base_velocity(step.x_t, step.t, cond, rollout.guidance_scale)
    generated = model.generated_mask(cond)[0, 0, :, 0, 0] > 0
    return motion_deficit(step.x0, x0_base, generated).mean()


class IPROTrainer(Trainer):
    method = "ipro"

    def build_reward(self):
        from ipro.rewards.factory import build_face_reward

        return build_face_reward(self.config.reward, self.accelerator.device)

    def rollout(self, batch: dict, generator: torch.Generator, grad: bool = True):
        from ipro.sampling import sample

        c = self.config
        cond = self.condition(batch)
        k = c.sampler.grad_steps if c.sampler.grad_steps_min is None else (c.sampler.grad_steps_min, c.sampler.grad_steps)
        with activations_on_cpu(self.model, c.model.offload_activations):
            rollout = sample(
                self.model, cond, num_steps=c.sampler.num_steps, grad_steps=k if grad else 0,
                generator=generator, guidance_scale=c.sampler.guidance_scale, shift=c.sampler.shift,
            )
        return cond, rollout

    def compute_loss(self, batch: dict, generator: torch.Generator):
        from ipro.rewards import RewardBatch

        c = self.config
        images = batch["image"].to(self.accelerator.device)
        cond, rollout = self.rollout(batch, generator)
        wanted = self.reward.frames.indices(c.data.num_frames) if hasattr(self.reward, "frames") else None
        frames = self.model.decode(rollout.latents, frames=None if wanted is None else [int(i) for i in wanted])
        self.keep_rollout_frames(frames)  # for the reward-hacking monitor (ipro.train.monitor)
        # The reward picks its frames again from what it is given; hand it the full-length
        # index space by scattering the decoded frames back when a subset was decoded.
        if wanted is not None and len(wanted) != c.data.num_frames:
            full = frames.new_zeros(frames.shape[0], c.data.num_frames, *frames.shape[2:])
            full[:, wanted] = frames
            frames = full
        out = self.reward(frames, RewardBatch(pools=batch["pool"], input_frames=images))
        reward = out.mean()
        kl = multistep_kl(self.model, rollout, cond, c.kl.weighting)
        loss = -c.reward.weight * reward + c.kl.weight * kl
        motion = motion_loss(self.model, rollout, cond) if c.kl.motion_weight else None
        if motion is not None:
            loss = loss + c.kl.motion_weight * motion
        raw = out.raw[torch.isfinite(out.raw)]
        logs = {
            "loss": loss.detach(),
            "reward": reward.detach(),
            "reward_raw": raw.mean() if raw.numel() else torch.tensor(float("nan")),
            "kl": kl.detach(),
            **({"motion_deficit": motion.detach()} if motion is not None else {}),
            "face_coverage": out.coverage.mean(),
            "grad_steps": float(rollout.num_grad_steps),
            **{f"reward/{k}": v for k, v in out.logs.items()},
        }
        return loss, logs
