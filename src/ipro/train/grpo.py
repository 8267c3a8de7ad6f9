"""Identity-GRPO: group relative policy optimization with an SDE sampler (`sampler.noise`:
Flow-GRPO's noise level, or alibaba/identity-grpo's).

One optimizer step (per inner epoch), for each of `grad_accum` inputs (first frame +
caption):

1. Roll out a group of G videos with the SDE sampler, without gradient, keeping every
   transition x_t -> x_next and its log-probability under the rollout weights.
2. Decode and score them: the face-pool reward, the learned identity reward model
   (`grpo.reward_model`), or a weighted mix of their normalized scores. No gradient
   goes through the reward, so any reward works.
3. Advantages are normalized within each group: A = (r - mean_group) / (std_group + eps)
   over the samples the reward could score (a sample it skipped, e.g. no face, gets 0;
   so does a group whose rewards are all equal), clipped to +-ADV_CLIP.
4. For each trained SDE step (the first int(T * grpo.timestep_fraction), those the
   trainable weights act on), recompute log p(x_next | x_t) under the current weights:
       ratio = exp(logp_theta - logp_rollout)
       policy = mean over samples of max(-A ratio, -A clip(ratio, 1 - eps, 1 + eps))
       kl     = mean over samples of ||mu_theta - mu_base||^2 / (2 std^2)
   (mu: the SDE step's mean, std: its standard deviation; the base model is the model
   with its LoRA switched off, under the same guidance; `ipro.train.kl`). loss = policy + grpo.kl_weight * kl, averaged over steps
   and inputs. One backward per SDE step (only one transformer graph is alive at a
   time), one optimizer step per pass; `grpo.inner_epochs` passes reuse the rollouts,
   the later ones off-policy, which is what the clip is for.

Everything else (adapters, data order, checkpoints, logging, accelerate) is `Trainer`'s.
Groups are never split across processes, so advantages need no communication.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from ipro.errors import IproError
from ipro.models.base import Condition
from ipro.sampling.sde import SdeRollout, sde_sample, sde_transition
from ipro.train.kl import sde_kl
from ipro.train.trainer import Trainer, step_generator

ADV_EPS = 1e-4  # Flow-GRPO's epsilon in (r - mean) / (std + eps)
ADV_CLIP = 5.0  # Flow-GRPO's adv_clip_max


def group_advantages(scores: torch.Tensor, valid: torch.Tensor, group_size: int, eps: float = ADV_EPS) -> torch.Tensor:
    """(B*G,) rewards, consecutive groups of G -> advantages normalized within each group.

    Only valid samples enter the mean and (population) std; invalid samples and groups
    with fewer than two valid samples get advantage 0 (no signal, no update).
    """
    s = scores.detach().float().view(-1, group_size)
    v = valid.view(-1, group_size)
    n = v.sum(1, keepdim=True)
    mean = torch.where(v, s, 0.0).sum(1, keepdim=True) / n.clamp_min(1)
    std = (torch.where(v, (s - mean) ** 2, 0.0).sum(1, keepdim=True) / n.clamp_min(1)).sqrt()
    adv = torch.where(v & (n >= 2), (s - mean) / (std + eps), 0.0)
    return adv.clamp(-ADV_CLIP, ADV_CLIP).flatten()


def clipped_policy_loss(logp: torch.Tensor, logp_old: torch.Tensor, advantages: torch.Tensor, clip_range: float):
    """PPO's clipped surrogate, mean over samples; also returns the ratio."""
    ratio = torch.exp(logp - logp_old)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    return torch.maximum(unclipped, clipped).mean(), ratio


def trained_steps(model, sde: SdeRollout, fraction: float = 1.0) -> list[int]:
    """The SDE steps the update trains: the first int(T * fraction) (identity-grpo's
    timestep fraction), and of those only the ones the trainable weights act on (A14B: the
    low-noise expert's), so a frozen expert's steps do not dilute the mean."""
    last = int(len(sde.schedule) * fraction)
    steps = [i for i in sde.sde_steps if i < last and model.trained_at(sde.schedule.timesteps[i])]
    if not steps:
        raise IproError(f"grpo.timestep_fraction={fraction} with sampler.num_steps={len(sde.schedule)} leaves no step "
                        "that the trained weights act on; raise the fraction or the number of steps")
    return steps


@dataclass
class GroupRollout:
    """G videos per input: the SDE trajectories, their rewards and advantages."""

    cond: Condition  # (B*G) conditions, each input's repeated G times in a row
    sde: SdeRollout
    scores: torch.Tensor  # (B*G,) normalized reward
    valid: torch.Tensor  # (B*G,) the reward could score the sample
    advantages: torch.Tensor  # (B*G,)
    logs: dict = field(default_factory=dict)


class GRPOTrainer(Trainer):
    """`ipro train --method grpo`. Overrides `step()` (rollout, then update passes);
    `rollout()` and `policy_loss()` are the two halves, usable on their own."""

    method = "grpo"
    nonfinite_what = "GRPO loss was NaN/inf in {n} passes in a row"
    nonfinite_advice = "lower optim.lr or grpo.clip_range, enable optim.max_grad_norm, or check the reward"

    def build_reward(self):
        from ipro.rewards.factory import build_reward

        c = self.config
        return build_reward(c.reward, self.accelerator.device, reward_model=c.grpo.reward_model,
                            reward_model_weight=c.grpo.reward_model_weight, face_reward_weight=c.grpo.face_reward_weight,
                            dtype=getattr(torch, c.model.dtype))  # a VLM reward model runs in the policy's dtype

    # --- 1-3: rollout, reward, advantages ---------------------------------------------

    @torch.no_grad()
    def rollout(self, batch: dict, generator: torch.Generator) -> GroupRollout:
        from ipro.rewards import RewardBatch

        c = self.config
        g = c.grpo
        G = g.group_size
        cond = self.condition(batch).repeat_interleave(G)
        t0 = time.perf_counter()
        sde = sde_sample(self.model, cond, c.sampler.num_steps, eta=g.eta, generator=generator,
                         guidance_scale=c.sampler.guidance_scale, shift=c.sampler.shift, noise_schedule=c.sampler.noise)
        t1 = time.perf_counter()
        frames = self.model.decode(sde.latents)
        self.keep_rollout_frames(frames)  # for the reward-hacking monitor (ipro.train.monitor)
        pools = [p for p in batch["pool"] for _ in range(G)]
        images = batch["image"].to(frames.device).repeat_interleave(G, 0)
        # A subject-to-video model's subject crops are the learned rewards' subject images too.
        extra = {"subjects": [s for s in batch["subjects"] for _ in range(G)]} if "subjects" in batch else {}
        out = self.reward(frames.float(), RewardBatch(pools=pools, input_frames=images, extra=extra))
        t2 = time.perf_counter()
        scores, valid = out.score.detach().float(), out.valid
        adv = group_advantages(scores, valid, G)
        grouped = scores.view(-1, G)
        raw = out.raw[torch.isfinite(out.raw)]
        logs = {
            "reward": float(scores[valid].mean()) if valid.any() else float("nan"),
            "reward_raw": float(raw.mean()) if raw.numel() else float("nan"),
            "reward_group_std": float(grouped.std(1, unbiased=False).mean()),
            "zero_advantage_groups": float((adv.view(-1, G) == 0).all(1).float().mean()),
            "valid_fraction": float(valid.float().mean()),
            "sample_time_s": t1 - t0,
            "reward_time_s": t2 - t1,
            **{f"reward/{k}": v for k, v in out.logs.items()},
        }
        return GroupRollout(cond, sde, scores, valid, adv, logs)

    # --- 4: the update ----------------------------------------------------------------

    def trained_steps(self, sde: SdeRollout) -> list[int]:
        return trained_steps(self.model, sde, self.config.grpo.timestep_fraction)

    def policy_loss(self, group: GroupRollout, i: int) -> tuple[torch.Tensor, dict]:
        """Clipped policy loss + beta * KL on SDE step i of a group rollout."""
        g = self.config.grpo
        tr = group.sde.transition(i)
        logp, mean, std = sde_transition(self.model, group.cond, **tr)
        old = group.sde.log_probs[:, i].to(logp)
        policy, ratio = clipped_policy_loss(logp, old, group.advantages.to(logp), g.clip_range)
        kl = sde_kl(self.model, group.cond, mean, std, tr) if g.kl_weight > 0 else torch.zeros((), device=logp.device)
        loss = policy + g.kl_weight * kl
        dev = (ratio.detach() - 1).abs()
        logs = {
            "loss": loss.detach(),
            "policy_loss": policy.detach(),
            "kl": kl.detach(),
            "ratio": ratio.detach().mean(),
            "ratio_max_dev": dev.max(),
            "clip_fraction": (dev > g.clip_range).float().mean(),
            "approx_kl": 0.5 * ((logp.detach() - old) ** 2).mean(),
        }
        return loss, logs

    def compute_loss(self, batch: dict, generator: torch.Generator):
        """The whole GRPO objective of one input on-policy, as one graph (small models,
        notebooks); training goes through `step()`, which backpropagates per SDE step."""
        group = self.rollout(batch, generator)
        steps = self.trained_steps(group.sde)
        losses, logs = [], {}
        for i in steps:
            loss, step_logs = self.policy_loss(group, i)
            losses.append(loss)
            for k, v in step_logs.items():
                logs[k] = logs.get(k, 0.0) + float(v) / len(steps)
        return torch.stack(losses).mean(), {**group.logs, **logs}

    def step(self) -> dict:
        c = self.config
        acc = self.accelerator
        t0 = self.begin_step()
        groups = []
        with acc.autocast():
            for micro in range(c.optim.grad_accum):
                batch = self.batch_at(self.global_step, micro)
                groups.append(self.rollout(batch, step_generator(c.run.seed, self.global_step, self.rank, micro)))
        rollout_time = time.perf_counter() - t0
        logs: dict[str, float] = {}
        for grp in groups:
            for k, v in grp.logs.items():
                logs[k] = logs.get(k, 0.0) + float(v) / len(groups)
        steps = self.trained_steps(groups[0].sde)
        terms = len(groups) * len(steps)
        t1 = time.perf_counter()
        for epoch in range(c.grpo.inner_epochs):
            finite = True
            sums: dict[str, float] = {}
            for m, grp in enumerate(groups):
                for j, i in enumerate(steps):
                    last = m == len(groups) - 1 and j == len(steps) - 1
                    with acc.autocast(), self.model.no_sync(not last):
                        loss, step_logs = self.policy_loss(grp, i)
                    finite = finite and bool(torch.isfinite(loss.detach()))
                    # A step no trainable weight acts on (A14B's frozen high-noise expert) has no graph.
                    if finite and loss.requires_grad:
                        acc.backward(loss / terms)
                    for k, v in step_logs.items():
                        sums[k] = sums.get(k, 0.0) + float(v) / terms
            # The first pass is on-policy (ratio 1); later passes show how far the policy moved.
            logs.update(sums if epoch == 0 else {f"{k}_last_epoch": v for k, v in sums.items() if k in ("ratio", "clip_fraction", "approx_kl")})
            self.apply_update(finite, logs)
        videos = c.data.batch_size * c.grpo.group_size * len(groups)
        logs.update({
            "rollout_time_s": rollout_time,
            "update_time_s": time.perf_counter() - t1,
            "videos_per_s": videos / max(rollout_time, 1e-9),
        })
        return self.end_step(logs, t0)
