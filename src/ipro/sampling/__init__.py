"""Flow-matching samplers over a `VideoModel`: Euler ODE with truncated gradients, Flow-GRPO SDE."""

from ipro.sampling.ode import GradStep, Rollout, sample
from ipro.sampling.schedule import Schedule, flow_schedule, initial_noise, seeded_generator
from ipro.sampling.sde import NOISE_SCHEDULES, SdeRollout, gaussian_log_prob, masked_mean, sde_mean_std, sde_sample, sde_step_logprob, sde_transition

__all__ = [
    "NOISE_SCHEDULES",
    "GradStep",
    "Rollout",
    "Schedule",
    "SdeRollout",
    "flow_schedule",
    "gaussian_log_prob",
    "initial_noise",
    "masked_mean",
    "sample",
    "sde_mean_std",
    "sde_sample",
    "sde_step_logprob",
    "sde_transition",
    "seeded_generator",
]
