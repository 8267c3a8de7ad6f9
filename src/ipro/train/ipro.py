"""IPRO: reward feedback through the last K sampler steps, with a multi-step KL.

Each step: roll out from pure noise with the current model (T-K steps without
gradient, K with), decode with the frozen VAE, score the faces against the clip's
face pool, and minimize

    loss = -w * normalized R_face + beta * mean_k ||v_theta(x_k, t_k) - v_base(x_k, t_k)||^2 / (2 sigma_k^2)

v_base is the base model (the model with its LoRA switched off, or a frozen copy for full
fine-tuning) under the rollout's guidance; only the trained expert's steps count (`ipro.train.kl`).
"""

from __future__ import annotations

import torch

from ipro.models.offload import activations_on_cpu
from ipro.train.kl import multistep_kl
from ipro.train.trainer import Trainer


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
        raw = out.raw[torch.isfinite(out.raw)]
        logs = {
            "loss": loss.detach(),
            "reward": reward.detach(),
            "reward_raw": raw.mean() if raw.numel() else torch.tensor(float("nan")),
            "kl": kl.detach(),
            "face_coverage": out.coverage.mean(),
            "grad_steps": float(rollout.num_grad_steps),
            **{f"reward/{k}": v for k, v in out.logs.items()},
        }
        return loss, logs
