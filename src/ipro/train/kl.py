"""The KL regularizers of both methods, in one place.

Both compare the fine-tuned model with the base model (the same network with its LoRA
switched off, or the frozen copy of full fine-tuning) on the states the rollout visited,
under the same classifier-free guidance and negative prompt as the rollout: with
guidance above 1 a base model without it differs from the policy even when the adapter is
the identity, and the KL would not start at 0.

Only steps the trainable weights act on count. Wan 2.2 A14B trains its low-noise expert
only; a high-noise step has a zero difference by construction and would only dilute the
mean (`VideoModel.trained_at`).

- IPRO (`multistep_kl`): mean over the K gradient steps of ||v - v_base||^2, weighted per
  step (`kl.weighting`).
- GRPO (`sde_kl`): on one SDE step, ||mu - mu_base||^2 / (2 std^2), the KL between the
  policy's and the base model's Gaussian transitions (Flow-GRPO, identity-grpo).
"""

from __future__ import annotations

import torch

from ipro.sampling.sde import masked_mean, sde_mean_std


def multistep_kl(model, rollout, cond, weighting: str) -> torch.Tensor:
    """Mean over the trained expert's gradient steps of ||v - v_base||^2, weighted per step.

    weighting: "sigma" (/ 2 sigma^2, the public IPRO code), "uniform", or "x0" (* sigma^2,
    i.e. ||x0 - x0_base||^2). Zero when no gradient step reaches the trained weights.
    """
    steps = [s for s in rollout.grad_steps if model.trained_at(s.t)]
    if not steps:
        return torch.zeros((), device=rollout.latents.device)
    mask = model.generated_mask(cond)  # imposed latents are not generated; their velocity is irrelevant
    terms = []
    for step in steps:
        v_base = model.base_velocity(step.x_t, step.t, cond, rollout.guidance_scale)
        per_sample = masked_mean((step.v - v_base) ** 2, mask)
        sigma = step.sigma.to(per_sample)
        if weighting == "sigma":
            per_sample = per_sample / (2 * sigma.clamp_min(1e-3) ** 2)
        elif weighting == "x0":  # x0 = x_t - sigma * v, so this is ||x0 - x0_base||^2
            per_sample = per_sample * sigma**2
        terms.append(per_sample.mean())
    return torch.stack(terms).mean()


def sde_kl(model, cond, mean: torch.Tensor, std: torch.Tensor, transition: dict) -> torch.Tensor:
    """KL(policy || base model) of one stored SDE transition, mean over samples.

    mean, std: the policy's step (from `sde_transition`); transition: `rollout.transition(i)`.
    """
    tr = transition
    with torch.no_grad(), model.base_weights():
        v_base = model.velocity(model.impose_first_frame(tr["x_t"], cond), tr["t"], cond, tr["guidance_scale"])
        mean_base, _ = sde_mean_std(tr["x_t"], v_base, tr["sigma"], tr["sigma_next"], tr["eta"], tr["sigma_max"],
                                    tr["noise_schedule"], tr["sigma_min"])
    return (masked_mean((mean - mean_base) ** 2, model.generated_mask(cond)) / (2 * std.flatten() ** 2)).mean()
