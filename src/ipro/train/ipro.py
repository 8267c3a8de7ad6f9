"""IPRO: reward feedback through the last K sampler steps, with a multi-step KL.

Each step: roll out from pure noise with the current model (T-K steps without
gradient, K with), decode with the frozen VAE, score the faces against the clip's
face pool, and minimize

    loss = -w * normalized R_face + beta * mean_k ||v_theta(x_k, t_k) - v_base(x_k, t_k)||^2 / (2 sigma_k^2)

v_base is the base model (the model with its LoRA switched off, or a frozen copy for full
fine-tuning) under the rollout's guidance; only the trained expert's steps count (`ipro.train.kl`).

With `face_motion.weight` > 0 the loss adds a hinge against frozen faces (`face_motion_loss`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

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
        decoded = None if wanted is None else [int(i) for i in wanted]
        frames = self.model.decode(rollout.latents, frames=decoded)
        self.keep_rollout_frames(frames)  # for the reward-hacking monitor (ipro.train.monitor)
        scored = frames
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
        motion_logs = {}
        if c.face_motion.weight > 0:
            boxes = out.details[f"{self.reward.name}/boxes"]
            motion, motion_logs = face_motion_loss(self.model, rollout, cond, scored, decoded, boxes)
            loss = loss + c.face_motion.weight * motion
        raw = out.raw[torch.isfinite(out.raw)]
        logs = {
            "loss": loss.detach(),
            "reward": reward.detach(),
            "reward_raw": raw.mean() if raw.numel() else torch.tensor(float("nan")),
            "kl": kl.detach(),
            "face_coverage": out.coverage.mean(),
            "grad_steps": float(rollout.num_grad_steps),
            **{f"reward/{k}": v for k, v in out.logs.items()},
            **motion_logs,
        }
        return loss, logs


def face_region(boxes: torch.Tensor, height: int, width: int, grow: float = 1.25) -> torch.Tensor:
    """(B, M, 4) pixel boxes (NaN rows: none) -> (B, 1, H, W) mask of their union, each box
    grown by `grow` about its centre."""
    ys = torch.arange(height, dtype=torch.float32)[:, None]
    xs = torch.arange(width, dtype=torch.float32)[None]
    mask = torch.zeros(boxes.shape[0], 1, height, width)
    for i, sample in enumerate(boxes):
        for x0, y0, x1, y1 in sample[torch.isfinite(sample).all(1)].tolist():
            cx, cy, hw, hh = (x0 + x1) / 2, (y0 + y1) / 2, grow * (x1 - x0) / 2, grow * (y1 - y0) / 2
            mask[i, 0] = torch.maximum(mask[i, 0], (((ys - cy).abs() <= hh) & ((xs - cx).abs() <= hw)).float())
    return mask


def face_change(frames: torch.Tensor, region: torch.Tensor) -> torch.Tensor:
    """(B, F, 3, H, W), (B, 1, H, W) -> (B, F): 1 - normalized cross-correlation of each frame's
    gray face region with the first frame's (0 for the first frame; 1 where there is no region)."""
    gray = frames.mean(2) * region  # (B, F, H, W)
    n = region.sum((-2, -1)).clamp_min(1)  # (B, 1)
    centred = (gray - (gray.sum((-2, -1)) / n)[..., None, None]) * region
    unit = centred / centred.flatten(2).norm(dim=-1).clamp_min(1e-6)[..., None, None]
    return 1 - (unit * unit[:, :1]).sum((-2, -1))


def face_motion_loss(model, rollout, cond, frames: torch.Tensor, decoded: list[int] | None, boxes: torch.Tensor):
    """Mean over samples with a face and over frames after the first of relu(c_base - c): how much
    less the faces change from the first frame than in the base model's clean-clip prediction
    at the last gradient step (the same state, LoRA off). The identity reward can raise
    FaceSim by freezing faces on the first frame (the paper's copy-paste hacking); this costs
    exactly that, and nothing while the faces change as much as the base model's."""
    region = face_region(boxes, *frames.shape[-2:]).to(frames)
    has_face = region.flatten(1).any(1)
    if not bool(has_face.any()) or frames.shape[1] < 2:
        return frames.sum() * 0.0, {"face_motion/deficit": 0.0}
    last = rollout.grad_steps[-1]
    with torch.no_grad():
        v_base = model.base_velocity(last.x_t, last.t, cond, rollout.guidance_scale)
        base_frames = model.decode(model.impose_first_frame(last.x_t - last.sigma * v_base, cond), frames=decoded)
    change, change_base = face_change(frames.float(), region), face_change(base_frames.float(), region)
    deficit = F.relu(change_base - change)[has_face, 1:]
    return deficit.mean(), {
        "face_motion/deficit": float(deficit.detach().mean()),
        "face_motion/change": float(change.detach()[has_face, 1:].mean()),
        "face_motion/change_base": float(change_base[has_face, 1:].mean()),
    }
