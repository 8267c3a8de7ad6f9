"""SFT baseline: the flow-matching loss on ground-truth clips (the paper's comparison).

x_t = sigma * noise + (1 - sigma) * x0 with sigma drawn from the sampler's schedule,
loss = ||v_theta(x_t, t) - (noise - x0)||^2 over the generated latents.
"""

from __future__ import annotations

import torch

from ipro.train.trainer import Trainer


class SFTTrainer(Trainer):
    method = "sft"
    needs_clips = True

    def condition_image(self, item: dict) -> torch.Tensor:
        return item["clip"][0]  # SFT conditions on the clip's own first frame

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
        sq = (v - (noise - x0)) ** 2
        mask = self.model.generated_mask(cond)
        loss = (sq * mask).sum() / (mask.expand_as(sq).sum()) if mask is not None else sq.mean()
        return loss, {"loss": loss.detach(), "sigma": sigma.mean()}
