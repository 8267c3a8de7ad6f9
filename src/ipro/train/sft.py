"""SFT baseline: the flow-matching loss on ground-truth clips plus a face identity loss,
as the paper's SFT comparison runs it ("facial similarity as an auxiliary loss").

x_t = sigma * noise + (1 - sigma) * x0 with sigma drawn from the sampler's schedule,
    loss = ||v_theta(x_t, t) - (noise - x0)||^2  -  w * normalized R_face(decode(x0_hat))
over the generated latents, with x0_hat = x_t - sigma * v_theta the clip the model
predicts from x_t (teacher forcing: the input is the noised ground truth, never the
model's own rollout, which is the difference IPRO is about). R_face is IPRO's reward
(the `reward` section: mode, frames, normalization) and w is `sft.face_weight`.
"""

from __future__ import annotations

import torch

from ipro.sampling.sde import masked_mean
from ipro.train.trainer import Trainer


class SFTTrainer(Trainer):
    method = "sft"
    needs_clips = True

    def condition_image(self, item: dict) -> torch.Tensor:
        return item["clip"][0]  # SFT conditions on the clip's own first frame

    def build_reward(self):
        if self.config.sft.face_weight == 0:
            return None
        from ipro.rewards.factory import build_face_reward

        return build_face_reward(self.config.reward, self.accelerator.device)

    def compute_loss(self, batch: dict, generator: torch.Generator):
        from ipro.sampling.schedule import flow_schedule

        c = self.config
        dev = self.accelerator.device
        clips = batch["clip"].to(dev)  # (B, F, 3, H, W)
        cond = self.condition(batch, images=clips[:, 0])
        with torch.no_grad():
            x0 = self.model.encode_video(clips.transpose(1, 2))  # the VAE wants (B, 3, F, H, W)
        schedule = flow_schedule(self.model, num_steps=c.sampler.num_steps, shift=c.sampler.shift)
        i = torch.randint(0, len(schedule), (x0.shape[0],), generator=generator)
        sigma = schedule.sigmas[i].to(dev).view(-1, 1, 1, 1, 1)
        t = schedule.timesteps[i].to(dev)
        noise = torch.randn(x0.shape, generator=generator).to(dev)
        x_t = self.model.impose_first_frame(sigma * noise + (1 - sigma) * x0, cond)
        v = self.model.velocity(x_t, t, cond)
        diffusion = masked_mean((v - (noise - x0)) ** 2, self.model.generated_mask(cond)).mean()
        logs = {"diffusion_loss": diffusion.detach(), "sigma": sigma.mean()}
        loss = diffusion
        if self.reward is not None:
            face = self.face_score(self.model.impose_first_frame(x_t - sigma * v, cond), batch, clips[:, 0])
            loss = diffusion - c.sft.face_weight * face.mean()
            logs.update({"reward": face.mean().detach(), "face_coverage": face.coverage.mean()})
        return loss, {"loss": loss.detach(), **logs}

    def face_score(self, x0_hat: torch.Tensor, batch: dict, first_frames: torch.Tensor):
        """The face reward of the decoded x0 prediction (only the frames it scores are decoded)."""
        from ipro.rewards import RewardBatch

        num_frames = self.config.data.num_frames
        wanted = [int(i) for i in self.reward.frames.indices(num_frames)]
        frames = self.model.decode(x0_hat, frames=wanted)
        full = frames.new_zeros(frames.shape[0], num_frames, *frames.shape[2:])  # the reward picks `wanted` again
        full[:, wanted] = frames
        return self.reward(full, RewardBatch(pools=batch["pool"], input_frames=first_frames))
