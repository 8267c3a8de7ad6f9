"""The noise schedule of a rollout, taken from the model's own diffusers scheduler.

We always integrate with our own Euler / SDE steps (reward backprop and GRPO need a
single-step update), but the grid of sigmas and the timesteps fed to the transformer are
the scheduler's, shift included, so a guidance-1 ODE rollout matches
`WanImageToVideoPipeline` with a FlowMatchEulerDiscreteScheduler bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ipro.models.base import VideoModel, scheduler_with_shift


@dataclass
class Schedule:
    sigmas: torch.Tensor  # (T + 1,) float32 on the CPU, from ~1 (noise) down to 0 (data)
    timesteps: torch.Tensor  # (T,) what the transformer is fed at step i (int64 for UniPC)

    def __len__(self) -> int:
        return len(self.timesteps)


def flow_schedule(
    model: VideoModel,
    num_steps: int | None = None,
    shift: float | None = None,
    sigmas: list[float] | None = None,
) -> Schedule:
    """The model scheduler's sigmas/timesteps for num_steps (default: the model's default).

    shift: override the scheduler's timestep shift. sigmas: custom unshifted sigmas (the
    scheduler shifts them, as diffusers does); a Lightning model supplies its own.
    """
    scheduler = model.scheduler if shift is None else scheduler_with_shift(model.scheduler, shift)
    if sigmas is None and num_steps is None and model.default_sigmas is not None:
        sigmas = model.default_sigmas
    # set_timesteps before every rollout: the scheduler is stateful and shared.
    if sigmas is not None:
        scheduler.set_timesteps(sigmas=np.array(sigmas, dtype=np.float64))  # UniPC needs an array
    else:
        num_steps = num_steps or model.default_steps
        if num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {num_steps}")
        scheduler.set_timesteps(num_steps)
    return Schedule(scheduler.sigmas.to("cpu", torch.float32).clone(), scheduler.timesteps.to("cpu").clone())


def seeded_generator(seed: int | None = None, generator: torch.Generator | None = None) -> torch.Generator:
    """A CPU generator: noise is drawn on the CPU so a seed gives the same video on any device."""
    if generator is not None:
        return generator
    if seed is None:
        seed = int(torch.randint(0, 2**62, (1,)))
    return torch.Generator().manual_seed(seed)


def initial_noise(model: VideoModel, cond, generator: torch.Generator) -> torch.Tensor:
    shape = model.latent_shape(cond.batch_size, cond.num_frames, cond.height, cond.width)
    return torch.randn(shape, generator=generator, dtype=torch.float32, device=generator.device).to(model.device)


def per_sample(value, like: torch.Tensor) -> torch.Tensor:
    """A scalar or (B,) sigma as a float32 tensor that broadcasts against (B, C, F, H, W)."""
    value = torch.as_tensor(value, dtype=torch.float32, device=like.device)
    return value.view(-1, *[1] * (like.ndim - 1)) if value.ndim == 1 else value
