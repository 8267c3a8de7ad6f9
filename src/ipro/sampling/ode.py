"""Flow-matching Euler ODE sampling with gradient through the last K steps (DRaFT-K / AlignProp).

The first T - K steps run under no_grad; the last K keep their graph, so a reward on the
final video backpropagates through K transformer calls. For the multi-step KL, each
gradient step is returned with its x_t, t, sigma and current velocity v.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ipro.models.base import Condition, VideoModel
from ipro.sampling.schedule import Schedule, flow_schedule, initial_noise, seeded_generator


@dataclass
class GradStep:
    """One denoising step taken with gradient."""

    x_t: torch.Tensor  # model input at this step (first frame imposed)
    t: torch.Tensor  # timestep fed to the transformer
    sigma: torch.Tensor  # noise level of x_t
    sigma_next: torch.Tensor
    v: torch.Tensor  # velocity under the current weights (has grad)

    @property
    def x0(self) -> torch.Tensor:
        """The clean-video prediction at this step: x_t - sigma * v."""
        return self.x_t - self.sigma * self.v


@dataclass
class Rollout:
    latents: torch.Tensor  # final latents (sigma = 0), first frame imposed; has grad when K > 0
    noise: torch.Tensor  # the starting noise, to replay the rollout
    schedule: Schedule
    guidance_scale: float
    grad_steps: list[GradStep] = field(default_factory=list)  # the last K steps, in order

    @property
    def num_grad_steps(self) -> int:
        return len(self.grad_steps)


def sample(
    model: VideoModel,
    cond: Condition,
    num_steps: int | None = None,
    grad_steps: int | tuple[int, int] = 0,
    *,
    generator: torch.Generator | None = None,
    seed: int | None = None,
    guidance_scale: float | None = None,
    shift: float | None = None,
    sigmas: list[float] | None = None,
    noise: torch.Tensor | None = None,
) -> Rollout:
    """Euler-integrate dx/dsigma = v from noise to data.

    grad_steps: K, or (low, high) to draw K uniformly in [low, high] per call (AlignProp-style
    randomized truncation; drawn from `generator` after the noise, so the video does not
    depend on it). guidance_scale: None takes the model's default (1.0 for Lightning).
    noise: start from this (B, C, F, h, w) noise instead of drawing it.
    """
    schedule = flow_schedule(model, num_steps, shift, sigmas)
    num_steps = len(schedule)
    guidance_scale = model.default_guidance if guidance_scale is None else guidance_scale
    generator = seeded_generator(seed, generator)
    x = initial_noise(model, cond, generator) if noise is None else noise.to(model.device, torch.float32)
    noise = x
    if isinstance(grad_steps, tuple):
        low, high = grad_steps
        grad_steps = int(torch.randint(low, high + 1, (1,), generator=generator))
    if not 0 <= grad_steps <= num_steps:
        raise ValueError(f"grad_steps must be in [0, {num_steps}], got {grad_steps}")

    recorded: list[GradStep] = []
    for i in range(num_steps):
        sigma, sigma_next, t = schedule.sigmas[i], schedule.sigmas[i + 1], schedule.timesteps[i]
        with torch.set_grad_enabled(torch.is_grad_enabled() and i >= num_steps - grad_steps):
            # Writing the given first-frame latent into the state changes nothing the model sees
            # (velocity imposes it too) but keeps x_t clean for the KL and the log-probs.
            x = model.impose_first_frame(x, cond)
            v = model.velocity(x, t, cond, guidance_scale)
            if torch.is_grad_enabled():
                recorded.append(GradStep(x, t, sigma, sigma_next, v))
            x = x + (sigma_next - sigma) * v
    return Rollout(model.impose_first_frame(x, cond), noise, schedule, guidance_scale, recorded)
