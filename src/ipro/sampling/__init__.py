"""Flow-matching samplers over a `VideoModel`: Euler ODE with truncated gradients, Flow-GRPO SDE."""

from ipro.sampling.ode import GradStep, Rollout, sample
from ipro.sampling.schedule import Schedule, flow_schedule, initial_noise, seeded_generator
from ipro.sampling.sde import SdeRollout, gaussian_log_prob, sde_mean_std, sde_sample, sde_step_logprob

__all__ = [
    "GradStep",
    "Rollout",
    "Schedule",
    "SdeRollout",
    "flow_schedule",
    "gaussian_log_prob",
    "initial_noise",
    "sample",
    "sde_mean_std",
    "sde_sample",
    "sde_step_logprob",
    "seeded_generator",
]
