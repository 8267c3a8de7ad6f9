"""Flow-GRPO's SDE sampler: the same marginals as the Euler ODE, plus noise, so each step is a
Gaussian policy step with a log-probability.

With sigma the noise level, dt = sigma_next - sigma < 0, one step is
    mean  = x * (1 + std_t^2 / (2 sigma) * dt) + v * (1 + std_t^2 (1 - sigma) / (2 sigma)) * dt
    x_next ~ N(mean, (std_t * sqrt(-dt))^2)
(Liu et al., "Flow-GRPO", 2025, eq. 9-12). Two noise schedules std_t (`noise_schedule`):
- "flow_grpo": std_t = eta * sqrt(sigma / (1 - sigma)). At sigma = 1 it diverges, so as
  Flow-GRPO does, sigma is capped at the schedule's second sigma (`sigma_max`) inside it.
- "identity_grpo": std_t = sigma_min + (sigma_max - sigma_min) * sigma, with sigma_max the
  schedule's second sigma and sigma_min its last (0): alibaba/identity-grpo's public
  sampler. It has no eta (`eta` is ignored).
Log-probs are averaged over the generated latent elements (the imposed first frame of Wan
2.2 TI2V is left out), one number per video. `sde_transition` is the one place a stored
transition is scored again (GRPO's ratio and KL, `sde_step_logprob`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ipro.models.base import Condition, VideoModel
from ipro.sampling.schedule import Schedule, flow_schedule, initial_noise, per_sample, seeded_generator


NOISE_SCHEDULES = ("flow_grpo", "identity_grpo")


def sde_mean_std(
    x_t, v, sigma, sigma_next, eta: float, sigma_max, noise_schedule: str = "flow_grpo", sigma_min=0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std of x_next given x_t and the velocity v (see the module docstring)."""
    sigma, sigma_next = per_sample(sigma, x_t), per_sample(sigma_next, x_t)
    sigma_max = per_sample(sigma_max, x_t)
    dt = sigma_next - sigma
    if noise_schedule == "flow_grpo":
        std_t = eta * torch.sqrt(sigma / (1 - torch.minimum(sigma, sigma_max)))
    elif noise_schedule == "identity_grpo":
        sigma_min = per_sample(sigma_min, x_t)
        std_t = sigma_min + (sigma_max - sigma_min) * sigma
    else:
        raise ValueError(f"noise_schedule must be one of {NOISE_SCHEDULES}, got {noise_schedule!r}")
    mean = x_t * (1 + std_t**2 / (2 * sigma) * dt) + v * (1 + std_t**2 * (1 - sigma) / (2 * sigma)) * dt
    return mean, std_t * torch.sqrt(-dt)


def masked_mean(x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over all but the batch dim, over mask == 1 when given (the generated latents): (B,)."""
    if mask is None:
        return x.flatten(1).mean(1)
    mask = mask.expand_as(x)
    return torch.where(mask > 0, x, 0.0).flatten(1).sum(1) / mask.flatten(1).sum(1)


def gaussian_log_prob(x, mean, std, mask: torch.Tensor | None = None) -> torch.Tensor:
    """log N(x; mean, std^2) averaged over all but the batch dim (over mask == 1 if given): (B,)."""
    return masked_mean(-((x - mean) ** 2) / (2 * std**2) - torch.log(std) - 0.5 * math.log(2 * math.pi), mask)


@dataclass
class SdeRollout:
    latents: torch.Tensor  # final latents, first frame imposed
    states: list[torch.Tensor]  # x at each step, states[i] -> states[i + 1]; T + 1 entries
    log_probs: torch.Tensor  # (B, T) log-prob of each transition when sampled (0 for ODE steps)
    schedule: Schedule
    sde_steps: list[int]  # the steps that were stochastic
    eta: float
    guidance_scale: float
    noise_schedule: str = "flow_grpo"

    @property
    def sigma_max(self) -> torch.Tensor:
        return self.schedule.sigmas[1]

    @property
    def sigma_min(self) -> torch.Tensor:
        return self.schedule.sigmas[-1]

    def transition(self, i: int) -> dict:
        """Keyword arguments of `sde_step_logprob` for step i (add model and cond)."""
        s = self.schedule
        return dict(
            x_t=self.states[i],
            x_next=self.states[i + 1],
            sigma=s.sigmas[i],
            sigma_next=s.sigmas[i + 1],
            t=s.timesteps[i],
            eta=self.eta,
            sigma_max=self.sigma_max,
            guidance_scale=self.guidance_scale,
            noise_schedule=self.noise_schedule,
            sigma_min=self.sigma_min,
        )


@torch.no_grad()
def sde_sample(
    model: VideoModel,
    cond: Condition,
    num_steps: int | None = None,
    *,
    eta: float = 0.7,
    generator: torch.Generator | None = None,
    seed: int | None = None,
    guidance_scale: float | None = None,
    shift: float | None = None,
    sigmas: list[float] | None = None,
    sde_steps: list[int] | None = None,
    noise: torch.Tensor | None = None,
    noise_schedule: str = "flow_grpo",
) -> SdeRollout:
    """Sample with Flow-GRPO's SDE and record every transition's log-prob (no gradient).

    sde_steps: indices of the stochastic steps (default: all); the others are Euler ODE steps,
    as in Flow-GRPO-Fast / MixGRPO windows. noise: the starting noise (default: drawn).
    noise_schedule: "flow_grpo" or "identity_grpo" (module docstring).
    """
    schedule = flow_schedule(model, num_steps, shift, sigmas)
    num_steps = len(schedule)
    sde_steps = list(range(num_steps)) if sde_steps is None else sorted(sde_steps)
    guidance_scale = model.default_guidance if guidance_scale is None else guidance_scale
    generator = seeded_generator(seed, generator)
    x = initial_noise(model, cond, generator) if noise is None else noise.to(model.device, torch.float32)
    mask = model.generated_mask(cond)
    states, log_probs = [], torch.zeros(x.shape[0], num_steps, device=model.device)
    for i in range(num_steps):
        sigma, sigma_next, t = schedule.sigmas[i], schedule.sigmas[i + 1], schedule.timesteps[i]
        x = model.impose_first_frame(x, cond)
        states.append(x)
        v = model.velocity(x, t, cond, guidance_scale)
        if i in sde_steps:
            mean, std = sde_mean_std(x, v, sigma, sigma_next, eta, schedule.sigmas[1], noise_schedule, schedule.sigmas[-1])
            z = torch.randn(x.shape, generator=generator, dtype=torch.float32, device=generator.device).to(x.device)
            x = mean + std * z
            log_probs[:, i] = gaussian_log_prob(x, mean, std, mask)
        else:
            x = x + (sigma_next - sigma) * v
    states.append(x)
    return SdeRollout(model.impose_first_frame(x, cond), states, log_probs, schedule, sde_steps, eta, guidance_scale, noise_schedule)


def sde_transition(
    model: VideoModel, cond: Condition, x_t, x_next, sigma, sigma_next, t, eta, sigma_max, guidance_scale,
    noise_schedule: str = "flow_grpo", sigma_min=0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """log p(x_next | x_t) (B,), the step's mean and std under the model's current weights.

    The same arithmetic as `sde_sample`, so on unchanged weights the log-prob is bit-for-bit
    the rollout's. Takes `rollout.transition(i)` as keyword arguments.
    """
    v = model.velocity(model.impose_first_frame(x_t, cond), t, cond, guidance_scale)
    mean, std = sde_mean_std(x_t, v, sigma, sigma_next, eta, sigma_max, noise_schedule, sigma_min)
    return gaussian_log_prob(x_next.detach(), mean, std, model.generated_mask(cond)), mean, std


def sde_step_logprob(
    model: VideoModel,
    x_t: torch.Tensor,
    x_next: torch.Tensor,
    sigma,
    sigma_next,
    cond: Condition,
    *,
    t=None,
    eta: float = 0.7,
    sigma_max=None,
    guidance_scale: float = 1.0,
    noise_schedule: str = "flow_grpo",
    sigma_min=0.0,
) -> torch.Tensor:
    """log p(x_next | x_t) under the model's current weights, (B,), with gradient to them.

    t defaults to sigma * num_train_timesteps (exact for FlowMatchEuler schedules; pass the
    rollout's t for UniPC). sigma_max is the schedule's second sigma: the cap on sigma inside
    Flow-GRPO's std (only needed for a step that starts at sigma = 1), the top of identity-grpo's
    (always needed); sigma_min is the schedule's last sigma.
    `rollout.transition(i)` gives all of these for a stored step.
    """
    if t is None:
        t = torch.as_tensor(sigma, dtype=torch.float32) * model.num_train_timesteps
    if sigma_max is None:
        if noise_schedule != "flow_grpo" or bool((torch.as_tensor(sigma) >= 1).any()):
            raise ValueError("this step needs sigma_max (rollout.transition(i) provides it)")
        sigma_max = sigma
    return sde_transition(model, cond, x_t, x_next, sigma, sigma_next, t, eta, sigma_max, guidance_scale, noise_schedule, sigma_min)[0]
